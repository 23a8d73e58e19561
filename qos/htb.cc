// The hierarchical scheduler (issue 7): Linux HTB's algorithm (net/sched/
// sch_htb.c) in user space, with three departures said where they are made:
// token buckets in exact integer byte·ticks, deficit round robin at every
// level of the descent (HTB's only at the leaf's parent), and the root gated
// as the link on every packet.
//
// The state, per class:
//   tokens / ctokens   the rate and ceil buckets, in byte·ticks (bytes × hz):
//                      t ticks at r B/s add r·t, a packet of L bytes costs
//                      L·hz. No division per packet, no rounding drift.
//   mode               can (tokens >= 0: sends on its own rate), may (only
//                      ctokens >= 0: may borrow), cant (ceil exceeded).
//   act                the priorities for which a queued leaf below it is
//                      routed to it (HTB's prio_activity).
// and per scheduler:
//   rows[level][prio]  circular lists of classes in mode can with act ∋ prio:
//                      the lenders. Leaves are level 0; an inner class's level
//                      is one more than its highest child's.
//   feeds[class][prio] circular lists of the class's children in mode may
//                      with act ∋ prio: its borrowers.
//   a wait heap        every class not in mode can, keyed by when its mode
//                      may rise (time for the bucket to reach 0). Modes only
//                      fall by a charge and only rise with time, so charges
//                      lower them at once and the heap raises them.
// Dequeue takes the lowest level with a lender, the lowest priority in it,
// the lender at the list's cursor, and walks down the feeds' cursors to a
// leaf. The work per packet is the tree's depth times a heap operation (log
// of the classes) per mode change, whatever the number of classes: nothing
// ever scans the classes.
#include "qos/htb.hh"

#include <algorithm>
#include <bit>
#include <cmath>
#include <string_view>
#include <unordered_map>

