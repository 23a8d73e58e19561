#pragma once
// A moat-bench traffic profile (YAML): which ports, what traffic, how to
// search. docs/PERFORMANCE.md documents every key; bench/profiles/ has
// examples. Loading collects every error with its file:line:col and never
// stops at the first one; unknown keys are errors (a typo must not silently
// mean a default).
// Owner: the main lcore, before any trial starts; read-only afterwards.
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ctrl/place_error.hh"

namespace moat::bench {

// Frame sizes count the Ethernet frame *including* its 4-byte FCS, as
// RFC 2544 does; virtual devices carry no FCS, so an mbuf holds size - 4.
constexpr unsigned kFcsBytes = 4;
constexpr unsigned kL1Overhead = 20;  // preamble + SFD (8) + inter-frame gap (12)
constexpr unsigned kMinFrame = 64, kMaxFrame = 1518;
constexpr unsigned kMaxFlows = 1u << 20;
constexpr unsigned kEthBytes = 14, kIpv4Bytes = 20, kUdpBytes = 8, kTcpBytes = 20;
// UDP carries the stamp (sequence + timestamp, 8 bytes) in its payload; TCP
// in its sequence and acknowledgement fields, so a 64-byte TCP frame fits.
constexpr unsigned kStampBytes = 8;
// ESP in tunnel mode, AES-GCM-128: outer IPv4, SPI + sequence, 8-byte IV,
// pad length + next header, 16-byte ICV (RFC 4106).
constexpr unsigned kEspHdrBytes = 8, kEspIvBytes = 8, kEspTrailerBytes = 2, kEspIcvBytes = 16;

using ProfileError = PlaceError;  // file:line:col: what

struct PortSpec {
  std::string name;
  std::string device;  // devargs: "net_memif0,..." is a vdev, anything else a PCI/bus address
  std::optional<std::array<uint8_t, 6>> mac;
};

struct SizeSlot {
  unsigned size = 0;   // frame incl. FCS
  unsigned weight = 1;
};

// One entry of the size series: a fixed size, or a mix (IMIX) sent in one
// trial. A list of sizes in the profile gives one entry per size, searched
// one after the other as RFC 2544 does.
struct SizeSeries {
  std::string label;             // "64", "imix"
  std::vector<SizeSlot> mix;     // one slot for a fixed size
};

struct Range {
  uint32_t first = 0, count = 1;  // host order; count >= 1
};

struct DscpSlot {
  uint8_t dscp = 0;
  unsigned weight = 1;
};

enum class Protocol { udp, tcp };
enum class SearchMode { ndr, fixed, max };
enum class EspDirection { none, inbound, outbound };

// Tunnel traffic. inbound: the generator sends ESP (tunnel mode) for `sas`
// SAs, sequence numbers increasing per SA, and the sink expects the inner
// cleartext. outbound: the generator sends cleartext spread over the SAs'
// selectors (flow f belongs to SA f % sas) and the sink expects ESP.
// One SA taken from a moatd configuration (EspSpec::moat_config).
struct EspSaSpec {
  std::string tunnel;  // the moatd tunnel it came from, for messages
  uint32_t spi = 0, outer_src = 0, outer_dst = 0;
  std::vector<uint8_t> key;  // 20 bytes: AES-128 key + salt
};

struct EspSpec {
  EspDirection direction = EspDirection::none;
  // moatd's configuration file whose static SAs to use: SA i is the i-th
  // tunnel with an AES-GCM-128 SA for this direction (inbound: the
  // tunnel's `in` SA, from its peer to its local address; outbound: its
  // `out` SA). Then sas, spi, outer_src/dst and keys come from `list`.
  std::string moat_config;
  std::vector<EspSaSpec> list;
  unsigned sas = 1;
  uint32_t spi = 0x1000;           // SA i has SPI spi + i
  uint32_t outer_src = 0, outer_dst = 0;  // SA i: outer_src + i -> outer_dst
  // 20 bytes each: AES-128 key + 4-byte salt (RFC 4106). One entry: every
  // SA uses it; otherwise exactly one per SA.
  std::vector<std::vector<uint8_t>> keys;
  unsigned verify_every = 1024;    // sink decrypts one packet in this many
};

struct Profile {
  std::string path;
  std::vector<PortSpec> ports;
  std::string gen_port, sink_port;
  unsigned gen_lcore = 0, sink_lcore = 0;
  unsigned memory_mb = 512;
  bool no_huge = true;  // virtual devices need no hugepages; real NICs usually do
  std::string file_prefix = "moat-bench";
  std::vector<std::string> eal_args;

  Protocol protocol = Protocol::udp;
  std::vector<SizeSeries> sizes{{"64", {{64, 1}}}};
  unsigned flows = 256;
  std::array<uint8_t, 6> dst_mac{0x02, 0, 0, 0, 0x0a, 0x01};
  Range src_ip{0x0a000102, 1}, dst_ip{0x0a000202, 1}, src_port{1024, 64512}, dst_port{9, 1};
  std::vector<DscpSlot> dscp{{0, 1}};
  uint8_t ttl = 64;
  EspSpec esp;

  double duration_s = 2, warmup_s = 0.5, drain_s = 0.5, link_timeout_s = 10;
  // Set: after the links are up, the first trial waits (within
  // link_timeout_s) until this file exists: the router under test may bring
  // its links up before it forwards (moatd starts its ports before its
  // tables and workers), and a trial then would measure its start-up.
  std::string ready_file;

  SearchMode mode = SearchMode::ndr;
  double rate_pps = 0;        // fixed mode
  double max_rate_pps = 0;    // search ceiling; 0: measured by a max-rate trial first
  double min_rate_pps = 1000; // below this the search gives up: NDR 0
  double ndr_loss = 0;        // fraction of offered frames
  double pdr_loss = 0.001;
  double resolution = 0.01;   // stop when (hi - lo) / hi <= resolution
  unsigned max_trials = 16;   // per size
  double time_limit_s = 300;  // the whole run; the watchdog ends the process soon after
};

// Every frame's bytes before the stamp's end, by protocol, plus the FCS:
// the smallest size the profile may ask for.
unsigned min_frame_for(const Profile& p);

struct LoadResult {
  std::optional<Profile> profile;
  std::vector<ProfileError> errors;
};

LoadResult load_profile(const std::string& path);
// For tests and --set: the same checks on YAML text, reported as `name`.
LoadResult load_profile_text(const std::string& text, const std::string& name);

}  // namespace moat::bench
