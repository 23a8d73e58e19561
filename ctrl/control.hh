#pragma once
// The control thread: owns the configuration, every table the workers read,
// the ARP cache, the punt path and the statistics. It runs on the EAL main
// lcore in one event loop; workers run on the other lcores.
#include <rte_mempool.h>
#include <rte_ring.h>

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>
#include <tl/expected.hpp>

#include "ctrl/arp.hh"
#include "ctrl/config.hh"
#include "ctrl/ike/engine.hh"
#include "ctrl/punt.hh"
#include "dataplane/port.hh"
#include "dataplane/esp.hh"
#include "dataplane/sa.hh"
#include "dataplane/worker.hh"

namespace moat {

class CliServer;

// Tunnel ids by name: a tunnel's id is its place in Config::tunnels (the
// first of a name, were one to repeat). A portal has thousands of tunnels
// and looks one up for each route into it and each CHILD SA it installs.
using TunnelIds = std::unordered_map<std::string, uint32_t>;
TunnelIds index_tunnels(const std::vector<TunnelConfig>& tunnels);

// Routes as the operator sees them; mirrored into the workers' rte_lpm.
class RouteTable {
 public:
  enum class Origin : uint8_t { connected, local, config, cli };
  struct Route {
    Ipv4Prefix prefix;
    RouteType type = RouteType::unicast;
    NextHop::Kind kind = NextHop::gateway;
    uint32_t via = 0;
    uint16_t port = 0;
    Origin origin = Origin::config;
    uint32_t nh = 0;
  };

  // `tunnel_ids` indexes c.tunnels; whoever changes the list rebuilds it.
  RouteTable(Tables& t, const Config& c, const TunnelIds& tunnel_ids, const std::vector<PortState>& ports);
  // Adds or replaces a route. `port_name` may be empty when `via` is on a
  // connected subnet. Replacing keeps forwarding: the LPM entry is updated
  // in place, readers see the old or the new next hop.
  tl::expected<void, std::string> add(const Ipv4Prefix& p, RouteType type, uint32_t via,
                                      const std::string& port_name, Origin origin);
  tl::expected<void, std::string> del(const Ipv4Prefix& p, bool allow_connected = false);
  void add_connected(uint16_t port);
  void del_connected(uint16_t port, const Ipv4Prefix& old);
  void reclaim();  // next-hop slots whose grace period has passed become free
  const std::map<std::pair<uint32_t, uint8_t>, Route>& routes() const { return routes_; }
  std::string port_name(uint16_t port) const;

 private:
  uint32_t intern(NextHop::Kind kind, uint16_t port, uint32_t gw);
  void release(uint32_t idx);
  tl::expected<void, std::string> install(Route r);

  Tables& t_;
  const Config& c_;
  const TunnelIds& tunnel_ids_;
  const std::vector<PortState>& ports_;
  std::map<std::pair<uint32_t, uint8_t>, Route> routes_;
  std::map<std::tuple<uint8_t, uint16_t, uint32_t>, uint32_t> nh_index_;
  std::vector<uint32_t> nh_refs_;
  std::vector<uint32_t> nh_free_;
  std::vector<std::pair<uint64_t, uint32_t>> nh_deferred_;  // (RCU token, slot)
};

class Control {
 public:
  explicit Control(Config c);
  ~Control();
  // Builds pools, ports, tables, rings, TAPs and launches the workers.
  // Call after rte_eal_init.
  tl::expected<void, std::string> start();
  // The event loop; returns when `stop` becomes true.
  void run(const std::atomic<bool>& stop);
  // Stops workers, stops and closes ports (flushing pcap output).
  void shutdown();
  // How start() went: seconds spent reading the IKE tunnel directory, and
  // the tunnels it gave.
  double tunnel_files_seconds() const { return tunnel_files_s_; }
  size_t ike_tunnels() const { return ike_peers_.size(); }

  // Gives a port a new address at run time (a moat's ISP changed it):
  // connected routes, ARP entries, the punt TAP and the workers' port table
  // follow, and a gratuitous ARP announces it.
  tl::expected<void, std::string> set_address(const std::string& port, const Ipv4Prefix& a);

  // Compiles `rs` and publishes it to the workers (classifier/acl.hh).
  tl::expected<void, std::string> publish_rules(const RuleSet& rs);
  // Reads the rule tables from a config file and publishes them; on any
  // error the rules in force stay. Ports and zones must be unchanged.
  tl::expected<nlohmann::ordered_json, std::string> reload_rules(const std::string& path);
  // `moatctl ike reload`: the tunnels directory read again while everything
  // runs: new records become tunnels (routes, zone, SAs once IKE brings
  // them up), removed ones are torn down, changed ones apply to their next
  // IKE SA. A broken record is reported with file:line:col and its tunnel,
  // if it had one, keeps running as it was.
  tl::expected<nlohmann::ordered_json, std::string> reload_ike();
  nlohmann::ordered_json show_rules() const;
  // Connection tracking: counts and up to `limit` connections.
  nlohmann::ordered_json show_conntrack(size_t limit) const;

