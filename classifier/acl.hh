#pragma once
// The compiled classifier: every table of a RuleSet in ONE rte_acl context,
// one category per table, so one rte_acl_classify per burst answers filter,
// NAT, SPD and QoS at once. Owner: the control thread compiles a Classifier
// off the data path and publishes it whole (Tables::classifier); workers only
// read it; the old one is freed after an RCU grace period.
#include <rte_acl.h>

#include <tl/expected.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "classifier/rules.hh"

namespace moat {

// The bytes rte_acl reads for one packet. Addresses and ports in network
// order, as rte_acl expects its input (rule values are given in host order).
// rte_acl consumes the first byte alone, then groups of four consecutive
// bytes (one per input_index): the layout follows that, see kAclFields.
struct AclKey {
  uint8_t proto, pad_[3];
  uint8_t in_zone, out_zone, dscp, in_port;
  uint32_t src, dst;      // network order
  uint16_t sport, dport;  // network order; ICMP: type, code
  uint8_t out_port, zero8;
  uint16_t zero16;
};
static_assert(sizeof(AclKey) == 24);

AclKey acl_key(const FlowKey& k);

struct Classifier {
  rte_acl_ctx* ctx = nullptr;  // null when the rule set has no rules
  // verdict[t][0] is table t's default; verdict[t][i] is rule i-1's.
  std::vector<Verdict> verdict[kTables];
  uint64_t generation = 0;
  uint32_t acl_rules = 0;  // rules after expanding lists
  unsigned categories = kTables;
  std::vector<uint8_t> tunnel_zone;  // zone id per tunnel id
  // Some nat verdict (default included) is dnat: without one the data path
  // skips the dnat stage, which could only pass every packet on.
  bool has_dnat = false;
  // No rule, and defaults that keep no state and translate nothing: no
  // stage reads a packet's connection, so while the connection table is
  // empty the conntrack and nat stages have nothing to do (the worker skips
  // them: dataplane/worker.cc track()). A plain tunnel router's rule set.
  bool stateless = false;
  Classifier() = default;
  Classifier(const Classifier&) = delete;
  Classifier& operator=(const Classifier&) = delete;
  ~Classifier();
};

struct CompileOptions {
  // 1: every rule in one category (benchmark baseline: the cost of a single
  // table's lookup over the same rules); 4: one category per table.
  unsigned categories = kTables;
  int socket_id = -1;  // SOCKET_ID_ANY
};

// Builds the rte_acl context for `rs`. `generation` makes the context name
// unique: rte_acl refuses two live contexts of the same name. Errors name the
// rule (file:line:col) that could not be compiled.
tl::expected<std::unique_ptr<Classifier>, std::string> compile(const RuleSet& rs, uint64_t generation,
                                                               const CompileOptions& opt = {});

// results[i * c.categories + t]: table t's rule index + 1 for packet i (0:
// default).
void classify(const Classifier& c, const AclKey* const* keys, unsigned n, uint32_t* results);

}  // namespace moat
