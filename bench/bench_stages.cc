// Micro-benchmarks of the worker's stages on real mbufs: one burst of 32
// UDP packets through parse → route → egress → tx (net_null), against the
// cost of merely making and freeing the same burst. Read the result as the
// ratio of the two, measured in the same run. BM_WorkerPathTunnel sends the
// burst into an ESP tunnel instead (parse → route → policy → spd → esp_mtu →
// esp_outbound, AES-GCM-128 → egress_outer → tx): less BM_MakeAndFree and
// bench_esp's BM_RawGcmDirect, it is the worker's own cost per tunnel packet
// without the harness's generator (bench/esp-pcap.sh), a quick A/B for it.
// BM_WorkerPathTunnelIn is the inbound way: the burst is sealed by an
// outbound SA of the same key (BM_SealOnly: that part alone), then the
// worker takes the ESP packets (parse → route → policy → tunnel_in →
// esp_inbound, anti-replay on → the inner packets' route → policy → egress);
// the difference of the two is the worker's inbound cost with decryption.
//   build/bench/bench_stages --benchmark_format=json
#include <benchmark/benchmark.h>
#include <rte_eal.h>
#include <rte_ethdev.h>
#include <rte_ip.h>
#include <rte_malloc.h>

#include <cstring>
#include <memory>
#include <vector>

#include "ctrl/control.hh"
#include "dataplane/esp.hh"
#include "dataplane/sa.hh"

using namespace moat;

namespace {

// As moatd with the default control.max_sas.
constexpr uint32_t kSadSlots = 4096;

struct Rig {
  rte_mempool* mp = nullptr;
  Tables t;
  Config c;
  TunnelIds tunnel_ids{{"t0", 0}};  // routes into tunnel 0 go to its outbound SA
  std::unique_ptr<Sad> sad;
  std::unique_ptr<EspWorker> ew = std::make_unique<EspWorker>();
  uint32_t seal_sa = 0;
  std::unique_ptr<Classifier> cls;  // an empty rule set, as moatd has without rules
  std::vector<PortState> ports;
  std::unique_ptr<PortTable> pt = std::make_unique<PortTable>();
  std::unique_ptr<Worker> w = std::make_unique<Worker>();
  std::unique_ptr<RouteTable> rt;
  std::vector<uint8_t> frame;

  Rig() {
    mp = rte_pktmbuf_pool_create("bench_stages", 8191, 256, kMbufPrivSize, RTE_MBUF_DEFAULT_BUF_SIZE, 0);
    for (uint16_t p = 0; p < 2; p++) {
      rte_eth_conf conf{};
      rte_eth_dev_configure(p, 1, 1, &conf);
      rte_eth_rx_queue_setup(p, 0, 512, 0, nullptr, mp);
      rte_eth_tx_queue_setup(p, 0, 512, 0, nullptr);
      rte_eth_dev_start(p);
      PortConfig pc;
      pc.name = p ? "b" : "a";
      pc.address = Ipv4Prefix{p ? 0x0a000201u : 0x0a000101u, 24};
      c.ports.push_back(pc);
      ports.push_back(PortState{p, 1, {}, false});
      pt->port[p].configured = true;
      pt->port[p].addr = pc.address->addr;
      pt->port[p].plen = 24;
      pt->port[p].mtu = 1500;
      pt->port[p].mac = rte_ether_addr{{2, 0, 0, 0, 0, uint8_t(p + 1)}};
    }
    size_t sz = rte_rcu_qsbr_get_memsize(1);
    t.qsbr = static_cast<rte_rcu_qsbr*>(rte_zmalloc(nullptr, sz, 64));
    rte_rcu_qsbr_init(t.qsbr, 1);
    rte_lpm_config lc{};
    lc.max_rules = 1024;
    lc.number_tbl8s = 256;
    t.lpm = rte_lpm_create("bench_lpm", 0, &lc);
    t.next_hops = static_cast<NextHop*>(rte_zmalloc(nullptr, sizeof(NextHop) * kMaxNextHops, 64));
    rte_hash_parameters hp{};
    hp.name = "bench_neigh";
    hp.entries = 1024;
    hp.key_len = sizeof(NeighKey);
    hp.extra_flag = RTE_HASH_EXTRA_FLAGS_RW_CONCURRENCY_LF;
    t.neigh = rte_hash_create(&hp);
    t.ports.store(pt.get());
    rt = std::make_unique<RouteTable>(t, c, tunnel_ids, ports);
    rt->add_connected(0);
    rt->add_connected(1);
    rt->add({0, 0}, RouteType::unicast, 0x0a000202, "", RouteTable::Origin::config);
    NeighKey k{0x0a000202, 1};
    rte_hash_add_key_data(t.neigh, &k, reinterpret_cast<void*>(uintptr_t(pack_mac({{2, 0, 0, 0, 0, 9}}))));
    w->burst = 32;
    w->direct_pool = mp;
    w->indirect_pool = mp;
    w->icmp_limiter.configure(100, 20, rte_get_tsc_hz());
    for (int i = 0; i < 10; i++) rt->add({0x0b000000u + (uint32_t(i) << 16), 16}, RouteType::unicast, 0x0a000202, "", RouteTable::Origin::config);
    // Tunnel 0: 12.0.0.0/8 into it, its peer 10.0.2.2 (the neighbour above).
    auto r = Sad::create("bench_stages", kSadSlots, nullptr, 1);
    if (!r) { fprintf(stderr, "%s\n", r.error().c_str()); exit(1); }
    sad.reset(*r);
    if (auto e = esp_worker_init(*ew, "bench_stages"); !e) { fprintf(stderr, "%s\n", e.error().c_str()); exit(1); }
    SaConfig sc;
    sc.spi = 0x100;
    sc.dir = SaDir::outbound;
    sc.tunnel = 0;
    sc.local = 0x0a000201;
    sc.peer = 0x0a000202;
    sc.key.assign(20, 0x42);  // AES-GCM-128 key and salt
    sc.mtu = 1500;
    if (auto a = sad->add_sa(sc); !a) { fprintf(stderr, "%s\n", a.error().c_str()); exit(1); }
    // Inbound: tunnel 0 takes SPI 0x200 from 10.0.1.2 to port a (10.0.1.1);
    // `seal_sa` (tunnel 1, no route) makes its packets with rising numbers.
    SaConfig in = sc;
    in.spi = 0x200;
    in.dir = SaDir::inbound;
    in.local = 0x0a000101;
    in.peer = 0x0a000102;
    if (auto a = sad->add_sa(in); !a) { fprintf(stderr, "%s\n", a.error().c_str()); exit(1); }
    SaConfig seal = in;
    seal.dir = SaDir::outbound;
    seal.tunnel = 1;
    seal.local = 0x0a000102;
    seal.peer = 0x0a000101;
    if (auto a = sad->add_sa(seal); !a) {
      fprintf(stderr, "%s\n", a.error().c_str());
      exit(1);
    } else {
      seal_sa = *a;
    }
    t.sad = sad.get();
    w->esp = ew.get();
    auto compiled = compile(RuleSet{}, 1);
    if (!compiled) { fprintf(stderr, "%s\n", compiled.error().c_str()); exit(1); }
    cls = std::move(*compiled);
    if (auto a = rt->add({0x0c000000u, 8}, RouteType::tunnel, 0, "t0", RouteTable::Origin::config); !a) {
      fprintf(stderr, "%s\n", a.error().c_str());
      exit(1);
    }
  }