namespace moat::qos {
namespace {

constexpr uint32_t kNil = UINT32_MAX;
constexpr unsigned kPrios = 8;
constexpr unsigned kMaxLevels = 8;          // the root's depth-from-leaf at most 7
constexpr uint64_t kMtu = 1514;             // the largest frame we size buckets and quanta for
constexpr uint64_t kDefaultBurstUs = 4000;  // a default bucket holds 4 ms at its rate (or one MTU)
// Debt beyond a full bucket plus this much is forgiven (HTB forgives beyond
// 60 s of rate): it keeps the arithmetic in 64 bits and only classes above a
// lender, which never lend while in debt, can run up a debt at all.
constexpr uint64_t kDebtBytes = 65536;
// Buckets are capped so bytes × hz stays well inside int64.
constexpr uint64_t kMaxByteTicks = uint64_t{1} << 61;

enum Mode : uint8_t { kCan, kMay, kCant };

// Counters are read by the control thread: relaxed stores by the one writer.
template <class T>
inline void radd(T& f, T d) {
  __atomic_store_n(&f, f + d, __ATOMIC_RELAXED);
}
template <class T>
inline void rset(T& f, T v) {
  __atomic_store_n(&f, v, __ATOMIC_RELAXED);
}

uint64_t default_burst(uint64_t rate) {
  return std::max<uint64_t>(kMtu, rate * kDefaultBurstUs / 1000000);
}

uint64_t ceil_div(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

struct Slot {
  void* pkt;
  uint32_t len;
};

// A class's membership of one round-robin list for one priority, and its
// deficit there. Trivial (set up by the constructor) so that it can share
// a union in Node.
struct Ring {
  uint32_t next, prev;
  int32_t deficit;
  // It left the list in the middle of its turn (its ceil ran out, not its
  // queue): it rejoins at the cursor and finishes the turn, or a class that
  // changes mode often would forfeit turns. A class the cursor merely passed
  // to (its neighbour left) has not begun a turn and resumes none.
  bool in_turn, resume;
};
// [0]: in a row (as a lender), [1]: in its parent's feed (as a borrower).
struct Link {
  Ring r[2];
};

// A leaf's counters (the control thread reads them); an inner class's sent
// counters live in its Node's second line, which the charge touches anyway.
struct LeafCounters {
  uint64_t sent_pkts, sent_bytes, dropped_pkts, dropped_bytes;
};

// How many of a leaf's queue slots live in its Node: at the portal a leaf
// holds a packet or two at a time (an emptied queue restarts at slot 0), so
// its packets stay in the Node's third line instead of a line of their own.
constexpr uint32_t kInlineSlots = 2;

// One class in three cache lines, so that a packet's way through a tree of
// 20,000 classes (the portal's) misses on few lines, all of them adjacent:
// the first holds what the charge reads and writes on every class of the
// path (HTB's htb_charge_class), the second what a leaf's enqueue and
// dequeue touch (its queue and its two list memberships) or an inner class's
// feed cursors and sent counters, the third a leaf's counters and its first
// queue slots. Everything else (names, the plan, CoDel, heap positions,
// borrow counters, an inner class's 8 list links, slots beyond the first
// two) is elsewhere.
struct alignas(64) Node {
  int64_t tokens, ctokens;    // byte·ticks, as of t_c
  uint64_t t_c;
  uint64_t rate, ceil;        // B/s
  int64_t buffer, cbuffer;    // full buckets; the floors (deepest debt kept) are these plus Impl::debt below 0
  uint32_t parent;
  uint8_t level, prio, mode, act;  // level 0: a leaf

  int32_t quantum;
  uint32_t aux;  // a leaf: its Codel (kNil: tail drop); an inner class: its 8 Links in Impl::links
  union {
    struct {
      // A ring of q_cap slots: 0 and 1 in `slot` below, the rest from
      // Impl::slots[q_base], preallocated.
      uint32_t q_base, q_cap, q_head, q_len;
      uint64_t q_bytes;  // q_len and q_bytes are read by the control thread
      Link link;         // its one priority's memberships
    } leaf;
    struct {
      uint32_t feed[kPrios];  // cursor per priority
      uint64_t sent_pkts, sent_bytes;
    } inner;
  };
  // Third line, leaves only (an inner class leaves it unused: 4,097 of the
  // portal's 20,481 classes).
  LeafCounters counts;
  Slot slot[kInlineSlots];
};
static_assert(sizeof(Node) == 192);

// RFC 8289's state for one leaf; enqueue times in Impl::enq at e_base + slot.
struct Codel {
  uint64_t target = 0, interval = 0;  // ticks
  uint64_t first_above = 0, drop_next = 0;
  uint32_t count = 0, lastcount = 0;
  bool dropping = false;
  uint32_t e_base = 0;
};

struct HeapEnt {
  uint64_t key;
  uint32_t cls;
};

}  // namespace

std::vector<PlanError> validate(const Plan& p) {
  std::vector<PlanError> errs;
  auto err = [&](int32_t c, std::string w) { errs.push_back({c, std::move(w)}); };
  const auto& cs = p.classes;
  if (cs.empty()) {
    err(-1, "the plan has no classes: the root (the link) is needed");
    return errs;
  }
  if (cs.size() >= kNil / kPrios) {
    err(-1, "too many classes (" + std::to_string(cs.size()) + ")");
    return errs;
  }
  const int32_t n = static_cast<int32_t>(cs.size());
  std::unordered_map<std::string_view, int32_t> names;
  std::vector<uint64_t> child_rates(n, 0);
  std::vector<uint32_t> children(n, 0), depth(n, 0);
  for (int32_t i = 0; i < n; i++) {
    const ClassSpec& c = cs[i];
    if (c.name.empty())
      err(i, "a class needs a name");
    else if (auto [it, fresh] = names.emplace(c.name, i); !fresh)
      err(i, "duplicate name \"" + c.name + "\" (also class " + std::to_string(it->second) + ")");
    if (i == 0) {
      if (c.parent != -1) err(0, "the root (class 0) has a parent");
      if (c.rate == 0) err(0, "the root's rate is 0: it is the link");
      if (c.rate != c.ceil)
        err(0, "the root is the link: its rate " + std::to_string(c.rate) + " B/s must equal its ceil " +
                   std::to_string(c.ceil));
    } else if (c.parent == -1) {
      err(i, "class without a parent (only the root, class 0, has none)");
    } else if (c.parent < 0 || c.parent >= n) {
      err(i, "parent index " + std::to_string(c.parent) + " out of range");
    } else if (c.parent >= i) {
      err(i, "parent " + std::to_string(c.parent) + " does not precede the class (a parent comes first)");
    } else {
      child_rates[c.parent] += c.rate;
      children[c.parent]++;
      depth[i] = depth[c.parent] + 1;
      if (depth[i] == kMaxLevels)
        err(i, "tree deeper than " + std::to_string(kMaxLevels) + " levels");
    }
    if (c.ceil == 0)
      err(i, "ceil 0: the class could never send");
    else if (c.ceil < c.rate)
      err(i, "ceil " + std::to_string(c.ceil) + " B/s is below the rate " + std::to_string(c.rate));
    if (c.prio >= kPrios) err(i, "prio " + std::to_string(c.prio) + ": 0..7");
  }
  for (int32_t i = 0; i < n; i++) {
    const ClassSpec& c = cs[i];
    if (child_rates[i] > c.rate)
      err(i, "children's rates " + std::to_string(child_rates[i]) + " B/s exceed the parent's " +
                 std::to_string(c.rate));
    if (children[i] == 0) {
      if (c.limit == 0) err(i, "a leaf with limit 0 could never queue");
      if (c.drop == DropPolicy::codel && (c.codel_target_us == 0 || c.codel_interval_us == 0))
        err(i, "codel needs a target and an interval above 0");
    }
  }
  return errs;
}

struct Scheduler::Impl {
  Plan plan;
  uint64_t hz;
  int64_t debt;  // kDebtBytes in byte·ticks
  std::vector<Node> nodes;
  std::vector<uint64_t> borrowed;    // by class: written only while a class borrows
  std::vector<uint32_t> heap_pos;    // by class; kNil: not waiting
  std::vector<Link> links;           // inner classes' 8 each
  std::vector<Slot> slots;
  std::vector<uint64_t> enq;  // CoDel leaves' enqueue times
  std::vector<Codel> codels;
  std::unordered_map<std::string_view, int32_t> by_name;  // views into plan
  uint32_t rows[kMaxLevels][kPrios];
  uint8_t row_mask[kMaxLevels] = {};
  uint8_t level_mask = 0;
  std::vector<HeapEnt> heap;  // reserved for every class: never grows per packet
  uint64_t root_wake = 0;     // the root (the link) waits outside the heap
  uint64_t now = 0;           // the latest time seen: time never goes back here
  uint32_t backlog = 0;