  // The SA lifecycle interface static SAs and IKE both use: install into the
  // SAD (an outbound SA becomes its tunnel's when the tunnel has none, else
  // replace_outbound switches make-before-break), remove.
  // `switch_outbound` false: a new outbound SA waits for switch_outbound()
  // when its tunnel already has one (IKE: after the peer can receive on it).
  tl::expected<uint32_t, std::string> install_sa(const SaConfig& sa, bool switch_outbound = true);
  tl::expected<void, std::string> remove_sa(uint32_t sa);
  tl::expected<void, std::string> switch_outbound(uint32_t tunnel, uint32_t sa);
  void set_sa_peer(uint32_t sa, uint32_t addr, uint16_t port, bool udp_encap);
  void set_sa_local(uint32_t sa, uint32_t addr);
  std::optional<uint32_t> tunnel_id(const std::string& name) const;
  // ESP in UDP that came in outer fragments and that the kernel reassembled
  // behind the punt path (the IKE socket got it): back to a worker as a
  // received UDP datagram from `src` to `dst`, to be decrypted there.
  void esp_reassembled(uint32_t dst, uint16_t dport, uint32_t src, uint16_t sport, const uint8_t* esp, size_t len);
  SaConfig tunnel_template(uint32_t tunnel) const;
  nlohmann::ordered_json show_tunnels() const;

  // QoS (ctrl/control_qos.cc): builds the shaping plans and meters from the
  // config and publishes them; on error the plans in force stay.
  tl::expected<void, std::string> publish_qos(const Config& c);
  // The class trees with their counters; `port` empty: every shaped port.
  tl::expected<nlohmann::ordered_json, std::string> show_qos(const std::string& port) const;

  nlohmann::ordered_json show_interfaces() const;
  nlohmann::ordered_json show_routes() const;
  nlohmann::ordered_json show_neighbors() const;
  nlohmann::ordered_json show_stats() const;

 private:
  uint64_t now_ms() const;
  void handle_punted(rte_mbuf* m);
  void arp_input(rte_mbuf* m);
  void to_tap(rte_mbuf* m);
  void from_taps();
  void apply(ArpTable::Actions& acts);
  void send_arp(uint16_t port, uint16_t op, uint32_t tip, const rte_ether_addr& dst_mac, const rte_ether_addr& tha);
  void inject(rte_mbuf* m, uint32_t flow_hash);
  void count(Drop why, uint64_t n = 1) { ctrl_stats_.drops[static_cast<unsigned>(why)].add(n); }
  void register_cli();
  uint16_t port_id(const std::string& name) const;

  Config c_;
  rte_mempool* pool_ = nullptr;
  rte_mempool* indirect_pool_ = nullptr;
  std::vector<PortState> ports_;          // index: position in c_.ports
  std::vector<int> port_cfg_;             // port id -> index in c_.ports, -1 if none
  Tables tables_;
  NextHop* next_hops_ = nullptr;
  PortTable* port_table_ = nullptr;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::atomic<bool> workers_stop_{false};
  bool workers_running_ = false;
  rte_ring* punt_ring_ = nullptr;
  std::unique_ptr<RouteTable> routes_;
  std::unique_ptr<ArpTable> arp_;
  std::vector<PuntTap> taps_;             // index: position in c_.ports (fd -1 when none)
  std::unique_ptr<CliServer> cli_;
  WorkerStats ctrl_stats_;                // drops the control thread counts
  uint64_t tap_rx_ = 0, tap_tx_ = 0;
  uint64_t tsc_hz_ = 0;
  uint64_t last_tick_ms_ = 0;
  void drain_sa_events();
  // Tunnels the IKE directory names that the config does not, in the order
  // of ike_slots_ (their ids): zone vpn, routes into them for their remote
  // funnels; a retired slot gets neither.
  void add_ike_tunnels(Config& c) const;
  std::vector<ike::PeerConfig> ike_peers_;
  std::vector<std::string> ike_slots_;  // IKE tunnel names in tunnel id order; never shrinks
  size_t static_tunnels_ = 0;           // tunnels from the config file: ids 0 .. static_tunnels_ - 1
  // c_.tunnels by name, for the IKE host and the route table: rebuilt
  // wherever c_.tunnels changes (start(), reload_ike()).
  TunnelIds tunnel_ids_;
  std::unique_ptr<class IkeHost> ike_;
  std::unique_ptr<Sad> sad_;
  std::vector<std::unique_ptr<EspWorker>> esp_workers_;
  std::vector<std::vector<uint32_t>> tunnel_sas_;  // SA indexes per tunnel id
  std::map<std::string, uint64_t> sa_events_;      // by kind, for show tunnels
  uint64_t last_sa_tick_s_ = 0;
  std::unique_ptr<Conntrack> conntrack_;    // what tables_.conntrack points to
  std::unique_ptr<Classifier> classifier_;  // what tables_.classifier points to
  RuleSet rules_;
  tl::expected<std::unique_ptr<QosTable>, std::string> build_qos(const Config& c);
  void install_qos(std::unique_ptr<QosTable> q);
  void forget_qos();  // at shutdown: no telemetry reader may see the table
  void sample_qos();  // once a second: each class's current rate
  std::unique_ptr<QosTable> qos_;  // what tables_.qos points to (when anything is shaped or policed)
  uint64_t qos_generation_ = 0;
  rte_ring* qos_rings_[kMaxPorts] = {};  // hand-off rings, kept across plans
  struct QosRate {
    uint64_t tsc = 0;
    std::vector<uint64_t> bytes;
    std::vector<double> bps;
  };
  std::map<uint16_t, QosRate> qos_rate_;
  uint64_t rules_generation_ = 0;
  uint64_t rules_build_us_ = 0;
  double tunnel_files_s_ = 0;
};

}  // namespace moat
