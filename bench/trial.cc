#include "bench/trial.hh"

#include "bench/esp.hh"

#include <rte_cycles.h>
#include <rte_errno.h>
#include <rte_launch.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_memcpy.h>

#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <set>
#include <stdexcept>

namespace moat::bench {

std::atomic<bool> g_stop{false};

namespace {

constexpr uint16_t kTxBurst = 32;
constexpr uint16_t kRxBurst = 64;
constexpr uint16_t kRingSize = 1024;
constexpr unsigned kRxPoolMbufs = 8191;
constexpr unsigned kTxPoolMbufs = 4 * kRingSize - 1;
constexpr double kQuietS = 0.05;      // drain ends when nothing has arrived for this long
constexpr double kProgressS = 0.25;

bool stopped() { return g_stop.load(std::memory_order_relaxed); }

[[noreturn]] void fail(const std::string& m) { throw std::runtime_error(m); }

PortState start_port(const PortSpec& spec, rte_mempool* rx_pool) {
  PortState p;
  p.name = spec.name;
  p.device = spec.device;
  const std::string dev = spec.device.substr(0, spec.device.find(','));
  if (rte_eth_dev_get_port_by_name(dev.c_str(), &p.id) != 0)
    fail(fmt::format("port {} ({}) was not probed", spec.name, spec.device));
  rte_eth_conf conf{};
  const int socket = rte_eth_dev_socket_id(p.id);
  if (rte_eth_dev_configure(p.id, 1, 1, &conf) != 0) fail("configure port " + spec.name);
  if (rte_eth_rx_queue_setup(p.id, 0, kRingSize, socket, nullptr, rx_pool) != 0) fail("rx queue of port " + spec.name);
  if (rte_eth_tx_queue_setup(p.id, 0, kRingSize, socket, nullptr) != 0) fail("tx queue of port " + spec.name);
  if (spec.mac) {
    rte_ether_addr m;
    std::memcpy(m.addr_bytes, spec.mac->data(), 6);
    // Not every driver lets us choose (memif takes mac= in its devargs).
    p.mac_set = rte_eth_dev_default_mac_addr_set(p.id, &m) == 0;
  }
  if (rte_eth_dev_start(p.id) != 0) fail("start port " + spec.name);
  rte_eth_promiscuous_enable(p.id);
  rte_ether_addr m;
  rte_eth_macaddr_get(p.id, &m);
  std::memcpy(p.mac.data(), m.addr_bytes, 6);
  return p;
}

void fill_pattern(rte_mempool* mp, void*, void* obj, unsigned) {
  auto* m = static_cast<rte_mbuf*>(obj);
  auto* d = static_cast<uint8_t*>(m->buf_addr) + RTE_PKTMBUF_HEADROOM;
  const size_t n = rte_pktmbuf_data_room_size(mp) - RTE_PKTMBUF_HEADROOM;
  for (size_t i = 0; i < n; i++) d[i] = pattern_byte(i);
}

}  // namespace

// Shared by the generator's and the sink's lcores during one trial.
struct TrialCtl {
  uint64_t hz = 0;
  std::atomic<bool> opened{false};
  std::atomic<uint32_t> open_ts{0};
  std::atomic<bool> closed{false};
  std::atomic<uint64_t> close_tsc{0};
  std::atomic<uint64_t> tx_final{0};  // frames accepted in the window, published with `closed`
  std::atomic<bool> sink_done{false};
  double drain_s = 0.5;
};

class Generator {
 public:
  Generator(const Profile& p, const PortState& port, Esp* esp)
      : p_(p), port_(port.id), mac_(port.mac), space_(p), esp_(esp) {
    pool_ = rte_pktmbuf_pool_create("bench_tx", kTxPoolMbufs, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE, rte_socket_id());
    if (!pool_) fail(fmt::format("tx pool: {}", rte_strerror(rte_errno)));
    rte_mempool_obj_iter(pool_, fill_pattern, nullptr);
    seq_.assign(p.flows, 0);
    if (esp_) esp_seq_.assign(esp_->sas(), 0);
  }
  ~Generator() {
    release();
    // The pool is EAL memory, freed with EAL.
  }

