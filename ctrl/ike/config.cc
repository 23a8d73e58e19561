#include "ctrl/ike/config.hh"

#include <yaml-cpp/yaml.h>

#include <fmt/format.h>

#include <pthread.h>

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

#include "ctrl/yaml_reader.hh"

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

// A tunnel file's errors go through the YamlReader that moatd's own
// configuration uses ("key: cause" at the node's place) and become
// TunnelErrors once the record's name is known.
std::optional<std::string> scalar(YamlReader& r, const YAML::Node& map, const char* key, bool required) {
  const YAML::Node& n = map[key];
  if (!n) {
    if (required) r.error(map, fmt::format("\"{}\" is required", key));
    return std::nullopt;
  }
  return r.str(n, key);
}

std::optional<uint32_t> seconds(YamlReader& r, const YAML::Node& map, const char* key) {
  const YAML::Node& n = map[key];
  if (!n) return std::nullopt;
  return r.duration(n, key);
}

void flag(YamlReader& r, const YAML::Node& map, const char* key, bool& out) {
  if (const YAML::Node& n = map[key]) r.boolean(n, key, out);
}

std::string proposal_text(YamlReader& r, const YAML::Node& map, const char* key, const char* dflt) {
  const YAML::Node& n = map[key];
  if (!n) return dflt;
  if (n.IsScalar()) return n.Scalar();
  if (n.IsSequence()) {
    std::string s;
    for (const YAML::Node& x : n) {
      if (!x.IsScalar()) {
        r.error(x, fmt::format("{}: expected a proposal string", key));
        return "";
      }
      s += (s.empty() ? "" : ",") + x.Scalar();
    }
    return s;
  }
  r.error(n, fmt::format("{}: expected a proposal string or a list of them", key));
  return "";
}

const std::set<std::string> kKeys = {"name",          "local_id", "remote_id", "psk",    "psk_file", "remote",
                                     "local",         "start",    "funnels",   "lifetime", "rekey",  "dpd",
                                     "ike_proposals", "esp_proposals", "auth", "cert", "key", "ca", "crl", "ike_rekey", "mobike",
                                     "ike_lifetime", "mobike_check", "no_nats_allowed"};
