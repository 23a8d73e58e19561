// Zones, tunnels and the four rule tables of the one rule language
// (classifier/rules.hh). Every field is the same in every table; each table
// adds its own actions. Errors carry file:line:col; a rule with an error is
// left out and reported, so `moatd --check` shows every problem at once.
#include <fmt/format.h>

#include <algorithm>
#include <map>

#include "ctrl/config_qos.hh"
#include "ctrl/config_reader.hh"

namespace moat {

namespace {

constexpr size_t kMaxListEntries = 4096;

// Lists may be written as one scalar or as a sequence.
template <typename F>
void one_or_many(Reader& r, const YAML::Node& n, const char* what, F&& each) {
  if (n.IsScalar()) {
    each(n);
  } else if (n.IsSequence()) {
    if (n.size() == 0) r.error(n, fmt::format("{}: empty list (leave the key out to match anything)", what));
    if (n.size() > kMaxListEntries) r.error(n, fmt::format("{}: more than {} entries", what, kMaxListEntries));
    for (const auto& e : n) {
      if (!e.IsScalar()) r.error(e, fmt::format("{}: expected a value, not a nested structure", what));
      else each(e);
    }
  } else {
    r.error(n, fmt::format("{}: expected a value or a list of values", what));
  }
}

std::optional<uint8_t> protocol(const std::string& s) {
  static const std::map<std::string, uint8_t> names = {
      {"icmp", 1}, {"igmp", 2}, {"tcp", 6}, {"udp", 17}, {"gre", 47}, {"esp", 50}, {"ah", 51}, {"sctp", 132}};
  if (auto it = names.find(s); it != names.end()) return it->second;
  if (!s.empty() && s.size() <= 3 && s.find_first_not_of("0123456789") == std::string::npos && std::stoi(s) <= 255)
    return uint8_t(std::stoi(s));
  return std::nullopt;
}

}  // namespace

std::optional<uint8_t> dscp_value(const std::string& s) {
  static const std::map<std::string, uint8_t> names = {
      {"be", 0},   {"cs0", 0},   {"cs1", 8},   {"cs2", 16},  {"cs3", 24},  {"cs4", 32},  {"cs5", 40},
      {"cs6", 48}, {"cs7", 56},  {"af11", 10}, {"af12", 12}, {"af13", 14}, {"af21", 18}, {"af22", 20},
      {"af23", 22}, {"af31", 26}, {"af32", 28}, {"af33", 30}, {"af41", 34}, {"af42", 36}, {"af43", 38},
      {"ef", 46},  {"va", 44}};
  if (auto it = names.find(s); it != names.end()) return it->second;
  if (!s.empty() && s.size() <= 2 && s.find_first_not_of("0123456789") == std::string::npos && std::stoi(s) <= 63)
    return uint8_t(std::stoi(s));
  return std::nullopt;
}

namespace {

bool parse_u16(const std::string& s, uint16_t& out) {
  if (s.empty() || s.size() > 5 || s.find_first_not_of("0123456789") != std::string::npos) return false;
  unsigned long v = std::stoul(s);
  if (v > 65535) return false;
  out = uint16_t(v);
  return true;
}

// "80", "1024-65535"
std::optional<Range16> range16(Reader& r, const YAML::Node& n, const char* what, uint16_t max) {
  const std::string& s = n.Scalar();
  auto dash = s.find('-');
  Range16 v;
  bool ok = dash == std::string::npos ? parse_u16(s, v.lo) && (v.hi = v.lo, true)
                                      : parse_u16(s.substr(0, dash), v.lo) && parse_u16(s.substr(dash + 1), v.hi);
  if (!ok || v.hi > max || v.lo > max) {
    r.error(n, fmt::format("{}: \"{}\" is not a number or range from 0 to {} (e.g. 80 or 1024-65535)", what, s, max));
    return std::nullopt;
  }
  if (v.lo > v.hi) {
    r.error(n, fmt::format("{}: range \"{}\" is reversed (did you mean {}-{}?)", what, s, v.hi, v.lo));
    return std::nullopt;
  }
  return v;
}

struct PolicyReader {
  Reader& r;
  Config& c;
  std::map<std::string, uint8_t> zone_id;
  std::map<std::string, uint8_t> port_index;
  std::map<std::string, uint32_t> tunnel_id;
  std::map<std::string, uint16_t> class_id;
  // filter.stateful: accepted connections are tracked and their replies
  // (and related ICMP errors) admitted without a rule. A rule may say
  // otherwise with its own `stateful`.
  bool filter_stateful = true;

