// The hierarchical scheduler (qos/htb.hh, issue 7):
//  (a) BM_QosAccuracy: a 4-class tree on a virtual clock at 64 kbit/s ..
//      10 Gbit/s, every class saturated, each class's long-run share against
//      its expected share (counter max_rel_err, in %). Arg 1: one class idle,
//      the others borrow (one up to its ceil, two by quanta).
//  (b) BM_QosHtbCost / BM_QosRteSchedCost: enqueue + dequeue cycles per
//      packet with 4,096 moat subtrees x 4 classes (16,384 leaves), 512-byte
//      packets spread over all leaves in a shuffled order, bursts of 32
//      (HTB's through enqueue_burst, as dataplane/shape.cc queues them); the
//      same workload through DPDK's rte_sched (4,096 pipes, traffic classes
//      0..3). Both run against the TSC with a port rate (1 Tbit/s) the core
//      cannot reach, so they are measured as fast as they go. cycles_per_pkt
//      is the median over bursts (TSC around enqueue + dequeue of one burst,
//      divided by the packets it dequeued); _mean includes preemptions.
//      BM_QosCostRatio reports HTB / rte_sched medians from the same run. BM_QosHtbCostShaping is
//      HTB alone on a virtual clock at exactly the link rate (every class
//      backlogged, shaping and borrowing at work): rte_sched reads the TSC
//      itself and cannot be run that way.
//  (c) BM_QosTopPrioDelay: the worst queueing delay of the top-priority
//      class under a saturated link, in units of one 1514-byte packet's time
//      at the link rate (the bound is 1 + its own packet).
//   build/bench/bench_qos --benchmark_format=json
#include <benchmark/benchmark.h>
#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_mbuf.h>
#include <rte_sched.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "qos/htb.hh"

using namespace moat::qos;

namespace {

constexpr uint64_t kNs = 1000000000;

ClassSpec cls(std::string name, int32_t parent, uint64_t rate, uint64_t ceil, uint8_t prio = 0) {
  ClassSpec c;
  c.name = std::move(name);
  c.parent = parent;
  c.rate = rate;
  c.ceil = ceil;
  c.prio = prio;
  return c;
}

// "m12/3" without operator+ on strings (GCC 12 warns falsely there, PR 105329).
std::string name_of(const char* prefix, unsigned a, int b = -1, const char* suffix = "") {
  std::string s = prefix;
  s.append(std::to_string(a));
  if (b >= 0) {
    s.push_back('/');
    s.append(std::to_string(b));
  }
  s.append(suffix);
  return s;
}

// A virtual-clock owner loop: backlogged leaves are refilled as they send,
// one periodic leaf arrives on time. A handle is 1 + the index of a record
// in `pkts`.
struct VSim {
  struct Pkt {
    uint32_t leaf, len;
    uint64_t enq;
  };
  Scheduler s;
  uint64_t t = 0;
  std::vector<uint32_t> backlog_len;  // per class, 0: not backlogged
  std::vector<Pkt> pkts;
  std::vector<uint32_t> free_ids;
  uint32_t periodic_leaf = UINT32_MAX, periodic_len = 0;
  uint64_t periodic_every = 0, periodic_next = 0;
  uint64_t worst_delay = 0;

  explicit VSim(const Plan& p) : s(p, kNs), backlog_len(p.classes.size(), 0) {}
  void push(uint32_t leaf, uint32_t len) {
    uint32_t id;
    if (free_ids.empty()) {
      id = static_cast<uint32_t>(pkts.size());
      pkts.push_back({});
    } else {
      id = free_ids.back();
      free_ids.pop_back();
    }
    pkts[id] = {leaf, len, t};
    if (!s.enqueue(leaf, reinterpret_cast<void*>(uintptr_t{id} + 1), len, t)) free_ids.push_back(id);
  }
  void backlog(uint32_t leaf, uint32_t len, unsigned depth) {
    backlog_len[leaf] = len;
    for (unsigned i = 0; i < depth; i++) push(leaf, len);
  }
  void run_until(uint64_t end) {
    void* out[64];
    for (;;) {
      uint64_t nt = std::min(s.next_send(t), periodic_every ? periodic_next : UINT64_MAX);
      if (nt > end) {
        t = end;
        return;
      }
      t = std::max(t, nt);
      while (periodic_every && periodic_next <= t) {
        push(periodic_leaf, periodic_len);
        periodic_next += periodic_every;
      }
      unsigned n = s.dequeue(t, out, 64, nullptr, nullptr);
      for (unsigned i = 0; i < n; i++) {
        uint32_t id = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(out[i]) - 1);
        Pkt p = pkts[id];
        free_ids.push_back(id);
        if (p.leaf == periodic_leaf) worst_delay = std::max(worst_delay, t - p.enq);
        if (backlog_len[p.leaf]) push(p.leaf, backlog_len[p.leaf]);
      }
    }
  }
};

