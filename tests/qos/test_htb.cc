// The hierarchical scheduler (qos/htb.hh) on a virtual nanosecond clock: a
// port far faster than the configured link, sources that arrive on time, and
// the owner's loop (dequeue whenever next_send() says so) played by Sim.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <functional>
#include <string>
#include <vector>

#include "qos/htb.hh"

namespace moat::qos {
namespace {

constexpr uint64_t kHz = 1000000000;  // ns
constexpr uint64_t kMs = 1000000;
constexpr uint64_t kSec = 1000 * kMs;

ClassSpec cls(std::string name, int32_t parent, uint64_t rate, uint64_t ceil, uint8_t prio = 0) {
  ClassSpec c;
  c.name = std::move(name);
  c.parent = parent;
  c.rate = rate;
  c.ceil = ceil;
  c.prio = prio;
  return c;
}

// The owner's loop over a virtual clock. Packets are indexes into a pool
// (recycled), carrying their leaf and enqueue time so tests can see delays.
class Sim {
 public:
  struct Pkt {
    uint32_t leaf, len;
    uint64_t enq;
  };
  struct Src {
    uint32_t leaf, len;
    uint64_t every;     // periodic: `burst` packets every `every` ns
    unsigned burst;
    uint64_t from, until;
    uint64_t next;
    uint64_t offered = 0, refused = 0;
  };

  explicit Sim(const Plan& p) : s(p, kHz), backlogged(p.classes.size(), 0) {}

  // `burst` packets of `len` every `every` ns in [from, until).
  size_t periodic(const std::string& leaf, uint32_t len, uint64_t every, unsigned burst = 1, uint64_t from = 0,
                  uint64_t until = UINT64_MAX) {
    int32_t l = s.find(leaf);
    EXPECT_TRUE(l >= 0 && s.is_leaf(l)) << leaf;
    srcs.push_back({static_cast<uint32_t>(l), len, every, burst, from, until, from});
    return srcs.size() - 1;
  }
  // Keeps `depth` packets queued on `leaf`: every packet sent is replaced.
  void backlog(const std::string& leaf, uint32_t len, unsigned depth = 8) {
    int32_t l = s.find(leaf);
    ASSERT_TRUE(l >= 0 && s.is_leaf(l)) << leaf;
    backlogged[l] = len;
    for (unsigned i = 0; i < depth; i++) push(l, len);
  }
  void stop_backlog(const std::string& leaf) { backlogged[s.find(leaf)] = 0; }

  bool push(uint32_t leaf, uint32_t len) {
    uint32_t id;
    if (!free_.empty()) {
      id = free_.back();
      free_.pop_back();
    } else {
      id = static_cast<uint32_t>(pool.size());
      pool.push_back({});
    }
    pool[id] = {leaf, len, t};
    if (s.enqueue(leaf, handle(id), len, t)) return true;
    free_.push_back(id);
    return false;
  }

  void run_until(uint64_t end) {
    void* out[64];
    void* drops[64];
    unsigned stuck = 0;
    for (;;) {
      uint64_t na = UINT64_MAX;
      for (const Src& r : srcs)
        if (r.next < r.until) na = std::min(na, r.next);
      uint64_t nt = std::min(na, s.next_send(t));
      if (nt > end) {
        t = end;
        return;
      }
      t = std::max(t, nt);
      for (Src& r : srcs)
        while (r.next <= t && r.next < r.until) {
          for (unsigned i = 0; i < r.burst; i++) {
            r.offered++;
            if (!push(r.leaf, r.len)) r.refused++;
          }
          r.next += r.every;
        }
      unsigned nd = 0;
      unsigned n = s.dequeue(t, out, 64, drops, &nd);
      for (unsigned i = 0; i < nd; i++) free_.push_back(id_of(drops[i]));
      n_dropped += nd;
      for (unsigned i = 0; i < n; i++) {
        uint32_t id = id_of(out[i]);
        Pkt p = pool[id];
        free_.push_back(id);
        if (on_send) on_send(p, t);
        if (backlogged[p.leaf]) push(p.leaf, backlogged[p.leaf]);
      }
      if (n == 0 && nd == 0 && s.next_send(t) <= t && na > t) {
        if (++stuck > 3) {
          ADD_FAILURE() << "next_send() says now but dequeue gives nothing at t=" << t;
          return;
        }
      } else {
        stuck = 0;
      }
    }
  }

  uint64_t sent_bytes(const std::string& c) const { return s.stats(s.find(c)).sent_bytes; }

