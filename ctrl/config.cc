#include "ctrl/config.hh"

#include <arpa/inet.h>
#include <yaml-cpp/yaml.h>

#include <fmt/format.h>

#include <algorithm>
#include <functional>
#include <set>

#include "ctrl/config_reader.hh"
#include "dataplane/port.hh"

namespace moat {

std::string ipv4_str(uint32_t a) {
  return fmt::format("{}.{}.{}.{}", a >> 24, (a >> 16) & 0xff, (a >> 8) & 0xff, a & 0xff);
}

std::string Ipv4Prefix::str() const { return fmt::format("{}/{}", ipv4_str(addr), len); }

std::string mac_str(const rte_ether_addr& a) {
  const uint8_t* b = a.addr_bytes;
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5]);
}

const char* route_type_name(RouteType t) {
  switch (t) {
    case RouteType::unicast: return "unicast";
    case RouteType::blackhole: return "blackhole";
    case RouteType::unreachable: return "unreachable";
    case RouteType::prohibit: return "prohibit";
    case RouteType::tunnel: return "tunnel";
  }
  return "?";
}

std::optional<Ipv4Prefix> parse_prefix(const std::string& s, bool strict, std::string* why) {
  auto slash = s.find('/');
  auto ip = parse_ipv4(s.substr(0, slash));
  if (!ip) {
    if (why) *why = fmt::format("\"{}\" is not an IPv4 address", s.substr(0, slash));
    return std::nullopt;
  }
  Ipv4Prefix p{*ip, 32};
  if (slash != std::string::npos) {
    std::string l = s.substr(slash + 1);
    if (l.empty() || l.size() > 2 || l.find_first_not_of("0123456789") != std::string::npos || std::stoi(l) > 32) {
      if (why) *why = fmt::format("\"{}\" is not a prefix length (0-32)", l);
      return std::nullopt;
    }
    p.len = uint8_t(std::stoi(l));
  }
  uint32_t mask = p.len ? ~uint32_t(0) << (32 - p.len) : 0;
  if (strict && (p.addr & ~mask)) {
    if (why) *why = fmt::format("{} has host bits set (did you mean {}?)", s, Ipv4Prefix{p.addr & mask, p.len}.str());
    return std::nullopt;
  }
  return p;
}

const PortConfig* Config::port(const std::string& name) const {
  for (auto& p : ports)
    if (p.name == name) return &p;
  return nullptr;
}