const uint64_t kLinks[] = {8000, 125000, 12500000, 125000000, 1250000000};  // B/s: 64k, 1M, 100M, 1G, 10G bit/s

// (a) Arg0: link index; Arg1: 0 all four saturated, 1 the 50 % class idle.
void BM_QosAccuracy(benchmark::State& st) {
  const uint64_t link = kLinks[st.range(0)];
  const bool borrow = st.range(1);
  const double share[4] = {0.50, 0.25, 0.15, 0.10};
  double expect[4];
  Plan p;
  p.classes.push_back(cls("root", -1, link, link));
  if (!borrow) {
    for (int k = 0; k < 4; k++) p.classes.push_back(cls(name_of("c", k), 0, uint64_t(link * share[k]), link, k));
    for (int k = 0; k < 4; k++) expect[k] = share[k];
  } else {
    // c0 idle; c1 prio 0 borrows up to its 60 % ceil; c2 and c3 share the
    // remaining 15 % by their quanta (15:10).
    p.classes.push_back(cls("c0", 0, uint64_t(link * 0.50), link, 0));
    p.classes.push_back(cls("c1", 0, uint64_t(link * 0.25), uint64_t(link * 0.60), 0));
    p.classes.push_back(cls("c2", 0, uint64_t(link * 0.15), link, 1));
    p.classes.push_back(cls("c3", 0, uint64_t(link * 0.10), link, 1));
    expect[0] = 0;
    expect[1] = 0.60;
    expect[2] = 0.15 + 0.15 * 0.6;
    expect[3] = 0.10 + 0.15 * 0.4;
  }
  const uint32_t len = 1000;
  // About 200,000 packets whatever the rate: virtual seconds are free.
  // The warm-up outlasts the default buckets (4 ms at each rate): a class
  // spending its initial bucket on a saturated link takes from the lowest
  // priority, whose own bucket overflows meanwhile (1.2 % at 10 Gbit/s over
  // a window of 160 ms after 8 ms).
  const uint64_t span = 200000ull * len * kNs / link, warm = std::max<uint64_t>(span / 20, 200000000);
  double max_err = 0, got[4] = {};
  uint64_t pkts = 0;
  for (auto _ : st) {
    VSim sim(p);
    for (int k = 0; k < 4; k++)
      if (!(borrow && k == 0)) sim.backlog(1 + k, len, 16);
    sim.run_until(warm);
    uint64_t at[5];
    for (int c = 0; c < 5; c++) at[c] = sim.s.stats(c).sent_bytes;
    sim.run_until(warm + span);
    const double total = double(link) * double(span) / kNs;
    max_err = 0;
    for (int k = 0; k < 4; k++) {
      got[k] = double(sim.s.stats(1 + k).sent_bytes - at[1 + k]) / total;
      if (expect[k] > 0) max_err = std::max(max_err, std::fabs(got[k] - expect[k]) / expect[k]);
    }
    pkts = sim.s.stats(0).sent_pkts;
    st.counters["link_use_pct"] = 100.0 * double(sim.s.stats(0).sent_bytes - at[0]) / total;
  }
  st.counters["link_Bps"] = double(link);
  st.counters["max_rel_err_pct"] = 100 * max_err;
  for (int k = 0; k < 4; k++) {
    st.counters[name_of("share", k, -1, "_pct")] = 100 * got[k];
    st.counters[name_of("expect", k, -1, "_pct")] = 100 * expect[k];
  }
  st.counters["packets"] = double(pkts);
}
BENCHMARK(BM_QosAccuracy)
    ->ArgsProduct({{0, 1, 2, 3, 4}, {0, 1}})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// (b) The portal's tree: 4,096 moats of 4 classes.
constexpr unsigned kMoats = 4096, kClasses = 4, kBurst = 32, kLen = 512;
constexpr uint64_t kPortRate = 125000000000ull;  // 1 Tbit/s: faster than the core
const uint64_t kShares[kClasses] = {40, 30, 20, 10};

