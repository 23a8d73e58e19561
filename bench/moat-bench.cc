// moat-bench: traffic generator and sink for router benchmarks, the seed of
// the project's throughput harness (issue 6).
//
// The generator sends UDP/IPv4 frames of one size over N flows on port A; the
// sink receives on port B; the router under test (moatd, testpmd, anything)
// sits between the two. Max-rate mode (the default) offers as much as port A
// takes; --rate-pps offers a fixed rate. Every run is bounded: links up within
// --link-timeout, --warmup seconds, a quiet gap (nothing offered until all
// has arrived or nothing has for 20 ms, at most 200 ms), --duration seconds
// measured, 100 ms of draining, and a watchdog that ends the process if
// anything hangs. Thanks to the quiet gap, loss counts exactly the packets
// sent in the window that never arrived. The result is one JSON object on
// stdout (exit status 0; 3 when the links did not come up; 2 usage or EAL).
//
// Generator and sink share one lcore (--lcore) unless --sink-lcore names
// another one.
//
//   moat-bench --port-a VDEV --port-b VDEV [--lcore N] [--sink-lcore N]
//              [--size 64] [--flows 256] [--duration 5] [--warmup 1]
//              [--rate-pps 0] [--tx-mode prebuilt|copy|refcnt]
//              [--dst-mac MAC] [--mac-a MAC] [--mac-b MAC]
//              [--src-ip 10.0.1.2] [--dst-ip 10.0.2.2]
//              [--memory-mb 512] [--file-prefix P] [--link-timeout 10]
//              [--eal-arg ARG]...
//
// Frame size: --size counts the Ethernet frame *including* its 4-byte FCS,
// as RFC 2544 does, and excludes preamble and gap. So --size 64 puts 60
// bytes in the mbuf (the virtual devices add no FCS), and rates count 64
// bytes per frame at L2 and 64 + 20 (preamble + SFD 8, inter-frame gap 12)
// at L1. 64..1518, i.e. IPv4 packets of 46..1500 bytes.
//
// Flows: flow f has source address --src-ip + f / 256 and UDP source port
// 1024 + f % 256, to --dst-ip port 9. 256 flows (the default) therefore
// share one source address. Checksums (IPv4 and UDP) are valid and TTL is
// 64, so a validating router forwards every frame.
//
// Transmit modes (no packet is built in the hot loop in any of them):
//   prebuilt  a pool whose every mbuf already holds its flow's frame; the hot
//             loop allocates, sets two lengths and sends. The pool has no
//             per-lcore cache and a single-producer/consumer ring, so it is
//             FIFO and frames leave in flow order. Valid only because no
//             driver here writes into transmitted buffers (memif, null,
//             af_packet, pcap, tap copy them out).
//   copy      rte_pktmbuf_alloc_bulk, then copy each flow's frame in.
//   refcnt    one template mbuf per flow, sent with its reference count
//             raised, so the driver's free never recycles it. All frames
//             stay in cache (flows × frame size), which matters at 1500 B.
// refcnt is the default because it measured fastest (bench/tx-modes.sh,
// docs/PERFORMANCE.md): about 1.7× prebuilt and 1.5-3.5× copy for the
// generator alone. The others stay for re-measuring; copy is the only safe
// one with a driver that writes into transmitted buffers (no vdev here does).
//
// Unexpected traffic is counted, never silently mixed into the result:
// rx_on_a (anything the router sent back towards the generator), rx_on_b_foreign
// (frames at the sink that are not our UDP flows: ARP, ICMP, ...), tx_on_b
// (frames port B transmitted: must stay 0, the sink never sends).
#include <arpa/inet.h>
#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_ip.h>
#include <rte_launch.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_memcpy.h>
#include <rte_udp.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moat {
namespace {

constexpr uint16_t kTxBurst = 32;
constexpr uint16_t kRxBurst = 64;
constexpr uint16_t kRingSize = 1024;
constexpr uint16_t kUdpDstPort = 9;  // discard
constexpr uint16_t kSrcPortBase = 1024;
constexpr unsigned kPortsPerAddr = 256;
constexpr unsigned kFcsBytes = 4;
constexpr unsigned kL1Overhead = 20;  // preamble + SFD (8) + inter-frame gap (12)
constexpr unsigned kMinSize = 64, kMaxSize = 1518;
constexpr unsigned kMaxFlows = 65536;
constexpr double kDrainS = 0.1;
constexpr unsigned kRxPoolMbufs = 8191;

enum class TxMode { prebuilt, copy, refcnt };

const char* tx_mode_name(TxMode m) {
  switch (m) {
    case TxMode::prebuilt: return "prebuilt";
    case TxMode::copy: return "copy";
    case TxMode::refcnt: return "refcnt";
  }
  return "?";
}

struct Options {
  std::string port_a, port_b;
  std::string file_prefix = "moat-bench";
  std::vector<std::string> eal_args;
  unsigned lcore = 0;
  int sink_lcore = -1;  // -1: the generator's lcore
  unsigned size = 64, flows = 256, memory_mb = 512;
  double duration = 5, warmup = 1, link_timeout = 10;
  uint64_t rate_pps = 0;  // 0: max rate
  TxMode tx_mode = TxMode::refcnt;
  rte_ether_addr dst_mac{{0x02, 0, 0, 0, 0x0a, 0x01}};
  rte_ether_addr mac_a{{0x02, 0, 0, 0, 0xbe, 0x0a}};
  rte_ether_addr mac_b{{0x02, 0, 0, 0, 0xbe, 0x0b}};
  uint32_t src_ip = 0x0a000102, dst_ip = 0x0a000202;  // host order

