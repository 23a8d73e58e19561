// ESP tunnel mode: tunnel MTU policy, encapsulation + encryption, and
// decryption + decapsulation, with Intel IPsec-MB (direct calls for AES-GCM,
// the job API for the other ciphers).
#include "dataplane/esp.hh"

#include <fmt/format.h>
#include <rte_byteorder.h>
#include <rte_cycles.h>
#include <rte_ether.h>
#include <rte_ip.h>
#include <rte_prefetch.h>
#include <rte_tcp.h>
#include <rte_udp.h>

#include <cstring>

#include "dataplane/icmp.hh"
#include "dataplane/worker.hh"

namespace moat {

namespace {

constexpr uint16_t kEth = sizeof(rte_ether_hdr);
constexpr uint8_t kIcvLen = 16;
constexpr uint8_t kProtoEsp = 50;
constexpr uint8_t kNextIpv4 = 4;
constexpr uint8_t kNextNone = 59;
alignas(16) constexpr uint8_t kZeroIv[16] = {};

inline void drop_sa(Worker& w, const Sad& sad, uint32_t sa, rte_mbuf* m, Drop why) {
  sa_add(sad.drops(sa).n[static_cast<unsigned>(why)], 1);
  w.drop(m, why);
}

inline bool tag_eq(const uint8_t* a, const uint8_t* b) {
  // Constant time: no early exit on the first differing byte.
  uint64_t a0, a1, b0, b1;
  std::memcpy(&a0, a, 8);
  std::memcpy(&a1, a + 8, 8);
  std::memcpy(&b0, b, 8);
  std::memcpy(&b1, b + 8, 8);
  return ((a0 ^ b0) | (a1 ^ b1)) == 0;
}

inline void put_be32(uint8_t* p, uint32_t v) {
  uint32_t be = rte_cpu_to_be_32(v);
  std::memcpy(p, &be, 4);
}
inline void put_be64(uint8_t* p, uint64_t v) {
  uint64_t be = rte_cpu_to_be_64(v);
  std::memcpy(p, &be, 8);
}

inline bool is_aead(Cipher c) {
  return c != Cipher::aes_cbc_128_sha256 && c != Cipher::aes_cbc_256_sha256;
}

inline bool is_fragment(const rte_ipv4_hdr* ip) {
  return (ip->fragment_offset & rte_cpu_to_be_16(RTE_IPV4_HDR_MF_FLAG | RTE_IPV4_HDR_OFFSET_MASK)) != 0;
}

inline bool in_prefix(uint32_t a, uint32_t p, uint8_t plen) {
  return plen == 0 || ((a ^ p) >> (32 - plen)) == 0;
}

inline bool funnels_allow(const Sa& sa, uint32_t src, uint32_t dst) {
  if (sa.n_funnels == 0) return true;
  for (unsigned f = 0; f < sa.n_funnels; f++) {
    const Funnel& fu = sa.funnels[f];
    if (in_prefix(src, fu.remote, fu.remote_plen) && in_prefix(dst, fu.local, fu.local_plen)) return true;
  }
  return false;
}

// Counts packets against the SA's lifetimes; posts each soft/hard event once.
// Called once per run of packets of one SA in a burst, both ways. The counts
// go to this worker's own SaTraffic (one writer: plain relaxed stores, no
// line shared with another worker); the lifetimes are judged on the sum over
// all workers, read only when the SA has a packet or byte lifetime. Bounded
// imprecision: another worker's counts lack the run it is processing at that
// moment, so with W workers on one SA an event may come up to W-1 runs (each
// at most a burst) late; and the hard limit is enforced at burst
// granularity: the rest of the burst that crosses it still goes, as do the
// runs other workers have in flight.
void lifetime_count(EspWorker& ew, const Sad& sad, unsigned worker, uint32_t idx, uint64_t pkts,
                    uint64_t bytes) {
  SaTraffic& t = sad.traffic(worker, idx);
  uint64_t p = t.packets + pkts, b = t.bytes + bytes;
  __atomic_store_n(&t.packets, p, __ATOMIC_RELAXED);
  __atomic_store_n(&t.bytes, b, __ATOMIC_RELAXED);
  Sa& sa = sad.sa(idx);
  if (!(sa.soft_bytes | sa.soft_packets | sa.hard_bytes | sa.hard_packets)) return;
  for (unsigned o = 0; o < sad.workers(); o++) {
    if (o == worker) continue;
    p += sa_load(sad.traffic(o, idx).packets);
    b += sa_load(sad.traffic(o, idx).bytes);
  }
  rte_ring* events = sad.event_ring();
  bool hard_b = sa.hard_bytes && b >= sa.hard_bytes, hard_p = sa.hard_packets && p >= sa.hard_packets;
  bool soft_b = sa.soft_bytes && b >= sa.soft_bytes, soft_p = sa.soft_packets && p >= sa.soft_packets;
  if (!(hard_b || hard_p || soft_b || soft_p)) return;
  uint32_t peer = peer_addr(sa.peer.load(std::memory_order_relaxed));
  if ((soft_b || soft_p) && !(sa.state.fetch_or(kSaSoftPosted) & kSaSoftPosted)) {
    SaEvent e{idx, sa.spi, peer, soft_b ? SaEventKind::soft_bytes : SaEventKind::soft_packets, {}};
    if (!sa_post(events, e)) ew.stats.events_lost.add();
  }
  if ((hard_b || hard_p) && !(sa.state.fetch_or(kSaHardPosted) & kSaHardPosted)) {
    SaEvent e{idx, sa.spi, peer, hard_b ? SaEventKind::hard_bytes : SaEventKind::hard_packets, {}};
    if (!sa_post(events, e)) ew.stats.events_lost.add();
  }
}


// Rewrites the MSS option of a TCP SYN down to `mss` (RFC 879/6691), with the
// TCP checksum recomputed: the option may sit at an odd offset, where an
// incremental update is easy to get wrong, and SYNs are small.
bool clamp_mss(rte_ipv4_hdr* ip, uint16_t total, uint16_t mss) {
  if (ip->next_proto_id != IPPROTO_TCP || is_fragment(ip)) return false;
  uint16_t ihl = uint16_t((ip->version_ihl & 0xf) * 4);
  if (total < ihl + sizeof(rte_tcp_hdr)) return false;
  auto* tcp = reinterpret_cast<rte_tcp_hdr*>(reinterpret_cast<uint8_t*>(ip) + ihl);
  if (!(tcp->tcp_flags & RTE_TCP_SYN_FLAG)) return false;
  uint16_t doff = uint16_t((tcp->data_off >> 4) * 4);
  if (doff < sizeof(rte_tcp_hdr) || ihl + doff > total) return false;
  uint8_t* o = reinterpret_cast<uint8_t*>(tcp) + sizeof(rte_tcp_hdr);
  uint8_t* end = reinterpret_cast<uint8_t*>(tcp) + doff;
  while (o < end) {
    if (*o == 0) break;                   // end of options
    if (*o == 1) { o++; continue; }       // NOP
    if (o + 1 >= end || o[1] < 2 || o + o[1] > end) break;
    if (o[0] == 2 && o[1] == 4) {
      uint16_t cur = uint16_t(o[2] << 8 | o[3]);
      if (cur <= mss) return false;
      o[2] = uint8_t(mss >> 8);
      o[3] = uint8_t(mss);
      tcp->cksum = 0;
      tcp->cksum = rte_ipv4_udptcp_cksum(ip, tcp);
      return true;
    }
    o += o[1];
  }
  return false;
}

// At 10,000 SAs the per-SA lines and key schedules are cache misses (DPDK
// fact 7): fetch them a few packets ahead of use. That is 19 prefetches for
// a GCM SA; a run of packets on one SA (the usual burst from or to one
// peer) needs them once, so the SA prefetched last is not fetched again.
struct SaPrefetch {
  const Sad& sad;
  uint32_t last = kNoSa;
  void operator()(uint32_t idx) {
    if (idx == last || idx >= sad.capacity()) return;
    last = idx;
    const Sa* sa = &sad.sa(idx);
    const auto* k = reinterpret_cast<const uint8_t*>(&sad.keys(idx));
    rte_prefetch0(sa);
    rte_prefetch0(reinterpret_cast<const uint8_t*>(sa) + 64);
    rte_prefetch0(reinterpret_cast<const uint8_t*>(sa) + 128);
    for (unsigned l = 0; l < sizeof(SaKeys) / 64; l++) rte_prefetch0(k + 64 * l);
  }
};
constexpr unsigned kPrefetchAhead = 4;

// An outbound SA that may still send: live, outbound, not past its hard
// limit. Else the packet is dropped and counted (per SA where there is one).
inline bool sa_sends(Worker& w, const Sad& sad, uint32_t idx, rte_mbuf* m) {
  if (idx >= sad.capacity()) { w.drop(m, Drop::esp_no_sa); return false; }
  uint32_t st = sad.sa(idx).state.load(std::memory_order_relaxed);
  if (sad.sa(idx).dir != SaDir::outbound || !(st & kSaLive)) { w.drop(m, Drop::esp_no_sa); return false; }
  if (st & kSaHardPosted) { drop_sa(w, sad, idx, m, Drop::esp_sa_expired); return false; }
  return true;
}

// What esp_outbound needs of a packet before it takes a sequence number:
// one segment, and room for the outer headers in front of the inner packet
// and for the trailer after it (plain ESP or ESP in UDP, by the peer word).
inline bool esp_room(const Sa& sa, rte_mbuf* m, uint16_t l3_off, uint16_t inner_len, bool nat) {
  uint16_t head = uint16_t(kEth + sizeof(rte_ipv4_hdr) + (nat ? sizeof(rte_udp_hdr) : 0) + 8 + sa.iv_len);
  uint16_t padded = uint16_t((inner_len + 2 + sa.align - 1) & ~(sa.align - 1));
  uint16_t tail = uint16_t(padded - inner_len + kIcvLen);
  return rte_pktmbuf_headroom(m) + l3_off >= head &&
         rte_pktmbuf_tailroom(m) + (rte_pktmbuf_data_len(m) - l3_off - inner_len) >= tail;
}

inline void ip_cksum(rte_ipv4_hdr* ip) {
  ip->hdr_checksum = 0;
  ip->hdr_checksum = rte_ipv4_cksum(ip);
}

// Makes the mbuf one segment (reassembled or fragmented packets are chains);
// false when the first segment lacks the room.
inline bool contiguous(rte_mbuf* m) {
  return rte_pktmbuf_is_contiguous(m) || rte_pktmbuf_linearize(m) == 0;
}

}  // namespace

tl::expected<void, std::string> esp_worker_init(EspWorker& ew, const std::string& name,
                                                const EspWorkerConfig& c) {
  ew.mb = alloc_mb_mgr(0);
  if (!ew.mb) return tl::unexpected(fmt::format("ESP worker {}: IPsec-MB manager allocation failed", name));
  // The library picks SSE/AVX/AVX2/AVX-512 code for the CPU it runs on, so
  // the portable build (no AVX in our code) still gets the fastest path.
  init_mb_mgr_auto(ew.mb, &ew.arch);
  if (ew.arch == IMB_ARCH_NONE || imb_get_errno(ew.mb) != 0) {
    esp_worker_fini(ew);
    return tl::unexpected(fmt::format("ESP worker {}: IPsec-MB init: {}", name,
                                      imb_get_strerror(imb_get_errno(ew.mb))));
  }
  uint64_t hz = rte_get_tsc_hz();
  // 16 entries per bucket (the library's maximum associativity); the table
  // holds frag_flows packets in reassembly at once, older ones time out.
  uint32_t buckets = rte_align32pow2((c.frag_flows + 15) / 16);
  ew.frag = rte_ip_frag_table_create(buckets, 16, c.frag_flows, hz / 1000 * c.frag_timeout_ms, SOCKET_ID_ANY);
  std::memset(ew.frag_fed_tsc, 0, sizeof(ew.frag_fed_tsc));
  if (!ew.frag) {
    esp_worker_fini(ew);
    return tl::unexpected(fmt::format("ESP worker {}: reassembly table of {} flows: allocation failed", name, c.frag_flows));
  }
  ew.frag_timeout_tsc = hz / 1000 * c.frag_timeout_ms;
  ew.unknown_event_gap_tsc = hz / 1000 * c.unknown_spi_event_ms;
  ew.ip_id = uint16_t(rte_rand());
  return {};
}

void esp_worker_fini(EspWorker& ew) {
  if (ew.frag) {
    rte_ip_frag_free_death_row(&ew.death_row, 0);
    rte_ip_frag_table_destroy(ew.frag);
    ew.frag = nullptr;
  }
  if (ew.mb) free_mb_mgr(ew.mb);
  ew.mb = nullptr;
}

bool esp_to_us(rte_mbuf* m) {
  auto* ip = rte_pktmbuf_mtod_offset(m, const rte_ipv4_hdr*, meta(m).l3_off);
  // ESP's protocol number is in every fragment: esp_inbound reassembles.
  if (ip->next_proto_id == kProtoEsp) return true;
  if (ip->next_proto_id != IPPROTO_UDP) return false;
  // A fragmented datagram to port 4500 is almost always IKE (large
  // certificates): only its first fragment shows the port, so all of them
  // stay on the local path, which reassembles for the control thread.
  if (is_fragment(ip)) return false;
  uint16_t ihl = uint16_t((ip->version_ihl & 0xf) * 4);
  if (rte_pktmbuf_data_len(m) < meta(m).l3_off + ihl + sizeof(rte_udp_hdr)) return false;
  auto* udp = reinterpret_cast<const rte_udp_hdr*>(reinterpret_cast<const uint8_t*>(ip) + ihl);
  return udp->dst_port == rte_cpu_to_be_16(kNatTPort);
}

void esp_housekeeping(Worker& w, EspWorker& ew) {
  rte_ip_frag_table_del_expired_entries(ew.frag, &ew.death_row, w.now_tsc);
  if (ew.death_row.cnt) {
    w.stats.drops[static_cast<unsigned>(Drop::esp_reassembly_failed)].add(ew.death_row.cnt);
    rte_ip_frag_free_death_row(&ew.death_row, 0);
  }
}

// ---------------------------------------------------------------- outbound

// Admission and the tunnel's MTU, one pass: every packet that leaves here
// for esp_outbound has a live outbound SA, is one segment with room for its
// encapsulation, and fits the path MTU (whole or as inner fragments), so
// esp_outbound refuses nothing of what it is given and takes sequence
// numbers without gaps. A packet of kNoSa came from a tunnel with no SA.
void esp_mtu(Worker& w, EspWorker& ew, const Sad& sad, const PortTable& pt, Burst& in, Burst& out) {
  SaPrefetch prefetch_sa{sad};
  for (uint16_t i = 0; i < in.n && i < kPrefetchAhead; i++) prefetch_sa(meta(in.pkts[i]).sa);
  uint16_t i = 0;
  for (; i < in.n; i++) {
    if (i + kPrefetchAhead < in.n) prefetch_sa(meta(in.pkts[i + kPrefetchAhead]).sa);
    rte_mbuf* m = in.pkts[i];
    PktMeta& md = meta(m);
    uint32_t idx = md.sa;
    if (idx == kNoSa) { w.drop(m, Drop::tunnel_down); continue; }
    if (!sa_sends(w, sad, idx, m)) continue;
    const Sa& sa = sad.sa(idx);
    // One load per packet: the encapsulation it is sized for is the one
    // esp_outbound gives it (EspWorker::sized).
    uint64_t pw = sa.peer.load(std::memory_order_acquire);
    uint16_t max_inner = sa.max_inner[peer_udp(pw)];
    auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, md.l3_off);
    uint16_t total = rte_be_to_cpu_16(ip->total_length);
    if (sa.clamp_mss && clamp_mss(ip, total, uint16_t(max_inner - 40))) ew.stats.mss_clamped.add();
    if (total <= max_inner) {
      if (out.n == kMaxBurst) break;
      if (!contiguous(m) || !esp_room(sa, m, md.l3_off, total, peer_udp(pw))) {
        drop_sa(w, sad, idx, m, Drop::esp_no_room);
        continue;
      }
      ew.sized[out.n] = {m, idx, pw};
      out.push(m);
      continue;
    }
    bool df = ip->fragment_offset & rte_cpu_to_be_16(RTE_IPV4_HDR_DF_FLAG);
    if (df && sa.mtu_policy == MtuPolicy::honor_df) {
      sa_add(sad.drops(idx).n[static_cast<unsigned>(Drop::esp_tunnel_frag_needed)], 1);
      // RFC 1191: the next-hop MTU is what the tunnel carries unfragmented.
      send_icmp_error(w, pt, m, Drop::esp_tunnel_frag_needed, kIcmpUnreach, kUnreachFragNeeded, max_inner);
      continue;
    }
    // fragment-inner. Fragment payloads are multiples of 8 bytes.
    uint16_t ihl = uint16_t((ip->version_ihl & 0xf) * 4);
    uint16_t frag_mtu = uint16_t(ihl + ((max_inner - ihl) & ~7));
    unsigned need = (total - ihl + (frag_mtu - ihl) - 1) / (frag_mtu - ihl);
    if (need > kMaxBurst) { w.drop(m, Drop::esp_frag_failed); continue; }
    if (out.n + need > kMaxBurst) break;  // the rest waits for the next call
    if (!contiguous(m)) { drop_sa(w, sad, idx, m, Drop::esp_no_room); continue; }
    // The tunnel offers a large virtual MTU (seed 000): the inner packet is
    // fragmented whatever its DF bit says and the far end reassembles it
    // before it goes on, so the end hosts still see one whole datagram, which
    // is what DF protects. DPDK's rte_ipv4_fragment_packet refuses DF packets
    // (-ENOTSUP), hence DF is cleared deliberately before the call.
    ip->fragment_offset &= rte_cpu_to_be_16(uint16_t(~RTE_IPV4_HDR_DF_FLAG));
    PktMeta saved = md;
    rte_pktmbuf_adj(m, md.l3_off);
    rte_mbuf* frags[kMaxBurst];
    int n = rte_ipv4_fragment_packet(m, frags, kMaxBurst, frag_mtu, w.direct_pool, w.indirect_pool);
    rte_pktmbuf_free(m);
    if (n < 0) {
      sa_add(sad.drops(idx).n[static_cast<unsigned>(Drop::esp_frag_failed)], 1);
      w.stats.drops[static_cast<unsigned>(Drop::esp_frag_failed)].add();
      continue;
    }
    for (int f = 0; f < n; f++) {
      rte_mbuf* fm = frags[f];
      // Fragments reference the original's data through indirect mbufs; ESP
      // writes its trailer after each payload, so each gets its own copy.
      auto* fip = rte_pktmbuf_mtod(fm, rte_ipv4_hdr*);
      if (!contiguous(fm) || !esp_room(sa, fm, 0, rte_be_to_cpu_16(fip->total_length), peer_udp(pw))) {
        drop_sa(w, sad, idx, fm, Drop::esp_no_room);
        continue;
      }
      ip_cksum(fip);  // the fragmenter leaves it to offload
      meta(fm) = saved;
      meta(fm).l3_off = 0;
      ew.stats.inner_fragments.add();
      ew.sized[out.n] = {fm, idx, pw};
      out.push(fm);
    }
  }
  // Compact what was not taken.
  uint16_t k = 0;
  for (; i < in.n; i++) in.pkts[k++] = in.pkts[i];
  in.n = k;
}

