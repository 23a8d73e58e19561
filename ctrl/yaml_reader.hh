#pragma once
// The YAML walker that moatd's configuration (ctrl/config*.cc) and
// moat-bench's profiles (bench/profile.cc) share. Every error is recorded at
// the node it concerns, as file:line:col, and reading goes on, so one pass
// reports every mistake and a broken record is skipped while the rest load.
// Free of DPDK types (ctrl/yaml_reader.cc links into moat-bench's loader
// without the data path).
#include <yaml-cpp/yaml.h>

#include "ctrl/place_error.hh"

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace moat {

class YamlReader {
 public:
  YamlReader(std::string file, std::vector<PlaceError>& errors) : file_(std::move(file)), errors_(errors) {}

  void error(const YAML::Mark& mk, std::string what);
  void error(const YAML::Node& n, std::string what) { error(n.Mark(), std::move(what)); }
  size_t errors() const { return errors_.size(); }
  const std::string& file() const { return file_; }
  // A reader for another file whose errors join this one's.
  YamlReader other(std::string file) const { return YamlReader(std::move(file), errors_); }

  // Calls `fn(key, value)` for each entry of map `n`; reports keys not in
  // `allowed` (a typo must not silently mean a default) and returns false
  // when `n` is not a map.
  bool fields(const YAML::Node& n, std::string_view where, const std::set<std::string>& allowed,
              const std::function<void(const std::string&, const YAML::Node&)>& fn);

  std::optional<std::string> str(const YAML::Node& n, std::string_view what);
  // Decimal, or hex with 0x (SPIs, keys' neighbours); never octal.
  std::optional<uint64_t> uint(const YAML::Node& n, std::string_view what, uint64_t lo, uint64_t hi);
  template <typename T>
  void uint(const YAML::Node& n, std::string_view what, T& out, uint64_t lo, uint64_t hi) {
    if (auto v = uint(n, what, lo, hi)) out = T(*v);
  }
  void number(const YAML::Node& n, std::string_view what, double& out, double lo, double hi);
  void boolean(const YAML::Node& n, std::string_view what, bool& out);
  void ipv4(const YAML::Node& n, std::string_view what, uint32_t& out);
  std::optional<std::array<uint8_t, 6>> mac(const YAML::Node& n, std::string_view what);
  // Exactly `bytes` bytes in hex, with or without 0x.
  std::optional<std::vector<uint8_t>> hex(const YAML::Node& n, std::string_view what, size_t bytes);
  // Whole seconds, bare or with a unit: 30, 30s, 10m, 1h (the IKE tunnel
  // files' lifetimes and dpd). At most 2^32-1 s.
  std::optional<uint32_t> duration(const YAML::Node& n, std::string_view what);

  template <typename F>
  void list(const YAML::Node& n, std::string_view what, F&& each) {
    if (!n.IsSequence()) {
      error(n, std::string(what) + ": expected a list");
      return;
    }
    for (const auto& e : n) each(e);
  }

 private:
  std::string file_;
  std::vector<PlaceError>& errors_;
};

}  // namespace moat
