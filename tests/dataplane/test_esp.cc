// ESP stages: behaviour checked from outside. Packets to decrypt are sealed
// with OpenSSL (not Moat's code) where a test needs a malformed-but-
// authentic packet; interop with scapy/tshark/strongSwan is tests/esp.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <rte_cycles.h>
#include <rte_ip.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "dataplane/esp.hh"
#include "dataplane/worker.hh"
#include "tests/test_util.hh"

using namespace moat;
using namespace moat::test;

namespace {

constexpr uint32_t kLocal = 0xc0000201;  // 192.0.2.1
constexpr uint32_t kPeer = 0xc0000202;   // 192.0.2.2
constexpr uint32_t kHostA = 0x0a01000a;  // 10.1.0.10 (behind us)
constexpr uint32_t kHostB = 0x0a02000a;  // 10.2.0.10 (behind the peer)

uint16_t be16(const std::vector<uint8_t>& b, size_t o) { return uint16_t(b[o] << 8 | b[o + 1]); }
uint32_t be32(const std::vector<uint8_t>& b, size_t o) { return uint32_t(be16(b, o)) << 16 | be16(b, o + 2); }

std::vector<uint8_t> key_of(Cipher c) {
  std::vector<uint8_t> k(cipher_key_len(c));
  for (size_t i = 0; i < k.size(); i++) k[i] = uint8_t(0x11 * (i + 1));
  return k;
}

SaConfig sa_cfg(SaDir dir, uint32_t spi, Cipher c = Cipher::aes_gcm_128, uint32_t tunnel = 0) {
  SaConfig s;
  s.name = "test";
  s.spi = spi;
  s.dir = dir;
  s.tunnel = tunnel;
  s.local = dir == SaDir::outbound ? kLocal : kLocal;
  s.peer = kPeer;
  s.cipher = c;
  s.key = key_of(c);
  if (c == Cipher::aes_cbc_128_sha256 || c == Cipher::aes_cbc_256_sha256) s.auth_key.assign(32, 0x5a);
  return s;
}

// One worker with its ESP state and a SAD: both ends of a tunnel can share
// one SAD (outbound SAs are not in the SPI table).
struct Rig {
  std::unique_ptr<Sad> sad;
  std::unique_ptr<Worker> w = std::make_unique<Worker>();
  std::unique_ptr<EspWorker> ew = std::make_unique<EspWorker>();
  std::unique_ptr<PortTable> pt = std::make_unique<PortTable>();

  explicit Rig(const EspWorkerConfig& ec = {}, unsigned workers = 1) {
    static int n = 0;
    std::string name = "esp" + std::to_string(n++);
    auto r = Sad::create(name, 64, nullptr, workers);
    EXPECT_TRUE(r) << r.error();
    sad.reset(*r);
    w->direct_pool = test_pool();
    w->indirect_pool = test_pool();
    w->icmp_limiter.configure(1000, 1000, rte_get_tsc_hz());
    w->now_tsc = rte_rdtsc();
    auto e = esp_worker_init(*ew, name, ec);
    EXPECT_TRUE(e) << e.error();
    pt->port[0].configured = true;
    pt->port[0].addr = kLocal;
  }
  ~Rig() {
    for (Burst* b : {&w->punt, &w->generated}) {
      for (uint16_t i = 0; i < b->n; i++) rte_pktmbuf_free(b->pkts[i]);
      b->n = 0;
    }
    esp_worker_fini(*ew);
  }
  uint32_t add(const SaConfig& c) {
    auto r = sad->add_sa(c);
    EXPECT_TRUE(r) << r.error();
    return r ? *r : kNoSa;
  }
  uint64_t drops(Drop d) const { return w->stats.drops[static_cast<unsigned>(d)].load(); }

  // Inner frames through esp_mtu + esp_outbound of SA `sa`: outer frames.
  std::vector<std::vector<uint8_t>> seal(const std::vector<std::vector<uint8_t>>& inner, uint32_t sa) {
    return seal_on(*w, *ew, inner, sa);
  }
  // The same on another worker of the SAD (its own Worker::id).
  std::vector<std::vector<uint8_t>> seal_on(Worker& wk, EspWorker& ek, const std::vector<std::vector<uint8_t>>& inner,
                                            uint32_t sa) {
    std::vector<std::vector<uint8_t>> out;
    for (size_t base = 0; base < inner.size(); base += 32) {
      Burst b;
      for (size_t i = base; i < inner.size() && i < base + 32; i++) {
        rte_mbuf* m = to_mbuf(test_pool(), inner[i]);
        meta(m) = PktMeta{};
        meta(m).l3_off = 14;
        meta(m).sa = sa;
        b.push(m);
      }
      while (b.n) {
        Burst o;
        esp_mtu(wk, ek, *sad, *pt, b, o);
        esp_outbound(wk, ek, *sad, o);
        for (uint16_t k = 0; k < o.n; k++) {
          EXPECT_EQ(meta(o.pkts[k]).l3_off, 14);
          out.push_back(bytes(o.pkts[k]));
          rte_pktmbuf_free(o.pkts[k]);
        }
      }
    }
    return out;
  }
  // Outer frames through esp_inbound: inner frames.
  std::vector<std::vector<uint8_t>> open(const std::vector<std::vector<uint8_t>>& outer) {
    std::vector<std::vector<uint8_t>> out;
    for (size_t base = 0; base < outer.size(); base += 32) {
      Burst b;
      for (size_t i = base; i < outer.size() && i < base + 32; i++) {
        rte_mbuf* m = to_mbuf(test_pool(), outer[i]);
        meta(m) = PktMeta{};
        meta(m).l3_off = 14;
        meta(m).in_port = 0;
        b.push(m);
      }
      esp_inbound(*w, *ew, *sad, b);
      for (uint16_t k = 0; k < b.n; k++) {
        EXPECT_EQ(meta(b.pkts[k]).l3_off, 14);
        out.push_back(bytes(b.pkts[k]));
        rte_pktmbuf_free(b.pkts[k]);
      }
      esp_housekeeping(*w, *ew);
    }
    return out;
  }
};

std::vector<uint8_t> udp_payload(size_t n, uint8_t seed = 0) {
  std::vector<uint8_t> p(8 + n);
  p[0] = 0xc3; p[1] = 0x50; p[2] = 0xc7; p[3] = 0x38;
  p[4] = uint8_t((8 + n) >> 8); p[5] = uint8_t(8 + n);
  for (size_t i = 0; i < n; i++) p[8 + i] = uint8_t(seed + i);
  return p;
}

std::vector<uint8_t> inner_frame(size_t n, uint8_t tos = 0, uint16_t frag = 0, uint32_t src = kHostA,
                                 uint32_t dst = kHostB) {
  Frame f = ipv4_frame(src, dst, 17, 64, udp_payload(n, uint8_t(n)), frag);
  f.b[15] = tos;
  f.b[24] = f.b[25] = 0;
  uint16_t c = ref_checksum(&f.b[14], 20);
  f.b[24] = uint8_t(c >> 8);
  f.b[25] = uint8_t(c);
  return f.b;
}

// IPv4 part of a frame.
std::vector<uint8_t> l3(const std::vector<uint8_t>& f) { return {f.begin() + 14, f.end()}; }

// An ESP packet sealed by OpenSSL's AES-128-GCM from an arbitrary plaintext
// (payload + trailer as the test wants it), in an outer frame peer → us.
std::vector<uint8_t> openssl_gcm(const std::vector<uint8_t>& key20, uint32_t spi, uint32_t seq,
                                 const std::vector<uint8_t>& pt) {
  std::vector<uint8_t> esp{uint8_t(spi >> 24), uint8_t(spi >> 16), uint8_t(spi >> 8), uint8_t(spi),
                           uint8_t(seq >> 24), uint8_t(seq >> 16), uint8_t(seq >> 8), uint8_t(seq)};
  uint8_t iv[8] = {1, 2, 3, 4, 5, 6, 7, uint8_t(seq)};
  esp.insert(esp.end(), iv, iv + 8);
  uint8_t nonce[12];
  std::memcpy(nonce, key20.data() + 16, 4);
  std::memcpy(nonce + 4, iv, 8);
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  EVP_EncryptInit_ex(c, EVP_aes_128_gcm(), nullptr, nullptr, nullptr);
  EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, 12, nullptr);
  EVP_EncryptInit_ex(c, nullptr, nullptr, key20.data(), nonce);
  int len = 0;
  EVP_EncryptUpdate(c, nullptr, &len, esp.data(), 8);
  std::vector<uint8_t> ct(pt.size() + 16);
  EVP_EncryptUpdate(c, ct.data(), &len, pt.data(), int(pt.size()));
  EVP_EncryptFinal_ex(c, ct.data() + len, &len);
  EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, ct.data() + pt.size());
  EVP_CIPHER_CTX_free(c);
  esp.insert(esp.end(), ct.begin(), ct.end());
  return ipv4_frame(kPeer, kLocal, 50, 64, esp).b;
}

