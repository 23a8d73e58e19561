#include "dataplane/nat.hh"

#include <rte_ip.h>
#include <rte_tcp.h>

#include <netinet/in.h>

#include <cstring>

#include "dataplane/icmp.hh"

namespace moat {

namespace {

// Fields are read and written through memcpy: a quoted header inside an
// ICMP error need not sit where the compiler would align its struct.
uint16_t ld16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
void st16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// The checksum at `csum` follows a word change; so does `outer` (the ICMP
// error's checksum, which covers `csum` itself when it lies in a quote).
void fix_csum(uint8_t* csum, uint16_t o, uint16_t n, bool udp, uint8_t* outer) {
  uint16_t old_c = ld16(csum);
  if (udp && old_c == 0) return;  // UDP without a checksum keeps none
  uint16_t c = csum_update(old_c, o, n);
  if (udp && c == 0) c = 0xffff;  // RFC 768: a computed zero is sent as all ones
  st16(csum, c);
  if (outer) st16(outer, csum_update(ld16(outer), old_c, c));
}

// Writes one 16-bit word and keeps every checksum covering it right.
void set_word(uint8_t* f, uint16_t nv, uint8_t* ip_csum, uint8_t* l4_csum, bool udp, uint8_t* outer) {
  uint16_t ov = ld16(f);
  if (ov == nv) return;
  st16(f, nv);
  if (outer) st16(outer, csum_update(ld16(outer), ov, nv));
  if (ip_csum) fix_csum(ip_csum, ov, nv, false, outer);
  if (l4_csum) fix_csum(l4_csum, ov, nv, udp, outer);
}

}  // namespace

CtKind ct_tuple(const uint8_t* l3, uint16_t len, CtKey& k) {
  k = CtKey{};
  CtShape shape = ct_shape(l3, len);
  if (shape == CtShape::none) return CtKind::none;
  // Read before `k` is written: k may alias the packet as far as the
  // compiler knows, and these are what ct_shape already loaded.
  uint16_t ihl = ipv4_ihl(l3);
  const uint8_t* l4 = l3 + ihl;
  k.proto = l3[9];
  std::memcpy(&k.src, l3 + 12, 4);
  std::memcpy(&k.dst, l3 + 16, 4);
  switch (shape) {
    case CtShape::ports:
      k.sport = ld16(l4);
      k.dport = ld16(l4 + 2);
      return CtKind::plain;
    case CtShape::icmp_request:
      k.sport = ld16(l4 + 4);
      return CtKind::plain;
    case CtShape::icmp_reply:
      k.dport = ld16(l4 + 4);
      return CtKind::plain;
    case CtShape::addrs:
      return CtKind::plain;
    case CtShape::icmp_error:
      break;
    case CtShape::none:
      return CtKind::none;
  }
  // The quote: an IPv4 header and at least 8 bytes of what followed it.
  const uint8_t* in = l4 + 8;
  uint16_t inlen = uint16_t(len - ihl - 8);
  if (inlen < 20 || (in[0] >> 4) != 4) return CtKind::none;
  uint16_t in_ihl = ipv4_ihl(in);
  if (in_ihl < 20 || inlen < in_ihl + 8) return CtKind::none;
  // An error about an error is never sent (RFC 1812 §4.3.2.7).
  if (in[9] == IPPROTO_ICMP && icmp_is_error(in[in_ihl])) return CtKind::none;
  CtKey inner;
  if (ct_tuple(in, inlen, inner) != CtKind::plain) return CtKind::none;
  k = reversed(inner);
  return CtKind::icmp_error;
}

void nat_rewrite(uint8_t* l3, uint16_t len, bool src, uint32_t addr, uint16_t port, uint8_t* outer) {
  if (len < 20) return;
  uint16_t ihl = uint16_t((l3[0] & 0x0f) * 4);
  uint8_t proto = l3[9];
  uint8_t* a = l3 + (src ? 12 : 16);
  uint8_t* ip_csum = l3 + 10;
  uint8_t* l4 = l3 + ihl;
  int l4len = int(len) - ihl;
  bool l4_here = ipv4_first_fragment(l3) && l4len > 0;
  uint8_t* l4_csum = nullptr;
  bool udp = false;
  if (l4_here && proto == IPPROTO_TCP && l4len >= 18) l4_csum = l4 + 16;
  if (l4_here && proto == IPPROTO_UDP && l4len >= 8) {
    l4_csum = l4 + 6;
    udp = true;
  }
  // The address: in the IPv4 header checksum and the TCP/UDP pseudo header.
  const uint8_t* na = reinterpret_cast<const uint8_t*>(&addr);
  set_word(a, ld16(na), ip_csum, l4_csum, udp, outer);
  set_word(a + 2, ld16(na + 2), ip_csum, l4_csum, udp, outer);
  if (!l4_here) return;
  if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
    if (l4len >= (src ? 2 : 4)) set_word(l4 + (src ? 0 : 2), port, nullptr, l4_csum, udp, outer);
  } else if (proto == IPPROTO_ICMP && l4len >= 8) {
    // The identifier is the query's "source port" in a request and its
    // "destination port" in a reply (ct_tuple's convention).
    uint8_t type = l4[0];
    if ((src && icmp_is_request(type)) || (!src && icmp_is_reply(type)))
      set_word(l4 + 4, port, nullptr, l4 + 2, false, outer);
  }
}

