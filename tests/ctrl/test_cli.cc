// The control socket: dispatch by longest command prefix, clear errors, a
// server that a bad, silent, greedy or slow client cannot block, moatctl's
// exit codes, and tables whose columns line up.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "ctrl/cli_render.hh"
#include "ctrl/cli_server.hh"

extern char** environ;

using namespace moat;
using json = nlohmann::ordered_json;
using namespace std::chrono_literals;

namespace {

int connect_to(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

void send_all(int fd, const std::string& s) {
  for (size_t off = 0; off < s.size();) {
    ssize_t n = send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;  // the server may close on an oversized request
    off += size_t(n);
  }
}

// Reads until the server closes, pumping it meanwhile; "" on timeout.
std::string read_reply(CliServer& s, int fd, std::chrono::milliseconds limit = 3000ms) {
  std::string reply;
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    s.poll_once();
    char buf[65536];
    ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n > 0) {
      reply.append(buf, size_t(n));
      continue;
    }
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) return reply;
    std::this_thread::sleep_for(1ms);
  }
  return "";
}

json request(CliServer& s, const std::string& path, const std::string& line) {
  int fd = connect_to(path);
  EXPECT_GE(fd, 0) << path;
  send_all(fd, line);
  std::string reply = read_reply(s, fd);
  close(fd);
  EXPECT_FALSE(reply.empty()) << "no reply to " << line.substr(0, 80);
  EXPECT_EQ(reply.find('\n'), reply.size() - 1) << "one line per reply";
  return json::parse(reply, nullptr, false);
}

json ask(CliServer& s, const std::string& path, const std::vector<std::string>& args) {
  return request(s, path, json{{"args", args}}.dump() + "\n");
}

// A fresh directory per test; the socket sits two levels below it so that
// open() has parents to create.
struct TempDir {
  std::string dir;
  TempDir() {
    std::string t = testing::TempDir() + "moat_cli_XXXXXX";
    dir = mkdtemp(t.data()) ? t : "";
  }
  ~TempDir() { std::filesystem::remove_all(dir); }
};

struct CliTest : testing::Test {
  TempDir tmp;
  std::string path = tmp.dir + "/run/moat/ctl.sock";
  CliServer s{path};
  std::vector<std::string> got;
  void SetUp() override {
    ASSERT_FALSE(tmp.dir.empty());
    auto ok = s.open();
    ASSERT_TRUE(ok) << ok.error();
    s.on("show routes", [this](const std::vector<std::string>& a) {
      got = a;
      return json{{"which", "routes"}};
    });
    s.on("show", [this](const std::vector<std::string>& a) {
      got = a;
      return json{{"which", "show"}};
    });
    s.on("route add", [this](const std::vector<std::string>& a) -> json {
      if (a.empty()) throw CliError("route add: needs a prefix");
      got = a;
      return json{{"added", a[0]}};
    });
    s.on("crash", [](const std::vector<std::string>&) -> json { throw std::out_of_range("slot 7"); });
    s.on("crash json", [](const std::vector<std::string>&) -> json { return json::object().at("missing"); });
    s.on("latin1", [](const std::vector<std::string>&) -> json { return json{{"name", "caf\xe9"}}; });
  }
};

}  // namespace

