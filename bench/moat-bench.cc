// moat-bench: the throughput harness. A generator and a sink on DPDK ports
// (any ethdev by its devargs), the router under test between them; RFC 2544
// searches for the no-drop and partial-drop rates, fixed-rate and max-rate
// trials; JSON results (bench/plot.py draws them). docs/PERFORMANCE.md is
// the manual.
//
//   moat-bench PROFILE.yaml [--output FILE] [--progress | --no-progress] [--check]
//
// Exit status: 0 the run completed (the JSON's verdicts say what the router
// did, including "forwarded nothing"); 2 usage, profile or EAL error; 3 the
// links did not come up within trial.link_timeout_s; 4 the time limit or a
// signal stopped the run early (the JSON holds every finished trial).
#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_version.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <fmt/format.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "bench/profile.hh"
#include "bench/search.hh"
#include "bench/trial.hh"
#include "bench/version.hh"

namespace moat::bench {
namespace {

using Json = nlohmann::ordered_json;

struct Cli {
  std::string profile, output;
  int progress = -1;  // -1: when stderr is a terminal
  bool check = false;
};

[[noreturn]] void usage(const std::string& why) {
  if (!why.empty()) fmt::print(stderr, "moat-bench: {}\n", why);
  fmt::print(stderr, "usage: moat-bench PROFILE.yaml [--output FILE] [--progress | --no-progress] [--check]\n");
  std::exit(2);
}

Cli parse_cli(int argc, char** argv) {
  Cli c;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      fmt::print("usage: moat-bench PROFILE.yaml [--output FILE] [--progress | --no-progress] [--check]\n"
                 "The profile format and the results are described in docs/PERFORMANCE.md.\n");
      std::exit(0);
    } else if (a == "--output" || a == "-o") {
      if (++i >= argc) usage(a + " needs a file name");
      c.output = argv[i];
    } else if (a == "--progress") {
      c.progress = 1;
    } else if (a == "--no-progress") {
      c.progress = 0;
    } else if (a == "--check") {
      c.check = true;
    } else if (!a.empty() && a[0] == '-') {
      usage("unknown option " + a);
    } else if (c.profile.empty()) {
      c.profile = a;
    } else {
      usage("one profile only");
    }
  }
  if (c.profile.empty()) usage("no profile given");
  return c;
}

void on_signal(int) { g_stop.store(true, std::memory_order_relaxed); }

// Last resort if EAL, a driver or a peer hangs: the run must always end.
void on_watchdog(int) {
  static const char kMsg[] = "moat-bench: watchdog expired (time_limit_s + 20 s), exiting\n";
  ssize_t r = write(STDERR_FILENO, kMsg, sizeof kMsg - 1);
  (void)r;
  _exit(124);
}

bool is_pci(const std::string& device) {
  const std::string name = device.substr(0, device.find(','));
  return name.find(':') != std::string::npos && name.find('.') != std::string::npos;
}

const char* mode_name(SearchMode m) {
  switch (m) {
    case SearchMode::ndr: return "ndr";
    case SearchMode::fixed: return "fixed";
    case SearchMode::max: return "max";
  }
  return "?";
}