  Impl(const Plan& p, uint64_t hz_) : plan(p), hz(hz_ ? hz_ : 1) {
    debt = static_cast<int64_t>(kDebtBytes * hz);
    const uint32_t n = static_cast<uint32_t>(plan.classes.size());
    nodes.resize(n);
    borrowed.resize(n);
    heap_pos.assign(n, kNil);
    for (auto& r : rows)
      for (auto& c : r) c = kNil;
    std::vector<uint32_t> children(n, 0);
    std::vector<uint64_t> min_child_rate(n, UINT64_MAX);
    nodes[0].parent = kNil;
    for (uint32_t i = 1; i < n; i++) {
      uint32_t par = static_cast<uint32_t>(plan.classes[i].parent);
      nodes[i].parent = par;
      children[par]++;
      if (plan.classes[i].rate) min_child_rate[par] = std::min(min_child_rate[par], plan.classes[i].rate);
    }
    for (uint32_t i = n; i-- > 1;) {  // children follow parents: heights bottom up
      Node& par = nodes[nodes[i].parent];
      par.level = std::max<uint8_t>(par.level, nodes[i].level + 1);
    }
    const Ring idle{kNil, kNil, 0, false, false};
    uint64_t n_links = 0, n_slots = 0, n_enq = 0;
    uint32_t n_codel = 0;
    for (uint32_t i = 0; i < n; i++) {
      const ClassSpec& s = plan.classes[i];
      Node& c = nodes[i];
      c.prio = s.prio;
      if (children[i]) {
        c.aux = static_cast<uint32_t>(n_links);
        n_links += kPrios;
        for (uint32_t& f : c.inner.feed) f = kNil;
        c.inner.sent_pkts = c.inner.sent_bytes = 0;
      } else {
        c.aux = kNil;
        c.leaf.q_base = static_cast<uint32_t>(n_slots);
        c.leaf.q_cap = s.limit;
        c.counts = {};
        c.leaf.q_head = c.leaf.q_len = 0;
        c.leaf.q_bytes = 0;
        c.leaf.link.r[0] = c.leaf.link.r[1] = idle;
        n_slots += s.limit > kInlineSlots ? s.limit - kInlineSlots : 0;
        if (s.drop == DropPolicy::codel) {
          c.aux = n_codel++;
          n_enq += s.limit;
        }
      }
      // Quantum for the round robin among siblings: in proportion to the rate
      // (HTB's rate/r2q), the slowest sibling one MTU, at most 64 MTUs.
      uint64_t q = kMtu;
      if (c.parent != kNil && s.rate)
        q = static_cast<uint64_t>(static_cast<double>(kMtu) * s.rate / min_child_rate[c.parent]);
      c.quantum = static_cast<int32_t>(std::clamp<uint64_t>(q, kMtu, 64 * kMtu));
      c.rate = s.rate;
      c.ceil = s.ceil;
      uint64_t burst = s.burst ? s.burst : default_burst(s.rate);
      uint64_t cburst = s.cburst ? s.cburst : default_burst(s.ceil);
      if (i == 0) burst = cburst = std::max(burst, cburst);  // rate == ceil: one bucket, twice
      const uint64_t max_bytes = kMaxByteTicks / hz;
      burst = std::min(burst, max_bytes);
      cburst = std::min(cburst, max_bytes);
      c.buffer = static_cast<int64_t>(burst * hz);
      c.cbuffer = static_cast<int64_t>(cburst * hz);
      c.tokens = c.rate ? c.buffer : -1;  // a class with no rate only ever borrows
      c.ctokens = c.cbuffer;
      c.t_c = 0;
      c.mode = c.rate ? kCan : kMay;
      c.act = 0;
      by_name.emplace(plan.classes[i].name, static_cast<int32_t>(i));
    }
    links.resize(n_links);
    slots.resize(n_slots);
    enq.resize(n_enq);
    codels.resize(n_codel);
    uint64_t e = 0;
    for (uint32_t i = 0; i < n; i++) {
      Node& c = nodes[i];
      if (c.level) {
        for (uint32_t k = 0; k < kPrios; k++) {
          Link& l = links[c.aux + k];
          l.r[0] = l.r[1] = idle;
          l.r[0].deficit = l.r[1].deficit = c.quantum;
        }
        continue;
      }
      c.leaf.link.r[0].deficit = c.leaf.link.r[1].deficit = c.quantum;
      if (c.aux != kNil) {
        const ClassSpec& s = plan.classes[i];
        Codel& q = codels[c.aux];
        q.target = s.codel_target_us * hz / 1000000;
        q.interval = s.codel_interval_us * hz / 1000000;
        q.e_base = static_cast<uint32_t>(e);
        e += s.limit;
      }
    }
    heap.reserve(n);
  }