// Payload + RFC 4303 trailer with monotonic padding to a multiple of 4.
std::vector<uint8_t> with_trailer(std::vector<uint8_t> inner, uint8_t nh = 4) {
  uint8_t pad = uint8_t((4 - (inner.size() + 2) % 4) % 4);
  for (uint8_t i = 1; i <= pad; i++) inner.push_back(i);
  inner.push_back(pad);
  inner.push_back(nh);
  return inner;
}

}  // namespace

TEST(Esp, RoundTripEveryCipherWithAndWithoutNatTAndEsn) {
  for (Cipher c : {Cipher::aes_gcm_128, Cipher::aes_gcm_256, Cipher::aes_cbc_128_sha256,
                   Cipher::aes_cbc_256_sha256, Cipher::chacha20_poly1305}) {
    for (int variant = 0; variant < 4; variant++) {
      Rig r;
      SaConfig o = sa_cfg(SaDir::outbound, 0x1234, c);
      o.nat_t = variant & 1;
      o.esn = variant & 2;
      SaConfig i = o;
      i.dir = SaDir::inbound;
      uint32_t out = r.add(o);
      r.add(i);
      if (o.esn) r.sad->sa(out).seq = 0xfffffff0ull;  // cross 2^32 on the way
      if (o.esn) r.sad->sa(out + 1).seq = 0xffffffe0ull;
      std::vector<std::vector<uint8_t>> inner;
      for (size_t n : {0, 1, 2, 3, 14, 15, 16, 17, 31, 100, 1300}) inner.push_back(inner_frame(n));
      for (int k = 0; k < 20; k++) inner.push_back(inner_frame(64 + k));
      auto outer = r.seal(inner, out);
      ASSERT_EQ(outer.size(), inner.size()) << cipher_name(c) << " variant " << variant;
      auto back = r.open(outer);
      ASSERT_EQ(back.size(), inner.size()) << cipher_name(c) << " variant " << variant;
      for (size_t k = 0; k < inner.size(); k++)
        EXPECT_EQ(l3(back[k]), l3(inner[k])) << cipher_name(c) << " variant " << variant << " #" << k;
      for (unsigned d = 0; d < kDropCount; d++) EXPECT_EQ(r.w->stats.drops[d].load(), 0u) << kDropNames[d];
    }
  }
}

TEST(Esp, DecryptedFrameKeepsTheOuterMacs) {
  // A decrypted packet for the router itself is punted as this frame: the
  // kernel behind the TAP takes it only if the destination MAC is its own
  // (the receiving port's), as it was on the outer frame.
  Rig r;
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0x4321));
  r.add(sa_cfg(SaDir::inbound, 0x4321));
  std::vector<std::vector<uint8_t>> inner;
  for (size_t n : {10, 100, 1000}) inner.push_back(inner_frame(n));
  auto outer = r.seal(inner, out);
  ASSERT_EQ(outer.size(), inner.size());
  const uint8_t macs[12] = {0x02, 0, 0, 0, 0x0a, 0x01, 0x02, 0, 0, 0, 0xbe, 0x0a};
  for (auto& f : outer) std::copy(macs, macs + 12, f.begin());
  auto back = r.open(outer);
  ASSERT_EQ(back.size(), inner.size());
  for (size_t k = 0; k < back.size(); k++) {
    EXPECT_TRUE(std::equal(macs, macs + 12, back[k].begin())) << "#" << k;
    EXPECT_EQ(back[k][12], 0x08);
    EXPECT_EQ(back[k][13], 0x00);
    EXPECT_EQ(l3(back[k]), l3(inner[k]));
  }
}

TEST(Esp, OuterHeaderFollowsTheSa) {
  Rig r;
  SaConfig o = sa_cfg(SaDir::outbound, 0x2222);
  o.ttl = 17;
  o.df = OuterDf::set;
  o.nat_t = true;
  uint32_t out = r.add(o);
  auto outer = r.seal({inner_frame(50, 0xb8 | 3)}, out);  // DSCP EF, ECN CE
  ASSERT_EQ(outer.size(), 1u);
  const auto& f = outer[0];
  EXPECT_EQ(be16(f, 12), 0x0800);
  EXPECT_EQ(f[14], 0x45);
  EXPECT_EQ(f[15], 0xb8 | 2) << "DSCP copied; CE becomes ECT(0) outside (RFC 6040 §4.1)";
  EXPECT_EQ(be16(f, 16), f.size() - 14);
  EXPECT_EQ(be16(f, 20), 0x4000) << "DF set by policy";
  EXPECT_EQ(f[22], 17) << "fresh outer TTL";
  EXPECT_EQ(f[23], 17) << "UDP (NAT-T)";
  EXPECT_EQ(be32(f, 26), kLocal);
  EXPECT_EQ(be32(f, 30), kPeer);
  EXPECT_EQ(ref_checksum(&f[14], 20), 0);
  EXPECT_EQ(be16(f, 34), 4500);
  EXPECT_EQ(be16(f, 36), 4500);
  EXPECT_EQ(be16(f, 38), f.size() - 34);
  EXPECT_EQ(be16(f, 40), 0) << "UDP checksum zero (RFC 3948 §2.1)";
  EXPECT_EQ(be32(f, 42), 0x2222u);
  EXPECT_EQ(be32(f, 46), 1u) << "first sequence number is 1";

  // set_peer: the next packet goes to the new address and port.
  ASSERT_TRUE(r.sad->set_peer(out, 0xcb007101, 31000, true));
  auto moved = r.seal({inner_frame(50)}, out);
  ASSERT_EQ(moved.size(), 1u);
  EXPECT_EQ(be32(moved[0], 30), 0xcb007101u);
  EXPECT_EQ(be16(moved[0], 36), 31000);
  EXPECT_EQ(be32(moved[0], 46), 2u);
  EXPECT_EQ(ref_checksum(&moved[0][14], 20), 0);

  // set_local (MOBIKE: our port's address changed): the next packet leaves
  // from the new address, with a header checksum that matches it.
  ASSERT_TRUE(r.sad->set_local(out, 0xc6336405));
  auto from_new = r.seal({inner_frame(50)}, out);
  ASSERT_EQ(from_new.size(), 1u);
  EXPECT_EQ(be32(from_new[0], 26), 0xc6336405u);
  EXPECT_EQ(be32(from_new[0], 30), 0xcb007101u);
  EXPECT_EQ(be32(from_new[0], 46), 3u);
  EXPECT_EQ(ref_checksum(&from_new[0][14], 20), 0);
}

TEST(Esp, EcnDecapsulationPerRfc6040) {
  // Table of RFC 6040 §4.2: rows inner, columns outer.
  EXPECT_EQ(ecn_decap(0, 0), 0);
  EXPECT_EQ(ecn_decap(3, 0), -1) << "CE outside Not-ECT inside: drop";
  EXPECT_EQ(ecn_decap(3, 2), 3);
  EXPECT_EQ(ecn_decap(3, 1), 3);
  EXPECT_EQ(ecn_decap(1, 2), 1);
  EXPECT_EQ(ecn_decap(2, 1), 1);
  EXPECT_EQ(ecn_decap(0, 3), 3);
  EXPECT_EQ(ecn_encap(3), 2);
  EXPECT_EQ(ecn_encap(1), 1);

  Rig r;
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0x3333));
  r.add(sa_cfg(SaDir::inbound, 0x3333));
  auto outer = r.seal({inner_frame(40, 0x02), inner_frame(40, 0x00)}, out);  // ECT(0), Not-ECT
  for (auto& f : outer) f[15] |= 3;  // congestion experienced on the way
  auto back = r.open(outer);
  ASSERT_EQ(back.size(), 1u);
  EXPECT_EQ(back[0][15] & 3, 3) << "CE reaches the inner ECT packet";
  EXPECT_EQ(ref_checksum(&back[0][14], 20), 0);
  EXPECT_EQ(r.drops(Drop::esp_ecn_drop), 1u);
}