Json profile_json(const Profile& p) {
  Json ports = Json::array();
  for (auto& ps : p.ports) {
    Json e{{"name", ps.name}, {"device", ps.device}};
    if (ps.mac) e["mac"] = mac_str(*ps.mac);
    ports.push_back(e);
  }
  Json sizes = Json::array();
  for (auto& s : p.sizes) {
    Json mix = Json::array();
    for (auto& slot : s.mix) mix.push_back({{"size", slot.size}, {"weight", slot.weight}});
    sizes.push_back({{"label", s.label}, {"mix", mix}});
  }
  auto range_ip = [](const Range& r) { return ipv4_str(r.first) + (r.count > 1 ? "-" + ipv4_str(r.first + r.count - 1) : ""); };
  auto range_port = [](const Range& r) {
    return r.count > 1 ? fmt::format("{}-{}", r.first, r.first + r.count - 1) : std::to_string(r.first);
  };
  Json dscp = Json::array();
  for (auto& d : p.dscp) dscp.push_back({{"value", d.dscp}, {"weight", d.weight}});
  Json j{{"path", p.path},
         {"ports", ports},
         {"generator", {{"port", p.gen_port}, {"lcore", p.gen_lcore}}},
         {"sink", {{"port", p.sink_port}, {"lcore", p.sink_lcore}}},
         {"eal", {{"memory_mb", p.memory_mb}, {"no_huge", p.no_huge}, {"file_prefix", p.file_prefix}, {"args", p.eal_args}}},
         {"traffic",
          {{"protocol", p.protocol == Protocol::udp ? "udp" : "tcp"},
           {"sizes", sizes},
           {"flows", p.flows},
           {"dst_mac", mac_str(p.dst_mac)},
           {"src_ip", range_ip(p.src_ip)},
           {"dst_ip", range_ip(p.dst_ip)},
           {"src_port", range_port(p.src_port)},
           {"dst_port", range_port(p.dst_port)},
           {"dscp", dscp},
           {"ttl", p.ttl}}},
         {"trial",
          {{"duration_s", p.duration_s}, {"warmup_s", p.warmup_s}, {"drain_s", p.drain_s}, {"link_timeout_s", p.link_timeout_s},
           {"ready_file", p.ready_file}}},
         {"search",
          {{"mode", mode_name(p.mode)},
           {"rate_pps", p.rate_pps},
           {"max_rate_pps", p.max_rate_pps},
           {"min_rate_pps", p.min_rate_pps},
           {"ndr_loss", p.ndr_loss},
           {"pdr_loss", p.pdr_loss},
           {"resolution", p.resolution},
           {"max_trials", p.max_trials}}},
         {"time_limit_s", p.time_limit_s}};
  if (p.esp.direction != EspDirection::none) {
    j["traffic"]["esp"] = {{"direction", p.esp.direction == EspDirection::inbound ? "inbound" : "outbound"},
                           {"sas", p.esp.sas},
                           {"spi", p.esp.spi},
                           {"outer_src", ipv4_str(p.esp.outer_src)},
                           {"outer_dst", ipv4_str(p.esp.outer_dst)},
                           {"keys", p.esp.keys.size()},
                           {"verify_every", p.esp.verify_every}};
    if (!p.esp.list.empty()) {
      // The SAs came from moatd's configuration: which file and tunnels,
      // never the keys.
      Json sas = Json::array();
      for (const auto& s : p.esp.list)
        sas.push_back({{"tunnel", s.tunnel}, {"spi", s.spi}, {"outer_src", ipv4_str(s.outer_src)},
                       {"outer_dst", ipv4_str(s.outer_dst)}});
      auto& e = j["traffic"]["esp"];
      e["moat_config"] = p.esp.moat_config;
      e["keys"] = p.esp.list.size();
      e.erase("spi"), e.erase("outer_src"), e.erase("outer_dst");
      e["list"] = std::move(sas);
    }
  }
  return j;
}

Json rates(uint64_t packets, uint64_t bytes, double secs) {
  if (secs <= 0) return {{"packets", packets}, {"pps", 0}, {"bps_l2", 0}, {"bps_l1", 0}};
  return {{"packets", packets},
          {"pps", double(packets) / secs},
          {"bps_l2", double(bytes) * 8 / secs},
          {"bps_l1", double(bytes + kL1Overhead * packets) * 8 / secs}};
}

