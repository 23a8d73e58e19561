#include "ctrl/control.hh"
#include "dataplane/eal_memory.hh"

#include <poll.h>
#include <unistd.h>

#include <rte_arp.h>
#include <rte_cycles.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_ip.h>
#include <rte_udp.h>
#include <rte_lcore.h>
#include <rte_malloc.h>
#include <rte_telemetry.h>

#include <fmt/format.h>

#include <chrono>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <cstring>
#include <set>
#include <unordered_set>

#include "ctrl/cli_server.hh"
#include "ctrl/ike/config.hh"
#include "ctrl/ike_host.hh"
#include "dataplane/egress.hh"
#include "dataplane/shape.hh"

namespace moat {

using json = nlohmann::ordered_json;

// ---------------------------------------------------------------- routes ---

TunnelIds index_tunnels(const std::vector<TunnelConfig>& tunnels) {
  TunnelIds ids;
  ids.reserve(tunnels.size());
  for (size_t i = 0; i < tunnels.size(); i++) ids.emplace(tunnels[i].name, uint32_t(i));
  return ids;
}

RouteTable::RouteTable(Tables& t, const Config& c, const TunnelIds& tunnel_ids, const std::vector<PortState>& ports)
    : t_(t), c_(c), tunnel_ids_(tunnel_ids), ports_(ports), nh_refs_(kMaxNextHops, 0) {
  // Slot 0 stays unused so a zeroed entry never looks like a valid next hop.
  for (uint32_t i = kMaxNextHops - 1; i >= 1; i--) nh_free_.push_back(i);
}

std::string RouteTable::port_name(uint16_t port) const {
  for (size_t i = 0; i < ports_.size(); i++)
    if (ports_[i].id == port) return c_.ports[i].name;
  return fmt::format("port{}", port);
}

uint32_t RouteTable::intern(NextHop::Kind kind, uint16_t port, uint32_t gw) {
  auto key = std::make_tuple(uint8_t(kind), port, gw);
  if (auto it = nh_index_.find(key); it != nh_index_.end()) {
    nh_refs_[it->second]++;
    return it->second;
  }
  reclaim();
  if (nh_free_.empty()) return 0;
  uint32_t idx = nh_free_.back();
  nh_free_.pop_back();
  // Written before any LPM entry points at it; rte_lpm_add publishes with
  // release ordering, so a worker that finds idx sees this entry whole.
  t_.next_hops[idx] = NextHop{kind, port, gw};
  nh_index_[key] = idx;
  nh_refs_[idx] = 1;
  return idx;
}

void RouteTable::release(uint32_t idx) {
  if (--nh_refs_[idx]) return;
  const NextHop& nh = t_.next_hops[idx];
  nh_index_.erase(std::make_tuple(uint8_t(nh.kind), nh.port, nh.gw));
  // A worker may still hold idx from a lookup made before the route went:
  // reuse the slot only after every worker has passed a quiescent point.
  nh_deferred_.emplace_back(rte_rcu_qsbr_start(t_.qsbr), idx);
}

void RouteTable::reclaim() {
  size_t kept = 0;
  for (auto& [token, idx] : nh_deferred_) {
    if (rte_rcu_qsbr_check(t_.qsbr, token, false) == 1) nh_free_.push_back(idx);
    else nh_deferred_[kept++] = {token, idx};
  }
  nh_deferred_.resize(kept);
}

tl::expected<void, std::string> RouteTable::install(Route r) {
  auto key = std::make_pair(r.prefix.addr, r.prefix.len);
  r.nh = intern(r.kind, r.port, r.via);
  if (!r.nh) return tl::unexpected(std::string("next-hop table full"));
  if (r.prefix.len == 0) {
    t_.default_nh.store(r.nh, std::memory_order_release);
  } else if (int rc = rte_lpm_add(t_.lpm, r.prefix.addr, r.prefix.len, r.nh); rc < 0) {
    release(r.nh);
    return tl::unexpected(fmt::format("route {}: LPM add failed: {} (table full?)", r.prefix.str(), strerror(-rc)));
  }
  t_.paths_changed();
  if (auto it = routes_.find(key); it != routes_.end()) {
    release(it->second.nh);
    it->second = r;
  } else {
    routes_.emplace(key, r);
  }
  return {};
}

tl::expected<void, std::string> RouteTable::add(const Ipv4Prefix& p, RouteType type, uint32_t via,
                                                const std::string& port_name, Origin origin) {
  Route r;
  r.prefix = p;
  r.type = type;
  r.origin = origin;
  if (auto it = routes_.find({p.addr, p.len});
      it != routes_.end() && (it->second.origin == Origin::connected || it->second.origin == Origin::local))
    return tl::unexpected(fmt::format("route {}: is a connected route owned by port {}", p.str(), RouteTable::port_name(it->second.port)));
  switch (type) {
    case RouteType::blackhole: r.kind = NextHop::blackhole; break;
    case RouteType::unreachable: r.kind = NextHop::unreachable; break;
    case RouteType::prohibit: r.kind = NextHop::prohibit; break;
    case RouteType::tunnel: {
      // `port_name` names the tunnel; its id is its place in the config.
      auto id = tunnel_ids_.find(port_name);
      if (id == tunnel_ids_.end()) return tl::unexpected(fmt::format("route {}: no tunnel named \"{}\"", p.str(), port_name));
      r.kind = NextHop::tunnel;
      r.port = uint16_t(id->second);
      break;
    }
    case RouteType::unicast: {
      int cfg = -1;
      if (!port_name.empty()) {
        for (size_t i = 0; i < c_.ports.size(); i++)
          if (c_.ports[i].name == port_name) cfg = int(i);
        if (cfg < 0) return tl::unexpected(fmt::format("route {}: no port named \"{}\"", p.str(), port_name));
      } else {
        for (size_t i = 0; i < c_.ports.size(); i++) {
          auto& a = c_.ports[i].address;
          if (!a) continue;
          uint32_t mask = ~uint32_t(0) << (32 - a->len);
          if ((a->addr & mask) == (via & mask)) cfg = int(i);
        }
        if (cfg < 0) return tl::unexpected(fmt::format("route {}: gateway {} is on no port's subnet", p.str(), ipv4_str(via)));
      }
      r.port = ports_[cfg].id;
      r.kind = via ? NextHop::gateway : NextHop::connected;
      r.via = via;
      break;
    }
  }
  return install(r);
}

tl::expected<void, std::string> RouteTable::del(const Ipv4Prefix& p, bool allow_connected) {
  auto it = routes_.find({p.addr, p.len});
  if (it == routes_.end()) return tl::unexpected(fmt::format("route {}: no such route", p.str()));
  if (!allow_connected && (it->second.origin == Origin::connected || it->second.origin == Origin::local))
    return tl::unexpected(fmt::format("route {}: is a connected route owned by port {}", p.str(), RouteTable::port_name(it->second.port)));
  // The LPM falls back to the covering prefix atomically: no packet meets a
  // gap between the old and the less specific route.
  if (p.len == 0) t_.default_nh.store(0, std::memory_order_release);
  else rte_lpm_delete(t_.lpm, p.addr, p.len);
  t_.paths_changed();
  release(it->second.nh);
  routes_.erase(it);
  return {};
}

void RouteTable::add_connected(uint16_t port) {
  int cfg = -1;
  for (size_t i = 0; i < ports_.size(); i++)
    if (ports_[i].id == port) cfg = int(i);
  if (cfg < 0 || !c_.ports[cfg].address) return;
  const Ipv4Prefix a = *c_.ports[cfg].address;
  uint32_t mask = ~uint32_t(0) << (32 - a.len);
  auto put = [&](Ipv4Prefix p, NextHop::Kind kind, Origin o) {
    Route r;
    r.prefix = p;
    r.kind = kind;
    r.port = port;
    r.origin = o;
    (void)install(r);
  };
  put({a.addr & mask, a.len}, NextHop::connected, Origin::connected);
  put({a.addr, 32}, NextHop::local, Origin::local);
  if (a.len <= 30) put({(a.addr & mask) | ~mask, 32}, NextHop::local_bcast, Origin::local);
  put({0xffffffff, 32}, NextHop::local_bcast, Origin::local);
}

void RouteTable::del_connected(uint16_t port, const Ipv4Prefix& a) {
  uint32_t mask = ~uint32_t(0) << (32 - a.len);
  (void)del({a.addr & mask, a.len}, true);
  (void)del({a.addr, 32}, true);
  if (a.len <= 30) (void)del({(a.addr & mask) | ~mask, 32}, true);
}

// --------------------------------------------------------------- control ---

namespace {

// rte_telemetry callbacks run on DPDK's telemetry thread; they only read
// the workers' relaxed counters. `/moat/drops` answers the summed drop
// counters by reason, `/moat/workers` per-worker rx/tx/punted, so
// dpdk-telemetry.py and metrics scrapers see what `moatctl show stats` shows.
const std::vector<std::unique_ptr<Worker>>* g_telemetry_workers = nullptr;
const WorkerStats* g_telemetry_ctrl = nullptr;

int telemetry_drops(const char*, const char*, rte_tel_data* d) {
  rte_tel_data_start_dict(d);
  if (!g_telemetry_workers) return 0;
  for (unsigned r = 0; r < kDropCount; r++) {
    uint64_t v = g_telemetry_ctrl ? g_telemetry_ctrl->drops[r].load() : 0;
    for (auto& w : *g_telemetry_workers) v += w->stats.drops[r].load();
    rte_tel_data_add_dict_u64(d, kDropNames[r], v);
  }
  return 0;
}

int telemetry_workers(const char*, const char*, rte_tel_data* d) {
  rte_tel_data_start_dict(d);
  if (!g_telemetry_workers) return 0;
  for (auto& w : *g_telemetry_workers) {
    std::string k = fmt::format("w{}_", w->id);
    rte_tel_data_add_dict_u64(d, (k + "rx").c_str(), w->stats.rx.load());
    rte_tel_data_add_dict_u64(d, (k + "tx").c_str(), w->stats.tx.load());
    rte_tel_data_add_dict_u64(d, (k + "punted").c_str(), w->stats.punted.load());
    rte_tel_data_add_dict_u64(d, (k + "icmp_sent").c_str(), w->stats.icmp_sent.load());
  }
  return 0;
}

}  // namespace

Control::Control(Config c) : c_(std::move(c)) {}

Control::~Control() { shutdown(); }

uint64_t Control::now_ms() const {
  return uint64_t(std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now().time_since_epoch())
                      .count());
}