  Scheduler s;
  uint64_t t = 0;
  std::vector<Src> srcs;
  std::vector<uint32_t> backlogged;  // per class: packet length, 0 when not backlogged
  std::vector<Pkt> pool;
  std::function<void(const Pkt&, uint64_t)> on_send;
  uint64_t n_dropped = 0;

 private:
  static void* handle(uint32_t id) { return reinterpret_cast<void*>(uintptr_t{id} + 1); }
  static uint32_t id_of(void* h) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(h) - 1); }
  std::vector<uint32_t> free_;
};

// Bytes per second of `c` over [t1, t2) in the sim.
struct Window {
  Sim& sim;
  std::vector<uint64_t> at;
  uint64_t t1 = 0;
  explicit Window(Sim& s) : sim(s) {
    for (uint32_t c = 0; c < s.s.classes(); c++) at.push_back(s.s.stats(c).sent_bytes);
    t1 = s.t;
  }
  double rate(const std::string& c) const {
    int32_t i = sim.s.find(c);
    return static_cast<double>(sim.s.stats(i).sent_bytes - at[i]) * kHz / static_cast<double>(sim.t - t1);
  }
};

#define EXPECT_WITHIN(actual, expected, rel) \
  EXPECT_NEAR(static_cast<double>(actual), static_cast<double>(expected), (rel) * static_cast<double>(expected))

// Checks a sequence of (time, bytes) never beats `rate` by more than `slack`
// bytes over any window.
void expect_never_above(const std::vector<std::pair<uint64_t, uint32_t>>& log, uint64_t rate, double slack) {
  std::vector<double> cum(log.size() + 1, 0);
  for (size_t i = 0; i < log.size(); i++) cum[i + 1] = cum[i] + log[i].second;
  double worst = -1e18;
  for (size_t i = 0; i < log.size(); i++)
    for (size_t j = i; j < log.size(); j++) {
      double bytes = cum[j + 1] - cum[i];
      double allowed = static_cast<double>(rate) * static_cast<double>(log[j].first - log[i].first) / kHz;
      worst = std::max(worst, bytes - allowed);
    }
  EXPECT_LE(worst, slack) << "bytes above rate x window";
}

TEST(Htb, LinkRateIsNeverExceeded) {
  for (uint64_t link : {16000u, 125000u}) {  // 128 kbit/s and 1 Mbit/s
    Plan p;
    p.classes = {cls("root", -1, link, link), cls("a", 0, link / 2, link), cls("b", 0, link / 4, link, 1),
                 cls("c", 0, link / 4, link / 2, 2)};
    Sim sim(p);
    std::vector<std::pair<uint64_t, uint32_t>> log;
    sim.on_send = [&](const Sim::Pkt& pk, uint64_t t) { log.push_back({t, pk.len}); };
    sim.backlog("a", 1514);
    sim.periodic("b", 100, 3 * kMs, 4);  // bursty small packets
    sim.backlog("c", 700);
    sim.run_until(30 * kSec);
    // The link bucket (default: one MTU) plus the one packet that overdraws it.
    expect_never_above(log, link, 1514 + 1514);
    uint64_t total = 0;
    for (auto& e : log) total += e.second;
    EXPECT_WITHIN(total, link * 30, 0.01) << "link " << link;
  }
}

TEST(Htb, EachLeafGetsItsRateUnderSaturation) {
  const uint64_t link = 125000;
  Plan p;
  p.classes = {cls("root", -1, link, link), cls("a", 0, link / 2, link), cls("b", 0, link * 3 / 10, link, 1),
               cls("c", 0, link / 5, link, 2)};
  Sim sim(p);
  sim.backlog("a", 1514);
  sim.backlog("b", 512);
  sim.backlog("c", 64);
  sim.run_until(1 * kSec);
  Window w(sim);
  sim.run_until(21 * kSec);
  EXPECT_WITHIN(w.rate("a"), link / 2, 0.02);
  EXPECT_WITHIN(w.rate("b"), link * 3 / 10, 0.02);
  EXPECT_WITHIN(w.rate("c"), link / 5, 0.02);
  EXPECT_WITHIN(w.rate("root"), link, 0.005);
}

