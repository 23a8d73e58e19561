// moat-iked: the IKEv2 engine on kernel UDP sockets, outside moatd. For
// interop tests in network namespaces and for the scale benchmark; in
// production the engine runs in moatd's control thread.
//
//   moat-iked --dir moats.d [--bind ADDR] [--sa-log FILE] [--show FILE]
//             [--retransmit-ms N] [--retransmit-tries N] [--fragment-size N]
//
// --sa-log: one JSON line per ChildSaSink call (install/remove/rekeyed/moved)
//           with SPIs and keys, so tests can compare them with the peer's.
// Signals: USR1 rekeys every CHILD SA; HUP every IKE SA; USR2 writes `show` and the counters
// to --show; TERM/INT deletes the IKE SAs (bounded wait) and exits.
#include <signal.h>

#include <fmt/format.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "ctrl/ike/config.hh"
#include "ctrl/ike/engine.hh"
#include "ctrl/ike/udp_driver.hh"

using namespace moat::ike;

namespace {

std::atomic<int> g_term{0}, g_usr1{0}, g_usr2{0}, g_hup{0};

class LogSink : public ChildSaSink {
 public:
  explicit LogSink(FILE* f) : f_(f) {}
  void install(const ChildSa& sa) override { write("install", sa); }
  void remove(const ChildSa& sa) override { write("remove", sa); }
  void rekeyed(const ChildSa& old, const ChildSa& now) override {
    if (!f_) return;
    nlohmann::ordered_json j = describe("rekeyed", now);
    j["old_spi_in"] = fmt::format("{:08x}", old.spi_in);
    j["old_spi_out"] = fmt::format("{:08x}", old.spi_out);
    emit(j);
  }
  void moved(const ChildSa& sa) override { write("moved", sa); }

 private:
  static nlohmann::ordered_json describe(const char* ev, const ChildSa& sa) {
    nlohmann::ordered_json j;
    j["event"] = ev;
    j["tunnel"] = sa.tunnel;
    j["peer_id"] = sa.peer_id.str();
    j["spi_in"] = fmt::format("{:08x}", sa.spi_in);
    j["spi_out"] = fmt::format("{:08x}", sa.spi_out);
    j["proposal"] = sa.suite.str();
    j["encr_key_in"] = hex(sa.encr_key_in);
    j["integ_key_in"] = hex(sa.integ_key_in);
    j["encr_key_out"] = hex(sa.encr_key_out);
    j["integ_key_out"] = hex(sa.integ_key_out);
    j["local"] = sa.local.str();
    j["remote"] = sa.remote.str();
    j["udp_encap"] = sa.udp_encap;
    auto ts = [](auto& v) {
      auto a = nlohmann::ordered_json::array();
      for (auto& t : v) a.push_back(t.str());
      return a;
    };
    j["local_ts"] = ts(sa.local_ts);
    j["remote_ts"] = ts(sa.remote_ts);
    return j;
  }
  // Without --sa-log nothing is built: the JSON cost a few per cent of the
  // responder's time per SA in the scale benchmark.
  void write(const char* ev, const ChildSa& sa) {
    if (f_) emit(describe(ev, sa));
  }
  void emit(const nlohmann::ordered_json& j) {
    if (!f_) return;
    fmt::print(f_, "{}\n", j.dump());
    fflush(f_);
  }
  FILE* f_;
};

void usage() {
  fmt::print(stderr,
             "usage: moat-iked --dir DIR [--bind ADDR] [--sa-log FILE] [--show FILE] [--retransmit-ms N] "
             "[--retransmit-tries N] [--fragment-size N]\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir, bind, sa_log, show;
  EngineOptions opts;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        usage();
        exit(2);
      }
      return argv[++i];
    };
    if (a == "--dir") dir = val();
    else if (a == "--bind") bind = val();
    else if (a == "--sa-log") sa_log = val();
    else if (a == "--show") show = val();
    else if (a == "--retransmit-ms") opts.retransmit_base_ms = uint32_t(std::stoul(val()));
    else if (a == "--retransmit-tries") opts.retransmit_tries = uint32_t(std::stoul(val()));
    else if (a == "--fragment-size") opts.fragment_size = uint32_t(std::stoul(val()));
    else {
      usage();
      return 2;
    }
  }
  if (dir.empty()) {
    usage();
    return 2;
  }
  setvbuf(stderr, nullptr, _IOLBF, 0);
  auto loaded = load_tunnel_dir(dir);
  for (auto& e : loaded.errors) fmt::print(stderr, "{}\n", e.str());
  fmt::print(stderr, "moat-iked: {} tunnels loaded from {}\n", loaded.tunnels.size(), dir);

  FILE* salog = sa_log.empty() ? nullptr : fopen(sa_log.c_str(), "a");
  LogSink sink(salog);
  UdpDriver drv;
  std::optional<IpAddr> baddr;
  if (!bind.empty()) {
    baddr = IpAddr::parse(bind);
    if (!baddr) {
      fmt::print(stderr, "moat-iked: --bind \"{}\" is not an address\n", bind);
      return 2;
    }
  }
  if (auto ok = drv.open(baddr); !ok) {
    fmt::print(stderr, "moat-iked: {}\n", ok.error());
    return 1;
  }
  Engine eng(drv, sink, opts, [](const std::string& s) { fmt::print(stderr, "ike: {}\n", s); });
  drv.attach(&eng);
  eng.set_peers(std::move(loaded.tunnels), UdpDriver::now_ms());

  struct sigaction sa {};
  sa.sa_handler = [](int s) {
    if (s == SIGUSR1) g_usr1 = 1;
    else if (s == SIGUSR2) g_usr2 = 1;
    else if (s == SIGHUP) g_hup = 1;
    else g_term = 1;
  };
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGUSR1, &sa, nullptr);
  sigaction(SIGUSR2, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);

  while (!g_term) {
    drv.run_once(200);
    if (g_usr1.exchange(0))
      for (auto& p : eng.peers())
        if (auto ok = eng.rekey_child(p->name, UdpDriver::now_ms()); !ok) fmt::print(stderr, "moat-iked: {}\n", ok.error());
    if (g_hup.exchange(0))
      for (auto& p : eng.peers())
        if (auto ok = eng.rekey_ike(p->name, UdpDriver::now_ms()); !ok) fmt::print(stderr, "moat-iked: {}\n", ok.error());
    if (g_usr2.exchange(0) && !show.empty()) {
      nlohmann::ordered_json j;
      j["ike_sas"] = eng.show(UdpDriver::now_ms());
      j["stats"] = eng.stats().json();
      std::ofstream(show + ".tmp") << j.dump(1) << "\n";
      rename((show + ".tmp").c_str(), show.c_str());
    }
  }
  // Say goodbye so the peers do not keep stale SAs (bounded: 2 s).
  for (auto& p : eng.peers()) (void)eng.terminate(p->name, UdpDriver::now_ms());
  uint64_t until = UdpDriver::now_ms() + 2000;
  while (eng.ike_sa_count() && UdpDriver::now_ms() < until) drv.run_once(100);
  if (salog) fclose(salog);
  return 0;
}
