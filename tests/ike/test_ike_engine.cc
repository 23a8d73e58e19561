// The IKEv2 engine, two instances talking through an in-memory network with
// a hand-driven clock: establishment, identity lookup, NAT-T, message-ID
// window, wrong ICV, wrong AUTH, retransmission and give-up, INITIAL_CONTACT,
// rekey, delete. Assertions are on counters and on what the sink was told.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>

#include <fmt/format.h>

#include "ctrl/ike/config.hh"
#include "ctrl/ike/engine.hh"

using namespace moat::ike;

namespace {

// A datagram between the engines. Off port 500 an IKE message travels
// behind the non-ESP marker (RFC 3948 §2.2); the network keeps it apart
// (`marker`) so that tests read and forge every IKE header at the same
// offsets whichever port it took, and puts it back on delivery.
struct Pkt {
  Endpoint from, to;
  Bytes data;
  bool marker = false;
  Bytes wire() const {
    if (!marker) return data;
    Bytes b(4, 0);
    b.insert(b.end(), data.begin(), data.end());
    return b;
  }
};

struct Net {
  std::deque<Pkt> q;
  std::vector<Pkt> log;
  // Return false to drop; may rewrite (a NAT, an attacker).
  std::function<bool(Pkt&)> filter;
};

class FakeTransport : public Transport {
 public:
  FakeTransport(Net& n, IpAddr me) : net_(n), me_(me) {}
  void send(const Endpoint& local, const Endpoint& remote, ByteView d) override {
    bool marker = local.port != kIkePort && d.size() >= 4 && d[0] == 0 && d[1] == 0 && d[2] == 0 && d[3] == 0;
    net_.q.push_back({local, remote, Bytes(d.begin() + (marker ? 4 : 0), d.end()), marker});
  }
  std::optional<IpAddr> source_for(const IpAddr&) override { return me_; }

 private:
  Net& net_;
  IpAddr me_;
};

// Records what the engine told the data path, and models that data path: the
// SPIs its SAD accepts inbound and the one it sends with, so a test can check
// at every step that whatever one side sends, the other side accepts.
struct RecSink : ChildSaSink {
  std::vector<ChildSa> installed, removed, moved_;
  std::vector<std::pair<ChildSa, ChildSa>> rekeys;
  std::set<uint32_t> in;                // inbound SPIs accepted
  uint32_t out = 0;                     // the SPI we send with (0: none)
  std::map<uint32_t, uint64_t> left;    // outbound SPI -> when we stopped sending with it
  std::map<uint32_t, uint64_t> gone;    // inbound SPI -> when it stopped being accepted
  uint64_t now = 0;                     // set by the fixture
  void install(const ChildSa& sa) override {
    installed.push_back(sa);
    in.insert(sa.spi_in);
    if (!out) out = sa.spi_out;  // a tunnel's first SA (the SAD's add_sa)
  }
  void remove(const ChildSa& sa) override {
    removed.push_back(sa);
    in.erase(sa.spi_in);
    gone[sa.spi_in] = now;
    if (out == sa.spi_out) left[out] = now, out = 0;
  }
  void rekeyed(const ChildSa& o, const ChildSa& n) override {
    rekeys.emplace_back(o, n);
    if (out) left[out] = now;
    out = n.spi_out;
  }
  void moved(const ChildSa& sa) override { moved_.push_back(sa); }
  size_t live() const { return installed.size() - removed.size(); }
};

IpAddr ip(const char* s) { return *IpAddr::parse(s); }

PeerConfig tunnel(const std::string& name, const std::string& local_id, const std::string& remote_id,
                  const std::string& psk, const char* lts, const char* rts) {
  PeerConfig p;
  p.name = name;
  p.local_id = *Identity::parse(local_id);
  p.remote_id = *Identity::parse(remote_id);
  p.psk = to_bytes(psk);
  p.ike_proposals = *parse_proposals("aes128gcm16-prfsha256-x25519, aes256-sha256-modp2048", kProtoIke);
  p.esp_proposals = *parse_proposals("aes128gcm16, aes256-sha256", kProtoEsp);
  std::string why;
  auto l = parse_prefix(lts, &why), r = parse_prefix(rts, &why);
  p.local_ts = {TrafficSelector::from_prefix(l->first, l->second)};
  p.remote_ts = {TrafficSelector::from_prefix(r->first, r->second)};
  return p;
}

struct Node {
  Node(Net& n, const char* addr, EngineOptions o = {})
      : a(ip(addr)), t(n, a), e(t, sink, o, [this](const std::string& s) { logs.push_back(s); }) {}
  IpAddr a;
  FakeTransport t;
  RecSink sink;
  std::vector<std::string> logs;
  Engine e;
};

class Pair : public ::testing::Test {
 protected:
  std::string logs() const {
    std::string s;
    for (auto& l : moat->logs) s += "moat: " + l + "\n";
    for (auto& l : portal->logs) s += "portal: " + l + "\n";
    return s;
  }
  Net net;
  uint64_t now = 1000;
  std::unique_ptr<Node> moat = std::make_unique<Node>(net, "198.51.100.7");
  std::unique_ptr<Node> portal = std::make_unique<Node>(net, "192.0.2.1");
  const std::string psk = "a-long-shared-secret-for-tests";

  void SetUp() override {
    auto m = tunnel("portal", "branch-17@moats.example.net", "portal.example.net", psk, "10.17.0.0/24", "10.0.0.0/8");
    m.remote = Endpoint{portal->a, kIkePort};
    moat->e.set_peers({m}, now);
    portal->e.set_peers({tunnel("branch-16", "portal.example.net", "branch-16@moats.example.net", "other-secret-16-xxxxxx",
                                "10.0.0.0/8", "10.16.0.0/24"),
                         tunnel("branch-17", "portal.example.net", "branch-17@moats.example.net", psk, "10.0.0.0/16",
                                "10.17.0.0/16")},
                        now);
  }

  // A NAT in front of the moat (at whatever address it has when a packet
  // passes): its packets leave from `outside` with ports + `shift`.
  void nat_moat(IpAddr outside, uint16_t shift = 30000) {
    net.filter = [this, outside, shift](Pkt& p) {
      if (p.from.addr == moat->a) {
        p.from.addr = outside;
        p.from.port = uint16_t(p.from.port + shift);
      } else if (p.to.addr == outside) {
        p.to.addr = moat->a;
        p.to.port = uint16_t(p.to.port - shift);
      }
      return true;
    };
  }

  Node* node_at(const IpAddr& a) {
    if (a == moat->a) return moat.get();
    if (a == portal->a) return portal.get();
    return nullptr;
  }

  // Delivers until the network is quiet; checks the data paths after every message.
  void run(int limit = 100) {
    while (!net.q.empty() && limit-- > 0) {
      Pkt p = net.q.front();
      net.q.pop_front();
      if (net.filter && !net.filter(p)) continue;
      net.log.push_back(p);
      moat->sink.now = portal->sink.now = now;
      if (Node* n = node_at(p.to.addr)) n->e.receive(p.to, p.from, p.wire(), now);
      check_datapath();
    }
  }

  // Delivers the next datagram only (through the filter); false when none.
  bool step() {
    if (net.q.empty()) return false;
    Pkt p = net.q.front();
    net.q.pop_front();
    if (net.filter && !net.filter(p)) return true;
    net.log.push_back(p);
    moat->sink.now = portal->sink.now = now;
    if (Node* n = node_at(p.to.addr)) n->e.receive(p.to, p.from, p.wire(), now);
    check_datapath();
    return true;
  }

  PeerConfig moat_peer() const {
    auto m = tunnel("portal", "branch-17@moats.example.net", "portal.example.net", psk, "10.17.0.0/24", "10.0.0.0/8");
    m.remote = Endpoint{portal->a, kIkePort};
    return m;
  }
  // Up with the portal's CHILD SAs living `lifetime_s`, rekeyed at `rekey_s`
  // (less jitter); the moat keeps its defaults.
  void establish_with_portal_child_lifetime(uint32_t lifetime_s, uint32_t rekey_s) {
    auto p = portal_peer();
    p.child_lifetime_s = lifetime_s;
    p.child_rekey_s = rekey_s;
    portal->e.set_peers({p}, now);
    establish();
  }
  PeerConfig portal_peer() const {
    return tunnel("branch-17", "portal.example.net", "branch-17@moats.example.net", psk, "10.0.0.0/16", "10.17.0.0/16");
  }

  void advance(uint64_t ms) {
    now += ms;
    moat->sink.now = portal->sink.now = now;
    moat->e.tick(now);
    portal->e.tick(now);
    check_datapath();
    run();
  }

  // Make-before-break, as the data paths see it: what one side sends with,
  // the other accepts; an SPI one side stopped sending with stays accepted
  // on the other side for at least `in_flight_ms` (packets on the way).
  std::vector<std::string> violations;
  uint64_t in_flight_ms = 1000;
  void check_datapath() {
    auto one_way = [&](const char* an, RecSink& a, const char* bn, RecSink& b) {
      if (a.out && !b.in.count(a.out))
        violations.push_back(fmt::format("t={}: {} sends with {:08x}, which {} does not accept", now, an, a.out, bn));
      for (auto& [spi, t] : b.gone)
        if (auto l = a.left.find(spi); l != a.left.end() && t < l->second + in_flight_ms)
          violations.push_back(fmt::format("t={}: {} dropped inbound {:08x} {} ms after {} stopped sending with it", now,
                                           bn, spi, t - l->second, an));
    };
    if (moat->sink.live() && portal->sink.live()) {
      one_way("moat", moat->sink, "portal", portal->sink);
      one_way("portal", portal->sink, "moat", moat->sink);
    }
  }
  std::string violations_str() const {
    std::string s;
    for (auto& v : violations) s += v + "\n";
    return s;
  }