const std::set<std::string> kFunnelKeys = {"local", "remote"};

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
  std::string name = std::filesystem::path(path).stem().string();
  std::string text;
  {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    if (!f) {
      out.errors.push_back(
          {path, 0, 0, fmt::format("tunnel \"{}\": cannot read: {}; record skipped", name, strerror(errno))});
      return out;
    }
    text = ss.str();
  }
  std::vector<PlaceError> errors;
  YamlReader r(path, errors);
  // Every error of the record names it, by the name it would have had.
  auto skipped = [&] {
    for (auto& e : errors)
      out.errors.push_back({e.file, e.line, e.col, fmt::format("tunnel \"{}\": {}; record skipped", name, e.what)});
    return std::move(out);
  };
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    r.error(e.mark, "YAML syntax: " + e.msg);
    return skipped();
  }
  // Const: a non-const operator[] would add every key it looks up.
  const YAML::Node& doc = root;
  if (!doc.IsMap()) {
    errors.push_back({path, 1, 1, "expected a mapping"});  // an empty file's node has no place
    return skipped();
  }
  if (auto n = scalar(r, doc, "name", false)) name = *n;
  r.fields(doc, "top level", kKeys, [](const std::string&, const YAML::Node&) {});
  PeerConfig p;
  p.name = name;
  p.origin = fmt::format("{}:{}", path, doc.Mark().line + 1);
  bool pubkey = false;
  if (auto a = scalar(r, doc, "auth", false)) {
    if (*a == "pubkey") pubkey = true;
    else if (*a != "psk") r.error(doc["auth"], fmt::format("auth: \"{}\" is not supported (psk, pubkey)", *a));
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
        r.error(doc["cert"], "cert: " + c.error());
      }
    }
    if (doc["psk"] || doc["psk_file"]) r.error(doc["auth"], "auth: pubkey tunnels take no psk");
  } else {
    for (const char* k : {"cert", "key", "ca", "crl"})
      if (doc[k]) r.error(doc[k], fmt::format("{}: only with auth: pubkey", k));
  }
  for (auto [key, dst] : {std::pair{"local_id", &p.local_id}, std::pair{"remote_id", &p.remote_id}}) {
    if (pubkey && p.creds && std::string(key) == "local_id" && !doc[key]) {
      p.local_id = p.creds->subject();
      continue;
    }
    if (auto s = scalar(r, doc, key, true)) {
      auto id = Identity::parse(*s);
      if (!id) r.error(doc[key], fmt::format("{}: {}", key, id.error()));
      else *dst = *id;
    }
  }
  auto psk = scalar(r, doc, "psk", false);
  auto psk_file = scalar(r, doc, "psk_file", false);
  if (pubkey) {
  } else if (psk && psk_file) r.error(doc["psk_file"], "psk_file: give psk or psk_file, not both");
  else if (psk) p.psk = to_bytes(*psk);
  else if (psk_file) {
    std::ifstream f(*psk_file);
    std::stringstream ss;
    ss << f.rdbuf();
    std::string s = ss.str();
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    if (!f) r.error(doc["psk_file"], fmt::format("psk_file: cannot read \"{}\"", *psk_file));
    else p.psk = to_bytes(s);
  } else {
    r.error(doc, "\"psk\" or \"psk_file\" is required");
  }
  if (psk && p.psk.size() < 16) r.error(doc["psk"], "psk: shorter than 16 bytes; too easy to guess");
  if (auto s = scalar(r, doc, "remote", false)) {
    std::string v = *s;
    uint16_t port = kIkePort;
    auto colon = v.rfind(':');
    if (colon != std::string::npos && v.find(':') == colon) {
      std::string ps = v.substr(colon + 1);
      v = v.substr(0, colon);
      if (ps.empty() || ps.size() > 5 || ps.find_first_not_of("0123456789") != std::string::npos || std::stoul(ps) > 65535)
        r.error(doc["remote"], fmt::format("remote: \"{}\" is not a port", ps));
      else port = uint16_t(std::stoul(ps));
    }
    if (auto a = IpAddr::parse(v)) p.remote = Endpoint{*a, port};
    else r.error(doc["remote"], fmt::format("remote: \"{}\" is not an IP address", v));
  }
  if (auto s = scalar(r, doc, "local", false)) {
    if (auto a = IpAddr::parse(*s)) p.local = *a;
    else r.error(doc["local"], fmt::format("local: \"{}\" is not an IP address", *s));
  }
  if (doc["start"]) {
    flag(r, doc, "start", p.start);
    if (p.start && !p.remote) r.error(doc["start"], "start: needs \"remote\" to initiate to");
  }
  flag(r, doc, "mobike", p.mobike);
  flag(r, doc, "mobike_check", p.mobike_check);
  flag(r, doc, "no_nats_allowed", p.no_nats_allowed);
  for (auto [key, proto, dflt, dst] :
       {std::tuple{"ike_proposals", uint8_t(kProtoIke), "aes128gcm16-prfsha256-x25519", &p.ike_proposals},
        std::tuple{"esp_proposals", uint8_t(kProtoEsp), "aes128gcm16", &p.esp_proposals}}) {
    std::string text = proposal_text(r, doc, key, dflt);
    if (text.empty()) continue;
    auto ps = parse_proposals(text, proto);
    if (!ps) r.error(doc[key] ? doc[key] : doc, fmt::format("{}: {}", key, ps.error()));
    else *dst = *ps;
  }
  const YAML::Node& funnels = doc["funnels"];
  if (!funnels) {
    r.error(doc, "\"funnels\" is required (local/remote prefix pairs)");
  } else if (!funnels.IsSequence() || funnels.size() == 0) {
    r.error(funnels, "funnels: expected a list of {local: PREFIX, remote: PREFIX}");
  } else {
    for (const YAML::Node& f : funnels) {
      if (!f.IsMap()) {
        r.error(f, "funnels: expected {local: PREFIX, remote: PREFIX}");
        continue;
      }
      r.fields(f, "funnels", kFunnelKeys, [](const std::string&, const YAML::Node&) {});
      for (auto [key, dst] : {std::pair{"local", &p.local_ts}, std::pair{"remote", &p.remote_ts}}) {
        auto s = scalar(r, f, key, true);
        if (!s) continue;
        std::string why;
        auto pf = parse_prefix(*s, &why);
        if (!pf) {
          r.error(f[key], fmt::format("funnels.{}: {}", key, why));
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
    r.error(doc["ike_lifetime"] ? doc["ike_lifetime"] : doc, "ike_lifetime: must be longer than ike_rekey");
  if (p.child_rekey_s && p.child_rekey_s >= p.child_lifetime_s)
    r.error(doc["rekey"] ? doc["rekey"] : doc, "rekey: must be shorter than lifetime");
  if (!errors.empty()) return skipped();
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
