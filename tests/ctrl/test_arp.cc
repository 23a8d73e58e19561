// The ARP state machine: resolution with a bounded hold queue, retries and
// give-up, aging with re-confirmation, and no learning of unrequested replies.
#include <gtest/gtest.h>

#include "ctrl/arp.hh"

using namespace moat;
using A = ArpTable::Action;

namespace {

ArpParams params() {
  ArpParams p;
  p.reachable_ms = 10000;
  p.retry_ms = 100;
  p.max_retries = 3;
  p.hold_packets = 2;
  p.max_entries = 3;
  return p;
}

rte_ether_addr mac(uint8_t last) { return rte_ether_addr{{2, 0, 0, 0, 0, last}}; }

int count(const ArpTable::Actions& a, A::Kind k) {
  int n = 0;
  for (auto& x : a) n += x.kind == k;
  return n;
}

void* pkt(intptr_t i) { return reinterpret_cast<void*>(i); }

const NeighKey kGw{0x0a000001, 0};

}  // namespace

TEST(Arp, ResolveSendsOneRequestAndHoldsABoundedQueue) {
  ArpTable t(params());
  ArpTable::Actions a;
  t.resolve(kGw, pkt(1), 0, a);
  t.resolve(kGw, pkt(2), 1, a);
  t.resolve(kGw, pkt(3), 2, a);
  EXPECT_EQ(count(a, A::request_broadcast), 1);
  ASSERT_EQ(count(a, A::drop), 1) << "third packet exceeds hold_packets=2";
  EXPECT_STREQ(a.back().why, "arp_hold_full");
  EXPECT_EQ(t.entries().at(kGw).held.size(), 2u);
}

TEST(Arp, ReplyPublishesAndReleasesHeldPacketsInOrder) {
  ArpTable t(params());
  ArpTable::Actions a;
  t.resolve(kGw, pkt(1), 0, a);
  t.resolve(kGw, pkt(2), 0, a);
  a.clear();
  EXPECT_TRUE(t.learn(kGw, mac(9), 50, a));
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(a[0].kind, A::publish);
  EXPECT_EQ(a[1].kind, A::release);
  EXPECT_EQ(a[1].pkts, (std::vector<void*>{pkt(1), pkt(2)}));
  EXPECT_EQ(t.entries().at(kGw).state, ArpTable::State::reachable);
}

TEST(Arp, UnrequestedReplyIsNotLearned) {
  ArpTable t(params());
  ArpTable::Actions a;
  EXPECT_FALSE(t.learn(kGw, mac(9), 0, a));
  EXPECT_TRUE(a.empty());
  EXPECT_TRUE(t.entries().empty()) << "no cache poisoning by unsolicited replies";
}

TEST(Arp, RequestForUsCreatesTheSendersEntry) {
  ArpTable t(params());
  ArpTable::Actions a;
  EXPECT_TRUE(t.learn(kGw, mac(7), 0, a, /*create=*/true));
  ASSERT_EQ(count(a, A::publish), 1);
  EXPECT_EQ(t.entries().at(kGw).state, ArpTable::State::reachable);
}

TEST(Arp, RetriesThenFailsHeldPackets) {
  ArpTable t(params());
  ArpTable::Actions a;
  t.resolve(kGw, pkt(1), 0, a);
  a.clear();
  uint64_t now = 0;
  for (int i = 0; i < 10; i++) t.tick(now += 100, a);
  EXPECT_EQ(count(a, A::request_broadcast), 2) << "max_retries=3 requests in all";
  ASSERT_EQ(count(a, A::fail), 1);
  EXPECT_TRUE(t.entries().empty());
  EXPECT_EQ(count(a, A::withdraw), 0) << "an incomplete entry was never published";
}

TEST(Arp, AgedEntryIsReconfirmedByUnicastWhileStillUsable) {
  ArpTable t(params());
  ArpTable::Actions a;
  t.resolve(kGw, pkt(1), 0, a);
  t.learn(kGw, mac(9), 0, a);
  a.clear();
  t.tick(10000, a);
  ASSERT_EQ(count(a, A::request_unicast), 1);
  EXPECT_EQ(count(a, A::withdraw), 0) << "MAC stays published while probing";
  EXPECT_EQ(t.entries().at(kGw).state, ArpTable::State::probe);
  a.clear();
  t.learn(kGw, mac(9), 10050, a);
  EXPECT_EQ(count(a, A::publish), 0) << "same MAC: nothing to republish";
  EXPECT_EQ(t.entries().at(kGw).state, ArpTable::State::reachable);
}

TEST(Arp, ProbeWithoutAnswerWithdraws) {
  ArpTable t(params());
  ArpTable::Actions a;
  t.resolve(kGw, pkt(1), 0, a);
  t.learn(kGw, mac(9), 0, a);
  a.clear();
  uint64_t now = 10000;
  for (int i = 0; i < 10; i++) t.tick(now += 100, a);
  EXPECT_EQ(count(a, A::withdraw), 1);
  EXPECT_TRUE(t.entries().empty());
}

TEST(Arp, ChangedMacIsRepublished) {
  ArpTable t(params());
  ArpTable::Actions a;
  t.resolve(kGw, pkt(1), 0, a);
  t.learn(kGw, mac(9), 0, a);
  a.clear();
  t.learn(kGw, mac(10), 5, a);  // gratuitous ARP from a failed-over gateway
  ASSERT_EQ(count(a, A::publish), 1);
  EXPECT_EQ(a[0].mac.addr_bytes[5], 10);
}

TEST(Arp, TableFullRefusesNewNeighbours) {
  ArpTable t(params());
  ArpTable::Actions a;
  for (uint32_t i = 0; i < 4; i++) t.resolve(NeighKey{0x0a000001 + i, 0}, pkt(i + 1), 0, a);
  EXPECT_EQ(t.entries().size(), 3u);
  EXPECT_EQ(count(a, A::drop), 1);
}

TEST(Arp, StaticEntriesNeverAge) {
  ArpTable t(params());
  ArpTable::Actions a;
  t.add_fixed(kGw, mac(1), a);
  EXPECT_EQ(count(a, A::publish), 1);
  a.clear();
  t.tick(1u << 30, a);
  EXPECT_TRUE(a.empty());
  t.learn(kGw, mac(2), 0, a);
  EXPECT_TRUE(a.empty()) << "ARP cannot override a static entry";
}
