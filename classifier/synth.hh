#pragma once
// Synthetic rule sets shaped like a portal's: thousands of moats, each a few
// funnels (a moat's LAN to corporate prefixes) and services by protocol and
// port, few distinct wildcard patterns. Shared by the classifier's tests and
// benchmarks so both measure the same shape.
#include <array>
#include <random>

#include "classifier/rules.hh"

namespace moat::synth {

struct Rng {
  std::mt19937 g;
  explicit Rng(uint32_t seed) : g(seed) {}
  uint32_t u(uint32_t lo, uint32_t hi) { return std::uniform_int_distribution<uint32_t>(lo, hi)(g); }
  bool coin(unsigned pct) { return u(0, 99) < pct; }
  // Addresses from a small space so prefixes of every length get hits.
  uint32_t addr() { return 0x0a000000u | (u(0, 3) << 16) | (u(0, 3) << 8) | u(0, 7); }
};

inline RuleSet portal_rules(Rng& g, unsigned per_table) {
  RuleSet rs;
  for (unsigned t = 0; t < kTables; t++)
    for (unsigned i = 0; i < per_table; i++) {
      Rule r;
      r.match.in_zones = {uint8_t(g.u(0, 4))};
      uint8_t slen = uint8_t(std::array{16, 24, 32}[g.u(0, 2)]);
      uint8_t dlen = uint8_t(std::array{8, 16, 24, 32}[g.u(0, 3)]);
      r.match.src = {{g.addr() & (~uint32_t(0) << (32 - slen)), slen}};
      r.match.dst = {{g.addr() & (~uint32_t(0) << (32 - dlen)), dlen}};
      if (g.coin(50)) {
        r.match.protos = {uint8_t(g.coin(50) ? 6 : 17)};
        if (g.coin(70)) {
          uint16_t p = uint16_t(g.u(0, 45));
          r.match.dports = {{p, p}};
        }
      }
      r.verdict.action = uint8_t(t);
      rs.table[t].rules.push_back(r);
    }
  return rs;
}

inline FlowKey flow(Rng& g) {
  FlowKey k;
  k.proto = uint8_t(std::array{1, 6, 17, 47, 50}[g.u(0, 4)]);
  k.in_zone = uint8_t(g.u(0, 5));
  k.out_zone = uint8_t(g.u(0, 5));
  k.dscp = uint8_t(g.u(0, 4));
  k.src = g.coin(90) ? g.addr() : g.u(0, 0xffffffff);
  k.dst = g.coin(90) ? g.addr() : g.u(0, 0xffffffff);
  k.sport = uint16_t(g.coin(90) ? g.u(0, 45) : g.u(0, 0xffff));
  k.dport = uint16_t(g.coin(90) ? g.u(0, 45) : g.u(0, 0xffff));
  k.in_port = g.coin(20) ? kNoPortKey : uint8_t(g.u(0, 4));
  k.out_port = g.coin(20) ? kNoPortKey : uint8_t(g.u(0, 4));
  return k;
}

}  // namespace moat::synth
