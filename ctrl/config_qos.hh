#pragma once
// qos.shaping and qos.police (ctrl/config_qos.cc); rates as tc writes them.
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <optional>
#include <string>

#include "ctrl/config.hh"

namespace moat {

class Reader;

// "128kbit", "9.6kbit", "10mbit", "1gbit" (bits/s), "16kbps" (bytes/s):
// bytes per second.
std::optional<uint64_t> parse_rate(const std::string& s);
std::string rate_str(uint64_t bytes_per_s);

void read_qos(Reader& r, const YAML::Node& qos, Config& c);

}  // namespace moat
