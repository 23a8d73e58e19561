#pragma once
// The one rule language (seed 003 §6.2): four tables — filter, NAT, SPD and
// QoS — whose rules all match on the same fields. The control thread builds a
// RuleSet from the config; classifier/acl.cc compiles every table into one
// rte_acl context so a packet is looked up once for all four.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moat {

enum class Table : uint8_t { filter = 0, nat = 1, spd = 2, qos = 3 };
inline constexpr unsigned kTables = 4;
inline constexpr const char* kTableNames[kTables] = {"filter", "nat", "spd", "qos"};

// Zone ids: 0 is the router itself ("local"); ports and tunnels name theirs.
inline constexpr uint8_t kZoneLocal = 0;
inline constexpr unsigned kMaxZones = 64;
// Port id 0xff in a key: the packet came from (or goes to) no port: a local
// service, the router itself, or a tunnel.
inline constexpr uint8_t kNoPortKey = 0xff;

struct Range16 {
  uint16_t lo = 0, hi = 0xffff;
  bool operator==(const Range16&) const = default;
};

struct PrefixMatch {
  uint32_t addr = 0;  // host order, host bits zero
  uint8_t len = 0;
};

// A rule's selectors. An empty list matches anything; a list matches any of
// its entries. For ICMP, `sport` holds the type range and `dport` the code
// range (the packet's key carries them in the port slots).
struct Match {
  std::vector<uint8_t> in_zones, out_zones;
  std::vector<uint8_t> in_ports, out_ports;
  std::vector<PrefixMatch> src, dst;
  std::vector<uint8_t> protos;
  std::vector<Range16> sports, dports;
  std::optional<uint8_t> dscp;  // 0-63
};

enum class FilterAction : uint8_t { accept, drop, reject };
enum class NatAction : uint8_t { none, masquerade, snat, dnat };
enum class SpdAction : uint8_t { bypass, discard, protect };

// What a rule (or a table's default) decides. Small and flat: the data path
// reads it by the rule index rte_acl returns.
struct Verdict {
  uint8_t action = 0;  // FilterAction / NatAction / SpdAction; qos: unused
  uint8_t flags = 0;   // kStateful (filter), kMarkDscp (qos)
  uint8_t dscp = 0;    // qos: DSCP to write when kMarkDscp
  uint8_t pad_ = 0;
  uint16_t port = 0;   // nat dnat: new destination port (0: keep)
  uint16_t cls = 0;    // qos: class id
  uint32_t a = 0;      // nat: snat pool first / dnat address; spd: tunnel id
  uint32_t b = 0;      // nat: snat pool last
  static constexpr uint8_t kStateful = 1, kMarkDscp = 2;
};

struct Rule {
  std::string name;  // optional, for counters and errors
  std::string file;
  int line = 0, col = 0;
  Match match;
  Verdict verdict;
};

struct RuleTable {
  std::vector<Rule> rules;  // first match wins
  Verdict deflt;            // when no rule matches
};

struct RuleSet {
  RuleTable table[kTables];
  std::vector<std::string> zones{"local"};  // index = zone id
  std::vector<std::string> classes{"default"};  // qos class ids
  std::vector<std::string> tunnels;          // spd tunnel ids
  std::vector<uint8_t> tunnel_zone;          // zone id per tunnel id
  bool empty() const {
    for (auto& t : table)
      if (!t.rules.empty()) return false;
    return true;
  }
};

// One packet as the classifier sees it (host order). Stages build it from the
// headers and the route; the reference matcher and tests use it directly.
struct FlowKey {
  uint8_t proto = 0, in_zone = 0, out_zone = 0, dscp = 0;
  uint32_t src = 0, dst = 0;
  uint16_t sport = 0, dport = 0;  // ICMP: type, code
  uint8_t in_port = kNoPortKey, out_port = kNoPortKey;
};

bool matches(const Match& m, const FlowKey& k);

// First matching rule per table by linear search: what seed 003 describes,
// kept as the reference the compiled lookup is tested and benchmarked against.
// Returns rule index + 1 per table (0: the table's default).
void match_linear(const RuleSet& rs, const FlowKey& k, uint32_t out[kTables]);

}  // namespace moat
