// The IKEv2 codec and crypto: strict parsing of hostile input, proposals in
// strongSwan's syntax, DH agreement, key derivation and the SK payload.
#include <gtest/gtest.h>

#include <random>

#include "ctrl/ike/crypto.hh"
#include "ctrl/ike/message.hh"

using namespace moat::ike;

namespace {

Bytes sample_init() {
  ChainBuilder c;
  auto props = parse_proposals("aes128gcm16-prfsha256-x25519, aes256-sha256-modp2048", kProtoIke);
  c.add(kPlSa, encode_sa(*props));
  c.add(kPlKe, encode_ke(KePayload{kDhX25519, Bytes(32, 9)}));
  c.add(kPlNonce, Bytes(32, 7));
  c.add_notify(kNNatDetectionSourceIp, Bytes(20, 1));
  Header h;
  h.spi_i = 0x1122334455667788;
  h.exchange = uint8_t(Exchange::ike_sa_init);
  h.flags = kFlagInitiator;
  return encode_plain(h, c);
}

}  // namespace

TEST(IkeCodec, ParsesWhatItBuilds) {
  Bytes b = sample_init();
  auto m = parse_message(b);
  ASSERT_TRUE(m) << m.error().why;
  EXPECT_EQ(m->h.spi_i, 0x1122334455667788u);
  ASSERT_EQ(m->payloads.size(), 4u);
  auto sa = parse_sa(m->find(kPlSa)->body);
  ASSERT_TRUE(sa);
  ASSERT_EQ(sa->size(), 2u);
  EXPECT_EQ(proposal_str((*sa)[0]), "IKE:AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE_25519");
  EXPECT_EQ(proposal_str((*sa)[1]), "IKE:AES_CBC_256/PRF_HMAC_SHA2_256/HMAC_SHA2_256_128/MODP_2048");
}

TEST(IkeCodec, TruncatedAtEveryLengthIsRejected) {
  Bytes b = sample_init();
  for (size_t n = 0; n < b.size(); ++n) {
    Bytes t(b.begin(), b.begin() + long(n));
    EXPECT_FALSE(parse_message(t)) << "accepted a message truncated to " << n << " bytes";
    // Even with the header length fixed up to match, the payload chain is short.
    if (n >= kHeaderLen) {
      t[24] = uint8_t(n >> 24), t[25] = uint8_t(n >> 16), t[26] = uint8_t(n >> 8), t[27] = uint8_t(n);
      EXPECT_FALSE(parse_message(t)) << "accepted a chain truncated to " << n << " bytes";
    }
  }
}

TEST(IkeCodec, LyingLengthsAreRejected) {
  Bytes b = sample_init();
  // Header length larger than the datagram.
  Bytes h = b;
  h[27] += 4;
  EXPECT_FALSE(parse_message(h));
  // First payload (SA) length: below the generic header, and past the end.
  for (uint16_t len : {0, 3, 0xffff}) {
    Bytes p = b;
    p[kHeaderLen + 2] = uint8_t(len >> 8), p[kHeaderLen + 3] = uint8_t(len);
    auto m = parse_message(p);
    EXPECT_FALSE(m) << "payload length " << len;
    if (!m) {
      EXPECT_EQ(m.error().notify, kNInvalidSyntax);
    }
  }
  // Trailing bytes after the last payload.
  Bytes t = b;
  t.push_back(0);
  t[27] += 1;
  EXPECT_FALSE(parse_message(t));
}

TEST(IkeCodec, SaSubstructuresMustAddUp) {
  auto props = parse_proposals("aes128-sha256-modp2048", kProtoIke);
  Bytes sa = encode_sa(*props);
  ASSERT_TRUE(parse_sa(sa));
  Bytes wrong_count = sa;
  wrong_count[7] += 1;  // number of transforms
  EXPECT_FALSE(parse_sa(wrong_count));
  Bytes wrong_len = sa;
  wrong_len[3] -= 1;  // proposal length
  EXPECT_FALSE(parse_sa(wrong_len));
  Bytes bad_more = sa;
  bad_more[0] = 2;  // claims another proposal follows
  EXPECT_FALSE(parse_sa(bad_more));
  Bytes tf_len = sa;
  tf_len[8 + 3] = 200;  // first transform overruns the proposal
  EXPECT_FALSE(parse_sa(tf_len));
}

