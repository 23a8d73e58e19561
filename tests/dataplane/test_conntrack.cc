// The stateful firewall and NAPT44 through the real stages (parse,
// conntrack, route, classify, dnat, filter, nat, spd) on a three-port moat:
// wan (zone wild), kids, office. Every translated packet is checked against
// a from-scratch checksum recomputation written here (not the code under
// test), and the tuples against what RFC 3022/5508 say.
#include <gtest/gtest.h>
#include <rte_malloc.h>

#include <memory>
#include <random>

#include "classifier/acl.hh"
#include "ctrl/control.hh"
#include "dataplane/nat.hh"
#include "tests/test_util.hh"

using namespace moat;
using namespace moat::test;

namespace {

constexpr uint32_t kWanAddr = 0xc0000202;     // 192.0.2.2
constexpr uint32_t kKidsAddr = 0xc0a80701;    // 192.168.7.1
constexpr uint32_t kOfficeAddr = 0x0a010001;  // 10.1.0.1
constexpr uint32_t kKid = 0xc0a8070a;         // 192.168.7.10
constexpr uint32_t kKid2 = 0xc0a8070b;        // 192.168.7.11
constexpr uint32_t kOfficeHost = 0x0a010005;  // 10.1.0.5
constexpr uint32_t kNet = 0x08080808;         // 8.8.8.8
constexpr uint32_t kRemote = 0xcb007105;      // 203.0.113.5
constexpr uint32_t kRouter = 0xcb007101;      // 203.0.113.1, a router out there
constexpr uint16_t kWan = 0, kKids = 1, kOffice = 2;
constexpr uint8_t kZoneWild = 1, kZoneKids = 2, kZoneOffice = 3, kZoneVpn = 4;
constexpr uint64_t kHz = 1000;  // test TSC: 1000 ticks a second

// ---- frames, built byte by byte with independent checksums ----

uint32_t sum16(const uint8_t* p, size_t n, uint32_t s = 0) {
  for (size_t i = 0; i + 1 < n; i += 2) s += (uint32_t(p[i]) << 8) | p[i + 1];
  if (n & 1) s += uint32_t(p[n - 1]) << 8;
  return s;
}
uint16_t fold(uint32_t s) {
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return uint16_t(~s);
}
uint16_t pseudo_csum(uint32_t src, uint32_t dst, uint8_t proto, const uint8_t* l4, size_t n) {
  uint8_t ph[12] = {uint8_t(src >> 24), uint8_t(src >> 16), uint8_t(src >> 8), uint8_t(src),
                    uint8_t(dst >> 24), uint8_t(dst >> 16), uint8_t(dst >> 8), uint8_t(dst),
                    0, proto, uint8_t(n >> 8), uint8_t(n)};
  return fold(sum16(l4, n, sum16(ph, 12)));
}

std::vector<uint8_t> udp(uint32_t src, uint32_t dst, uint16_t sp, uint16_t dp, size_t len = 20, bool csum = true) {
  std::vector<uint8_t> u{uint8_t(sp >> 8), uint8_t(sp), uint8_t(dp >> 8), uint8_t(dp),
                         uint8_t((8 + len) >> 8), uint8_t(8 + len), 0, 0};
  for (size_t i = 0; i < len; i++) u.push_back(uint8_t(i * 7));
  if (csum) {
    uint16_t c = pseudo_csum(src, dst, 17, u.data(), u.size());
    if (c == 0) c = 0xffff;
    u[6] = c >> 8;
    u[7] = c & 0xff;
  }
  return u;
}

enum : uint8_t { FIN = 1, SYN = 2, RST = 4, PSH = 8, ACK = 16 };

std::vector<uint8_t> tcp(uint32_t src, uint32_t dst, uint16_t sp, uint16_t dp, uint8_t flags, uint32_t seq = 1000,
                         uint32_t ack = 0, size_t len = 0) {
  std::vector<uint8_t> t{uint8_t(sp >> 8), uint8_t(sp), uint8_t(dp >> 8), uint8_t(dp),
                         uint8_t(seq >> 24), uint8_t(seq >> 16), uint8_t(seq >> 8), uint8_t(seq),
                         uint8_t(ack >> 24), uint8_t(ack >> 16), uint8_t(ack >> 8), uint8_t(ack),
                         0x50, flags, 0xff, 0xff, 0, 0, 0, 0};
  for (size_t i = 0; i < len; i++) t.push_back(uint8_t(i));
  uint16_t c = pseudo_csum(src, dst, 6, t.data(), t.size());
  t[16] = c >> 8;
  t[17] = c & 0xff;
  return t;
}

std::vector<uint8_t> echo(uint8_t type, uint16_t id, uint16_t seq) {
  auto p = icmp_echo(id, seq, 24);
  p[0] = type;
  p[2] = p[3] = 0;
  uint16_t c = ref_checksum(p.data(), p.size());
  p[2] = c >> 8;
  p[3] = c & 0xff;
  return p;
}

// An ICMP error quoting `quoted` (an IP packet, from its IPv4 header).
std::vector<uint8_t> icmp_err(uint8_t type, uint8_t code, const std::vector<uint8_t>& quoted, size_t quote = 28) {
  std::vector<uint8_t> p{type, code, 0, 0, 0, 0, 0, 0};
  for (size_t i = 0; i < std::min(quote, quoted.size()); i++) p.push_back(quoted[i]);
  uint16_t c = ref_checksum(p.data(), p.size());
  p[2] = c >> 8;
  p[3] = c & 0xff;
  return p;
}

uint32_t be32at(const std::vector<uint8_t>& b, size_t o) {
  return uint32_t(b[o]) << 24 | uint32_t(b[o + 1]) << 16 | uint32_t(b[o + 2]) << 8 | b[o + 3];
}
uint16_t be16at(const std::vector<uint8_t>& b, size_t o) { return uint16_t(b[o] << 8 | b[o + 1]); }

// Every checksum of an IPv4 packet at `l3`, recomputed from scratch: the
// header; TCP/UDP with the pseudo header (a zero UDP checksum is "none");
// ICMP over the whole message, and inside an ICMP error the quoted
// header's own checksum. Empty string: all right.
std::string bad_checksums(const std::vector<uint8_t>& f, size_t l3 = 14) {
  const uint8_t* ip = &f[l3];
  size_t ihl = (ip[0] & 0xf) * 4;
  size_t total = be16at(f, l3 + 2);
  if (fold(sum16(ip, ihl)) != 0) return "ip header";
  uint32_t src = be32at(f, l3 + 12), dst = be32at(f, l3 + 16);
  const uint8_t* l4 = ip + ihl;
  size_t n = total - ihl;
  switch (ip[9]) {
    case 6:
      if (pseudo_csum(src, dst, 6, l4, n) != 0) return "tcp";
      break;
    case 17:
      if ((l4[6] | l4[7]) && pseudo_csum(src, dst, 17, l4, n) != 0) return "udp";
      break;
    case 1:
      if (fold(sum16(l4, n)) != 0) return "icmp";
      if (l4[0] == 3 || l4[0] == 11) {
        const uint8_t* in = l4 + 8;
        if (fold(sum16(in, (in[0] & 0xf) * 4)) != 0) return "quoted ip header";
      }
      break;
  }
  return "";
}

// ---- the moat under test ----

struct Moat : testing::Test {
  Tables t;
  Config c;
  TunnelIds tunnel_ids;  // no tunnels
  std::vector<PortState> ports;
  std::unique_ptr<PortTable> pt = std::make_unique<PortTable>();
  std::unique_ptr<Worker> w = std::make_unique<Worker>();
  std::unique_ptr<Worker> w1 = std::make_unique<Worker>();
  std::unique_ptr<RouteTable> rt;
  std::unique_ptr<Classifier> cls;
  std::unique_ptr<Conntrack> ct;
  std::vector<rte_mbuf*> generated;
  static inline int gen = 0;