namespace {

// The AEAD part of a job, the same both ways (IPsec-MB takes the direction
// from cipher_direction and the chain order): the nonce (salt and the
// packet's 8-byte IV) and the AAD (RFC 4106 §5: SPI, [high 32 bits of the
// ESN,] low 32 bits of the sequence number) in the job's scratch.
inline uint64_t nonce_aad(const Sa& sa, EspWorker::Scratch& sc, const uint8_t* esp, const uint8_t* iv, uint64_t seq) {
  std::memcpy(sc.iv, sa.salt, 4);
  std::memcpy(sc.iv + 4, iv, 8);
  std::memcpy(sc.aad, esp, 4);
  if (sa.esn) {
    put_be32(sc.aad + 4, uint32_t(seq >> 32));
    std::memcpy(sc.aad + 8, esp + 4, 4);
    return 12;
  }
  std::memcpy(sc.aad + 4, esp + 4, 4);
  return 8;
}

// The job's AEAD fields, from the nonce and AAD nonce_aad wrote into `sc`.
inline void set_aead(IMB_JOB* job, const Sa& sa, const SaKeys& k, const EspWorker::Scratch& sc, uint64_t aad_len) {
  job->iv = sc.iv;
  job->iv_len_in_bytes = 12;
  if (sa.cipher == Cipher::chacha20_poly1305) {
    job->cipher_mode = IMB_CIPHER_CHACHA20_POLY1305;
    job->hash_alg = IMB_AUTH_CHACHA20_POLY1305;
    job->enc_keys = k.chacha;
    job->dec_keys = k.chacha;
    job->key_len_in_bytes = 32;
    job->u.CHACHA20_POLY1305.aad = sc.aad;
    job->u.CHACHA20_POLY1305.aad_len_in_bytes = aad_len;
  } else {
    job->cipher_mode = IMB_CIPHER_GCM;
    job->hash_alg = IMB_AUTH_AES_GMAC;
    job->enc_keys = &k.gcm;
    job->dec_keys = &k.gcm;
    job->key_len_in_bytes = sa.cipher == Cipher::aes_gcm_128 ? 16 : 32;
    job->u.GCM.aad = sc.aad;
    job->u.GCM.aad_len_in_bytes = aad_len;
  }
}

// The job's AES-CBC + HMAC-SHA-256 fields (RFC 4868), the same both ways;
// the authenticated part starts at the ESP header.
inline void set_cbc_hmac(IMB_JOB* job, const Sa& sa, const SaKeys& k, uint64_t hashed_len) {
  job->iv_len_in_bytes = 16;
  job->cipher_mode = IMB_CIPHER_CBC;
  job->enc_keys = k.cbc.enc;
  job->dec_keys = k.cbc.dec;
  job->key_len_in_bytes = sa.cipher == Cipher::aes_cbc_128_sha256 ? 16 : 32;
  job->hash_alg = IMB_AUTH_HMAC_SHA_256;
  job->u.HMAC._hashed_auth_key_xor_ipad = k.cbc.ipad;
  job->u.HMAC._hashed_auth_key_xor_opad = k.cbc.opad;
  job->hash_start_src_offset_in_bytes = 0;
  job->msg_len_to_hash_in_bytes = hashed_len;
}

inline bool is_gcm(Cipher c) { return c == Cipher::aes_gcm_128 || c == Cipher::aes_gcm_256; }

// AES-GCM in place through IPsec-MB's direct API rather than a job: a GCM
// job completes on submit (the library has no multi-buffer GCM lanes to
// fill), so the job manager's get/submit/completion round adds work and
// nothing else. The tag goes to `tag` (decryption: the computed one, for the
// caller to compare). CBC and ChaCha20-Poly1305 stay on jobs.
inline void gcm_direct(IMB_MGR* mb, Cipher c, bool encrypt, const gcm_key_data* k, uint8_t* data, uint64_t len,
                       const EspWorker::Scratch& sc, uint64_t aad_len, uint8_t* tag) {
  gcm_context_data ctx;
  if (c == Cipher::aes_gcm_128) {
    if (encrypt) IMB_AES128_GCM_ENC(mb, k, &ctx, data, data, len, sc.iv, sc.aad, aad_len, tag, kIcvLen);
    else IMB_AES128_GCM_DEC(mb, k, &ctx, data, data, len, sc.iv, sc.aad, aad_len, tag, kIcvLen);
  } else {
    if (encrypt) IMB_AES256_GCM_ENC(mb, k, &ctx, data, data, len, sc.iv, sc.aad, aad_len, tag, kIcvLen);
    else IMB_AES256_GCM_DEC(mb, k, &ctx, data, data, len, sc.iv, sc.aad, aad_len, tag, kIcvLen);
  }
}

// IPsec-MB validates every job's fields on submit unless told not to (a
// switch over cipher and hash modes, a few percent of a 64-byte packet). The
// stages fill jobs of five fixed shapes (AES-GCM-128/256, ChaCha20-Poly1305,
// AES-CBC + HMAC-SHA-256, ±ESN), whose output the ESP tests check byte for
// byte (published vectors, every cipher round trip): a release build skips
// the validation, a debug build keeps it.
inline IMB_JOB* submit_job(IMB_MGR* mb) {
#ifdef NDEBUG
  return IMB_SUBMIT_JOB_NOCHECK(mb);
#else
  return IMB_SUBMIT_JOB(mb);
#endif
}

struct OutJob {
  rte_mbuf* m;
  uint32_t idx;
  uint8_t* esp;       // the ESP header
  uint8_t* payload;   // what is encrypted: the inner packet and its trailer
  uint8_t* icv;       // where the ICV goes in the packet
  uint16_t padded;    // payload bytes
  uint8_t aad_len;    // AEAD: the AAD's bytes in scratch
  bool tag_copy;      // CBC + ESN: the tag is computed into scratch
};

}  // namespace

