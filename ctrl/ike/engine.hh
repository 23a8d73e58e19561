#pragma once
// The IKEv2 engine (RFC 7296): initiator and responder for many peers in one
// event loop, no thread per peer. It owns every IKE SA and the CHILD SAs they
// negotiate; the ESP data path learns about CHILD SAs through a ChildSaSink.
//
// Owner: one thread (moatd's control thread, or a test's loop). Not thread
// safe. Time is whatever monotonic milliseconds the host passes in `now_ms`.
//
// Hosting it:
//   - datagrams in:  receive(local, remote, udp_payload, now) for UDP to
//     ports 500 and 4500 of our addresses. On 4500 the payload still starts
//     with the 4-byte non-ESP marker (the engine strips it; ESP, whose first
//     four bytes are an SPI, and NAT keepalives are counted and ignored).
//   - datagrams out: Transport::send(local, remote, udp_payload); on 4500
//     the engine has already prefixed the non-ESP marker.
//   - timers: call tick(now) whenever now >= next_deadline() (and at any
//     other time: it is cheap and idempotent).
//   - peers: set_peers() with the tunnels from the config directory.
// Peers are found by their authenticated identity, never by their address:
// a moat's address may change at any time.
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>
#include <tl/expected.hpp>

#include "ctrl/ike/cert.hh"
#include "ctrl/ike/child_sa.hh"
#include "ctrl/ike/crypto.hh"
#include "ctrl/ike/message.hh"

