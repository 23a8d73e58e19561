#pragma once
// The YAML walker moatd's configuration readers share (its file, the rule
// tables, QoS): ctrl/yaml_reader.hh with moatd's own value types.
#include <rte_ether.h>

#include <algorithm>

#include "ctrl/config.hh"
#include "ctrl/yaml_reader.hh"

namespace moat {

// moatd's reader: the shared YAML walker, plus the DPDK-typed values only
// moatd's configuration has.
class Reader : public YamlReader {
 public:
  using YamlReader::YamlReader;
  using YamlReader::mac;
  void mac(const YAML::Node& n, std::string_view what, rte_ether_addr& out, bool* ok = nullptr) {
    auto a = mac(n, what);
    if (a) std::copy(a->begin(), a->end(), out.addr_bytes);
    if (ok) *ok = a.has_value();
  }
};

// "ef", "af41", "cs1", "be", "va" or 0-63.
std::optional<uint8_t> dscp_value(const std::string& s);

// Zones, tunnels and the four rule tables (ctrl/config_policy.cc).
void read_policy(Reader& r, const YAML::Node& root, Config& c);

}  // namespace moat
