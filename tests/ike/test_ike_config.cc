// The tunnel directory read on several threads (moatd's start with
// thousands of moats): the same tunnels and the same errors, in the same
// order and at the same places, as one thread reading it; broken records
// among many are still skipped with their place.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "ctrl/ike/config.hh"

using namespace moat::ike;

namespace {

std::string good(int i) {
  return "local_id: portal.example.net\n"
         "remote_id: moat-" + std::to_string(i) + "@moats.example.net\n"
         "psk: \"0123456789abcdef0123\"\n"
         "funnels: [{local: 172.16.0.0/12, remote: 10." + std::to_string(i / 256) + "." + std::to_string(i % 256) +
         ".0/24}]\n";
}

std::vector<cpu_set_t> cpus(size_t n) {
  cpu_set_t mine;
  EXPECT_EQ(sched_getaffinity(0, sizeof mine, &mine), 0);
  return std::vector<cpu_set_t>(n, mine);  // oversubscribed on purpose: order must not depend on timing
}

TEST(IkeConfigDir, ThreadsGiveTheOneThreadResultAndBrokenRecordsKeepTheirPlace) {
  auto dir = std::filesystem::temp_directory_path() / ("moat-ike-cfgdir-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const int n = 1000;
  for (int i = 0; i < n; i++) {
    char name[32];
    snprintf(name, sizeof name, "m%04d.yaml", i);
    std::ofstream f(dir / name);
    if (i == 3) f << "local_id: portal.example.net\nremote_id: [unclosed\n";  // YAML syntax
    else if (i == 500) f << good(i) << "ike_proposals: aes-gcm-17-prfsha256-x25519\n";  // line 5, col 16
    else if (i == 777) f << good(42);  // remote_id of m0042, loaded long before on another thread's share
    else if (i == 998) f << "name: m0100\n" << good(i);  // name of m0100
    else f << good(i);
  }
  auto one = load_tunnel_dir(dir.string());
  auto many = load_tunnel_dir(dir.string(), cpus(4));
  std::filesystem::remove_all(dir);

  ASSERT_EQ(one.tunnels.size(), size_t(n - 4));
  ASSERT_EQ(many.tunnels.size(), one.tunnels.size());
  for (size_t i = 0; i < one.tunnels.size(); i++) {
    EXPECT_EQ(many.tunnels[i].name, one.tunnels[i].name);
    EXPECT_EQ(many.tunnels[i].origin, one.tunnels[i].origin);
    EXPECT_EQ(many.tunnels[i].remote_id.str(), one.tunnels[i].remote_id.str());
    EXPECT_EQ(many.tunnels[i].remote_ts, one.tunnels[i].remote_ts);
  }
  EXPECT_EQ(many.by_name.size(), one.by_name.size());
  ASSERT_EQ(one.errors.size(), 4u);
  ASSERT_EQ(many.errors.size(), one.errors.size());
  for (size_t i = 0; i < one.errors.size(); i++) EXPECT_EQ(many.errors[i].str(), one.errors[i].str());
  // Their places, in file order.
  const auto& e = many.errors;
  EXPECT_NE(e[0].str().find("m0003.yaml:"), std::string::npos) << e[0].str();
  EXPECT_NE(e[0].str().find("YAML syntax"), std::string::npos) << e[0].str();
  EXPECT_NE(e[1].str().find("m0500.yaml:5:16: tunnel \"m0500\": ike_proposals:"), std::string::npos) << e[1].str();
  EXPECT_NE(e[2].str().find("m0777.yaml:2:12: tunnel \"m0777\": remote_id \"moat-42@moats.example.net\" already used "
                            "by tunnel \"m0042\""),
            std::string::npos)
      << e[2].str();
  EXPECT_NE(e[3].str().find("m0998.yaml:1:1: tunnel \"m0100\": name already used by"), std::string::npos) << e[3].str();
  for (auto& x : e) EXPECT_NE(x.str().find("record skipped"), std::string::npos) << x.str();
  // The skipped ones are not there; their neighbours are.
  EXPECT_FALSE(many.by_name.count("m0500"));
  EXPECT_FALSE(many.by_name.count("m0777"));
  EXPECT_TRUE(many.by_name.count("m0499"));
  EXPECT_TRUE(many.by_name.count("m0501"));
  EXPECT_EQ(many.tunnels[many.by_name.at("m0100")].origin, one.tunnels[one.by_name.at("m0100")].origin);
}

// The tunnel files are read with yaml-cpp through ctrl/yaml_reader.hh, as
// moatd's own configuration; what the loader relies on, file by file.
TEST(IkeConfigDir, YamlMeaningTheLoaderReliesOn) {
  auto dir = std::filesystem::temp_directory_path() / ("moat-ike-yaml-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const std::string rest = "psk: \"0123456789abcdef0123\"\nfunnels: [{local: 10.0.0.0/8, remote: 10.1.0.0/24}]\n";
  auto write = [&](const char* name, const std::string& text) { std::ofstream(dir / name) << text; };
  write("a-alias.yaml", "local_id: &me portal.example.net\nremote_id: a@x\n" + rest + "name: *me\n");
  write("b-dupkey.yaml", "local_id: portal.example.net\nremote_id: b@x\nremote_id: c@x\n" + rest);
  write("c-flow.yaml", "{local_id: portal.example.net, remote_id: d@x, psk: \"0123456789abcdef0123\", "
                       "funnels: [{local: 10.0.0.0/8, remote: 10.1.0.0/24}]}\n");
  write("d-docs.yaml", "---\nlocal_id: portal.example.net\nremote_id: e@x\n" + rest + "...\n---\nbroken: [\n");
  write("e-null.yaml", "local_id: portal.example.net\nremote_id: ~\n" + rest);
  write("f-empty.yaml", "");
  write("g-quote.yaml", "local_id: portal.example.net\nremote_id: g@x\npsk: \"0123456789abcdef0123\nfunnels: []\n");
  write("h-list.yaml", "- local_id\n- remote_id\n");
  write("i-comment.yaml", "# one moat\n\nlocal_id: portal.example.net\nremote_id: i@x\n" + rest);
  auto r = load_tunnel_dir(dir.string());
  std::filesystem::remove_all(dir);
  std::vector<std::string> names, errors;
  for (auto& t : r.tunnels) names.push_back(t.name);
  for (auto& e : r.errors) errors.push_back(e.str());
  ASSERT_EQ(names, (std::vector<std::string>{"portal.example.net", "b-dupkey", "c-flow", "d-docs", "i-comment"}));
  EXPECT_EQ(r.tunnels[1].remote_id.str(), "b@x");  // the first of repeated keys
  EXPECT_NE(r.tunnels[4].origin.find("i-comment.yaml:3"), std::string::npos) << r.tunnels[4].origin;
  ASSERT_EQ(errors.size(), 4u);
  EXPECT_NE(errors[0].find("e-null.yaml:2:12: tunnel \"e-null\": remote_id: expected a string"), std::string::npos)
      << errors[0];
  EXPECT_NE(errors[1].find("f-empty.yaml:1:1: tunnel \"f-empty\": expected a mapping"), std::string::npos) << errors[1];
  // yaml-cpp reads an unclosed quote to the end of the file: the record is
  // skipped for the keys the quote swallowed.
  EXPECT_NE(errors[2].find("g-quote.yaml:1:1: tunnel \"g-quote\": \"funnels\" is required"), std::string::npos)
      << errors[2];
  EXPECT_NE(errors[3].find("h-list.yaml:1:1: tunnel \"h-list\": expected a mapping"), std::string::npos) << errors[3];
}

// Durations and flags are the shared reader's (YamlReader::duration,
// ::boolean): units, and a bad or too large value skipped with its place.
TEST(IkeConfigDir, DurationsAndFlags) {
  auto dir = std::filesystem::temp_directory_path() / ("moat-ike-units-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "a-units.yaml") << good(1) << "lifetime: 10m\nrekey: 540s\ndpd: 30\nike_rekey: 1h\nmobike: off\n";
  std::ofstream(dir / "b-bad.yaml") << good(2) << "dpd: 5x\nlifetime: 999999999h\nstart: maybe\n";
  auto r = load_tunnel_dir(dir.string());
  std::filesystem::remove_all(dir);
  ASSERT_EQ(r.tunnels.size(), 1u);
  const PeerConfig& p = r.tunnels[0];
  EXPECT_EQ(p.child_lifetime_s, 600u);
  EXPECT_EQ(p.child_rekey_s, 540u);
  EXPECT_EQ(p.dpd_s, 30u);
  EXPECT_EQ(p.ike_rekey_s, 3600u);
  EXPECT_FALSE(p.mobike);
  std::string all;
  for (auto& e : r.errors) all += e.str() + "\n";
  ASSERT_EQ(r.errors.size(), 3u) << all;
  EXPECT_NE(all.find("b-bad.yaml:5:6: tunnel \"b-bad\": dpd: \"5x\" is not a duration"), std::string::npos) << all;
  EXPECT_NE(all.find("b-bad.yaml:6:11: tunnel \"b-bad\": lifetime: 999999999h is out of range"), std::string::npos) << all;
  EXPECT_NE(all.find("b-bad.yaml:7:8: tunnel \"b-bad\": start: expected true or false"), std::string::npos) << all;
}

}  // namespace
