#include "bench/esp.hh"

#include <immintrin.h>
#include <intel-ipsec-mb.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace moat::bench {

namespace {

void put16(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v >> 8);
  p[1] = uint8_t(v);
}
void put32(uint8_t* p, uint32_t v) {
  put16(p, uint16_t(v >> 16));
  put16(p + 2, uint16_t(v));
}
uint32_t get32(const uint8_t* p) { return (uint32_t(p[0]) << 24) | (p[1] << 16) | (p[2] << 8) | p[3]; }

uint16_t ip_csum(const uint8_t* p) {
  uint32_t s = 0;
  for (int i = 0; i < 20; i += 2) s += (uint32_t(p[i]) << 8) | p[i + 1];
  return uint16_t(~fold_csum(s));
}

gcm_key_data* keys_of(const EspSa& sa) { return static_cast<gcm_key_data*>(sa.gcm_keys); }

}  // namespace

unsigned Esp::inner_len(unsigned size) {
  // size = FCS + Ethernet + outer IPv4 + ESP header + IV + payload + ICV,
  // payload = inner + trailer (no padding) rounded down to 4; what does not
  // fit the rounding becomes Ethernet padding after the IP packet.
  const unsigned payload = (size - kFcsBytes - kEthBytes - kIpv4Bytes - kEspHdrBytes - kEspIvBytes - kEspIcvBytes) & ~3u;
  return payload - kEspTrailerBytes;
}

Esp::Esp(const Profile& p) {
  mgr_ = alloc_mb_mgr(0);
  if (!mgr_) throw std::runtime_error("IPsec-MB: cannot allocate a manager");
  init_mb_mgr_auto(mgr_, nullptr);
  if (int e = imb_get_errno(mgr_)) throw std::runtime_error(fmt::format("IPsec-MB: {}", imb_get_strerror(e)));
  const unsigned n = p.esp.sas;
  if (posix_memalign(&key_mem_, 64, sizeof(gcm_key_data) * n) != 0) throw std::bad_alloc();
  sas_.resize(n);
  for (unsigned i = 0; i < n; i++) {
    EspSa& sa = sas_[i];
    const std::vector<uint8_t>* key;
    if (!p.esp.list.empty()) {  // from moatd's configuration
      const EspSaSpec& s = p.esp.list[i];
      sa.spi = s.spi, sa.outer_src = s.outer_src, sa.outer_dst = s.outer_dst;
      key = &s.key;
    } else {
      sa.spi = p.esp.spi + i;
      // SA i: tunnel i, from its own peer (inbound) to one local address.
      sa.outer_src = p.esp.outer_src + i;
      sa.outer_dst = p.esp.outer_dst;
      key = p.esp.keys.size() == 1 ? &p.esp.keys[0] : &p.esp.keys[i];
    }
    if (!sa_of_spi_.emplace(sa.spi, i).second)
      throw std::runtime_error(fmt::format("ESP: SPI {:#x} is used by two SAs", sa.spi));
    std::memcpy(sa.key, key->data(), 16);
    std::memcpy(sa.salt, key->data() + 16, 4);
    sa.gcm_keys = static_cast<gcm_key_data*>(key_mem_) + i;
    IMB_AES128_GCM_PRE(mgr_, sa.key, keys_of(sa));
  }
}

Esp::~Esp() {
  if (mgr_) free_mb_mgr(mgr_);
  std::free(key_mem_);
}

void Esp::encrypt(const EspSa& sa, const uint8_t* iv8, const uint8_t* aad8, const uint8_t* in, size_t len,
                  uint8_t* out, uint8_t* tag) const {
  uint8_t iv[12];
  std::memcpy(iv, sa.salt, 4);  // RFC 4106 nonce: salt || explicit IV
  std::memcpy(iv + 4, iv8, 8);
  gcm_context_data ctx;
  IMB_AES128_GCM_ENC(mgr_, keys_of(sa), &ctx, out, in, len, iv, aad8, 8, tag, kEspIcvBytes);
}

