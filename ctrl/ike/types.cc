#include "ctrl/ike/types.hh"

#include <arpa/inet.h>
#include <sys/socket.h>

#include <fmt/format.h>

namespace moat::ike {

IpAddr IpAddr::v4(uint32_t a) {
  IpAddr r;
  r.family = AF_INET;
  r.b[0] = uint8_t(a >> 24);
  r.b[1] = uint8_t(a >> 16);
  r.b[2] = uint8_t(a >> 8);
  r.b[3] = uint8_t(a);
  return r;
}

std::optional<IpAddr> IpAddr::parse(std::string_view s) {
  std::string str(s);
  IpAddr r;
  if (inet_pton(AF_INET, str.c_str(), r.b.data()) == 1) {
    r.family = AF_INET;
    return r;
  }
  if (inet_pton(AF_INET6, str.c_str(), r.b.data()) == 1) {
    r.family = AF_INET6;
    return r;
  }
  return std::nullopt;
}

bool IpAddr::is_v4() const { return family == AF_INET; }

std::string IpAddr::str() const {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (family == AF_INET || family == AF_INET6) inet_ntop(family, b.data(), buf, sizeof buf);
  return buf;
}

std::string Endpoint::str() const {
  return addr.is_v4() ? fmt::format("{}:{}", addr.str(), port) : fmt::format("[{}]:{}", addr.str(), port);
}

Bytes to_bytes(std::string_view s) { return Bytes(s.begin(), s.end()); }

std::string hex(ByteView b) {
  std::string s;
  s.reserve(b.size() * 2);
  for (uint8_t c : b) s += fmt::format("{:02x}", c);
  return s;
}

}  // namespace moat::ike