namespace moat::ike {

constexpr uint16_t kIkePort = 500;
constexpr uint16_t kNattPort = 4500;

// One tunnel (a moat, or a portal seen from a moat).
struct PeerConfig {
  std::string name;
  std::string origin;  // "file:line" of its record, for messages
  Identity local_id, remote_id;
  Bytes psk;                                  // PSK authentication when `creds` is null
  std::shared_ptr<const Credentials> creds;   // certificates (RFC 7427 signatures)
  std::vector<Proposal> ike_proposals;  // kProtoIke
  std::vector<Proposal> esp_proposals;  // kProtoEsp
  std::vector<TrafficSelector> local_ts, remote_ts;
  std::optional<Endpoint> remote;  // where to initiate to; unset: respond only
  std::optional<IpAddr> local;     // our source address; unset: Transport::source_for
  bool start = false;              // initiate at start and re-initiate when the SA dies
  // CHILD SA lifetimes. Either end rekeys at `child_rekey_s` (minus up to
  // 10% jitter), whichever role it had; an SA not rekeyed by
  // `child_lifetime_s` is deleted (and handed to the data path as its hard
  // lifetime). Both ends rekeying at once is a collision (§2.8.1).
  uint32_t child_lifetime_s = 3600;
  uint32_t child_rekey_s = 0;        // 0: 90% of the lifetime, minus jitter
  uint32_t dpd_s = 0;                // liveness check after this much silence; 0: off
  // IKE SA lifetimes: either end rekeys it at `ike_rekey_s` (minus up to 10%
  // jitter; 0: never); one that reaches `ike_lifetime_s` without a rekey is
  // deleted, and a `start` tunnel initiates a new one (0: ike_rekey_s plus
  // 10%, or never when ike_rekey_s is 0).
  uint32_t ike_rekey_s = 14400;
  uint32_t ike_lifetime_s = 0;
  // MOBIKE (RFC 4555): offer/accept MOBIKE_SUPPORTED in IKE_AUTH. With it the
  // peer may move the SA with UPDATE_SA_ADDRESSES, and when we initiated the
  // IKE SA we announce our own new address (local_address_changed()).
  bool mobike = true;
  // RFC 4555 §3.7: before the CHILD SAs follow the peer to a new address
  // (its UPDATE_SA_ADDRESSES, or an authenticated message from there), an
  // INFORMATIONAL with COOKIE2 must come back from it echoed. The RFC's
  // default (SHOULD); false moves at once, for peers known to behave.
  bool mobike_check = true;
  // RFC 4555 §3.9: no NAT may sit between us. Our UPDATE_SA_ADDRESSES carry
  // NO_NATS_ALLOWED, and a peer's update that shows a NAT is answered
  // UNEXPECTED_NAT_DETECTED and moves nothing.
  bool no_nats_allowed = false;
};

struct EngineOptions {
  uint32_t retransmit_base_ms = 1000;  // first timeout; doubles on every retry
  uint32_t retransmit_tries = 5;       // then the IKE SA is given up
  uint32_t half_open_timeout_ms = 30000;
  uint32_t reinit_min_ms = 1000;       // backoff for re-initiating a `start` peer
  uint32_t reinit_max_ms = 60000;
  // COOKIE (§2.6): with this many half-open SAs, IKE_SA_INIT must carry a
  // cookie before we spend a DH computation or memory on it.
  uint32_t cookie_threshold = 256;
  uint32_t max_half_open = 16384;  // beyond: dropped and counted, even with a cookie
  // IKE fragmentation (RFC 7383): encrypted messages larger than this are
  // sent in fragments when the peer supports it (IPv4 minimum path MTU 576
  // would need 548; 1280 suits most paths).
  uint32_t fragment_size = 1280;
  // Make-before-break CHILD rekeys (RFC 7296 §2.8), see docs/IKE.md:
  // - as the rekey's responder we install the new SA before answering but
  //   keep sending on the old one until the peer shows it has installed the
  //   new one: its next request (normally the delete of the old SA) proves it
  //   processed our answer. A peer that sends nothing gets the switch after
  //   rekey_switch_ms.
  // - the inbound half of a rekeyed SA is kept rekey_linger_ms after its
  //   delete exchange: packets the peer protected with it just before it
  //   switched are still on the way (strongSwan's delete_rekeyed_delay).
  uint32_t rekey_switch_ms = 5000;
  uint32_t rekey_linger_ms = 5000;
  // RFC 4555 §3.7 requires echoing a COOKIE2; false models a peer that does
  // not (tests of our return routability check). Leave it true.
  bool echo_cookie2 = true;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual void send(const Endpoint& local, const Endpoint& remote, ByteView udp_payload) = 0;
  // Our address toward `remote` (the routing decision); nullopt: unreachable.
  virtual std::optional<IpAddr> source_for(const IpAddr& remote) = 0;
};

// Counters: every drop and every notable event, one declared list.
#define MOAT_IKE_COUNTERS(X)                                                              \
  X(rx_datagrams, "datagrams handed to the engine")                                      \
  X(rx_keepalive, "NAT keepalives received (ignored)")                                   \
  X(rx_esp_on_ike_port, "ESP on the NAT-T port handed to the engine (dropped)")          \
  X(rx_malformed, "datagrams that failed to parse (dropped or answered with a notify)")  \
  X(rx_unsupported_critical, "messages with an unknown critical payload")               \
  X(rx_unknown_spi, "messages for an IKE SA we do not have")                             \
  X(rx_bad_icv, "encrypted payloads whose ICV did not verify")                           \
  X(rx_out_of_window, "requests outside the message-ID window")                          \
  X(rx_retransmit, "retransmitted requests answered from the cached response")           \
  X(rx_unexpected_response, "responses to no outstanding request")                       \
  X(tx_datagrams, "datagrams sent")                                                      \
  X(tx_retransmits, "requests retransmitted")                                            \
  X(no_proposal_chosen, "negotiations that found no common proposal")                   \
  X(auth_failed, "IKE_AUTH exchanges that failed authentication or identity lookup")     \
  X(ike_established, "IKE SAs established")                                              \
  X(ike_deleted, "IKE SAs deleted (any reason)")                                         \
  X(ike_given_up, "IKE SAs given up after the last retransmit")                          \
  X(half_open_expired, "half-open IKE SAs expired")                                      \
  X(half_open_dropped, "IKE_SA_INIT requests dropped at the half-open limit")            \
  X(cookie_sent, "IKE_SA_INIT requests answered with a COOKIE (under load)")             \
  X(cookie_bad, "IKE_SA_INIT requests with a wrong or stale COOKIE")                     \
  X(initial_contact_deleted, "IKE SAs deleted because their peer sent INITIAL_CONTACT")  \
  X(child_installed, "CHILD SAs installed")                                              \
  X(child_removed, "CHILD SAs removed")                                                  \
  X(child_rekeyed, "CHILD SAs rekeyed")                                                  \
  X(child_failed, "CHILD SA negotiations that failed (IKE SA kept)")                     \
  X(rekey_collisions, "simultaneous CHILD or IKE SA rekeys resolved by the nonce rule (§2.8.1, §2.8.2)")  \
  X(rekey_refused, "CREATE_CHILD_SA requests answered TEMPORARY_FAILURE or CHILD_SA_NOT_FOUND during an IKE SA rekey or delete (§2.25)") \
  X(rekey_switch_timeouts, "outbound switched to a peer's rekeyed SA without its confirmation") \
  X(rx_fragments, "IKE fragments received (RFC 7383)")                                  \
  X(tx_fragments, "IKE fragments sent")                                                  \
  X(invalid_spi_sent, "INVALID_SPI notifications sent for unknown ESP SPIs")             \
  X(invalid_spi_limited, "unknown-SPI events not answered (rate limit or no IKE SA)")         \
  X(mobike_moved, "IKE SAs moved by the peer's UPDATE_SA_ADDRESSES (RFC 4555)")             \
  X(mobike_ignored, "UPDATE_SA_ADDRESSES on an IKE SA without MOBIKE (nothing moved)")      \
  X(mobike_sent, "UPDATE_SA_ADDRESSES sent after our own address changed")              \
  X(mobike_checks, "return routability checks (COOKIE2) sent to a peer's new address")  \
  X(mobike_check_failed, "return routability checks answered without the right COOKIE2 (nothing moved)") \
  X(mobike_nat_refused, "address updates refused or answered with UNEXPECTED_NAT_DETECTED (RFC 4555 §3.9)") \
  X(child_expired, "CHILD SAs deleted at their hard lifetime, not rekeyed in time")     \
  X(ike_expired, "IKE SAs deleted at their lifetime, not rekeyed in time")

struct Stats {
#define X(name, desc) uint64_t name = 0;
  MOAT_IKE_COUNTERS(X)
#undef X
  nlohmann::ordered_json json() const;
};

class Engine {
 public:
  using LogFn = std::function<void(const std::string&)>;
  Engine(Transport& transport, ChildSaSink& sink, EngineOptions opts = {}, LogFn log = {});
  ~Engine();

