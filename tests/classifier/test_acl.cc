// The compiled rte_acl lookup must answer exactly what the first-match linear
// search answers, for every table, every field, overlapping rules, port
// ranges and prefixes of every length.
#include <gtest/gtest.h>

#include <random>

#include "classifier/acl.hh"
#include "classifier/synth.hh"

namespace moat {
namespace {

struct Gen {
  std::mt19937 rng;
  explicit Gen(uint32_t seed) : rng(seed) {}
  uint32_t u(uint32_t lo, uint32_t hi) { return std::uniform_int_distribution<uint32_t>(lo, hi)(rng); }
  bool coin(unsigned pct) { return u(0, 99) < pct; }

  // Addresses from a small space so prefixes of every length get hits.
  uint32_t addr() { return 0x0a000000u | (u(0, 3) << 16) | (u(0, 3) << 8) | u(0, 7); }
  PrefixMatch prefix() {
    uint8_t len = uint8_t(u(0, 32));
    uint32_t mask = len ? ~uint32_t(0) << (32 - len) : 0;
    return {addr() & mask, len};
  }
  Range16 range() {
    uint16_t a = uint16_t(u(0, 40)), b = uint16_t(u(0, 40));
    if (coin(10)) return {0, 0xffff};
    return {std::min(a, b), std::max(a, b)};
  }
  template <typename T, typename F>
  std::vector<T> list(unsigned pct_any, unsigned max, F&& f) {
    std::vector<T> v;
    if (coin(pct_any)) return v;
    for (unsigned i = 0, n = u(1, std::min(max, max_list)); i < n; i++) v.push_back(f());
    return v;
  }

  Match match() {
    Match m;
    m.in_zones = list<uint8_t>(50, 2, [&] { return uint8_t(u(0, 4)); });
    m.out_zones = list<uint8_t>(50, 2, [&] { return uint8_t(u(0, 4)); });
    m.in_ports = list<uint8_t>(80, 2, [&] { return coin(20) ? kNoPortKey : uint8_t(u(0, 3)); });
    m.out_ports = list<uint8_t>(80, 2, [&] { return coin(20) ? kNoPortKey : uint8_t(u(0, 3)); });
    m.src = list<PrefixMatch>(40, 3, [&] { return prefix(); });
    m.dst = list<PrefixMatch>(40, 3, [&] { return prefix(); });
    m.protos = list<uint8_t>(40, 2, [&] { return uint8_t(std::array{1, 6, 17, 47}[u(0, 3)]); });
    m.sports = list<Range16>(60, 2, [&] { return range(); });
    m.dports = list<Range16>(50, 2, [&] { return range(); });
    if (coin(20)) m.dscp = uint8_t(u(0, 3));
    return m;
  }

  FlowKey key() {
    FlowKey k;
    k.proto = uint8_t(std::array{1, 6, 17, 47, 50}[u(0, 4)]);
    k.in_zone = uint8_t(u(0, 5));
    k.out_zone = uint8_t(u(0, 5));
    k.dscp = uint8_t(u(0, 4));
    k.src = coin(90) ? addr() : u(0, 0xffffffff);
    k.dst = coin(90) ? addr() : u(0, 0xffffffff);
    k.sport = uint16_t(coin(90) ? u(0, 45) : u(0, 0xffff));
    k.dport = uint16_t(coin(90) ? u(0, 45) : u(0, 0xffff));
    k.in_port = coin(20) ? kNoPortKey : uint8_t(u(0, 4));
    k.out_port = coin(20) ? kNoPortKey : uint8_t(u(0, 4));
    return k;
  }

  unsigned max_list = 2;  // entries per list: lists multiply into rte_acl rules