  void zones(const YAML::Node* n) {
    c.rules.zones = {"local"};
    zone_id["local"] = kZoneLocal;
    c.port_zone.assign(c.ports.size(), 0);
    for (size_t i = 0; i < c.ports.size(); i++) port_index[c.ports[i].name] = uint8_t(i);
    std::vector<bool> placed(c.ports.size(), false);
    if (n) {
      if (!n->IsMap()) {
        r.error(*n, "zones: expected a mapping zone-name: [port, ...]");
      } else {
        for (auto it = n->begin(); it != n->end(); ++it) {
          std::string name = it->first.Scalar();
          if (zone_id.count(name)) {
            r.error(it->first, fmt::format("zones: \"{}\" is {}", name,
                                           name == "local" ? "reserved for the router itself" : "defined twice"));
            continue;
          }
          uint8_t id = uint8_t(c.rules.zones.size());
          c.rules.zones.push_back(name);
          zone_id[name] = id;
          one_or_many(r, it->second, "zones", [&](const YAML::Node& e) {
            auto p = port_index.find(e.Scalar());
            if (p == port_index.end()) {
              r.error(e, fmt::format("zones.{}: no port named \"{}\"", name, e.Scalar()));
            } else if (placed[p->second]) {
              r.error(e, fmt::format("zones.{}: port {} is already in zone {}", name, e.Scalar(),
                                     c.rules.zones[c.port_zone[p->second]]));
            } else {
              placed[p->second] = true;
              c.port_zone[p->second] = id;
            }
          });
        }
      }
    }
    // A port in no zone is a zone of its own, named after it.
    for (size_t i = 0; i < c.ports.size(); i++) {
      if (placed[i]) continue;
      const std::string& name = c.ports[i].name;
      if (port_index[name] != i) continue;  // a duplicate port name, reported already
      if (zone_id.count(name)) {
        r.error(n ? *n : YAML::Node(), fmt::format("zones: port {} is in no zone, and its own name is taken by a zone", name));
        continue;
      }
      uint8_t id = uint8_t(c.rules.zones.size());
      c.rules.zones.push_back(name);
      zone_id[name] = id;
      c.port_zone[i] = id;
    }
  }

  // "0x0a0b..." or "0a0b..." → bytes.
  std::optional<std::vector<uint8_t>> hex(const YAML::Node& v, const char* what) {
    auto s = r.str(v, what);
    if (!s) return std::nullopt;
    std::string h = s->rfind("0x", 0) == 0 ? s->substr(2) : *s;
    std::vector<uint8_t> out;
    if (h.empty() || h.size() % 2 || h.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos) {
      r.error(v, fmt::format("{}: expected hex bytes (0x0011aabb...)", what));
      return std::nullopt;
    }
    for (size_t i = 0; i < h.size(); i += 2) out.push_back(uint8_t(std::stoul(h.substr(i, 2), nullptr, 16)));
    return out;
  }