uint16_t Control::port_id(const std::string& name) const {
  for (size_t i = 0; i < c_.ports.size(); i++)
    if (c_.ports[i].name == name) return ports_[i].id;
  return kNoPort;
}

void Control::add_ike_tunnels(Config& c) const {
  // Sets, not scans: a portal has thousands of tunnel files.
  std::unordered_map<std::string_view, const ike::PeerConfig*> peers;
  for (auto& p : ike_peers_) peers.emplace(p.name, &p);
  std::unordered_set<std::string_view> names;
  for (auto& t : c.tunnels) names.insert(t.name);
  std::set<std::pair<uint32_t, uint8_t>> prefixes;
  for (auto& r : c.routes) prefixes.emplace(r.prefix.addr, r.prefix.len);
  if (ike_slots_.empty()) return;
  auto z = std::find(c.rules.zones.begin(), c.rules.zones.end(), "vpn");
  if (z == c.rules.zones.end()) z = c.rules.zones.insert(z, "vpn");
  const uint8_t zone = uint8_t(z - c.rules.zones.begin());
  for (auto& name : ike_slots_) {
    if (names.count(name)) continue;  // a static tunnel of that name: IKE keys it
    TunnelConfig t;
    t.name = name;
    t.zone = "vpn";
    t.tmpl.tunnel = uint32_t(c.tunnels.size());
    auto it = peers.find(name);
    t.retired = it == peers.end();
    if (!t.retired)
      for (auto& ts : it->second->remote_ts)
        for (auto& [a, len] : ts.prefixes())
          if (a.is_v4() && len > 0) {
            RouteConfig r;
            uint32_t x;
            memcpy(&x, a.b.data(), 4);
            r.prefix = Ipv4Prefix{ntohl(x), len};
            r.type = RouteType::tunnel;
            r.tunnel = name;
            if (prefixes.emplace(r.prefix.addr, r.prefix.len).second) c.routes.push_back(r);
          }
    c.rules.tunnels.push_back(t.name);
    c.rules.tunnel_zone.push_back(zone);
    c.tunnels.push_back(std::move(t));
  }
}