void esp_outbound(Worker& w, EspWorker& ew, const Sad& sad, Burst& b) {
  OutJob jobs[kMaxBurst];
  bool ok[kMaxBurst];
  unsigned nj = 0;
  rte_ring* events = sad.event_ring();
  auto complete = [&](IMB_JOB* job) {
    unsigned j = unsigned(uintptr_t(job->user_data2));
    OutJob& oj = jobs[j];
    if (job->status != IMB_STATUS_COMPLETED) {
      ok[j] = false;
      return;
    }
    if (oj.tag_copy) std::memcpy(oj.icv, ew.scratch[j].tag, kIcvLen);
    ok[j] = true;
  };

  // Pass 1: refuse what cannot be sent before any sequence number is taken,
  // so a refused packet leaves no gap for the receiver's loss metric.
  // esp_mtu has checked what it sized (the worker's way): only a packet
  // given here without it (a caller of esp_outbound alone) is checked here.
  uint64_t pws[kMaxBurst];  // the peer word of each packet kept
  uint16_t nv = 0;
  for (; nv < b.n; nv++) {
    EspWorker::Sized& sized = ew.sized[nv];
    if (sized.m != b.pkts[nv]) break;
    pws[nv] = sized.peer;
    sized.m = nullptr;  // used once
  }
  if (nv < b.n) {
    SaPrefetch prefetch_sa{sad};
    for (uint16_t i = nv; i < b.n && i < nv + kPrefetchAhead; i++) prefetch_sa(meta(b.pkts[i]).sa);
    for (uint16_t i = nv; i < b.n; i++) {
      if (i + kPrefetchAhead < b.n) prefetch_sa(meta(b.pkts[i + kPrefetchAhead]).sa);
      rte_mbuf* m = b.pkts[i];
      PktMeta& md = meta(m);
      uint32_t idx = md.sa;
      EspWorker::Sized sized = ew.sized[i];
      ew.sized[i].m = nullptr;
      if (!sa_sends(w, sad, idx, m)) continue;
      const Sa& sa = sad.sa(idx);
      uint64_t pw = sized.m == m && sized.sa == idx ? sized.peer : sa.peer.load(std::memory_order_acquire);
      auto* inner = rte_pktmbuf_mtod_offset(m, const rte_ipv4_hdr*, md.l3_off);
      if (!contiguous(m) || !esp_room(sa, m, md.l3_off, rte_be_to_cpu_16(inner->total_length), peer_udp(pw))) {
        drop_sa(w, sad, idx, m, Drop::esp_no_room);
        continue;
      }
      pws[nv] = pw;
      b.pkts[nv++] = m;
    }
  }
  b.n = nv;

  // Pass 2: a run of packets on one SA takes its sequence numbers with one
  // fetch-add on the SA's shared line (the only write to a line another
  // worker may also write) and counts into this worker's SaTraffic once.
  uint32_t run_idx = kNoSa;
  uint64_t run_seq = 0, run_pkts = 0, run_bytes = 0;
  auto end_run = [&]() {
    if (run_idx != kNoSa && run_pkts) lifetime_count(ew, sad, w.id, run_idx, run_pkts, run_bytes);
    run_pkts = run_bytes = 0;
  };
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    uint32_t idx = md.sa;
    Sa& sa = sad.sa(idx);
    if (idx != run_idx) {
      end_run();
      uint16_t len = 1;
      while (i + len < b.n && meta(b.pkts[i + len]).sa == idx) len++;
      run_idx = idx;
      run_seq = __atomic_fetch_add(&sa.seq, len, __ATOMIC_RELAXED);
      // On the line the fetch-add just took: no extra trip between caches.
      __atomic_store_n(&sa.last_tsc, w.now_tsc, __ATOMIC_RELAXED);
    }
    uint64_t seq = ++run_seq;
    const uint64_t peer = pws[i];  // the packet's one peer word (pass 1)
    auto* inner = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, md.l3_off);
    uint16_t inner_len = rte_be_to_cpu_16(inner->total_length);
    uint8_t nat = peer_udp(peer) ? sizeof(rte_udp_hdr) : 0;
    uint16_t head = uint16_t(kEth + sizeof(rte_ipv4_hdr) + nat + 8 + sa.iv_len);
    uint16_t padded = uint16_t((inner_len + 2 + sa.align - 1) & ~(sa.align - 1));
    uint8_t pad = uint8_t(padded - inner_len - 2);
    uint16_t tail = uint16_t(pad + 2 + kIcvLen);
    if (!sa.esn && seq > 0xffffffffull) {
      // RFC 4303 §3.3.3: without ESN the counter must not cycle; the SA is done.
      if (!(sa.state.fetch_or(kSaHardPosted) & kSaHardPosted)) {
        if (!sa_post(events, SaEvent{idx, sa.spi, peer_addr(peer), SaEventKind::seq_overflow, {}})) ew.stats.events_lost.add();
      }
      drop_sa(w, sad, idx, m, Drop::esp_seq_overflow);
      continue;
    }
    run_pkts++;
    run_bytes += inner_len;

    uint8_t inner_tos = inner->type_of_service;
    bool inner_df = inner->fragment_offset & rte_cpu_to_be_16(RTE_IPV4_HDR_DF_FLAG);
    // The frame becomes the outer headers, the inner packet, the trailer
    // (padding 1, 2, 3..., pad length, next header) and the ICV. Pass 1 or
    // esp_mtu found the one segment has room for both ends (esp_room), so
    // its bounds are set at once rather than cut and grown four times.
    m->data_off = uint16_t(m->data_off + md.l3_off - head);
    m->data_len = uint16_t(head + inner_len + tail);
    m->pkt_len = m->data_len;
    auto* p = rte_pktmbuf_mtod(m, uint8_t*);
    uint8_t* t = p + head + inner_len;
    for (uint8_t k = 0; k < pad; k++) t[k] = uint8_t(k + 1);
    t[pad] = pad;
    t[pad + 1] = kNextIpv4;
    auto* eth = reinterpret_cast<rte_ether_hdr*>(p);
    eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
    auto* ip = reinterpret_cast<rte_ipv4_hdr*>(p + kEth);
    uint16_t outer_len = uint16_t(rte_pktmbuf_pkt_len(m) - kEth);
    uint8_t tos = uint8_t((inner_tos & 0xfc) | ecn_encap(inner_tos & 3));
    uint16_t id = ew.ip_id++;
    bool df = sa.df == OuterDf::set || (sa.df == OuterDf::copy && inner_df);
    uint16_t frag = df ? RTE_IPV4_HDR_DF_FLAG : 0;
    uint8_t proto = nat ? uint8_t(IPPROTO_UDP) : kProtoEsp;
    uint32_t dst = peer_addr(peer);
    uint32_t src = sa.local.load(std::memory_order_relaxed);  // one read: header and checksum agree
    // The checksum is summed from the values, not read back from the header
    // just written: byte stores read back as words stall store forwarding.
    uint32_t sum = (0x4500u | tos) + outer_len + id + frag + (uint32_t(sa.ttl) << 8 | proto) +
                   (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip->version_ihl = 0x45;
    ip->type_of_service = tos;
    ip->total_length = rte_cpu_to_be_16(outer_len);
    ip->packet_id = rte_cpu_to_be_16(id);
    ip->fragment_offset = rte_cpu_to_be_16(frag);
    ip->time_to_live = sa.ttl;
    ip->next_proto_id = proto;
    ip->hdr_checksum = rte_cpu_to_be_16(uint16_t(~sum));
    ip->src_addr = rte_cpu_to_be_32(src);
    ip->dst_addr = rte_cpu_to_be_32(dst);
    uint8_t* esp = p + kEth + sizeof(rte_ipv4_hdr);
    if (nat) {
      auto* udp = reinterpret_cast<rte_udp_hdr*>(esp);
      udp->src_port = rte_cpu_to_be_16(sa.local_port);
      udp->dst_port = rte_cpu_to_be_16(peer_port(peer));
      udp->dgram_len = rte_cpu_to_be_16(uint16_t(outer_len - sizeof(rte_ipv4_hdr)));
      udp->dgram_cksum = 0;  // RFC 3948 §2.1: zero for ESP in UDP over IPv4
      esp += sizeof(rte_udp_hdr);
    }
    put_be32(esp, sa.spi);
    put_be32(esp + 4, uint32_t(seq));
    uint8_t* iv = esp + 8;
    uint8_t* payload = iv + sa.iv_len;
    uint8_t* icv = payload + padded;
    EspWorker::Scratch& sc = ew.scratch[nj];
    md.l3_off = kEth;
    md.generated = 1;
    OutJob& oj = jobs[nj];
    oj = OutJob{m, idx, esp, payload, icv, padded, 0, false};
    ok[nj++] = false;
    if (is_aead(sa.cipher)) {
      // RFC 4106 §3.1 / RFC 7634 §2: the 8-byte IV only has to be unique per
      // key; the sequence number is (and reveals nothing new).
      put_be64(iv, seq);
      oj.aad_len = uint8_t(nonce_aad(sa, sc, esp, iv, seq));
    } else {
      // CBC needs an unpredictable IV (RFC 3602 §2.4). NIST SP 800-38A
      // App. C: encrypt a nonce. Ciphering the IV field itself, holding the
      // nonce (per-SA random || sequence number), with a zero IV makes its
      // ciphertext that IV: the one job yields IV and payload, no extra AES call.
      std::memcpy(iv, sa.cbc_nonce, 8);
      put_be64(iv + 8, seq);
      if (sa.esn) {
        // RFC 4303 §2.2.1: the ICV also covers the high 32 bits of the ESN,
        // appended to the data but not sent. They sit where the ICV will go.
        put_be32(icv, uint32_t(seq >> 32));
        oj.tag_copy = true;
      }
    }
  }
  end_run();

  // Pass 3: seal. Apart from pass 2 on purpose: IPsec-MB reads the nonce,
  // the AAD and the payload's last block with wide (masked) loads, which
  // cannot take their bytes from the narrower stores pass 2 just made and
  // wait until those stores reach the cache: 15-21 ns per packet when
  // each packet was sealed right after its headers were written
  // (docs/PERFORMANCE.md). A burst later, they are there.
  for (unsigned j = 0; j < nj; j++) {
    OutJob& oj = jobs[j];
    const Sa& sa = sad.sa(oj.idx);
    const SaKeys& k = sad.keys(oj.idx);
    EspWorker::Scratch& sc = ew.scratch[j];
    if (is_gcm(sa.cipher)) {
      gcm_direct(ew.mb, sa.cipher, true, &k.gcm, oj.payload, oj.padded, sc, oj.aad_len, oj.icv);
      ok[j] = true;
      continue;
    }
    IMB_JOB* job = IMB_GET_NEXT_JOB(ew.mb);
    job->src = oj.esp;
    job->dst = oj.payload;
    job->cipher_direction = IMB_DIR_ENCRYPT;
    job->chain_order = IMB_ORDER_CIPHER_HASH;
    job->auth_tag_output_len_in_bytes = kIcvLen;
    job->user_data = oj.m;
    job->user_data2 = reinterpret_cast<void*>(uintptr_t(j));
    job->auth_tag_output = oj.tag_copy ? sc.tag : oj.icv;
    if (is_aead(sa.cipher)) {
      job->cipher_start_src_offset_in_bytes = uint64_t(oj.payload - oj.esp);
      job->msg_len_to_cipher_in_bytes = oj.padded;
      job->hash_start_src_offset_in_bytes = uint64_t(oj.payload - oj.esp);
      job->msg_len_to_hash_in_bytes = oj.padded;
      set_aead(job, sa, k, sc, oj.aad_len);
    } else {
      uint8_t* iv = oj.esp + 8;
      job->dst = iv;
      job->cipher_start_src_offset_in_bytes = 8;
      job->msg_len_to_cipher_in_bytes = uint64_t(16 + oj.padded);
      job->iv = kZeroIv;
      // With ESN the high half of the sequence number, after the payload, is hashed too.
      set_cbc_hmac(job, sa, k, uint64_t(8 + 16 + oj.padded) + (sa.esn ? 4 : 0));
    }
    job = submit_job(ew.mb);
    while (job) {
      complete(job);
      job = IMB_GET_COMPLETED_JOB(ew.mb);
    }
  }
  IMB_JOB* job;
  while ((job = IMB_FLUSH_JOB(ew.mb))) complete(job);

  uint16_t n = 0;
  for (unsigned j = 0; j < nj; j++) {
    if (!ok[j]) { drop_sa(w, sad, jobs[j].idx, jobs[j].m, Drop::esp_crypto_failed); continue; }
    b.pkts[n++] = jobs[j].m;
  }
  ew.stats.encrypted.add(n);
  b.n = n;
}