namespace {

void read_eal(Reader& r, const YAML::Node& n, EalConfig& e) {
  r.fields(n, "eal", {"lcores", "memory_mb", "no_huge", "file_prefix", "log_level", "args"},
           [&](const std::string& k, const YAML::Node& v) {
             if (k == "lcores") {
               size_t errors_before = r.errors();
               e.lcores.clear();
               e.cpus.clear();
               r.list(v, "eal.lcores", [&](const YAML::Node& x) {
                 unsigned c = 0;
                 int cpu = -1;
                 std::string text = x.IsScalar() ? x.Scalar() : "";
                 if (auto at = text.find('@'); at != std::string::npos) {
                   // "L@C": lcore L runs on CPU C.
                   unsigned l = 0, p = 0;
                   char tail;
                   if (std::sscanf(text.c_str(), "%u@%u%c", &l, &p, &tail) != 2 || l >= RTE_MAX_LCORE) {
                     r.error(x, fmt::format("eal.lcores: \"{}\" is neither an lcore id nor LCORE@CPU", text));
                     return;
                   }
                   c = l;
                   cpu = int(p);
                 } else {
                   r.uint(x, "eal.lcores", c, 0, RTE_MAX_LCORE - 1);
                 }
                 for (unsigned o : e.lcores)
                   if (o == c) r.error(x, fmt::format("eal.lcores: lcore {} listed twice", c));
                 e.lcores.push_back(c);
                 e.cpus.push_back(cpu);
               });
               if (e.lcores.size() < 2 && r.errors() == errors_before)
                 r.error(v, "eal.lcores: need the main lcore and at least one worker");
             } else if (k == "memory_mb") {
               r.uint(v, "eal.memory_mb", e.memory_mb, 64, 1u << 20);
             } else if (k == "no_huge") {
               r.boolean(v, "eal.no_huge", e.no_huge);
             } else if (k == "file_prefix") {
               if (auto s = r.str(v, "eal.file_prefix")) e.file_prefix = *s;
             } else if (k == "log_level") {
               if (auto s = r.str(v, "eal.log_level")) e.log_level = *s;
             } else if (k == "args") {
               r.list(v, "eal.args", [&](const YAML::Node& x) {
                 if (auto s = r.str(x, "eal.args")) e.args.push_back(*s);
               });
             }
           });
}

void read_port(Reader& r, const YAML::Node& n, Config& c) {
  PortConfig p;
  p.line = n.Mark().line + 1;
  bool has_name = false, has_device = false;
  r.fields(n, "port", {"name", "device", "address", "mtu", "vlan", "rx_queues", "rx_ring", "tx_ring", "mac", "punt"},
           [&](const std::string& k, const YAML::Node& v) {
             if (k == "name") {
               if (auto s = r.str(v, "port.name")) {
                 // The name becomes a kernel interface name on the punt path.
                 if (s->empty() || s->size() > 15 || s->find_first_of(" /:") != std::string::npos)
                   r.error(v, fmt::format("port.name: \"{}\" must be 1-15 characters without space, '/' or ':'", *s));
                 else if (c.port(*s))
                   r.error(v, fmt::format("port.name: \"{}\" is already used by another port", *s));
                 p.name = *s;
                 has_name = true;
               }
             } else if (k == "device") {
               if (auto s = r.str(v, "port.device")) {
                 for (auto& o : c.ports)
                   if (device_ethdev_name(o.device) == device_ethdev_name(*s))
                     r.error(v, fmt::format("port.device: \"{}\" is already used by port {}", device_ethdev_name(*s), o.name));
                 p.device = *s;
                 has_device = true;
               }
             } else if (k == "address") {
               if (auto s = r.str(v, "port.address")) {
                 std::string why;
                 auto pf = parse_prefix(*s, false, &why);
                 if (!pf) r.error(v, "port.address: " + why);
                 else if (s->find('/') == std::string::npos || pf->len == 0 || pf->len > 30)
                   r.error(v, fmt::format("port.address: \"{}\" needs a subnet length from 1 to 30, e.g. 10.1.0.1/24", *s));
                 else p.address = pf;
               }
             } else if (k == "mtu") {
               r.uint(v, "port.mtu", p.mtu, 576, 9000);
             } else if (k == "vlan") {
               r.uint(v, "port.vlan", p.vlan, 1, 4094);
             } else if (k == "rx_queues") {
               r.uint(v, "port.rx_queues", p.rx_queues, 1, 64);
             } else if (k == "rx_ring") {
               r.uint(v, "port.rx_ring", p.rx_ring, 64, 16384);
             } else if (k == "tx_ring") {
               r.uint(v, "port.tx_ring", p.tx_ring, 64, 16384);
             } else if (k == "mac") {
               rte_ether_addr a;
               bool ok;
               r.mac(v, "port.mac", a, &ok);
               if (ok) p.mac = a;
             } else if (k == "punt") {
               r.boolean(v, "port.punt", p.punt);
             }
           });
  if (!has_name) r.error(n, "port: missing \"name\"");
  if (!has_device) r.error(n, "port: missing \"device\" (a vdev string such as net_af_packet0,iface=eth1 or a PCI address)");
  if (has_name && has_device) c.ports.push_back(p);
}

void read_route(Reader& r, const YAML::Node& n, Config& c) {
  RouteConfig rt;
  rt.line = n.Mark().line + 1;
  bool has_prefix = false, prefix_seen = false;
  YAML::Node port_node;
  r.fields(n, "route", {"prefix", "via", "port", "type", "tunnel"}, [&](const std::string& k, const YAML::Node& v) {
    if (k == "prefix") {
      prefix_seen = true;
      if (auto s = r.str(v, "route.prefix")) {
        std::string why;
        if (auto p = parse_prefix(*s, true, &why)) {
          rt.prefix = *p;
          has_prefix = true;
        } else {
          r.error(v, "route.prefix: " + why);
        }
      }
    } else if (k == "via") {
      r.ipv4(v, "route.via", rt.via);
    } else if (k == "tunnel") {
      // Checked against the tunnels once the whole file is read.
      if (auto s = r.str(v, "route.tunnel")) {
        rt.tunnel = *s;
        rt.type = RouteType::tunnel;
      }
    } else if (k == "port") {
      if (auto s = r.str(v, "route.port")) {
        rt.port = *s;
        port_node = v;
      }
    } else if (k == "type") {
      auto s = r.str(v, "route.type");
      if (!s) return;
      if (*s == "unicast") rt.type = RouteType::unicast;
      else if (*s == "blackhole") rt.type = RouteType::blackhole;
      else if (*s == "unreachable") rt.type = RouteType::unreachable;
      else if (*s == "prohibit") rt.type = RouteType::prohibit;
      else r.error(v, fmt::format("route.type: \"{}\" is not one of unicast, blackhole, unreachable, prohibit", *s));
    }
  });
  if (!has_prefix) {
    if (!prefix_seen) r.error(n, "route: missing \"prefix\"");
    return;
  }
  if (!rt.port.empty() && !c.port(rt.port)) {
    r.error(port_node, fmt::format("route.port: no port named \"{}\"", rt.port));
    return;
  }
  if (rt.type == RouteType::tunnel && (rt.via || !rt.port.empty())) {
    r.error(n, fmt::format("route {}: a route into a tunnel takes no \"via\" or \"port\"", rt.prefix.str()));
    return;
  }
  if (rt.type == RouteType::unicast && rt.via == 0 && rt.port.empty()) {
    r.error(n, fmt::format("route {}: needs \"via\" or \"port\" (or a type such as blackhole)", rt.prefix.str()));
    return;
  }
  c.routes.push_back(rt);
}

void read_neighbor(Reader& r, const YAML::Node& n, Config& c) {
  NeighborConfig nb;
  nb.line = n.Mark().line + 1;
  bool ip = false, mac = false, port = false;
  r.fields(n, "neighbor", {"ip", "mac", "port"}, [&](const std::string& k, const YAML::Node& v) {
    if (k == "ip") {
      r.ipv4(v, "neighbor.ip", nb.ip);
      ip = nb.ip != 0;
    } else if (k == "mac") {
      r.mac(v, "neighbor.mac", nb.mac, &mac);
    } else if (k == "port") {
      if (auto s = r.str(v, "neighbor.port")) {
        if (!c.port(*s)) r.error(v, fmt::format("neighbor.port: no port named \"{}\"", *s));
        else port = true;
        nb.port = *s;
      }
    }
  });
  if (!ip || !mac || !port) {
    r.error(n, "neighbor: needs ip, mac and port");
    return;
  }
  c.neighbors.push_back(nb);
}

void read_conntrack(Reader& r, const YAML::Node& n, CtConfig& ct) {
  r.fields(n, "conntrack", {"max_connections", "timeouts"}, [&](const std::string& k, const YAML::Node& v) {
    if (k == "max_connections") {
      r.uint(v, "conntrack.max_connections", ct.max_connections, 64, 1u << 24);
      return;
    }
    CtTimeouts& t = ct.timeouts;
    const std::pair<const char*, uint32_t*> keys[] = {
        {"tcp_syn", &t.tcp_syn},         {"tcp_syn_recv", &t.tcp_syn_recv}, {"tcp_established", &t.tcp_established},
        {"tcp_closing", &t.tcp_closing}, {"tcp_time_wait", &t.tcp_time_wait}, {"tcp_close", &t.tcp_close},
        {"udp", &t.udp},                 {"udp_stream", &t.udp_stream},     {"icmp", &t.icmp},
        {"other", &t.other}};
    std::set<std::string> names;
    for (auto& [name, _] : keys) names.insert(name);
    r.fields(v, "conntrack.timeouts", names, [&](const std::string& k2, const YAML::Node& v2) {
      for (auto& [name, field] : keys)
        if (k2 == name) r.uint(v2, fmt::format("conntrack.timeouts.{}", name).c_str(), *field, 1, 30u * 86400);
    });
  });
}

}  // namespace

