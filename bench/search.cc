#include "bench/search.hh"

#include <fmt/format.h>

#include <algorithm>

namespace moat::bench {

namespace {

struct Bracket {
  double lo = 0, hi = 0;  // lo passed (0: nothing yet), hi failed (0: nothing yet)
  bool passed = false, failed = false;
  void pass(double r) {
    if (!passed || r > lo) lo = r;
    passed = true;
  }
  void fail(double r) {
    if (!failed || r < hi) hi = r;
    failed = true;
  }
  // Closed when the gap is within the resolution, or when even the lowest
  // allowed rate failed.
  bool closed(double resolution, double min_rate) const {
    if (!failed) return true;  // nothing failed: the top rate passed
    if (hi <= min_rate) return true;
    const double l = passed ? lo : 0;
    return hi - l <= resolution * hi;
  }
  double next(double min_rate) const { return std::max(min_rate, ((passed ? lo : 0) + hi) / 2); }
};

}  // namespace

SearchResult run_search(const Profile& p, const TrialFn& trial) {
  SearchResult res;
  auto run = [&](double rate, const char* purpose) {
    auto o = trial(rate, purpose);
    if (o) res.trials++;
    return o;
  };
  auto stopped = [&] {
    res.verdict = "stopped";
    res.notes.push_back("the time limit or a signal ended the run before the search finished");
    return res;
  };
  auto excess = [&](const Outcome& o) {
    res.verdict = "excess";
    res.notes.push_back(fmt::format("{}: no loss figure is meaningful", o.excess_why));
    return res;
  };

  if (p.mode != SearchMode::ndr) {
    auto o = run(p.mode == SearchMode::fixed ? p.rate_pps : 0, p.mode == SearchMode::fixed ? "fixed" : "max");
    if (!o) return stopped();
    if (o->excess) return excess(*o);
    if (o->offered && o->received == 0) {
      res.verdict = "no_forwarding";
      res.notes.push_back(fmt::format("nothing arrived at the sink: {} frames offered", o->offered));
    }
    if (o->loss() <= p.ndr_loss) res.ndr_pps = o->offered_pps;
    if (o->loss() <= p.pdr_loss) res.pdr_pps = o->offered_pps;
    return res;
  }

  // The top of the search: the profile's, or whatever the generator reaches.
  double top = p.max_rate_pps;
  auto first = run(top, top > 0 ? "top" : "max");
  if (!first) return stopped();
  if (first->excess) return excess(*first);
  if (top == 0) top = first->offered_pps;
  if (first->received == 0) {
    // Nothing at full speed: one look at the slowest rate allowed decides
    // between an overloaded router and one that forwards nothing at all.
    auto low = run(p.min_rate_pps, "confirm");
    if (!low) return stopped();
    if (low->excess) return excess(*low);
    if (low->received == 0) {
      res.verdict = "no_forwarding";
      res.notes.push_back(fmt::format("nothing arrived at the sink, neither at {:.0f} pps nor at {:.0f} pps",
                                      first->offered_pps, low->offered_pps));
      res.ndr_hi_pps = res.pdr_hi_pps = low->offered_pps;
      return res;
    }
    first = low;
  }

  const bool pushed_back = first->pushed_back;
  if (pushed_back) {
    // The link pushed back: no frame was lost because none was dropped, the
    // generator waited. What the router carries without loss is found at
    // fixed rates, where a refused frame is a lost one, starting from there.
    res.notes.push_back(fmt::format("the link pushed back at {:.0f} pps (max rate): the search runs at fixed rates "
                                    "below that",
                                    top));
    auto o = run(top, "top");
    if (!o) return stopped();
    if (o->excess) return excess(*o);
    first = o;
  }
  Bracket ndr, pdr;
  auto classify = [&](const Outcome& o) {
    const double r = o.offered_pps, loss = o.loss();
    if (loss <= p.ndr_loss) ndr.pass(r);
    else ndr.fail(r);
    if (loss <= p.pdr_loss) pdr.pass(r);
    else pdr.fail(r);
  };
  classify(*first);
  if (!ndr.failed && !pdr.failed && !pushed_back) {
    res.harness_bound = true;
    res.notes.push_back(fmt::format("no loss at {:.0f} pps, the most the generator offered: the harness, not the "
                                    "router, is the limit here (NDR is at least this)",
                                    top));
  }
  while (res.trials < p.max_trials) {
    double r;
    if (!ndr.closed(p.resolution, p.min_rate_pps)) r = ndr.next(p.min_rate_pps);
    else if (!pdr.closed(p.resolution, p.min_rate_pps)) r = pdr.next(p.min_rate_pps);
    else break;
    auto o = run(r, "search");
    if (!o) return [&] {
      auto s = stopped();
      if (ndr.passed) s.ndr_pps = ndr.lo;
      if (pdr.passed) s.pdr_pps = pdr.lo;
      s.ndr_hi_pps = ndr.hi;
      s.pdr_hi_pps = pdr.hi;
      return s;
    }();
    if (o->excess) return excess(*o);
    classify(*o);
  }
  if (ndr.passed) res.ndr_pps = ndr.lo;
  if (pdr.passed) res.pdr_pps = pdr.lo;
  res.ndr_hi_pps = ndr.hi;
  res.pdr_hi_pps = pdr.hi;
  if (!ndr.closed(p.resolution, p.min_rate_pps) || !pdr.closed(p.resolution, p.min_rate_pps))
    res.notes.push_back(fmt::format("max_trials ({}) reached before the brackets closed to {:.1f} %", p.max_trials,
                                    p.resolution * 100));
  if (!ndr.passed)
    res.notes.push_back(fmt::format("loss at every rate tried, down to {:.0f} pps (min_rate_pps): NDR is below it",
                                    ndr.hi));
  return res;
}

}  // namespace moat::bench