// ----------------------------------------------------------------- inbound

namespace {

struct InJob {
  rte_mbuf* m;
  uint32_t idx;
  uint64_t seq;
  uint16_t esp_off;   // ESP header, from the data start
  uint16_t ct_len;    // ciphertext (payload + trailer) bytes
  uint8_t outer_ecn;
  uint8_t aad_len;    // AEAD: the AAD's bytes in scratch
  bool ok;
};

// Counts an unknown SPI against its source and posts a rate-limited event:
// it is how the control thread learns of a peer using a stale SA (seed 003).
void unknown_spi(Worker& w, EspWorker& ew, rte_ring* events, uint32_t src, uint32_t spi) {
  UnknownSpi& u = ew.unknown[(src * 2654435761u) >> 24];
  if (u.src != src) {
    u.src = src;
    u.count.v = 0;
    u.last_event_tsc = 0;
  }
  u.spi = spi;
  u.count.add();
  if (u.last_event_tsc == 0 || w.now_tsc - u.last_event_tsc >= ew.unknown_event_gap_tsc) {
    u.last_event_tsc = w.now_tsc ? w.now_tsc : 1;
    if (sa_post(events, SaEvent{kNoSa, spi, src, SaEventKind::unknown_spi, {}})) ew.stats.unknown_spi_events.add();
    else ew.stats.events_lost.add();
  }
}

// The slot of a fragment key (RFC 791: source, destination, protocol, id)
// in EspWorker::frag_fed_tsc.
inline unsigned fed_slot(const rte_ipv4_hdr* ip) {
  uint32_t k = ip->src_addr * 2654435761u ^ ip->dst_addr * 40503u ^ (uint32_t(ip->packet_id) << 8 | ip->next_proto_id);
  return (k * 2654435761u) >> (32 - 10);
}
static_assert(EspWorker::kFedSlots == 1u << 10);

// Hands a fragment to the reassembly table; returns the whole packet (one
// segment when it fits) or nullptr while fragments are missing. The table
// wants the L2 header in front and l2_len/l3_len set; it leaves the checksum
// of the result to offload, so it is recomputed.
rte_mbuf* reassemble(Worker& w, EspWorker& ew, rte_mbuf* m, uint16_t l3_off) {
  auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, l3_off);
  m->l2_len = l3_off;
  m->l3_len = uint16_t((ip->version_ihl & 0xf) * 4);
  ew.frag_fed_tsc[fed_slot(ip)] = w.now_tsc;
  rte_mbuf* r = rte_ipv4_frag_reassemble_packet(ew.frag, &ew.death_row, m, w.now_tsc, ip);
  if (ew.death_row.cnt > RTE_IP_FRAG_DEATH_ROW_MBUF_LEN / 2) {
    w.stats.drops[static_cast<unsigned>(Drop::esp_reassembly_failed)].add(ew.death_row.cnt);
    rte_ip_frag_free_death_row(&ew.death_row, 0);
  }
  if (!r) {
    ew.stats.frag_held.add();
    return nullptr;
  }
  ip_cksum(rte_pktmbuf_mtod_offset(r, rte_ipv4_hdr*, r->l2_len));
  rte_pktmbuf_linearize(r);  // best effort: a chain stays valid for later stages
  return r;
}