  // Replaces the tunnels. Established SAs of tunnels that disappear are deleted;
  // `start` tunnels without an SA are initiated at the next tick.
  void set_peers(std::vector<PeerConfig> peers, uint64_t now_ms);
  const std::vector<std::shared_ptr<const PeerConfig>>& peers() const { return peers_; }

  void receive(const Endpoint& local, const Endpoint& remote, ByteView udp_payload, uint64_t now_ms);
  void tick(uint64_t now_ms);
  uint64_t next_deadline() const;  // UINT64_MAX: nothing scheduled

  tl::expected<void, std::string> initiate(const std::string& tunnel, uint64_t now_ms);
  tl::expected<void, std::string> terminate(const std::string& tunnel, uint64_t now_ms);
  // Starts a CREATE_CHILD_SA rekey of every CHILD SA of `tunnel` now.
  tl::expected<void, std::string> rekey_child(const std::string& tunnel, uint64_t now_ms);
  // Starts a CREATE_CHILD_SA rekey of the tunnel's IKE SA now (§1.3.2): the
  // CHILD SAs move to the new IKE SA, the old one is deleted.
  tl::expected<void, std::string> rekey_ike(const std::string& tunnel, uint64_t now_ms);
  // Sends an empty INFORMATIONAL (liveness check) on the tunnel's IKE SA.
  tl::expected<void, std::string> check_liveness(const std::string& tunnel, uint64_t now_ms);

  // One of our addresses changed (e.g. `moatctl address set` on a port):
  // every IKE SA we initiated from `old_addr` with MOBIKE moves to
  // `new_addr` and tells the peer with UPDATE_SA_ADDRESSES (RFC 4555 §3.5),
  // its CHILD SAs too (ChildSaSink::moved). Returns how many SAs moved.
  size_t local_address_changed(const IpAddr& old_addr, const IpAddr& new_addr, uint64_t now_ms);

  // The ESP data path received an SPI it does not know from `from` (a peer
  // holding a stale SA, seed 003 §6.1). Rate-limited to once a second per
  // address: tells the peer INVALID_SPI (§2.21) inside an IKE SA we share
  // with that address and checks its liveness. Without such an IKE SA there
  // is nothing authenticated to say; returns false.
  bool unknown_spi(uint32_t spi, const IpAddr& from, uint64_t now_ms);

