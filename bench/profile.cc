#include "bench/profile.hh"

#include "ctrl/yaml_reader.hh"

#include <arpa/inet.h>
#include <yaml-cpp/yaml.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <functional>
#include <set>
#include <tuple>

namespace moat::bench {

unsigned min_frame_for(const Profile& p) {
  const unsigned l4 = p.protocol == Protocol::udp ? kUdpBytes + kStampBytes : kTcpBytes;
  const unsigned clear = kEthBytes + kIpv4Bytes + l4 + kFcsBytes;
  if (p.esp.direction != EspDirection::inbound) return clear;
  // The generator's frame is the ESP packet around that cleartext's IP
  // packet, whose payload + trailer GCM pads to a multiple of 4 (RFC 4303).
  const unsigned inner = clear - kEthBytes - kFcsBytes;
  const unsigned payload = (inner + kEspTrailerBytes + 3) & ~3u;
  return kEthBytes + kIpv4Bytes + kEspHdrBytes + kEspIvBytes + payload + kEspIcvBytes + kFcsBytes;
}

namespace {

// moat-bench's reader: the YAML walker moatd's configuration uses
// (ctrl/yaml_reader.hh), plus the address and port ranges of profiles.
class Reader : public YamlReader {
 public:
  using YamlReader::YamlReader;
  using YamlReader::mac;
  void mac(const YAML::Node& n, std::string_view what, std::array<uint8_t, 6>& out) {
    if (auto a = mac(n, what)) out = *a;
  }

  // "10.0.1.2", "10.0.1.2-10.0.1.200" (inclusive).
  void ip_range(const YAML::Node& n, const std::string& what, Range& out) {
    auto s = str(n, what);
    if (!s) return;
    auto dash = s->find('-');
    auto a = parse_ipv4(s->substr(0, dash));
    auto b = dash == std::string::npos ? a : parse_ipv4(s->substr(dash + 1));
    if (!a || !b) {
      error(n, fmt::format("{}: \"{}\" is not an IPv4 address or range (A or A-B)", what, *s));
      return;
    }
    if (*b < *a) {
      error(n, fmt::format("{}: \"{}\" ends before it starts", what, *s));
      return;
    }
    out = Range{*a, *b - *a + 1};
  }