// Inner reassembly without the table for the common case. Moat's
// fragment-inner (and most senders) emit all fragments of a datagram one
// after another on one SA, so they are decrypted back to back in one burst;
// the table's lookup of every first fragment (two 16-way buckets of 256-byte
// entries in a table that the packet stream keeps evicting) was most of the
// reassembly's cost (docs/PERFORMANCE.md). rte_ip_frag has no such path: its
// only entry point is the table. So a run of fragments of one datagram on
// one SA — first at offset 0, each next one starting where the last ended,
// the last with MF clear, every one with payload, at most the table's
// RTE_LIBRTE_IP_FRAG_MAX_FRAG, the whole at most 65,535 bytes — is joined
// here into what the table would return: the first fragment's mbuf and
// header, total length set, MF and offset cleared, checksum recomputed, the
// other payloads copied behind it (chained when it lacks the room), and
// frag_held/inner_reassembled counted alike.
//
// Anything else goes to the table in arrival order, exactly as before:
// a run that breaks off (another key or SA, a gap, an overlap, a duplicate,
// too many pieces, a non-fragment or the burst's end) hands its fragments to
// the table, whose result takes the run's place in the burst. A run is also
// handed over when its key went into the table less than the table's
// timeout ago (frag_fed_tsc, conservative under hash collisions): a live
// entry could hold fragments of it (a duplicate, a retransmission), and the
// table must see them together. The one difference: a joined datagram needs
// no table slot, so a full table (a flood of fragments that never complete)
// no longer refuses datagrams that arrive whole.
struct FragRun {
  static constexpr unsigned kMax = RTE_LIBRTE_IP_FRAG_MAX_FRAG;
  rte_mbuf* m[kMax];
  unsigned n = 0;
  uint32_t sa = kNoSa;
  uint32_t src = 0, dst = 0;  // network order, as in the header
  uint16_t id = 0;
  uint8_t proto = 0;
  uint16_t ihl0 = 0;     // the first fragment's header length
  uint32_t next = 0;     // bytes of payload so far: where the next one starts

