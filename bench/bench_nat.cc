// The NAT/conntrack fast path for established flows: bursts of 32 packets of
// masqueraded UDP connections, half in the original direction (kid -> the
// Internet: lookup, state, source rewritten) and half replies (lookup,
// state, destination rewritten), through the stages conntrack and nat on one
// core. Arg: connections in the table (1 or 100,000); packets pick flows in
// a shuffled order so 100,000 connections do not fit the caches by luck.
// BM_NatRestoreOnly is the harness alone (rewriting the 32 headers back to
// their untranslated form each round): subtract it.
//   build/bench/bench_nat --benchmark_format=json
#include <benchmark/benchmark.h>
#include <rte_eal.h>
#include <rte_ip.h>
#include <rte_malloc.h>
#include <rte_udp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>

#include "classifier/acl.hh"
#include "dataplane/nat.hh"
#include "dataplane/worker.hh"

using namespace moat;

namespace {

constexpr uint32_t kWan = 0xc0000202;  // the masquerading address
constexpr unsigned kBurst = 32;

struct Flow {
  uint32_t kid, server;
  uint16_t kid_port, nat_port;
};

struct Rig {
  rte_mempool* mp = nullptr;
  rte_rcu_qsbr* qsbr = nullptr;
  std::unique_ptr<Conntrack> ct;
  std::unique_ptr<Classifier> cls;
  PortTable pt{};
  Worker w;
  std::vector<Flow> flows;
  std::vector<uint32_t> order;
  size_t next = 0;
  rte_mbuf* pkts[kBurst];
  uint8_t templ[kBurst][64];

  explicit Rig(unsigned n) {
    static int gen = 0;
    mp = rte_pktmbuf_pool_create(("bench_nat" + std::to_string(gen)).c_str(), 1023, 0, kMbufPrivSize,
                                 RTE_MBUF_DEFAULT_BUF_SIZE, 0);
    size_t sz = rte_rcu_qsbr_get_memsize(1);
    qsbr = static_cast<rte_rcu_qsbr*>(rte_zmalloc(nullptr, sz, 64));
    rte_rcu_qsbr_init(qsbr, 1);
    CtConfig cc;
    cc.max_connections = std::max(n, 1024u);
    ct = std::move(*Conntrack::create(cc, qsbr, 1, rte_get_tsc_hz(), "bench_ct" + std::to_string(gen)));
    cls = std::move(*compile(RuleSet{}, 5000 + gen));
    gen++;
    pt.port[0].configured = true;
    pt.port[0].addr = kWan;
    std::mt19937 rng(1);
    for (unsigned i = 0; i < n; i++) {
      Flow f{0x0a000000u + i, 0x08080800u + i / 60000, 5000, uint16_t(1024 + i % 60000)};
      CtKey orig{rte_cpu_to_be_32(f.kid), rte_cpu_to_be_32(f.server), rte_cpu_to_be_16(f.kid_port),
                 rte_cpu_to_be_16(53), IPPROTO_UDP};
      CtKey reply{rte_cpu_to_be_32(f.server), rte_cpu_to_be_32(kWan), rte_cpu_to_be_16(53),
                  rte_cpu_to_be_16(f.nat_port), IPPROTO_UDP};
      bool full;
      if (!ct->insert(orig, reply, kNatSrc, ct::kReplySeen, 0, rte_rdtsc(), &full)) abort();
      flows.push_back(f);
    }
    order.resize(n);
    for (unsigned i = 0; i < n; i++) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    rte_pktmbuf_alloc_bulk(mp, pkts, kBurst);
    for (unsigned i = 0; i < kBurst; i++) rte_pktmbuf_append(pkts[i], 64);
  }
  ~Rig() {
    rte_pktmbuf_free_bulk(pkts, kBurst);
    ct.reset();
    rte_mempool_free(mp);
    rte_free(qsbr);
  }

  // 32 packets of the next flows, alternating original and reply, written
  // from scratch (what a NIC would hand us).
  void fill(Burst& b) {
    for (unsigned i = 0; i < kBurst; i++) {
      const Flow& f = flows[order[next]];
      next = next + 1 == order.size() ? 0 : next + 1;
      rte_mbuf* m = pkts[i];
      uint8_t* p = rte_pktmbuf_mtod(m, uint8_t*);
      auto* ip = reinterpret_cast<rte_ipv4_hdr*>(p + 14);
      auto* u = reinterpret_cast<rte_udp_hdr*>(ip + 1);
      bool reply = i & 1;
      ip->version_ihl = 0x45;
      ip->type_of_service = 0;
      ip->total_length = rte_cpu_to_be_16(46);
      ip->packet_id = 0;
      ip->fragment_offset = 0;
      ip->time_to_live = 64;
      ip->next_proto_id = IPPROTO_UDP;
      ip->src_addr = rte_cpu_to_be_32(reply ? f.server : f.kid);
      ip->dst_addr = rte_cpu_to_be_32(reply ? kWan : f.server);
      u->src_port = rte_cpu_to_be_16(reply ? 53 : f.kid_port);
      u->dst_port = rte_cpu_to_be_16(reply ? f.nat_port : 53);
      u->dgram_len = rte_cpu_to_be_16(26);
      u->dgram_cksum = 0x1234;
      ip->hdr_checksum = 0x4321;  // incremental updates do not care what it was
      PktMeta& md = meta(m);
      md.l3_off = 14;
      md.out_port = 0;
      md.out_tunnel = kNoTunnel;
      b.pkts[i] = m;
    }
    b.n = kBurst;
  }
};

void BM_NatRestoreOnly(benchmark::State& s) {
  Rig r(unsigned(s.range(0)));
  Burst b;
  for (auto _ : s) {
    r.fill(b);
    benchmark::DoNotOptimize(b.pkts[0]);
  }
  s.SetItemsProcessed(int64_t(s.iterations()) * kBurst);
}

void BM_NatEstablished(benchmark::State& s) {
  Rig r(unsigned(s.range(0)));
  Burst b;
  uint64_t now = rte_rdtsc();
  for (auto _ : s) {
    r.fill(b);
    r.w.now_tsc = now;
    conntrack(r.w, *r.ct, b);
    nat(r.w, *r.ct, *r.cls, r.pt, b);
    if (b.n != kBurst) s.SkipWithError("a packet was dropped");
  }
  s.SetItemsProcessed(int64_t(s.iterations()) * kBurst);
  s.counters["hits"] = double(r.w.stats.ct_hit.load());
  s.counters["connections"] = double(r.ct->in_use());
}

BENCHMARK(BM_NatRestoreOnly)->Arg(1)->Arg(100000);
BENCHMARK(BM_NatEstablished)->Arg(1)->Arg(100000);

}  // namespace

int main(int argc, char** argv) {
  const char* eal[] = {"bench_nat", "--no-huge", "-m", "1024", "--no-pci", "--no-shconf", "-l", "0", "--log-level", "error"};
  if (rte_eal_init(sizeof(eal) / sizeof(eal[0]), const_cast<char**>(eal)) < 0) return 1;
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  rte_eal_cleanup();
  return 0;
}
