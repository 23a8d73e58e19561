// Stage egress: neighbour MAC, fragmentation of oversized non-DF packets,
// Ethernet header, into the per-port transmit buffer.
#include <rte_ethdev.h>
#include <rte_ip.h>
#include <rte_ip_frag.h>

#include <cstring>

#include "dataplane/egress.hh"
#include "dataplane/shape.hh"
#include "dataplane/worker.hh"

namespace moat {

bool write_l2(rte_mbuf* m, const PortInfo& out, const rte_ether_addr& dst, uint16_t ethertype) {
  PktMeta& md = meta(m);
  uint16_t want = out.vlan ? sizeof(rte_ether_hdr) + sizeof(rte_vlan_hdr) : sizeof(rte_ether_hdr);
  if (md.l3_off > want) {
    rte_pktmbuf_adj(m, md.l3_off - want);
  } else if (md.l3_off < want) {
    if (!rte_pktmbuf_prepend(m, want - md.l3_off)) return false;
  }
  md.l3_off = want;
  auto* eth = rte_pktmbuf_mtod(m, rte_ether_hdr*);
  eth->dst_addr = dst;
  eth->src_addr = out.mac;
  if (out.vlan) {
    eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_VLAN);
    auto* vh = reinterpret_cast<rte_vlan_hdr*>(eth + 1);
    vh->vlan_tci = rte_cpu_to_be_16(out.vlan);
    vh->eth_proto = rte_cpu_to_be_16(ethertype);
  } else {
    eth->ether_type = rte_cpu_to_be_16(ethertype);
  }
  return true;
}

void tx_enqueue(Worker& w, uint16_t port, rte_mbuf* m) {
  TxBuffer& tb = w.tx[port];
  tb.pkts[tb.n++] = m;
  if (tb.n == TxBuffer::kSize) {
    uint16_t sent = rte_eth_tx_burst(port, w.id, tb.pkts, tb.n);
    w.stats.tx.add(sent);
    for (uint16_t i = sent; i < tb.n; i++) w.drop(tb.pkts[i], Drop::tx_full);
    tb.n = 0;
  }
}

void tx_flush(Worker& w) {
  for (uint16_t p = 0; p < kMaxPorts; p++) {
    TxBuffer& tb = w.tx[p];
    if (!tb.n) continue;
    uint16_t sent = rte_eth_tx_burst(p, w.id, tb.pkts, tb.n);
    w.stats.tx.add(sent);
    for (uint16_t i = sent; i < tb.n; i++) w.drop(tb.pkts[i], Drop::tx_full);
    tb.n = 0;
  }
}