  // Templates for one entry of the size series: one per (flow, size).
  void build(const SizeSeries& s) {
    sizes_.clear();
    std::vector<unsigned> weights;
    for (auto& slot : s.mix) {
      sizes_.push_back(slot.size);
      weights.push_back(slot.weight);
    }
    slot_size_ = spread(weights);
    templates_.clear();
    templates_.reserve(size_t(p_.flows) * sizes_.size());
    for (uint32_t f = 0; f < p_.flows; f++) {
      const FlowKey k = space_.key(f);
      for (unsigned size : sizes_) {
        const bool inbound = p_.esp.direction == EspDirection::inbound;
        Template t = inbound ? esp_->make_inbound(p_, k, f, size) : make_template(p_, k, f, size);
        std::memcpy(t.head + 6, mac_.data(), 6);
        if (!t.whole.empty()) std::memcpy(t.whole.data() + 6, mac_.data(), 6);
        templates_.push_back(std::move(t));
      }
    }
    flow_ = 0;
    slot_ = 0;
  }

  void set_rate(double pps) {
    rate_pps_ = pps;
    // A fixed rate may fall behind (preemption); catching up is capped at
    // 1 ms of traffic so a stall does not become a line-rate burst.
    max_backlog_ = std::max<uint64_t>(kTxBurst, uint64_t(pps / 1000));
  }

  void pace_from(uint64_t tsc, uint64_t hz) {
    start_tsc_ = tsc;
    hz_ = hz;
    pace_base_ = attempted_ + late_;
  }

  void reset_counters() {
    attempted_ = accepted_ = rejected_ = late_ = alloc_failed_ = bytes_ = pushback_ = 0;
  }

  void step(uint64_t now) {
    const uint32_t ts = ts_of_tsc(now);
    if (rate_pps_ <= 0) {
      if (npending_ < kTxBurst) npending_ += fill(pending_ + npending_, uint16_t(kTxBurst - npending_), ts);
      if (npending_ == 0) return;
      const uint16_t k = rte_eth_tx_burst(port_, 0, pending_, npending_);
      attempted_ += k;
      accepted_ += k;
      for (uint16_t i = 0; i < k; i++) bytes_ += pending_[i]->pkt_len + kFcsBytes;
      // Ring full: keep the rest for the next round instead of dropping
      // them, and count the push-back: the rate is then the far side's.
      if (k < npending_) pushback_ += npending_ - k;
      if (k < npending_) std::memmove(pending_, pending_ + k, (npending_ - k) * sizeof(pending_[0]));
      npending_ = uint16_t(npending_ - k);
      return;
    }
    const uint64_t due = pace_base_ + uint64_t(double(now - start_tsc_) * rate_pps_ / double(hz_));
    // Frames given up as late are neither offered nor lost: the generator
    // failed to send them, the router never saw them.
    if (due <= attempted_ + late_) return;
    if (due - attempted_ - late_ > max_backlog_) late_ = due - max_backlog_ - attempted_;
    const uint16_t n = fill(pending_, uint16_t(std::min<uint64_t>(due - attempted_ - late_, kTxBurst)), ts);
    if (n == 0) return;
    for (uint16_t i = 0; i < n; i++) bytes_ += pending_[i]->pkt_len + kFcsBytes;
    const uint16_t k = rte_eth_tx_burst(port_, 0, pending_, n);
    attempted_ += n;
    accepted_ += k;
    if (k < n) {  // a fixed rate does not wait: what the port refused is offered and lost
      rejected_ += n - k;
      rte_pktmbuf_free_bulk(pending_ + k, n - k);
    }
  }

  // Drops frames built but not yet accepted: they carry an older stamp.
  void release() {
    if (npending_) rte_pktmbuf_free_bulk(pending_, npending_);
    npending_ = 0;
  }