  // 9, "1024-65535" (inclusive).
  void port_range(const YAML::Node& n, const std::string& what, Range& out) {
    const std::string s = n.IsScalar() ? n.Scalar() : "";
    unsigned a = 0, b = 0;
    char tail;
    int k = std::sscanf(s.c_str(), "%u-%u%c", &a, &b, &tail);
    if (k == 1 && s.find('-') == std::string::npos) b = a;
    if ((k != 1 && k != 2) || a > 65535 || b > 65535 || s.find_first_not_of("0123456789-") != std::string::npos) {
      error(n, fmt::format("{}: \"{}\" is not a port or range (0-65535, A or A-B)", what, s));
      return;
    }
    if (b < a) {
      error(n, fmt::format("{}: \"{}\" ends before it starts", what, s));
      return;
    }
    out = Range{a, b - a + 1};
  }

};

// The "simple IMIX": 7 : 4 : 1 of 64, 594 and 1518-byte frames (IP packets
// of 40, 576 and 1500 bytes, the first padded to the Ethernet minimum).
const std::vector<SizeSlot> kSimpleImix{{64, 7}, {594, 4}, {1518, 1}};

struct Marks {
  YAML::Mark sizes, flows, gen_port, sink_port, esp_keys, esp;
  bool have_sizes = false, have_flows = false, have_gen = false, have_sink = false, have_keys = false;
  std::vector<YAML::Mark> size_marks;  // one per SizeSeries
};

void read_sizes(Reader& r, const YAML::Node& n, Profile& p, Marks& mk) {
  p.sizes.clear();
  mk.size_marks.clear();
  auto one = [&](const YAML::Node& x) {
    unsigned s = 0;
    if (auto v = r.uint(x, "traffic.sizes", 1, 65535)) s = unsigned(*v);
    else return;
    p.sizes.push_back(SizeSeries{std::to_string(s), {{s, 1}}});
    mk.size_marks.push_back(x.Mark());
  };
  if (n.IsScalar() && n.Scalar() == "imix") {
    p.sizes.push_back(SizeSeries{"imix", kSimpleImix});
    mk.size_marks.push_back(n.Mark());
  } else if (n.IsScalar()) {
    one(n);
  } else if (n.IsSequence()) {
    if (n.size() == 0) r.error(n, "traffic.sizes: empty list");
    for (const auto& x : n) one(x);
  } else if (n.IsMap()) {
    SizeSeries mix{"imix", {}};
    r.fields(n, "traffic.sizes", {"imix"}, [&](const std::string&, const YAML::Node& v) {
      r.list(v, "traffic.sizes.imix", [&](const YAML::Node& e) {
        SizeSlot slot;
        r.fields(e, "traffic.sizes.imix[]", {"size", "weight"}, [&](const std::string& k, const YAML::Node& x) {
          if (k == "size") r.uint(x, "traffic.sizes.imix[].size", slot.size, 1, 65535);
          else r.uint(x, "traffic.sizes.imix[].weight", slot.weight, 1, 1000);
        });
        if (slot.size == 0) r.error(e, "traffic.sizes.imix[]: size is required");
        else mix.mix.push_back(slot);
      });
    });
    if (mix.mix.empty()) r.error(n, "traffic.sizes.imix: no sizes");
    unsigned total = 0;
    for (auto& s : mix.mix) total += s.weight;
    if (total > 4096) r.error(n, "traffic.sizes.imix: weights add up to more than 4096");
    p.sizes.push_back(mix);
    mk.size_marks.push_back(n.Mark());
  } else {
    r.error(n, "traffic.sizes: expected a size, a list of sizes, imix or {imix: [...]}");
  }
  mk.sizes = n.Mark();
  mk.have_sizes = true;
}

void read_dscp(Reader& r, const YAML::Node& n, Profile& p) {
  p.dscp.clear();
  if (n.IsScalar()) {
    uint8_t d = 0;
    r.uint(n, "traffic.dscp", d, 0, 63);
    p.dscp.push_back({d, 1});
    return;
  }
  r.list(n, "traffic.dscp", [&](const YAML::Node& e) {
    DscpSlot slot;
    bool have = false;
    r.fields(e, "traffic.dscp[]", {"value", "weight"}, [&](const std::string& k, const YAML::Node& x) {
      if (k == "value") {
        r.uint(x, "traffic.dscp[].value", slot.dscp, 0, 63);
        have = true;
      } else {
        r.uint(x, "traffic.dscp[].weight", slot.weight, 1, 1000);
      }
    });
    if (!have) r.error(e, "traffic.dscp[]: value is required");
    else p.dscp.push_back(slot);
  });
  if (p.dscp.empty()) {
    r.error(n, "traffic.dscp: empty");
    p.dscp.push_back({0, 1});
  }
}

// moatd's static SAs for the profile's direction, from moatd's own
// configuration file, so a benchmark cannot drift from the router's keys.
// Only tunnels[].{name, local, peer, sa} is read, by the key layout of
// docs/CONFIGURATION.md: moat-bench does not link moatd's configuration
// code, which brings the rule compiler and DPDK tables with it. Errors are
// the moatd file's own file:line:col.
void read_moat_config(Reader& r, const YAML::Node& at, const std::string& file, EspSpec& e) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(file);
  } catch (const YAML::BadFile&) {
    r.error(at, fmt::format("traffic.esp.moat_config: cannot read {}", file));
    return;
  } catch (const YAML::Exception& x) {
    r.other(file).error(x.mark, x.msg);
    return;
  }
  YamlReader m = r.other(file);
  const YAML::Node tunnels = root.IsMap() ? root["tunnels"] : YAML::Node();
  if (!tunnels.IsSequence()) {
    r.error(at, fmt::format("traffic.esp.moat_config: {} has no tunnels list", file));
    return;
  }
  const bool in = e.direction == EspDirection::inbound;
  for (const auto& t : tunnels) {
    if (!t.IsMap() || !t["sa"]) continue;  // IKE tunnels have no static keys
    const std::string name = t["name"] && t["name"].IsScalar() ? t["name"].Scalar() : "?";
    const YAML::Node sa = t["sa"];
    const std::string what = fmt::format("tunnel {}: sa", name);
    if (!sa.IsMap()) {
      m.error(sa, what + ": expected a mapping");
      continue;
    }
    auto cipher = sa["cipher"] ? m.str(sa["cipher"], what + ".cipher") : std::nullopt;
    if (!cipher) {
      if (!sa["cipher"]) m.error(sa, what + ": no cipher");
      continue;
    }
    if (*cipher != "aes-gcm-128") {
      m.error(sa["cipher"], fmt::format("{}.cipher: {}: moat-bench generates and checks aes-gcm-128 only", what,
                                        *cipher));
      continue;
    }
    YAML::Node one = sa[in ? "in" : "out"];
    if (!one) continue;  // no SA this way: the tunnel carries none of this traffic
    if (one.IsSequence()) {
      // Several inbound SAs (a make-before-break overlap): the first.
      if (one.size() == 0) continue;
      one = one[0];
    }
    EspSaSpec s;
    s.tunnel = name;
    const std::string sw = fmt::format("{}.{}", what, in ? "in" : "out");
    bool ok = one.IsMap() && one["spi"] && one["key"];
    if (!ok) {
      m.error(one, sw + ": spi and key are required");
      continue;
    }
    if (auto v = m.uint(one["spi"], sw + ".spi", 256, 0xffffffffu)) s.spi = uint32_t(*v);
    else ok = false;
    if (auto k = m.hex(one["key"], sw + ".key", 20)) s.key = *k;
    else ok = false;
    uint32_t local = 0, peer = 0;
    for (auto [key, out] : {std::pair{"local", &local}, std::pair{"peer", &peer}}) {
      if (!t[key]) {
        m.error(t, fmt::format("tunnel {}: {} is required for its ESP", name, key));
        ok = false;
      } else if (auto a = m.str(t[key], fmt::format("tunnel {}: {}", name, key)); a && parse_ipv4(*a)) {
        *out = *parse_ipv4(*a);
      } else {
        if (a) m.error(t[key], fmt::format("tunnel {}: {}: \"{}\" is not an IPv4 address", name, key, *a));
        ok = false;
      }
    }
    if (!ok) continue;
    s.outer_src = in ? peer : local;
    s.outer_dst = in ? local : peer;
    e.list.push_back(std::move(s));
  }
  if (e.list.empty())
    r.error(at, fmt::format("traffic.esp.moat_config: {} has no tunnel with an aes-gcm-128 `{}` SA", file,
                            in ? "in" : "out"));
}

