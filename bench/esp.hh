#pragma once
// Tunnel traffic for moat-bench: ESP in tunnel mode with AES-GCM-128
// (RFC 4303, RFC 4106), through Intel IPsec-MB, independent of Moat's own
// ESP code so each checks the other.
//
// Generating without crypto in the hot loop: every (flow, size) frame is
// encrypted once, before the trial, with ESP sequence number 0 and a zero
// stamp. Per packet the generator then writes the real ESP sequence number
// and the inner stamp and fixes the ICV without any AES:
//   - GCM encrypts by XOR with a keystream that depends on key and IV only
//     (the IV stays that of the template), so changing plaintext byte i by
//     d changes ciphertext byte i by d;
//   - the tag is GHASH(AAD, ciphertext) XOR E(K, J0), and GHASH is linear
//     over GF(2): flipping one bit of the AAD or the ciphertext flips the
//     tag by a constant that depends only on the key, the lengths and the
//     bit's position.
// So for each SA and frame size we ask IPsec-MB once per bit that may
// change (ESP sequence 32, inner checksum 16, stamp 64: 112 bits) what the
// tag becomes, and the hot loop XORs the constants of the bits that are set.
// Every frame is then exactly what GCM would have produced for it, with
// the IV repeated across packets of a flow: harmless for a benchmark (the
// receiver cannot tell), never acceptable for real traffic.
//
// Threads: built on the main lcore before trials; then read-only, except
// decrypt(), which uses this object's IPsec-MB manager: one lcore only
// (the sink's).
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "bench/profile.hh"
#include "bench/traffic.hh"

struct IMB_MGR;

namespace moat::bench {

constexpr unsigned kEspOuterBytes = kIpv4Bytes + kEspHdrBytes + kEspIvBytes;  // before the ciphertext
constexpr unsigned kEspOverhead = kEspOuterBytes + kEspTrailerBytes + kEspIcvBytes;  // around the inner packet, no padding
constexpr unsigned kEspFixBits = 112;

// Per (SA, frame size): how the ICV changes when the ESP sequence number,
// the inner L4 checksum and the stamp change.
struct alignas(64) TagFix {
  // Fast path (PCLMULQDQ, one cache line per frame): a changed block B
  // changes the tag by B·P in GF(2^128), P being the tag's change when the
  // block's first bit flips (that bit is the field's 1). [0]: the AAD
  // block; [1..3]: ciphertext blocks first_block .. first_block + 2, which
  // hold the checksum and the stamp. Byte-reversed, as the instruction
  // wants them.
  uint8_t p[4][16];
  // Portable path, and the fast path's test oracle: the tag's change for
  // each bit that may change, in the order ESP sequence (32), inner
  // checksum (16), stamp (64), MSB first within each byte.
  uint64_t delta[kEspFixBits][2];
};

// The ICV's change for these field values (TagFix order, in big-endian
// bytes: esp_seq 4, checksum change 2, stamp 8), by the bit table.
void tag_delta_bits(const TagFix& fx, uint32_t esp_seq, uint16_t dc, uint32_t seq, uint32_t ts, uint8_t out[16]);
// The same with PCLMULQDQ; csum_pos and stamp_pos count from the first
// ciphertext byte. Only when clmul_available().
void tag_delta_clmul(const TagFix& fx, unsigned csum_pos, unsigned stamp_pos, uint32_t esp_seq, uint16_t dc,
                     uint32_t seq, uint32_t ts, uint8_t out[16]);
bool clmul_available();

struct EspSa {
  uint32_t spi = 0;
  uint32_t outer_src = 0, outer_dst = 0;
  uint8_t key[16] = {}, salt[4] = {};
  void* gcm_keys = nullptr;  // struct gcm_key_data, 64-byte aligned, owned by Esp
};

// What the sink learns from one ESP packet it decrypted.
struct Decrypted {
  uint32_t sa = 0, esp_seq = 0;
  std::vector<uint8_t> inner;  // the inner IPv4 packet
};

class Esp {
 public:
  explicit Esp(const Profile& p);
  ~Esp();
  Esp(const Esp&) = delete;
  Esp& operator=(const Esp&) = delete;