  bool is_leaf(uint32_t c) const { return nodes[c].level == 0; }
  // Slot i of the ring of leaf `n` (slots 0 and 1 live in the Node).
  Slot& slot(Node& n, uint32_t i) { return i < kInlineSlots ? n.slot[i] : slots[n.leaf.q_base + i - kInlineSlots]; }
  const Slot* slot_addr(const Node& n, uint32_t i) const {
    return i < kInlineSlots ? &n.slot[i] : &slots[n.leaf.q_base + i - kInlineSlots];
  }
  Link& link(uint32_t c, unsigned p) { return is_leaf(c) ? nodes[c].leaf.link : links[nodes[c].aux + p]; }

  // Buckets brought to `now` without storing (HTB's diff, capped by the
  // bucket). A product that overflows, or that fills the bucket, gives a
  // full bucket, so no per-class fill time is kept.
  static int64_t fill(int64_t tk, int64_t full, uint64_t r, uint64_t dt) {
    uint64_t gain;
    if (__builtin_mul_overflow(r, dt, &gain) || gain >= static_cast<uint64_t>(full - tk)) return full;
    return tk + static_cast<int64_t>(gain);
  }
  static int64_t toks_at(const Node& c, uint64_t now) { return fill(c.tokens, c.buffer, c.rate, now - c.t_c); }
  static int64_t ctoks_at(const Node& c, uint64_t now) { return fill(c.ctokens, c.cbuffer, c.ceil, now - c.t_c); }
  // The mode of a class whose buckets hold `t` and `ct` now; *wait: ticks
  // until it may rise (UINT64_MAX: never by itself).
  static Mode mode_of(const Node& c, int64_t t, int64_t ct, uint64_t* wait) {
    if (ct < 0) {
      *wait = ceil_div(static_cast<uint64_t>(-ct), c.ceil);
      return kCant;
    }
    if (t >= 0) {
      *wait = 0;
      return kCan;
    }
    *wait = c.rate ? ceil_div(static_cast<uint64_t>(-t), c.rate) : UINT64_MAX;
    return kMay;
  }

  Ring& ring(uint32_t c, unsigned p, unsigned k) { return link(c, p).r[k]; }
  // Circular lists with a cursor: a newcomer joins at the end of the round,
  // one whose turn was interrupted at the cursor. `k`: 0 a row, 1 a feed.
  void list_add(uint32_t& cur, uint32_t c, unsigned p, unsigned k) {
    Ring& l = ring(c, p, k);
    if (cur == kNil) {
      cur = l.next = l.prev = c;
      l.resume = false;
      return;
    }
    Ring& h = ring(cur, p, k);
    l.next = cur;
    l.prev = h.prev;
    ring(h.prev, p, k).next = c;
    h.prev = c;
    if (l.resume) cur = c;
    l.resume = false;
  }
  void list_del(uint32_t& cur, uint32_t c, unsigned p, unsigned k) {
    Ring& l = ring(c, p, k);
    l.resume = cur == c && l.in_turn;
    if (l.next == c) {
      cur = kNil;
    } else {
      ring(l.prev, p, k).next = l.next;
      ring(l.next, p, k).prev = l.prev;
      if (cur == c) cur = l.next;
    }
    l.next = l.prev = kNil;
  }
  void row_add(uint32_t c, uint8_t mask) {
    unsigned lv = nodes[c].level;
    for (uint8_t m = mask; m; m &= m - 1) list_add(rows[lv][std::countr_zero(m)], c, std::countr_zero(m), 0);
    row_mask[lv] |= mask;
    level_mask |= 1u << lv;
  }
  void row_del(uint32_t c, uint8_t mask) {
    unsigned lv = nodes[c].level;
    for (uint8_t m = mask; m; m &= m - 1) {
      unsigned p = std::countr_zero(m);
      list_del(rows[lv][p], c, p, 0);
      if (rows[lv][p] == kNil) row_mask[lv] &= ~(1u << p);
    }
    if (!row_mask[lv]) level_mask &= ~(1u << lv);
  }

