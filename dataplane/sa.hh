#pragma once
// Security associations (RFC 4301 §4.4.2) and the SAD.
//
// Contract
//  - Owner: the control thread. It alone calls the Sad's control-side API
//    (add_sa, replace_outbound, delete_sa, set_peer, tick, reclaim, events).
//    Static SAs from the YAML config and SAs negotiated by IKE use the same
//    calls.
//  - Workers read through the inline lookups (inbound_sa, tunnel_sa, sa) with
//    no lock: SPI → SA index is an rte_hash with lock-free readers and its RCU
//    hook; tunnel → outbound SA index is one atomic word per tunnel.
//  - SA records live in one array allocated once and indexed by a stable
//    uint32_t SA index. Unlike the port table they are not copied and swapped:
//    sequence numbers, replay windows and counters are written by workers on
//    every packet, so a copy would lose or fork them. What changes is which
//    index an SPI or a tunnel names; a record is written completely before
//    its index is published and its slot is reused only after an RCU grace
//    period (rte_rcu_qsbr) following its removal, so a worker holding an index
//    from a moment ago still reads a whole, live record.
//  - Make-before-break: a rekey adds the new inbound and outbound SAs, then
//    replace_outbound() points the tunnel at the new outbound SA in one store;
//    the old inbound SA keeps accepting until the caller deletes it, so both
//    SPIs are accepted during the overlap and no packet is lost.
//  - Threads on the data path: an outbound SA may be used by any worker (its
//    sequence number is an atomic fetch-add, once per run of packets in a
//    burst; packet and byte counts go to the worker's own SaTraffic, see
//    there). An inbound SA's replay window
//    and loss counters are written by one worker at a time (RFC 4303 needs a
//    single window): RSS on the outer addresses or a hand-off must deliver an
//    inbound SA's packets to one worker, as with librte_ipsec.
//  - Units: addresses and ports host order; bytes are inner IPv4 bytes;
//    seconds of lifetime are counted by the control thread (tick()).
#include <intel-ipsec-mb.h>
#include <rte_hash.h>
#include <rte_rcu_qsbr.h>
#include <rte_ring.h>
#include <tl/expected.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace moat {

enum class Cipher : uint8_t {
  aes_gcm_128,         // RFC 4106, 16-byte ICV
  aes_gcm_256,         // RFC 4106, 16-byte ICV
  aes_cbc_128_sha256,  // RFC 3602 + RFC 4868 HMAC-SHA-256-128
  aes_cbc_256_sha256,
  chacha20_poly1305,   // RFC 7634
};
const char* cipher_name(Cipher c);
// Parses the names above with dashes ("aes-gcm-128", "chacha20-poly1305").
bool cipher_from_name(const std::string& s, Cipher& out);
// Key bytes a cipher wants: AEAD key + 4-byte salt; CBC key (the HMAC key is apart).
unsigned cipher_key_len(Cipher c);

enum class SaDir : uint8_t { inbound, outbound };

// Outer DF bit of the tunnel packets.
enum class OuterDf : uint8_t { clear, set, copy };

// What happens to an inner packet that does not fit the tunnel's MTU.
enum class MtuPolicy : uint8_t {
  fragment_inner,  // fragment the inner packet before encryption, DF or not (seed 000)
  honor_df,        // DF set: drop + ICMP fragmentation needed; DF clear: fragment-inner
};

// One local/remote prefix pair a tunnel carries, from our point of view:
// outbound inner packets go local → remote, inbound ones remote → local.
struct Funnel {
  uint32_t local = 0;
  uint32_t remote = 0;
  uint8_t local_plen = 0;
  uint8_t remote_plen = 0;
};
inline constexpr unsigned kMaxFunnels = 16;

struct Lifetime {
  uint64_t bytes = 0;    // 0: no limit
  uint64_t packets = 0;
  uint64_t seconds = 0;
};