  unsigned sas() const { return unsigned(sas_.size()); }
  const EspSa& sa(unsigned i) const { return sas_[i]; }
  // The SA a flow's packets use: flow f belongs to SA f % sas.
  unsigned sa_of_flow(uint32_t f) const { return f % unsigned(sas_.size()); }

  // The ESP frame (Ethernet + outer IPv4 + ESP) of `size` bytes (FCS
  // included) around the inner packet of flow `k`, ready for esp_stamp().
  // Its Ethernet addresses are the cleartext template's.
  Template make_inbound(const Profile& p, const FlowKey& k, uint32_t flow, unsigned size);

  // Inner IPv4 packet length in an ESP frame of `size` bytes (FCS included).
  static unsigned inner_len(unsigned size);

  // Verifies and decrypts the ESP packet starting at the outer IPv4 header
  // (tunnel mode, an SPI of this profile); nullopt when the SPI is not
  // ours, the packet is malformed or the ICV does not match.
  std::optional<Decrypted> decrypt(const uint8_t* ip, size_t len);

 private:
  void encrypt(const EspSa& sa, const uint8_t* iv8, const uint8_t* aad8, const uint8_t* in, size_t len, uint8_t* out,
               uint8_t* tag) const;
  const TagFix* tag_fix(unsigned sa, unsigned size);

  std::vector<EspSa> sas_;
  std::unordered_map<uint32_t, uint32_t> sa_of_spi_;  // the sink's sampled decryptions only
  IMB_MGR* mgr_ = nullptr;
  std::vector<std::unique_ptr<TagFix>> fixes_;
  std::unordered_map<uint64_t, const TagFix*> fix_index_;  // (sa << 16 | size) -> table
  void* key_mem_ = nullptr;
  unsigned fix_csum_pos_ = 0, fix_stamp_pos_ = 0;  // in the inner packet, set by make_inbound
};

// Writes ESP sequence `esp_seq` and the inner stamp (seq, ts) into an ESP
// frame built by Esp::make_inbound, and fixes its ICV.
inline void esp_stamp(uint8_t* d, const Template& t, uint32_t esp_seq, uint32_t seq, uint32_t ts, bool clmul) {
  // The inner checksum for this stamp, as stamp() computes it in cleartext.
  uint32_t sum = t.csum_sum + (seq >> 16) + (seq & 0xffff) + (ts >> 16) + (ts & 0xffff);
  uint16_t c = uint16_t(~fold_csum(sum));
  if (c == 0 && t.udp) c = 0xffff;
  const uint16_t dc = uint16_t(c ^ t.esp_csum0);
  // The template holds zeros in the sequence number and the stamp, so the
  // change is the value itself (CTR mode: ciphertext XOR change).
  uint8_t* s = d + kEthBytes + kIpv4Bytes + 4;
  s[0] = uint8_t(esp_seq >> 24), s[1] = uint8_t(esp_seq >> 16), s[2] = uint8_t(esp_seq >> 8), s[3] = uint8_t(esp_seq);
  d[t.csum_off] ^= uint8_t(dc >> 8);
  d[t.csum_off + 1] ^= uint8_t(dc);
  uint8_t* st = d + t.stamp_off;
  st[0] ^= uint8_t(seq >> 24), st[1] ^= uint8_t(seq >> 16), st[2] ^= uint8_t(seq >> 8), st[3] ^= uint8_t(seq);
  st[4] ^= uint8_t(ts >> 24), st[5] ^= uint8_t(ts >> 16), st[6] ^= uint8_t(ts >> 8), st[7] ^= uint8_t(ts);
  uint8_t delta[16];
  constexpr unsigned ct = kEthBytes + kEspOuterBytes;
  if (clmul) tag_delta_clmul(*t.esp_fix, t.csum_off - ct, t.stamp_off - ct, esp_seq, dc, seq, ts, delta);
  else tag_delta_bits(*t.esp_fix, esp_seq, dc, seq, ts, delta);
  uint8_t* tag = d + t.esp_tag_off;
  for (int i = 0; i < 16; i++) tag[i] ^= delta[i];
}

}  // namespace moat::bench
