// moat-bench: traffic generator and sink for router benchmarks.
// Sends UDP/IPv4 frames on port A, receives on port B, on one lcore, and
// prints a JSON result. The router under test (Moat, testpmd, anything) sits
// between the two ports. This is the seed of the throughput harness
// (issue 6); today it has fixed-size, max-rate or fixed-rate trials.
//
//   moat-bench --port-a VDEV --port-b VDEV [--lcore N] [--size 64] [--flows 256]
//              [--duration 5] [--warmup 1] [--rate-pps 0] [--dst-mac MAC]
//              [--mac-a MAC] [--mac-b MAC] [--src-ip 10.0.1.2] [--dst-ip 10.0.2.2]
//              [--file-prefix P]
//
// Frame size excludes the 4-byte FCS: --size 64 puts 60 bytes in the buffer
// and counts 64 + 20 (preamble, IFG) bytes per frame at L1.
#include <arpa/inet.h>
#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_ip.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_udp.h>

#include <fmt/format.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string port_a, port_b, file_prefix = "moat-bench";
  unsigned lcore = 0, size = 64, flows = 256;
  double duration = 5, warmup = 1;
  uint64_t rate_pps = 0;
  rte_ether_addr dst_mac{{0x02, 0, 0, 0, 0x0a, 0x01}};
  rte_ether_addr mac_a{{0x02, 0, 0, 0, 0xbe, 0x0a}};
  rte_ether_addr mac_b{{0x02, 0, 0, 0, 0xbe, 0x0b}};
  uint32_t src_ip = 0x0a000102, dst_ip = 0x0a000202;
};

volatile bool g_stop = false;
void on_signal(int) { g_stop = true; }

[[noreturn]] void die(const std::string& m) {
  fmt::print(stderr, "moat-bench: {}\n", m);
  std::exit(2);
}

rte_ether_addr parse_mac(const char* s) {
  rte_ether_addr a;
  if (rte_ether_unformat_addr(s, &a) != 0) die(fmt::format("\"{}\" is not a MAC address", s));
  return a;
}

uint32_t parse_ip(const char* s) {
  in_addr a;
  if (inet_pton(AF_INET, s, &a) != 1) die(fmt::format("\"{}\" is not an IPv4 address", s));
  return ntohl(a.s_addr);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i++) {
    std::string k = argv[i];
    if (i + 1 >= argc) die("option " + k + " needs a value");
    const char* v = argv[++i];
    if (k == "--port-a") o.port_a = v;
    else if (k == "--port-b") o.port_b = v;
    else if (k == "--lcore") o.lcore = unsigned(std::stoul(v));
    else if (k == "--size") o.size = unsigned(std::stoul(v));
    else if (k == "--flows") o.flows = unsigned(std::stoul(v));
    else if (k == "--duration") o.duration = std::stod(v);
    else if (k == "--warmup") o.warmup = std::stod(v);
    else if (k == "--rate-pps") o.rate_pps = std::stoull(v);
    else if (k == "--dst-mac") o.dst_mac = parse_mac(v);
    else if (k == "--mac-a") o.mac_a = parse_mac(v);
    else if (k == "--mac-b") o.mac_b = parse_mac(v);
    else if (k == "--src-ip") o.src_ip = parse_ip(v);
    else if (k == "--dst-ip") o.dst_ip = parse_ip(v);
    else if (k == "--file-prefix") o.file_prefix = v;
    else die("unknown option " + k);
  }
  if (o.port_a.empty() || o.port_b.empty()) die("--port-a and --port-b are required");
  if (o.size < 60 + 4 || o.size > 1518) die(fmt::format("--size {}: must be 64 to 1518 (frame incl. FCS)", o.size));
  if (o.flows == 0 || o.flows > 65535) die("--flows must be 1 to 65535");
  if (o.duration <= 0 || o.duration > 3600) die("--duration must be in (0, 3600] seconds");
  return o;
}

uint16_t start_port(const std::string& dev, const rte_ether_addr& mac, rte_mempool* mp) {
  uint16_t id;
  std::string name = dev.substr(0, dev.find(','));
  if (rte_eth_dev_get_port_by_name(name.c_str(), &id) != 0) die("port " + dev + " was not probed");
  rte_eth_conf conf{};
  if (rte_eth_dev_configure(id, 1, 1, &conf) != 0) die("configure " + dev);
  if (rte_eth_rx_queue_setup(id, 0, 1024, rte_eth_dev_socket_id(id), nullptr, mp) != 0) die("rx queue " + dev);
  if (rte_eth_tx_queue_setup(id, 0, 1024, rte_eth_dev_socket_id(id), nullptr) != 0) die("tx queue " + dev);
  rte_ether_addr m = mac;
  rte_eth_dev_default_mac_addr_set(id, &m);
  if (rte_eth_dev_start(id) != 0) die("start " + dev);
  rte_eth_promiscuous_enable(id);
  return id;
}

