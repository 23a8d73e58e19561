#pragma once
// Helpers shared by the egress stage and the control thread (which completes
// held packets and builds ARP frames with the same Ethernet logic).
#include <rte_ether.h>
#include <rte_mbuf.h>

#include "dataplane/tables.hh"

namespace moat {

struct Worker;

// Rewrites the link header in front of the L3 header at meta(m).l3_off for
// egress on `out` (adding or removing the 802.1Q tag as the port needs).
bool write_l2(rte_mbuf* m, const PortInfo& out, const rte_ether_addr& dst, uint16_t ethertype);

void tx_enqueue(Worker& w, uint16_t port, rte_mbuf* m);

}  // namespace moat
