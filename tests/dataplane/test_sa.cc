// SA and SAD: the anti-replay window (RFC 4303 §3.4.3, Appendix A with ESN),
// lifecycle under RCU, lookups, lifetimes' events.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <rte_byteorder.h>
#include <rte_rcu_qsbr.h>
#include <rte_malloc.h>

#include <memory>

#include "dataplane/sa.hh"

using namespace moat;

namespace {

std::unique_ptr<Sa> fresh(uint32_t window, bool esn, uint64_t top = 0) {
  auto s = std::make_unique<Sa>();
  s->window = window;
  s->esn = esn;
  s->seq = top;
  return s;
}

SaConfig cfg(SaDir dir, uint32_t spi, uint32_t tunnel = 0) {
  SaConfig c;
  c.spi = spi;
  c.dir = dir;
  c.tunnel = tunnel;
  c.local = 0xc0000201;
  c.peer = 0xc0000202;
  c.cipher = Cipher::aes_gcm_128;
  c.key.assign(20, 7);
  return c;
}

std::string uniq() {
  static int n = 0;
  std::string s = std::to_string(n++);
  s.insert(0, "sa");  // not "sa" + ...: GCC 12 warns falsely (-Wrestrict)
  return s;
}

}  // namespace

TEST(ReplayWindow, AcceptsOnceRefusesDuplicates) {
  auto sp = fresh(1024, false);
  Sa& s = *sp;
  EXPECT_EQ(replay_check(s, 0), Replay::too_old) << "sequence number 0 is never sent";
  EXPECT_EQ(replay_update(s, 1), Replay::ok);
  EXPECT_EQ(replay_update(s, 1), Replay::replayed);
  EXPECT_EQ(replay_update(s, 3), Replay::ok);
  EXPECT_EQ(replay_update(s, 2), Replay::ok) << "late but inside the window";
  EXPECT_EQ(replay_update(s, 2), Replay::replayed);
  EXPECT_EQ(s.gaps, 1u);
  EXPECT_EQ(s.late, 1u);
}

TEST(ReplayWindow, Is1024WideAtTheEdge) {
  auto sp = fresh(1024, false);
  Sa& s = *sp;
  ASSERT_EQ(replay_update(s, 5000), Replay::ok);
  EXPECT_EQ(replay_check(s, 5000 - 1023), Replay::ok) << "T - W + 1 is the window's left edge";
  EXPECT_EQ(replay_check(s, 5000 - 1024), Replay::too_old);
  for (uint64_t q = 5000 - 1023; q < 5000; q++) ASSERT_EQ(replay_update(s, q), Replay::ok) << q;
  for (uint64_t q = 5000 - 1023; q <= 5000; q++) ASSERT_EQ(replay_check(s, q), Replay::replayed) << q;
  // Sliding by a lot clears everything that left.
  ASSERT_EQ(replay_update(s, 5000 + 3000), Replay::ok);
  EXPECT_EQ(replay_check(s, 5000 + 3000 - 1), Replay::ok);
  EXPECT_EQ(replay_check(s, 5000 + 3000 - 1023), Replay::ok);
}

TEST(ReplayWindow, LargestWindowKeepsEveryBit) {
  auto sp = fresh(kMaxReplayWindow, false);
  Sa& s = *sp;
  for (uint64_t q = 1; q <= 10000; q += 2) ASSERT_EQ(replay_update(s, q), Replay::ok);
  for (uint64_t q = 10000 - kMaxReplayWindow + 1; q <= 10000; q++) {
    Replay want = q % 2 ? Replay::replayed : Replay::ok;
    ASSERT_EQ(replay_check(s, q), want) << q;
  }
}

TEST(ReplayWindow, EsnInfersTheHighHalfAcrossTheWrap) {
  auto sp = fresh(1024, true, 0xfffffff0ull);
  Sa& s = *sp;
  // Still in subspace 0 (just below T and above it).
  EXPECT_EQ(replay_seq64(s, 0xffffffe0u), 0xffffffe0ull);
  EXPECT_EQ(replay_seq64(s, 0xfffffff5u), 0xfffffff5ull);
  // Small numbers are the next subspace.
  EXPECT_EQ(replay_seq64(s, 3), 0x100000003ull);
  ASSERT_EQ(replay_update(s, 0x100000003ull), Replay::ok);
  // Now T's low half is 3, the window straddles the wrap (A2.2 case 2).
  EXPECT_EQ(replay_seq64(s, 0xfffffff8u), 0xfffffff8ull) << "late packet from subspace 0";
  EXPECT_EQ(replay_check(s, 0xfffffff8ull), Replay::ok);
  EXPECT_EQ(replay_update(s, 0xfffffff8ull), Replay::ok);
  EXPECT_EQ(replay_update(s, 0xfffffff8ull), Replay::replayed);
  EXPECT_EQ(replay_seq64(s, 2), 0x100000002ull);
  // Far left of the window reads as far ahead in this subspace (A2.2): the
  // ICV, computed with the wrong high half, then refuses it.
  EXPECT_EQ(replay_seq64(s, 0xfffff000u), 0x1fffff000ull);
  // Without ESN the 32 bits are the sequence number.
  auto np = fresh(1024, false, 0xfffffff0ull);
  Sa& n = *np;
  EXPECT_EQ(replay_seq64(n, 3), 3u);
  EXPECT_EQ(replay_check(n, 3), Replay::too_old);
}

