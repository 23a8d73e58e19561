// Stage route with the control thread's RouteTable: longest prefix wins,
// connected and local routes, route types, TTL handling with a checksum
// verified independently, and deletion falling back to the covering route;
// ESP outer packets' cached way out following every route and neighbour change.
#include <gtest/gtest.h>
#include <rte_hash.h>
#include <rte_hash_crc.h>
#include <rte_malloc.h>

#include <algorithm>
#include <functional>
#include <memory>

#include "ctrl/control.hh"
#include "tests/test_util.hh"

using namespace moat;
using namespace moat::test;

namespace {

struct RouteTest : testing::Test {
  Tables t;
  Config c;
  TunnelIds tunnel_ids;
  std::vector<PortState> ports;
  std::unique_ptr<PortTable> pt = std::make_unique<PortTable>();
  std::unique_ptr<Worker> w = std::make_unique<Worker>();
  std::unique_ptr<RouteTable> rt;
  static inline int gen = 0;

  void SetUp() override {
    size_t sz = rte_rcu_qsbr_get_memsize(1);
    t.qsbr = static_cast<rte_rcu_qsbr*>(rte_zmalloc(nullptr, sz, 64));
    rte_rcu_qsbr_init(t.qsbr, 1);
    rte_lpm_config lc{};
    lc.max_rules = 1024;
    lc.number_tbl8s = 256;
    t.lpm = rte_lpm_create(("rt_test" + std::to_string(gen++)).c_str(), 0, &lc);
    ASSERT_NE(t.lpm, nullptr);
    t.next_hops = static_cast<NextHop*>(rte_zmalloc(nullptr, sizeof(NextHop) * kMaxNextHops, 64));
    t.ports.store(pt.get());
    for (int i = 0; i < 2; i++) {
      PortConfig p;
      p.name = i ? "lan" : "wan";
      p.address = Ipv4Prefix{i ? 0x0a010001u : 0xc0000202u, 24};
      c.ports.push_back(p);
      ports.push_back(PortState{uint16_t(i), 1, {}, false});
      pt->port[i].configured = true;
      pt->port[i].addr = p.address->addr;
      pt->port[i].plen = 24;
      pt->port[i].mtu = 1500;
    }
    rt = std::make_unique<RouteTable>(t, c, tunnel_ids, ports);
    rt->add_connected(0);
    rt->add_connected(1);
    w->icmp_limiter.configure(1000, 1000, 1000000);
    w->now_tsc = 1;
  }
  void TearDown() override {
    rte_lpm_free(t.lpm);
    rte_free(t.next_hops);
    rte_free(t.qsbr);
    for (uint16_t i = 0; i < w->generated.n; i++) rte_pktmbuf_free(w->generated.pkts[i]);
    for (uint16_t i = 0; i < w->local.n; i++) rte_pktmbuf_free(w->local.pkts[i]);
  }
  // Routes one packet; returns it if passed on (caller frees), else nullptr.
  rte_mbuf* run(uint32_t dst, uint8_t ttl = 64, uint16_t len = 40, bool df = false) {
    auto f = ipv4_frame(0x0a010002, dst, 17, ttl, std::vector<uint8_t>(len - 20, 0), df ? 0x4000 : 0);
    rte_mbuf* m = to_mbuf(test_pool(), f.b, 1);
    meta(m) = PktMeta{};
    meta(m).l3_off = 14;
    meta(m).in_port = 1;
    Burst b;
    b.push(m);
    route(*w, t, *pt, b);
    return b.n ? b.pkts[0] : nullptr;
  }
  uint64_t drops(Drop d) { return w->stats.drops[static_cast<unsigned>(d)].load(); }
};

}  // namespace

