// ike-load: the IKE scale benchmark's client. Opens N IKE SAs, one CHILD SA
// each, every one with its own identity (load-<i>@bench.moat), against one
// responder (Moat's moat-iked or moatd, or strongSwan's charon), keeping at
// most --window negotiations in flight, and reports IKE SAs established per
// second. Runs the Moat engine itself on kernel UDP sockets.
//
//   ike-load --target 192.0.2.2 --n 1000 [--window 64] [--psk S]
//            [--proposal aes128gcm16-prfsha256-x25519] [--timeout 60]
//            [--reconnect 0|1]
//
// Prints one JSON line per round: IKE and CHILD SAs, failures, wall seconds,
// SAs per second, retransmits and the client's own CPU seconds (when they
// approach the wall seconds, the client, not the responder, is the limit).
//
// --reconnect 1 (bench/ike-restart.sh): after the first round the client
// holds its SAs and waits (at most --timeout) for SIGUSR1, which says the
// portal restarted and lost them. Then, as moats whose liveness check found
// the portal gone, it forgets every IKE SA (a fresh engine, the same
// tunnels, so each IKE_AUTH carries INITIAL_CONTACT) and re-initiates all N,
// again at most --window in flight; the second line's seconds run from the
// signal until the last CHILD SA is up. How long a real moat takes to notice
// (its dpd: setting plus retransmissions) is not part of this figure.
#include <signal.h>
#include <sys/resource.h>

#include <fmt/format.h>

#include <atomic>
#include <memory>
#include <string>

#include "ctrl/ike/engine.hh"
#include "ctrl/ike/udp_driver.hh"

using namespace moat::ike;

