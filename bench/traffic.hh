#pragma once
// What moat-bench sends: flows laid out over the profile's address and port
// ranges, frame templates per (flow, size), the per-packet stamp, and the
// latency histogram the sink fills. No DPDK state here, so tests can check
// the layout without EAL.
// Thread safety: templates are built before a trial and then only read.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bench/profile.hh"

namespace moat::bench {

struct FlowKey {
  uint32_t src_ip = 0, dst_ip = 0;  // host order
  uint16_t src_port = 0, dst_port = 0;
  uint8_t dscp = 0;
};

// Flow f is a mixed-radix number over the ranges, fastest first: dst_ip,
// src_port, src_ip, dst_port. So the default profile (256 flows, one
// address each side) varies only the source port; with N destination
// addresses (N tunnels' selectors) flow f goes to address f % N; and the
// sink maps headers back to f with multiplications only.
class FlowSpace {
 public:
  explicit FlowSpace(const Profile& p);
  FlowKey key(uint32_t f) const;
  // The flow these headers belong to, or -1 when they are not ours.
  int64_t index(uint32_t src_ip, uint32_t dst_ip, uint16_t src_port, uint16_t dst_port) const {
    const uint32_t a = src_port - sp_.first, b = src_ip - sip_.first, c = dst_port - dp_.first, d = dst_ip - dip_.first;
    if (a >= sp_.count || b >= sip_.count || c >= dp_.count || d >= dip_.count) return -1;
    const uint64_t f = d + uint64_t(dip_.count) * (a + uint64_t(sp_.count) * (b + uint64_t(sip_.count) * c));
    return f < flows_ ? int64_t(f) : -1;
  }
  uint32_t flows() const { return flows_; }

 private:
  Range sip_, dip_, sp_, dp_;
  uint32_t flows_;
  std::vector<uint8_t> dscp_of_slot_;
};

// A sequence of `total weight` slots in which each value appears as often
// as its weight says, spread out (smooth weighted round robin), so a 7:4:1
// mix does not send 7 small frames in a row.
std::vector<unsigned> spread(const std::vector<unsigned>& weights);

// The stamp: per-flow sequence number and the send time, both big-endian,
// 8 bytes at Template::stamp_off. Time is TSC >> kTsShift, 32 bits: with
// a 2-4 GHz TSC a unit is 16-32 ns and the clock wraps after 70-140 s,
// far beyond any latency a trial can see.
constexpr unsigned kTsShift = 6;
inline uint32_t ts_of_tsc(uint64_t tsc) { return uint32_t(tsc >> kTsShift); }

// Bytes copied from the template into every cleartext frame: headers and
// stamp fit in one cache line. The rest of the frame comes from the mbuf,
// filled with the same pattern once when the pool is made (see fill_pattern).
constexpr unsigned kCopyBytes = 64;

// Byte i of every frame's payload is pattern_byte(i): the pool's buffers
// are filled with it once, templates compute their checksums with it.
inline uint8_t pattern_byte(size_t offset) { return uint8_t(offset * 7 + 1); }

struct TagFix;

struct alignas(64) Template {
  uint8_t head[kCopyBytes];
  uint16_t len = 0;         // bytes in the mbuf (frame without FCS)
  uint16_t copy_len = 0;    // kCopyBytes, or len for frames carried whole (ESP)
  uint16_t stamp_off = 0;   // 0: no stamp written per packet
  uint16_t csum_off = 0;    // L4 checksum
  uint32_t csum_sum = 0;    // ones-complement sum of all the checksum covers, stamp zero, not folded
  uint32_t flow = 0;
  bool udp = true;
  std::vector<uint8_t> whole;  // the full frame when copy_len > kCopyBytes
  uint16_t rx_len = 0;         // the frame the sink should get back: len, or the decapsulated inner frame
  // ESP (inbound) only: see esp.hh.
  const TagFix* esp_fix = nullptr;
  uint16_t esp_tag_off = 0;
  uint16_t esp_csum0 = 0;      // the inner checksum the template was encrypted with
  uint32_t esp_sa = 0;
};

// The cleartext frame of flow `k` at `size` (FCS included) as the generator
// sends it, stamp zero; `out.csum_sum` lets the hot loop fill the checksum
// for any stamp with four additions.
Template make_template(const Profile& p, const FlowKey& k, uint32_t flow, unsigned size);

// The whole frame of a template (head + pattern), for tests and for ESP.
std::vector<uint8_t> template_frame(const Template& t);

inline uint16_t fold_csum(uint32_t s) {
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return uint16_t(s);
}

// Writes seq and ts into the frame at `d` and fixes the L4 checksum.
inline void stamp(uint8_t* d, const Template& t, uint32_t seq, uint32_t ts) {
  uint8_t* s = d + t.stamp_off;
  s[0] = uint8_t(seq >> 24), s[1] = uint8_t(seq >> 16), s[2] = uint8_t(seq >> 8), s[3] = uint8_t(seq);
  s[4] = uint8_t(ts >> 24), s[5] = uint8_t(ts >> 16), s[6] = uint8_t(ts >> 8), s[7] = uint8_t(ts);
  uint32_t sum = t.csum_sum + (seq >> 16) + (seq & 0xffff) + (ts >> 16) + (ts & 0xffff);
  uint16_t c = uint16_t(~fold_csum(sum));
  if (c == 0 && t.udp) c = 0xffff;  // 0 means "no checksum" in UDP
  d[t.csum_off] = uint8_t(c >> 8);
  d[t.csum_off + 1] = uint8_t(c);
}

// Latency in TSC >> kTsShift units, log-linear buckets: exact below 32,
// then 16 buckets per power of two (at most 6 % wide).
class LatencyHist {
 public:
  static constexpr unsigned kBuckets = 512;
  void add(uint32_t v) {
    n_++;
    sum_ += v;
    if (v < min_) min_ = v;
    if (v > max_) max_ = v;
    counts_[bucket(v)]++;
  }
  static unsigned bucket(uint32_t v) {
    if (v < 32) return v;
    const unsigned e = 31u - unsigned(__builtin_clz(v));
    return (e - 3) * 16 + ((v >> (e - 4)) & 15);
  }
  static uint64_t bucket_low(unsigned i) {
    if (i < 32) return i;
    const unsigned e = i / 16 + 3, m = i % 16;
    return uint64_t(16 + m) << (e - 4);
  }
  static uint64_t bucket_high(unsigned i) { return i < 32 ? i + 1 : bucket_low(i) + (uint64_t(1) << (i / 16 - 1)); }
  // The value at or below which a fraction q of the samples lie: the
  // middle of its bucket (exact below 32 units).
  double quantile(double q) const;
  void clear() { *this = LatencyHist(); }
  uint64_t count() const { return n_; }
  uint64_t sum() const { return sum_; }
  uint32_t min() const { return n_ ? min_ : 0; }
  uint32_t max() const { return max_; }
  uint64_t at(unsigned i) const { return counts_[i]; }

 private:
  uint64_t counts_[kBuckets] = {};
  uint64_t n_ = 0, sum_ = 0;
  uint32_t min_ = UINT32_MAX, max_ = 0;
};

std::string ipv4_str(uint32_t host);
std::string mac_str(const std::array<uint8_t, 6>& m);

}  // namespace moat::bench
