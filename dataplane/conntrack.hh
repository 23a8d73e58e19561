#pragma once
// Connection tracking and NAPT44 state: ONE table for both (issue 3 items 5
// and 6). A connection is one entry holding both tuples — the original
// direction as its packets arrive, and the reply direction as its packets
// arrive (after NAT, the two differ by more than a swap). Both tuples are
// keys of one rte_hash whose data names the entry and the direction, so a
// packet of either direction finds its connection, its state and its NAT
// translation in one lookup.
//
// Why one shared lock-free table and not per-worker tables: RSS hashes the
// two directions of a NATed flow differently (different addresses and ports
// on each side), so the reply regularly lands on another worker than the
// original. A shared table lets every worker answer every packet without a
// hand-off ring. rte_hash with RTE_HASH_EXTRA_FLAGS_RW_CONCURRENCY_LF gives
// lock-free lookups; MULTI_WRITER_ADD lets every worker insert. Inserting
// takes rte_hash's internal writer lock: that happens once per new
// connection, never for packets of established flows. Deleted keys and
// entries are reused only after an RCU (rte_rcu_qsbr) grace period, so a
// worker that just found an entry can keep reading it.
//
// Threads and ownership:
//  - workers: lookup(), insert(), and the relaxed-atomic fields of Conn
//    (last_tsc, flags), written by whichever worker sees a packet;
//  - the control thread: sweep() (expiry), expire_addr(), reclaim(); it is
//    the only thread that deletes.
// Entries come from a fixed array; free entry indices wait in an rte_ring.
// When the ring is empty the table is full: insert() fails, the packet is
// dropped and counted (Drop::ct_full), and no existing connection is evicted
// — a flood of new flows cannot push out established ones.
// Addresses and ports in CtKey are in network order, as in the packet.
#include <rte_hash.h>
#include <rte_rcu_qsbr.h>
#include <rte_ring.h>

#include <tl/expected.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace moat {

// A connection's tuple as a packet of one direction carries it on arrival.
// ICMP queries: the identifier sits in `sport` for requests and in `dport`
// for replies, so a request and a reply of the same id map to a tuple and its
// reverse (and a stray request the other way matches nothing).
struct CtKey {
  uint32_t src = 0, dst = 0;
  uint16_t sport = 0, dport = 0;
  uint8_t proto = 0;
  uint8_t pad_[3] = {0, 0, 0};
  bool operator==(const CtKey&) const = default;
};
static_assert(sizeof(CtKey) == 16);

inline CtKey reversed(const CtKey& k) {
  CtKey r;
  r.src = k.dst;
  r.dst = k.src;
  r.sport = k.dport;
  r.dport = k.sport;
  r.proto = k.proto;
  return r;
}

// Idle timeouts in seconds. Defaults follow RFC 5382 (TCP established at
// least 2 h 4 min), RFC 4787 (UDP at least 2 min once both sides spoke) and
// Linux's conntrack for the transitory states.
struct CtTimeouts {
  uint32_t tcp_syn = 60;           // SYN seen, no SYN-ACK yet
  uint32_t tcp_syn_recv = 60;      // SYN-ACK seen, handshake not finished
  uint32_t tcp_established = 7440;
  uint32_t tcp_closing = 120;      // a FIN seen
  uint32_t tcp_time_wait = 60;     // FINs seen both ways
  uint32_t tcp_close = 10;         // RST seen
  uint32_t udp = 30;               // one direction only
  uint32_t udp_stream = 120;       // replied
  uint32_t icmp = 30;
  uint32_t other = 600;
};

struct CtConfig {
  uint32_t max_connections = 65536;
  CtTimeouts timeouts;
};

// Connection progress bits, ORed in atomically by whichever worker sees the
// packet (the two directions may be on different workers, so no plain
// read-modify-write). The state is read from the bits.
namespace ct {
inline constexpr uint32_t kSynOrig = 1u << 0;       // SYN from the originator
inline constexpr uint32_t kSynAckReply = 1u << 1;   // SYN-ACK from the responder
inline constexpr uint32_t kEstablished = 1u << 2;   // originator ACKed the SYN-ACK
inline constexpr uint32_t kFinOrig = 1u << 3;
inline constexpr uint32_t kFinReply = 1u << 4;
inline constexpr uint32_t kRst = 1u << 5;
inline constexpr uint32_t kReplySeen = 1u << 6;     // any packet in the reply direction
}  // namespace ct

// NAT applied to a connection (Conn::nat): which tuple halves differ.
inline constexpr uint8_t kNatSrc = 1;  // original direction's source rewritten (SNAT/masquerade)
inline constexpr uint8_t kNatDst = 2;  // original direction's destination rewritten (DNAT)

enum class CtState : uint8_t { syn_sent, syn_recv, established, closing, time_wait, close, udp, udp_stream, icmp, other };
const char* ct_state_name(CtState s);