TEST(Htb, IdleSiblingsRateGoesToOthersUpToTheirCeil) {
  const uint64_t link = 125000;
  Plan p;
  // c (40 %) is idle: a may take everything, b at most 30 %.
  p.classes = {cls("root", -1, link, link), cls("a", 0, link * 4 / 10, link), cls("b", 0, link / 5, link * 3 / 10),
               cls("c", 0, link * 4 / 10, link)};
  Sim sim(p);
  std::vector<std::pair<uint64_t, uint32_t>> b_log;
  int32_t b = sim.s.find("b");
  sim.on_send = [&](const Sim::Pkt& pk, uint64_t t) {
    if (pk.leaf == static_cast<uint32_t>(b)) b_log.push_back({t, pk.len});
  };
  sim.backlog("a", 1000);
  sim.backlog("b", 1000);
  sim.run_until(1 * kSec);
  Window w(sim);
  sim.run_until(21 * kSec);
  EXPECT_WITHIN(w.rate("b"), link * 3 / 10, 0.02);
  EXPECT_WITHIN(w.rate("a"), link * 7 / 10, 0.02);
  EXPECT_WITHIN(w.rate("root"), link, 0.005);
  EXPECT_GT(sim.s.stats(b).borrowed_bytes, 0u);
  // b's ceil bucket (default: one MTU) plus one packet, never more.
  expect_never_above(b_log, link * 3 / 10, 1514 + 1000);
}

TEST(Htb, AmongBorrowersTheHigherPriorityGetsTheSpareFirst) {
  const uint64_t link = 125000;
  Plan p;
  p.classes = {cls("root", -1, link, link), cls("hi", 0, link / 5, link, 0), cls("lo", 0, link / 5, link, 1),
               cls("idle", 0, link * 6 / 10, link, 0)};
  Sim sim(p);
  sim.backlog("hi", 1000);
  sim.backlog("lo", 1000);
  sim.run_until(1 * kSec);
  Window w(sim);
  sim.run_until(21 * kSec);
  EXPECT_WITHIN(w.rate("hi"), link * 8 / 10, 0.02);  // its 20 % and all the spare 60 %
  EXPECT_WITHIN(w.rate("lo"), link * 2 / 10, 0.02);  // its guarantee only
}

TEST(Htb, BorrowersOfEqualPriorityShareTheSpareByRate) {
  const uint64_t link = 125000;
  Plan p;
  p.classes = {cls("root", -1, link, link), cls("a", 0, link / 10, link), cls("b", 0, link * 2 / 10, link),
               cls("idle", 0, link * 7 / 10, link)};
  Sim sim(p);
  sim.backlog("a", 1000);
  sim.backlog("b", 1000);
  sim.run_until(1 * kSec);
  Window w(sim);
  sim.run_until(31 * kSec);
  // Spare 70 % in proportion 1:2 (the quanta follow the rates).
  EXPECT_WITHIN(w.rate("a"), link * (10 + 70.0 / 3) / 100, 0.02);
  EXPECT_WITHIN(w.rate("b"), link * (20 + 140.0 / 3) / 100, 0.02);
}

TEST(Htb, BorrowersOfEqualPriorityShareWhatAHigherPriorityLeavesByRate) {
  // hi takes the spare up to its 60 % ceil; c and d (15 %, 10 %) share the
  // 15 % left 15:10 although both also send on their own rates in between.
  for (uint32_t len : {300u, 700u, 1500u}) {
    const uint64_t link = 12500000;
    Plan p;
    p.classes = {cls("root", -1, link, link), cls("idle", 0, link / 2, link), cls("hi", 0, link / 4, link * 6 / 10),
                 cls("c", 0, link * 15 / 100, link, 1), cls("d", 0, link / 10, link, 1)};
    Sim sim(p);
    for (const char* n : {"hi", "c", "d"}) sim.backlog(n, len);
    sim.run_until(1 * kSec);
    Window w(sim);
    sim.run_until(3 * kSec);
    EXPECT_WITHIN(w.rate("hi"), link * 0.60, 0.02) << len;
    EXPECT_WITHIN(w.rate("c"), link * 0.24, 0.02) << len;
    EXPECT_WITHIN(w.rate("d"), link * 0.16, 0.02) << len;
  }
}

