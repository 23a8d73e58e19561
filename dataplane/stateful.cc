// Stages conntrack, dnat and nat: the stateful firewall and NAPT44 around
// the one classification (dataplane/classify.cc).
//
//   conntrack (before route): a packet of a known connection is marked with
//     it; its destination half is translated (DNAT, or de-SNAT of a reply)
//     so the route sees where it really goes. ICMP errors about a known
//     connection are translated whole, quote included.
//   route, classify
//   dnat: a new connection whose NAT rule says dnat gets its new
//     destination, is routed again and classified again, so the filter
//     judges where it really goes (Linux's PREROUTING order).
//   filter: packets of known connections pass without a rule; a new one
//     accepted by a stateful rule is marked for commit.
//   nat: commits new connections (one entry, both tuples, a NAT port when
//     the NAT rule says masquerade or snat) and translates the source half.
//     Packets the SPD protects are never source-NATed: seed 003's "NAT only
//     for destinations not routed through the tunnel".
#include <rte_hash_crc.h>
#include <rte_ip.h>
#include <rte_tcp.h>

#include <netinet/in.h>

#include "dataplane/nat.hh"
#include "dataplane/worker.hh"

namespace moat {

namespace {

uint8_t* l3_of(rte_mbuf* m) { return rte_pktmbuf_mtod_offset(m, uint8_t*, meta(m).l3_off); }
uint16_t l3_len(rte_mbuf* m) {
  // parse() guarantees the IPv4 total length lies within the packet; ICMP
  // errors and translations touch the first segment only.
  auto* ip = rte_pktmbuf_mtod_offset(m, const rte_ipv4_hdr*, meta(m).l3_off);
  uint16_t total = rte_be_to_cpu_16(ip->total_length);
  uint16_t seg = uint16_t(rte_pktmbuf_data_len(m) - meta(m).l3_off);
  return total < seg ? total : seg;
}

uint8_t tcp_flags(const uint8_t* l3, uint16_t len) {
  uint16_t ihl = uint16_t((l3[0] & 0x0f) * 4);
  return len >= ihl + 14 ? l3[ihl + 13] : 0;
}

// TCP progress of one segment in direction `dir`.
void tcp_track(Conn& c, unsigned dir, uint8_t f) {
  uint32_t bits = 0;
  if (f & RTE_TCP_RST_FLAG) {
    bits = ct::kRst;
  } else if ((f & (RTE_TCP_SYN_FLAG | RTE_TCP_ACK_FLAG)) == RTE_TCP_SYN_FLAG && dir == 0) {
    uint32_t cur = __atomic_load_n(&c.flags, __ATOMIC_RELAXED);
    // A new SYN on a closed tuple starts the connection over (port reuse).
    if (cur & (ct::kRst | ct::kFinOrig | ct::kFinReply)) __atomic_store_n(&c.flags, ct::kSynOrig, __ATOMIC_RELAXED);
    bits = ct::kSynOrig;
  } else if ((f & (RTE_TCP_SYN_FLAG | RTE_TCP_ACK_FLAG)) == (RTE_TCP_SYN_FLAG | RTE_TCP_ACK_FLAG)) {
    if (dir == 1) bits = ct::kSynAckReply;
  } else {
    uint32_t cur = __atomic_load_n(&c.flags, __ATOMIC_RELAXED);
    if (dir == 0 && (f & RTE_TCP_ACK_FLAG) && (cur & ct::kSynAckReply)) bits |= ct::kEstablished;
    if (f & RTE_TCP_FIN_FLAG) bits |= dir == 0 ? ct::kFinOrig : ct::kFinReply;
  }
  if (dir == 1) bits |= ct::kReplySeen;
  if (bits) Conntrack::set_flags(c, bits);
}

}  // namespace

void conntrack_mark_untracked(Burst& b) {
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    md.conn = 0;
    md.ct = ct_plain(l3_of(m), l3_len(m)) ? 0 : kCtNoTrack;
  }
}

