#pragma once
// A worker: one poll-mode lcore running packets to completion.
// Owner: its lcore. The control thread reads `stats` (relaxed counters) and
// writes nothing here after start except through the inject ring.
#include <rte_ring.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "dataplane/conntrack.hh"
#include "dataplane/drop.hh"
#include "dataplane/icmp.hh"
#include "dataplane/packet.hh"
#include "dataplane/tables.hh"

struct rte_mempool;

namespace moat {

struct EspWorker;
namespace qos { class Scheduler; }

struct RxQueue {
  uint16_t port;
  uint16_t queue;
};

struct alignas(64) WorkerStats {
  Counter rx, tx, punted, injected, icmp_sent, fragments, classified;
  Counter ct_new, ct_hit, rst_sent;  // connections created, packets of known connections, TCP resets sent
  Counter drops[kDropCount];
};

struct TxBuffer {
  static constexpr uint16_t kSize = 2 * kMaxBurst;
  rte_mbuf* pkts[kSize];
  uint16_t n = 0;
};

struct Worker {
  unsigned id = 0;     // RCU thread id and tx queue index on every port
  unsigned lcore = 0;
  std::vector<RxQueue> rxq;
  uint16_t burst = 32;
  uint32_t idle_sleep_us = 0;
  rte_ring* punt_ring = nullptr;    // to the control thread (multi-producer)
  rte_ring* inject_ring = nullptr;  // from the control thread (single consumer: us)
  rte_mempool* direct_pool = nullptr;
  rte_mempool* indirect_pool = nullptr;
  EspWorker* esp = nullptr;  // this worker's IPsec-MB manager and reassembly table
  const std::atomic<bool>* stop = nullptr;

  WorkerStats stats;
  IcmpLimiter icmp_limiter;
  uint64_t now_tsc = 0;   // sampled once per loop iteration
  Burst generated;        // echo replies and ICMP errors awaiting routing
  Burst local;            // packets for our own addresses
  Burst punt;             // to the control thread, flushed once per burst
  TxBuffer tx[kMaxPorts];
  // The schedulers this worker drives (it owns those ports' shaping), as it
  // last saw them: a different one in Tables::qos is a new plan to adopt.
  qos::Scheduler* shaper[kMaxPorts] = {};
  // The QosTable generation this worker has fully taken over (adopted the
  // old queues, holds no pointer into older tables): the control thread
  // frees an old table only when every worker shows the new generation.
  std::atomic<uint64_t> qos_gen{0};
  // The way out of outer (ESP) packets by destination: what route and the
  // neighbour table answered, kept while Tables::path_gen is unchanged
  // (egress_outer). A tunnel's packets all go to its peer, so one entry
  // serves a whole SA; direct-mapped, a collision only costs a lookup.
  struct OuterPath {
    uint32_t gen = 0;  // Tables::path_gen when learnt (0: never)
    uint32_t dst = 0;  // outer destination, host order
    uint64_t way = 0;  // pack_mac(neighbour) | egress port << 56
  };
  static constexpr unsigned kOuterPathBits = 10;
  OuterPath outer_path[1u << kOuterPathBits];

  // What the last conntrack pass (track() in worker.cc) left for the policy
  // stages of its burst: whether it marked the packets (false: skipped under
  // a stateless rule set with an empty table) and whether it attached none
  // of them to a connection.
  bool ct_marked = true;
  bool ct_none = false;

