#pragma once
// The tables workers read. Owner: the control thread (ctrl/control.cc) is the
// only writer; workers only read. Update protocol per table:
//  - lpm (routes): rte_lpm with its RCU hook (rte_lpm_rcu_qsbr_add); the
//    control thread adds/deletes in place, lookups stay lock-free and see the
//    old or the new next hop, never a torn one.
//  - next_hops: fixed array indexed by the LPM's next-hop value. An entry is
//    written before any route refers to it and reused only after an RCU grace
//    period following the last route's removal.
//  - neigh (ARP cache): rte_hash with lock-free reader/writer concurrency and
//    its RCU hook; the value is the MAC packed in the data pointer, replaced
//    with one atomic store.
//  - ports: immutable PortTable snapshot, swapped whole (address changes),
//    freed after a grace period.
//  - classifier: the compiled rule tables (classifier/acl.hh), swapped whole
//    on a rule change, freed after a grace period. Null: no policy, every
//    packet passes (a plain router).
//  - conntrack: the connection/NAT table (dataplane/conntrack.hh): shared
//    by every worker, lock-free lookups, entries reused after a grace
//    period; the control thread expires idle connections. Null: stateless.
//  - qos: shaping plans, class maps and meters (dataplane/shape.hh),
//    swapped whole on a config change, freed after a grace period; each
//    shaped port's scheduler is driven by its one owner worker.
//  - path_gen: bumped (release) by the control thread after every change to
//    lpm, default_nh, neigh or ports. A worker may keep the result of a
//    route + neighbour lookup (egress_outer's per-worker cache) only while
//    path_gen still reads what it read (acquire) before the lookups.
// Workers report a quiescent state on `qsbr` once per loop iteration.
#include <rte_ether.h>
#include <rte_hash.h>
#include <rte_lpm.h>
#include <rte_rcu_qsbr.h>

#include "classifier/acl.hh"

#include <atomic>
#include <cstdint>

namespace moat {

class Sad;
class Conntrack;
struct QosTable;

inline constexpr uint32_t kMaxNextHops = 1u << 16;
inline constexpr uint16_t kMaxPorts = RTE_MAX_ETHPORTS;

struct NextHop {
  enum Kind : uint8_t {
    unused = 0,
    connected,    // destination is on the link: resolve the destination itself
    gateway,      // resolve `gw`
    local,        // one of our unicast addresses
    local_bcast,  // limited or directed broadcast of one of our subnets
    blackhole,    // drop silently
    unreachable,  // drop, ICMP net unreachable
    prohibit,     // drop, ICMP communication administratively prohibited
    tunnel,       // into tunnel `port` (a tunnel id): ESP outbound
  };
  Kind kind = unused;
  uint16_t port = 0;  // egress port (connected/gateway), owning port (local), tunnel id
  uint32_t gw = 0;    // host order
};

struct PortInfo {
  bool configured = false;
  rte_ether_addr mac{};
  uint32_t addr = 0;  // host order; 0 = no address
  uint8_t plen = 0;
  uint16_t mtu = 1500;
  uint16_t vlan = 0;  // 0: untagged
  bool punt = false;  // has a TAP on the punt path
  uint8_t zone = 0;   // classifier zone id
  uint8_t key = 0;    // the port as rules name it (its index in the config)
};

struct PortTable {
  PortInfo port[kMaxPorts];
};

// Key of the neighbour hash: (egress port, IPv4 host order).
struct NeighKey {
  uint32_t ip;
  uint16_t port;
  uint16_t zero_ = 0;
};
static_assert(sizeof(NeighKey) == 8);

// A neighbour's MAC packed into the hash's data pointer. Bit 48 marks it valid
// so a MAC of all zeroes is still distinguishable from "no entry".
inline uint64_t pack_mac(const rte_ether_addr& a) {
  uint64_t v = 0;
  for (int i = 0; i < 6; i++) v |= uint64_t(a.addr_bytes[i]) << (8 * i);
  return v | (uint64_t(1) << 48);
}
inline rte_ether_addr unpack_mac(uint64_t v) {
  rte_ether_addr a;
  for (int i = 0; i < 6; i++) a.addr_bytes[i] = uint8_t(v >> (8 * i));
  return a;
}

struct Tables {
  rte_lpm* lpm = nullptr;
  NextHop* next_hops = nullptr;  // kMaxNextHops entries
  // rte_lpm has no depth-0 rule: the default route's next hop lives here
  // (0: none) and is used when the LPM misses.
  std::atomic<uint32_t> default_nh{0};
  rte_hash* neigh = nullptr;
  std::atomic<const PortTable*> ports{nullptr};
  std::atomic<const Classifier*> classifier{nullptr};
  Sad* sad = nullptr;  // SAs (dataplane/sa.hh): its own lock-free protocol
  Conntrack* conntrack = nullptr;
  std::atomic<const QosTable*> qos{nullptr};  // dataplane/shape.hh; null: nothing shaped or policed
  rte_rcu_qsbr* qsbr = nullptr;
  bool punt_enabled = false;
  std::atomic<uint32_t> path_gen{1};
  // After any change to lpm, default_nh, neigh or ports (control thread).
  void paths_changed() { path_gen.fetch_add(1, std::memory_order_release); }
};

}  // namespace moat