namespace {

std::atomic<bool> g_portal_restarted{false};

struct CountingSink : ChildSaSink {
  uint64_t installed = 0;
  void install(const ChildSa&) override { ++installed; }
  void remove(const ChildSa&) override {}
  void rekeyed(const ChildSa&, const ChildSa&) override {}
};

struct Options {
  std::string target, psk = "moat-bench-pre-shared-key-0123456789", proposal = "aes128gcm16-prfsha256-x25519";
  unsigned n = 100, window = 64, timeout_s = 60;
  bool reconnect = false;
};

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

std::vector<PeerConfig> make_peers(const Options& o, const IpAddr& target, const std::vector<Proposal>& props) {
  std::vector<PeerConfig> peers;
  auto esp = *parse_proposals("aes128gcm16", kProtoEsp);
  for (unsigned i = 0; i < o.n; ++i) {
    PeerConfig p;
    p.name = fmt::format("load-{}", i);
    p.local_id = *Identity::parse(fmt::format("load-{}@bench.moat", i));
    p.remote_id = *Identity::parse("responder.bench.moat");
    p.psk = to_bytes(o.psk);
    p.ike_proposals = props;
    p.esp_proposals = esp;
    p.local_ts = {TrafficSelector::from_prefix(IpAddr::v4(0x0a000000 + (i << 8)), 24)};
    p.remote_ts = {TrafficSelector::from_prefix(IpAddr::v4(0xac100000), 12)};
    p.remote = Endpoint{target, kIkePort};
    p.ike_rekey_s = 0;
    peers.push_back(std::move(p));
  }
  return peers;
}

// One round: initiates every tunnel, at most `window` in flight, until each
// has its CHILD SA or failed, or the time is up. Prints the round's line.
bool run_round(const char* phase, const Options& o, UdpDriver& drv, std::vector<PeerConfig> peers,
               uint64_t t0) {
  CountingSink sink;
  EngineOptions eo;
  eo.retransmit_base_ms = 2000;
  eo.retransmit_tries = 3;
  // Only what goes wrong is worth printing at this rate.
  uint64_t other_failures = 0;
  Engine eng(drv, sink, eo, [&](const std::string& s) {
    if (s.find("established") != std::string::npos || s.find("installed") != std::string::npos ||
        s.find("initiating") != std::string::npos)
      return;
    ++other_failures;
    if (other_failures <= 20) fmt::print(stderr, "ike-load: {}: {}\n", phase, s);
  });
  drv.attach(&eng);
  double cpu0 = cpu_seconds();
  eng.set_peers(std::move(peers), UdpDriver::now_ms());
  unsigned next = 0;
  auto failed = [&] {
    auto& s = eng.stats();
    return s.ike_deleted + s.child_failed;
  };
  std::vector<std::string> names;
  for (unsigned i = 0; i < o.n; ++i) names.push_back(fmt::format("load-{}", i));
  const uint64_t n = o.n;
  while (sink.installed + failed() < n && UdpDriver::now_ms() < t0 + uint64_t(o.timeout_s) * 1000) {
    while (next < n && next - sink.installed - failed() < o.window) (void)eng.initiate(names[next++], UdpDriver::now_ms());
    drv.run_once(5);
  }
  double secs = double(UdpDriver::now_ms() - t0) / 1000.0;
  if (sink.installed + failed() < n)  // what is stuck, for whoever looks into it
    for (auto& sa : eng.show(UdpDriver::now_ms()))
      if (sa["state"] != "ESTABLISHED") fmt::print(stderr, "ike-load: {}: unfinished: {}\n", phase, sa.dump());
  fmt::print("{{\"phase\": \"{}\", \"ike_sas\": {}, \"child_sas\": {}, \"failed\": {}, \"seconds\": {:.3f}, "
             "\"per_second\": {:.1f}, \"retransmits\": {}, \"client_cpu_seconds\": {:.2f}}}\n",
             phase, eng.stats().ike_established, sink.installed, failed(), secs, double(sink.installed) / secs,
             eng.stats().tx_retransmits, cpu_seconds() - cpu0);
  fflush(stdout);
  if (o.reconnect && std::string(phase) == "establish") {
    // Hold the SAs (the moats are up) until the portal restarts.
    uint64_t until = UdpDriver::now_ms() + uint64_t(o.timeout_s) * 1000;
    while (!g_portal_restarted && UdpDriver::now_ms() < until) drv.run_once(50);
  }
  drv.attach(nullptr);
  return sink.installed == n;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i], v = argv[i + 1];
    if (a == "--target") o.target = v;
    else if (a == "--n") o.n = unsigned(std::stoul(v));
    else if (a == "--window") o.window = unsigned(std::stoul(v));
    else if (a == "--psk") o.psk = v;
    else if (a == "--proposal") o.proposal = v;
    else if (a == "--timeout") o.timeout_s = unsigned(std::stoul(v));
    else if (a == "--reconnect") o.reconnect = v == "1";
    else {
      fmt::print(stderr, "ike-load: unknown option {}\n", a);
      return 2;
    }
  }
  auto addr = IpAddr::parse(o.target);
  auto props = parse_proposals(o.proposal, kProtoIke);
  if (!addr || !props || o.n == 0 || o.window == 0) {
    fmt::print(stderr,
               "usage: ike-load --target ADDR [--n N] [--window W] [--psk S] [--proposal P] [--timeout S] "
               "[--reconnect 0|1]\n");
    return 2;
  }
  struct sigaction sa {};
  sa.sa_handler = [](int) { g_portal_restarted = true; };
  sigaction(SIGUSR1, &sa, nullptr);
  UdpDriver drv;
  if (auto ok = drv.open(std::nullopt); !ok) {
    fmt::print(stderr, "ike-load: {}\n", ok.error());
    return 1;
  }
  uint64_t t0 = UdpDriver::now_ms();
  bool ok = run_round("establish", o, drv, make_peers(o, *addr, *props), t0);
  if (!o.reconnect) return ok ? 0 : 1;
  if (!g_portal_restarted) {
    fmt::print(stderr, "ike-load: no SIGUSR1 (portal restarted) within {} s\n", o.timeout_s);
    return 1;
  }
  // The signal's moment is the round's start: the engine above is gone with
  // its SAs, as a moat's after its liveness check gave the portal up.
  t0 = UdpDriver::now_ms();
  return run_round("reconnect", o, drv, make_peers(o, *addr, *props), t0) && ok ? 0 : 1;
}
