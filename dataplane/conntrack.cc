#include "dataplane/conntrack.hh"

#include <rte_errno.h>
#include <rte_hash_crc.h>
#include <rte_malloc.h>

#include <netinet/in.h>

#include <fmt/format.h>

namespace moat {

const char* ct_state_name(CtState s) {
  static const char* names[] = {"syn_sent", "syn_recv", "established", "closing", "time_wait",
                                "close",    "udp",      "udp_stream",  "icmp",    "other"};
  return names[unsigned(s)];
}

tl::expected<std::unique_ptr<Conntrack>, std::string> Conntrack::create(const CtConfig& cfg, rte_rcu_qsbr* qsbr,
                                                                        unsigned workers, uint64_t tsc_hz,
                                                                        const std::string& name) {
  std::unique_ptr<Conntrack> t(new Conntrack());
  t->max_ = cfg.max_connections;
  t->qsbr_ = qsbr;
  t->workers_ = workers ? workers : 1;
  t->tsc_hz_ = tsc_hz;
  t->touch_tsc_ = tsc_hz / 1000;
  const CtTimeouts& to = cfg.timeouts;
  const uint32_t secs[10] = {to.tcp_syn,   to.tcp_syn_recv, to.tcp_established, to.tcp_closing, to.tcp_time_wait,
                             to.tcp_close, to.udp,          to.udp_stream,      to.icmp,        to.other};
  for (int i = 0; i < 10; i++) t->to_[i] = uint64_t(secs[i]) * tsc_hz;

  t->conns_ = static_cast<Conn*>(rte_zmalloc((name + "_conns").c_str(), sizeof(Conn) * t->max_, RTE_CACHE_LINE_SIZE));
  if (!t->conns_) return tl::unexpected(fmt::format("conntrack: {} connections: out of memory", t->max_));
  // Two keys per connection; the extendable bucket table guarantees that
  // capacity (cuckoo hashing alone may refuse a key earlier), and the slack
  // covers the key slots each lcore caches with MULTI_WRITER_ADD.
  rte_hash_parameters hp{};
  std::string hname = name + "_hash";
  hp.name = hname.c_str();
  hp.entries = 2 * t->max_ + 2 * 64 * RTE_MAX_LCORE / 8;
  hp.key_len = sizeof(CtKey);
  hp.hash_func = rte_hash_crc;
  hp.socket_id = SOCKET_ID_ANY;
  hp.extra_flag = RTE_HASH_EXTRA_FLAGS_RW_CONCURRENCY_LF | RTE_HASH_EXTRA_FLAGS_MULTI_WRITER_ADD |
                  RTE_HASH_EXTRA_FLAGS_EXT_TABLE;
  t->hash_ = rte_hash_create(&hp);
  if (!t->hash_) return tl::unexpected(fmt::format("conntrack hash: {}", rte_strerror(rte_errno)));
  if (qsbr) {
    rte_hash_rcu_config hrc{};
    hrc.v = qsbr;
    hrc.mode = RTE_HASH_QSBR_MODE_DQ;
    if (rte_hash_rcu_qsbr_add(t->hash_, &hrc) != 0) return tl::unexpected(std::string("conntrack hash: RCU attach failed"));
  }
  t->free_ = rte_ring_create_elem((name + "_free").c_str(), sizeof(uint32_t), t->max_, SOCKET_ID_ANY, RING_F_EXACT_SZ);
  if (!t->free_) return tl::unexpected(fmt::format("conntrack free ring: {}", rte_strerror(rte_errno)));
  for (uint32_t i = 0; i < t->max_; i++) rte_ring_enqueue_elem(t->free_, &i, sizeof(i));
  return t;
}

Conntrack::~Conntrack() {
  rte_hash_free(hash_);
  rte_ring_free(free_);
  rte_free(conns_);
}

void Conntrack::lookup(const CtKey* const* keys, unsigned n, uint32_t* refs) const {
  void* data[RTE_HASH_LOOKUP_BULK_MAX];
  uint64_t hits = 0;
  if (!n) return;
  // No entry taken from the free ring means no key in the hash (an entry
  // leaves the ring before its keys go in and returns only after they are
  // gone and a grace period has passed): every lookup would miss. A router
  // whose rules track nothing (a portal that only terminates tunnels) then
  // pays two loads per burst instead of a cuckoo probe per packet into a
  // table sized for max_connections, mostly cold (ESP inbound probes it for
  // the outer and the inner packet).
  if (empty()) {
    for (unsigned i = 0; i < n; i++) refs[i] = 0;
    return;
  }
  rte_hash_lookup_bulk_data(hash_, reinterpret_cast<const void**>(const_cast<const CtKey**>(keys)), n, &hits, data);
  for (unsigned i = 0; i < n; i++)
    refs[i] = (hits >> i) & 1 ? uint32_t(reinterpret_cast<uintptr_t>(data[i])) : 0;
}

bool Conntrack::empty() const { return rte_ring_count(free_) == max_; }

uint32_t Conntrack::insert(const CtKey& orig, const CtKey& reply, uint8_t nat, uint32_t flags, unsigned worker,
                           uint64_t now_tsc, bool* full) {
  *full = false;
  uint32_t idx;
  if (rte_ring_dequeue_elem(free_, &idx, sizeof(idx)) != 0) {
    *full = true;
    return 0;
  }
  Conn& c = conns_[idx];
  c.key[0] = orig;
  c.key[1] = reply;
  c.last_tsc = now_tsc;
  c.flags = flags;
  c.nat = nat;
  c.worker = uint8_t(worker);
  c.live = 0;
  if (taken(orig) || taken(reply)) {
    // Nobody can have seen this entry: it goes straight back.
    rte_ring_enqueue_elem(free_, &idx, sizeof(idx));
    return 0;
  }
  int rc = rte_hash_add_key_data(hash_, &reply, reinterpret_cast<void*>(uintptr_t(ct_ref(idx, 1))));
  if (rc == 0) rc = rte_hash_add_key_data(hash_, &orig, reinterpret_cast<void*>(uintptr_t(ct_ref(idx, 0))));
  if (rc != 0) {
    // A key may be visible already: let the sweep remove it after a grace
    // period rather than reuse the entry now.
    __atomic_store_n(&c.last_tsc, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c.flags, ct::kRst, __ATOMIC_RELAXED);
    __atomic_store_n(&c.live, 1, __ATOMIC_RELEASE);
    *full = true;
    return 0;
  }
  __atomic_store_n(&c.live, 1, __ATOMIC_RELEASE);
  return ct_ref(idx, 0);
}

CtState Conntrack::state(const Conn& c) const {
  uint32_t f = __atomic_load_n(&c.flags, __ATOMIC_RELAXED);
  switch (c.key[0].proto) {
    case IPPROTO_TCP:
      if (f & ct::kRst) return CtState::close;
      if ((f & ct::kFinOrig) && (f & ct::kFinReply)) return CtState::time_wait;
      if (f & (ct::kFinOrig | ct::kFinReply)) return CtState::closing;
      if (f & ct::kEstablished) return CtState::established;
      if (f & ct::kSynAckReply) return CtState::syn_recv;
      return CtState::syn_sent;
    case IPPROTO_UDP:
      return f & ct::kReplySeen ? CtState::udp_stream : CtState::udp;
    case IPPROTO_ICMP:
      return CtState::icmp;
    default:
      return CtState::other;
  }
}

uint64_t Conntrack::timeout_tsc(const Conn& c) const { return to_[unsigned(state(c))]; }

void Conntrack::expire(uint32_t idx) {
  Conn& c = conns_[idx];
  for (unsigned d = 0; d < 2; d++) {
    void* data = nullptr;
    // Only our own key: a tuple may since belong to a newer connection.
    if (rte_hash_lookup_data(hash_, &c.key[d], &data) >= 0 && uintptr_t(data) == ct_ref(idx, d))
      rte_hash_del_key(hash_, &c.key[d]);
  }
  __atomic_store_n(&c.live, 0, __ATOMIC_RELEASE);
  deferred_.emplace_back(qsbr_ ? rte_rcu_qsbr_start(qsbr_) : 0, idx);
  expired_++;
}

unsigned Conntrack::sweep(uint64_t now_tsc, unsigned budget) {
  unsigned n = 0;
  if (budget > max_) budget = max_;
  for (unsigned i = 0; i < budget; i++) {
    uint32_t idx = sweep_pos_;
    sweep_pos_ = sweep_pos_ + 1 == max_ ? 0 : sweep_pos_ + 1;
    Conn& c = conns_[idx];
    if (!__atomic_load_n(&c.live, __ATOMIC_ACQUIRE)) continue;
    uint64_t last = __atomic_load_n(&c.last_tsc, __ATOMIC_RELAXED);
    if (now_tsc > last && now_tsc - last > timeout_tsc(c)) {
      expire(idx);
      n++;
    }
  }
  return n;
}

unsigned Conntrack::expire_addr(uint32_t addr) {
  unsigned n = 0;
  for (uint32_t i = 0; i < max_; i++) {
    Conn& c = conns_[i];
    if (!__atomic_load_n(&c.live, __ATOMIC_ACQUIRE) || !c.nat) continue;
    if (c.key[1].dst == addr || c.key[0].dst == addr) {
      expire(i);
      n++;
    }
  }
  return n;
}

unsigned Conntrack::expire_all() {
  unsigned n = 0;
  for (uint32_t i = 0; i < max_; i++)
    if (__atomic_load_n(&conns_[i].live, __ATOMIC_ACQUIRE)) {
      expire(i);
      n++;
    }
  return n;
}

void Conntrack::reclaim() {
  size_t done = 0;
  while (done < deferred_.size() && (!qsbr_ || rte_rcu_qsbr_check(qsbr_, deferred_[done].first, false) == 1)) {
    rte_ring_enqueue_elem(free_, &deferred_[done].second, sizeof(uint32_t));
    done++;
  }
  if (done) deferred_.erase(deferred_.begin(), deferred_.begin() + long(done));
}

uint32_t Conntrack::in_use() const { return max_ - rte_ring_count(free_); }

}  // namespace moat
