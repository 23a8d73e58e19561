#pragma once
// A Transport over kernel UDP sockets (ports 500 and 4500, IPv4), so the
// engine can run on its own in a network namespace: interop tests and the
// bench load client. In moatd the datagrams come through the punt path
// instead. Owner: the thread that runs the engine's loop; not thread safe.
#include <functional>
#include <optional>

#include <tl/expected.hpp>

#include "ctrl/ike/engine.hh"

namespace moat::ike {

class UdpDriver : public Transport {
 public:
  UdpDriver() = default;
  UdpDriver(const UdpDriver&) = delete;
  UdpDriver& operator=(const UdpDriver&) = delete;
  ~UdpDriver() override;

  // Binds UDP 500 and 4500 on `addr` (all addresses when unset).
  tl::expected<void, std::string> open(std::optional<IpAddr> addr);
  void attach(Engine* e) { engine_ = e; }
  // ESP in UDP 4500 (RFC 3948: a non-zero SPI where IKE has its zero
  // marker) reaches this socket only when it came in outer fragments:
  // moatd's fast path hands UDP fragments to the kernel, which reassembles
  // them. Without a handler the engine counts and drops it.
  using EspHandler = std::function<void(const Endpoint& local, const Endpoint& remote, ByteView esp)>;
  void on_esp(EspHandler h) { esp_ = std::move(h); }
  // Waits for datagrams until the engine's next deadline (at most
  // `max_wait_ms`), hands them to the engine, then runs its timers.
  void run_once(int max_wait_ms);

  void send(const Endpoint& local, const Endpoint& remote, ByteView udp_payload) override;
  std::optional<IpAddr> source_for(const IpAddr& remote) override;

  static uint64_t now_ms();  // CLOCK_MONOTONIC
  uint64_t send_errors() const { return send_errors_; }

 private:
  void drain(int fd, uint16_t port);
  int fd500_ = -1, fd4500_ = -1;
  Engine* engine_ = nullptr;
  EspHandler esp_;
  uint64_t send_errors_ = 0;
};

}  // namespace moat::ike
