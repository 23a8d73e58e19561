#include "ctrl/yaml_reader.hh"

#include <arpa/inet.h>

#include <fmt/format.h>

#include <cmath>
#include <cstdio>

namespace moat {

std::string PlaceError::str() const { return fmt::format("{}:{}:{}: {}", file, line, col, what); }

std::optional<uint32_t> parse_ipv4(const std::string& s) {
  in_addr a;
  if (inet_pton(AF_INET, s.c_str(), &a) != 1) return std::nullopt;
  return ntohl(a.s_addr);
}

void YamlReader::error(const YAML::Mark& mk, std::string what) {
  errors_.push_back(PlaceError{file_, mk.line + 1, mk.column + 1, std::move(what)});
}

bool YamlReader::fields(const YAML::Node& n, std::string_view where, const std::set<std::string>& allowed,
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

std::optional<std::string> YamlReader::str(const YAML::Node& n, std::string_view what) {
  if (!n.IsScalar()) {
    error(n, fmt::format("{}: expected a string", what));
    return std::nullopt;
  }
  return n.Scalar();
}

std::optional<uint64_t> YamlReader::uint(const YAML::Node& n, std::string_view what, uint64_t lo, uint64_t hi) {
  const std::string s = n.IsScalar() ? n.Scalar() : "";
  const bool hex = s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
  const std::string digits = hex ? s.substr(2) : s;
  if (digits.empty() || digits.find_first_not_of(hex ? "0123456789abcdefABCDEF" : "0123456789") != std::string::npos) {
    error(n, fmt::format("{}: expected an integer from {} to {}", what, lo, hi));
    return std::nullopt;
  }
  uint64_t v = 0;
  try {
    v = std::stoull(digits, nullptr, hex ? 16 : 10);
  } catch (...) {  // more than 64 bits
    error(n, fmt::format("{}: {} is out of range ({} to {})", what, s, lo, hi));
    return std::nullopt;
  }
  if (v < lo || v > hi) {
    error(n, fmt::format("{}: {} is out of range ({} to {})", what, s, lo, hi));
    return std::nullopt;
  }
  return v;
}

void YamlReader::number(const YAML::Node& n, std::string_view what, double& out, double lo, double hi) {
  const std::string s = n.IsScalar() ? n.Scalar() : "";
  double v = 0;
  size_t used = 0;
  try {
    v = std::stod(s, &used);
  } catch (...) {
    used = 0;
  }
  if (s.empty() || used != s.size() || !std::isfinite(v)) {
    error(n, fmt::format("{}: expected a number from {} to {}", what, lo, hi));
    return;
  }
  if (v < lo || v > hi) {
    error(n, fmt::format("{}: {} is out of range ({} to {})", what, s, lo, hi));
    return;
  }
  out = v;
}

void YamlReader::boolean(const YAML::Node& n, std::string_view what, bool& out) {
  const std::string s = n.IsScalar() ? n.Scalar() : std::string();
  if (s == "true" || s == "yes" || s == "on") out = true;
  else if (s == "false" || s == "no" || s == "off") out = false;
  else error(n, fmt::format("{}: expected true or false", what));
}

void YamlReader::ipv4(const YAML::Node& n, std::string_view what, uint32_t& out) {
  if (auto s = str(n, what)) {
    if (auto a = parse_ipv4(*s)) out = *a;
    else error(n, fmt::format("{}: \"{}\" is not an IPv4 address", what, *s));
  }
}

std::optional<std::array<uint8_t, 6>> YamlReader::mac(const YAML::Node& n, std::string_view what) {
  auto s = str(n, what);
  if (!s) return std::nullopt;
  unsigned b[6];
  char tail;
  if (std::sscanf(s->c_str(), "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &tail) != 6) {
    error(n, fmt::format("{}: \"{}\" is not a MAC address (aa:bb:cc:dd:ee:ff)", what, *s));
    return std::nullopt;
  }
  std::array<uint8_t, 6> out;
  for (int i = 0; i < 6; i++) out[i] = uint8_t(b[i]);
  return out;
}

std::optional<std::vector<uint8_t>> YamlReader::hex(const YAML::Node& n, std::string_view what, size_t bytes) {
  auto s = str(n, what);
  if (!s) return std::nullopt;
  std::string h = *s;
  if (h.rfind("0x", 0) == 0) h = h.substr(2);
  if (h.size() != 2 * bytes || h.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos) {
    error(n, fmt::format("{}: expected {} bytes in hex ({} digits)", what, bytes, 2 * bytes));
    return std::nullopt;
  }
  std::vector<uint8_t> v(bytes);
  for (size_t i = 0; i < bytes; i++) v[i] = uint8_t(std::stoul(h.substr(2 * i, 2), nullptr, 16));
  return v;
}

std::optional<uint32_t> YamlReader::duration(const YAML::Node& n, std::string_view what) {
  if (!n.IsScalar()) {
    error(n, fmt::format("{}: expected a duration (e.g. 30, 30s, 10m, 1h)", what));
    return std::nullopt;
  }
  const std::string& s = n.Scalar();
  const char unit = s.empty() ? 0 : s.back();
  const uint64_t mult = unit == 'h' ? 3600 : unit == 'm' ? 60 : 1;
  const std::string digits = unit == 'h' || unit == 'm' || unit == 's' ? s.substr(0, s.size() - 1) : s;
  // Nine digits at most: a number std::stoull cannot overflow even in hours.
  if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) {
    error(n, fmt::format("{}: \"{}\" is not a duration (e.g. 30, 30s, 10m, 1h)", what, s));
    return std::nullopt;
  }
  const uint64_t v = std::stoull(digits) * mult;
  if (v > UINT32_MAX) {
    error(n, fmt::format("{}: {} is out of range (at most {} s)", what, s, UINT32_MAX));
    return std::nullopt;
  }
  return uint32_t(v);
}

}  // namespace moat