const TagFix* Esp::tag_fix(unsigned sa_index, unsigned size) {
  const uint64_t key = (uint64_t(sa_index) << 16) | size;
  if (auto it = fix_index_.find(key); it != fix_index_.end()) return it->second;
  // GHASH is linear and the keystream does not depend on the data, so the
  // content and IV used here do not matter, only the key and the lengths.
  const EspSa& sa = sas_[sa_index];
  const unsigned payload = inner_len(size) + kEspTrailerBytes;
  std::vector<uint8_t> plain(payload, 0), out(payload);
  uint8_t aad[8] = {}, iv[8] = {}, tag0[16], tag[16];
  put32(aad, sa.spi);
  encrypt(sa, iv, aad, plain.data(), payload, out.data(), tag0);
  auto fix = std::make_unique<TagFix>();
  for (unsigned bit = 0; bit < kEspFixBits; bit++) {
    const unsigned byte = bit / 8;
    const uint8_t mask = uint8_t(0x80 >> (bit % 8));
    uint8_t* where;
    if (byte < 4) where = aad + 4 + byte;  // ESP sequence number
    else if (byte < 6) where = plain.data() + fix_csum_pos_ + (byte - 4);
    else where = plain.data() + fix_stamp_pos_ + (byte - 6);
    *where ^= mask;
    encrypt(sa, iv, aad, plain.data(), payload, out.data(), tag);
    *where ^= mask;
    for (int i = 0; i < 16; i++) tag[i] ^= tag0[i];
    std::memcpy(&fix->delta[bit][0], tag, 8);
    std::memcpy(&fix->delta[bit][1], tag + 8, 8);
  }
  // The fast path's multipliers: the tag's change when the first bit of
  // the AAD block, and of each ciphertext block holding a changed byte,
  // flips.
  const unsigned first_block = std::min(fix_csum_pos_, fix_stamp_pos_) / 16;
  for (unsigned j = 0; j < 4; j++) {
    uint8_t* where = j == 0 ? aad : (first_block + j - 1) * 16 < payload ? plain.data() + (first_block + j - 1) * 16 : nullptr;
    if (!where) {
      std::memset(fix->p[j], 0, 16);
      continue;
    }
    *where ^= 0x80;
    encrypt(sa, iv, aad, plain.data(), payload, out.data(), tag);
    *where ^= 0x80;
    for (int i = 0; i < 16; i++) fix->p[j][i] = tag[15 - i] ^ tag0[15 - i];
  }
  fixes_.push_back(std::move(fix));
  fix_index_[key] = fixes_.back().get();
  return fixes_.back().get();
}

void tag_delta_bits(const TagFix& fx, uint32_t esp_seq, uint16_t dc, uint32_t seq, uint32_t ts, uint8_t out[16]) {
  const uint64_t hi = (uint64_t(esp_seq) << 32) | (uint64_t(dc) << 16) | (seq >> 16);
  const uint64_t lo = (uint64_t(seq & 0xffff) << 32) | ts;  // 48 bits
  uint64_t t0 = 0, t1 = 0;
  // Bit i of the 112 counts from the MSB of `hi` (bits 0..63) into `lo`.
  for (uint64_t m = hi; m; m &= m - 1) {
    const unsigned i = 63u - unsigned(__builtin_ctzll(m));
    t0 ^= fx.delta[i][0];
    t1 ^= fx.delta[i][1];
  }
  for (uint64_t m = lo; m; m &= m - 1) {
    const unsigned i = 64u + 47u - unsigned(__builtin_ctzll(m));
    t0 ^= fx.delta[i][0];
    t1 ^= fx.delta[i][1];
  }
  std::memcpy(out, &t0, 8);
  std::memcpy(out + 8, &t1, 8);
}

bool clmul_available() { return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("ssse3"); }