TEST_F(RouteTest, LongestPrefixWins) {
  ASSERT_TRUE(rt->add({0, 0}, RouteType::unicast, 0xc0000201, "", RouteTable::Origin::config));
  ASSERT_TRUE(rt->add({0x0a090000, 16}, RouteType::unicast, 0x0a0100fe, "", RouteTable::Origin::config));
  rte_mbuf* m = run(0x0a090005);
  ASSERT_TRUE(m);
  EXPECT_EQ(meta(m).out_port, 1);
  EXPECT_EQ(meta(m).nh_ip, 0x0a0100feu);
  rte_pktmbuf_free(m);
  m = run(0x08080808);
  ASSERT_TRUE(m);
  EXPECT_EQ(meta(m).out_port, 0);
  EXPECT_EQ(meta(m).nh_ip, 0xc0000201u);
  rte_pktmbuf_free(m);
  m = run(0x0a010063);  // connected: resolve the destination itself
  ASSERT_TRUE(m);
  EXPECT_EQ(meta(m).nh_ip, 0x0a010063u);
  rte_pktmbuf_free(m);
}

TEST_F(RouteTest, NoRouteAnswersNetUnreachable) {
  EXPECT_EQ(run(0x08080808), nullptr);
  EXPECT_EQ(drops(Drop::no_route), 1u);
  ASSERT_EQ(w->generated.n, 1);
  auto out = bytes(w->generated.pkts[0]);
  EXPECT_EQ(out[34], 3);
  EXPECT_EQ(out[35], 0);
}

TEST_F(RouteTest, TtlIsDecrementedWithAValidChecksum) {
  ASSERT_TRUE(rt->add({0, 0}, RouteType::unicast, 0xc0000201, "", RouteTable::Origin::config));
  for (uint8_t ttl : {2, 64, 255}) {
    rte_mbuf* m = run(0x08080808, ttl);
    ASSERT_TRUE(m);
    auto out = bytes(m);
    EXPECT_EQ(out[22], ttl - 1);
    EXPECT_EQ(ref_checksum(&out[14], 20), 0) << "ttl " << int(ttl);
    rte_pktmbuf_free(m);
  }
}

TEST_F(RouteTest, TtlOneExpiresWithTimeExceeded) {
  ASSERT_TRUE(rt->add({0, 0}, RouteType::unicast, 0xc0000201, "", RouteTable::Origin::config));
  EXPECT_EQ(run(0x08080808, 1), nullptr);
  EXPECT_EQ(run(0x08080808, 0), nullptr);
  EXPECT_EQ(drops(Drop::ttl_expired), 2u);
  ASSERT_EQ(w->generated.n, 2);
  auto out = bytes(w->generated.pkts[0]);
  EXPECT_EQ(out[34], 11);
  EXPECT_EQ((uint32_t(out[26]) << 24 | out[27] << 16 | out[28] << 8 | out[29]), 0x0a010001u) << "from the ingress address";
}

TEST_F(RouteTest, LocalAddressesGoToLocalDelivery) {
  EXPECT_EQ(run(0x0a010001), nullptr);
  EXPECT_EQ(run(0xc0000202), nullptr) << "any of our addresses, whatever the ingress port";
  EXPECT_EQ(run(0x0a0100ff), nullptr) << "directed broadcast";
  EXPECT_EQ(w->local.n, 3);
}

TEST_F(RouteTest, RouteTypes) {
  ASSERT_TRUE(rt->add({0x0a420000, 16}, RouteType::prohibit, 0, "", RouteTable::Origin::config));
  ASSERT_TRUE(rt->add({0x0a430000, 16}, RouteType::blackhole, 0, "", RouteTable::Origin::config));
  ASSERT_TRUE(rt->add({0x0a440000, 16}, RouteType::unreachable, 0, "", RouteTable::Origin::config));
  EXPECT_EQ(run(0x0a420001), nullptr);
  EXPECT_EQ(run(0x0a430001), nullptr);
  EXPECT_EQ(run(0x0a440001), nullptr);
  EXPECT_EQ(drops(Drop::prohibited_route), 1u);
  EXPECT_EQ(drops(Drop::blackhole_route), 1u);
  EXPECT_EQ(drops(Drop::unreachable_route), 1u);
  ASSERT_EQ(w->generated.n, 2) << "blackhole is silent";
  EXPECT_EQ(bytes(w->generated.pkts[0])[35], 13) << "admin prohibited";
}