TEST_F(CliTest, OpenCreatesParentsAndDestructorUnlinks) {
  struct stat st;
  ASSERT_EQ(stat((tmp.dir + "/run/moat").c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  ASSERT_EQ(lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  {
    CliServer other(tmp.dir + "/b.sock");
    ASSERT_TRUE(other.open());
    EXPECT_EQ(access((tmp.dir + "/b.sock").c_str(), F_OK), 0);
  }
  EXPECT_NE(access((tmp.dir + "/b.sock").c_str(), F_OK), 0);
}

TEST_F(CliTest, HandlerGetsTheRemainingArgs) {
  json r = ask(s, path, {"route", "add", "10.0.0.0/8", "via", "192.0.2.1", "port", "wan"});
  EXPECT_TRUE(r["ok"]);
  EXPECT_EQ(r["data"]["added"], "10.0.0.0/8");
  EXPECT_EQ(got, (std::vector<std::string>{"10.0.0.0/8", "via", "192.0.2.1", "port", "wan"}));
}

TEST_F(CliTest, LongestPrefixWins) {
  json r = ask(s, path, {"show", "routes", "extra"});
  EXPECT_EQ(r["data"]["which"], "routes");
  EXPECT_EQ(got, std::vector<std::string>{"extra"});
  r = ask(s, path, {"show", "neighbors"});
  EXPECT_EQ(r["data"]["which"], "show");
  EXPECT_EQ(got, std::vector<std::string>{"neighbors"});
  r = ask(s, path, {"show"});
  EXPECT_EQ(r["data"]["which"], "show");
  EXPECT_TRUE(got.empty());
}

TEST_F(CliTest, UnknownCommandListsTheKnownOnes) {
  json r = ask(s, path, {"reboot", "now"});
  EXPECT_FALSE(r["ok"]);
  std::string e = r["error"];
  EXPECT_NE(e.find("unknown command \"reboot now\""), std::string::npos) << e;
  EXPECT_NE(e.find("route add"), std::string::npos) << e;
  EXPECT_NE(e.find("show routes"), std::string::npos) << e;
  // "route" alone is a prefix of a command, not a command.
  EXPECT_FALSE(ask(s, path, {"route"})["ok"]);
  EXPECT_NE(std::string(ask(s, path, {})["error"]).find("empty command"), std::string::npos);
}

TEST_F(CliTest, HandlerErrorsAreReported) {
  json r = ask(s, path, {"route", "add"});
  EXPECT_FALSE(r["ok"]);
  EXPECT_EQ(r["error"], "route add: needs a prefix");
  r = ask(s, path, {"crash"});
  EXPECT_FALSE(r["ok"]);
  EXPECT_EQ(r["error"], "internal error: slot 7");
  // A handler's own JSON mistake is the daemon's fault, not a bad request.
  r = ask(s, path, {"crash", "json"});
  EXPECT_FALSE(r["ok"]);
  EXPECT_EQ(std::string(r["error"]).rfind("internal error: ", 0), 0u) << r["error"];
}

TEST_F(CliTest, BytesThatAreNotUtf8DoNotBreakTheReply) {
  json r = ask(s, path, {"latin1"});
  EXPECT_TRUE(r["ok"]);
  EXPECT_EQ(r["data"]["name"], "caf\xef\xbf\xbd");  // U+FFFD
}

TEST_F(CliTest, BadRequestsAreAnsweredAndDoNotHurtTheNextClient) {
  for (std::string bad : {"this is not json\n", "[1,2]\n", "{\"args\":\"show\"}\n", "{\"args\":[\"show\",3]}\n", "\n"}) {
    json r = request(s, path, bad);
    EXPECT_FALSE(r["ok"]) << bad;
    EXPECT_EQ(std::string(r["error"]).rfind("bad request", 0), 0u) << bad << " -> " << r["error"];
  }
  json r = request(s, path, std::string(CliServer::kMaxRequest + 10, 'x'));
  EXPECT_FALSE(r["ok"]);
  EXPECT_NE(std::string(r["error"]).find("longer than"), std::string::npos);
  EXPECT_TRUE(ask(s, path, {"show", "routes"})["ok"]);
  EXPECT_EQ(s.clients(), 0u);
}

TEST_F(CliTest, LastLineWithoutNewlineCountsAtHalfClose) {
  int fd = connect_to(path);
  ASSERT_GE(fd, 0);
  send_all(fd, R"({"args":["show","routes"]})");
  shutdown(fd, SHUT_WR);
  json r = json::parse(read_reply(s, fd), nullptr, false);
  close(fd);
  EXPECT_TRUE(r["ok"]);
}

TEST_F(CliTest, SilentClientDoesNotBlockOthersAndIsDroppedAtItsDeadline) {
  s.set_deadline(200ms);
  int silent = connect_to(path);
  ASSERT_GE(silent, 0);
  s.poll_once();
  EXPECT_EQ(s.clients(), 1u);
  EXPECT_TRUE(ask(s, path, {"show", "routes"})["ok"]);
  std::string late = read_reply(s, silent);
  close(silent);
  json r = json::parse(late, nullptr, false);
  EXPECT_FALSE(r["ok"]);
  EXPECT_NE(std::string(r["error"]).find("no complete request"), std::string::npos) << late;
  EXPECT_EQ(s.clients(), 0u);
}

TEST_F(CliTest, TooManyConnectionsAreToldAtOnce) {
  std::vector<int> idle;
  for (size_t i = 0; i < CliServer::kMaxClients; i++) {
    idle.push_back(connect_to(path));
    ASSERT_GE(idle.back(), 0);
    s.poll_once();
  }
  EXPECT_EQ(s.clients(), CliServer::kMaxClients);
  json r = ask(s, path, {"show", "routes"});
  EXPECT_FALSE(r["ok"]);
  EXPECT_EQ(std::string(r["error"]).rfind("busy", 0), 0u) << r["error"];
  for (int fd : idle) close(fd);
  EXPECT_TRUE(ask(s, path, {"show", "routes"})["ok"]);
}

TEST_F(CliTest, SlowReaderDoesNotBlockTheServer) {
  // Far more than a Unix socket buffers, so the server must keep the rest.
  std::string big(4 << 20, 'z');
  s.on("big", [&](const std::vector<std::string>&) { return json{{"blob", big}}; });
  int slow = connect_to(path);
  ASSERT_GE(slow, 0);
  send_all(slow, R"({"args":["big"]})" "\n");
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; i++) s.poll_once();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  EXPECT_EQ(s.clients(), 1u);  // still owed most of its reply
  EXPECT_TRUE(ask(s, path, {"show", "routes"})["ok"]);
  json r = json::parse(read_reply(s, slow), nullptr, false);
  close(slow);
  ASSERT_TRUE(r.is_object());
  EXPECT_EQ(r["data"]["blob"].get<std::string>().size(), big.size());
}

TEST_F(CliTest, ClientThatHangsUpBeforeTheReplyDoesNotKillTheServer) {
  // Without MSG_NOSIGNAL the server's write would raise SIGPIPE and end
  // this test process.
  for (int i = 0; i < 3; i++) {
    int fd = connect_to(path);
    ASSERT_GE(fd, 0);
    send_all(fd, R"({"args":["show","routes"]})" "\n");
    close(fd);
    s.poll_once();
  }
  EXPECT_EQ(s.clients(), 0u);
  EXPECT_TRUE(ask(s, path, {"show", "routes"})["ok"]);
}

TEST(CliOpen, StaleSocketIsReplacedLiveOneAndOtherFilesAreRefused) {
  TempDir tmp;
  std::string path = tmp.dir + "/ctl.sock";
  {
    // A socket file nobody listens on: what a killed daemon leaves behind.
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    close(fd);
  }
  CliServer first(path);
  auto ok = first.open();
  ASSERT_TRUE(ok) << ok.error();

  CliServer second(path);
  auto again = second.open();
  ASSERT_FALSE(again);
  EXPECT_NE(again.error().find(path), std::string::npos) << again.error();
  EXPECT_NE(again.error().find("already running"), std::string::npos) << again.error();

  std::string file = tmp.dir + "/notes.txt";
  std::ofstream(file) << "keep me";
  auto not_socket = CliServer(file).open();
  ASSERT_FALSE(not_socket);
  EXPECT_NE(not_socket.error().find("not a socket"), std::string::npos) << not_socket.error();
  EXPECT_EQ(access(file.c_str(), F_OK), 0);

  auto too_long = CliServer(tmp.dir + "/" + std::string(200, 'a')).open();
  ASSERT_FALSE(too_long);
  EXPECT_NE(too_long.error().find("bytes long"), std::string::npos) << too_long.error();
}

TEST(CliOpen, ErrorsNameThePathAndTheCause) {
  // A regular file where a directory should be fails for root too (a chmod'ed
  // directory would not: root ignores permissions, and CI runs as root).
  TempDir tmp;
  std::string file = tmp.dir + "/plain";
  std::ofstream(file) << "x";
  std::string path = file + "/sub/ctl.sock";
  auto r = CliServer(path).open();
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find(path), std::string::npos) << r.error();
  EXPECT_NE(r.error().find(strerror(ENOTDIR)), std::string::npos) << r.error();
}

// ---- rendering ----

namespace {

std::vector<std::string> lines_of(const std::string& out) {
  std::vector<std::string> lines;
  for (size_t p = 0, q; (q = out.find('\n', p)) != std::string::npos; p = q + 1) lines.push_back(out.substr(p, q - p));
  return lines;
}

}  // namespace

TEST(CliRender, TableColumnsAreAligned) {
  json rows = json::array({json{{"prefix", "0.0.0.0/0"}, {"via", "192.0.2.1"}, {"port", "wan"}, {"type", "unicast"}},
                           json{{"prefix", "10.100.200.0/24"}, {"via", nullptr}, {"port", "lan"}, {"type", "connected"}},
                           json{{"prefix", "198.51.100.0/24"}, {"via", "10.1.0.254"}, {"port", "lan"}, {"type", "unicast"}}});
  auto lines = lines_of(render_human(rows));
  ASSERT_EQ(lines.size(), 4u);
  // Header from the keys, in their order; then each column starts where the
  // widest cell of the previous column plus two spaces ends.
  std::vector<std::string> cols = {"prefix", "via", "port", "type"};
  std::vector<std::vector<std::string>> cells = {cols};
  for (auto& r : rows) {
    std::vector<std::string> c;
    for (auto& k : cols) c.push_back(r[k].is_null() ? "-" : r[k].get<std::string>());
    cells.push_back(c);
  }
  size_t start = 0;
  for (size_t c = 0; c < cols.size(); c++) {
    size_t width = 0;
    for (auto& row : cells) width = std::max(width, row[c].size());
    for (size_t l = 0; l < lines.size(); l++) {
      EXPECT_EQ(lines[l].substr(start, cells[l][c].size()), cells[l][c]) << "line " << l << " col " << cols[c];
      if (start > 0) {
        EXPECT_EQ(lines[l][start - 1], ' ');
      }
    }
    start += width + 2;
  }
  for (auto& l : lines) EXPECT_NE(l.back(), ' ') << "no trailing blanks: [" << l << "]";
}

TEST(CliRender, NumericColumnsAreRightAlignedAndRowsMayLackKeys) {
  json rows = json::array({json{{"lcore", 1}, {"rx", 5}}, json{{"lcore", 12}, {"rx", 123456}, {"note", "hot"}}});
  auto lines = lines_of(render_human(rows));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0].rfind("lcore", 0), 0u);
  EXPECT_NE(lines[0].find("note"), std::string::npos);  // a key first seen in row 2 still heads a column
  // Right-aligned: every line's number in a column ends at the same offset.
  size_t lcore_end = std::string("lcore").size();
  EXPECT_EQ(lines[1].substr(lcore_end - 1, 1), "1");
  EXPECT_EQ(lines[2].substr(lcore_end - 2, 2), "12");
  size_t widest = std::max(std::string("rx").size(), std::string("123456").size());
  size_t rx_end = lcore_end + 2 + widest;
  EXPECT_EQ(lines[1].substr(rx_end - 1, 1), "5");
  EXPECT_EQ(lines[2].substr(rx_end - widest, widest), "123456");
  EXPECT_EQ(lines[0].substr(rx_end - 2, 2), "rx");
}

