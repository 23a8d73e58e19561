// Stages classify, filter and qos_mark: one rte_acl lookup per burst answers
// every rule table (classifier/acl.hh); later stages only read the verdicts
// the lookup left in PktMeta::rule.
#include <rte_icmp.h>
#include <rte_ip.h>

#include <algorithm>

#include "dataplane/nat.hh"
#include "dataplane/sa.hh"
#include "dataplane/worker.hh"

namespace moat {

namespace {

// Fills the classifier key from the headers and the route. Ports (or ICMP
// type and code) only from a packet's first fragment: later fragments carry
// no L4 header and match with ports 0.
void make_key(const Classifier& c, const PortTable& pt, rte_mbuf* m, AclKey& k) {
  const PktMeta& md = meta(m);
  auto* ip = rte_pktmbuf_mtod_offset(m, const rte_ipv4_hdr*, md.l3_off);
  k = AclKey{};
  k.proto = ip->next_proto_id;
  k.dscp = ip->type_of_service >> 2;
  k.src = ip->src_addr;
  k.dst = ip->dst_addr;
  if (md.in_tunnel < c.tunnel_zone.size()) {
    k.in_zone = c.tunnel_zone[md.in_tunnel];
    k.in_port = kNoPortKey;
  } else if (md.in_port < kMaxPorts) {
    k.in_zone = pt.port[md.in_port].zone;
    k.in_port = pt.port[md.in_port].key;
  } else {
    k.in_zone = kZoneLocal;
    k.in_port = kNoPortKey;
  }
  if (md.out_tunnel < c.tunnel_zone.size()) {
    k.out_zone = c.tunnel_zone[md.out_tunnel];
    k.out_port = kNoPortKey;
  } else if (md.out_port < kMaxPorts) {
    k.out_zone = pt.port[md.out_port].zone;
    k.out_port = pt.port[md.out_port].key;
  } else {
    k.out_zone = kZoneLocal;
    k.out_port = kNoPortKey;
  }
  if (ip->fragment_offset & rte_cpu_to_be_16(RTE_IPV4_HDR_OFFSET_MASK)) return;
  uint16_t ihl = uint16_t((ip->version_ihl & 0x0f) * 4);
  uint16_t total = rte_be_to_cpu_16(ip->total_length);
  const uint8_t* l4 = reinterpret_cast<const uint8_t*>(ip) + ihl;
  switch (ip->next_proto_id) {
    case IPPROTO_TCP:
    case IPPROTO_UDP:
    case IPPROTO_SCTP:
      if (total >= ihl + 4) {
        memcpy(&k.sport, l4, 2);
        memcpy(&k.dport, l4 + 2, 2);
      }
      break;
    case IPPROTO_ICMP:
      if (total >= ihl + 2) {
        k.sport = rte_cpu_to_be_16(l4[0]);
        k.dport = rte_cpu_to_be_16(l4[1]);
      }
      break;
  }
}

}  // namespace

void classify(Worker& w, const Classifier& c, const PortTable& pt, Burst& transit, Burst& local) {
  unsigned n = transit.n + local.n;
  if (!n) return;
  if (!c.ctx) {
    // No rules: every table answers its default (0) whatever the key, so
    // no key is made and nothing is written: the stages read the verdicts
    // through rule_of, which answers 0 without rules.
    w.stats.classified.add(n);
    return;
  }
  AclKey keys[2 * kMaxBurst];
  const AclKey* ptrs[2 * kMaxBurst];
  uint32_t res[2 * kMaxBurst * kTables];
  rte_mbuf* pkts[2 * kMaxBurst];
  for (unsigned i = 0; i < transit.n; i++) pkts[i] = transit.pkts[i];
  for (unsigned i = 0; i < local.n; i++) pkts[transit.n + i] = local.pkts[i];
  for (unsigned i = 0; i < n; i++) {
    make_key(c, pt, pkts[i], keys[i]);
    ptrs[i] = &keys[i];
  }
  moat::classify(c, ptrs, n, res);
  for (unsigned i = 0; i < n; i++) memcpy(meta(pkts[i]).rule, &res[i * kTables], sizeof(meta(pkts[i]).rule));
  w.stats.classified.add(n);
}

void filter(Worker& w, const Classifier& c, const PortTable& pt, Burst& b) {
  const Verdict* v = c.verdict[unsigned(Table::filter)].data();
  // No rules and a default that accepts without state: every packet passes
  // untouched (a config with tunnels and no filter table).
  if (!c.ctx && FilterAction(v[0].action) == FilterAction::accept && !(v[0].flags & Verdict::kStateful)) return;
  uint16_t kept = 0;
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    // A packet of a known connection (either way, or an ICMP error about
    // one) was admitted when the connection was: no rule is consulted.
    if (md.conn) {
      b.pkts[kept++] = m;
      continue;
    }
    const Verdict& fv = v[rule_of(c, md, Table::filter)];
    switch (FilterAction(fv.action)) {
      case FilterAction::accept:
        if (fv.flags & Verdict::kStateful) md.ct |= kCtCommit;
        b.pkts[kept++] = m;
        break;
      case FilterAction::reject: {
        // TCP is refused the way TCP refuses (RST), the rest with ICMP.
        auto* ip = rte_pktmbuf_mtod_offset(m, const rte_ipv4_hdr*, md.l3_off);
        if (ip->next_proto_id == IPPROTO_TCP) send_tcp_reset(w, pt, m, Drop::filter_reject);
        else send_icmp_error(w, pt, m, Drop::filter_reject, kIcmpUnreach, kUnreachAdminProhibited);
        break;
      }
      default:
        w.drop(m, Drop::filter_drop);
        break;
    }
  }
  b.n = kept;
}