void read_esp(Reader& r, const YAML::Node& n, Profile& p, Marks& mk) {
  EspSpec& e = p.esp;
  mk.esp = n.Mark();
  bool have_dir = false, have_src = false, have_dst = false;
  std::vector<YAML::Node> given;  // keys that moat_config makes redundant
  YAML::Node moat_config;
  bool have_moat_config = false;
  r.fields(n, "traffic.esp",
           {"direction", "sas", "spi", "outer_src", "outer_dst", "key", "keys", "verify_every", "moat_config"},
           [&](const std::string& k, const YAML::Node& v) {
             if (k != "direction" && k != "verify_every" && k != "moat_config") given.push_back(v);
             if (k == "moat_config") {
               if (auto f = r.str(v, "traffic.esp.moat_config")) e.moat_config = *f;
               moat_config = v;
               have_moat_config = true;
             } else if (k == "direction") {
               have_dir = true;
               auto s = r.str(v, "traffic.esp.direction");
               if (s && *s == "inbound") e.direction = EspDirection::inbound;
               else if (s && *s == "outbound") e.direction = EspDirection::outbound;
               else if (s) r.error(v, fmt::format("traffic.esp.direction: \"{}\": expected inbound or outbound", *s));
             } else if (k == "sas") {
               r.uint(v, "traffic.esp.sas", e.sas, 1, 100000);
             } else if (k == "spi") {
               r.uint(v, "traffic.esp.spi", e.spi, 256, 0xffffffffu);
             } else if (k == "outer_src") {
               have_src = true;
               r.ipv4(v, "traffic.esp.outer_src", e.outer_src);
             } else if (k == "outer_dst") {
               have_dst = true;
               r.ipv4(v, "traffic.esp.outer_dst", e.outer_dst);
             } else if (k == "key") {
               if (auto key = r.hex(v, "traffic.esp.key", 20)) e.keys = {*key};
               mk.esp_keys = v.Mark();
               mk.have_keys = true;
             } else if (k == "keys") {
               e.keys.clear();
               r.list(v, "traffic.esp.keys", [&](const YAML::Node& x) {
                 if (auto key = r.hex(x, "traffic.esp.keys[]", 20)) e.keys.push_back(*key);
               });
               mk.esp_keys = v.Mark();
               mk.have_keys = true;
             } else if (k == "verify_every") {
               r.uint(v, "traffic.esp.verify_every", e.verify_every, 1, 1u << 30);
             }
           });
  if (!have_dir) r.error(n, "traffic.esp: direction is required (inbound or outbound)");
  if (have_moat_config) {
    for (const auto& v : given)
      r.error(v, "traffic.esp: sas, spi, outer_src, outer_dst and keys come from moat_config; drop this key");
    if (e.moat_config.empty() || !have_dir) return;
    // Relative to the profile, as a profile and its router's configuration
    // usually sit side by side.
    std::string file = e.moat_config;
    if (file[0] != '/' && p.path.find('/') != std::string::npos) file = p.path.substr(0, p.path.rfind('/') + 1) + file;
    read_moat_config(r, moat_config, file, e);
    if (e.list.empty()) return;
    e.sas = unsigned(e.list.size());
    mk.have_keys = true;
    return;
  }
  if (!have_src || !have_dst) r.error(n, "traffic.esp: outer_src and outer_dst are required");
  if (!mk.have_keys) r.error(n, "traffic.esp: key (or keys) is required");
}