  // One static SA of a tunnel: {spi, key, auth_key}.
  void static_sa(const YAML::Node& n, const std::string& tname, SaDir dir, const SaConfig& tmpl, TunnelConfig& tc) {
    SaConfig sa = tmpl;
    sa.dir = dir;
    sa.name = fmt::format("tunnel {} {}", tname, dir == SaDir::outbound ? "out" : "in");
    bool spi = false, key = false;
    const char* where = dir == SaDir::outbound ? "tunnel.sa.out" : "tunnel.sa.in";
    r.fields(n, where, {"spi", "key", "auth_key"}, [&](const std::string& k, const YAML::Node& v) {
      if (k == "spi") {
        const std::string& s = v.IsScalar() ? v.Scalar() : "";
        try {
          size_t used = 0;
          unsigned long x = std::stoul(s, &used, 0);
          if (used != s.size() || x < 256 || x > 0xffffffffUL) throw std::out_of_range("spi");
          sa.spi = uint32_t(x);
          spi = true;
        } catch (...) {
          r.error(v, fmt::format("{}.spi: \"{}\" is not an SPI (256 to 0xffffffff; 0-255 are reserved, RFC 4303)", where, s));
        }
      } else if (k == "key") {
        if (auto b = hex(v, "key")) {
          if (b->size() != cipher_key_len(sa.cipher))
            r.error(v, fmt::format("{}.key: {} bytes; {} wants {} (AEAD ciphers: key and 4-byte salt)", where, b->size(),
                                   cipher_name(sa.cipher), cipher_key_len(sa.cipher)));
          else sa.key = *b, key = true;
        }
      } else if (auto b = hex(v, "auth_key")) {
        if (b->size() != 32) r.error(v, fmt::format("{}.auth_key: {} bytes; HMAC-SHA-256 wants 32", where, b->size()));
        else sa.auth_key = *b;
      }
    });
    bool cbc = sa.cipher == Cipher::aes_cbc_128_sha256 || sa.cipher == Cipher::aes_cbc_256_sha256;
    if (!spi || !key) {
      r.error(n, fmt::format("{}: needs spi and key", where));
      return;
    }
    if (cbc != !sa.auth_key.empty()) {
      r.error(n, fmt::format("{}: auth_key is {} with {}", where, cbc ? "required" : "not used", cipher_name(sa.cipher)));
      return;
    }
    for (auto& o : tc.sas)
      if (o.dir == sa.dir && o.spi == sa.spi) {
        r.error(n, fmt::format("{}: SPI 0x{:08x} used twice in this tunnel", where, sa.spi));
        return;
      }
    tc.sas.push_back(std::move(sa));
  }

