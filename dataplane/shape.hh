#pragma once
// Egress shaping (issue 7): which class a packet leaves in, and the hand-off
// to the port's scheduler (qos/htb.hh). Ingress policing (rte_meter trTCM)
// per class, before encryption.
//
// Ownership: the control thread builds a QosTable (plans, class maps,
// meter profiles) and publishes it whole through Tables::qos; it is freed
// after an RCU grace period. Each shaped port's Scheduler is driven by one
// worker, its owner: other workers hand their packets for that port over
// through the port's multi-producer ring, so the scheduler needs no lock. A
// new plan comes as a new Scheduler; the owner moves the queued packets into
// it (Scheduler::adopt) the first time it sees the new table; the old one is
// freed after two grace periods (one only guarantees a quiescent state after
// the swap, not a loop that saw the new table: Control::install_qos).
#include <rte_meter.h>
#include <rte_ring.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "dataplane/packet.hh"
#include "dataplane/tables.hh"
#include "qos/htb.hh"

namespace moat {

struct Worker;

inline constexpr uint32_t kNoLeaf = 0xffffffff;

// One shaped egress port.
struct ShapedPort {
  std::unique_ptr<qos::Scheduler> sched;
  unsigned owner = 0;          // worker id that drives `sched`
  rte_ring* handoff = nullptr;  // other workers -> owner; kept by the control thread across plans
  // The leaf of a packet: by its classifier class (PktMeta::cls, 0 = the
  // class `default`), or for class default by the DSCP it carries, else
  // `default_leaf`. Packets of a tunnel with a subtree here (the portal's
  // moats) use that subtree's leaves: tunnel_leaf[tunnel * ncls + cls].
  uint16_t ncls = 1;
  std::vector<uint32_t> by_class;    // ncls entries; kNoLeaf: look at the DSCP
  uint16_t dscp_cls[64] = {};        // DSCP -> class (0: none)
  uint32_t default_leaf = 0;  // kNoLeaf: no leaf at the top (HTB's direct queue: unshaped)
  std::vector<uint32_t> tunnel_leaf;  // empty: no moat subtrees on this port
  uint16_t ntunnels = 0;
  // Shaping removed from this port: the owner lets the old queues leave
  // unshaped; egress sends straight to the port.
  bool drain = false;
};

// Ingress policing of one classifier class: a two-rate three-colour meter
// (RFC 2698). Each worker meters its own packets with an equal share of the
// configured rates (documented in docs/CONFIGURATION.md).
struct Policer {
  bool on = false;
  rte_meter_trtcm_profile profile{};
  bool yellow_drop = false;
  uint8_t yellow_dscp = 0xff;  // 0xff: pass unchanged
};

struct QosTable {
  uint64_t generation = 0;
  std::unique_ptr<ShapedPort> port[kMaxPorts];
  std::vector<Policer> police;  // by classifier class; empty: no policing
  // Per worker, per class meter state: written only by that worker.
  std::vector<std::vector<rte_meter_trtcm>> meters;
};

// Packets of one egress burst ready to leave on shaped ports (their port in
// PktMeta::out_port), gathered so that each scheduler takes them as a burst.
struct ShapeBurst {
  const ShapedPort* sp[kMaxBurst];
  rte_mbuf* pkts[kMaxBurst];
  uint16_t n = 0;
};

// Stage shape (called by egress when its burst is done, or `b` is full):
// decides each packet's leaf and queues it, directly when this worker owns
// the port, else through the port's hand-off ring; empties `b`.
void shape_enqueue(Worker& w, ShapeBurst& b);
// The owner's turn, once per loop: adopts a new plan, takes the hand-off
// rings, and sends what the schedulers release now.
unsigned shape_run(Worker& w, const Tables& t);
// Policing after the qos rule table named the class (before encryption).
void police(Worker& w, const QosTable& q, Burst& b);

}  // namespace moat
