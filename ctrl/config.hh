#pragma once
// moatd's configuration file (YAML). Every key is documented in
// docs/CONFIGURATION.md. Loading never stops at the first problem: it
// collects every error with its file:line:col so `moatd --check` can show
// them all. Unknown keys are errors (a typo must not silently mean default).
// Owner: the control thread.
#include <rte_ether.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "classifier/rules.hh"
#include "ctrl/place_error.hh"
#include "dataplane/sa.hh"
#include "dataplane/conntrack.hh"
#include "qos/htb.hh"

namespace moat {

using ConfigError = PlaceError;

struct Ipv4Prefix {
  uint32_t addr = 0;  // host order
  uint8_t len = 0;
  std::string str() const;
};

struct EalConfig {
  std::vector<unsigned> lcores{0, 1};  // first: main lcore (control thread)
  // CPU of each lcore when it differs from the lcore id ("L@C" entries):
  // more workers than CPUs, e.g. to exercise RSS on a 2-CPU lab machine.
  std::vector<int> cpus;  // -1: the lcore's own id
  unsigned memory_mb = 256;
  bool no_huge = false;
  std::string file_prefix;  // empty: --no-shconf
  std::string log_level;
  std::vector<std::string> args;  // extra, verbatim
};

struct PortConfig {
  std::string name;
  std::string device;
  std::optional<Ipv4Prefix> address;  // addr = our address, len = subnet
  uint16_t mtu = 1500;
  uint16_t vlan = 0;
  uint16_t rx_queues = 0;
  uint16_t rx_ring = 1024;
  uint16_t tx_ring = 1024;
  std::optional<rte_ether_addr> mac;
  bool punt = true;  // give the port a TAP on the punt path
  int line = 0;
};

enum class RouteType : uint8_t { unicast, blackhole, unreachable, prohibit, tunnel };
const char* route_type_name(RouteType t);

struct RouteConfig {
  Ipv4Prefix prefix;
  uint32_t via = 0;  // 0: directly connected through `port`
  std::string port;  // empty: found from `via`
  std::string tunnel;  // type tunnel: the tunnel's name
  RouteType type = RouteType::unicast;
  int line = 0;
};

struct NeighborConfig {
  uint32_t ip = 0;
  rte_ether_addr mac{};
  std::string port;
  int line = 0;
};

// A tunnel as the rule tables see it: a name for SPD `protect` and the zone
// its decrypted packets come from (and protected packets go to).
struct TunnelConfig {
  std::string name;
  std::string zone;
  int line = 0;
  // Static SAs (keys in the file, no IKE): one outbound, one or more inbound.
  // Every SaConfig carries the tunnel's outer addresses, funnels and MTU
  // policy, as the SAD wants them.
  std::vector<SaConfig> sas;
  // What every SA of the tunnel shares (outer addresses, MTU policy,
  // funnels, replay window): the template IKE's CHILD SAs are built on.
  SaConfig tmpl;
  // The portal's shaping of this moat's downstream (qos.shaping moats):
  // guaranteed rate and ceiling in bytes/s; 0: the moats template's.
  uint64_t shape_rate = 0, shape_ceil = 0;
  // An IKE tunnel whose record left the tunnels directory (`ike reload`):
  // its id stays taken, so no other tunnel's id moves under the workers,
  // and a record of the same name that comes back gets it again.
  bool retired = false;
};

// A class tree on one egress port (qos.shaping, docs/CONFIGURATION.md).
struct ShaperConfig {
  std::string port;
  int line = 0;
  qos::Plan plan;               // classes[0]: the root, the link
  std::string default_leaf;     // the leaf of class default (empty: the first leaf)
  std::string dscp[64];         // leaf name for packets of class default marked so
  // The portal: one subtree per tunnel under `moats_parent` (a class of
  // `plan`, or the root), built from `moat`: moat.classes[0] is the moat's
  // own class (rate = guarantee, ceil = access rate), the rest its classes.
  bool moats = false;
  std::string moats_parent;
  qos::Plan moat;
  std::string moat_default;
};

// Ingress policing of a class (qos.police): RFC 2698 trTCM, rates in
// bytes/s, bursts in bytes.
struct PoliceConfig {
  std::string cls;
  uint64_t cir = 0, pir = 0;
  uint32_t cbs = 0, pbs = 0;
  bool yellow_drop = false;
  uint8_t yellow_dscp = 0xff;  // 0xff: pass unchanged
  int line = 0;
};

struct Config {
  std::string path;
  EalConfig eal;
  unsigned mbufs = 8191;
  unsigned mbuf_cache = 256;
  std::vector<PortConfig> ports;
  std::vector<RouteConfig> routes;
  std::vector<NeighborConfig> neighbors;
  uint16_t burst = 32;
  uint32_t idle_sleep_us = 0;
  unsigned punt_ring = 4096;
  unsigned inject_ring = 4096;
  // ARP
  unsigned arp_reachable_s = 300;
  unsigned arp_retry_ms = 1000;
  unsigned arp_max_retries = 3;
  unsigned arp_hold_packets = 8;
  unsigned arp_max_entries = 4096;
  // ICMP errors, per source
  unsigned icmp_rate_pps = 100;
  unsigned icmp_burst = 20;
  // punt path
  bool punt_enabled = true;
  std::string punt_netns;  // empty: moatd's own namespace
  // control
  std::string socket = "/run/moat/moatd.sock";
  unsigned max_routes = 65536;
  unsigned max_sas = 4096;  // SAD capacity: SA slots and tunnel ids
  // Policy: zones, tunnels and the four rule tables (docs/CONFIGURATION.md).
  std::vector<uint8_t> port_zone;  // zone id per port (index as in `ports`)
  std::vector<TunnelConfig> tunnels;
  RuleSet rules;
  std::vector<ShaperConfig> shapers;  // qos.shaping: class trees by egress port
  std::vector<PoliceConfig> police;   // qos.police
  std::string ike_dir;  // IKEv2 tunnels: one YAML file per moat (docs/IKE.md)
  bool has_policy = false;  // any of zones/filter/nat/spd/qos given
  // Connection tracking and NAT state (docs/CONFIGURATION.md "conntrack").
  CtConfig conntrack;

  unsigned workers() const { return eal.lcores.size() > 1 ? unsigned(eal.lcores.size() - 1) : 0; }
  const PortConfig* port(const std::string& name) const;
};

// Parses and validates `path`. Errors are appended to `errors`; the returned
// Config holds whatever was valid.
Config load_config(const std::string& path, std::vector<ConfigError>& errors);

// Parses "a.b.c.d" / "a.b.c.d/len" (host bits of a route prefix must be zero
// when `strict`). Used by the config and by `moatctl route`.
std::optional<Ipv4Prefix> parse_prefix(const std::string& s, bool strict, std::string* why);
std::string ipv4_str(uint32_t host_order);
std::string mac_str(const rte_ether_addr& a);

// The EAL argument vector this config asks for (argv[0] included).
std::vector<std::string> eal_args(const Config& c, const char* argv0);

}  // namespace moat