tl::expected<void, std::string> Control::start() {
  tsc_hz_ = rte_get_tsc_hz();
  if (!c_.ike_dir.empty()) {
    // One file per moat; a broken record is reported and skipped, the others
    // come up (seed 000).
    // Read on every lcore's CPU: the workers do not poll yet.
    std::vector<cpu_set_t> cpus;
    unsigned lc;
    RTE_LCORE_FOREACH(lc) cpus.push_back(rte_lcore_cpuset(lc));
    auto t0 = std::chrono::steady_clock::now();
    auto dir = ike::load_tunnel_dir(c_.ike_dir, cpus);
    tunnel_files_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (auto& e : dir.errors) fmt::print(stderr, "moatd: {}\n", e.str());
    ike_peers_ = std::move(dir.tunnels);
    for (auto& p : ike_peers_) ike_slots_.push_back(p.name);
    static_tunnels_ = c_.tunnels.size();
    add_ike_tunnels(c_);
  }
  tunnel_ids_ = index_tunnels(c_.tunnels);
  unsigned nworkers = c_.workers();
  if (nworkers == 0) return tl::unexpected(std::string("eal.lcores: no worker lcore"));
  if (rte_lcore_count() != nworkers + 1)
    return tl::unexpected(fmt::format("EAL started {} lcores, the config lists {}", rte_lcore_count(), nworkers + 1));

  // Without hugepages the packet pool gets huge pages of its own (why: in
  // dataplane/eal_memory.hh); if that fails it stays in EAL memory, which
  // eal.memory_mb sizes for it.
  auto make_pool = [&](int socket) {
    return rte_pktmbuf_pool_create("moat_pool", c_.mbufs, c_.mbuf_cache, kMbufPrivSize, RTE_MBUF_DEFAULT_BUF_SIZE,
                                   socket);
  };
  if (!rte_eal_has_hugepages()) {
    constexpr const char* kHeap = "moat_packets";
    auto heap = huge_page_heap(kHeap, pktmbuf_pool_bytes(c_.mbufs, kMbufPrivSize, RTE_MBUF_DEFAULT_BUF_SIZE));
    if (heap && !(pool_ = make_pool(heap->socket))) {
      std::string why = fmt::format("mempool of {} mbufs on it: {}", c_.mbufs, rte_strerror(rte_errno));
      release_huge_page_heap(kHeap, *heap);
      heap = tl::unexpected(std::move(why));
    }
    if (!heap) fmt::print(stderr, "moatd: warning: packet pool on huge pages: {}; it stays in EAL memory\n", heap.error());
  }
  if (!pool_) pool_ = make_pool(int(rte_socket_id()));
  if (!pool_) return tl::unexpected(fmt::format("mempool of {} mbufs: {} (raise eal.memory_mb?)", c_.mbufs, rte_strerror(rte_errno)));
  // Fragments reference the original's data through indirect mbufs.
  indirect_pool_ = rte_pktmbuf_pool_create("moat_indirect", c_.mbufs, c_.mbuf_cache, kMbufPrivSize, 0, rte_socket_id());
  if (!indirect_pool_) return tl::unexpected(fmt::format("indirect mempool: {}", rte_strerror(rte_errno)));

  port_cfg_.assign(kMaxPorts, -1);
  for (auto& pc : c_.ports) {
    PortSetup s;
    s.name = pc.name;
    s.device = pc.device;
    s.rx_queues = pc.rx_queues;
    s.tx_queues = uint16_t(nworkers);
    s.rx_ring = pc.rx_ring;
    s.tx_ring = pc.tx_ring;
    s.mtu = pc.mtu;
    s.mac = pc.mac;
    auto st = port_start(s, pool_);
    if (!st) return tl::unexpected(st.error());
    port_cfg_[st->id] = int(ports_.size());
    ports_.push_back(*st);
  }

  // RCU: one reader id per worker.
  size_t qsz = rte_rcu_qsbr_get_memsize(nworkers);
  tables_.qsbr = static_cast<rte_rcu_qsbr*>(rte_zmalloc("moat_qsbr", qsz, RTE_CACHE_LINE_SIZE));
  if (!tables_.qsbr || rte_rcu_qsbr_init(tables_.qsbr, nworkers) != 0) return tl::unexpected(std::string("RCU init failed"));

  rte_lpm_config lc{};
  lc.max_rules = c_.max_routes;
  lc.number_tbl8s = 1 << 12;
  tables_.lpm = rte_lpm_create("moat_routes", rte_socket_id(), &lc);
  if (!tables_.lpm) return tl::unexpected(fmt::format("route table: {} (raise eal.memory_mb: it needs 64 MiB+)", rte_strerror(rte_errno)));
  rte_lpm_rcu_config lrc{};
  lrc.v = tables_.qsbr;
  lrc.mode = RTE_LPM_QSBR_MODE_DQ;
  if (rte_lpm_rcu_qsbr_add(tables_.lpm, &lrc) != 0) return tl::unexpected(std::string("route table: RCU attach failed"));

  next_hops_ = static_cast<NextHop*>(rte_zmalloc("moat_nh", sizeof(NextHop) * kMaxNextHops, RTE_CACHE_LINE_SIZE));
  if (!next_hops_) return tl::unexpected(std::string("next-hop table: out of memory"));
  tables_.next_hops = next_hops_;

  rte_hash_parameters hp{};
  hp.name = "moat_neigh";
  hp.entries = std::max(c_.arp_max_entries * 2, 64u);
  hp.key_len = sizeof(NeighKey);
  hp.socket_id = int(rte_socket_id());
  hp.extra_flag = RTE_HASH_EXTRA_FLAGS_RW_CONCURRENCY_LF;
  tables_.neigh = rte_hash_create(&hp);
  if (!tables_.neigh) return tl::unexpected(fmt::format("neighbour table: {}", rte_strerror(rte_errno)));
  rte_hash_rcu_config hrc{};
  hrc.v = tables_.qsbr;
  hrc.mode = RTE_HASH_QSBR_MODE_DQ;
  if (rte_hash_rcu_qsbr_add(tables_.neigh, &hrc) != 0) return tl::unexpected(std::string("neighbour table: RCU attach failed"));

  port_table_ = new PortTable();
  for (size_t i = 0; i < ports_.size(); i++) {
    PortInfo& pi = port_table_->port[ports_[i].id];
    const PortConfig& pc = c_.ports[i];
    pi.configured = true;
    pi.mac = ports_[i].mac;
    if (pc.address) {
      pi.addr = pc.address->addr;
      pi.plen = pc.address->len;
    }
    pi.mtu = pc.mtu;
    pi.vlan = pc.vlan;
    pi.punt = c_.punt_enabled && pc.punt;
    pi.zone = i < c_.port_zone.size() ? c_.port_zone[i] : 0;
    pi.key = uint8_t(i);
  }
  tables_.ports.store(port_table_, std::memory_order_release);
  // The connection table: the stateful filter and NAT live in it. It is
  // made even without a policy so `rules reload` can add one later; the
  // workers consult it only while a rule set is published.
  {
    auto ct = Conntrack::create(c_.conntrack, tables_.qsbr, nworkers, tsc_hz_, "moat_ct");
    if (!ct) return tl::unexpected(ct.error() + " (lower conntrack.max_connections or raise eal.memory_mb)");
    conntrack_ = std::move(*ct);
    tables_.conntrack = conntrack_.get();
  }
  if (c_.has_policy)
    if (auto ok = publish_rules(c_.rules); !ok) return tl::unexpected("rules: " + ok.error());
  tables_.punt_enabled = c_.punt_enabled;
  g_tables = &tables_;

  routes_ = std::make_unique<RouteTable>(tables_, c_, tunnel_ids_, ports_);
  for (auto& p : ports_) routes_->add_connected(p.id);
  for (auto& r : c_.routes)
    if (auto ok = routes_->add(r.prefix, r.type, r.via, r.type == RouteType::tunnel ? r.tunnel : r.port, RouteTable::Origin::config); !ok)
      return tl::unexpected(fmt::format("{}:{}: {}", c_.path, r.line, ok.error()));

  ArpParams ap;
  ap.reachable_ms = c_.arp_reachable_s * 1000;
  ap.retry_ms = c_.arp_retry_ms;
  ap.max_retries = c_.arp_max_retries;
  ap.hold_packets = c_.arp_hold_packets;
  ap.max_entries = c_.arp_max_entries;
  arp_ = std::make_unique<ArpTable>(ap);
  ArpTable::Actions acts;
  for (auto& n : c_.neighbors) arp_->add_fixed(NeighKey{n.ip, port_id(n.port)}, n.mac, acts);
  apply(acts);

  taps_.resize(c_.ports.size());
  if (c_.punt_enabled) {
    bool default_route = true;
    for (size_t i = 0; i < c_.ports.size(); i++) {
      const PortConfig& pc = c_.ports[i];
      if (!pc.punt) continue;
      auto ok = taps_[i].open(pc.name, ports_[i].mac, pc.address ? pc.address->addr : 0,
                              pc.address ? pc.address->len : 0, pc.mtu, c_.punt_netns, default_route);
      if (!ok) return tl::unexpected(ok.error());
      default_route = false;
    }
  }

  punt_ring_ = rte_ring_create("moat_punt", rte_align32pow2(c_.punt_ring), rte_socket_id(), RING_F_SC_DEQ);
  if (!punt_ring_) return tl::unexpected(fmt::format("punt ring: {}", rte_strerror(rte_errno)));

  cli_ = std::make_unique<CliServer>(c_.socket);
  if (auto ok = cli_->open(); !ok) return tl::unexpected(ok.error());
  register_cli();

  // The SAD and the static SAs of the config's tunnels.
  // One SaTraffic array per worker: worker ids are 0..nworkers-1 (below).
  auto sad = Sad::create("moat", std::max<uint32_t>(c_.max_sas, uint32_t(c_.tunnels.size()) + 1), tables_.qsbr,
                         nworkers);
  if (!sad) return tl::unexpected("SAD: " + sad.error());
  sad_.reset(*sad);
  tables_.sad = sad_.get();
  tunnel_sas_.assign(c_.tunnels.size(), {});
  for (auto& t : c_.tunnels)
    for (auto& sa : t.sas)
      if (auto ok = install_sa(sa); !ok) return tl::unexpected(fmt::format("{}:{}: {}", c_.path, t.line, ok.error()));

  if (auto ok = publish_qos(c_); !ok) return tl::unexpected(ok.error());

  // Workers: each polls a share of the RX queues and owns TX queue `id` on
  // every port.
  unsigned id = 0;
  unsigned lcore;
  RTE_LCORE_FOREACH_WORKER(lcore) {
    auto w = std::make_unique<Worker>();
    w->id = id;
    w->lcore = lcore;
    w->burst = c_.burst;
    w->idle_sleep_us = c_.idle_sleep_us;
    w->punt_ring = punt_ring_;
    w->inject_ring = rte_ring_create(fmt::format("moat_inject{}", id).c_str(), rte_align32pow2(c_.inject_ring),
                                     rte_socket_id(), RING_F_SP_ENQ | RING_F_SC_DEQ);
    if (!w->inject_ring) return tl::unexpected(fmt::format("inject ring: {}", rte_strerror(rte_errno)));
    w->direct_pool = pool_;
    w->indirect_pool = indirect_pool_;
    w->stop = &workers_stop_;
    w->icmp_limiter.configure(c_.icmp_rate_pps, c_.icmp_burst, tsc_hz_);
    auto ew = std::make_unique<EspWorker>();
    if (auto ok = esp_worker_init(*ew, fmt::format("w{}", id)); !ok) return tl::unexpected(ok.error());
    w->esp = ew.get();
    esp_workers_.push_back(std::move(ew));
    workers_.push_back(std::move(w));
    id++;
  }
  for (auto& p : ports_)
    for (uint16_t q = 0; q < p.rx_queues; q++) workers_[q % workers_.size()]->rxq.push_back({p.id, q});
  for (auto& w : workers_)
    if (rte_eal_remote_launch(worker_main, w.get(), w->lcore) != 0)
      return tl::unexpected(fmt::format("cannot launch worker on lcore {}", w->lcore));
  workers_running_ = true;
  g_telemetry_workers = &workers_;
  g_telemetry_ctrl = &ctrl_stats_;
  rte_telemetry_register_cmd("/moat/drops", telemetry_drops, "Moat drop counters by reason, all workers summed");
  rte_telemetry_register_cmd("/moat/workers", telemetry_workers, "Moat per-worker rx, tx, punted, icmp_sent");

  // Gratuitous ARP: neighbours replace any stale MAC they had for us.
  for (size_t i = 0; i < ports_.size(); i++)
    if (c_.ports[i].address) send_arp(ports_[i].id, RTE_ARP_OP_REQUEST, c_.ports[i].address->addr, {}, {});
  last_tick_ms_ = now_ms();
  if (!c_.ike_dir.empty()) {
    ike_ = std::make_unique<IkeHost>(*this);
    if (auto ok = ike_->start(ike_peers_, c_.punt_netns, ike::UdpDriver::now_ms()); !ok)
      return tl::unexpected(c_.ike_dir + ": " + ok.error());
  }
  return {};
}

void Control::inject(rte_mbuf* m, uint32_t flow_hash) {
  Worker& w = *workers_[flow_hash % workers_.size()];
  if (rte_ring_enqueue(w.inject_ring, m) != 0) {
    count(Drop::punt_full);
    rte_pktmbuf_free(m);
  }
}