// What the control thread (YAML or IKE) installs.
struct SaConfig {
  std::string name;  // for messages: "tunnel branch-17 out"
  uint32_t spi = 0;
  SaDir dir = SaDir::outbound;
  uint32_t tunnel = 0;  // the tunnel the SA belongs to (< Sad capacity)
  uint32_t local = 0;   // our outer address
  uint32_t peer = 0;    // the other end's outer address
  bool nat_t = false;   // ESP in UDP (RFC 3948); set_peer may switch it later
  uint16_t local_port = 4500;
  uint16_t peer_port = 4500;
  Cipher cipher = Cipher::aes_gcm_128;
  std::vector<uint8_t> key;       // AEAD: key || salt; CBC: AES key
  std::vector<uint8_t> auth_key;  // CBC: HMAC-SHA-256 key (32 bytes)
  bool esn = false;               // 64-bit sequence numbers (RFC 4303 §2.2.1)
  uint32_t replay_window = 1024;  // inbound, packets, multiple of 64, 64..kMaxReplayWindow
  Lifetime soft, hard;
  std::vector<Funnel> funnels;    // empty: any inner addresses
  OuterDf df = OuterDf::clear;
  uint8_t ttl = 64;               // outer TTL
  uint16_t mtu = 1500;            // largest outer IPv4 packet the path carries
  MtuPolicy mtu_policy = MtuPolicy::fragment_inner;
  bool clamp_mss = false;         // rewrite TCP SYN MSS to fit the tunnel
};

inline constexpr unsigned kReplayWords = 32;
inline constexpr uint32_t kMaxReplayWindow = (kReplayWords - 1) * 64;  // 1984

// Things the data path tells the control thread (rte_ring of 16-byte elements).
enum class SaEventKind : uint8_t {
  soft_bytes = 1, soft_packets, soft_seconds,
  hard_bytes, hard_packets, hard_seconds,
  seq_overflow,  // outbound sequence number space exhausted (no ESN)
  unknown_spi,   // ESP for an SPI we do not know (rate-limited per source)
};
const char* sa_event_name(SaEventKind k);

struct SaEvent {
  uint32_t sa;    // SA index (unknown_spi: kNoSa)
  uint32_t spi;
  uint32_t addr;  // unknown_spi: the outer source; else the SA's peer
  SaEventKind kind;
  uint8_t pad_[3];
};
static_assert(sizeof(SaEvent) == 16);

inline constexpr uint32_t kNoSa = 0xffffffff;

// Per-SA state. One 64-byte line is read for every packet (parameters), one
// is written (sequence, last use, inbound loss counters); inbound SAs touch
// one or two words of the replay bitmap; funnels are read only on inbound
// after decryption. Packet and byte counts are per worker (SaTraffic).
struct alignas(64) Sa {
  // ---- line 0: written before publication, then read-only (peer aside) ----
  uint32_t spi;
  uint32_t tunnel;
  std::atomic<uint32_t> local;  // set_local may change it (MOBIKE: our address moved)
  uint16_t local_port;
  uint16_t mtu;
  // The peer word: udp_encap << 48 | addr << 16 | port (peer_word()).
  // set_peer changes all three in one store; a worker loads it once per
  // packet and takes the outer addresses, the UDP header (or none) and the
  // MTU arithmetic (max_inner[udp]) from that one load.
  std::atomic<uint64_t> peer;
  uint8_t salt[4];
  uint8_t cbc_nonce[8];   // CBC IV generation, see esp.cc
  SaDir dir;
  Cipher cipher;
  uint8_t esn;
  uint8_t clamp_mss;
  OuterDf df;
  MtuPolicy mtu_policy;
  uint8_t ttl;
  uint8_t iv_len;         // 8 (AEAD) or 16 (CBC)
  uint8_t align;          // payload+trailer alignment: 4 (AEAD) or 16 (CBC)
  uint8_t n_funnels;
  uint8_t pad0_[2];
  // Largest inner IPv4 packet that fits mtu in one ESP packet: [0] plain
  // ESP, [1] ESP in UDP (8 bytes of UDP header less, then the alignment).
  // Index by the peer word's flag; the clamp-mss value is max_inner[u] - 40.
  uint16_t max_inner[2];
  uint16_t pad1_[2];
  uint32_t window;        // replay window, packets
  std::atomic<uint32_t> state;  // kSaLive | kSa* flags (events posted once)

