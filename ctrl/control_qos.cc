// The control thread's side of QoS: builds the workers' QosTable from the
// config (class trees, the portal's per-moat subtrees, class maps, meters),
// publishes it, and shows the trees with their counters.
#include <rte_cycles.h>
#include <rte_errno.h>
#include <rte_lcore.h>

#include <fmt/format.h>

#include <map>
#include <mutex>

#include <rte_telemetry.h>

#include "ctrl/config_qos.hh"
#include "ctrl/control.hh"
#include "dataplane/shape.hh"

namespace moat {

using json = nlohmann::ordered_json;

namespace {

// Never a config class name (names come from YAML scalars a person types):
// a plan whose classes match nothing, so adopt() hands every packet back.
constexpr const char* kDrainName = "\x01(shaping removed)";

// `/moat/qos,PORT[,FIRST]`: the class counters of a port's tree for metrics
// scrapers, the figures `show qos` shows. The callback runs on DPDK's
// telemetry thread, which is no RCU reader: the mutex keeps the table it
// reads from being freed by a plan change (control thread only, never a
// worker). A telemetry answer holds at most RTE_TEL_MAX_DICT_ENTRIES
// classes; FIRST pages through a portal's larger tree.
std::mutex g_qos_mu;
const QosTable* g_qos = nullptr;
std::map<std::string, uint16_t> g_qos_ports;

int telemetry_qos(const char*, const char* params, rte_tel_data* d) {
  std::string p = params ? params : "";
  size_t first = 0;
  if (auto comma = p.find(','); comma != std::string::npos) {
    first = std::strtoul(p.c_str() + comma + 1, nullptr, 10);
    p.resize(comma);
  }
  std::lock_guard lk(g_qos_mu);
  auto it = g_qos_ports.find(p);
  if (!g_qos || it == g_qos_ports.end() || !g_qos->port[it->second] || g_qos->port[it->second]->drain) return -EINVAL;
  const qos::Scheduler& s = *g_qos->port[it->second]->sched;
  rte_tel_data_start_dict(d);
  for (size_t k = first; k < s.classes() && k < first + RTE_TEL_MAX_DICT_ENTRIES; k++) {
    const qos::ClassStats st = s.stats(uint32_t(k));
    rte_tel_data* c = rte_tel_data_alloc();
    if (!c) break;
    rte_tel_data_start_dict(c);
    rte_tel_data_add_dict_u64(c, "sent_pkts", st.sent_pkts);
    rte_tel_data_add_dict_u64(c, "sent_bytes", st.sent_bytes);
    rte_tel_data_add_dict_u64(c, "dropped_pkts", st.dropped_pkts);
    rte_tel_data_add_dict_u64(c, "dropped_bytes", st.dropped_bytes);
    rte_tel_data_add_dict_u64(c, "borrowed_bytes", st.borrowed_bytes);
    rte_tel_data_add_dict_u64(c, "qlen", st.qlen);
    std::string name = s.plan().classes[k].name.substr(0, RTE_TEL_MAX_STRING_LEN - 1);
    rte_tel_data_add_dict_container(d, name.c_str(), c, 0);
  }
  return 0;
}

}  // namespace

tl::expected<std::unique_ptr<QosTable>, std::string> Control::build_qos(const Config& c) {
  auto q = std::make_unique<QosTable>();
  q->generation = ++qos_generation_;
  unsigned nworkers = std::max(1u, rte_lcore_count() - 1);
  std::set<uint16_t> shaped;
  for (const ShaperConfig& sc : c.shapers) {
    std::string where = fmt::format("{}:{}: qos.shaping {}", c.path, sc.line, sc.port);
    const PortConfig* pc = c.port(sc.port);
    if (!pc) return tl::unexpected(fmt::format("{}: no such port", where));
    uint16_t pid = port_id(sc.port);
    qos::Plan plan = sc.plan;
    // The portal: a subtree per tunnel, named after it; its classes are
    // "TUNNEL/CLASS".
    std::vector<int32_t> moat_base(c.tunnels.size(), -1);
    if (sc.moats) {
      // The config's own classes by name (the moats' are "TUNNEL/CLASS").
      std::map<std::string, int32_t> top;
      for (size_t i = 0; i < plan.classes.size(); i++) top[plan.classes[i].name] = int32_t(i);
      int32_t parent = sc.moats_parent.empty() ? 0 : top.at(sc.moats_parent);
      for (size_t t = 0; t < c.tunnels.size(); t++) {
        const TunnelConfig& tc = c.tunnels[t];
        if (top.count(tc.name))
          return tl::unexpected(fmt::format("{}: tunnel {} has the name of a class of this tree", where, tc.name));
        int32_t base = int32_t(plan.classes.size());
        qos::ClassSpec m = sc.moat.classes[0];
        m.name = tc.name;
        m.parent = parent;
        if (tc.shape_rate) m.rate = tc.shape_rate;
        if (tc.shape_ceil) m.ceil = tc.shape_ceil;
        else if (tc.shape_rate && m.ceil < m.rate) m.ceil = m.rate;
        plan.classes.push_back(m);
        for (size_t k = 1; k < sc.moat.classes.size(); k++) {
          qos::ClassSpec s = sc.moat.classes[k];
          s.name = tc.name + "/" + s.name;
          s.parent = base + s.parent;
          // A moat's classes share its rate in the template's proportions
          // when the tunnel overrides the moat's rate.
          if (tc.shape_rate) {
            double f = double(m.rate) / double(sc.moat.classes[0].rate);
            s.rate = std::max<uint64_t>(1, uint64_t(double(s.rate) * f));
          }
          if (tc.shape_rate || tc.shape_ceil) {
            double f = double(m.ceil) / double(sc.moat.classes[0].ceil);
            s.ceil = uint64_t(double(s.ceil) * f);
          }
          s.ceil = std::min(std::max(s.ceil, s.rate), m.ceil);
          plan.classes.push_back(s);
        }
        moat_base[t] = base;
      }
    }
    if (auto errs = qos::validate(plan); !errs.empty()) {
      std::string all;
      for (auto& e : errs)
        all += fmt::format("{}{}: {}{}", all.empty() ? "" : "\n", where,
                           e.cls >= 0 && size_t(e.cls) < plan.classes.size() ? "class " + plan.classes[e.cls].name + ": " : "",
                           e.what);
      return tl::unexpected(all);
    }
    auto sp = std::make_unique<ShapedPort>();
    sp->sched = std::make_unique<qos::Scheduler>(plan, tsc_hz_);
    const qos::Scheduler& s = *sp->sched;
    auto leaf = [&](const std::string& name) {  // its index, or -1 when not a leaf
      int32_t i = s.find(name);
      return i >= 0 && s.is_leaf(uint32_t(i)) ? i : -1;
    };
    // One owner per port keeps the scheduler lock-free; ports spread over
    // the workers.
    sp->owner = pid % nworkers;
    rte_ring*& ring = qos_rings_[pid];
    if (!ring) {
      ring = rte_ring_create(fmt::format("moat_qos{}", pid).c_str(), 4096, rte_socket_id(), RING_F_SC_DEQ);
      if (!ring) return tl::unexpected(fmt::format("{}: hand-off ring: {}", where, rte_strerror(rte_errno)));
    }
    sp->handoff = ring;
    // The class namespace of this port: the rule tables' classes, then any
    // leaf only the DSCP map names.
    std::vector<std::string> names = c.rules.classes;
    for (const std::string& l : sc.dscp)
      if (!l.empty() && std::find(names.begin(), names.end(), l) == names.end()) names.push_back(l);
    sp->ncls = uint16_t(names.size());
    // No leaf at the top (a portal with only moats): what belongs to no
    // moat leaves unshaped, as HTB's direct queue.
    int32_t dflt = sc.default_leaf.empty() ? -1 : leaf(sc.default_leaf);
    if (!sc.default_leaf.empty() && dflt < 0)
      return tl::unexpected(fmt::format("{}: default {} is not a leaf", where, sc.default_leaf));
    sp->default_leaf = dflt < 0 ? kNoLeaf : uint32_t(dflt);
    sp->by_class.assign(names.size(), sp->default_leaf);
    for (size_t k = 1; k < names.size(); k++) {
      if (int32_t l = leaf(names[k]); l > 0) sp->by_class[k] = uint32_t(l);
    }
    for (unsigned d = 0; d < 64; d++)
      if (!sc.dscp[d].empty())
        sp->dscp_cls[d] = uint16_t(std::find(names.begin(), names.end(), sc.dscp[d]) - names.begin());
    if (sc.moats) {
      sp->ntunnels = uint16_t(c.tunnels.size());
      sp->tunnel_leaf.assign(size_t(sp->ntunnels) * sp->ncls, sp->default_leaf);
      for (size_t t = 0; t < c.tunnels.size(); t++) {
        int32_t md = leaf(c.tunnels[t].name + "/" + sc.moat_default);
        if (sc.moat.classes.size() == 1 || md < 0) md = moat_base[t];  // the moat itself is the leaf
        for (size_t k = 0; k < names.size(); k++) {
          int32_t l = k ? leaf(c.tunnels[t].name + "/" + names[k]) : -1;
          sp->tunnel_leaf[t * sp->ncls + k] = uint32_t(l > 0 ? l : md);
        }
      }
    }
    q->port[pid] = std::move(sp);
    shaped.insert(pid);
  }
  // Ports shaped until now and no longer: their queues leave unshaped.
  if (qos_)
    for (uint16_t p = 0; p < kMaxPorts; p++)
      if (qos_->port[p] && !qos_->port[p]->drain && !shaped.count(p)) {
        qos::Plan drain;
        qos::ClassSpec root;
        root.name = kDrainName;
        root.rate = root.ceil = 1;
        drain.classes.push_back(root);
        auto sp = std::make_unique<ShapedPort>();
        sp->sched = std::make_unique<qos::Scheduler>(drain, tsc_hz_);
        sp->owner = qos_->port[p]->owner;
        sp->handoff = qos_->port[p]->handoff;
        sp->drain = true;
        sp->by_class.assign(1, 0);
        q->port[p] = std::move(sp);
      }
  // Meters: the rates divided among the workers, each meters its own packets.
  if (!c.police.empty()) {
    q->police.resize(c.rules.classes.size());
    for (const PoliceConfig& pc : c.police) {
      size_t k = std::find(c.rules.classes.begin(), c.rules.classes.end(), pc.cls) - c.rules.classes.begin();
      if (k >= q->police.size()) return tl::unexpected(fmt::format("{}:{}: qos.police: no class {}", c.path, pc.line, pc.cls));
      Policer& p = q->police[k];
      rte_meter_trtcm_params prm{};
      prm.cir = std::max<uint64_t>(1, pc.cir / nworkers);
      prm.pir = std::max<uint64_t>(prm.cir, pc.pir / nworkers);
      prm.cbs = pc.cbs;
      prm.pbs = pc.pbs;
      if (rte_meter_trtcm_profile_config(&p.profile, &prm) != 0)
        return tl::unexpected(fmt::format("{}:{}: qos.police {}: rte_meter refuses these rates", c.path, pc.line, pc.cls));
      p.on = true;
      p.yellow_drop = pc.yellow_drop;
      p.yellow_dscp = pc.yellow_dscp;
    }
    q->meters.assign(nworkers, std::vector<rte_meter_trtcm>(q->police.size()));
    for (auto& wm : q->meters)
      for (size_t k = 0; k < q->police.size(); k++)
        if (q->police[k].on) rte_meter_trtcm_config(&wm[k], &q->police[k].profile);
  }
  return q;
}

tl::expected<void, std::string> Control::publish_qos(const Config& c) {
  auto next = build_qos(c);
  if (!next) return tl::unexpected(next.error());
  install_qos(std::move(*next));
  return {};
}

void Control::install_qos(std::unique_ptr<QosTable> next) {
  bool any = !next->police.empty();
  for (auto& p : next->port) any |= bool(p);
  std::unique_ptr<QosTable> old = std::move(qos_);
  {
    std::lock_guard lk(g_qos_mu);
    qos_ = std::move(next);
    g_qos = qos_.get();
    if (g_qos_ports.empty()) {
      for (size_t i = 0; i < c_.ports.size(); i++) g_qos_ports[c_.ports[i].name] = ports_[i].id;
      rte_telemetry_register_cmd("/moat/qos", telemetry_qos,
                                 "Moat QoS class counters of a shaped port. Parameters: PORT[,FIRST class index]");
    }
  }
  // Once anything was shaped, workers always see a table (maybe empty), so
  // that every change is acknowledged below.
  tables_.qos.store(any || old ? qos_.get() : nullptr, std::memory_order_release);
  // An owner keeps a pointer to its old scheduler across loops until it has
  // adopted the queues into the new one: that is state held past a quiescent
  // point, which an RCU grace period does not cover (moatd crashed in
  // Scheduler::adopt on a freed scheduler when bench/qos-runs.sh switched
  // shaping on and off under load, and a worker napping offline with
  // idle_sleep_us would pass any number of grace periods). So every worker
  // acknowledges the generation it has fully taken over (Worker::qos_gen,
  // stored at the end of its shape_run), and the old table is freed only
  // then. A worker that never answers (stuck) costs the old table's memory,
  // never a use after free.
  if (old && workers_running_) {
    uint64_t deadline = rte_get_tsc_cycles() + 2 * tsc_hz_;
    auto all_seen = [&] {
      for (auto& w : workers_)
        if (w->qos_gen.load(std::memory_order_acquire) != qos_->generation) return false;
      return true;
    };
    while (!all_seen() && rte_get_tsc_cycles() < deadline) rte_delay_us_sleep(100);
    if (!all_seen()) {
      fmt::print(stderr, "moatd: a worker did not take over QoS plan {} within 2 s; the old plan's memory is kept\n",
                 qos_->generation);
      (void)old.release();
    }
  }
  qos_rate_.clear();
}

void Control::forget_qos() {
  std::lock_guard lk(g_qos_mu);
  g_qos = nullptr;
  qos_.reset();
}

void Control::sample_qos() {
  if (!qos_) return;
  uint64_t now = rte_get_tsc_cycles();
  for (uint16_t p = 0; p < kMaxPorts; p++) {
    const ShapedPort* sp = qos_->port[p].get();
    if (!sp || sp->drain) continue;
    auto& s = qos_rate_[p];
    uint32_t n = sp->sched->classes();
    if (s.bytes.size() != n) {
      s.bytes.assign(n, 0);
      s.bps.assign(n, 0);
      s.tsc = 0;
    }
    double dt = s.tsc ? double(now - s.tsc) / double(tsc_hz_) : 0;
    for (uint32_t k = 0; k < n; k++) {
      uint64_t b = sp->sched->stats(k).sent_bytes;
      if (dt > 0) s.bps[k] = double(b - s.bytes[k]) * 8 / dt;
      s.bytes[k] = b;
    }
    s.tsc = now;
  }
}

tl::expected<json, std::string> Control::show_qos(const std::string& port) const {
  json out = json::array();
  for (size_t i = 0; i < c_.ports.size(); i++) {
    if (!port.empty() && c_.ports[i].name != port) continue;
    uint16_t pid = ports_[i].id;
    const ShapedPort* sp = qos_ ? qos_->port[pid].get() : nullptr;
    if (!sp || sp->drain) {
      if (!port.empty()) return tl::unexpected(fmt::format("port {} is not shaped (qos.shaping)", port));
      continue;
    }
    const qos::Scheduler& s = *sp->sched;
    const qos::Plan& plan = s.plan();
    auto rt = qos_rate_.find(pid);
    json classes = json::array();
    for (uint32_t k = 0; k < s.classes(); k++) {
      const qos::ClassSpec& cs = plan.classes[k];
      const qos::ClassStats st = s.stats(k);
      json o;
      o["name"] = cs.name;
      o["parent"] = cs.parent >= 0 ? json(plan.classes[cs.parent].name) : json(nullptr);
      o["leaf"] = s.is_leaf(k);
      o["rate"] = rate_str(cs.rate);
      o["ceil"] = rate_str(cs.ceil);
      o["prio"] = cs.prio;
      o["sent_pkts"] = st.sent_pkts;
      o["sent_bytes"] = st.sent_bytes;
      o["dropped_pkts"] = st.dropped_pkts;
      o["dropped_bytes"] = st.dropped_bytes;
      o["borrowed_bytes"] = st.borrowed_bytes;
      o["qlen"] = st.qlen;
      o["rate_now_bps"] = rt != qos_rate_.end() && k < rt->second.bps.size() ? uint64_t(rt->second.bps[k]) : 0;
      classes.push_back(o);
    }
    // The tree as an operator reads it: children under their parent.
    std::vector<std::vector<uint32_t>> kids(s.classes());
    for (uint32_t k = 1; k < s.classes(); k++) kids[plan.classes[k].parent].push_back(k);
    json tree = json::array();
    std::vector<std::pair<uint32_t, std::string>> stack{{0, ""}};
    while (!stack.empty()) {
      auto [k, pre] = stack.back();
      stack.pop_back();
      const json& o = classes[k];
      tree.push_back(fmt::format("{}{} rate {} ceil {} prio {}: now {:.1f} kbit/s, sent {} pkts, dropped {}, borrowed {} B, queued {}",
                                 pre, o["name"].get<std::string>(), o["rate"].get<std::string>(), o["ceil"].get<std::string>(),
                                 o["prio"].get<int>(), double(o["rate_now_bps"].get<uint64_t>()) / 1000,
                                 o["sent_pkts"].get<uint64_t>(), o["dropped_pkts"].get<uint64_t>(),
                                 o["borrowed_bytes"].get<uint64_t>(), o["qlen"].get<uint32_t>()));
      for (auto it = kids[k].rbegin(); it != kids[k].rend(); ++it) stack.push_back({*it, pre + "  "});
    }
    out.push_back(json{{"port", c_.ports[i].name}, {"owner", sp->owner}, {"generation", qos_->generation},
                       {"tree", tree}, {"classes", classes}});
  }
  return out;
}

}  // namespace moat
