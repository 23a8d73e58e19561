#include "bench/esp.hh"

#include <intel-ipsec-mb.h>

#include <fmt/format.h>

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
    sa.spi = p.esp.spi + i;
    // SA i: tunnel i, from its own peer (inbound) to one local address.
    sa.outer_src = p.esp.outer_src + i;
    sa.outer_dst = p.esp.outer_dst;
    const auto& key = p.esp.keys.size() == 1 ? p.esp.keys[0] : p.esp.keys[i];
    std::memcpy(sa.key, key.data(), 16);
    std::memcpy(sa.salt, key.data() + 16, 4);
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
  for (auto& [k, f] : fix_index_)
    if (k == key) return f;
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
  fixes_.push_back(std::move(fix));
  fix_index_.push_back({key, fixes_.back().get()});
  return fixes_.back().get();
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
  const uint32_t idx = get32(esp) - sas_[0].spi;
  if (idx >= sas_.size()) return std::nullopt;
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