  RuleSet rules() {
    RuleSet rs;
    rs.zones = {"local", "wild", "kids", "office", "vpn"};
    rs.tunnels = {"corp"};
    rs.tunnel_zone = {kZoneVpn};
    auto rule = [](Match m, uint8_t action, uint8_t flags = 0) {
      Rule r;
      r.match = std::move(m);
      r.verdict.action = action;
      r.verdict.flags = flags;
      return r;
    };
    const uint8_t st = Verdict::kStateful;
    auto& f = rs.table[unsigned(Table::filter)];
    f.deflt.action = uint8_t(FilterAction::drop);
    Match m;
    m.in_zones = {kZoneKids};
    m.out_zones = {kZoneWild};
    f.rules.push_back(rule(m, uint8_t(FilterAction::accept), st));  // kids-out
    m = Match{};
    m.in_zones = {kZoneWild};
    m.out_zones = {kZoneKids};
    m.protos = {6};
    m.dports = {{80, 80}};
    f.rules.push_back(rule(m, uint8_t(FilterAction::accept), st));  // the forwarded web server
    m = Match{};
    m.in_zones = {kZoneOffice};
    m.protos = {17};
    m.dports = {{5000, 5000}};
    f.rules.push_back(rule(m, uint8_t(FilterAction::accept)));  // stateless
    m = Match{};
    m.in_zones = {kZoneOffice};
    m.protos = {6, 17};
    m.dports = {{23, 23}};
    f.rules.push_back(rule(m, uint8_t(FilterAction::reject)));
    m = Match{};
    m.in_zones = {kZoneOffice};
    f.rules.push_back(rule(m, uint8_t(FilterAction::accept), st));

    auto& n = rs.table[unsigned(Table::nat)];
    m = Match{};
    m.in_zones = {kZoneKids};
    m.out_zones = {kZoneWild};
    n.rules.push_back(rule(m, uint8_t(NatAction::masquerade)));
    m = Match{};
    m.in_zones = {kZoneOffice};
    m.out_zones = {kZoneWild};
    Rule sn = rule(m, uint8_t(NatAction::snat));
    sn.verdict.a = 0xc6336400 + 10;  // 198.51.100.10-11
    sn.verdict.b = 0xc6336400 + 11;
    n.rules.push_back(sn);
    m = Match{};
    m.in_zones = {kZoneWild};
    m.protos = {6};
    m.dst = {{kWanAddr, 32}};
    m.dports = {{8080, 8080}};
    Rule dn = rule(m, uint8_t(NatAction::dnat));
    dn.verdict.a = kKid;
    dn.verdict.port = 80;
    n.rules.push_back(dn);

    auto& s = rs.table[unsigned(Table::spd)];
    m = Match{};
    m.dst = {{0x0a090000, 16}};
    Rule pr = rule(m, uint8_t(SpdAction::protect));
    pr.verdict.a = 0;
    s.rules.push_back(pr);
    return rs;
  }

  void make_ct(uint32_t max, unsigned workers = 1) {
    CtConfig cc;
    cc.max_connections = max;
    auto r = Conntrack::create(cc, t.qsbr, workers, kHz, "ct_test" + std::to_string(gen++));
    ASSERT_TRUE(r) << r.error();
    ct = std::move(*r);
    t.conntrack = ct.get();
  }

  void SetUp() override {
    size_t sz = rte_rcu_qsbr_get_memsize(2);
    t.qsbr = static_cast<rte_rcu_qsbr*>(rte_zmalloc(nullptr, sz, 64));
    rte_rcu_qsbr_init(t.qsbr, 2);
    rte_lpm_config lc{};
    lc.max_rules = 1024;
    lc.number_tbl8s = 256;
    t.lpm = rte_lpm_create(("ct_rt" + std::to_string(gen++)).c_str(), 0, &lc);
    ASSERT_NE(t.lpm, nullptr);
    t.next_hops = static_cast<NextHop*>(rte_zmalloc(nullptr, sizeof(NextHop) * kMaxNextHops, 64));
    t.ports.store(pt.get());
    const uint32_t addrs[3] = {kWanAddr, kKidsAddr, kOfficeAddr};
    const uint8_t zones[3] = {kZoneWild, kZoneKids, kZoneOffice};
    const char* names[3] = {"wan", "kids", "office"};
    for (int i = 0; i < 3; i++) {
      PortConfig p;
      p.name = names[i];
      p.address = Ipv4Prefix{addrs[i], 24};
      c.ports.push_back(p);
      ports.push_back(PortState{uint16_t(i), 1, {}, false});
      PortInfo& pi = pt->port[i];
      pi.configured = true;
      pi.addr = addrs[i];
      pi.plen = 24;
      pi.mtu = 1500;
      pi.zone = zones[i];
      pi.key = uint8_t(i);
      std::memcpy(pi.mac.addr_bytes, kRouterMac, 6);
    }
    rt = std::make_unique<RouteTable>(t, c, tunnel_ids, ports);
    for (uint16_t i = 0; i < 3; i++) rt->add_connected(i);
    ASSERT_TRUE(rt->add({0, 0}, RouteType::unicast, 0xc0000201, "", RouteTable::Origin::config));
    auto compiled = compile(rules(), 1000 + gen++);
    ASSERT_TRUE(compiled) << compiled.error();
    cls = std::move(*compiled);
    t.classifier.store(cls.get());
    make_ct(1024);
    for (auto* x : {w.get(), w1.get()}) {
      x->icmp_limiter.configure(1000, 1000, kHz);
      x->now_tsc = 1;
    }
    w1->id = 1;
  }
  void TearDown() override {
    for (auto* m : generated) rte_pktmbuf_free(m);
    t.classifier.store(nullptr);
    cls.reset();
    ct.reset();
    rte_lpm_free(t.lpm);
    rte_free(t.next_hops);
    rte_free(t.qsbr);
  }