  // `moatctl show ike`: IKE SAs with state, peer identity and address,
  // algorithms, ages and their CHILD SAs.
  nlohmann::ordered_json show(uint64_t now_ms) const;
  const Stats& stats() const { return stats_; }
  size_t ike_sa_count() const { return sas_.size(); }

  struct IkeSa;

 private:
  enum class TimerKind : uint8_t { retransmit, half_open, dpd, child_rekey, ike_rekey, rekey_switch, ike_expire, kinds };
  struct Timer {
    uint64_t when;
    uint64_t spi;
    TimerKind kind;
    uint32_t gen;
    bool operator>(const Timer& o) const { return when > o.when; }
  };
  struct Request;

  void log(const std::string& s) const;
  void send_raw(IkeSa& sa, const Bytes& msg);
  void send_all(IkeSa& sa, const std::vector<Bytes>& msgs);
  std::vector<Bytes> seal(IkeSa& sa, const Header& h, const ChainBuilder& chain);
  void send_to(const Endpoint& local, const Endpoint& remote, const Bytes& msg);
  void arm(IkeSa& sa, TimerKind k, uint64_t when);
  void disarm(IkeSa& sa, TimerKind k);
  void fire(IkeSa& sa, TimerKind k);

  // exchanges
  void init_request(const Endpoint& local, const Endpoint& remote, const Message& m);
  void init_response(IkeSa& sa, const Message& m);
  void send_init(IkeSa& sa);
  void send_auth(IkeSa& sa);
  void auth_request(IkeSa& sa, const Message& m, const std::vector<Payload>& pl);
  void auth_response(IkeSa& sa, const std::vector<Payload>& pl);
  void informational_request(IkeSa& sa, const Message& m, const std::vector<Payload>& pl);
  void mobike_update(IkeSa& sa, const std::vector<Payload>& pl, ChainBuilder& c);
  void create_child_request(IkeSa& sa, const Message& m, const std::vector<Payload>& pl);
  void create_child_response(IkeSa& sa, const std::vector<Payload>& pl);
  void rekey_ike_response(IkeSa& sa, const std::vector<Payload>& pl);
  void rekey_ike_request(IkeSa& sa, const Message& m, const std::vector<Proposal>& props, const Bytes& ni,
                         const Payload* kep);
  // Moves the CHILD SAs (and their pending rekey switches) to a new IKE SA,
  // without a sink call: the data path does not know IKE SAs.
  void adopt_children(IkeSa& from, IkeSa& to);
  void adopt_queue(IkeSa& from, IkeSa& to);
  // Re-points the IKE SA and its CHILD SAs (sink moved()) at new endpoints.
  void move_sa(IkeSa& sa, const Endpoint& local, const Endpoint& remote);
  // The peer moved (MOBIKE): the IKE SA follows now; the CHILD SAs follow
  // after a return routability check when the peer's address changed.
  void move_peer(IkeSa& sa, const Endpoint& local, const Endpoint& remote);
  void handle_encrypted(IkeSa& sa, const Message& m, const Endpoint& local, const Endpoint& remote);

  void queue_request(IkeSa& sa, uint8_t exchange, ChainBuilder chain, uint8_t kind, uint32_t child_spi = 0);
  void pump(IkeSa& sa);
  void respond(IkeSa& sa, const Header& req, const ChainBuilder& chain);
  void respond_plain_error(const Endpoint& local, const Endpoint& remote, const Header& req, uint16_t notify,
                           ByteView data);