  unsigned wire_bytes() const { return size - kFcsBytes; }
  bool split() const { return sink_lcore >= 0 && unsigned(sink_lcore) != lcore; }
};

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop.store(true, std::memory_order_relaxed); }

// Last resort if EAL, a driver or a peer hangs: the run must always end.
void on_watchdog(int) {
  static const char kMsg[] = "moat-bench: watchdog expired, exiting\n";
  ssize_t r = write(STDERR_FILENO, kMsg, sizeof kMsg - 1);
  (void)r;
  _exit(124);
}

[[noreturn]] void die(const std::string& m) {
  fmt::print(stderr, "moat-bench: {}\n", m);
  std::exit(2);
}

rte_ether_addr parse_mac(const std::string& s) {
  rte_ether_addr a;
  if (rte_ether_unformat_addr(s.c_str(), &a) != 0) die(fmt::format("\"{}\" is not a MAC address", s));
  return a;
}

uint32_t parse_ip(const std::string& s) {
  in_addr a;
  if (inet_pton(AF_INET, s.c_str(), &a) != 1) die(fmt::format("\"{}\" is not an IPv4 address", s));
  return ntohl(a.s_addr);
}

template <typename T, typename F>
T parse_number(const std::string& key, const std::string& v, F f) {
  try {
    size_t used = 0;
    T r = f(v, &used);
    if (used != v.size()) throw std::invalid_argument(v);
    return r;
  } catch (const std::exception&) {
    die(fmt::format("{} \"{}\": not a number", key, v));
  }
}

unsigned to_unsigned(const std::string& k, const std::string& v) {
  return parse_number<unsigned>(k, v, [](const std::string& s, size_t* u) { return unsigned(std::stoul(s, u)); });
}
double to_double(const std::string& k, const std::string& v) {
  return parse_number<double>(k, v, [](const std::string& s, size_t* u) { return std::stod(s, u); });
}

std::string format_mac(const rte_ether_addr& a) {
  char b[RTE_ETHER_ADDR_FMT_SIZE];
  rte_ether_format_addr(b, sizeof b, &a);
  return b;
}