  // One packet through the worker's stages up to (not including) egress.
  // Returns its bytes when it is forwarded (transit) and sets `out_port`;
  // empty when dropped, delivered locally or answered.
  // One packet through the worker's stages up to the egress: what is left
  // of its burst (local and generated packets are taken care of).
  Burst pass(rte_mbuf* m, Worker& x) {
    Burst b;
    b.push(m);
    parse(x, *pt, b);
    track(x, t, b);
    route(x, t, *pt, b);
    policy(x, t, *pt, b, x.local);
    for (uint16_t i = 0; i < x.local.n; i++) rte_pktmbuf_free(x.local.pkts[i]);
    x.local.n = 0;
    for (uint16_t i = 0; i < x.generated.n; i++) generated.push_back(x.generated.pkts[i]);
    x.generated.n = 0;
    return b;
  }
  // The kids' 40-byte UDP datagram to the net (5555 → 53) in two fragments:
  // the first (MF, offset 0, with the ports) or the later one (no ports).
  rte_mbuf* fragment(bool first) {
    auto whole = udp(kKid, kNet, 5555, 53, 40);
    std::vector<uint8_t> part = first ? std::vector<uint8_t>(whole.begin(), whole.begin() + 24)
                                      : std::vector<uint8_t>(whole.begin() + 24, whole.end());
    return to_mbuf(test_pool(), ipv4_frame(kKid, kNet, 17, 64, part, first ? 0x2000 : 0x0003).b, kKids);
  }
  std::vector<uint8_t> send(uint16_t port, uint32_t src, uint32_t dst, uint8_t proto, std::vector<uint8_t> l4,
                            uint16_t* out_port = nullptr, Worker* wk = nullptr) {
    auto f = ipv4_frame(src, dst, proto, 64, std::move(l4));
    Burst b = pass(to_mbuf(test_pool(), f.b, port), wk ? *wk : *w);
    if (!b.n) return {};
    EXPECT_EQ(b.n, 1);
    std::vector<uint8_t> out = bytes(b.pkts[0]);
    if (out_port) *out_port = meta(b.pkts[0]).out_port;
    rte_pktmbuf_free(b.pkts[0]);
    return out;
  }
  uint64_t drops(Drop d, Worker* wk = nullptr) {
    return (wk ? *wk : *w).stats.drops[static_cast<unsigned>(d)].load();
  }
  const Conn* only_conn() {
    const Conn* found = nullptr;
    unsigned n = 0;
    ct->for_each([&](uint32_t, const Conn& cn) {
      found = &cn;
      n++;
    });
    return n == 1 ? found : nullptr;
  }
  void advance(double seconds) {
    w->now_tsc += uint64_t(seconds * kHz);
    w1->now_tsc = w->now_tsc;
  }
  unsigned sweep() { return ct->sweep(w->now_tsc, ct->capacity()); }
};

}  // namespace

TEST_F(Moat, MasqueradeRoundTripUdp) {
  uint16_t port = 0;
  auto out = send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5555, 53), &port);
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(port, kWan);
  EXPECT_EQ(be32at(out, 26), kWanAddr);  // masqueraded
  EXPECT_EQ(be32at(out, 30), kNet);
  uint16_t nat_port = be16at(out, 34);
  EXPECT_EQ(nat_port, 5555);  // port preserved when free
  EXPECT_EQ(out[22], 63);     // TTL
  EXPECT_EQ(bad_checksums(out), "");
  EXPECT_EQ(w->stats.ct_new.load(), 1u);

  auto back = send(kWan, kNet, kWanAddr, 17, udp(kNet, kWanAddr, 53, nat_port), &port);
  ASSERT_FALSE(back.empty());
  EXPECT_EQ(port, kKids);
  EXPECT_EQ(be32at(back, 26), kNet);
  EXPECT_EQ(be32at(back, 30), kKid);  // de-masqueraded
  EXPECT_EQ(be16at(back, 36), 5555);
  EXPECT_EQ(bad_checksums(back), "");
  EXPECT_EQ(w->stats.ct_hit.load(), 1u);
  const Conn* cn = only_conn();
  ASSERT_NE(cn, nullptr);
  EXPECT_EQ(ct->state(*cn), CtState::udp_stream);
}

TEST_F(Moat, ZeroUdpChecksumStaysZero) {
  auto out = send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5555, 53, 20, false));
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(be16at(out, 40), 0);  // "no checksum" is not invented
  EXPECT_EQ(bad_checksums(out), "");
}

TEST_F(Moat, UnsolicitedInboundIsDropped) {
  // To an inside host directly, and to the moat's address on a port no
  // connection uses.
  EXPECT_TRUE(send(kWan, kNet, kKid, 17, udp(kNet, kKid, 53, 5555)).empty());
  EXPECT_TRUE(send(kWan, kNet, kWanAddr, 17, udp(kNet, kWanAddr, 53, 5555)).empty());
  EXPECT_EQ(drops(Drop::filter_drop), 2u);
  // The outbound flow opens the way back for its replies only.
  ASSERT_FALSE(send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5555, 53)).empty());
  EXPECT_FALSE(send(kWan, kNet, kWanAddr, 17, udp(kNet, kWanAddr, 53, 5555)).empty());
  EXPECT_TRUE(send(kWan, kNet, kWanAddr, 17, udp(kNet, kWanAddr, 54, 5555)).empty());
  EXPECT_TRUE(send(kWan, kRemote, kWanAddr, 17, udp(kRemote, kWanAddr, 53, 5555)).empty());
  EXPECT_EQ(drops(Drop::filter_drop), 4u);
}