  void establish() {
    ASSERT_TRUE(moat->e.initiate("portal", now));
    run();
    ASSERT_EQ(moat->e.stats().ike_established, 1u);
    ASSERT_EQ(portal->e.stats().ike_established, 1u);
  }
};

TEST_F(Pair, EstablishesWithMirroredSpisAndKeys) {
  establish();
  ASSERT_EQ(moat->sink.installed.size(), 1u);
  ASSERT_EQ(portal->sink.installed.size(), 1u);
  const ChildSa& m = moat->sink.installed[0];
  const ChildSa& p = portal->sink.installed[0];
  EXPECT_EQ(m.spi_in, p.spi_out);
  EXPECT_EQ(m.spi_out, p.spi_in);
  EXPECT_EQ(m.encr_key_out, p.encr_key_in);
  EXPECT_EQ(m.encr_key_in, p.encr_key_out);
  EXPECT_NE(m.encr_key_in, m.encr_key_out);
  EXPECT_EQ(m.encr_key_in.size(), 20u);  // AES-GCM-128 key + salt
  EXPECT_EQ(p.tunnel, "branch-17");      // found by identity
  EXPECT_EQ(p.peer_id.str(), "branch-17@moats.example.net");
  // Narrowing: the portal allows 10.17.0.0/16 === 10.0.0.0/16; the moat asked 10.17.0.0/24 === 10.0.0.0/8.
  ASSERT_EQ(p.remote_ts.size(), 1u);
  EXPECT_EQ(p.remote_ts[0].str(), "10.17.0.0/24");
  EXPECT_EQ(p.local_ts[0].str(), "10.0.0.0/16");
  EXPECT_EQ(m.remote_ts[0].str(), "10.0.0.0/16");
  EXPECT_FALSE(m.udp_encap);  // no NAT between them: plain ESP
  // RFC 4555 §3.2: both offered MOBIKE and NAT traversal, so IKE left port
  // 500 at IKE_AUTH anyway (a NAT met after a move finds it on 4500).
  EXPECT_EQ(m.remote.port, kNattPort);
  EXPECT_EQ(net.log.back().to.port, kNattPort);
  EXPECT_TRUE(net.log.back().marker);
}

// Without MOBIKE and without a NAT, IKE stays on port 500 (RFC 7296 §2.23).
TEST_F(Pair, WithoutMobikeOrNatIkeStaysOnPort500) {
  auto m = moat_peer();
  m.mobike = false;
  moat->e.set_peers({m}, now);
  establish();
  ASSERT_EQ(moat->sink.installed.size(), 1u);
  EXPECT_EQ(moat->sink.installed[0].remote.port, kIkePort);
  EXPECT_FALSE(moat->sink.installed[0].udp_encap);
  for (auto& p : net.log) EXPECT_EQ(p.to.port == kIkePort ? p.from.port : p.to.port, kIkePort);
  EXPECT_FALSE(net.log.back().marker);
}

TEST_F(Pair, NatIsDetectedAndEverythingMovesTo4500) {
  // The moat sits behind a NAT: 198.51.100.7 appears as 203.0.113.9 with other ports.
  IpAddr outside = ip("203.0.113.9");
  nat_moat(outside);
  establish();
  ASSERT_EQ(portal->sink.installed.size(), 1u);
  const ChildSa& p = portal->sink.installed[0];
  EXPECT_TRUE(p.udp_encap);
  EXPECT_EQ(p.remote.addr, outside);
  EXPECT_EQ(p.remote.port, kNattPort + 30000);
  EXPECT_EQ(p.local.port, kNattPort);
  EXPECT_TRUE(moat->sink.installed[0].udp_encap);
  // IKE_AUTH and later travel with the non-ESP marker on 4500.
  EXPECT_EQ(net.log.back().to.port, kNattPort);
  EXPECT_TRUE(net.log.back().marker);
}

TEST_F(Pair, PeerAddressChangeMovesTheSa) {
  nat_moat(ip("203.0.113.9"));
  establish();
  // The NAT rebinds: a new outside port. The next authenticated message moves the SA.
  IpAddr outside2 = ip("203.0.113.10");
  nat_moat(outside2, 1000);
  ASSERT_TRUE(moat->e.check_liveness("portal", now));
  run();
  ASSERT_EQ(portal->sink.moved_.size(), 1u);
  EXPECT_EQ(portal->sink.moved_[0].remote.addr, outside2);
  EXPECT_EQ(portal->sink.moved_[0].remote.port, kNattPort + 1000);
}

TEST_F(Pair, WrongPskFailsWithoutChild) {
  auto m = tunnel("portal", "branch-17@moats.example.net", "portal.example.net", "not-the-portal's-secret-xx",
                  "10.17.0.0/24", "10.0.0.0/8");
  m.remote = Endpoint{portal->a, kIkePort};
  moat->e.set_peers({m}, now);
  ASSERT_TRUE(moat->e.initiate("portal", now));
  run();
  EXPECT_EQ(portal->e.stats().auth_failed, 1u);
  EXPECT_EQ(moat->e.stats().auth_failed, 1u);  // it got AUTHENTICATION_FAILED
  EXPECT_EQ(portal->sink.installed.size(), 0u);
  EXPECT_EQ(moat->sink.installed.size(), 0u);
  EXPECT_EQ(portal->e.ike_sa_count(), 0u);
}

TEST_F(Pair, UnknownIdentityIsRefusedWhateverItsAddress) {
  auto m = tunnel("portal", "stranger@example.net", "portal.example.net", psk, "10.17.0.0/24", "10.0.0.0/8");
  m.remote = Endpoint{portal->a, kIkePort};
  moat->e.set_peers({m}, now);
  ASSERT_TRUE(moat->e.initiate("portal", now));
  run();
  EXPECT_EQ(portal->e.stats().auth_failed, 1u);
  EXPECT_EQ(portal->e.stats().ike_established, 0u);
}

TEST_F(Pair, NoProposalChosenNamesBothSides) {
  auto m = tunnel("portal", "branch-17@moats.example.net", "portal.example.net", psk, "10.17.0.0/24", "10.0.0.0/8");
  m.ike_proposals = *parse_proposals("aes256gcm16-prfsha384-ecp384", kProtoIke);
  m.remote = Endpoint{portal->a, kIkePort};
  moat->e.set_peers({m}, now);
  ASSERT_TRUE(moat->e.initiate("portal", now));
  run();
  EXPECT_EQ(portal->e.stats().no_proposal_chosen, 1u);
  EXPECT_EQ(moat->e.stats().no_proposal_chosen, 1u);
  EXPECT_EQ(moat->e.ike_sa_count(), 0u);
}

TEST_F(Pair, InvalidKePayloadIsRetriedWithTheRequestedGroup) {
  // The portal only speaks MODP 2048; the moat's first choice is X25519.
  auto p = tunnel("branch-17", "portal.example.net", "branch-17@moats.example.net", psk, "10.0.0.0/16", "10.17.0.0/16");
  p.ike_proposals = *parse_proposals("aes256-sha256-modp2048", kProtoIke);
  portal->e.set_peers({p}, now);
  auto m = tunnel("portal", "branch-17@moats.example.net", "portal.example.net", psk, "10.17.0.0/24", "10.0.0.0/8");
  m.ike_proposals = *parse_proposals("aes256-sha256-x25519-modp2048", kProtoIke);
  m.remote = Endpoint{portal->a, kIkePort};
  moat->e.set_peers({m}, now);
  establish();
  EXPECT_EQ(moat->sink.installed.size(), 1u);
}

TEST_F(Pair, ReplayedRequestIsAnsweredFromCacheNotReprocessed) {
  establish();
  // Find the IKE_AUTH request the moat sent and replay it.
  Pkt auth;
  for (auto& p : net.log)
    if (p.from.addr == moat->a && p.data.size() > kHeaderLen && p.data[18] == uint8_t(Exchange::ike_auth)) auth = p;
  ASSERT_FALSE(auth.data.empty());
  auto before = portal->sink.installed.size();
  net.q.push_back(auth);
  run();
  EXPECT_EQ(portal->e.stats().rx_retransmit, 1u);
  EXPECT_EQ(portal->sink.installed.size(), before);
  EXPECT_EQ(portal->e.stats().ike_established, 1u);
}

TEST_F(Pair, OutOfWindowMessageIdIsDropped) {
  establish();
  Pkt auth;
  for (auto& p : net.log)
    if (p.from.addr == moat->a && p.data.size() > kHeaderLen && p.data[18] == uint8_t(Exchange::ike_auth)) auth = p;
  ASSERT_FALSE(auth.data.empty());
  auth.data[23] += 5;  // message ID 1 -> 6
  net.q.push_back(auth);
  run();
  EXPECT_EQ(portal->e.stats().rx_out_of_window, 1u);
}

TEST_F(Pair, WrongIcvIsDroppedAndCounted) {
  establish();
  // The next request from the moat gets a bit flipped in flight.
  net.filter = [&](Pkt& p) {
    if (p.from.addr == moat->a) p.data[p.data.size() - 3] ^= 0x40;
    return true;
  };
  ASSERT_TRUE(moat->e.check_liveness("portal", now));
  run();
  EXPECT_EQ(portal->e.stats().rx_bad_icv, 1u);
  EXPECT_EQ(portal->e.ike_sa_count(), 1u);  // a forged packet does not kill the SA
}

TEST_F(Pair, UnknownCriticalPayloadInSaInitGetsTheNotify) {
  ChainBuilder c;
  c.add(kPlSa, encode_sa(*parse_proposals("aes128gcm16-prfsha256-x25519", kProtoIke)));
  c.add(99, Bytes{1, 2, 3}, true);
  Header h;
  h.spi_i = 42;
  h.exchange = uint8_t(Exchange::ike_sa_init);
  h.flags = kFlagInitiator;
  Bytes msg = encode_plain(h, c);
  portal->e.receive(Endpoint{portal->a, kIkePort}, Endpoint{moat->a, kIkePort}, msg, now);
  EXPECT_EQ(portal->e.stats().rx_unsupported_critical, 1u);
  ASSERT_EQ(net.q.size(), 1u);
  auto r = parse_message(net.q.front().data);
  ASSERT_TRUE(r);
  auto n = parse_notify(r->find(kPlNotify)->body);
  ASSERT_TRUE(n);
  EXPECT_EQ(n->type, kNUnsupportedCriticalPayload);
  EXPECT_EQ(n->data, Bytes{99});
  EXPECT_EQ(portal->e.ike_sa_count(), 0u);
}

TEST_F(Pair, GarbageNeverCrashesTheResponder) {
  std::mt19937 rng(3);
  for (int i = 0; i < 5000; ++i) {
    Bytes b(rng() % 200);
    for (auto& x : b) x = uint8_t(rng());
    if (b.size() > 28 && (i & 1)) b[17] = 0x20, b[18] = uint8_t(34 + rng() % 4);
    portal->e.receive(Endpoint{portal->a, uint16_t(i & 2 ? kIkePort : kNattPort)}, Endpoint{moat->a, 500}, b, now);
  }
  net.q.clear();
  EXPECT_EQ(portal->e.stats().ike_established, 0u);
  establish();  // still serves legitimate moats
}

TEST_F(Pair, RetransmitsWithBackoffThenGivesUp) {
  net.filter = [&](Pkt& p) { return p.from.addr != portal->a; };  // the portal's answers are lost
  ASSERT_TRUE(moat->e.initiate("portal", now));
  run();
  // Retransmits after 1, 2, 4, 8, 16 s (base 1 s, 5 tries), waits 32 s more, then gives up.
  std::vector<uint64_t> sent_at;
  uint64_t start = now;
  for (int i = 0; i < 62; ++i) {
    size_t n = net.log.size();
    advance(1000);
    for (size_t k = n; k < net.log.size(); ++k)
      if (net.log[k].from.addr == moat->a) sent_at.push_back(now - start);
  }
  EXPECT_EQ(sent_at, (std::vector<uint64_t>{1000, 3000, 7000, 15000, 31000}));
  EXPECT_EQ(moat->e.stats().ike_given_up, 0u);
  advance(1000);
  EXPECT_EQ(moat->e.stats().ike_given_up, 1u);
  EXPECT_EQ(moat->e.ike_sa_count(), 0u);
  // The portal's half-open SAs expire too: one at 30 s, and the one the 31 s
  // retransmit (arriving after that) created, at 61 s. Memory stays bounded.
  EXPECT_EQ(portal->e.ike_sa_count(), 0u);
  EXPECT_EQ(portal->e.stats().half_open_expired, 2u);
}

TEST_F(Pair, SaInitFloodTriggersCookiesAndLegitimateMoatsStillConnect) {
  EngineOptions o;
  o.cookie_threshold = 50;
  o.max_half_open = 1000;
  auto peers = portal->e.peers();
  std::vector<PeerConfig> cfg;
  for (auto& p : peers) cfg.push_back(*p);
  portal = std::make_unique<Node>(net, "192.0.2.1", o);
  portal->e.set_peers(cfg, now);
  // 5000 IKE_SA_INITs from spoofed addresses (their answers go nowhere).
  auto props = *parse_proposals("aes128gcm16-prfsha256-x25519", kProtoIke);
  auto dh = *Dh::create(kDhX25519);
  for (uint32_t i = 0; i < 5000; ++i) {
    ChainBuilder c;
    c.add(kPlSa, encode_sa(props));
    c.add(kPlKe, encode_ke(KePayload{kDhX25519, dh->public_value()}));
    c.add(kPlNonce, random_bytes(32));
    Header h;
    h.spi_i = 1000 + i;
    h.exchange = uint8_t(Exchange::ike_sa_init);
    h.flags = kFlagInitiator;
    portal->e.receive(Endpoint{portal->a, kIkePort}, Endpoint{IpAddr::v4(0x0a000000 + i), 500}, encode_plain(h, c), now);
  }
  net.q.clear();
  // Memory stays bounded: only the first 50 got state, the rest a stateless COOKIE.
  EXPECT_EQ(portal->e.ike_sa_count(), 50u);
  EXPECT_EQ(portal->e.stats().cookie_sent, 4950u);
  establish();
  EXPECT_EQ(portal->e.stats().cookie_sent, 4951u);  // the moat had to show one too
  EXPECT_EQ(portal->sink.installed.size(), 1u);
}

TEST_F(Pair, LargeMessagesTravelInFragments) {
  EngineOptions o;
  o.fragment_size = 160;  // forces IKE_AUTH into several RFC 7383 fragments
  auto keep = [](Node& n) {
    std::vector<PeerConfig> v;
    for (auto& p : n.e.peers()) v.push_back(*p);
    return v;
  };
  auto mp = keep(*moat), pp = keep(*portal);
  moat = std::make_unique<Node>(net, "198.51.100.7", o);
  portal = std::make_unique<Node>(net, "192.0.2.1", o);
  moat->e.set_peers(mp, now);
  portal->e.set_peers(pp, now);
  // One fragment of the moat's IKE_AUTH is lost once: the retransmission completes it.
  bool dropped = false;
  net.filter = [&](Pkt& p) {
    if (!dropped && p.from.addr == moat->a && p.data.size() > kHeaderLen && p.data[16] == kPlSkf) {
      dropped = true;
      return false;
    }
    return true;
  };
  ASSERT_TRUE(moat->e.initiate("portal", now));
  run();
  advance(1000);
  EXPECT_TRUE(dropped);
  EXPECT_EQ(portal->e.stats().ike_established, 1u);
  EXPECT_GE(moat->e.stats().tx_fragments, 3u);
  EXPECT_GE(portal->e.stats().rx_fragments, 3u);
  EXPECT_GE(portal->e.stats().tx_fragments, 2u);
  ASSERT_EQ(moat->sink.installed.size(), 1u);
  EXPECT_EQ(moat->sink.installed[0].encr_key_out, portal->sink.installed[0].encr_key_in);
  // IKE_SA_INIT is never fragmented (it carries no keys yet); everything after is.
  for (auto& p : net.log) {
    if (p.data[18] != uint8_t(Exchange::ike_sa_init)) {
      EXPECT_LE(p.data.size(), 160u);
    }
  }
}

TEST_F(Pair, InitialContactDeletesTheOldSasOfThatIdentity) {
  establish();
  ASSERT_EQ(portal->sink.live(), 1u);
  // The moat reboots: a fresh engine, same identity, new address (its ISP changed it).
  net.log.clear();
  auto m = tunnel("portal", "branch-17@moats.example.net", "portal.example.net", psk, "10.17.0.0/24", "10.0.0.0/8");
  m.remote = Endpoint{portal->a, kIkePort};
  moat = std::make_unique<Node>(net, "198.51.100.99");
  moat->e.set_peers({m}, now);
  ASSERT_TRUE(moat->e.initiate("portal", now));
  run();
  EXPECT_EQ(portal->e.stats().initial_contact_deleted, 1u);
  EXPECT_EQ(portal->e.ike_sa_count(), 1u);
  EXPECT_EQ(portal->sink.live(), 1u);
  EXPECT_EQ(portal->sink.installed.back().remote.addr, ip("198.51.100.99"));
}

TEST_F(Pair, ChildRekeyIsMakeBeforeBreak) {
  establish();
  ChildSa first = moat->sink.installed[0];
  ASSERT_TRUE(moat->e.rekey_child("portal", now));
  run();
  ASSERT_EQ(moat->sink.rekeys.size(), 1u);
  ASSERT_EQ(portal->sink.rekeys.size(), 1u);
  // New SA installed on both sides before the old one goes.
  ASSERT_EQ(moat->sink.installed.size(), 2u);
  ASSERT_EQ(portal->sink.installed.size(), 2u);
  EXPECT_EQ(moat->sink.installed[1].spi_in, portal->sink.installed[1].spi_out);
  EXPECT_EQ(moat->sink.installed[1].encr_key_out, portal->sink.installed[1].encr_key_in);
  EXPECT_NE(moat->sink.installed[1].encr_key_out, first.encr_key_out);
  // Both send with the new SA; the old one's inbound halves linger for
  // packets in flight, then go.
  EXPECT_EQ(moat->sink.out, moat->sink.installed[1].spi_out);
  EXPECT_EQ(portal->sink.out, portal->sink.installed[1].spi_out);
  EXPECT_EQ(moat->sink.removed.size(), 0u);
  EXPECT_EQ(portal->sink.removed.size(), 0u);
  EXPECT_TRUE(moat->e.show(now)[0]["children"].size() == 1u);
  advance(EngineOptions{}.rekey_linger_ms);
  ASSERT_EQ(moat->sink.removed.size(), 1u);
  EXPECT_EQ(moat->sink.removed[0].spi_in, first.spi_in);
  ASSERT_EQ(portal->sink.removed.size(), 1u);
  EXPECT_EQ(portal->sink.removed[0].spi_out, first.spi_in);
  EXPECT_EQ(moat->sink.live(), 1u);
  EXPECT_EQ(portal->sink.live(), 1u);
  EXPECT_TRUE(violations.empty()) << violations_str();
}

// The rekey responder must not send with the new SA before the initiator has
// it: the initiator installs it only when the answer arrives. (Switching when
// answering lost packets against strongSwan: issue 5, "rekey under flood".)
TEST_F(Pair, RekeyResponderSwitchesOnlyWhenTheInitiatorHasTheNewSa) {
  establish();
  uint32_t old_out = moat->sink.out;
  ASSERT_TRUE(portal->e.rekey_child("branch-17", now));
  // Deliver the request alone: the moat answers but keeps sending with the old SA.
  Pkt req = net.q.front();
  net.q.pop_front();
  moat->e.receive(req.to, req.from, req.wire(), now);
  check_datapath();
  EXPECT_EQ(moat->sink.installed.size(), 2u);  // inbound ready before the answer
  EXPECT_EQ(moat->sink.out, old_out);
  EXPECT_TRUE(moat->sink.rekeys.empty());
  run();  // the answer; the portal switches and deletes the old SA: that request switches the moat
  ASSERT_EQ(moat->sink.rekeys.size(), 1u);
  EXPECT_EQ(moat->sink.out, moat->sink.installed[1].spi_out);
  EXPECT_EQ(portal->sink.out, portal->sink.installed[1].spi_out);
  advance(EngineOptions{}.rekey_linger_ms);
  EXPECT_EQ(moat->sink.live(), 1u);
  EXPECT_EQ(portal->sink.live(), 1u);
  EXPECT_EQ(moat->e.stats().rekey_switch_timeouts, 0u);
  EXPECT_TRUE(violations.empty()) << violations_str();
}

TEST_F(Pair, RekeyResponderSwitchesAfterATimeoutWhenThePeerSaysNothingMore) {
  establish();
  ASSERT_TRUE(portal->e.rekey_child("branch-17", now));
  // The portal's later requests (its delete of the old SA) never arrive.
  net.filter = [&](Pkt& p) {
    bool request = !(p.data[19] & kFlagResponse);
    return !(p.from.addr == portal->a && request && p.data[18] == uint8_t(Exchange::informational));
  };
  run();
  EXPECT_TRUE(moat->sink.rekeys.empty());
  advance(EngineOptions{}.rekey_switch_ms);
  ASSERT_EQ(moat->sink.rekeys.size(), 1u);
  EXPECT_EQ(moat->e.stats().rekey_switch_timeouts, 1u);
  EXPECT_EQ(moat->sink.out, portal->sink.installed[1].spi_in);
}

// RFC 7296 §2.8.1: both ends rekey the same CHILD SA at once. The exchange
// holding the lowest of the four nonces made a redundant SA; its initiator
// deletes it, the other end deletes the old SA; one SA remains, the same on
// both sides, and at no moment does either side send with an SA the other
// does not accept. Rounds until each side has won at least once.
TEST_F(Pair, SimultaneousChildRekeysKeepOneSaAndLoseNothing) {
  establish();
  int moat_won = 0, portal_won = 0;
  for (int round = 0; round < 40 && (moat_won < 2 || portal_won < 2); ++round) {
    uint32_t old_in = moat->sink.out ? portal->sink.out : 0;
    ASSERT_TRUE(moat->e.rekey_child("portal", now)) << round;
    ASSERT_TRUE(portal->e.rekey_child("branch-17", now)) << round;
    run();
    advance(EngineOptions{}.rekey_linger_ms);
    ASSERT_EQ(moat->e.stats().rekey_collisions, uint64_t(round + 1));
    ASSERT_EQ(portal->e.stats().rekey_collisions, uint64_t(round + 1));
    ASSERT_EQ(moat->sink.live(), 1u) << round;
    ASSERT_EQ(portal->sink.live(), 1u) << round;
    auto m = moat->e.show(now)[0]["children"], p = portal->e.show(now)[0]["children"];
    ASSERT_EQ(m.size(), 1u);
    ASSERT_EQ(p.size(), 1u);
    EXPECT_EQ(m[0]["spi_in"], p[0]["spi_out"]);
    EXPECT_EQ(m[0]["spi_out"], p[0]["spi_in"]);
    EXPECT_NE(moat->sink.in.count(old_in), 1u);
    EXPECT_EQ(*moat->sink.in.begin(), portal->sink.out);
    EXPECT_EQ(*portal->sink.in.begin(), moat->sink.out);
    // Who won: the surviving SA was negotiated by the moat if the moat's
    // inbound SPI is one the moat chose in its own request.
    bool moat_made = false;
    uint32_t moat_in = *moat->sink.in.begin();
    for (auto& l : moat->logs)
      if (l.find("collision") != std::string::npos && l.find(fmt::format("ours ({:08x}_i) stays", moat_in)) != std::string::npos)
        moat_made = true;
    (moat_made ? moat_won : portal_won)++;
    ASSERT_TRUE(violations.empty()) << "round " << round << "\n" << violations_str();
  }
  EXPECT_GE(moat_won, 2);
  EXPECT_GE(portal_won, 2);
  EXPECT_EQ(moat->e.stats().rx_bad_icv + portal->e.stats().rx_bad_icv, 0u);
}

// PFS: with a DH group in the ESP proposals, our CHILD rekeys carry a KE and
// the new keys come from the fresh DH secret (both sides derive the same).
TEST_F(Pair, ChildRekeyWithPfsWhenTheProposalNamesAGroup) {
  auto m = tunnel("portal", "branch-17@moats.example.net", "portal.example.net", psk, "10.17.0.0/24", "10.0.0.0/8");
  m.remote = Endpoint{portal->a, kIkePort};
  m.esp_proposals = *parse_proposals("aes128gcm16-x25519", kProtoEsp);
  moat->e.set_peers({m}, now);
  auto p = tunnel("branch-17", "portal.example.net", "branch-17@moats.example.net", psk, "10.0.0.0/16", "10.17.0.0/16");
  p.esp_proposals = *parse_proposals("aes128gcm16-modp2048-x25519", kProtoEsp);
  portal->e.set_peers({p}, now);
  establish();  // IKE_AUTH's CHILD SA: no KE there (§1.2)
  ASSERT_TRUE(moat->e.rekey_child("portal", now));
  run();
  ASSERT_EQ(moat->sink.installed.size(), 2u);
  ASSERT_EQ(portal->sink.installed.size(), 2u);
  EXPECT_EQ(moat->sink.installed[1].encr_key_out, portal->sink.installed[1].encr_key_in);
  EXPECT_EQ(moat->sink.installed[1].encr_key_in, portal->sink.installed[1].encr_key_out);
  EXPECT_TRUE(std::any_of(moat->logs.begin(), moat->logs.end(),
                          [](auto& l) { return l.find("PFS (CURVE_25519)") != std::string::npos; }))
      << "no PFS";
  EXPECT_EQ(moat->e.stats().child_failed + portal->e.stats().child_failed, 0u);
  EXPECT_TRUE(violations.empty()) << violations_str();
}

TEST_F(Pair, UnknownSpiIsReportedRateLimitedAndOnlyInsideAnIkeSa) {
  // No IKE SA with that address: nothing authenticated to say.
  EXPECT_FALSE(portal->e.unknown_spi(0x1234, ip("203.0.113.1"), now));
  establish();
  uint32_t stale = moat->sink.installed[0].spi_out + 1;  // an SPI the portal never made
  EXPECT_TRUE(portal->e.unknown_spi(stale, moat->a, now));
  EXPECT_FALSE(portal->e.unknown_spi(stale, moat->a, now + 10));  // rate limit
  run();
  EXPECT_EQ(portal->e.stats().invalid_spi_sent, 1u);
  EXPECT_EQ(portal->e.stats().invalid_spi_limited, 2u);
  EXPECT_EQ(moat->sink.live(), 1u);  // not one of the moat's SPIs: nothing removed
  // About the moat's real outbound SPI: the moat drops that stale CHILD SA.
  now += 2000;
  EXPECT_TRUE(portal->e.unknown_spi(moat->sink.installed[0].spi_out, moat->a, now));
  run();
  EXPECT_EQ(moat->sink.live(), 0u);
  EXPECT_EQ(portal->sink.live(), 0u);  // and told the portal to drop its half too
}

TEST_F(Pair, IkeRekeyMovesTheChildSasAndDeletesTheOldIkeSa) {
  establish();
  auto before = moat->e.show(now)[0]["spi_i"];
  ASSERT_TRUE(moat->e.rekey_ike("portal", now));
  run();
  ASSERT_EQ(moat->e.ike_sa_count(), 1u);
  ASSERT_EQ(portal->e.ike_sa_count(), 1u);
  auto m = moat->e.show(now)[0], p = portal->e.show(now)[0];
  EXPECT_NE(m["spi_i"], before);
  EXPECT_EQ(m["spi_i"], p["spi_i"]);
  EXPECT_EQ(m["spi_r"], p["spi_r"]);
  EXPECT_EQ(m["children"].size(), 1u);
  EXPECT_EQ(p["children"].size(), 1u);
  EXPECT_EQ(moat->sink.removed.size(), 0u);  // no CHILD SA lost
  EXPECT_EQ(portal->sink.removed.size(), 0u);
  // The new IKE SA's keys agree: a CHILD rekey and a liveness check go through it.
  ASSERT_TRUE(moat->e.rekey_child("portal", now));
  run();
  EXPECT_EQ(portal->sink.rekeys.size(), 1u);
  EXPECT_EQ(portal->e.stats().rx_bad_icv, 0u);
}

// §2.8.2: both ends rekey the IKE SA in the same instant. Three IKE SAs
// exist for a moment; the new one holding the lowest of the four nonces is
// deleted by its creator, the other inherits the CHILD SA, the old one goes.
TEST_F(Pair, SimultaneousIkeRekeysKeepOneIkeSaAndEveryChildSa) {
  establish();
  int moat_won = 0, portal_won = 0;
  for (int round = 0; round < 40 && (moat_won < 2 || portal_won < 2); ++round) {
    uint32_t child_in = *moat->sink.in.begin();
    ASSERT_TRUE(moat->e.rekey_ike("portal", now)) << round;
    ASSERT_TRUE(portal->e.rekey_ike("branch-17", now)) << round;
    run();
    ASSERT_EQ(moat->e.stats().rekey_collisions, uint64_t(round + 1)) << round << logs();
    ASSERT_EQ(portal->e.stats().rekey_collisions, uint64_t(round + 1)) << round;
    ASSERT_EQ(moat->e.ike_sa_count(), 1u) << round;
    ASSERT_EQ(portal->e.ike_sa_count(), 1u) << round;
    auto m = moat->e.show(now)[0], p = portal->e.show(now)[0];
    ASSERT_EQ(m["state"], "ESTABLISHED");
    ASSERT_EQ(p["state"], "ESTABLISHED");
    EXPECT_EQ(m["spi_i"], p["spi_i"]);
    EXPECT_EQ(m["spi_r"], p["spi_r"]);
    EXPECT_NE(m["role"], p["role"]);
    // Nothing lost, nothing re-made: the CHILD SA is the same one, on the survivor.
    ASSERT_EQ(m["children"].size(), 1u);
    ASSERT_EQ(p["children"].size(), 1u);
    EXPECT_EQ(m["children"][0]["spi_in"], fmt::format("{:08x}", child_in));
    EXPECT_EQ(moat->sink.removed.size(), 0u);
    EXPECT_EQ(portal->sink.removed.size(), 0u);
    (m["role"] == "initiator" ? moat_won : portal_won)++;
    // The survivor's keys agree on both ends: a CHILD rekey goes through it.
    ASSERT_TRUE(moat->e.rekey_child("portal", now)) << round;
    run();
    advance(EngineOptions{}.rekey_linger_ms);
    ASSERT_EQ(moat->sink.live(), 1u) << round;
    ASSERT_EQ(portal->sink.live(), 1u) << round;
    moat->sink.removed.clear(), moat->sink.installed.erase(moat->sink.installed.begin());
    portal->sink.removed.clear(), portal->sink.installed.erase(portal->sink.installed.begin());
    ASSERT_TRUE(violations.empty()) << "round " << round << "\n" << violations_str();
  }
  EXPECT_GE(moat_won, 2);
  EXPECT_GE(portal_won, 2);
  EXPECT_EQ(moat->e.stats().rx_bad_icv + portal->e.stats().rx_bad_icv, 0u);
  EXPECT_EQ(moat->e.stats().rx_unknown_spi + portal->e.stats().rx_unknown_spi, 0u);
  EXPECT_EQ(moat->e.stats().ike_given_up + portal->e.stats().ike_given_up, 0u);
  // Nothing left to time out: no IKE SA is waiting for a delete.
  advance(60000);
  EXPECT_EQ(moat->e.ike_sa_count(), 1u);
  EXPECT_EQ(portal->e.ike_sa_count(), 1u);
}

// §2.8.2's special case: the portal's rekey completes before the moat's
// request reaches it; the moat saw the collision, the portal did not.
// - late_after_delete: the portal's delete of the old IKE SA reaches the
//   moat first and tells it to forget its own rekey;
// - late_before_delete: the moat's request reaches the portal while the
//   portal closes the old IKE SA: TEMPORARY_FAILURE, and the moat forgets.
class OneSided : public Pair, public ::testing::WithParamInterface<bool> {};

TEST_P(OneSided, IkeRekeyCollisionSeenByOneSideOnly) {
  bool before_delete = GetParam();
  establish();
  ASSERT_TRUE(moat->e.rekey_ike("portal", now));
  ASSERT_TRUE(portal->e.rekey_ike("branch-17", now));
  std::optional<Pkt> held, held_delete;
  int from_moat = 0, from_portal = 0;
  net.filter = [&](Pkt& p) {
    if (p.from.addr == portal->a && before_delete) {
      // The portal's 2nd message is its delete of the old IKE SA, its 3rd
      // the TEMPORARY_FAILURE: the network swaps them.
      if (++from_portal == 2) {
        held_delete = p;
        return false;
      }
      if (from_portal == 3) net.q.push_back(*held_delete);
    }
    if (!(p.from.addr == moat->a)) return true;
    if (++from_moat == 1) {
      held = p;  // the moat's rekey request, held back
      return false;
    }
    // The moat's answer to the portal's rekey: with before_delete, the held
    // request arrives right after it, ahead of the portal's delete.
    if (from_moat == 2 && before_delete) net.q.push_front(*held), held.reset();
    return true;
  };
  run();
  net.filter = nullptr;
  if (held) net.q.push_back(*held);  // late: for an IKE SA the portal has deleted
  run();
  advance(60000);
  ASSERT_EQ(moat->e.ike_sa_count(), 1u) << logs();
  ASSERT_EQ(portal->e.ike_sa_count(), 1u) << logs();
  auto m = moat->e.show(now)[0], p = portal->e.show(now)[0];
  EXPECT_EQ(m["spi_i"], p["spi_i"]);
  EXPECT_EQ(p["role"], "initiator");
  EXPECT_EQ(m["children"].size(), 1u);
  EXPECT_EQ(p["children"].size(), 1u);
  EXPECT_EQ(moat->sink.removed.size() + portal->sink.removed.size(), 0u);
  bool temp_fail = std::any_of(moat->logs.begin(), moat->logs.end(),
                               [](auto& l) { return l.find("the peer's rekey stands") != std::string::npos; });
  EXPECT_EQ(temp_fail, before_delete) << logs();
  ASSERT_TRUE(moat->e.rekey_child("portal", now));
  run();
  EXPECT_EQ(portal->sink.rekeys.size(), 1u);
  EXPECT_EQ(moat->e.stats().rx_bad_icv + portal->e.stats().rx_bad_icv, 0u);
}
INSTANTIATE_TEST_SUITE_P(Pair, OneSided, ::testing::Values(false, true),
                         [](auto& i) { return i.param ? "late_before_delete" : "late_after_delete"; });

// MOBIKE (RFC 4555) is negotiated in IKE_AUTH only when both ends allow it.
TEST_F(Pair, MobikeIsNegotiatedOnlyWhenBothEndsAllowIt) {
  establish();
  EXPECT_EQ(moat->e.show(now)[0]["mobike"], true);
  EXPECT_EQ(portal->e.show(now)[0]["mobike"], true);
  for (int off = 0; off < 2; ++off) {
    ASSERT_TRUE(moat->e.terminate("portal", now));
    run();
    auto m = tunnel("portal", "branch-17@moats.example.net", "portal.example.net", psk, "10.17.0.0/24", "10.0.0.0/8");
    m.remote = Endpoint{portal->a, kIkePort};
    m.mobike = off != 0;
    moat->e.set_peers({m}, now);
    auto p = tunnel("branch-17", "portal.example.net", "branch-17@moats.example.net", psk, "10.0.0.0/16", "10.17.0.0/16");
    p.mobike = off == 0;
    portal->e.set_peers({p}, now);
    ASSERT_TRUE(moat->e.initiate("portal", now));
    run();
    ASSERT_EQ(moat->e.ike_sa_count(), 1u);
    EXPECT_EQ(moat->e.show(now)[0]["mobike"], false) << off;
    EXPECT_EQ(portal->e.show(now)[0]["mobike"], false) << off;
    // Without MOBIKE our address change is not announced.
    EXPECT_EQ(moat->e.local_address_changed(moat->a, ip("198.51.100.99"), now), 0u);
  }
}

// RFC 4555 §3.5: the moat (original initiator) gets a new address and sends
// UPDATE_SA_ADDRESSES; the portal takes the new address from the IP header
// of that authenticated request and moves the IKE SA and the CHILD SA.
// Forged or replayed copies from elsewhere move nothing.
TEST_F(Pair, MobikeUpdateSaAddressesMovesTheSaOnlyWhenAuthenticated) {
  establish();
  IpAddr old_a = moat->a, new_a = ip("198.51.100.99"), evil = ip("203.0.113.66");
  moat->a = new_a;  // the network now delivers the moat's traffic at its new address
  ASSERT_EQ(moat->e.local_address_changed(old_a, new_a, now), 1u);
  Pkt update = net.q.back();
  EXPECT_EQ(update.from.addr, new_a);
  run();
  EXPECT_EQ(moat->e.stats().mobike_sent, 1u);
  EXPECT_EQ(portal->e.stats().mobike_moved, 1u);
  ASSERT_EQ(portal->sink.moved_.size(), 1u);
  EXPECT_EQ(portal->sink.moved_[0].remote.addr, new_a);
  ASSERT_EQ(moat->sink.moved_.size(), 1u);
  EXPECT_EQ(moat->sink.moved_[0].local.addr, new_a);
  EXPECT_EQ(portal->e.show(now)[0]["remote"], (Endpoint{new_a, kNattPort}.str()));
  EXPECT_EQ(moat->e.show(now)[0]["local"], (Endpoint{new_a, kNattPort}.str()));
  // The answer carried NAT detection for the new path (no NAT here) and the
  // portal now reaches the moat there.
  EXPECT_EQ(portal->e.show(now)[0]["nat"], "none");
  ASSERT_TRUE(portal->e.check_liveness("branch-17", now));
  run();
  EXPECT_EQ(portal->e.stats().tx_retransmits, 0u);

  // A replay of that authenticated request from another address: a
  // retransmission, answered from the cache, nothing moves.
  Pkt replay = update;
  replay.from.addr = evil;
  net.q.push_back(replay);
  // A forgery: the same request as the next message ID (in the window, so
  // it reaches the ICV check), from another address.
  Pkt forged = update;
  forged.from.addr = evil;
  // (The network keeps the non-ESP marker apart: the header is at 0.)
  uint32_t mid = get32(forged.data.data() + 20) + 1;
  forged.data[20] = uint8_t(mid >> 24), forged.data[21] = uint8_t(mid >> 16);
  forged.data[22] = uint8_t(mid >> 8), forged.data[23] = uint8_t(mid);
  net.q.push_back(forged);
  run();
  EXPECT_EQ(portal->e.stats().rx_retransmit, 1u);
  EXPECT_EQ(portal->e.stats().rx_bad_icv, 1u);
  EXPECT_EQ(portal->e.stats().mobike_moved, 1u);
  EXPECT_EQ(portal->sink.moved_.size(), 1u);
  EXPECT_EQ(portal->e.show(now)[0]["remote"], (Endpoint{new_a, kNattPort}.str()));

  // The portal did not initiate the IKE SA: its own address change is not
  // announced by it (RFC 4555 §3.1: the original initiator decides).
  EXPECT_EQ(portal->e.local_address_changed(portal->a, ip("192.0.2.9"), now), 0u);
  // The moat's next messages come from its new address and keep working.
  ASSERT_TRUE(moat->e.rekey_child("portal", now));
  run();
  EXPECT_EQ(portal->sink.rekeys.size(), 1u);
  EXPECT_EQ(portal->sink.installed.back().remote.addr, new_a);
  EXPECT_TRUE(violations.empty()) << violations_str();
}

// With a NAT in front of the moat, UPDATE_SA_ADDRESSES carries NAT detection
// and the portal follows the NAT's new mapping (RFC 4555 §3.8).
TEST_F(Pair, MobikeUpdateBehindANatFollowsTheNewMapping) {
  IpAddr outside = ip("203.0.113.9");
  nat_moat(outside);
  establish();
  IpAddr old_a = moat->a;
  moat->a = ip("10.9.9.9");  // a new private address behind a new mapping
  nat_moat(outside, 31000);
  ASSERT_EQ(moat->e.local_address_changed(old_a, moat->a, now), 1u);
  run();
  EXPECT_EQ(portal->e.stats().mobike_moved, 1u);
  auto p = portal->e.show(now)[0];
  EXPECT_EQ(p["remote"], (Endpoint{outside, uint16_t(kNattPort + 31000)}.str()));
  EXPECT_EQ(p["nat"], "remote");
  ASSERT_FALSE(portal->sink.moved_.empty());
  EXPECT_TRUE(portal->sink.moved_.back().udp_encap);
  EXPECT_EQ(portal->e.stats().mobike_checks, 1u);
  EXPECT_EQ(portal->sink.moved_.back().remote, (Endpoint{outside, uint16_t(kNattPort + 31000)}));
  EXPECT_EQ(moat->e.show(now)[0]["nat"], "local");
  ASSERT_TRUE(portal->e.check_liveness("branch-17", now));
  run();
  EXPECT_EQ(portal->e.stats().tx_retransmits, 0u);
}

// The moat moves from a public address to one behind a NAT: both ends learn
// it from the NAT detection in the update and its answer, and the CHILD SAs
// turn UDP encapsulation on (moved()).
TEST_F(Pair, MobikeUpdateIntoANatTurnsOnUdpEncapsulation) {
  establish();
  ASSERT_EQ(moat->e.show(now)[0]["nat"], "none");
  IpAddr old_a = moat->a, outside = ip("203.0.113.9");
  moat->a = ip("10.9.9.9");
  nat_moat(outside);
  ASSERT_EQ(moat->e.local_address_changed(old_a, moat->a, now), 1u);
  run();
  EXPECT_EQ(moat->e.show(now)[0]["nat"], "local");
  EXPECT_EQ(portal->e.show(now)[0]["nat"], "remote");
  ASSERT_FALSE(moat->sink.moved_.empty());
  ASSERT_FALSE(portal->sink.moved_.empty());
  EXPECT_TRUE(moat->sink.moved_.back().udp_encap);
  EXPECT_TRUE(portal->sink.moved_.back().udp_encap);
  EXPECT_EQ(portal->sink.moved_.back().remote.addr, outside);
  ASSERT_TRUE(portal->e.check_liveness("branch-17", now));
  run();
  EXPECT_EQ(portal->e.stats().tx_retransmits, 0u);
}

TEST_F(Pair, TerminateDeletesBothSides) {
  establish();
  ASSERT_TRUE(moat->e.terminate("portal", now));
  run();
  EXPECT_EQ(moat->e.ike_sa_count(), 0u);
  EXPECT_EQ(portal->e.ike_sa_count(), 0u);
  EXPECT_EQ(moat->sink.live(), 0u);
  EXPECT_EQ(portal->sink.live(), 0u);
}

TEST_F(Pair, StartTunnelComesBackAfterThePortalForgetsIt) {
  auto m = tunnel("portal", "branch-17@moats.example.net", "portal.example.net", psk, "10.17.0.0/24", "10.0.0.0/8");
  m.remote = Endpoint{portal->a, kIkePort};
  m.start = true;
  m.dpd_s = 10;
  moat->e.set_peers({m}, now);
  advance(0);
  ASSERT_EQ(portal->e.stats().ike_established, 1u);
  // The portal restarts and knows nothing; the moat's liveness check goes unanswered,
  // it gives up, and re-initiates by itself.
  auto peers = portal->e.peers();
  std::vector<PeerConfig> cfg;
  for (auto& p : peers) cfg.push_back(*p);
  portal = std::make_unique<Node>(net, "192.0.2.1");
  portal->e.set_peers(cfg, now);
  for (int i = 0; i < 120 && portal->e.stats().ike_established == 0; ++i) advance(1000);
  EXPECT_EQ(portal->e.stats().ike_established, 1u);
  EXPECT_EQ(portal->sink.live(), 1u);
  EXPECT_GE(moat->e.stats().ike_given_up, 1u);
}

// ---------------------------------------------------------------- lifetimes

bool has_log(const Node& n, const std::string& what) {
  return std::any_of(n.logs.begin(), n.logs.end(), [&](auto& l) { return l.find(what) != std::string::npos; });
}

// A responder-only tunnel does not rely on its peer: the portal (which
// never initiates) rekeys its CHILD SA at its own soft lifetime, make-
// before-break, and the moat's timer for that SA does not rekey it again.
TEST_F(Pair, ResponderRekeysItsChildSaAtTheSoftLifetime) {
  auto m = moat_peer();
  m.child_lifetime_s = 5000;  // the moat would rekey later: 4050-4500 s
  moat->e.set_peers({m}, now);
  auto p = portal_peer();
  p.child_lifetime_s = 3600;  // rekey at 90% minus up to 10% jitter: 2916-3240 s
  portal->e.set_peers({p}, now);
  establish();
  uint64_t t0 = now;
  ASSERT_EQ(portal->e.show(now)[0]["role"], "responder");
  advance(2900 * 1000);
  EXPECT_TRUE(portal->sink.rekeys.empty());  // not before its soft lifetime
  advance(340 * 1000);                       // t0 + 3240 s
  ASSERT_EQ(portal->sink.rekeys.size(), 1u) << logs();
  ASSERT_EQ(moat->sink.rekeys.size(), 1u) << logs();
  EXPECT_TRUE(has_log(*portal, "reached its soft lifetime; rekeying it (we responded to the IKE SA)"));
  EXPECT_EQ(portal->sink.installed.back().spi_out, moat->sink.installed.back().spi_in);
  advance(EngineOptions{}.rekey_linger_ms);
  EXPECT_EQ(moat->sink.live(), 1u);
  EXPECT_EQ(portal->sink.live(), 1u);
  // The old SA's hard lifetime (t0 + 3600 s) and the moat's own soft
  // lifetime for it (t0 + 4050..4500 s) pass: the SA was rekeyed, nothing
  // expires and nobody rekeys twice (the new SA's own soft lifetimes come
  // after t0 + 5832 s).
  while (now < t0 + 4600 * 1000) advance(100 * 1000);
  EXPECT_EQ(portal->sink.rekeys.size(), 1u);
  EXPECT_EQ(moat->sink.rekeys.size(), 1u);
  EXPECT_EQ(portal->e.stats().child_expired + moat->e.stats().child_expired, 0u);
  EXPECT_EQ(portal->e.stats().rekey_collisions + moat->e.stats().rekey_collisions, 0u);
  EXPECT_TRUE(violations.empty()) << violations_str();
}

// Both ends' timers fire in the same instant: a collision (§2.8.1), one SA
// left on both ends, nothing lost; and no second rekey afterwards.
TEST_F(Pair, BothEndsRekeyingAtTheSoftLifetimeCollideOnce) {
  establish();
  uint64_t t0 = now;
  advance(3240 * 1000);  // both soft lifetimes (2916-3240 s) are due in this tick
  advance(EngineOptions{}.rekey_linger_ms);
  EXPECT_EQ(moat->e.stats().rekey_collisions, 1u) << logs();
  EXPECT_EQ(portal->e.stats().rekey_collisions, 1u);
  ASSERT_EQ(moat->sink.live(), 1u);
  ASSERT_EQ(portal->sink.live(), 1u);
  EXPECT_EQ(*moat->sink.in.begin(), portal->sink.out);
  EXPECT_EQ(*portal->sink.in.begin(), moat->sink.out);
  size_t mi = moat->sink.installed.size(), pi = portal->sink.installed.size();
  while (now < t0 + 5500 * 1000) advance(100 * 1000);  // before the new SA's soft lifetime
  EXPECT_EQ(moat->sink.installed.size(), mi);
  EXPECT_EQ(portal->sink.installed.size(), pi);
  EXPECT_EQ(moat->e.stats().child_expired + portal->e.stats().child_expired, 0u);
  EXPECT_TRUE(violations.empty()) << violations_str();
}

// The timers fire apart: the first end rekeys, the other finds its SA
// already rekeyed when its own timer fires and does nothing.
TEST_F(Pair, SecondEndsTimerDoesNotRekeyAgain) {
  establish();
  uint64_t t0 = now;
  // To each timer in turn (next_deadline() may name stale ones too): the
  // first CHILD timer to fire rekeys; both ends' timers are past at 3240 s.
  for (int i = 0; i < 50 && now < t0 + 3240 * 1000; ++i) {
    uint64_t next = std::min({moat->e.next_deadline(), portal->e.next_deadline(), t0 + 3240 * 1000});
    advance(next > now ? next - now : 1);
  }
  advance(EngineOptions{}.rekey_linger_ms);
  EXPECT_EQ(moat->sink.rekeys.size(), 1u);
  EXPECT_EQ(portal->sink.rekeys.size(), 1u);
  EXPECT_EQ(moat->sink.installed.size(), 2u);
  EXPECT_EQ(portal->sink.installed.size(), 2u);
  EXPECT_EQ(moat->e.stats().rekey_collisions + portal->e.stats().rekey_collisions, 0u);
  EXPECT_EQ(moat->sink.live(), 1u);
  EXPECT_EQ(portal->sink.live(), 1u);
  EXPECT_TRUE(violations.empty()) << violations_str();
}

// The portal's CHILD SA lives 100 s (rekey at 81-90 s). The moat refuses
// every rekey (its proposals changed): at 100 s the portal deletes the SA,
// tells the moat (INFORMATIONAL DELETE), and both data paths drop it.
TEST_F(Pair, ChildSaNotRekeyedIsDeletedAtTheHardLifetime) {
  establish_with_portal_child_lifetime(100, 90);
  uint64_t t0 = now;
  auto m = moat_peer();
  m.esp_proposals = *parse_proposals("aes256gcm16", kProtoEsp);  // nothing the portal offers
  moat->e.set_peers({m}, now);
  while (now < t0 + 99 * 1000) advance(1000);
  EXPECT_GE(portal->e.stats().child_failed, 2u) << logs();  // tried, and tried again
  EXPECT_EQ(portal->sink.live(), 1u);                        // still in use before the hard lifetime
  EXPECT_EQ(moat->sink.live(), 1u);
  advance(1000);
  EXPECT_EQ(portal->e.stats().child_expired, 1u);
  EXPECT_EQ(portal->sink.live(), 0u);
  EXPECT_EQ(moat->sink.live(), 0u);  // it got the delete
  EXPECT_EQ(portal->e.ike_sa_count(), 1u);
  EXPECT_EQ(moat->e.ike_sa_count(), 1u);
  EXPECT_EQ(portal->e.stats().ike_given_up, 0u);
}

// The peer never answers the rekey: the SA still leaves the data path at
// its hard lifetime (the delete waits behind the unanswered request, whose
// retransmissions then give the IKE SA up).
TEST_F(Pair, ChildSaLeavesTheDataPathAtTheHardLifetimeWhenThePeerNeverAnswers) {
  establish_with_portal_child_lifetime(100, 90);
  uint64_t t0 = now;
  net.filter = [&](Pkt& x) {
    return !(x.from.addr == portal->a && x.data[18] == uint8_t(Exchange::create_child_sa) && !(x.data[19] & kFlagResponse));
  };
  while (now < t0 + 99 * 1000) advance(1000);
  EXPECT_EQ(portal->sink.live(), 1u);
  EXPECT_GE(portal->e.stats().tx_retransmits, 1u);
  advance(1000);
  EXPECT_EQ(portal->e.stats().child_expired, 1u);
  EXPECT_EQ(portal->sink.live(), 0u);
  ASSERT_EQ(portal->sink.removed.size(), 1u);
  EXPECT_EQ(portal->sink.removed[0].spi_in, portal->sink.installed[0].spi_in);
  for (int i = 0; i < 120 && portal->e.ike_sa_count(); ++i) advance(1000);
  EXPECT_EQ(portal->e.stats().ike_given_up, 1u);
  EXPECT_EQ(portal->e.ike_sa_count(), 0u);
}

// The IKE SA: the responder rekeys it at its own `ike_rekey` (the moat
// never would); the CHILD SA moves to the new IKE SA untouched.
TEST_F(Pair, ResponderRekeysTheIkeSa) {
  auto m = moat_peer();
  m.ike_rekey_s = 0;
  moat->e.set_peers({m}, now);
  auto p = portal_peer();
  p.ike_rekey_s = 600;
  portal->e.set_peers({p}, now);
  establish();
  auto before = portal->e.show(now)[0];
  advance(600 * 1000);
  ASSERT_EQ(portal->e.ike_sa_count(), 1u) << logs();
  ASSERT_EQ(moat->e.ike_sa_count(), 1u);
  auto after = portal->e.show(now)[0], ma = moat->e.show(now)[0];
  EXPECT_NE(after["spi_i"], before["spi_i"]);
  EXPECT_EQ(after["role"], "initiator");  // of the new IKE SA
  EXPECT_EQ(after["spi_r"], ma["spi_r"]);
  EXPECT_EQ(after["children"].size(), 1u);
  EXPECT_EQ(portal->sink.removed.size() + moat->sink.removed.size(), 0u);
  advance(100 * 1000);  // past the old SA's lifetime (660 s): nothing expires
  EXPECT_EQ(portal->e.stats().ike_expired, 0u);
  EXPECT_EQ(portal->e.ike_sa_count(), 1u);
}

// Without a rekey the IKE SA is deleted at its lifetime (with its CHILD
// SAs, at both ends); a `start` tunnel then initiates a new one.
TEST_F(Pair, IkeSaNotRekeyedIsDeletedAtItsLifetime) {
  auto p = portal_peer();
  p.ike_rekey_s = 0;
  p.ike_lifetime_s = 600;
  portal->e.set_peers({p}, now);
  auto m = moat_peer();
  m.ike_rekey_s = 0;
  moat->e.set_peers({m}, now);
  establish();
  advance(599 * 1000);
  EXPECT_EQ(portal->e.ike_sa_count(), 1u);
  advance(1000);
  EXPECT_EQ(portal->e.stats().ike_expired, 1u) << logs();
  EXPECT_EQ(portal->e.ike_sa_count(), 0u);
  EXPECT_EQ(moat->e.ike_sa_count(), 0u);
  EXPECT_EQ(portal->sink.live(), 0u);
  EXPECT_EQ(moat->sink.live(), 0u);
}

TEST_F(Pair, StartTunnelInitiatesAgainWhenItsIkeSaExpires) {
  auto m = moat_peer();
  m.start = true;
  m.ike_rekey_s = 0;
  m.ike_lifetime_s = 600;
  moat->e.set_peers({m}, now);
  advance(0);
  ASSERT_EQ(portal->e.stats().ike_established, 1u);
  advance(600 * 1000);
  EXPECT_EQ(moat->e.stats().ike_expired, 1u);
  for (int i = 0; i < 10 && portal->e.stats().ike_established < 2; ++i) advance(1000);
  EXPECT_EQ(portal->e.stats().ike_established, 2u) << logs();
  EXPECT_EQ(moat->e.ike_sa_count(), 1u);
  EXPECT_EQ(portal->e.ike_sa_count(), 1u);
  EXPECT_EQ(moat->sink.live(), 1u);
  EXPECT_EQ(portal->sink.live(), 1u);
}

// ---------------------------------------------------------------- MOBIKE return routability

// RFC 4555 §3.7: the portal answers the moat's UPDATE_SA_ADDRESSES and its
// IKE SA talks to the new address at once, but the CHILD SA (the data path)
// stays at the old one until an INFORMATIONAL with COOKIE2, sent to the new
// address, comes back with it.
TEST_F(Pair, MobikeChildSasMoveOnlyAfterTheReturnRoutabilityCheck) {
  establish();
  IpAddr old_a = moat->a, new_a = ip("198.51.100.99");
  moat->a = new_a;
  ASSERT_EQ(moat->e.local_address_changed(old_a, new_a, now), 1u);
  ASSERT_EQ(net.q.size(), 1u);
  step();  // the update reaches the portal
  EXPECT_EQ(portal->e.show(now)[0]["remote"], (Endpoint{new_a, kNattPort}.str()));
  EXPECT_TRUE(portal->sink.moved_.empty());  // the data path still sends to the old address
  EXPECT_EQ(portal->e.stats().mobike_checks, 1u);
  EXPECT_EQ(portal->e.show(now)[0]["mobike_check"],
            fmt::format("checking {}; ESP still to {}", Endpoint{new_a, kNattPort}.str(), Endpoint{old_a, kNattPort}.str()));
  ASSERT_EQ(net.q.size(), 2u);  // the answer, then the check (a request) to the new address
  EXPECT_EQ(net.q[1].to.addr, new_a);
  EXPECT_FALSE(net.q[1].data[19] & kFlagResponse);
  step();  // the answer reaches the moat
  step();  // the check reaches the moat, which echoes it
  EXPECT_TRUE(portal->sink.moved_.empty());
  run();
  ASSERT_EQ(portal->sink.moved_.size(), 1u);
  EXPECT_EQ(portal->sink.moved_[0].remote.addr, new_a);
  EXPECT_EQ(portal->e.stats().mobike_check_failed, 0u);
  EXPECT_TRUE(violations.empty()) << violations_str();
  EXPECT_FALSE(portal->e.show(now)[0].contains("mobike_check"));
}

// Behind a NAT whose mapping changed, an authenticated message from the new
// mapping (§2.23) starts a check; the UPDATE_SA_ADDRESSES that follows from
// there while it runs (strongSwan probes first, then updates) starts no
// second one. The CHILD SA moves once, after the echo.
TEST_F(Pair, MobikeNatRebindingIsCheckedOnce) {
  IpAddr outside = ip("203.0.113.9");
  uint16_t shift = 30000;
  net.filter = [&](Pkt& p) {
    if (p.from.addr == moat->a) p.from.addr = outside, p.from.port = uint16_t(p.from.port + shift);
    else if (p.to.addr == outside) p.to.addr = moat->a, p.to.port = uint16_t(p.to.port - shift);
    return true;
  };
  establish();
  shift = 31000;  // the NAT rebinds
  ASSERT_TRUE(moat->e.check_liveness("portal", now));
  step();  // from the new mapping: the IKE SA follows, a check starts
  EXPECT_EQ(portal->e.stats().mobike_checks, 1u);
  EXPECT_TRUE(portal->sink.moved_.empty());
  ASSERT_EQ(moat->e.local_address_changed(moat->a, moat->a, now), 1u);  // queued behind the liveness check
  step();  // the liveness answer: the moat's UPDATE_SA_ADDRESSES leaves
  ASSERT_EQ(net.q.size(), 2u);  // the portal's check, the moat's update
  std::swap(net.q[0], net.q[1]);
  step();  // the update, while the check runs
  EXPECT_EQ(portal->e.stats().mobike_moved, 1u);
  EXPECT_EQ(portal->e.stats().mobike_checks, 1u);
  EXPECT_TRUE(portal->sink.moved_.empty());
  run();
  ASSERT_EQ(portal->sink.moved_.size(), 1u) << logs();
  EXPECT_EQ(portal->sink.moved_[0].remote, (Endpoint{outside, uint16_t(kNattPort + 31000)}));
  EXPECT_EQ(portal->e.stats().mobike_check_failed, 0u);
}

// Nobody answers at the new address: the data path never moves there; the
// check is retransmitted a bounded number of times, then the IKE SA is
// given up like any unanswered request.
TEST_F(Pair, MobikeCheckNotAnsweredMovesNothing) {
  establish();
  IpAddr old_a = moat->a, new_a = ip("198.51.100.99");
  moat->a = new_a;
  ASSERT_EQ(moat->e.local_address_changed(old_a, new_a, now), 1u);
  net.filter = [&](Pkt& p) { return !(p.from.addr == portal->a && !(p.data[19] & kFlagResponse)); };
  run();
  EXPECT_EQ(portal->e.stats().mobike_checks, 1u);
  for (int i = 0; i < 120 && portal->e.ike_sa_count(); ++i) {
    advance(1000);
    ASSERT_TRUE(portal->sink.moved_.empty());
  }
  EXPECT_EQ(portal->e.stats().ike_given_up, 1u);
  EXPECT_EQ(portal->e.stats().tx_retransmits, EngineOptions{}.retransmit_tries);
}

// A forged answer (the check reflected with the response flag: its ICV
// fails) moves nothing; the genuine echo, on a retransmission, does.
TEST_F(Pair, MobikeForgedCheckAnswerMovesNothing) {
  establish();
  IpAddr old_a = moat->a, new_a = ip("198.51.100.99");
  moat->a = new_a;
  ASSERT_EQ(moat->e.local_address_changed(old_a, new_a, now), 1u);
  std::optional<Pkt> check;
  net.filter = [&](Pkt& p) {
    if (p.from.addr == portal->a && !(p.data[19] & kFlagResponse)) {
      check = p;
      return false;
    }
    return true;
  };
  run();
  ASSERT_TRUE(check);
  Pkt forged = *check;
  std::swap(forged.from, forged.to);
  forged.data[19] = kFlagResponse | kFlagInitiator;
  net.q.push_back(forged);
  run();
  EXPECT_EQ(portal->e.stats().rx_bad_icv, 1u);
  EXPECT_TRUE(portal->sink.moved_.empty());
  net.filter = nullptr;
  advance(EngineOptions{}.retransmit_base_ms);  // the check again; the moat echoes it
  ASSERT_EQ(portal->sink.moved_.size(), 1u) << logs();
  EXPECT_EQ(portal->sink.moved_[0].remote.addr, new_a);
}

// A peer whose answer does not echo the COOKIE2 (authenticated, but not a
// proof it received the check): nothing moves, the IKE SA keeps working.
TEST_F(Pair, MobikeCheckAnsweredWithoutTheCookieMovesNothing) {
  EngineOptions o;
  o.echo_cookie2 = false;
  moat = std::make_unique<Node>(net, "198.51.100.7", o);
  moat->e.set_peers({moat_peer()}, now);
  establish();
  IpAddr old_a = moat->a, new_a = ip("198.51.100.99");
  moat->a = new_a;
  ASSERT_EQ(moat->e.local_address_changed(old_a, new_a, now), 1u);
  run();
  EXPECT_EQ(portal->e.stats().mobike_checks, 1u);
  EXPECT_EQ(portal->e.stats().mobike_check_failed, 1u);
  EXPECT_TRUE(portal->sink.moved_.empty());
  // The moat announces the same address again: checked again (and fails again).
  ASSERT_EQ(moat->e.local_address_changed(new_a, new_a, now), 1u);
  run();
  EXPECT_EQ(portal->e.stats().mobike_checks, 2u);
  EXPECT_EQ(portal->e.stats().mobike_check_failed, 2u);
  EXPECT_TRUE(portal->sink.moved_.empty());
  ASSERT_TRUE(portal->e.check_liveness("branch-17", now));
  run();
  EXPECT_EQ(portal->e.stats().tx_retransmits, 0u);
  EXPECT_EQ(portal->e.ike_sa_count(), 1u);
}

// An on-path attacker holds the moat's genuine update back and delivers it
// from another address first (the IP header is not authenticated): the
// check goes there, nobody answers, and the data path never points there.
TEST_F(Pair, MobikeUpdateFromAWrongAddressMovesNothingThere) {
  establish();
  IpAddr old_a = moat->a, new_a = ip("198.51.100.99"), evil = ip("203.0.113.66");
  moat->a = new_a;
  ASSERT_EQ(moat->e.local_address_changed(old_a, new_a, now), 1u);
  Pkt genuine = net.q.front();
  net.q.pop_front();
  Pkt diverted = genuine;
  diverted.from.addr = evil;
  net.q.push_back(diverted);
  step();
  EXPECT_EQ(portal->e.stats().mobike_checks, 1u);
  net.q.push_back(genuine);  // late: a retransmission for the portal, answered from its cache
  run();
  EXPECT_EQ(portal->e.stats().rx_retransmit, 1u);
  for (int i = 0; i < 120 && portal->e.ike_sa_count(); ++i) advance(1000);
  for (auto& m : portal->sink.moved_) EXPECT_FALSE(m.remote.addr == evil);
  EXPECT_TRUE(portal->sink.moved_.empty());
}

// ---------------------------------------------------------------- NO_NATS_ALLOWED (RFC 4555 §3.9)

// The moat moves into a NAT with `no_nats_allowed`: its update carries the
// addresses it sent from and to, the NAT rewrote them, the portal answers
// UNEXPECTED_NAT_DETECTED and moves nothing.
TEST_F(Pair, NoNatsAllowedUpdateThroughANatIsRefused) {
  auto m = moat_peer();
  m.no_nats_allowed = true;
  moat->e.set_peers({m}, now);
  establish();
  IpAddr old_a = moat->a, outside = ip("203.0.113.9");
  moat->a = ip("10.9.9.9");
  nat_moat(outside);
  ASSERT_EQ(moat->e.local_address_changed(old_a, moat->a, now), 1u);
  run();
  EXPECT_EQ(portal->e.stats().mobike_nat_refused, 1u);
  EXPECT_EQ(moat->e.stats().mobike_nat_refused, 1u);  // it got UNEXPECTED_NAT_DETECTED
  EXPECT_EQ(portal->e.stats().mobike_moved, 0u);
  EXPECT_TRUE(portal->sink.moved_.empty());
  EXPECT_EQ(portal->e.show(now)[0]["remote"], (Endpoint{old_a, kNattPort}.str()));
  EXPECT_EQ(portal->e.show(now)[0]["nat"], "none");
}

// Without a NAT on the new path the addresses match and the SA moves.
TEST_F(Pair, NoNatsAllowedUpdateWithoutANatMoves) {
  auto m = moat_peer();
  m.no_nats_allowed = true;
  moat->e.set_peers({m}, now);
  establish();
  IpAddr old_a = moat->a, new_a = ip("198.51.100.99");
  moat->a = new_a;
  ASSERT_EQ(moat->e.local_address_changed(old_a, new_a, now), 1u);
  run();
  EXPECT_EQ(portal->e.stats().mobike_nat_refused + moat->e.stats().mobike_nat_refused, 0u);
  ASSERT_EQ(portal->sink.moved_.size(), 1u);
  EXPECT_EQ(portal->sink.moved_[0].remote.addr, new_a);
}

// The portal's tunnel allows no NAT: an update whose NAT detection shows one
// is answered UNEXPECTED_NAT_DETECTED, whatever the moat asked for.
TEST_F(Pair, PortalAllowingNoNatRefusesAnUpdateThatShowsOne) {
  auto p = portal_peer();
  p.no_nats_allowed = true;
  portal->e.set_peers({p}, now);
  establish();
  IpAddr old_a = moat->a, outside = ip("203.0.113.9");
  moat->a = ip("10.9.9.9");
  nat_moat(outside);
  ASSERT_EQ(moat->e.local_address_changed(old_a, moat->a, now), 1u);
  run();
  EXPECT_EQ(portal->e.stats().mobike_nat_refused, 1u);
  EXPECT_EQ(moat->e.stats().mobike_nat_refused, 1u);
  EXPECT_TRUE(portal->sink.moved_.empty());
  EXPECT_EQ(portal->e.show(now)[0]["nat"], "none");
}

// ---------------------------------------------------------------- §2.25.2: CHILD rekeys crossing an IKE SA rekey

// The moat rekeys the IKE SA while the portal rekeys the CHILD SA: the moat
// answers the CHILD rekey TEMPORARY_FAILURE (its IKE rekey is on the wire),
// the portal tries again later on the IKE SA that survives, and succeeds.
TEST_F(Pair, ChildRekeyDuringOurIkeRekeyGetsTemporaryFailure) {
  establish();
  ASSERT_TRUE(moat->e.rekey_ike("portal", now));
  ASSERT_TRUE(portal->e.rekey_child("branch-17", now));
  run();
  EXPECT_EQ(moat->e.stats().rekey_refused, 1u) << logs();
  EXPECT_EQ(portal->e.stats().child_failed, 1u);
  ASSERT_EQ(moat->e.ike_sa_count(), 1u);
  ASSERT_EQ(portal->e.ike_sa_count(), 1u);
  EXPECT_EQ(moat->e.show(now)[0]["spi_i"], portal->e.show(now)[0]["spi_i"]);
  EXPECT_TRUE(portal->sink.rekeys.empty());
  advance(60 * 1000);  // the retry, on the new IKE SA
  advance(EngineOptions{}.rekey_linger_ms);
  EXPECT_EQ(portal->sink.rekeys.size(), 1u) << logs();
  EXPECT_EQ(moat->sink.rekeys.size(), 1u);
  EXPECT_EQ(moat->sink.live(), 1u);
  EXPECT_EQ(portal->sink.live(), 1u);
  EXPECT_EQ(moat->e.stats().rx_bad_icv + portal->e.stats().rx_bad_icv, 0u);
  EXPECT_TRUE(violations.empty()) << violations_str();
}

// The moat's CHILD rekey reaches the portal on the old IKE SA after the
// portal's IKE rekey moved the CHILD SAs away (the old IKE SA's delete not
// yet done): CHILD_SA_NOT_FOUND; the moat retries on the new IKE SA.
TEST_F(Pair, ChildRekeyOnAReplacedIkeSaGetsChildSaNotFound) {
  establish();
  ASSERT_TRUE(moat->e.rekey_child("portal", now));
  std::optional<Pkt> child_req, ike_delete;
  net.filter = [&](Pkt& p) {
    bool req = !(p.data[19] & kFlagResponse);
    if (req && p.from.addr == moat->a && p.data[18] == uint8_t(Exchange::create_child_sa) && !child_req) {
      child_req = p;  // held
      return false;
    }
    if (req && p.from.addr == portal->a && p.data[18] == uint8_t(Exchange::informational) && !ike_delete) {
      ike_delete = p;  // the portal's delete of the old IKE SA, held
      return false;
    }
    return true;
  };
  run();
  ASSERT_TRUE(portal->e.rekey_ike("branch-17", now));
  run();
  ASSERT_TRUE(child_req && ike_delete) << logs();
  net.q.push_back(*child_req);
  run();
  EXPECT_EQ(portal->e.stats().rekey_refused, 1u) << logs();
  EXPECT_EQ(moat->e.stats().child_failed, 1u);
  net.q.push_back(*ike_delete);
  run();
  net.filter = nullptr;
  ASSERT_EQ(moat->e.ike_sa_count(), 1u);
  ASSERT_EQ(portal->e.ike_sa_count(), 1u);
  advance(60 * 1000);  // the moat's retry, on the new IKE SA
  advance(EngineOptions{}.rekey_linger_ms);
  EXPECT_EQ(moat->sink.rekeys.size(), 1u) << logs();
  EXPECT_EQ(portal->sink.rekeys.size(), 1u);
  EXPECT_EQ(moat->sink.live(), 1u);
  EXPECT_EQ(portal->sink.live(), 1u);
  EXPECT_TRUE(violations.empty()) << violations_str();
}

// A peer that answers our CHILD rekey on the old IKE SA after its IKE
// rekey moved the CHILD SAs (strongSwan may): the new CHILD SA joins the
// new IKE SA, and is not lost when the old IKE SA is deleted.
TEST_F(Pair, ChildRekeyAnsweredOnAReplacedIkeSaJoinsTheNewOne) {
  establish();
  ASSERT_TRUE(moat->e.rekey_child("portal", now));
  std::optional<Pkt> answer;
  net.filter = [&](Pkt& p) {
    if (!answer && p.from.addr == portal->a && (p.data[19] & kFlagResponse) &&
        p.data[18] == uint8_t(Exchange::create_child_sa)) {
      answer = p;  // the portal's answer to the moat's CHILD rekey, held
      return false;
    }
    return true;
  };
  run();
  ASSERT_TRUE(answer);
  ASSERT_TRUE(portal->e.rekey_ike("branch-17", now));
  // The portal's IKE rekey reaches the moat (its CHILD rekey still open):
  // answered; the moat's CHILD SA moves to the new IKE SA.
  ASSERT_TRUE(step());
  ASSERT_TRUE(step());
  net.q.push_front(*answer);
  run();
  net.filter = nullptr;
  advance(EngineOptions{}.rekey_linger_ms);
  ASSERT_EQ(moat->e.ike_sa_count(), 1u) << logs();
  ASSERT_EQ(portal->e.ike_sa_count(), 1u);
  EXPECT_EQ(moat->sink.rekeys.size(), 1u);
  EXPECT_EQ(portal->sink.rekeys.size(), 1u);
  EXPECT_EQ(moat->sink.live(), 1u) << logs();
  EXPECT_EQ(portal->sink.live(), 1u);
  auto m = moat->e.show(now)[0], p = portal->e.show(now)[0];
  ASSERT_EQ(m["children"].size(), 1u);
  ASSERT_EQ(p["children"].size(), 1u);
  EXPECT_EQ(m["children"][0]["spi_in"], p["children"][0]["spi_out"]);
  EXPECT_EQ(m["children"][0]["spi_in"], fmt::format("{:08x}", moat->sink.installed.back().spi_in));
  EXPECT_TRUE(violations.empty()) << violations_str();
}

// Requests queued behind our IKE SA rekey go on the new IKE SA once it is up
// (§2.18: the old one only carries its own delete). strongSwan ignores a
// CREATE_CHILD_SA on an IKE SA it has rekeyed (no answer at all): a CHILD
// rekey sent there hung until the old IKE SA was given up, and the DELETE
// of a CHILD SA that had expired meanwhile, queued behind it, never reached
// the peer, which kept that SA. Found by the moatd interop test (charon's
// IKE cut off while moatd's IKE rekey was on the wire).
TEST_F(Pair, RequestsQueuedBehindOurIkeRekeyGoOnTheNewIkeSa) {
  establish_with_portal_child_lifetime(100, 90);
  uint64_t t0 = now;
  while (now < t0 + 80 * 1000) advance(1000);
  auto old_ike = portal->e.show(now)[0];
  uint64_t old_i = std::stoull(old_ike["spi_i"].get<std::string>(), nullptr, 16);
  auto on_old = [&](const Pkt& x) { return get64(x.data.data()) == old_i; };
  // The moat's answers are lost for a while: the portal's IKE rekey stays on
  // the wire; its CHILD rekey (soft lifetime) and then the DELETE of the SA
  // that reached its hard lifetime queue up behind it.
  std::optional<Pkt> answer;
  net.filter = [&](Pkt& x) {
    if (x.from.addr == moat->a && (x.data[19] & kFlagResponse)) {
      if (!answer && x.data[18] == uint8_t(Exchange::create_child_sa)) answer = x;
      return false;
    }
    return true;
  };
  ASSERT_TRUE(portal->e.rekey_ike("branch-17", now));
  run();
  while (now < t0 + 101 * 1000) advance(1000);
  ASSERT_TRUE(answer) << logs();
  EXPECT_EQ(portal->e.stats().child_expired, 1u) << logs();
  EXPECT_EQ(portal->sink.live(), 0u);
  EXPECT_EQ(moat->sink.live(), 1u);
  // The answer gets through; the moat now behaves as strongSwan does: a
  // CREATE_CHILD_SA on the IKE SA it rekeyed goes unanswered.
  int ignored = 0;
  net.filter = [&](Pkt& x) {
    if (x.from.addr == portal->a && !(x.data[19] & kFlagResponse) && x.data[18] == uint8_t(Exchange::create_child_sa) &&
        on_old(x)) {
      ++ignored;
      return false;
    }
    return true;
  };
  net.q.push_back(*answer);
  run();
  advance(EngineOptions{}.rekey_linger_ms);
  advance(1000);
  EXPECT_EQ(ignored, 0) << logs();
  ASSERT_EQ(portal->e.ike_sa_count(), 1u) << logs();
  ASSERT_EQ(moat->e.ike_sa_count(), 1u);
  EXPECT_NE(portal->e.show(now)[0]["spi_i"], old_ike["spi_i"]);
  // The moat dropped the expired SA: both ends hold the same CHILD SAs.
  auto m = moat->e.show(now)[0], q = portal->e.show(now)[0];
  std::set<std::string> m_in, q_out;
  for (auto& c : m["children"]) m_in.insert(c["spi_in"].get<std::string>());
  for (auto& c : q["children"]) q_out.insert(c["spi_out"].get<std::string>());
  EXPECT_EQ(m_in, q_out) << logs();
  EXPECT_EQ(moat->sink.live(), portal->sink.live());
  EXPECT_TRUE(std::any_of(moat->sink.removed.begin(), moat->sink.removed.end(),
                          [&](auto& c) { return c.spi_out == portal->sink.installed[0].spi_in; }))
      << "the moat still has the CHILD SA the portal deleted at its hard lifetime\n" << logs();
  // Past the expiry (a break by definition), each end sends with an SA the other accepts.
  EXPECT_TRUE(moat->sink.out && portal->sink.in.count(moat->sink.out));
  EXPECT_TRUE(portal->sink.out && moat->sink.in.count(portal->sink.out));
}

// Our CHILD rekey is answered only after the SA it rekeys reached its hard
// lifetime (deleted, its DELETE queued behind the rekey): the new SA is a
// fresh one, not a replacement of an SA that is gone (the engine used to
// hand the data path a rekeyed() with an old SA read past the end of its
// list); the DELETE then reaches the peer and both ends keep the new SA.
TEST_F(Pair, ChildRekeyAnsweredAfterTheHardLifetimeInstallsAFreshSa) {
  establish_with_portal_child_lifetime(100, 90);
  uint64_t t0 = now;
  std::optional<Pkt> answer;
  net.filter = [&](Pkt& x) {
    if (x.from.addr == moat->a && (x.data[19] & kFlagResponse) && x.data[18] == uint8_t(Exchange::create_child_sa)) {
      if (!answer) answer = x;
      return false;
    }
    return true;
  };
  while (now < t0 + 101 * 1000) advance(1000);
  ASSERT_TRUE(answer) << logs();
  ASSERT_EQ(portal->e.stats().child_expired, 1u) << logs();
  EXPECT_EQ(portal->sink.live(), 0u);
  net.filter = nullptr;
  net.q.push_back(*answer);
  run();
  advance(EngineOptions{}.rekey_linger_ms);
  advance(1000);
  EXPECT_TRUE(portal->sink.rekeys.empty()) << logs();
  EXPECT_EQ(portal->e.stats().child_rekeyed, 0u);
  ASSERT_EQ(portal->sink.installed.size(), 2u) << logs();
  EXPECT_EQ(portal->sink.live(), 1u);
  EXPECT_EQ(moat->sink.live(), 1u) << logs();
  EXPECT_EQ(portal->sink.out, portal->sink.installed[1].spi_out);
  EXPECT_TRUE(moat->sink.out && portal->sink.in.count(moat->sink.out));
  EXPECT_TRUE(moat->sink.in.count(portal->sink.out));
  EXPECT_EQ(portal->e.ike_sa_count(), 1u);
  EXPECT_EQ(moat->e.ike_sa_count(), 1u);
}

TEST(IkeConfig, BrokenRecordIsReportedAndSkipped) {
  auto dir = std::filesystem::temp_directory_path() / ("moat-ike-cfg-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "a-good.yaml") << "local_id: portal.example.net\n"
                                        "remote_id: branch-1@moats.example.net\n"
                                        "psk: \"0123456789abcdef0123\"\n"
                                        "funnels:\n"
                                        "  - {local: 10.0.0.0/8, remote: 10.1.0.0/24}\n";
  std::ofstream(dir / "b-bad.yaml") << "local_id: portal.example.net\n"
                                       "remote_id: branch-2@moats.example.net\n"
                                       "psk: \"0123456789abcdef0123\"\n"
                                       "ike_proposals: aes-gcm-17-prfsha256-x25519\n"
                                       "funnels:\n"
                                       "  - {local: 10.0.0.0/8, remote: 10.2.0.0/33}\n";
  std::ofstream(dir / "c-good.yaml") << "name: branch-3\n"
                                        "local_id: portal.example.net\n"
                                        "remote_id: C=CH, O=Moat, CN=branch-3\n"
                                        "psk: \"0123456789abcdef0123\"\n"
                                        "remote: 192.0.2.3\n"
                                        "start: true\n"
                                        "esp_proposals: [aes128gcm16, aes256-sha256]\n"
                                        "ike_rekey: 4h\n"
                                        "ike_lifetime: 5h\n"
                                        "mobike_check: false\n"
                                        "no_nats_allowed: true\n"
                                        "funnels:\n"
                                        "  - {local: 10.0.0.0/8, remote: 10.3.0.0/24}\n"
                                        "  - {local: 172.16.0.0/12, remote: 10.3.1.0/24}\n";
  std::ofstream(dir / "d-dup.yaml") << "local_id: portal.example.net\n"
                                       "remote_id: BRANCH-1@moats.example.net\n"
                                       "psk: \"0123456789abcdef0123\"\n"
                                       "funnels: [{local: 10.0.0.0/8, remote: 10.4.0.0/24}]\n";
  auto r = load_tunnel_dir(dir.string());
  std::filesystem::remove_all(dir);
  ASSERT_EQ(r.tunnels.size(), 2u);
  EXPECT_EQ(r.tunnels[0].name, "a-good");
  EXPECT_EQ(r.tunnels[1].name, "branch-3");
  EXPECT_EQ(r.tunnels[1].local_ts.size(), 2u);
  EXPECT_EQ(r.tunnels[1].remote_ts.size(), 2u);
  EXPECT_EQ(r.tunnels[1].esp_proposals.size(), 2u);
  EXPECT_EQ(r.tunnels[1].remote_id.type, kIdDn);
  EXPECT_EQ(r.tunnels[1].ike_lifetime_s, 5u * 3600);
  EXPECT_FALSE(r.tunnels[1].mobike_check);
  EXPECT_TRUE(r.tunnels[1].no_nats_allowed);
  EXPECT_TRUE(r.tunnels[0].mobike_check);  // the defaults
  EXPECT_FALSE(r.tunnels[0].no_nats_allowed);
  ASSERT_EQ(r.errors.size(), 3u);
  EXPECT_EQ(r.errors[0].line, 4);
  EXPECT_EQ(r.errors[0].col, 16);
  EXPECT_NE(r.errors[0].str().find("b-bad.yaml:4:16: tunnel \"b-bad\": ike_proposals: unknown algorithm \"gcm\""),
            std::string::npos)
      << r.errors[0].str();
  EXPECT_NE(r.errors[0].str().find("record skipped"), std::string::npos);
  EXPECT_EQ(r.errors[1].line, 6);
  EXPECT_NE(r.errors[1].str().find("funnels.remote"), std::string::npos) << r.errors[1].str();
  EXPECT_NE(r.errors[2].str().find("already used by tunnel \"a-good\""), std::string::npos) << r.errors[2].str();
}

}  // namespace
