// qos.shaping and qos.police in the config: a seed-003 tree loads as written;
// every bad tree is an error at its file:line:col and the tree is left out.
#include <gtest/gtest.h>

#include <fstream>

#include "ctrl/config.hh"
#include "ctrl/config_qos.hh"

using namespace moat;

namespace {

std::string write_tmp(const std::string& text) {
  static int n = 0;
  std::string path = testing::TempDir() + "moat_qos_" + std::to_string(::getpid()) + "_" + std::to_string(n++) + ".yaml";
  std::ofstream(path) << text;
  return path;
}

// 10 lines: the qos key is on line 11.
const std::string kHead = R"(ports:
  - {name: wan, device: net_null0, address: 192.0.2.2/24}
  - {name: office, device: net_null1, address: 10.1.0.1/24}
zones:
  wild: [wan]
  inside: [office]
tunnels:
  - {name: corp}
  - {name: branch, rate: 2mbit, ceil: 4mbit}
# ---
)";

Config load(const std::string& qos, std::vector<ConfigError>& errs) {
  return load_config(write_tmp(kHead + qos), errs);
}

void expect_error(const std::string& qos, int line, int col, const std::string& what) {
  std::vector<ConfigError> errs;
  Config c = load(qos, errs);
  ASSERT_EQ(errs.size(), 1u) << qos << (errs.empty() ? "" : "\nfirst: " + errs[0].str());
  EXPECT_EQ(errs[0].line, line) << errs[0].str();
  EXPECT_EQ(errs[0].col, col) << errs[0].str();
  EXPECT_NE(errs[0].what.find(what), std::string::npos) << errs[0].str();
  EXPECT_TRUE(c.shapers.empty()) << "a tree with an error must be left out";
}

const std::string kSeedTree = R"(qos:
  classes: [audio, camera, web, video]
  rules:
    - {name: audio, proto: udp, dport: 5004, class: audio}
  shaping:
    - port: wan
      rate: 128kbit
      default: web
      dscp: {ef: audio, af41: video}
      classes:
        - {name: audio, rate: 64kbit, prio: 0}
        - {name: camera, rate: 9.6kbit, ceil: 128kbit, prio: 1}
        - {name: data, rate: 54.4kbit, ceil: 128kbit}
        - {name: web, parent: data, rate: 34.4kbit, ceil: 128kbit, prio: 2}
        - {name: video, parent: data, rate: 20kbit, ceil: 128kbit, prio: 3, queue: 64, drop: codel}
)";

}  // namespace

TEST(ConfigQos, RatesAreReadAsTcWritesThem) {
  EXPECT_EQ(parse_rate("128kbit"), 16000u);
  EXPECT_EQ(parse_rate("9.6kbit"), 1200u);
  EXPECT_EQ(parse_rate("10mbit"), 1250000u);
  EXPECT_EQ(parse_rate("1gbit"), 125000000u);
  EXPECT_EQ(parse_rate("16kbps"), 16000u);
  EXPECT_FALSE(parse_rate("128"));     // no unit: bits or bytes?
  EXPECT_FALSE(parse_rate("fast"));
  EXPECT_FALSE(parse_rate("0kbit"));
  EXPECT_FALSE(parse_rate("12furlongs"));
}

TEST(ConfigQos, SeedTreeLoadsAsWritten) {
  std::vector<ConfigError> errs;
  Config c = load(kSeedTree, errs);
  for (auto& e : errs) ADD_FAILURE() << e.str();
  ASSERT_EQ(c.shapers.size(), 1u);
  const ShaperConfig& s = c.shapers[0];
  EXPECT_EQ(s.port, "wan");
  ASSERT_EQ(s.plan.classes.size(), 6u);
  EXPECT_EQ(s.plan.classes[0].rate, 16000u);  // the link
  EXPECT_EQ(s.plan.classes[0].ceil, 16000u);
  EXPECT_EQ(s.plan.classes[1].name, "audio");
  EXPECT_EQ(s.plan.classes[1].ceil, s.plan.classes[1].rate) << "no ceil: does not borrow (HTB's default)";
  EXPECT_EQ(s.plan.classes[4].name, "web");
  EXPECT_EQ(s.plan.classes[4].parent, 3);  // data
  EXPECT_EQ(s.plan.classes[5].limit, 64u);
  EXPECT_EQ(s.plan.classes[5].drop, qos::DropPolicy::codel);
  EXPECT_EQ(s.default_leaf, "web");
  EXPECT_EQ(s.dscp[46], "audio");
  EXPECT_EQ(s.dscp[34], "video");
  EXPECT_TRUE(qos::validate(s.plan).empty());
}

TEST(ConfigQos, ChildrenRatesAboveTheParentsAreAnErrorAtTheTree) {
  std::string t = kSeedTree;
  t.replace(t.find("rate: 20kbit"), 12, "rate: 30kbit");  // web 34.4 + video 30 > data 54.4
  expect_error(t, 23, 11, "exceed the parent's");  // at the parent, data
}

