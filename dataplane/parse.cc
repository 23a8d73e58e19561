// Stage parse: Ethernet, optional 802.1Q, IPv4 header validation.
// Everything the later stages assume about a packet is established here, so
// they can read headers without re-checking. Untrusted input: every exit that
// is not "pass on" is a counted drop.
#include <rte_arp.h>
#include <rte_ether.h>
#include <rte_ip.h>

#include "dataplane/icmp.hh"
#include "dataplane/worker.hh"

namespace moat {

namespace {

bool martian_source(uint32_t src, uint32_t dst) {
  // 0.0.0.0 is a legal source only for a host without an address asking for
  // one (DHCP discover/request to the limited broadcast).
  if (src == 0) return dst != 0xffffffff;
  uint8_t top = src >> 24;
  return top == 0 || top == 127 || (src >> 28) >= 0xe;  // 0/8, loopback, class D/E, bcast
}

}  // namespace

void parse(Worker& w, const PortTable& pt, Burst& b) {
  uint16_t kept = 0;
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    md = PktMeta{};
    md.in_port = m->port;
    md.out_port = kNoPort;
    const PortInfo& pi = pt.port[m->port < kMaxPorts ? m->port : 0];
    uint16_t len = rte_pktmbuf_data_len(m);
    if (len < sizeof(rte_ether_hdr)) { w.drop(m, Drop::runt); continue; }
    auto* eth = rte_pktmbuf_mtod(m, rte_ether_hdr*);
    if (!rte_is_same_ether_addr(&eth->dst_addr, &pi.mac)) {
      if (rte_is_unicast_ether_addr(&eth->dst_addr)) { w.drop(m, Drop::not_for_us_l2); continue; }
      if (!rte_is_broadcast_ether_addr(&eth->dst_addr)) { w.drop(m, Drop::multicast_l2); continue; }
    }
    uint16_t et = rte_be_to_cpu_16(eth->ether_type);
    uint16_t off = sizeof(rte_ether_hdr);
    if (et == RTE_ETHER_TYPE_VLAN) {
      if (len < off + sizeof(rte_vlan_hdr)) { w.drop(m, Drop::runt); continue; }
      auto* vh = reinterpret_cast<rte_vlan_hdr*>(eth + 1);
      md.vlan = rte_be_to_cpu_16(vh->vlan_tci) & 0xfff;
      et = rte_be_to_cpu_16(vh->eth_proto);
      off += sizeof(rte_vlan_hdr);
    }
    // VID 0 is a priority tag: it belongs to the untagged interface.
    if (md.vlan != pi.vlan) { w.drop(m, Drop::vlan_unknown); continue; }
    md.l3_off = off;
    if (et == RTE_ETHER_TYPE_ARP) {
      if (len < off + sizeof(rte_arp_hdr)) { w.drop(m, Drop::arp_malformed); continue; }
      md.punt = Punt::arp;
      w.punt.push(m);
      continue;
    }
    if (et != RTE_ETHER_TYPE_IPV4) { w.drop(m, Drop::ethertype_unknown); continue; }
    if (len < off + sizeof(rte_ipv4_hdr)) { w.drop(m, Drop::ip_truncated); continue; }
    auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, off);
    if ((ip->version_ihl >> 4) != 4) { w.drop(m, Drop::ip_version); continue; }
    uint16_t ihl = (ip->version_ihl & 0xf) * 4;
    if (ihl < sizeof(rte_ipv4_hdr) || off + ihl > len) { w.drop(m, Drop::ip_ihl); continue; }
    uint16_t total = rte_be_to_cpu_16(ip->total_length);
    if (total < ihl || total > rte_pktmbuf_pkt_len(m) - off) { w.drop(m, Drop::ip_truncated); continue; }
    // No virtual device offers RX checksum offload, so verify in software.
    if (ipv4_hdr_sum(ip, ihl) != 0xffff) { w.drop(m, Drop::ip_checksum); continue; }
    if (ihl != sizeof(rte_ipv4_hdr)) { w.drop(m, Drop::ip_options); continue; }
    if (martian_source(rte_be_to_cpu_32(ip->src_addr), rte_be_to_cpu_32(ip->dst_addr))) {
      w.drop(m, Drop::ip_martian);
      continue;
    }
    // Ethernet pads short frames: cut the padding so lengths mean the packet.
    uint32_t excess = rte_pktmbuf_pkt_len(m) - off - total;
    if (excess) rte_pktmbuf_trim(m, excess);
    b.pkts[kept++] = m;
  }
  b.n = kept;
}

}  // namespace moat
