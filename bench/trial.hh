#pragma once
// The DPDK side of moat-bench: ports, the generator and the sink, and one
// trial (warm-up, measured window, drain).
//
// Threads: the generator runs on the main lcore (profile generator.lcore),
// the sink on the same lcore (one loop does both) or on its own
// (sink.lcore); they share only a TrialCtl. The main lcore also prints
// progress and runs the search between trials.
//
// Which frames count: every frame carries its send time (traffic.hh). The
// window opens at a time T; the sink counts a frame for the trial only when
// it was stamped at or after T, and the generator counts only frames it
// stamped after T (it drops any frame still pending from the warm-up).
// So stragglers of the warm-up or of an earlier trial never count, and no
// gap in the traffic is needed before the window.
#include <rte_ethdev.h>
#include <rte_mempool.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "bench/profile.hh"
#include "bench/traffic.hh"

namespace moat::bench {

struct PortState {
  std::string name, device;
  uint16_t id = 0;
  std::array<uint8_t, 6> mac{};
  bool mac_set = false;
};

struct TrialSpec {
  unsigned index = 0;          // over the whole run
  size_t series = 0;           // index into Profile::sizes
  double rate_pps = 0;         // 0: as fast as the port takes
  std::string purpose;         // "max", "top", "search", "confirm", "fixed"
  double duration_s = 1, warmup_s = 0, drain_s = 0.5;
};

struct TrialResult {
  TrialSpec spec;
  double duration_s = 0;      // the window by the TSC
  double drain_s = 0;         // how long the sink waited after the window
  uint64_t offered = 0;       // frames the generator tried to send in the window
  uint64_t accepted = 0;      // ... that the port took
  uint64_t rejected = 0;      // fixed rate: refused by a full TX ring (lost offer)
  uint64_t late = 0;          // fixed rate: not offered at all (generator behind)
  uint64_t pushback = 0;      // max rate: frames the port refused and the generator retried
  uint64_t alloc_failed = 0;  // mempool empty (bursts)
  uint64_t offered_bytes = 0, received_bytes = 0;  // frames incl. FCS
  uint64_t received = 0;      // our frames of this window at the sink
  uint64_t stale = 0;         // our frames sent before the window (warm-up, earlier trials)
  uint64_t foreign = 0;       // frames at the sink that are not ours
  uint64_t reflected = 0;     // frames that came back on the generator's port
  uint64_t wrong_size = 0;    // ours, but not a size we sent or not matching their IP length
  uint64_t reordered = 0;     // sequence below the highest seen in its flow (RFC 4737)
  uint64_t duplicates = 0;    // sequence equal to the highest seen in its flow
  uint64_t flows_seen = 0;
  int rx_ttl = -1;            // TTL of the last frame: 63 after one routing hop
  // Tunnel traffic, sampled decryptions: checked decrypted with the keys;
  // failed did not (ICV, SPI, padding) or held a foreign inner packet;
  // stale held one of ours from before the window (also in `stale`).
  uint64_t esp_checked = 0, esp_check_failed = 0, esp_stale = 0;
  LatencyHist latency;        // TSC >> kTsShift units
  uint64_t tsc_hz = 0;
  bool interrupted = false;
  std::string verdict;        // ok | no_forwarding | excess

  double offered_pps() const { return duration_s > 0 ? double(offered) / duration_s : 0; }
  double received_pps() const { return duration_s > 0 ? double(received) / duration_s : 0; }
  double loss() const { return offered ? double(int64_t(offered) - int64_t(received)) / double(offered) : 0; }
  double ns_of(double units) const { return units * double(1u << kTsShift) * 1e9 / double(tsc_hz); }
};

// What the progress line shows while a trial runs.
struct TrialProgress {
  const TrialSpec* spec;
  const char* phase;  // "warm-up", "window", "drain"
  double elapsed_s, phase_s;  // in this phase, and its planned length
  uint64_t offered, received;
};
using ProgressFn = std::function<void(const TrialProgress&)>;

class Generator;
class Sink;
class Esp;

class Harness {
 public:
  // EAL must be up; probes nothing itself: the ports were given as --vdev /
  // -a by the caller.
  explicit Harness(const Profile& p);
  ~Harness();
  // Waits (bounded by link_timeout_s) for both ports; false: not up.
  bool wait_links(double* waited_s);
  TrialResult run(const TrialSpec& spec, const ProgressFn& progress);
  const PortState& gen_port() const { return ports_[0]; }
  const PortState& sink_port() const { return ports_.size() > 1 ? ports_[1] : ports_[0]; }
  bool split() const { return p_.sink_lcore != p_.gen_lcore; }

 private:
  const Profile& p_;
  std::vector<PortState> ports_;  // [0] generator, [1] sink unless they share one
  rte_mempool* rx_pool_ = nullptr;
  std::unique_ptr<Esp> esp_;
  std::unique_ptr<Generator> gen_;
  std::unique_ptr<Sink> sink_;
  size_t built_series_ = SIZE_MAX;
};

// Set by SIGINT/SIGTERM: the trial in progress ends early, no new one starts.
extern std::atomic<bool> g_stop;

}  // namespace moat::bench