  uint64_t attempted() const { return attempted_; }
  uint64_t accepted() const { return accepted_; }
  uint64_t rejected() const { return rejected_; }
  uint64_t late() const { return late_; }
  uint64_t pushback() const { return pushback_; }
  uint64_t alloc_failed() const { return alloc_failed_; }
  uint64_t bytes() const { return bytes_; }
  const std::vector<unsigned>& sizes() const { return sizes_; }
  // What the sink should receive for each frame sent, without FCS.
  std::vector<unsigned> rx_lengths() const {
    std::vector<unsigned> v;
    for (size_t i = 0; i < sizes_.size() && i < templates_.size(); i++) v.push_back(templates_[i].rx_len);
    return v;
  }

 private:
  uint16_t fill(rte_mbuf** pkts, uint16_t n, uint32_t ts) {
    if (n == 0) return 0;
    if (rte_pktmbuf_alloc_bulk(pool_, pkts, n) != 0) {
      alloc_failed_++;
      return 0;
    }
    const size_t nsizes = sizes_.size();
    for (uint16_t i = 0; i < n; i++) {
      const Template& t = templates_[size_t(flow_) * nsizes + slot_size_[slot_]];
      auto* d = rte_pktmbuf_mtod(pkts[i], uint8_t*);
      if (t.copy_len > kCopyBytes) rte_memcpy(d, t.whole.data(), t.copy_len);
      else rte_memcpy(d, t.head, kCopyBytes);  // a constant size compiles to a few moves
      // ESP: sequence numbers per SA from 1 and never reused, so a router's
      // anti-replay check passes every frame honestly.
      if (t.esp_fix) esp_stamp(d, t, ++esp_seq_[t.esp_sa], seq_[flow_]++, ts, clmul_);
      else if (t.stamp_off) stamp(d, t, seq_[flow_]++, ts);
      pkts[i]->data_len = t.len;
      pkts[i]->pkt_len = t.len;
      if (++flow_ == p_.flows) {
        flow_ = 0;
        if (++slot_ == slot_size_.size()) slot_ = 0;
      }
    }
    return n;
  }

  const Profile& p_;
  uint16_t port_;
  std::array<uint8_t, 6> mac_;
  FlowSpace space_;
  rte_mempool* pool_ = nullptr;
  std::vector<Template> templates_;
  std::vector<unsigned> sizes_, slot_size_;
  Esp* esp_;
  std::vector<uint32_t> seq_;  // next sequence number per flow, never reset
  std::vector<uint32_t> esp_seq_;  // last ESP sequence number per SA, never reset
  bool clmul_ = clmul_available();
  uint32_t flow_ = 0;
  size_t slot_ = 0;
  double rate_pps_ = 0;
  uint64_t max_backlog_ = kTxBurst;
  rte_mbuf* pending_[kTxBurst] = {};
  uint16_t npending_ = 0;
  uint64_t start_tsc_ = 0, hz_ = 1, pace_base_ = 0;
  uint64_t attempted_ = 0, accepted_ = 0, rejected_ = 0, late_ = 0, alloc_failed_ = 0, bytes_ = 0, pushback_ = 0;
};

class Sink {
 public:
  Sink(const Profile& p, uint16_t gen_port, uint16_t sink_port, Esp* esp)
      : p_(p), gen_port_(gen_port), sink_port_(sink_port), space_(p), max_seq_(p.flows, 0), seen_(p.flows, 0),
        udp_(p.protocol == Protocol::udp), esp_(esp) {}

  void expect_lengths(const std::vector<unsigned>& lengths) {
    size_ok_.assign(kMaxFrame + 1, 0);
    for (unsigned l : lengths) size_ok_[l] = 1;
  }

  void begin(TrialResult* r) {
    r_ = r;
    esp_seen_ = 0;
    std::fill(seen_.begin(), seen_.end(), 0);
    received_.store(0, std::memory_order_relaxed);
    early_.store(0, std::memory_order_relaxed);
  }