TEST(Esp, BadInputIsCountedByReason) {
  Rig r;
  SaConfig in = sa_cfg(SaDir::inbound, 0x4444);
  in.funnels.push_back(Funnel{0x0a010000, 0x0a020000, 16, 16});
  uint32_t sai = r.add(in);
  const auto key = key_of(Cipher::aes_gcm_128);
  auto inner_pkt = l3(inner_frame(30, 0, 0, kHostB, kHostA));  // from behind the peer to us
  std::vector<std::vector<uint8_t>> pk;
  pk.push_back(openssl_gcm(key, 0x4444, 1, with_trailer(inner_pkt)));              // good
  auto flipped = openssl_gcm(key, 0x4444, 2, with_trailer(inner_pkt));
  flipped[50] ^= 0x40;
  pk.push_back(flipped);                                                            // esp_bad_icv
  auto cut = openssl_gcm(key, 0x4444, 3, with_trailer(inner_pkt));
  cut.resize(14 + 20 + 8 + 8 + 10);
  cut[16] = 0; cut[17] = uint8_t(20 + 8 + 8 + 10);
  pk.push_back(cut);                                                                // esp_truncated
  auto badpad = with_trailer(inner_pkt);
  badpad[badpad.size() - 3] ^= 0x7;  // padding byte no longer 1, 2, 3...
  if (badpad[badpad.size() - 2] == 0) badpad.insert(badpad.end() - 2, {1, 2, 3, 4}), badpad[badpad.size() - 2] = 4, badpad[badpad.size() - 4] = 9;
  pk.push_back(openssl_gcm(key, 0x4444, 4, badpad));                               // esp_bad_padding
  auto hugepad = with_trailer(inner_pkt);
  hugepad[hugepad.size() - 2] = 250;
  pk.push_back(openssl_gcm(key, 0x4444, 5, hugepad));                              // esp_bad_padding
  pk.push_back(openssl_gcm(key, 0x4444, 6, with_trailer(inner_pkt, 41)));          // esp_bad_next_header
  pk.push_back(openssl_gcm(key, 0x4444, 7, with_trailer(inner_pkt, 59)));          // esp_dummy
  auto garbage = inner_pkt;
  garbage[0] = 0x65;
  pk.push_back(openssl_gcm(key, 0x4444, 8, with_trailer(garbage)));                // esp_inner_malformed
  pk.push_back(openssl_gcm(key, 0x4444, 9, with_trailer(l3(inner_frame(30, 0, 0, 0x0a090001, kHostA)))));  // esp_selector_mismatch
  pk.push_back(openssl_gcm(key, 0x4444, 1, with_trailer(inner_pkt)));              // esp_replayed
  pk.push_back(openssl_gcm(key, 0x9999, 1, with_trailer(inner_pkt)));              // esp_unknown_spi
  pk.push_back(openssl_gcm(key, 0x4444, 10, with_trailer(inner_pkt)));             // good
  auto odd = openssl_gcm(key, 0x4444, 11, with_trailer(inner_pkt));
  odd.push_back(0);  // the ciphertext is no longer a multiple of 4 bytes
  odd[16] = uint8_t((odd.size() - 14) >> 8); odd[17] = uint8_t(odd.size() - 14);
  pk.push_back(odd);                                                                // esp_truncated
  auto back = r.open(pk);
  EXPECT_EQ(back.size(), 2u);
  EXPECT_EQ(r.drops(Drop::esp_bad_icv), 1u);
  EXPECT_EQ(r.drops(Drop::esp_truncated), 2u);
  EXPECT_EQ(r.drops(Drop::esp_bad_padding), 2u);
  EXPECT_EQ(r.drops(Drop::esp_bad_next_header), 1u);
  EXPECT_EQ(r.drops(Drop::esp_dummy), 1u);
  EXPECT_EQ(r.drops(Drop::esp_inner_malformed), 1u);
  EXPECT_EQ(r.drops(Drop::esp_selector_mismatch), 1u);
  EXPECT_EQ(r.drops(Drop::esp_replayed), 1u);
  EXPECT_EQ(r.drops(Drop::esp_unknown_spi), 1u);
  // The same, per SA.
  EXPECT_EQ(r.sad->drops(sai).n[static_cast<unsigned>(Drop::esp_bad_icv)], 1u);
  SaStats st = r.sad->stats(sai);
  EXPECT_EQ(st.packets, 2u);
  EXPECT_EQ(st.auth_fail, 1u);
  EXPECT_EQ(st.dups, 1u);
  EXPECT_EQ(st.seq, 10u);
  // Too old: 1024 behind the top.
  auto back2 = r.open({openssl_gcm(key, 0x4444, 5000, with_trailer(inner_pkt)),
                       openssl_gcm(key, 0x4444, 5000 - 1024, with_trailer(inner_pkt)),
                       openssl_gcm(key, 0x4444, 5000 - 1023, with_trailer(inner_pkt))});
  EXPECT_EQ(back2.size(), 2u);
  EXPECT_EQ(r.drops(Drop::esp_too_old), 1u);
}

TEST(Esp, DuplicateInOneBurstPassesOnce) {
  Rig r;
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0x5555));
  r.add(sa_cfg(SaDir::inbound, 0x5555));
  auto outer = r.seal({inner_frame(10), inner_frame(11)}, out);
  auto back = r.open({outer[0], outer[1], outer[0], outer[1], outer[0]});
  EXPECT_EQ(back.size(), 2u);
  EXPECT_EQ(r.drops(Drop::esp_replayed), 3u);
}

TEST(Esp, UnknownSpiIsCountedPerSourceWithRateLimitedEvents) {
  Rig r;
  const auto key = key_of(Cipher::aes_gcm_128);
  auto inner_pkt = l3(inner_frame(30, 0, 0, kHostB, kHostA));
  std::vector<std::vector<uint8_t>> pk;
  for (uint32_t k = 1; k <= 50; k++) pk.push_back(openssl_gcm(key, 0xdead0000 + k, k, with_trailer(inner_pkt)));
  auto back = r.open(pk);
  EXPECT_TRUE(back.empty());
  EXPECT_EQ(r.drops(Drop::esp_unknown_spi), 50u);
  SaEvent ev[64];
  unsigned n = r.sad->events(ev, 64);
  ASSERT_EQ(n, 1u) << "one event per source per second";
  EXPECT_EQ(ev[0].kind, SaEventKind::unknown_spi);
  EXPECT_EQ(ev[0].addr, kPeer);
  uint64_t counted = 0;
  for (const UnknownSpi& u : r.ew->unknown)
    if (u.src == kPeer) counted = u.count.load();
  EXPECT_EQ(counted, 50u);
}

TEST(Esp, FloodOnOneSaLeavesAnotherSaAlone) {
  Rig r;
  uint32_t out_a = r.add(sa_cfg(SaDir::outbound, 0xa000, Cipher::aes_gcm_128, 1));
  uint32_t in_a = r.add(sa_cfg(SaDir::inbound, 0xa000, Cipher::aes_gcm_128, 1));
  uint32_t out_b = r.add(sa_cfg(SaDir::outbound, 0xb000, Cipher::chacha20_poly1305, 2));
  uint32_t in_b = r.add(sa_cfg(SaDir::inbound, 0xb000, Cipher::chacha20_poly1305, 2));
  std::vector<std::vector<uint8_t>> good_b, inner_b;
  for (int k = 0; k < 300; k++) inner_b.push_back(inner_frame(41 + k % 50));
  good_b = r.seal(inner_b, out_b);
  auto a = r.seal({inner_frame(40)}, out_a);
  // Interleave: per good B packet, forged, replayed, truncated and unknown-SPI A packets.
  std::vector<std::vector<uint8_t>> mix;
  for (size_t k = 0; k < good_b.size(); k++) {
    auto forged = a[0];
    forged[14 + 20 + 4 + 2] = uint8_t((k + 2) >> 8);  // sequence number moves, ICV no longer matches
    forged[14 + 20 + 4 + 3] = uint8_t(k + 2);
    forged[60] ^= 1;
    mix.push_back(forged);
    mix.push_back(a[0]);                       // replay after the first copy
    auto cut = a[0];
    cut.resize(14 + 20 + 20);
    cut[16] = 0; cut[17] = 40;
    mix.push_back(cut);
    auto unk = a[0];
    unk[14 + 20 + 3] ^= 0x55;
    mix.push_back(unk);
    mix.push_back(good_b[k]);
  }
  auto back = r.open(mix);
  // Every B packet arrives, in order; one A packet (the first copy) too.
  ASSERT_EQ(back.size(), good_b.size() + 1);
  size_t kb = 0;
  for (const auto& p : back)
    if (kb < inner_b.size() && l3(p) == l3(inner_b[kb])) kb++;
  EXPECT_EQ(kb, inner_b.size());
  SaStats sb = r.sad->stats(in_b);
  EXPECT_EQ(sb.packets, inner_b.size());
  EXPECT_EQ(sb.drops_total, 0u);
  EXPECT_EQ(sb.dups + sb.auth_fail + sb.gaps, 0u);
  SaStats sa = r.sad->stats(in_a);
  EXPECT_EQ(sa.auth_fail, good_b.size());
  EXPECT_GE(sa.drops_total, 3 * good_b.size() - 1);
  (void)out_a;
}