TEST(CliRender, MultibyteCellsAlignByCharacters) {
  json rows = json::array({json{{"name", "caf\xc3\xa9"}, {"v", "a"}}, json{{"name", "x"}, {"v", "b"}}});
  auto lines = lines_of(render_human(rows));
  ASSERT_EQ(lines.size(), 3u);
  auto col_of = [](const std::string& l, const std::string& cell) { return display_width(l.substr(0, l.rfind(cell))); };
  EXPECT_EQ(col_of(lines[0], "v"), col_of(lines[1], "a"));
  EXPECT_EQ(col_of(lines[1], "a"), col_of(lines[2], "b"));
}

TEST(CliRender, StatsBecomeTitledSectionsWithTables) {
  json stats = {{"ports", json::array({json{{"name", "lan"}, {"rx_packets", 10}}})},
                {"workers", json::array({json{{"lcore", 1}, {"rx", 7}, {"tx", 6}}})},
                {"drops", json::array({json{{"reason", "ttl_expired"}, {"worker", 1}, {"count", 3}, {"what", "TTL reached 0 or 1"}}})},
                {"punt", {{"queued", 0}, {"dropped", 2}}},
                {"empty", json::array()},
                {"uptime_s", 42}};
  std::string out = render_human(stats);
  auto lines = lines_of(out);
  auto at = [&](const std::string& s) {
    for (size_t i = 0; i < lines.size(); i++)
      if (lines[i] == s) return i;
    ADD_FAILURE() << "no line [" << s << "] in:\n" << out;
    return lines.size();
  };
  size_t ports = at("ports:"), workers = at("workers:"), drops = at("drops:"), punt = at("punt:");
  EXPECT_LT(ports, workers);  // key order kept
  EXPECT_LT(workers, drops);
  EXPECT_LT(drops, punt);
  EXPECT_EQ(lines[drops + 1].rfind("  reason", 0), 0u) << lines[drops + 1];
  EXPECT_NE(lines[drops + 2].find("TTL reached 0 or 1"), std::string::npos);
  EXPECT_EQ(lines[punt + 1], "  queued: 0");
  EXPECT_EQ(lines[punt + 2], "  dropped: 2");
  EXPECT_EQ(lines[at("empty:") + 1], "  (none)");
  at("uptime_s: 42");
}