namespace {

// The Ethernet header for one neighbour on one port, made once for a run of
// packets to it: an untagged frame whose IPv4 header is where write_l2
// would leave it takes it as two overlapping 8-byte stores; anything else
// (a tag to add, the header elsewhere) takes write_l2.
struct FrameStart {
  const PortInfo* out = nullptr;
  rte_ether_addr dst{};
  bool untagged = false;
  uint8_t b[16];  // destination MAC, source MAC, IPv4 ethertype
  void make(const PortInfo& o, const rte_ether_addr& d) {
    out = &o;
    dst = d;
    untagged = !o.vlan;
    std::memcpy(b, &d, 6);
    std::memcpy(b + 6, &o.mac, 6);
    uint16_t et = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
    std::memcpy(b + 12, &et, 2);
  }
  bool write(rte_mbuf* m) const {
    if (!untagged || meta(m).l3_off != sizeof(rte_ether_hdr)) return write_l2(m, *out, dst, RTE_ETHER_TYPE_IPV4);
    auto* f = rte_pktmbuf_mtod(m, uint8_t*);
    std::memcpy(f, b, 8);
    std::memcpy(f + 6, b + 6, 8);
    return true;
  }
};

void send(Worker& w, ShapeBurst& shaped, const ShapedPort* sp, uint16_t port, rte_mbuf* m) {
  if (!sp) {
    tx_enqueue(w, port, m);
    return;
  }
  meta(m).out_port = port;
  shaped.sp[shaped.n] = sp;
  shaped.pkts[shaped.n++] = m;
  if (shaped.n == kMaxBurst) shape_enqueue(w, shaped);
}

// Splits a non-DF packet larger than the egress MTU (RFC 791) with DPDK's
// fragmenter, which wants the mbuf to start at the IPv4 header.
void fragment_and_send(Worker& w, ShapeBurst& shaped, const PortInfo& out, const ShapedPort* sp, uint16_t port,
                       rte_mbuf* m, const rte_ether_addr& dst) {
  // Fragments leave in the class of their packet.
  uint8_t cls = meta(m).cls;
  uint16_t out_tunnel = meta(m).out_tunnel;
  constexpr uint16_t kMaxFrags = 64;  // 9000-byte jumbo into 576-byte MTU needs 17
  rte_mbuf* frags[kMaxFrags];
  rte_pktmbuf_adj(m, meta(m).l3_off);
  int n = rte_ipv4_fragment_packet(m, frags, kMaxFrags, out.mtu, w.direct_pool, w.indirect_pool);
  rte_pktmbuf_free(m);
  if (n < 0) {
    w.stats.drops[static_cast<unsigned>(Drop::frag_failed)].add();
    return;
  }
  for (int i = 0; i < n; i++) {
    rte_mbuf* f = frags[i];
    // The fragmenter leaves the header checksum to offload; no vdev has it.
    auto* ip = rte_pktmbuf_mtod(f, rte_ipv4_hdr*);
    ip->hdr_checksum = 0;
    ip->hdr_checksum = rte_ipv4_cksum(ip);
    PktMeta& fm = meta(f);
    fm = PktMeta{};
    fm.l3_off = 0;
    fm.in_port = kNoPort;
    fm.cls = cls;
    fm.out_tunnel = out_tunnel;
    if (!write_l2(f, out, dst, RTE_ETHER_TYPE_IPV4)) { w.drop(f, Drop::frag_failed); continue; }
    w.stats.fragments.add();
    send(w, shaped, sp, port, f);
  }
}

unsigned outer_slot(uint32_t dst) { return (dst * 2654435761u) >> (32 - Worker::kOuterPathBits); }

// The scheduler a packet for `port` goes through; none while the port drains.
const ShapedPort* shaper_of(const QosTable* q, uint16_t port) {
  const ShapedPort* sp = q ? q->port[port].get() : nullptr;
  return sp && sp->drain ? nullptr : sp;
}

// The egress stage; with `learn`, each destination sent on to a neighbour
// is remembered for egress_outer as of path generation `gen` (read before
// the route lookup, so a change made meanwhile invalidates it).
void egress_run(Worker& w, const Tables& t, const PortTable& pt, Burst& b, bool learn, uint32_t gen) {
  // A burst mostly goes to few next hops (every ESP packet of a tunnel to its
  // peer's): a run of packets with the key of the one before shares its
  // lookup, so the hash sees each run once.
  NeighKey keys[kMaxBurst];
  const void* key_ptrs[kMaxBurst];
  void* data[kMaxBurst];
  uint8_t key_of[kMaxBurst];
  uint64_t hits = 0;
  unsigned nk = 0;
  for (uint16_t i = 0; i < b.n; i++) {
    const PktMeta& md = meta(b.pkts[i]);
    if (nk && keys[nk - 1].ip == md.nh_ip && keys[nk - 1].port == md.out_port) {
      key_of[i] = uint8_t(nk - 1);
      continue;
    }
    keys[nk] = NeighKey{md.nh_ip, md.out_port};
    key_ptrs[nk] = &keys[nk];
    key_of[i] = uint8_t(nk++);
  }
  if (nk) rte_hash_lookup_bulk_data(t.neigh, key_ptrs, nk, &hits, data);
  const QosTable* q = t.qos.load(std::memory_order_acquire);
  ShapeBurst shaped;
  // Port, shaper and frame start once per run of one key (next hop, port).
  unsigned run_k = ~0u;
  const ShapedPort* sp = nullptr;
  FrameStart frame;
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    unsigned k = key_of[i];
    if (!(hits & (uint64_t(1) << k))) {
      md.punt = Punt::resolve;
      w.punt.push(m);
      continue;
    }
    if (k != run_k) {
      run_k = k;
      sp = shaper_of(q, md.out_port);
      frame.make(pt.port[md.out_port], unpack_mac(reinterpret_cast<uintptr_t>(data[k])));
    }
    const PortInfo& out = *frame.out;
    auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, md.l3_off);
    if (learn) {
      uint32_t d = rte_be_to_cpu_32(ip->dst_addr);
      w.outer_path[outer_slot(d)] = {gen, d, uint64_t(uintptr_t(data[k])) | uint64_t(md.out_port) << 56};
    }
    if (rte_be_to_cpu_16(ip->total_length) > out.mtu) {
      fragment_and_send(w, shaped, out, sp, md.out_port, m, frame.dst);
      continue;
    }
    if (!frame.write(m)) { w.drop(m, Drop::inject_bad); continue; }
    send(w, shaped, sp, md.out_port, m);
  }
  if (shaped.n) shape_enqueue(w, shaped);
  b.n = 0;
}

}  // namespace

void egress(Worker& w, const Tables& t, const PortTable& pt, Burst& b) { egress_run(w, t, pt, b, false, 0); }

void egress_outer(Worker& w, const Tables& t, const PortTable& pt, Burst& b) {
  if (!b.n) return;
  const uint32_t gen = t.path_gen.load(std::memory_order_acquire);
  const QosTable* q = t.qos.load(std::memory_order_acquire);
  ShapeBurst shaped;
  Burst miss;
  // A tunnel's packets run to one peer: the cache entry, the port and the
  // frame's first 14 bytes are worked out once per run of one destination.
  // Within a burst a destination either hits or misses for all its packets
  // (nothing is learnt until the end), so each destination keeps its order.
  uint32_t run_dst = 0;
  bool run_hit = false;
  uint16_t port = 0, mtu = 0;
  const ShapedPort* sp = nullptr;
  FrameStart frame;
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    auto* ip = rte_pktmbuf_mtod_offset(m, const rte_ipv4_hdr*, md.l3_off);
    uint32_t dst = rte_be_to_cpu_32(ip->dst_addr);
    if (i == 0 || dst != run_dst) {
      run_dst = dst;
      const Worker::OuterPath& op = w.outer_path[outer_slot(dst)];
      run_hit = op.gen == gen && op.dst == dst;
      if (run_hit) {
        port = uint16_t(op.way >> 56);
        mtu = pt.port[port].mtu;
        sp = shaper_of(q, port);
        frame.make(pt.port[port], unpack_mac(op.way));
      }
    }
    // Oversized for the port: the full way fragments it.
    if (!run_hit || rte_be_to_cpu_16(ip->total_length) > mtu) {
      miss.push(m);
      continue;
    }
    md.out_port = port;
    if (!frame.write(m)) { w.drop(m, Drop::inject_bad); continue; }
    send(w, shaped, sp, port, m);
  }
  if (shaped.n) shape_enqueue(w, shaped);
  b.n = 0;
  if (!miss.n) return;
  route(w, t, pt, miss);
  egress_run(w, t, pt, miss, true, gen);
}

}  // namespace moat
