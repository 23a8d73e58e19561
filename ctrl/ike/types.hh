#pragma once
// Small value types shared by the IKEv2 engine (ctrl/ike/). The engine is a
// library independent of DPDK: it sees addresses and bytes, never mbufs.
// All types here are plain values; no thread affinity.
#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moat::ike {

using Bytes = std::vector<uint8_t>;
using ByteView = std::span<const uint8_t>;

// An IPv4 or IPv6 address in network byte order (IPv4 in the first 4 bytes).
struct IpAddr {
  uint8_t family = 0;  // AF_INET or AF_INET6; 0 = unset
  std::array<uint8_t, 16> b{};

  static IpAddr v4(uint32_t host_order);
  static std::optional<IpAddr> parse(std::string_view s);
  bool is_v4() const;
  size_t size() const { return is_v4() ? 4 : 16; }
  ByteView bytes() const { return ByteView(b.data(), size()); }
  std::string str() const;
  bool operator==(const IpAddr&) const = default;
  auto operator<=>(const IpAddr&) const = default;
};

// One end of a UDP flow: an address and a port (host order).
struct Endpoint {
  IpAddr addr;
  uint16_t port = 0;
  std::string str() const;
  bool operator==(const Endpoint&) const = default;
};

Bytes to_bytes(std::string_view s);
std::string hex(ByteView b);

}  // namespace moat::ike