TEST(Esp, FragmentInnerDeliversADfPacketWholeAtTheFarEnd) {
  Rig r;
  SaConfig o = sa_cfg(SaDir::outbound, 0x6666);
  o.mtu = 1400;
  uint32_t out = r.add(o);
  r.add(sa_cfg(SaDir::inbound, 0x6666));
  auto big = inner_frame(1472 - 0, 0, 0x4000);  // 1500-byte IPv4 with DF
  ASSERT_EQ(big.size(), 14u + 1500u);
  auto outer = r.seal({big, inner_frame(100)}, out);
  ASSERT_EQ(outer.size(), 3u) << "two ESP packets for the big one";
  for (const auto& f : outer) EXPECT_LE(f.size() - 14, 1400u) << "each ESP packet fits the tunnel MTU";
  EXPECT_EQ(r.ew->stats.inner_fragments.load(), 2u);
  auto back = r.open(outer);
  ASSERT_EQ(back.size(), 2u) << "reassembled at the far end";
  auto want = l3(big);
  auto got = l3(back[0]);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(ref_checksum(got.data(), 20), 0);
  // Same datagram; the DF bit was cleared to fragment (and so the checksum).
  got[6] = want[6];
  got[10] = want[10];
  got[11] = want[11];
  EXPECT_EQ(got, want);
  EXPECT_EQ(r.ew->stats.inner_reassembled.load(), 1u);
  EXPECT_EQ(l3(back[1]), l3(inner_frame(100)));
}

TEST(Esp, HonorDfAnswersFragNeededWithTheTunnelMtu) {
  Rig r;
  SaConfig o = sa_cfg(SaDir::outbound, 0x7777);
  o.mtu = 1400;
  o.mtu_policy = MtuPolicy::honor_df;
  uint32_t out = r.add(o);
  uint16_t max_inner = r.sad->sa(out).max_inner[0];
  // 1400 - 20 (IP) - 8 (ESP) - 8 (IV) - 16 (ICV) = 1348, payload+2 aligned to 4.
  EXPECT_EQ(max_inner, 1346);
  auto outer = r.seal({inner_frame(1472, 0, 0x4000), inner_frame(1472, 0, 0)}, out);
  EXPECT_EQ(outer.size(), 2u) << "the DF-clear packet is fragmented into two ESP packets";
  EXPECT_EQ(r.drops(Drop::esp_tunnel_frag_needed), 1u);
  ASSERT_EQ(r.w->generated.n, 1u);
  auto icmp = bytes(r.w->generated.pkts[0]);
  EXPECT_EQ(be32(icmp, 26), kLocal);
  EXPECT_EQ(be32(icmp, 30), kHostA);
  EXPECT_EQ(icmp[34], 3);
  EXPECT_EQ(icmp[35], 4);
  EXPECT_EQ(be16(icmp, 40), max_inner) << "next-hop MTU (RFC 1191) is what the tunnel carries";
  EXPECT_EQ(ref_checksum(&icmp[34], icmp.size() - 34), 0);
}

TEST(Esp, ClampMssRewritesSynsWithACorrectChecksum) {
  Rig r;
  SaConfig o = sa_cfg(SaDir::outbound, 0x8888);
  o.mtu = 1400;
  o.clamp_mss = true;
  uint32_t out = r.add(o);
  // TCP SYN with NOP, MSS 1460 (at an odd offset), window scale.
  std::vector<uint8_t> tcp = {0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x80, 0x02, 0xff, 0xff, 0, 0, 0, 0,
                              0x01, 0x02, 0x04, 0x05, 0xb4, 0x03, 0x03, 0x07, 0x00, 0x00, 0x00, 0x00};
  auto pseudo = [](const std::vector<uint8_t>& ip) {
    std::vector<uint8_t> ps(ip.begin() + 12, ip.begin() + 20);
    size_t len = ip.size() - 20;
    ps.insert(ps.end(), {0, 6, uint8_t(len >> 8), uint8_t(len)});
    ps.insert(ps.end(), ip.begin() + 20, ip.end());
    return ps;
  };
  Frame f = ipv4_frame(kHostA, kHostB, 6, 64, tcp);
  auto ip = l3(f.b);
  auto ps = pseudo(ip);
  uint16_t c = ref_checksum(ps.data(), ps.size());
  f.b[14 + 20 + 16] = uint8_t(c >> 8);
  f.b[14 + 20 + 17] = uint8_t(c);
  rte_mbuf* m = to_mbuf(test_pool(), f.b);
  meta(m) = PktMeta{};
  meta(m).l3_off = 14;
  meta(m).sa = out;
  Burst in, o2;
  in.push(m);
  esp_mtu(*r.w, *r.ew, *r.sad, *r.pt, in, o2);
  ASSERT_EQ(o2.n, 1u);
  auto got = l3(bytes(o2.pkts[0]));
  rte_pktmbuf_free(o2.pkts[0]);
  EXPECT_EQ(be16(got, 20 + 20 + 3), 1346 - 40) << "MSS value after NOP, kind, length (max_inner - 40)";
  auto ps2 = pseudo(got);
  EXPECT_EQ(ref_checksum(ps2.data(), ps2.size()), 0) << "TCP checksum still valid";
  EXPECT_EQ(r.ew->stats.mss_clamped.load(), 1u);
}

TEST(Esp, MakeBeforeBreakRekeyLosesNothing) {
  Rig tx, rx;  // two routers
  uint32_t old_out = tx.add(sa_cfg(SaDir::outbound, 0x1001, Cipher::aes_gcm_128, 7));
  rx.add(sa_cfg(SaDir::inbound, 0x1001, Cipher::aes_gcm_128, 7));
  uint32_t new_in = kNoSa;
  size_t sent = 0, got = 0;
  for (int round = 0; round < 40; round++) {
    if (round == 20) {
      // Rekey: the receiver learns the new SA first, then the sender switches.
      SaConfig ni = sa_cfg(SaDir::inbound, 0x2002, Cipher::aes_gcm_256, 7);
      new_in = rx.add(ni);
      SaConfig no = sa_cfg(SaDir::outbound, 0x2002, Cipher::aes_gcm_256, 7);
      uint32_t n = tx.add(no);
      auto old = tx.sad->replace_outbound(7, n);
      ASSERT_TRUE(old);
      EXPECT_EQ(*old, old_out);
    }
    std::vector<std::vector<uint8_t>> inner;
    for (int k = 0; k < 16; k++) inner.push_back(inner_frame(60 + k));
    auto outer = tx.seal(inner, tx.sad->tunnel_sa(7));
    sent += inner.size();
    got += rx.open(outer).size();
  }
  EXPECT_EQ(got, sent);
  EXPECT_EQ(rx.sad->stats(new_in).packets, 20u * 16u);
  // Deleting the old inbound SA: its SPI is unknown from then on.
  ASSERT_TRUE(rx.sad->delete_sa(0));
  EXPECT_TRUE(tx.sad->sa(old_out).state.load() & kSaDeleted);
  const auto key = key_of(Cipher::aes_gcm_128);
  rx.open({openssl_gcm(key, 0x1001, 9999, with_trailer(l3(inner_frame(30))))});
  EXPECT_EQ(rx.drops(Drop::esp_unknown_spi), 1u);
}

TEST(Esp, NatTDemuxPuntsIkeAndConsumesKeepalives) {
  Rig r;
  std::vector<uint8_t> ike = {0xc3, 0x94 /*src 50068*/, 0x11, 0x94, 0, 8 + 8, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4};
  ike[0] = 0x11; ike[1] = 0x94;
  std::vector<uint8_t> ka = {0x11, 0x94, 0x11, 0x94, 0, 9, 0, 0, 0xff};
  auto back = r.open({ipv4_frame(kPeer, kLocal, 17, 64, ike).b, ipv4_frame(kPeer, kLocal, 17, 64, ka).b});
  EXPECT_TRUE(back.empty());
  EXPECT_EQ(r.w->punt.n, 1u);
  EXPECT_EQ(meta(r.w->punt.pkts[0]).punt, Punt::local);
  EXPECT_EQ(r.ew->stats.ike_punted.load(), 1u);
  EXPECT_EQ(r.drops(Drop::esp_natt_keepalive), 1u);
}

TEST(Esp, PacketLifetimesPostSoftAndHardOnceThenRefuse) {
  Rig r;
  SaConfig o = sa_cfg(SaDir::outbound, 0x9090);
  o.soft.packets = 3;
  o.hard.packets = 5;
  uint32_t out = r.add(o);
  // One packet per burst: the hard limit is enforced at burst granularity.
  size_t sent = 0;
  for (int k = 0; k < 8; k++) sent += r.seal({inner_frame(20)}, out).size();
  EXPECT_EQ(sent, 5u);
  EXPECT_EQ(r.drops(Drop::esp_sa_expired), 3u);
  SaEvent ev[8];
  unsigned n = r.sad->events(ev, 8);
  ASSERT_EQ(n, 2u);
  EXPECT_EQ(ev[0].kind, SaEventKind::soft_packets);
  EXPECT_EQ(ev[1].kind, SaEventKind::hard_packets);
}