Plan portal_plan(uint64_t link) {
  Plan p;
  const uint64_t moat = link / kMoats;
  p.classes.push_back(cls("root", -1, moat * kMoats, moat * kMoats));
  for (unsigned m = 0; m < kMoats; m++) {
    int32_t inner = int32_t(p.classes.size());
    p.classes.push_back(cls(name_of("m", m), 0, moat, moat));
    for (unsigned k = 0; k < kClasses; k++)
      p.classes.push_back(cls(name_of("m", m, int(k)), inner, moat * kShares[k] / 100, moat, k));
  }
  return p;
}

// The leaves in a shuffled order (moat, class), the same for both schedulers.
std::vector<uint32_t> spread() {
  std::vector<uint32_t> v(kMoats * kClasses * 4);
  for (size_t i = 0; i < v.size(); i++) v[i] = uint32_t(i % (kMoats * kClasses));
  std::shuffle(v.begin(), v.end(), std::mt19937(7));
  return v;
}

double g_htb_cycles = 0, g_sched_cycles = 0;

// Cycles per packet of each burst, so the median can be taken: on a shared
// machine the mean carries every preemption that lands inside a burst.
struct CycleSamples {
  std::vector<float> v;
  CycleSamples() { v.reserve(1 << 22); }
  void add(uint64_t cycles, unsigned n) {
    if (n && v.size() < v.capacity()) v.push_back(float(cycles) / float(n));
  }
  double median() {
    if (v.empty()) return 0;
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  }
};

void BM_QosHtbCost(benchmark::State& st) {
  Plan p = portal_plan(kPortRate);
  Scheduler s(p, rte_get_tsc_hz());
  const std::vector<uint32_t> order = spread();
  std::vector<uint32_t> leaf_of(kMoats * kClasses);
  for (unsigned m = 0; m < kMoats; m++)
    for (unsigned k = 0; k < kClasses; k++) leaf_of[m * kClasses + k] = 1 + m * (1 + kClasses) + 1 + k;
  // Handles stand for mbufs: HTB never touches them.
  void* out[kBurst];
  void* in[kBurst];
  uint32_t leaves[kBurst], lens[kBurst];
  std::fill(std::begin(in), std::end(in), &out);
  std::fill(std::begin(lens), std::end(lens), kLen);
  size_t at = 0;
  uint64_t pkts = 0, cycles = 0, drops = 0;
  CycleSamples samples;
  // A standing backlog: 2 packets per leaf.
  for (unsigned r = 0; r < 2; r++)
    for (uint32_t l : leaf_of) s.enqueue(l, &out, kLen, rte_rdtsc());
  for (auto _ : st) {
    // The burst's leaves are the caller's (shape_enqueue: leaf_of per mbuf).
    for (unsigned i = 0; i < kBurst; i++) {
      leaves[i] = leaf_of[order[at]];
      at = at + 1 == order.size() ? 0 : at + 1;
    }
    uint64_t c0 = rte_rdtsc();
    // As the data path queues a burst (dataplane/shape.cc).
    drops += std::popcount(s.enqueue_burst(leaves, in, lens, kBurst, c0));
    unsigned n = s.dequeue(rte_rdtsc(), out, kBurst, nullptr, nullptr);
    uint64_t c = rte_rdtsc() - c0;
    cycles += c;
    samples.add(c, n);
    pkts += n;
  }
  g_htb_cycles = samples.median();
  st.SetItemsProcessed(int64_t(pkts));
  st.counters["cycles_per_pkt_mean"] = double(cycles) / double(pkts);
  st.counters["cycles_per_pkt"] = g_htb_cycles;
  st.counters["enq_drops"] = double(drops);
  st.counters["backlog"] = s.backlog();
}
BENCHMARK(BM_QosHtbCost);

