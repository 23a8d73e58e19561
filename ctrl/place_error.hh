#pragma once
// An error at its place in a file, for every loader (moatd's configuration,
// moat-bench's profiles): "file:line:col: what". Kept apart from the YAML
// walker (ctrl/yaml_reader.hh) so headers that only carry errors need no
// yaml-cpp.
#include <cstdint>
#include <optional>
#include <string>

namespace moat {

struct PlaceError {
  std::string file;
  int line = 0;  // 1-based; 0 when the whole file is concerned
  int col = 0;   // 1-based
  std::string what;
  std::string str() const;
};

// "192.0.2.1" in host order (ctrl/yaml_reader.cc).
std::optional<uint32_t> parse_ipv4(const std::string& s);

}  // namespace moat