  // CHILD SAs
  std::optional<ChildSa> make_child(IkeSa& sa, bool we_initiated, const Suite& suite, uint32_t spi_in, uint32_t spi_out,
                                    std::vector<TrafficSelector> local_ts, std::vector<TrafficSelector> remote_ts,
                                    ByteView g_ir, ByteView ni, ByteView nr);
  void install_child(IkeSa& sa, ChildSa c);
  void remove_children(IkeSa& sa);
  // A CHILD SA deleted by a delete exchange: a rekeyed one lingers inbound.
  void retire_child(IkeSa& sa, uint32_t spi_in);
  // The peer proved it installed the SAs of the rekeys it initiated (it sent
  // a request after our answer): our outbound switches to them. `deleting`
  // (that request's payloads) names SAs it is deleting, which we do not
  // switch to (the redundant SA of a collision).
  void switch_to_peer_rekeys(IkeSa& sa, const std::vector<Payload>* deleting);
  uint32_t new_child_spi();
  // Arms the IKE SA's CHILD timer for the next rekey or expiry of its CHILD SAs.
  void schedule_child_rekey(IkeSa& sa);
  // The CHILD timer fired: deletes the CHILD SAs past their hard lifetime and
  // starts the rekey of one past its soft lifetime (one negotiation at a time).
  void child_timers(IkeSa& sa);
  // Starts the CREATE_CHILD_SA rekey of `old` (our spi_in).
  tl::expected<void, std::string> start_child_rekey(IkeSa& sa, uint32_t old_in);
  void expire_child(IkeSa& sa, uint32_t spi_in);
  void schedule_ike_rekey(IkeSa& sa);
  void schedule_ike_expire(IkeSa& sa);
  // RFC 4555 §3.7: the CHILD SAs follow the IKE SA to its new address once
  // an INFORMATIONAL with a fresh COOKIE2 sent there is answered with it.
  void start_return_routability(IkeSa& sa);

  void established(IkeSa& sa);
  void delete_sa(uint64_t spi, const std::string& why, bool reinit);
  void fail(IkeSa& sa, const std::string& why);
  IkeSa* find_established(const std::string& tunnel);
  std::shared_ptr<const PeerConfig> find_peer(const std::string& name) const;
  // The tunnel (a peer whose remote_id matches `id`; with `idr`, preferably
  // one whose local_id matches it too), by the identity index.
  std::shared_ptr<const PeerConfig> find_peer_by_id(const Identity& id, const std::optional<Identity>& idr) const;
  // Records that `sa` (in sas_ under its SPI, its peer set) belongs to its tunnel.
  void index_sa(const IkeSa& sa);
  // Our SPIs of the tunnel's IKE SAs that are still in sas_ (stale index
  // entries are dropped on the way).
  std::vector<uint64_t> tunnel_sas(const std::string& tunnel);
  void schedule_reinit(const std::string& name, bool failed);

  Transport& transport_;
  ChildSaSink& sink_;
  EngineOptions opts_;
  LogFn log_;
  uint64_t now_ = 0;
  std::vector<std::shared_ptr<const PeerConfig>> peers_;
  // Indexes over peers_ and sas_: a portal holds thousands of tunnels, and
  // a scan of them per message (by name, by identity, for INITIAL_CONTACT)
  // made setting up N SAs cost O(N^2). Rebuilt by set_peers().
  std::unordered_map<std::string, size_t> peer_by_name_;
  std::unordered_map<std::string, std::vector<size_t>> peer_by_id_;  // identity key -> peers_ indexes, in order
  std::unordered_map<std::string, std::vector<uint64_t>> sas_by_tunnel_;  // tunnel -> our SPIs (may be stale)
  const PeerConfig* certreq_peer_ = nullptr;  // the first tunnel with certificates (CERTREQ in IKE_SA_INIT)
  std::vector<Proposal> responder_ike_;  // union of the peers' IKE proposals
  std::unordered_map<uint64_t, std::unique_ptr<IkeSa>> sas_;  // by our SPI
  std::map<std::pair<uint64_t, std::string>, uint64_t> half_open_;  // (SPIi, remote) -> our SPI
  std::map<uint32_t, uint64_t> child_spis_;                          // our inbound ESP SPIs -> IKE SA
  std::priority_queue<Timer, std::vector<Timer>, std::greater<Timer>> timers_;
  struct Reinit {
    uint64_t at = 0;
    uint32_t backoff_ms = 0;
  };
  std::map<std::string, Reinit> reinit_;  // `start` peers waiting to be (re-)initiated
  uint64_t next_child_id_ = 1;
  std::multimap<uint64_t, ChildSa> lingering_;  // rekeyed SAs' inbound halves, by removal time
  std::map<IpAddr, uint64_t> invalid_spi_at_;  // rate limit per peer address
  Bytes cookie_secret_, cookie_secret_old_;
  uint64_t cookie_secret_at_ = 0;
  Bytes make_cookie(ByteView secret, ByteView ni, const Endpoint& remote, uint64_t spi_i) const;
  Stats stats_;
};

}  // namespace moat::ike