  void tunnels(const YAML::Node& n) {
    r.list(n, "tunnels", [&](const YAML::Node& t) {
      TunnelConfig tc;
      tc.line = t.Mark().line + 1;
      YAML::Node zone_node, sa_node;
      SaConfig tmpl;  // what every SA of the tunnel shares
      bool have_local = false, have_peer = false, have_sa = false;
      r.fields(t, "tunnel", {"name", "zone", "local", "peer", "nat_t", "mtu", "mtu_policy", "clamp_mss", "df", "ttl",
                             "esn", "replay_window", "funnels", "sa", "rate", "ceil"},
               [&](const std::string& k, const YAML::Node& v) {
        if (k == "name") {
          if (auto s = r.str(v, "tunnel.name")) tc.name = *s;
        } else if (k == "zone") {
          if (auto s = r.str(v, "tunnel.zone")) {
            tc.zone = *s;
            zone_node = v;
          }
        } else if (k == "local") {
          r.ipv4(v, "tunnel.local", tmpl.local);
          have_local = true;
        } else if (k == "peer") {
          r.ipv4(v, "tunnel.peer", tmpl.peer);
          have_peer = true;
        } else if (k == "nat_t") {
          r.boolean(v, "tunnel.nat_t", tmpl.nat_t);
        } else if (k == "mtu") {
          r.uint(v, "tunnel.mtu", tmpl.mtu, 576, 9000);
        } else if (k == "mtu_policy") {
          auto s = r.str(v, "tunnel.mtu_policy");
          if (s && *s == "fragment-inner") tmpl.mtu_policy = MtuPolicy::fragment_inner;
          else if (s && *s == "honor-df") tmpl.mtu_policy = MtuPolicy::honor_df;
          else if (s) r.error(v, fmt::format("tunnel.mtu_policy: \"{}\" is not fragment-inner or honor-df", *s));
        } else if (k == "clamp_mss") {
          r.boolean(v, "tunnel.clamp_mss", tmpl.clamp_mss);
        } else if (k == "df") {
          auto s = r.str(v, "tunnel.df");
          if (s && *s == "clear") tmpl.df = OuterDf::clear;
          else if (s && *s == "set") tmpl.df = OuterDf::set;
          else if (s && *s == "copy") tmpl.df = OuterDf::copy;
          else if (s) r.error(v, fmt::format("tunnel.df: \"{}\" is not clear, set or copy", *s));
        } else if (k == "ttl") {
          r.uint(v, "tunnel.ttl", tmpl.ttl, 1, 255);
        } else if (k == "esn") {
          r.boolean(v, "tunnel.esn", tmpl.esn);
        } else if (k == "replay_window") {
          r.uint(v, "tunnel.replay_window", tmpl.replay_window, 64, kMaxReplayWindow);
          if (tmpl.replay_window % 64) r.error(v, "tunnel.replay_window: must be a multiple of 64");
        } else if (k == "funnels") {
          r.list(v, "tunnel.funnels", [&](const YAML::Node& f) {
            Funnel fn;
            bool l = false, rm = false;
            r.fields(f, "tunnel.funnel", {"local", "remote"}, [&](const std::string& k2, const YAML::Node& v2) {
              std::string why;
              auto p = v2.IsScalar() ? parse_prefix(v2.Scalar(), true, &why) : std::nullopt;
              if (!p) {
                r.error(v2, fmt::format("tunnel.funnel.{}: {}", k2, why.empty() ? "expected a prefix" : why));
              } else if (k2 == "local") {
                fn.local = p->addr, fn.local_plen = p->len, l = true;
              } else {
                fn.remote = p->addr, fn.remote_plen = p->len, rm = true;
              }
            });
            if (!l || !rm) r.error(f, "tunnel.funnel: needs local and remote prefixes");
            else if (tmpl.funnels.size() >= kMaxFunnels) r.error(f, fmt::format("tunnel.funnels: at most {}", kMaxFunnels));
            else tmpl.funnels.push_back(fn);
          });
        } else if (k == "rate" || k == "ceil") {
          // The portal shapes this moat's downstream (qos.shaping moats).
          auto v2 = v.IsScalar() ? parse_rate(v.Scalar()) : std::nullopt;
          if (!v2) r.error(v, fmt::format("tunnel.{}: not a rate (e.g. 20mbit)", k));
          else (k == "rate" ? tc.shape_rate : tc.shape_ceil) = *v2;
        } else if (k == "sa") {
          sa_node = v;
          have_sa = true;
        }
      });
      if (tc.name.empty()) {
        r.error(t, "tunnel: missing \"name\"");
        return;
      }
      if (tunnel_id.count(tc.name)) {
        r.error(t, fmt::format("tunnel {}: defined twice", tc.name));
        return;
      }
      if (tc.zone.empty()) tc.zone = "vpn";
      if (tc.zone == "local") {
        r.error(zone_node, fmt::format("tunnel {}: zone local is the router itself", tc.name));
        return;
      }
      if (!zone_id.count(tc.zone)) {
        if (port_zone_name(tc.zone)) {
          r.error(zone_node, fmt::format("tunnel {}: zone {} holds ports; a tunnel needs a zone of its own", tc.name, tc.zone));
          return;
        }
        zone_id[tc.zone] = uint8_t(c.rules.zones.size());
        c.rules.zones.push_back(tc.zone);
      } else if (port_zone_name(tc.zone)) {
        r.error(zone_node, fmt::format("tunnel {}: zone {} holds ports; a tunnel needs a zone of its own", tc.name, tc.zone));
        return;
      }
      uint32_t id = uint32_t(c.tunnels.size());
      tmpl.tunnel = id;
      if (have_sa) {
        if (!have_local || !have_peer) r.error(t, fmt::format("tunnel {}: static SAs need \"local\" and \"peer\"", tc.name));
        r.fields(sa_node, "tunnel.sa", {"cipher", "out", "in"}, [&](const std::string& k, const YAML::Node& v) {
          if (k == "cipher") {
            auto s = r.str(v, "tunnel.sa.cipher");
            if (s && !cipher_from_name(*s, tmpl.cipher))
              r.error(v, fmt::format("tunnel.sa.cipher: \"{}\" is not one of aes-gcm-128, aes-gcm-256, "
                                     "aes-cbc-128-sha256, aes-cbc-256-sha256, chacha20-poly1305", *s));
          }
        });
        if (auto o = sa_node["out"]) static_sa(o, tc.name, SaDir::outbound, tmpl, tc);
        if (auto i = sa_node["in"]) {
          if (i.IsSequence()) for (const auto& e : i) static_sa(e, tc.name, SaDir::inbound, tmpl, tc);
          else static_sa(i, tc.name, SaDir::inbound, tmpl, tc);
        }
      }
      tc.tmpl = tmpl;
      tunnel_id[tc.name] = id;
      c.rules.tunnels.push_back(tc.name);
      c.rules.tunnel_zone.push_back(zone_id[tc.zone]);
      c.tunnels.push_back(std::move(tc));
    });
  }

