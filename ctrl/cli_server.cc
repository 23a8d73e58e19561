#include "ctrl/cli_server.hh"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

namespace moat {

using json = nlohmann::ordered_json;

namespace {

// At most this many connections are accepted per poll_once(), so a connect
// flood costs the control loop a bounded amount of work per pass.
constexpr int kAcceptsPerPoll = 64;

std::string join(const std::vector<std::string>& words) {
  std::string s;
  for (auto& w : words) s += (s.empty() ? "" : " ") + w;
  return s;
}

// Handlers may put bytes that are not UTF-8 into strings (names from the
// kernel, say); dump() would throw on those, so they are replaced instead.
std::string line_of(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

std::string error_line(const std::string& msg) { return line_of(json{{"ok", false}, {"error", msg}}); }

bool fill_addr(const std::string& path, sockaddr_un& sa) {
  sa = sockaddr_un{};
  sa.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(sa.sun_path)) return false;
  std::memcpy(sa.sun_path, path.c_str(), path.size());
  return true;
}

// mkdir -p, each new level 0755 (the umask may narrow it).
tl::expected<void, std::string> make_parents(const std::string& path) {
  for (size_t slash = path.find('/', 1); slash != std::string::npos; slash = path.find('/', slash + 1)) {
    std::string dir = path.substr(0, slash);
    if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
      return tl::unexpected(fmt::format("control socket {}: cannot create directory {}: {}", path, dir, strerror(errno)));
  }
  return {};
}

// A socket file left at `path`: removed if nobody listens on it (a daemon
// that died), refused if somebody does (a second moatd would otherwise
// silently steal the first one's socket), refused if it is not a socket.
tl::expected<void, std::string> clear_stale(const std::string& path, const sockaddr_un& sa) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return {};
    return tl::unexpected(fmt::format("control socket {}: {}", path, strerror(errno)));
  }
  if (!S_ISSOCK(st.st_mode))
    return tl::unexpected(fmt::format("control socket {}: exists and is not a socket; not removing it", path));
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (probe < 0) return tl::unexpected(fmt::format("control socket {}: socket: {}", path, strerror(errno)));
  int rc = connect(probe, reinterpret_cast<const sockaddr*>(&sa), sizeof(sa));
  int err = errno;
  close(probe);
  // EAGAIN: the listener's backlog is full, so it is alive.
  if (rc == 0 || err == EAGAIN)
    return tl::unexpected(fmt::format("control socket {}: another process is listening on it (is moatd already running?)", path));
  if (unlink(path.c_str()) != 0 && errno != ENOENT)
    return tl::unexpected(fmt::format("control socket {}: cannot remove stale socket: {}", path, strerror(errno)));
  return {};
}

}  // namespace

CliServer::CliServer(std::string socket_path) : path_(std::move(socket_path)) {}

CliServer::~CliServer() {
  for (auto& c : clients_) close(c.fd);
  if (listen_fd_ < 0) return;
  close(listen_fd_);
  struct stat st;
  if (lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) unlink(path_.c_str());
}

tl::expected<void, std::string> CliServer::open() {
  if (listen_fd_ >= 0) return tl::unexpected(fmt::format("control socket {}: already open", path_));
  sockaddr_un sa;
  if (!fill_addr(path_, sa))
    return tl::unexpected(fmt::format("control socket \"{}\": path must be 1 to {} bytes long", path_, sizeof(sa.sun_path) - 1));
  if (auto ok = make_parents(path_); !ok) return ok;
  if (auto ok = clear_stale(path_, sa); !ok) return ok;

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return tl::unexpected(fmt::format("control socket {}: socket: {}", path_, strerror(errno)));
  if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    int err = errno;
    close(fd);
    return tl::unexpected(fmt::format("control socket {}: bind: {}", path_, strerror(err)));
  }
  struct stat st;
  if (listen(fd, int(kMaxClients)) != 0 || lstat(path_.c_str(), &st) != 0) {
    int err = errno;
    close(fd);
    unlink(path_.c_str());
    return tl::unexpected(fmt::format("control socket {}: listen: {}", path_, strerror(err)));
  }
  listen_fd_ = fd;
  dev_ = st.st_dev;
  ino_ = st.st_ino;
  return {};
}

void CliServer::on(std::string command, Handler h) {
  std::vector<std::string> words;
  std::istringstream is(command);
  for (std::string w; is >> w;) words.push_back(w);
  handlers_[std::move(words)] = std::move(h);
}

