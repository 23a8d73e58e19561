#pragma once
// NAPT44 packet rewriting (RFC 3022, RFC 5508 for ICMP) and the tuple a
// packet is tracked by. Pure functions over one packet's bytes: any thread,
// no allocation. Checksums are updated incrementally (RFC 1624 eqn. 3) —
// the IPv4 header, TCP and UDP (pseudo header included; a zero UDP checksum
// means "none" and stays zero), ICMP, and inside an ICMP error the quoted
// header's own checksums together with the error's ICMP checksum that
// covers them. Addresses and ports are in network order throughout.
#include <rte_ip.h>
#include <rte_mbuf.h>

#include <netinet/in.h>

#include <cstdint>
#include <cstring>

#include "dataplane/conntrack.hh"

namespace moat {

// RFC 1624 eqn. 3: the checksum `sum` after a 16-bit word changed from
// `old_w` to `new_w`. Byte order does not matter as long as all three are
// taken from memory the same way.
inline uint16_t csum_update(uint16_t sum, uint16_t old_w, uint16_t new_w) {
  uint32_t s = uint32_t(uint16_t(~sum)) + uint16_t(~old_w) + new_w;
  s = (s & 0xffff) + (s >> 16);
  s = (s & 0xffff) + (s >> 16);
  return uint16_t(~s);
}

// Rewrites the DSCP of an IPv4 header, ECN bits kept (qos rule `mark`,
// policing's re-mark): the word holding version/IHL and ToS changes.
inline void set_dscp(rte_ipv4_hdr* ip, uint8_t dscp) {
  uint8_t tos = uint8_t((dscp << 2) | (ip->type_of_service & 0x03));
  if (tos == ip->type_of_service) return;
  uint16_t old_w = rte_cpu_to_be_16(uint16_t(ip->version_ihl << 8 | ip->type_of_service));
  uint16_t new_w = rte_cpu_to_be_16(uint16_t(ip->version_ihl << 8 | tos));
  ip->hdr_checksum = csum_update(ip->hdr_checksum, old_w, new_w);
  ip->type_of_service = tos;
}

enum class CtKind : uint8_t {
  none,        // nothing to track by: a non-first fragment, an ICMP type we do not follow
  plain,       // k is the packet's own tuple
  icmp_error,  // k is the reverse of the quoted packet's tuple: the key of
               // the connection in the direction the error travels
};

// ICMP queries whose identifier NAT translates (RFC 5508 §3.1).
inline bool icmp_is_request(uint8_t type) { return type == 8 || type == 13; }
inline bool icmp_is_reply(uint8_t type) { return type == 0 || type == 14; }
inline bool icmp_is_error(uint8_t type) { return type == 3 || type == 11 || type == 12; }

// What a packet is tracked by, before any field of the tuple is read: the
// checks ct_tuple and ct_plain share, written once so that the two cannot
// disagree. The plain shapes come last (ct_plain is one comparison).
enum class CtShape : uint8_t {
  none,          // CtKind::none: bad header length, a later fragment (no
                 // ports), a short layer 4, an ICMP type we do not follow
  icmp_error,    // ct_tuple goes on to check the quote
  ports,         // TCP, UDP: source and destination port
  icmp_request,  // the identifier is the query's source port
  icmp_reply,    // the identifier is the query's destination port
  addrs,         // any other protocol: tracked by addresses and protocol alone
};

// The header length of a validated IPv4 header, in bytes.
inline uint16_t ipv4_ihl(const uint8_t* l3) { return uint16_t((l3[0] & 0x0f) * 4); }
// Offset zero: the packet, or its first fragment, carries the layer 4
// header. Read through memcpy: a header quoted inside an ICMP error need
// not be aligned.
inline bool ipv4_first_fragment(const uint8_t* l3) {
  uint16_t frag;
  std::memcpy(&frag, l3 + 6, 2);
  return (frag & rte_cpu_to_be_16(RTE_IPV4_HDR_OFFSET_MASK)) == 0;
}

// `l3` is a validated IPv4 header and `len` the bytes from it that belong
// to the packet.
inline CtShape ct_shape(const uint8_t* l3, uint16_t len) {
  uint16_t ihl = ipv4_ihl(l3);
  if (len < ihl || ihl < 20) return CtShape::none;
  // Later fragments carry no ports: they cannot be told apart by tuple.
  if (!ipv4_first_fragment(l3)) return CtShape::none;
  uint16_t l4len = uint16_t(len - ihl);
  switch (l3[9]) {
    case IPPROTO_TCP:
    case IPPROTO_UDP:
      return l4len >= 4 ? CtShape::ports : CtShape::none;
    case IPPROTO_ICMP: {
      if (l4len < 8) return CtShape::none;
      uint8_t type = l3[ihl];
      if (icmp_is_request(type)) return CtShape::icmp_request;
      if (icmp_is_reply(type)) return CtShape::icmp_reply;
      return icmp_is_error(type) ? CtShape::icmp_error : CtShape::none;
    }
    default:
      return CtShape::addrs;
  }
}

// The tuple a packet is tracked by (ct_shape's arguments). For
// CtKind::none, `k` is all zeros.
CtKind ct_tuple(const uint8_t* l3, uint16_t len, CtKey& k);
// ct_tuple(l3, len, k) == CtKind::plain, without building the tuple: what
// the conntrack stage needs to know of a packet while the table is empty
// (an ICMP error then quotes no known connection, so it is untracked too).
// Tests: CtPlain.*
inline bool ct_plain(const uint8_t* l3, uint16_t len) { return ct_shape(l3, len) >= CtShape::ports; }

// Rewrites the source (`src`) or destination address and, where the
// protocol has one in that slot, the port (TCP, UDP) or ICMP query
// identifier. `len` bounds what may be touched (a quote in an ICMP error is
// truncated: fields beyond it are left alone). `outer`: when non-null, the
// ICMP checksum of an error quoting this packet, kept right for every byte
// changed here.
void nat_rewrite(uint8_t* l3, uint16_t len, bool src, uint32_t addr, uint16_t port, uint8_t* outer = nullptr);

// Translates a packet of connection `c` travelling in direction `dir` to
// how it leaves: its destination half (before routing) or its source half
// (after the filter). Returns whether anything had to change.
bool nat_dst_half(uint8_t* l3, uint16_t len, const Conn& c, unsigned dir);
bool nat_src_half(uint8_t* l3, uint16_t len, const Conn& c, unsigned dir);

// Translates an ICMP error travelling in direction `dir` of `c`: the outer
// destination (and source, when the error comes from the connection's own
// endpoint) and the quoted packet back to the addresses its sender knows.
void nat_icmp_error(uint8_t* l3, uint16_t len, const Conn& c, unsigned dir);

// Turns a TCP segment into the RST that refuses it (RFC 9293 §3.10.7.1),
// from its destination back to its source, in place: IPv4 + 20-byte TCP.
// Returns false for a segment that must not be answered (a RST) or is
// truncated. The mbuf keeps its link header room at `l3_off`.
bool tcp_reset_in_place(rte_mbuf* m, uint16_t l3_off);

}  // namespace moat
