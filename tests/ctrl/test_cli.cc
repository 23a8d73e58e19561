// The control socket: dispatch by longest command prefix, clear errors, and
// a server that a bad or silent client cannot block.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <thread>

#include "ctrl/cli_render.hh"
#include "ctrl/cli_server.hh"

using namespace moat;
using json = nlohmann::ordered_json;

namespace {

int connect_to(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) return -1;
  return fd;
}

// Sends `line` and pumps the server until the reply arrives.
json request(CliServer& s, const std::string& path, const std::string& line) {
  int fd = connect_to(path);
  EXPECT_GE(fd, 0);
  (void)!write(fd, line.data(), line.size());
  std::string reply;
  for (int i = 0; i < 1000; i++) {
    s.poll_once();
    char buf[4096];
    ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n > 0) reply.append(buf, size_t(n));
    if (n == 0) break;
  }
  close(fd);
  return json::parse(reply);
}

struct CliTest : testing::Test {
  std::string path = testing::TempDir() + "moat_cli_" + std::to_string(getpid()) + "/ctl.sock";
  CliServer s{path};
  std::vector<std::string> got;
  void SetUp() override {
    ASSERT_TRUE(s.open());
    s.on("show routes", [this](const std::vector<std::string>& a) { got = a; return json{{"which", "routes"}}; });
    s.on("show", [this](const std::vector<std::string>& a) { got = a; return json{{"which", "show"}}; });
    s.on("route add", [](const std::vector<std::string>& a) -> json {
      if (a.empty()) throw CliError("route add: needs a prefix");
      return json{{"added", a[0]}};
    });
  }
};

}  // namespace

TEST_F(CliTest, LongestPrefixDispatchWithRemainingArgs) {
  json r = request(s, path, R"({"args":["show","routes","extra"]})" "\n");
  EXPECT_TRUE(r["ok"]);
  EXPECT_EQ(r["data"]["which"], "routes");
  EXPECT_EQ(got, std::vector<std::string>{"extra"});
  r = request(s, path, R"({"args":["show","neighbors"]})" "\n");
  EXPECT_EQ(r["data"]["which"], "show");
  EXPECT_EQ(got, std::vector<std::string>{"neighbors"});
}

TEST_F(CliTest, UnknownCommandListsTheKnownOnes) {
  json r = request(s, path, R"({"args":["reboot"]})" "\n");
  EXPECT_FALSE(r["ok"]);
  std::string e = r["error"];
  EXPECT_NE(e.find("unknown command \"reboot\""), std::string::npos) << e;
  EXPECT_NE(e.find("route add"), std::string::npos) << e;
}

TEST_F(CliTest, HandlerErrorsAreReported) {
  json r = request(s, path, R"({"args":["route","add"]})" "\n");
  EXPECT_FALSE(r["ok"]);
  EXPECT_EQ(r["error"], "route add: needs a prefix");
}

TEST_F(CliTest, GarbageAndOversizedRequestsDoNotHurtTheNextClient) {
  json r = request(s, path, "this is not json\n");
  EXPECT_FALSE(r["ok"]);
  EXPECT_NE(std::string(r["error"]).find("bad request"), std::string::npos);
  r = request(s, path, std::string(CliServer::kMaxRequest + 10, 'x'));
  EXPECT_FALSE(r["ok"]);
  r = request(s, path, R"({"args":["show","routes"]})" "\n");
  EXPECT_TRUE(r["ok"]);
}

TEST_F(CliTest, SilentClientDoesNotBlockOthers) {
  int silent = connect_to(path);
  ASSERT_GE(silent, 0);
  s.poll_once();
  json r = request(s, path, R"({"args":["show","routes"]})" "\n");
  EXPECT_TRUE(r["ok"]);
  close(silent);
}

TEST(CliRender, TableColumnsAreAligned) {
  json rows = json::array({json{{"prefix", "0.0.0.0/0"}, {"via", "192.0.2.1"}},
                           json{{"prefix", "10.100.200.0/24"}, {"via", "10.1.0.254"}}});
  std::string out = render_human(rows);
  std::vector<std::string> lines;
  for (size_t p = 0, q; (q = out.find('\n', p)) != std::string::npos; p = q + 1) lines.push_back(out.substr(p, q - p));
  ASSERT_EQ(lines.size(), 3u);
  // The second column starts at the same offset on every line: after the
  // widest first-column cell plus two spaces.
  size_t col = std::string("10.100.200.0/24").size() + 2;
  EXPECT_EQ(lines[0].find("via"), col);
  EXPECT_EQ(lines[1].find("192.0.2.1"), col);
  EXPECT_EQ(lines[2].find("10.1.0.254"), col);
}