TEST_F(Moat, StatelessRuleOpensNoWayBack) {
  ASSERT_FALSE(send(kOffice, kOfficeHost, kNet, 17, udp(kOfficeHost, kNet, 6000, 5000)).empty());
  // SNAT to the pool still needs an entry (NAT is state), so this one is
  // tracked; a stateless rule toward a non-NAT zone is not: office -> kids.
  EXPECT_EQ(ct->in_use(), 1u);
  EXPECT_FALSE(send(kOffice, kOfficeHost, kKid, 17, udp(kOfficeHost, kKid, 6000, 5000)).empty());
  EXPECT_EQ(ct->in_use(), 1u);
  EXPECT_TRUE(send(kKids, kKid, kOfficeHost, 17, udp(kKid, kOfficeHost, 5000, 6000)).empty());
  EXPECT_EQ(drops(Drop::filter_drop), 1u);
}

TEST_F(Moat, TcpStatesAndTimeouts) {
  const CtTimeouts to;
  ASSERT_FALSE(send(kKids, kKid, kNet, 6, tcp(kKid, kNet, 40000, 443, SYN, 100)).empty());
  const Conn* cn = only_conn();
  ASSERT_NE(cn, nullptr);
  EXPECT_EQ(ct->state(*cn), CtState::syn_sent);
  ASSERT_FALSE(send(kWan, kNet, kWanAddr, 6, tcp(kNet, kWanAddr, 443, 40000, SYN | ACK, 500, 101)).empty());
  EXPECT_EQ(ct->state(*cn), CtState::syn_recv);
  ASSERT_FALSE(send(kKids, kKid, kNet, 6, tcp(kKid, kNet, 40000, 443, ACK, 101, 501)).empty());
  EXPECT_EQ(ct->state(*cn), CtState::established);
  EXPECT_EQ(ct->timeout_tsc(*cn), uint64_t(to.tcp_established) * kHz);

  // Idle just under the established timeout: kept; data refreshes it.
  advance(to.tcp_established - 1);
  EXPECT_EQ(sweep(), 0u);
  ASSERT_FALSE(send(kWan, kNet, kWanAddr, 6, tcp(kNet, kWanAddr, 443, 40000, ACK | PSH, 501, 101, 100)).empty());
  advance(to.tcp_established - 1);
  EXPECT_EQ(sweep(), 0u);

  ASSERT_FALSE(send(kKids, kKid, kNet, 6, tcp(kKid, kNet, 40000, 443, FIN | ACK, 101, 601)).empty());
  EXPECT_EQ(ct->state(*cn), CtState::closing);
  ASSERT_FALSE(send(kWan, kNet, kWanAddr, 6, tcp(kNet, kWanAddr, 443, 40000, FIN | ACK, 601, 102)).empty());
  EXPECT_EQ(ct->state(*cn), CtState::time_wait);
  advance(to.tcp_time_wait + 1);
  EXPECT_EQ(sweep(), 1u);
  ct->reclaim();
  EXPECT_EQ(ct->in_use(), 0u);
  // Gone: a late segment from outside meets the filter.
  EXPECT_TRUE(send(kWan, kNet, kWanAddr, 6, tcp(kNet, kWanAddr, 443, 40000, ACK, 602, 102)).empty());
  EXPECT_EQ(drops(Drop::filter_drop), 1u);
}

TEST_F(Moat, TcpResetClosesQuickly) {
  ASSERT_FALSE(send(kKids, kKid, kNet, 6, tcp(kKid, kNet, 40001, 443, SYN)).empty());
  ASSERT_FALSE(send(kWan, kNet, kWanAddr, 6, tcp(kNet, kWanAddr, 443, 40001, RST | ACK, 0, 1001)).empty());
  const Conn* cn = only_conn();
  ASSERT_NE(cn, nullptr);
  EXPECT_EQ(ct->state(*cn), CtState::close);
  advance(CtTimeouts{}.tcp_close - 1);
  EXPECT_EQ(sweep(), 0u);
  advance(2);
  EXPECT_EQ(sweep(), 1u);
}

TEST_F(Moat, UnrepliedSynExpiresAtItsTimeout) {
  ASSERT_FALSE(send(kKids, kKid, kNet, 6, tcp(kKid, kNet, 40002, 443, SYN)).empty());
  advance(CtTimeouts{}.tcp_syn - 1);
  EXPECT_EQ(sweep(), 0u);
  advance(2);
  EXPECT_EQ(sweep(), 1u);
}

TEST_F(Moat, UdpAndIcmpTimeouts) {
  const CtTimeouts to;
  ASSERT_FALSE(send(kKids, kKid, kNet, 17, udp(kKid, kNet, 7000, 53)).empty());
  ASSERT_FALSE(send(kKids, kKid, kNet, 17, udp(kKid, kNet, 7001, 53)).empty());
  ASSERT_FALSE(send(kWan, kNet, kWanAddr, 17, udp(kNet, kWanAddr, 53, 7001)).empty());  // replied
  ASSERT_FALSE(send(kKids, kKid, kNet, 1, echo(8, 77, 1)).empty());
  EXPECT_EQ(ct->in_use(), 3u);
  advance(to.udp + 1);  // unreplied UDP and ICMP (both 30 s) go
  EXPECT_EQ(sweep(), 2u);
  advance(to.udp_stream - to.udp - 2);
  EXPECT_EQ(sweep(), 0u);
  advance(2);
  EXPECT_EQ(sweep(), 1u);
}

TEST_F(Moat, NonSynTcpOpensNothing) {
  EXPECT_TRUE(send(kKids, kKid, kNet, 6, tcp(kKid, kNet, 40003, 443, ACK)).empty());
  EXPECT_EQ(drops(Drop::ct_not_syn), 1u);
  EXPECT_EQ(ct->in_use(), 0u);
}

TEST_F(Moat, IcmpEchoIdentifiersAreTranslated) {
  uint16_t port;
  auto a = send(kKids, kKid, kNet, 1, echo(8, 0x1234, 1));
  auto b = send(kKids, kKid2, kNet, 1, echo(8, 0x1234, 1));  // same id, other host
  ASSERT_FALSE(a.empty());
  ASSERT_FALSE(b.empty());
  EXPECT_EQ(be32at(a, 26), kWanAddr);
  EXPECT_EQ(be32at(b, 26), kWanAddr);
  uint16_t ida = be16at(a, 38), idb = be16at(b, 38);
  EXPECT_EQ(ida, 0x1234);
  EXPECT_NE(idb, ida);
  EXPECT_EQ(bad_checksums(a), "");
  EXPECT_EQ(bad_checksums(b), "");
  auto rb = send(kWan, kNet, kWanAddr, 1, echo(0, idb, 1), &port);
  ASSERT_FALSE(rb.empty());
  EXPECT_EQ(port, kKids);
  EXPECT_EQ(be32at(rb, 30), kKid2);
  EXPECT_EQ(be16at(rb, 38), 0x1234);
  EXPECT_EQ(bad_checksums(rb), "");
  // An echo request from outside with a tracked id is not a reply.
  EXPECT_TRUE(send(kWan, kNet, kWanAddr, 1, echo(8, idb, 1)).empty());
}