std::string format_ip(uint32_t host) {
  return fmt::format("{}.{}.{}.{}", host >> 24, (host >> 16) & 0xff, (host >> 8) & 0xff, host & 0xff);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i++) {
    std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      fmt::print("see the header of bench/moat-bench.cc or docs/PERFORMANCE.md\n");
      std::exit(0);
    }
    if (i + 1 >= argc) die("option " + k + " needs a value");
    std::string v = argv[++i];
    if (k == "--port-a") o.port_a = v;
    else if (k == "--port-b") o.port_b = v;
    else if (k == "--lcore") o.lcore = to_unsigned(k, v);
    else if (k == "--sink-lcore") o.sink_lcore = int(to_unsigned(k, v));
    else if (k == "--size") o.size = to_unsigned(k, v);
    else if (k == "--flows") o.flows = to_unsigned(k, v);
    else if (k == "--duration") o.duration = to_double(k, v);
    else if (k == "--warmup") o.warmup = to_double(k, v);
    else if (k == "--link-timeout") o.link_timeout = to_double(k, v);
    else if (k == "--rate-pps") o.rate_pps = uint64_t(to_double(k, v));
    else if (k == "--memory-mb") o.memory_mb = to_unsigned(k, v);
    else if (k == "--dst-mac") o.dst_mac = parse_mac(v);
    else if (k == "--mac-a") o.mac_a = parse_mac(v);
    else if (k == "--mac-b") o.mac_b = parse_mac(v);
    else if (k == "--src-ip") o.src_ip = parse_ip(v);
    else if (k == "--dst-ip") o.dst_ip = parse_ip(v);
    else if (k == "--file-prefix") o.file_prefix = v;
    else if (k == "--eal-arg") o.eal_args.push_back(v);
    else if (k == "--tx-mode") {
      if (v == "prebuilt") o.tx_mode = TxMode::prebuilt;
      else if (v == "copy") o.tx_mode = TxMode::copy;
      else if (v == "refcnt") o.tx_mode = TxMode::refcnt;
      else die("--tx-mode must be prebuilt, copy or refcnt");
    } else die("unknown option " + k);
  }
  if (o.port_a.empty() || o.port_b.empty()) die("--port-a and --port-b are required");
  if (o.size < kMinSize || o.size > kMaxSize)
    die(fmt::format("--size {}: must be {} to {} (Ethernet frame including FCS)", o.size, kMinSize, kMaxSize));
  if (o.flows == 0 || o.flows > kMaxFlows) die(fmt::format("--flows must be 1 to {}", kMaxFlows));
  if (!(o.duration > 0 && o.duration <= 3600)) die("--duration must be in (0, 3600] seconds");
  if (!(o.warmup >= 0 && o.warmup <= 60)) die("--warmup must be in [0, 60] seconds");
  if (!(o.link_timeout > 0 && o.link_timeout <= 300)) die("--link-timeout must be in (0, 300] seconds");
  return o;
}

// The frame of flow f, exactly as it goes into the mbuf (no FCS).
std::vector<uint8_t> build_frame(const Options& o, unsigned f) {
  const unsigned len = o.wire_bytes();
  std::vector<uint8_t> b(len, 0);
  auto* eth = reinterpret_cast<rte_ether_hdr*>(b.data());
  eth->dst_addr = o.dst_mac;
  eth->src_addr = o.mac_a;
  eth->ether_type = rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4);
  auto* ip = reinterpret_cast<rte_ipv4_hdr*>(eth + 1);
  ip->version_ihl = RTE_IPV4_VHL_DEF;
  ip->total_length = rte_cpu_to_be_16(uint16_t(len - sizeof(*eth)));
  ip->packet_id = rte_cpu_to_be_16(uint16_t(f));
  ip->time_to_live = 64;
  ip->next_proto_id = IPPROTO_UDP;
  ip->src_addr = rte_cpu_to_be_32(o.src_ip + f / kPortsPerAddr);
  ip->dst_addr = rte_cpu_to_be_32(o.dst_ip);
  auto* udp = reinterpret_cast<rte_udp_hdr*>(ip + 1);
  udp->src_port = rte_cpu_to_be_16(uint16_t(kSrcPortBase + f % kPortsPerAddr));
  udp->dst_port = rte_cpu_to_be_16(kUdpDstPort);
  udp->dgram_len = rte_cpu_to_be_16(uint16_t(len - sizeof(*eth) - sizeof(*ip)));
  // A recognisable payload, so a capture shows what the bytes are.
  auto* payload = reinterpret_cast<uint8_t*>(udp + 1);
  for (size_t i = 0; payload + i < b.data() + len; i++) payload[i] = uint8_t(i);
  ip->hdr_checksum = rte_ipv4_cksum(ip);
  udp->dgram_cksum = rte_ipv4_udptcp_cksum(ip, udp);
  return b;
}

struct Port {
  uint16_t id = 0;
  std::string device;
  rte_ether_addr mac{};
  bool mac_set = false;
};

Port start_port(const std::string& dev, const rte_ether_addr& mac, rte_mempool* rx_pool) {
  Port p;
  p.device = dev;
  std::string name = dev.substr(0, dev.find(','));
  if (rte_eth_dev_get_port_by_name(name.c_str(), &p.id) != 0) die("port " + dev + " was not probed");
  rte_eth_conf conf{};
  int socket = rte_eth_dev_socket_id(p.id);
  if (rte_eth_dev_configure(p.id, 1, 1, &conf) != 0) die("configure " + dev);
  if (rte_eth_rx_queue_setup(p.id, 0, kRingSize, socket, nullptr, rx_pool) != 0) die("rx queue " + dev);
  if (rte_eth_tx_queue_setup(p.id, 0, kRingSize, socket, nullptr) != 0) die("tx queue " + dev);
  rte_ether_addr m = mac;
  // Not every driver lets us choose; the JSON then shows the MAC in use.
  p.mac_set = rte_eth_dev_default_mac_addr_set(p.id, &m) == 0;
  if (rte_eth_dev_start(p.id) != 0) die("start " + dev);
  rte_eth_promiscuous_enable(p.id);
  rte_eth_macaddr_get(p.id, &p.mac);
  return p;
}