  // HTB's htb_activate_prios, with one departure: a class stays in its
  // parent's feeds in mode can as well as may (only cant takes it out), so
  // that sending on its own rate does not cost it its place in the round
  // among borrowers. This is safe because a descent through a feed never
  // meets a class in mode can with packets: that class is in a row of a
  // lower level, and dequeue serves the lowest level first.
  //
  // feed_up: c (not in mode cant) becomes active for `mask`: it joins its
  // parent's feeds; the parent, newly active for those priorities, joins a
  // row (if it can lend) and its own parent's feeds (unless cant), and so on.
  void feed_up(uint32_t c, uint8_t mask) {
    while (nodes[c].parent != kNil && mask) {
      uint32_t par = nodes[c].parent;
      for (uint8_t m = mask; m; m &= m - 1) {
        unsigned p = std::countr_zero(m);
        uint32_t& cur = nodes[par].inner.feed[p];
        if (cur != kNil) mask &= ~(1u << p);  // the parent is active for p already
        list_add(cur, c, p, 1);
      }
      nodes[par].act |= mask;
      c = par;
      if (nodes[c].mode == kCant) return;  // its links wait for its mode to rise
      if (nodes[c].mode == kCan && mask) row_add(c, mask);
    }
  }
  void unfeed_up(uint32_t c, uint8_t mask) {
    while (nodes[c].parent != kNil && mask) {
      uint32_t par = nodes[c].parent;
      uint8_t gone = 0;
      for (uint8_t m = mask; m; m &= m - 1) {
        unsigned p = std::countr_zero(m);
        uint32_t& cur = nodes[par].inner.feed[p];
        list_del(cur, c, p, 1);
        if (cur == kNil) gone |= 1u << p;
      }
      mask = gone;
      nodes[par].act &= ~mask;
      c = par;
      if (nodes[c].mode == kCant) return;
      if (nodes[c].mode == kCan && mask) row_del(c, mask);
    }
  }
  // c's links for its active priorities as its mode goes from `from` to `to`.
  void relink(uint32_t c, Mode from, Mode to) {
    const uint8_t act = nodes[c].act;
    if (!act || from == to) return;
    if (from == kCan) row_del(c, act);
    if (from == kCant) feed_up(c, act);
    if (to == kCant) unfeed_up(c, act);
    if (to == kCan) row_add(c, act);
  }

  // The wait heap: an indexed binary min-heap on the time a class's mode may
  // rise. Ops are O(log classes); a timer wheel would be O(1) but needs a
  // resolution, and one heap op per mode change is not what costs here.
  void heap_swap(uint32_t a, uint32_t b) {
    std::swap(heap[a], heap[b]);
    heap_pos[heap[a].cls] = a;
    heap_pos[heap[b].cls] = b;
  }
  void sift_up(uint32_t i) {
    while (i && heap[(i - 1) / 2].key > heap[i].key) {
      heap_swap(i, (i - 1) / 2);
      i = (i - 1) / 2;
    }
  }
  void sift_down(uint32_t i) {
    const uint32_t n = static_cast<uint32_t>(heap.size());
    for (;;) {
      uint32_t l = 2 * i + 1, m = i;
      if (l < n && heap[l].key < heap[m].key) m = l;
      if (l + 1 < n && heap[l + 1].key < heap[m].key) m = l + 1;
      if (m == i) return;
      heap_swap(i, m);
      i = m;
    }
  }
  void heap_del(uint32_t c) {
    uint32_t i = heap_pos[c];
    if (i == kNil) return;
    uint32_t last = static_cast<uint32_t>(heap.size()) - 1;
    if (i != last) {
      heap_swap(i, last);
      heap.pop_back();
      sift_down(i);
      sift_up(i);
    } else {
      heap.pop_back();
    }
    heap_pos[c] = kNil;
  }
  void heap_set(uint32_t c, uint64_t key) {
    if (c == 0) {  // the root: the link's own timer, read by the gate and next_send
      root_wake = key;
      return;
    }
    uint32_t i = heap_pos[c];
    if (i == kNil) {
      i = static_cast<uint32_t>(heap.size());
      heap_pos[c] = i;
      heap.push_back({key, c});
      sift_up(i);
    } else {
      uint64_t old = heap[i].key;
      heap[i].key = key;
      key < old ? sift_up(i) : sift_down(i);
    }
  }

  // HTB's htb_change_class_mode plus the wait queue. `rekey`: the class left
  // the heap (an event) and must go back if still waiting; otherwise, as in
  // HTB, the key changes only with the mode: a key made early by a later
  // charge costs one spurious event, and a key is never late because buckets
  // only fill with time.
  void update_mode(uint32_t c, uint64_t now, bool rekey) {
    const Node& n = nodes[c];
    uint64_t wait;
    const Mode m = mode_of(n, toks_at(n, now), ctoks_at(n, now), &wait);
    set_mode(c, now, m, wait, rekey);
  }
  void set_mode(uint32_t c, uint64_t now, Mode m, uint64_t wait, bool rekey) {
    Node& n = nodes[c];
    if (m == n.mode && !rekey) return;
    if (m != n.mode) {
      Mode from = static_cast<Mode>(n.mode);
      n.mode = m;
      relink(c, from, m);
    }
    if (m == kCan || wait == UINT64_MAX) {
      if (c != 0) heap_del(c);
    } else {
      heap_set(c, now + wait);
    }
  }

  void process_events(uint64_t t) {
    if (nodes[0].mode != kCan && t >= root_wake) update_mode(0, t, true);
    while (!heap.empty() && heap[0].key <= t) {
      uint32_t c = heap[0].cls;
      heap_del(c);
      update_mode(c, t, true);
    }
  }

