#pragma once
// moatd's host for the IKEv2 engine (ctrl/ike/, docs/IKE.md), in the control
// thread. IKE datagrams reach it through the punt path: the fast path hands
// UDP 500 and marker-prefixed UDP 4500 for our addresses to the TAPs, where
// the engine's sockets listen (in the punt namespace); its answers leave the
// same way and are routed by the fast path. CHILD SAs go into the SAD through
// Control's SA lifecycle interface (install_sa / remove_sa), the one static
// SAs use. Owner: the control thread; not thread safe.
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>
#include <tl/expected.hpp>

#include "ctrl/ike/engine.hh"
#include "ctrl/ike/udp_driver.hh"

namespace moat {

class Control;

class IkeHost : public ike::ChildSaSink {
 public:
  explicit IkeHost(Control& c) : c_(c) {}
  ~IkeHost() override;
  // Opens the sockets in `netns` and hands the engine its peers.
  tl::expected<void, std::string> start(std::vector<ike::PeerConfig> peers, const std::string& netns, uint64_t now_ms);
  // Every control loop pass: received datagrams, then timers.
  void poll();
  // Seed 003 §6.1: ESP for an SPI nobody knows is a peer that lost its state.
  void unknown_spi(uint32_t spi, uint32_t src);
  // A port's address changed: MOBIKE SAs we initiated from `old` move to `now`.
  void address_changed(uint32_t old, uint32_t now);
  nlohmann::ordered_json show() const;
  ike::Engine& engine() { return *engine_; }
  // The engine's log lines are collected and written to stderr once per
  // call above (poll() is once per control loop pass), not one write per
  // line: 10,000 moats coming back log 20,000 lines in seconds. Call after
  // using engine() directly.
  void flush_log();

  void install(const ike::ChildSa& sa) override;
  void remove(const ike::ChildSa& sa) override;
  void rekeyed(const ike::ChildSa& old, const ike::ChildSa& now) override;
  void moved(const ike::ChildSa& sa) override;

 private:
  struct Installed {
    uint32_t in = 0xffffffff, out = 0xffffffff;
    uint32_t tunnel = 0;
  };
  static constexpr size_t kLogFlushBytes = 64 * 1024;
  void log(std::string_view line);
  Control& c_;
  std::string log_;  // lines not yet written
  ike::UdpDriver driver_;
  std::unique_ptr<ike::Engine> engine_;
  std::map<uint64_t, Installed> sas_;  // by ChildSa::id
};

}  // namespace moat