TEST(IkeCodec, UnknownCriticalPayloadNamesItself) {
  Bytes b = sample_init();
  // Append an unknown payload type 200 with the critical bit.
  Bytes m = b;
  // The last payload is a Notify: make it point at type 200.
  size_t off = kHeaderLen;
  while (true) {
    uint16_t len = get16(&m[off + 2]);
    if (m[off] == 0) break;
    off += len;
  }
  m[off] = 200;
  m.insert(m.end(), {0, 0x80, 0, 8, 1, 2, 3, 4});
  uint32_t total = uint32_t(m.size());
  m[24] = uint8_t(total >> 24), m[25] = uint8_t(total >> 16), m[26] = uint8_t(total >> 8), m[27] = uint8_t(total);
  auto r = parse_message(m);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().notify, kNUnsupportedCriticalPayload);
  EXPECT_EQ(r.error().payload, 200);
  // Without the critical bit it is skipped.
  m[m.size() - 7] = 0;
  auto ok = parse_message(m);
  ASSERT_TRUE(ok) << ok.error().why;
  EXPECT_EQ(ok->payloads.size(), 4u);
}

TEST(IkeCodec, WrongMajorVersion) {
  Bytes b = sample_init();
  b[17] = 0x30;
  auto r = parse_message(b);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().notify, kNInvalidMajorVersion);
}

TEST(IkeCodec, TypedPayloadsRejectBadLengths) {
  EXPECT_FALSE(parse_nonce(Bytes(15, 0)));
  EXPECT_FALSE(parse_nonce(Bytes(257, 0)));
  EXPECT_FALSE(parse_ke(Bytes(3, 0)));
  EXPECT_FALSE(parse_id(Bytes{kIdIpv4, 0, 0, 0, 1, 2, 3}));
  EXPECT_FALSE(parse_notify(Bytes{0, 4, 0, 11, 1, 2}));         // SPI overruns
  EXPECT_FALSE(parse_delete(Bytes{kProtoEsp, 4, 0, 2, 1, 2, 3, 4}));  // 2 SPIs, 1 present
  EXPECT_FALSE(parse_delete(Bytes{kProtoIke, 8, 0, 1}));
  EXPECT_FALSE(parse_ts(Bytes{1, 0, 0, 0, kTsIpv4, 0, 0, 17, 0, 0, 255, 255, 10, 0, 0, 0, 10, 0, 0}));
  EXPECT_FALSE(parse_ts(Bytes{0, 0, 0, 0}));
  auto ok = parse_ts(Bytes{1, 0, 0, 0, kTsIpv4, 0, 0, 16, 0, 0, 255, 255, 10, 0, 0, 0, 10, 0, 0, 255});
  ASSERT_TRUE(ok);
  EXPECT_EQ((*ok)[0].str(), "10.0.0.0/24");
}

// Random corruption of a valid message: the parser must answer, never crash
// (run under ASan/UBSan in the fuzz target; here a quick, deterministic pass).
TEST(IkeCodec, RandomCorruptionNeverCrashes) {
  Bytes b = sample_init();
  std::mt19937 rng(7);
  for (int i = 0; i < 20000; ++i) {
    Bytes m = b;
    int flips = 1 + int(rng() % 4);
    for (int f = 0; f < flips; ++f) m[rng() % m.size()] = uint8_t(rng());
    if (rng() % 3 == 0) m.resize(rng() % m.size());
    auto r = parse_message(m);
    if (!r) continue;
    for (auto& p : r->payloads) {
      (void)parse_sa(p.body);
      (void)parse_ts(p.body);
      (void)parse_notify(p.body);
      (void)parse_delete(p.body);
      (void)parse_id(p.body);
      (void)parse_cp(p.body);
    }
  }
}

TEST(IkeProposals, StrongSwanSyntax) {
  auto p = parse_proposals("aes128gcm16-prfsha256-x25519", kProtoIke);
  ASSERT_TRUE(p);
  EXPECT_EQ(proposals_str(*p), "IKE:AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE_25519");
  p = parse_proposals("aes256-sha256-modp2048", kProtoIke);
  ASSERT_TRUE(p);
  // strongSwan derives the PRF from the integrity algorithm.
  EXPECT_EQ(proposals_str(*p), "IKE:AES_CBC_256/PRF_HMAC_SHA2_256/HMAC_SHA2_256_128/MODP_2048");
  p = parse_proposals("chacha20poly1305-prfsha256-x25519, aes128-aes256-sha384-ecp256-ecp384", kProtoIke);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->size(), 2u);
  p = parse_proposals("aes128gcm16, aes256-sha256-esn", kProtoEsp);
  ASSERT_TRUE(p);
  EXPECT_EQ(proposals_str(*p), "ESP:AES_GCM_16_128/NO_EXT_SEQ, ESP:AES_CBC_256/HMAC_SHA2_256_128/EXT_SEQ");
}