void spd(Worker& w, const Classifier* c, const Sad* sad, Burst& b, Burst& to_tunnel) {
  const Verdict* v = c ? c->verdict[unsigned(Table::spd)].data() : nullptr;
  // Without rules every packet has the table's default: read it once.
  const bool one = !c || !c->ctx;
  const SpdAction deflt = v ? SpdAction(v[0].action) : SpdAction::bypass;
  uint16_t kept = 0;
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    SpdAction a = one ? deflt : SpdAction(v[rule_of(*c, md, Table::spd)].action);
    if (a == SpdAction::discard) {
      w.drop(m, Drop::spd_discard);
      continue;
    }
    // Policy overrides the route: seed 003's funnels protect by selector.
    if (a == SpdAction::protect) md.out_tunnel = uint16_t(v[one ? 0 : rule_of(*c, md, Table::spd)].a);
    // else: routed into a tunnel, protected whatever the SPD's default.
    if (md.out_tunnel == kNoTunnel) {
      b.pkts[kept++] = m;
      continue;
    }
    // The tunnel's SA now, while the packet's metadata is at hand (esp_mtu
    // counts a tunnel without one as tunnel_down).
    md.sa = sad ? sad->tunnel_sa(md.out_tunnel) : kNoSa;
    to_tunnel.push(m);
  }
  b.n = kept;
}

void qos_mark(Worker& w, const Classifier& c, Burst& b) {
  const Verdict* v = c.verdict[unsigned(Table::qos)].data();
  if (!c.ctx) {
    // Without rules every packet gets the default class (and mark).
    const Verdict& q = v[0];
    // Every packet arrives here with class 0 (PktMeta{} at parse, after
    // decryption and for injected packets; policy runs once per packet):
    // the default class 0 needs no write.
    if (q.cls)
      for (uint16_t i = 0; i < b.n; i++) meta(b.pkts[i]).cls = uint8_t(q.cls);
    if (q.flags & Verdict::kMarkDscp)
      for (uint16_t i = 0; i < b.n; i++)
        set_dscp(rte_pktmbuf_mtod_offset(b.pkts[i], rte_ipv4_hdr*, meta(b.pkts[i]).l3_off), q.dscp);
    return;
  }
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    const Verdict& q = v[rule_of(c, meta(m), Table::qos)];
    meta(m).cls = uint8_t(q.cls);
    if (!(q.flags & Verdict::kMarkDscp)) continue;
    set_dscp(rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, meta(m).l3_off), q.dscp);
  }
}

}  // namespace moat