void Control::esp_reassembled(uint32_t dst, uint16_t dport, uint32_t src, uint16_t sport, const uint8_t* esp,
                              size_t len) {
  // Why through the kernel: a worker cannot tell an ESP fragment from an IKE
  // one (only the first fragment has the UDP header, and a large IKE
  // message must reach the kernel's socket whole), so UDP fragments for us
  // go to the punt path and come back here once whole. Rare by design: it
  // takes a path MTU below what the peer sends.
  rte_mbuf* m = rte_pktmbuf_alloc(pool_);
  const size_t frame = sizeof(rte_ether_hdr) + sizeof(rte_ipv4_hdr) + sizeof(rte_udp_hdr) + len;
  if (!m || frame > rte_pktmbuf_tailroom(m) || len > 0xffff - sizeof(rte_ipv4_hdr) - sizeof(rte_udp_hdr)) {
    if (m) rte_pktmbuf_free(m);
    count(Drop::esp_no_room);
    return;
  }
  auto* eth = reinterpret_cast<rte_ether_hdr*>(rte_pktmbuf_append(m, uint16_t(frame)));
  std::memset(eth, 0, sizeof *eth);
  eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
  auto* ip = reinterpret_cast<rte_ipv4_hdr*>(eth + 1);
  std::memset(ip, 0, sizeof *ip);
  ip->version_ihl = 0x45;
  ip->total_length = rte_cpu_to_be_16(uint16_t(frame - sizeof(rte_ether_hdr)));
  ip->time_to_live = 64;
  ip->next_proto_id = IPPROTO_UDP;
  ip->src_addr = rte_cpu_to_be_32(src);
  ip->dst_addr = rte_cpu_to_be_32(dst);
  ip->hdr_checksum = rte_ipv4_cksum(ip);
  auto* udp = reinterpret_cast<rte_udp_hdr*>(ip + 1);
  udp->src_port = rte_cpu_to_be_16(sport);
  udp->dst_port = rte_cpu_to_be_16(dport);
  udp->dgram_len = rte_cpu_to_be_16(uint16_t(sizeof(rte_udp_hdr) + len));
  udp->dgram_cksum = 0;  // RFC 3948 §2.1: ESP in UDP needs none
  std::memcpy(udp + 1, esp, len);
  PktMeta& md = meta(m);
  md = PktMeta{};
  md.l3_off = sizeof(rte_ether_hdr);
  md.in_port = kNoPort;
  for (size_t i = 0; i < c_.ports.size(); i++)
    if (c_.ports[i].address && c_.ports[i].address->addr == dst) md.in_port = ports_[i].id;
  md.out_port = kNoPort;
  md.inject = Inject::esp;
  inject(m, src);
}

void Control::send_arp(uint16_t port, uint16_t op, uint32_t tip, const rte_ether_addr& dst_mac,
                       const rte_ether_addr& tha) {
  const PortInfo& pi = tables_.ports.load()->port[port];
  rte_mbuf* m = rte_pktmbuf_alloc(pool_);
  if (!m) return;
  auto* a = reinterpret_cast<rte_arp_hdr*>(rte_pktmbuf_append(m, sizeof(rte_ether_hdr) + sizeof(rte_arp_hdr)) +
                                           sizeof(rte_ether_hdr));
  a->arp_hardware = rte_cpu_to_be_16(RTE_ARP_HRD_ETHER);
  a->arp_protocol = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
  a->arp_hlen = RTE_ETHER_ADDR_LEN;
  a->arp_plen = 4;
  a->arp_opcode = rte_cpu_to_be_16(op);
  a->arp_data.arp_sha = pi.mac;
  a->arp_data.arp_sip = rte_cpu_to_be_32(pi.addr);
  a->arp_data.arp_tha = tha;
  a->arp_data.arp_tip = rte_cpu_to_be_32(tip);
  PktMeta& md = meta(m);
  md = PktMeta{};
  md.l3_off = sizeof(rte_ether_hdr);
  md.in_port = kNoPort;
  md.out_port = port;
  md.inject = Inject::tx;
  rte_ether_addr dst = dst_mac;
  if (rte_is_zero_ether_addr(&dst)) std::memset(dst.addr_bytes, 0xff, 6);
  write_l2(m, pi, dst, RTE_ETHER_TYPE_ARP);
  inject(m, tip);
}

void Control::apply(ArpTable::Actions& acts) {
  for (auto& a : acts) {
    switch (a.kind) {
      case ArpTable::Action::request_broadcast:
        send_arp(a.key.port, RTE_ARP_OP_REQUEST, a.key.ip, {}, {});
        break;
      case ArpTable::Action::request_unicast:
        send_arp(a.key.port, RTE_ARP_OP_REQUEST, a.key.ip, a.mac, {});
        break;
      case ArpTable::Action::publish:
        // One atomic store of the data pointer: readers see old or new MAC.
        rte_hash_add_key_data(tables_.neigh, &a.key, reinterpret_cast<void*>(uintptr_t(pack_mac(a.mac))));
        tables_.paths_changed();
        break;
      case ArpTable::Action::withdraw:
        rte_hash_del_key(tables_.neigh, &a.key);
        tables_.paths_changed();
        break;
      case ArpTable::Action::release:
        for (void* p : a.pkts) {
          auto* m = static_cast<rte_mbuf*>(p);
          // Through the egress stage, not straight to tx: it may need fragments.
          meta(m).inject = Inject::egress;
          inject(m, meta(m).nh_ip);
        }
        break;
      case ArpTable::Action::fail:
        for (void* p : a.pkts) {
          // A worker turns it into ICMP host unreachable (rate limit and
          // RFC 1812 checks live there) and counts the drop.
          auto* m = static_cast<rte_mbuf*>(p);
          meta(m).inject = Inject::unreachable;
          inject(m, meta(m).nh_ip);
        }
        break;
      case ArpTable::Action::drop:
        for (void* p : a.pkts) {
          count(std::string_view(a.why) == "arp_table_full" ? Drop::arp_table_full
                : std::string_view(a.why) == "arp_failed"   ? Drop::arp_failed
                                                            : Drop::arp_hold_full);
          rte_pktmbuf_free(static_cast<rte_mbuf*>(p));
        }
        break;
    }
  }
  acts.clear();
}

void Control::arp_input(rte_mbuf* m) {
  PktMeta& md = meta(m);
  uint16_t port = md.in_port;
  const PortInfo& pi = tables_.ports.load()->port[port];
  auto* a = rte_pktmbuf_mtod_offset(m, rte_arp_hdr*, md.l3_off);
  if (a->arp_hardware != rte_cpu_to_be_16(RTE_ARP_HRD_ETHER) || a->arp_protocol != rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4) ||
      a->arp_hlen != 6 || a->arp_plen != 4) {
    count(Drop::arp_malformed);
    rte_pktmbuf_free(m);
    return;
  }
  uint16_t op = rte_be_to_cpu_16(a->arp_opcode);
  uint32_t sip = rte_be_to_cpu_32(a->arp_data.arp_sip);
  uint32_t tip = rte_be_to_cpu_32(a->arp_data.arp_tip);
  rte_ether_addr sha = a->arp_data.arp_sha;
  if ((op != RTE_ARP_OP_REQUEST && op != RTE_ARP_OP_REPLY) || !rte_is_unicast_ether_addr(&sha) || sip == pi.addr) {
    count(Drop::arp_malformed);
    rte_pktmbuf_free(m);
    return;
  }
  ArpTable::Actions acts;
  bool for_us = op == RTE_ARP_OP_REQUEST && pi.addr && tip == pi.addr;
  bool known = sip != 0 && arp_->learn(NeighKey{sip, port}, sha, now_ms(), acts, for_us);
  apply(acts);
  if (for_us) {
    // Answer in the same buffer: swap roles, our MAC as the sender.
    a->arp_opcode = rte_cpu_to_be_16(RTE_ARP_OP_REPLY);
    a->arp_data.arp_tha = sha;
    a->arp_data.arp_tip = rte_cpu_to_be_32(sip);
    a->arp_data.arp_sha = pi.mac;
    a->arp_data.arp_sip = rte_cpu_to_be_32(pi.addr);
    md.out_port = port;
    md.inject = Inject::tx;
    write_l2(m, pi, sha, RTE_ETHER_TYPE_ARP);
    inject(m, sip);
    return;
  }
  // A request for someone else still refreshed its sender if we knew it;
  // the frame itself ends here either way.
  if (op == RTE_ARP_OP_REQUEST) count(Drop::arp_not_for_us);
  else if (!known) count(Drop::arp_unsolicited);
  rte_pktmbuf_free(m);
}

void Control::to_tap(rte_mbuf* m) {
  PktMeta& md = meta(m);
  int cfg = md.in_port < kMaxPorts ? port_cfg_[md.in_port] : -1;
  if (cfg < 0 || taps_[cfg].fd() < 0) {
    count(Drop::punt_no_tap);
    rte_pktmbuf_free(m);
    return;
  }
  // The kernel side is untagged: drop an 802.1Q tag by moving the MACs.
  uint8_t frame[RTE_ETHER_MAX_JUMBO_FRAME_LEN];
  uint32_t len = rte_pktmbuf_pkt_len(m) - md.l3_off;
  if (len + sizeof(rte_ether_hdr) > sizeof(frame)) {
    count(Drop::punt_full);
    rte_pktmbuf_free(m);
    return;
  }
  auto* eth = reinterpret_cast<rte_ether_hdr*>(frame);
  std::memcpy(eth, rte_pktmbuf_mtod(m, void*), 12);
  eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
  rte_pktmbuf_read(m, md.l3_off, len, frame + sizeof(rte_ether_hdr));
  const void* data = rte_pktmbuf_read(m, md.l3_off, len, frame + sizeof(rte_ether_hdr));
  if (data != frame + sizeof(rte_ether_hdr)) std::memcpy(frame + sizeof(rte_ether_hdr), data, len);
  if (write(taps_[cfg].fd(), frame, len + sizeof(rte_ether_hdr)) < 0) count(Drop::punt_full);
  else tap_tx_++;
  rte_pktmbuf_free(m);
}