// A SAD larger than memory is refused with its size in the error, and the
// process goes on (what was allocated is given back; the size is taken
// before the half-made SAD is freed).
TEST(Sad, ASadLargerThanMemoryIsRefusedWithItsSize) {
  uint32_t cap = 1u << 30;  // ~2.5 TB of SA slots
  auto r = Sad::create(uniq(), cap, nullptr, 2);
  ASSERT_FALSE(r);
  size_t mb = ((sizeof(Sa) + sizeof(SaKeys) + sizeof(SaDrops)) * size_t(cap) + sizeof(SaTraffic) * size_t(cap) * 2) >> 20;
  EXPECT_NE(r.error().find(fmt::format("cannot allocate {} SA slots ({} MB)", cap, mb)), std::string::npos) << r.error();
  auto ok = Sad::create(uniq(), 8, nullptr);
  ASSERT_TRUE(ok) << ok.error();
  delete *ok;
}

TEST(Sad, AddsLooksUpAndDeletesUnderRcu) {
  size_t sz = rte_rcu_qsbr_get_memsize(1);
  auto* q = static_cast<rte_rcu_qsbr*>(rte_zmalloc(nullptr, sz, 64));
  ASSERT_EQ(rte_rcu_qsbr_init(q, 1), 0);
  ASSERT_EQ(rte_rcu_qsbr_thread_register(q, 0), 0);
  rte_rcu_qsbr_thread_online(q, 0);
  auto r = Sad::create(uniq(), 8, q);
  ASSERT_TRUE(r) << r.error();
  std::unique_ptr<Sad> sad(*r);
  auto in = sad->add_sa(cfg(SaDir::inbound, 0x1000));
  ASSERT_TRUE(in) << in.error();
  EXPECT_FALSE(sad->add_sa(cfg(SaDir::inbound, 0x1000))) << "duplicate inbound SPI";
  EXPECT_FALSE(sad->add_sa(cfg(SaDir::inbound, 17))) << "reserved SPI";
  SaConfig bad = cfg(SaDir::inbound, 0x1001);
  bad.key.resize(16);
  auto e = sad->add_sa(bad);
  ASSERT_FALSE(e);
  EXPECT_NE(e.error().find("wants a 20-byte key"), std::string::npos) << e.error();
  auto out = sad->add_sa(cfg(SaDir::outbound, 0x2000, 3));
  ASSERT_TRUE(out);
  EXPECT_EQ(sad->tunnel_sa(3), *out);
  uint32_t spis[2] = {rte_cpu_to_be_32(0x1000), rte_cpu_to_be_32(0x2000)};
  uint32_t idx[2];
  sad->lookup_spis(spis, 2, idx);
  EXPECT_EQ(idx[0], *in);
  EXPECT_EQ(idx[1], kNoSa) << "outbound SAs are not in the SPI table";
  // Runs of one SPI share a lookup: every packet still gets its own answer,
  // across runs, unknown SPIs and more than one bulk lookup's worth of keys.
  {
    auto in2 = sad->add_sa(cfg(SaDir::inbound, 0x1001));
    ASSERT_TRUE(in2) << in2.error();
    constexpr unsigned kN = 70;  // > RTE_HASH_LOOKUP_BULK_MAX (64)
    uint32_t many[kN], got[kN], want[kN];
    for (unsigned i = 0; i < kN; i++) {
      uint32_t spi = i < 5 ? 0x1000 : i < 7 ? 0x1001 : i < 9 ? 0x9999 : i % 3 == 0 ? 0x1001 : 0x1000;
      many[i] = rte_cpu_to_be_32(spi);
      want[i] = spi == 0x1000 ? *in : spi == 0x1001 ? *in2 : kNoSa;
    }
    sad->lookup_spis(many, kN, got);
    for (unsigned i = 0; i < kN; i++) EXPECT_EQ(got[i], want[i]) << "packet " << i;
    ASSERT_TRUE(sad->delete_sa(*in2));
    rte_rcu_qsbr_quiescent(q, 0);
    sad->reclaim();  // its slot is free again for the checks below
  }

  ASSERT_TRUE(sad->delete_sa(*in));
  sad->lookup_spis(spis, 1, idx);
  EXPECT_EQ(idx[0], kNoSa);
  EXPECT_EQ(sad->live(), 1u);
  // The slot is not reused before every reader passed a quiescent point.
  sad->reclaim();
  for (int i = 0; i < 6; i++) ASSERT_TRUE(sad->add_sa(cfg(SaDir::inbound, 0x3000 + i)));
  EXPECT_FALSE(sad->add_sa(cfg(SaDir::inbound, 0x4000))) << "the deleted slot is still in its grace period";
  rte_rcu_qsbr_quiescent(q, 0);
  sad->reclaim();
  auto again = sad->add_sa(cfg(SaDir::inbound, 0x4000));
  ASSERT_TRUE(again) << again.error();
  EXPECT_EQ(*again, *in) << "the slot came back after the grace period";
  rte_rcu_qsbr_thread_offline(q, 0);
  sad.reset();
  rte_free(q);
}