TEST_F(Moat, IcmpErrorAboutAMasqueradedFlowIsTranslatedQuoteIncluded) {
  auto sent = udp(kKid, kNet, 5555, 53);
  auto original = ipv4_frame(kKid, kNet, 17, 64, sent).b;
  auto out = send(kKids, kKid, kNet, 17, sent);
  ASSERT_FALSE(out.empty());
  std::vector<uint8_t> as_left(out.begin() + 14, out.end());
  // A router out there refuses it, quoting what it got (the NATed packet).
  for (size_t quote : {28, 48}) {
    uint16_t port;
    auto err = send(kWan, kRouter, kWanAddr, 1, icmp_err(3, 3, as_left, quote), &port);
    ASSERT_FALSE(err.empty()) << quote;
    EXPECT_EQ(port, kKids);
    EXPECT_EQ(be32at(err, 26), kRouter);  // a third party stays itself
    EXPECT_EQ(be32at(err, 30), kKid);
    EXPECT_EQ(bad_checksums(err), "") << quote;
    // The quote is the kid's own packet again (but for the TTL we took).
    const size_t q = 14 + 20 + 8;
    EXPECT_EQ(be32at(err, q + 12), kKid);
    EXPECT_EQ(be32at(err, q + 16), kNet);
    EXPECT_EQ(be16at(err, q + 20), 5555);
    EXPECT_EQ(be16at(err, q + 22), 53);
    EXPECT_EQ(be16at(err, q + 26), be16at(original, 14 + 26));  // UDP checksum as the kid computed it
  }
  // Unrelated errors meet the filter (and its default drop).
  auto other = ipv4_frame(kWanAddr, kNet, 17, 64, udp(kWanAddr, kNet, 9999, 53)).b;
  std::vector<uint8_t> other_ip(other.begin() + 14, other.end());
  EXPECT_TRUE(send(kWan, kRouter, kWanAddr, 1, icmp_err(3, 3, other_ip)).empty());
  EXPECT_EQ(drops(Drop::filter_drop), 1u);
}

TEST_F(Moat, IcmpErrorFromInsideAboutAReplyLeavesMasqueraded) {
  auto out = send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5556, 53));
  ASSERT_FALSE(out.empty());
  auto back = send(kWan, kNet, kWanAddr, 17, udp(kNet, kWanAddr, 53, be16at(out, 34)));
  ASSERT_FALSE(back.empty());
  // The kid answers the reply with port unreachable, quoting it as it got it.
  std::vector<uint8_t> got(back.begin() + 14, back.end());
  uint16_t port;
  auto err = send(kKids, kKid, kNet, 1, icmp_err(3, 3, got), &port);
  ASSERT_FALSE(err.empty());
  EXPECT_EQ(port, kWan);
  EXPECT_EQ(be32at(err, 26), kWanAddr);  // the endpoint itself: masqueraded
  EXPECT_EQ(be32at(err, 30), kNet);
  EXPECT_EQ(be32at(err, 42 + 16), kWanAddr);  // quoted destination as 8.8.8.8 sent it
  EXPECT_EQ(be16at(err, 42 + 22), be16at(out, 34));
  EXPECT_EQ(bad_checksums(err), "");
}

TEST_F(Moat, DnatPortForwardRoundTrip) {
  uint16_t port;
  auto in = send(kWan, kRemote, kWanAddr, 6, tcp(kRemote, kWanAddr, 40000, 8080, SYN), &port);
  ASSERT_FALSE(in.empty());
  EXPECT_EQ(port, kKids);
  EXPECT_EQ(be32at(in, 30), kKid);
  EXPECT_EQ(be16at(in, 36), 80);
  EXPECT_EQ(be32at(in, 26), kRemote);
  EXPECT_EQ(in[22], 63);  // routed twice, TTL taken once
  EXPECT_EQ(bad_checksums(in), "");
  auto out = send(kKids, kKid, kRemote, 6, tcp(kKid, kRemote, 80, 40000, SYN | ACK, 5, 1001), &port);
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(port, kWan);
  EXPECT_EQ(be32at(out, 26), kWanAddr);
  EXPECT_EQ(be16at(out, 34), 8080);
  EXPECT_EQ(bad_checksums(out), "");
  const Conn* cn = only_conn();
  ASSERT_NE(cn, nullptr);
  EXPECT_EQ(cn->nat, kNatDst);
  // Port 8081 is not forwarded.
  EXPECT_TRUE(send(kWan, kRemote, kWanAddr, 6, tcp(kRemote, kWanAddr, 40000, 8081, SYN)).empty());
}

TEST_F(Moat, SpdProtectedPacketsAreNotNated) {
  // office -> 10.9.1.1 is routed to the wan, but the SPD protects it: it
  // goes to the tunnel with its own address (tunnel_down until ESP lands).
  EXPECT_TRUE(send(kOffice, kOfficeHost, 0x0a090101, 17, udp(kOfficeHost, 0x0a090101, 6000, 53)).empty());
  EXPECT_EQ(drops(Drop::tunnel_down), 1u);
  const Conn* cn = only_conn();
  ASSERT_NE(cn, nullptr);
  EXPECT_EQ(cn->nat, 0);
  EXPECT_EQ(cn->key[1].dst, rte_cpu_to_be_32(kOfficeHost));
  // The same host to the Internet: SNAT to the pool.
  auto out = send(kOffice, kOfficeHost, kNet, 17, udp(kOfficeHost, kNet, 6000, 53));
  ASSERT_FALSE(out.empty());
  uint32_t s = be32at(out, 26);
  EXPECT_TRUE(s == 0xc633640a || s == 0xc633640b);
  EXPECT_EQ(bad_checksums(out), "");
}