  // ---- line 1: written per packet ----
  alignas(64) uint64_t seq;  // outbound: last sequence number sent; inbound: highest authenticated (T)
  uint64_t last_tsc;    // TSC of the last packet (either direction; outbound: written with seq)
  uint64_t gaps;        // inbound: sequence numbers skipped when T advanced
  uint64_t late;        // inbound: accepted below T (reordered, filled a gap)
  uint64_t dups;        // inbound: duplicates refused
  uint64_t auth_fail;   // inbound: bad ICV

  // ---- lifetimes (read per packet, rarely hit) ----
  // (alignas on the first member only: on a list it would align every one)
  alignas(64) uint64_t soft_bytes;
  uint64_t soft_packets;
  uint64_t hard_bytes;
  uint64_t hard_packets;
  uint64_t created_s;   // control thread's clock, for seconds lifetimes
  uint64_t soft_seconds;
  uint64_t hard_seconds;

  // ---- inbound replay bitmap: bit s % (64*kReplayWords) for sequence s ----
  alignas(64) uint64_t bitmap[kReplayWords];

  Funnel funnels[kMaxFunnels];
};

static_assert(offsetof(Sa, seq) == 64, "Sa line 0 is one cache line");

// The peer word (Sa::peer): one 64-bit value so a packet never mixes an old
// and a new address, port or encapsulation.
inline constexpr uint64_t kPeerUdp = 1ull << 48;  // ESP in UDP (RFC 3948)
inline constexpr uint64_t peer_word(uint32_t addr, uint16_t port, bool udp_encap) {
  return (udp_encap ? kPeerUdp : 0) | uint64_t(addr) << 16 | port;
}
inline constexpr uint32_t peer_addr(uint64_t w) { return uint32_t(w >> 16); }
inline constexpr uint16_t peer_port(uint64_t w) { return uint16_t(w); }
inline constexpr unsigned peer_udp(uint64_t w) { return unsigned(w >> 48) & 1; }

// State flags.
inline constexpr uint32_t kSaLive = 1u << 0;      // data path may use it (until reclaimed)
inline constexpr uint32_t kSaSoftPosted = 1u << 1;
inline constexpr uint32_t kSaHardPosted = 1u << 2;  // also: the SA refuses packets
inline constexpr uint32_t kSaDeleted = 1u << 3;   // deleted/replaced: no new lookups find it

// Precomputed IPsec-MB key schedules, apart from Sa so parameters and
// counters stay on few lines; ~1 KB for GCM (AVX-512 GHASH tables).
struct alignas(64) SaKeys {
  union {
    gcm_key_data gcm;
    struct {
      alignas(16) uint8_t enc[16 * 15];
      alignas(16) uint8_t dec[16 * 15];
      alignas(16) uint8_t ipad[32];  // SHA-256 state after (key ^ ipad)
      alignas(16) uint8_t opad[32];  // SHA-256 state after (key ^ opad)
    } cbc;
    alignas(16) uint8_t chacha[32];
  };
};

// Packets and inner bytes one worker sent or received on one SA. Each worker
// has its own array of these (Sad::traffic), written only by it with plain
// relaxed stores and summed by whoever reads (stats(), the lifetime check):
// two workers sharing an outbound SA used to add to one line four times per
// burst each (sequence, packets, bytes, last use), and the line went back
// and forth between their caches. 16 bytes per SA per worker: 10,000 SAs and
// 8 workers take 1.25 MB beside the SAs' own ~2.3 KB each (Sa, SaKeys, SaDrops).
struct SaTraffic {
  uint64_t packets;
  uint64_t bytes;
};
static_assert(sizeof(SaTraffic) == 16);

// Per-SA drop counters by reason: cold, touched only when a packet drops.
struct SaDrops {
  uint64_t n[80];  // every Drop reason (checked in sa.cc)
};

// Replay window (RFC 4303 §3.4.3 and Appendix A2). The check runs before
// decryption; the update after authentication re-checks, so two copies of
// one packet in the same burst cannot both pass.
enum class Replay : uint8_t { ok, replayed, too_old };
// Relaxed add for counters with one writer per SA (inbound) or several (outbound).
inline void sa_add(uint64_t& c, uint64_t n) { __atomic_fetch_add(&c, n, __ATOMIC_RELAXED); }
inline uint64_t sa_load(const uint64_t& c) { return __atomic_load_n(&c, __ATOMIC_RELAXED); }
// For counters of inbound SAs, which have one writer: no locked instruction.
inline void sa_bump(uint64_t& c, uint64_t n) { __atomic_store_n(&c, c + n, __ATOMIC_RELAXED); }

