// Stages route and local_deliver, and the ICMP error hand-off.
#include <rte_cycles.h>
#include <rte_icmp.h>
#include <rte_ip.h>
#include <rte_udp.h>

#include "dataplane/worker.hh"

namespace moat {

void send_icmp_error(Worker& w, const PortTable& pt, rte_mbuf* m, Drop why, uint8_t type,
                     uint8_t code, uint16_t mtu) {
  PktMeta& md = meta(m);
  w.stats.drops[static_cast<unsigned>(why)].add();
  // Packets we built or that came from a local service never earn an error:
  // no error about an error, and the kernel learns of failures its own way.
  if (md.generated || md.in_port >= kMaxPorts) { rte_pktmbuf_free(m); return; }
  nat_undo_dst(m);
  const uint8_t* l3 = rte_pktmbuf_mtod_offset(m, const uint8_t*, md.l3_off);
  if (icmp_error_forbidden(l3, rte_pktmbuf_data_len(m) - md.l3_off)) { rte_pktmbuf_free(m); return; }
  auto* ip = reinterpret_cast<const rte_ipv4_hdr*>(l3);
  if (!w.icmp_limiter.allow(rte_be_to_cpu_32(ip->src_addr), w.now_tsc)) {
    w.stats.drops[static_cast<unsigned>(Drop::icmp_rate_limited)].add();
    rte_pktmbuf_free(m);
    return;
  }
  uint32_t src = pt.port[md.in_port].addr;
  if (src == 0 || !icmp_error_in_place(m, md.l3_off, type, code, src, mtu)) {
    w.stats.drops[static_cast<unsigned>(Drop::icmp_error_failed)].add();
    rte_pktmbuf_free(m);
    return;
  }
  md.generated = 1;
  w.stats.icmp_sent.add();
  w.generated.push(m);
}

void route(Worker& w, const Tables& t, const PortTable& pt, Burst& b) {
  uint32_t dst[kMaxBurst];
  uint32_t hop[kMaxBurst];
  for (uint16_t i = 0; i < b.n; i++) {
    auto* ip = rte_pktmbuf_mtod_offset(b.pkts[i], rte_ipv4_hdr*, meta(b.pkts[i]).l3_off);
    dst[i] = rte_be_to_cpu_32(ip->dst_addr);
  }
  rte_lpm_lookup_bulk(t.lpm, dst, hop, b.n);
  const uint32_t default_nh = t.default_nh.load(std::memory_order_acquire);
  uint16_t kept = 0;
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    uint32_t idx = (hop[i] & RTE_LPM_LOOKUP_SUCCESS) ? hop[i] & 0x00ffffff : default_nh;
    if (!idx) {
      send_icmp_error(w, pt, m, Drop::no_route, kIcmpUnreach, kUnreachNet);
      continue;
    }
    const NextHop& nh = t.next_hops[idx];
    switch (nh.kind) {
      case NextHop::local:
      case NextHop::local_bcast:
        if (md.generated) { w.drop(m, Drop::no_route); continue; }  // to ourselves: nothing to do
        md.nh = idx;
        w.local.push(m);
        continue;
      case NextHop::blackhole:
        w.drop(m, Drop::blackhole_route);
        continue;
      case NextHop::unreachable:
        send_icmp_error(w, pt, m, Drop::unreachable_route, kIcmpUnreach, kUnreachNet);
        continue;
      case NextHop::prohibit:
        send_icmp_error(w, pt, m, Drop::prohibited_route, kIcmpUnreach, kUnreachAdminProhibited);
        continue;
      case NextHop::connected:
      case NextHop::gateway:
      case NextHop::tunnel:
        break;
      default:
        w.drop(m, Drop::no_route);  // a next hop being torn down
        continue;
    }
    auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, md.l3_off);
    // Errors quote the packet as it arrived (RFC 1812 §4.3.2.3), so both
    // checks come before the TTL is touched.
    if (!md.generated && ip->time_to_live <= 1) {
      send_icmp_error(w, pt, m, Drop::ttl_expired, kIcmpTimeExceeded, 0);
      continue;
    }
    // A tunnel offers a large virtual MTU (ESP fragments the inner packet):
    // only an egress port's MTU can refuse a DF packet here.
    uint16_t mtu = nh.kind == NextHop::tunnel ? 0xffff : pt.port[nh.port].mtu;
    if (rte_be_to_cpu_16(ip->total_length) > mtu &&
        (ip->fragment_offset & rte_cpu_to_be_16(RTE_IPV4_HDR_DF_FLAG))) {
      send_icmp_error(w, pt, m, Drop::frag_needed, kIcmpUnreach, kUnreachFragNeeded, mtu);
      continue;
    }
    if (!md.generated) {
      // RFC 1624 incremental checksum update for TTL - 1.
      ip->time_to_live--;
      uint32_t sum = uint32_t(ip->hdr_checksum) + rte_cpu_to_be_16(0x0100);
      ip->hdr_checksum = uint16_t(sum + (sum >> 16));
    }
    md.nh = idx;
    if (nh.kind == NextHop::tunnel) {
      md.out_tunnel = nh.port;
      md.out_port = kNoPort;
    } else {
      md.out_port = nh.port;
      md.nh_ip = nh.kind == NextHop::gateway ? nh.gw : dst[i];
    }
    b.pkts[kept++] = m;
  }
  b.n = kept;
}

void local_deliver(Worker& w, const Tables& t, const PortTable& pt, Burst& b) {
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    const NextHop& nh = t.next_hops[md.nh];
    bool has_tap = t.punt_enabled && pt.port[md.in_port].punt;
    if (nh.kind == NextHop::local_bcast) {
      if (!has_tap) { w.drop(m, Drop::broadcast_l3); continue; }
      md.punt = Punt::broadcast;
      w.punt.push(m);
      continue;
    }
    auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, md.l3_off);
    bool fragment = ip->fragment_offset & rte_cpu_to_be_16(RTE_IPV4_HDR_MF_FLAG | RTE_IPV4_HDR_OFFSET_MASK);
    if (!fragment && ip->next_proto_id == IPPROTO_ICMP) {
      auto* icmp = reinterpret_cast<rte_icmp_hdr*>(ip + 1);
      uint16_t total = rte_be_to_cpu_16(ip->total_length);
      if (total >= sizeof(*ip) + sizeof(*icmp) && icmp->icmp_type == kIcmpEcho) {
        if (!icmp_echo_reply_in_place(m, md.l3_off)) { w.drop(m, Drop::icmp_bad); continue; }
        md.generated = 1;
        w.generated.push(m);
        continue;
      }
    }
    if (has_tap) {
      md.punt = Punt::local;
      w.punt.push(m);
      continue;
    }
    if (!fragment && ip->next_proto_id == IPPROTO_UDP) {
      send_icmp_error(w, pt, m, Drop::port_unreachable, kIcmpUnreach, kUnreachPort);
      continue;
    }
    w.drop(m, Drop::punt_no_tap);
  }
  b.n = 0;
}

}  // namespace moat