// The generator decides when the measured window opens and closes; a sink on
// another lcore follows these (0: not yet).
struct Schedule {
  uint64_t hz = 0;
  std::atomic<uint64_t> open_tsc{0}, close_tsc{0};
};

// A counter's value when the window opened and closed, and the TSC then.
struct Window {
  uint64_t open_value = 0, close_value = 0, open_tsc = 0, close_tsc = 0;
  bool opened = false, closed = false;

  void open(uint64_t value, uint64_t tsc) {
    open_value = value;
    open_tsc = tsc;
    opened = true;
  }
  void close(uint64_t value, uint64_t tsc) {
    if (!opened) open(value, tsc);  // interrupted during warm-up: empty window
    close_value = value;
    close_tsc = tsc;
    closed = true;
  }
  uint64_t count() const { return close_value - open_value; }
  double seconds(uint64_t hz) const { return double(close_tsc - open_tsc) / double(hz); }
  double rate(uint64_t hz) const {
    double s = seconds(hz);
    return s > 0 ? double(count()) / s : 0;
  }
};

class Generator {
 public:
  Generator(const Options& o, uint16_t port) : port_(port), mode_(o.tx_mode), flows_(o.flows),
                                               len_(uint16_t(o.wire_bytes())), rate_pps_(o.rate_pps) {
    // A rate run may fall behind (preemption); catching up is capped at 1 ms
    // of traffic so a stall does not become a line-rate burst.
    max_backlog_ = std::max<uint64_t>(kTxBurst, rate_pps_ / 1000);
    switch (mode_) {
      case TxMode::prebuilt: make_prebuilt_pool(o); break;
      case TxMode::copy: make_copy_pool(o); break;
      case TxMode::refcnt: make_refcnt_templates(o); break;
    }
  }

  // (Re)starts the rate clock: after the quiet gap before the window, a
  // fixed-rate run must not try to catch up on the pause.
  void pace_from(uint64_t tsc, uint64_t hz) {
    start_tsc_ = tsc;
    hz_ = hz;
    pace_base_ = attempted_;
  }

  // One round of the hot loop: top up the burst and offer it to port A.
  void step(uint64_t now) {
    if (rate_pps_ == 0) {
      if (npending_ < kTxBurst) npending_ += fill(pending_ + npending_, uint16_t(kTxBurst - npending_));
      if (npending_ == 0) return;
      uint16_t k = rte_eth_tx_burst(port_, 0, pending_, npending_);
      sent_ += k;
      // Ring full: keep the rest for the next round instead of freeing them.
      if (k < npending_) std::memmove(pending_, pending_ + k, (npending_ - k) * sizeof(pending_[0]));
      npending_ = uint16_t(npending_ - k);
      return;
    }
    uint64_t due = pace_base_ + uint64_t(double(now - start_tsc_) * double(rate_pps_) / double(hz_));
    if (due <= attempted_) return;
    if (due - attempted_ > max_backlog_) {
      late_ += due - attempted_ - max_backlog_;
      attempted_ = due - max_backlog_;
    }
    uint16_t n = fill(pending_, uint16_t(std::min<uint64_t>(due - attempted_, kTxBurst)));
    if (n == 0) return;
    uint16_t k = rte_eth_tx_burst(port_, 0, pending_, n);
    attempted_ += n;
    sent_ += k;
    if (k < n) {  // a fixed rate does not wait: what the port refused is lost offer
      rejected_ += n - k;
      rte_pktmbuf_free_bulk(pending_ + k, n - k);
    }
  }

  void release() {
    if (npending_) rte_pktmbuf_free_bulk(pending_, npending_);
    npending_ = 0;
  }

  uint64_t sent() const { return sent_; }
  uint64_t rejected() const { return rejected_; }
  uint64_t late() const { return late_; }
  uint64_t alloc_failed() const { return alloc_failed_; }
  Window window;