TEST(Esp, APacketWithoutRoomForItsHeadersIsRefusedBeforeItTakesASequenceNumber) {
  Rig r;
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0x9292));
  // The first packet sits at the very start of its buffer: no room in front
  // for the outer headers. esp_mtu admits only what esp_outbound can seal;
  // esp_outbound called alone checks for itself.
  auto burst = [&]() {
    Burst b;
    for (int k = 0; k < 2; k++) {
      rte_mbuf* m = rte_pktmbuf_alloc(test_pool());
      if (k == 0) m->data_off = 0;
      auto f = inner_frame(20);
      std::memcpy(rte_pktmbuf_append(m, uint16_t(f.size())), f.data(), f.size());
      meta(m) = PktMeta{};
      meta(m).l3_off = 14;
      meta(m).sa = out;
      b.push(m);
    }
    return b;
  };
  uint32_t want_seq = 1;
  for (bool alone : {false, true}) {
    Burst b = burst(), o;
    if (alone) {
      o = b;
    } else {
      esp_mtu(*r.w, *r.ew, *r.sad, *r.pt, b, o);
    }
    esp_outbound(*r.w, *r.ew, *r.sad, o);
    ASSERT_EQ(o.n, 1u) << (alone ? "esp_outbound alone" : "esp_mtu + esp_outbound");
    auto outer = bytes(o.pkts[0]);
    rte_pktmbuf_free(o.pkts[0]);
    EXPECT_EQ(r.drops(Drop::esp_no_room), want_seq);
    EXPECT_EQ(be32(outer, 14 + 20 + 4), want_seq) << "the refused packet left no gap in the sequence";
    want_seq++;
  }
}

TEST(Esp, SequenceNumbersWithoutEsnNeverCycle) {
  Rig r;
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0x9191));
  r.sad->sa(out).seq = 0xfffffffeull;
  auto outer = r.seal({inner_frame(20), inner_frame(20), inner_frame(20)}, out);
  ASSERT_EQ(outer.size(), 1u);
  EXPECT_EQ(be32(outer[0], 14 + 20 + 4), 0xffffffffu);
  EXPECT_EQ(r.drops(Drop::esp_seq_overflow), 2u);
  EXPECT_TRUE(r.seal({inner_frame(20)}, out).empty());
  EXPECT_EQ(r.drops(Drop::esp_sa_expired), 1u) << "the next burst finds the SA expired";
  SaEvent ev[4];
  ASSERT_EQ(r.sad->events(ev, 4), 1u);
  EXPECT_EQ(ev[0].kind, SaEventKind::seq_overflow);
}

namespace {

// An inner IPv4 fragment (RFC 791): `off8` in 8-byte units, `len` payload bytes.
std::vector<uint8_t> inner_fragment(uint16_t id, uint16_t off8, bool more, size_t len) {
  std::vector<uint8_t> payload(len);
  for (size_t i = 0; i < len; i++) payload[i] = uint8_t(off8 * 8 + i);
  Frame f = ipv4_frame(kHostA, kHostB, 17, 64, payload, uint16_t((more ? 0x2000 : 0) | off8));
  f.b[18] = uint8_t(id >> 8);
  f.b[19] = uint8_t(id);
  f.b[24] = f.b[25] = 0;
  uint16_t c = ref_checksum(&f.b[14], 20);
  f.b[24] = uint8_t(c >> 8);
  f.b[25] = uint8_t(c);
  return f.b;
}

}  // namespace

TEST(Esp, InnerFragmentFloodIsBoundedCountedAndTimesOut) {
  EspWorkerConfig ec;
  ec.frag_flows = 64;
  ec.frag_timeout_ms = 100;
  Rig r(ec);
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0xf00));
  r.add(sa_cfg(SaDir::inbound, 0xf00));
  // 300 first fragments that never complete: more than the table holds.
  std::vector<std::vector<uint8_t>> flood;
  for (uint16_t id = 1; id <= 300; id++) flood.push_back(inner_fragment(id, 0, true, 64));
  auto back = r.open(r.seal(flood, out));
  EXPECT_TRUE(back.empty());
  uint64_t failed = r.drops(Drop::esp_reassembly_failed);
  EXPECT_GE(failed, 300u - 64u) << "what does not fit the bounded table is dropped and counted";
  // Overlapping fragments of one datagram are refused, not glued.
  auto overlap = r.seal({inner_fragment(900, 0, true, 64), inner_fragment(900, 4, true, 64),
                         inner_fragment(900, 12, false, 16)}, out);
  // After the timeout the held fragments are freed and counted too.
  r.w->now_tsc += rte_get_tsc_hz();  // one second later
  esp_housekeeping(*r.w, *r.ew);
  EXPECT_EQ(r.drops(Drop::esp_reassembly_failed), 300u) << "every flood fragment accounted for";
  back = r.open(overlap);
  EXPECT_TRUE(back.empty()) << "overlapping fragments never make a packet";
  r.w->now_tsc += rte_get_tsc_hz();
  esp_housekeeping(*r.w, *r.ew);
  EXPECT_EQ(r.drops(Drop::esp_reassembly_failed), 303u);
  // The table is free again: a datagram in two fragments is reassembled.
  auto good = r.seal({inner_fragment(77, 0, true, 64), inner_fragment(77, 8, false, 40)}, out);
  back = r.open(good);
  ASSERT_EQ(back.size(), 1u);
  auto ip = l3(back[0]);
  EXPECT_EQ(ip.size(), 20u + 104u);
  EXPECT_EQ(be16(ip, 6) & 0x3fff, 0) << "a whole datagram";
  EXPECT_EQ(ref_checksum(ip.data(), 20), 0);
  for (size_t i = 0; i < 104; i++) ASSERT_EQ(ip[20 + i], uint8_t(i)) << i;
}

TEST(Esp, PacketsThatReadTheOldSaBeforeAReplaceStillGo) {
  // The SPD stage read the tunnel's SA, then the control thread replaced it
  // before esp_outbound ran: the packet must still be sealed with the old SA
  // (valid until the grace period) and decrypt at the far end.
  Rig tx, rx;
  uint32_t old_out = tx.add(sa_cfg(SaDir::outbound, 0x3003, Cipher::aes_gcm_128, 4));
  uint32_t old_in = rx.add(sa_cfg(SaDir::inbound, 0x3003, Cipher::aes_gcm_128, 4));
  uint32_t read_by_spd = tx.sad->tunnel_sa(4);
  rx.add(sa_cfg(SaDir::inbound, 0x4004, Cipher::aes_gcm_128, 4));
  uint32_t n = tx.add(sa_cfg(SaDir::outbound, 0x4004, Cipher::aes_gcm_128, 4));
  ASSERT_TRUE(tx.sad->replace_outbound(4, n));
  auto outer = tx.seal({inner_frame(33)}, read_by_spd);
  ASSERT_EQ(outer.size(), 1u);
  EXPECT_EQ(be32(outer[0], 14 + 20), 0x3003u) << "sealed with the SA the SPD chose";
  // Likewise an SPI looked up just before its SA was deleted.
  ASSERT_TRUE(rx.sad->delete_sa(old_in));
  EXPECT_TRUE(rx.sad->sa(old_in).state.load() & kSaLive) << "until reclaim()";
  (void)old_out;
}

// Inner reassembly: fragments decrypted back to back are joined without the
// table (EspStats::inner_joined); everything else goes through rte_ip_frag
// exactly as before, with the same results and counted drops.
namespace {

struct FragRig : Rig {
  uint32_t out = kNoSa;
  explicit FragRig(const EspWorkerConfig& ec = {}, uint16_t mtu = 1500) : Rig(ec) {
    SaConfig o = sa_cfg(SaDir::outbound, 0xa0a0);
    o.mtu = mtu;
    out = add(o);
    add(sa_cfg(SaDir::inbound, 0xa0a0));
  }
  // Inner frames sealed, then opened one burst per group.
  std::vector<std::vector<uint8_t>> open_groups(const std::vector<std::vector<std::vector<uint8_t>>>& groups) {
    std::vector<std::vector<uint8_t>> back;
    for (const auto& g : groups) {
      auto got = open(seal(g, out));
      back.insert(back.end(), got.begin(), got.end());
    }
    return back;
  }
  uint64_t joined() const { return ew->stats.inner_joined.load(); }
  uint64_t reassembled() const { return ew->stats.inner_reassembled.load(); }
  // Past the table's timeout: what it still holds is freed and counted.
  void time_out() {
    w->now_tsc += 3 * rte_get_tsc_hz();
    esp_housekeeping(*w, *ew);
  }
};

// A whole datagram of `len` payload bytes (the pattern inner_fragment writes).
void expect_whole(const std::vector<uint8_t>& frame, size_t len) {
  auto ip = l3(frame);
  ASSERT_EQ(ip.size(), 20u + len);
  EXPECT_EQ(be16(ip, 2), 20u + len);
  EXPECT_EQ(be16(ip, 6) & 0x3fff, 0) << "MF and offset cleared";
  EXPECT_EQ(ref_checksum(ip.data(), 20), 0);
  for (size_t i = 0; i < len; i++) ASSERT_EQ(ip[20 + i], uint8_t(i)) << i;
}

}  // namespace

