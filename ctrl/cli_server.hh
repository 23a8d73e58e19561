#pragma once
// The control socket: newline-delimited JSON over a Unix stream socket,
// served from the control thread's event loop (no thread of its own).
// Request: {"args":["show","routes"]}  Reply: {"ok":true,"data":...} or
// {"ok":false,"error":"..."}; then the server closes the connection.
// Owner: the control thread. Never blocks: non-blocking sockets, bounded
// buffers, a deadline per connection.
#include <chrono>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <tl/expected.hpp>

namespace moat {

// A user error: becomes {"ok":false,"error":what()}.
struct CliError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class CliServer {
 public:
  using Handler = std::function<nlohmann::ordered_json(const std::vector<std::string>& args)>;
  static constexpr size_t kMaxRequest = 64 * 1024;
  static constexpr size_t kMaxClients = 16;
  static constexpr std::chrono::seconds kDeadline{5};

  explicit CliServer(std::string socket_path);
  ~CliServer();
  CliServer(const CliServer&) = delete;
  CliServer& operator=(const CliServer&) = delete;

  tl::expected<void, std::string> open();
  // `command`: the leading words, e.g. "route add"; the handler gets the rest.
  void on(std::string command, Handler h);
  int fd() const { return listen_fd_; }
  void poll_once();

  // Dispatches one request line; public so tests can check it directly.
  std::string answer(const std::string& line) const;

 private:
  struct Client {
    int fd;
    std::string in, out;
    bool answered = false;
    std::chrono::steady_clock::time_point deadline;
  };
  std::string path_;
  int listen_fd_ = -1;
  std::map<std::vector<std::string>, Handler> handlers_;
  std::vector<Client> clients_;
};

}  // namespace moat