TEST_F(RouteTest, DfPacketOverMtuGetsFragNeededWithTheMtu) {
  ASSERT_TRUE(rt->add({0, 0}, RouteType::unicast, 0xc0000201, "", RouteTable::Origin::config));
  pt->port[0].mtu = 1400;
  EXPECT_EQ(run(0x08080808, 64, 1450, true), nullptr);
  EXPECT_EQ(drops(Drop::frag_needed), 1u);
  ASSERT_EQ(w->generated.n, 1);
  auto out = bytes(w->generated.pkts[0]);
  EXPECT_EQ(out[34], 3);
  EXPECT_EQ(out[35], 4);
  EXPECT_EQ(out[40] << 8 | out[41], 1400);
  rte_mbuf* m = run(0x08080808, 64, 1450, false);
  ASSERT_TRUE(m) << "without DF it passes on, to be fragmented at egress";
  rte_pktmbuf_free(m);
}

TEST_F(RouteTest, DeleteFallsBackToCoveringRouteAndReplaceUpdates) {
  ASSERT_TRUE(rt->add({0, 0}, RouteType::unicast, 0xc0000201, "", RouteTable::Origin::config));
  ASSERT_TRUE(rt->add({0x08080800, 24}, RouteType::unicast, 0x0a0100fe, "", RouteTable::Origin::cli));
  rte_mbuf* m = run(0x08080808);
  EXPECT_EQ(meta(m).out_port, 1);
  rte_pktmbuf_free(m);
  ASSERT_TRUE(rt->add({0x08080800, 24}, RouteType::unicast, 0x0a0100fd, "", RouteTable::Origin::cli));
  m = run(0x08080808);
  EXPECT_EQ(meta(m).nh_ip, 0x0a0100fdu);
  rte_pktmbuf_free(m);
  ASSERT_TRUE(rt->del({0x08080800, 24}));
  m = run(0x08080808);
  EXPECT_EQ(meta(m).out_port, 0);
  rte_pktmbuf_free(m);
  EXPECT_FALSE(rt->del({0x08080800, 24})) << "already gone";
  EXPECT_FALSE(rt->del({0x0a010000, 24})) << "connected routes belong to the port";
  EXPECT_FALSE(rt->add({0x01000000, 8}, RouteType::unicast, 0xac100001, "", RouteTable::Origin::cli)) << "gateway off-link";
}

// A portal routes into thousands of tunnels; the route table finds them by
// name through the index its owner rebuilds wherever the config's tunnel
// list changes (as `ike reload` replaces it).
TEST_F(RouteTest, TunnelRoutesNameTheirTunnelAmongManyAndFollowAReplacedList) {
  for (int i = 0; i < 300; i++) {
    TunnelConfig tc;
    tc.name = "moat-" + std::to_string(i);
    c.tunnels.push_back(tc);
  }
  tunnel_ids = index_tunnels(c.tunnels);
  auto tunnel_of = [&](uint32_t addr) { return rt->routes().at({addr, 24}).port; };
  for (int i : {0, 17, 299}) {
    ASSERT_TRUE(rt->add({0x0b000000u + (uint32_t(i) << 8), 24}, RouteType::tunnel, 0, "moat-" + std::to_string(i),
                        RouteTable::Origin::config));
    EXPECT_EQ(rt->routes().at({0x0b000000u + (uint32_t(i) << 8), 24}).kind, NextHop::tunnel);
    EXPECT_EQ(tunnel_of(0x0b000000u + (uint32_t(i) << 8)), i);
  }
  EXPECT_FALSE(rt->add({0x0c000000, 24}, RouteType::tunnel, 0, "moat-300", RouteTable::Origin::config));
  // The list replaced (as ike reload does): the same names at other places,
  // one new name.
  std::reverse(c.tunnels.begin(), c.tunnels.end());
  TunnelConfig extra;
  extra.name = "moat-300";
  c.tunnels.push_back(extra);
  tunnel_ids = index_tunnels(c.tunnels);
  // A name the index knows, at its new place (a stale index says 17).
  ASSERT_TRUE(rt->add({0x0c000100, 24}, RouteType::tunnel, 0, "moat-17", RouteTable::Origin::config));
  EXPECT_EQ(tunnel_of(0x0c000100), 299 - 17);
  ASSERT_TRUE(rt->add({0x0c000000, 24}, RouteType::tunnel, 0, "moat-300", RouteTable::Origin::config));
  EXPECT_EQ(tunnel_of(0x0c000000), 300);
  ASSERT_TRUE(rt->add({0x0c000200, 24}, RouteType::tunnel, 0, "moat-299", RouteTable::Origin::config));
  EXPECT_EQ(tunnel_of(0x0c000200), 0);
}