Json trial_json(const Profile& p, const TrialResult& r) {
  Json lat{{"samples", r.latency.count()}};
  if (r.latency.count()) {
    lat["min"] = r.ns_of(r.latency.min());
    lat["mean"] = r.ns_of(double(r.latency.sum()) / double(r.latency.count()));
    lat["p50"] = r.ns_of(r.latency.quantile(0.5));
    lat["p90"] = r.ns_of(r.latency.quantile(0.9));
    lat["p99"] = r.ns_of(r.latency.quantile(0.99));
    lat["p999"] = r.ns_of(r.latency.quantile(0.999));
    lat["max"] = r.ns_of(r.latency.max());
    Json h = Json::array();
    for (unsigned i = 0; i < LatencyHist::kBuckets; i++)
      if (uint64_t c = r.latency.at(i))
        h.push_back({r.ns_of(double(LatencyHist::bucket_low(i))), r.ns_of(double(LatencyHist::bucket_high(i))), c});
    lat["histogram"] = h;  // [from_ns, to_ns, count], non-empty buckets only
  }
  return Json{{"index", r.spec.index},
              {"size", p.sizes[r.spec.series].label},
              {"purpose", r.spec.purpose},
              {"target_pps", r.spec.rate_pps},
              {"duration_s", r.duration_s},
              {"warmup_s", r.spec.warmup_s},
              {"drain_s", r.drain_s},
              {"offered", rates(r.offered, r.offered_bytes, r.duration_s)},
              {"received", rates(r.received, r.received_bytes, r.duration_s)},
              {"lost_packets", int64_t(r.offered) - int64_t(r.received)},
              {"loss", r.loss()},
              {"tx_accepted", r.accepted},
              {"tx_rejected", r.rejected},
              {"tx_late", r.late},
              {"tx_pushback", r.pushback},
              // The generator could not keep the pace (preempted, or the
              // rate is beyond it): the offered rate is below the target.
              {"generator_short", r.spec.rate_pps > 0 && double(r.late) > 0.001 * double(r.offered + r.late)},
              {"tx_alloc_failed", r.alloc_failed},
              {"latency_ns", lat},
              {"reordered", r.reordered},
              {"duplicates", r.duplicates},
              {"wrong_size", r.wrong_size},
              {"flows_seen", r.flows_seen},
              {"rx_ttl", r.rx_ttl},
              {"unexpected", {{"stale", r.stale}, {"foreign", r.foreign}, {"reflected", r.reflected}}},
              {"esp", {{"checked", r.esp_checked}, {"failed", r.esp_check_failed}, {"stale", r.esp_stale}}},
              {"verdict", r.verdict},
              {"interrupted", r.interrupted}};
}

Json port_json(const PortState& ps) {
  rte_eth_stats st{};
  rte_eth_stats_get(ps.id, &st);
  return {{"name", ps.name},           {"device", ps.device},       {"mac", mac_str(ps.mac)},
          {"mac_set", ps.mac_set},     {"ipackets", st.ipackets},   {"opackets", st.opackets},
          {"imissed", st.imissed},     {"ierrors", st.ierrors},     {"oerrors", st.oerrors},
          {"rx_nombuf", st.rx_nombuf}};
}

// The 1, 5 and 15-minute load averages: on a shared machine they say how
// far an absolute rate can be trusted.
std::string load_avg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char b[32];
  std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return b;
}

Json versions() {
  utsname u{};
  uname(&u);
  std::string model = "?";
  std::ifstream cpu("/proc/cpuinfo");
  for (std::string line; std::getline(cpu, line);)
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  return {{"moat", MOAT_GIT_REV},
          {"dpdk", rte_version()},
          {"kernel", fmt::format("{} {}", u.sysname, u.release)},
          {"machine", fmt::format("{} CPUs, {}", sysconf(_SC_NPROCESSORS_ONLN), model)},
          {"compiler", __VERSION__}};
}