bool nat_dst_half(uint8_t* l3, uint16_t len, const Conn& c, unsigned dir) {
  if (!(c.nat & (dir == 0 ? kNatDst : kNatSrc))) return false;
  CtKey out = reversed(c.key[1 - dir]);
  nat_rewrite(l3, len, false, out.dst, out.dport);
  return true;
}

bool nat_src_half(uint8_t* l3, uint16_t len, const Conn& c, unsigned dir) {
  if (!(c.nat & (dir == 0 ? kNatSrc : kNatDst))) return false;
  CtKey out = reversed(c.key[1 - dir]);
  nat_rewrite(l3, len, true, out.src, out.sport);
  return true;
}

void nat_icmp_error(uint8_t* l3, uint16_t len, const Conn& c, unsigned dir) {
  const CtKey& k = c.key[dir];
  const CtKey& o = c.key[1 - dir];
  CtKey out = reversed(o);
  uint32_t src, dst;
  std::memcpy(&src, l3 + 12, 4);
  std::memcpy(&dst, l3 + 16, 4);
  // The outer header: an ICMP error has no ports and no pseudo header, so
  // only the IPv4 header checksum follows. Its destination is the quoted
  // packet's sender; its source is rewritten only when the error comes from
  // the connection's own far end (a third-party router stays itself).
  if (dst == k.dst) nat_rewrite(l3, len, false, out.dst, 0);
  if (src == k.src) nat_rewrite(l3, len, true, out.src, 0);
  uint16_t ihl = uint16_t((l3[0] & 0x0f) * 4);
  uint8_t* icmp = l3 + ihl;
  uint8_t* in = icmp + 8;
  uint16_t inlen = uint16_t(len - ihl - 8);
  // The quote left here translated; its sender knows it untranslated: the
  // other direction's tuple as it arrived.
  nat_rewrite(in, inlen, true, o.src, o.sport, icmp + 2);
  nat_rewrite(in, inlen, false, o.dst, o.dport, icmp + 2);
}

bool tcp_reset_in_place(rte_mbuf* m, uint16_t l3_off) {
  auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, l3_off);
  uint16_t ihl = uint16_t((ip->version_ihl & 0x0f) * 4);
  uint16_t total = rte_be_to_cpu_16(ip->total_length);
  if (ip->next_proto_id != IPPROTO_TCP || total < ihl + sizeof(rte_tcp_hdr)) return false;
  if (rte_pktmbuf_data_len(m) < l3_off + ihl + sizeof(rte_tcp_hdr)) return false;
  auto* th = reinterpret_cast<rte_tcp_hdr*>(reinterpret_cast<uint8_t*>(ip) + ihl);
  if (th->tcp_flags & RTE_TCP_RST_FLAG) return false;  // never answer a reset
  uint16_t doff = uint16_t((th->data_off >> 4) * 4);
  uint32_t seg_len = total - ihl - (doff < total - ihl ? doff : total - ihl);
  if (th->tcp_flags & RTE_TCP_SYN_FLAG) seg_len++;
  if (th->tcp_flags & RTE_TCP_FIN_FLAG) seg_len++;
  rte_tcp_hdr r{};
  r.src_port = th->dst_port;
  r.dst_port = th->src_port;
  if (th->tcp_flags & RTE_TCP_ACK_FLAG) {
    r.sent_seq = th->recv_ack;
    r.tcp_flags = RTE_TCP_RST_FLAG;
  } else {
    r.sent_seq = 0;
    r.recv_ack = rte_cpu_to_be_32(rte_be_to_cpu_32(th->sent_seq) + seg_len);
    r.tcp_flags = RTE_TCP_RST_FLAG | RTE_TCP_ACK_FLAG;
  }
  r.data_off = 5 << 4;
  // Only the first segment is kept; the reply is 40 bytes.
  if (m->nb_segs > 1) {
    rte_pktmbuf_free(m->next);
    m->next = nullptr;
    m->nb_segs = 1;
  }
  m->data_len = uint16_t(l3_off + 40);
  m->pkt_len = m->data_len;
  rte_ipv4_hdr h{};
  h.version_ihl = 0x45;
  h.total_length = rte_cpu_to_be_16(40);
  h.time_to_live = 64;
  h.next_proto_id = IPPROTO_TCP;
  h.src_addr = ip->dst_addr;
  h.dst_addr = ip->src_addr;
  h.hdr_checksum = rte_ipv4_cksum(&h);
  *ip = h;
  auto* nt = reinterpret_cast<rte_tcp_hdr*>(ip + 1);
  *nt = r;
  nt->cksum = rte_ipv4_udptcp_cksum(ip, nt);
  return true;
}

}  // namespace moat