// MOBIKE behind a NAT (RFC 4555 + RFC 3948): set_peer turns ESP in UDP on for
// an installed outbound SA mid-stream, and off again. Every packet is whole:
// the right protocol, addresses, ports and lengths, sized for the
// encapsulation it carries, and it decrypts.
TEST(Esp, SetPeerSwitchesToEspInUdpMidStreamAndBack) {
  Rig r;
  SaConfig o = sa_cfg(SaDir::outbound, 0x5151);  // AES-GCM, MTU 1500, plain ESP
  SaConfig i = o;
  i.dir = SaDir::inbound;
  uint32_t out = r.add(o);
  r.add(i);
  // 1500 - 20 (IP) - 8 (ESP) - 8 (IV) - 16 (ICV) = 1448, payload+2 aligned to 4;
  // ESP in UDP: 8 bytes less.
  EXPECT_EQ(r.sad->sa(out).max_inner[0], 1446);
  EXPECT_EQ(r.sad->sa(out).max_inner[1], 1438);
  constexpr uint32_t kNat = 0xcb007101;  // 203.0.113.1: the NAT in front of the peer
  // One outer packet: plain ESP to the peer, or ESP in UDP to the NAT.
  auto check = [&](const std::vector<uint8_t>& f, bool udp, const char* what) {
    EXPECT_EQ(f[23], udp ? 17 : 50) << what;
    EXPECT_EQ(be32(f, 26), kLocal) << what;
    EXPECT_EQ(be32(f, 30), udp ? kNat : kPeer) << what;
    EXPECT_EQ(be16(f, 16), f.size() - 14) << what;
    EXPECT_LE(f.size() - 14, 1500u) << what;
    EXPECT_EQ(ref_checksum(&f[14], 20), 0) << what;
    if (!udp) {
      EXPECT_EQ(be32(f, 34), 0x5151u) << what << ": SPI right after the IP header";
      return;
    }
    EXPECT_EQ(be16(f, 34), 4500) << what;
    EXPECT_EQ(be16(f, 36), 31000) << what << ": the NAT's port";
    EXPECT_EQ(be16(f, 38), f.size() - 34) << what;
    EXPECT_EQ(be16(f, 40), 0) << what << ": UDP checksum zero (RFC 3948 §2.1)";
    EXPECT_EQ(be32(f, 42), 0x5151u) << what << ": SPI after the UDP header, no non-ESP marker";
  };
  // 1446 bytes of inner packet: one plain ESP packet of exactly 1500, but
  // two ESP-in-UDP ones (fragment-inner threshold 8 bytes lower); 1438: one
  // either way.
  std::vector<std::vector<uint8_t>> inner = {inner_frame(50), inner_frame(1446 - 28), inner_frame(1438 - 28)};

  auto before = r.seal(inner, out);
  ASSERT_EQ(before.size(), 3u);
  for (auto& f : before) check(f, false, "before");
  EXPECT_EQ(before[1].size() - 14, 1500u);

  ASSERT_TRUE(r.sad->set_peer(out, kNat, 31000, true));
  auto natted = r.seal(inner, out);
  ASSERT_EQ(natted.size(), 4u) << "the 1446-byte packet no longer fits one ESP-in-UDP packet";
  for (auto& f : natted) check(f, true, "behind the NAT");
  EXPECT_EQ(natted[3].size() - 14, 1500u) << "1438 bytes inner fill the MTU exactly";
  EXPECT_EQ(r.ew->stats.inner_fragments.load(), 2u);
  EXPECT_EQ(be32(natted[0], 46), 4u) << "sequence numbers go on across the switch";

  ASSERT_TRUE(r.sad->set_peer(out, kPeer, 4500, false));
  auto after = r.seal(inner, out);
  ASSERT_EQ(after.size(), 3u);
  for (auto& f : after) check(f, false, "NAT gone");
  EXPECT_EQ(after[1].size() - 14, 1500u);

  // The inbound SA takes both encapsulations: everything decrypts, in order
  // (the NAT turns port 31000 back into 4500 on the way; the UDP checksum
  // is zero, so only the port changes).
  std::vector<std::vector<uint8_t>> all = before;
  for (auto f : natted) {
    f[36] = 4500 >> 8;
    f[37] = 4500 & 0xff;
    all.push_back(f);
  }
  all.insert(all.end(), after.begin(), after.end());
  auto back = r.open(all);
  for (unsigned d = 0; d < kDropCount; d++) EXPECT_EQ(r.w->stats.drops[d].load(), 0u) << kDropNames[d];
  ASSERT_EQ(back.size(), 9u);
  for (size_t k = 0; k < back.size(); k++) EXPECT_EQ(l3(back[k]), l3(inner[k % 3])) << "#" << k;
  for (unsigned d = 0; d < kDropCount; d++) EXPECT_EQ(r.w->stats.drops[d].load(), 0u) << kDropNames[d];
}

// A set_peer between esp_mtu (which sized the packet) and esp_outbound
// (which writes its headers): the packet keeps the one peer word esp_mtu
// read, so a packet sized for plain ESP never gets a UDP header (8 bytes
// over the MTU) and never mixes old and new fields; the next one takes the
// new word.
TEST(Esp, SetPeerBetweenSizingAndSealingNeverTearsAPacket) {
  Rig r;
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0x5252));
  constexpr uint32_t kNat = 0xcb007101;
  for (bool to_udp : {true, false}) {
    Burst in, o;
    for (size_t n : {50, 1446 - 28}) {
      rte_mbuf* m = to_mbuf(test_pool(), inner_frame(n));
      meta(m) = PktMeta{};
      meta(m).l3_off = 14;
      meta(m).sa = out;
      in.push(m);
    }
    esp_mtu(*r.w, *r.ew, *r.sad, *r.pt, in, o);
    ASSERT_EQ(o.n, to_udp ? 2u : 3u);
    ASSERT_TRUE(r.sad->set_peer(out, to_udp ? kNat : kPeer, to_udp ? 31000 : 4500, to_udp));
    esp_outbound(*r.w, *r.ew, *r.sad, o);
    ASSERT_EQ(o.n, to_udp ? 2u : 3u);
    for (uint16_t k = 0; k < o.n; k++) {
      auto f = bytes(o.pkts[k]);
      rte_pktmbuf_free(o.pkts[k]);
      EXPECT_LE(f.size() - 14, 1500u);
      EXPECT_EQ(be16(f, 16), f.size() - 14);
      if (to_udp) {  // sized for plain ESP to the old peer: goes so
        EXPECT_EQ(f[23], 50);
        EXPECT_EQ(be32(f, 30), kPeer);
      } else {  // sized for ESP in UDP via the NAT: goes so
        EXPECT_EQ(f[23], 17);
        EXPECT_EQ(be32(f, 30), kNat);
        EXPECT_EQ(be16(f, 36), 31000);
        EXPECT_EQ(be16(f, 38), f.size() - 34);
      }
    }
    auto next = r.seal({inner_frame(50)}, out);
    ASSERT_EQ(next.size(), 1u);
    EXPECT_EQ(next[0][23], to_udp ? 17 : 50) << "the next packet takes the new word";
    EXPECT_EQ(be32(next[0], 30), to_udp ? kNat : kPeer);
  }
}

// set_peer from another thread while a worker seals bursts: each packet is
// wholly one peer word or the other, and fits the MTU.
TEST(Esp, SetPeerUnderTrafficYieldsOnlyWholePackets) {
  Rig r;
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0x5353));
  constexpr uint32_t kNat = 0xcb007101;
  std::atomic<bool> stop{false};
  std::thread ctl([&] {  // the control thread
    for (unsigned k = 0; !stop.load(std::memory_order_relaxed); k++)
      (void)r.sad->set_peer(out, k & 1 ? kNat : kPeer, k & 1 ? 31000 : 4500, k & 1);
  });
  std::vector<std::vector<uint8_t>> inner;
  for (size_t n = 1438 - 28 - 4; n <= 1446 - 28; n++) inner.push_back(inner_frame(n));  // around both thresholds
  inner.push_back(inner_frame(50));
  size_t plain = 0, udp = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (int round = 0; round < 2000 || ((!plain || !udp) && std::chrono::steady_clock::now() < deadline); round++) {
    for (auto& f : r.seal(inner, out)) {
      ASSERT_LE(f.size() - 14, 1500u);
      ASSERT_EQ(be16(f, 16), f.size() - 14);
      ASSERT_EQ(ref_checksum(&f[14], 20), 0);
      if (f[23] == 50) {
        plain++;
        ASSERT_EQ(be32(f, 30), kPeer);
        ASSERT_EQ(be32(f, 34), 0x5353u);
      } else {
        udp++;
        ASSERT_EQ(f[23], 17);
        ASSERT_EQ(be32(f, 30), kNat);
        ASSERT_EQ(be16(f, 36), 31000);
        ASSERT_EQ(be16(f, 38), f.size() - 34);
        ASSERT_EQ(be32(f, 42), 0x5353u);
      }
    }
  }
  stop = true;
  ctl.join();
  EXPECT_GT(plain, 0u);
  EXPECT_GT(udp, 0u);
  for (unsigned d = 0; d < kDropCount; d++) EXPECT_EQ(r.w->stats.drops[d].load(), 0u) << kDropNames[d];
}

