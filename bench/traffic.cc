#include "bench/traffic.hh"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <cmath>
#include <numeric>

namespace moat::bench {

std::string ipv4_str(uint32_t a) {
  return fmt::format("{}.{}.{}.{}", a >> 24, (a >> 16) & 0xff, (a >> 8) & 0xff, a & 0xff);
}

std::string mac_str(const std::array<uint8_t, 6>& b) {
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5]);
}

std::vector<unsigned> spread(const std::vector<unsigned>& weights) {
  const unsigned total = std::accumulate(weights.begin(), weights.end(), 0u);
  std::vector<unsigned> out;
  std::vector<int64_t> credit(weights.size(), 0);
  for (unsigned n = 0; n < total; n++) {
    size_t best = 0;
    for (size_t i = 0; i < weights.size(); i++) {
      credit[i] += weights[i];
      if (credit[i] > credit[best]) best = i;
    }
    credit[best] -= total;
    out.push_back(unsigned(best));
  }
  return out;
}

FlowSpace::FlowSpace(const Profile& p)
    : sip_(p.src_ip), dip_(p.dst_ip), sp_(p.src_port), dp_(p.dst_port), flows_(p.flows) {
  std::vector<unsigned> w;
  for (auto& d : p.dscp) w.push_back(d.weight);
  for (unsigned i : spread(w)) dscp_of_slot_.push_back(p.dscp[i].dscp);
}

FlowKey FlowSpace::key(uint32_t f) const {
  FlowKey k;
  uint64_t r = f;
  k.dst_ip = uint32_t(dip_.first + r % dip_.count);
  r /= dip_.count;
  k.src_port = uint16_t(sp_.first + r % sp_.count);
  r /= sp_.count;
  k.src_ip = uint32_t(sip_.first + r % sip_.count);
  r /= sip_.count;
  k.dst_port = uint16_t(dp_.first + r % dp_.count);
  // DSCP belongs to the flow, as in real traffic (a flow keeps its class).
  k.dscp = dscp_of_slot_[f % dscp_of_slot_.size()];
  return k;
}

namespace {

void put16(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v >> 8);
  p[1] = uint8_t(v);
}
void put32(uint8_t* p, uint32_t v) {
  put16(p, uint16_t(v >> 16));
  put16(p + 2, uint16_t(v));
}

uint32_t sum16(const uint8_t* p, size_t n) {
  uint32_t s = 0;
  for (size_t i = 0; i + 1 < n; i += 2) s += (uint32_t(p[i]) << 8) | p[i + 1];
  if (n & 1) s += uint32_t(p[n - 1]) << 8;
  return s;
}

}  // namespace

Template make_template(const Profile& p, const FlowKey& k, uint32_t flow, unsigned size) {
  Template t;
  const unsigned len = size - kFcsBytes;
  // At least a cache line, so the head copy below never reads past the end.
  std::vector<uint8_t> b(std::max<unsigned>(len, kCopyBytes));
  for (size_t i = 0; i < b.size(); i++) b[i] = pattern_byte(i);
  uint8_t* eth = b.data();
  std::memcpy(eth, p.dst_mac.data(), 6);
  // Source MAC: filled by the caller with the port's address.
  std::memset(eth + 6, 0, 6);
  put16(eth + 12, 0x0800);
  uint8_t* ip = eth + kEthBytes;
  const bool udp = p.protocol == Protocol::udp;
  const unsigned l4_len = len - kEthBytes - kIpv4Bytes;
  ip[0] = 0x45;
  ip[1] = uint8_t(k.dscp << 2);
  put16(ip + 2, uint16_t(len - kEthBytes));
  put16(ip + 4, uint16_t(flow));
  put16(ip + 6, 0);
  ip[8] = p.ttl;
  ip[9] = udp ? 17 : 6;
  put16(ip + 10, 0);
  put32(ip + 12, k.src_ip);
  put32(ip + 16, k.dst_ip);
  put16(ip + 10, uint16_t(~fold_csum(sum16(ip, kIpv4Bytes))));
  uint8_t* l4 = ip + kIpv4Bytes;
  put16(l4, k.src_port);
  put16(l4 + 2, k.dst_port);
  if (udp) {
    put16(l4 + 4, uint16_t(l4_len));
    put16(l4 + 6, 0);
    t.stamp_off = kEthBytes + kIpv4Bytes + kUdpBytes;
    t.csum_off = kEthBytes + kIpv4Bytes + 6;
  } else {
    // Sequence and acknowledgement numbers carry the stamp; flags ACK|PSH
    // make it an ordinary segment of an established connection.
    l4[12] = 5 << 4;
    l4[13] = 0x18;
    put16(l4 + 14, 65535);
    put16(l4 + 16, 0);
    put16(l4 + 18, 0);
    t.stamp_off = kEthBytes + kIpv4Bytes + 4;
    t.csum_off = kEthBytes + kIpv4Bytes + 16;
  }
  std::memset(b.data() + t.stamp_off, 0, kStampBytes);
  // Pseudo-header (RFC 768 / 793) + segment, checksum field zero.
  uint32_t s = sum16(ip + 12, 8) + (udp ? 17u : 6u) + l4_len + sum16(l4, l4_len);
  t.csum_sum = s;
  t.len = uint16_t(len);
  t.rx_len = uint16_t(len);
  t.copy_len = uint16_t(std::min<unsigned>(len, kCopyBytes));
  t.flow = flow;
  t.udp = udp;
  std::memset(t.head, 0, sizeof t.head);
  std::memcpy(t.head, b.data(), t.copy_len);
  return t;
}

std::vector<uint8_t> template_frame(const Template& t) {
  if (!t.whole.empty()) return t.whole;
  std::vector<uint8_t> b(t.len);
  for (size_t i = 0; i < t.len; i++) b[i] = pattern_byte(i);
  std::memcpy(b.data(), t.head, t.copy_len);
  return b;
}

double LatencyHist::quantile(double q) const {
  if (n_ == 0) return 0;
  const uint64_t rank = std::max<uint64_t>(1, uint64_t(std::ceil(q * double(n_))));
  uint64_t seen = 0;
  for (unsigned i = 0; i < kBuckets; i++) {
    seen += counts_[i];
    if (seen >= rank) {
      if (i < 32) return double(i);
      return (double(bucket_low(i)) + double(bucket_high(i))) / 2;
    }
  }
  return max_;
}

}  // namespace moat::bench