  // HTB's htb_charge_class: every class on the path pays ctokens; the lender
  // and those above it pay tokens; those below it borrowed.
  void charge(uint32_t leaf, unsigned lend_level, uint32_t len, uint64_t t) {
    const int64_t cost = static_cast<int64_t>(len) * static_cast<int64_t>(hz);
    radd(nodes[leaf].counts.sent_pkts, uint64_t{1});
    radd(nodes[leaf].counts.sent_bytes, uint64_t{len});
    for (uint32_t c = leaf; c != kNil; c = nodes[c].parent) {
      Node& n = nodes[c];
      int64_t tk = toks_at(n, t);
      if (n.level >= lend_level)
        tk = std::max(tk - cost, -n.buffer - debt);
      else
        radd(borrowed[c], uint64_t{len});
      const int64_t ctk = std::max(ctoks_at(n, t) - cost, -n.cbuffer - debt);
      n.tokens = tk;
      n.ctokens = ctk;
      n.t_c = t;
      if (n.level) {
        radd(n.inner.sent_pkts, uint64_t{1});
        radd(n.inner.sent_bytes, uint64_t{len});
      }
      // update_mode(c, t, false) from the buckets just computed: brought to
      // t again they are the same (full is a fixed point), so the mode needs
      // no second pair of fills. A class that stays in mode can (every class
      // at the portal's rates) ends here.
      uint64_t wait;
      const Mode m = mode_of(n, tk, ctk, &wait);
      set_mode(c, t, m, wait, false);
    }
  }

  void leaf_activate(uint32_t c) {
    nodes[c].act = static_cast<uint8_t>(1u << nodes[c].prio);
    relink(c, kCant, static_cast<Mode>(nodes[c].mode));  // as if its mode rose
  }
  void leaf_deactivate(uint32_t c) {
    if (!nodes[c].act) return;
    relink(c, static_cast<Mode>(nodes[c].mode), kCant);
    nodes[c].act = 0;
    for (Ring& r : nodes[c].leaf.link.r) r.in_turn = r.resume = false;  // an empty queue ends the turn
  }

  bool push(uint32_t c, void* pkt, uint32_t len, uint64_t t) {
    Node& n = nodes[c];
    auto& q = n.leaf;
    if (q.q_len >= q.q_cap) return false;
    uint32_t i = q.q_head + q.q_len;
    if (i >= q.q_cap) i -= q.q_cap;
    slot(n, i) = {pkt, len};
    if (n.aux != kNil) enq[codels[n.aux].e_base + i] = t;
    rset(q.q_len, q.q_len + 1);
    rset(q.q_bytes, q.q_bytes + len);
    backlog++;
    if (q.q_len == 1) leaf_activate(c);
    return true;
  }
  // Takes the head packet; the caller deactivates the leaf when it empties.
  void* pop(uint32_t c, uint32_t* len, uint64_t* enq_time) {
    Node& n = nodes[c];
    auto& q = n.leaf;
    if (!q.q_len) return nullptr;
    const Slot& s = slot(n, q.q_head);
    if (enq_time) *enq_time = n.aux != kNil ? enq[codels[n.aux].e_base + q.q_head] : now;
    *len = s.len;
    void* p = s.pkt;
    rset(q.q_len, q.q_len - 1);
    rset(q.q_bytes, q.q_bytes - s.len);
    // An emptied queue starts again at its first slot: a leaf that holds a
    // packet or two at a time (the portal's usual case) keeps reusing one
    // cache line instead of walking its whole ring.
    q.q_head = !q.q_len || q.q_head + 1 == q.q_cap ? 0 : q.q_head + 1;
    backlog--;
    return p;
  }
  void count_drop(uint32_t c, uint32_t len) {
    radd(nodes[c].counts.dropped_pkts, uint64_t{1});
    radd(nodes[c].counts.dropped_bytes, uint64_t{len});
  }

  // Starts loading what enqueue(leaf) touches first (the leaf's Node: its
  // queue, counters and first slots), for a caller that has a burst to queue.
  void prefetch(uint32_t c) const {
    const char* n = reinterpret_cast<const char*>(&nodes[c]);
    __builtin_prefetch(n, 1);
    __builtin_prefetch(n + 64, 1);
    __builtin_prefetch(n + 128, 1);
  }
  // What it touches next, found through the Node (which prefetch() started
  // loading some packets earlier): its slot and its parent's Node.
  void prefetch_next(uint32_t c) const {
    const Node& n = nodes[c];
    uint32_t i = n.leaf.q_head + n.leaf.q_len;
    if (i >= n.leaf.q_cap) i -= n.leaf.q_cap;
    if (i >= kInlineSlots) __builtin_prefetch(slot_addr(n, i), 1);
    if (n.parent != kNil) {
      const Node* p = &nodes[n.parent];
      __builtin_prefetch(p, 1);
      __builtin_prefetch(reinterpret_cast<const char*>(p) + 64, 1);
    }
  }
  // Last, through the parent's Node: the parent's list links for the leaf's
  // priority, which it needs when the leaf's packet makes it active.
  void prefetch_last(uint32_t c) const {
    const Node& n = nodes[c];
    if (n.parent != kNil) __builtin_prefetch(&links[nodes[n.parent].aux + n.prio], 1);
  }

