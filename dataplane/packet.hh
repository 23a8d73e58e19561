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
inline constexpr uint16_t kNoTunnel = 0xffff;

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
  esp = 5,          // ESP in UDP to us that arrived in outer fragments, which the
                    // kernel reassembled: decrypt it like a received one
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
  uint8_t cls = 0;    // QoS class named by the qos rule table (0: default, and until qos_mark), kept through ESP
  // The classifier's answer, one per table (filter, nat, spd, qos): rule
  // index + 1, 0 for the table's default. Index into Classifier::verdict.
  // Written only under a rule set with rules: read it through rule_of().
  uint32_t rule[4];
  // Tunnels (config order): the one a decrypted packet came out of, and the
  // one its route sends it into. Their zones stand in for a port's.
  uint16_t in_tunnel = kNoTunnel;
  uint16_t out_tunnel = kNoTunnel;
  uint32_t sa = 0xffffffff;  // SA index (kNoSa: none): outbound, set by the SPD stage
                             // (protect); inbound, set by esp_inbound on the decrypted
                             // packet. Not 0 by default: 0 is a valid SA index.
  // Connection tracking (dataplane/conntrack.hh): the connection's ref
  // (entry index * 2 + direction + 1; 0: not part of a tracked connection)
  // and what the stages decided for a connection's first packet.
  uint32_t conn = 0;
  uint8_t ct = 0;            // kCt* bits
  uint8_t pad2_ = 0;
  uint16_t orig_dport = 0;   // as it arrived (network order), with kCtDnat or kCtDstXlated
  uint32_t orig_dst = 0;     // as it arrived (network order), with kCtDnat or kCtDstXlated
  uint32_t qleaf = 0;        // the scheduler leaf it waits in (dataplane/shape.hh)
};

// PktMeta::ct bits.
inline constexpr uint8_t kCtCommit = 1;   // first packet accepted by a stateful rule (or NATed): create the entry
inline constexpr uint8_t kCtDnat = 2;     // destination rewritten by a DNAT rule (orig_* hold the old one)
inline constexpr uint8_t kCtRelated = 4;  // ICMP error about a tracked connection, already translated
inline constexpr uint8_t kCtNoTrack = 8;  // no trackable tuple (non-first fragment, unknown ICMP type)
inline constexpr uint8_t kCtDstXlated = 16;  // a known connection's destination translated before the route

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