TEST(IkeProposals, ErrorsSayWhatIsWrong) {
  auto e = parse_proposals("aes-gcm-17-prfsha256-x25519", kProtoIke);
  ASSERT_FALSE(e);
  EXPECT_NE(e.error().find("unknown algorithm \"gcm\""), std::string::npos) << e.error();
  EXPECT_FALSE(parse_proposals("aes128gcm16-x25519", kProtoIke));        // AEAD without PRF
  EXPECT_FALSE(parse_proposals("aes128-prfsha256-x25519", kProtoIke));   // CBC without integrity
  EXPECT_FALSE(parse_proposals("aes128gcm16-prfsha256", kProtoIke));     // no DH
  EXPECT_FALSE(parse_proposals("aes128gcm16-sha256-prfsha256-x25519", kProtoIke));
  EXPECT_FALSE(parse_proposals("aes128gcm16,", kProtoEsp));
}

TEST(IkeProposals, SelectionTakesOurPreferenceAndOneTransformPerType) {
  auto ours = *parse_proposals("aes256gcm16-prfsha384-ecp384, aes128gcm16-prfsha256-x25519", kProtoIke);
  auto theirs = *parse_proposals("aes128-sha256-modp2048, aes128gcm16-aes256gcm16-prfsha256-prfsha384-x25519-ecp384",
                                 kProtoIke);
  auto s = select_proposal(theirs, ours, false);
  ASSERT_TRUE(s);
  EXPECT_EQ(s->first.str(), "IKE:AES_GCM_16_256/PRF_HMAC_SHA2_384/ECP_384");
  EXPECT_EQ(s->second->num, 2);
  auto none = *parse_proposals("aes128-sha256-modp2048", kProtoIke);
  EXPECT_FALSE(select_proposal(none, ours, false));
  // An answer with two transforms of one type is refused.
  Proposal twice = theirs[1];
  EXPECT_FALSE(accept_proposal(twice, ours, false));
}