  void poll(const TrialCtl& ctl) {
    rte_mbuf* rx[kRxBurst];
    uint16_t n = rte_eth_rx_burst(sink_port_, 0, rx, kRxBurst);
    if (n) {
      // Read after the receive: the caller's clock may predate the send.
      const uint64_t now = rte_rdtsc();
      const bool open = ctl.opened.load(std::memory_order_acquire);
      const uint32_t open_ts = ctl.open_ts.load(std::memory_order_relaxed);
      const uint32_t now_ts = ts_of_tsc(now);
      if (!open) early_.store(early_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
      for (uint16_t i = 0; i < n; i++) classify(rx[i], open, open_ts, now_ts);
      rte_pktmbuf_free_bulk(rx, n);
      last_rx_tsc_ = now;
      last_any_rx_.store(now, std::memory_order_relaxed);
    }
    if (gen_port_ != sink_port_) {
      // The router should send nothing back towards the generator.
      n = rte_eth_rx_burst(gen_port_, 0, rx, kRxBurst);
      if (n) {
        if (ctl.opened.load(std::memory_order_relaxed)) r_->reflected += n;
        rte_pktmbuf_free_bulk(rx, n);
      }
    }
  }

  // After the window: keep receiving what is still in flight, so loss
  // counts only what the router really dropped. Ends when everything sent
  // has arrived, nothing has for kQuietS, or drain_s has passed.
  void drain(TrialCtl& ctl) {
    const uint64_t t0 = rte_rdtsc(), hz = ctl.hz;
    const uint64_t tx = ctl.tx_final.load(std::memory_order_acquire);
    last_rx_tsc_ = t0;
    while (!stopped()) {
      poll(ctl);
      const uint64_t now = rte_rdtsc();  // after the poll, which may move last_rx_tsc_
      if (received() >= tx) break;
      if (now - last_rx_tsc_ > uint64_t(kQuietS * double(hz))) break;
      if (now - t0 > uint64_t(ctl.drain_s * double(hz))) break;
    }
    r_->drain_s = double(rte_rdtsc() - t0) / double(hz);
    r_->flows_seen = uint64_t(std::count(seen_.begin(), seen_.end(), 1));
  }

  uint64_t received() const { return received_.load(std::memory_order_relaxed); }
  // Frames of any kind that arrived before the window opened.
  uint64_t early() const { return early_.load(std::memory_order_relaxed); }
  uint64_t last_rx_tsc() const { return last_any_rx_.load(std::memory_order_relaxed); }

 private:
  static uint16_t be16(const uint8_t* d, unsigned o) { return uint16_t((d[o] << 8) | d[o + 1]); }
  static uint32_t be32(const uint8_t* d, unsigned o) { return (uint32_t(be16(d, o)) << 16) | be16(d, o + 2); }

  void count_received(uint32_t pkt_len) {
    received_.store(received_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    r_->received_bytes += pkt_len + kFcsBytes;
  }

  void classify(rte_mbuf* m, bool open, uint32_t open_ts, uint32_t now_ts) {
    const auto* d = rte_pktmbuf_mtod(m, const uint8_t*);
    const uint32_t len = m->data_len;
    if (!open) return;  // before the window: ARP, a router's gratuitous ARP, warm-up traffic
    if (len < kEthBytes + kIpv4Bytes || d[12] != 0x08 || d[13] != 0x00 || d[14] != 0x45) {
      r_->foreign++;
      return;
    }
    if (esp_ && d[23] == 50) return classify_esp(m, d + kEthBytes, len - kEthBytes, open_ts, now_ts);
    const auto got = inner(d + kEthBytes, len - kEthBytes, open_ts, now_ts, true);
    if (got == Inner::foreign) r_->foreign++;
    if (got != Inner::ours) return;
    count_received(m->pkt_len);
    // The frame must be one we expect back (a size sent, or its decapsulated
    // inner frame), and hold exactly its IP packet (Ethernet may pad a
    // short one to 60 bytes).
    const uint32_t ip_end = be16(d, 16) + kEthBytes;
    if (m->pkt_len > kMaxFrame || ip_end > kMaxFrame ||
        (!size_ok_[m->pkt_len] && !(m->pkt_len == 60 && size_ok_[ip_end])) ||
        (ip_end != m->pkt_len && !(m->pkt_len == 60 && ip_end < 60)))
      r_->wrong_size++;
  }

  // Tunnel traffic reaching the sink (a router's outbound ESP, or the
  // generator's own in a loop): counted on arrival; one in verify_every is
  // decrypted with the profile's keys, its ICV checked and its inner frame
  // measured like cleartext.
  void classify_esp(rte_mbuf* m, const uint8_t* ip, uint32_t len, uint32_t open_ts, uint32_t now_ts) {
    count_received(m->pkt_len);
    if (++esp_seen_ % p_.esp.verify_every) return;
    auto dec = esp_->decrypt(ip, len);
    if (!dec) {
      r_->esp_check_failed++;
      return;
    }
    r_->esp_checked++;
    // A stale inner frame (stamped before the window: a router with deep
    // queues still delivers warm-up traffic) decrypted fine: it is counted
    // in `stale` and as esp_stale, not as a failed check.
    switch (inner(dec->inner.data(), uint32_t(dec->inner.size()), open_ts, now_ts, false)) {
      case Inner::ours: break;
      case Inner::stale: r_->esp_stale++; break;
      case Inner::foreign: r_->esp_check_failed++; break;
    }
  }

  enum class Inner { ours, foreign, stale };

  // An IPv4 packet of ours? Then its stamp gives latency and order.
  Inner inner(const uint8_t* ip, uint32_t len, uint32_t open_ts, uint32_t now_ts, bool cleartext) {
    const unsigned stamp_end = kIpv4Bytes + (udp_ ? kUdpBytes + kStampBytes : kTcpBytes);
    if (len < stamp_end || ip[0] != 0x45 || ip[9] != (udp_ ? 17 : 6)) return Inner::foreign;
    const int64_t f = space_.index(be32(ip, 12), be32(ip, 16), be16(ip, 20), be16(ip, 22));
    if (f < 0) return Inner::foreign;
    if (!cleartext && be16(ip, 2) != len) r_->wrong_size++;
    const unsigned so = kIpv4Bytes + (udp_ ? kUdpBytes : 4);
    const uint32_t seq = be32(ip, so), ts = be32(ip, so + 4);
    if (int32_t(ts - open_ts) < 0) {
      r_->stale++;
      return Inner::stale;
    }
    r_->rx_ttl = ip[8];
    r_->latency.add(now_ts - ts);
    uint32_t& mx = max_seq_[size_t(f)];
    uint8_t& s = seen_[size_t(f)];
    if (s && int32_t(seq - mx) < 0) {
      r_->reordered++;
    } else if (s && seq == mx) {
      r_->duplicates++;
    } else {
      mx = seq;
      s = 1;
    }
    return Inner::ours;
  }

  const Profile& p_;
  uint16_t gen_port_, sink_port_;
  FlowSpace space_;
  std::vector<uint32_t> max_seq_;
  std::vector<uint8_t> seen_, size_ok_;
  bool udp_;
  Esp* esp_;
  uint64_t esp_seen_ = 0;
  TrialResult* r_ = nullptr;
  // Read by the generator's lcore for progress and the drain; only the
  // sink writes it.
  std::atomic<uint64_t> received_{0}, early_{0};
  uint64_t last_rx_tsc_ = 0;
  std::atomic<uint64_t> last_any_rx_{0};  // for the quiet gap, read by the generator's lcore
};

Harness::Harness(const Profile& p) : p_(p) {
  rx_pool_ = rte_pktmbuf_pool_create("bench_rx", kRxPoolMbufs, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE, rte_socket_id());
  if (!rx_pool_) fail(fmt::format("rx pool: {}", rte_strerror(rte_errno)));
  auto spec = [&](const std::string& name) -> const PortSpec& {
    for (auto& s : p.ports)
      if (s.name == name) return s;
    fail("unknown port " + name);  // the profile loader already refused this
  };
  ports_.push_back(start_port(spec(p.gen_port), rx_pool_));
  if (p.sink_port != p.gen_port) ports_.push_back(start_port(spec(p.sink_port), rx_pool_));
  if (p.esp.direction != EspDirection::none) esp_ = std::make_unique<Esp>(p);
  gen_ = std::make_unique<Generator>(p, ports_[0], esp_.get());
  sink_ = std::make_unique<Sink>(p, ports_[0].id, sink_port().id, esp_.get());
}

Harness::~Harness() {
  gen_.reset();
  // A memif loop has both ends of one link in this process. Stopping or
  // closing one end makes EAL's interrupt thread tear the other end's
  // connection down; stopping or closing that end from here at the same
  // time raced it (a segfault once in a few hundred runs on a loaded
  // machine). So after each step the other ends' links must read down,
  // i.e. the interrupt thread has been through them, before the next.
  auto settle = [&](size_t i) {
    for (size_t j = 0; j < ports_.size(); j++) {
      if (j == i) continue;
      for (int k = 0; k < 200; k++) {  // at most 1 s: a peer in another process never answers here
        rte_eth_link l{};
        if (rte_eth_link_get_nowait(ports_[j].id, &l) != 0 || !l.link_status) break;
        rte_delay_ms(5);
      }
    }
    rte_delay_ms(5);  // the handler finishes after it marks the link down
  };
  // Only ends of one link in this process answer each other: memif ports
  // on the same socket file.
  auto socket_of = [](const std::string& dev) {
    auto at = dev.find("socket=");
    return at == std::string::npos ? std::string() : dev.substr(at, dev.find(',', at) - at);
  };
  std::set<std::string> sockets;
  bool loop = false;
  for (auto& ps : p_.ports)
    if (auto s = socket_of(ps.device); !s.empty()) loop = !sockets.insert(s).second || loop;
  for (size_t i = 0; i < ports_.size(); i++) {
    rte_eth_dev_stop(ports_[i].id);
    if (loop) settle(i);
  }
  for (auto& port : ports_) rte_eth_dev_close(port.id);
}

bool Harness::wait_links(double* waited_s) {
  const uint64_t hz = rte_get_tsc_hz(), t0 = rte_rdtsc();
  bool up = false;
  for (const uint64_t until = t0 + uint64_t(p_.link_timeout_s * double(hz)); rte_rdtsc() < until && !stopped();) {
    up = true;
    for (auto& port : ports_) {
      rte_eth_link l{};
      rte_eth_link_get_nowait(port.id, &l);
      up = up && l.link_status;
    }
    // The router said it forwards (trial.ready_file), or no one will say.
    if (up && (p_.ready_file.empty() || access(p_.ready_file.c_str(), F_OK) == 0)) break;
    up = false;
    rte_delay_ms(10);
  }
  *waited_s = double(rte_rdtsc() - t0) / double(hz);
  return up;
}

namespace {

struct SinkTask {
  Sink* sink;
  TrialCtl* ctl;
};

// The sink on its own lcore: poll until the generator closes the window,
// then drain.
int sink_main(void* arg) {
  auto* t = static_cast<SinkTask*>(arg);
  while (!t->ctl->closed.load(std::memory_order_acquire) && !stopped()) t->sink->poll(*t->ctl);
  t->sink->drain(*t->ctl);
  t->ctl->sink_done.store(true, std::memory_order_release);
  return 0;
}

}  // namespace

TrialResult Harness::run(const TrialSpec& spec, const ProgressFn& progress) {
  TrialResult r;
  r.spec = spec;
  r.tsc_hz = rte_get_tsc_hz();
  if (built_series_ != spec.series) {
    gen_->build(p_.sizes[spec.series]);
    sink_->expect_lengths(gen_->rx_lengths());
    built_series_ = spec.series;
  }
  TrialCtl ctl;
  ctl.hz = r.tsc_hz;
  ctl.drain_s = spec.drain_s;
  sink_->begin(&r);
  gen_->set_rate(spec.rate_pps);
  SinkTask task{sink_.get(), &ctl};
  const bool split = this->split();
  if (split && rte_eal_remote_launch(sink_main, &task, p_.sink_lcore) != 0)
    fail(fmt::format("cannot launch the sink on lcore {}", p_.sink_lcore));

  const uint64_t hz = r.tsc_hz;
  uint64_t next_progress = 0;
  auto tick = [&](const char* phase, uint64_t now, uint64_t t0, double planned) {
    if (!progress || now < next_progress) return;
    next_progress = now + uint64_t(kProgressS * double(hz));
    progress(TrialProgress{&spec, phase, double(now - t0) / double(hz), planned, gen_->attempted(),
                           sink_->received()});
  };

  // Warm-up: links, rings, caches and the router (ARP, flow tables) settle.
  uint64_t now = rte_rdtsc();
  gen_->reset_counters();
  gen_->pace_from(now, hz);
  for (const uint64_t t0 = now, until = now + uint64_t(spec.warmup_s * double(hz)); (now = rte_rdtsc()) < until && !stopped();) {
    gen_->step(now);
    if (!split) sink_->poll(ctl);
    tick("warm-up", now, t0, spec.warmup_s);
  }

  // Tunnel traffic: the sink cannot read the stamp of every ESP frame (it
  // decrypts a sample), so it counts them by arrival; a gap before the
  // window keeps stragglers of the warm-up out of it. Nothing is sent
  // until every warm-up frame the router took has come out, or nothing
  // has for kQuietS (the router dropped some), or drain_s has passed. A
  // fixed quiet time was not enough: a router with deep queues on a
  // shared core held warm-up frames for 50-200 ms and they were counted
  // as received in the window, more than was sent (seen as 2.6 % excess
  // through moatd, which the sampled decryptions confirmed as stale).
  if (p_.esp.direction != EspDirection::none) {
    gen_->release();
    const uint64_t warm_sent = gen_->accepted();
    const uint64_t t0 = rte_rdtsc();
    while (!stopped()) {
      if (!split) sink_->poll(ctl);
      now = rte_rdtsc();
      const uint64_t last = std::max(sink_->last_rx_tsc(), t0);
      if (warm_sent && sink_->early() >= warm_sent) break;  // a trial without warm-up: the quiet gap
      if (now - last > uint64_t(kQuietS * double(hz)) || now - t0 > uint64_t(spec.drain_s * double(hz))) break;
    }
  }

  // The window: only frames stamped from here on count, on both sides.
  gen_->release();
  now = rte_rdtsc();
  ctl.open_ts.store(ts_of_tsc(now), std::memory_order_relaxed);
  ctl.opened.store(true, std::memory_order_release);
  gen_->reset_counters();
  gen_->pace_from(now, hz);
  const uint64_t open_tsc = now;
  for (const uint64_t end = now + uint64_t(spec.duration_s * double(hz)); (now = rte_rdtsc()) < end && !stopped();) {
    gen_->step(now);
    if (!split) sink_->poll(ctl);
    tick("window", now, open_tsc, spec.duration_s);
  }
  now = rte_rdtsc();
  gen_->release();
  r.duration_s = double(now - open_tsc) / double(hz);
  r.offered = gen_->attempted();
  r.accepted = gen_->accepted();
  r.rejected = gen_->rejected();
  r.late = gen_->late();
  r.pushback = gen_->pushback();
  r.alloc_failed = gen_->alloc_failed();
  r.offered_bytes = gen_->bytes();
  ctl.tx_final.store(r.accepted, std::memory_order_relaxed);
  ctl.close_tsc.store(now, std::memory_order_relaxed);
  ctl.closed.store(true, std::memory_order_release);
  if (split) {
    const uint64_t t0 = rte_rdtsc();
    while (!ctl.sink_done.load(std::memory_order_acquire)) {
      now = rte_rdtsc();
      tick("drain", now, t0, spec.drain_s);
      rte_pause();
    }
    rte_eal_wait_lcore(p_.sink_lcore);
  } else {
    sink_->drain(ctl);
  }
  r.received = sink_->received();
  r.interrupted = stopped();
  if (r.received > r.accepted || r.reflected + r.foreign > r.accepted)
    r.verdict = "excess";
  else if (r.accepted > 0 && r.received == 0)
    r.verdict = "no_forwarding";
  else
    r.verdict = "ok";
  return r;
}

}  // namespace moat::bench
