#include "ctrl/ike/config.hh"

#include <yaml.h>

#include <fmt/format.h>

#include <pthread.h>

#include <tl/expected.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

namespace moat::ike {

std::string TunnelError::str() const {
  if (!line) return fmt::format("{}: {}", file, what);
  return fmt::format("{}:{}:{}: {}", file, line, col, what);
}

std::optional<std::pair<IpAddr, uint8_t>> parse_prefix(std::string_view s, std::string* why) {
  auto slash = s.find('/');
  auto a = IpAddr::parse(s.substr(0, slash));
  if (!a) {
    if (why) *why = fmt::format("\"{}\" is not an IP address", s.substr(0, slash));
    return std::nullopt;
  }
  unsigned max = a->is_v4() ? 32 : 128, len = max;
  if (slash != s.npos) {
    std::string l(s.substr(slash + 1));
    if (l.empty() || l.size() > 3 || l.find_first_not_of("0123456789") != std::string::npos ||
        unsigned(std::stoi(l)) > max) {
      if (why) *why = fmt::format("\"{}\" is not a prefix length (0-{})", l, max);
      return std::nullopt;
    }
    len = unsigned(std::stoi(l));
  }
  return std::make_pair(*a, uint8_t(len));
}

namespace {

// A tunnel file as a tree: scalars, maps and lists with their places.
// Why hand-written over libyaml (Debian's libyaml-dev) rather than
// yaml-cpp, which moatd's main config uses: yaml-cpp took about 60 us of
// CPU per small tunnel file, 0.6 s of a portal's start with 10,000 moats;
// libyaml's events take about 13 us. The tree keeps yaml-cpp's meaning
// where the loader looks: a missing key is false; `key:`, `~` and `null`
// are present but not scalars; the first of duplicate keys wins; aliases
// are resolved; only the first document is read.
struct YamlMark {
  int line = -1, column = -1;  // 0-based; -1: nowhere (a missing node)
};

class Yaml {
 public:
  enum Kind : uint8_t { kMissing, kNull, kScalar, kMap, kSeq };
  explicit operator bool() const { return kind_ != kMissing; }
  bool IsScalar() const { return kind_ == kScalar; }
  bool IsMap() const { return kind_ == kMap; }
  bool IsSequence() const { return kind_ == kSeq; }
  const std::string& Scalar() const { return text_; }
  YamlMark Mark() const { return mark_; }
  size_t size() const { return kind_ == kMap ? entries_.size() : kind_ == kSeq ? items_.size() : 0; }
  // A map's value for `key` (the first, if repeated), or a missing node.
  const Yaml& operator[](std::string_view key) const {
    for (auto& [k, v] : entries_)
      if (k.kind_ == kScalar && k.text_ == key) return v;
    static const Yaml missing;
    return missing;
  }
  const std::vector<std::pair<Yaml, Yaml>>& entries() const { return entries_; }
  // A key's text; "" when it is not a scalar.
  const std::string& key_text() const {
    static const std::string none;
    return kind_ == kScalar ? text_ : none;
  }
  std::vector<Yaml>::const_iterator begin() const { return items_.begin(); }
  std::vector<Yaml>::const_iterator end() const { return items_.end(); }

  struct SyntaxError {
    int line = 0, col = 0;  // 1-based; 0: the whole file
    std::string what;
  };
  // The first document of `text`; an empty stream is a null node at 1:1.
  static tl::expected<Yaml, SyntaxError> parse(const std::string& text);