void BM_QosHtbCostShaping(benchmark::State& st) {
  // 4,096 moats at 1 Mbit/s (4 Gbit/s link); every leaf backlogged; the
  // virtual clock moves by each burst's time on the link, so the scheduler
  // runs exactly at the link rate: buckets empty, classes change mode,
  // leaves borrow inside their moat.
  const uint64_t link = uint64_t(kMoats) * 125000;
  Plan p = portal_plan(link);
  Scheduler s(p, kNs);
  std::vector<uint32_t> leaf_of(kMoats * kClasses);
  for (unsigned m = 0; m < kMoats; m++)
    for (unsigned k = 0; k < kClasses; k++) leaf_of[m * kClasses + k] = 1 + m * (1 + kClasses) + 1 + k;
  // Handle = leaf index: the replacement goes to the same leaf.
  uint64_t t = 0;
  for (unsigned r = 0; r < 4; r++)
    for (uint32_t l : leaf_of)
      // one in four moats keeps only its 10 % class busy: it borrows the moat's rate
      if (((l - 1) / (1 + kClasses)) % 4 != 1 || (l - 1) % (1 + kClasses) == kClasses) s.enqueue(l, reinterpret_cast<void*>(uintptr_t(l)), kLen, t);
  void* out[kBurst];
  uint64_t pkts = 0, cycles = 0;
  CycleSamples samples;
  for (auto _ : st) {
    uint64_t c0 = rte_rdtsc();
    unsigned n = s.dequeue(t, out, kBurst, nullptr, nullptr);
    for (unsigned i = 0; i < n; i++) s.enqueue(uint32_t(reinterpret_cast<uintptr_t>(out[i])), out[i], kLen, t);
    uint64_t c = rte_rdtsc() - c0;
    cycles += c;
    samples.add(c, n);
    pkts += n;
    t = std::max(t + 1, s.next_send(t));
  }
  st.SetItemsProcessed(int64_t(pkts));
  st.counters["cycles_per_pkt_mean"] = double(cycles) / double(pkts ? pkts : 1);
  st.counters["cycles_per_pkt"] = samples.median();
  st.counters["link_use_pct"] = 100.0 * double(s.stats(0).sent_bytes) / (double(link) * double(t) / kNs);
}
BENCHMARK(BM_QosHtbCostShaping);

void BM_QosRteSchedCost(benchmark::State& st) {
  static rte_mempool* mp = rte_pktmbuf_pool_create("qos_bench", 262143, 256, 0, 128, 0);
  if (!mp) {
    st.SkipWithError("mempool");
    return;
  }
  const uint64_t pipe_rate = kPortRate / kMoats;
  rte_sched_subport_profile_params sp{};
  sp.tb_rate = kPortRate;
  sp.tb_size = 1000000;
  for (auto& r : sp.tc_rate) r = kPortRate;
  sp.tc_period = 10;
  rte_sched_port_params pp{};
  pp.name = "qos_bench";
  pp.socket = 0;
  pp.rate = kPortRate;
  pp.mtu = 1514;
  pp.frame_overhead = 0;  // HTB counts the length given, nothing more
  pp.n_subports_per_port = 1;
  pp.subport_profiles = &sp;
  pp.n_subport_profiles = 1;
  pp.n_max_subport_profiles = 1;
  pp.n_pipes_per_subport = kMoats;
  rte_sched_port* port = rte_sched_port_config(&pp);
  if (!port) {
    st.SkipWithError("rte_sched_port_config");
    return;
  }
  // Traffic classes 0..3 carry the four classes (strict priority, each
  // capped at the pipe's rate: rte_sched cannot borrow between them);
  // 4..11 unused; best effort (12) must exist.
  rte_sched_pipe_params pipe{};
  pipe.tb_rate = pipe_rate;
  pipe.tb_size = 1514 * 4;
  for (unsigned k = 0; k < kClasses; k++) pipe.tc_rate[k] = pipe_rate;
  pipe.tc_rate[RTE_SCHED_TRAFFIC_CLASS_BE] = pipe_rate;
  pipe.tc_period = 10;
  pipe.tc_ov_weight = 1;
  for (auto& w : pipe.wrr_weights) w = 1;
  rte_sched_subport_params sub{};
  sub.n_pipes_per_subport_enabled = kMoats;
  for (unsigned k = 0; k < kClasses; k++) sub.qsize[k] = 64;
  sub.qsize[RTE_SCHED_TRAFFIC_CLASS_BE] = 16;
  sub.pipe_profiles = &pipe;
  sub.n_pipe_profiles = 1;
  sub.n_max_pipe_profiles = 1;
  if (rte_sched_subport_config(port, 0, &sub, 0) != 0) {
    st.SkipWithError("rte_sched_subport_config");
    rte_sched_port_free(port);
    return;
  }
  for (uint32_t m = 0; m < kMoats; m++)
    if (rte_sched_pipe_config(port, 0, m, 0) != 0) {
      st.SkipWithError("rte_sched_pipe_config");
      rte_sched_port_free(port);
      return;
    }
  const std::vector<uint32_t> order = spread();
  auto fill = [&](rte_mbuf** b, unsigned n, size_t& at) {
    if (rte_pktmbuf_alloc_bulk(mp, b, n) != 0) return false;
    for (unsigned i = 0; i < n; i++) {
      uint32_t q = order[at];
      at = at + 1 == order.size() ? 0 : at + 1;
      b[i]->pkt_len = b[i]->data_len = kLen;
      rte_sched_port_pkt_write(port, b[i], 0, q / kClasses, q % kClasses, 0, RTE_COLOR_GREEN);
    }
    return true;
  };
  rte_mbuf* in[kBurst];
  rte_mbuf* out[kBurst];
  size_t at = 0;
  // The same standing backlog as HTB's: 2 packets per queue.
  for (unsigned r = 0; r < 2 * kMoats * kClasses / kBurst; r++) {
    if (!fill(in, kBurst, at)) break;
    rte_sched_port_enqueue(port, in, kBurst);  // drops are freed inside
  }
  uint64_t pkts = 0, cycles = 0, enq = 0;
  CycleSamples samples;
  for (auto _ : st) {
    st.PauseTiming();  // mbuf allocation and path writing are the caller's
    if (!fill(in, kBurst, at)) {
      st.SkipWithError("mbufs");
      break;
    }
    st.ResumeTiming();
    uint64_t c0 = rte_rdtsc();
    enq += rte_sched_port_enqueue(port, in, kBurst);
    int n = rte_sched_port_dequeue(port, out, kBurst);
    uint64_t c = rte_rdtsc() - c0;
    cycles += c;
    samples.add(c, unsigned(n));
    pkts += uint64_t(n);
    st.PauseTiming();
    rte_pktmbuf_free_bulk(out, unsigned(n));
    st.ResumeTiming();
  }
  g_sched_cycles = samples.median();
  st.SetItemsProcessed(int64_t(pkts));
  st.counters["cycles_per_pkt_mean"] = double(cycles) / double(pkts ? pkts : 1);
  st.counters["cycles_per_pkt"] = g_sched_cycles;
  st.counters["enq_accepted"] = double(enq);
  rte_mbuf* drain[256];
  int n;
  while ((n = rte_sched_port_dequeue(port, drain, 256)) > 0) rte_pktmbuf_free_bulk(drain, unsigned(n));
  rte_sched_port_free(port);
}
BENCHMARK(BM_QosRteSchedCost);