  RuleSet rules(unsigned per_table) {
    RuleSet rs;
    for (unsigned t = 0; t < kTables; t++)
      for (unsigned i = 0, n = u(0, per_table); i < n; i++) {
        Rule r;
        r.match = match();
        r.verdict.action = uint8_t(t);
        rs.table[t].rules.push_back(r);
      }
    return rs;
  }
};

void expect_same_as_linear(const RuleSet& rs, Gen& g, unsigned packets, uint64_t generation) {
  auto c = compile(rs, generation);
  ASSERT_TRUE(c) << c.error();
  std::vector<FlowKey> flows(packets);
  std::vector<AclKey> keys(packets);
  std::vector<const AclKey*> ptrs(packets);
  for (unsigned i = 0; i < packets; i++) {
    flows[i] = g.key();
    keys[i] = acl_key(flows[i]);
    ptrs[i] = &keys[i];
  }
  std::vector<uint32_t> got(packets * kTables);
  // Bursts of 64, as the worker calls it.
  for (unsigned i = 0; i < packets; i += 64)
    classify(**c, ptrs.data() + i, std::min(64u, packets - i), got.data() + i * kTables);
  unsigned hits = 0;
  for (unsigned i = 0; i < packets; i++) {
    uint32_t want[kTables];
    match_linear(rs, flows[i], want);
    for (unsigned t = 0; t < kTables; t++) {
      hits += want[t] != 0;
      ASSERT_EQ(got[i * kTables + t], want[t])
          << "table " << kTableNames[t] << " packet " << i << " proto " << int(flows[i].proto) << " src "
          << std::hex << flows[i].src << " dst " << flows[i].dst << std::dec << " sport " << flows[i].sport
          << " dport " << flows[i].dport << " zones " << int(flows[i].in_zone) << "->" << int(flows[i].out_zone);
    }
  }
  // The generator must exercise matches, not only defaults.
  if (rs.table[0].rules.size() > 4) {
    EXPECT_GT(hits, packets / 10);
  }
}

TEST(AclVsLinear, RandomRuleSetsAgreeOnEveryTable) {
  Gen g(12345);
  for (unsigned round = 0; round < 30; round++) expect_same_as_linear(g.rules(40), g, 2000, round);
}

TEST(AclVsLinear, LargeRuleSetsAgree) {
  Gen g(777);
  synth::Rng r(778);
  expect_same_as_linear(synth::portal_rules(r, 2500), g, 20000, 1000);
}

TEST(AclVsLinear, EmptyRuleSetGivesEveryDefault) {
  RuleSet rs;
  auto c = compile(rs, 1);
  ASSERT_TRUE(c);
  AclKey k = acl_key(FlowKey{});
  const AclKey* p = &k;
  uint32_t res[kTables] = {9, 9, 9, 9};
  classify(**c, &p, 1, res);
  for (unsigned t = 0; t < kTables; t++) EXPECT_EQ(res[t], 0u);
}

TEST(AclVsLinear, FirstMatchWinsEvenWhenLaterRuleIsMoreSpecific) {
  RuleSet rs;
  Rule broad, narrow;
  broad.match.dst = {{0x0a000000, 8}};
  narrow.match.dst = {{0x0a010203, 32}};
  narrow.match.protos = {17};
  rs.table[unsigned(Table::filter)].rules = {broad, narrow};
  rs.table[unsigned(Table::nat)].rules = {narrow, broad};
  auto c = compile(rs, 2);
  ASSERT_TRUE(c) << c.error();
  FlowKey f;
  f.proto = 17;
  f.dst = 0x0a010203;
  AclKey k = acl_key(f);
  const AclKey* p = &k;
  uint32_t res[kTables];
  classify(**c, &p, 1, res);
  EXPECT_EQ(res[unsigned(Table::filter)], 1u);
  EXPECT_EQ(res[unsigned(Table::nat)], 1u);
  EXPECT_EQ(res[unsigned(Table::spd)], 0u);
}

TEST(AclCompile, TwoGenerationsLiveAtOnceAndAnExplosiveRuleIsRefused) {
  RuleSet rs;
  Rule r;
  r.match.protos = {6};
  rs.table[0].rules = {r};
  auto a = compile(rs, 7), b = compile(rs, 8);
  ASSERT_TRUE(a) << a.error();
  ASSERT_TRUE(b) << b.error();
  Rule huge;
  huge.file = "moat.yaml";
  huge.line = 12;
  huge.col = 5;
  for (int i = 0; i < 300; i++) huge.match.src.push_back({uint32_t(i) << 8, 24});
  for (int i = 0; i < 300; i++) huge.match.dst.push_back({uint32_t(i) << 8, 24});
  rs.table[0].rules.push_back(huge);
  auto bad = compile(rs, 9);
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().find("moat.yaml:12:5"), std::string::npos) << bad.error();
}

}  // namespace
}  // namespace moat