TEST_F(Moat, RejectAnswersTcpWithReset) {
  EXPECT_TRUE(send(kOffice, kOfficeHost, kNet, 6, tcp(kOfficeHost, kNet, 41000, 23, SYN, 7777)).empty());
  EXPECT_EQ(drops(Drop::filter_reject), 1u);
  ASSERT_EQ(generated.size(), 1u);
  auto r = bytes(generated[0]);
  ASSERT_EQ(r.size(), 14u + 40u);
  EXPECT_EQ(r[23], 6);
  EXPECT_EQ(be32at(r, 26), kNet);  // from where the SYN was going
  EXPECT_EQ(be32at(r, 30), kOfficeHost);
  EXPECT_EQ(be16at(r, 34), 23);
  EXPECT_EQ(be16at(r, 36), 41000);
  EXPECT_EQ(be32at(r, 38), 0u);          // seq 0: the SYN had no ACK
  EXPECT_EQ(be32at(r, 42), 7778u);       // acknowledges the SYN
  EXPECT_EQ(r[47], RST | ACK);
  EXPECT_EQ(bad_checksums(r), "");
  EXPECT_EQ(w->stats.rst_sent.load(), 1u);
  // UDP is refused with ICMP admin-prohibited.
  EXPECT_TRUE(send(kOffice, kOfficeHost, kNet, 17, udp(kOfficeHost, kNet, 41000, 23)).empty());
  ASSERT_EQ(generated.size(), 2u);
  auto u = bytes(generated[1]);
  EXPECT_EQ(u[23], 1);
  EXPECT_EQ(u[34], 3);
  EXPECT_EQ(u[35], 13);
  // A RST is never answered.
  EXPECT_TRUE(send(kOffice, kOfficeHost, kNet, 6, tcp(kOfficeHost, kNet, 41000, 23, RST)).empty());
  EXPECT_EQ(generated.size(), 2u);
}

TEST_F(Moat, FullTableRefusesNewAndKeepsEstablished) {
  make_ct(64);
  ASSERT_FALSE(send(kKids, kKid, kNet, 6, tcp(kKid, kNet, 40000, 443, SYN)).empty());
  ASSERT_FALSE(send(kWan, kNet, kWanAddr, 6, tcp(kNet, kWanAddr, 443, 40000, SYN | ACK, 1, 1001)).empty());
  ASSERT_FALSE(send(kKids, kKid, kNet, 6, tcp(kKid, kNet, 40000, 443, ACK, 1001, 2)).empty());
  // A flood of new flows from one source.
  unsigned passed = 0;
  for (uint16_t p = 0; p < 500; p++)
    if (!send(kKids, kKid2, kNet, 17, udp(kKid2, kNet, uint16_t(10000 + p), 53)).empty()) passed++;
  EXPECT_EQ(passed, 63u);
  EXPECT_EQ(drops(Drop::ct_full), 500u - 63u);
  EXPECT_EQ(ct->in_use(), 64u);
  // The established connection carries on both ways.
  for (int i = 0; i < 3; i++) {
    EXPECT_FALSE(send(kKids, kKid, kNet, 6, tcp(kKid, kNet, 40000, 443, ACK | PSH, 1001, 2, 10)).empty());
    EXPECT_FALSE(send(kWan, kNet, kWanAddr, 6, tcp(kNet, kWanAddr, 443, 40000, ACK, 2, 1011)).empty());
  }
  // Once the flood's entries expire, new connections get in again.
  advance(CtTimeouts{}.udp + 1);
  EXPECT_EQ(sweep(), 63u);
  ct->reclaim();
  EXPECT_FALSE(send(kKids, kKid2, kNet, 17, udp(kKid2, kNet, 20000, 53)).empty());
}

TEST_F(Moat, DirectionsOnDifferentWorkers) {
  make_ct(1024, 2);
  uint16_t port;
  // Worker 1 allocates from its own slice of ports: odd offsets from 1024.
  auto out = send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5000, 53), &port, w1.get());
  ASSERT_FALSE(out.empty());
  uint16_t p1 = be16at(out, 34);
  EXPECT_EQ((p1 - 1024) % 2, 1);
  auto back = send(kWan, kNet, kWanAddr, 17, udp(kNet, kWanAddr, 53, p1), &port, w.get());
  ASSERT_FALSE(back.empty());
  EXPECT_EQ(be32at(back, 30), kKid);
  EXPECT_EQ(be16at(back, 36), 5000);
  // Worker 0 keeps the kid's port 5000 (even offset): its slice.
  auto out0 = send(kKids, kKid2, kNet, 17, udp(kKid2, kNet, 5000, 53), &port, w.get());
  ASSERT_FALSE(out0.empty());
  EXPECT_EQ(be16at(out0, 34), 5000);
}

TEST_F(Moat, MasqueradeFollowsTheAddress) {
  auto out = send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5555, 53));
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(be32at(out, 26), kWanAddr);
  // `address set wan 192.0.2.77/24`: new connections take the new address;
  // the control thread expires the old one's connections.
  pt->port[kWan].addr = 0xc000024d;
  EXPECT_EQ(ct->expire_addr(rte_cpu_to_be_32(kWanAddr)), 1u);
  ct->reclaim();
  auto again = send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5555, 53));
  ASSERT_FALSE(again.empty());
  EXPECT_EQ(be32at(again, 26), 0xc000024du);
}

TEST_F(Moat, FirstFragmentIsTranslatedLaterOnesAreDroppedNotLeaked) {
  // First fragment (MF, offset 0): ports present, translated; its UDP
  // checksum covers the whole datagram, so only the incremental update can
  // be right — check it against the full datagram.
  Burst b = pass(fragment(true), *w);
  ASSERT_EQ(b.n, 1);
  auto out = bytes(b.pkts[0]);
  rte_pktmbuf_free(b.pkts[0]);
  EXPECT_EQ(be32at(out, 26), kWanAddr);
  auto whole = udp(kKid, kNet, 5555, 53, 40);
  std::vector<uint8_t> l4(out.begin() + 34, out.end());
  l4.insert(l4.end(), whole.begin() + 24, whole.end());
  EXPECT_EQ(pseudo_csum(kWanAddr, kNet, 17, l4.data(), l4.size()), 0);
  // A later fragment has no ports: it cannot be translated, so it is
  // dropped rather than sent out with the inside address.
  EXPECT_EQ(pass(fragment(false), *w).n, 0);
  EXPECT_EQ(drops(Drop::nat_fragment), 1u);
}