  bool port_zone_name(const std::string& zone) const {
    auto it = zone_id.find(zone);
    if (it == zone_id.end()) return false;
    for (uint8_t z : c.port_zone)
      if (z == it->second) return true;
    return false;
  }

  void classes(const YAML::Node& n) {
    c.rules.classes = {"default"};
    class_id["default"] = 0;
    one_or_many(r, n, "qos.classes", [&](const YAML::Node& e) {
      if (class_id.count(e.Scalar())) {
        if (e.Scalar() != "default") r.error(e, fmt::format("qos.classes: \"{}\" listed twice", e.Scalar()));
        return;
      }
      class_id[e.Scalar()] = uint16_t(c.rules.classes.size());
      c.rules.classes.push_back(e.Scalar());
    });
  }

  // The action of a rule or of a table's default. Returns false on error.
  bool action(Table t, const YAML::Node& n, const std::map<std::string, YAML::Node>& args, Verdict& v,
              const char* where) {
    std::string a = n.IsScalar() ? n.Scalar() : "";
    auto arg = [&](const char* k) -> const YAML::Node* {
      auto it = args.find(k);
      return it == args.end() ? nullptr : &it->second;
    };
    auto need = [&](const char* k) -> const YAML::Node* {
      const YAML::Node* x = arg(k);
      if (!x) r.error(n, fmt::format("{}: action {} needs \"{}\"", where, a, k));
      return x;
    };
    switch (t) {
      case Table::filter:
        if (a == "accept") v.action = uint8_t(FilterAction::accept);
        else if (a == "drop") v.action = uint8_t(FilterAction::drop);
        else if (a == "reject") v.action = uint8_t(FilterAction::reject);
        else return bad(n, where, a, "accept, drop, reject");
        return true;
      case Table::nat:
        if (a == "none") {
          v.action = uint8_t(NatAction::none);
        } else if (a == "masquerade") {
          v.action = uint8_t(NatAction::masquerade);
        } else if (a == "snat") {
          v.action = uint8_t(NatAction::snat);
          const YAML::Node* pool = need("pool");
          if (!pool) return false;
          const std::string& s = pool->IsScalar() ? pool->Scalar() : "";
          auto dash = s.find('-');
          auto lo = parse_ipv4(s.substr(0, dash));
          auto hi = dash == std::string::npos ? lo : parse_ipv4(s.substr(dash + 1));
          if (!lo || !hi || *lo > *hi) {
            r.error(*pool, fmt::format("{}: pool \"{}\" is not an address or a range a.b.c.d-e.f.g.h", where, s));
            return false;
          }
          v.a = *lo;
          v.b = *hi;
        } else if (a == "dnat") {
          v.action = uint8_t(NatAction::dnat);
          const YAML::Node* to = need("to_addr");
          if (!to) return false;
          r.ipv4(*to, "nat.to_addr", v.a);
          if (const YAML::Node* p = arg("to_port")) r.uint(*p, "nat.to_port", v.port, 1, 65535);
        } else {
          return bad(n, where, a, "none, masquerade, snat, dnat");
        }
        return true;
      case Table::spd:
        if (a == "bypass") {
          v.action = uint8_t(SpdAction::bypass);
        } else if (a == "discard") {
          v.action = uint8_t(SpdAction::discard);
        } else if (a == "protect") {
          v.action = uint8_t(SpdAction::protect);
          const YAML::Node* tn = need("tunnel");
          if (!tn) return false;
          auto it = tunnel_id.find(tn->IsScalar() ? tn->Scalar() : "");
          if (it == tunnel_id.end()) {
            r.error(*tn, fmt::format("{}: no tunnel named \"{}\"", where, tn->Scalar()));
            return false;
          }
          v.a = it->second;
        } else {
          return bad(n, where, a, "bypass, discard, protect");
        }
        return true;
      case Table::qos: {
        // qos has no action keyword: its "action" is the class.
        auto it = class_id.find(a);
        if (it == class_id.end()) {
          r.error(n, fmt::format("{}: no class named \"{}\" (declare it in qos.classes)", where, a));
          return false;
        }
        v.cls = it->second;
        if (const YAML::Node* m = arg("mark")) {
          auto d = m->IsScalar() ? dscp_value(m->Scalar()) : std::nullopt;
          if (!d) {
            r.error(*m, fmt::format("{}: mark \"{}\" is not a DSCP (0-63 or a name such as ef, af41, cs1)", where,
                                    m->IsScalar() ? m->Scalar() : ""));
            return false;
          }
          v.dscp = *d;
          v.flags |= Verdict::kMarkDscp;
        }
        return true;
      }
    }
    return false;
  }

