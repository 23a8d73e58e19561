// Stage parse: each malformed or foreign frame is dropped with its own
// counter; valid frames pass unchanged (except Ethernet padding).
#include <gtest/gtest.h>

#include <memory>

#include "dataplane/worker.hh"
#include "tests/test_util.hh"

using namespace moat;
using namespace moat::test;

namespace {

struct ParseTest : testing::Test {
  std::unique_ptr<Worker> w = std::make_unique<Worker>();
  std::unique_ptr<PortTable> pt = std::make_unique<PortTable>();
  void SetUp() override {
    pt->port[0].configured = true;
    std::memcpy(pt->port[0].mac.addr_bytes, kRouterMac, 6);
    pt->port[0].addr = 0x0a010001;
    pt->port[0].plen = 24;
  }
  void TearDown() override {
    for (uint16_t i = 0; i < w->punt.n; i++) rte_pktmbuf_free(w->punt.pkts[i]);
  }
  // Runs one frame through parse; returns the number of packets passed on.
  uint16_t run(const std::vector<uint8_t>& b) {
    Burst burst;
    burst.push(to_mbuf(test_pool(), b));
    parse(*w, *pt, burst);
    uint16_t n = burst.n;
    for (uint16_t i = 0; i < n; i++) rte_pktmbuf_free(burst.pkts[i]);
    return n;
  }
  uint64_t drops(Drop d) { return w->stats.drops[static_cast<unsigned>(d)].load(); }
};

std::vector<uint8_t> good() { return ipv4_frame(0x0a010002, 0x0a090005, 17, 64, std::vector<uint8_t>(30, 1)).b; }

}  // namespace

TEST_F(ParseTest, ValidFramePasses) {
  EXPECT_EQ(run(good()), 1);
  uint64_t total = 0;
  for (unsigned d = 0; d < kDropCount; d++) total += w->stats.drops[d].load();
  EXPECT_EQ(total, 0u);
}

struct Case {
  const char* name;
  std::function<void(std::vector<uint8_t>&)> mutate;
  Drop expect;
};

TEST_F(ParseTest, EachMalformationHasItsOwnCounter) {
  const Case cases[] = {
      {"runt", [](auto& b) { b.resize(10); }, Drop::runt},
      {"other host MAC", [](auto& b) { b[5] = 0x99; }, Drop::not_for_us_l2},
      {"multicast MAC", [](auto& b) { b[0] = 0x01; b[1] = 0x00; b[2] = 0x5e; }, Drop::multicast_l2},
      {"unknown ethertype", [](auto& b) { b[12] = 0x86; b[13] = 0xdd; }, Drop::ethertype_unknown},
      {"truncated IP header", [](auto& b) { b.resize(14 + 12); }, Drop::ip_truncated},
      {"IP version 6", [](auto& b) { b[14] = 0x65; }, Drop::ip_version},
      {"IHL below 5", [](auto& b) { b[14] = 0x44; }, Drop::ip_ihl},
      {"IHL beyond frame", [](auto& b) { b[14] = 0x4f; b.resize(14 + 40); }, Drop::ip_ihl},
      {"total length beyond frame", [](auto& b) { b[16] = 0x05; }, Drop::ip_truncated},
      {"total length below IHL", [](auto& b) { b[16] = 0; b[17] = 10; }, Drop::ip_truncated},
      {"bad checksum", [](auto& b) { b[24] ^= 0x55; }, Drop::ip_checksum},
      {"loopback source", [](auto& b) { b[26] = 127; }, Drop::ip_martian},
      {"vlan tag on untagged port",
       [](auto& b) { std::vector<uint8_t> t{0x81, 0x00, 0x00, 0x07}; b.insert(b.begin() + 12, t.begin(), t.end()); },
       Drop::vlan_unknown},
      {"truncated ARP", [](auto& b) { b[12] = 0x08; b[13] = 0x06; b.resize(14 + 10); }, Drop::arp_malformed},
  };
  for (const Case& c : cases) {
    auto b = good();
    c.mutate(b);
    if (std::string(c.name) == "bad checksum" || std::string(c.name) == "loopback source") {
      // keep the checksum consistent for the martian case, broken for the other
      if (std::string(c.name) == "loopback source") {
        b[24] = b[25] = 0;
        uint16_t s = ref_checksum(&b[14], 20);
        b[24] = s >> 8;
        b[25] = s & 0xff;
      }
    }
    uint64_t before = drops(c.expect);
    EXPECT_EQ(run(b), 0) << c.name;
    EXPECT_EQ(drops(c.expect), before + 1) << c.name << " counted as " << kDropNames[static_cast<unsigned>(c.expect)];
  }
}

TEST_F(ParseTest, IpOptionsAreRefused) {
  // IHL 6 with a NOP option word and a fixed checksum.
  auto b = good();
  b[14] = 0x46;
  b.insert(b.begin() + 34, {1, 1, 1, 0});
  uint16_t tl = uint16_t(b.size() - 14);
  b[16] = tl >> 8;
  b[17] = tl & 0xff;
  b[24] = b[25] = 0;
  uint16_t s = ref_checksum(&b[14], 24);
  b[24] = s >> 8;
  b[25] = s & 0xff;
  EXPECT_EQ(run(b), 0);
  EXPECT_EQ(drops(Drop::ip_options), 1u);
}

TEST_F(ParseTest, EthernetPaddingIsTrimmed) {
  auto b = ipv4_frame(0x0a010002, 0x0a090005, 17, 64, std::vector<uint8_t>(4, 1)).b;
  size_t ip_len = b.size() - 14;
  b.resize(60, 0);  // minimum Ethernet frame
  Burst burst;
  burst.push(to_mbuf(test_pool(), b));
  parse(*w, *pt, burst);
  ASSERT_EQ(burst.n, 1);
  EXPECT_EQ(rte_pktmbuf_pkt_len(burst.pkts[0]), 14 + ip_len);
  rte_pktmbuf_free(burst.pkts[0]);
}

TEST_F(ParseTest, ArpGoesToTheControlThreadAndBroadcastIsAccepted) {
  Frame f;
  uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  f.mac(bcast);
  f.mac(kHostMac);
  f.u16(0x0806);
  f.u16(1); f.u16(0x0800); f.u8(6); f.u8(4); f.u16(1);
  f.mac(kHostMac); f.u32(0x0a010002);
  f.mac(bcast); f.u32(0x0a010001);
  EXPECT_EQ(run(f.b), 0);
  ASSERT_EQ(w->punt.n, 1);
  EXPECT_EQ(meta(w->punt.pkts[0]).punt, Punt::arp);
}

TEST_F(ParseTest, DhcpDiscoverFromZeroSourceIsNotMartian) {
  auto b = ipv4_frame(0, 0xffffffff, 17, 64, std::vector<uint8_t>(8)).b;
  std::memset(b.data(), 0xff, 6);
  EXPECT_EQ(run(b), 1);
}
