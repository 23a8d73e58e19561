#pragma once
// The control socket: newline-delimited JSON over a Unix stream socket,
// served from the control thread's event loop (no thread of its own).
// Request: {"args":["show","routes"]}  Reply: {"ok":true,"data":...} or
// {"ok":false,"error":"..."}; then the server closes the connection.
// Owner: the control thread. Never blocks: non-blocking sockets, bounded
// buffers, a cap on connections and a deadline per connection, so a client
// that sends garbage, too much, nothing, or never reads cannot stall routing
// control.
//
// Replies are nlohmann::ordered_json so that the keys reach moatctl in the
// order the handler wrote them (the table columns follow that order).
#include <chrono>
#include <cstddef>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/types.h>

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
  static constexpr std::chrono::milliseconds kDeadline{5000};

  explicit CliServer(std::string socket_path);
  ~CliServer();  // closes every connection and unlinks the socket it bound
  CliServer(const CliServer&) = delete;
  CliServer& operator=(const CliServer&) = delete;

  // Creates missing parent directories (0755), removes a stale socket left
  // by a dead daemon (but refuses a live one, or a path that is not a
  // socket), binds and listens. Errors name the path and the errno text.
  tl::expected<void, std::string> open();

  // `command`: the leading words, e.g. "route add"; the handler gets the
  // rest. The longest registered prefix of a request's words wins.
  void on(std::string command, Handler h);

  // The listening socket, for poll(POLLIN): readable when a client
  // connects. Client sockets are not exposed, so the owner must also call
  // poll_once() regularly (every few ms) while connections are open; the
  // control loop does, every millisecond.
  int fd() const { return listen_fd_; }

  // Accepts and serves whatever is ready; never blocks.
  void poll_once();

  // Connections currently open (for tests and stats).
  size_t clients() const { return clients_.size(); }

  // Shorter deadlines for tests; the default suits humans and scripts.
  void set_deadline(std::chrono::milliseconds d) { deadline_ = d; }

  // Dispatches one request line into one reply line (with its '\n');
  // public so tests can check it directly. Never throws.
  std::string answer(const std::string& line) const;

 private:
  struct Client {
    int fd = -1;
    std::string in, out;
    size_t sent = 0;  // of `out`; an offset, so a big reply is not recopied per write
    bool answered = false;
    std::chrono::steady_clock::time_point deadline;
  };
  // Reads what is there; false when the connection is finished (peer gone
  // or broken) and should be dropped.
  bool read_request(Client& c);
  // Writes what the socket takes; false when the peer is gone.
  bool flush(Client& c);
  // Serves clients_[from..], dropping those that are done or past deadline.
  void serve(size_t from, std::chrono::steady_clock::time_point now);
  nlohmann::ordered_json dispatch(const std::vector<std::string>& args) const;

  std::string path_;
  int listen_fd_ = -1;
  // Identity of the socket file we bound, so the destructor never unlinks a
  // socket that a later daemon put at the same path.
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  std::chrono::milliseconds deadline_ = kDeadline;
  std::map<std::vector<std::string>, Handler> handlers_;
  std::vector<Client> clients_;
};

}  // namespace moat
