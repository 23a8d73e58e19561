#pragma once
// The YAML walker every config reader shares (moatd's file, rule tables):
// it records each error at the node it concerns, as file:line:col.
#include <yaml-cpp/yaml.h>

#include <fmt/format.h>

#include <cstdio>
#include <functional>
#include <set>

#include "ctrl/config.hh"

namespace moat {

// Walks the YAML tree, recording errors at the node they concern.
class Reader {
 public:
  Reader(std::string file, std::vector<ConfigError>& errors) : file_(std::move(file)), errors_(errors) {}

  void error(const YAML::Mark& mk, std::string what) {
    errors_.push_back(ConfigError{file_, mk.line + 1, mk.column + 1, std::move(what)});
  }
  void error(const YAML::Node& n, std::string what) { error(n.Mark(), std::move(what)); }
  size_t errors() const { return errors_.size(); }

  // Calls `fn(key, value)` for each entry of map `n`; reports keys not in
  // `allowed` and returns false when `n` is not a map.
  bool fields(const YAML::Node& n, const char* where, const std::set<std::string>& allowed,
              const std::function<void(const std::string&, const YAML::Node&)>& fn) {
    if (!n.IsMap()) {
      error(n, fmt::format("{}: expected a mapping", where));
      return false;
    }
    for (auto it = n.begin(); it != n.end(); ++it) {
      std::string key = it->first.Scalar();
      if (!allowed.count(key)) {
        std::string known;
        for (auto& k : allowed) known += (known.empty() ? "" : ", ") + k;
        error(it->first, fmt::format("{}: unknown key \"{}\" (known: {})", where, key, known));
        continue;
      }
      fn(key, it->second);
    }
    return true;
  }

  std::optional<std::string> str(const YAML::Node& n, const char* what) {
    if (!n.IsScalar()) {
      error(n, fmt::format("{}: expected a string", what));
      return std::nullopt;
    }
    return n.Scalar();
  }

  template <typename T>
  void uint(const YAML::Node& n, const char* what, T& out, uint64_t lo, uint64_t hi) {
    if (!n.IsScalar() || n.Scalar().empty() || n.Scalar().find_first_not_of("0123456789") != std::string::npos) {
      error(n, fmt::format("{}: expected an integer from {} to {}", what, lo, hi));
      return;
    }
    uint64_t v = 0;
    try {
      v = std::stoull(n.Scalar());
    } catch (...) {
      v = hi + 1;
    }
    if (v < lo || v > hi) {
      error(n, fmt::format("{}: {} is out of range ({} to {})", what, n.Scalar(), lo, hi));
      return;
    }
    out = T(v);
  }

  void boolean(const YAML::Node& n, const char* what, bool& out) {
    const std::string& s = n.IsScalar() ? n.Scalar() : std::string();
    if (s == "true" || s == "yes" || s == "on") out = true;
    else if (s == "false" || s == "no" || s == "off") out = false;
    else error(n, fmt::format("{}: expected true or false", what));
  }

  void ipv4(const YAML::Node& n, const char* what, uint32_t& out) {
    if (auto s = str(n, what)) {
      if (auto a = parse_ipv4(*s)) out = *a;
      else error(n, fmt::format("{}: \"{}\" is not an IPv4 address", what, *s));
    }
  }

  void mac(const YAML::Node& n, const char* what, rte_ether_addr& out, bool* ok = nullptr) {
    if (ok) *ok = false;
    auto s = str(n, what);
    if (!s) return;
    unsigned b[6];
    char tail;
    if (std::sscanf(s->c_str(), "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &tail) != 6) {
      error(n, fmt::format("{}: \"{}\" is not a MAC address (aa:bb:cc:dd:ee:ff)", what, *s));
      return;
    }
    for (int i = 0; i < 6; i++) out.addr_bytes[i] = uint8_t(b[i]);
    if (ok) *ok = true;
  }

  template <typename F>
  void list(const YAML::Node& n, const char* what, F&& each) {
    if (!n.IsSequence()) {
      error(n, fmt::format("{}: expected a list", what));
      return;
    }
    for (const auto& e : n) each(e);
  }

 private:
  std::string file_;
  std::vector<ConfigError>& errors_;
};

// "ef", "af41", "cs1", "be", "va" or 0-63.
std::optional<uint8_t> dscp_value(const std::string& s);

// Zones, tunnels and the four rule tables (ctrl/config_policy.cc).
void read_policy(Reader& r, const YAML::Node& root, Config& c);

}  // namespace moat