TEST(Htb, LinkIsFullyUsedWhileAnyClassWithinCeilHasPackets) {
  const uint64_t link = 125000;
  Plan p;
  // Two subtrees; only one leaf of one subtree busy, then a trickle elsewhere.
  p.classes = {cls("root", -1, link, link),      cls("x", 0, link / 2, link),     cls("y", 0, link / 2, link),
               cls("x1", 1, link / 4, link),     cls("x2", 1, link / 4, link),    cls("y1", 2, link / 2, link)};
  Sim sim(p);
  sim.backlog("x1", 1200);
  sim.run_until(1 * kSec);
  Window w(sim);
  sim.run_until(11 * kSec);
  EXPECT_WITHIN(w.rate("x1"), link, 0.01);
  sim.periodic("y1", 200, 10 * kMs, 1, sim.t);  // 20 kB/s
  sim.run_until(12 * kSec);
  Window w2(sim);
  sim.run_until(22 * kSec);
  EXPECT_WITHIN(w2.rate("root"), link, 0.01);
  EXPECT_WITHIN(w2.rate("y1"), 20000, 0.02);
  EXPECT_WITHIN(w2.rate("x1"), link - 20000, 0.02);
}

// Seed 003 §3.4: the moat's 128 kbit/s uplink.
Plan seed003() {
  Plan p;
  p.classes = {cls("root", -1, 16000, 16000), cls("audio", 0, 8000, 8000, 0), cls("camera", 0, 1200, 16000, 1),
               cls("web", 0, 4800, 16000, 2), cls("video", 0, 2000, 16000, 3)};
  return p;
}

TEST(Htb, Seed003AudioKeepsItsRateWhileVideoFloodsAndVideoBorrowsWhenAudioStops) {
  Sim sim(seed003());
  const int32_t audio = sim.s.find("audio");
  uint64_t audio_max_delay = 0;
  sim.on_send = [&](const Sim::Pkt& pk, uint64_t t) {
    if (pk.leaf == static_cast<uint32_t>(audio)) audio_max_delay = std::max(audio_max_delay, t - pk.enq);
  };
  size_t a = sim.periodic("audio", 200, 25 * kMs, 1, 0, 30 * kSec);  // 8000 B/s: exactly its rate
  sim.periodic("camera", 600, 500 * kMs);                             // 1200 B/s: its rate
  size_t v = sim.periodic("video", 1400, 10 * kMs, 2);                // 280 kB/s into a 16 kB/s link
  sim.run_until(5 * kSec);
  Window w(sim);
  sim.run_until(30 * kSec);
  EXPECT_WITHIN(w.rate("audio"), 8000, 0.02);
  EXPECT_WITHIN(w.rate("camera"), 1200, 0.03);
  EXPECT_WITHIN(w.rate("video"), 16000 - 8000 - 1200, 0.03);  // the leftovers, web's share included
  EXPECT_EQ(sim.s.stats(audio).dropped_pkts, 0u);
  EXPECT_EQ(sim.srcs[a].refused, 0u);
  EXPECT_GT(sim.s.stats(sim.s.find("video")).dropped_pkts, 0u);
  EXPECT_EQ(sim.s.stats(sim.s.find("video")).dropped_pkts, sim.srcs[v].refused);
  // One MTU at the link rate ahead of it, and its own packet.
  EXPECT_LE(audio_max_delay, (1514 + 200) * kHz / 16000);
  sim.run_until(35 * kSec);
  Window w2(sim);
  sim.run_until(60 * kSec);
  EXPECT_WITHIN(w2.rate("video"), 16000 - 1200, 0.02);
  EXPECT_WITHIN(w2.rate("root"), 16000, 0.01);
}

TEST(Htb, FloodIntoOneClassDropsThereAndOthersKeepTheirGuarantee) {
  const uint64_t link = 125000;
  Plan p;
  p.classes = {cls("root", -1, link, link), cls("flood", 0, link / 4, link), cls("b", 0, link / 4, link),
               cls("c", 0, link / 4, link, 1), cls("d", 0, link / 4, link, 2)};
  Sim sim(p);
  size_t f = sim.periodic("flood", 1500, 1 * kMs, 10);  // 15 MB/s
  std::vector<size_t> others;
  for (const char* n : {"b", "c", "d"})  // 90 % of each guarantee, various sizes
    others.push_back(sim.periodic(n, 500, 500 * kHz / (link / 4 * 9 / 10)));
  sim.run_until(1 * kSec);
  Window w(sim);
  sim.run_until(21 * kSec);
  for (const char* n : {"b", "c", "d"}) {
    EXPECT_WITHIN(w.rate(n), link / 4 * 9 / 10, 0.02) << n;
    EXPECT_EQ(sim.s.stats(sim.s.find(n)).dropped_pkts, 0u) << n;
  }
  for (size_t o : others) EXPECT_EQ(sim.srcs[o].refused, 0u);
  EXPECT_WITHIN(w.rate("flood"), link - 3 * (link / 4 * 9 / 10), 0.02);
  EXPECT_GT(sim.s.stats(sim.s.find("flood")).dropped_pkts, 0u);
  EXPECT_EQ(sim.s.stats(sim.s.find("flood")).dropped_pkts, sim.srcs[f].refused);
}