TEST(EspReassembly, InOrderFragmentsInOneBurstAreJoinedAsTheTableWould) {
  FragRig r;
  auto a = inner_fragment(5, 0, true, 64), b = inner_fragment(5, 8, false, 40);
  auto joined = r.open_groups({{a, b, inner_frame(30)}});
  ASSERT_EQ(joined.size(), 2u);
  EXPECT_EQ(r.joined(), 1u);
  EXPECT_EQ(r.reassembled(), 1u);
  EXPECT_EQ(r.ew->stats.frag_held.load(), 1u) << "counted as the table counts it";
  expect_whole(joined[0], 104);
  EXPECT_EQ(l3(joined[1]), l3(inner_frame(30))) << "order kept";
  // The same datagram through the table (one fragment per burst): same bytes.
  FragRig t;
  auto table = t.open_groups({{a}, {b}});
  ASSERT_EQ(table.size(), 1u);
  EXPECT_EQ(t.joined(), 0u);
  EXPECT_EQ(t.reassembled(), 1u);
  EXPECT_EQ(l3(joined[0]), l3(table[0]));  // (the MACs are the outer frames', as the sealer left them)
  EXPECT_EQ(r.w->stats.drops[static_cast<unsigned>(Drop::esp_reassembly_failed)].load(), 0u);
}

TEST(EspReassembly, ThreeLargeFragmentsJoinIntoAChainLikeTheTables) {
  // 3,800 bytes of payload: more than the first mbuf's tailroom, so both
  // the table and the join return a chain; the bytes must agree.
  std::vector<std::vector<uint8_t>> frags{inner_fragment(9, 0, true, 1400), inner_fragment(9, 175, true, 1400),
                                          inner_fragment(9, 350, false, 1000)};
  FragRig r;
  auto joined = r.open_groups({frags});
  ASSERT_EQ(joined.size(), 1u);
  EXPECT_EQ(r.joined(), 1u);
  EXPECT_EQ(r.ew->stats.frag_held.load(), 2u);
  expect_whole(joined[0], 3800);
  FragRig t;
  auto table = t.open_groups({{frags[0]}, {frags[1]}, {frags[2]}});
  ASSERT_EQ(table.size(), 1u);
  EXPECT_EQ(t.joined(), 0u);
  EXPECT_EQ(l3(joined[0]), l3(table[0]));  // (the MACs are the outer frames', as the sealer left them)
}

TEST(EspReassembly, FragmentsSplitAcrossBurstsGoThroughTheTable) {
  FragRig r;
  auto back = r.open_groups({{inner_frame(10), inner_fragment(6, 0, true, 64)}, {inner_fragment(6, 8, false, 40)}});
  ASSERT_EQ(back.size(), 2u);
  expect_whole(back[1], 104);
  EXPECT_EQ(r.joined(), 0u);
  EXPECT_EQ(r.reassembled(), 1u);
  EXPECT_EQ(r.ew->stats.frag_held.load(), 1u);
}

TEST(EspReassembly, ReorderedFragmentsGoThroughTheTable) {
  FragRig r;
  auto back = r.open_groups({{inner_fragment(7, 8, false, 40), inner_fragment(7, 0, true, 64)}});
  ASSERT_EQ(back.size(), 1u);
  expect_whole(back[0], 104);
  EXPECT_EQ(r.joined(), 0u);
  EXPECT_EQ(r.reassembled(), 1u);
}

TEST(EspReassembly, OverlappingFragmentsAreNeverJoinedAndAreCounted) {
  FragRig r;
  auto back = r.open_groups({{inner_fragment(8, 0, true, 64), inner_fragment(8, 4, false, 64)}});
  EXPECT_TRUE(back.empty());
  EXPECT_EQ(r.joined(), 0u);
  r.time_out();
  EXPECT_EQ(r.drops(Drop::esp_reassembly_failed), 2u);
}

TEST(EspReassembly, AnotherIdInTheMiddleBreaksTheRun) {
  FragRig r;
  // 11's last fragment sits where 10's would: contiguous, MF clear, other id.
  auto back = r.open_groups({{inner_fragment(10, 0, true, 64), inner_fragment(11, 8, false, 40),
                              inner_fragment(10, 8, false, 40)}});
  ASSERT_EQ(back.size(), 1u) << "10 whole, through the table";
  expect_whole(back[0], 104);
  EXPECT_EQ(r.joined(), 0u);
  EXPECT_EQ(r.reassembled(), 1u);
  r.time_out();
  EXPECT_EQ(r.drops(Drop::esp_reassembly_failed), 1u) << "11's lone fragment";
}

TEST(EspReassembly, CandidatesWithBadLengthsAreLeftToTheTable) {
  FragRig r;
  // First payload 60 bytes (not a multiple of 8), next at 64: a 4-byte hole.
  auto back = r.open_groups({{inner_fragment(12, 0, true, 60), inner_fragment(12, 8, false, 40)}});
  EXPECT_TRUE(back.empty());
  // A middle fragment without payload.
  back = r.open_groups({{inner_fragment(13, 0, true, 64), inner_fragment(13, 8, true, 0),
                         inner_fragment(13, 8, false, 40)}});
  EXPECT_EQ(r.joined(), 0u) << "never joined";
  // What rte_ip_frag makes of them: 12 never completes; 13 comes out whole
  // and its empty piece is dropped.
  ASSERT_EQ(back.size(), 1u);
  expect_whole(back[0], 104);
  EXPECT_EQ(r.ew->stats.frag_held.load(), 4u);
  r.time_out();
  EXPECT_EQ(r.drops(Drop::esp_reassembly_failed), 2u + 1u);
}

TEST(EspReassembly, DuplicatesGoToTheTableAsBefore) {
  FragRig r;
  // A duplicate first fragment: the table refuses both copies, then holds
  // the last one alone until the timeout.
  auto back = r.open_groups({{inner_fragment(14, 0, true, 64), inner_fragment(14, 0, true, 64),
                              inner_fragment(14, 8, false, 40)}});
  EXPECT_TRUE(back.empty());
  // A duplicate last fragment: the datagram is whole, the copy waits alone.
  auto b2 = r.open_groups({{inner_fragment(15, 0, true, 64), inner_fragment(15, 8, false, 40),
                            inner_fragment(15, 8, false, 40)}});
  ASSERT_EQ(b2.size(), 1u);
  expect_whole(b2[0], 104);
  r.time_out();
  EXPECT_EQ(r.drops(Drop::esp_reassembly_failed), 3u + 1u);
}

TEST(EspReassembly, AKeyTheTableHoldsIsNotJoinedUntilItTimesOut) {
  FragRig r;
  // The first fragment alone in one burst waits in the table; the same
  // datagram in order in the next burst must meet it there (a duplicate
  // first fragment: the table drops all three), not be joined past it.
  auto back = r.open_groups({{inner_fragment(16, 0, true, 64)},
                             {inner_fragment(16, 0, true, 64), inner_fragment(16, 8, false, 40)}});
  EXPECT_TRUE(back.empty());
  EXPECT_EQ(r.joined(), 0u);
  r.time_out();
  EXPECT_EQ(r.drops(Drop::esp_reassembly_failed), 3u);
  // After the table's timeout the key is free to be joined again.
  back = r.open_groups({{inner_fragment(16, 0, true, 64), inner_fragment(16, 8, false, 40)}});
  ASSERT_EQ(back.size(), 1u);
  expect_whole(back[0], 104);
  EXPECT_EQ(r.joined(), 1u);
}

TEST(EspReassembly, AFullTableDoesNotRefuseDatagramsThatArriveWhole) {
  EspWorkerConfig ec;
  ec.frag_flows = 16;
  FragRig r(ec);
  std::vector<std::vector<uint8_t>> flood;
  for (uint16_t id = 100; id < 200; id++) flood.push_back(inner_fragment(id, 0, true, 64));
  EXPECT_TRUE(r.open_groups({flood}).empty());
  uint64_t refused = r.drops(Drop::esp_reassembly_failed);
  EXPECT_GE(refused, 100u - 16u) << "the table is full";
  auto back = r.open_groups({{inner_fragment(300, 0, true, 64), inner_fragment(300, 8, false, 40)}});
  ASSERT_EQ(back.size(), 1u) << "joined: it needs no table slot";
  expect_whole(back[0], 104);
  EXPECT_EQ(r.drops(Drop::esp_reassembly_failed), refused);
  // Split across bursts, the same datagram still needs the full table.
  back = r.open_groups({{inner_fragment(301, 0, true, 64)}, {inner_fragment(301, 8, false, 40)}});
  EXPECT_TRUE(back.empty());
  EXPECT_EQ(r.drops(Drop::esp_reassembly_failed), refused + 2);
}