void read_traffic(Reader& r, const YAML::Node& n, Profile& p, Marks& mk) {
  r.fields(n, "traffic",
           {"protocol", "sizes", "flows", "dst_mac", "src_ip", "dst_ip", "src_port", "dst_port", "dscp", "ttl", "esp"},
           [&](const std::string& k, const YAML::Node& v) {
             if (k == "protocol") {
               auto s = r.str(v, "traffic.protocol");
               if (s && *s == "udp") p.protocol = Protocol::udp;
               else if (s && *s == "tcp") p.protocol = Protocol::tcp;
               else if (s) r.error(v, fmt::format("traffic.protocol: \"{}\": expected udp or tcp", *s));
             } else if (k == "sizes") {
               read_sizes(r, v, p, mk);
             } else if (k == "flows") {
               // Zero is parsed so that it gets its own message below.
               r.uint(v, "traffic.flows", p.flows, 0, kMaxFlows);
               mk.flows = v.Mark();
               mk.have_flows = true;
             } else if (k == "dst_mac") {
               r.mac(v, "traffic.dst_mac", p.dst_mac);
             } else if (k == "src_ip") {
               r.ip_range(v, "traffic.src_ip", p.src_ip);
             } else if (k == "dst_ip") {
               r.ip_range(v, "traffic.dst_ip", p.dst_ip);
             } else if (k == "src_port") {
               r.port_range(v, "traffic.src_port", p.src_port);
             } else if (k == "dst_port") {
               r.port_range(v, "traffic.dst_port", p.dst_port);
             } else if (k == "dscp") {
               read_dscp(r, v, p);
             } else if (k == "ttl") {
               r.uint(v, "traffic.ttl", p.ttl, 1, 255);
             } else if (k == "esp") {
               read_esp(r, v, p, mk);
             }
           });
}