  bool bad(const YAML::Node& n, const char* where, const std::string& a, const char* known) {
    r.error(n, fmt::format("{}: unknown action \"{}\" (one of {})", where, a, known));
    return false;
  }

  void zone_list(const YAML::Node& v, const char* what, std::vector<uint8_t>& out, bool& ok) {
    one_or_many(r, v, what, [&](const YAML::Node& e) {
      auto it = zone_id.find(e.Scalar());
      if (it == zone_id.end()) {
        std::string known;
        for (auto& z : c.rules.zones) known += (known.empty() ? "" : ", ") + z;
        r.error(e, fmt::format("{}: no zone named \"{}\" (zones: {})", what, e.Scalar(), known));
        ok = false;
      } else {
        out.push_back(it->second);
      }
    });
  }

  void rule(Table t, const YAML::Node& n, RuleTable& table) {
    const char* tname = kTableNames[unsigned(t)];
    std::string where = fmt::format("{} rule", tname);
    Rule rule;
    rule.file = c.path;
    rule.line = n.Mark().line + 1;
    rule.col = n.Mark().column + 1;
    bool ok = true;
    size_t before = r.errors();
    std::set<std::string> keys = {"name", "from", "to", "in", "out", "src", "dst", "proto", "sport",
                                  "dport", "dscp", "icmp_type", "icmp_code"};
    switch (t) {
      case Table::filter: keys.insert({"action", "stateful"}); break;
      case Table::nat: keys.insert({"action", "pool", "to_addr", "to_port"}); break;
      case Table::spd: keys.insert({"action", "tunnel"}); break;
      case Table::qos: keys.insert({"class", "mark"}); break;
    }
    std::map<std::string, YAML::Node> args;
    YAML::Node action_node;
    bool has_action = false;
    Match& m = rule.match;
    const YAML::Node *icmp_type = nullptr, *icmp_code = nullptr, *ports = nullptr;
    YAML::Node icmp_type_n, icmp_code_n, ports_n;
    if (!r.fields(n, where.c_str(), keys, [&](const std::string& k, const YAML::Node& v) {
          std::string what = fmt::format("{} rule {}", tname, k);
          if (k == "name") {
            if (auto s = r.str(v, what.c_str())) rule.name = *s;
          } else if (k == "from") {
            zone_list(v, what.c_str(), m.in_zones, ok);
          } else if (k == "to") {
            zone_list(v, what.c_str(), m.out_zones, ok);
          } else if (k == "in" || k == "out") {
            one_or_many(r, v, what.c_str(), [&](const YAML::Node& e) {
              auto it = port_index.find(e.Scalar());
              if (it == port_index.end()) {
                r.error(e, fmt::format("{}: no port named \"{}\"", what, e.Scalar()));
                ok = false;
              } else {
                (k == "in" ? m.in_ports : m.out_ports).push_back(it->second);
              }
            });
          } else if (k == "src" || k == "dst") {
            one_or_many(r, v, what.c_str(), [&](const YAML::Node& e) {
              std::string why;
              auto p = parse_prefix(e.Scalar(), true, &why);
              if (!p) {
                r.error(e, what + ": " + why);
                ok = false;
              } else {
                (k == "src" ? m.src : m.dst).push_back({p->addr, p->len});
              }
            });
          } else if (k == "proto") {
            one_or_many(r, v, what.c_str(), [&](const YAML::Node& e) {
              auto p = protocol(e.Scalar());
              if (!p) {
                r.error(e, fmt::format("{}: \"{}\" is not a protocol (tcp, udp, icmp, gre, esp, ... or 0-255)", what, e.Scalar()));
                ok = false;
              } else {
                m.protos.push_back(*p);
              }
            });
          } else if (k == "sport" || k == "dport") {
            ports_n = v;
            ports = &ports_n;
            one_or_many(r, v, what.c_str(), [&](const YAML::Node& e) {
              if (auto rg = range16(r, e, what.c_str(), 65535)) (k == "sport" ? m.sports : m.dports).push_back(*rg);
              else ok = false;
            });
          } else if (k == "icmp_type" || k == "icmp_code") {
            (k == "icmp_type" ? icmp_type_n : icmp_code_n) = v;
            (k == "icmp_type" ? icmp_type : icmp_code) = k == "icmp_type" ? &icmp_type_n : &icmp_code_n;
            one_or_many(r, v, what.c_str(), [&](const YAML::Node& e) {
              if (auto rg = range16(r, e, what.c_str(), 255)) (k == "icmp_type" ? m.sports : m.dports).push_back(*rg);
              else ok = false;
            });
          } else if (k == "dscp") {
            auto d = v.IsScalar() ? dscp_value(v.Scalar()) : std::nullopt;
            if (!d) {
              r.error(v, fmt::format("{}: expected a DSCP (0-63 or a name such as ef, af41, cs1)", what));
              ok = false;
            } else {
              m.dscp = *d;
            }
          } else if (k == "action" || k == "class") {
            action_node = v;
            has_action = true;
          } else {
            args[k] = v;
          }
        })) {
      return;
    }
    // Ports and ICMP type/code share the key's port slots: say which applies.
    bool l4 = !m.protos.empty() && std::all_of(m.protos.begin(), m.protos.end(), [](uint8_t p) {
      return p == 6 || p == 17 || p == 132;
    });
    bool icmp = m.protos.size() == 1 && m.protos[0] == 1;
    if (ports && (icmp_type || icmp_code)) {
      r.error(*ports, fmt::format("{}: ports and icmp_type/icmp_code exclude each other", where));
      ok = false;
    } else if (ports && !l4) {
      r.error(*ports, fmt::format("{}: ports need proto tcp, udp or sctp", where));
      ok = false;
    } else if ((icmp_type || icmp_code) && !icmp) {
      r.error(icmp_type ? *icmp_type : *icmp_code, fmt::format("{}: icmp_type/icmp_code need proto icmp", where));
      ok = false;
    }
    if (!has_action) {
      r.error(n, fmt::format("{}: missing \"{}\"", where, t == Table::qos ? "class" : "action"));
      return;
    }
    for (auto& [k, v] : args) {
      bool used = (t == Table::nat && ((k == "pool" && action_node.Scalar() == "snat") ||
                                        ((k == "to_addr" || k == "to_port") && action_node.Scalar() == "dnat"))) ||
                  (t == Table::spd && k == "tunnel" && action_node.Scalar() == "protect") || (t == Table::qos && k == "mark") ||
                  (t == Table::filter && k == "stateful" && action_node.Scalar() == "accept");
      if (!used) {
        r.error(v, fmt::format("{}: \"{}\" does not apply to action {}", where, k, action_node.Scalar()));
        ok = false;
      }
    }
    if (!action(t, action_node, args, rule.verdict, where.c_str())) ok = false;
    if (t == Table::filter && FilterAction(rule.verdict.action) == FilterAction::accept) {
      bool st = filter_stateful;
      if (auto it = args.find("stateful"); it != args.end()) r.boolean(it->second, "filter rule stateful", st);
      if (st) rule.verdict.flags |= Verdict::kStateful;
    }
    if (!rule.name.empty())
      for (auto& o : table.rules)
        if (o.name == rule.name) {
          r.error(n, fmt::format("{}: name \"{}\" already used at line {}", where, rule.name, o.line));
          ok = false;
        }
    if (ok && r.errors() == before) table.rules.push_back(std::move(rule));
  }