 private:
  Kind kind_ = kMissing;
  YamlMark mark_;
  std::string text_;
  std::vector<std::pair<Yaml, Yaml>> entries_;
  std::vector<Yaml> items_;
};

tl::expected<Yaml, Yaml::SyntaxError> Yaml::parse(const std::string& text) {
  yaml_parser_t p;
  if (!yaml_parser_initialize(&p)) return tl::unexpected(SyntaxError{0, 0, "out of memory"});
  yaml_parser_set_input_string(&p, reinterpret_cast<const unsigned char*>(text.data()), text.size());
  std::vector<Yaml> stack;          // open maps and lists
  std::vector<std::string> anchors;  // of the open nodes ("" none)
  std::map<std::string, Yaml> anchored;
  std::optional<Yaml> root;
  // A finished node goes into its parent: a list's next item, a map's key,
  // or the value of the map's last key.
  auto put = [&](Yaml&& n, const std::string& anchor) {
    if (!anchor.empty()) anchored[anchor] = n;
    if (stack.empty()) {
      root = std::move(n);
      return;
    }
    Yaml& top = stack.back();
    if (top.kind_ == kSeq) top.items_.push_back(std::move(n));
    else if (top.entries_.empty() || top.entries_.back().second.kind_ != kMissing)
      top.entries_.emplace_back(std::move(n), Yaml{});
    else top.entries_.back().second = std::move(n);
  };
  auto anchor_of = [](const yaml_char_t* a) { return a ? std::string(reinterpret_cast<const char*>(a)) : std::string(); };
  tl::expected<Yaml, SyntaxError> out = tl::unexpected(SyntaxError{0, 0, "no document"});
  for (bool done = false; !done;) {
    yaml_event_t ev;
    if (!yaml_parser_parse(&p, &ev)) {
      SyntaxError e;
      e.what = p.problem ? p.problem : "unreadable";
      if (p.context) e.what += fmt::format(" {}", p.context);
      if (p.error != YAML_READER_ERROR) {
        e.line = int(p.problem_mark.line) + 1;
        e.col = int(p.problem_mark.column) + 1;
      }
      out = tl::unexpected(std::move(e));
      break;
    }
    YamlMark m{int(ev.start_mark.line), int(ev.start_mark.column)};
    switch (ev.type) {
      case YAML_SCALAR_EVENT: {
        Yaml n;
        n.mark_ = m;
        n.text_.assign(reinterpret_cast<const char*>(ev.data.scalar.value), ev.data.scalar.length);
        bool plain = ev.data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
        n.kind_ = plain && (n.text_.empty() || n.text_ == "~" || n.text_ == "null" || n.text_ == "Null" ||
                            n.text_ == "NULL")
                      ? kNull
                      : kScalar;
        if (n.kind_ == kNull) n.text_.clear();
        put(std::move(n), anchor_of(ev.data.scalar.anchor));
        break;
      }
      case YAML_SEQUENCE_START_EVENT:
      case YAML_MAPPING_START_EVENT: {
        Yaml n;
        n.mark_ = m;
        n.kind_ = ev.type == YAML_SEQUENCE_START_EVENT ? kSeq : kMap;
        stack.push_back(std::move(n));
        anchors.push_back(anchor_of(ev.type == YAML_SEQUENCE_START_EVENT ? ev.data.sequence_start.anchor
                                                                         : ev.data.mapping_start.anchor));
        break;
      }
      case YAML_SEQUENCE_END_EVENT:
      case YAML_MAPPING_END_EVENT: {
        Yaml n = std::move(stack.back());
        std::string a = std::move(anchors.back());
        stack.pop_back();
        anchors.pop_back();
        put(std::move(n), a);
        break;
      }
      case YAML_ALIAS_EVENT: {
        auto it = anchored.find(anchor_of(ev.data.alias.anchor));
        Yaml n = it != anchored.end() ? it->second : Yaml{};
        if (it == anchored.end()) n.kind_ = kNull;
        n.mark_ = m;
        put(std::move(n), "");
        break;
      }
      case YAML_DOCUMENT_END_EVENT:
      case YAML_STREAM_END_EVENT:
        if (!root) {  // an empty document or stream
          root = Yaml{};
          root->kind_ = kNull;
          root->mark_ = {0, 0};
        }
        out = std::move(*root);
        done = true;
        break;
      default:
        break;
    }
    yaml_event_delete(&ev);
  }
  yaml_parser_delete(&p);
  return out;
}

struct Record {
  const std::string& file;
  std::string name;
  std::vector<TunnelError> errors;
  void error(const Yaml& n, const std::string& key, const std::string& what) {
    auto m = n.Mark();
    errors.push_back({file, m.line + 1, m.column + 1,
                      fmt::format("tunnel \"{}\": {}{}{}", name, key, key.empty() ? "" : ": ", what)});
  }
};

std::optional<std::string> scalar(Record& r, const Yaml& map, const char* key, bool required) {
  const Yaml& n = map[key];
  if (!n) {
    if (required) r.error(map, "", fmt::format("\"{}\" is required", key));
    return std::nullopt;
  }
  if (!n.IsScalar()) {
    r.error(n, key, "expected a single value");
    return std::nullopt;
  }
  return n.Scalar();
}

std::optional<uint32_t> seconds(Record& r, const Yaml& map, const char* key) {
  auto s = scalar(r, map, key, false);
  if (!s) return std::nullopt;
  std::string v = *s;
  unsigned mult = 1;
  if (!v.empty() && (v.back() == 's' || v.back() == 'm' || v.back() == 'h')) {
    mult = v.back() == 'h' ? 3600 : v.back() == 'm' ? 60 : 1;
    v.pop_back();
  }
  if (v.empty() || v.size() > 9 || v.find_first_not_of("0123456789") != std::string::npos) {
    r.error(map[key], key, fmt::format("\"{}\" is not a duration (e.g. 30, 30s, 10m, 1h)", *s));
    return std::nullopt;
  }
  return uint32_t(std::stoul(v) * mult);
}

std::string proposal_text(Record& r, const Yaml& map, const char* key, const char* dflt) {
  const Yaml& n = map[key];
  if (!n) return dflt;
  if (n.IsScalar()) return n.Scalar();
  if (n.IsSequence()) {
    std::string s;
    for (const Yaml& x : n) {
      if (!x.IsScalar()) {
        r.error(x, key, "expected a proposal string");
        return "";
      }
      s += (s.empty() ? "" : ",") + x.Scalar();
    }
    return s;
  }
  r.error(n, key, "expected a proposal string or a list of them");
  return "";
}

const std::set<std::string> kKeys = {"name",          "local_id", "remote_id", "psk",    "psk_file", "remote",
                                     "local",         "start",    "funnels",   "lifetime", "rekey",  "dpd",
                                     "ike_proposals", "esp_proposals", "auth", "cert", "key", "ca", "crl", "ike_rekey", "mobike",
                                     "ike_lifetime", "mobike_check", "no_nats_allowed"};

}  // namespace

namespace {

// One file read and checked on its own (any thread): the record, or the
// errors that skip it. The checks against the other records (names,
// identities) are admit()'s, in file order.
constexpr size_t kFilesPerChunk = 64;  // handed to a loading thread at a time

struct ParsedFile {
  std::optional<PeerConfig> peer;
  std::vector<TunnelError> errors;
  int line = 0, col = 0;          // the document's place
  int id_line = 0, id_col = 0;    // remote_id's place
};

// Credentials loaded once for all tunnels naming the same files; shared by
// the loading threads.
struct CredentialCache {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<const Credentials>>& loaded;
};

ParsedFile parse_tunnel_file(const std::string& path, CredentialCache& cache) {
  ParsedFile out;
  std::string stem = std::filesystem::path(path).stem().string();
  std::string text;
  {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    if (!f) {
      out.errors.push_back(
          {path, 0, 0, fmt::format("tunnel \"{}\": cannot read: {}; record skipped", stem, strerror(errno))});
      return out;
    }
    text = ss.str();
  }
  auto parsed = Yaml::parse(text);
  if (!parsed) {
    out.errors.push_back({path, parsed.error().line, parsed.error().col,
                          fmt::format("tunnel \"{}\": YAML syntax: {}; record skipped", stem, parsed.error().what)});
    return out;
  }
  const Yaml& doc = *parsed;
  Record r{path, stem, {}};
  if (!doc.IsMap()) {
    out.errors.push_back({path, 1, 1, fmt::format("tunnel \"{}\": expected a mapping; record skipped", stem)});
    return out;
  }
  if (auto n = scalar(r, doc, "name", false)) r.name = *n;
  for (auto& [key, value] : doc.entries()) {
    const std::string& k = key.key_text();
    if (!kKeys.count(k)) r.error(key, "", fmt::format("unknown key \"{}\"", k));
  }
  PeerConfig p;
  p.name = r.name;
  p.origin = fmt::format("{}:{}", path, doc.Mark().line + 1);
  bool pubkey = false;
  if (auto a = scalar(r, doc, "auth", false)) {
    if (*a == "pubkey") pubkey = true;
    else if (*a != "psk") r.error(doc["auth"], "auth", fmt::format("\"{}\" is not supported (psk, pubkey)", *a));
  }
  if (pubkey) {
    auto cert = scalar(r, doc, "cert", true), key = scalar(r, doc, "key", true), ca = scalar(r, doc, "ca", true);
    auto crl = scalar(r, doc, "crl", false);
    if (cert && key && ca) {
      std::string k = *cert + "\n" + *key + "\n" + *ca + "\n" + crl.value_or("");
      std::lock_guard lock(cache.mu);
      auto it = cache.loaded.find(k);
      if (it != cache.loaded.end()) {
        p.creds = it->second;
      } else if (auto c = Credentials::load(*cert, *key, *ca, crl.value_or(""))) {
        p.creds = *c;
        cache.loaded[k] = *c;
      } else {
        r.error(doc["cert"], "cert", c.error());
      }
    }
    if (doc["psk"] || doc["psk_file"]) r.error(doc["auth"], "auth", "pubkey tunnels take no psk");
  } else {
    for (const char* k : {"cert", "key", "ca", "crl"})
      if (doc[k]) r.error(doc[k], k, "only with auth: pubkey");
  }
  for (auto [key, dst] : {std::pair{"local_id", &p.local_id}, std::pair{"remote_id", &p.remote_id}}) {
    if (pubkey && p.creds && std::string(key) == "local_id" && !doc[key]) {
      p.local_id = p.creds->subject();
      continue;
    }
    if (auto s = scalar(r, doc, key, true)) {
      auto id = Identity::parse(*s);
      if (!id) r.error(doc[key], key, id.error());
      else *dst = *id;
    }
  }
  auto psk = scalar(r, doc, "psk", false);
  auto psk_file = scalar(r, doc, "psk_file", false);
  if (pubkey) {
  } else if (psk && psk_file) r.error(doc["psk_file"], "psk_file", "give psk or psk_file, not both");
  else if (psk) p.psk = to_bytes(*psk);
  else if (psk_file) {
    std::ifstream f(*psk_file);
    std::stringstream ss;
    ss << f.rdbuf();
    std::string s = ss.str();
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    if (!f) r.error(doc["psk_file"], "psk_file", fmt::format("cannot read \"{}\"", *psk_file));
    else p.psk = to_bytes(s);
  } else {
    r.error(doc, "", "\"psk\" or \"psk_file\" is required");
  }
  if (psk && p.psk.size() < 16) r.error(doc["psk"], "psk", "shorter than 16 bytes; too easy to guess");
  if (auto s = scalar(r, doc, "remote", false)) {
    std::string v = *s;
    uint16_t port = kIkePort;
    auto colon = v.rfind(':');
    if (colon != std::string::npos && v.find(':') == colon) {
      std::string ps = v.substr(colon + 1);
      v = v.substr(0, colon);
      if (ps.empty() || ps.size() > 5 || ps.find_first_not_of("0123456789") != std::string::npos || std::stoul(ps) > 65535)
        r.error(doc["remote"], "remote", fmt::format("\"{}\" is not a port", ps));
      else port = uint16_t(std::stoul(ps));
    }
    if (auto a = IpAddr::parse(v)) p.remote = Endpoint{*a, port};
    else r.error(doc["remote"], "remote", fmt::format("\"{}\" is not an IP address", v));
  }
  if (auto s = scalar(r, doc, "local", false)) {
    if (auto a = IpAddr::parse(*s)) p.local = *a;
    else r.error(doc["local"], "local", fmt::format("\"{}\" is not an IP address", *s));
  }
  if (auto s = scalar(r, doc, "start", false)) {
    if (*s == "true" || *s == "yes") p.start = true;
    else if (*s == "false" || *s == "no") p.start = false;
    else r.error(doc["start"], "start", fmt::format("\"{}\" is not true or false", *s));
    if (p.start && !p.remote) r.error(doc["start"], "start", "needs \"remote\" to initiate to");
  }
  for (auto [key, dst] : {std::pair{"mobike", &p.mobike}, std::pair{"mobike_check", &p.mobike_check},
                           std::pair{"no_nats_allowed", &p.no_nats_allowed}})
    if (auto s = scalar(r, doc, key, false)) {
      if (*s == "true" || *s == "yes") *dst = true;
      else if (*s == "false" || *s == "no") *dst = false;
      else r.error(doc[key], key, fmt::format("\"{}\" is not true or false", *s));
    }
  for (auto [key, proto, dflt, dst] :
       {std::tuple{"ike_proposals", uint8_t(kProtoIke), "aes128gcm16-prfsha256-x25519", &p.ike_proposals},
        std::tuple{"esp_proposals", uint8_t(kProtoEsp), "aes128gcm16", &p.esp_proposals}}) {
    std::string text = proposal_text(r, doc, key, dflt);
    if (text.empty()) continue;
    auto ps = parse_proposals(text, proto);
    if (!ps) r.error(doc[key] ? doc[key] : doc, key, ps.error());
    else *dst = *ps;
  }
  const Yaml& funnels = doc["funnels"];
  if (!funnels) {
    r.error(doc, "", "\"funnels\" is required (local/remote prefix pairs)");
  } else if (!funnels.IsSequence() || funnels.size() == 0) {
    r.error(funnels, "funnels", "expected a list of {local: PREFIX, remote: PREFIX}");
  } else {
    for (const Yaml& f : funnels) {
      if (!f.IsMap()) {
        r.error(f, "funnels", "expected {local: PREFIX, remote: PREFIX}");
        continue;
      }
      for (auto& [key, value] : f.entries()) {
        const std::string& k = key.key_text();
        if (k != "local" && k != "remote") r.error(key, "funnels", fmt::format("unknown key \"{}\"", k));
      }
      for (auto [key, dst] : {std::pair{"local", &p.local_ts}, std::pair{"remote", &p.remote_ts}}) {
        auto s = scalar(r, f, key, true);
        if (!s) continue;
        std::string why;
        auto pf = parse_prefix(*s, &why);
        if (!pf) {
          r.error(f[key], fmt::format("funnels.{}", key), why);
          continue;
        }
        auto ts = TrafficSelector::from_prefix(pf->first, pf->second);
        if (std::find(dst->begin(), dst->end(), ts) == dst->end()) dst->push_back(ts);
      }
    }
  }
  if (auto v = seconds(r, doc, "lifetime")) p.child_lifetime_s = *v;
  if (auto v = seconds(r, doc, "rekey")) p.child_rekey_s = *v;
  if (auto v = seconds(r, doc, "dpd")) p.dpd_s = *v;
  if (auto v = seconds(r, doc, "ike_rekey")) p.ike_rekey_s = *v;
  if (auto v = seconds(r, doc, "ike_lifetime")) p.ike_lifetime_s = *v;
  if (p.ike_lifetime_s && p.ike_rekey_s && p.ike_rekey_s >= p.ike_lifetime_s)
    r.error(doc["ike_lifetime"], "ike_lifetime", "must be longer than ike_rekey");
  if (p.child_rekey_s && p.child_rekey_s >= p.child_lifetime_s)
    r.error(doc["rekey"], "rekey", "must be shorter than lifetime");
  if (!r.errors.empty()) {
    for (auto& e : r.errors) e.what += "; record skipped";
    out.errors = std::move(r.errors);
    return out;
  }
  out.line = doc.Mark().line + 1;
  out.col = doc.Mark().column + 1;
  auto m = doc["remote_id"].Mark();
  out.id_line = m.line + 1;
  out.id_col = m.column + 1;
  out.peer = std::move(p);
  return out;
}

// The checks against the records loaded before this one, in file order.
void admit(const std::string& path, ParsedFile&& in, TunnelDir& out) {
  if (!in.peer) {
    out.errors.insert(out.errors.end(), std::make_move_iterator(in.errors.begin()),
                      std::make_move_iterator(in.errors.end()));
    return;
  }
  PeerConfig& p = *in.peer;
  if (auto it = out.by_name.find(p.name); it != out.by_name.end()) {
    out.errors.push_back({path, in.line, in.col,
                          fmt::format("tunnel \"{}\": name already used by {}; record skipped", p.name,
                                      out.tunnels[it->second].origin)});
    return;
  }
  auto& same_key = out.by_remote_id[p.remote_id.key()];
  for (size_t i : same_key) {
    auto& o = out.tunnels[i];
    if (o.remote_id.matches(p.remote_id)) {
      out.errors.push_back({path, in.id_line, in.id_col,
                            fmt::format("tunnel \"{}\": remote_id \"{}\" already used by tunnel \"{}\" ({}); record skipped",
                                        p.name, p.remote_id.str(), o.name, o.origin)});
      return;
    }
  }
  same_key.push_back(out.tunnels.size());
  out.by_name.emplace(p.name, out.tunnels.size());
  out.tunnels.push_back(std::move(p));
}

}  // namespace

void load_tunnel_file(const std::string& path, TunnelDir& out) {
  CredentialCache cache{{}, out.credentials};
  admit(path, parse_tunnel_file(path, cache), out);
}

TunnelDir load_tunnel_dir(const std::string& dir, const std::vector<cpu_set_t>& cpus) {
  TunnelDir out;
  std::vector<std::string> files;
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator(dir, ec)) {
    auto ext = e.path().extension();
    if (e.is_regular_file() && (ext == ".yaml" || ext == ".yml")) files.push_back(e.path().string());
  }
  if (ec) {
    out.errors.push_back({dir, 0, 0, fmt::format("cannot read the tunnel directory: {}", ec.message())});
    return out;
  }
  std::sort(files.begin(), files.end());
  CredentialCache cache{{}, out.credentials};
  // Why threads: yaml-cpp takes about 50 us per small file, half a second
  // of a portal's start with 10,000 moats; the files are independent until
  // admit(), which runs in file order, so the result is the serial one.
  const size_t threads = std::min(cpus.size(), files.size() / kFilesPerChunk);
  if (threads < 2) {
    for (auto& f : files) admit(f, parse_tunnel_file(f, cache), out);
    return out;
  }
  std::vector<ParsedFile> parsed(files.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t first; (first = next.fetch_add(kFilesPerChunk)) < files.size();)
      for (size_t i = first; i < std::min(files.size(), first + kFilesPerChunk); i++)
        parsed[i] = parse_tunnel_file(files[i], cache);
  };
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; t++)
    pool.emplace_back([&, cpu = cpus[t]] {
      // Pinned to the caller's CPUs (moatd: its lcores, before the workers
      // start polling); a failure only leaves the thread where it is.
      (void)pthread_setaffinity_np(pthread_self(), sizeof cpu, &cpu);
      work();
    });
  for (auto& t : pool) t.join();
  for (size_t i = 0; i < files.size(); i++) admit(files[i], std::move(parsed[i]), out);
  return out;
}

}  // namespace moat::ike