namespace {

// What egress_outer sends: each generated (outer ESP) packet's egress port
// and destination MAC, in order, taken from the workers' transmit buffers
// (never flushed: the test ports have no ethdev).
struct Sent {
  uint16_t port;
  uint64_t mac;
};

struct OuterTest : RouteTest {
  rte_hash* neigh = nullptr;
  void SetUp() override {
    RouteTest::SetUp();
    rte_hash_parameters hp{};
    hp.name = "outer_test_neigh";
    hp.entries = 64;
    hp.key_len = sizeof(NeighKey);
    hp.hash_func = rte_hash_crc;
    neigh = rte_hash_create(&hp);
    ASSERT_NE(neigh, nullptr);
    t.neigh = neigh;
    w->direct_pool = w->indirect_pool = test_pool();
  }
  void TearDown() override {
    for (auto& tb : w->tx) {
      for (uint16_t i = 0; i < tb.n; i++) rte_pktmbuf_free(tb.pkts[i]);
      tb.n = 0;
    }
    for (uint16_t i = 0; i < w->punt.n; i++) rte_pktmbuf_free(w->punt.pkts[i]);
    rte_hash_free(neigh);
    RouteTest::TearDown();
  }
  // As Control::apply publishes and withdraws a neighbour.
  void publish(uint16_t port, uint32_t ip, uint8_t last) {
    rte_ether_addr a{{0x02, 0, 0, 0, 0x77, last}};
    NeighKey k{ip, port};
    ASSERT_EQ(rte_hash_add_key_data(neigh, &k, reinterpret_cast<void*>(uintptr_t(pack_mac(a)))), 0);
    t.paths_changed();
  }
  void withdraw(uint16_t port, uint32_t ip) {
    NeighKey k{ip, port};
    rte_hash_del_key(neigh, &k);
    t.paths_changed();
  }
  // Outer packets of `len` bytes to `dsts`, as esp_outbound leaves them:
  // the frame's first 14 bytes are egress's to write.
  static Burst outer_burst(const std::vector<uint32_t>& dsts, uint16_t len = 100) {
    Burst b;
    for (uint32_t d : dsts) {
      auto f = ipv4_frame(0xc0000202, d, 50, 64, std::vector<uint8_t>(len - 20, 0));
      std::fill(f.b.begin(), f.b.begin() + 14, 0xee);
      rte_mbuf* m = to_mbuf(test_pool(), f.b);
      meta(m) = PktMeta{};
      meta(m).l3_off = 14;
      meta(m).in_port = kNoPort;
      meta(m).generated = 1;
      b.push(m);
    }
    return b;
  }
  // A burst of `n` outer packets to `dst` of `len` bytes through egress_outer.
  std::vector<Sent> send(uint32_t dst, unsigned n, uint16_t len = 100) {
    Burst b = outer_burst(std::vector<uint32_t>(n, dst), len);
    egress_outer(*w, t, *pt, b);
    EXPECT_EQ(b.n, 0);
    std::vector<Sent> out;
    for (uint16_t p = 0; p < 2; p++) {
      TxBuffer& tb = w->tx[p];
      for (uint16_t i = 0; i < tb.n; i++) {
        auto* eth = rte_pktmbuf_mtod(tb.pkts[i], rte_ether_hdr*);
        uint64_t mac = 0;
        for (int k = 0; k < 6; k++) mac = mac << 8 | eth->dst_addr.addr_bytes[k];
        out.push_back({p, mac});
        rte_pktmbuf_free(tb.pkts[i]);
      }
      tb.n = 0;
    }
    return out;
  }
};

constexpr uint64_t mac_of(uint8_t last) { return 0x020000007700ull | last; }

}  // namespace

