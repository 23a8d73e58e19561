#pragma once
// The ARP state machine (RFC 826, with RFC 1122 §2.3.2 aging): pure logic,
// no I/O, so it is unit-tested directly. The control thread feeds it events
// and carries out the actions it returns (send a request, publish or withdraw
// a MAC in the workers' neighbour hash, release or fail held packets).
// Owner: the control thread. Times are milliseconds of a monotonic clock.
#include <rte_ether.h>

#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "dataplane/tables.hh"

namespace moat {

struct ArpParams {
  unsigned reachable_ms = 300000;
  unsigned retry_ms = 1000;
  unsigned max_retries = 3;
  unsigned hold_packets = 8;
  unsigned max_entries = 4096;
};

struct NeighKeyLess {
  bool operator()(const NeighKey& a, const NeighKey& b) const {
    return a.port != b.port ? a.port < b.port : a.ip < b.ip;
  }
};

class ArpTable {
 public:
  enum class State : uint8_t { incomplete, reachable, probe, fixed };
  struct Entry {
    State state = State::incomplete;
    rte_ether_addr mac{};
    uint64_t confirmed_ms = 0;
    uint64_t next_ms = 0;  // next retry or aging check
    unsigned tries = 0;
    std::deque<void*> held;  // packets waiting for the MAC (owned by the caller)
  };
  struct Action {
    enum Kind : uint8_t {
      request_broadcast,  // ask who has key.ip
      request_unicast,    // re-confirm key.ip at `mac`
      publish,            // make `mac` visible to workers for key
      withdraw,           // remove key from the workers' hash
      release,            // send `pkts` to `mac`
      fail,               // resolution failed: answer `pkts` with host unreachable
      drop,               // no room: drop `pkts` (reason in `why`)
    } kind;
    NeighKey key;
    rte_ether_addr mac{};
    std::vector<void*> pkts;
    const char* why = nullptr;
  };
  using Actions = std::vector<Action>;

  explicit ArpTable(ArpParams p) : p_(p) {}

  // A worker needs key's MAC to send `pkt`.
  void resolve(const NeighKey& key, void* pkt, uint64_t now, Actions& out);
  // An ARP frame told us sender (ip -> mac) on a port. Existing entries are
  // updated. A new entry is created only when `create` (a request aimed at
  // one of our addresses, RFC 826: the sender is about to talk to us);
  // replies nobody asked for cannot fill the cache. Returns false when the
  // information was ignored.
  bool learn(const NeighKey& key, const rte_ether_addr& mac, uint64_t now, Actions& out, bool create = false);
  // A static entry from the configuration; never ages.
  void add_fixed(const NeighKey& key, const rte_ether_addr& mac, Actions& out);
  // Retries, aging and give-ups due at `now`.
  void tick(uint64_t now, Actions& out);
  // Removes every entry of a port (address change, shutdown).
  void flush_port(uint16_t port, Actions& out);

  const std::map<NeighKey, Entry, NeighKeyLess>& entries() const { return entries_; }

 private:
  ArpParams p_;
  std::map<NeighKey, Entry, NeighKeyLess> entries_;
};

const char* arp_state_name(ArpTable::State s);

}  // namespace moat
