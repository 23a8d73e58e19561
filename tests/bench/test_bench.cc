// moat-bench without EAL: profile validation (file:line:col errors), the
// flow layout, frame templates and their stamped checksums (checked with an
// independent RFC 1071 sum), the latency histogram, and the RFC 2544
// search driven by fake routers whose behaviour is exact.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <tuple>
#include <set>

#include "bench/esp.hh"
#include "bench/profile.hh"
#include "bench/search.hh"
#include "bench/traffic.hh"

namespace moat::bench {
namespace {

const char* kPorts = R"(ports:
  - {name: gen, device: net_null0}
  - {name: sink, device: net_null1}
generator: {port: gen}
sink: {port: sink}
)";

LoadResult load(const std::string& extra) { return load_profile_text(std::string(kPorts) + extra, "p.yaml"); }

// The one error a profile must produce, as "line:col: text".
std::string only_error(const LoadResult& r) {
  if (r.profile) return "no error";
  if (r.errors.size() != 1) {
    std::string all;
    for (auto& e : r.errors) all += e.str() + "\n";
    return "several errors:\n" + all;
  }
  return fmt::format("{}:{}: {}", r.errors[0].line, r.errors[0].col, r.errors[0].what);
}

TEST(BenchProfile, MinimalProfileLoadsWithDefaults) {
  auto r = load("");
  ASSERT_TRUE(r.profile) << only_error(r);
  EXPECT_EQ(r.profile->flows, 256u);
  EXPECT_EQ(r.profile->sizes.size(), 1u);
  EXPECT_EQ(r.profile->sizes[0].mix[0].size, 64u);
  EXPECT_EQ(r.profile->mode, SearchMode::ndr);
}

TEST(BenchProfile, FrameSmallerThanItsHeadersIsRefusedWithPlace) {
  EXPECT_EQ(only_error(load("traffic: {sizes: 40}\n")),
            "6:18: traffic.sizes: 40 bytes is smaller than its headers: a UDP frame with the harness's stamp needs "
            "at least 54 (FCS included)");
}

TEST(BenchProfile, EspFrameMustHoldOuterHeadersAndIcv) {
  auto r = load("traffic:\n  sizes: 100\n  esp: {direction: inbound, outer_src: 192.0.2.1, outer_dst: 192.0.2.2, "
                "key: 0x000102030405060708090a0b0c0d0e0f10111213}\n");
  EXPECT_EQ(only_error(r),
            "7:10: traffic.sizes: 100 bytes is smaller than its headers: an ESP frame with the harness's stamp needs "
            "at least 110 (FCS included)");
}

TEST(BenchProfile, SizeBelowEthernetMinimumAndAboveMaximum) {
  auto r = load("traffic: {sizes: [60, 64, 1519]}\n");
  ASSERT_EQ(r.errors.size(), 2u);
  EXPECT_EQ(r.errors[0].col, 19);
  EXPECT_NE(r.errors[0].what.find("below the Ethernet minimum"), std::string::npos);
  EXPECT_EQ(r.errors[1].col, 27);
  EXPECT_NE(r.errors[1].what.find("above 1518"), std::string::npos);
}

TEST(BenchProfile, ZeroFlowsIsRefused) {
  EXPECT_EQ(only_error(load("traffic: {flows: 0}\n")), "6:18: traffic.flows: 0 flows: need at least 1");
}

TEST(BenchProfile, MoreFlowsThanTheRangesHoldIsRefused) {
  EXPECT_EQ(only_error(load("traffic: {flows: 300, src_port: 1000-1099, src_ip: 10.0.0.1-10.0.0.2}\n")),
            "6:18: traffic.flows: 300 flows need as many distinct (src_ip, src_port, dst_ip, dst_port), the ranges "
            "give 200");
}

TEST(BenchProfile, UnknownPortIsRefusedAtItsName) {
  auto r = load_profile_text("ports:\n  - {name: gen, device: net_null0}\n  - {name: sink, device: net_null1}\n"
                             "generator: {port: gen}\nsink: {port: snk}\n",
                             "p.yaml");
  EXPECT_EQ(only_error(r), "5:14: sink.port: unknown port \"snk\" (ports: gen, sink)");
}

TEST(BenchProfile, PortNobodyUsesIsRefused) {
  auto r = load("  - {name: spare, device: net_null2}\n");
  // Appended after generator/sink: a YAML error, not a third port.
  EXPECT_FALSE(r.profile);
  auto q = load_profile_text("ports:\n  - {name: gen, device: net_null0}\n  - {name: sink, device: net_null1}\n"
                             "  - {name: spare, device: net_null2}\ngenerator: {port: gen}\nsink: {port: sink}\n",
                             "p.yaml");
  EXPECT_EQ(only_error(q), "2:3: ports: \"spare\" is used by neither generator nor sink");
}

TEST(BenchProfile, UnknownKeyIsRefusedAtTheKey) {
  EXPECT_EQ(only_error(load("trial: {duration_s: 1, duraton_s: 2}\n")),
            "6:24: trial: unknown key \"duraton_s\" (known: drain_s, duration_s, link_timeout_s, ready_file, warmup_s)");
}

TEST(BenchProfile, EveryErrorIsReportedInFileOrder) {
  auto r = load("traffic: {flows: 0, protocol: sctp}\nsearch: {mode: fixed}\n");
  ASSERT_EQ(r.errors.size(), 3u);
  EXPECT_EQ(r.errors[0].line, 6);
  EXPECT_LT(r.errors[0].col, r.errors[1].col);
  EXPECT_EQ(r.errors[2].line, 7);
  EXPECT_EQ(r.errors[2].str().rfind("p.yaml:7:", 0), 0u);
}

TEST(BenchProfile, ImixAndCustomMix) {
  auto r = load("traffic: {sizes: imix}\n");
  ASSERT_TRUE(r.profile);
  ASSERT_EQ(r.profile->sizes.size(), 1u);
  EXPECT_EQ(r.profile->sizes[0].mix.size(), 3u);
  auto c = load("traffic:\n  sizes: {imix: [{size: 64, weight: 3}, {size: 1518, weight: 1}]}\n");
  ASSERT_TRUE(c.profile) << only_error(c);
  EXPECT_EQ(c.profile->sizes[0].mix[0].weight, 3u);
}

TEST(BenchProfile, EspKeysMustMatchSas) {
  auto r = load("traffic:\n  flows: 4\n  esp: {direction: outbound, sas: 3, outer_src: 192.0.2.1, outer_dst: 192.0.2.2,\n"
                "        keys: [0x000102030405060708090a0b0c0d0e0f10111213, 0x000102030405060708090a0b0c0d0e0f10111214]}\n");
  EXPECT_NE(only_error(r).find("2 keys for 3 SAs"), std::string::npos) << only_error(r);
}

TEST(BenchProfile, MissingFileSaysSo) {
  auto r = load_profile("/nonexistent/profile.yaml");
  ASSERT_EQ(r.errors.size(), 1u);
  EXPECT_NE(r.errors[0].what.find("cannot open"), std::string::npos);
}

TEST(BenchTraffic, EveryFlowMapsBackToItself) {
  auto r = load("traffic: {flows: 1000, src_ip: 10.0.1.1-10.0.1.3, src_port: 2000-2099, dst_port: 9-12}\n");
  ASSERT_TRUE(r.profile) << only_error(r);
  FlowSpace fs(*r.profile);
  std::set<std::tuple<uint32_t, uint32_t, uint16_t, uint16_t>> keys;
  for (uint32_t f = 0; f < 1000; f++) {
    FlowKey k = fs.key(f);
    EXPECT_EQ(fs.index(k.src_ip, k.dst_ip, k.src_port, k.dst_port), int64_t(f));
    keys.insert({k.src_ip, k.dst_ip, k.src_port, k.dst_port});
  }
  EXPECT_EQ(keys.size(), 1000u);
  EXPECT_EQ(fs.index(0x0a000104, 0x0a000202, 2000, 9), -1);  // source outside the range
  // Inside the ranges but beyond the flow count: not ours either.
  EXPECT_EQ(fs.index(0x0a000103, 0x0a000202, 2099, 12), -1);
}

TEST(BenchTraffic, SpreadKeepsWeightsAndInterleaves) {
  auto s = spread({7, 4, 1});
  ASSERT_EQ(s.size(), 12u);
  EXPECT_EQ(std::count(s.begin(), s.end(), 0u), 7);
  EXPECT_EQ(std::count(s.begin(), s.end(), 1u), 4);
  EXPECT_EQ(std::count(s.begin(), s.end(), 2u), 1);
  for (size_t i = 0; i + 2 < s.size(); i++) EXPECT_FALSE(s[i] == 0 && s[i + 1] == 0 && s[i + 2] == 0);
}

TEST(BenchTraffic, DscpMixFollowsWeightsOverFlows) {
  auto r = load("traffic:\n  flows: 400\n  dscp: [{value: 46, weight: 1}, {value: 0, weight: 3}]\n");
  ASSERT_TRUE(r.profile) << only_error(r);
  FlowSpace fs(*r.profile);
  unsigned ef = 0;
  for (uint32_t f = 0; f < 400; f++) ef += fs.key(f).dscp == 46;
  EXPECT_EQ(ef, 100u);
}

// RFC 1071, written independently of traffic.cc.
uint16_t ref_sum(const std::vector<uint8_t>& b, size_t off, size_t n, uint32_t s = 0) {
  for (size_t i = 0; i + 1 < n; i += 2) s += (uint32_t(b[off + i]) << 8) | b[off + i + 1];
  if (n & 1) s += uint32_t(b[off + n - 1]) << 8;
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return uint16_t(s);
}

void check_frame(const std::vector<uint8_t>& f, unsigned proto) {
  ASSERT_EQ(ref_sum(f, 14, 20), 0xffff) << "IPv4 header checksum";
  const size_t l4 = f.size() - 34;
  uint32_t pseudo = ref_sum(f, 26, 8) + proto + uint32_t(l4);
  EXPECT_EQ(ref_sum(f, 34, l4, pseudo), 0xffff) << "L4 checksum";
}

TEST(BenchTraffic, StampedFramesCarryValidChecksums) {
  for (const char* proto : {"udp", "tcp"}) {
    for (unsigned size : {64u, 65u, 594u, 1518u}) {
      auto r = load(fmt::format("traffic: {{protocol: {}, sizes: {}, dscp: 46}}\n", proto, size));
      ASSERT_TRUE(r.profile) << only_error(r);
      FlowSpace fs(*r.profile);
      Template t = make_template(*r.profile, fs.key(7), 7, size);
      auto f = template_frame(t);
      ASSERT_EQ(f.size(), size - 4);
      EXPECT_EQ(f[15], 46 << 2);
      for (auto [seq, ts] : {std::pair<uint32_t, uint32_t>{0, 0}, {1, 2}, {0xffffffff, 0xfffffffe}, {0x12345678, 0x9abcdef0}}) {
        auto g = f;
        stamp(g.data(), t, seq, ts);
        check_frame(g, std::string(proto) == "udp" ? 17 : 6);
        const uint32_t got = (uint32_t(g[t.stamp_off]) << 24) | (g[t.stamp_off + 1] << 16) |
                             (g[t.stamp_off + 2] << 8) | g[t.stamp_off + 3];
        EXPECT_EQ(got, seq);
      }
    }
  }
}

TEST(BenchLatency, QuantilesOfAKnownDistribution) {
  LatencyHist h;
  for (uint32_t v = 1; v <= 20; v++) h.add(v);  // exact buckets
  EXPECT_EQ(h.quantile(0.5), 10);
  EXPECT_EQ(h.quantile(1.0), 20);
  EXPECT_EQ(h.min(), 1u);
  EXPECT_EQ(h.max(), 20u);
  LatencyHist big;
  for (int i = 0; i < 99; i++) big.add(100);
  big.add(100000);
  EXPECT_NEAR(big.quantile(0.5), 100, 100 * 0.07);
  EXPECT_NEAR(big.quantile(1.0), 100000, 100000 * 0.07);
  for (unsigned i = 32; i < LatencyHist::kBuckets - 1; i++) EXPECT_EQ(LatencyHist::bucket_high(i), LatencyHist::bucket_low(i + 1));
  for (uint32_t v : {31u, 32u, 33u, 1000u, 123456u, 0xffffffffu}) {
    unsigned b = LatencyHist::bucket(v);
    EXPECT_LE(LatencyHist::bucket_low(b), v);
    EXPECT_GT(LatencyHist::bucket_high(b), v);
  }
}

Profile esp_profile(const char* proto, unsigned sas) {
  auto r = load(fmt::format("traffic:\n  protocol: {}\n  sizes: 200\n  flows: 8\n  esp: {{direction: inbound, sas: {}, spi: 0x1000, "
                            "outer_src: 192.0.2.10, outer_dst: 192.0.2.1, key: 0x00112233445566778899aabbccddeeff01020304}}\n",
                            proto, sas));
  EXPECT_TRUE(r.profile) << only_error(r);
  return *r.profile;
}

// Frames stamped without AES must be exactly what GCM makes: they decrypt
// with the key (IPsec-MB's own decryption checks the ICV), and carry the
// ESP sequence number and inner stamp written, with a valid inner checksum.
TEST(BenchEsp, StampedFramesDecryptWithTheKey) {
  for (const char* proto : {"udp", "tcp"}) {
    Profile p = esp_profile(proto, 3);
    Esp esp(p);
    FlowSpace fs(p);
    for (unsigned size : {110u, 111u, 113u, 128u, 594u, 1518u}) {
      if (std::string(proto) == "tcp" && size < 114) continue;
      for (uint32_t flow : {0u, 4u}) {
        Template t = esp.make_inbound(p, fs.key(flow), flow, size);
        ASSERT_EQ(t.len, size - 4);
        ASSERT_EQ(t.whole.size(), size - 4);
        for (auto [esp_seq, seq, ts] : {std::tuple<uint32_t, uint32_t, uint32_t>{1, 0, 0}, {2, 1, 0x12345678},
                                        {0xffffffff, 0xfffffffe, 0xffffffff}, {77, 0x80000001, 3}}) {
          for (bool clmul : {false, clmul_available()}) {
          auto f = t.whole;
          esp_stamp(f.data(), t, esp_seq, seq, ts, clmul);
          auto dec = esp.decrypt(f.data() + 14, f.size() - 14);
          ASSERT_TRUE(dec) << proto << " size " << size << " esp_seq " << esp_seq;
          EXPECT_EQ(dec->sa, flow % 3);
          EXPECT_EQ(dec->esp_seq, esp_seq);
          const auto& in = dec->inner;
          ASSERT_EQ(in.size(), Esp::inner_len(size));
          EXPECT_EQ(size_t((in[2] << 8) | in[3]), in.size());
          const unsigned so = 20 + (std::string(proto) == "udp" ? 8 : 4);
          EXPECT_EQ((uint32_t(in[so]) << 24 | in[so + 1] << 16 | in[so + 2] << 8 | in[so + 3]), seq);
          EXPECT_EQ((uint32_t(in[so + 4]) << 24 | in[so + 5] << 16 | in[so + 6] << 8 | in[so + 7]), ts);
          std::vector<uint8_t> frame(14, 0);
          frame.insert(frame.end(), in.begin(), in.end());
          check_frame(frame, std::string(proto) == "udp" ? 17 : 6);
          // Any other bit changed, and the ICV no longer matches.
          f[14 + 20 + 16 + 5] ^= 0x10;
          EXPECT_FALSE(esp.decrypt(f.data() + 14, f.size() - 14));
          }
        }
      }
    }
  }
}

// The carry-less multiplication path must give, for any change, exactly
// what the per-bit table (built from IPsec-MB's own tags) gives.
TEST(BenchEsp, ClmulPathAgreesWithTheBitTable) {
  if (!clmul_available()) {
    GTEST_FAIL() << "this CPU has no PCLMULQDQ: the fast path cannot be checked here";
  }
  for (const char* proto : {"udp", "tcp"}) {
    Profile p = esp_profile(proto, 2);
    Esp esp(p);
    FlowSpace fs(p);
    for (unsigned size : {114u, 200u, 1518u}) {
      Template t = esp.make_inbound(p, fs.key(1), 1, size);
      const unsigned ct = 14 + 20 + 8 + 8;
      uint64_t x = 0x9e3779b97f4a7c15ull;
      for (int i = 0; i < 2000; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        const uint32_t esp_seq = uint32_t(x), seq = uint32_t(x >> 32), ts = uint32_t(x * 31);
        const uint16_t dc = uint16_t(x >> 17);
        uint8_t a[16], b[16];
        tag_delta_bits(*t.esp_fix, esp_seq, dc, seq, ts, a);
        tag_delta_clmul(*t.esp_fix, t.csum_off - ct, t.stamp_off - ct, esp_seq, dc, seq, ts, b);
        ASSERT_EQ(std::vector<uint8_t>(a, a + 16), std::vector<uint8_t>(b, b + 16)) << proto << " " << size << " " << i;
      }
    }
  }
}

TEST(BenchEsp, EachSaHasItsSpiAndOuterSource) {
  Profile p = esp_profile("udp", 4);
  Esp esp(p);
  FlowSpace fs(p);
  for (uint32_t flow = 0; flow < 8; flow++) {
    Template t = esp.make_inbound(p, fs.key(flow), flow, 200);
    const uint8_t* ip = t.whole.data() + 14;
    EXPECT_EQ(ip[9], 50);
    EXPECT_EQ(ref_sum(t.whole, 14, 20), 0xffff);
    EXPECT_EQ((uint32_t(ip[20]) << 24 | ip[21] << 16 | ip[22] << 8 | ip[23]), 0x1000u + flow % 4);
    EXPECT_EQ((uint32_t(ip[12]) << 24 | ip[13] << 16 | ip[14] << 8 | ip[15]), 0xc000020au + flow % 4);
  }
}

TEST(BenchEsp, ForeignSpiOrWrongKeyIsNotDecrypted) {
  Profile p = esp_profile("udp", 2);
  Esp esp(p);
  FlowSpace fs(p);
  Template t = esp.make_inbound(p, fs.key(1), 1, 300);
  auto f = t.whole;
  esp_stamp(f.data(), t, 5, 5, 5, false);
  Profile q = p;
  q.esp.keys[0][3] ^= 1;
  Esp other(q);
  EXPECT_FALSE(other.decrypt(f.data() + 14, f.size() - 14));
  q = p;
  q.esp.spi = 0x2000;
  Esp elsewhere(q);
  EXPECT_FALSE(elsewhere.decrypt(f.data() + 14, f.size() - 14));
}

// A router that forwards everything up to `capacity` pps and drops the
// excess; the generator reaches `gen_max` at most.
struct FakeRouter {
  double capacity, gen_max;
  double duration = 1;
  std::vector<double> rates;
  bool flow_control = false;  // like memif: at max rate the link holds the generator back to capacity
  std::optional<Outcome> operator()(double rate, const std::string&) {
    double offered_pps = rate > 0 ? std::min(rate, gen_max) : gen_max;
    const bool pushed = rate == 0 && flow_control && capacity < gen_max;
    if (pushed) offered_pps = capacity;
    rates.push_back(offered_pps);
    Outcome o;
    o.pushed_back = pushed;
    o.offered_pps = offered_pps;
    o.offered = uint64_t(offered_pps * duration);
    o.received = uint64_t(std::min(offered_pps, capacity) * duration);
    return o;
  }
};

Profile search_profile() {
  auto r = load("search: {mode: ndr, resolution: 0.01, pdr_loss: 0.1, max_trials: 30, min_rate_pps: 1000}\n");
  return *r.profile;
}

TEST(BenchSearch, FindsNdrJustBelowCapacityAndPdrAbove) {
  Profile p = search_profile();
  FakeRouter dut{5e6, 20e6};
  auto res = run_search(p, std::ref(dut));
  EXPECT_EQ(res.verdict, "ok");
  ASSERT_TRUE(res.ndr_pps);
  EXPECT_LE(*res.ndr_pps, 5e6);
  EXPECT_GE(*res.ndr_pps, 5e6 * 0.98);
  // 10 % loss allowed: up to capacity / 0.9.
  ASSERT_TRUE(res.pdr_pps);
  EXPECT_LE(*res.pdr_pps, 5e6 / 0.9);
  EXPECT_GE(*res.pdr_pps, 5e6 / 0.9 * 0.98);
  EXPECT_FALSE(res.harness_bound);
  EXPECT_EQ(dut.rates.front(), 20e6);  // the first trial is at the generator's maximum
}

TEST(BenchSearch, RouterFasterThanTheGeneratorIsReportedAsHarnessBound) {
  FakeRouter dut{50e6, 20e6};
  auto res = run_search(search_profile(), std::ref(dut));
  EXPECT_TRUE(res.harness_bound);
  ASSERT_TRUE(res.ndr_pps);
  EXPECT_EQ(*res.ndr_pps, 20e6);
  EXPECT_EQ(res.trials, 1u);
}

TEST(BenchSearch, PushBackAtMaxRateIsNotTakenForNoLoss) {
  FakeRouter dut{5e6, 20e6};
  dut.flow_control = true;
  auto res = run_search(search_profile(), std::ref(dut));
  EXPECT_FALSE(res.harness_bound);
  ASSERT_GE(dut.rates.size(), 2u);
  EXPECT_EQ(dut.rates[1], 5e6);  // then a fixed-rate trial where the max-rate trial ended
  ASSERT_TRUE(res.ndr_pps);
  EXPECT_LE(*res.ndr_pps, 5e6);
  EXPECT_GE(*res.ndr_pps, 5e6 * 0.98);
}

TEST(BenchSearch, BlackHoleSaysNothingWasForwarded) {
  FakeRouter dut{0, 20e6};
  auto res = run_search(search_profile(), std::ref(dut));
  EXPECT_EQ(res.verdict, "no_forwarding");
  EXPECT_FALSE(res.ndr_pps);
  EXPECT_EQ(res.trials, 2u);  // full speed, then the slowest allowed rate
  EXPECT_EQ(dut.rates.back(), 1000);
}

TEST(BenchSearch, FloodStopsTheSearchWithExcess) {
  Profile p = search_profile();
  unsigned calls = 0;
  auto res = run_search(p, [&](double, const std::string&) -> std::optional<Outcome> {
    calls++;
    return Outcome{1e6, 1000000, 3000000, true, false, "the sink received 3000000 of our frames for 1000000 sent"};
  });
  EXPECT_EQ(res.verdict, "excess");
  EXPECT_EQ(calls, 1u);
  ASSERT_FALSE(res.notes.empty());
  EXPECT_NE(res.notes[0].find("3000000"), std::string::npos);
}

TEST(BenchSearch, StopsWhenTrialsAreRefused) {
  Profile p = search_profile();
  FakeRouter dut{5e6, 20e6};
  unsigned n = 0;
  auto res = run_search(p, [&](double r, const std::string& why) -> std::optional<Outcome> {
    if (++n > 3) return std::nullopt;  // the time limit
    return dut(r, why);
  });
  EXPECT_EQ(res.verdict, "stopped");
  EXPECT_EQ(res.trials, 3u);
}

TEST(BenchSearch, MaxTrialsBoundsTheSearch) {
  Profile p = search_profile();
  p.max_trials = 4;
  FakeRouter dut{5e6, 20e6};
  auto res = run_search(p, std::ref(dut));
  EXPECT_EQ(dut.rates.size(), 4u);
  EXPECT_FALSE(res.notes.empty());
}

TEST(BenchSearch, FixedModeIsOneTrialAtTheRate) {
  Profile p = search_profile();
  p.mode = SearchMode::fixed;
  p.rate_pps = 1e6;
  FakeRouter dut{5e6, 20e6};
  auto res = run_search(p, std::ref(dut));
  ASSERT_EQ(dut.rates.size(), 1u);
  EXPECT_EQ(dut.rates[0], 1e6);
  ASSERT_TRUE(res.ndr_pps);
  EXPECT_EQ(*res.ndr_pps, 1e6);
}

}  // namespace
}  // namespace moat::bench
