// The stateful filter and the connection table in the config: filter rules
// are stateful unless the table or the rule says otherwise; conntrack sizes
// and timeouts are read, range-checked and reported at file:line:col.
#include <gtest/gtest.h>

#include <fstream>

#include "ctrl/config.hh"

using namespace moat;

namespace {

std::string write_tmp(const std::string& text) {
  static int n = 0;
  std::string path = testing::TempDir() + "moat_ct_" + std::to_string(::getpid()) + "_" + std::to_string(n++) + ".yaml";
  std::ofstream(path) << text;
  return path;
}

const std::string kPorts = R"(ports:
  - {name: wan, device: net_null0, address: 192.0.2.2/24}
  - {name: kids, device: net_null1, address: 192.168.7.1/24}
zones:
  wild: [wan]
  kids: [kids]
)";

Config load(const std::string& body, std::vector<ConfigError>& errs) { return load_config(write_tmp(kPorts + body), errs); }

uint8_t flags(const Config& c, size_t rule) { return c.rules.table[unsigned(Table::filter)].rules.at(rule).verdict.flags; }

}  // namespace

TEST(ConfigConntrack, FilterRulesAreStatefulByDefault) {
  std::vector<ConfigError> errs;
  Config c = load(R"(filter:
  default: drop
  rules:
    - {from: kids, to: wild, action: accept}
    - {from: kids, to: local, proto: udp, dport: 53, action: accept, stateful: false}
    - {from: wild, action: drop}
)", errs);
  ASSERT_TRUE(errs.empty()) << errs[0].str();
  EXPECT_TRUE(flags(c, 0) & Verdict::kStateful);
  EXPECT_FALSE(flags(c, 1) & Verdict::kStateful);
  EXPECT_FALSE(flags(c, 2) & Verdict::kStateful);
  EXPECT_EQ(c.conntrack.max_connections, CtConfig{}.max_connections);
}

TEST(ConfigConntrack, TableWideStatelessWithPerRuleOverride) {
  std::vector<ConfigError> errs;
  Config c = load(R"(filter:
  stateful: false
  default: accept
  rules:
    - {from: kids, to: wild, action: accept}
    - {from: kids, to: local, action: accept, stateful: true}
)", errs);
  ASSERT_TRUE(errs.empty()) << errs[0].str();
  EXPECT_FALSE(flags(c, 0) & Verdict::kStateful);
  EXPECT_TRUE(flags(c, 1) & Verdict::kStateful);
  EXPECT_FALSE(c.rules.table[unsigned(Table::filter)].deflt.flags & Verdict::kStateful);
}

TEST(ConfigConntrack, StatefulOnlyAppliesToAccept) {
  std::vector<ConfigError> errs;
  load(R"(filter:
  rules:
    - {from: wild, action: drop, stateful: true}
)", errs);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0].line, 9);
  EXPECT_NE(errs[0].what.find("\"stateful\" does not apply to action drop"), std::string::npos) << errs[0].str();
}

TEST(ConfigConntrack, SizesAndTimeouts) {
  std::vector<ConfigError> errs;
  Config c = load(R"(conntrack:
  max_connections: 1000
  timeouts: {tcp_established: 86400, udp: 45, icmp: 10}
)", errs);
  ASSERT_TRUE(errs.empty()) << errs[0].str();
  EXPECT_EQ(c.conntrack.max_connections, 1000u);
  EXPECT_EQ(c.conntrack.timeouts.tcp_established, 86400u);
  EXPECT_EQ(c.conntrack.timeouts.udp, 45u);
  EXPECT_EQ(c.conntrack.timeouts.icmp, 10u);
  EXPECT_EQ(c.conntrack.timeouts.tcp_syn, CtTimeouts{}.tcp_syn);
}

TEST(ConfigConntrack, BadValuesAreErrorsAtTheirPlace) {
  std::vector<ConfigError> errs;
  load(R"(conntrack:
  max_connections: 10
  timeouts: {tcp_forever: 5, udp: 0}
)", errs);
  ASSERT_EQ(errs.size(), 3u);
  EXPECT_EQ(errs[0].line, 8);
  EXPECT_NE(errs[0].what.find("conntrack.max_connections"), std::string::npos) << errs[0].str();
  EXPECT_EQ(errs[1].line, 9);
  EXPECT_NE(errs[1].what.find("tcp_forever"), std::string::npos) << errs[1].str();
  EXPECT_NE(errs[2].what.find("conntrack.timeouts.udp"), std::string::npos) << errs[2].str();
}