namespace {

// GF(2^128) product in GCM's bit order, operands and result byte-reversed
// (the carry-less multiplication method of Intel's "Carry-Less
// Multiplication and Its Usage for Computing the GCM Mode", algorithm 5:
// a 256-bit product, shifted left by one for the reflected bit order, then
// reduced modulo x^128 + x^7 + x^2 + x + 1).
__attribute__((target("pclmul,ssse3"))) __m128i gf_mul(__m128i a, __m128i b) {
  __m128i lo = _mm_clmulepi64_si128(a, b, 0x00);
  __m128i mid = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x10), _mm_clmulepi64_si128(a, b, 0x01));
  __m128i hi = _mm_clmulepi64_si128(a, b, 0x11);
  lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
  hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
  __m128i c_lo = _mm_srli_epi32(lo, 31), c_hi = _mm_srli_epi32(hi, 31);
  lo = _mm_slli_epi32(lo, 1);
  hi = _mm_slli_epi32(hi, 1);
  const __m128i top = _mm_srli_si128(c_lo, 12);
  hi = _mm_or_si128(_mm_or_si128(hi, _mm_slli_si128(c_hi, 4)), top);
  lo = _mm_or_si128(lo, _mm_slli_si128(c_lo, 4));
  __m128i r = _mm_xor_si128(_mm_xor_si128(_mm_slli_epi32(lo, 31), _mm_slli_epi32(lo, 30)), _mm_slli_epi32(lo, 25));
  const __m128i r_hi = _mm_srli_si128(r, 4);
  lo = _mm_xor_si128(lo, _mm_slli_si128(r, 12));
  __m128i s = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi32(lo, 1), _mm_srli_epi32(lo, 2)), _mm_srli_epi32(lo, 7));
  s = _mm_xor_si128(s, r_hi);
  lo = _mm_xor_si128(lo, s);
  return _mm_xor_si128(hi, lo);
}

__attribute__((target("pclmul,ssse3"))) __m128i reversed(const uint8_t* p) {
  const __m128i rev = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), rev);
}

}  // namespace

__attribute__((target("pclmul,ssse3"))) void tag_delta_clmul(const TagFix& fx, unsigned csum_pos, unsigned stamp_pos,
                                                             uint32_t esp_seq, uint16_t dc, uint32_t seq, uint32_t ts,
                                                             uint8_t out[16]) {
  alignas(16) uint8_t a[16] = {}, c[48] = {};
  put32(a + 4, esp_seq);
  const unsigned base = std::min(csum_pos, stamp_pos) & ~15u;
  put16(c + csum_pos - base, dc);
  put32(c + stamp_pos - base, seq);
  put32(c + stamp_pos - base + 4, ts);
  auto p = [&](int j) { return _mm_load_si128(reinterpret_cast<const __m128i*>(fx.p[j])); };
  __m128i acc = gf_mul(reversed(a), p(0));
  acc = _mm_xor_si128(acc, gf_mul(reversed(c), p(1)));
  acc = _mm_xor_si128(acc, gf_mul(reversed(c + 16), p(2)));
  acc = _mm_xor_si128(acc, gf_mul(reversed(c + 32), p(3)));
  const __m128i rev = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(acc, rev));
}