TEST(CliRender, RecordsHoldingListsAreSectionsAndTheQosTreeIsDrawnLineByLine) {
  // `show qos`: one record per port, with the tree as lines and the
  // classes as a table; a table cell must never hold raw JSON.
  json qos = json::array({json{{"port", "wan"},
                               {"tree", json::array({"wan rate 128kbit", "  audio rate 64kbit", "  data rate 64kbit",
                                                     "    video rate 20kbit"})},
                               {"classes", json::array({json{{"name", "wan"}, {"sent_pkts", 10}},
                                                        json{{"name", "audio"}, {"sent_pkts", 4}}})}}});
  std::string out = render_human(qos);
  auto lines = lines_of(out);
  EXPECT_EQ(out.find('['), std::string::npos) << out;
  EXPECT_EQ(out.find('{'), std::string::npos) << out;
  auto at = [&](const std::string& s) {
    for (size_t i = 0; i < lines.size(); i++)
      if (lines[i] == s) return i;
    ADD_FAILURE() << "no line [" << s << "] in:\n" << out;
    return lines.size();
  };
  at("port: wan");
  size_t tree = at("tree:");
  EXPECT_EQ(lines[tree + 1], "  wan rate 128kbit");
  EXPECT_EQ(lines[tree + 4], "      video rate 20kbit");  // the tree's own indentation kept
  size_t classes = at("classes:");
  EXPECT_EQ(lines[classes + 1].rfind("  name", 0), 0u) << lines[classes + 1];
}