  // The generator's footprint, as net_pcap's infinite_rx has it: every
  // packet is copied out of its own mbuf-sized slot of a ring of `gen_n`
  // (its header line read, then its data), so the worker runs beside the
  // same stream of copies as under bench/esp-pcap.sh. 0: no copy.
  static constexpr size_t kGenStride = 2432;  // an mbuf with moatd's private area and headroom
  std::vector<uint8_t> gen;
  size_t gen_n = 0, gen_next = 0;
  void generator(size_t n) {
    if (n == gen_n) return;
    gen.assign(n * kGenStride, 0);
    gen_n = n;
    gen_next = 0;
  }

  // `net`: the destinations' first octet (11: routed to port b; 12: into tunnel 0).
  void make(Burst& b, unsigned size, uint32_t net = 11) {
    rte_mbuf* m[32];
    rte_pktmbuf_alloc_bulk(mp, m, 32);
    for (int i = 0; i < 32; i++) {
      char* p = rte_pktmbuf_append(m[i], uint16_t(size - 4));
      if (gen_n) {
        const uint8_t* src = gen.data() + gen_next * kGenStride;
        gen_next = gen_next + 1 == gen_n ? 0 : gen_next + 1;
        benchmark::DoNotOptimize(*reinterpret_cast<const volatile uint64_t*>(src));
        std::memcpy(p, src + 320, size - 4);
      }
      std::memset(p, 0, 64);
      auto* eth = reinterpret_cast<rte_ether_hdr*>(p);
      eth->dst_addr = pt->port[0].mac;
      eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
      auto* ip = reinterpret_cast<rte_ipv4_hdr*>(eth + 1);
      ip->version_ihl = 0x45;
      ip->total_length = rte_cpu_to_be_16(uint16_t(size - 4 - 14));
      ip->time_to_live = 64;
      ip->next_proto_id = 17;
      ip->src_addr = rte_cpu_to_be_32(0x0a000102);
      ip->dst_addr = rte_cpu_to_be_32((net << 24 | 1) + uint32_t(i) * 0x10000);
      ip->hdr_checksum = rte_ipv4_cksum(ip);
      m[i]->port = 0;
      b.pkts[i] = m[i];
    }
    b.n = 32;
  }
};

Rig* rig;

void BM_MakeAndFree(benchmark::State& s) {
  Burst b;
  for (auto _ : s) {
    rig->make(b, unsigned(s.range(0)));
    rte_pktmbuf_free_bulk(b.pkts, b.n);
  }
  s.SetItemsProcessed(int64_t(s.iterations()) * 32);
}

uint64_t drops_total() {
  uint64_t n = 0;
  for (unsigned d = 0; d < kDropCount; d++) n += rig->w->stats.drops[d].load();
  return n;
}

// The worker's way for the bursts `make` fills, then to net_null. The drops
// and the packets sent per packet made are counters: a figure with drops,
// or with packets that did not leave, is not the way's cost.
template <typename Make>
void worker_path(benchmark::State& s, Make make) {
  Burst b;
  uint64_t tx0 = rig->w->stats.tx.load(), drops0 = drops_total();
  for (auto _ : s) {
    make(b);
    process_burst(*rig->w, rig->t, b);
    tx_flush(*rig->w);
  }
  s.SetItemsProcessed(int64_t(s.iterations()) * 32);
  s.counters["drops"] = double(drops_total() - drops0);
  s.counters["tx_per_packet"] = double(rig->w->stats.tx.load() - tx0) / double(s.iterations() * 32);
}

void BM_WorkerPath(benchmark::State& s) {
  worker_path(s, [&](Burst& b) { rig->make(b, unsigned(s.range(0))); });
}

// Args: packet size, the generator's ring (0: none), rules (0: no rule set
// at all; 1: the empty one moatd has without rules).
void BM_WorkerPathTunnel(benchmark::State& s) {
  rig->generator(size_t(s.range(1)));
  rig->t.classifier.store(s.range(2) ? rig->cls.get() : nullptr);
  worker_path(s, [&](Burst& b) { rig->make(b, unsigned(s.range(0)), 12); });
  rig->t.classifier.store(nullptr);
  rig->generator(0);
}

// Making and freeing the burst with the generator's copies (the part of
// BM_WorkerPathTunnel/S/G that is not the worker's).
void BM_MakeAndFreeGen(benchmark::State& s) {
  rig->generator(size_t(s.range(1)));
  Burst b;
  for (auto _ : s) {
    rig->make(b, unsigned(s.range(0)), 12);
    rte_pktmbuf_free_bulk(b.pkts, b.n);
  }
  s.SetItemsProcessed(int64_t(s.iterations()) * 32);
  rig->generator(0);
}

// A burst of inner packets sealed for tunnel 0's inbound SA, addressed to
// port a as if received there.
void make_sealed(Burst& b, unsigned size) {
  rig->make(b, size);
  for (uint16_t i = 0; i < b.n; i++) {
    PktMeta& md = meta(b.pkts[i]);
    md = PktMeta{};
    md.l3_off = sizeof(rte_ether_hdr);
    md.sa = rig->seal_sa;
  }
  Burst sealed;
  esp_mtu(*rig->w, *rig->ew, *rig->sad, *rig->pt, b, sealed);
  esp_outbound(*rig->w, *rig->ew, *rig->sad, sealed);
  for (uint16_t i = 0; i < sealed.n; i++) {
    rte_mbuf* m = sealed.pkts[i];
    rte_pktmbuf_mtod(m, rte_ether_hdr*)->dst_addr = rig->pt->port[0].mac;
    m->port = 0;
  }
  b = sealed;
}

void BM_SealOnly(benchmark::State& s) {
  Burst b;
  for (auto _ : s) {
    make_sealed(b, unsigned(s.range(0)));
    rte_pktmbuf_free_bulk(b.pkts, b.n);
  }
  s.SetItemsProcessed(int64_t(s.iterations()) * 32);
}

void BM_WorkerPathTunnelIn(benchmark::State& s) {
  worker_path(s, [&](Burst& b) { make_sealed(b, unsigned(s.range(0))); });
}

BENCHMARK(BM_MakeAndFree)->Arg(64)->Arg(1500);
BENCHMARK(BM_WorkerPath)->Arg(64)->Arg(1500);
BENCHMARK(BM_WorkerPathTunnel)
    ->Args({64, 0, 1})->Args({512, 0, 1})->Args({1420, 0, 1})->Args({64, 4096, 1})->Args({64, 300000, 1})
    ->Args({64, 0, 0})->Args({64, 0, 1})->Args({64, 0, 0})->Args({64, 0, 1})->Args({64, 0, 0})->Args({64, 0, 1})
    ->Args({64, 0, 0})->Args({64, 0, 1})->Args({64, 0, 0})->Args({64, 0, 1});
BENCHMARK(BM_MakeAndFreeGen)->Args({64, 4096})->Args({64, 300000});
BENCHMARK(BM_SealOnly)->Arg(64)->Arg(512)->Arg(1420);
BENCHMARK(BM_WorkerPathTunnelIn)->Arg(64)->Arg(512)->Arg(1420);

}  // namespace

int main(int argc, char** argv) {
  const char* eal[] = {"bench_stages", "--no-huge", "-m", "512", "--no-pci", "--no-shconf", "-l", "0", "--log-level", "*:error",
                       "--vdev", "net_null0,no-rx=1", "--vdev", "net_null1,no-rx=1"};
  if (rte_eal_init(sizeof(eal) / sizeof(eal[0]), const_cast<char**>(eal)) < 0) return 1;
  rig = new Rig();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
