#pragma once
// A hierarchical class-based scheduler with borrowing (CBQ/HTB semantics) for
// one egress port. Hand-written because DPDK's rte_sched has fixed levels and
// hard per-pipe caps with no borrowing between siblings (issue 7, seed 003
// §3.4), and nothing else in Debian's packages schedules in user space.
//
// Ownership: one Scheduler per shaped port, owned by one worker (the port's
// scheduler owner); only that worker calls enqueue/dequeue/adopt. The control
// thread builds a Scheduler off the data path from a Plan, publishes it, and
// reads the counters (relaxed) for `moatctl show qos`. A new plan replaces the
// old one through adopt(): the owner moves the queued packets into the new
// tree's same-named leaves, so queues persist across config changes.
//
// Packets are opaque handles (rte_mbuf* on the data path, anything in tests)
// with their length given at enqueue; the scheduler never touches them.
// Per-packet calls allocate nothing and lock nothing.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moat::qos {

enum class DropPolicy : uint8_t { tail, codel };

// One class of the tree. Rates in bytes per second.
struct ClassSpec {
  std::string name;     // unique in the plan
  int32_t parent = -1;  // index in Plan::classes; -1 only for the root (index 0)
  uint64_t rate = 0;    // guaranteed
  uint64_t ceil = 0;    // the most it may reach by borrowing (>= rate)
  uint32_t burst = 0;   // rate bucket depth in bytes (0: chosen from rate, at least one MTU)
  uint32_t cburst = 0;  // ceil bucket depth in bytes (0: likewise from ceil)
  uint8_t prio = 0;     // 0 (first to borrow, lowest delay) .. 7
  uint32_t limit = 128; // leaves: packets queued at most (tail drop beyond)
  DropPolicy drop = DropPolicy::tail;
  uint32_t codel_target_us = 5000;
  uint32_t codel_interval_us = 100000;
};

// A class tree. classes[0] is the root (the link: rate == ceil == link rate);
// a parent precedes its children. A class with no children is a leaf and
// owns a queue; inner classes only lend and borrow.
struct Plan {
  std::vector<ClassSpec> classes;
};

// Why a plan is refused: the index of the class at fault (-1: the plan) and
// what is wrong, e.g. "children's rates 140000 B/s exceed the parent's 128000".
struct PlanError {
  int32_t cls = -1;
  std::string what;
};
std::vector<PlanError> validate(const Plan& p);

// Counters of one class, as Scheduler::stats() reads them.
struct ClassStats {
  uint64_t sent_pkts = 0, sent_bytes = 0;
  uint64_t dropped_pkts = 0, dropped_bytes = 0;  // tail drop and AQM drop
  uint64_t borrowed_bytes = 0;                   // sent above its own rate (borrowed from an ancestor)
  uint32_t qlen = 0, qbytes = 0;                 // leaves: packets and bytes queued now
};

class Scheduler {
 public:
  // `hz`: units per second of the `now` values given to enqueue/dequeue
  // (rte_get_tsc_hz() on the data path; 1e9 for a nanosecond virtual clock).
  // The plan must be valid (validate() empty).
  Scheduler(const Plan& plan, uint64_t hz);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const Plan& plan() const;
  uint32_t classes() const;
  bool is_leaf(uint32_t cls) const;
  int32_t find(const std::string& name) const;  // -1: none

  // Queues `pkt` (length `len` bytes, as it will be sent) on leaf `leaf`.
  // Returns false when the leaf's queue is full: the caller drops the packet
  // (the drop is counted here).
  bool enqueue(uint32_t leaf, void* pkt, uint32_t len, uint64_t now);
  // enqueue() for each of n <= 64 packets in order, with the memory of the
  // burst's leaves loaded ahead (at the portal a burst hits n different
  // leaves and moats among thousands). Bit i of the result: packet i refused.
  uint64_t enqueue_burst(const uint32_t* leaves, void* const* pkts, const uint32_t* lens, unsigned n, uint64_t now);

  // Takes up to `max` packets that may leave at `now`, in the order they are
  // to be sent, into `out`. Packets the AQM drops go to `dropped` (up to
  // `max` of them; counted here, freed by the caller): *n_dropped is set.
  unsigned dequeue(uint64_t now, void** out, unsigned max, void** dropped, unsigned* n_dropped);

  // When dequeue may next return a packet (now or later); UINT64_MAX when
  // nothing is queued. Lets the owner skip the scheduler while it waits.
  uint64_t next_send(uint64_t now) const;

  // Packets and bytes queued in all leaves.
  uint32_t backlog() const;

  // Moves every packet queued in `old` into this scheduler's leaf of the same
  // name, in order; packets whose leaf is gone (or does not fit) go to `orphans`
  // (up to `max`, the rest stay in `old` and are returned on the next call).
  // Returns the number put into `orphans`.
  unsigned adopt(Scheduler& old, void** orphans, unsigned max);

  // A snapshot of the class's counters (relaxed loads; the owner keeps
  // writing). Inner classes count what they sent and borrowed; drops and
  // queues are counted at the leaves.
  ClassStats stats(uint32_t cls) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moat::qos