json CliServer::dispatch(const std::vector<std::string>& args) const {
  const Handler* h = nullptr;
  size_t used = 0;
  for (auto& [words, fn] : handlers_)
    if (!words.empty() && words.size() <= args.size() && words.size() > used &&
        std::equal(words.begin(), words.end(), args.begin())) {
      h = &fn;
      used = words.size();
    }
  if (!h) {
    std::string known;
    for (auto& [words, fn] : handlers_) known += (known.empty() ? "" : ", ") + join(words);
    if (args.empty()) throw CliError(fmt::format("empty command (commands: {})", known));
    throw CliError(fmt::format("unknown command \"{}\" (commands: {})", join(args), known));
  }
  return (*h)(std::vector<std::string>(args.begin() + std::ptrdiff_t(used), args.end()));
}

std::string CliServer::answer(const std::string& line) const {
  try {
    // The request is checked apart from the handler so that a handler's own
    // json::exception is not blamed on the client.
    std::vector<std::string> args;
    {
      json req = json::parse(line, nullptr, false);
      if (req.is_discarded()) return error_line("bad request: not JSON; expected {\"args\": [\"word\", ...]}");
      if (!req.is_object() || !req.contains("args") || !req["args"].is_array())
        return error_line("bad request: expected {\"args\": [\"word\", ...]}");
      for (auto& a : req["args"]) {
        if (!a.is_string()) return error_line("bad request: every element of \"args\" must be a string");
        args.push_back(a.get<std::string>());
      }
    }
    try {
      return line_of(json{{"ok", true}, {"data", dispatch(args)}});
    } catch (const CliError& e) {
      return error_line(e.what());
    } catch (const std::exception& e) {
      return error_line(fmt::format("internal error: {}", e.what()));
    } catch (...) {
      return error_line("internal error: unknown exception");
    }
  } catch (...) {
    // Out of memory while building the reply: still answer something.
    return "{\"ok\":false,\"error\":\"internal error: cannot build the reply\"}\n";
  }
}

bool CliServer::read_request(Client& c) {
  char buf[4096];
  for (;;) {
    ssize_t n = recv(c.fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n > 0) {
      size_t old = c.in.size();
      c.in.append(buf, size_t(n));
      size_t nl = c.in.find('\n', old);
      if (nl != std::string::npos && nl <= kMaxRequest) {
        c.in.resize(nl);
        c.out = answer(c.in);
        c.answered = true;
        return true;
      }
      if (c.in.size() > kMaxRequest) {
        c.out = error_line(fmt::format("request longer than {} bytes", kMaxRequest));
        c.answered = true;
        return true;
      }
      continue;
    }
    if (n == 0) {
      // The client shut down its side: a last line without '\n' still
      // counts; nothing at all means it is gone.
      if (c.in.empty()) return false;
      c.out = answer(c.in);
      c.answered = true;
      return true;
    }
    if (errno == EINTR) continue;
    return errno == EAGAIN || errno == EWOULDBLOCK;
  }
}

bool CliServer::flush(Client& c) {
  while (c.sent < c.out.size()) {
    // MSG_NOSIGNAL: a client that hung up must cost us EPIPE, not SIGPIPE
    // (which would kill the daemon).
    ssize_t n = send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      c.sent += size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
  return true;
}

void CliServer::serve(size_t from, std::chrono::steady_clock::time_point now) {
  for (size_t i = from; i < clients_.size();) {
    Client& c = clients_[i];
    bool keep = c.answered || read_request(c);
    if (keep && c.answered) keep = flush(c) && c.sent < c.out.size();
    if (keep && now >= c.deadline) {
      if (!c.answered) {
        std::string late = error_line(fmt::format("no complete request within {} ms", deadline_.count()));
        (void)send(c.fd, late.data(), late.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      }
      keep = false;  // an unanswered request, or a reader too slow to take the reply
    }
    if (keep) {
      i++;
      continue;
    }
    close(c.fd);
    if (i + 1 != clients_.size()) clients_[i] = std::move(clients_.back());
    clients_.pop_back();
  }
}

void CliServer::poll_once() {
  if (listen_fd_ < 0) return;
  auto now = std::chrono::steady_clock::now();
  // Known connections first, so that those which have finished or gone
  // free their slots before the cap is applied to new ones.
  serve(0, now);
  size_t known = clients_.size();
  for (int i = 0; i < kAcceptsPerPoll; i++) {
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) break;  // nothing pending, or out of fds: the next pass retries
    if (clients_.size() >= kMaxClients) {
      // Told at once rather than left to time out in the backlog.
      std::string busy = error_line(fmt::format("busy: {} control connections open; try again", kMaxClients));
      (void)send(fd, busy.data(), busy.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      close(fd);
      continue;
    }
    Client c;
    c.fd = fd;
    c.deadline = now + deadline_;
    clients_.push_back(std::move(c));
  }
  // New connections usually carry their request already: answer it now.
  serve(known, now);
}

}  // namespace moat
