// moatctl: talks to moatd over its control socket (ctrl/cli_server.hh has
// the protocol). The words are passed through as they are: moatd decides
// what they mean, so new daemon commands need no new moatctl.
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctrl/cli_render.hh"

namespace {

using json = nlohmann::ordered_json;

constexpr int kTimeoutMs = 5000;
constexpr const char* kDefaultSocket = "/run/moat/moatd.sock";
constexpr int kExitRefused = 1;  // moatd answered ok:false
constexpr int kExitNoDaemon = 2;  // no connection, no answer, or an unreadable one
constexpr int kExitUsage = 64;   // EX_USAGE

int usage(int rc) {
  fmt::print(rc ? stderr : stdout,
             "usage: moatctl [--socket PATH] [--json] COMMAND...\n"
             "  show interfaces | show routes | show neighbors | show stats\n"
             "  route add PREFIX via GW [port NAME]\n"
             "  route add PREFIX port NAME\n"
             "  route del PREFIX\n"
             "  (other words are passed to moatd as they are; use -- before words starting with -)\n"
             "--json: print the answer's data as JSON instead of tables\n"
             "socket: --socket PATH, else $MOAT_SOCKET, else {}\n"
             "exit: 0 done, 1 moatd refused, 2 moatd unreachable, 64 usage\n",
             kDefaultSocket);
  return rc;
}

int fail(int rc, const std::string& msg) {
  fmt::print(stderr, "moatctl: {}\n", msg);
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  const char* env = getenv("MOAT_SOCKET");
  std::string path = env && *env ? env : kDefaultSocket;
  bool as_json = false;
  bool options_done = false;
  std::vector<std::string> words;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (options_done || a.empty() || a[0] != '-' || a == "-") {
      words.push_back(a);
    } else if (a == "--") {
      options_done = true;
    } else if (a == "--socket" || a == "-s") {
      if (i + 1 >= argc) {
        fmt::print(stderr, "moatctl: {} needs a path\n", a);
        return usage(kExitUsage);
      }
      path = argv[++i];
    } else if (a.rfind("--socket=", 0) == 0) {
      path = a.substr(9);
    } else if (a == "--json" || a == "-j") {
      as_json = true;
    } else if (a == "-h" || a == "--help") {
      return usage(0);
    } else {
      fmt::print(stderr, "moatctl: unknown option {}\n", a);
      return usage(kExitUsage);
    }
  }
  if (words.empty()) return usage(kExitUsage);

  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(sa.sun_path))
    return fail(kExitUsage, fmt::format("socket path \"{}\" must be 1 to {} bytes long", path, sizeof(sa.sun_path) - 1));
  std::memcpy(sa.sun_path, path.c_str(), path.size());

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail(kExitNoDaemon, fmt::format("socket: {}", strerror(errno)));
  // A Unix connect() blocks while the daemon's backlog is full, and send()
  // while its buffer is; the send timeout bounds both.
  timeval tv{kTimeoutMs / 1000, (kTimeoutMs % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0)
    return fail(kExitNoDaemon, fmt::format("cannot connect to {}: {} (is moatd running?)", path, strerror(errno)));

  std::string req = json{{"args", words}}.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  for (size_t off = 0; off < req.size();) {
    ssize_t n = send(fd, req.data() + off, req.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail(kExitNoDaemon, fmt::format("cannot send to {}: {}", path, strerror(errno)));
    off += size_t(n);
  }

  // One line back, then moatd closes; whichever comes first ends the read.
  std::string reply;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
  while (reply.find('\n') == std::string::npos) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    pollfd p{fd, POLLIN, 0};
    int rc = left > 0 ? poll(&p, 1, int(left)) : 0;
    if (rc < 0 && errno == EINTR) continue;
    if (rc == 0) return fail(kExitNoDaemon, fmt::format("no answer from {} within {} s", path, kTimeoutMs / 1000));
    if (rc < 0) return fail(kExitNoDaemon, fmt::format("poll {}: {}", path, strerror(errno)));
    char buf[65536];
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // closed (or reset after its last line): parse what came
    reply.append(buf, size_t(n));
  }
  close(fd);

  json r = json::parse(reply, nullptr, false);
  if (r.is_discarded() || !r.is_object() || !r.contains("ok") || !r["ok"].is_boolean())
    return fail(kExitNoDaemon, reply.empty() ? fmt::format("{} closed without an answer", path)
                                             : fmt::format("unreadable answer from {}", path));
  if (!r["ok"].get<bool>()) {
    auto e = r.find("error");
    return fail(kExitRefused, e != r.end() && e->is_string() ? e->get<std::string>() : std::string("refused, no reason given"));
  }
  const json& data = r.contains("data") ? r["data"] : json();
  if (as_json) fmt::print("{}\n", data.dump(2, ' ', false, json::error_handler_t::replace));
  else fmt::print("{}", moat::render_human(data));
  return 0;
}