// Packet and byte counts are per worker (SaTraffic); lifetimes and views see
// their sum.
namespace {

struct SecondWorker {
  Worker w;
  EspWorker ew;
  explicit SecondWorker(unsigned id) {
    static int n = 0;
    w.id = id;
    w.direct_pool = test_pool();
    w.indirect_pool = test_pool();
    w.now_tsc = rte_rdtsc();
    auto e = esp_worker_init(ew, "esp2w" + std::to_string(n++));
    EXPECT_TRUE(e) << e.error();
  }
  ~SecondWorker() { esp_worker_fini(ew); }
};

std::vector<std::vector<uint8_t>> frames(size_t n, size_t len) {
  return std::vector<std::vector<uint8_t>>(n, inner_frame(len));
}

}  // namespace

TEST(SaTraffic, TwoWorkersCountApartAndTheViewSumsThem) {
  Rig r({}, 2);
  SecondWorker w1(1);
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0xb0b0));
  auto a = r.seal(frames(5, 20), out);
  auto b = r.seal_on(w1.w, w1.ew, frames(3, 100), out);
  ASSERT_EQ(a.size() + b.size(), 8u);
  uint64_t inner_a = 5 * inner_frame(20).size() - 5 * 14, inner_b = 3 * (inner_frame(100).size() - 14);
  EXPECT_EQ(r.sad->traffic(0, out).packets, 5u);
  EXPECT_EQ(r.sad->traffic(0, out).bytes, inner_a);
  EXPECT_EQ(r.sad->traffic(1, out).packets, 3u);
  EXPECT_EQ(r.sad->traffic(1, out).bytes, inner_b);
  SaStats st = r.sad->stats(out);
  EXPECT_EQ(st.packets, 8u);
  EXPECT_EQ(st.bytes, inner_a + inner_b);
  // The sequence number stays one counter: eight different numbers, 1..8.
  std::vector<uint32_t> seqs;
  for (const auto* v : {&a, &b})
    for (const auto& f : *v) seqs.push_back(be32(f, 14 + 20 + 4));
  std::sort(seqs.begin(), seqs.end());
  for (uint32_t i = 0; i < 8; i++) EXPECT_EQ(seqs[i], i + 1);
  // Each worker's counts sit on lines of their own.
  auto line = [](const void* p) { return reinterpret_cast<uintptr_t>(p) / 64; };
  EXPECT_NE(line(&r.sad->traffic(0, 63)), line(&r.sad->traffic(1, 0)));
  // A slot used again starts from zero for every worker.
  ASSERT_TRUE(r.sad->delete_sa(out));
  r.sad->reclaim();
  uint32_t again = r.add(sa_cfg(SaDir::outbound, 0xb1b1));
  ASSERT_EQ(again, out);
  EXPECT_EQ(r.sad->stats(again).packets, 0u);
  EXPECT_EQ(r.sad->traffic(1, again).bytes, 0u);
}

TEST(SaTraffic, LifetimesJudgeTheSumOfTheWorkers) {
  Rig r({}, 2);
  SecondWorker w1(1);
  SaConfig o = sa_cfg(SaDir::outbound, 0xc0c0);
  o.soft.packets = 6;
  o.hard.packets = 10;
  uint32_t out = r.add(o);
  SaEvent ev[4];
  EXPECT_EQ(r.seal(frames(4, 20), out).size(), 4u);
  EXPECT_EQ(r.sad->events(ev, 4), 0u);
  // 4 + 4: past the soft limit only counted together.
  EXPECT_EQ(r.seal_on(w1.w, w1.ew, frames(4, 20), out).size(), 4u);
  ASSERT_EQ(r.sad->events(ev, 4), 1u);
  EXPECT_EQ(ev[0].kind, SaEventKind::soft_packets);
  // 8 + 4: past the hard limit (the burst that crosses it still goes).
  EXPECT_EQ(r.seal(frames(4, 20), out).size(), 4u);
  ASSERT_EQ(r.sad->events(ev, 4), 1u);
  EXPECT_EQ(ev[0].kind, SaEventKind::hard_packets);
  // Both workers refuse from now on; nothing is posted twice.
  EXPECT_TRUE(r.seal(frames(1, 20), out).empty());
  EXPECT_TRUE(r.seal_on(w1.w, w1.ew, frames(1, 20), out).empty());
  EXPECT_EQ(r.drops(Drop::esp_sa_expired) + w1.w.stats.drops[static_cast<unsigned>(Drop::esp_sa_expired)].load(), 2u);
  EXPECT_EQ(r.sad->events(ev, 4), 0u);
  EXPECT_EQ(r.sad->stats(out).packets, 12u);
}

TEST(SaTraffic, ByteLifetimesJudgeTheSumOfTheWorkers) {
  Rig r({}, 2);
  SecondWorker w1(1);
  uint64_t each = inner_frame(100).size() - 14;  // inner IPv4 bytes per packet
  SaConfig o = sa_cfg(SaDir::outbound, 0xd0d0);
  o.soft.bytes = 3 * each;      // reached only by the two workers together
  o.hard.bytes = 5 * each + 1;
  uint32_t out = r.add(o);
  SaEvent ev[4];
  EXPECT_EQ(r.seal(frames(2, 100), out).size(), 2u);
  EXPECT_EQ(r.seal_on(w1.w, w1.ew, frames(2, 100), out).size(), 2u);
  ASSERT_EQ(r.sad->events(ev, 4), 1u);
  EXPECT_EQ(ev[0].kind, SaEventKind::soft_bytes);
  EXPECT_EQ(r.seal_on(w1.w, w1.ew, frames(2, 100), out).size(), 2u);
  ASSERT_EQ(r.sad->events(ev, 4), 1u);
  EXPECT_EQ(ev[0].kind, SaEventKind::hard_bytes);
  EXPECT_EQ(r.sad->stats(out).bytes, 6 * each);
}

TEST(SaTraffic, InboundCountsGoToTheReceivingWorker) {
  Rig r({}, 2);
  SaConfig i = sa_cfg(SaDir::inbound, 0xe0e0);
  i.hard.packets = 3;
  uint32_t out = r.add(sa_cfg(SaDir::outbound, 0xe0e0));
  uint32_t in = r.add(i);
  auto outer = r.seal(frames(4, 20), out);
  // Worker 0 opens two, then worker 1 (the SA moved: one at a time) the rest.
  auto opened = r.open({outer[0], outer[1]});
  EXPECT_EQ(opened.size(), 2u);
  SecondWorker w1(1);
  Burst b;
  for (size_t k = 2; k < 4; k++) {
    rte_mbuf* m = to_mbuf(test_pool(), outer[k]);
    meta(m) = PktMeta{};
    meta(m).l3_off = 14;
    b.push(m);
  }
  esp_inbound(w1.w, w1.ew, *r.sad, b);
  EXPECT_EQ(b.n, 2u) << "the burst that crosses the hard limit still goes";
  for (uint16_t k = 0; k < b.n; k++) rte_pktmbuf_free(b.pkts[k]);
  EXPECT_EQ(r.sad->traffic(0, in).packets, 2u);
  EXPECT_EQ(r.sad->traffic(1, in).packets, 2u);
  EXPECT_EQ(r.sad->stats(in).packets, 4u);
  SaEvent ev[4];
  ASSERT_EQ(r.sad->events(ev, 4), 1u);
  EXPECT_EQ(ev[0].kind, SaEventKind::hard_packets) << "2 + 2 passed 3";
}

TEST(SaTraffic, TenThousandSasForEightWorkersStaySmall) {
  auto r = Sad::create("traffic10k", 10000, nullptr, 8);
  ASSERT_TRUE(r) << r.error();
  std::unique_ptr<Sad> sad(*r);
  // 16 bytes per SA per worker: 1.25 MB for the lot, next to ~2.3 KB per SA.
  EXPECT_EQ(sizeof(SaTraffic), 16u);
  EXPECT_LT(sizeof(SaTraffic) * 8, (sizeof(Sa) + sizeof(SaKeys) + sizeof(SaDrops)) / 10);
  EXPECT_EQ(&sad->traffic(7, 9999) - &sad->traffic(0, 0), 7 * 10000 + 9999);
  EXPECT_EQ(sad->workers(), 8u);
  EXPECT_FALSE(Sad::create("traffic0", 16, nullptr, 0)) << "no workers";
}