void conntrack(Worker& w, Conntrack& ct, Burst& b) {
  CtKey keys[kMaxBurst];
  const CtKey* kp[kMaxBurst];
  uint8_t which[kMaxBurst];
  uint32_t refs[kMaxBurst];
  unsigned n = 0;
  w.ct_marked = true;
  w.ct_none = true;
  if (ct.empty()) {
    // Every lookup would miss: what a miss leaves is all the stages after
    // need (a trackable packet is new; an ICMP error about nothing known is
    // untracked), and the tuples need not be built. A plain router's tunnel
    // traffic (outer ESP, then the inner packet) takes this way.
    conntrack_mark_untracked(b);
    return;
  }
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    md.conn = 0;
    md.ct = 0;
    CtKind kind = ct_tuple(l3_of(m), l3_len(m), keys[n]);
    if (kind == CtKind::none) {
      md.ct = kCtNoTrack;
      continue;
    }
    if (kind == CtKind::icmp_error) md.ct = kCtRelated;
    which[n] = uint8_t(i);
    kp[n] = &keys[n];
    n++;
  }
  if (!n) return;
  ct.lookup(kp, n, refs);
  uint64_t hits = 0;
  for (unsigned j = 0; j < n; j++) {
    rte_mbuf* m = b.pkts[which[j]];
    PktMeta& md = meta(m);
    if (!refs[j]) {
      // An ICMP error about nothing we know: the filter judges it as a new
      // packet, and it can never open a connection.
      if (md.ct & kCtRelated) md.ct = kCtNoTrack;
      continue;
    }
    hits++;
    md.conn = refs[j];
    Conn& c = ct.conn(ct_ref_index(refs[j]));
    unsigned dir = ct_ref_dir(refs[j]);
    uint8_t* l3 = l3_of(m);
    uint16_t len = l3_len(m);
    if (md.ct & kCtRelated) {
      if (c.nat) nat_icmp_error(l3, len, c, dir);
      continue;
    }
    if (c.key[0].proto == IPPROTO_TCP) tcp_track(c, dir, tcp_flags(l3, len));
    else if (dir == 1) Conntrack::set_flags(c, ct::kReplySeen);
    ct.touch(c, w.now_tsc);
    if (c.nat & (dir == 0 ? kNatDst : kNatSrc)) {
      // Kept so an ICMP error or RST about this packet quotes it as its
      // sender sent it (RFC 5508 §5: no inside address leaks in a quote).
      const CtKey& k = c.key[dir];
      md.orig_dst = k.dst;
      md.orig_dport = k.dport;
      md.ct |= kCtDstXlated;
      nat_dst_half(l3, len, c, dir);
    }
  }
  w.stats.ct_hit.add(hits);
  w.ct_none = !hits;
}

void dnat(Worker& w, const Tables& t, const Classifier& c, const PortTable& pt, Burst& b) {
  const Verdict* v = c.verdict[unsigned(Table::nat)].data();
  Burst redo;
  auto take = [&](Burst& from) {
    uint16_t kept = 0;
    for (uint16_t i = 0; i < from.n; i++) {
      rte_mbuf* m = from.pkts[i];
      PktMeta& md = meta(m);
      const Verdict& nv = v[rule_of(c, md, Table::nat)];
      if (md.conn || (md.ct & (kCtNoTrack | kCtDnat)) || NatAction(nv.action) != NatAction::dnat) {
        from.pkts[kept++] = m;
        continue;
      }
      uint8_t* l3 = l3_of(m);
      uint16_t len = l3_len(m);
      CtKey k;
      ct_tuple(l3, len, k);
      md.ct |= kCtDnat;
      md.orig_dst = k.dst;
      md.orig_dport = k.dport;
      auto* ip = reinterpret_cast<rte_ipv4_hdr*>(l3);
      // Routed once already as transit: give back the TTL the route took,
      // the second route takes it again.
      if (md.out_port != kNoPort || md.out_tunnel != kNoTunnel) {
        ip->time_to_live++;
        ip->hdr_checksum = csum_update(ip->hdr_checksum, rte_cpu_to_be_16(uint16_t((ip->time_to_live - 1) << 8 | ip->next_proto_id)),
                                       rte_cpu_to_be_16(uint16_t(ip->time_to_live << 8 | ip->next_proto_id)));
      }
      bool ports = k.proto == IPPROTO_TCP || k.proto == IPPROTO_UDP;
      nat_rewrite(l3, len, false, rte_cpu_to_be_32(nv.a), ports && nv.port ? rte_cpu_to_be_16(nv.port) : k.dport);
      md.out_port = kNoPort;
      md.out_tunnel = kNoTunnel;
      redo.push(m);
    }
    from.n = kept;
  };
  take(b);
  take(w.local);
  if (!redo.n) return;
  // Route and classify the rewritten packets again; only they are looked
  // at, so w.local's other packets keep their first classification.
  Burst local_before = w.local;
  w.local.n = 0;
  route(w, t, pt, redo);
  classify(w, c, pt, redo, w.local);
  for (uint16_t i = 0; i < redo.n; i++) b.push(redo.pkts[i]);
  for (uint16_t i = 0; i < local_before.n; i++) w.local.push(local_before.pkts[i]);
}

