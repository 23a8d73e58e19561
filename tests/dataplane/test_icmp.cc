// ICMP builders: every message is checked with an independent checksum and
// field-by-field against RFC 792 / RFC 1812.
#include <gtest/gtest.h>
#include <rte_mbuf.h>

#include "dataplane/icmp.hh"
#include "dataplane/packet.hh"
#include "tests/test_util.hh"

using namespace moat;
using namespace moat::test;

namespace {

uint16_t be16(const std::vector<uint8_t>& b, size_t o) { return uint16_t(b[o] << 8 | b[o + 1]); }
uint32_t be32(const std::vector<uint8_t>& b, size_t o) { return uint32_t(be16(b, o)) << 16 | be16(b, o + 2); }

}  // namespace

TEST(IcmpError, TimeExceededQuotesHeaderAndHasValidChecksums) {
  auto udp = std::vector<uint8_t>(100, 0xab);
  Frame f = ipv4_frame(0x0a010002, 0x0a090005, 17, 1, udp);
  rte_mbuf* m = to_mbuf(test_pool(), f.b);
  ASSERT_TRUE(icmp_error_in_place(m, 14, kIcmpTimeExceeded, 0, 0x0a010001, 0));
  auto out = bytes(m);
  ASSERT_EQ(out.size(), 14 + 20 + 8 + 120u);  // whole offending datagram fits in 576
  EXPECT_EQ(out[14], 0x45);
  EXPECT_EQ(be16(out, 16), 20 + 8 + 120);
  EXPECT_EQ(out[23], 1);  // ICMP
  EXPECT_EQ(be32(out, 26), 0x0a010001u);
  EXPECT_EQ(be32(out, 30), 0x0a010002u);
  EXPECT_EQ(ref_checksum(&out[14], 20), 0) << "IP header checksum";
  EXPECT_EQ(out[34], 11);
  EXPECT_EQ(out[35], 0);
  EXPECT_EQ(ref_checksum(&out[34], out.size() - 34), 0) << "ICMP checksum";
  // The quote is the original IP header and payload, byte for byte.
  EXPECT_TRUE(std::equal(out.begin() + 42, out.end(), f.b.begin() + 14));
  rte_pktmbuf_free(m);
}

TEST(IcmpError, QuoteIsCappedSoTheErrorFitsIn576Bytes) {
  Frame f = ipv4_frame(0x0a010002, 0x0a090005, 17, 64, std::vector<uint8_t>(1400, 1));
  rte_mbuf* m = to_mbuf(test_pool(), f.b);
  ASSERT_TRUE(icmp_error_in_place(m, 14, kIcmpUnreach, kUnreachFragNeeded, 0x0a010001, 1280));
  auto out = bytes(m);
  EXPECT_EQ(out.size() - 14, 576u);
  EXPECT_EQ(be16(out, 34 + 6), 1280) << "next-hop MTU (RFC 1191)";
  EXPECT_EQ(ref_checksum(&out[34], out.size() - 34), 0);
  rte_pktmbuf_free(m);
}

TEST(IcmpError, VlanTaggedOffenderIsQuotedFromItsIpHeader) {
  Frame f = ipv4_frame(0x0a010002, 0x0a090005, 6, 1, std::vector<uint8_t>(40, 7));
  // Insert an 802.1Q tag after the MACs.
  std::vector<uint8_t> tagged(f.b.begin(), f.b.begin() + 12);
  for (uint8_t x : {0x81, 0x00, 0x00, 0x0a}) tagged.push_back(x);
  tagged.insert(tagged.end(), f.b.begin() + 12, f.b.end());
  rte_mbuf* m = to_mbuf(test_pool(), tagged);
  ASSERT_TRUE(icmp_error_in_place(m, 18, kIcmpUnreach, kUnreachNet, 0x0a010001, 0));
  auto out = bytes(m);
  EXPECT_TRUE(std::equal(out.begin() + 42, out.end(), f.b.begin() + 14));
  EXPECT_EQ(ref_checksum(&out[34], out.size() - 34), 0);
  rte_pktmbuf_free(m);
}

