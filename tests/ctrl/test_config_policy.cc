// The rule tables in the config: the shipped moat policy loads; every kind of
// bad rule is an error at its file:line:col, and only that rule is left out.
#include <gtest/gtest.h>

#include <fstream>

#include "ctrl/config.hh"

using namespace moat;

namespace {

std::string write_tmp(const std::string& text) {
  static int n = 0;
  std::string path = testing::TempDir() + "moat_policy_" + std::to_string(::getpid()) + "_" + std::to_string(n++) + ".yaml";
  std::ofstream(path) << text;
  return path;
}

const std::string kPorts = R"(ports:
  - {name: wan, device: net_null0, address: 192.0.2.2/24}
  - {name: office, device: net_null1, address: 10.1.0.1/24}
  - {name: kids, device: net_null2, address: 192.168.7.1/24}
zones:
  wild: [wan]
  inside: [office, kids]
tunnels:
  - {name: corp}
)";

std::vector<ConfigError> errors_of(const std::string& policy, Config* out = nullptr) {
  std::vector<ConfigError> errs;
  Config c = load_config(write_tmp(kPorts + policy), errs);
  if (out) *out = c;
  return errs;
}

// Expects exactly one error, at `line`:`col`, mentioning `what`.
void expect_error(const std::string& policy, int line, int col, const std::string& what) {
  auto errs = errors_of(policy);
  ASSERT_EQ(errs.size(), 1u) << policy << (errs.empty() ? "" : "\nfirst: " + errs[0].str());
  EXPECT_EQ(errs[0].line, line) << errs[0].str();
  EXPECT_EQ(errs[0].col, col) << errs[0].str();
  EXPECT_NE(errs[0].what.find(what), std::string::npos) << errs[0].str();
}

TEST(ConfigPolicy, ShippedMoatPolicyLoadsAndMeansTheSeedsPolicy) {
  std::string path = std::string(getenv("MOAT_SRC") ? getenv("MOAT_SRC") : "..") + "/configs/moat.yaml";
  std::vector<ConfigError> errs;
  Config c = load_config(path, errs);
  for (auto& e : errs) ADD_FAILURE() << e.str();
  ASSERT_TRUE(c.has_policy);
  EXPECT_EQ(c.rules.zones, (std::vector<std::string>{"local", "wild", "office", "kids", "vpn"}));
  EXPECT_EQ(c.rules.tunnels, (std::vector<std::string>{"corp"}));
  EXPECT_EQ(c.rules.table[unsigned(Table::filter)].deflt.action, uint8_t(FilterAction::drop));
  EXPECT_GT(c.rules.table[unsigned(Table::filter)].rules.size(), 5u);
  EXPECT_EQ(c.rules.table[unsigned(Table::nat)].rules.at(0).verdict.action, uint8_t(NatAction::masquerade));
}