namespace {

// The NAT port (or ICMP identifier) for a new connection. Each worker owns
// the ports p with (p - base) % workers == its id, so two workers never pick
// the same one at the same time and the "is it free" check needs no lock.
// The source port is kept when this worker owns it and it is free (as Linux
// does; some applications assume it); otherwise a hash of the tuple picks
// where to start probing. Ports below 1024 are never handed out.
bool pick_port(const Conntrack& ct, unsigned wid, CtKey& out, uint16_t& port_field) {
  const unsigned workers = ct.workers();
  const bool icmp = out.proto == IPPROTO_ICMP;
  const uint32_t base = icmp ? 0 : 1024;
  const uint32_t slots = (65536 - base) / workers;
  uint16_t want = rte_be_to_cpu_16(port_field);
  if (want >= base && (want - base) % workers == wid && (want - base) / workers < slots) {
    if (!ct.taken(reversed(out))) return true;
  }
  uint32_t h = rte_hash_crc(&out, sizeof(out), 0x5a17);
  constexpr unsigned kProbes = 128;
  for (unsigned i = 0; i < kProbes; i++) {
    uint32_t p = base + ((h + i) % slots) * workers + wid;
    port_field = rte_cpu_to_be_16(uint16_t(p));
    if (!ct.taken(reversed(out))) return true;
  }
  return false;
}

}  // namespace