void Control::from_taps() {
  const PortTable& pt = *tables_.ports.load();
  for (size_t i = 0; i < taps_.size(); i++) {
    int fd = taps_[i].fd();
    if (fd < 0) continue;
    for (int k = 0; k < 64; k++) {
      rte_mbuf* m = rte_pktmbuf_alloc(pool_);
      if (!m) return;
      char* buf = rte_pktmbuf_mtod(m, char*);
      ssize_t n = read(fd, buf, rte_pktmbuf_tailroom(m));
      if (n <= 0) {
        rte_pktmbuf_free(m);
        break;
      }
      m->data_len = m->pkt_len = uint32_t(n);
      auto* eth = reinterpret_cast<rte_ether_hdr*>(buf);
      if (n < int(sizeof(rte_ether_hdr) + sizeof(rte_ipv4_hdr)) || eth->ether_type != rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4)) {
        rte_pktmbuf_free(m);  // IPv6 or ARP noise from the kernel: Moat owns ARP
        continue;
      }
      tap_rx_++;
      auto* ip = reinterpret_cast<rte_ipv4_hdr*>(eth + 1);
      uint32_t dst = rte_be_to_cpu_32(ip->dst_addr);
      PktMeta& md = meta(m);
      md = PktMeta{};
      md.l3_off = sizeof(rte_ether_hdr);
      md.in_port = kNoPort;
      md.generated = 1;  // locally originated: no TTL decrement, no ICMP errors about it
      const PortInfo& pi = pt.port[ports_[i].id];
      uint32_t mask = pi.plen ? ~uint32_t(0) << (32 - pi.plen) : 0;
      bool bcast = dst == 0xffffffff || (pi.addr && pi.plen <= 30 && dst == ((pi.addr & mask) | ~mask));
      if (bcast) {
        // A local service broadcasting (DHCP offers): out of its own port only.
        rte_ether_addr all;
        std::memset(all.addr_bytes, 0xff, 6);
        md.out_port = ports_[i].id;
        md.inject = Inject::tx;
        write_l2(m, pi, all, RTE_ETHER_TYPE_IPV4);
      } else {
        md.inject = Inject::route;
      }
      inject(m, dst);
    }
  }
}

void Control::handle_punted(rte_mbuf* m) {
  PktMeta& md = meta(m);
  switch (md.punt) {
    case Punt::arp:
      arp_input(m);
      return;
    case Punt::local:
    case Punt::broadcast:
      to_tap(m);
      return;
    case Punt::resolve: {
      ArpTable::Actions acts;
      arp_->resolve(NeighKey{md.nh_ip, md.out_port}, m, now_ms(), acts);
      apply(acts);
      return;
    }
    default:
      count(Drop::inject_bad);
      rte_pktmbuf_free(m);
  }
}

void Control::run(const std::atomic<bool>& stop) {
  std::vector<pollfd> fds;
  while (!stop.load()) {
    fds.clear();
    fds.push_back(pollfd{cli_->fd(), POLLIN, 0});
    for (auto& t : taps_)
      if (t.fd() >= 0) fds.push_back(pollfd{t.fd(), POLLIN, 0});
    // The punt ring has no file descriptor: wake every millisecond for it.
    poll(fds.data(), fds.size(), 1);
    cli_->poll_once();
    from_taps();
    if (ike_) ike_->poll();
    // Bounded per pass: a flood of punted packets (ARP storms, broadcasts)
    // must not starve the control socket or the ARP timers.
    rte_mbuf* pkts[256];
    for (int round = 0; round < 8; round++) {
      unsigned n = rte_ring_dequeue_burst(punt_ring_, reinterpret_cast<void**>(pkts), 256, nullptr);
      for (unsigned i = 0; i < n; i++) handle_punted(pkts[i]);
      if (n < 256) break;
    }
    uint64_t now = now_ms();
    if (now - last_tick_ms_ >= 10) {
      last_tick_ms_ = now;
      ArpTable::Actions acts;
      arp_->tick(now, acts);
      apply(acts);
      routes_->reclaim();
      if (now / 1000 != last_sa_tick_s_) {
        last_sa_tick_s_ = now / 1000;
        sad_->tick(last_sa_tick_s_);
        sample_qos();
      }
      sad_->reclaim();
      drain_sa_events();
      if (conntrack_) {
        // Expiry without stopping anyone: a slice of the table per tick,
        // the whole table about once a second; entries return to the free
        // ring only after every worker passed a quiescent point.
        conntrack_->sweep(rte_get_tsc_cycles(), std::max(1024u, conntrack_->capacity() / 100));
        conntrack_->reclaim();
      }
    }
  }
}

void Control::shutdown() {
  g_telemetry_workers = nullptr;
  g_telemetry_ctrl = nullptr;
  if (workers_running_) {
    workers_stop_.store(true);
    rte_eal_mp_wait_lcore();
    workers_running_ = false;
  }
  for (auto& p : ports_) {
    rte_eth_dev_stop(p.id);
    rte_eth_dev_close(p.id);
  }
  ports_.clear();
  cli_.reset();
  ike_.reset();
  for (auto& ew : esp_workers_) esp_worker_fini(*ew);
  esp_workers_.clear();
  tables_.sad = nullptr;
  sad_.reset();
  tables_.ports.store(nullptr);
  delete port_table_;
  port_table_ = nullptr;
  tables_.classifier.store(nullptr);
  classifier_.reset();
  tables_.conntrack = nullptr;
  conntrack_.reset();
  // Packets still queued in the schedulers go with the mempools.
  tables_.qos.store(nullptr);
  forget_qos();
  for (auto& r : qos_rings_) {
    rte_ring_free(r);
    r = nullptr;
  }
}

std::optional<uint32_t> Control::tunnel_id(const std::string& name) const {
  auto it = tunnel_ids_.find(name);
  if (it == tunnel_ids_.end()) return std::nullopt;
  return it->second;
}

SaConfig Control::tunnel_template(uint32_t tunnel) const { return c_.tunnels.at(tunnel).tmpl; }

void Control::set_sa_peer(uint32_t sa, uint32_t addr, uint16_t port, bool udp_encap) {
  if (auto ok = sad_->set_peer(sa, addr, port, udp_encap); !ok) fmt::print(stderr, "moatd: {}\n", ok.error());
}

void Control::set_sa_local(uint32_t sa, uint32_t addr) {
  if (auto ok = sad_->set_local(sa, addr); !ok) fmt::print(stderr, "moatd: {}\n", ok.error());
}

tl::expected<void, std::string> Control::switch_outbound(uint32_t tunnel, uint32_t sa) {
  uint32_t previous = sad_->tunnel_sa(tunnel);
  if (previous == sa) return {};
  if (auto r = sad_->replace_outbound(tunnel, sa); !r) return tl::unexpected(r.error());
  if (previous != kNoSa && tunnel < tunnel_sas_.size()) std::erase(tunnel_sas_[tunnel], previous);
  return {};
}

tl::expected<uint32_t, std::string> Control::install_sa(const SaConfig& sa, bool switch_now) {
  if (sa.tunnel >= tunnel_sas_.size()) return tl::unexpected(fmt::format("SA {}: no tunnel {}", sa.name, sa.tunnel));
  uint32_t previous = sad_->tunnel_sa(sa.tunnel);
  auto idx = sad_->add_sa(sa, now_ms() / 1000);
  if (!idx) return idx;
  if (!switch_now) {
    tunnel_sas_[sa.tunnel].push_back(*idx);
    return idx;
  }
  // Make-before-break: the new outbound SA is complete before the tunnel
  // points at it; the old one is retired only after that one store.
  if (sa.dir == SaDir::outbound && previous != kNoSa)
    if (auto r = sad_->replace_outbound(sa.tunnel, *idx); !r) return tl::unexpected(r.error());
  auto& list = tunnel_sas_[sa.tunnel];
  if (sa.dir == SaDir::outbound && previous != kNoSa) std::erase(list, previous);
  list.push_back(*idx);
  return idx;
}

tl::expected<void, std::string> Control::remove_sa(uint32_t sa) {
  const SaConfig* c = sad_->config(sa);
  if (!c) return tl::unexpected(fmt::format("no SA {}", sa));
  uint32_t tunnel = c->tunnel;
  if (auto ok = sad_->delete_sa(sa); !ok) return ok;
  if (tunnel < tunnel_sas_.size()) std::erase(tunnel_sas_[tunnel], sa);
  return {};
}

void Control::drain_sa_events() {
  SaEvent ev[64];
  for (int round = 0; round < 4; round++) {
    unsigned n = sad_->events(ev, 64);
    for (unsigned i = 0; i < n; i++) {
      const SaEvent& e = ev[i];
      sa_events_[sa_event_name(e.kind)]++;
      if (e.kind == SaEventKind::unknown_spi && ike_) ike_->unknown_spi(e.spi, e.addr);
      // The unknown-SPI signal (seed 003 §6.1: a peer that lost its state)
      // is rate-limited per source by the workers; IKE acts on it.
      fmt::print(stderr, "moatd: SA event {} SPI 0x{:08x} {} {}\n", sa_event_name(e.kind), e.spi,
                 e.kind == SaEventKind::unknown_spi ? "from" : "peer", ipv4_str(e.addr));
    }
    if (n < 64) break;
  }
}