// The window's functions are inline: three calls per received packet into
// another file cost more than the few compares they make (64-byte inbound).

// The full 64-bit sequence number of a received packet (Appendix A2.2);
// without ESN, the 32 bits as they are.
inline uint64_t replay_seq64(const Sa& sa, uint32_t seql) {
  if (!sa.esn) return seql;
  uint64_t t = sa.seq;
  uint32_t tl = uint32_t(t), th = uint32_t(t >> 32);
  uint32_t w = sa.window;
  uint32_t seqh;
  // A2.2: which 2^32 subspace the packet belongs to, judged from T and W.
  if (tl >= w - 1) {
    seqh = seql >= tl - w + 1 ? th : th + 1;
  } else {
    seqh = seql >= tl - w + 1 ? th - 1 : th;  // tl - w + 1 wraps on purpose
  }
  if (th == 0 && seqh == 0xffffffff) return 0;  // "before" the first subspace: invalid
  return uint64_t(seqh) << 32 | seql;
}

inline constexpr uint64_t kReplayBits = 64 * kReplayWords;

inline Replay replay_check(const Sa& sa, uint64_t seq) {
  if (seq == 0) return Replay::too_old;  // sequence numbers start at 1
  uint64_t t = sa.seq;
  if (seq > t) return Replay::ok;
  if (t - seq >= sa.window) return Replay::too_old;
  uint64_t word = sa.bitmap[(seq / 64) % kReplayWords];
  return (word >> (seq % 64)) & 1 ? Replay::replayed : Replay::ok;
}

// Records an authenticated sequence number; updates the loss counters.
inline Replay replay_update(Sa& sa, uint64_t seq) {
  Replay r = replay_check(sa, seq);
  if (r != Replay::ok) return r;
  uint64_t t = sa.seq;
  if (seq > t) {
    // Clear the words between the old top and the new one: they now hold
    // sequence numbers not yet seen. The ring has one word more than the
    // largest window needs, so live bits are never cleared.
    uint64_t tw = t / 64, sw = seq / 64;
    if (sw - tw >= kReplayWords) {
      std::memset(sa.bitmap, 0, sizeof(sa.bitmap));
    } else {
      for (uint64_t wi = tw + 1; wi <= sw; wi++) sa.bitmap[wi % kReplayWords] = 0;
    }
    if (t && seq > t + 1) sa_bump(sa.gaps, seq - t - 1);
    __atomic_store_n(&sa.seq, seq, __ATOMIC_RELAXED);
  } else {
    sa_bump(sa.late, 1);
  }
  sa.bitmap[(seq / 64) % kReplayWords] |= uint64_t(1) << (seq % 64);
  static_assert(kReplayBits >= kMaxReplayWindow + 64);
  return Replay::ok;
}

// A snapshot of one SA for views (moatctl show tunnels) and tests.
struct SaStats {
  uint32_t index, spi, tunnel, peer;
  uint16_t peer_port;
  bool udp_encap;
  SaDir dir;
  Cipher cipher;
  uint32_t state;
  uint64_t seq, packets, bytes, last_tsc, gaps, late, dups, auth_fail;
  uint64_t drops_total;
  // (gaps - late) / (packets + gaps - late): sequence numbers never seen.
  double loss_estimate;
};

class Sad {
 public:
  // `capacity` SA slots (and tunnel ids 0..capacity-1). `qsbr` is the workers'
  // RCU variable. `name` makes DPDK object names unique. `workers`: worker
  // ids (Worker::id) run 0..workers-1, one SaTraffic array each.
  static tl::expected<Sad*, std::string> create(const std::string& name, uint32_t capacity,
                                                rte_rcu_qsbr* qsbr, unsigned workers = 1);
  ~Sad();
  Sad(const Sad&) = delete;
  Sad& operator=(const Sad&) = delete;