  // The leaf's next packet to send, through CoDel when the leaf has it
  // (RFC 8289 §5, the pseudocode's dequeue). Drops only while `dropped` has
  // room; returns nullptr when the queue ran dry.
  void* leaf_take(uint32_t c, uint64_t t, uint32_t* len, void** dropped, unsigned* nd, unsigned dcap) {
    Node& n = nodes[c];
    if (n.aux == kNil) return pop(c, len, nullptr);
    Codel& q = codels[n.aux];
    bool ok_to_drop = false;
    auto dodequeue = [&]() -> void* {
      uint64_t et = 0;
      void* p = pop(c, len, &et);
      ok_to_drop = false;
      if (!p) {
        q.first_above = 0;
        return nullptr;
      }
      if (t - et < q.target || n.leaf.q_bytes <= kMtu) {
        q.first_above = 0;  // below target, or less than a packet queued behind it
      } else if (q.first_above == 0) {
        q.first_above = t + q.interval;
      } else if (t >= q.first_above) {
        ok_to_drop = true;
      }
      return p;
    };
    auto control_law = [&](uint64_t from) {
      return from + static_cast<uint64_t>(static_cast<double>(q.interval) / std::sqrt(static_cast<double>(q.count)));
    };
    auto drop = [&](void* p) {
      dropped[(*nd)++] = p;
      count_drop(c, *len);
    };
    void* p = dodequeue();
    if (!p) {
      q.dropping = false;
      return nullptr;
    }
    if (q.dropping) {
      if (!ok_to_drop) q.dropping = false;
      while (q.dropping && t >= q.drop_next && *nd < dcap) {
        drop(p);
        q.count++;
        p = dodequeue();
        if (!p) {
          q.dropping = false;
          return nullptr;
        }
        if (!ok_to_drop)
          q.dropping = false;
        else
          q.drop_next = control_law(q.drop_next);
      }
    } else if (ok_to_drop && *nd < dcap) {
      drop(p);
      p = dodequeue();
      q.dropping = true;
      uint32_t delta = q.count - q.lastcount;
      q.count = 1;
      if (delta > 1 && static_cast<int64_t>(t - q.drop_next) < static_cast<int64_t>(16 * q.interval)) q.count = delta;
      q.drop_next = control_law(t);
      q.lastcount = q.count;
    }
    return p;
  }

  unsigned dequeue(uint64_t t, void** out, unsigned max, void** dropped, unsigned* n_dropped) {
    t = std::max(t, now);
    now = t;
    process_events(t);
    unsigned n = 0, nd = 0;
    const unsigned dcap = dropped ? max : 0;
    // The root gates every packet: it is the link, whatever the port's speed.
    while (n < max && nodes[0].mode == kCan && level_mask) {
      const unsigned lv = std::countr_zero(level_mask);
      const unsigned p = std::countr_zero(row_mask[lv]);
      uint32_t path[kMaxLevels + 1];
      uint32_t* cursor[kMaxLevels + 1];
      unsigned d = 0;
      cursor[d] = &rows[lv][p];
      uint32_t c = *cursor[d];
      path[d++] = c;
      while (!is_leaf(c)) {
        cursor[d] = &nodes[c].inner.feed[p];
        c = *cursor[d];
        path[d++] = c;
      }
      // The leaf after this one in its list is likely the next to send (at
      // the portal a leaf holds one packet and leaves the list with it). Its
      // Node was loaded ahead by the packet before: through it, start
      // loading the Node of the leaf after it, and its parent's Node, which
      // its unlinking and charge touch; and this leaf's parent's links for
      // p (its Node was loaded ahead the same way), which unlinking touches.
      const unsigned k = d != 1;  // the leaf's list: a row when it lends, else its parent's feed
      const uint32_t next = nodes[c].leaf.link.r[k].next;
      if (next != c && next != kNil) {
        const Node& nn = nodes[next];
        prefetch(next);
        if (nn.level == 0) {
          const uint32_t after = nn.leaf.link.r[k].next;
          if (after != next && after < nodes.size()) prefetch(after);
          if (nn.parent != kNil) {
            const char* pn = reinterpret_cast<const char*>(&nodes[nn.parent]);
            __builtin_prefetch(pn, 1);
            __builtin_prefetch(pn + 64, 1);
          }
        }
      }
      if (d > 1) __builtin_prefetch(&links[nodes[path[d - 2]].aux + p], 1);
      uint32_t len = 0;
      void* pkt = leaf_take(c, t, &len, dropped, &nd, dcap);
      if (!pkt) {
        leaf_deactivate(c);
        continue;
      }
      // Deficit round robin at every list of the descent: siblings share a
      // lender's spare in proportion to their quanta, moats share the root's.
      for (unsigned i = 0; i < d; i++) {
        Ring& l = ring(path[i], p, i != 0);  // the lender is in a row, the rest in feeds
        l.deficit -= static_cast<int32_t>(len);
        l.in_turn = l.deficit >= 0;
        if (l.deficit < 0) {
          l.deficit += nodes[path[i]].quantum;
          *cursor[i] = l.next;
        }
      }
      if (!nodes[c].leaf.q_len) leaf_deactivate(c);
      charge(c, lv, len, t);
      out[n++] = pkt;
    }
    if (n_dropped) *n_dropped = nd;
    return n;
  }