TEST(CliRender, ScalarsAndEmptyAnswers) {
  EXPECT_EQ(render_human(json{{"added", "10.0.0.0/8"}}), "added: 10.0.0.0/8\n");
  EXPECT_EQ(render_human(json::array()), "(none)\n");
  EXPECT_EQ(render_human(json()), "");
  EXPECT_EQ(render_human(json{{"name", "a\nb"}}), "name: a b\n");
}

// ---- moatctl, when the build says where it is ----

namespace {

struct CtlRun {
  int status = -1;
  std::string out, err;
};

// Runs moatctl while pumping `s` (it lives in this thread), as moatd would.
CtlRun moatctl(CliServer* s, std::vector<std::string> args, const char* env_socket = nullptr) {
  CtlRun r;
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) return r;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  args.insert(args.begin(), getenv("MOATCTL"));
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** e = environ; *e; e++)
    if (std::strncmp(*e, "MOAT_SOCKET=", 12) != 0) env_s.push_back(*e);
  if (env_socket) env_s.push_back(std::string("MOAT_SOCKET=") + env_socket);
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid;
  int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  close(out[1]);
  close(err[1]);
  if (rc != 0) {
    close(out[0]);
    close(err[0]);
    return r;
  }
  fcntl(out[0], F_SETFL, O_NONBLOCK);
  fcntl(err[0], F_SETFL, O_NONBLOCK);
  auto drain = [](int fd, std::string& to) {
    char buf[4096];
    for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) to.append(buf, size_t(n));
  };
  auto end = std::chrono::steady_clock::now() + 10s;
  for (;;) {
    if (s) s->poll_once();
    drain(out[0], r.out);
    drain(err[0], r.err);
    int st;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      break;
    }
    if (std::chrono::steady_clock::now() > end) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      break;
    }
    std::this_thread::sleep_for(1ms);
  }
  drain(out[0], r.out);
  drain(err[0], r.err);
  close(out[0]);
  close(err[0]);
  return r;
}

}  // namespace

