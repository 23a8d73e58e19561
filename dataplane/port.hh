#pragma once
// Ethernet ports: any DPDK ethdev (PCI or vdev). Configured once by the
// control thread before the workers start.
#include <rte_ether.h>

#include <optional>
#include <string>

#include <tl/expected.hpp>

struct rte_mempool;

namespace moat {

struct PortSetup {
  std::string name;        // the operator's name for the port, for messages
  std::string device;      // vdev string or PCI address, as given to EAL
  uint16_t rx_queues = 0;  // 0: one per worker, capped by the device
  uint16_t tx_queues = 1;  // one per worker: each worker owns a tx queue
  uint16_t rx_ring = 1024;
  uint16_t tx_ring = 1024;
  uint16_t mtu = 1500;
  std::optional<rte_ether_addr> mac;
};

struct PortState {
  uint16_t id = 0;
  uint16_t rx_queues = 0;
  rte_ether_addr mac{};
  bool rss = false;
};

// The ethdev name EAL gives the device: the vdev name before the first comma,
// or the PCI address.
std::string device_ethdev_name(const std::string& device);
bool device_is_vdev(const std::string& device);

// Finds the port EAL probed for `s.device`, configures queues (RSS when more
// than one RX queue and the device can hash), MTU and MAC, and starts it.
tl::expected<PortState, std::string> port_start(const PortSetup& s, rte_mempool* pool);

}  // namespace moat
