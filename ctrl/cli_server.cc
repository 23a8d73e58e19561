#include "ctrl/cli_server.hh"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <sstream>

namespace moat {

using json = nlohmann::ordered_json;

CliServer::CliServer(std::string socket_path) : path_(std::move(socket_path)) {}

CliServer::~CliServer() {
  for (auto& c : clients_) close(c.fd);
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    unlink(path_.c_str());
  }
}

tl::expected<void, std::string> CliServer::open() {
  sockaddr_un sa{};
  if (path_.size() >= sizeof(sa.sun_path))
    return tl::unexpected(fmt::format("control.socket: path \"{}\" is longer than {} bytes", path_, sizeof(sa.sun_path) - 1));
  if (auto slash = path_.rfind('/'); slash != std::string::npos && slash > 0) {
    std::string dir = path_.substr(0, slash);
    if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
      return tl::unexpected(fmt::format("control.socket: cannot create {}: {}", dir, strerror(errno)));
  }
  unlink(path_.c_str());  // a stale socket of a previous run
  listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return tl::unexpected(fmt::format("control.socket: socket: {}", strerror(errno)));
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path_.c_str(), path_.size());
  if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 || listen(listen_fd_, 16) != 0)
    return tl::unexpected(fmt::format("control.socket: {}: {}", path_, strerror(errno)));
  return {};
}

void CliServer::on(std::string command, Handler h) {
  std::vector<std::string> words;
  std::istringstream is(command);
  for (std::string w; is >> w;) words.push_back(w);
  handlers_[words] = std::move(h);
}

std::string CliServer::answer(const std::string& line) const {
  json reply;
  try {
    json req = json::parse(line);
    if (!req.is_object() || !req.contains("args") || !req["args"].is_array())
      throw CliError("request must be {\"args\": [words...]}");
    std::vector<std::string> args;
    for (auto& a : req["args"]) {
      if (!a.is_string()) throw CliError("args must be strings");
      args.push_back(a.get<std::string>());
    }
    // Longest registered prefix of the words wins.
    const Handler* h = nullptr;
    size_t used = 0;
    for (auto& [words, fn] : handlers_)
      if (words.size() <= args.size() && words.size() > used && std::equal(words.begin(), words.end(), args.begin())) {
        h = &fn;
        used = words.size();
      }
    if (!h) {
      std::string known;
      for (auto& [words, fn] : handlers_) {
        std::string c;
        for (auto& w : words) c += (c.empty() ? "" : " ") + w;
        known += (known.empty() ? "" : ", ") + c;
      }
      std::string asked;
      for (auto& w : args) asked += (asked.empty() ? "" : " ") + w;
      throw CliError(fmt::format("unknown command \"{}\" (commands: {})", asked, known));
    }
    reply = {{"ok", true}, {"data", (*h)(std::vector<std::string>(args.begin() + long(used), args.end()))}};
  } catch (const CliError& e) {
    reply = {{"ok", false}, {"error", e.what()}};
  } catch (const json::exception& e) {
    reply = {{"ok", false}, {"error", fmt::format("bad request: {}", e.what())}};
  } catch (const std::exception& e) {
    reply = {{"ok", false}, {"error", fmt::format("internal error: {}", e.what())}};
  }
  return reply.dump() + "\n";
}

void CliServer::poll_once() {
  if (listen_fd_ < 0) return;
  auto now = std::chrono::steady_clock::now();
  while (clients_.size() < kMaxClients) {
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) break;
    clients_.push_back(Client{fd, {}, {}, false, now + kDeadline});
  }
  for (size_t i = 0; i < clients_.size();) {
    Client& c = clients_[i];
    bool done = false;
    if (!c.answered) {
      char buf[4096];
      for (;;) {
        ssize_t n = read(c.fd, buf, sizeof(buf));
        if (n > 0) {
          c.in.append(buf, size_t(n));
          if (c.in.size() > kMaxRequest) {
            c.out = json{{"ok", false}, {"error", fmt::format("request longer than {} bytes", kMaxRequest)}}.dump() + "\n";
            c.answered = true;
            break;
          }
          continue;
        }
        if (n == 0 && c.in.find('\n') == std::string::npos) {  // peer closed without a full line
          if (c.in.empty()) done = true;
          else c.in.push_back('\n');
        }
        break;
      }
      if (!c.answered && !done) {
        if (auto nl = c.in.find('\n'); nl != std::string::npos) {
          c.out = answer(c.in.substr(0, nl));
          c.answered = true;
        }
      }
    }
    if (c.answered && !c.out.empty()) {
      ssize_t n = write(c.fd, c.out.data(), c.out.size());
      if (n > 0) c.out.erase(0, size_t(n));
      else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) done = true;
    }
    if ((c.answered && c.out.empty()) || now > c.deadline) done = true;
    if (done) {
      close(c.fd);
      clients_[i] = std::move(clients_.back());
      clients_.pop_back();
    } else {
      i++;
    }
  }
}

}  // namespace moat