TEST(Htb, TopPriorityDelayIsAtMostOneMtuAtLinkRatePlusItsOwn) {
  const uint64_t link = 125000;
  Plan p;
  p.classes = {cls("root", -1, link, link), cls("voice", 0, link / 10, link / 10, 0),
               cls("bulk1", 0, link * 3 / 10, link, 1), cls("bulk2", 0, link * 3 / 10, link, 1),
               cls("bulk3", 0, link * 3 / 10, link, 2)};
  Sim sim(p);
  const uint32_t voice = sim.s.find("voice");
  uint64_t worst = 0, n = 0;
  sim.on_send = [&](const Sim::Pkt& pk, uint64_t t) {
    if (pk.leaf == voice) {
      worst = std::max(worst, t - pk.enq);
      n++;
    }
  };
  sim.backlog("bulk1", 1514);
  sim.backlog("bulk2", 1514);
  sim.backlog("bulk3", 1514);
  sim.periodic("voice", 160, 13 * kMs + 7, 1);  // ~12.3 kB/s, not aligned with the bulk packets
  sim.run_until(20 * kSec);
  EXPECT_GT(n, 1000u);
  EXPECT_LE(worst, (1514 + 160) * kHz / link);
}

bool has_error(const std::vector<PlanError>& errs, int32_t cls, const std::string& part) {
  for (const auto& e : errs)
    if (e.cls == cls && e.what.find(part) != std::string::npos) return true;
  return false;
}

std::string dump(const std::vector<PlanError>& errs) {
  std::string s;
  for (const auto& e : errs) s += std::to_string(e.cls) + ": " + e.what + "\n";
  return s;
}

TEST(HtbValidate, AcceptsSeed003) { EXPECT_TRUE(validate(seed003()).empty()) << dump(validate(seed003())); }

TEST(HtbValidate, RejectsChildrenRatesAboveTheParents) {
  Plan p;
  p.classes = {cls("root", -1, 100, 100), cls("a", 0, 60, 100), cls("b", 0, 60, 100)};
  auto e = validate(p);
  EXPECT_TRUE(has_error(e, 0, "children's rates 120 B/s exceed the parent's 100")) << dump(e);
}

TEST(HtbValidate, RejectsCeilBelowRate) {
  Plan p;
  p.classes = {cls("root", -1, 100, 100), cls("a", 0, 60, 50)};
  auto e = validate(p);
  EXPECT_TRUE(has_error(e, 1, "ceil 50 B/s is below the rate 60")) << dump(e);
}

TEST(HtbValidate, RejectsParentIndexOutOfRange) {
  Plan p;
  p.classes = {cls("root", -1, 100, 100), cls("a", 7, 10, 100), cls("b", -3, 10, 100)};
  auto e = validate(p);
  EXPECT_TRUE(has_error(e, 1, "parent index 7 out of range")) << dump(e);
  EXPECT_TRUE(has_error(e, 2, "parent index -3 out of range")) << dump(e);
}

TEST(HtbValidate, RejectsClassWithoutParent) {
  Plan p;
  p.classes = {cls("root", -1, 100, 100), cls("a", -1, 10, 100)};
  auto e = validate(p);
  EXPECT_TRUE(has_error(e, 1, "without a parent")) << dump(e);
}

TEST(HtbValidate, RejectsParentAfterChild) {
  Plan p;
  p.classes = {cls("root", -1, 100, 100), cls("a", 2, 10, 100), cls("inner", 0, 50, 100)};
  auto e = validate(p);
  EXPECT_TRUE(has_error(e, 1, "does not precede")) << dump(e);
}

TEST(HtbValidate, RejectsDuplicateNames) {
  Plan p;
  p.classes = {cls("root", -1, 100, 100), cls("a", 0, 10, 100), cls("a", 0, 10, 100)};
  auto e = validate(p);
  EXPECT_TRUE(has_error(e, 2, "duplicate name \"a\"")) << dump(e);
}

TEST(HtbValidate, RejectsRootRateOtherThanCeil) {
  Plan p;
  p.classes = {cls("root", -1, 100, 200), cls("a", 0, 10, 100)};
  auto e = validate(p);
  EXPECT_TRUE(has_error(e, 0, "must equal its ceil")) << dump(e);
}