TEST_F(Moat, ErrorsAboutTranslatedPacketsQuoteThemAsTheyArrived) {
  auto out = send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5555, 53));
  ASSERT_FALSE(out.empty());
  // A reply arriving with TTL 1: the moat's time-exceeded must quote the
  // packet as 8.8.8.8 sent it (to 192.0.2.2), not the kid's address.
  auto f = ipv4_frame(kNet, kWanAddr, 17, 1, udp(kNet, kWanAddr, 53, be16at(out, 34))).b;
  rte_mbuf* m = to_mbuf(test_pool(), f, kWan);
  Burst b;
  b.push(m);
  parse(*w, *pt, b);
  conntrack(*w, *ct, b);
  route(*w, t, *pt, b);
  EXPECT_EQ(b.n, 0);
  EXPECT_EQ(drops(Drop::ttl_expired), 1u);
  ASSERT_EQ(w->generated.n, 1);
  auto err = bytes(w->generated.pkts[0]);
  generated.push_back(w->generated.pkts[0]);
  w->generated.n = 0;
  EXPECT_EQ(be32at(err, 30), kNet);
  EXPECT_EQ(err[34], 11);
  EXPECT_EQ(be32at(err, 42 + 16), kWanAddr);  // quoted destination: as sent
  EXPECT_EQ(be16at(err, 42 + 22), be16at(out, 34));
  std::vector<uint8_t> q(err.begin() + 42, err.end());
  std::vector<uint8_t> sent(f.begin() + 14, f.end());
  EXPECT_EQ(q, sent);  // byte for byte, checksums included
  EXPECT_EQ(bad_checksums(err), "");
}

// The lookup skips the hash while no entry is taken from the free ring (a
// router that tracks nothing): it must still find every connection as soon
// as one exists, in both directions, and miss again once all are gone.
TEST_F(Moat, LookupFindsConnectionsAfterTheTableWasEmpty) {
  make_ct(64);
  CtKey a{};
  a.src = 0x0a000102;
  a.dst = 0xc6336401;
  a.sport = 1234;
  a.dport = 53;
  a.proto = 17;
  CtKey b = a;
  b.sport = 1235;
  const CtKey* keys[3] = {&a, &b, &a};
  uint32_t refs[3] = {7, 7, 7};
  ct->lookup(keys, 3, refs);
  EXPECT_EQ(refs[0], 0u);
  EXPECT_EQ(refs[1], 0u);
  EXPECT_EQ(refs[2], 0u);
  bool full = true;
  uint32_t ref = ct->insert(a, reversed(a), 0, 0, 0, 1, &full);
  ASSERT_NE(ref, 0u);
  EXPECT_FALSE(full);
  CtKey ra = reversed(a);
  const CtKey* keys2[3] = {&a, &b, &ra};
  ct->lookup(keys2, 3, refs);
  EXPECT_EQ(refs[0], ref);
  EXPECT_EQ(refs[1], 0u);
  EXPECT_EQ(ct_ref_index(refs[2]), ct_ref_index(ref));
  EXPECT_EQ(ct_ref_dir(refs[2]), 1u);
  // Expired and reclaimed after a grace period (no reader is registered
  // here, so it is over at once): empty again, misses again.
  EXPECT_EQ(ct->expire_all(), 1u);
  ct->reclaim();
  EXPECT_EQ(ct->in_use(), 0u);
  ct->lookup(keys2, 3, refs);
  EXPECT_EQ(refs[0], 0u);
  EXPECT_EQ(refs[2], 0u);
  // And a new connection is found at once.
  uint32_t ref2 = ct->insert(b, reversed(b), 0, 0, 0, 2, &full);
  ASSERT_NE(ref2, 0u);
  ct->lookup(keys2, 3, refs);
  EXPECT_EQ(refs[0], 0u);
  EXPECT_EQ(refs[1], ref2);
}

// nat_rewrite on random packets, checked against full recomputation.
TEST(NatRewrite, ChecksumsMatchRecomputation) {
  std::mt19937 rng(7);
  auto r32 = [&] { return uint32_t(rng()); };
  for (int i = 0; i < 3000; i++) {
    uint32_t src = r32() | 0x01000000, dst = r32() | 0x01000000;
    int kind = i % 4;
    std::vector<uint8_t> l4;
    uint8_t proto = 17;
    if (kind == 0) l4 = udp(src, dst, uint16_t(r32()), uint16_t(r32()), r32() % 60);
    if (kind == 1) l4 = udp(src, dst, uint16_t(r32()), uint16_t(r32()), r32() % 60, false);
    if (kind == 2) l4 = tcp(src, dst, uint16_t(r32()), uint16_t(r32()), uint8_t(r32()), r32(), r32(), r32() % 60), proto = 6;
    if (kind == 3) l4 = echo(i & 4 ? 8 : 0, uint16_t(r32()), uint16_t(r32())), proto = 1;
    auto f = ipv4_frame(src, dst, proto, uint8_t(r32()), l4).b;
    bool zero = kind == 1;
    nat_rewrite(&f[14], uint16_t(f.size() - 14), (i & 1) != 0, r32(), uint16_t(r32()));
    ASSERT_EQ(bad_checksums(f), "") << "packet " << i;
    if (zero) {
      ASSERT_EQ(be16at(f, 40), 0);
    }
    if (kind != 1 && proto == 17) {
      ASSERT_NE(be16at(f, 40), 0);
    }
  }
}

// With no entry in the table the conntrack stage skips the tuples (every
// lookup would miss) and only marks what cannot be tracked. What it marks
// must be what the full stage marks, or the NAT stage would commit a
// connection for a packet it must refuse: a later fragment and an ICMP
// error about nothing known leave untranslated only if untracked.
TEST_F(Moat, EmptyTableStillRefusesToTranslateWhatCannotBeTracked) {
  ASSERT_EQ(ct->in_use(), 0u);
  rte_mbuf* m = fragment(false);
  Burst b;
  b.push(m);
  parse(*w, *pt, b);
  conntrack(*w, *ct, b);
  ASSERT_EQ(b.n, 1);
  EXPECT_EQ(meta(m).ct, kCtNoTrack);
  EXPECT_EQ(meta(m).conn, 0u);
  route(*w, t, *pt, b);
  policy(*w, t, *pt, b, w->local);
  EXPECT_EQ(b.n, 0);
  EXPECT_EQ(drops(Drop::nat_fragment), 1u);
  EXPECT_EQ(ct->in_use(), 0u);
  // An ICMP error from inside about a flow nobody opened: untracked too.
  auto quoted = udp(kNet, kKid, 53, 5555);
  auto qf = ipv4_frame(kNet, kKid, 17, 64, quoted).b;
  std::vector<uint8_t> qip(qf.begin() + 14, qf.end());
  EXPECT_TRUE(send(kKids, kKid, kNet, 1, icmp_err(3, 3, qip)).empty());
  EXPECT_EQ(drops(Drop::nat_fragment), 2u);
  EXPECT_EQ(ct->in_use(), 0u);
  // Echo requests and UDP are trackable: they open connections.
  EXPECT_FALSE(send(kKids, kKid, kNet, 1, echo(8, 77, 1)).empty());
  EXPECT_EQ(ct->in_use(), 1u);
}

