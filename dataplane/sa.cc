// The SAD: SA records, SPI and tunnel lookups, lifecycle under RCU, replay window.
#include "dataplane/sa.hh"

#include <fmt/format.h>
#include <rte_byteorder.h>
#include <rte_cycles.h>
#include <rte_errno.h>
#include <rte_malloc.h>
#include <rte_random.h>

#include <cstddef>
#include <cstring>

#include "dataplane/drop.hh"

namespace moat {

static_assert(kDropCount <= sizeof(SaDrops::n) / sizeof(uint64_t), "SaDrops too small");
// The layout the header promises: parameters, per-packet counters and
// lifetimes on one line each, then the replay bitmap.
static_assert(offsetof(Sa, seq) == 64 && offsetof(Sa, soft_bytes) == 128 && offsetof(Sa, bitmap) == 192);
static_assert(64 % sizeof(SaTraffic) == 0);

const char* cipher_name(Cipher c) {
  switch (c) {
    case Cipher::aes_gcm_128: return "aes-gcm-128";
    case Cipher::aes_gcm_256: return "aes-gcm-256";
    case Cipher::aes_cbc_128_sha256: return "aes-cbc-128-sha256";
    case Cipher::aes_cbc_256_sha256: return "aes-cbc-256-sha256";
    case Cipher::chacha20_poly1305: return "chacha20-poly1305";
  }
  return "?";
}

bool cipher_from_name(const std::string& s, Cipher& out) {
  for (Cipher c : {Cipher::aes_gcm_128, Cipher::aes_gcm_256, Cipher::aes_cbc_128_sha256,
                   Cipher::aes_cbc_256_sha256, Cipher::chacha20_poly1305}) {
    if (s == cipher_name(c)) { out = c; return true; }
  }
  return false;
}

unsigned cipher_key_len(Cipher c) {
  switch (c) {
    case Cipher::aes_gcm_128: return 16 + 4;
    case Cipher::aes_gcm_256: return 32 + 4;
    case Cipher::aes_cbc_128_sha256: return 16;
    case Cipher::aes_cbc_256_sha256: return 32;
    case Cipher::chacha20_poly1305: return 32 + 4;
  }
  return 0;
}

const char* sa_event_name(SaEventKind k) {
  switch (k) {
    case SaEventKind::soft_bytes: return "soft-bytes";
    case SaEventKind::soft_packets: return "soft-packets";
    case SaEventKind::soft_seconds: return "soft-seconds";
    case SaEventKind::hard_bytes: return "hard-bytes";
    case SaEventKind::hard_packets: return "hard-packets";
    case SaEventKind::hard_seconds: return "hard-seconds";
    case SaEventKind::seq_overflow: return "seq-overflow";
    case SaEventKind::unknown_spi: return "unknown-spi";
  }
  return "?";
}

// ---- the SAD ----

tl::expected<Sad*, std::string> Sad::create(const std::string& name, uint32_t capacity,
                                            rte_rcu_qsbr* qsbr, unsigned workers) {
  auto fail = [&](const std::string& what) -> tl::expected<Sad*, std::string> {
    return tl::unexpected(fmt::format("SAD {}: {}", name, what));
  };
  if (capacity == 0 || capacity >= kNoSa) return fail("capacity must be 1..2^32-2");
  if (workers == 0 || workers > RTE_MAX_LCORE) return fail(fmt::format("{} workers: want 1..{}", workers, RTE_MAX_LCORE));
  auto* s = new Sad();
  s->name_ = name;
  s->cap_ = capacity;
  s->qsbr_ = qsbr;
  s->sas_ = static_cast<Sa*>(rte_zmalloc(nullptr, sizeof(Sa) * capacity, 64));
  s->keys_ = static_cast<SaKeys*>(rte_zmalloc(nullptr, sizeof(SaKeys) * capacity, 64));
  s->drops_ = static_cast<SaDrops*>(rte_zmalloc(nullptr, sizeof(SaDrops) * capacity, 64));
  s->tunnel_out_ = static_cast<std::atomic<uint32_t>*>(
      rte_zmalloc(nullptr, sizeof(std::atomic<uint32_t>) * capacity, 64));
  s->workers_ = workers;
  s->stride_ = RTE_ALIGN_CEIL(size_t(capacity), 64 / sizeof(SaTraffic));
  s->traffic_ = static_cast<SaTraffic*>(rte_zmalloc(nullptr, sizeof(SaTraffic) * s->stride_ * workers, 64));
  if (!s->sas_ || !s->keys_ || !s->drops_ || !s->tunnel_out_ || !s->traffic_) {
    size_t mb = ((sizeof(Sa) + sizeof(SaKeys) + sizeof(SaDrops)) * capacity + sizeof(SaTraffic) * s->stride_ * workers) >> 20;
    delete s;  // after the size is taken: it reads s->stride_
    return fail(fmt::format("cannot allocate {} SA slots ({} MB)", capacity, mb));
  }
  for (uint32_t i = 0; i < capacity; i++) s->tunnel_out_[i].store(kNoSa, std::memory_order_relaxed);
  std::string hn = "sad_" + name;
  rte_hash_parameters hp{};
  hp.name = hn.c_str();
  hp.entries = capacity < 8 ? 16 : capacity * 2;
  hp.key_len = sizeof(uint32_t);
  hp.socket_id = SOCKET_ID_ANY;
  hp.extra_flag = RTE_HASH_EXTRA_FLAGS_RW_CONCURRENCY_LF;
  s->spi_ = rte_hash_create(&hp);
  if (!s->spi_) { delete s; return fail(fmt::format("SPI hash: {}", rte_strerror(rte_errno))); }
  if (qsbr) {
    rte_hash_rcu_config hrc{};
    hrc.v = qsbr;
    hrc.mode = RTE_HASH_QSBR_MODE_DQ;
    if (rte_hash_rcu_qsbr_add(s->spi_, &hrc) != 0) { delete s; return fail("SPI hash: RCU attach failed"); }
  }
  std::string rn = "sadev_" + name;
  s->events_ = rte_ring_create_elem(rn.c_str(), sizeof(SaEvent), 4096, SOCKET_ID_ANY, RING_F_SC_DEQ);
  if (!s->events_) { delete s; return fail(fmt::format("event ring: {}", rte_strerror(rte_errno))); }
  s->mb_ = alloc_mb_mgr(0);
  if (!s->mb_) { delete s; return fail("IPsec-MB manager allocation failed"); }
  init_mb_mgr_auto(s->mb_, nullptr);
  s->cfg_.resize(capacity);
  s->free_.reserve(capacity);
  for (uint32_t i = capacity; i-- > 0;) s->free_.push_back(i);
  return s;
}

Sad::~Sad() {
  if (sas_) {
    // Key material does not outlive the SAD.
    std::memset(static_cast<void*>(keys_), 0, sizeof(SaKeys) * cap_);
  }
  if (spi_) rte_hash_free(spi_);
  if (events_) rte_ring_free(events_);
  if (mb_) free_mb_mgr(mb_);
  rte_free(sas_);
  rte_free(keys_);
  rte_free(drops_);
  rte_free(traffic_);
  rte_free(tunnel_out_);
}

static bool plen_ok(uint8_t p) { return p <= 32; }

tl::expected<uint32_t, std::string> Sad::add_sa(const SaConfig& c, uint64_t now_s) {
  auto fail = [&](const std::string& what) -> tl::expected<uint32_t, std::string> {
    return tl::unexpected(fmt::format("SA \"{}\" (SPI 0x{:08x}): {}", c.name, c.spi, what));
  };
  if (c.spi < 256) return fail("SPIs 0..255 are reserved (RFC 4303 §2.1)");
  if (c.tunnel >= cap_) return fail(fmt::format("tunnel {} beyond the SAD's {} slots", c.tunnel, cap_));
  if (c.key.size() != cipher_key_len(c.cipher))
    return fail(fmt::format("{} wants a {}-byte key, got {}", cipher_name(c.cipher),
                            cipher_key_len(c.cipher), c.key.size()));
  bool cbc = c.cipher == Cipher::aes_cbc_128_sha256 || c.cipher == Cipher::aes_cbc_256_sha256;
  if (cbc && c.auth_key.size() != 32)
    return fail(fmt::format("HMAC-SHA-256-128 wants a 32-byte auth key, got {}", c.auth_key.size()));
  if (c.dir == SaDir::inbound &&
      (c.replay_window < 64 || c.replay_window > kMaxReplayWindow || c.replay_window % 64))
    return fail(fmt::format("replay window {} not a multiple of 64 in 64..{}", c.replay_window, kMaxReplayWindow));
  if (c.funnels.size() > kMaxFunnels)
    return fail(fmt::format("{} funnels, at most {} per SA", c.funnels.size(), kMaxFunnels));
  for (const Funnel& f : c.funnels)
    if (!plen_ok(f.local_plen) || !plen_ok(f.remote_plen)) return fail("funnel prefix length above 32");
  if (c.ttl == 0) return fail("outer TTL 0");
  if (c.mtu < 576 || c.mtu > 9000) return fail(fmt::format("tunnel MTU {} outside 576..9000", c.mtu));
  uint32_t spi_be = rte_cpu_to_be_32(c.spi);
  if (c.dir == SaDir::inbound && rte_hash_lookup(spi_, &spi_be) >= 0)
    return fail("an inbound SA with this SPI exists");
  if (free_.empty()) return fail(fmt::format("SAD full ({} SAs)", cap_));

  uint32_t i = free_.back();
  Sa& s = sas_[i];
  std::memset(static_cast<void*>(&s), 0, sizeof(Sa));
  std::memset(static_cast<void*>(&drops_[i]), 0, sizeof(SaDrops));
  // No worker writes a free slot's counts (the slot was reclaimed after a
  // grace period), so they are reset here before publication.
  for (unsigned w = 0; w < workers_; w++) {
    __atomic_store_n(&traffic(w, i).packets, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&traffic(w, i).bytes, 0, __ATOMIC_RELAXED);
  }
  s.spi = c.spi;
  s.tunnel = c.tunnel;
  s.local.store(c.local, std::memory_order_relaxed);
  s.local_port = c.local_port;
  s.mtu = c.mtu;
  s.peer.store(peer_word(c.peer, c.peer_port, c.nat_t), std::memory_order_relaxed);
  s.dir = c.dir;
  s.cipher = c.cipher;
  s.esn = c.esn;
  s.clamp_mss = c.clamp_mss;
  s.df = c.df;
  s.mtu_policy = c.mtu_policy;
  s.ttl = c.ttl;
  s.iv_len = cbc ? 16 : 8;
  s.align = cbc ? 16 : 4;
  s.window = c.replay_window;
  s.n_funnels = uint8_t(c.funnels.size());
  for (size_t f = 0; f < c.funnels.size(); f++) s.funnels[f] = c.funnels[f];
  // The largest inner packet one ESP packet carries within the MTU:
  // outer IPv4 (20) [+ UDP 8] + ESP header 8 + IV + payload padded + ICV 16.
  // Both encapsulations: set_peer may switch between them (MOBIKE, NAT).
  for (unsigned u = 0; u < 2; u++) {
    int room = int(c.mtu) - 20 - (u ? 8 : 0) - 8 - s.iv_len - 16;
    room -= room % s.align;
    s.max_inner[u] = uint16_t(room - 2);
  }
  s.soft_bytes = c.soft.bytes;
  s.soft_packets = c.soft.packets;
  s.hard_bytes = c.hard.bytes;
  s.hard_packets = c.hard.packets;
  s.soft_seconds = c.soft.seconds;
  s.hard_seconds = c.hard.seconds;
  s.created_s = now_s;
  // Replay state starts empty: T = 0, every bit clear.

  SaKeys& k = keys_[i];
  std::memset(static_cast<void*>(&k), 0, sizeof(SaKeys));
  const uint8_t* key = c.key.data();
  switch (c.cipher) {
    case Cipher::aes_gcm_128:
      IMB_AES128_GCM_PRE(mb_, key, &k.gcm);
      std::memcpy(s.salt, key + 16, 4);
      break;
    case Cipher::aes_gcm_256:
      IMB_AES256_GCM_PRE(mb_, key, &k.gcm);
      std::memcpy(s.salt, key + 32, 4);
      break;
    case Cipher::chacha20_poly1305:
      std::memcpy(k.chacha, key, 32);
      std::memcpy(s.salt, key + 32, 4);
      break;
    case Cipher::aes_cbc_128_sha256:
    case Cipher::aes_cbc_256_sha256: {
      if (c.cipher == Cipher::aes_cbc_128_sha256) IMB_AES_KEYEXP_128(mb_, key, k.cbc.enc, k.cbc.dec);
      else IMB_AES_KEYEXP_256(mb_, key, k.cbc.enc, k.cbc.dec);
      // HMAC (RFC 2104): the inner and outer hash states after one block of
      // key ^ ipad / key ^ opad are per-SA constants.
      alignas(16) uint8_t blk[64];
      std::memset(blk, 0x36, 64);
      for (unsigned b = 0; b < 32; b++) blk[b] ^= c.auth_key[b];
      IMB_SHA256_ONE_BLOCK(mb_, blk, k.cbc.ipad);
      std::memset(blk, 0x5c, 64);
      for (unsigned b = 0; b < 32; b++) blk[b] ^= c.auth_key[b];
      IMB_SHA256_ONE_BLOCK(mb_, blk, k.cbc.opad);
      std::memset(blk, 0, sizeof(blk));
      uint64_t r = rte_rand();
      std::memcpy(s.cbc_nonce, &r, 8);
      break;
    }
  }
  s.state.store(kSaLive, std::memory_order_relaxed);

  // Publication: everything above is visible before the index is.
  std::atomic_thread_fence(std::memory_order_release);
  if (c.dir == SaDir::inbound) {
    int rc = rte_hash_add_key_data(spi_, &spi_be, reinterpret_cast<void*>(uintptr_t(i) + 1));
    if (rc != 0) return fail(fmt::format("SPI hash insert: {}", rte_strerror(-rc)));
  } else if (tunnel_out_[c.tunnel].load(std::memory_order_relaxed) == kNoSa) {
    tunnel_out_[c.tunnel].store(i, std::memory_order_release);
  }
  free_.pop_back();
  cfg_[i] = c;
  cfg_[i].key.assign(c.key.size(), 0);  // the schedules are enough; keep no raw key
  cfg_[i].auth_key.assign(c.auth_key.size(), 0);
  live_++;
  return i;
}

tl::expected<uint32_t, std::string> Sad::replace_outbound(uint32_t tunnel, uint32_t sa) {
  if (tunnel >= cap_) return tl::unexpected(fmt::format("replace_outbound: tunnel {} beyond {}", tunnel, cap_));
  if (!usable(sa) || sas_[sa].dir != SaDir::outbound)
    return tl::unexpected(fmt::format("replace_outbound: tunnel {}: SA {} is not a live outbound SA", tunnel, sa));
  if (sas_[sa].tunnel != tunnel)
    return tl::unexpected(fmt::format("replace_outbound: SA {} belongs to tunnel {}, not {}", sa, sas_[sa].tunnel, tunnel));
  uint32_t old = tunnel_out_[tunnel].exchange(sa, std::memory_order_acq_rel);
  if (old != kNoSa && old != sa) retire(old);
  return old == sa ? kNoSa : old;
}

tl::expected<void, std::string> Sad::delete_sa(uint32_t sa) {
  if (!usable(sa)) return tl::unexpected(fmt::format("delete_sa: SA {} is not live", sa));
  Sa& s = sas_[sa];
  if (s.dir == SaDir::inbound) {
    uint32_t spi_be = rte_cpu_to_be_32(s.spi);
    rte_hash_del_key(spi_, &spi_be);  // the RCU hook defers the key slot's reuse
  } else {
    uint32_t cur = sa;
    tunnel_out_[s.tunnel].compare_exchange_strong(cur, kNoSa, std::memory_order_acq_rel);
  }
  retire(sa);
  return {};
}

void Sad::retire(uint32_t sa) {
  // Still live for the data path: a worker that looked the index up a moment
  // ago (SPD before a replace, SPI lookup before a delete) processes its
  // packet normally. reclaim() ends it after the grace period.
  sas_[sa].state.fetch_or(kSaDeleted);
  uint64_t token = qsbr_ ? rte_rcu_qsbr_start(qsbr_) : 0;
  retired_.emplace_back(sa, token);
  live_--;
}

void Sad::reclaim() {
  size_t keep = 0;
  for (auto& [sa, token] : retired_) {
    if (!qsbr_ || rte_rcu_qsbr_check(qsbr_, token, false) == 1) {
      std::memset(static_cast<void*>(&keys_[sa]), 0, sizeof(SaKeys));
      sas_[sa].state.store(0);
      cfg_[sa] = SaConfig{};
      free_.push_back(sa);
    } else {
      retired_[keep++] = {sa, token};
    }
  }
  retired_.resize(keep);
}

tl::expected<void, std::string> Sad::set_peer(uint32_t sa, uint32_t addr, uint16_t port, bool udp_encap) {
  if (!usable(sa)) return tl::unexpected(fmt::format("set_peer: SA {} is not live", sa));
  sas_[sa].peer.store(peer_word(addr, port, udp_encap), std::memory_order_release);
  cfg_[sa].peer = addr;
  cfg_[sa].peer_port = port;
  cfg_[sa].nat_t = udp_encap;
  return {};
}

tl::expected<void, std::string> Sad::set_local(uint32_t sa, uint32_t addr) {
  if (!usable(sa)) return tl::unexpected(fmt::format("set_local: SA {} is not live", sa));
  sas_[sa].local.store(addr, std::memory_order_release);
  cfg_[sa].local = addr;
  return {};
}

void Sad::post(const SaEvent& e) { sa_post(events_, e); }

void Sad::tick(uint64_t now_s) {
  for (uint32_t i = 0; i < cap_; i++) {
    Sa& s = sas_[i];
    uint32_t st = s.state.load(std::memory_order_relaxed);
    if (!(st & kSaLive) || (st & kSaDeleted)) continue;
    uint64_t age = now_s - s.created_s;
    uint32_t peer = peer_addr(s.peer.load(std::memory_order_relaxed));
    if (s.hard_seconds && age >= s.hard_seconds && !(st & kSaHardPosted)) {
      s.state.fetch_or(kSaHardPosted);
      post(SaEvent{i, s.spi, peer, SaEventKind::hard_seconds, {}});
    } else if (s.soft_seconds && age >= s.soft_seconds && !(st & kSaSoftPosted)) {
      s.state.fetch_or(kSaSoftPosted);
      post(SaEvent{i, s.spi, peer, SaEventKind::soft_seconds, {}});
    }
  }
}

unsigned Sad::events(SaEvent* out, unsigned n) {
  return rte_ring_sc_dequeue_burst_elem(events_, out, sizeof(SaEvent), n, nullptr);
}

SaStats Sad::stats(uint32_t i) const {
  const Sa& s = sas_[i];
  SaStats v{};
  v.index = i;
  v.spi = s.spi;
  v.tunnel = s.tunnel;
  uint64_t p = s.peer.load(std::memory_order_relaxed);
  v.peer = peer_addr(p);
  v.peer_port = peer_port(p);
  v.udp_encap = peer_udp(p);
  v.dir = s.dir;
  v.cipher = s.cipher;
  v.state = s.state.load(std::memory_order_relaxed);
  v.seq = sa_load(s.seq);
  for (unsigned w = 0; w < workers_; w++) {
    v.packets += sa_load(traffic(w, i).packets);
    v.bytes += sa_load(traffic(w, i).bytes);
  }
  v.last_tsc = sa_load(s.last_tsc);
  v.gaps = sa_load(s.gaps);
  v.late = sa_load(s.late);
  v.dups = sa_load(s.dups);
  v.auth_fail = sa_load(s.auth_fail);
  for (unsigned d = 0; d < kDropCount; d++) v.drops_total += sa_load(drops_[i].n[d]);
  double lost = double(v.gaps) - double(v.late);
  if (lost < 0) lost = 0;
  v.loss_estimate = v.packets + lost > 0 ? lost / (double(v.packets) + lost) : 0.0;
  return v;
}

const SaConfig* Sad::config(uint32_t i) const {
  if (i >= cap_ || !(sas_[i].state.load() & (kSaLive | kSaDeleted))) return nullptr;
  return &cfg_[i];
}

void Sad::lookup_spis(const uint32_t* spi_be, unsigned n, uint32_t* idx) const {
  // A burst from one peer is mostly one SA: a run of packets with the SPI of
  // the one before shares its lookup, so the hash probes once per run.
  constexpr unsigned kMaxBurstLookup = RTE_HASH_LOOKUP_BULK_MAX;
  const void* keys[kMaxBurstLookup];
  void* data[kMaxBurstLookup];
  uint8_t key_of[kMaxBurstLookup];
  for (unsigned base = 0; base < n; base += kMaxBurstLookup) {
    unsigned k = n - base < kMaxBurstLookup ? n - base : kMaxBurstLookup;
    unsigned nk = 0;
    for (unsigned j = 0; j < k; j++) {
      const uint32_t* s = &spi_be[base + j];
      if (nk && *static_cast<const uint32_t*>(keys[nk - 1]) == *s) {
        key_of[j] = uint8_t(nk - 1);
        continue;
      }
      keys[nk] = s;
      key_of[j] = uint8_t(nk++);
    }
    uint64_t hits = 0;
    rte_hash_lookup_bulk_data(spi_, keys, nk, &hits, data);
    for (unsigned j = 0; j < k; j++) {
      unsigned u = key_of[j];
      idx[base + j] = (hits >> u) & 1 ? uint32_t(reinterpret_cast<uintptr_t>(data[u]) - 1) : kNoSa;
    }
  }
}

}  // namespace moat
