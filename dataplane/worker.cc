// The worker loop: the packet's way through Moat, top to bottom.
#include "dataplane/worker.hh"

#include <rte_cycles.h>
#include <rte_ethdev.h>

#include "dataplane/egress.hh"
#include "dataplane/esp.hh"
#include "dataplane/sa.hh"
#include "dataplane/shape.hh"

namespace moat {

Tables* g_tables = nullptr;

void punt_flush(Worker& w) {
  if (!w.punt.n) return;
  unsigned sent = rte_ring_enqueue_burst(w.punt_ring, reinterpret_cast<void**>(w.punt.pkts), w.punt.n, nullptr);
  w.stats.punted.add(sent);
  for (unsigned i = sent; i < w.punt.n; i++) w.drop(w.punt.pkts[i], Drop::punt_full);
  w.punt.n = 0;
}

// Connections are tracked only under a rule set (a plain router has none),
// and not while nothing would read them: a stateless rule set (no rule, no
// stateful or translating default) with an empty table leaves every packet
// of no connection, as the pass would, without touching them. policy()
// marks them after all if the rule set is replaced in between.
void track(Worker& w, const Tables& t, Burst& b) {
  const Classifier* c = t.classifier.load(std::memory_order_relaxed);
  if (!t.conntrack || !c || (c->stateless && t.conntrack->empty())) {
    w.ct_marked = false;
    w.ct_none = true;
    return;
  }
  conntrack(w, *t.conntrack, b);
}

// Echo replies and ICMP errors made while processing a burst take the same
// way out as transit packets; they cannot generate further packets. Those
// routed into a tunnel (answers to hosts behind it) go through it: egress
// has no port for them (they were held for ARP on port kNoPort and lost).
static void route_generated(Worker& w, const Tables& t, const PortTable& pt) {
  if (!w.generated.n) return;
  Burst g = w.generated;
  w.generated.n = 0;
  route(w, t, pt, g);
  Burst to_tunnel;
  uint16_t kept = 0;
  for (uint16_t i = 0; i < g.n; i++) {
    rte_mbuf* m = g.pkts[i];
    if (t.next_hops[meta(m).nh].kind == NextHop::tunnel) {
      const Sad* sad = worker_sad(w, t);
      meta(m).sa = sad ? sad->tunnel_sa(meta(m).out_tunnel) : kNoSa;
      to_tunnel.push(m);
    } else {
      g.pkts[kept++] = m;
    }
  }
  g.n = kept;
  tunnel_out(w, t, pt, to_tunnel);
  egress(w, t, pt, g);
}

// The rule tables' verdicts for transit packets and packets for us; what
// the SPD protects leaves here for its tunnel.
void policy(Worker& w, const Tables& t, const PortTable& pt, Burst& b, Burst& local) {
  const Classifier* c = t.classifier.load(std::memory_order_acquire);
  Burst to_tunnel;
  if (c) {
    if (!w.ct_marked && t.conntrack && !c->stateless) {
      // track() skipped the pass under a stateless rule set that has been
      // replaced since: mark now what the empty table's pass would have.
      conntrack_mark_untracked(b);
      conntrack_mark_untracked(local);
      w.ct_marked = true;
    }
    classify(w, *c, pt, b, local);
    if (t.conntrack && c->has_dnat) dnat(w, t, *c, pt, b);
    filter(w, *c, pt, b);
    filter(w, *c, pt, local);
    if (t.conntrack) {
      nat(w, *t.conntrack, *c, pt, b);
      nat(w, *t.conntrack, *c, pt, local);
    }
    qos_mark(w, *c, b);
    // Before encryption: what the bottleneck cannot carry costs no crypto.
    if (const QosTable* q = t.qos.load(std::memory_order_acquire)) police(w, *q, b);
  }
  spd(w, c, worker_sad(w, t), b, to_tunnel);
  tunnel_out(w, t, pt, to_tunnel);
}

void tunnel_out(Worker& w, const Tables& t, const PortTable& pt, Burst& b) {
  if (!b.n) return;
  if (!worker_sad(w, t)) {
    for (uint16_t i = 0; i < b.n; i++) w.drop(b.pkts[i], Drop::tunnel_down);
    b.n = 0;
    return;
  }
  // esp_mtu stops early when inner fragments would overflow a burst.
  while (b.n) {
    Burst out;
    esp_mtu(w, *w.esp, *t.sad, pt, b, out);
    esp_outbound(w, *w.esp, *t.sad, out);
    egress_outer(w, t, pt, out);  // outer packets: generated, so no TTL change, no ICMP about them
  }
}

// ESP for us, in place: the inner packets, each marked with its tunnel.
static void decrypt(Worker& w, const Tables& t, Burst& b) {
  if (b.n) esp_inbound(w, *w.esp, *t.sad, b);
}

void tunnel_in(Worker& w, const Tables& t, Burst& local, Burst& inner) {
  inner.n = 0;
  if (!t.sad || !w.esp) return;
  uint16_t kept = 0;
  for (uint16_t i = 0; i < local.n; i++) {
    rte_mbuf* m = local.pkts[i];
    // No ESP inside ESP: what a tunnel carries to us goes to local services.
    if (meta(m).in_tunnel == kNoTunnel && t.next_hops[meta(m).nh].kind == NextHop::local && esp_to_us(m))
      inner.push(m);
    else
      local.pkts[kept++] = m;
  }
  local.n = kept;
  decrypt(w, t, inner);
}

// Decrypted packets: from their tunnel's zone, routed and classified like
// any received packet.
static void forward_inner(Worker& w, const Tables& t, const PortTable& pt, Burst& inner) {
  if (!inner.n) return;
  track(w, t, inner);
  route(w, t, pt, inner);
  policy(w, t, pt, inner, w.local);
  local_deliver(w, t, pt, w.local);
  egress(w, t, pt, inner);
}

void process_burst(Worker& w, const Tables& t, Burst& b) {
  const PortTable& pt = *t.ports.load(std::memory_order_acquire);
  parse(w, pt, b);
  track(w, t, b);
  route(w, t, pt, b);
  policy(w, t, pt, b, w.local);
  Burst inner;
  tunnel_in(w, t, w.local, inner);
  local_deliver(w, t, pt, w.local);
  egress(w, t, pt, b);
  forward_inner(w, t, pt, inner);
  route_generated(w, t, pt);
  punt_flush(w);
}

// Packets from the control thread: complete frames (ARP), held packets whose
// next hop now has a MAC, IPv4 from local services to be routed, and ESP
// in UDP that came in outer fragments (whole again, through the kernel).
static unsigned process_inject(Worker& w, const Tables& t) {
  rte_mbuf* pkts[kMaxBurst];
  unsigned n = rte_ring_dequeue_burst(w.inject_ring, reinterpret_cast<void**>(pkts), w.burst, nullptr);
  if (!n) return 0;
  w.stats.injected.add(n);
  const PortTable& pt = *t.ports.load(std::memory_order_acquire);
  Burst to_route, to_egress, esp;
  for (unsigned i = 0; i < n; i++) {
    rte_mbuf* m = pkts[i];
    PktMeta& md = meta(m);
    switch (md.inject) {
      case Inject::tx:
        if (md.out_port >= kMaxPorts || !pt.port[md.out_port].configured) { w.drop(m, Drop::inject_bad); break; }
        tx_enqueue(w, md.out_port, m);
        break;
      case Inject::route:
        to_route.push(m);
        break;
      case Inject::egress:
        if (md.out_port >= kMaxPorts || !pt.port[md.out_port].configured) { w.drop(m, Drop::inject_bad); break; }
        to_egress.push(m);
        break;
      case Inject::unreachable:
        send_icmp_error(w, pt, m, Drop::arp_failed, kIcmpUnreach, kUnreachHost);
        break;
      case Inject::esp:
        if (!t.sad || !w.esp) { w.drop(m, Drop::inject_bad); break; }
        esp.push(m);
        break;
      default:
        w.drop(m, Drop::inject_bad);
        break;
    }
  }
  track(w, t, to_route);
  route(w, t, pt, to_route);
  policy(w, t, pt, to_route, w.local);
  local_deliver(w, t, pt, w.local);
  egress(w, t, pt, to_route);
  egress(w, t, pt, to_egress);
  decrypt(w, t, esp);
  forward_inner(w, t, pt, esp);
  route_generated(w, t, pt);
  punt_flush(w);
  return n;
}

int worker_main(void* arg) {
  Worker& w = *static_cast<Worker*>(arg);
  const Tables& t = *g_tables;
  rte_rcu_qsbr_thread_register(t.qsbr, w.id);
  rte_rcu_qsbr_thread_online(t.qsbr, w.id);
  unsigned idle = 0;
  Burst b;
  while (!w.stop->load(std::memory_order_relaxed)) {
    w.now_tsc = rte_rdtsc();
    unsigned work = 0;
    for (const RxQueue& q : w.rxq) {
      b.n = rte_eth_rx_burst(q.port, q.queue, b.pkts, w.burst);
      if (!b.n) continue;
      work += b.n;
      w.stats.rx.add(b.n);
      process_burst(w, t, b);
    }
    work += process_inject(w, t);
    if (w.esp) esp_housekeeping(w, *w.esp);
    work += shape_run(w, t);
    tx_flush(w);
    rte_rcu_qsbr_quiescent(t.qsbr, w.id);
    // Labs and edge boxes share cores: after a run of empty polls, nap.
    if (work) {
      idle = 0;
    } else if (w.idle_sleep_us && ++idle > 64) {
      rte_rcu_qsbr_thread_offline(t.qsbr, w.id);
      rte_delay_us_sleep(w.idle_sleep_us);
      rte_rcu_qsbr_thread_online(t.qsbr, w.id);
    }
  }
  rte_rcu_qsbr_thread_offline(t.qsbr, w.id);
  rte_rcu_qsbr_thread_unregister(t.qsbr, w.id);
  return 0;
}

}  // namespace moat