TEST(Sad, ReplaceOutboundSwitchesTheTunnelAndRetiresTheOld) {
  auto r = Sad::create(uniq(), 8, nullptr);
  ASSERT_TRUE(r);
  std::unique_ptr<Sad> sad(*r);
  uint32_t a = *sad->add_sa(cfg(SaDir::outbound, 0x100, 2));
  uint32_t b = *sad->add_sa(cfg(SaDir::outbound, 0x101, 2));
  EXPECT_EQ(sad->tunnel_sa(2), a) << "the tunnel keeps its SA until replace_outbound";
  auto old = sad->replace_outbound(2, b);
  ASSERT_TRUE(old);
  EXPECT_EQ(*old, a);
  EXPECT_EQ(sad->tunnel_sa(2), b);
  // Retired, yet still usable by a worker that read the tunnel a moment ago,
  // until the grace period ends.
  EXPECT_TRUE(sad->sa(a).state.load() & kSaDeleted);
  EXPECT_TRUE(sad->sa(a).state.load() & kSaLive);
  EXPECT_FALSE(sad->delete_sa(a)) << "already retired";
  sad->reclaim();  // no RCU variable here: the grace period is over at once
  EXPECT_EQ(sad->sa(a).state.load(), 0u);
  EXPECT_FALSE(sad->replace_outbound(5, b)) << "SA of another tunnel";
  ASSERT_TRUE(sad->set_peer(b, 0x0a0a0a0a, 4501, false));
  EXPECT_EQ(sad->sa(b).peer.load(), (uint64_t(0x0a0a0a0a) << 16) | 4501);
  EXPECT_FALSE(sad->stats(b).udp_encap);
  // ESP in UDP rides in the same word (bit 48): one store changes all three.
  ASSERT_TRUE(sad->set_peer(b, 0x0a0a0a0b, 31000, true));
  EXPECT_EQ(sad->sa(b).peer.load(), kPeerUdp | (uint64_t(0x0a0a0a0b) << 16) | 31000);
  SaStats v = sad->stats(b);
  EXPECT_EQ(v.peer, 0x0a0a0a0bu);
  EXPECT_EQ(v.peer_port, 31000);
  EXPECT_TRUE(v.udp_encap);
  EXPECT_TRUE(sad->config(b)->nat_t);
}

TEST(Sad, SecondsLifetimesPostOnce) {
  auto r = Sad::create(uniq(), 4, nullptr);
  ASSERT_TRUE(r);
  std::unique_ptr<Sad> sad(*r);
  SaConfig c = cfg(SaDir::outbound, 0x500);
  c.soft.seconds = 10;
  c.hard.seconds = 20;
  uint32_t i = *sad->add_sa(c, 1000);
  SaEvent ev[8];
  sad->tick(1005);
  EXPECT_EQ(sad->events(ev, 8), 0u);
  sad->tick(1010);
  sad->tick(1011);
  ASSERT_EQ(sad->events(ev, 8), 1u);
  EXPECT_EQ(ev[0].kind, SaEventKind::soft_seconds);
  EXPECT_EQ(ev[0].sa, i);
  sad->tick(1020);
  sad->tick(1030);
  ASSERT_EQ(sad->events(ev, 8), 1u);
  EXPECT_EQ(ev[0].kind, SaEventKind::hard_seconds);
  EXPECT_TRUE(sad->sa(i).state.load() & kSaHardPosted);
}