void read_endpoint(Reader& r, const YAML::Node& n, const std::string& what, std::string& port, unsigned& lcore,
                   YAML::Mark& port_mark, bool& have) {
  r.fields(n, what, {"port", "lcore"}, [&](const std::string& k, const YAML::Node& v) {
    if (k == "port") {
      if (auto s = r.str(v, what + ".port")) port = *s;
      port_mark = v.Mark();
      have = true;
    } else {
      r.uint(v, what + ".lcore", lcore, 0, 127);
    }
  });
  if (!have) r.error(n, what + ": port is required");
}

void read(Reader& r, const YAML::Node& root, Profile& p) {
  Marks mk;
  bool have_ports = false;
  if (!r.fields(root, "profile", {"ports", "generator", "sink", "eal", "traffic", "trial", "search", "time_limit_s"},
                [&](const std::string& k, const YAML::Node& v) {
                  if (k == "ports") {
                    have_ports = true;
                    r.list(v, "ports", [&](const YAML::Node& e) {
                      PortSpec ps;
                      r.fields(e, "ports[]", {"name", "device", "mac"}, [&](const std::string& pk, const YAML::Node& x) {
                        if (pk == "name") {
                          if (auto s = r.str(x, "ports[].name")) ps.name = *s;
                        } else if (pk == "device") {
                          if (auto s = r.str(x, "ports[].device")) ps.device = *s;
                        } else {
                          std::array<uint8_t, 6> m{};
                          size_t before = r.errors();
                          r.mac(x, "ports[].mac", m);
                          if (r.errors() == before) ps.mac = m;
                        }
                      });
                      if (ps.name.empty() || ps.device.empty()) {
                        r.error(e, "ports[]: name and device are required");
                        return;
                      }
                      for (auto& o : p.ports) {
                        if (o.name == ps.name) r.error(e, fmt::format("ports[]: \"{}\" declared twice", ps.name));
                        if (o.device == ps.device) r.error(e, fmt::format("ports[]: device \"{}\" used twice", ps.device));
                      }
                      p.ports.push_back(ps);
                    });
                  } else if (k == "generator") {
                    read_endpoint(r, v, "generator", p.gen_port, p.gen_lcore, mk.gen_port, mk.have_gen);
                  } else if (k == "sink") {
                    read_endpoint(r, v, "sink", p.sink_port, p.sink_lcore, mk.sink_port, mk.have_sink);
                  } else if (k == "eal") {
                    r.fields(v, "eal", {"memory_mb", "no_huge", "file_prefix", "args"}, [&](const std::string& ek, const YAML::Node& x) {
                      if (ek == "memory_mb") r.uint(x, "eal.memory_mb", p.memory_mb, 64, 1u << 20);
                      else if (ek == "no_huge") r.boolean(x, "eal.no_huge", p.no_huge);
                      else if (ek == "file_prefix") {
                        if (auto s = r.str(x, "eal.file_prefix")) p.file_prefix = *s;
                      } else {
                        r.list(x, "eal.args", [&](const YAML::Node& a) {
                          if (auto s = r.str(a, "eal.args[]")) p.eal_args.push_back(*s);
                        });
                      }
                    });
                  } else if (k == "traffic") {
                    read_traffic(r, v, p, mk);
                  } else if (k == "trial") {
                    r.fields(v, "trial", {"duration_s", "warmup_s", "drain_s", "link_timeout_s", "ready_file"},
                             [&](const std::string& tk, const YAML::Node& x) {
                               if (tk == "duration_s") r.number(x, "trial.duration_s", p.duration_s, 0.01, 3600);
                               else if (tk == "warmup_s") r.number(x, "trial.warmup_s", p.warmup_s, 0, 60);
                               else if (tk == "drain_s") r.number(x, "trial.drain_s", p.drain_s, 0.001, 10);
                               else if (tk == "ready_file") {
                                 if (auto f = r.str(x, "trial.ready_file")) p.ready_file = *f;
                               } else r.number(x, "trial.link_timeout_s", p.link_timeout_s, 0.1, 300);
                             });
                  } else if (k == "search") {
                    r.fields(v, "search",
                             {"mode", "rate_pps", "max_rate_pps", "min_rate_pps", "ndr_loss", "pdr_loss", "resolution",
                              "max_trials"},
                             [&](const std::string& sk, const YAML::Node& x) {
                               if (sk == "mode") {
                                 auto s = r.str(x, "search.mode");
                                 if (s && *s == "ndr") p.mode = SearchMode::ndr;
                                 else if (s && *s == "fixed") p.mode = SearchMode::fixed;
                                 else if (s && *s == "max") p.mode = SearchMode::max;
                                 else if (s) r.error(x, fmt::format("search.mode: \"{}\": expected ndr, fixed or max", *s));
                               } else if (sk == "rate_pps") {
                                 r.number(x, "search.rate_pps", p.rate_pps, 0, 1e10);
                               } else if (sk == "max_rate_pps") {
                                 r.number(x, "search.max_rate_pps", p.max_rate_pps, 0, 1e10);
                               } else if (sk == "min_rate_pps") {
                                 r.number(x, "search.min_rate_pps", p.min_rate_pps, 1, 1e10);
                               } else if (sk == "ndr_loss") {
                                 r.number(x, "search.ndr_loss", p.ndr_loss, 0, 0.5);
                               } else if (sk == "pdr_loss") {
                                 r.number(x, "search.pdr_loss", p.pdr_loss, 0, 0.5);
                               } else if (sk == "resolution") {
                                 r.number(x, "search.resolution", p.resolution, 0.0001, 0.5);
                               } else {
                                 r.uint(x, "search.max_trials", p.max_trials, 1, 1000);
                               }
                             });
                    if (p.mode == SearchMode::fixed && p.rate_pps <= 0)
                      r.error(v, "search: mode fixed needs rate_pps");
                    if (p.pdr_loss < p.ndr_loss) r.error(v, "search: pdr_loss is below ndr_loss");
                  } else if (k == "time_limit_s") {
                    r.number(v, "time_limit_s", p.time_limit_s, 1, 86400);
                  }
                }))
    return;

  if (!have_ports) r.error(root, "profile: ports is required");
  if (!mk.have_gen) r.error(root, "profile: generator is required");
  if (!mk.have_sink) r.error(root, "profile: sink is required");
  auto known = [&](const std::string& name) {
    for (auto& ps : p.ports)
      if (ps.name == name) return true;
    return false;
  };
  auto names = [&] {
    std::string s;
    for (auto& ps : p.ports) s += (s.empty() ? "" : ", ") + ps.name;
    return s.empty() ? std::string("none declared") : s;
  };
  if (mk.have_gen && !p.gen_port.empty() && !known(p.gen_port))
    r.error(mk.gen_port, fmt::format("generator.port: unknown port \"{}\" (ports: {})", p.gen_port, names()));
  if (mk.have_sink && !p.sink_port.empty() && !known(p.sink_port))
    r.error(mk.sink_port, fmt::format("sink.port: unknown port \"{}\" (ports: {})", p.sink_port, names()));
  // Only the ports the generator and sink use are probed: a declared port
  // nobody uses is a mistake, not a third port to send to.
  for (auto& ps : p.ports)
    if (ps.name != p.gen_port && ps.name != p.sink_port && known(p.gen_port) && known(p.sink_port))
      r.error(root["ports"], fmt::format("ports: \"{}\" is used by neither generator nor sink", ps.name));

  if (mk.have_flows && p.flows == 0) r.error(mk.flows, "traffic.flows: 0 flows: need at least 1");
  const uint64_t tuples = uint64_t(p.src_ip.count) * p.src_port.count * p.dst_ip.count * p.dst_port.count;
  if (p.flows > tuples)
    r.error(mk.have_flows ? mk.flows : root.Mark(),
            fmt::format("traffic.flows: {} flows need as many distinct (src_ip, src_port, dst_ip, dst_port), "
                        "the ranges give {}",
                        p.flows, tuples));

  const unsigned need = min_frame_for(p);
  const char* what = p.esp.direction == EspDirection::inbound ? "an ESP" : p.protocol == Protocol::udp ? "a UDP" : "a TCP";
  for (size_t i = 0; i < p.sizes.size(); i++) {
    const YAML::Mark at = i < mk.size_marks.size() ? mk.size_marks[i] : mk.sizes;
    for (auto& slot : p.sizes[i].mix) {
      if (slot.size < need)
        r.error(at, fmt::format("traffic.sizes: {} bytes is smaller than its headers: {} frame with the "
                                "harness's stamp needs at least {} (FCS included)",
                                slot.size, what, need));
      else if (slot.size < kMinFrame)
        r.error(at, fmt::format("traffic.sizes: {} bytes is below the Ethernet minimum of {} (FCS included)",
                                slot.size, kMinFrame));
      else if (slot.size > kMaxFrame)
        r.error(at, fmt::format("traffic.sizes: {} bytes is above {} (FCS included; no jumbo frames)", slot.size,
                                kMaxFrame));
    }
  }

  if (p.esp.direction != EspDirection::none) {
    if (mk.have_keys && p.esp.list.empty() && p.esp.keys.size() != 1 && p.esp.keys.size() != p.esp.sas)
      r.error(mk.esp_keys, fmt::format("traffic.esp.keys: {} keys for {} SAs (give one key, or one per SA)",
                                       p.esp.keys.size(), p.esp.sas));
    if (p.esp.direction == EspDirection::outbound && p.flows < p.esp.sas)
      r.error(mk.esp, fmt::format("traffic.esp: {} flows cannot cover {} SAs' selectors", p.flows, p.esp.sas));
    if (p.esp.list.empty() && p.esp.direction == EspDirection::inbound &&
        uint64_t(p.esp.outer_src) + p.esp.sas - 1 > 0xffffffffu)
      r.error(mk.esp, "traffic.esp.outer_src: the SAs' outer sources run past 255.255.255.255");
  }
  if (p.min_rate_pps > p.max_rate_pps && p.max_rate_pps > 0)
    r.error(root["search"], "search: min_rate_pps is above max_rate_pps");
}

}  // namespace

LoadResult load_profile_text(const std::string& text, const std::string& name) {
  LoadResult out;
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    out.errors.push_back(ProfileError{name, e.mark.line + 1, e.mark.column + 1, e.msg});
    return out;
  }
  Profile p;
  p.path = name;
  Reader r(name, out.errors);
  if (!root.IsDefined() || root.IsNull()) {
    out.errors.push_back(ProfileError{name, 1, 1, "empty profile"});
    return out;
  }
  read(r, root, p);
  std::stable_sort(out.errors.begin(), out.errors.end(), [](const ProfileError& a, const ProfileError& b) {
    return std::tie(a.line, a.col) < std::tie(b.line, b.col);
  });
  if (out.errors.empty()) out.profile = std::move(p);
  return out;
}

LoadResult load_profile(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return LoadResult{std::nullopt, {ProfileError{path, 0, 0, fmt::format("cannot open: {}", std::strerror(errno))}}};
  std::string text;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
  std::fclose(f);
  return load_profile_text(text, path);
}

}  // namespace moat::bench