struct MoatctlTest : CliTest {
  void SetUp() override {
    ASSERT_NE(getenv("MOATCTL"), nullptr) << "MOATCTL (path of the moatctl binary) not set";
    CliTest::SetUp();
    s.on("show neighbors", [](const std::vector<std::string>&) {
      return json::array({json{{"ip", "10.1.0.2"}, {"mac", "02:00:00:00:00:02"}, {"port", "lan"},
                               {"state", "reachable"}, {"age_s", 3}, {"held", 0}}});
    });
  }
};

TEST_F(MoatctlTest, JsonPrintsTheDataExactly) {
  CtlRun r = moatctl(&s, {"--socket", path, "--json", "show", "neighbors"});
  EXPECT_EQ(r.status, 0) << r.err;
  json data = json::parse(r.out, nullptr, false);
  ASSERT_TRUE(data.is_array()) << r.out;
  EXPECT_EQ(data[0]["mac"], "02:00:00:00:00:02");
  EXPECT_EQ(data[0].begin().key(), "ip");  // order as the daemon sent it
}

TEST_F(MoatctlTest, HumanOutputIsTheRenderedTableAndWordsPassThrough) {
  CtlRun r = moatctl(&s, {"show", "neighbors"}, path.c_str());  // socket from $MOAT_SOCKET
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out.rfind("ip  ", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("reachable"), std::string::npos);
  r = moatctl(&s, {"--socket=" + path, "route", "add", "10.9.0.0/16", "via", "10.1.0.2", "port", "lan"});
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "added: 10.9.0.0/16\n");
  EXPECT_EQ(got, (std::vector<std::string>{"10.9.0.0/16", "via", "10.1.0.2", "port", "lan"}));
}

TEST_F(MoatctlTest, RefusalIsExitOneWithTheDaemonsMessage) {
  CtlRun r = moatctl(&s, {"--socket", path, "route", "add"});
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.err, "moatctl: route add: needs a prefix\n");
  EXPECT_TRUE(r.out.empty());
}

TEST_F(MoatctlTest, NoDaemonIsExitTwoAndUsageIsSixtyFour) {
  std::string nowhere = tmp.dir + "/nobody.sock";
  CtlRun r = moatctl(nullptr, {"--socket", nowhere, "show", "routes"});
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err, "moatctl: cannot connect to " + nowhere + ": " + strerror(ENOENT) + " (is moatd running?)\n");
  r = moatctl(nullptr, {"--json"});
  EXPECT_EQ(r.status, 64);
  EXPECT_NE(r.err.find("usage: moatctl"), std::string::npos);
  r = moatctl(nullptr, {"--bogus", "show"});
  EXPECT_EQ(r.status, 64);
  r = moatctl(nullptr, {"show", "routes", "--socket"});
  EXPECT_EQ(r.status, 64);
}

TEST_F(MoatctlTest, SilentDaemonTimesOut) {
  // A listener that accepts nothing and answers nothing: moatctl must give
  // up by itself (5 s) rather than hang.
  std::string mute = tmp.dir + "/mute.sock";
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, mute.c_str(), sizeof(sa.sun_path) - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
  ASSERT_EQ(listen(fd, 4), 0);
  auto t0 = std::chrono::steady_clock::now();
  CtlRun r = moatctl(nullptr, {"--socket", mute, "show", "routes"});
  close(fd);
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("no answer"), std::string::npos) << r.err;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 8s);
}