void nat(Worker& w, Conntrack& ct, const Classifier& c, const PortTable& pt, Burst& b) {
  const Verdict* nv = c.verdict[unsigned(Table::nat)].data();
  const Verdict* sv = c.verdict[unsigned(Table::spd)].data();
  // A stateless rule set after a pass that attached no packet to a
  // connection: no packet is of a connection, none is to be committed or
  // translated.
  if (c.stateless && w.ct_none) return;
  const bool no_snat = !c.ctx && NatAction(nv[0].action) != NatAction::masquerade &&
                       NatAction(nv[0].action) != NatAction::snat;
  uint16_t kept = 0;
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    if (md.conn) {
      if (!(md.ct & kCtRelated)) nat_src_half(l3_of(m), l3_len(m), ct.conn(ct_ref_index(md.conn)), ct_ref_dir(md.conn));
      b.pkts[kept++] = m;
      continue;
    }
    // Without rules and with a default that translates nothing, only a
    // commit or a DNAT leaves work: the rest is the stateless accept below.
    if (no_snat && !(md.ct & (kCtCommit | kCtDnat))) {
      b.pkts[kept++] = m;
      continue;
    }
    const Verdict& v = nv[rule_of(c, md, Table::nat)];
    NatAction a = NatAction(v.action);
    // The SPD wins over NAT: what goes into a tunnel keeps its addresses.
    bool to_tunnel = md.out_tunnel != kNoTunnel || SpdAction(sv[rule_of(c, md, Table::spd)].action) == SpdAction::protect;
    bool snat = (a == NatAction::masquerade || a == NatAction::snat) && !to_tunnel && md.out_port != kNoPort;
    if (!(md.ct & (kCtCommit | kCtDnat)) && !snat) {
      b.pkts[kept++] = m;  // stateless accept, nothing to remember
      continue;
    }
    if (md.ct & kCtNoTrack) {
      // A later fragment (or an untracked ICMP type) cannot be translated
      // without reassembly; passing it would leak the inside address.
      if (snat || (md.ct & kCtDnat)) w.drop(m, Drop::nat_fragment);
      else b.pkts[kept++] = m;
      continue;
    }
    uint8_t* l3 = l3_of(m);
    uint16_t len = l3_len(m);
    CtKey cur;
    ct_tuple(l3, len, cur);
    uint32_t flags = 0;
    if (cur.proto == IPPROTO_TCP) {
      uint8_t f = tcp_flags(l3, len);
      // Only a SYN opens a connection: a stray ACK must not create state
      // that would let the other side's packets in.
      if ((f & (RTE_TCP_SYN_FLAG | RTE_TCP_ACK_FLAG | RTE_TCP_RST_FLAG | RTE_TCP_FIN_FLAG)) != RTE_TCP_SYN_FLAG) {
        w.drop(m, Drop::ct_not_syn);
        continue;
      }
      flags = ct::kSynOrig;
    }
    CtKey orig = cur;
    if (md.ct & kCtDnat) {
      orig.dst = md.orig_dst;
      orig.dport = md.orig_dport;
    }
    // The conntrack stage looked the whole burst up before any insert: a
    // second packet of a new flow in the same burst (or one another worker
    // just committed) finds its connection here and follows it.
    {
      const CtKey* kp = &orig;
      uint32_t ref = 0;
      ct.lookup(&kp, 1, &ref);
      if (ref) {
        md.conn = ref;
        nat_src_half(l3, len, ct.conn(ct_ref_index(ref)), ct_ref_dir(ref));
        b.pkts[kept++] = m;
        continue;
      }
    }
    CtKey out = cur;  // how this packet leaves
    uint8_t natf = (md.ct & kCtDnat) ? kNatDst : 0;
    if (snat) {
      if (a == NatAction::masquerade) {
        uint32_t addr = pt.port[md.out_port].addr;
        if (!addr) {
          w.drop(m, Drop::nat_no_address);
          continue;
        }
        out.src = rte_cpu_to_be_32(addr);
      } else {
        // Paired pooling (RFC 4787 REQ-2): an inside host always gets the
        // same pool address.
        uint32_t size = v.b - v.a + 1;
        out.src = rte_cpu_to_be_32(v.a + (size ? rte_be_to_cpu_32(cur.src) * 2654435761u % size : 0));
      }
      natf |= kNatSrc;
      bool ported = out.proto == IPPROTO_TCP || out.proto == IPPROTO_UDP || out.proto == IPPROTO_ICMP;
      if (ported ? !pick_port(ct, w.id, out, out.sport) : ct.taken(reversed(out))) {
        w.drop(m, Drop::nat_no_port);
        continue;
      }
    }
    bool full = false;
    uint32_t ref = ct.insert(orig, reversed(out), natf, flags, w.id, w.now_tsc, &full);
    if (!ref) {
      w.drop(m, full ? Drop::ct_full : Drop::nat_no_port);
      continue;
    }
    w.stats.ct_new.add();
    md.conn = ref;
    nat_src_half(l3, len, ct.conn(ct_ref_index(ref)), 0);
    b.pkts[kept++] = m;
  }
  b.n = kept;
}

void nat_undo_dst(rte_mbuf* m) {
  PktMeta& md = meta(m);
  if (!(md.ct & (kCtDnat | kCtDstXlated))) return;
  nat_rewrite(l3_of(m), l3_len(m), false, md.orig_dst, md.orig_dport);
  md.ct &= uint8_t(~(kCtDnat | kCtDstXlated));
}

void send_tcp_reset(Worker& w, const PortTable& pt, rte_mbuf* m, Drop why) {
  PktMeta& md = meta(m);
  w.stats.drops[static_cast<unsigned>(why)].add();
  if (md.generated || md.in_port >= kMaxPorts) { rte_pktmbuf_free(m); return; }
  nat_undo_dst(m);
  const uint8_t* l3 = l3_of(m);
  auto* ip = reinterpret_cast<const rte_ipv4_hdr*>(l3);
  if (ip->fragment_offset & rte_cpu_to_be_16(RTE_IPV4_HDR_OFFSET_MASK)) { rte_pktmbuf_free(m); return; }
  // Resets share the ICMP errors' per-source budget: both are answers an
  // attacker can make us send.
  if (!w.icmp_limiter.allow(rte_be_to_cpu_32(ip->src_addr), w.now_tsc)) {
    w.stats.drops[static_cast<unsigned>(Drop::icmp_rate_limited)].add();
    rte_pktmbuf_free(m);
    return;
  }
  if (!tcp_reset_in_place(m, md.l3_off)) { rte_pktmbuf_free(m); return; }
  md.generated = 1;
  w.stats.rst_sent.add();
  w.generated.push(m);
}

}  // namespace moat
