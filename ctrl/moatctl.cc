// moatctl: talks to moatd over its control socket.
//   moatctl [--socket PATH] [--json] show interfaces|routes|neighbors|stats
//   moatctl route add PREFIX via GW [port NAME] | route add PREFIX port NAME | route del PREFIX
#include <poll.h>
#include <sys/socket.h>
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

constexpr int kTimeoutMs = 5000;

int usage(int rc) {
  fmt::print(rc ? stderr : stdout,
             "usage: moatctl [--socket PATH] [--json] COMMAND...\n"
             "  show interfaces | show routes | show neighbors | show stats\n"
             "  route add PREFIX via GW [port NAME] [type unicast|blackhole|unreachable|prohibit]\n"
             "  route add PREFIX port NAME\n"
             "  route del PREFIX\n"
             "socket: --socket, else $MOAT_SOCKET, else /run/moat/moatd.sock\n");
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  std::string path = getenv("MOAT_SOCKET") ? getenv("MOAT_SOCKET") : "/run/moat/moatd.sock";
  bool as_json = false;
  std::vector<std::string> words;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--socket") {
      if (i + 1 >= argc) return usage(64);
      path = argv[++i];
    } else if (a == "--json") {
      as_json = true;
    } else if (a == "-h" || a == "--help") {
      return usage(0);
    } else if (a.rfind("--", 0) == 0 && words.empty()) {
      fmt::print(stderr, "moatctl: unknown option {}\n", a);
      return usage(64);
    } else {
      words.push_back(a);
    }
  }
  if (words.empty()) return usage(64);

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof(sa.sun_path)) {
    fmt::print(stderr, "moatctl: socket path too long: {}\n", path);
    return 2;
  }
  std::memcpy(sa.sun_path, path.c_str(), path.size());
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    fmt::print(stderr, "moatctl: cannot connect to {}: {} (is moatd running?)\n", path, strerror(errno));
    return 2;
  }
  std::string req = nlohmann::ordered_json{{"args", words}}.dump() + "\n";
  for (size_t off = 0; off < req.size();) {
    ssize_t n = write(fd, req.data() + off, req.size() - off);
    if (n <= 0) {
      fmt::print(stderr, "moatctl: write to {}: {}\n", path, strerror(errno));
      return 2;
    }
    off += size_t(n);
  }
  std::string reply;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
  for (;;) {
    int left = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count());
    pollfd p{fd, POLLIN, 0};
    if (left <= 0 || poll(&p, 1, left) <= 0) {
      fmt::print(stderr, "moatctl: no answer from {} within {} s\n", path, kTimeoutMs / 1000);
      return 2;
    }
    char buf[65536];
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    reply.append(buf, size_t(n));
  }
  close(fd);
  nlohmann::ordered_json r;
  try {
    r = nlohmann::ordered_json::parse(reply);
  } catch (const std::exception& e) {
    fmt::print(stderr, "moatctl: unreadable answer from {}: {}\n", path, e.what());
    return 2;
  }
  if (!r.value("ok", false)) {
    fmt::print(stderr, "moatctl: {}\n", r.value("error", std::string("unknown error")));
    return 1;
  }
  if (as_json) fmt::print("{}\n", r["data"].dump(2));
  else fmt::print("{}", moat::render_human(r["data"]));
  return 0;
}