  bool enqueue(uint32_t leaf, void* pkt, uint32_t len, uint64_t t) {
    if (leaf >= nodes.size() || !is_leaf(leaf)) return false;
    now = std::max(now, t);
    if (!push(leaf, pkt, len, now)) {
      count_drop(leaf, len);
      return false;
    }
    return true;
  }

  uint64_t next_send(uint64_t t) const {
    if (!backlog) return UINT64_MAX;
    t = std::max(t, now);
    if (nodes[0].mode != kCan) return std::max(t, root_wake);
    if (level_mask) return t;
    return heap.empty() ? UINT64_MAX : std::max(t, heap[0].key);
  }

  ClassStats stats(uint32_t c) const {
    auto ld = [](const auto& v) { return __atomic_load_n(&v, __ATOMIC_RELAXED); };
    ClassStats s;
    const Node& n = nodes[c];
    if (is_leaf(c)) {
      s.sent_pkts = ld(n.counts.sent_pkts);
      s.sent_bytes = ld(n.counts.sent_bytes);
      s.dropped_pkts = ld(n.counts.dropped_pkts);
      s.dropped_bytes = ld(n.counts.dropped_bytes);
      s.qlen = ld(n.leaf.q_len);
      s.qbytes = static_cast<uint32_t>(ld(n.leaf.q_bytes));
    } else {
      s.sent_pkts = ld(n.inner.sent_pkts);
      s.sent_bytes = ld(n.inner.sent_bytes);
    }
    s.borrowed_bytes = ld(borrowed[c]);
    return s;
  }
};

Scheduler::Scheduler(const Plan& plan, uint64_t hz) : impl_(std::make_unique<Impl>(plan, hz)) {}
Scheduler::~Scheduler() = default;

const Plan& Scheduler::plan() const { return impl_->plan; }
uint32_t Scheduler::classes() const { return static_cast<uint32_t>(impl_->nodes.size()); }
bool Scheduler::is_leaf(uint32_t cls) const { return cls < classes() && impl_->is_leaf(cls); }
int32_t Scheduler::find(const std::string& name) const {
  auto it = impl_->by_name.find(name);
  return it == impl_->by_name.end() ? -1 : it->second;
}

bool Scheduler::enqueue(uint32_t leaf, void* pkt, uint32_t len, uint64_t now) {
  return impl_->enqueue(leaf, pkt, len, now);
}

uint64_t Scheduler::enqueue_burst(const uint32_t* leaves, void* const* pkts, const uint32_t* lens, unsigned n,
                                  uint64_t now) {
  Impl& s = *impl_;
  // Two passes so that the misses of a burst over thousands of leaves
  // overlap instead of following one another: every leaf's Node first,
  // then, a few packets ahead, what is found through it.
  constexpr unsigned kAhead = 4, kAheadLast = 2;
  const uint32_t nc = static_cast<uint32_t>(s.nodes.size());
  auto leaf = [&](uint32_t c) { return c < nc && s.is_leaf(c); };
  for (unsigned i = 0; i < n; i++)
    if (leaves[i] < nc) s.prefetch(leaves[i]);
  uint64_t refused = 0;
  for (unsigned i = 0; i < n; i++) {
    if (i + kAhead < n && leaf(leaves[i + kAhead])) s.prefetch_next(leaves[i + kAhead]);
    if (i + kAheadLast < n && leaf(leaves[i + kAheadLast])) s.prefetch_last(leaves[i + kAheadLast]);
    if (!s.enqueue(leaves[i], pkts[i], lens[i], now)) refused |= uint64_t{1} << i;
  }
  return refused;
}

unsigned Scheduler::dequeue(uint64_t now, void** out, unsigned max, void** dropped, unsigned* n_dropped) {
  return impl_->dequeue(now, out, max, dropped, n_dropped);
}

uint64_t Scheduler::next_send(uint64_t now) const { return impl_->next_send(now); }

uint32_t Scheduler::backlog() const { return impl_->backlog; }

unsigned Scheduler::adopt(Scheduler& old_s, void** orphans, unsigned max) {
  Impl& s = *impl_;
  Impl& o = *old_s.impl_;
  s.now = std::max(s.now, o.now);
  unsigned no = 0;
  const uint32_t n = static_cast<uint32_t>(o.nodes.size());
  for (uint32_t c = 0; c < n; c++) {
    if (!o.is_leaf(c) || !o.nodes[c].leaf.q_len) continue;
    int32_t d = find(o.plan.classes[c].name);
    const bool here = d >= 0 && s.is_leaf(static_cast<uint32_t>(d));
    while (o.nodes[c].leaf.q_len) {
      const bool fits = here && s.nodes[d].leaf.q_len < s.nodes[d].leaf.q_cap;
      if (!fits && no == max) return no;
      uint32_t len;
      uint64_t et;
      void* p = o.pop(c, &len, &et);
      if (!o.nodes[c].leaf.q_len) o.leaf_deactivate(c);
      if (fits) {
        s.push(static_cast<uint32_t>(d), p, len, et);  // the sojourn time carries over
      } else {
        o.count_drop(c, len);
        orphans[no++] = p;
      }
    }
  }
  return no;
}

ClassStats Scheduler::stats(uint32_t cls) const { return impl_->stats(cls); }

}  // namespace moat::qos