// ESP outer packets skip route and the neighbour lookup for a destination
// the worker has resolved; every change the control thread makes to the
// neighbour table or the routes is seen by the next burst, and a packet the
// port cannot carry whole still takes the way that fragments it.
TEST_F(OuterTest, OuterPacketsFollowEveryRouteAndNeighbourChange) {
  constexpr uint32_t kPeer = 0xc6336407;  // 198.51.100.7
  ASSERT_TRUE(rt->add({0, 0}, RouteType::unicast, 0xc0000201, "", RouteTable::Origin::config));
  // Unresolved: held for ARP (punted), nothing learnt.
  EXPECT_TRUE(send(kPeer, 2).empty());
  EXPECT_EQ(w->punt.n, 2);
  publish(0, 0xc0000201, 1);
  for (int burst = 0; burst < 2; burst++) {  // learnt, then from what was learnt
    auto s = send(kPeer, 3);
    ASSERT_EQ(s.size(), 3u) << burst;
    for (auto& x : s) EXPECT_TRUE(x.port == 0 && x.mac == mac_of(1)) << burst;
  }
  publish(0, 0xc0000201, 2);  // the gateway's MAC changes (ARP)
  auto s = send(kPeer, 2);
  ASSERT_EQ(s.size(), 2u);
  for (auto& x : s) EXPECT_TRUE(x.port == 0 && x.mac == mac_of(2));
  // A more specific route through the LAN: the next burst leaves there.
  publish(1, 0x0a0100fe, 3);
  ASSERT_TRUE(rt->add({0xc6336400, 24}, RouteType::unicast, 0x0a0100fe, "", RouteTable::Origin::config));
  s = send(kPeer, 2);
  ASSERT_EQ(s.size(), 2u);
  for (auto& x : s) EXPECT_TRUE(x.port == 1 && x.mac == mac_of(3));
  s = send(kPeer, 1);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_TRUE(s[0].port == 1 && s[0].mac == mac_of(3));
  // Too large for the LAN's MTU: fragmented by egress as before.
  pt->port[1].mtu = 600;
  uint64_t frags = w->stats.fragments.load();
  s = send(kPeer, 1, 1000);
  EXPECT_EQ(s.size(), 2u);
  EXPECT_EQ(w->stats.fragments.load() - frags, 2u);
  pt->port[1].mtu = 1500;
  // The neighbour withdrawn: held for ARP again, not sent to the old MAC.
  withdraw(1, 0x0a0100fe);
  uint16_t punted = w->punt.n;
  EXPECT_TRUE(send(kPeer, 2).empty());
  EXPECT_EQ(w->punt.n, punted + 2);
  // The route removed: back to the default route's gateway.
  ASSERT_TRUE(rt->del({0xc6336400, 24}));
  s = send(kPeer, 1);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_TRUE(s[0].port == 0 && s[0].mac == mac_of(2));
}