json Control::show_tunnels() const {
  json out = json::array();
  uint64_t now = rte_rdtsc();
  for (size_t t = 0; t < c_.tunnels.size(); t++) {
    const TunnelConfig& tc = c_.tunnels[t];
    if (tc.retired) continue;
    json o;
    o["tunnel"] = tc.name;
    o["zone"] = tc.zone;
    uint32_t out_sa = sad_->tunnel_sa(uint32_t(t));
    o["state"] = out_sa == kNoSa ? "down" : "up";
    json sas = json::array();
    uint64_t pkts_out = 0, pkts_in = 0, bytes_out = 0, bytes_in = 0, drops = 0, gaps = 0, late = 0, seen = 0;
    uint64_t last = 0;
    for (uint32_t i : tunnel_sas_[t]) {
      SaStats s = sad_->stats(i);
      bool in = s.dir == SaDir::inbound;
      (in ? pkts_in : pkts_out) += s.packets;
      (in ? bytes_in : bytes_out) += s.bytes;
      drops += s.drops_total;
      if (in) gaps += s.gaps, late += s.late, seen += s.packets;
      last = std::max(last, s.last_tsc);
      json x;
      x["spi"] = fmt::format("0x{:08x}", s.spi);
      x["dir"] = in ? "in" : "out";
      x["cipher"] = cipher_name(s.cipher);
      x["peer"] = fmt::format("{}:{}", ipv4_str(s.peer), s.peer_port);
      x["packets"] = s.packets;
      x["bytes"] = s.bytes;
      if (in) {
        x["gaps"] = s.gaps;
        x["late"] = s.late;
        x["dups"] = s.dups;
        x["auth_fail"] = s.auth_fail;
        x["loss"] = s.loss_estimate;
      }
      x["drops"] = s.drops_total;
      sas.push_back(x);
    }
    o["packets_out"] = pkts_out;
    o["bytes_out"] = bytes_out;
    o["packets_in"] = pkts_in;
    o["bytes_in"] = bytes_in;
    o["drops"] = drops;
    // Seed 000: the ESP sequence number tells loss inside the tunnel apart
    // from loss above it. Sequence numbers skipped and never filled in.
    uint64_t lost = gaps > late ? gaps - late : 0;
    o["loss"] = seen + lost ? double(lost) / double(seen + lost) : 0.0;
    o["last_packet_s"] = last ? json(double(now - last) / double(tsc_hz_)) : json(nullptr);
    o["sas"] = sas;
    out.push_back(o);
  }
  return out;
}

tl::expected<void, std::string> Control::publish_rules(const RuleSet& rs) {
  // Compiled here, off the data path; workers keep classifying with the old
  // context until the pointer swap, and it is freed only after every worker
  // has passed a quiescent point, so no packet sees a half-built rule set.
  uint64_t t0 = rte_get_tsc_cycles();
  auto next = compile(rs, ++rules_generation_);
  if (!next) return tl::unexpected(next.error());
  rules_build_us_ = (rte_get_tsc_cycles() - t0) * 1000000 / rte_get_tsc_hz();
  std::unique_ptr<Classifier> old = std::move(classifier_);
  classifier_ = std::move(*next);
  tables_.classifier.store(classifier_.get(), std::memory_order_release);
  if (old && workers_running_) rte_rcu_qsbr_synchronize(tables_.qsbr, RTE_QSBR_THRID_INVALID);
  rules_ = rs;
  return {};
}

tl::expected<json, std::string> Control::reload_rules(const std::string& path) {
  std::vector<ConfigError> errors;
  Config n = load_config(path, errors);
  if (!errors.empty()) {
    std::string all;
    for (auto& e : errors) all += (all.empty() ? "" : "\n") + e.str();
    return tl::unexpected(all + "\nthe rules in force are unchanged");
  }
  add_ike_tunnels(n);
  // Zones map to ports: a reload may change rules, not which ports exist.
  if (n.ports.size() != c_.ports.size() || n.port_zone != c_.port_zone)
    return tl::unexpected(fmt::format("{}: ports or their zones differ from the running config; restart moatd to "
                                      "change them (the rules in force are unchanged)", path));
  for (size_t i = 0; i < n.ports.size(); i++)
    if (n.ports[i].name != c_.ports[i].name)
      return tl::unexpected(fmt::format("{}: port {} is now {}; restart moatd to change ports", path,
                                        c_.ports[i].name, n.ports[i].name));
  // Shaping first: when its plan is refused, neither the rules nor the
  // plans in force change (a rule may name a class only the new plan has).
  if (n.tunnels.size() != c_.tunnels.size())
    for (auto& s : n.shapers)
      if (s.moats)
        return tl::unexpected(fmt::format("{}: tunnels differ from the running config; the moats' subtrees follow the "
                                          "tunnels at restart (the rules and plans in force are unchanged)", path));
  auto q = build_qos(n);
  if (!q) return tl::unexpected(q.error() + "\nthe rules and shaping plans in force are unchanged");
  if (auto ok = publish_rules(n.rules); !ok) return tl::unexpected(ok.error() + "\nthe rules in force are unchanged");
  c_.shapers = n.shapers;
  c_.police = n.police;
  install_qos(std::move(*q));
  json out;
  out["generation"] = rules_generation_;
  out["acl_rules"] = classifier_->acl_rules;
  out["build_us"] = rules_build_us_;
  return out;
}

tl::expected<json, std::string> Control::reload_ike() {
  if (!ike_) return tl::unexpected(std::string("no IKE (the config has no ike.tunnels_dir)"));
  auto dir = ike::load_tunnel_dir(c_.ike_dir);
  json out;
  json errors = json::array(), kept = json::array(), added = json::array(), removed = json::array();
  for (auto& e : dir.errors) errors.push_back(e.str());
  // A record that no longer loads keeps its tunnel running as it was: a
  // typo in one moat's file must not cut that moat off.
  std::unordered_set<std::string> broken, loaded, before;
  for (auto& e : dir.errors) broken.insert(e.file);
  for (auto& p : dir.tunnels) loaded.insert(p.name);
  for (auto& p : ike_peers_) {
    before.insert(p.name);
    const std::string file = p.origin.substr(0, p.origin.rfind(':'));
    if (broken.count(file) && loaded.insert(p.name).second) {
      dir.tunnels.push_back(p);
      kept.push_back(p.name);
    }
  }
  // New names take new tunnel ids after every id ever given out; a name
  // that comes back gets its old id.
  std::vector<std::string> slots = ike_slots_;
  std::unordered_set<std::string> in_slots(slots.begin(), slots.end());
  for (auto& p : dir.tunnels) {
    if (!before.count(p.name)) added.push_back(p.name);
    if (in_slots.insert(p.name).second) slots.push_back(p.name);
  }
  for (auto& p : ike_peers_)
    if (!loaded.count(p.name)) removed.push_back(p.name);
  if (static_tunnels_ + slots.size() >= sad_->capacity())
    return tl::unexpected(fmt::format("{}: {} tunnels do not fit the SAD's {} tunnel ids (control.max_sas); raise it "
                                      "and restart moatd (the tunnels in force are unchanged)",
                                      c_.ike_dir, static_tunnels_ + slots.size(), sad_->capacity() - 1));

  // The tunnels, their zone and routes as the new directory has them; the
  // config file's own tunnels and the rules in force stay.
  std::vector<ike::PeerConfig> old_peers = std::move(ike_peers_);
  std::vector<std::string> old_slots = std::move(ike_slots_);
  ike_peers_ = dir.tunnels;
  ike_slots_ = std::move(slots);
  Config next;
  next.tunnels.assign(c_.tunnels.begin(), c_.tunnels.begin() + long(static_tunnels_));
  std::unordered_set<std::string_view> statics;
  for (auto& t : next.tunnels) statics.insert(t.name);
  auto ike_route = [&](const RouteConfig& r) { return r.type == RouteType::tunnel && !statics.count(r.tunnel); };
  for (auto& r : c_.routes)
    if (!ike_route(r)) next.routes.push_back(r);
  next.rules = rules_;
  next.rules.tunnels.resize(static_tunnels_);
  next.rules.tunnel_zone.resize(static_tunnels_);
  add_ike_tunnels(next);
  if (auto ok = publish_rules(next.rules); !ok) {
    ike_peers_ = std::move(old_peers);
    ike_slots_ = std::move(old_slots);
    return tl::unexpected(ok.error() + "\nthe tunnels in force are unchanged");
  }
  using Key = std::tuple<uint32_t, uint8_t, std::string>;
  std::set<Key> was, wanted;
  for (auto& r : c_.routes)
    if (ike_route(r)) was.emplace(r.prefix.addr, r.prefix.len, r.tunnel);
  for (auto& r : next.routes)
    if (ike_route(r)) wanted.emplace(r.prefix.addr, r.prefix.len, r.tunnel);
  c_.tunnels = std::move(next.tunnels);
  tunnel_ids_ = index_tunnels(c_.tunnels);  // before the routes below name tunnels through it
  c_.routes = std::move(next.routes);
  tunnel_sas_.resize(c_.tunnels.size());
  for (auto& [addr, len, tunnel] : was)
    if (!wanted.count({addr, len, tunnel})) (void)routes_->del(Ipv4Prefix{addr, len});
  for (auto& [addr, len, tunnel] : wanted)
    if (!was.count({addr, len, tunnel}))
      if (auto ok = routes_->add(Ipv4Prefix{addr, len}, RouteType::tunnel, 0, tunnel, RouteTable::Origin::config); !ok)
        errors.push_back(fmt::format("tunnel {}: {}", tunnel, ok.error()));
  // The portal's per-moat subtrees follow the tunnels (queues adopted by name).
  if (std::any_of(c_.shapers.begin(), c_.shapers.end(), [](const ShaperConfig& sc) { return sc.moats; })) {
    if (auto q = build_qos(c_)) install_qos(std::move(*q));
    else errors.push_back(q.error() + " (the shaping plans in force are unchanged)");
  }
  // Last: removed tunnels' peers are told (INFORMATIONAL DELETE, as `ike
  // terminate` does), then their SAs leave the SAD with the records.
  const uint64_t now = ike::UdpDriver::now_ms();
  for (auto& name : removed) (void)ike_->engine().terminate(name.get<std::string>(), now);
  ike_->engine().set_peers(std::move(dir.tunnels), now);
  out["tunnels"] = ike_peers_.size();
  out["added"] = added;
  out["removed"] = removed;
  out["kept_as_they_were"] = kept;
  out["errors"] = errors;
  out["generation"] = rules_generation_;
  return out;
}