void BM_QosCostRatio(benchmark::State& st) {
  for (auto _ : st) benchmark::DoNotOptimize(g_htb_cycles);
  st.counters["htb_cycles_per_pkt"] = g_htb_cycles;
  st.counters["rte_sched_cycles_per_pkt"] = g_sched_cycles;
  st.counters["htb_over_rte_sched"] = g_sched_cycles > 0 ? g_htb_cycles / g_sched_cycles : 0;
}
BENCHMARK(BM_QosCostRatio)->Iterations(1);

// (c) Arg: link index. Voice (prio 0, 10 %) offered 5 % in 200-byte packets;
// three bulk classes backlogged with 1514-byte packets.
void BM_QosTopPrioDelay(benchmark::State& st) {
  const uint64_t link = kLinks[st.range(0)];
  Plan p;
  p.classes = {cls("root", -1, link, link), cls("voice", 0, link / 10, link / 10, 0),
               cls("bulk1", 0, link * 3 / 10, link, 1), cls("bulk2", 0, link * 3 / 10, link, 1),
               cls("bulk3", 0, link * 3 / 10, link, 2)};
  const uint32_t vlen = 200;
  double worst = 0;
  for (auto _ : st) {
    VSim sim(p);
    for (uint32_t b = 2; b <= 4; b++) sim.backlog(b, 1514, 16);
    sim.periodic_leaf = 1;
    sim.periodic_len = vlen;
    sim.periodic_every = vlen * kNs / (link / 20) + 7;  // 5 % of the link, off the bulk's beat
    sim.run_until(20000ull * 1514 * kNs / link);        // 20,000 MTU times
    worst = double(sim.worst_delay) / (1514.0 * kNs / double(link));
  }
  st.counters["link_Bps"] = double(link);
  st.counters["worst_delay_mtu_times"] = worst;
  st.counters["bound_mtu_times"] = (1514.0 + vlen) / 1514.0;
}
BENCHMARK(BM_QosTopPrioDelay)->DenseRange(0, 4)->Iterations(1)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  const char* eal[] = {"bench_qos", "--no-huge", "-m", "1024", "--no-pci", "--no-shconf", "-l", "0", "--log-level", "error"};
  if (rte_eal_init(sizeof(eal) / sizeof(eal[0]), const_cast<char**>(eal)) < 0) return 1;
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  rte_eal_cleanup();
  return 0;
}
