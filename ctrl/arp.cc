#include "ctrl/arp.hh"

namespace moat {

const char* arp_state_name(ArpTable::State s) {
  switch (s) {
    case ArpTable::State::incomplete: return "incomplete";
    case ArpTable::State::reachable: return "reachable";
    case ArpTable::State::probe: return "probe";
    case ArpTable::State::fixed: return "static";
  }
  return "?";
}

void ArpTable::resolve(const NeighKey& key, void* pkt, uint64_t now, Actions& out) {
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    if (entries_.size() >= p_.max_entries) {
      out.push_back(Action{Action::drop, key, {}, {pkt}, "arp_table_full"});
      return;
    }
    Entry e;
    e.state = State::incomplete;
    e.tries = 1;
    e.next_ms = now + p_.retry_ms;
    if (p_.hold_packets) e.held.push_back(pkt);
    else out.push_back(Action{Action::drop, key, {}, {pkt}, "arp_hold_full"});
    entries_.emplace(key, std::move(e));
    out.push_back(Action{Action::request_broadcast, key});
    return;
  }
  Entry& e = it->second;
  if (e.state != State::incomplete) {
    // Published already: the worker raced with the publication. Send now.
    out.push_back(Action{Action::release, key, e.mac, {pkt}});
    return;
  }
  if (e.held.size() >= p_.hold_packets) {
    out.push_back(Action{Action::drop, key, {}, {pkt}, "arp_hold_full"});
    return;
  }
  e.held.push_back(pkt);
}

bool ArpTable::learn(const NeighKey& key, const rte_ether_addr& mac, uint64_t now, Actions& out, bool create) {
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    if (!create || entries_.size() >= p_.max_entries) return false;
    it = entries_.emplace(key, Entry{}).first;
  }
  Entry& e = it->second;
  if (e.state == State::fixed) return true;
  bool changed = e.state == State::incomplete || !rte_is_same_ether_addr(&e.mac, &mac);
  e.mac = mac;
  e.state = State::reachable;
  e.tries = 0;
  e.confirmed_ms = now;
  e.next_ms = now + p_.reachable_ms;
  if (changed) out.push_back(Action{Action::publish, key, mac});
  if (!e.held.empty()) {
    Action a{Action::release, key, mac};
    a.pkts.assign(e.held.begin(), e.held.end());
    e.held.clear();
    out.push_back(std::move(a));
  }
  return true;
}

void ArpTable::add_fixed(const NeighKey& key, const rte_ether_addr& mac, Actions& out) {
  Entry& e = entries_[key];
  e.state = State::fixed;
  e.mac = mac;
  out.push_back(Action{Action::publish, key, mac});
  if (!e.held.empty()) {
    Action a{Action::release, key, mac};
    a.pkts.assign(e.held.begin(), e.held.end());
    e.held.clear();
    out.push_back(std::move(a));
  }
}

void ArpTable::tick(uint64_t now, Actions& out) {
  for (auto it = entries_.begin(); it != entries_.end();) {
    Entry& e = it->second;
    const NeighKey key = it->first;
    if (e.state == State::fixed || now < e.next_ms) {
      ++it;
      continue;
    }
    if (e.state == State::reachable) {
      // Aged: keep forwarding with the known MAC while we re-confirm it.
      e.state = State::probe;
      e.tries = 1;
      e.next_ms = now + p_.retry_ms;
      out.push_back(Action{Action::request_unicast, key, e.mac});
      ++it;
      continue;
    }
    if (e.tries < p_.max_retries) {
      e.tries++;
      e.next_ms = now + p_.retry_ms;
      out.push_back(Action{e.state == State::probe ? Action::request_unicast : Action::request_broadcast, key, e.mac});
      ++it;
      continue;
    }
    // Gave up.
    if (e.state == State::probe) out.push_back(Action{Action::withdraw, key});
    if (!e.held.empty()) {
      Action a{Action::fail, key};
      a.pkts.assign(e.held.begin(), e.held.end());
      out.push_back(std::move(a));
    }
    it = entries_.erase(it);
  }
}

void ArpTable::flush_port(uint16_t port, Actions& out) {
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (it->first.port != port) {
      ++it;
      continue;
    }
    if (it->second.state != State::incomplete) out.push_back(Action{Action::withdraw, it->first});
    if (!it->second.held.empty()) {
      Action a{Action::drop, it->first, {}, {}, "arp_failed"};
      a.pkts.assign(it->second.held.begin(), it->second.held.end());
      out.push_back(std::move(a));
    }
    it = entries_.erase(it);
  }
}

}  // namespace moat
