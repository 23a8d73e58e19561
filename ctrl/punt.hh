#pragma once
#include <functional>
// The punt path's kernel side: one TAP interface per port, carrying the
// port's name, MAC, address and MTU, in moatd's namespace or in `netns`.
// Stock daemons (sshd, dnsmasq, chrony) bind there and serve the LANs.
// The interfaces are NOARP: the kernel never resolves neighbours itself;
// whatever it sends is routed by the fast path (moat owns the ARP cache).
// Owner: the control thread.
#include <rte_ether.h>

#include <cstdint>
#include <string>

#include <tl/expected.hpp>

namespace moat {

// Runs `fn` in network namespace `netns` (a name under /run/netns; "" =
// ours) and returns to ours: sockets made there stay there (the IKE sockets
// live with the local services, behind the punt path).
tl::expected<void, std::string> in_netns(const std::string& netns, const std::function<void()>& fn);

class PuntTap {
 public:
  PuntTap() = default;
  PuntTap(const PuntTap&) = delete;
  PuntTap& operator=(const PuntTap&) = delete;
  PuntTap(PuntTap&& o) noexcept : fd_(o.fd_), name_(std::move(o.name_)) { o.fd_ = -1; }
  ~PuntTap();

  // Creates and configures the TAP. `netns`: a name under /run/netns, or "".
  tl::expected<void, std::string> open(const std::string& name, const rte_ether_addr& mac, uint32_t addr,
                                       uint8_t plen, uint16_t mtu, const std::string& netns, bool default_route);
  // Moves the interface to a new address (the port's changed).
  tl::expected<void, std::string> set_address(uint32_t addr, uint8_t plen, const std::string& netns);
  int fd() const { return fd_; }
  const std::string& name() const { return name_; }

 private:
  int fd_ = -1;
  std::string name_;
};

}  // namespace moat
