// Stages police and shape: ingress metering per class, and the egress
// scheduler's hand-off and turn (dataplane/shape.hh).
#include "dataplane/shape.hh"

#include <rte_ethdev.h>
#include <rte_ip.h>

#include <bit>

#include "dataplane/egress.hh"
#include "dataplane/nat.hh"
#include "dataplane/worker.hh"

namespace moat {

namespace {

uint8_t dscp_of(rte_mbuf* m) {
  auto* ip = rte_pktmbuf_mtod_offset(m, const rte_ipv4_hdr*, meta(m).l3_off);
  return ip->type_of_service >> 2;
}

// The leaf a packet leaves in. The class rides in PktMeta from the qos rule
// table through ESP encapsulation (the outer packet is the same mbuf), and
// the outer header carries the inner DSCP (RFC 4301 §5.1.2.1), so encrypted
// traffic is scheduled like its cleartext (seed 003 §3.4).
uint32_t leaf_of(const ShapedPort& sp, rte_mbuf* m) {
  const PktMeta& md = meta(m);
  uint16_t cls = md.cls < sp.ncls ? md.cls : 0;
  if (cls == 0) cls = sp.dscp_cls[dscp_of(m)];
  if (md.out_tunnel < sp.ntunnels) return sp.tunnel_leaf[size_t(md.out_tunnel) * sp.ncls + cls];
  return sp.by_class[cls];
}


}  // namespace

void shape_enqueue(Worker& w, ShapeBurst& b) {
  uint32_t leaves[kMaxBurst];
  void* pkts[kMaxBurst];
  uint32_t lens[kMaxBurst];
  for (uint16_t i = 0, j; i < b.n; i = j) {
    // A run of packets for one port (egress's bursts rarely mix shaped ports).
    const ShapedPort& sp = *b.sp[i];
    unsigned n = 0;
    for (j = i; j < b.n && b.sp[j] == &sp; j++) {
      rte_mbuf* m = b.pkts[j];
      meta(m).qleaf = leaf_of(sp, m);
      if (meta(m).qleaf == kNoLeaf) {
        // The tree has no leaf for it (HTB's direct queue): unshaped.
        tx_enqueue(w, meta(m).out_port, m);
        continue;
      }
      leaves[n] = meta(m).qleaf;
      lens[n] = rte_pktmbuf_pkt_len(m);
      pkts[n++] = m;
    }
    if (sp.owner == w.id) {
      uint64_t refused = sp.sched->enqueue_burst(leaves, pkts, lens, n, w.now_tsc);
      for (; refused; refused &= refused - 1)
        w.drop(static_cast<rte_mbuf*>(pkts[std::countr_zero(refused)]), Drop::qos_queue_full);
    } else {
      unsigned k = rte_ring_mp_enqueue_burst(sp.handoff, pkts, n, nullptr);
      for (; k < n; k++) w.drop(static_cast<rte_mbuf*>(pkts[k]), Drop::qos_handoff_full);
    }
  }
  b.n = 0;
}

unsigned shape_run(Worker& w, const Tables& t) {
  const QosTable* q = t.qos.load(std::memory_order_acquire);
  if (!q) return 0;  // nothing was ever shaped
  unsigned work = 0;
  void* pkts[kMaxBurst];
  void* dropped[kMaxBurst];
  for (uint16_t p = 0; p < kMaxPorts; p++) {
    const ShapedPort* sp = q->port[p].get();
    qos::Scheduler* now = sp && sp->owner == w.id ? sp->sched.get() : nullptr;
    qos::Scheduler*& mine = w.shaper[p];
    if (mine != now) {
      // A new plan: the queued packets move to it, so a config change loses
      // nothing. The control thread frees the old scheduler only after two
      // grace periods (Control::install_qos): one loop of ours begun after
      // the swap, this one, must have run. A packet whose leaf is
      // gone takes the new plan's leaf for its class; when shaping is
      // removed (`drain`: a plan with no class of any config name) the
      // packets leave unshaped.
      if (mine && now) {
        for (;;) {
          unsigned n = now->adopt(*mine, pkts, kMaxBurst);
          for (unsigned i = 0; i < n; i++) {
            auto* m = static_cast<rte_mbuf*>(pkts[i]);
            if (sp->drain) {
              tx_enqueue(w, meta(m).out_port, m);
            } else {
              meta(m).qleaf = leaf_of(*sp, m);
              if (meta(m).qleaf == kNoLeaf) tx_enqueue(w, meta(m).out_port, m);
              else if (!now->enqueue(meta(m).qleaf, m, rte_pktmbuf_pkt_len(m), w.now_tsc)) w.drop(m, Drop::qos_queue_full);
            }
          }
          if (n < kMaxBurst) break;
        }
      }
      mine = now;
    }
    if (!now || sp->drain) continue;
    // Packets other workers routed to this port.
    void* in[kMaxBurst];
    uint32_t leaves[kMaxBurst], lens[kMaxBurst];
    unsigned n = rte_ring_sc_dequeue_burst(sp->handoff, in, kMaxBurst, nullptr);
    for (unsigned i = 0; i < n; i++) {
      leaves[i] = meta(static_cast<rte_mbuf*>(in[i])).qleaf;
      lens[i] = rte_pktmbuf_pkt_len(static_cast<rte_mbuf*>(in[i]));
    }
    for (uint64_t refused = n ? now->enqueue_burst(leaves, in, lens, n, w.now_tsc) : 0; refused; refused &= refused - 1)
      w.drop(static_cast<rte_mbuf*>(in[std::countr_zero(refused)]), Drop::qos_queue_full);
    if (now->next_send(w.now_tsc) > w.now_tsc) continue;
    unsigned nd = 0;
    unsigned out = now->dequeue(w.now_tsc, pkts, kMaxBurst, dropped, &nd);
    for (unsigned i = 0; i < nd; i++) w.drop(static_cast<rte_mbuf*>(dropped[i]), Drop::qos_aqm);
    for (unsigned i = 0; i < out; i++) tx_enqueue(w, p, static_cast<rte_mbuf*>(pkts[i]));
    work += n + out + nd;
  }
  // Done with every older table: the control thread may free it.
  w.qos_gen.store(q->generation, std::memory_order_release);
  return work;
}

void police(Worker& w, const QosTable& q, Burst& b) {
  if (q.police.empty()) return;
  rte_meter_trtcm* meters = const_cast<rte_meter_trtcm*>(q.meters[w.id].data());
  uint16_t kept = 0;
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    uint16_t cls = meta(m).cls;
    if (cls >= q.police.size() || !q.police[cls].on) {
      b.pkts[kept++] = m;
      continue;
    }
    const Policer& pol = q.police[cls];
    auto* ip = rte_pktmbuf_mtod_offset(m, const rte_ipv4_hdr*, meta(m).l3_off);
    auto colour = rte_meter_trtcm_color_blind_check(&meters[cls], const_cast<rte_meter_trtcm_profile*>(&pol.profile),
                                                    w.now_tsc, rte_be_to_cpu_16(ip->total_length));
    if (colour == RTE_COLOR_RED || (colour == RTE_COLOR_YELLOW && pol.yellow_drop)) {
      w.drop(m, Drop::qos_policed);
      continue;
    }
    if (colour == RTE_COLOR_YELLOW && pol.yellow_dscp != 0xff)
      set_dscp(rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, meta(m).l3_off), pol.yellow_dscp);
    b.pkts[kept++] = m;
  }
  b.n = kept;
}

}  // namespace moat