TEST(ConfigQos, CeilingBelowTheRateIsAnErrorAtTheClass) {
  std::string t = kSeedTree;
  t.replace(t.find("rate: 9.6kbit, ceil: 128kbit"), 28, "rate: 9.6kbit, ceil: 8kbit");
  expect_error(t, 22, 11, "below the rate");
}

TEST(ConfigQos, ParentNotDefinedAboveIsAnError) {
  std::string t = kSeedTree;
  t.replace(t.find("parent: data, rate: 34.4kbit"), 12, "parent: nope");
  expect_error(t, 24, 11, "parent \"nope\"");
}

TEST(ConfigQos, ClassTwiceIsAnError) {
  std::string t = kSeedTree;
  t.replace(t.find("name: camera"), 12, "name: audio ");
  expect_error(t, 22, 11, "defined twice");
}

TEST(ConfigQos, UnknownPortIsAnError) {
  std::string t = kSeedTree;
  t.replace(t.find("port: wan"), 9, "port: wlan");
  expect_error(t, 16, 13, "no port named \"wlan\"");
}

TEST(ConfigQos, DefaultMustBeALeaf) {
  std::string t = kSeedTree;
  t.replace(t.find("default: web"), 12, "default: data");
  expect_error(t, 18, 16, "not a leaf");
}

TEST(ConfigQos, DscpMapNamesLeavesAndDscps) {
  std::string t = kSeedTree;
  t.replace(t.find("af41: video"), 11, "af41: data");
  expect_error(t, 19, 31, "not a leaf");
  t = kSeedTree;
  t.replace(t.find("af41: video"), 11, "af99: video");
  expect_error(t, 19, 25, "not a DSCP");
}

TEST(ConfigQos, BadRateAndUnknownKeyAreErrors) {
  std::string t = kSeedTree;
  t.replace(t.find("rate: 64kbit"), 12, "rate: 64kbt ");
  expect_error(t, 21, 31, "not a rate");
  t = kSeedTree;
  t.replace(t.find("prio: 0}"), 8, "prio: 0, colour: red}");
  expect_error(t, 21, 48, "unknown key \"colour\"");
}

TEST(ConfigQos, AnotherTreeStaysWhenOneIsBroken) {
  std::string t = kSeedTree + R"(    - port: office
      rate: 1gbit
      classes:
        - {name: bulk, rate: 2gbit}
    - port: wan
      rate: 1mbit
)";
  std::vector<ConfigError> errs;
  Config c = load(t, errs);
  ASSERT_EQ(errs.size(), 2u);
  EXPECT_NE(errs[0].what.find("exceed the parent's"), std::string::npos) << errs[0].str();  // office
  EXPECT_NE(errs[1].what.find("already shaped"), std::string::npos) << errs[1].str();
  ASSERT_EQ(c.shapers.size(), 1u);
  EXPECT_EQ(c.shapers[0].port, "wan");
}

TEST(ConfigQos, MoatsTemplateAndTunnelOverridesLoad) {
  std::string t = R"(qos:
  classes: [voice, bulk]
  shaping:
    - port: wan
      rate: 10mbit
      moats:
        rate: 1mbit
        ceil: 2mbit
        default: bulk
        classes:
          - {name: voice, rate: 200kbit, ceil: 2mbit, prio: 0}
          - {name: bulk, rate: 800kbit, ceil: 2mbit, prio: 1}
)";
  std::vector<ConfigError> errs;
  Config c = load(t, errs);
  for (auto& e : errs) ADD_FAILURE() << e.str();
  ASSERT_EQ(c.shapers.size(), 1u);
  EXPECT_TRUE(c.shapers[0].moats);
  ASSERT_EQ(c.shapers[0].moat.classes.size(), 3u);
  EXPECT_EQ(c.shapers[0].moat.classes[0].ceil, 250000u);
  EXPECT_EQ(c.shapers[0].moat_default, "bulk");
  ASSERT_EQ(c.tunnels.size(), 2u);
  EXPECT_EQ(c.tunnels[1].shape_rate, 250000u);
  EXPECT_EQ(c.tunnels[1].shape_ceil, 500000u);
}

TEST(ConfigQos, PoliceNeedsAKnownClassAndSaneRates) {
  std::string t = kSeedTree + R"(  police:
    - {class: video, rate: 100kbit, peak: 128kbit, exceed: mark af13}
)";
  std::vector<ConfigError> errs;
  Config c = load(t, errs);
  for (auto& e : errs) ADD_FAILURE() << e.str();
  ASSERT_EQ(c.police.size(), 1u);
  EXPECT_EQ(c.police[0].cir, 12500u);
  EXPECT_EQ(c.police[0].yellow_dscp, 14);
  std::string bad = kSeedTree + R"(  police:
    - {class: radio, rate: 100kbit}
)";
  errs.clear();
  c = load(bad, errs);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_NE(errs[0].what.find("no class named \"radio\""), std::string::npos) << errs[0].str();
  EXPECT_TRUE(c.police.empty());
  bad = kSeedTree + R"(  police:
    - {class: video, rate: 100kbit, peak: 50kbit}
)";
  errs.clear();
  c = load(bad, errs);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_NE(errs[0].what.find("peak below rate"), std::string::npos) << errs[0].str();
}