Template Esp::make_inbound(const Profile& p, const FlowKey& k, uint32_t flow, unsigned size) {
  const unsigned inner = inner_len(size);
  const unsigned payload = inner + kEspTrailerBytes;
  // The inner packet: the cleartext frame the router should deliver.
  const Template clear = make_template(p, k, flow, inner + kEthBytes + kFcsBytes);
  std::vector<uint8_t> cf = template_frame(clear);
  uint16_t c0 = uint16_t(~fold_csum(clear.csum_sum));
  if (c0 == 0 && clear.udp) c0 = 0xffff;
  put16(cf.data() + clear.csum_off, c0);
  std::vector<uint8_t> plain(cf.begin() + kEthBytes, cf.end());
  plain.push_back(0);  // pad length
  plain.push_back(4);  // next header: IPv4 (tunnel mode)
  fix_csum_pos_ = clear.csum_off - kEthBytes;
  fix_stamp_pos_ = clear.stamp_off - kEthBytes;

  const unsigned sa_index = sa_of_flow(flow);
  const EspSa& sa = sas_[sa_index];
  const unsigned len = size - kFcsBytes;
  std::vector<uint8_t> f(len, 0);
  std::memcpy(f.data(), cf.data(), kEthBytes);  // same Ethernet header as the cleartext
  uint8_t* ip = f.data() + kEthBytes;
  ip[0] = 0x45;
  put16(ip + 2, uint16_t(kEspOuterBytes + payload + kEspIcvBytes));
  put16(ip + 4, uint16_t(flow));
  ip[8] = 64;
  ip[9] = 50;
  put32(ip + 12, sa.outer_src);
  put32(ip + 16, sa.outer_dst);
  put16(ip + 10, ip_csum(ip));
  uint8_t* esp = ip + kIpv4Bytes;
  put32(esp, sa.spi);
  put32(esp + 4, 0);  // the sequence number, written per packet
  put32(esp + 8, flow);
  put32(esp + 12, size);
  encrypt(sa, esp + 8, esp, plain.data(), payload, esp + 16, esp + 16 + payload);

  Template t;
  t.whole = std::move(f);
  t.len = uint16_t(len);
  t.copy_len = uint16_t(len);
  std::memcpy(t.head, t.whole.data(), std::min<size_t>(kCopyBytes, len));
  const unsigned ct = kEthBytes + kEspOuterBytes;  // first ciphertext byte in the frame
  t.stamp_off = uint16_t(ct + fix_stamp_pos_);
  t.csum_off = uint16_t(ct + fix_csum_pos_);
  t.csum_sum = clear.csum_sum;
  t.udp = clear.udp;
  t.flow = flow;
  t.rx_len = uint16_t(kEthBytes + inner);
  t.esp_tag_off = uint16_t(ct + payload);
  t.esp_csum0 = c0;
  t.esp_sa = sa_index;
  t.esp_fix = tag_fix(sa_index, size);
  return t;
}

std::optional<Decrypted> Esp::decrypt(const uint8_t* ip, size_t len) {
  if (len < kIpv4Bytes + kEspHdrBytes + kEspIvBytes + kEspIcvBytes + 4 || ip[0] != 0x45 || ip[9] != 50) return std::nullopt;
  const size_t total = (size_t(ip[2]) << 8) | ip[3];
  if (total > len || total < kEspOuterBytes + kEspIcvBytes + 4) return std::nullopt;
  const uint8_t* esp = ip + kIpv4Bytes;
  const auto at = sa_of_spi_.find(get32(esp));
  if (at == sa_of_spi_.end()) return std::nullopt;
  const uint32_t idx = at->second;
  const EspSa& sa = sas_[idx];
  const size_t ct_len = total - kEspOuterBytes - kEspIcvBytes;
  if (ct_len % 4) return std::nullopt;
  uint8_t iv[12], tag[16];
  std::memcpy(iv, sa.salt, 4);
  std::memcpy(iv + 4, esp + 8, 8);
  std::vector<uint8_t> plain(ct_len);
  gcm_context_data ctx;
  IMB_AES128_GCM_DEC(mgr_, keys_of(sa), &ctx, plain.data(), esp + 16, ct_len, iv, esp, 8, tag, kEspIcvBytes);
  if (std::memcmp(tag, esp + 16 + ct_len, kEspIcvBytes) != 0) return std::nullopt;
  const unsigned pad = plain[ct_len - 2];
  if (plain[ct_len - 1] != 4 || pad + 2u > ct_len) return std::nullopt;
  plain.resize(ct_len - 2 - pad);
  return Decrypted{idx, get32(esp + 4), std::move(plain)};
}

}  // namespace moat::bench