Config load_config(const std::string& path, std::vector<ConfigError>& errors) {
  Config c;
  c.path = path;
  Reader r(path, errors);
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    errors.push_back(ConfigError{path, 0, 0, "cannot open the file"});
    return c;
  } catch (const YAML::Exception& e) {
    r.error(e.mark, "YAML syntax: " + e.msg);
    return c;
  }
  if (!root.IsMap()) {
    r.error(root, "top level: expected a mapping with eal, ports, routes, ...");
    return c;
  }
  // Ports first: routes and neighbours refer to them by name.
  if (auto ports = root["ports"]) r.list(ports, "ports", [&](const YAML::Node& n) { read_port(r, n, c); });
  else r.error(root, "missing \"ports\": a router needs at least one port");

  r.fields(root, "top level",
           {"eal", "mempool", "ports", "routes", "neighbors", "workers", "arp", "icmp", "punt", "control", "zones",
            "tunnels", "filter", "nat", "spd", "qos", "conntrack", "ike"},
           [&](const std::string& k, const YAML::Node& v) {
             if (k == "eal") {
               read_eal(r, v, c.eal);
             } else if (k == "mempool") {
               r.fields(v, "mempool", {"mbufs", "cache"}, [&](const std::string& k2, const YAML::Node& v2) {
                 if (k2 == "mbufs") r.uint(v2, "mempool.mbufs", c.mbufs, 1023, 1u << 24);
                 else r.uint(v2, "mempool.cache", c.mbuf_cache, 0, 512);
               });
             } else if (k == "routes") {
               r.list(v, "routes", [&](const YAML::Node& n) { read_route(r, n, c); });
             } else if (k == "neighbors") {
               r.list(v, "neighbors", [&](const YAML::Node& n) { read_neighbor(r, n, c); });
             } else if (k == "workers") {
               r.fields(v, "workers", {"burst", "idle_sleep_us", "punt_ring", "inject_ring"},
                        [&](const std::string& k2, const YAML::Node& v2) {
                          if (k2 == "burst") r.uint(v2, "workers.burst", c.burst, 1, 64);
                          else if (k2 == "idle_sleep_us") r.uint(v2, "workers.idle_sleep_us", c.idle_sleep_us, 0, 100000);
                          else if (k2 == "punt_ring") r.uint(v2, "workers.punt_ring", c.punt_ring, 64, 1u << 20);
                          else r.uint(v2, "workers.inject_ring", c.inject_ring, 64, 1u << 20);
                        });
             } else if (k == "arp") {
               r.fields(v, "arp", {"reachable_s", "retry_ms", "max_retries", "hold_packets", "max_entries"},
                        [&](const std::string& k2, const YAML::Node& v2) {
                          if (k2 == "reachable_s") r.uint(v2, "arp.reachable_s", c.arp_reachable_s, 5, 86400);
                          else if (k2 == "retry_ms") r.uint(v2, "arp.retry_ms", c.arp_retry_ms, 10, 60000);
                          else if (k2 == "max_retries") r.uint(v2, "arp.max_retries", c.arp_max_retries, 1, 100);
                          else if (k2 == "hold_packets") r.uint(v2, "arp.hold_packets", c.arp_hold_packets, 0, 1024);
                          else r.uint(v2, "arp.max_entries", c.arp_max_entries, 16, 1u << 20);
                        });
             } else if (k == "icmp") {
               r.fields(v, "icmp", {"rate_pps", "burst"}, [&](const std::string& k2, const YAML::Node& v2) {
                 if (k2 == "rate_pps") r.uint(v2, "icmp.rate_pps", c.icmp_rate_pps, 0, 1000000);
                 else r.uint(v2, "icmp.burst", c.icmp_burst, 1, 100000);
               });
             } else if (k == "punt") {
               r.fields(v, "punt", {"enabled", "netns"}, [&](const std::string& k2, const YAML::Node& v2) {
                 if (k2 == "enabled") r.boolean(v2, "punt.enabled", c.punt_enabled);
                 else if (auto s = r.str(v2, "punt.netns")) c.punt_netns = *s;
               });
             } else if (k == "zones" || k == "tunnels" || k == "filter" || k == "nat" || k == "spd" || k == "qos") {
               // read_policy below: it needs every port first.
             } else if (k == "conntrack") {
               read_conntrack(r, v, c.conntrack);
             } else if (k == "ike") {
               r.fields(v, "ike", {"tunnels_dir"}, [&](const std::string&, const YAML::Node& v2) {
                 if (auto s = r.str(v2, "ike.tunnels_dir")) c.ike_dir = *s;
               });
             } else if (k == "control") {
               r.fields(v, "control", {"socket", "max_routes", "max_sas"}, [&](const std::string& k2, const YAML::Node& v2) {
                 if (k2 == "socket") {
                   if (auto s = r.str(v2, "control.socket")) c.socket = *s;
                 } else if (k2 == "max_sas") {
                   r.uint(v2, "control.max_sas", c.max_sas, 16, 1u << 20);
                 } else {
                   r.uint(v2, "control.max_routes", c.max_routes, 16, 1u << 24);
                 }
               });
             }
           });
  read_policy(r, root, c);
  for (auto& rt : c.routes)
    if (rt.type == RouteType::tunnel &&
        std::none_of(c.tunnels.begin(), c.tunnels.end(), [&](const TunnelConfig& t) { return t.name == rt.tunnel; }))
      errors.push_back(ConfigError{path, rt.line, 1, fmt::format("route {}: no tunnel named \"{}\"", rt.prefix.str(), rt.tunnel)});
  // Cross-checks that need the whole file.
  for (auto& rt : c.routes) {
    if (rt.via && rt.port.empty()) {
      bool reachable = false;
      for (auto& p : c.ports)
        if (p.address) {
          uint32_t mask = ~uint32_t(0) << (32 - p.address->len);
          if ((p.address->addr & mask) == (rt.via & mask)) reachable = true;
        }
      if (!reachable)
        errors.push_back(ConfigError{path, rt.line, 1,
                                     fmt::format("route {}: gateway {} is on no port's subnet", rt.prefix.str(), ipv4_str(rt.via))});
    }
  }
  std::stable_sort(errors.begin(), errors.end(), [](const ConfigError& a, const ConfigError& b) {
    return a.line != b.line ? a.line < b.line : a.col < b.col;
  });
  return c;
}