// A rule set with no rule whose defaults keep no state and translate
// nothing is stateless: with an empty table the worker skips the conntrack
// and nat passes (nothing would read them), and traffic still passes
// untranslated and untracked. If the rule set is replaced by one that
// translates between the skipped pass and the policy stages, those stages
// still see what the pass would have marked: a later fragment is refused.
TEST_F(Moat, StatelessRuleSetSkipsTrackingAndAReplacementStillRefusesTheUntrackable) {
  RuleSet plain_rs = rules();
  for (auto& tb : plain_rs.table) {
    tb.rules.clear();
    tb.deflt = Verdict{};
  }
  auto plain = compile(plain_rs, 5000 + gen++);
  ASSERT_TRUE(plain) << plain.error();
  ASSERT_TRUE((*plain)->stateless);
  // What each default alone does to it.
  RuleSet masq_rs = plain_rs;
  masq_rs.table[unsigned(Table::nat)].deflt.action = uint8_t(NatAction::masquerade);
  auto masq = compile(masq_rs, 5000 + gen++);
  ASSERT_TRUE(masq) << masq.error();
  EXPECT_FALSE((*masq)->stateless);
  RuleSet st_rs = plain_rs;
  st_rs.table[unsigned(Table::filter)].deflt.flags = Verdict::kStateful;
  auto st = compile(st_rs, 5000 + gen++);
  ASSERT_TRUE(st) << st.error();
  EXPECT_FALSE((*st)->stateless);
  EXPECT_FALSE(cls->stateless) << "the fixture's rules";

  t.classifier.store(plain->get());
  auto out = send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5555, 53, 40));
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(be32at(out, 26), kKid) << "no translation";
  EXPECT_EQ(ct->in_use(), 0u);

  // The later fragment of a datagram: skipped pass, then the masquerading set.
  Burst b;
  b.push(fragment(false));
  parse(*w, *pt, b);
  track(*w, t, b);
  t.classifier.store(masq->get());
  route(*w, t, *pt, b);
  policy(*w, t, *pt, b, w->local);
  EXPECT_EQ(b.n, 0);
  EXPECT_EQ(drops(Drop::nat_fragment), 1u);
  EXPECT_EQ(ct->in_use(), 0u);
  t.classifier.store(cls.get());
}

// ct_plain is ct_tuple's kind without the tuple: the two must agree on
// every packet, valid or not (edge lengths, fragments, every ICMP type).
TEST(CtPlain, AgreesWithCtTuple) {
  std::mt19937 rng(4);
  const uint8_t protos[] = {1, 6, 17, 50, 47, 132, 0, 255};
  unsigned plain = 0, other = 0;
  for (int iter = 0; iter < 200000; iter++) {
    uint8_t buf[128];
    for (auto& x : buf) x = uint8_t(rng());
    buf[0] = uint8_t(0x40 | (iter % 7 == 0 ? rng() & 0xf : 5 + rng() % 3));
    buf[9] = protos[rng() % std::size(protos)];
    if (rng() % 2) buf[6] = buf[7] = 0;           // first fragment, no flags
    else if (rng() % 2) buf[6] = 0x20, buf[7] = 0;  // MF, offset 0
    uint16_t ihl = uint16_t((buf[0] & 0xf) * 4);
    if (buf[9] == 1 && rng() % 2) {
      const uint8_t types[] = {0, 3, 4, 5, 8, 11, 12, 13, 14, 15};
      buf[ihl] = types[rng() % std::size(types)];
      if (rng() % 2) buf[ihl + 8] = uint8_t(0x45);
    }
    uint16_t len = uint16_t(rng() % 80);
    CtKey k;
    bool want = ct_tuple(buf, len, k) == CtKind::plain;
    ASSERT_EQ(ct_plain(buf, len), want) << "iter " << iter << " proto " << int(buf[9]) << " len " << len;
    (want ? plain : other)++;
  }
  EXPECT_GT(plain, 10000u);
  EXPECT_GT(other, 10000u);
}

// A rule set without rules has no rte_acl context: the stage then skips the
// keys, but every table must still answer its default — a filter table
// whose default drops (a config with `filter: []`) drops everything.
TEST_F(Moat, NoRulesStillAnswersEveryTablesDefault) {
  RuleSet rs;
  rs.zones = {"local", "wild", "kids", "office"};
  rs.table[unsigned(Table::filter)].deflt.action = uint8_t(FilterAction::drop);
  auto none = compile(rs, 9000 + gen++);
  ASSERT_TRUE(none) << none.error();
  ASSERT_EQ((*none)->ctx, nullptr);
  t.classifier.store(none->get());
  EXPECT_TRUE(send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5555, 53)).empty());
  EXPECT_EQ(drops(Drop::filter_drop), 1u);
  rs.table[unsigned(Table::filter)].deflt.action = uint8_t(FilterAction::accept);
  auto accept = compile(rs, 9000 + gen++);
  ASSERT_TRUE(accept) << accept.error();
  t.classifier.store(accept->get());
  // Without rules classify writes no verdicts, and no stage reads what the
  // metadata holds: stale verdicts there (3: beyond a rule-less table's
  // one default) stand for nothing.
  auto f = ipv4_frame(kKid, kNet, 17, 64, udp(kKid, kNet, 5555, 53)).b;
  rte_mbuf* m = to_mbuf(test_pool(), f, kKids);
  Burst b, local;
  b.push(m);
  parse(*w, *pt, b);
  std::fill_n(meta(m).rule, kTables, 3u);
  uint64_t before = w->stats.classified.load();
  classify(*w, **accept, *pt, b, local);
  EXPECT_EQ(w->stats.classified.load(), before + 1);
  for (unsigned i = 0; i < kTables; i++) EXPECT_EQ(rule_of(**accept, meta(m), Table(i)), 0u);
  filter(*w, **none, *pt, b);  // the default, drop, whatever the metadata says
  EXPECT_EQ(b.n, 0u);
  EXPECT_EQ(drops(Drop::filter_drop), 2u);
  // A default NAT verdict that translates still does without rules.
  rs.table[unsigned(Table::nat)].deflt.action = uint8_t(NatAction::masquerade);
  auto masq = compile(rs, 9000 + gen++);
  ASSERT_TRUE(masq) << masq.error();
  ASSERT_EQ((*masq)->ctx, nullptr);
  t.classifier.store(masq->get());
  auto out = send(kKids, kKid, kNet, 17, udp(kKid, kNet, 5555, 53));
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(be32at(out, 26), kWanAddr);
  EXPECT_EQ(bad_checksums(out), "");
  EXPECT_EQ(ct->in_use(), 1u);
  t.classifier.store(cls.get());
}