  // ---- control side ----
  // Validates and installs an SA; returns its index. Inbound: its SPI is
  // accepted from now on. Outbound: becomes the tunnel's SA if it has none
  // (otherwise replace_outbound() switches to it).
  tl::expected<uint32_t, std::string> add_sa(const SaConfig& c, uint64_t now_s = 0);
  // Points `tunnel` at outbound SA `sa` in one store and retires the previous
  // one (freed after a grace period). Returns the previous index or kNoSa.
  tl::expected<uint32_t, std::string> replace_outbound(uint32_t tunnel, uint32_t sa);
  // Stops using an SA (inbound: its SPI is refused from now on) and frees its
  // slot after a grace period.
  tl::expected<void, std::string> delete_sa(uint32_t sa);
  // Moves the peer (its outer address and UDP port) and turns ESP in UDP
  // (RFC 3948) on or off without losing a packet: each packet reads all
  // three in one atomic load (the peer word). Inbound SAs take ESP and ESP
  // in UDP either way; for them only the address and port matter (events).
  tl::expected<void, std::string> set_peer(uint32_t sa, uint32_t addr, uint16_t port, bool udp_encap);
  // Our outer address (the port's address changed and IKE moved the SA).
  tl::expected<void, std::string> set_local(uint32_t sa, uint32_t addr);
  // Seconds lifetimes: posts soft/hard events and expires SAs. Call ~1/s.
  void tick(uint64_t now_s);
  // Frees slots whose grace period is over. Call from the control loop.
  void reclaim();
  // Drains up to n events posted by workers and by tick().
  unsigned events(SaEvent* out, unsigned n);
  SaStats stats(uint32_t sa) const;
  const SaConfig* config(uint32_t sa) const;
  uint32_t live() const { return live_; }
  uint32_t capacity() const { return cap_; }

  // ---- data path (any worker, lock-free) ----
  Sa& sa(uint32_t i) const { return sas_[i]; }
  const SaKeys& keys(uint32_t i) const { return keys_[i]; }
  SaDrops& drops(uint32_t i) const { return drops_[i]; }
  // Worker `worker`'s counts on SA `i`: written only by that worker. Each
  // worker's array starts on its own cache line (no line is shared).
  SaTraffic& traffic(unsigned worker, uint32_t i) const {
    return traffic_[size_t(worker < workers_ ? worker : 0) * stride_ + i];
  }
  unsigned workers() const { return workers_; }
  // Outbound SA of a tunnel for the SPD stage, kNoSa when it has none.
  uint32_t tunnel_sa(uint32_t tunnel) const {
    return tunnel < cap_ ? tunnel_out_[tunnel].load(std::memory_order_acquire) : kNoSa;
  }
  rte_hash* spi_hash() const { return spi_; }
  rte_ring* event_ring() const { return events_; }
  // Bulk SPI lookup (network-order SPIs as keys): idx[i] = SA index or kNoSa.
  void lookup_spis(const uint32_t* spi_be, unsigned n, uint32_t* idx) const;

 private:
  Sad() = default;
  void retire(uint32_t sa);
  void post(const SaEvent& e);
  // Installed and not deleted or replaced: what the control side may act on.
  bool usable(uint32_t sa) const {
    if (sa >= cap_) return false;
    uint32_t st = sas_[sa].state.load();
    return (st & kSaLive) && !(st & kSaDeleted);
  }

  std::string name_;
  uint32_t cap_ = 0;
  uint32_t live_ = 0;
  rte_rcu_qsbr* qsbr_ = nullptr;
  Sa* sas_ = nullptr;
  SaKeys* keys_ = nullptr;
  SaDrops* drops_ = nullptr;
  SaTraffic* traffic_ = nullptr;  // workers_ arrays of stride_ entries
  unsigned workers_ = 1;
  size_t stride_ = 0;             // capacity rounded up to whole lines
  std::atomic<uint32_t>* tunnel_out_ = nullptr;
  rte_hash* spi_ = nullptr;
  rte_ring* events_ = nullptr;
  IMB_MGR* mb_ = nullptr;  // key expansion only
  std::vector<SaConfig> cfg_;
  std::vector<uint32_t> free_;
  std::vector<std::pair<uint32_t, uint64_t>> retired_;  // slot, RCU token
};

// Posts one event from a worker; a full ring loses it (returns false).
inline bool sa_post(rte_ring* r, const SaEvent& e) {
  return rte_ring_mp_enqueue_elem(r, const_cast<SaEvent*>(&e), sizeof(SaEvent)) == 0;
}

}  // namespace moat