json Control::show_rules() const {
  json out;
  out["generation"] = rules_generation_;
  out["acl_rules"] = classifier_ ? classifier_->acl_rules : 0;
  out["build_us"] = rules_build_us_;
  json tables = json::object();
  for (unsigned t = 0; t < kTables; t++) {
    json rules = json::array();
    for (auto& r : rules_.table[t].rules) rules.push_back(json{{"name", r.name}, {"line", r.line}});
    tables[kTableNames[t]] = json{{"rules", rules}};
  }
  out["tables"] = tables;
  json zones = json::array();
  for (auto& z : rules_.zones) zones.push_back(z);
  out["zones"] = zones;
  return out;
}

tl::expected<void, std::string> Control::set_address(const std::string& name, const Ipv4Prefix& a) {
  int cfg = -1;
  for (size_t i = 0; i < c_.ports.size(); i++)
    if (c_.ports[i].name == name) cfg = int(i);
  if (cfg < 0) return tl::unexpected(fmt::format("no port named \"{}\"", name));
  if (a.len == 0 || a.len > 30) return tl::unexpected(fmt::format("{}: subnet length must be 1 to 30", a.str()));
  for (size_t i = 0; i < c_.ports.size(); i++) {
    auto& o = c_.ports[i].address;
    if (int(i) == cfg || !o) continue;
    uint32_t m = ~uint32_t(0) << (32 - std::min(o->len, a.len));
    if ((o->addr & m) == (a.addr & m))
      return tl::unexpected(fmt::format("{} overlaps port {} ({})", a.str(), c_.ports[i].name, o->str()));
  }
  uint16_t id = ports_[cfg].id;
  std::optional<uint32_t> old_addr;
  if (auto& old = c_.ports[cfg].address) {
    old_addr = old->addr;
    routes_->del_connected(id, *old);
    // Connections masqueraded to (or forwarded from) the old address
    // cannot continue: their replies would go to an address we no longer
    // have. New connections take the new address (masquerade reads it per
    // connection from the port table).
    if (conntrack_ && old->addr != a.addr) conntrack_->expire_addr(rte_cpu_to_be_32(old->addr));
  }
  c_.ports[cfg].address = a;
  // The workers' port table is immutable: publish a copy, free the old one
  // once every worker has passed a quiescent point.
  auto* next = new PortTable(*port_table_);
  next->port[id].addr = a.addr;
  next->port[id].plen = a.len;
  PortTable* old_table = port_table_;
  port_table_ = next;
  tables_.ports.store(next, std::memory_order_release);
  tables_.paths_changed();
  rte_rcu_qsbr_synchronize(tables_.qsbr, RTE_QSBR_THRID_INVALID);
  delete old_table;
  routes_->add_connected(id);
  ArpTable::Actions acts;
  arp_->flush_port(id, acts);
  apply(acts);
  if (taps_[cfg].fd() >= 0)
    if (auto ok = taps_[cfg].set_address(a.addr, a.len, c_.punt_netns); !ok) return ok;
  send_arp(id, RTE_ARP_OP_REQUEST, a.addr, {}, {});  // gratuitous
  // IKE SAs we initiated from the old address move with MOBIKE (RFC 4555).
  if (ike_ && old_addr && *old_addr != a.addr) ike_->address_changed(*old_addr, a.addr);
  return {};
}

// ------------------------------------------------------------------ views ---

json Control::show_conntrack(size_t limit) const {
  json out = json::object();
  if (!conntrack_) {
    out["capacity"] = 0;
    return out;
  }
  uint64_t created = 0, hits = 0;
  for (auto& w : workers_) {
    created += w->stats.ct_new.load();
    hits += w->stats.ct_hit.load();
  }
  uint64_t refused = 0;
  for (auto& w : workers_) refused += w->stats.drops[unsigned(Drop::ct_full)].load();
  out["capacity"] = conntrack_->capacity();
  out["in_use"] = conntrack_->in_use();
  out["created"] = created;
  out["expired"] = conntrack_->expired();
  out["refused_full"] = refused;
  out["packets_tracked"] = hits;
  uint64_t now = rte_get_tsc_cycles();
  auto ep = [](uint32_t a, uint16_t p) { return fmt::format("{}:{}", ipv4_str(rte_be_to_cpu_32(a)), rte_be_to_cpu_16(p)); };
  json conns = json::array();
  size_t live = 0;
  conntrack_->for_each([&](uint32_t, const Conn& c) {
    live++;
    if (conns.size() >= limit) return;
    json o = json::object();
    o["proto"] = c.key[0].proto;
    o["state"] = ct_state_name(conntrack_->state(c));
    o["orig"] = ep(c.key[0].src, c.key[0].sport) + " > " + ep(c.key[0].dst, c.key[0].dport);
    o["reply"] = ep(c.key[1].src, c.key[1].sport) + " > " + ep(c.key[1].dst, c.key[1].dport);
    o["nat"] = (c.nat & kNatSrc) && (c.nat & kNatDst) ? "src+dst" : (c.nat & kNatSrc) ? "src" : (c.nat & kNatDst) ? "dst" : "";
    uint64_t last = __atomic_load_n(&c.last_tsc, __ATOMIC_RELAXED);
    o["idle_s"] = now > last ? (now - last) / tsc_hz_ : 0;
    o["timeout_s"] = conntrack_->timeout_tsc(c) / tsc_hz_;
    conns.push_back(o);
  });
  out["live"] = live;
  out["connections"] = conns;
  return out;
}

json Control::show_interfaces() const {
  json out = json::array();
  const PortTable& pt = *tables_.ports.load();
  for (size_t i = 0; i < ports_.size(); i++) {
    const PortConfig& pc = c_.ports[i];
    const PortInfo& pi = pt.port[ports_[i].id];
    rte_eth_stats st{};
    rte_eth_stats_get(ports_[i].id, &st);
    rte_eth_link link{};
    rte_eth_link_get_nowait(ports_[i].id, &link);
    json o = json::object();
    o["name"] = pc.name;
    o["port"] = ports_[i].id;
    o["device"] = pc.device;
    o["mac"] = mac_str(pi.mac);
    o["address"] = pc.address ? pc.address->str() : "";
    o["mtu"] = pi.mtu;
    o["link"] = link.link_status ? "up" : "down";
    o["rx_queues"] = ports_[i].rx_queues;
    o["rx_packets"] = st.ipackets;
    o["tx_packets"] = st.opackets;
    o["rx_bytes"] = st.ibytes;
    o["tx_bytes"] = st.obytes;
    o["rx_missed"] = st.imissed;
    o["punt_tap"] = taps_.size() > i && taps_[i].fd() >= 0 ? taps_[i].name() : "";
    out.push_back(o);
  }
  return out;
}

json Control::show_routes() const {
  static const char* origin[] = {"connected", "local", "config", "cli"};
  json out = json::array();
  for (auto& [k, r] : routes_->routes()) {
    if (r.origin == RouteTable::Origin::local) continue;
    json o = json::object();
    o["prefix"] = r.prefix.str();
    o["via"] = r.via ? ipv4_str(r.via) : "";
    o["port"] = r.kind == NextHop::connected || r.kind == NextHop::gateway ? routes_->port_name(r.port)
                : r.kind == NextHop::tunnel                                 ? "tunnel " + c_.tunnels[r.port].name
                                                                            : "";
    o["type"] = route_type_name(r.type);
    o["origin"] = origin[int(r.origin)];
    out.push_back(o);
  }
  return out;
}