TEST(IcmpError, ForbiddenForErrorsFragmentsAndBroadcastSources) {
  std::vector<uint8_t> err{3, 1, 0, 0, 0, 0, 0, 0};
  auto f1 = ipv4_frame(0x0a010002, 0x0a090005, 1, 1, err);
  EXPECT_TRUE(icmp_error_forbidden(&f1.b[14], uint16_t(f1.b.size() - 14))) << "no error about an error";
  auto f2 = ipv4_frame(0x0a010002, 0x0a090005, 1, 1, icmp_echo(1, 1, 8));
  EXPECT_FALSE(icmp_error_forbidden(&f2.b[14], uint16_t(f2.b.size() - 14))) << "echo may get an error";
  auto f3 = ipv4_frame(0x0a010002, 0x0a090005, 17, 1, std::vector<uint8_t>(8), 0x0010);
  EXPECT_TRUE(icmp_error_forbidden(&f3.b[14], uint16_t(f3.b.size() - 14))) << "non-first fragment";
  auto f4 = ipv4_frame(0xffffffff, 0x0a090005, 17, 1, std::vector<uint8_t>(8));
  EXPECT_TRUE(icmp_error_forbidden(&f4.b[14], uint16_t(f4.b.size() - 14))) << "broadcast source";
  auto f5 = ipv4_frame(0x0a010002, 0xe0000001, 17, 1, std::vector<uint8_t>(8));
  EXPECT_TRUE(icmp_error_forbidden(&f5.b[14], uint16_t(f5.b.size() - 14))) << "multicast destination";
}

TEST(IcmpEcho, ReplySwapsAddressesAndKeepsChecksumsValid) {
  for (size_t len : {0, 1, 56, 1000}) {
    Frame f = ipv4_frame(0x0a010002, 0x0a010001, 1, 3, icmp_echo(0x4242, 7, len));
    rte_mbuf* m = to_mbuf(test_pool(), f.b);
    ASSERT_TRUE(icmp_echo_reply_in_place(m, 14));
    auto out = bytes(m);
    EXPECT_EQ(be32(out, 26), 0x0a010001u);
    EXPECT_EQ(be32(out, 30), 0x0a010002u);
    EXPECT_EQ(out[22], 64) << "fresh TTL";
    EXPECT_EQ(out[34], 0) << "echo reply";
    EXPECT_EQ(ref_checksum(&out[14], 20), 0);
    EXPECT_EQ(ref_checksum(&out[34], out.size() - 34), 0) << "len " << len;
    EXPECT_TRUE(std::equal(out.begin() + 38, out.end(), f.b.begin() + 38)) << "id, seq and data echoed";
    rte_pktmbuf_free(m);
  }
}

TEST(IcmpEcho, BadChecksumIsRefused) {
  Frame f = ipv4_frame(0x0a010002, 0x0a010001, 1, 3, icmp_echo(1, 1, 16));
  f.b.back() ^= 0xff;
  rte_mbuf* m = to_mbuf(test_pool(), f.b);
  EXPECT_FALSE(icmp_echo_reply_in_place(m, 14));
  rte_pktmbuf_free(m);
}

TEST(IcmpLimiter, BurstThenRatePerSource) {
  IcmpLimiter l;
  const uint64_t hz = 1000000;
  l.configure(10, 5, hz);  // 10/s, burst 5
  uint64_t t = 1;
  int ok = 0;
  for (int i = 0; i < 20; i++) ok += l.allow(0x0a000001, t);
  EXPECT_EQ(ok, 5);
  EXPECT_TRUE(l.allow(0x0a000002, t)) << "another source has its own budget";
  t += hz / 10;  // one token later
  EXPECT_TRUE(l.allow(0x0a000001, t));
  EXPECT_FALSE(l.allow(0x0a000001, t));
  t += hz * 10;  // long idle: refills to the burst, not beyond
  ok = 0;
  for (int i = 0; i < 20; i++) ok += l.allow(0x0a000001, t);
  EXPECT_EQ(ok, 5);
}
