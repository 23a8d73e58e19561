#include "dataplane/icmp.hh"

#include <rte_byteorder.h>
#include <rte_ether.h>
#include <rte_icmp.h>

#include <algorithm>
#include <utility>
#include <rte_ip.h>

#include <cstring>

#include "dataplane/packet.hh"

namespace moat {

uint16_t inet_sum(const void* data, size_t len, uint32_t seed) {
  // rte_raw_cksum handles odd lengths and alignment; we add the seed so a
  // pseudo header or a previous partial sum can be chained.
  uint32_t sum = seed + rte_raw_cksum(data, len);
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  return uint16_t(sum);
}

bool icmp_error_forbidden(const uint8_t* l3, uint16_t l3_len) {
  auto* ip = reinterpret_cast<const rte_ipv4_hdr*>(l3);
  uint16_t frag = rte_be_to_cpu_16(ip->fragment_offset);
  if (frag & RTE_IPV4_HDR_OFFSET_MASK) return true;  // not the first fragment
  uint32_t src = rte_be_to_cpu_32(ip->src_addr);
  if (src == 0 || (src >> 24) == 127 || (src >> 28) == 0xe || src == 0xffffffff) return true;
  uint32_t dst = rte_be_to_cpu_32(ip->dst_addr);
  if ((dst >> 28) == 0xe || dst == 0xffffffff) return true;
  if (ip->next_proto_id == IPPROTO_ICMP) {
    uint16_t ihl = (ip->version_ihl & 0xf) * 4;
    if (l3_len < ihl + 1) return true;
    uint8_t type = l3[ihl];
    // Only queries (echo, timestamp, ...) may be answered with an error.
    if (type != kIcmpEcho && type != kIcmpEchoReply && type != 13 && type != 14) return true;
  }
  return false;
}

bool icmp_error_in_place(rte_mbuf* m, uint16_t l3_off, uint8_t type, uint8_t code,
                         uint32_t src, uint16_t mtu) {
  constexpr uint16_t kEth = sizeof(rte_ether_hdr);
  constexpr uint16_t kHdrs = sizeof(rte_ipv4_hdr) + sizeof(rte_icmp_hdr);
  // Quote only from the first segment; free the rest of a chain.
  if (m->nb_segs > 1) {
    rte_pktmbuf_free(m->next);
    m->next = nullptr;
    m->nb_segs = 1;
    m->pkt_len = m->data_len;
  }
  if (m->data_len < l3_off + sizeof(rte_ipv4_hdr)) return false;
  // Normalise so the offending IP header sits right after a 14-byte Ethernet
  // header, then prepend the new IP and ICMP headers before it: the quote
  // never moves.
  if (l3_off < kEth) return false;
  if (l3_off > kEth) rte_pktmbuf_adj(m, l3_off - kEth);
  if (rte_pktmbuf_headroom(m) < kHdrs) return false;
  auto* old_ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, kEth);
  uint32_t dst = rte_be_to_cpu_32(old_ip->src_addr);
  uint16_t quote = m->data_len - kEth;
  uint16_t old_total = rte_be_to_cpu_16(old_ip->total_length);
  if (quote > old_total) quote = old_total;
  if (quote > kIcmpQuoteMax) quote = kIcmpQuoteMax;

  char* p = rte_pktmbuf_prepend(m, kHdrs);
  if (!p) return false;
  m->data_len = kEth + kHdrs + quote;
  m->pkt_len = m->data_len;
  std::memset(p, 0, kEth);  // MACs and ethertype are written by the egress stage

  auto* ip = reinterpret_cast<rte_ipv4_hdr*>(p + kEth);
  ip->version_ihl = 0x45;
  ip->type_of_service = 0xc0;  // internetwork control (RFC 1812 §4.3.2.5)
  ip->total_length = rte_cpu_to_be_16(kHdrs + quote);
  ip->packet_id = 0;
  ip->fragment_offset = 0;
  ip->time_to_live = 64;
  ip->next_proto_id = IPPROTO_ICMP;
  ip->src_addr = rte_cpu_to_be_32(src);
  ip->dst_addr = rte_cpu_to_be_32(dst);
  ip->hdr_checksum = 0;
  ip->hdr_checksum = rte_ipv4_cksum(ip);

  auto* icmp = reinterpret_cast<rte_icmp_hdr*>(ip + 1);
  icmp->icmp_type = type;
  icmp->icmp_code = code;
  icmp->icmp_cksum = 0;
  icmp->icmp_ident = 0;
  icmp->icmp_seq_nb = (type == kIcmpUnreach && code == kUnreachFragNeeded) ? rte_cpu_to_be_16(mtu) : 0;
  icmp->icmp_cksum = ~inet_sum(icmp, sizeof(*icmp) + quote);
  if (icmp->icmp_cksum == 0) icmp->icmp_cksum = 0xffff;
  meta(m).l3_off = kEth;
  return true;
}

bool icmp_echo_reply_in_place(rte_mbuf* m, uint16_t l3_off) {
  auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, l3_off);
  uint16_t ihl = (ip->version_ihl & 0xf) * 4;
  uint16_t total = rte_be_to_cpu_16(ip->total_length);
  if (total < ihl + sizeof(rte_icmp_hdr)) return false;
  if (m->nb_segs > 1) return false;  // echo requests larger than a segment go to the kernel
  auto* icmp = reinterpret_cast<rte_icmp_hdr*>(reinterpret_cast<uint8_t*>(ip) + ihl);
  if (inet_sum(icmp, total - ihl) != 0xffff) return false;
  icmp->icmp_type = kIcmpEchoReply;
  // RFC 1624 incremental update: the type word changed from 0x0800 to 0x0000.
  uint32_t sum = uint16_t(~icmp->icmp_cksum) + uint32_t(uint16_t(~rte_cpu_to_be_16(0x0800)));
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  icmp->icmp_cksum = ~uint16_t(sum);
  uint32_t src = ip->src_addr;
  ip->src_addr = ip->dst_addr;
  ip->dst_addr = src;
  ip->time_to_live = 64;
  ip->hdr_checksum = 0;
  ip->hdr_checksum = rte_ipv4_cksum(ip);
  return true;
}

void IcmpLimiter::configure(uint32_t rate_pps, uint32_t burst, uint64_t tsc_hz) {
  cycles_per_token_ = rate_pps ? tsc_hz / rate_pps : ~uint64_t(0);
  if (cycles_per_token_ == 0) cycles_per_token_ = 1;
  burst_ = burst ? burst : 1;
  for (auto& b : buckets_) b = Bucket{0, burst_, 0};
}

bool IcmpLimiter::allow(uint32_t src, uint64_t now) {
  uint32_t h = (src * 2654435761u) >> 22;  // Knuth multiplicative hash, 10 bits
  Bucket& b = buckets_[h % kBuckets];
  if (b.last == 0) b.last = now;
  uint64_t earned = (now - b.last) / cycles_per_token_;
  if (earned) {
    b.tokens = uint32_t(std::min<uint64_t>(burst_, b.tokens + earned));
    b.last += earned * cycles_per_token_;
  }
  if (b.tokens == 0) return false;
  b.tokens--;
  return true;
}

}  // namespace moat