  static const rte_ipv4_hdr* ip(rte_mbuf* f) { return rte_pktmbuf_mtod_offset(f, const rte_ipv4_hdr*, kEth); }

  // Every held fragment to the table, in arrival order; what it completes
  // goes to `out`.
  void to_table(Worker& w, EspWorker& ew, Burst& out) {
    for (unsigned k = 0; k < n; k++) {
      PktMeta saved = meta(m[k]);
      rte_mbuf* whole = reassemble(w, ew, m[k], kEth);
      if (!whole) continue;
      meta(whole) = saved;
      ew.stats.inner_reassembled.add();
      out.pkts[out.n++] = whole;
    }
    n = 0;
  }

  // One decrypted inner fragment (l3 at kEth, total/ihl checked, meta set).
  void add(Worker& w, EspWorker& ew, rte_mbuf* f, Burst& out) {
    const rte_ipv4_hdr* h = ip(f);
    uint16_t fo = rte_be_to_cpu_16(h->fragment_offset);
    uint32_t off = uint32_t(fo & RTE_IPV4_HDR_OFFSET_MASK) * RTE_IPV4_HDR_OFFSET_UNITS;
    bool more = fo & RTE_IPV4_HDR_MF_FLAG;
    uint16_t ihl = uint16_t((h->version_ihl & 0xf) * 4);
    uint32_t len = uint32_t(rte_be_to_cpu_16(h->total_length) - ihl);
    if (off == 0) {
      to_table(w, ew, out);
      if (len == 0) {  // nothing to join: the table decides
        m[n++] = f;
        to_table(w, ew, out);
        return;
      }
      m[n++] = f;
      sa = meta(f).sa;
      src = h->src_addr;
      dst = h->dst_addr;
      id = h->packet_id;
      proto = h->next_proto_id;
      ihl0 = ihl;
      next = len;
      return;
    }
    if (n == 0 || n == kMax || off != next || len == 0 || h->packet_id != id || h->src_addr != src ||
        h->dst_addr != dst || h->next_proto_id != proto || meta(f).sa != sa || ihl0 + next + len > 0xffff) {
      to_table(w, ew, out);
      m[n++] = f;
      to_table(w, ew, out);
      return;
    }
    m[n++] = f;
    next += len;
    if (more) return;
    uint64_t fed = ew.frag_fed_tsc[fed_slot(h)];
    if (fed && w.now_tsc - fed <= ew.frag_timeout_tsc) {
      to_table(w, ew, out);
      return;
    }
    out.pkts[out.n++] = join(ew);
  }

  rte_mbuf* join(EspWorker& ew) {
    rte_mbuf* head = m[0];
    PktMeta last = meta(m[n - 1]);
    uint32_t extra = next - (rte_pktmbuf_pkt_len(head) - kEth - ihl0);
    bool copy = rte_pktmbuf_is_contiguous(head) && rte_pktmbuf_tailroom(head) >= extra;
    for (unsigned k = 1; k < n; k++) {
      rte_mbuf* f = m[k];
      uint16_t hl = uint16_t(kEth + (ip(f)->version_ihl & 0xf) * 4);
      if (copy && rte_pktmbuf_is_contiguous(f)) {
        uint16_t len = uint16_t(rte_pktmbuf_data_len(f) - hl);
        std::memcpy(rte_pktmbuf_append(head, len), rte_pktmbuf_mtod_offset(f, const uint8_t*, hl), len);
        rte_pktmbuf_free(f);
      } else {
        copy = false;
        rte_pktmbuf_adj(f, hl);
        rte_pktmbuf_chain(head, f);  // at most kMax segments: cannot overflow
      }
      ew.stats.frag_held.add();
    }
    auto* h = rte_pktmbuf_mtod_offset(head, rte_ipv4_hdr*, kEth);
    h->total_length = rte_cpu_to_be_16(uint16_t(ihl0 + next));
    h->fragment_offset &= rte_cpu_to_be_16(RTE_IPV4_HDR_DF_FLAG);
    ip_cksum(h);
    head->l2_len = kEth;
    head->l3_len = ihl0;
    meta(head) = last;
    ew.stats.inner_reassembled.add();
    ew.stats.inner_joined.add();
    n = 0;
    return head;
  }
};

}  // namespace

