#include "classifier/rules.hh"

#include <algorithm>

namespace moat {

namespace {

template <typename T, typename F>
bool any_or_empty(const std::vector<T>& v, F&& f) {
  return v.empty() || std::any_of(v.begin(), v.end(), f);
}

bool in_prefix(const PrefixMatch& p, uint32_t a) {
  uint32_t mask = p.len ? ~uint32_t(0) << (32 - p.len) : 0;
  return (a & mask) == p.addr;
}

}  // namespace

bool matches(const Match& m, const FlowKey& k) {
  auto eq = [](uint8_t v) { return [v](uint8_t x) { return x == v; }; };
  auto in_range = [](uint16_t v) { return [v](const Range16& r) { return r.lo <= v && v <= r.hi; }; };
  return any_or_empty(m.in_zones, eq(k.in_zone)) && any_or_empty(m.out_zones, eq(k.out_zone)) &&
         any_or_empty(m.in_ports, eq(k.in_port)) && any_or_empty(m.out_ports, eq(k.out_port)) &&
         any_or_empty(m.protos, eq(k.proto)) &&
         any_or_empty(m.src, [&](const PrefixMatch& p) { return in_prefix(p, k.src); }) &&
         any_or_empty(m.dst, [&](const PrefixMatch& p) { return in_prefix(p, k.dst); }) &&
         any_or_empty(m.sports, in_range(k.sport)) && any_or_empty(m.dports, in_range(k.dport)) &&
         (!m.dscp || *m.dscp == k.dscp);
}

void match_linear(const RuleSet& rs, const FlowKey& k, uint32_t out[kTables]) {
  for (unsigned t = 0; t < kTables; t++) {
    out[t] = 0;
    const auto& rules = rs.table[t].rules;
    for (size_t i = 0; i < rules.size(); i++)
      if (matches(rules[i].match, k)) {
        out[t] = uint32_t(i + 1);
        break;
      }
  }
}

}  // namespace moat