 private:
  uint16_t fill(rte_mbuf** pkts, uint16_t n) {
    switch (mode_) {
      case TxMode::prebuilt:
        if (rte_pktmbuf_alloc_bulk(pool_, pkts, n) != 0) {
          alloc_failed_++;
          return 0;
        }
        for (uint16_t i = 0; i < n; i++) pkts[i]->data_len = pkts[i]->pkt_len = len_;
        return n;
      case TxMode::copy:
        if (rte_pktmbuf_alloc_bulk(pool_, pkts, n) != 0) {
          alloc_failed_++;
          return 0;
        }
        for (uint16_t i = 0; i < n; i++) {
          rte_memcpy(rte_pktmbuf_mtod(pkts[i], void*), frames_.data() + size_t(next_flow_) * len_, len_);
          pkts[i]->data_len = pkts[i]->pkt_len = len_;
          if (++next_flow_ == flows_) next_flow_ = 0;
        }
        return n;
      case TxMode::refcnt:
        for (uint16_t i = 0; i < n; i++) {
          pkts[i] = templates_[next_flow_];
          rte_mbuf_refcnt_update(pkts[i], 1);
          if (++next_flow_ == flows_) next_flow_ = 0;
        }
        return n;
    }
    return 0;
  }

  void make_prebuilt_pool(const Options& o) {
    // As small as a full TX ring plus bursts allows (the frames cycled
    // through should stay in cache), and a multiple of the flow count so the
    // FIFO pool cycles through the flows evenly.
    const unsigned need = kRingSize + 2 * kTxBurst;
    unsigned n = o.flows * ((need + o.flows - 1) / o.flows);
    pool_ = rte_pktmbuf_pool_create_by_ops("bench_tx", n, 0, 0, RTE_MBUF_DEFAULT_BUF_SIZE, rte_socket_id(),
                                           "ring_sp_sc");
    if (!pool_) die(fmt::format("tx pool of {} mbufs: {}", n, rte_strerror(rte_errno)));
    std::vector<rte_mbuf*> all(n);
    if (rte_pktmbuf_alloc_bulk(pool_, all.data(), n) != 0) die("tx pool: cannot take every mbuf");
    for (unsigned i = 0; i < n; i++) {
      auto frame = build_frame(o, i % o.flows);
      std::memcpy(rte_pktmbuf_append(all[i], len_), frame.data(), len_);
    }
    for (auto* m : all) rte_pktmbuf_free(m);  // in order: the ring hands them back in flow order
  }

  void make_copy_pool(const Options& o) {
    pool_ = rte_pktmbuf_pool_create("bench_tx", 4 * kRingSize - 1, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE,
                                    rte_socket_id());
    if (!pool_) die(fmt::format("tx pool: {}", rte_strerror(rte_errno)));
    frames_.reserve(size_t(o.flows) * len_);
    for (unsigned f = 0; f < o.flows; f++) {
      auto frame = build_frame(o, f);
      frames_.insert(frames_.end(), frame.begin(), frame.end());
    }
  }

  void make_refcnt_templates(const Options& o) {
    pool_ = rte_pktmbuf_pool_create("bench_tx", o.flows, 0, 0, RTE_MBUF_DEFAULT_BUF_SIZE, rte_socket_id());
    if (!pool_) die(fmt::format("template pool: {}", rte_strerror(rte_errno)));
    for (unsigned f = 0; f < o.flows; f++) {
      rte_mbuf* m = rte_pktmbuf_alloc(pool_);
      if (!m) die("template pool too small");
      auto frame = build_frame(o, f);
      std::memcpy(rte_pktmbuf_append(m, len_), frame.data(), len_);
      templates_.push_back(m);
    }
  }

  uint16_t port_;
  TxMode mode_;
  unsigned flows_;
  uint16_t len_;
  uint64_t rate_pps_;
  uint64_t max_backlog_ = 0;
  rte_mempool* pool_ = nullptr;
  std::vector<uint8_t> frames_;         // copy: every flow's frame, back to back
  std::vector<rte_mbuf*> templates_;    // refcnt: one mbuf per flow, never freed
  rte_mbuf* pending_[kTxBurst] = {};
  uint16_t npending_ = 0;
  unsigned next_flow_ = 0;
  uint64_t start_tsc_ = 0, hz_ = 1, pace_base_ = 0;
  uint64_t sent_ = 0, attempted_ = 0, rejected_ = 0, late_ = 0, alloc_failed_ = 0;
};

class Sink {
 public:
  Sink(const Options& o, uint16_t port_a, uint16_t port_b)
      : port_a_(port_a), port_b_(port_b), src_ip_(o.src_ip), seen_(o.flows, 0) {}