TEST(IkeCrypto, PrfIsHmacSha256) {
  // RFC 4231 test case 2.
  Bytes key = to_bytes("Jefe");
  Bytes out = prf(kPrfSha256, key, to_bytes("what do ya want for nothing?"));
  EXPECT_EQ(hex(out), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  // prf+ is T1 | T2 with T1 = prf(K, S | 0x01), T2 = prf(K, T1 | S | 0x02).
  Bytes s = to_bytes("seed");
  Bytes t1in = s;
  t1in.push_back(1);
  Bytes t1 = prf(kPrfSha256, key, t1in);
  Bytes t2in = t1;
  t2in.insert(t2in.end(), s.begin(), s.end());
  t2in.push_back(2);
  Bytes t2 = prf(kPrfSha256, key, t2in);
  Bytes pp = prf_plus(kPrfSha256, key, s, 40);
  EXPECT_EQ(Bytes(pp.begin(), pp.begin() + 32), t1);
  EXPECT_EQ(Bytes(pp.begin() + 32, pp.end()), Bytes(t2.begin(), t2.begin() + 8));
}

TEST(IkeCrypto, DhGroupsAgree) {
  for (uint16_t g : {kDhModp2048, kDhEcp256, kDhEcp384, kDhX25519}) {
    auto a = Dh::create(g), b = Dh::create(g);
    ASSERT_TRUE(a && b) << g;
    EXPECT_EQ((*a)->public_value().size(), dh_public_len(g));
    auto s1 = (*a)->derive((*b)->public_value());
    auto s2 = (*b)->derive((*a)->public_value());
    ASSERT_TRUE(s1 && s2) << transform_name(kTfDh, g);
    EXPECT_EQ(*s1, *s2);
    // MODP secrets keep their leading zeros: always the full 256 bytes.
    if (g == kDhModp2048) {
      EXPECT_EQ(s1->size(), 256u);
    }
    // Garbage public values are refused, not trusted.
    EXPECT_FALSE((*a)->derive(Bytes(dh_public_len(g), 0)));
    EXPECT_FALSE((*a)->derive(Bytes(dh_public_len(g) - 1, 5)));
  }
}

TEST(IkeCrypto, SkRoundTripAndWrongIcv) {
  for (const char* text : {"aes128gcm16-prfsha256-x25519", "aes256-sha256-modp2048", "chacha20poly1305-prfsha256-x25519",
                           "aes256gcm16-prfsha512-ecp384", "aes128-sha512-x25519"}) {
    auto props = *parse_proposals(text, kProtoIke);
    auto s = select_proposal(props, props, false)->first;
    Bytes ke = random_bytes(s.encr_key_len()), ka = random_bytes(s.integ_key_len());
    ChainBuilder c;
    c.add(kPlNonce, Bytes(33, 3));
    Header h;
    h.spi_i = 1;
    h.spi_r = 2;
    h.exchange = uint8_t(Exchange::informational);
    h.mid = 5;
    Bytes msg = sk_seal(s, ke, ka, h, c.first(), c.bytes());
    auto m = parse_message(msg);
    ASSERT_TRUE(m) << text;
    auto pt = sk_open(s, ke, ka, *m);
    ASSERT_TRUE(pt) << text << ": " << pt.error();
    EXPECT_EQ(*pt, c.bytes());
    for (size_t pos : {size_t(23), msg.size() - 1, msg.size() - s.icv_len() - 1}) {
      Bytes bad = msg;
      bad[pos] ^= 1;  // message ID (AAD / integrity-covered), ICV, ciphertext
      auto mb = parse_message(bad);
      ASSERT_TRUE(mb);
      EXPECT_FALSE(sk_open(s, ke, ka, *mb)) << text << ": bit flip at " << pos << " not detected";
    }
  }
}

TEST(IkeIdentity, ParsesStrongSwanSyntaxAndMatchesDnsCanonically) {
  EXPECT_EQ(Identity::parse("moat.example.net")->type, kIdFqdn);
  EXPECT_EQ(Identity::parse("@moat")->type, kIdFqdn);
  EXPECT_EQ(Identity::parse("branch-17@moats.example.net")->type, kIdRfc822);
  EXPECT_EQ(Identity::parse("@#0a0b")->type, kIdKeyId);
  EXPECT_EQ(Identity::parse("192.0.2.1")->type, kIdIpv4);
  EXPECT_FALSE(Identity::parse("@#0a0"));
  auto dn1 = Identity::parse("C=CH, O=Moat, CN=branch-17");
  auto dn2 = Identity::parse("C=CH,O=moat,CN=Branch-17");
  ASSERT_TRUE(dn1 && dn2);
  EXPECT_EQ(dn1->type, kIdDn);
  EXPECT_EQ(dn1->str(), "C=CH, O=Moat, CN=branch-17");
  EXPECT_TRUE(dn1->matches(*dn2));
  EXPECT_FALSE(dn1->matches(*Identity::parse("C=CH, O=Moat, CN=branch-18")));
  EXPECT_TRUE(Identity::parse("Moat.Example.NET")->matches(*Identity::parse("moat.example.net")));
  EXPECT_FALSE(Identity::parse("DN=x"));
}

TEST(IkeTs, NarrowingAndPrefixes) {
  auto a = TrafficSelector::from_prefix(*IpAddr::parse("10.1.0.0"), 16);
  auto b = TrafficSelector::from_prefix(*IpAddr::parse("10.1.5.0"), 24);
  auto i = a.intersect(b);
  ASSERT_TRUE(i);
  EXPECT_EQ(i->str(), "10.1.5.0/24");
  EXPECT_TRUE(a.contains(b));
  EXPECT_FALSE(b.contains(a));
  EXPECT_FALSE(b.intersect(TrafficSelector::from_prefix(*IpAddr::parse("10.2.0.0"), 16)));
  TrafficSelector r = a;
  r.lo = *IpAddr::parse("10.0.0.1");
  r.hi = *IpAddr::parse("10.0.0.6");
  auto ps = r.prefixes();
  ASSERT_EQ(ps.size(), 4u);  // .1/32 .2/31 .4/31 .6/32
  EXPECT_EQ(ps[0].second, 32);
}