// A burst to several neighbours leaves each packet framed for its own
// neighbour and port (egress_outer and egress work the frame out once per
// run of one destination or next hop): destination and source MAC, and the
// 802.1Q tag of a port that has one. `out` is the way out under test.
void framed_per_run(OuterTest& x, const std::function<void(Burst&)>& out) {
  constexpr uint32_t kPeerA = 0xc6336407, kPeerB = 0xc6336408, kPeerC = 0x0a0100c8;  // C: on the LAN
  x.pt->port[0].mac = rte_ether_addr{{0x02, 0, 0, 0, 0xaa, 0}};
  x.pt->port[1].mac = rte_ether_addr{{0x02, 0, 0, 0, 0xbb, 1}};
  x.pt->port[1].vlan = 42;
  ASSERT_TRUE(x.rt->add({0, 0}, RouteType::unicast, 0xc0000201, "", RouteTable::Origin::config));
  ASSERT_TRUE(x.rt->add({kPeerB, 32}, RouteType::unicast, 0xc00002fe, "", RouteTable::Origin::config));
  x.publish(0, 0xc0000201, 1);
  x.publish(0, 0xc00002fe, 2);
  x.publish(1, kPeerC, 3);
  const std::vector<uint32_t> dsts = {kPeerA, kPeerA, kPeerB, kPeerA, kPeerC, kPeerC, kPeerB, kPeerB, kPeerA};
  for (int burst = 0; burst < 2; burst++) {  // learnt, then from what was learnt
    Burst b = OuterTest::outer_burst(dsts);
    out(b);
    ASSERT_EQ(b.n, 0);
    ASSERT_EQ(x.w->tx[0].n + x.w->tx[1].n, dsts.size()) << burst;
    uint16_t at[2] = {0, 0};
    for (uint32_t d : dsts) {
      uint16_t p = d == kPeerC ? 1 : 0;
      rte_mbuf* m = x.w->tx[p].pkts[at[p]++];
      auto* eth = rte_pktmbuf_mtod(m, rte_ether_hdr*);
      uint64_t mac = 0;
      for (int k = 0; k < 6; k++) mac = mac << 8 | eth->dst_addr.addr_bytes[k];
      EXPECT_EQ(mac, mac_of(d == kPeerA ? 1 : d == kPeerB ? 2 : 3)) << burst << " " << std::hex << d;
      EXPECT_TRUE(rte_is_same_ether_addr(&eth->src_addr, &x.pt->port[p].mac)) << burst;
      uint16_t l3 = p ? 18 : 14;
      if (p) {
        EXPECT_EQ(rte_be_to_cpu_16(eth->ether_type), RTE_ETHER_TYPE_VLAN);
        auto* vh = reinterpret_cast<rte_vlan_hdr*>(eth + 1);
        EXPECT_EQ(rte_be_to_cpu_16(vh->vlan_tci), 42);
        EXPECT_EQ(rte_be_to_cpu_16(vh->eth_proto), RTE_ETHER_TYPE_IPV4);
      } else {
        EXPECT_EQ(rte_be_to_cpu_16(eth->ether_type), RTE_ETHER_TYPE_IPV4);
      }
      auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, l3);
      EXPECT_EQ(rte_be_to_cpu_32(ip->dst_addr), d) << burst;  // the IPv4 header is untouched
      EXPECT_EQ(ip->version_ihl, 0x45);
    }
    for (auto& tb : x.w->tx) {
      for (uint16_t i = 0; i < tb.n; i++) rte_pktmbuf_free(tb.pkts[i]);
      tb.n = 0;
    }
  }
}

TEST_F(OuterTest, EachRunOfOneDestinationGetsItsOwnPeersFrame) {
  framed_per_run(*this, [&](Burst& b) { egress_outer(*w, t, *pt, b); });
}

TEST_F(OuterTest, EachRunOfOneNextHopGetsItsOwnNeighboursFrame) {
  framed_per_run(*this, [&](Burst& b) {
    route(*w, t, *pt, b);
    egress(*w, t, *pt, b);
  });
}
