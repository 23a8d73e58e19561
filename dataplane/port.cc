#include "dataplane/port.hh"

#include <rte_ethdev.h>
#include <rte_mempool.h>

#include <fmt/format.h>

#include <cstring>

namespace moat {

bool device_is_vdev(const std::string& device) { return device.rfind("net_", 0) == 0; }

std::string device_ethdev_name(const std::string& device) {
  return device.substr(0, device.find(','));
}

tl::expected<PortState, std::string> port_start(const PortSetup& s, rte_mempool* pool) {
  PortState st;
  std::string ethname = device_ethdev_name(s.device);
  if (rte_eth_dev_get_port_by_name(ethname.c_str(), &st.id) != 0)
    return tl::unexpected(fmt::format("port {}: device {} was not probed (check the device string)", s.name, s.device));
  rte_eth_dev_info info;
  if (int rc = rte_eth_dev_info_get(st.id, &info); rc != 0)
    return tl::unexpected(fmt::format("port {}: cannot read device info: {}", s.name, strerror(-rc)));
  if (info.max_tx_queues < s.tx_queues)
    return tl::unexpected(fmt::format("port {}: device {} has {} tx queues, the workers need {}", s.name,
                                      s.device, info.max_tx_queues, s.tx_queues));
  st.rx_queues = s.rx_queues ? s.rx_queues : s.tx_queues;
  if (st.rx_queues > info.max_rx_queues) st.rx_queues = info.max_rx_queues;
  if (st.rx_queues == 0) st.rx_queues = 1;

  rte_eth_conf conf{};
  uint64_t rss = (RTE_ETH_RSS_IP | RTE_ETH_RSS_UDP | RTE_ETH_RSS_TCP) & info.flow_type_rss_offloads;
  if (st.rx_queues > 1 && rss) {
    conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
    conf.rx_adv_conf.rss_conf.rss_hf = rss;
    st.rss = true;
  }
  // Fragments from rte_ipv4_fragment_packet are chains of mbufs.
  if (info.tx_offload_capa & RTE_ETH_TX_OFFLOAD_MULTI_SEGS)
    conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
  if (int rc = rte_eth_dev_configure(st.id, st.rx_queues, s.tx_queues, &conf); rc != 0)
    return tl::unexpected(fmt::format("port {}: configure {} rx / {} tx queues: {}", s.name, st.rx_queues,
                                      s.tx_queues, strerror(-rc)));
  uint16_t rxd = s.rx_ring, txd = s.tx_ring;
  rte_eth_dev_adjust_nb_rx_tx_desc(st.id, &rxd, &txd);
  int socket = rte_eth_dev_socket_id(st.id);
  for (uint16_t q = 0; q < st.rx_queues; q++)
    if (int rc = rte_eth_rx_queue_setup(st.id, q, rxd, socket, nullptr, pool); rc != 0)
      return tl::unexpected(fmt::format("port {}: rx queue {}: {}", s.name, q, strerror(-rc)));
  for (uint16_t q = 0; q < s.tx_queues; q++)
    if (int rc = rte_eth_tx_queue_setup(st.id, q, txd, socket, nullptr); rc != 0)
      return tl::unexpected(fmt::format("port {}: tx queue {}: {}", s.name, q, strerror(-rc)));
  // Virtual devices differ in what they accept; an MTU they refuse only
  // matters if they then refuse our frames, which the counters will show.
  rte_eth_dev_set_mtu(st.id, s.mtu);
  if (s.mac) {
    rte_ether_addr mac = *s.mac;
    if (int rc = rte_eth_dev_default_mac_addr_set(st.id, &mac); rc != 0 && rc != -ENOTSUP)
      return tl::unexpected(fmt::format("port {}: set MAC: {}", s.name, strerror(-rc)));
  }
  if (int rc = rte_eth_dev_start(st.id); rc != 0)
    return tl::unexpected(fmt::format("port {}: start: {}", s.name, strerror(-rc)));
  if (s.mac) {
    st.mac = *s.mac;  // a vdev that cannot set its MAC still accepts frames for ours (promiscuous)
    rte_eth_promiscuous_enable(st.id);
  } else {
    rte_eth_macaddr_get(st.id, &st.mac);
  }
  return st;
}

}  // namespace moat