json Control::show_neighbors() const {
  json out = json::array();
  uint64_t now = now_ms();
  for (auto& [k, e] : arp_->entries()) {
    json o = json::object();
    o["ip"] = ipv4_str(k.ip);
    o["mac"] = e.state == ArpTable::State::incomplete ? "" : mac_str(e.mac);
    o["port"] = routes_->port_name(k.port);
    o["state"] = arp_state_name(e.state);
    o["age_s"] = e.confirmed_ms ? (now - e.confirmed_ms) / 1000 : 0;
    o["held"] = e.held.size();
    out.push_back(o);
  }
  return out;
}

json Control::show_stats() const {
  json out = json::object();
  out["ports"] = show_interfaces();
  json workers = json::array();
  json drops = json::array();
  auto add_drops = [&](const WorkerStats& s, const std::string& who) {
    for (unsigned d = 0; d < kDropCount; d++) {
      uint64_t v = s.drops[d].load();
      if (!v) continue;
      json o = json::object();
      o["reason"] = kDropNames[d];
      o["worker"] = who;
      o["count"] = v;
      o["what"] = kDropWhat[d];
      drops.push_back(o);
    }
  };
  for (auto& w : workers_) {
    json o = json::object();
    o["worker"] = w->id;
    o["lcore"] = w->lcore;
    o["rx"] = w->stats.rx.load();
    o["tx"] = w->stats.tx.load();
    o["punted"] = w->stats.punted.load();
    o["injected"] = w->stats.injected.load();
    o["icmp_sent"] = w->stats.icmp_sent.load();
    o["fragments"] = w->stats.fragments.load();
    o["classified"] = w->stats.classified.load();
    o["ct_new"] = w->stats.ct_new.load();
    o["ct_hit"] = w->stats.ct_hit.load();
    o["rst_sent"] = w->stats.rst_sent.load();
    uint64_t dropped = 0;
    for (unsigned d = 0; d < kDropCount; d++) dropped += w->stats.drops[d].load();
    o["dropped"] = dropped;
    workers.push_back(o);
    add_drops(w->stats, std::to_string(w->id));
  }
  add_drops(ctrl_stats_, "control");
  out["workers"] = workers;
  out["drops"] = drops;
  if (ike_) out["ike"] = ike_->engine().stats().json();  // the IKE engine's counters (MOAT_IKE_COUNTERS)
  json punt = json::object();
  punt["to_kernel"] = tap_tx_;
  punt["from_kernel"] = tap_rx_;
  out["punt"] = punt;
  return out;
}

void Control::register_cli() {
  cli_->on("show interfaces", [this](const std::vector<std::string>&) { return show_interfaces(); });
  cli_->on("show routes", [this](const std::vector<std::string>&) { return show_routes(); });
  cli_->on("show neighbors", [this](const std::vector<std::string>&) { return show_neighbors(); });
  cli_->on("show stats", [this](const std::vector<std::string>&) { return show_stats(); });
  cli_->on("route add", [this](const std::vector<std::string>& a) {
    // route add PREFIX (via GW)? (port NAME)? (type T)?
    if (a.empty()) throw CliError("usage: route add PREFIX [via GW] [port NAME] [tunnel NAME] [type unicast|blackhole|unreachable|prohibit]");
    std::string why;
    auto p = parse_prefix(a[0], true, &why);
    if (!p) throw CliError("route add: " + why);
    uint32_t via = 0;
    std::string port;
    RouteType type = RouteType::unicast;
    for (size_t i = 1; i + 1 < a.size() + 1; i += 2) {
      if (i + 1 >= a.size()) throw CliError(fmt::format("route add: \"{}\" needs a value", a[i]));
      const std::string& k = a[i];
      const std::string& v = a[i + 1];
      if (k == "via") {
        auto g = parse_ipv4(v);
        if (!g) throw CliError(fmt::format("route add: \"{}\" is not an IPv4 address", v));
        via = *g;
      } else if (k == "port") {
        port = v;
      } else if (k == "tunnel") {
        type = RouteType::tunnel;
        port = v;
      } else if (k == "type") {
        if (v == "unicast") type = RouteType::unicast;
        else if (v == "blackhole") type = RouteType::blackhole;
        else if (v == "unreachable") type = RouteType::unreachable;
        else if (v == "prohibit") type = RouteType::prohibit;
        else throw CliError(fmt::format("route add: unknown type \"{}\"", v));
      } else {
        throw CliError(fmt::format("route add: unknown word \"{}\" (expected via, port, tunnel or type)", k));
      }
    }
    if (type == RouteType::unicast && !via && port.empty()) throw CliError("route add: needs via GW or port NAME");
    if (auto ok = routes_->add(*p, type, via, port, RouteTable::Origin::cli); !ok) throw CliError(ok.error());
    return json{{"added", p->str()}};
  });
  cli_->on("address set", [this](const std::vector<std::string>& a) {
    if (a.size() != 2) throw CliError("usage: address set PORT A.B.C.D/LEN");
    std::string why;
    auto p = parse_prefix(a[1], false, &why);
    if (!p || a[1].find('/') == std::string::npos) throw CliError("address set: " + (why.empty() ? "needs A.B.C.D/LEN" : why));
    if (auto ok = set_address(a[0], *p); !ok) throw CliError("address set: " + ok.error());
    return json{{"port", a[0]}, {"address", p->str()}};
  });
  cli_->on("show ike", [this](const std::vector<std::string>&) {
    if (!ike_) throw CliError("show ike: no IKE (the config has no ike.tunnels_dir)");
    return ike_->show();
  });
  cli_->on("ike initiate", [this](const std::vector<std::string>& a) {
    if (a.size() != 1 || !ike_) throw CliError("usage: ike initiate TUNNEL (needs ike.tunnels_dir)");
    if (auto r = ike_->engine().initiate(a[0], ike::UdpDriver::now_ms()); !r) throw CliError("ike initiate: " + r.error());
    return json{{"initiated", a[0]}};
  });
  cli_->on("ike terminate", [this](const std::vector<std::string>& a) {
    if (a.size() != 1 || !ike_) throw CliError("usage: ike terminate TUNNEL (needs ike.tunnels_dir)");
    if (auto r = ike_->engine().terminate(a[0], ike::UdpDriver::now_ms()); !r) throw CliError("ike terminate: " + r.error());
    return json{{"terminated", a[0]}};
  });
  cli_->on("ike rekey", [this](const std::vector<std::string>& a) {
    // A forced rekey (tests, operators): the tunnel's CHILD SAs (default) or its IKE SA.
    if (a.empty() || a.size() > 2 || (a.size() == 2 && a[1] != "child" && a[1] != "ike") || !ike_)
      throw CliError("usage: ike rekey TUNNEL [child|ike] (needs ike.tunnels_dir)");
    bool ike = a.size() == 2 && a[1] == "ike";
    auto now = ike::UdpDriver::now_ms();
    auto r = ike ? ike_->engine().rekey_ike(a[0], now) : ike_->engine().rekey_child(a[0], now);
    if (!r) throw CliError("ike rekey: " + r.error());
    return json{{"rekeying", a[0]}, {"sa", ike ? "ike" : "child"}};
  });
  cli_->on("show tunnels", [this](const std::vector<std::string>&) { return show_tunnels(); });
  cli_->on("show rules", [this](const std::vector<std::string>&) { return show_rules(); });
  cli_->on("show qos", [this](const std::vector<std::string>& a) {
    if (a.size() > 1) throw CliError("usage: show qos [PORT]");
    auto r = show_qos(a.empty() ? "" : a[0]);
    if (!r) throw CliError("show qos: " + r.error());
    return *r;
  });
  cli_->on("show conntrack", [this](const std::vector<std::string>& a) {
    size_t limit = 100;
    if (a.size() == 2 && a[0] == "limit") limit = std::stoul(a[1]);
    else if (!a.empty()) throw CliError("usage: show conntrack [limit N]");
    return show_conntrack(limit);
  });
  cli_->on("conntrack flush", [this](const std::vector<std::string>&) {
    // Every connection is forgotten; their next packets meet the rules again.
    return json{{"expired", conntrack_ ? conntrack_->expire_all() : 0}};
  });
  cli_->on("ike reload", [this](const std::vector<std::string>& a) {
    if (!a.empty()) throw CliError("usage: ike reload");
    auto r = reload_ike();
    if (!r) throw CliError("ike reload: " + r.error());
    return *r;
  });
  cli_->on("rules reload", [this](const std::vector<std::string>& a) {
    if (a.size() > 1) throw CliError("usage: rules reload [FILE]");
    auto r = reload_rules(a.empty() ? c_.path : a[0]);
    if (!r) throw CliError("rules reload: " + r.error());
    return *r;
  });
  cli_->on("route del", [this](const std::vector<std::string>& a) {
    if (a.size() != 1) throw CliError("usage: route del PREFIX");
    std::string why;
    auto p = parse_prefix(a[0], true, &why);
    if (!p) throw CliError("route del: " + why);
    if (auto ok = routes_->del(*p); !ok) throw CliError(ok.error());
    return json{{"deleted", p->str()}};
  });
}

}  // namespace moat