void esp_inbound(Worker& w, EspWorker& ew, const Sad& sad, Burst& b) {
  rte_ring* events = sad.event_ring();
  InJob jobs[kMaxBurst];
  uint32_t spi_be[kMaxBurst] = {};
  uint32_t idx[kMaxBurst];
  unsigned nc = 0;  // candidates for SPI lookup

  // 1. Outer checks: NAT-T demux, outer reassembly, ESP header in reach.
  for (uint16_t i = 0; i < b.n; i++) {
    rte_mbuf* m = b.pkts[i];
    PktMeta& md = meta(m);
    auto* ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, md.l3_off);
    if (is_fragment(ip)) {
      // Outer fragments (a path that fragmented our peer's ESP): whole first.
      PktMeta saved = md;
      rte_mbuf* r = reassemble(w, ew, m, md.l3_off);
      if (!r) continue;
      meta(r) = saved;
      meta(r).l3_off = uint16_t(r->l2_len);
      ew.stats.outer_reassembled.add();
      m = r;
      ip = rte_pktmbuf_mtod_offset(m, rte_ipv4_hdr*, meta(m).l3_off);
    }
    if (!contiguous(m)) { w.drop(m, Drop::esp_no_room); continue; }
    uint16_t l3 = meta(m).l3_off;
    uint16_t ihl = uint16_t((ip->version_ihl & 0xf) * 4);
    uint16_t total = rte_be_to_cpu_16(ip->total_length);
    uint16_t off = uint16_t(l3 + ihl);
    uint16_t end = uint16_t(l3 + total);
    if (end > rte_pktmbuf_data_len(m)) { w.drop(m, Drop::esp_truncated); continue; }
    if (ip->next_proto_id == IPPROTO_UDP) {
      if (end < off + sizeof(rte_udp_hdr)) { w.drop(m, Drop::esp_truncated); continue; }
      auto* udp = rte_pktmbuf_mtod_offset(m, rte_udp_hdr*, off);
      if (udp->dst_port != rte_cpu_to_be_16(kNatTPort)) { w.drop(m, Drop::esp_not_esp); continue; }
      off = uint16_t(off + sizeof(rte_udp_hdr));
      const uint8_t* pl = rte_pktmbuf_mtod_offset(m, const uint8_t*, off);
      // RFC 3948 §2.2/§2.3: a lone 0xff is a keepalive; four zero bytes
      // (the non-ESP marker) introduce IKE, which the control thread owns.
      if (end - off == 1 && pl[0] == 0xff) { w.drop(m, Drop::esp_natt_keepalive); continue; }
      if (end - off >= 4 && pl[0] == 0 && pl[1] == 0 && pl[2] == 0 && pl[3] == 0) {
        meta(m).punt = Punt::local;
        if (w.punt.n == kMaxBurst) punt_flush(w);
        w.punt.push(m);
        ew.stats.ike_punted.add();
        continue;
      }
    } else if (ip->next_proto_id != kProtoEsp) {
      w.drop(m, Drop::esp_not_esp);
      continue;
    }
    if (end < off + 8) { w.drop(m, Drop::esp_truncated); continue; }
    InJob& j = jobs[nc];
    j.m = m;
    j.esp_off = off;
    j.ct_len = uint16_t(end - off);  // whole ESP for now; narrowed once the SA is known
    j.outer_ecn = ip->type_of_service & 3;
    std::memcpy(&spi_be[nc], rte_pktmbuf_mtod_offset(m, const uint8_t*, off), 4);
    nc++;
  }

  // 2. SA by SPI, one bulk lookup.
  sad.lookup_spis(spi_be, nc, idx);

  // 3. Per SA: lifetime, lengths, anti-replay before any crypto.
  unsigned nj = 0;
  auto complete = [&](IMB_JOB* job) {
    unsigned j = unsigned(uintptr_t(job->user_data2));
    jobs[j].ok = job->status == IMB_STATUS_COMPLETED;
  };
  SaPrefetch prefetch_sa{sad};
  for (unsigned c = 0; c < nc && c < kPrefetchAhead; c++) prefetch_sa(idx[c]);
  for (unsigned c = 0; c < nc; c++) {
    if (c + kPrefetchAhead < nc) prefetch_sa(idx[c + kPrefetchAhead]);
    InJob j = jobs[c];
    rte_mbuf* m = j.m;
    uint32_t sai = idx[c];
    if (sai == kNoSa) {
      auto* ip = rte_pktmbuf_mtod_offset(m, const rte_ipv4_hdr*, meta(m).l3_off);
      unknown_spi(w, ew, events, rte_be_to_cpu_32(ip->src_addr), rte_be_to_cpu_32(spi_be[c]));
      w.drop(m, Drop::esp_unknown_spi);
      continue;
    }
    Sa& sa = sad.sa(sai);
    uint32_t st = sa.state.load(std::memory_order_relaxed);
    if (!(st & kSaLive) || (st & kSaHardPosted)) { drop_sa(w, sad, sai, m, Drop::esp_sa_expired); continue; }
    uint16_t esp_len = j.ct_len;
    int ct = int(esp_len) - 8 - sa.iv_len - kIcvLen;
    // align is a power of two (4 or 16): a mask, not a division per packet.
    if (ct < sa.align || (ct & (sa.align - 1))) { drop_sa(w, sad, sai, m, Drop::esp_truncated); continue; }
    uint8_t* esp = rte_pktmbuf_mtod_offset(m, uint8_t*, j.esp_off);
    uint32_t seq_lo;
    std::memcpy(&seq_lo, esp + 4, 4);
    seq_lo = rte_be_to_cpu_32(seq_lo);
    uint64_t seq = replay_seq64(sa, seq_lo);
    Replay r = replay_check(sa, seq);
    if (r != Replay::ok) {
      if (r == Replay::replayed) sa_bump(sa.dups, 1);
      drop_sa(w, sad, sai, m, r == Replay::replayed ? Drop::esp_replayed : Drop::esp_too_old);
      continue;
    }
    j.idx = sai;
    j.seq = seq;
    j.ct_len = uint16_t(ct);
    j.ok = false;
    jobs[nj] = j;

    // The nonce, the AAD and the received ICV go to scratch now (and, for
    // CBC with ESN, the high half in the packet); the crypto runs in the next
    // pass, once these stores have reached the cache (see esp_outbound's pass 3).
    uint8_t* iv = esp + 8;
    EspWorker::Scratch& sc = ew.scratch[nj];
    uint8_t* icv = iv + sa.iv_len + ct;
    std::memcpy(sc.icv, icv, kIcvLen);
    if (is_aead(sa.cipher)) {
      jobs[nj].aad_len = uint8_t(nonce_aad(sa, sc, esp, iv, seq));
    } else if (sa.esn) {
      // The HMAC covers the ESN's high half after the payload (RFC 4303
      // §2.2.1): written over the received ICV, just saved.
      put_be32(icv, uint32_t(seq >> 32));
    }
    nj++;
  }

  // 4. Authenticate and decrypt.
  for (unsigned c = 0; c < nj; c++) {
    InJob& j = jobs[c];
    const Sa& sa = sad.sa(j.idx);
    const SaKeys& k = sad.keys(j.idx);
    EspWorker::Scratch& sc = ew.scratch[c];
    uint8_t* esp = rte_pktmbuf_mtod_offset(j.m, uint8_t*, j.esp_off);
    uint8_t* iv = esp + 8;
    uint8_t* payload = iv + sa.iv_len;
    if (is_gcm(sa.cipher)) {
      gcm_direct(ew.mb, sa.cipher, false, &k.gcm, payload, j.ct_len, sc, j.aad_len, sc.tag);
      j.ok = true;
      continue;
    }
    IMB_JOB* job = IMB_GET_NEXT_JOB(ew.mb);
    job->src = esp;
    job->dst = payload;
    job->cipher_direction = IMB_DIR_DECRYPT;
    job->chain_order = IMB_ORDER_HASH_CIPHER;
    job->auth_tag_output = sc.tag;
    job->auth_tag_output_len_in_bytes = kIcvLen;
    job->user_data = j.m;
    job->user_data2 = reinterpret_cast<void*>(uintptr_t(c));
    job->cipher_start_src_offset_in_bytes = uint64_t(payload - esp);
    job->msg_len_to_cipher_in_bytes = j.ct_len;
    if (is_aead(sa.cipher)) {
      job->hash_start_src_offset_in_bytes = uint64_t(payload - esp);
      job->msg_len_to_hash_in_bytes = j.ct_len;
      set_aead(job, sa, k, sc, j.aad_len);
    } else {
      job->iv = iv;
      set_cbc_hmac(job, sa, k, uint64_t(8 + 16 + j.ct_len) + (sa.esn ? 4 : 0));
    }
    job = submit_job(ew.mb);
    while (job) {
      complete(job);
      job = IMB_GET_COMPLETED_JOB(ew.mb);
    }
  }
  IMB_JOB* fj;
  while ((fj = IMB_FLUSH_JOB(ew.mb))) complete(fj);

  // 5. Authenticated? Then the window, the trailer, the inner packet. The
  // lifetimes are counted once per run of packets of one SA (as outbound):
  // their line is read and written once, not per packet.
  // Survivors are written back into b from the front (b.n never passes the
  // job being looked at: each survivor or table result consumes one job).
  b.n = 0;
  FragRun run;
  uint32_t run_idx = kNoSa;
  uint64_t run_pkts = 0, run_bytes = 0;
  auto end_run = [&]() {
    if (run_pkts) {
      __atomic_store_n(&sad.sa(run_idx).last_tsc, w.now_tsc, __ATOMIC_RELAXED);
      lifetime_count(ew, sad, w.id, run_idx, run_pkts, run_bytes);
    }
    run_pkts = run_bytes = 0;
  };
  // The trailers first, in a loop of their own: each is the last bytes the
  // decryption wrote, and read inside the checks below each load waited
  // before the next packet's could start (the profile's hot spot).
  // Where the decrypted payload (the inner packet) starts: after SPI, sequence number and IV.
  auto payload_off = [&](const InJob& j) { return uint16_t(j.esp_off + 8 + sad.sa(j.idx).iv_len); };
  uint8_t pads[kMaxBurst], nhs[kMaxBurst];
  for (unsigned c = 0; c < nj; c++) {
    const uint8_t* end = rte_pktmbuf_mtod_offset(jobs[c].m, const uint8_t*, payload_off(jobs[c]) + jobs[c].ct_len);
    pads[c] = end[-2];
    nhs[c] = end[-1];
  }
  for (unsigned c = 0; c < nj; c++) {
    InJob& j = jobs[c];
    rte_mbuf* m = j.m;
    Sa& sa = sad.sa(j.idx);
    EspWorker::Scratch& sc = ew.scratch[c];
    if (!j.ok) { drop_sa(w, sad, j.idx, m, Drop::esp_crypto_failed); continue; }
    if (!tag_eq(sc.tag, sc.icv)) {
      sa_bump(sa.auth_fail, 1);
      drop_sa(w, sad, j.idx, m, Drop::esp_bad_icv);
      continue;
    }
    Replay r = replay_update(sa, j.seq);
    if (r != Replay::ok) {  // a copy earlier in this burst got there first
      if (r == Replay::replayed) sa_bump(sa.dups, 1);
      drop_sa(w, sad, j.idx, m, r == Replay::replayed ? Drop::esp_replayed : Drop::esp_too_old);
      continue;
    }
    const uint16_t inner_off = payload_off(j);
    uint8_t* payload = rte_pktmbuf_mtod_offset(m, uint8_t*, inner_off);
    uint8_t pad = pads[c];
    uint8_t nh = nhs[c];
    if (pad + 2 > j.ct_len) { drop_sa(w, sad, j.idx, m, Drop::esp_bad_padding); continue; }
    uint16_t inner_len = uint16_t(j.ct_len - 2 - pad);
    bool pad_ok = true;
    for (uint8_t k = 0; k < pad; k++) pad_ok &= payload[inner_len + k] == uint8_t(k + 1);
    if (!pad_ok) { drop_sa(w, sad, j.idx, m, Drop::esp_bad_padding); continue; }
    if (nh == kNextNone) { drop_sa(w, sad, j.idx, m, Drop::esp_dummy); continue; }
    if (nh != kNextIpv4) { drop_sa(w, sad, j.idx, m, Drop::esp_bad_next_header); continue; }
    auto* inner = reinterpret_cast<rte_ipv4_hdr*>(payload);
    uint16_t ihl = uint16_t((inner->version_ihl & 0xf) * 4);
    uint16_t total = inner_len >= sizeof(rte_ipv4_hdr) ? rte_be_to_cpu_16(inner->total_length) : 0;
    // TFC padding (RFC 4303 §2.7) may follow the inner packet: total ≤ inner_len.
    if (inner_len < sizeof(rte_ipv4_hdr) || (inner->version_ihl >> 4) != 4 || ihl < 20 ||
        total < ihl || total > inner_len || ipv4_hdr_sum(inner, ihl) != 0xffff) {
      drop_sa(w, sad, j.idx, m, Drop::esp_inner_malformed);
      continue;
    }
    if (!funnels_allow(sa, rte_be_to_cpu_32(inner->src_addr), rte_be_to_cpu_32(inner->dst_addr))) {
      drop_sa(w, sad, j.idx, m, Drop::esp_selector_mismatch);
      continue;
    }
    int ecn = ecn_decap(j.outer_ecn, inner->type_of_service & 3);
    if (ecn < 0) { drop_sa(w, sad, j.idx, m, Drop::esp_ecn_drop); continue; }
    if (ecn != (inner->type_of_service & 3)) {
      inner->type_of_service = uint8_t((inner->type_of_service & 0xfc) | ecn);
      ip_cksum(inner);
    }
    if (j.idx != run_idx) {
      end_run();
      run_idx = j.idx;
    }
    run_pkts++;
    run_bytes += total;

    // The inner packet replaces the outer one: Ethernet room in front, the
    // trailer and ICV cut off, metadata as if it had just been parsed.
    uint16_t in_port = meta(m).in_port;
    uint16_t vlan = meta(m).vlan;
    // The outer frame's MACs go in front of the inner packet: a packet for
    // one of our addresses is punted to the kernel as this frame, and a
    // kernel drops a frame whose destination MAC is not its own (bytes of
    // the outer headers left there made corp → router services fail).
    const rte_ether_hdr outer_eth = *rte_pktmbuf_mtod(m, const rte_ether_hdr*);
    rte_pktmbuf_adj(m, uint16_t(inner_off - kEth));
    rte_pktmbuf_trim(m, uint16_t(rte_pktmbuf_pkt_len(m) - kEth - total));
    auto* eth = rte_pktmbuf_mtod(m, rte_ether_hdr*);
    eth->dst_addr = outer_eth.dst_addr;
    eth->src_addr = outer_eth.src_addr;
    eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
    PktMeta& md = meta(m);
    md = PktMeta{};
    md.l3_off = kEth;
    md.in_port = in_port;
    md.vlan = vlan;
    md.out_port = kNoPort;
    md.sa = j.idx;
    md.in_tunnel = uint16_t(sa.tunnel);  // its zone for the policy stages
    if (is_fragment(inner)) {
      run.add(w, ew, m, b);
    } else {
      run.to_table(w, ew, b);  // a run broken off goes first: arrival order
      b.pkts[b.n++] = m;
    }
  }
  run.to_table(w, ew, b);
  end_run();
  ew.stats.decrypted.add(b.n);
}

}  // namespace moat