// One template mbuf per flow. Sending bumps the reference count so the
// driver's free never returns them to the pool: no per-packet copy.
std::vector<rte_mbuf*> templates(const Options& o, rte_mempool* mp) {
  std::vector<rte_mbuf*> t;
  uint16_t len = uint16_t(o.size - 4);
  for (unsigned f = 0; f < o.flows; f++) {
    rte_mbuf* m = rte_pktmbuf_alloc(mp);
    if (!m) die("mempool too small for the flow templates");
    char* p = rte_pktmbuf_append(m, len);
    std::memset(p, 0, len);
    auto* eth = reinterpret_cast<rte_ether_hdr*>(p);
    eth->dst_addr = o.dst_mac;
    eth->src_addr = o.mac_a;
    eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
    auto* ip = reinterpret_cast<rte_ipv4_hdr*>(eth + 1);
    ip->version_ihl = 0x45;
    ip->total_length = rte_cpu_to_be_16(uint16_t(len - sizeof(*eth)));
    ip->time_to_live = 64;
    ip->next_proto_id = IPPROTO_UDP;
    ip->src_addr = rte_cpu_to_be_32(o.src_ip);
    ip->dst_addr = rte_cpu_to_be_32(o.dst_ip + (f >> 8));  // 256 flows per destination
    ip->hdr_checksum = rte_ipv4_cksum(ip);
    auto* udp = reinterpret_cast<rte_udp_hdr*>(ip + 1);
    udp->src_port = rte_cpu_to_be_16(uint16_t(1024 + (f & 0xff)));
    udp->dst_port = rte_cpu_to_be_16(9);
    udp->dgram_len = rte_cpu_to_be_16(uint16_t(len - sizeof(*eth) - sizeof(*ip)));
    t.push_back(m);
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  std::vector<std::string> eal{"moat-bench", "-l", std::to_string(o.lcore), "--no-huge", "-m", "512", "--no-pci",
                               "--file-prefix", o.file_prefix, "--log-level", "*:error",
                               "--vdev", o.port_a, "--vdev", o.port_b};
  std::vector<char*> ea;
  for (auto& s : eal) ea.push_back(s.data());
  if (rte_eal_init(int(ea.size()), ea.data()) < 0) die(fmt::format("EAL: {}", rte_strerror(rte_errno)));
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  rte_mempool* mp = rte_pktmbuf_pool_create("bench", 16383, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE, rte_socket_id());
  if (!mp) die("mempool");
  uint16_t a = start_port(o.port_a, o.mac_a, mp);
  uint16_t b = start_port(o.port_b, o.mac_b, mp);
  auto tpl = templates(o, mp);

  const uint64_t hz = rte_get_tsc_hz();
  const uint64_t t0 = rte_rdtsc();
  const uint64_t t_measure = t0 + uint64_t(o.warmup * hz);
  const uint64_t t_end = t_measure + uint64_t(o.duration * hz);
  const uint64_t cycles_per_pkt = o.rate_pps ? hz / o.rate_pps : 0;
  uint64_t next_tx = t0;
  uint64_t sent = 0, recv = 0, recv_bytes = 0, stray = 0, flow = 0;
  uint64_t sent_m = 0, recv_m = 0;  // at the start of the measured interval
  bool measuring = false;
  rte_mbuf* burst[32];
  rte_mbuf* rx[64];
  // Links (memif) come up asynchronously: wait for both, bounded.
  for (uint64_t until = rte_rdtsc() + 10 * hz; rte_rdtsc() < until && !g_stop;) {
    rte_eth_link la{}, lb{};
    rte_eth_link_get_nowait(a, &la);
    rte_eth_link_get_nowait(b, &lb);
    if (la.link_status && lb.link_status) break;
    rte_delay_ms(10);
  }
  uint64_t now;
  while ((now = rte_rdtsc()) < t_end && !g_stop) {
    if (!measuring && now >= t_measure) {
      measuring = true;
      sent_m = sent;
      recv_m = recv;
    }
    if (!cycles_per_pkt || now >= next_tx) {
      for (int i = 0; i < 32; i++) {
        burst[i] = tpl[flow++ % tpl.size()];
        rte_mbuf_refcnt_update(burst[i], 1);
      }
      uint16_t n = rte_eth_tx_burst(a, 0, burst, 32);
      for (int i = n; i < 32; i++) rte_mbuf_refcnt_update(burst[i], -1);
      flow -= 32 - n;
      sent += n;
      if (cycles_per_pkt) next_tx += cycles_per_pkt * 32;
    }
    uint16_t n = rte_eth_rx_burst(b, 0, rx, 64);
    for (uint16_t i = 0; i < n; i++) recv_bytes += rx[i]->pkt_len;
    recv += n;
    if (n) rte_pktmbuf_free_bulk(rx, n);
    n = rte_eth_rx_burst(a, 0, rx, 64);  // the router should send nothing back to A
    stray += n;
    if (n) rte_pktmbuf_free_bulk(rx, n);
  }
  // Drain what is still in flight so loss is not overstated.
  for (uint64_t until = rte_rdtsc() + hz / 10; rte_rdtsc() < until;) {
    uint16_t n = rte_eth_rx_burst(b, 0, rx, 64);
    recv += n;
    if (n) rte_pktmbuf_free_bulk(rx, n);
  }
  double secs = double(rte_rdtsc() - t_measure) / double(hz);
  if (!measuring) secs = 0;
  double tx_pps = secs > 0 ? double(sent - sent_m) / o.duration : 0;
  double rx_pps = secs > 0 ? double(recv - recv_m) / o.duration : 0;
  double loss = sent - sent_m ? 1.0 - double(recv - recv_m) / double(sent - sent_m) : 0;
  fmt::print(
      "{{\"size\": {}, \"flows\": {}, \"duration_s\": {}, \"rate_pps\": {}, \"tx_pps\": {:.0f}, \"rx_pps\": {:.0f}, "
      "\"loss\": {:.6f}, \"rx_mpps\": {:.4f}, \"rx_gbps_l1\": {:.4f}, \"rx_gbps_l2\": {:.4f}, \"stray_on_a\": {}, "
      "\"interrupted\": {}}}\n",
      o.size, o.flows, o.duration, o.rate_pps, tx_pps, rx_pps, loss < 0 ? 0.0 : loss, rx_pps / 1e6,
      rx_pps * (o.size + 20) * 8 / 1e9, rx_pps * o.size * 8 / 1e9, stray, g_stop ? "true" : "false");
  rte_eth_dev_stop(a);
  rte_eth_dev_stop(b);
  rte_eal_cleanup();
  return 0;
}
