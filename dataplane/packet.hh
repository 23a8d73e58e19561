#pragma once
// Per-packet metadata and the burst every stage works on.
// PktMeta lives in the mbuf private area (the mempool is created with
// kMbufPrivSize), so it costs no allocation and travels with the packet
// across rings between workers and the control thread.
#include <rte_mbuf.h>

#include <cstdint>

namespace moat {

inline constexpr uint16_t kMaxBurst = 64;
inline constexpr uint16_t kNoPort = 0xffff;

// Why a worker handed a packet to the control thread.
enum class Punt : uint8_t {
  none = 0,
  arp,        // any ARP frame: the control thread owns the neighbour table
  local,      // to one of our addresses, not handled by the fast path: to the TAP
  broadcast,  // limited/directed broadcast for local services (DHCP): to the TAP
  resolve,    // next hop has no MAC yet: hold until ARP answers
};

// What a packet handed from the control thread to a worker wants.
enum class Inject : uint8_t {
  tx = 1,     // frame complete, send on out_port as is
  route = 2,  // IPv4 from a local service (TAP): route it like transit
  egress = 3,       // routed and held for ARP: the neighbour is known now
  unreachable = 4,  // held for ARP that never came: ICMP host unreachable
};

struct PktMeta {
  uint16_t l3_off;    // offset of the IPv4 header from the frame start
  uint16_t in_port;   // ingress port id (kNoPort for locally originated)
  uint16_t out_port;  // egress port id once routed
  uint16_t vlan;      // 802.1Q VID seen on ingress (0: untagged)
  uint32_t nh;        // next-hop index (route stage)
  uint32_t nh_ip;     // neighbour IPv4 (host order) to resolve, for Punt::resolve
  Punt punt;
  Inject inject;
  uint8_t generated;  // 1: built by us (ICMP error/reply, ESP): never answer with ICMP
  uint8_t pad_;
  uint32_t sa = 0xffffffff;  // SA index (kNoSa: none): outbound, set by the SPD stage
                             // (protect); inbound, set by esp_inbound on the decrypted
                             // packet. Not 0 by default: 0 is a valid SA index.
};

inline constexpr uint16_t kMbufPrivSize = RTE_ALIGN(sizeof(PktMeta), RTE_MBUF_PRIV_ALIGN);

inline PktMeta& meta(rte_mbuf* m) { return *static_cast<PktMeta*>(rte_mbuf_to_priv(m)); }

// A burst: packet pointers in arrival order. Stages compact it in place.
struct Burst {
  rte_mbuf* pkts[kMaxBurst];
  uint16_t n = 0;
  void push(rte_mbuf* m) { pkts[n++] = m; }
};

// Single-writer counter readable by the control thread without a lock:
// relaxed atomic stores keep reads tear-free and the writer cheap.
struct Counter {
  uint64_t v = 0;
  void add(uint64_t n = 1) { __atomic_store_n(&v, v + n, __ATOMIC_RELAXED); }
  uint64_t load() const { return __atomic_load_n(&v, __ATOMIC_RELAXED); }
};

}  // namespace moat
