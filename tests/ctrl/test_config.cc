// Config loading: every error names file:line:col and the cause; unknown
// keys and wrong types are errors; a valid file loads completely.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <regex>

#include "ctrl/config.hh"

using namespace moat;

namespace {

std::string write_tmp(const std::string& text) {
  static int n = 0;
  std::string path = testing::TempDir() + "moat_cfg_" + std::to_string(::getpid()) + "_" + std::to_string(n++) + ".yaml";
  std::ofstream(path) << text;
  return path;
}

const char* kGood = R"(eal:
  lcores: [0, 1]
  memory_mb: 256
  no_huge: true
ports:
  - name: wan
    device: net_af_packet0,iface=veth0
    address: 192.0.2.2/24
  - name: lan
    device: net_af_packet1,iface=veth1
    address: 10.1.0.1/24
    mtu: 9000
routes:
  - prefix: 0.0.0.0/0
    via: 192.0.2.1
  - prefix: 10.66.0.0/16
    type: prohibit
neighbors:
  - {ip: 10.1.0.9, mac: "02:00:00:00:00:09", port: lan}
)";

}  // namespace

TEST(Config, ValidFileLoads) {
  std::vector<ConfigError> errs;
  Config c = load_config(write_tmp(kGood), errs);
  ASSERT_TRUE(errs.empty()) << errs[0].str();
  ASSERT_EQ(c.ports.size(), 2u);
  EXPECT_EQ(c.ports[1].mtu, 9000);
  EXPECT_EQ(c.ports[0].address->addr, 0xc0000202u);
  EXPECT_EQ(c.ports[0].address->len, 24);
  ASSERT_EQ(c.routes.size(), 2u);
  EXPECT_EQ(c.routes[0].via, 0xc0000201u);
  EXPECT_EQ(c.routes[1].type, RouteType::prohibit);
  EXPECT_EQ(c.neighbors.size(), 1u);
  EXPECT_EQ(c.workers(), 1u);
}

TEST(Config, EveryErrorIsReportedWithLineAndColumn) {
  // Four independent mistakes: all four must be reported, each at its place.
  const char* bad = R"(eal:
  lcores: [0, 1]
  memroy_mb: 256
ports:
  - name: wan
    device: net_af_packet0,iface=veth0
    address: 192.0.2.300/24
    mtu: lots
routes:
  - prefix: 10.0.0.1/8
    via: 192.0.2.1
)";
  std::vector<ConfigError> errs;
  std::string path = write_tmp(bad);
  load_config(path, errs);
  ASSERT_EQ(errs.size(), 4u);
  auto find = [&](int line) -> const ConfigError* {
    for (auto& e : errs)
      if (e.line == line) return &e;
    return nullptr;
  };
  ASSERT_TRUE(find(3));
  EXPECT_EQ(find(3)->col, 3);
  EXPECT_NE(find(3)->what.find("unknown key \"memroy_mb\""), std::string::npos);
  ASSERT_TRUE(find(7));
  EXPECT_EQ(find(7)->col, 14);
  ASSERT_TRUE(find(8));
  EXPECT_NE(find(8)->what.find("expected an integer"), std::string::npos);
  ASSERT_TRUE(find(10));
  EXPECT_NE(find(10)->what.find("host bits"), std::string::npos);
  // The printed form is file:line:col: what.
  EXPECT_TRUE(std::regex_match(find(3)->str(), std::regex(".*moat_cfg_.*\\.yaml:3:3: .*")));
}

TEST(Config, WrongTypesAndMissingFields) {
  const char* bad = R"(ports:
  - name: wan
  - device: net_null0
    name: [a, b]
workers: 32
)";
  std::vector<ConfigError> errs;
  load_config(write_tmp(bad), errs);
  std::string all;
  for (auto& e : errs) all += e.str() + "\n";
  EXPECT_NE(all.find(":2:5: port: missing \"device\""), std::string::npos) << all;
  EXPECT_NE(all.find(":4:11: port.name: expected a string"), std::string::npos) << all;
  EXPECT_NE(all.find(":5:10: workers: expected a mapping"), std::string::npos) << all;
}

TEST(Config, GatewayMustBeOnAConnectedSubnet) {
  std::string t = kGood;
  t.replace(t.find("via: 192.0.2.1"), 14, "via: 172.16.0.1");
  std::vector<ConfigError> errs;
  load_config(write_tmp(t), errs);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_NE(errs[0].what.find("gateway 172.16.0.1 is on no port's subnet"), std::string::npos);
}

TEST(Config, YamlSyntaxErrorHasAPlace) {
  std::vector<ConfigError> errs;
  load_config(write_tmp("ports: [\n  - name: x\n"), errs);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_GT(errs[0].line, 0);
  EXPECT_NE(errs[0].what.find("YAML syntax"), std::string::npos);
}

TEST(Config, DuplicatePortNamesAndDevices) {
  const char* bad = R"(ports:
  - {name: a, device: net_null0}
  - {name: a, device: net_null0}
)";
  std::vector<ConfigError> errs;
  load_config(write_tmp(bad), errs);
  ASSERT_EQ(errs.size(), 2u);
  EXPECT_EQ(errs[0].line, 3);
}

TEST(Config, EalArgumentsComeFromTheConfig) {
  std::vector<ConfigError> errs;
  Config c = load_config(write_tmp(kGood), errs);
  auto a = eal_args(c, "moatd");
  std::string s;
  for (auto& x : a) s += x + " ";
  EXPECT_NE(s.find("-l 0,1 --main-lcore 0 -m 256 --no-huge --no-shconf"), std::string::npos) << s;
  EXPECT_NE(s.find("--vdev net_af_packet0,iface=veth0"), std::string::npos) << s;
  EXPECT_NE(s.find("--no-pci"), std::string::npos) << s;
}

TEST(Config, LcoresMayBeMappedOntoCpus) {
  std::string t = kGood;
  t.replace(t.find("lcores: [0, 1]"), 14, "lcores: [0, \"1@1\", \"2@1\"]");
  std::vector<ConfigError> errs;
  Config c = load_config(write_tmp(t), errs);
  ASSERT_TRUE(errs.empty()) << errs[0].str();
  EXPECT_EQ(c.workers(), 2u);
  std::string s;
  for (auto& x : eal_args(c, "moatd")) s += x + " ";
  EXPECT_NE(s.find("--lcores 0,1@1,2@1 --main-lcore 0"), std::string::npos) << s;
  t = kGood;
  t.replace(t.find("lcores: [0, 1]"), 14, "lcores: [0, \"1@x\"]");
  errs.clear();
  load_config(write_tmp(t), errs);
  ASSERT_FALSE(errs.empty());
  EXPECT_EQ(errs[0].line, 2);
  EXPECT_NE(errs[0].what.find("LCORE@CPU"), std::string::npos) << errs[0].str();
}