struct alignas(64) Conn {
  // [0]: the original direction's tuple on arrival (before any NAT);
  // [1]: the reply direction's tuple on arrival. A packet of direction d
  // leaves as reversed(key[1 - d]): that is the whole NAT translation.
  CtKey key[2];
  uint64_t last_tsc = 0;  // last packet either way; relaxed atomic
  uint32_t flags = 0;     // ct:: bits; atomic OR
  uint8_t nat = 0;        // kNatSrc | kNatDst
  uint8_t live = 0;       // 1 while in the hash (control thread's view)
  uint8_t worker = 0;     // creator: its NAT port slice
  uint8_t pad_ = 0;
};

// A lookup's answer: 0 = miss, else entry index * 2 + direction + 1.
inline uint32_t ct_ref(uint32_t idx, unsigned dir) { return idx * 2 + dir + 1; }
inline uint32_t ct_ref_index(uint32_t ref) { return (ref - 1) >> 1; }
inline unsigned ct_ref_dir(uint32_t ref) { return (ref - 1) & 1; }

class Conntrack {
 public:
  // `qsbr` is the workers' RCU variable; `workers` sizes the NAT port slices.
  static tl::expected<std::unique_ptr<Conntrack>, std::string> create(const CtConfig& cfg, rte_rcu_qsbr* qsbr,
                                                                      unsigned workers, uint64_t tsc_hz,
                                                                      const std::string& name);
  ~Conntrack();
  Conntrack(const Conntrack&) = delete;
  Conntrack& operator=(const Conntrack&) = delete;

  // ---- data path (any worker) ----
  // refs[i]: see ct_ref; n <= RTE_HASH_LOOKUP_BULK_MAX.
  void lookup(const CtKey* const* keys, unsigned n, uint32_t* refs) const;
  // No entry is taken from the free ring, so no key is in the hash and every
  // lookup would miss (see lookup()). A snapshot: another worker may insert
  // right after, as it may after any lookup.
  bool empty() const;
  bool taken(const CtKey& k) const { return rte_hash_lookup(hash_, &k) >= 0; }
  // Creates a connection from its two tuples. Returns the original
  // direction's ref, or 0 when the table is full or a tuple is already taken
  // (a racing insert of the same flow); `*full` tells which.
  uint32_t insert(const CtKey& orig, const CtKey& reply, uint8_t nat, uint32_t flags, unsigned worker,
                  uint64_t now_tsc, bool* full);
  Conn& conn(uint32_t idx) { return conns_[idx]; }
  const Conn& conn(uint32_t idx) const { return conns_[idx]; }
  // Records a packet: refreshes the idle timer (at most every ~1 ms, so two
  // workers sharing a connection do not bounce its cache line per packet).
  void touch(Conn& c, uint64_t now_tsc) const {
    uint64_t last = __atomic_load_n(&c.last_tsc, __ATOMIC_RELAXED);
    if (now_tsc - last > touch_tsc_) __atomic_store_n(&c.last_tsc, now_tsc, __ATOMIC_RELAXED);
  }
  static void set_flags(Conn& c, uint32_t bits) {
    if ((__atomic_load_n(&c.flags, __ATOMIC_RELAXED) & bits) != bits) __atomic_fetch_or(&c.flags, bits, __ATOMIC_RELAXED);
  }
  unsigned workers() const { return workers_; }

  // ---- control thread ----
  CtState state(const Conn& c) const;
  uint64_t timeout_tsc(const Conn& c) const;
  // Examines up to `budget` entries from where the previous call stopped and
  // expires the idle ones. Returns how many expired.
  unsigned sweep(uint64_t now_tsc, unsigned budget);
  // Expires every connection translated to or from `addr` (network order):
  // a masqueraded connection cannot survive its address going away.
  unsigned expire_addr(uint32_t addr);
  unsigned expire_all();
  // Entries whose grace period has passed go back to the free ring.
  void reclaim();
  uint32_t capacity() const { return max_; }
  uint32_t in_use() const;  // live plus awaiting reclaim
  uint64_t expired() const { return expired_; }
  template <typename F>
  void for_each(F&& f) const {
    for (uint32_t i = 0; i < max_; i++)
      if (__atomic_load_n(&conns_[i].live, __ATOMIC_ACQUIRE)) f(i, conns_[i]);
  }

 private:
  Conntrack() = default;
  void expire(uint32_t idx);

  rte_hash* hash_ = nullptr;
  rte_ring* free_ = nullptr;
  Conn* conns_ = nullptr;
  rte_rcu_qsbr* qsbr_ = nullptr;
  uint32_t max_ = 0;
  unsigned workers_ = 1;
  uint64_t tsc_hz_ = 1;
  uint64_t touch_tsc_ = 0;
  uint64_t to_[10] = {};  // timeout per CtState, in TSC cycles
  uint32_t sweep_pos_ = 0;
  uint64_t expired_ = 0;
  std::vector<std::pair<uint64_t, uint32_t>> deferred_;  // (RCU token, entry)
};

}  // namespace moat