// One line on stderr, rewritten in place on a terminal; one line a second
// otherwise (a log should not get four lines a second).
class Progress {
 public:
  Progress(bool on, double time_limit_s) : on_(on), tty_(isatty(STDERR_FILENO)), limit_(time_limit_s) {}
  void set_context(std::string s) { context_ = std::move(s); }
  void show(const TrialProgress& t, double elapsed_run_s) {
    if (!on_) return;
    if (!tty_) {
      if (elapsed_run_s < next_plain_) return;
      next_plain_ = elapsed_run_s + 1;
    }
    const double lost = t.offered ? std::max(0.0, double(int64_t(t.offered) - int64_t(t.received))) / double(t.offered) : 0;
    std::string rate = t.spec->rate_pps > 0 ? fmt::format("{:.3f} Mpps", t.spec->rate_pps / 1e6) : std::string("max rate");
    std::string line = fmt::format("{} trial {} ({}) at {}: {} {:.1f}/{:.1f} s, offered {}, loss so far {:.3f} %, "
                                   "time left {:.0f} s",
                                   context_, t.spec->index, t.spec->purpose, rate, t.phase, t.elapsed_s, t.phase_s,
                                   t.offered, lost * 100, std::max(0.0, limit_ - elapsed_run_s));
    if (tty_) fmt::print(stderr, "\r\033[K{}", line);
    else fmt::print(stderr, "{}\n", line);
    std::fflush(stderr);
    dirty_ = tty_;
  }
  // A finished trial gets a permanent line.
  void trial_done(const std::string& s) {
    if (!on_) return;
    if (dirty_) fmt::print(stderr, "\r\033[K");
    fmt::print(stderr, "{}\n", s);
    dirty_ = false;
  }

 private:
  bool on_, tty_;
  double limit_;
  std::string context_;
  double next_plain_ = 0;
  bool dirty_ = false;
};

void write_output(const std::string& path, const Json& doc) {
  if (path.empty()) return;
  // Written after every trial (temp + rename): even a run the watchdog ends
  // leaves every finished trial on disk.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    f << doc.dump(1) << "\n";
  }
  std::rename(tmp.c_str(), path.c_str());
}

