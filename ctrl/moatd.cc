// moatd: the Moat router daemon.
//   moatd --config FILE          run
//   moatd --config FILE --check  validate, print every error as file:line:col, exit 1 if any
#include <rte_eal.h>
#include <rte_errno.h>

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <string>
#include <vector>

#include "ctrl/config.hh"
#include "ctrl/control.hh"
#include "dataplane/eal_memory.hh"

namespace {

std::atomic<bool> g_stop{false};

void on_signal(int) { g_stop.store(true); }

int usage(const char* argv0, int rc) {
  fmt::print(rc ? stderr : stdout,
             "usage: {} --config FILE [--check]\n"
             "  --config FILE  the router's YAML configuration (docs/CONFIGURATION.md)\n"
             "  --check        validate FILE, print every error as file:line:col: what, and exit\n",
             argv0);
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  std::string path;
  bool check = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--config" && i + 1 < argc) path = argv[++i];
    else if (a == "--check") check = true;
    else if (a == "--help" || a == "-h") return usage(argv[0], 0);
    else return usage(argv[0], 64);
  }
  if (path.empty()) return usage(argv[0], 64);

  using Clock = std::chrono::steady_clock;
  auto secs = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
  const auto t_begin = Clock::now();
  std::vector<moat::ConfigError> errors;
  moat::Config cfg = moat::load_config(path, errors);
  const auto t_config = Clock::now();
  for (auto& e : errors) fmt::print(stderr, "{}\n", e.str());
  if (!errors.empty()) {
    fmt::print(stderr, "{}: {} error{}\n", path, errors.size(), errors.size() == 1 ? "" : "s");
    return 1;
  }
  if (check) {
    fmt::print("{}: OK ({} ports, {} routes, {} workers)\n", path, cfg.ports.size(), cfg.routes.size(), cfg.workers());
    return 0;
  }

  std::vector<std::string> args = moat::eal_args(cfg, argv[0]);
  std::vector<char*> cargs;
  for (auto& s : args) cargs.push_back(s.data());
  if (rte_eal_init(int(cargs.size()), cargs.data()) < 0) {
    fmt::print(stderr, "moatd: EAL initialisation failed: {} (EAL arguments from {}:", rte_strerror(rte_errno), path);
    for (auto& s : args) fmt::print(stderr, " {}", s);
    fmt::print(stderr, ")\n");
    return 1;
  }
  if (auto pinned = moat::pin_eal_memory(); !pinned)
    fmt::print(stderr, "moatd: warning: {}: the workers may take page faults\n", pinned.error());
  const auto t_eal = Clock::now();
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);

  int rc = 0;
  {
    moat::Control ctl(std::move(cfg));
    if (auto ok = ctl.start(); !ok) {
      fmt::print(stderr, "moatd: {}\n", ok.error());
      rc = 1;
    } else {
      // Where the start went (a portal with thousands of tunnel files
      // restarts in this time before its moats can come back).
      const auto t_ready = Clock::now();
      fmt::print("moatd: running ({}): started in {:.3f} s: config {:.3f} s, EAL {:.3f} s, tables, ports "
                 "and {} IKE tunnels {:.3f} s (their files {:.3f} s)\n",
                 path, secs(t_begin, t_ready), secs(t_begin, t_config), secs(t_config, t_eal), ctl.ike_tunnels(),
                 secs(t_eal, t_ready), ctl.tunnel_files_seconds());
      std::fflush(stdout);
      ctl.run(g_stop);
      fmt::print("moatd: stopping\n");
    }
    ctl.shutdown();
  }
  rte_eal_cleanup();
  return rc;
}
