#include "classifier/acl.hh"

#include <rte_byteorder.h>

#include <fmt/format.h>

namespace moat {

namespace {

enum : uint8_t {
  F_PROTO, F_IN_ZONE, F_OUT_ZONE, F_DSCP, F_IN_PORT, F_SRC, F_DST, F_SPORT, F_DPORT, F_OUT_PORT, F_ZERO8, F_ZERO16,
  kFields
};

RTE_ACL_RULE_DEF(AclRule, kFields);

// rte_acl consumes the first field (one byte) alone, then reads 4-byte
// groups (input_index); every group is covered by fields. Zones, DSCP and
// the router's port ids are one-byte exact-or-any fields sharing a group.
const rte_acl_field_def kAclFields[kFields] = {
    {RTE_ACL_FIELD_TYPE_BITMASK, 1, F_PROTO, 0, offsetof(AclKey, proto)},
    {RTE_ACL_FIELD_TYPE_BITMASK, 1, F_IN_ZONE, 1, offsetof(AclKey, in_zone)},
    {RTE_ACL_FIELD_TYPE_BITMASK, 1, F_OUT_ZONE, 1, offsetof(AclKey, out_zone)},
    {RTE_ACL_FIELD_TYPE_BITMASK, 1, F_DSCP, 1, offsetof(AclKey, dscp)},
    {RTE_ACL_FIELD_TYPE_BITMASK, 1, F_IN_PORT, 1, offsetof(AclKey, in_port)},
    {RTE_ACL_FIELD_TYPE_MASK, 4, F_SRC, 2, offsetof(AclKey, src)},
    {RTE_ACL_FIELD_TYPE_MASK, 4, F_DST, 3, offsetof(AclKey, dst)},
    {RTE_ACL_FIELD_TYPE_RANGE, 2, F_SPORT, 4, offsetof(AclKey, sport)},
    {RTE_ACL_FIELD_TYPE_RANGE, 2, F_DPORT, 4, offsetof(AclKey, dport)},
    {RTE_ACL_FIELD_TYPE_BITMASK, 1, F_OUT_PORT, 5, offsetof(AclKey, out_port)},
    {RTE_ACL_FIELD_TYPE_BITMASK, 1, F_ZERO8, 5, offsetof(AclKey, zero8)},
    {RTE_ACL_FIELD_TYPE_BITMASK, 2, F_ZERO16, 5, offsetof(AclKey, zero16)},
};

// A rule's lists multiply out into rte_acl rules; past this, the rule is
// refused rather than letting one line eat the build's memory.
constexpr uint64_t kMaxExpansion = 1u << 16;

template <typename T>
size_t n_or_1(const std::vector<T>& v) { return v.empty() ? 1 : v.size(); }

void set_u8(AclRule& r, unsigned f, const std::vector<uint8_t>& v, size_t i) {
  if (v.empty()) return;  // value 0, mask 0: any
  r.field[f].value.u8 = v[i];
  r.field[f].mask_range.u8 = 0xff;
}

}  // namespace

AclKey acl_key(const FlowKey& k) {
  AclKey a{};
  a.proto = k.proto;
  a.in_zone = k.in_zone;
  a.out_zone = k.out_zone;
  a.dscp = k.dscp;
  a.in_port = k.in_port;
  a.src = rte_cpu_to_be_32(k.src);
  a.dst = rte_cpu_to_be_32(k.dst);
  a.sport = rte_cpu_to_be_16(k.sport);
  a.dport = rte_cpu_to_be_16(k.dport);
  a.out_port = k.out_port;
  return a;
}

Classifier::~Classifier() {
  if (ctx) rte_acl_free(ctx);
}

tl::expected<std::unique_ptr<Classifier>, std::string> compile(const RuleSet& rs, uint64_t generation,
                                                               const CompileOptions& opt) {
  auto c = std::make_unique<Classifier>();
  c->generation = generation;
  c->categories = opt.categories == 1 ? 1 : kTables;
  c->tunnel_zone = rs.tunnel_zone;
  uint64_t total = 0;
  for (unsigned t = 0; t < kTables; t++) {
    c->verdict[t].reserve(rs.table[t].rules.size() + 1);
    c->verdict[t].push_back(rs.table[t].deflt);
    for (const Rule& r : rs.table[t].rules) {
      const Match& m = r.match;
      uint64_t x = uint64_t(n_or_1(m.in_zones)) * n_or_1(m.out_zones) * n_or_1(m.in_ports) * n_or_1(m.out_ports) *
                   n_or_1(m.src) * n_or_1(m.dst) * n_or_1(m.protos) * n_or_1(m.sports) * n_or_1(m.dports);
      if (x > kMaxExpansion)
        return tl::unexpected(fmt::format("{}:{}:{}: {} rule expands to {} lookups (limit {}): split its lists",
                                          r.file, r.line, r.col, kTableNames[t], x, kMaxExpansion));
      total += x;
      c->verdict[t].push_back(r.verdict);
    }
  }
  for (const Verdict& v : c->verdict[unsigned(Table::nat)])
    if (NatAction(v.action) == NatAction::dnat) c->has_dnat = true;
  c->acl_rules = uint32_t(total);
  const NatAction nat_default = NatAction(c->verdict[unsigned(Table::nat)][0].action);
  c->stateless = !total && !(c->verdict[unsigned(Table::filter)][0].flags & Verdict::kStateful) &&
                 nat_default != NatAction::masquerade && nat_default != NatAction::snat && !c->has_dnat;
  if (!total) return c;  // every packet gets every table's default

  std::string name = fmt::format("moat-acl-{}", generation);
  rte_acl_param prm{};
  prm.name = name.c_str();
  prm.socket_id = opt.socket_id;
  prm.rule_size = RTE_ACL_RULE_SZ(kFields);
  prm.max_rule_num = uint32_t(total);
  c->ctx = rte_acl_create(&prm);
  if (!c->ctx) return tl::unexpected(fmt::format("rte_acl_create {}: {}", name, rte_strerror(rte_errno)));

  std::vector<AclRule> batch;
  batch.reserve(4096);
  auto flush = [&]() -> bool {
    if (batch.empty()) return true;
    int rc = rte_acl_add_rules(c->ctx, reinterpret_cast<const rte_acl_rule*>(batch.data()), uint32_t(batch.size()));
    batch.clear();
    return rc == 0;
  };
  for (unsigned t = 0; t < kTables; t++) {
    const auto& rules = rs.table[t].rules;
    for (size_t i = 0; i < rules.size(); i++) {
      const Match& m = rules[i].match;
      AclRule base{};
      base.data.category_mask = opt.categories == 1 ? 1u : 1u << t;
      // First match wins: earlier rules get higher priority.
      base.data.priority = int32_t(RTE_ACL_MAX_PRIORITY - i);
      base.data.userdata = uint32_t(i + 1);
      if (m.dscp) {
        base.field[F_DSCP].value.u8 = *m.dscp;
        base.field[F_DSCP].mask_range.u8 = 0xff;
      }
      base.field[F_SRC].mask_range.u32 = 0;
      base.field[F_DST].mask_range.u32 = 0;
      base.field[F_SPORT].mask_range.u16 = 0xffff;
      base.field[F_DPORT].mask_range.u16 = 0xffff;
      for (size_t a = 0; a < n_or_1(m.in_zones); a++)
        for (size_t b = 0; b < n_or_1(m.out_zones); b++)
          for (size_t ip = 0; ip < n_or_1(m.in_ports); ip++)
            for (size_t op = 0; op < n_or_1(m.out_ports); op++)
              for (size_t p = 0; p < n_or_1(m.protos); p++)
                for (size_t s = 0; s < n_or_1(m.src); s++)
                  for (size_t d = 0; d < n_or_1(m.dst); d++)
                    for (size_t sp = 0; sp < n_or_1(m.sports); sp++)
                      for (size_t dp = 0; dp < n_or_1(m.dports); dp++) {
                        AclRule r = base;
                        set_u8(r, F_IN_ZONE, m.in_zones, a);
                        set_u8(r, F_OUT_ZONE, m.out_zones, b);
                        set_u8(r, F_IN_PORT, m.in_ports, ip);
                        set_u8(r, F_OUT_PORT, m.out_ports, op);
                        set_u8(r, F_PROTO, m.protos, p);
                        if (!m.src.empty()) {
                          r.field[F_SRC].value.u32 = m.src[s].addr;
                          r.field[F_SRC].mask_range.u32 = m.src[s].len;
                        }
                        if (!m.dst.empty()) {
                          r.field[F_DST].value.u32 = m.dst[d].addr;
                          r.field[F_DST].mask_range.u32 = m.dst[d].len;
                        }
                        if (!m.sports.empty()) {
                          r.field[F_SPORT].value.u16 = m.sports[sp].lo;
                          r.field[F_SPORT].mask_range.u16 = m.sports[sp].hi;
                        }
                        if (!m.dports.empty()) {
                          r.field[F_DPORT].value.u16 = m.dports[dp].lo;
                          r.field[F_DPORT].mask_range.u16 = m.dports[dp].hi;
                        }
                        batch.push_back(r);
                        if (batch.size() == batch.capacity() && !flush())
                          return tl::unexpected(fmt::format("rte_acl_add_rules: {}", rte_strerror(rte_errno)));
                      }
    }
  }
  if (!flush()) return tl::unexpected(fmt::format("rte_acl_add_rules: {}", rte_strerror(rte_errno)));

  rte_acl_config cfg{};
  cfg.num_categories = opt.categories == 1 ? 1 : kTables;
  cfg.num_fields = kFields;
  std::copy(std::begin(kAclFields), std::end(kAclFields), cfg.defs);
  cfg.max_size = 0;
  if (int rc = rte_acl_build(c->ctx, &cfg); rc != 0)
    return tl::unexpected(fmt::format("rte_acl_build ({} rules): {}", total, rte_strerror(-rc)));
  return c;
}

void classify(const Classifier& c, const AclKey* const* keys, unsigned n, uint32_t* results) {
  if (!c.ctx) {
    std::fill(results, results + n * c.categories, 0u);
    return;
  }
  rte_acl_classify(c.ctx, reinterpret_cast<const uint8_t**>(const_cast<const AclKey**>(keys)), results, n, c.categories);
}

}  // namespace moat
