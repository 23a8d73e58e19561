// The unified classifier's cost (issue 3, seed 003 §6.2), each figure a ratio
// measured in one run:
//  - BM_Classify4/N   one rte_acl lookup answering four tables of N rules each
//  - BM_Classify1/N   the same 4N rules in a single category (the cost of one
//                     table's lookup over the same rules): goal 4/1 ≤ 1.3
//  - BM_Linear/N      the four tables by first-match linear search, what the
//                     seed describes: the factor the unified lookup wins by
//  - BM_Build/N       rte_acl build time (N = 10,000: 40,000 rules, goal ≤ 1.5 s)
//  - BM_Classify4DuringRebuild  BM_Classify4/10000 while another thread keeps
//                     rebuilding 40,000 rules: goal ≥ 0.95 of BM_Classify4/10000
//   build/bench/bench_classifier --benchmark_format=json
#include <benchmark/benchmark.h>
#include <rte_eal.h>

#include <pthread.h>

#include <atomic>
#include <map>
#include <thread>

#include "classifier/acl.hh"
#include "classifier/synth.hh"

using namespace moat;

namespace {

constexpr unsigned kFlows = 4096;
constexpr unsigned kBurst = 64;

struct Fixture {
  RuleSet rs;
  std::unique_ptr<Classifier> four, one;
  std::vector<FlowKey> flows;
  std::vector<AclKey> keys;
  std::vector<const AclKey*> ptrs;
};

Fixture& fixture(unsigned per_table) {
  static std::map<unsigned, std::unique_ptr<Fixture>> cache;
  auto& f = cache[per_table];
  if (!f) {
    f = std::make_unique<Fixture>();
    synth::Rng g(per_table);
    f->rs = synth::portal_rules(g, per_table);
    f->four = std::move(compile(f->rs, 2 * per_table).value());
    f->one = std::move(compile(f->rs, 2 * per_table + 1, CompileOptions{.categories = 1}).value());
    for (unsigned i = 0; i < kFlows; i++) f->flows.push_back(synth::flow(g));
    for (auto& k : f->flows) f->keys.push_back(acl_key(k));
    for (auto& k : f->keys) f->ptrs.push_back(&k);
  }
  return *f;
}

void run_classify(benchmark::State& st, const Classifier& c, Fixture& f) {
  uint32_t res[kBurst * kTables];
  unsigned at = 0;
  for (auto _ : st) {
    classify(c, f.ptrs.data() + at, kBurst, res);
    benchmark::DoNotOptimize(res);
    at = (at + kBurst) % kFlows;
  }
  st.SetItemsProcessed(st.iterations() * kBurst);
}

void BM_Classify4(benchmark::State& st) {
  Fixture& f = fixture(unsigned(st.range(0)));
  run_classify(st, *f.four, f);
}

void BM_Classify1(benchmark::State& st) {
  Fixture& f = fixture(unsigned(st.range(0)));
  run_classify(st, *f.one, f);
}

void BM_Linear(benchmark::State& st) {
  Fixture& f = fixture(unsigned(st.range(0)));
  uint32_t res[kTables];
  unsigned at = 0;
  for (auto _ : st) {
    match_linear(f.rs, f.flows[at], res);
    benchmark::DoNotOptimize(res);
    at = (at + 1) % kFlows;
  }
  st.SetItemsProcessed(st.iterations());
}

void BM_Build(benchmark::State& st) {
  Fixture& f = fixture(unsigned(st.range(0)));
  uint64_t gen = 1000000;
  for (auto _ : st) {
    auto c = compile(f.rs, gen++);
    if (!c) st.SkipWithError(c.error().c_str());
    benchmark::DoNotOptimize(c);
  }
  st.counters["rules"] = double(f.four->acl_rules);
}

void BM_Classify4DuringRebuild(benchmark::State& st) {
  Fixture& f = fixture(10000);
  std::atomic<bool> stop{false};
  std::atomic<unsigned> builds{0};
  // The control thread's job, on the other core: rebuild continuously.
  std::thread rebuild([&] {
    // EAL pinned this process's main thread to CPU 0 and threads inherit it:
    // the control thread has a core of its own in moatd, so give it one here.
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    CPU_SET(1, &cpus);
    pthread_setaffinity_np(pthread_self(), sizeof(cpus), &cpus);
    uint64_t gen = 2000000;
    while (!stop.load()) {
      auto c = compile(f.rs, gen++);
      builds++;
    }
  });
  run_classify(st, *f.four, f);
  stop = true;
  rebuild.join();
  st.counters["rebuilds"] = double(builds.load());
}

BENCHMARK(BM_Classify4)->Arg(10)->Arg(1000)->Arg(10000);
BENCHMARK(BM_Classify1)->Arg(10)->Arg(1000)->Arg(10000);
BENCHMARK(BM_Linear)->Arg(10)->Arg(1000)->Arg(10000);
BENCHMARK(BM_Build)->Arg(10000)->Unit(benchmark::kMillisecond)->Iterations(3);
BENCHMARK(BM_Classify4DuringRebuild)->MinTime(3.0)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  const char* eal[] = {"bench_classifier", "--no-huge", "-m", "2048", "--no-pci", "--no-shconf", "-l", "0", "--log-level", "*:error"};
  if (rte_eal_init(sizeof(eal) / sizeof(eal[0]), const_cast<char**>(eal)) < 0) return 1;
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