  void table(Table t, const YAML::Node& n) {
    const char* tname = kTableNames[unsigned(t)];
    RuleTable& table = c.rules.table[unsigned(t)];
    std::set<std::string> keys = {"default", "rules"};
    if (t == Table::qos) keys.insert({"classes", "shaping", "police"});  // the latter two: read_qos
    if (t == Table::filter) keys.insert("stateful");
    // Classes first: rules and the default refer to them; so for the
    // filter's table-wide `stateful`.
    if (t == Table::qos && n.IsMap() && n["classes"]) classes(n["classes"]);
    if (t == Table::filter && n.IsMap() && n["stateful"]) r.boolean(n["stateful"], "filter.stateful", filter_stateful);
    r.fields(n, tname, keys, [&](const std::string& k, const YAML::Node& v) {
      if (k == "default") {
        std::map<std::string, YAML::Node> none;
        std::string where = fmt::format("{}.default", tname);
        if (!v.IsScalar()) r.error(v, fmt::format("{}: expected an action", where));
        else action(t, v, none, table.deflt, where.c_str());
        if (t == Table::filter && filter_stateful && FilterAction(table.deflt.action) == FilterAction::accept)
          table.deflt.flags |= Verdict::kStateful;
      } else if (k == "rules") {
        r.list(v, fmt::format("{}.rules", tname).c_str(), [&](const YAML::Node& e) { rule(t, e, table); });
      }
    });
  }
};

}  // namespace

void read_policy(Reader& r, const YAML::Node& root, Config& c) {
  PolicyReader p{r, c, {}, {}, {}, {}};
  YAML::Node zones = root["zones"];
  p.zones(zones ? &zones : nullptr);
  if (auto t = root["tunnels"]) p.tunnels(t);
  c.rules.classes = {"default"};
  p.class_id["default"] = 0;
  // Secure by default only when the operator asked for a filter: a config
  // with no filter table keeps forwarding everything (a plain router).
  c.rules.table[unsigned(Table::filter)].deflt.action = uint8_t(FilterAction::accept);
  static const char* names[kTables] = {"filter", "nat", "spd", "qos"};
  for (unsigned t = 0; t < kTables; t++)
    if (auto n = root[names[t]]) {
      c.has_policy = true;
      if (t == unsigned(Table::filter)) c.rules.table[t].deflt.action = uint8_t(FilterAction::drop);
      p.table(Table(t), n);
    }
  if (zones || root["tunnels"]) c.has_policy = true;
  if (auto q = root["qos"]) read_qos(r, q, c);
  if (c.rules.zones.size() > kMaxZones)
    r.error(zones ? zones : root, fmt::format("zones: {} zones (ports, tunnels and named zones); at most {}",
                                              c.rules.zones.size(), kMaxZones));
}

}  // namespace moat