std::vector<std::string> eal_args(const Config& c, const char* argv0) {
  std::vector<std::string> a{argv0};
  std::string l;
  bool mapped = false;
  for (size_t i = 0; i < c.eal.lcores.size(); i++) {
    int cpu = i < c.eal.cpus.size() ? c.eal.cpus[i] : -1;
    l += (l.empty() ? "" : ",") + std::to_string(c.eal.lcores[i]);
    if (cpu >= 0) {
      l += "@" + std::to_string(cpu);
      mapped = true;
    }
  }
  a.push_back(mapped ? "--lcores" : "-l");
  a.push_back(l);
  a.push_back("--main-lcore");
  a.push_back(std::to_string(c.eal.lcores.at(0)));
  a.push_back("-m");
  a.push_back(std::to_string(c.eal.memory_mb));
  if (c.eal.no_huge) a.push_back("--no-huge");
  if (c.eal.file_prefix.empty()) {
    a.push_back("--no-shconf");
  } else {
    a.push_back("--file-prefix");
    a.push_back(c.eal.file_prefix);
  }
  if (!c.eal.log_level.empty()) {
    a.push_back("--log-level");
    a.push_back(c.eal.log_level);
  }
  bool any_pci = false;
  for (auto& p : c.ports) {
    if (device_is_vdev(p.device)) {
      a.push_back("--vdev");
      a.push_back(p.device);
    } else {
      any_pci = true;
      a.push_back("-a");
      a.push_back(p.device);
    }
  }
  if (!any_pci) a.push_back("--no-pci");
  for (auto& x : c.eal.args) a.push_back(x);
  return a;
}

}  // namespace moat