int run(const Cli& cli) {
  const auto t_start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count(); };

  const std::string load_start = load_avg();
  LoadResult loaded = load_profile(cli.profile);
  for (auto& e : loaded.errors) fmt::print(stderr, "{}\n", e.str());
  if (!loaded.profile) {
    fmt::print(stderr, "moat-bench: {} error{} in the profile; nothing sent\n", loaded.errors.size(),
               loaded.errors.size() == 1 ? "" : "s");
    return 2;
  }
  const Profile& p = *loaded.profile;
  if (cli.check) {
    fmt::print("{}: ok\n", p.path);
    return 0;
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGALRM, on_watchdog);
  alarm(unsigned(p.time_limit_s) + 20);

  // EAL sees exactly the profile's ports: vdevs by --vdev, bus devices by
  // -a (and then only those), so nothing else can be sent to.
  std::vector<std::string> eal{"moat-bench"};
  eal.insert(eal.end(), {"-l", p.gen_lcore == p.sink_lcore ? std::to_string(p.gen_lcore)
                                                            : fmt::format("{},{}", p.gen_lcore, p.sink_lcore),
                         "--main-lcore", std::to_string(p.gen_lcore), "-m", std::to_string(p.memory_mb),
                         "--log-level", "*:error"});
  if (p.no_huge) eal.push_back("--no-huge");
  bool any_pci = false;
  for (auto& ps : p.ports) {
    if (is_pci(ps.device)) {
      eal.insert(eal.end(), {"-a", ps.device});
      any_pci = true;
    } else {
      eal.insert(eal.end(), {"--vdev", ps.device});
    }
  }
  if (!any_pci) eal.push_back("--no-pci");
  if (p.file_prefix.empty()) eal.push_back("--no-shconf");
  else eal.insert(eal.end(), {"--file-prefix", p.file_prefix});
  eal.insert(eal.end(), p.eal_args.begin(), p.eal_args.end());
  std::vector<char*> ea;
  for (auto& s : eal) ea.push_back(s.data());
  if (rte_eal_init(int(ea.size()), ea.data()) < 0) {
    fmt::print(stderr, "moat-bench: EAL: {}\n", rte_strerror(rte_errno));
    return 2;
  }

  std::string profile_text;
  {
    std::ifstream f(p.path);
    std::stringstream ss;
    ss << f.rdbuf();
    profile_text = ss.str();
  }
  // Results get shared; ESP keys must not travel with them.
  profile_text = std::regex_replace(profile_text, std::regex("(0x)?[0-9a-fA-F]{40}"), "<key>");
  Json doc{{"tool", "moat-bench"}, {"schema", 1}, {"started_utc", utc_now()}, {"versions", versions()},
           {"eal_args", eal},      {"profile", profile_json(p)}, {"profile_text", profile_text}};
  Json trials = Json::array(), results = Json::array();
  int status = 0;
  std::string status_text = "completed";
  // The ports are closed after the results are written: a crash in a
  // driver's teardown (memif's, once, with its peer still attached) must
  // not cost the run's final status.
  std::unique_ptr<Harness> harness;
  try {
    harness = std::make_unique<Harness>(p);
    Harness& h = *harness;
    doc["ports"] = {{"generator", port_json(h.gen_port())}, {"sink", port_json(h.sink_port())}};
    double waited = 0;
    const bool up = h.wait_links(&waited);
    doc["links"] = {{"up", up}, {"wait_s", waited}};
    if (!up) {
      status = 3;
      status_text = "link_down";
      doc["error"] = p.ready_file.empty() ? fmt::format("links not up after {} s", p.link_timeout_s)
                                          : fmt::format("links not up, or {} not there, after {} s", p.ready_file, p.link_timeout_s);
    } else {
      Progress progress(cli.progress == 1 || (cli.progress == -1 && isatty(STDERR_FILENO)), p.time_limit_s);
      unsigned index = 0;
      for (size_t si = 0; si < p.sizes.size() && status == 0; si++) {
        const SizeSeries& series = p.sizes[si];
        progress.set_context(fmt::format("[{} B, {}/{}]", series.label, si + 1, p.sizes.size()));
        std::vector<unsigned> indexes;
        std::map<double, unsigned> trial_at_rate;  // offered pps -> trial index
        bool first = true;
        TrialFn fn = [&](double rate, const std::string& purpose) -> std::optional<Outcome> {
          // Warm-up before the first trial of a size only: later trials
          // follow without a pause, and stale frames never count anyway.
          TrialSpec spec{index, si, rate, purpose, p.duration_s, first ? std::max(p.warmup_s, 0.0) : 0.0, p.drain_s};
          if (g_stop.load()) return std::nullopt;
          if (elapsed() + spec.warmup_s + spec.duration_s + spec.drain_s + 1 > p.time_limit_s) return std::nullopt;
          first = false;
          TrialResult r = h.run(spec, [&](const TrialProgress& t) { progress.show(t, elapsed()); });
          index++;
          Json tj = trial_json(p, r);
          trials.push_back(tj);
          indexes.push_back(spec.index);
          trial_at_rate[r.offered_pps()] = spec.index;
          progress.trial_done(fmt::format("{} trial {} ({}): offered {:.3f} Mpps, received {:.3f} Mpps, loss {:.4f} %, "
                                          "p99 {:.1f} us, {}",
                                          fmt::format("[{} B]", series.label), spec.index, purpose,
                                          r.offered_pps() / 1e6, r.received_pps() / 1e6, r.loss() * 100,
                                          tj["latency_ns"].value("p99", 0.0) / 1e3, r.verdict));
          doc["trials"] = trials;
          write_output(cli.output, doc);
          if (r.interrupted) return std::nullopt;
          Outcome o{r.offered_pps(), r.offered, r.received, r.verdict == "excess", r.pushback > 0, ""};
          if (r.received > r.accepted)
            o.excess_why = fmt::format("the sink received {} of our frames for {} sent (duplicates or a loop)",
                                       r.received, r.accepted);
          else if (o.excess)
            o.excess_why = fmt::format("the router flooded: {} frames came back on the generator's port and {} "
                                       "foreign frames reached the sink, for {} sent",
                                       r.reflected, r.foreign, r.accepted);
          return o;
        };
        SearchResult sr = run_search(p, fn);
        auto point = [&](const std::optional<double>& pps) -> Json {
          if (!pps) return nullptr;
          Json j{{"pps", *pps}};
          if (auto it = trial_at_rate.find(*pps); it != trial_at_rate.end()) {
            const Json& t = trials[it->second];
            j["trial"] = it->second;
            j["bps_l1"] = t["offered"]["bps_l1"];
            j["bps_l2"] = t["offered"]["bps_l2"];
            j["loss"] = t["loss"];
            j["latency_ns"] = Json{{"p50", t["latency_ns"].value("p50", 0.0)},
                                   {"p99", t["latency_ns"].value("p99", 0.0)},
                                   {"max", t["latency_ns"].value("max", 0.0)}};
          }
          return j;
        };
        Json mix = Json::array();
        for (auto& slot : series.mix) mix.push_back({{"size", slot.size}, {"weight", slot.weight}});
        results.push_back(Json{{"size", series.label},
                               {"mix", mix},
                               {"mode", mode_name(p.mode)},
                               {"verdict", sr.verdict},
                               {"ndr", point(sr.ndr_pps)},
                               {"pdr", point(sr.pdr_pps)},
                               {"ndr_failed_at_pps", sr.ndr_hi_pps > 0 ? Json(sr.ndr_hi_pps) : Json(nullptr)},
                               {"pdr_failed_at_pps", sr.pdr_hi_pps > 0 ? Json(sr.pdr_hi_pps) : Json(nullptr)},
                               {"harness_bound", sr.harness_bound},
                               {"notes", sr.notes},
                               {"trials", indexes}});
        doc["results"] = results;
        progress.trial_done(fmt::format("[{} B] {}: NDR {} PDR {}{}", series.label, sr.verdict,
                                        sr.ndr_pps ? fmt::format("{:.3f} Mpps", *sr.ndr_pps / 1e6) : "none",
                                        sr.pdr_pps ? fmt::format("{:.3f} Mpps", *sr.pdr_pps / 1e6) : "none",
                                        sr.notes.empty() ? "" : " — " + sr.notes.front()));
        if (sr.verdict == "stopped") {
          status = 4;
          status_text = g_stop.load() ? "interrupted" : "time_limit";
        }
      }
    }
    doc["ports"] = {{"generator", port_json(h.gen_port())}, {"sink", port_json(h.sink_port())}};
  } catch (const std::exception& e) {
    fmt::print(stderr, "moat-bench: {}\n", e.what());
    doc["error"] = e.what();
    status = 2;
    status_text = "error";
  }
  doc["status"] = status_text;
  doc["elapsed_s"] = elapsed();
  doc["load_avg"] = {{"start", load_start}, {"end", load_avg()}};
  doc["results"] = results;
  doc["trials"] = trials;
  // Status and results first, for a reader of the raw file.
  Json out{{"tool", doc["tool"]}, {"schema", doc["schema"]}, {"status", doc["status"]}, {"results", doc["results"]}};
  for (auto& [k, v] : doc.items())
    if (!out.contains(k)) out[k] = v;
  write_output(cli.output, out);
  if (cli.output.empty()) fmt::print("{}\n", out.dump(1));
  std::fflush(stdout);
  harness.reset();
  rte_eal_cleanup();
  return status;
}

}  // namespace
}  // namespace moat::bench

int main(int argc, char** argv) {
  moat::bench::Cli cli = moat::bench::parse_cli(argc, argv);
  return moat::bench::run(cli);
}