  void poll() {
    rte_mbuf* rx[kRxBurst];
    uint16_t n = rte_eth_rx_burst(port_b_, 0, rx, kRxBurst);
    for (uint16_t i = 0; i < n; i++) classify(rx[i]);
    if (n) rte_pktmbuf_free_bulk(rx, n);
    // The router should send nothing back towards the generator.
    n = rte_eth_rx_burst(port_a_, 0, rx, kRxBurst);
    rx_on_a_ += n;
    if (n) rte_pktmbuf_free_bulk(rx, n);
  }

  // Read by the generator's lcore too (the quiet gap), hence atomic; only
  // this sink writes it.
  uint64_t received() const { return received_.load(std::memory_order_relaxed); }
  uint64_t received_bytes() const { return bytes_; }
  uint64_t foreign() const { return foreign_; }
  uint64_t rx_on_a() const { return rx_on_a_; }
  int last_ttl() const { return last_ttl_; }
  unsigned flows_seen() const { return unsigned(std::count(seen_.begin(), seen_.end(), 1)); }
  Window window, bytes_window;

 private:
  // Ours: IPv4/UDP to the discard port from our source range. The header is
  // in cache anyway (the driver just copied the frame in).
  void classify(rte_mbuf* m) {
    constexpr size_t kHeaders = sizeof(rte_ether_hdr) + sizeof(rte_ipv4_hdr) + sizeof(rte_udp_hdr);
    const auto* eth = rte_pktmbuf_mtod(m, const rte_ether_hdr*);
    const auto* ip = reinterpret_cast<const rte_ipv4_hdr*>(eth + 1);
    const auto* udp = reinterpret_cast<const rte_udp_hdr*>(ip + 1);
    if (m->data_len < kHeaders || eth->ether_type != rte_cpu_to_be_16(RTE_ETHER_TYPE_IPV4) ||
        ip->version_ihl != RTE_IPV4_VHL_DEF || ip->next_proto_id != IPPROTO_UDP ||
        udp->dst_port != rte_cpu_to_be_16(kUdpDstPort)) {
      foreign_++;
      return;
    }
    const uint32_t port_off = uint32_t(rte_be_to_cpu_16(udp->src_port)) - kSrcPortBase;  // wraps if below
    const uint64_t f = uint64_t(rte_be_to_cpu_32(ip->src_addr) - src_ip_) * kPortsPerAddr + port_off;
    if (port_off >= kPortsPerAddr || f >= seen_.size()) {
      foreign_++;
      return;
    }
    seen_[f] = 1;
    last_ttl_ = ip->time_to_live;
    received_.store(received_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    bytes_ += m->pkt_len;
  }

  uint16_t port_a_, port_b_;
  uint32_t src_ip_;
  std::vector<uint8_t> seen_;
  std::atomic<uint64_t> received_{0};
  uint64_t bytes_ = 0, foreign_ = 0, rx_on_a_ = 0;
  int last_ttl_ = -1;
};

void sink_open(Sink& s, uint64_t now) {
  s.window.open(s.received(), now);
  s.bytes_window.open(s.received_bytes(), now);
}

void sink_close(Sink& s, uint64_t now) {
  s.window.close(s.received(), now);
  s.bytes_window.close(s.received_bytes(), now);
}

// After the window: keep receiving what is still in flight, so loss counts
// only what the router really dropped.
void sink_drain(Sink& s, const Schedule& sch) {
  uint64_t until = rte_rdtsc() + uint64_t(kDrainS * double(sch.hz));
  while (rte_rdtsc() < until) s.poll();
}

struct SinkTask {
  Sink* sink;
  const Schedule* schedule;
};

// The sink on its own lcore (--sink-lcore).
int sink_main(void* arg) {
  auto* t = static_cast<SinkTask*>(arg);
  Sink& s = *t->sink;
  const Schedule& sch = *t->schedule;
  auto stopped = [] { return g_stop.load(std::memory_order_relaxed); };
  while (!sch.open_tsc.load(std::memory_order_acquire) && !stopped()) s.poll();
  if (!stopped()) sink_open(s, rte_rdtsc());
  while (!sch.close_tsc.load(std::memory_order_acquire) && !stopped()) s.poll();
  sink_close(s, rte_rdtsc());
  sink_drain(s, sch);
  return 0;
}

nlohmann::ordered_json port_json(const Port& p) {
  rte_eth_stats st{};
  rte_eth_stats_get(p.id, &st);
  return {{"device", p.device},        {"mac", format_mac(p.mac)},  {"mac_set", p.mac_set},
          {"ipackets", st.ipackets},   {"opackets", st.opackets},   {"imissed", st.imissed},
          {"ierrors", st.ierrors},     {"oerrors", st.oerrors},     {"rx_nombuf", st.rx_nombuf}};
}

int run(const Options& o) {
  std::vector<std::string> eal{"moat-bench", "-l", std::to_string(o.lcore), "--main-lcore",
                               std::to_string(o.lcore), "--no-huge", "-m", std::to_string(o.memory_mb),
                               "--no-pci", "--log-level", "*:error", "--vdev", o.port_a, "--vdev", o.port_b};
  if (o.split()) eal[2] = fmt::format("{},{}", o.lcore, o.sink_lcore);
  if (o.file_prefix.empty()) eal.push_back("--no-shconf");
  else eal.insert(eal.end(), {"--file-prefix", o.file_prefix});
  eal.insert(eal.end(), o.eal_args.begin(), o.eal_args.end());
  std::vector<char*> ea;
  for (auto& s : eal) ea.push_back(s.data());
  if (rte_eal_init(int(ea.size()), ea.data()) < 0) die(fmt::format("EAL: {}", rte_strerror(rte_errno)));

  rte_mempool* rx_pool =
      rte_pktmbuf_pool_create("bench_rx", kRxPoolMbufs, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE, rte_socket_id());
  if (!rx_pool) die(fmt::format("rx pool: {}", rte_strerror(rte_errno)));
  Port a = start_port(o.port_a, o.mac_a, rx_pool);
  Port b = start_port(o.port_b, o.mac_b, rx_pool);
  Generator gen(o, a.id);
  Sink sink(o, a.id, b.id);

  Schedule sch;
  sch.hz = rte_get_tsc_hz();
  // memif and af_packet links come up asynchronously, when the peer connects.
  const uint64_t link_t0 = rte_rdtsc();
  bool link_up = false;
  for (uint64_t until = link_t0 + uint64_t(o.link_timeout * double(sch.hz));
       rte_rdtsc() < until && !g_stop.load();) {
    rte_eth_link la{}, lb{};
    rte_eth_link_get_nowait(a.id, &la);
    rte_eth_link_get_nowait(b.id, &lb);
    if (la.link_status && lb.link_status) {
      link_up = true;
      break;
    }
    rte_delay_ms(10);
  }
  const double link_wait_s = double(rte_rdtsc() - link_t0) / double(sch.hz);

  double quiet_s = 0;
  if (link_up) {
    auto stopped = [] { return g_stop.load(std::memory_order_relaxed); };
    const uint64_t hz = sch.hz;
    SinkTask task{&sink, &sch};
    if (o.split() && rte_eal_remote_launch(sink_main, &task, unsigned(o.sink_lcore)) != 0)
      die(fmt::format("cannot launch the sink on lcore {}", o.sink_lcore));
    // Warm-up: links, rings, caches and the router settle; its losses (a
    // peer that restarts its port drops a ring's worth) are reported apart.
    uint64_t now = rte_rdtsc();
    gen.pace_from(now, hz);
    for (const uint64_t until = now + uint64_t(o.warmup * double(hz)); (now = rte_rdtsc()) < until && !stopped();) {
      gen.step(now);
      if (!o.split()) sink.poll();
    }
    // Quiet gap: stop offering until everything sent has arrived, or the
    // sink has heard nothing for 20 ms (the warm-up lost some; 20 ms because
    // vCPU stalls of a few ms happen here), at most 200 ms. Every packet of
    // the window is then one the window sent: loss is exact rather than off
    // by whatever was in flight.
    const uint64_t quiet_t0 = rte_rdtsc();
    for (uint64_t last = sink.received(), changed = quiet_t0;
         (now = rte_rdtsc()) < quiet_t0 + hz / 5 && now - changed < hz / 50 && last != gen.sent() && !stopped();) {
      if (!o.split()) sink.poll();
      if (uint64_t r = sink.received(); r != last) {
        last = r;
        changed = now;
      }
    }
    quiet_s = double(rte_rdtsc() - quiet_t0) / double(hz);
    now = rte_rdtsc();
    gen.window.open(gen.sent(), now);
    gen.pace_from(now, hz);
    if (!o.split()) sink_open(sink, now);
    sch.open_tsc.store(now, std::memory_order_release);
    for (const uint64_t end = now + uint64_t(o.duration * double(hz)); (now = rte_rdtsc()) < end && !stopped();) {
      gen.step(now);
      if (!o.split()) sink.poll();
    }
    now = rte_rdtsc();
    gen.window.close(gen.sent(), now);
    sch.close_tsc.store(now, std::memory_order_release);
    gen.release();
    if (o.split()) {
      rte_eal_mp_wait_lcore();
    } else {
      sink_close(sink, now);
      sink_drain(sink, sch);
    }
  }

  const double tx_pps = gen.window.rate(sch.hz);
  const double rx_pps = sink.window.rate(sch.hz);
  const double rx_secs = sink.bytes_window.seconds(sch.hz);
  const double rx_l2_bytes = double(sink.bytes_window.count() + kFcsBytes * sink.window.count());
  // The window's packets: sent between open and close, received from open
  // to the end of the drain.
  const uint64_t win_tx = gen.window.count();
  const uint64_t win_rx = sink.received() - sink.window.open_value;
  const int64_t lost = int64_t(win_tx) - int64_t(win_rx);
  const uint64_t warm_tx = gen.window.open_value, warm_rx = sink.window.open_value;
  rte_eth_stats stats_b{};
  rte_eth_stats_get(b.id, &stats_b);

  nlohmann::ordered_json r;
  r["tool"] = "moat-bench";
  r["size"] = o.size;
  r["wire_bytes"] = o.wire_bytes();
  r["flows"] = o.flows;
  r["tx_mode"] = tx_mode_name(o.tx_mode);
  r["rate_pps"] = o.rate_pps;
  r["lcores"] = {{"generator", o.lcore}, {"sink", o.split() ? unsigned(o.sink_lcore) : o.lcore}};
  r["src_ip"] = format_ip(o.src_ip);
  r["dst_ip"] = format_ip(o.dst_ip);
  r["dst_mac"] = format_mac(o.dst_mac);
  r["link_up"] = link_up;
  r["link_wait_s"] = link_wait_s;
  r["warmup_s"] = o.warmup;
  r["duration_s"] = gen.window.seconds(sch.hz);
  r["tx_packets"] = win_tx;
  r["rx_packets"] = win_rx;
  r["lost_packets"] = lost;
  r["loss"] = win_tx ? double(lost) / double(win_tx) : 0.0;
  r["tx_pps"] = tx_pps;
  r["rx_pps"] = rx_pps;
  r["tx_mpps"] = tx_pps / 1e6;
  r["rx_mpps"] = rx_pps / 1e6;
  r["tx_bps_l1"] = tx_pps * (o.size + kL1Overhead) * 8;
  r["tx_bps_l2"] = tx_pps * o.size * 8;
  r["rx_bps_l1"] = rx_secs > 0 ? (rx_l2_bytes + double(kL1Overhead * sink.window.count())) * 8 / rx_secs : 0;
  r["rx_bps_l2"] = rx_secs > 0 ? rx_l2_bytes * 8 / rx_secs : 0;
  r["rx_gbps_l1"] = r["rx_bps_l1"].get<double>() / 1e9;
  r["rx_gbps_l2"] = r["rx_bps_l2"].get<double>() / 1e9;
  r["rx_ttl"] = sink.last_ttl();
  r["flows_seen"] = sink.flows_seen();
  r["warmup"] = {{"tx_packets", warm_tx}, {"rx_packets", warm_rx},
                 {"lost_packets", int64_t(warm_tx) - int64_t(warm_rx)}, {"quiet_gap_s", quiet_s}};
  r["tx_rejected"] = gen.rejected();
  r["tx_late"] = gen.late();
  r["tx_alloc_failed"] = gen.alloc_failed();
  r["unexpected"] = {{"rx_on_a", sink.rx_on_a()}, {"rx_on_b_foreign", sink.foreign()}, {"tx_on_b", stats_b.opackets}};
  r["ports"] = {{"a", port_json(a)}, {"b", port_json(b)}};
  r["interrupted"] = g_stop.load();
  if (!link_up) r["error"] = fmt::format("links not up after {} s", o.link_timeout);
  fmt::print("{}\n", r.dump());
  std::fflush(stdout);

  rte_eth_dev_stop(a.id);
  rte_eth_dev_stop(b.id);
  rte_eth_dev_close(a.id);
  rte_eth_dev_close(b.id);
  rte_eal_cleanup();
  return link_up ? 0 : 3;
}

}  // namespace
}  // namespace moat

int main(int argc, char** argv) {
  moat::Options o = moat::parse(argc, argv);
  std::signal(SIGINT, moat::on_signal);
  std::signal(SIGTERM, moat::on_signal);
  std::signal(SIGALRM, moat::on_watchdog);
  alarm(unsigned(o.link_timeout + o.warmup + o.duration) + 30);
  return moat::run(o);
}
