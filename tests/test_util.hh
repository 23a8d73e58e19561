#pragma once
// Helpers for tests: frames built byte by byte (not with the code under
// test) and an independent RFC 1071 checksum.
#include <rte_mbuf.h>

#include "dataplane/packet.hh"

#include <cstdint>
#include <cstring>
#include <vector>

namespace moat::test {

inline uint16_t ref_checksum(const uint8_t* p, size_t n) {
  uint32_t s = 0;
  for (size_t i = 0; i + 1 < n; i += 2) s += (uint32_t(p[i]) << 8) | p[i + 1];
  if (n & 1) s += uint32_t(p[n - 1]) << 8;
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return uint16_t(~s);
}

struct Frame {
  std::vector<uint8_t> b;
  void u8(uint8_t v) { b.push_back(v); }
  void u16(uint16_t v) { u8(v >> 8); u8(v & 0xff); }
  void u32(uint32_t v) { u16(v >> 16); u16(v & 0xffff); }
  void mac(const uint8_t* m) { b.insert(b.end(), m, m + 6); }
};

inline const uint8_t kRouterMac[6] = {0x02, 0, 0, 0, 0, 0x01};
inline const uint8_t kHostMac[6] = {0x02, 0, 0, 0, 0, 0x02};

// Ethernet + IPv4 (+ `payload` bytes), with a correct header checksum.
inline Frame ipv4_frame(uint32_t src, uint32_t dst, uint8_t proto, uint8_t ttl,
                        std::vector<uint8_t> payload, uint16_t frag = 0) {
  Frame f;
  f.mac(kRouterMac);
  f.mac(kHostMac);
  f.u16(0x0800);
  size_t ip = f.b.size();
  f.u8(0x45);
  f.u8(0);
  f.u16(uint16_t(20 + payload.size()));
  f.u16(0x1234);
  f.u16(frag);
  f.u8(ttl);
  f.u8(proto);
  f.u16(0);
  f.u32(src);
  f.u32(dst);
  uint16_t c = ref_checksum(&f.b[ip], 20);
  f.b[ip + 10] = c >> 8;
  f.b[ip + 11] = c & 0xff;
  f.b.insert(f.b.end(), payload.begin(), payload.end());
  return f;
}

inline std::vector<uint8_t> icmp_echo(uint16_t id, uint16_t seq, size_t data_len) {
  std::vector<uint8_t> p{8, 0, 0, 0, uint8_t(id >> 8), uint8_t(id), uint8_t(seq >> 8), uint8_t(seq)};
  for (size_t i = 0; i < data_len; i++) p.push_back(uint8_t(i));
  uint16_t c = ref_checksum(p.data(), p.size());
  p[2] = c >> 8;
  p[3] = c & 0xff;
  return p;
}

// One mbuf pool for every test in the binary, with Moat's metadata area.
inline rte_mempool* test_pool() {
  static rte_mempool* mp = rte_pktmbuf_pool_create("moat_test", 4095, 0, moat::kMbufPrivSize,
                                                   RTE_MBUF_DEFAULT_BUF_SIZE, 0);
  return mp;
}

inline rte_mbuf* to_mbuf(rte_mempool* mp, const std::vector<uint8_t>& b, uint16_t port = 0) {
  rte_mbuf* m = rte_pktmbuf_alloc(mp);
  if (!m) return nullptr;
  std::memcpy(rte_pktmbuf_append(m, uint16_t(b.size())), b.data(), b.size());
  m->port = port;
  return m;
}

inline std::vector<uint8_t> bytes(const rte_mbuf* m) {
  std::vector<uint8_t> v(rte_pktmbuf_pkt_len(m));
  rte_pktmbuf_read(m, 0, uint32_t(v.size()), v.data());
  const void* p = rte_pktmbuf_read(m, 0, uint32_t(v.size()), v.data());
  if (p != v.data()) std::memcpy(v.data(), p, v.size());
  return v;
}

}  // namespace moat::test
