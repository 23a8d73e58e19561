#pragma once
// RFC 2544 rate search, apart from DPDK so tests can drive it with a fake
// router. One search finds both the no-drop rate (NDR: loss <= ndr_loss,
// 0 by default) and the partial-drop rate (PDR: loss <= pdr_loss): every
// trial narrows both brackets, as in MLRsearch (RFC 9693), so PDR costs
// only the trials between the two.
// Owner: the main lcore.
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "bench/profile.hh"

namespace moat::bench {

// What a trial says about the router, as far as the search cares.
struct Outcome {
  double offered_pps = 0;  // what the generator really offered (<= the target)
  uint64_t offered = 0, received = 0;
  bool excess = false;  // more came back than was sent: no loss figure means anything
  // Max rate only: the port refused frames (a full ring), so the far side,
  // not the generator, set the rate, and refusals were retried, not lost.
  bool pushed_back = false;
  std::string excess_why;
  double loss() const { return offered ? double(int64_t(offered) - int64_t(received)) / double(offered) : 0; }
};

// Runs one trial at `rate_pps` (0: as fast as the generator can) and says
// what happened; nullopt when the run must stop (time limit, signal).
using TrialFn = std::function<std::optional<Outcome>(double rate_pps, const std::string& purpose)>;

struct SearchResult {
  // "ok"; "no_forwarding": nothing arrived even at min_rate_pps; "excess":
  // the router sent back more than it was given; "stopped": the time limit
  // or a signal ended the search before the brackets closed.
  std::string verdict = "ok";
  std::vector<std::string> notes;
  std::optional<double> ndr_pps, pdr_pps;        // highest offered rate that passed
  double ndr_hi_pps = 0, pdr_hi_pps = 0;        // lowest rate that failed (0: none did)
  bool harness_bound = false;                    // no trial failed: the generator is the limit
  unsigned trials = 0;
};

// mode ndr: the search; fixed: one trial at rate_pps; max: one trial at the
// generator's full speed.
SearchResult run_search(const Profile& p, const TrialFn& trial);

}  // namespace moat::bench
