#pragma once
// ESP tunnel mode on the fast path (RFC 4303, RFC 3948 NAT-T, RFC 6040 ECN).
//
// Stages, in the order a worker calls them:
//   outbound (SPD said protect, meta.sa = the tunnel's outbound SA or kNoSa):
//     esp_mtu       admission (a tunnel without SA, a dead or expired SA, no
//                   room for the encapsulation: counted drops); clamp-mss on
//                   TCP SYNs; inner packets above the SA's max_inner:
//                   honor-df → ICMP frag-needed, else fragment-inner.
//                   Moves packets from `in` to `out`; stops early when the
//                   fragments would not fit `out` (call again while in.n).
//     esp_outbound  tunnel-mode encapsulation + encryption, in place. Survivors
//                   are outer IPv4 packets (meta.l3_off = 14, generated = 1)
//                   for route → egress.
//   inbound (packets to one of our addresses for which esp_to_us() is true):
//     esp_inbound   NAT-T demux (IKE → punt ring, keepalives consumed), outer
//                   reassembly, SPI lookup, anti-replay, decryption, trailer
//                   and inner checks, funnel check, ECN decapsulation, inner
//                   reassembly (a datagram's fragments decrypted back to back
//                   are joined directly, anything else goes through
//                   rte_ip_frag's table). Survivors are inner IPv4 packets (meta reset,
//                   l3_off = 14, in_port kept, sa = inbound SA, in_tunnel = its
//                   tunnel) to classify and route like any received packet.
//   once per loop iteration: esp_housekeeping (fragment timeouts, death row).
//
// Crypto: Intel IPsec-MB on one IMB_MGR per worker. AES-GCM goes through
// the library's direct GCM calls, packet by packet (a GCM job completes on
// submit anyway, so the job manager only added work: +8 % at 64 B, PERFORMANCE.md).
// CBC + HMAC and ChaCha20-Poly1305 use the job API: a burst is
// submitted job by job and flushed once, so the multi-buffer lanes fill across
// the burst; completions come back in submission order and a burst may mix
// SAs and ciphers. Why not librte_ipsec with the aesni_mb cryptodev: each
// burst would also cross a cryptodev queue (an rte_crypto_op per packet) for
// work the same library does synchronously here. The generic burst API
// (IMB_SUBMIT_BURST) is the close alternative; bench_esp measures both
// (docs/ARCHITECTURE.md "ESP crypto", docs/PERFORMANCE.md).
//
// Thread: each EspWorker belongs to one worker lcore. Per packet: no
// allocation (mbufs aside), no lock, no log.
#include <intel-ipsec-mb.h>
#include <rte_ip_frag.h>
#include <rte_mbuf.h>
#include <tl/expected.hpp>

#include <string>

#include "dataplane/packet.hh"
#include "dataplane/sa.hh"

namespace moat {

struct Worker;
struct PortTable;

inline constexpr uint16_t kNatTPort = 4500;

struct EspStats {
  Counter encrypted, decrypted;
  Counter inner_fragments;  // fragments made by fragment-inner
  Counter mss_clamped;
  Counter ike_punted;       // UDP 4500 with the non-ESP marker
  Counter outer_reassembled, inner_reassembled, frag_held;
  Counter inner_joined;     // of inner_reassembled: joined back to back, without the table
  Counter unknown_spi_events, events_lost;
};

// Unknown SPIs, counted per outer source (hashed into a fixed table: two
// sources sharing a slot take turns). Read by the control thread.
struct UnknownSpi {
  uint32_t src = 0;
  uint32_t spi = 0;
  Counter count;
  uint64_t last_event_tsc = 0;
};

struct EspWorker {
  IMB_MGR* mb = nullptr;
  IMB_ARCH arch = IMB_ARCH_NONE;
  rte_ip_frag_tbl* frag = nullptr;  // outer and inner reassembly, bounded
  rte_ip_frag_death_row death_row{};
  uint64_t frag_timeout_tsc = 0;    // the table's max_cycles
  // When a fragment key last went into the table (w.now_tsc; 0: never),
  // hashed: the back-to-back join (esp.cc, FragRun) takes a datagram only
  // while no live table entry can hold fragments of its key. Two keys in one
  // slot only send more datagrams through the table.
  static constexpr unsigned kFedSlots = 1024;
  uint64_t frag_fed_tsc[kFedSlots] = {};
  uint64_t unknown_event_gap_tsc = 0;  // at most one unknown-SPI event per source slot per gap
  uint16_t ip_id = 0;
  static constexpr unsigned kUnknownSlots = 256;
  UnknownSpi unknown[kUnknownSlots];
  EspStats stats;

  // Per-job scratch for one burst: nonce, AAD, computed tag, saved ICV.
  struct alignas(64) Scratch {
    uint8_t iv[16];
    uint8_t aad[16];
    uint8_t tag[16];
    uint8_t icv[16];
  };
  Scratch scratch[kMaxBurst];

  // esp_mtu → esp_outbound: the SA's peer word (Sa::peer) each packet was
  // sized for, by its place in the burst esp_mtu fills. esp_outbound builds
  // the outer headers from that same word, so a set_peer between the two
  // stages cannot give a packet sized for plain ESP a UDP header (8 bytes
  // over the MTU) or mix old and new fields. An entry also says esp_mtu
  // admitted the packet (live SA, one segment, room for the encapsulation),
  // so esp_outbound does not check it again. It counts only for the packet
  // it names at that place and is used once; without one (esp_outbound
  // called alone) esp_outbound checks the packet and loads the word itself.
  // esp_mtu's output goes to esp_outbound before the next esp_mtu
  // (worker.cc tunnel_out).
  struct Sized {
    rte_mbuf* m;
    uint32_t sa;
    uint64_t peer;
  };
  Sized sized[kMaxBurst] = {};
};

struct EspWorkerConfig {
  uint32_t frag_flows = 4096;     // packets being reassembled at once (per worker)
  uint32_t frag_timeout_ms = 2000;
  uint32_t unknown_spi_event_ms = 1000;
};

// `name` makes the DPDK object names unique ("w0").
tl::expected<void, std::string> esp_worker_init(EspWorker& ew, const std::string& name,
                                                const EspWorkerConfig& c = {});
void esp_worker_fini(EspWorker& ew);

// True for what esp_inbound takes: IPv4 protocol 50, or UDP to port 4500.
// `m` is parsed (meta.l3_off) and addressed to us.
bool esp_to_us(rte_mbuf* m);

void esp_mtu(Worker& w, EspWorker& ew, const Sad& sad, const PortTable& pt, Burst& in, Burst& out);
void esp_outbound(Worker& w, EspWorker& ew, const Sad& sad, Burst& b);
void esp_inbound(Worker& w, EspWorker& ew, const Sad& sad, Burst& b);
void esp_housekeeping(Worker& w, EspWorker& ew);

// RFC 6040 §4.1 normal mode: the outer ECN field for an inner one.
inline uint8_t ecn_encap(uint8_t inner_ecn) { return inner_ecn == 3 ? 2 : inner_ecn; }
// RFC 6040 §4.2: the inner ECN field after decapsulation; -1: drop.
inline int ecn_decap(uint8_t outer_ecn, uint8_t inner_ecn) {
  if (outer_ecn == 3) return inner_ecn == 0 ? -1 : 3;
  if (outer_ecn == 1 && inner_ecn == 2) return 1;
  return inner_ecn;
}

}  // namespace moat
