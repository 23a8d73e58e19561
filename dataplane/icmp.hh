#pragma once
// ICMP messages the fast path originates (RFC 792, RFC 1812 §4.3): echo reply
// and errors (time exceeded, destination unreachable, fragmentation needed).
// All are built in place in the mbuf that caused them, so no allocation.
// Thread: any; pure functions over one packet. Addresses are host order.
#include <rte_ip.h>
#include <rte_mbuf.h>

#include <cstdint>

namespace moat {

inline constexpr uint8_t kIcmpEchoReply = 0;
inline constexpr uint8_t kIcmpUnreach = 3;
inline constexpr uint8_t kIcmpEcho = 8;
inline constexpr uint8_t kIcmpTimeExceeded = 11;

inline constexpr uint8_t kUnreachNet = 0;
inline constexpr uint8_t kUnreachHost = 1;
inline constexpr uint8_t kUnreachProtocol = 2;
inline constexpr uint8_t kUnreachPort = 3;
inline constexpr uint8_t kUnreachFragNeeded = 4;
inline constexpr uint8_t kUnreachAdminProhibited = 13;

// Bytes of the offending datagram quoted in an error: RFC 1812 §4.3.2.3 asks
// for as much as fits in 576 bytes.
inline constexpr uint16_t kIcmpQuoteMax = 576 - 20 - 8;

// True when RFC 1812 §4.3.2.7 forbids answering this packet with an error:
// it is itself an ICMP error, a non-first fragment, or its source is not a
// unicast host. `l3` points at the IPv4 header; the packet is validated.
bool icmp_error_forbidden(const uint8_t* l3, uint16_t l3_len);

// Turns the frame into an ICMP error from `src` back to the offender's source:
// Ethernet (addresses left for the egress stage) + IPv4 + ICMP + quote.
// `mtu` fills the next-hop MTU field of fragmentation-needed. Returns false
// when the packet is unusable (then it is unchanged). Sets meta l3_off to 14.
bool icmp_error_in_place(rte_mbuf* m, uint16_t l3_off, uint8_t type, uint8_t code,
                         uint32_t src, uint16_t mtu);

// Turns a validated echo request to one of our addresses into the reply in
// place (addresses swapped, TTL reset, checksums updated). Returns false when
// the ICMP message is truncated or its checksum is wrong.
bool icmp_echo_reply_in_place(rte_mbuf* m, uint16_t l3_off);

// Internet checksum over a buffer (RFC 1071), folded, not inverted.
uint16_t inet_sum(const void* data, size_t len, uint32_t seed = 0);

// rte_raw_cksum of an IPv4 header of `ihl` bytes (0xffff when it is right).
// rte_raw_cksum adds byte pairs in a loop over a run-time length; with the
// usual 20 bytes as a constant the compiler unrolls it. Same result.
inline uint16_t ipv4_hdr_sum(const void* ip, uint16_t ihl) {
  return ihl == 20 ? rte_raw_cksum(ip, 20) : rte_raw_cksum(ip, ihl);
}

// Per-source token bucket for ICMP errors (RFC 1812 §4.3.2.8). Sources hash
// into a fixed array of buckets; two sources sharing a bucket share a budget,
// which errs on the side of sending fewer errors. Owner: one worker.
class IcmpLimiter {
 public:
  void configure(uint32_t rate_pps, uint32_t burst, uint64_t tsc_hz);
  bool allow(uint32_t src, uint64_t now_tsc);

 private:
  static constexpr unsigned kBuckets = 1024;
  struct Bucket {
    uint64_t last = 0;
    uint32_t tokens = 0;
    uint32_t used = 0;
  };
  Bucket buckets_[kBuckets];
  uint64_t cycles_per_token_ = 1;
  uint32_t burst_ = 1;
};

}  // namespace moat