TEST(HtbValidate, RejectsEmptyPlanRootWithParentAndZeroCeil) {
  EXPECT_TRUE(has_error(validate(Plan{}), -1, "no classes"));
  Plan p;
  p.classes = {cls("root", 0, 100, 100), cls("a", 0, 0, 0)};
  auto e = validate(p);
  EXPECT_TRUE(has_error(e, 0, "has a parent")) << dump(e);
  EXPECT_TRUE(has_error(e, 1, "ceil 0")) << dump(e);
}

TEST(HtbAdopt, KeepsQueuedPacketsInOrderAndHandsBackOrphans) {
  Plan p1, p2;
  p1.classes = {cls("root", -1, 1000, 1000), cls("a", 0, 300, 1000), cls("b", 0, 300, 1000), cls("c", 0, 300, 1000)};
  p2.classes = {cls("root", -1, 1000, 1000), cls("d", 0, 300, 1000), cls("b", 0, 300, 1000), cls("a", 0, 300, 1000)};
  p2.classes[2].limit = 3;
  Scheduler old_s(p1, kHz), new_s(p2, kHz);
  auto h = [](uintptr_t v) { return reinterpret_cast<void*>(v); };
  for (uintptr_t i = 1; i <= 5; i++) ASSERT_TRUE(old_s.enqueue(1, h(i), 100, 0));
  for (uintptr_t i = 11; i <= 15; i++) ASSERT_TRUE(old_s.enqueue(2, h(i), 100, 0));
  for (uintptr_t i = 21; i <= 23; i++) ASSERT_TRUE(old_s.enqueue(3, h(i), 100, 0));
  void* orphans[3];
  // b keeps 3 of 5 (its new limit), c is gone: 5 orphans, 3 per call.
  ASSERT_EQ(new_s.adopt(old_s, orphans, 3), 3u);
  EXPECT_EQ(orphans[0], h(14));
  EXPECT_EQ(orphans[1], h(15));
  EXPECT_EQ(orphans[2], h(21));
  ASSERT_EQ(new_s.adopt(old_s, orphans, 3), 2u);
  EXPECT_EQ(orphans[0], h(22));
  EXPECT_EQ(orphans[1], h(23));
  EXPECT_EQ(old_s.backlog(), 0u);
  EXPECT_EQ(new_s.backlog(), 8u);
  EXPECT_EQ(old_s.stats(3).dropped_pkts, 3u);
  EXPECT_EQ(new_s.stats(3).qlen, 5u);
  std::vector<uintptr_t> got_a, got_b;
  void* out[16];
  for (uint64_t t = 0; new_s.backlog() && t < 100 * kSec;) {
    unsigned n = new_s.dequeue(t, out, 16, nullptr, nullptr);
    for (unsigned i = 0; i < n; i++) {
      uintptr_t v = reinterpret_cast<uintptr_t>(out[i]);
      (v < 10 ? got_a : got_b).push_back(v);
    }
    t = new_s.next_send(t);
  }
  EXPECT_EQ(got_a, (std::vector<uintptr_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(got_b, (std::vector<uintptr_t>{11, 12, 13}));
}

// enqueue_burst is enqueue() for each packet in order: the same packets
// refused (a full leaf, a class that is no leaf, an index out of range) and
// the same order out, on a tree where the burst spans moats and priorities.
TEST(HtbBurst, EnqueueBurstIsEnqueueInOrder) {
  Plan p;
  p.classes.push_back(cls("root", -1, 10000000, 10000000));
  for (unsigned m = 0; m < 8; m++) {
    int32_t inner = static_cast<int32_t>(p.classes.size());
    p.classes.push_back(cls("m" + std::to_string(m), 0, 1200000, 5000000));
    for (unsigned k = 0; k < 3; k++) {
      p.classes.push_back(cls("m" + std::to_string(m) + "/" + std::to_string(k), inner, 300000, 3000000, k));
      p.classes.back().limit = 3;
    }
  }
  ASSERT_TRUE(validate(p).empty());
  Scheduler one(p, kHz), burst(p, kHz);
  const uint32_t n_cls = one.classes();
  uintptr_t id = 1;
  uint32_t x = 12345;
  auto rnd = [&x] { return x = x * 1103515245 + 12345, (x >> 8) % 1000; };
  std::vector<uintptr_t> out_one, out_burst;
  uint64_t refused_total = 0;
  for (uint64_t t = 0; t < 2 * kSec; t += kMs) {
    uint32_t leaves[64], lens[64];
    void* pkts[64];
    const unsigned n = 1 + rnd() % 64;
    for (unsigned i = 0; i < n; i++) {
      leaves[i] = rnd() % 50 == 0 ? n_cls + 1 : rnd() % n_cls;  // some inner classes and one beyond the tree
      lens[i] = 64 + rnd();
      pkts[i] = reinterpret_cast<void*>(id++);
    }
    uint64_t want = 0;
    for (unsigned i = 0; i < n; i++)
      if (!one.enqueue(leaves[i], pkts[i], lens[i], t)) want |= uint64_t{1} << i;
    const uint64_t got = burst.enqueue_burst(leaves, pkts, lens, n, t);
    ASSERT_EQ(got, want) << "t=" << t;
    refused_total += std::popcount(got);
    void* o[64];
    for (unsigned k = one.dequeue(t, o, 64, nullptr, nullptr), i = 0; i < k; i++)
      out_one.push_back(reinterpret_cast<uintptr_t>(o[i]));
    for (unsigned k = burst.dequeue(t, o, 64, nullptr, nullptr), i = 0; i < k; i++)
      out_burst.push_back(reinterpret_cast<uintptr_t>(o[i]));
  }
  EXPECT_GT(refused_total, 1000u);  // full leaves and non-leaves were both offered
  EXPECT_GT(out_one.size(), 10000u);
  EXPECT_EQ(out_one, out_burst);
  for (uint32_t c = 0; c < n_cls; c++) {
    EXPECT_EQ(one.stats(c).sent_bytes, burst.stats(c).sent_bytes) << c;
    EXPECT_EQ(one.stats(c).dropped_pkts, burst.stats(c).dropped_pkts) << c;
  }
}

// Counters where they are kept: a leaf's sends, drops and queue; an inner
// class's sends (the sum of its leaves') and borrowing; no drops above a leaf.
TEST(HtbStats, InnerClassesCountTheirLeavesSendsAndOnlyLeavesDrop) {
  Plan p;
  // A link that never holds them back: only their own buckets count.
  p.classes = {cls("root", -1, 1000000, 1000000), cls("m", 0, 4000, 1000000), cls("a", 1, 1000, 1000000, 0),
               cls("b", 1, 3000, 1000000, 1)};
  p.classes[2].limit = 4;
  p.classes[1].burst = 100000;                     // m lends all they want
  p.classes[2].burst = p.classes[3].burst = 400;  // one packet on their own rate, then they borrow
  Scheduler s(p, kHz);
  auto h = [](uintptr_t v) { return reinterpret_cast<void*>(v); };
  for (uintptr_t i = 1; i <= 6; i++) s.enqueue(2, h(i), 500, 0);  // 2 beyond the limit
  for (uintptr_t i = 11; i <= 13; i++) s.enqueue(3, h(i), 300, 0);
  EXPECT_EQ(s.stats(2).qlen, 4u);
  EXPECT_EQ(s.stats(2).qbytes, 2000u);
  EXPECT_EQ(s.stats(2).dropped_pkts, 2u);
  EXPECT_EQ(s.stats(2).dropped_bytes, 1000u);
  void* out[16];
  for (uint64_t t = 0; s.backlog() && t < 100 * kSec; t = s.next_send(t)) s.dequeue(t, out, 16, nullptr, nullptr);
  EXPECT_EQ(s.stats(2).sent_pkts, 4u);
  EXPECT_EQ(s.stats(3).sent_pkts, 3u);
  EXPECT_EQ(s.stats(2).qlen, 0u);
  for (uint32_t c : {0u, 1u}) {
    EXPECT_EQ(s.stats(c).sent_pkts, 7u) << c;
    EXPECT_EQ(s.stats(c).sent_bytes, 2900u) << c;
    EXPECT_EQ(s.stats(c).dropped_pkts, 0u) << c;
    EXPECT_EQ(s.stats(c).qlen, 0u) << c;
  }
  // 2,000 and 900 bytes at once against 400-byte buckets: both leaves
  // borrowed (from m, which had rate to spare), m did not.
  EXPECT_GT(s.stats(2).borrowed_bytes, 0u);
  EXPECT_GT(s.stats(3).borrowed_bytes, 0u);
  EXPECT_EQ(s.stats(1).borrowed_bytes, 0u);
}

Plan codel_plan(uint64_t link) {
  Plan p;
  p.classes = {cls("root", -1, link, link), cls("q", 0, link, link)};
  p.classes[1].drop = DropPolicy::codel;
  p.classes[1].limit = 2000;
  return p;
}

TEST(HtbCodel, DropsUnderAStandingQueue) {
  const uint64_t link = 1250000;  // 10 Mbit/s
  Sim sim(codel_plan(link));
  uint64_t late_worst = 0, late_sum = 0, late_n = 0;
  sim.on_send = [&](const Sim::Pkt& pk, uint64_t t) {
    if (t > 20 * kSec) {
      late_worst = std::max(late_worst, t - pk.enq);
      late_sum += t - pk.enq;
      late_n++;
    }
  };
  size_t s = sim.periodic("q", 1500, 1000000);  // 1.5 MB/s: 1.2 times the link, unresponsive
  sim.run_until(30 * kSec);
  EXPECT_EQ(sim.srcs[s].refused, 0u);  // never the tail: the AQM dropped
  EXPECT_GT(sim.s.stats(1).dropped_pkts, 4000u);  // most of the 5000 offered beyond the link
  EXPECT_EQ(sim.s.stats(1).dropped_pkts, sim.n_dropped);
  // A tail-drop queue 2000 deep would hold 2.4 s. Against traffic that never
  // slows down CoDel cycles (drops until the sojourn is under its target,
  // stops, the queue builds again): here between about 10 and 130 ms.
  EXPECT_LT(late_sum / late_n, 150 * kMs);
  EXPECT_LT(late_worst, 300 * kMs);
  EXPECT_WITHIN(sim.s.stats(1).sent_bytes, link * 30, 0.02);
}

TEST(HtbCodel, DoesNotDropAShortBurst) {
  const uint64_t link = 1250000;
  Sim sim(codel_plan(link));
  sim.periodic("q", 1500, 1 * kSec, 50, 0, 10 * kSec);  // 75 kB at once: drains in 60 ms, each second
  sim.run_until(11 * kSec);
  EXPECT_EQ(sim.s.stats(1).dropped_pkts, 0u);
  EXPECT_EQ(sim.s.stats(1).sent_pkts, 500u);
}

// The portal: 4096 moat subtrees of 4 classes on one port, each moat shaped
// to its 1 Mbit/s access rate.
TEST(HtbScale, FourThousandMoatsOfFourClassesKeepTheirRates) {
  const unsigned kMoats = 4096;
  const uint64_t moat = 125000;
  const uint64_t shares[4] = {40, 30, 20, 10};
  Plan p;
  p.classes.push_back(cls("root", -1, moat * kMoats, moat * kMoats));
  for (unsigned m = 0; m < kMoats; m++) {
    int32_t inner = static_cast<int32_t>(p.classes.size());
    p.classes.push_back(cls("moat" + std::to_string(m), 0, moat, moat));
    for (unsigned k = 0; k < 4; k++)
      p.classes.push_back(
          cls("moat" + std::to_string(m) + "/" + std::to_string(k), inner, moat * shares[k] / 100, moat, k));
  }
  ASSERT_TRUE(validate(p).empty());
  Sim sim(p);
  // Every moat saturates all four classes, except one in four whose only
  // busy class is its 10 % one, which borrows the moat's whole rate.
  for (unsigned m = 0; m < kMoats; m++)
    for (unsigned k = 0; k < 4; k++)
      if (m % 4 != 1 || k == 3) sim.backlog("moat" + std::to_string(m) + "/" + std::to_string(k), 256, 4);
  sim.run_until(100 * kMs);
  Window w(sim);
  sim.run_until(1100 * kMs);
  EXPECT_WITHIN(w.rate("root"), moat * kMoats, 0.005);
  for (unsigned m : {0u, 1u, 1234u, 2049u, 4095u}) {
    std::string name = "moat" + std::to_string(m);
    EXPECT_WITHIN(w.rate(name), moat, 0.02) << name;
    for (unsigned k = 0; k < 4; k++) {
      double expect = m % 4 == 1 ? (k == 3 ? moat : 0) : moat * shares[k] / 100;
      if (expect == 0)
        EXPECT_EQ(w.rate(name + "/" + std::to_string(k)), 0) << name << "/" << k;
      else
        EXPECT_WITHIN(w.rate(name + "/" + std::to_string(k)), expect, 0.04) << name << "/" << k;
    }
  }
}

}  // namespace
}  // namespace moat::qos
