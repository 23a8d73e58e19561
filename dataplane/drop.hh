#pragma once
// Drop reasons: declared once. The same name is the enum value, the key in
// `moatctl show stats`, and what tests assert on. Adding a reason is one line.
#include <cstdint>

namespace moat {

#define MOAT_DROP_REASONS(X)                                                        \
  X(runt, "frame shorter than its Ethernet/802.1Q header")                          \
  X(not_for_us_l2, "unicast frame addressed to another MAC")                        \
  X(multicast_l2, "multicast frame (no multicast routing)")                         \
  X(vlan_unknown, "802.1Q tag the ingress port is not configured for")              \
  X(ethertype_unknown, "ethertype neither IPv4 nor ARP")                            \
  X(arp_malformed, "ARP frame that is not Ethernet/IPv4 or is truncated")           \
  X(ip_truncated, "frame shorter than the IPv4 header or its total length")         \
  X(ip_version, "IP version is not 4")                                              \
  X(ip_ihl, "IHL below 5 or beyond the packet")                                     \
  X(ip_checksum, "IPv4 header checksum is wrong")                                   \
  X(ip_options, "IPv4 options present (source routing et al. refused)")             \
  X(ip_martian, "source address is 0/8, 127/8, multicast or broadcast")             \
  X(broadcast_l3, "broadcast IPv4 that is not for a local service")                 \
  X(ttl_expired, "transit packet with TTL 0 or 1")                                  \
  X(no_route, "no route to the destination")                                        \
  X(unreachable_route, "route of type unreachable")                                 \
  X(prohibited_route, "route of type prohibit (admin-prohibited)")                  \
  X(blackhole_route, "route of type blackhole")                                     \
  X(frag_needed, "DF set and larger than the egress MTU")                           \
  X(frag_failed, "fragmentation of an oversized packet failed")                     \
  X(icmp_rate_limited, "ICMP error suppressed by the per-source rate limit")        \
  X(icmp_error_failed, "could not build an ICMP error")                             \
  X(icmp_bad, "ICMP to us truncated or with a bad checksum")                        \
  X(port_unreachable, "UDP/TCP to us with no punt path (answered with ICMP)")       \
  X(punt_full, "punt ring to the control thread is full")                           \
  X(tx_full, "transmit queue refused the packet")                                   \
  X(arp_hold_full, "neighbour resolution queue for this next hop is full")          \
  X(arp_table_full, "ARP cache full: no entry for a new next hop")          \
  X(arp_failed, "next hop did not answer ARP")                                      \
  X(arp_unsolicited, "ARP reply nobody asked for (not cached)")                     \
  X(arp_not_for_us, "ARP request for an address that is not ours")                  \
  X(punt_no_tap, "local packet but the punt path is disabled")                      \
  X(inject_bad, "packet from the control thread with an invalid port")             \
  X(filter_drop, "filter rule (or default) says drop")                              \
  X(filter_reject, "filter rule says reject (answered with TCP RST or ICMP admin-prohibited)") \
  X(ct_full, "connection table full: new connection refused (existing kept)")    \
  X(ct_not_syn, "TCP packet of no tracked connection that is not a SYN")           \
  X(nat_no_port, "NAT found no free port/identifier for a new connection")        \
  X(nat_fragment, "later fragment of a NATed flow (no reassembly: cannot translate)") \
  X(nat_no_address, "masquerade out of a port that has no address")                \
  X(spd_discard, "SPD rule says discard")                                           \
  X(tunnel_down, "tunnel has no outbound SA")                                      \
  X(esp_not_esp, "packet handed to ESP inbound that is neither ESP nor UDP 4500")   \
  X(esp_natt_keepalive, "NAT-T keepalive (RFC 3948 §2.3): consumed")               \
  X(esp_unknown_spi, "ESP for an SPI with no inbound SA")                           \
  X(esp_truncated, "ESP shorter than header + IV + ICV or not block-aligned")       \
  X(esp_replayed, "ESP sequence number already received (anti-replay)")             \
  X(esp_too_old, "ESP sequence number left of the replay window")                   \
  X(esp_bad_icv, "ESP integrity check failed (wrong key, forged or corrupted)")     \
  X(esp_bad_padding, "ESP pad length beyond the payload or padding not 1,2,3...")   \
  X(esp_bad_next_header, "ESP next header is not IPv4 (tunnel mode)")               \
  X(esp_dummy, "ESP dummy packet, next header 59 (RFC 4303 §2.6): consumed")        \
  X(esp_inner_malformed, "decrypted inner packet is not a valid IPv4 packet")       \
  X(esp_selector_mismatch, "inner packet outside its SA's funnels")                 \
  X(esp_ecn_drop, "outer CE on an inner Not-ECT packet (RFC 6040 §4.2)")            \
  X(esp_sa_expired, "SA hard lifetime reached or SA deleted")                       \
  X(esp_seq_overflow, "outbound sequence numbers exhausted (no ESN): rekey needed") \
  X(esp_no_sa, "packet to protect names no live outbound SA")                       \
  X(esp_no_room, "mbuf lacks room for ESP headers/trailer or cannot be linearized") \
  X(esp_crypto_failed, "IPsec-MB refused the job")                                  \
  X(esp_tunnel_frag_needed, "DF inner packet above the tunnel MTU (honor-df)")      \
  X(esp_frag_failed, "inner fragmentation failed (no mbufs)")                       \
  X(esp_reassembly_failed, "inner fragment dropped: table full, overlap or timeout") \
  X(qos_policed, "class meter (trTCM) says red, or yellow with drop")            \
  X(qos_queue_full, "the class's queue is at its limit (tail drop)")            \
  X(qos_aqm, "dropped by the class's AQM (CoDel) at dequeue")                   \
  X(qos_handoff_full, "hand-off ring to the port's scheduler owner is full")

enum class Drop : uint8_t {
#define MOAT_X(name, what) name,
  MOAT_DROP_REASONS(MOAT_X)
#undef MOAT_X
      count_
};

inline constexpr unsigned kDropCount = static_cast<unsigned>(Drop::count_);

inline constexpr const char* kDropNames[kDropCount] = {
#define MOAT_X(name, what) #name,
    MOAT_DROP_REASONS(MOAT_X)
#undef MOAT_X
};

inline constexpr const char* kDropWhat[kDropCount] = {
#define MOAT_X(name, what) what,
    MOAT_DROP_REASONS(MOAT_X)
#undef MOAT_X
};

}  // namespace moat
