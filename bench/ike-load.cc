// ike-load: the IKE scale benchmark's client. Opens N IKE SAs, one CHILD SA
// each, every one with its own identity (load-<i>@bench.moat), against one
// responder (Moat's moat-iked or strongSwan's charon), keeping at most
// --window negotiations in flight, and reports IKE SAs established per
// second. Runs the Moat engine itself on kernel UDP sockets.
//
//   ike-load --target 192.0.2.2 --n 1000 [--window 64] [--psk S]
//            [--proposal aes128gcm16-prfsha256-x25519] [--timeout 60]
#include <fmt/format.h>

#include <string>

#include "ctrl/ike/engine.hh"
#include "ctrl/ike/udp_driver.hh"

using namespace moat::ike;

namespace {
struct CountingSink : ChildSaSink {
  uint64_t installed = 0;
  void install(const ChildSa&) override { ++installed; }
  void remove(const ChildSa&) override {}
  void rekeyed(const ChildSa&, const ChildSa&) override {}
};
}  // namespace

int main(int argc, char** argv) {
  std::string target, psk = "moat-bench-pre-shared-key-0123456789", proposal = "aes128gcm16-prfsha256-x25519";
  unsigned n = 100, window = 64, timeout_s = 60;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i], v = argv[i + 1];
    if (a == "--target") target = v;
    else if (a == "--n") n = unsigned(std::stoul(v));
    else if (a == "--window") window = unsigned(std::stoul(v));
    else if (a == "--psk") psk = v;
    else if (a == "--proposal") proposal = v;
    else if (a == "--timeout") timeout_s = unsigned(std::stoul(v));
    else {
      fmt::print(stderr, "ike-load: unknown option {}\n", a);
      return 2;
    }
  }
  auto addr = IpAddr::parse(target);
  auto props = parse_proposals(proposal, kProtoIke);
  if (!addr || !props) {
    fmt::print(stderr, "usage: ike-load --target ADDR [--n N] [--window W] [--psk S] [--proposal P] [--timeout S]\n");
    return 2;
  }
  std::vector<PeerConfig> peers;
  for (unsigned i = 0; i < n; ++i) {
    PeerConfig p;
    p.name = fmt::format("load-{}", i);
    p.local_id = *Identity::parse(fmt::format("load-{}@bench.moat", i));
    p.remote_id = *Identity::parse("responder.bench.moat");
    p.psk = to_bytes(psk);
    p.ike_proposals = *props;
    p.esp_proposals = *parse_proposals("aes128gcm16", kProtoEsp);
    p.local_ts = {TrafficSelector::from_prefix(IpAddr::v4(0x0a000000 + (i << 8)), 24)};
    p.remote_ts = {TrafficSelector::from_prefix(IpAddr::v4(0xac100000), 12)};
    p.remote = Endpoint{*addr, kIkePort};
    p.ike_rekey_s = 0;
    peers.push_back(std::move(p));
  }
  CountingSink sink;
  UdpDriver drv;
  if (auto ok = drv.open(std::nullopt); !ok) {
    fmt::print(stderr, "ike-load: {}\n", ok.error());
    return 1;
  }
  EngineOptions o;
  o.retransmit_base_ms = 2000;
  o.retransmit_tries = 3;
  // Only what goes wrong is worth printing at this rate.
  uint64_t other_failures = 0;
  Engine eng(drv, sink, o, [&](const std::string& s) {
    if (s.find("established") != std::string::npos || s.find("installed") != std::string::npos ||
        s.find("initiating") != std::string::npos)
      return;
    ++other_failures;
    if (other_failures <= 20) fmt::print(stderr, "ike-load: {}\n", s);
  });
  drv.attach(&eng);
  uint64_t t0 = UdpDriver::now_ms();
  eng.set_peers(std::move(peers), t0);
  unsigned next = 0;
  auto failed = [&] {
    auto& s = eng.stats();
    return s.ike_deleted + s.child_failed;
  };
  while (sink.installed + failed() < n && UdpDriver::now_ms() < t0 + uint64_t(timeout_s) * 1000) {
    while (next < n && next - sink.installed - failed() < window) (void)eng.initiate(fmt::format("load-{}", next++), UdpDriver::now_ms());
    drv.run_once(5);
  }
  double secs = double(UdpDriver::now_ms() - t0) / 1000.0;
  if (sink.installed + failed() < n)  // what is stuck, for whoever looks into it
    for (auto& sa : eng.show(UdpDriver::now_ms()))
      if (sa["state"] != "ESTABLISHED") fmt::print(stderr, "ike-load: unfinished: {}\n", sa.dump());
  fmt::print("{{\"ike_sas\": {}, \"child_sas\": {}, \"failed\": {}, \"seconds\": {:.3f}, \"per_second\": {:.1f}, "
             "\"retransmits\": {}}}\n",
             eng.stats().ike_established, sink.installed, failed(), secs, double(sink.installed) / secs,
             eng.stats().tx_retransmits);
  return sink.installed == n ? 0 : 1;
}