TEST(ConfigPolicy, ZonesNameTheirPortsAndOtherPortsAreZonesOfTheirOwn) {
  Config c;
  auto errs = errors_of("", &c);
  ASSERT_TRUE(errs.empty()) << errs[0].str();
  EXPECT_EQ(c.rules.zones, (std::vector<std::string>{"local", "wild", "inside", "vpn"}));
  EXPECT_EQ(c.port_zone, (std::vector<uint8_t>{1, 2, 2}));
  EXPECT_EQ(c.rules.tunnel_zone, (std::vector<uint8_t>{3}));

  std::vector<ConfigError> e2;
  Config d = load_config(write_tmp(R"(ports:
  - {name: wan, device: net_null0}
  - {name: lan, device: net_null1}
zones:
  wild: [wan]
)"), e2);
  ASSERT_TRUE(e2.empty()) << e2[0].str();
  EXPECT_EQ(d.rules.zones, (std::vector<std::string>{"local", "wild", "lan"}));
}

TEST(ConfigPolicy, FilterRulesCompileToTheirFields) {
  Config c;
  auto errs = errors_of(R"(filter:
  default: reject
  rules:
    - {name: web, from: inside, to: wild, dst: [8.8.8.0/24, 1.1.1.1], proto: [tcp, udp], dport: [53, 1000-2000], action: accept}
    - {from: wild, to: local, proto: icmp, icmp_type: 8, icmp_code: 0, dscp: ef, action: drop}
)", &c);
  ASSERT_TRUE(errs.empty()) << errs[0].str();
  const RuleTable& f = c.rules.table[unsigned(Table::filter)];
  EXPECT_EQ(f.deflt.action, uint8_t(FilterAction::reject));
  ASSERT_EQ(f.rules.size(), 2u);
  const Match& m = f.rules[0].match;
  EXPECT_EQ(m.in_zones, (std::vector<uint8_t>{2}));
  EXPECT_EQ(m.out_zones, (std::vector<uint8_t>{1}));
  ASSERT_EQ(m.dst.size(), 2u);
  EXPECT_EQ(m.dst[1].addr, 0x01010101u);
  EXPECT_EQ(m.dst[1].len, 32);
  EXPECT_EQ(m.protos, (std::vector<uint8_t>{6, 17}));
  EXPECT_EQ(m.dports, (std::vector<Range16>{{53, 53}, {1000, 2000}}));
  EXPECT_EQ(f.rules[0].line, 13);
  const Match& i = f.rules[1].match;
  EXPECT_EQ(i.sports, (std::vector<Range16>{{8, 8}}));  // ICMP type in the source-port slot
  EXPECT_EQ(i.dports, (std::vector<Range16>{{0, 0}}));
  EXPECT_EQ(i.dscp, std::optional<uint8_t>(46));
}

TEST(ConfigPolicy, BadRulesAreErrorsAtTheirPlace) {
  // Line 10 is the first line after kPorts.
  expect_error("filter:\n  rules:\n    - {dst: 10.1.2.3/8, action: drop}\n", 12, 13, "host bits");
  expect_error("filter:\n  rules:\n    - {dst: 10.0.0.0/33, action: drop}\n", 12, 13, "prefix length");
  expect_error("filter:\n  rules:\n    - {proto: tcp, dport: 2000-1000, action: drop}\n", 12, 27, "reversed");
  expect_error("filter:\n  rules:\n    - {from: dmz, action: drop}\n", 12, 14, "no zone named \"dmz\"");
  expect_error("filter:\n  rules:\n    - {dport: 22, action: drop}\n", 12, 15, "ports need proto");
  expect_error("filter:\n  rules:\n    - {proto: tcp, icmp_type: 3, action: drop}\n", 12, 31, "need proto icmp");
  expect_error("filter:\n  rules:\n    - {proto: tcpp, action: drop}\n", 12, 15, "not a protocol");
  expect_error("filter:\n  rules:\n    - {action: allow}\n", 12, 16, "unknown action \"allow\"");
  expect_error("filter:\n  rules:\n    - {from: wild}\n", 12, 7, "missing \"action\"");
  expect_error("filter:\n  rules:\n    - {form: wild, action: drop}\n", 12, 8, "unknown key \"form\"");
  expect_error("filter:\n  rules:\n    - {name: a, action: drop}\n    - {name: a, action: accept}\n", 13, 7,
               "name \"a\" already used at line 12");
  expect_error("spd:\n  rules:\n    - {action: protect, tunnel: nowhere}\n", 12, 33, "no tunnel named \"nowhere\"");
  expect_error("spd:\n  rules:\n    - {action: protect}\n", 12, 16, "needs \"tunnel\"");
  expect_error("spd:\n  rules:\n    - {action: bypass, tunnel: corp}\n", 12, 32, "does not apply");
  expect_error("qos:\n  classes: [voice]\n  rules:\n    - {dscp: 46, class: video}\n", 13, 25, "no class named \"video\"");
  expect_error("nat:\n  rules:\n    - {action: snat, pool: 10.0.0.9-10.0.0.1}\n", 12, 28, "pool");
  expect_error("nat:\n  rules:\n    - {action: dnat, to_port: 80}\n", 12, 16, "needs \"to_addr\"");
  std::vector<ConfigError> errs;
  load_config(write_tmp("ports:\n  - {name: wan, device: net_null0}\nzones:\n  a: [wan]\n  b: [wan, lan]\n"), errs);
  ASSERT_EQ(errs.size(), 2u);
  EXPECT_EQ(errs[0].str().substr(errs[0].str().find(".yaml:")), ".yaml:5:7: zones.b: port wan is already in zone a");
  EXPECT_NE(errs[1].what.find("no port named \"lan\""), std::string::npos) << errs[1].str();
}

TEST(ConfigPolicy, OneBadRuleIsLeftOutAndTheOthersStay) {
  Config c;
  auto errs = errors_of(R"(filter:
  rules:
    - {name: one, action: accept}
    - {name: two, proto: bogus, action: drop}
    - {name: three, action: drop}
)", &c);
  ASSERT_EQ(errs.size(), 1u);
  const auto& rules = c.rules.table[unsigned(Table::filter)].rules;
  ASSERT_EQ(rules.size(), 2u);
  EXPECT_EQ(rules[0].name, "one");
  EXPECT_EQ(rules[1].name, "three");
}

TEST(ConfigPolicy, RoutesIntoTunnelsNameADeclaredTunnel) {
  Config c;
  auto errs = errors_of("routes:\n  - {prefix: 10.9.0.0/16, tunnel: corp}\n", &c);
  ASSERT_TRUE(errs.empty()) << errs[0].str();
  ASSERT_EQ(c.routes.size(), 1u);
  EXPECT_EQ(c.routes[0].type, RouteType::tunnel);
  expect_error("routes:\n  - {prefix: 10.9.0.0/16, tunnel: elsewhere}\n", 11, 1, "no tunnel named \"elsewhere\"");
}

TEST(ConfigPolicy, NoPolicyMeansAPlainRouter) {
  std::vector<ConfigError> errs;
  Config c = load_config(write_tmp("ports:\n  - {name: wan, device: net_null0}\n"), errs);
  ASSERT_TRUE(errs.empty());
  EXPECT_FALSE(c.has_policy);
  EXPECT_EQ(c.rules.table[unsigned(Table::filter)].deflt.action, uint8_t(FilterAction::accept));
}

}  // namespace