  void drop(rte_mbuf* m, Drop why) {
    stats.drops[static_cast<unsigned>(why)].add();
    rte_pktmbuf_free(m);
  }
};

// Stages, in the order the worker loop calls them. Each takes a burst, keeps
// the packets it passes on in order, and drops only through Worker::drop.
void parse(Worker& w, const PortTable& pt, Burst& b);                // L2/L3 validation
void route(Worker& w, const Tables& t, const PortTable& pt, Burst& b);  // LPM, TTL
// One rte_acl lookup for the routed burst and the packets for us together.
void classify(Worker& w, const Classifier& c, const PortTable& pt, Burst& transit, Burst& local);
// Stateful firewall and NAPT44 (dataplane/stateful.cc, dataplane/conntrack.hh):
// before route, packets of known connections are marked and their
// destination translated; after classify, DNAT for new connections (routed
// and classified again); after the filter, new connections are committed
// and sources translated.
void conntrack(Worker& w, Conntrack& ct, Burst& b);
// What conntrack marks on an empty table: no connection; kCtNoTrack for what
// could not be tracked.
void conntrack_mark_untracked(Burst& b);
// The conntrack stage as the worker runs it: skipped without a rule set, and
// under a stateless one while the table is empty (Classifier::stateless).
void track(Worker& w, const Tables& t, Burst& b);
void dnat(Worker& w, const Tables& t, const Classifier& c, const PortTable& pt, Burst& b);
// Packets of known connections pass; accept/drop/reject for the rest.
void filter(Worker& w, const Classifier& c, const PortTable& pt, Burst& b);
void nat(Worker& w, Conntrack& ct, const Classifier& c, const PortTable& pt, Burst& b);
void qos_mark(Worker& w, const Classifier& c, Burst& b);                      // DSCP rewrite
// The rule a packet matched in table `t` (0: the table's default). Without
// rules classify writes nothing: every packet has the defaults, whatever
// its metadata holds (the pass that wrote the zeros cost about 7 ns per
// packet, docs/PERFORMANCE.md).
inline uint32_t rule_of(const Classifier& c, const PktMeta& md, Table t) {
  return c.ctx ? md.rule[unsigned(t)] : 0;
}
// The SAD this worker seals and opens with; null when it has no ESP state
// (every packet for a tunnel is then tunnel_down).
inline const Sad* worker_sad(const Worker& w, const Tables& t) { return w.esp ? t.sad : nullptr; }
// Moves packets the SPD protects (or the route sends into a tunnel) to
// `to_tunnel`, each with its tunnel's outbound SA in md.sa (kNoSa: none, or
// `sad` null: no ESP here); drops what it discards. `c` may be null (no policy).
void spd(Worker& w, const Classifier* c, const Sad* sad, Burst& b, Burst& to_tunnel);
// ESP outbound for packets bound to a tunnel (md.sa as spd sets it): inner
// fragmentation, encryption, then egress of the outer packets.
void tunnel_out(Worker& w, const Tables& t, const PortTable& pt, Burst& b);
// Moves the ESP (and UDP 4500) packets for us out of `local`, decrypts them
// and leaves the inner packets, from their tunnel's zone, in `inner`.
void tunnel_in(Worker& w, const Tables& t, Burst& local, Burst& inner);
void local_deliver(Worker& w, const Tables& t, const PortTable& pt, Burst& b);
void egress(Worker& w, const Tables& t, const PortTable& pt, Burst& b);  // ARP, MTU, L2
// route + egress for packets this worker generated (ESP outer packets): the
// destinations it has already resolved skip both lookups.
void egress_outer(Worker& w, const Tables& t, const PortTable& pt, Burst& b);
void tx_flush(Worker& w);
void punt_flush(Worker& w);

// Hands an ICMP error for `m` to the generated burst, or drops `m` with `why`
// when RFC 1812 or the rate limit says no error may be sent.
void send_icmp_error(Worker& w, const PortTable& pt, rte_mbuf* m, Drop why, uint8_t type,
                     uint8_t code, uint16_t mtu = 0);

// Gives a packet back the destination it arrived with when the conntrack
// or dnat stage translated it, so an answer about it (ICMP error, RST)
// quotes and names what its sender knows.
void nat_undo_dst(rte_mbuf* m);

// Answers a refused TCP segment with a RST (filter action reject), or drops
// it when it may not be answered; counts `why` either way.
void send_tcp_reset(Worker& w, const PortTable& pt, rte_mbuf* m, Drop why);

// The policy stages, classify to spd, over a routed burst and the packets
// for us (`local`); protected packets leave through tunnel_out.
void policy(Worker& w, const Tables& t, const PortTable& pt, Burst& b, Burst& local);

// Processes one received (or injected-for-routing) burst to the tx buffers.
void process_burst(Worker& w, const Tables& t, Burst& b);

// The lcore entry point (rte_eal_remote_launch); returns when *stop is set.
int worker_main(void* worker);

// The tables every worker reads; set once by the control thread before launch.
extern Tables* g_tables;

}  // namespace moat
