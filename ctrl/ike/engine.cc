#include "ctrl/ike/engine.hh"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>

namespace moat::ike {

namespace {

enum class State : uint8_t { init_sent, half_open, auth_sent, established, deleting };
const char* state_name(State s) {
  switch (s) {
    case State::init_sent: return "INIT_SENT";
    case State::half_open: return "HALF_OPEN";
    case State::auth_sent: return "AUTH_SENT";
    case State::established: return "ESTABLISHED";
    case State::deleting: return "DELETING";
  }
  return "?";
}

enum ReqKind : uint8_t {
  kReqInit, kReqAuth, kReqDeleteIke, kReqDeleteChild, kReqDpd, kReqRekeyChild, kReqRekeyIke, kReqUpdateAddresses,
  kReqReturnRoutability
};

// NO_NATS_ALLOWED's data (RFC 4555 §3.9): the addresses and ports the
// sender used, source first.
Bytes nat_addresses(const Endpoint& src, const Endpoint& dst) {
  auto sa = src.addr.bytes(), da = dst.addr.bytes();
  Bytes b(sa.begin(), sa.end());
  b.insert(b.end(), da.begin(), da.end());
  put16(b, src.port);
  put16(b, dst.port);
  return b;
}

uint64_t jittered_ms(uint32_t s) {  // s seconds minus up to 10%, so that many SAs do not rekey at once
  uint64_t ms = uint64_t(s) * 1000;
  return ms - get32(random_bytes(4).data()) % (ms / 10 + 1);
}

bool child_error(uint16_t n) {
  return n == kNNoProposalChosen || n == kNTsUnacceptable || n == kNSinglePairRequired ||
         n == kNInternalAddressFailure || n == kNFailedCpRequired || n == kNInvalidSelectors ||
         n == kNNoAdditionalSas;
}

Bytes u32_bytes(uint32_t v) {
  Bytes b;
  put32(b, v);
  return b;
}

std::vector<Proposal> without_dh(std::vector<Proposal> ps, Bytes spi) {
  for (auto& p : ps) {
    std::erase_if(p.transforms, [](auto& t) { return t.type == kTfDh; });
    p.spi = spi;
  }
  return ps;
}

// Narrowing (§2.9): what both sides allow.
std::vector<TrafficSelector> narrow(const std::vector<TrafficSelector>& offered, const std::vector<TrafficSelector>& ours) {
  std::vector<TrafficSelector> out;
  for (auto& o : offered)
    for (auto& m : ours)
      if (auto i = o.intersect(m); i && std::find(out.begin(), out.end(), *i) == out.end()) out.push_back(*i);
  return out;
}

bool within(const std::vector<TrafficSelector>& got, const std::vector<TrafficSelector>& ours) {
  for (auto& g : got)
    if (std::none_of(ours.begin(), ours.end(), [&](auto& o) { return o.contains(g); })) return false;
  return !got.empty();
}

std::string ts_list(const std::vector<TrafficSelector>& ts) {
  std::string s;
  for (auto& t : ts) {
    if (!s.empty()) s += ' ';
    s += t.str();
  }
  return s;
}

tl::expected<AuthPayload, std::string> make_auth(const PeerConfig& p, uint16_t prf_alg, ByteView octets) {
  if (p.creds) {
    auto sig = p.creds->sign(octets);
    if (!sig) return tl::unexpected(sig.error());
    return AuthPayload{kAuthDigitalSignature, *sig};
  }
  return AuthPayload{kAuthPsk, psk_auth(prf_alg, p.psk, octets)};
}

// The peer's AUTH (and certificates): PSK or an RFC 7427 signature.
tl::expected<void, std::string> check_auth(const PeerConfig& p, uint16_t prf_alg, const std::vector<Payload>& pl,
                                           const Identity& id, const AuthPayload& a, ByteView octets) {
  if (p.creds) {
    std::vector<Bytes> certs;
    for (auto& x : pl)
      if (x.type == kPlCert && x.body.size() > 1 && x.body[0] == kCertX509Signature)
        certs.emplace_back(x.body.begin() + 1, x.body.end());
    if (certs.empty()) return tl::unexpected(std::string("no X.509 certificate sent"));
    std::vector<Bytes> rest(certs.begin() + 1, certs.end());
    return p.creds->verify(certs[0], rest, id, a.method, a.data, octets);
  }
  if (a.method != kAuthPsk) return tl::unexpected(fmt::format("AUTH method {} (this tunnel uses PSK)", a.method));
  if (!equal_ct(a.data, psk_auth(prf_alg, p.psk, octets)))
    return tl::unexpected(std::string("AUTH does not verify (different pre-shared key?)"));
  return {};
}

void add_cert(ChainBuilder& c, const PeerConfig& p) {
  if (!p.creds) return;
  Bytes b{kCertX509Signature};
  b.insert(b.end(), p.creds->cert_der().begin(), p.creds->cert_der().end());
  c.add(kPlCert, b);
}

void add_certreq(ChainBuilder& c, const Credentials& cr) {
  Bytes b{kCertX509Signature};
  Bytes h = cr.certreq();
  b.insert(b.end(), h.begin(), h.end());
  c.add(kPlCertReq, b);
}

void add_hash_algorithms(ChainBuilder& c) {
  Bytes h;
  for (uint16_t a : {kHashSha256, kHashSha384, kHashSha512}) put16(h, a);
  c.add_notify(kNSignatureHashAlgorithms, h);
}

}  // namespace

struct Engine::Request {
  uint8_t exchange = 0;
  ChainBuilder chain;
  uint8_t kind = 0;
  uint32_t child_spi = 0;
  Bytes cookie2;  // kReqReturnRoutability: what the answer must echo
};

struct Engine::IkeSa {
  uint64_t spi_i = 0, spi_r = 0;
  bool initiator = false;
  State state = State::init_sent;
  std::shared_ptr<const PeerConfig> peer;  // null until IKE_AUTH names the peer (responder)
  Endpoint local, remote;
  bool nat_local = false, nat_remote = false;
  Suite suite;
  IkeKeys keys;
  Bytes ni, nr;
  std::unique_ptr<Dh> dh;
  Bytes init_req, init_resp, cookie;
  Identity remote_id;
  unsigned cookie_tries = 0, ke_tries = 0;
  bool no_reinit = false;

  uint32_t my_mid = 0;    // next request ID we send
  uint32_t peer_mid = 0;  // next request ID we expect
  bool req_active = false;
  uint8_t req_kind = 0, req_exchange = 0;
  uint32_t req_mid = 0, req_child = 0, req_tries = 0;
  Bytes req_cookie2;
  std::vector<Bytes> req_msg;  // one datagram, or the fragments of one message
  std::deque<Request> queue;
  bool has_resp = false;
  std::vector<Bytes> resp_msg;
  Bytes req_hash;
  bool peer_frag = false;  // the peer sent IKEV2_FRAGMENTATION_SUPPORTED
  // MOBIKE (RFC 4555) negotiated in IKE_AUTH; `original_initiator`: we sent
  // that IKE_AUTH (only that end sends UPDATE_SA_ADDRESSES, §3.1). Both pass
  // to the IKE SAs that rekey this one.
  bool mobike = false, original_initiator = false;
  Endpoint rx_local, rx_remote;  // where the request being processed came to/from
  // RFC 4555 §3.7 return routability check under way: the IKE SA talks to
  // its new address already; the CHILD SAs stay at `dp_*` (what the data
  // path uses) until the INFORMATIONAL carrying `rr_cookie` is answered with
  // it. New CHILD SAs get `dp_*` too meanwhile.
  bool rr_pending = false;
  Bytes rr_cookie;
  Endpoint dp_local, dp_remote;
  bool dp_encap = false;
  bool rr_start = false;  // send the check once the message being processed is dealt with
  bool reinit_on_delete = false;  // our delete of it answered: a `start` tunnel re-initiates
  struct {
    uint32_t mid = 0;
    bool response = false;
    uint16_t total = 0;
    uint8_t first = 0;
    Bytes first_raw;
    std::map<uint16_t, Bytes> parts;
  } frag;

  std::vector<ChildSa> children;
  uint32_t pending_spi = 0;  // our inbound SPI of the CHILD SA we are negotiating
  Bytes pending_nonce;
  std::unique_ptr<Dh> pending_dh;  // PFS: our KE of the CHILD rekey we initiated
  // CHILD rekeys the peer initiated and we answered: the new SA is installed,
  // our outbound still uses the old one until the peer shows it has the new
  // one (its next request) — see EngineOptions::rekey_switch_ms.
  struct PeerRekey {
    uint32_t old_in = 0, new_in = 0;
    Bytes ni, nr;           // the exchange's nonces, for the collision rule (§2.8.1)
    bool collided = false;  // it crossed our own rekey of the same SA
  };
  std::vector<PeerRekey> peer_rekeys;
  std::vector<uint32_t> replaced;  // spi_in of CHILD SAs a rekey replaced (outbound moved on)
  bool is_replaced(uint32_t spi_in) const {
    return std::find(replaced.begin(), replaced.end(), spi_in) != replaced.end();
  }

  uint64_t created_ms = 0, established_ms = 0, last_heard_ms = 0;
  uint32_t timer_gen[8] = {};
  // Our IKE SA rekey in flight: the new SA's SPI, nonce and DH key.
  uint64_t rekey_spi = 0;
  Bytes rekey_ni;
  std::unique_ptr<Dh> rekey_dh;
  // §2.8.2: the peer rekeyed this IKE SA while our rekey of it was on the
  // wire; our SPI of the new SA its exchange made (the CHILD SAs live there
  // until our answer settles which new SA survives).
  uint64_t peer_rekey_spi = 0;
  // An SA the peer is to delete (a collision's redundant new SA it made, or
  // the old SA when the peer's rekey won); we delete it ourselves after
  // half_open_timeout_ms if it does not.
  bool awaiting_delete = false;

  uint64_t our_spi() const { return initiator ? spi_i : spi_r; }
  ByteView ke_out() const { return initiator ? keys.sk_ei : keys.sk_er; }
  ByteView ka_out() const { return initiator ? keys.sk_ai : keys.sk_ar; }
  ByteView ke_in() const { return initiator ? keys.sk_er : keys.sk_ei; }
  ByteView ka_in() const { return initiator ? keys.sk_ar : keys.sk_ai; }
  std::string who() const {
    std::string n = peer ? fmt::format("tunnel \"{}\"", peer->name) : std::string("unknown peer");
    if (remote_id.type) n += fmt::format(" (id \"{}\")", remote_id.str());
    return n + " at " + remote.str();
  }
};

namespace {
// Not replaced by a rekey of ours, nor by one of the peer's awaiting the switch.
bool rekeyable(const Engine::IkeSa& sa, const ChildSa& c) {
  return !sa.is_replaced(c.spi_in) &&
         std::none_of(sa.peer_rekeys.begin(), sa.peer_rekeys.end(), [&](auto& r) { return r.old_in == c.spi_in; });
}
}  // namespace

nlohmann::ordered_json Stats::json() const {
  nlohmann::ordered_json j;
#define X(name, desc) j[#name] = name;
  MOAT_IKE_COUNTERS(X)
#undef X
  return j;
}

Engine::Engine(Transport& t, ChildSaSink& sink, EngineOptions opts, LogFn log)
    : transport_(t), sink_(sink), opts_(opts), log_(std::move(log)) {}

Engine::~Engine() = default;

void Engine::log(const std::string& s) const {
  if (log_) log_(s);
  else fmt::print(stderr, "ike: {}\n", s);
}

// ---------------------------------------------------------------- config
void Engine::set_peers(std::vector<PeerConfig> peers, uint64_t now_ms) {
  now_ = now_ms;
  std::vector<std::shared_ptr<const PeerConfig>> next;
  for (auto& p : peers) next.push_back(std::make_shared<const PeerConfig>(std::move(p)));
  // SAs keep their own shared_ptr to the old record; re-point them or delete
  // them when their tunnel is gone.
  std::vector<uint64_t> gone;
  for (auto& kv : sas_) {
    IkeSa& sa = *kv.second;
    if (!sa.peer) continue;
    auto it = std::find_if(next.begin(), next.end(), [&](auto& p) { return p->name == sa.peer->name; });
    if (it == next.end()) gone.push_back(kv.first);
    else sa.peer = *it;
  }
  peers_ = std::move(next);
  peer_by_name_.clear();
  peer_by_id_.clear();
  certreq_peer_ = nullptr;
  for (size_t i = 0; i < peers_.size(); ++i) {
    peer_by_name_.emplace(peers_[i]->name, i);  // the first of a name wins, as the scan did
    peer_by_id_[peers_[i]->remote_id.key()].push_back(i);
    if (!certreq_peer_ && peers_[i]->creds) certreq_peer_ = peers_[i].get();
  }
  for (auto spi : gone) delete_sa(spi, "its tunnel was removed from the configuration", false);
  responder_ike_.clear();
  for (auto& p : peers_)
    for (auto& pr : p->ike_proposals) {
      bool dup = std::any_of(responder_ike_.begin(), responder_ike_.end(),
                             [&](auto& q) { return q.transforms == pr.transforms; });
      if (!dup) responder_ike_.push_back(pr);
    }
  std::erase_if(reinit_, [&](auto& kv) { return !find_peer(kv.first); });
  for (auto& p : peers_)
    if (p->start && p->remote && !find_established(p->name) && !reinit_.count(p->name)) reinit_[p->name] = {now_ms, 0};
}

std::shared_ptr<const PeerConfig> Engine::find_peer(const std::string& name) const {
  auto it = peer_by_name_.find(name);
  return it == peer_by_name_.end() ? nullptr : peers_[it->second];
}

std::shared_ptr<const PeerConfig> Engine::find_peer_by_id(const Identity& id, const std::optional<Identity>& idr) const {
  auto it = peer_by_id_.find(id.key());
  if (it == peer_by_id_.end()) return nullptr;
  for (size_t i : it->second)
    if (peers_[i]->remote_id.matches(id) && (!idr || peers_[i]->local_id.matches(*idr))) return peers_[i];
  for (size_t i : it->second)
    if (peers_[i]->remote_id.matches(id)) return peers_[i];
  return nullptr;
}

void Engine::index_sa(const IkeSa& sa) {
  if (sa.peer) sas_by_tunnel_[sa.peer->name].push_back(sa.our_spi());
}

std::vector<uint64_t> Engine::tunnel_sas(const std::string& tunnel) {
  auto it = sas_by_tunnel_.find(tunnel);
  if (it == sas_by_tunnel_.end()) return {};
  std::erase_if(it->second, [&](uint64_t spi) {
    auto s = sas_.find(spi);
    return s == sas_.end() || !s->second->peer || s->second->peer->name != tunnel;
  });
  std::vector<uint64_t> out = it->second;
  if (out.empty()) sas_by_tunnel_.erase(it);
  return out;
}

Engine::IkeSa* Engine::find_established(const std::string& tunnel) {
  for (uint64_t spi : tunnel_sas(tunnel))
    if (auto& sa = sas_.at(spi); sa->state == State::established) return sa.get();
  return nullptr;
}

// ---------------------------------------------------------------- I/O
void Engine::send_to(const Endpoint& local, const Endpoint& remote, const Bytes& msg) {
  ++stats_.tx_datagrams;
  if (local.port == kIkePort) {
    transport_.send(local, remote, msg);
    return;
  }
  // Off port 500 every IKE message carries the non-ESP marker (RFC 3948 §2.2).
  Bytes m(4, 0);
  m.insert(m.end(), msg.begin(), msg.end());
  transport_.send(local, remote, m);
}

void Engine::send_raw(IkeSa& sa, const Bytes& msg) { send_to(sa.local, sa.remote, msg); }

void Engine::send_all(IkeSa& sa, const std::vector<Bytes>& msgs) {
  for (auto& m : msgs) send_raw(sa, m);
}

std::vector<Bytes> Engine::seal(IkeSa& sa, const Header& h, const ChainBuilder& chain) {
  const Bytes& inner = chain.bytes();
  size_t overhead = kHeaderLen + 8 + sa.suite.iv_len() + sa.suite.icv_len() + sa.suite.block_len() + 4;
  if (!sa.peer_frag || kHeaderLen + 4 + inner.size() + overhead <= opts_.fragment_size ||
      opts_.fragment_size <= overhead + 16)
    return {sk_seal(sa.suite, sa.ke_out(), sa.ka_out(), h, chain.first(), inner)};
  size_t chunk = opts_.fragment_size - overhead;
  uint16_t total = uint16_t((inner.size() + chunk - 1) / chunk);
  std::vector<Bytes> out;
  for (uint16_t n = 1; n <= total; ++n) {
    size_t off = size_t(n - 1) * chunk, len = std::min(chunk, inner.size() - off);
    out.push_back(sk_seal(sa.suite, sa.ke_out(), sa.ka_out(), h, n == 1 ? chain.first() : 0,
                          ByteView(inner.data() + off, len), n, total));
  }
  stats_.tx_fragments += total;
  return out;
}

void Engine::respond_plain_error(const Endpoint& local, const Endpoint& remote, const Header& req, uint16_t notify,
                                 ByteView data) {
  Header h;
  h.spi_i = req.spi_i;
  h.spi_r = 0;
  h.exchange = req.exchange;
  h.flags = kFlagResponse;
  h.mid = req.mid;
  ChainBuilder c;
  c.add_notify(notify, data);
  send_to(local, remote, encode_plain(h, c));
}

void Engine::receive(const Endpoint& local, const Endpoint& remote, ByteView b, uint64_t now_ms) {
  now_ = now_ms;
  ++stats_.rx_datagrams;
  if (local.port != kIkePort) {
    if (b.size() == 1 && b[0] == 0xff) {
      ++stats_.rx_keepalive;
      return;
    }
    if (b.size() < 4 || get32(b.data()) != 0) {
      ++stats_.rx_esp_on_ike_port;
      return;
    }
    b = b.subspan(4);
  }
  auto m = parse_message(b);
  if (!m) {
    auto& e = m.error();
    if (e.notify == kNUnsupportedCriticalPayload) ++stats_.rx_unsupported_critical;
    else ++stats_.rx_malformed;
    // Only an unauthenticated IKE_SA_INIT request gets an answer in the clear;
    // anything else could be forged to make us talk.
    auto h = parse_header(b);
    if (b.size() >= kHeaderLen && b[18] == uint8_t(Exchange::ike_sa_init) && !(b[19] & kFlagResponse) &&
        (e.notify == kNUnsupportedCriticalPayload || e.notify == kNInvalidMajorVersion)) {
      Header hh;
      hh.spi_i = get64(b.data());
      hh.exchange = b[18];
      hh.mid = get32(b.data() + 20);
      Bytes data;
      if (e.notify == kNUnsupportedCriticalPayload) data.push_back(e.payload);
      respond_plain_error(local, remote, hh, e.notify, data);
    }
    log(fmt::format("from {}: malformed message: {}", remote.str(), e.why));
    return;
  }
  const Header& h = m->h;
  if (h.exchange == uint8_t(Exchange::ike_sa_init) && !h.response()) {
    init_request(local, remote, *m);
    return;
  }
  uint64_t ours = h.from_initiator() ? h.spi_r : h.spi_i;
  auto it = sas_.find(ours);
  if (it == sas_.end() || it->second->spi_i != h.spi_i ||
      (h.exchange != uint8_t(Exchange::ike_sa_init) && it->second->spi_r != h.spi_r) ||
      it->second->initiator == h.from_initiator()) {
    ++stats_.rx_unknown_spi;
    return;
  }
  IkeSa& sa = *it->second;
  if (h.response()) {
    if (!sa.req_active || h.mid != sa.req_mid || h.exchange != sa.req_exchange) {
      ++stats_.rx_unexpected_response;
      return;
    }
    if (h.exchange == uint8_t(Exchange::ike_sa_init)) {
      init_response(sa, *m);
      return;
    }
  } else {
    if (sa.has_resp && h.mid + 1 == sa.peer_mid) {
      // A retransmitted request: answer with the same bytes (§2.1), but only
      // if it is the very same request. A fragmented one is recognised by its
      // first fragment; the others pass in silence (RFC 7383 §2.6.1).
      if (m->payloads.size() == 1 && m->payloads[0].type == kPlSkf && m->payloads[0].body.size() >= 2 &&
          get16(m->payloads[0].body.data()) != 1)
        return;
      if (sha1(m->raw) == sa.req_hash) {
        ++stats_.rx_retransmit;
        for (auto& r : sa.resp_msg) send_to(local, remote, r);
      } else {
        ++stats_.rx_out_of_window;
      }
      return;
    }
    if (h.mid != sa.peer_mid || sa.state == State::init_sent) {
      ++stats_.rx_out_of_window;
      return;
    }
  }
  handle_encrypted(sa, *m, local, remote);
}

void Engine::handle_encrypted(IkeSa& sa, const Message& m, const Endpoint& local, const Endpoint& remote) {
  const Header& h = m.h;
  if (!m.sk_offset || m.payloads.size() != 1) {  // SK or SKF, and nothing in the clear
    ++stats_.rx_malformed;
    log(fmt::format("{}: {} {} without (only) an encrypted payload; dropped", sa.who(), exchange_name(h.exchange),
                    h.response() ? "response" : "request"));
    return;
  }
  bool fragment = m.payloads[0].type == kPlSkf;
  uint16_t frag_num = 0, frag_total = 0;
  if (fragment) {
    auto& b = m.payloads[0].body;
    if (b.size() < 4 || (frag_num = get16(b.data())) == 0 || (frag_total = get16(b.data() + 2)) < frag_num ||
        frag_total > 64 || h.exchange == uint8_t(Exchange::ike_sa_init)) {
      ++stats_.rx_malformed;
      return;
    }
  }
  auto pt = sk_open(sa.suite, sa.ke_in(), sa.ka_in(), m);
  if (!pt) {
    ++stats_.rx_bad_icv;
    log(fmt::format("{}: {} {}: {}; dropped", sa.who(), exchange_name(h.exchange), h.response() ? "response" : "request",
                    pt.error()));
    return;
  }
  Message whole;  // the reassembled message, when `m` is its last missing fragment
  const Message* msg = &m;
  uint8_t first = m.sk_next;
  if (fragment) {
    ++stats_.rx_fragments;
    auto& f = sa.frag;
    if (f.mid != h.mid || f.response != h.response() || f.total != frag_total) {
      f.parts.clear();
      f.mid = h.mid;
      f.response = h.response();
      f.total = frag_total;
    }
    if (frag_num == 1) {
      f.first = m.sk_next;
      f.first_raw = m.raw;
    }
    f.parts[frag_num] = std::move(*pt);
    if (f.parts.size() < f.total) return;
    Bytes all;
    for (auto& [n, part] : f.parts) all.insert(all.end(), part.begin(), part.end());
    *pt = std::move(all);
    first = f.first;
    whole.h = h;
    whole.raw = std::move(f.first_raw);  // what a retransmission is recognised by
    msg = &whole;
    f.parts.clear();
    f.total = 0;
  }
  sa.last_heard_ms = now_;
  // Authenticated traffic from a new address moves the SA (§2.23) — the
  // float to 4500 before IKE_AUTH, or a moat whose ISP changed its address.
  // On a MOBIKE SA the CHILD SAs follow only after a return routability
  // check (RFC 4555 §3.7), and an UPDATE_SA_ADDRESSES does the move itself.
  bool moved_here = !(remote == sa.remote) || !(local == sa.local);
  bool mobike_move = moved_here && sa.state == State::established && sa.mobike;
  if (moved_here && !mobike_move) {
    if (sa.state != State::established || sa.nat_local || sa.nat_remote) {
      if (sa.state == State::established)
        log(fmt::format("{}: peer moved to {}", sa.who(), remote.str()));
      move_sa(sa, local, remote);
    }
  }
  sa.rx_local = local;
  sa.rx_remote = remote;
  uint64_t spi = sa.our_spi();
  auto inner = parse_chain(first, *pt);
  if (!inner) {
    if (inner.error().notify == kNUnsupportedCriticalPayload) ++stats_.rx_unsupported_critical;
    else ++stats_.rx_malformed;
    log(fmt::format("{}: {} {}: {}", sa.who(), exchange_name(h.exchange), h.response() ? "response" : "request",
                    inner.error().why));
    if (!h.response()) {
      ChainBuilder c;
      Bytes data;
      if (inner.error().notify == kNUnsupportedCriticalPayload) data.push_back(inner.error().payload);
      c.add_notify(inner.error().notify, data);
      respond(sa, h, c);
      if (sa.state != State::established) delete_sa(spi, "malformed IKE_AUTH", false);
    }
    return;
  }
  if (mobike_move && (sa.nat_local || sa.nat_remote)) {
    bool update = !h.response() && std::any_of(inner->begin(), inner->end(), [](auto& x) {
      auto n = x.type == kPlNotify ? parse_notify(x.body) : Parsed<NotifyPayload>(tl::unexpect, ParseError{});
      return n && n->type == kNUpdateSaAddresses;
    });
    if (!update) {
      log(fmt::format("{}: peer moved to {}", sa.who(), remote.str()));
      move_peer(sa, local, remote);
    }
  }
  auto checks = [&] {  // after the message is dealt with (answered first)
    if (auto it = sas_.find(spi); it != sas_.end() && it->second->rr_start) start_return_routability(*it->second);
  };
  if (h.response()) {
    uint8_t kind = sa.req_kind;
    uint32_t child = sa.req_child;
    sa.req_active = false;
    disarm(sa, TimerKind::retransmit);
    switch (kind) {
      case kReqAuth: auth_response(sa, *inner); break;
      case kReqDeleteIke: delete_sa(spi, "deleted by us", sa.reinit_on_delete); return;
      case kReqDeleteChild: retire_child(sa, child); break;
      case kReqRekeyChild: create_child_response(sa, *inner); break;
      case kReqRekeyIke: rekey_ike_response(sa, *inner); break;
      case kReqDpd: break;
      case kReqReturnRoutability: {
        std::optional<Bytes> echo;
        for (auto& x : *inner)
          if (auto n = x.type == kPlNotify ? parse_notify(x.body) : Parsed<NotifyPayload>(tl::unexpect, ParseError{});
              n && n->type == kNCookie2)
            echo = n->data;
        if (!sa.rr_pending || sa.req_cookie2 != sa.rr_cookie) break;  // a newer check decides
        if (!echo || !equal_ct(*echo, sa.rr_cookie)) {
          ++stats_.mobike_check_failed;
          log(fmt::format("{}: return routability check of {}: {}; the CHILD SAs stay at {}", sa.who(),
                          sa.remote.str(), echo ? "COOKIE2 does not match" : "no COOKIE2 in the answer",
                          sa.dp_remote.str()));
          sa.rr_cookie.clear();  // the peer's next move checks again
          break;
        }
        sa.rr_pending = false;
        log(fmt::format("{}: the peer answered the return routability check at {}: the CHILD SAs move there", sa.who(),
                        sa.remote.str()));
        move_sa(sa, sa.local, sa.remote);
        break;
      }
      case kReqUpdateAddresses: {
        // The answer's NAT detection says whether the new path has a NAT (RFC 4555 §3.8).
        bool saw_src = false, src_ok = false, saw_dst = false, dst_ok = false;
        for (auto& x : *inner) {
          auto n = x.type == kPlNotify ? parse_notify(x.body) : Parsed<NotifyPayload>(tl::unexpect, ParseError{});
          if (!n) continue;
          if (n->type <= kNErrorMax)
            log(fmt::format("{}: UPDATE_SA_ADDRESSES answered {}{}", sa.who(), notify_name(n->type),
                            n->type == kNUnexpectedNatDetected ? ": the peer refuses the NAT on our new path and did not move"
                                                               : ""));
          if (n->type == kNUnexpectedNatDetected) ++stats_.mobike_nat_refused;
          if (n->type == kNNatDetectionSourceIp) saw_src = true, src_ok |= n->data == nat_hash(sa.spi_i, sa.spi_r, sa.remote);
          if (n->type == kNNatDetectionDestinationIp) saw_dst = true, dst_ok |= n->data == nat_hash(sa.spi_i, sa.spi_r, sa.local);
        }
        if (saw_src || saw_dst) {
          bool nat_remote = saw_src && !src_ok, nat_local = saw_dst && !dst_ok;
          if (nat_remote != sa.nat_remote || nat_local != sa.nat_local) {
            sa.nat_remote = nat_remote;
            sa.nat_local = nat_local;
            move_sa(sa, sa.local, sa.remote);  // the CHILD SAs' udp_encap follows
          }
        }
        break;
      }
    }
    auto it = sas_.find(spi);
    if (it != sas_.end()) pump(*it->second);
    checks();
    return;
  }
  // A request after our answer to the peer's CHILD rekey: the peer has
  // processed that answer (window of one, §2.3), so it has the new SA.
  if (!sa.peer_rekeys.empty()) switch_to_peer_rekeys(sa, &*inner);
  switch (Exchange(h.exchange)) {
    case Exchange::ike_auth: auth_request(sa, *msg, *inner); break;
    case Exchange::informational: informational_request(sa, *msg, *inner); break;
    case Exchange::create_child_sa: create_child_request(sa, *msg, *inner); break;
    default: {
      ChainBuilder c;
      c.add_notify(kNInvalidSyntax);
      respond(sa, h, c);
    }
  }
  checks();
}

void Engine::move_peer(IkeSa& sa, const Endpoint& local, const Endpoint& remote) {
  bool check = sa.peer && sa.peer->mobike_check && !sa.children.empty() && !(sa.children.front().remote == remote);
  if (!check) {
    sa.rr_pending = false;
    move_sa(sa, local, remote);
    return;
  }
  // A check of this very address under way covers it (strongSwan probes the
  // new path, then sends UPDATE_SA_ADDRESSES from it).
  if (sa.rr_pending && !sa.rr_cookie.empty() && sa.remote == remote && sa.local == local) return;
  if (!sa.rr_pending) {
    sa.dp_local = sa.children.front().local;
    sa.dp_remote = sa.children.front().remote;
    sa.dp_encap = sa.children.front().udp_encap;
  }
  sa.local = local;  // the IKE SA only: its requests and answers go there now
  sa.remote = remote;
  sa.rr_pending = true;
  sa.rr_cookie = random_bytes(16);
  sa.rr_start = true;
}

void Engine::start_return_routability(IkeSa& sa) {
  sa.rr_start = false;
  if (!sa.rr_pending || sa.state != State::established) return;
  ++stats_.mobike_checks;
  log(fmt::format("{}: checking that the peer receives at {} (COOKIE2) before its CHILD SAs move there from {}",
                  sa.who(), sa.remote.str(), sa.dp_remote.str()));
  ChainBuilder c;
  c.add_notify(kNCookie2, sa.rr_cookie);
  sa.queue.push_back(Request{uint8_t(Exchange::informational), std::move(c), kReqReturnRoutability, 0, sa.rr_cookie});
  pump(sa);
}

void Engine::move_sa(IkeSa& sa, const Endpoint& local, const Endpoint& remote) {
  sa.remote = remote;
  sa.local = local;
  for (auto& c : sa.children) {
    c.local = local;
    c.remote = remote;
    c.udp_encap = sa.nat_local || sa.nat_remote;
    sink_.moved(c);
  }
}

void Engine::respond(IkeSa& sa, const Header& req, const ChainBuilder& chain) {
  Header h;
  h.spi_i = sa.spi_i;
  h.spi_r = sa.spi_r;
  h.exchange = req.exchange;
  h.flags = uint8_t(kFlagResponse | (sa.initiator ? kFlagInitiator : 0));
  h.mid = req.mid;
  auto msgs = seal(sa, h, chain);
  // To where the request came from (§2.11), even when the SA did not move there.
  for (auto& m : msgs) send_to(sa.rx_local, sa.rx_remote, m);
  sa.has_resp = true;
  sa.resp_msg = std::move(msgs);
  sa.peer_mid = req.mid + 1;
}

void Engine::queue_request(IkeSa& sa, uint8_t exchange, ChainBuilder chain, uint8_t kind, uint32_t child_spi) {
  sa.queue.push_back(Request{exchange, std::move(chain), kind, child_spi});
  pump(sa);
}

void Engine::pump(IkeSa& sa) {
  if (sa.req_active || sa.queue.empty()) return;
  Request r = std::move(sa.queue.front());
  sa.queue.pop_front();
  Header h;
  h.spi_i = sa.spi_i;
  h.spi_r = sa.spi_r;
  h.exchange = r.exchange;
  h.flags = sa.initiator ? kFlagInitiator : 0;
  h.mid = sa.my_mid++;
  sa.req_msg = seal(sa, h, r.chain);
  sa.req_active = true;
  sa.req_kind = r.kind;
  sa.req_exchange = r.exchange;
  sa.req_mid = h.mid;
  sa.req_child = r.child_spi;
  sa.req_cookie2 = std::move(r.cookie2);
  sa.req_tries = 0;
  send_all(sa, sa.req_msg);
  arm(sa, TimerKind::retransmit, now_ + opts_.retransmit_base_ms);
}

// ---------------------------------------------------------------- timers
void Engine::arm(IkeSa& sa, TimerKind k, uint64_t when) {
  uint32_t g = ++sa.timer_gen[unsigned(k)];
  timers_.push(Timer{when, sa.our_spi(), k, g});
}

void Engine::disarm(IkeSa& sa, TimerKind k) { ++sa.timer_gen[unsigned(k)]; }

uint64_t Engine::next_deadline() const {
  uint64_t t = timers_.empty() ? UINT64_MAX : timers_.top().when;
  for (auto& [name, r] : reinit_) t = std::min(t, r.at);
  if (!lingering_.empty()) t = std::min(t, lingering_.begin()->first);
  return t;
}

void Engine::tick(uint64_t now_ms) {
  now_ = now_ms;
  while (!timers_.empty() && timers_.top().when <= now_ms) {
    Timer t = timers_.top();
    timers_.pop();
    auto it = sas_.find(t.spi);
    if (it == sas_.end() || it->second->timer_gen[unsigned(t.kind)] != t.gen) continue;
    fire(*it->second, t.kind);
  }
  while (!lingering_.empty() && lingering_.begin()->first <= now_ms) {
    ChildSa c = std::move(lingering_.begin()->second);
    lingering_.erase(lingering_.begin());
    sink_.remove(c);
    ++stats_.child_removed;
    child_spis_.erase(c.spi_in);
  }
  for (auto& entry : reinit_) {
    const std::string& name = entry.first;
    Reinit& r = entry.second;
    if (r.at > now_ms) continue;
    // The entry stays (with its backoff) until an SA for the tunnel is established.
    r.at = UINT64_MAX;
    auto spis = tunnel_sas(name);
    bool busy = std::any_of(spis.begin(), spis.end(), [&](uint64_t s) { return sas_.at(s)->state != State::deleting; });
    if (busy) continue;
    if (auto ok = initiate(name, now_ms); !ok) {
      log(fmt::format("tunnel \"{}\": cannot initiate: {}", name, ok.error()));
      schedule_reinit(name, true);
    }
  }
}

void Engine::fire(IkeSa& sa, TimerKind k) {
  switch (k) {
    case TimerKind::retransmit: {
      if (!sa.req_active) return;
      if (sa.req_tries >= opts_.retransmit_tries) {
        ++stats_.ike_given_up;
        log(fmt::format("{}: no answer to {} after {} retransmits; IKE SA given up", sa.who(),
                        exchange_name(sa.req_exchange), sa.req_tries));
        delete_sa(sa.our_spi(), "peer did not answer", !sa.no_reinit);
        return;
      }
      ++sa.req_tries;
      ++stats_.tx_retransmits;
      send_all(sa, sa.req_msg);
      uint64_t rto = uint64_t(opts_.retransmit_base_ms) << std::min<uint32_t>(sa.req_tries, 16);
      arm(sa, TimerKind::retransmit, now_ + rto);
      return;
    }
    case TimerKind::half_open:
      if (sa.state == State::half_open) {
        ++stats_.half_open_expired;
        delete_sa(sa.our_spi(), "half-open IKE SA expired", false);
      } else if (sa.awaiting_delete) {
        delete_sa(sa.our_spi(), "replaced by a rekey; the peer did not delete it", false);
      }
      return;
    case TimerKind::dpd: {
      if (sa.state != State::established || !sa.peer || !sa.peer->dpd_s) return;
      uint64_t due = sa.last_heard_ms + uint64_t(sa.peer->dpd_s) * 1000;
      if (now_ >= due) {
        if (!sa.req_active && sa.queue.empty()) queue_request(sa, uint8_t(Exchange::informational), ChainBuilder(), kReqDpd);
        due = now_ + uint64_t(sa.peer->dpd_s) * 1000;
      }
      arm(sa, TimerKind::dpd, due);
      return;
    }
    case TimerKind::child_rekey:
      child_timers(sa);
      return;
    case TimerKind::ike_expire: {
      if (sa.state != State::established || !sa.peer) return;
      ++stats_.ike_expired;
      log(fmt::format("{}: IKE SA {:016x}_i {:016x}_r reached its lifetime without a rekey; deleting it{}", sa.who(),
                      sa.spi_i, sa.spi_r, sa.peer->start ? " and initiating a new one" : ""));
      sa.state = State::deleting;
      sa.reinit_on_delete = sa.peer->start;
      sa.queue.clear();
      ChainBuilder d;
      d.add(kPlDelete, encode_delete(DeletePayload{kProtoIke, {}}));
      // Behind a request on the wire that is never answered, the retransmits'
      // give-up deletes it (and re-initiates a `start` tunnel).
      queue_request(sa, uint8_t(Exchange::informational), std::move(d), kReqDeleteIke);
      return;
    }
    case TimerKind::ike_rekey:
      if (sa.state == State::established && sa.peer) (void)rekey_ike(sa.peer->name, now_);
      return;
    case TimerKind::rekey_switch:
      if (!sa.peer_rekeys.empty()) {
        stats_.rekey_switch_timeouts += sa.peer_rekeys.size();
        log(fmt::format("{}: no request from the peer since it rekeyed; switching to the new CHILD SA anyway", sa.who()));
        switch_to_peer_rekeys(sa, nullptr);
      }
      return;
    case TimerKind::kinds: return;
  }
}

void Engine::schedule_reinit(const std::string& name, bool failed) {
  auto p = find_peer(name);
  if (!p || !p->start || !p->remote || find_established(name)) return;
  auto& r = reinit_[name];
  r.backoff_ms = failed ? std::clamp(r.backoff_ms * 2, opts_.reinit_min_ms, opts_.reinit_max_ms) : opts_.reinit_min_ms;
  // Jitter keeps thousands of moats from coming back in lock-step after a portal restart.
  uint32_t jitter = uint32_t(get32(random_bytes(4).data()) % (r.backoff_ms / 4 + 1));
  r.at = now_ + r.backoff_ms + jitter;
}

// ---------------------------------------------------------------- SA lifetime
void Engine::remove_children(IkeSa& sa) {
  for (auto& c : sa.children) {
    sink_.remove(c);
    ++stats_.child_removed;
    child_spis_.erase(c.spi_in);
  }
  sa.children.clear();
  sa.peer_rekeys.clear();
  sa.replaced.clear();
  if (sa.pending_spi) child_spis_.erase(sa.pending_spi);
  sa.pending_spi = 0;
  sa.pending_dh.reset();
}

void Engine::retire_child(IkeSa& sa, uint32_t spi_in) {
  auto it = std::find_if(sa.children.begin(), sa.children.end(), [&](auto& c) { return c.spi_in == spi_in; });
  if (it == sa.children.end()) {
    // Not (or no longer) ours: the redundant SA of a collision we never installed.
    if (!std::any_of(lingering_.begin(), lingering_.end(), [&](auto& kv) { return kv.second.spi_in == spi_in; }))
      child_spis_.erase(spi_in);
    return;
  }
  std::erase_if(sa.peer_rekeys, [&](auto& r) { return r.new_in == spi_in; });
  if (sa.is_replaced(spi_in)) {
    // Make-before-break, the break: the peer stopped sending with it a moment
    // ago, but what it sent just before may still be on the way (its ESP and
    // IKE travel separately: kernel-libipsec queues ESP in other threads).
    // The inbound half stays until the linger time is over; the outbound
    // half has not been used since rekeyed().
    std::erase(sa.replaced, spi_in);
    lingering_.emplace(now_ + opts_.rekey_linger_ms, std::move(*it));
  } else {
    sink_.remove(*it);
    ++stats_.child_removed;
    child_spis_.erase(it->spi_in);
  }
  sa.children.erase(it);
}

void Engine::switch_to_peer_rekeys(IkeSa& sa, const std::vector<Payload>* deleting) {
  auto pending = std::move(sa.peer_rekeys);
  sa.peer_rekeys.clear();
  disarm(sa, TimerKind::rekey_switch);
  for (auto& r : pending) {
    auto now = std::find_if(sa.children.begin(), sa.children.end(), [&](auto& c) { return c.spi_in == r.new_in; });
    if (now == sa.children.end()) continue;
    bool deleted = false;
    if (deleting)
      for (auto& x : *deleting)
        if (x.type == kPlDelete)
          if (auto d = parse_delete(x.body); d && d->protocol == kProtoEsp)
            for (auto& spi : d->spis) deleted |= get32(spi.data()) == now->spi_out;
    if (deleted) continue;  // the peer is deleting it (a collision's redundant SA): never send with it
    auto old = std::find_if(sa.children.begin(), sa.children.end(), [&](auto& c) { return c.spi_in == r.old_in; });
    if (old == sa.children.end()) continue;
    sa.replaced.push_back(old->spi_in);
    sink_.rekeyed(*old, *now);
  }
}

void Engine::delete_sa(uint64_t spi, const std::string& why, bool reinit) {
  auto it = sas_.find(spi);
  if (it == sas_.end()) return;
  IkeSa& sa = *it->second;
  remove_children(sa);
  if (sa.state == State::established || sa.state == State::deleting)
    log(fmt::format("{}: IKE SA {:016x}_i {:016x}_r deleted: {}", sa.who(), sa.spi_i, sa.spi_r, why));
  half_open_.erase({sa.spi_i, sa.remote.str()});
  std::string name = sa.peer ? sa.peer->name : "";
  bool was_established = sa.state == State::established;
  ++stats_.ike_deleted;
  sas_.erase(it);
  if (!name.empty()) (void)tunnel_sas(name);  // drops this SA's index entry
  if (reinit && !name.empty()) schedule_reinit(name, !was_established);
}

void Engine::fail(IkeSa& sa, const std::string& why) {
  log(fmt::format("{}: {}", sa.who(), why));
  delete_sa(sa.our_spi(), why, !sa.no_reinit);
}

void Engine::established(IkeSa& sa) {
  sa.state = State::established;
  sa.established_ms = now_;
  sa.last_heard_ms = now_;
  ++stats_.ike_established;
  disarm(sa, TimerKind::half_open);
  half_open_.erase({sa.spi_i, sa.remote.str()});
  log(fmt::format("{}: IKE SA {:016x}_i {:016x}_r established ({}, {}): {}", sa.who(), sa.spi_i, sa.spi_r,
                  sa.initiator ? "initiator" : "responder",
                  sa.nat_local || sa.nat_remote
                      ? fmt::format("NAT-T{}{}", sa.nat_local ? ", we are behind a NAT" : "",
                                    sa.nat_remote ? ", peer behind a NAT" : "")
                      : std::string("no NAT"),
                  sa.suite.str()));
  if (sa.peer) {
    reinit_.erase(sa.peer->name);
    if (sa.peer->dpd_s) arm(sa, TimerKind::dpd, now_ + uint64_t(sa.peer->dpd_s) * 1000);
    schedule_ike_rekey(sa);
    schedule_ike_expire(sa);
  }
}

void Engine::schedule_ike_rekey(IkeSa& sa) {
  // Either end rekeys (a responder-only tunnel does not rely on its peer);
  // when both do at once, §2.8.2's collision rule keeps one new IKE SA.
  if (!sa.peer || !sa.peer->ike_rekey_s) return;
  arm(sa, TimerKind::ike_rekey, now_ + jittered_ms(sa.peer->ike_rekey_s));
}

void Engine::schedule_ike_expire(IkeSa& sa) {
  if (!sa.peer) return;
  uint32_t life = sa.peer->ike_lifetime_s ? sa.peer->ike_lifetime_s : sa.peer->ike_rekey_s + sa.peer->ike_rekey_s / 10;
  if (life) arm(sa, TimerKind::ike_expire, now_ + uint64_t(life) * 1000);
}

uint32_t Engine::new_child_spi() {
  while (true) {
    uint32_t s = get32(random_bytes(4).data());
    // SPIs 1-255 are reserved (RFC 4303 §2.1).
    if (s > 255 && !child_spis_.count(s)) return s;
  }
}

std::optional<ChildSa> Engine::make_child(IkeSa& sa, bool we_initiated, const Suite& suite, uint32_t spi_in,
                                          uint32_t spi_out, std::vector<TrafficSelector> local_ts,
                                          std::vector<TrafficSelector> remote_ts, ByteView g_ir, ByteView ni,
                                          ByteView nr) {
  ChildSa c;
  c.id = next_child_id_++;
  c.tunnel = sa.peer ? sa.peer->name : "";
  c.peer_id = sa.remote_id;
  c.ike_spi_i = sa.spi_i;
  c.ike_spi_r = sa.spi_r;
  c.spi_in = spi_in;
  c.spi_out = spi_out;
  c.suite = suite;
  c.suite.dh = 0;
  auto k = derive_child_keys(suite, sa.suite.prf, sa.keys.sk_d, g_ir, ni, nr);
  // The exchange initiator's keys protect what it sends (§2.17).
  if (we_initiated) {
    c.encr_key_out = k.encr_i, c.integ_key_out = k.integ_i;
    c.encr_key_in = k.encr_r, c.integ_key_in = k.integ_r;
  } else {
    c.encr_key_out = k.encr_r, c.integ_key_out = k.integ_r;
    c.encr_key_in = k.encr_i, c.integ_key_in = k.integ_i;
  }
  c.local = sa.local;
  c.remote = sa.remote;
  c.udp_encap = sa.nat_local || sa.nat_remote;
  c.local_ts = std::move(local_ts);
  c.remote_ts = std::move(remote_ts);
  if (sa.peer) {
    c.hard_lifetime_s = sa.peer->child_lifetime_s;
    c.soft_lifetime_s = sa.peer->child_rekey_s ? sa.peer->child_rekey_s : sa.peer->child_lifetime_s * 9 / 10;
    if (c.soft_lifetime_s) c.rekey_at_ms = now_ + jittered_ms(c.soft_lifetime_s);
    if (c.hard_lifetime_s) c.expire_at_ms = now_ + uint64_t(c.hard_lifetime_s) * 1000;
  }
  if (sa.rr_pending) {  // the data path stays where it was until the peer's new address is checked
    c.local = sa.dp_local;
    c.remote = sa.dp_remote;
    c.udp_encap = sa.dp_encap;
  }
  return c;
}

void Engine::install_child(IkeSa& sa, ChildSa c) {
  child_spis_[c.spi_in] = sa.our_spi();
  log(fmt::format("{}: CHILD SA {:08x}_i {:08x}_o installed ({}{}): {} === {}", sa.who(), c.spi_in, c.spi_out,
                  c.suite.str(), c.udp_encap ? ", UDP-encapsulated" : "", ts_list(c.local_ts), ts_list(c.remote_ts)));
  sink_.install(c);
  ++stats_.child_installed;
  sa.children.push_back(std::move(c));
  schedule_child_rekey(sa);
}

void Engine::schedule_child_rekey(IkeSa& sa) {
  // Both ends keep their CHILD SAs fresh, whichever role they had: a
  // responder-only tunnel must not rely on its peer to rekey before the hard
  // lifetime. Two ends that rekey the same SA at once collide (§2.8.1) and
  // keep one SA.
  if (sa.state != State::established || !sa.peer) return;
  uint64_t next = UINT64_MAX;
  for (auto& c : sa.children) {
    if (c.expire_at_ms) next = std::min(next, c.expire_at_ms);
    // A rekey waits for the CHILD negotiation under way; its end reschedules.
    if (c.rekey_at_ms && !sa.pending_spi && rekeyable(sa, c)) next = std::min(next, c.rekey_at_ms);
  }
  if (next == UINT64_MAX) disarm(sa, TimerKind::child_rekey);
  else arm(sa, TimerKind::child_rekey, std::max(next, now_));
}

void Engine::child_timers(IkeSa& sa) {
  if (sa.state != State::established || !sa.peer) return;
  std::vector<uint32_t> expired;
  for (auto& c : sa.children)
    if (c.expire_at_ms && c.expire_at_ms <= now_) expired.push_back(c.spi_in);
  for (uint32_t in : expired) expire_child(sa, in);
  if (sa.state != State::established) return;
  if (!sa.pending_spi)
    for (auto& c : sa.children) {
      if (!c.rekey_at_ms || c.rekey_at_ms > now_ || !rekeyable(sa, c)) continue;
      uint32_t in = c.spi_in;
      log(fmt::format("{}: CHILD SA {:08x}_i {:08x}_o reached its soft lifetime; rekeying it ({})", sa.who(), c.spi_in,
                      c.spi_out, sa.initiator ? "we initiated the IKE SA" : "we responded to the IKE SA"));
      if (auto ok = start_child_rekey(sa, in); !ok) {
        log(fmt::format("{}: cannot rekey CHILD SA {:08x}_i: {}; trying again in a minute", sa.who(), in, ok.error()));
        for (auto& x : sa.children)
          if (x.spi_in == in) x.rekey_at_ms = now_ + 60000;
      }
      break;
    }
  schedule_child_rekey(sa);
}

void Engine::expire_child(IkeSa& sa, uint32_t spi_in) {
  auto it = std::find_if(sa.children.begin(), sa.children.end(), [&](auto& c) { return c.spi_in == spi_in; });
  if (it == sa.children.end()) return;
  ++stats_.child_expired;
  log(fmt::format("{}: CHILD SA {:08x}_i {:08x}_o reached its hard lifetime ({} s) without a rekey; deleting it",
                  sa.who(), it->spi_in, it->spi_out, it->hard_lifetime_s));
  ChildSa c = std::move(*it);
  sa.children.erase(it);
  std::erase(sa.replaced, spi_in);
  std::erase_if(sa.peer_rekeys, [&](auto& r) { return r.old_in == spi_in || r.new_in == spi_in; });
  // The data path stops at once; the peer hears of it as soon as the window allows.
  sink_.remove(c);
  ++stats_.child_removed;
  child_spis_.erase(spi_in);
  ChainBuilder d;
  d.add(kPlDelete, encode_delete(DeletePayload{kProtoEsp, {u32_bytes(spi_in)}}));
  queue_request(sa, uint8_t(Exchange::informational), std::move(d), kReqDeleteChild, spi_in);
  if (sa.children.empty() && !sa.pending_spi && sa.peer && sa.peer->start) {
    // We cannot create a CHILD SA outside IKE_AUTH: a new IKE SA brings one.
    log(fmt::format("{}: its last CHILD SA expired; deleting the IKE SA and initiating a new one", sa.who()));
    sa.state = State::deleting;
    sa.reinit_on_delete = true;
    ChainBuilder x;
    x.add(kPlDelete, encode_delete(DeletePayload{kProtoIke, {}}));
    queue_request(sa, uint8_t(Exchange::informational), std::move(x), kReqDeleteIke);
  }
}

// ---------------------------------------------------------------- initiator
tl::expected<void, std::string> Engine::initiate(const std::string& tunnel, uint64_t now_ms) {
  now_ = now_ms;
  auto p = find_peer(tunnel);
  if (!p) return tl::unexpected(fmt::format("no tunnel \"{}\"", tunnel));
  if (!p->remote) return tl::unexpected(fmt::format("tunnel \"{}\" has no remote address to initiate to", tunnel));
  auto src = p->local ? p->local : transport_.source_for(p->remote->addr);
  if (!src) return tl::unexpected(fmt::format("tunnel \"{}\": no route to {}", tunnel, p->remote->addr.str()));
  if (p->ike_proposals.empty()) return tl::unexpected(fmt::format("tunnel \"{}\" has no IKE proposal", tunnel));
  uint16_t group = 0;
  for (auto& t : p->ike_proposals[0].transforms)
    if (t.type == kTfDh) {
      group = t.id;
      break;
    }
  auto dh = Dh::create(group);
  if (!dh) return tl::unexpected(dh.error());
  auto sa = std::make_unique<IkeSa>();
  do sa->spi_i = get64(random_bytes(8).data());
  while (!sa->spi_i || sas_.count(sa->spi_i));
  sa->initiator = true;
  sa->peer = p;
  sa->local = Endpoint{*src, kIkePort};
  sa->remote = *p->remote;
  sa->ni = random_bytes(32);
  sa->dh = std::move(*dh);
  sa->created_ms = now_ms;
  sa->state = State::init_sent;
  IkeSa& r = *sa;
  sas_[sa->spi_i] = std::move(sa);
  index_sa(r);
  log(fmt::format("tunnel \"{}\": initiating to {} ({})", tunnel, r.remote.str(), proposals_str(p->ike_proposals)));
  send_init(r);
  return {};
}

void Engine::send_init(IkeSa& sa) {
  ChainBuilder c;
  if (!sa.cookie.empty()) c.add_notify(kNCookie, sa.cookie);
  c.add(kPlSa, encode_sa(sa.peer->ike_proposals));
  c.add(kPlKe, encode_ke(KePayload{sa.dh->group(), sa.dh->public_value()}));
  c.add(kPlNonce, sa.ni);
  c.add_notify(kNNatDetectionSourceIp, nat_hash(sa.spi_i, 0, sa.local));
  c.add_notify(kNNatDetectionDestinationIp, nat_hash(sa.spi_i, 0, sa.remote));
  if (sa.peer->creds) add_hash_algorithms(c);
  c.add_notify(kNFragmentationSupported);
  Header h;
  h.spi_i = sa.spi_i;
  h.exchange = uint8_t(Exchange::ike_sa_init);
  h.flags = kFlagInitiator;
  h.mid = 0;
  sa.init_req = encode_plain(h, c);
  sa.req_msg = {sa.init_req};
  sa.req_active = true;
  sa.req_kind = kReqInit;
  sa.req_exchange = h.exchange;
  sa.req_mid = 0;
  sa.req_tries = 0;
  sa.my_mid = 1;
  send_all(sa, sa.req_msg);
  arm(sa, TimerKind::retransmit, now_ + opts_.retransmit_base_ms);
}

void Engine::init_response(IkeSa& sa, const Message& m) {
  std::vector<NotifyPayload> notes;
  for (auto* p : m.all(kPlNotify))
    if (auto n = parse_notify(p->body)) notes.push_back(*n);
  for (auto& n : notes) {
    if (n.type == kNCookie) {
      // The answer to an older copy of our request (a retransmit crossed it).
      if (!sa.cookie.empty() && n.data == sa.cookie) return;
      if (++sa.cookie_tries > 3 || n.data.empty() || n.data.size() > 64) return fail(sa, "too many or bad COOKIEs");
      sa.cookie = n.data;
      disarm(sa, TimerKind::retransmit);
      send_init(sa);
      return;
    }
    if (n.type == kNInvalidKePayload) {
      uint16_t g = n.data.size() == 2 ? get16(n.data.data()) : 0;
      bool ours = std::any_of(sa.peer->ike_proposals.begin(), sa.peer->ike_proposals.end(), [&](auto& p) {
        return std::any_of(p.transforms.begin(), p.transforms.end(), [&](auto& t) { return t.type == kTfDh && t.id == g; });
      });
      if (!ours || ++sa.ke_tries > 2 || g == sa.dh->group())
        return fail(sa, fmt::format("peer wants DH group {}, which we did not offer", transform_name(kTfDh, g)));
      auto dh = Dh::create(g);
      if (!dh) return fail(sa, dh.error());
      sa.dh = std::move(*dh);
      log(fmt::format("{}: peer asked for {}; retrying", sa.who(), transform_name(kTfDh, g)));
      disarm(sa, TimerKind::retransmit);
      send_init(sa);
      return;
    }
    if (n.type == kNNoProposalChosen) {
      ++stats_.no_proposal_chosen;
      return fail(sa, fmt::format("NO_PROPOSAL_CHOSEN: the responder accepts none of ours: {}",
                                  proposals_str(sa.peer->ike_proposals)));
    }
    if (n.type <= kNErrorMax) return fail(sa, fmt::format("IKE_SA_INIT answered with {}", notify_name(n.type)));
  }
  auto* sap = m.find(kPlSa);
  auto* kep = m.find(kPlKe);
  auto* np = m.find(kPlNonce);
  if (!sap || !kep || !np || !m.h.spi_r) return fail(sa, "IKE_SA_INIT response lacks SA, KE, Nonce or SPI");
  auto props = parse_sa(sap->body);
  auto ke = parse_ke(kep->body);
  auto nr = parse_nonce(np->body);
  if (!props || !ke || !nr) return fail(sa, "IKE_SA_INIT response has a malformed SA, KE or Nonce");
  std::optional<Suite> suite;
  if (props->size() == 1) suite = accept_proposal((*props)[0], sa.peer->ike_proposals, false);
  if (!suite)
    return fail(sa, fmt::format("responder chose {}, which is not one of ours: {}", proposals_str(*props),
                                proposals_str(sa.peer->ike_proposals)));
  if (ke->group != suite->dh || ke->group != sa.dh->group())
    return fail(sa, fmt::format("responder's KE is {} but the chosen group is {}", transform_name(kTfDh, ke->group),
                                transform_name(kTfDh, suite->dh)));
  auto gir = sa.dh->derive(ke->data);
  if (!gir) return fail(sa, "responder's KE: " + gir.error());
  disarm(sa, TimerKind::retransmit);
  sa.req_active = false;
  // Our SPI stays the key; the responder's is learned now.
  sa.spi_r = m.h.spi_r;
  sa.suite = *suite;
  sa.nr = *nr;
  sa.keys = derive_ike_keys(sa.suite, *gir, sa.ni, sa.nr, sa.spi_i, sa.spi_r);
  sa.init_resp = m.raw;
  bool saw_src = false, src_ok = false, saw_dst = false, dst_ok = false;
  for (auto& n : notes) {
    if (n.type == kNNatDetectionSourceIp) {
      saw_src = true;
      src_ok |= n.data == nat_hash(sa.spi_i, sa.spi_r, sa.remote);
    } else if (n.type == kNNatDetectionDestinationIp) {
      saw_dst = true;
      dst_ok |= n.data == nat_hash(sa.spi_i, sa.spi_r, sa.local);
    }
  }
  sa.nat_remote = saw_src && !src_ok;
  sa.nat_local = saw_dst && !dst_ok;
  sa.peer_frag = std::any_of(notes.begin(), notes.end(), [](auto& n) { return n.type == kNFragmentationSupported; });
  // §2.23: once a NAT is seen, everything moves to 4500. RFC 4555 §3.2: an
  // initiator that offers MOBIKE moves too when the responder does NAT
  // traversal (it sent the detection payloads), NAT or not: IKE_AUTH is the
  // last chance to move without an exchange of its own, and a NAT met after
  // an address change must find IKE on 4500 already.
  bool float_for_mobike = sa.peer && sa.peer->mobike && saw_src && saw_dst;
  if (sa.nat_local || sa.nat_remote || float_for_mobike) {
    sa.local.port = kNattPort;
    if (sa.remote.port == kIkePort) sa.remote.port = kNattPort;
  }
  sa.state = State::auth_sent;
  send_auth(sa);
}

void Engine::send_auth(IkeSa& sa) {
  const PeerConfig& p = *sa.peer;
  sa.pending_spi = new_child_spi();
  child_spis_[sa.pending_spi] = sa.our_spi();
  Bytes idi = encode_id(p.local_id);
  Bytes octets = sa.init_req;
  octets.insert(octets.end(), sa.nr.begin(), sa.nr.end());
  Bytes mac = prf(sa.suite.prf, sa.keys.sk_pi, idi);
  octets.insert(octets.end(), mac.begin(), mac.end());
  ChainBuilder c;
  c.add(kPlIdi, idi);
  // INITIAL_CONTACT tells the peer to drop whatever it still holds for us (a
  // reboot on our side): seed 003 §6.1's stale SAs.
  auto spis = tunnel_sas(p.name);
  bool other = std::any_of(spis.begin(), spis.end(), [&](uint64_t s) {
    auto& o = sas_.at(s);
    return o.get() != &sa && o->state == State::established;
  });
  if (!other) c.add_notify(kNInitialContact);
  if (p.remote_id.type) c.add(kPlIdr, encode_id(p.remote_id));
  if (p.mobike) c.add_notify(kNMobikeSupported);
  auto auth = make_auth(p, sa.suite.prf, octets);
  if (!auth) return fail(sa, "cannot authenticate: " + auth.error());
  add_cert(c, p);
  if (p.creds) add_certreq(c, *p.creds);
  c.add(kPlAuth, encode_auth(*auth));
  c.add(kPlSa, encode_sa(without_dh(p.esp_proposals, u32_bytes(sa.pending_spi))));
  c.add(kPlTsi, encode_ts(p.local_ts));
  c.add(kPlTsr, encode_ts(p.remote_ts));
  queue_request(sa, uint8_t(Exchange::ike_auth), std::move(c), kReqAuth);
}

void Engine::auth_response(IkeSa& sa, const std::vector<Payload>& pl) {
  const PeerConfig& p = *sa.peer;
  uint16_t child_err = 0;
  for (auto& x : pl) {
    if (x.type != kPlNotify) continue;
    auto n = parse_notify(x.body);
    if (!n) continue;
    if (n->type <= kNErrorMax) {
      if (!child_error(n->type)) {
        if (n->type == kNAuthenticationFailed) ++stats_.auth_failed;
        return fail(sa, fmt::format("IKE_AUTH answered with {}", notify_name(n->type)));
      }
      child_err = n->type;
    }
  }
  const Payload *idp = nullptr, *authp = nullptr, *sap = nullptr, *tsip = nullptr, *tsrp = nullptr;
  for (auto& x : pl) {
    if (x.type == kPlIdr) idp = &x;
    if (x.type == kPlAuth) authp = &x;
    if (x.type == kPlSa) sap = &x;
    if (x.type == kPlTsi) tsip = &x;
    if (x.type == kPlTsr) tsrp = &x;
  }
  if (!idp || !authp) return fail(sa, "IKE_AUTH response lacks IDr or AUTH");
  auto idr = parse_id(idp->body);
  auto auth = parse_auth(authp->body);
  if (!idr || !auth) return fail(sa, "IKE_AUTH response has a malformed IDr or AUTH");
  sa.remote_id = *idr;
  if (p.remote_id.type && !idr->matches(p.remote_id)) {
    ++stats_.auth_failed;
    return fail(sa, fmt::format("responder is \"{}\", expected \"{}\"", idr->str(), p.remote_id.str()));
  }
  Bytes octets = sa.init_resp;
  octets.insert(octets.end(), sa.ni.begin(), sa.ni.end());
  Bytes mac = prf(sa.suite.prf, sa.keys.sk_pr, idp->body);
  octets.insert(octets.end(), mac.begin(), mac.end());
  if (auto ok = check_auth(p, sa.suite.prf, pl, *idr, *auth, octets); !ok) {
    ++stats_.auth_failed;
    return fail(sa, "responder's AUTH: " + ok.error());
  }
  sa.dh.reset();
  sa.original_initiator = true;
  sa.mobike = p.mobike && std::any_of(pl.begin(), pl.end(), [](auto& x) {
    auto n = x.type == kPlNotify ? parse_notify(x.body) : Parsed<NotifyPayload>(tl::unexpect, ParseError{});
    return n && n->type == kNMobikeSupported;
  });
  established(sa);
  uint32_t spi_in = sa.pending_spi;
  sa.pending_spi = 0;
  auto child_fail = [&](const std::string& why) {
    ++stats_.child_failed;
    child_spis_.erase(spi_in);
    log(fmt::format("{}: CHILD SA not created: {}", sa.who(), why));
  };
  if (child_err) {
    if (child_err == kNNoProposalChosen) ++stats_.no_proposal_chosen;
    return child_fail(fmt::format("responder answered {} (we offered {})", notify_name(child_err),
                                  proposals_str(without_dh(p.esp_proposals, {}))));
  }
  if (!sap || !tsip || !tsrp) return child_fail("IKE_AUTH response lacks SA, TSi or TSr");
  auto props = parse_sa(sap->body);
  auto tsi = parse_ts(tsip->body);
  auto tsr = parse_ts(tsrp->body);
  if (!props || !tsi || !tsr) return child_fail("malformed SA or TS in the IKE_AUTH response");
  std::optional<Suite> cs;
  if (props->size() == 1 && (*props)[0].spi.size() == 4)
    cs = accept_proposal((*props)[0], without_dh(p.esp_proposals, {}), true);
  if (!cs) return child_fail(fmt::format("responder chose {}, not one of ours", proposals_str(*props)));
  if (!within(*tsi, p.local_ts) || !within(*tsr, p.remote_ts))
    return child_fail(fmt::format("responder's selectors {} === {} are not within ours {} === {}", ts_list(*tsi),
                                  ts_list(*tsr), ts_list(p.local_ts), ts_list(p.remote_ts)));
  auto c = make_child(sa, true, *cs, spi_in, get32((*props)[0].spi.data()), *tsi, *tsr, {}, sa.ni, sa.nr);
  install_child(sa, std::move(*c));
}

// ---------------------------------------------------------------- responder
void Engine::init_request(const Endpoint& local, const Endpoint& remote, const Message& m) {
  const Header& h = m.h;
  if (h.spi_r != 0 || h.mid != 0) {
    ++stats_.rx_malformed;
    return;
  }
  if (auto it = half_open_.find({h.spi_i, remote.str()}); it != half_open_.end()) {
    auto s = sas_.find(it->second);
    if (s != sas_.end() && s->second->has_resp && sha1(m.raw) == s->second->req_hash) {
      ++stats_.rx_retransmit;
      for (auto& r : s->second->resp_msg) send_to(local, remote, r);
    } else {
      ++stats_.rx_out_of_window;
    }
    return;
  }
  auto* sap = m.find(kPlSa);
  auto* kep = m.find(kPlKe);
  auto* np = m.find(kPlNonce);
  auto props = sap ? parse_sa(sap->body) : Parsed<std::vector<Proposal>>(tl::unexpect, ParseError{});
  auto ke = kep ? parse_ke(kep->body) : Parsed<KePayload>(tl::unexpect, ParseError{});
  auto ni = np ? parse_nonce(np->body) : Parsed<Bytes>(tl::unexpect, ParseError{});
  if (!props || !ke || !ni) {
    ++stats_.rx_malformed;
    log(fmt::format("IKE_SA_INIT from {}: missing or malformed SA, KE or Nonce", remote.str()));
    respond_plain_error(local, remote, h, kNInvalidSyntax, {});
    return;
  }
  if (half_open_.size() >= opts_.max_half_open) {
    ++stats_.half_open_dropped;
    return;
  }
  if (half_open_.size() >= opts_.cookie_threshold) {
    // Stateless until the initiator proves it receives at its address (§2.6).
    // The secret changes every minute; the previous one stays valid for one more.
    if (cookie_secret_.empty() || now_ >= cookie_secret_at_ + 60000) {
      cookie_secret_old_ = cookie_secret_.empty() ? random_bytes(32) : cookie_secret_;
      cookie_secret_ = random_bytes(32);
      cookie_secret_at_ = now_;
    }
    Bytes got;
    for (auto* p : m.all(kPlNotify))
      if (auto n = parse_notify(p->body); n && n->type == kNCookie) got = n->data;
    bool ok = !got.empty() && (equal_ct(got, make_cookie(cookie_secret_, *ni, remote, h.spi_i)) ||
                               equal_ct(got, make_cookie(cookie_secret_old_, *ni, remote, h.spi_i)));
    if (!ok) {
      if (!got.empty()) ++stats_.cookie_bad;
      ++stats_.cookie_sent;
      respond_plain_error(local, remote, h, kNCookie, make_cookie(cookie_secret_, *ni, remote, h.spi_i));
      return;
    }
  }
  // Prefer the group the initiator already sent a KE for, if acceptable: saves a round trip.
  auto ours_ke = responder_ike_;
  for (auto& p : ours_ke) {
    bool has = std::any_of(p.transforms.begin(), p.transforms.end(),
                           [&](auto& t) { return t.type == kTfDh && t.id == ke->group; });
    if (has) std::erase_if(p.transforms, [&](auto& t) { return t.type == kTfDh && t.id != ke->group; });
  }
  auto sel = select_proposal(*props, ours_ke, false);
  if (!sel) sel = select_proposal(*props, responder_ike_, false);
  if (!sel) {
    ++stats_.no_proposal_chosen;
    log(fmt::format("IKE_SA_INIT from {}: NO_PROPOSAL_CHOSEN: peer offered {}; we accept {}", remote.str(),
                    proposals_str(*props), proposals_str(responder_ike_)));
    respond_plain_error(local, remote, h, kNNoProposalChosen, {});
    return;
  }
  Suite suite = sel->first;
  if (ke->group != suite.dh) {
    Bytes g;
    put16(g, suite.dh);
    log(fmt::format("IKE_SA_INIT from {}: KE for {}, asking for {}", remote.str(), transform_name(kTfDh, ke->group),
                    transform_name(kTfDh, suite.dh)));
    respond_plain_error(local, remote, h, kNInvalidKePayload, g);
    return;
  }
  auto dh = Dh::create(suite.dh);
  if (!dh) {
    log(fmt::format("IKE_SA_INIT from {}: {}", remote.str(), dh.error()));
    return;
  }
  auto gir = (*dh)->derive(ke->data);
  if (!gir) {
    ++stats_.rx_malformed;
    log(fmt::format("IKE_SA_INIT from {}: bad KE: {}", remote.str(), gir.error()));
    respond_plain_error(local, remote, h, kNInvalidSyntax, {});
    return;
  }
  auto sa = std::make_unique<IkeSa>();
  sa->spi_i = h.spi_i;
  do sa->spi_r = get64(random_bytes(8).data());
  while (!sa->spi_r || sas_.count(sa->spi_r));
  sa->initiator = false;
  sa->local = local;
  sa->remote = remote;
  sa->suite = suite;
  sa->ni = *ni;
  sa->nr = random_bytes(32);
  sa->keys = derive_ike_keys(suite, *gir, sa->ni, sa->nr, sa->spi_i, sa->spi_r);
  sa->created_ms = now_;
  sa->state = State::half_open;
  bool saw_src = false, src_ok = false, saw_dst = false, dst_ok = false;
  for (auto* p : m.all(kPlNotify)) {
    auto n = parse_notify(p->body);
    if (!n) continue;
    if (n->type == kNNatDetectionSourceIp) {
      saw_src = true;
      src_ok |= n->data == nat_hash(h.spi_i, 0, remote);
    } else if (n->type == kNNatDetectionDestinationIp) {
      saw_dst = true;
      dst_ok |= n->data == nat_hash(h.spi_i, 0, local);
    }
  }
  sa->nat_remote = saw_src && !src_ok;
  sa->nat_local = saw_dst && !dst_ok;
  ChainBuilder c;
  c.add(kPlSa, encode_sa({suite.to_proposal(sel->second->num, {})}));
  c.add(kPlKe, encode_ke(KePayload{suite.dh, (*dh)->public_value()}));
  c.add(kPlNonce, sa->nr);
  if (saw_src || saw_dst) {
    c.add_notify(kNNatDetectionSourceIp, nat_hash(sa->spi_i, sa->spi_r, local));
    c.add_notify(kNNatDetectionDestinationIp, nat_hash(sa->spi_i, sa->spi_r, remote));
  }
  for (auto* p : m.all(kPlNotify))
    if (auto n = parse_notify(p->body); n && n->type == kNFragmentationSupported) {
      sa->peer_frag = true;
      c.add_notify(kNFragmentationSupported);
      break;
    }
  // Certificate tunnels: ask for the initiator's certificate (peers that send
  // theirs only "if asked") and offer RFC 7427 hashes. Which tunnel this is
  // becomes known only in IKE_AUTH, so the first one with certificates speaks.
  if (certreq_peer_) {
    add_certreq(c, *certreq_peer_->creds);
    add_hash_algorithms(c);
  }
  Header rh;
  rh.spi_i = sa->spi_i;
  rh.spi_r = sa->spi_r;
  rh.exchange = h.exchange;
  rh.flags = kFlagResponse;
  rh.mid = 0;
  sa->init_req = m.raw;
  sa->init_resp = encode_plain(rh, c);
  sa->has_resp = true;
  sa->resp_msg = {sa->init_resp};
  sa->req_hash = sha1(m.raw);
  sa->peer_mid = 1;
  IkeSa& r = *sa;
  half_open_[{h.spi_i, remote.str()}] = sa->spi_r;
  sas_[sa->spi_r] = std::move(sa);
  arm(r, TimerKind::half_open, now_ + opts_.half_open_timeout_ms);
  send_to(local, remote, r.init_resp);
}

Bytes Engine::make_cookie(ByteView secret, ByteView ni, const Endpoint& remote, uint64_t spi_i) const {
  Bytes d(ni.begin(), ni.end());
  auto a = remote.addr.bytes();
  d.insert(d.end(), a.begin(), a.end());
  put64(d, spi_i);
  Bytes c = prf(kPrfSha256, secret, d);
  c.resize(16);
  return c;
}

void Engine::auth_request(IkeSa& sa, const Message& m, const std::vector<Payload>& pl) {
  uint64_t spi = sa.our_spi();
  sa.req_hash = sha1(m.raw);
  if (sa.state != State::half_open) {
    ChainBuilder c;
    c.add_notify(kNInvalidSyntax);
    respond(sa, m.h, c);
    return;
  }
  const Payload *idip = nullptr, *idrp = nullptr, *authp = nullptr, *sap = nullptr, *tsip = nullptr, *tsrp = nullptr;
  bool initial_contact = false, mobike = false;
  for (auto& x : pl) {
    switch (x.type) {
      case kPlIdi: idip = &x; break;
      case kPlIdr: idrp = &x; break;
      case kPlAuth: authp = &x; break;
      case kPlSa: sap = &x; break;
      case kPlTsi: tsip = &x; break;
      case kPlTsr: tsrp = &x; break;
      case kPlNotify:
        if (auto n = parse_notify(x.body); n && n->type == kNInitialContact) initial_contact = true;
        else if (n && n->type == kNMobikeSupported) mobike = true;
        break;
    }
  }
  auto reject = [&](uint16_t notify, const std::string& why) {
    ++stats_.auth_failed;
    log(fmt::format("{}: IKE_AUTH rejected: {}", sa.who(), why));
    ChainBuilder c;
    c.add_notify(notify);
    respond(sa, m.h, c);
    delete_sa(spi, why, false);
  };
  if (!idip || !authp) return reject(kNInvalidSyntax, "IKE_AUTH request lacks IDi or AUTH");
  auto idi = parse_id(idip->body);
  auto auth = parse_auth(authp->body);
  std::optional<Identity> idr;
  if (idrp)
    if (auto x = parse_id(idrp->body)) idr = *x;
  if (!idi || !auth) return reject(kNInvalidSyntax, "malformed IDi or AUTH");
  sa.remote_id = *idi;
  // The moat is whoever its identity says — its address means nothing.
  std::shared_ptr<const PeerConfig> peer = find_peer_by_id(*idi, idr);
  if (!peer) return reject(kNAuthenticationFailed, fmt::format("no tunnel for identity \"{}\"", idi->str()));
  sa.peer = peer;
  index_sa(sa);
  if (!accept_proposal(sa.suite.to_proposal(1, {}), peer->ike_proposals, false))
    return reject(kNAuthenticationFailed,
                  fmt::format("IKE SA uses {}, not allowed for this tunnel ({})", sa.suite.str(),
                              proposals_str(peer->ike_proposals)));
  Bytes octets = sa.init_req;
  octets.insert(octets.end(), sa.nr.begin(), sa.nr.end());
  Bytes mac = prf(sa.suite.prf, sa.keys.sk_pi, idip->body);
  octets.insert(octets.end(), mac.begin(), mac.end());
  if (auto ok = check_auth(*peer, sa.suite.prf, pl, *idi, *auth, octets); !ok)
    return reject(kNAuthenticationFailed, ok.error());

  ChainBuilder c;
  Bytes idr_body = encode_id(peer->local_id);
  Bytes ro = sa.init_resp;
  ro.insert(ro.end(), sa.ni.begin(), sa.ni.end());
  Bytes rmac = prf(sa.suite.prf, sa.keys.sk_pr, idr_body);
  ro.insert(ro.end(), rmac.begin(), rmac.end());
  auto my_auth = make_auth(*peer, sa.suite.prf, ro);
  if (!my_auth) return reject(kNAuthenticationFailed, "cannot authenticate ourselves: " + my_auth.error());
  c.add(kPlIdr, idr_body);
  add_cert(c, *peer);
  c.add(kPlAuth, encode_auth(*my_auth));
  sa.mobike = mobike && peer->mobike;
  if (sa.mobike) c.add_notify(kNMobikeSupported);
  established(sa);

  if (initial_contact) {
    auto old = tunnel_sas(peer->name);
    std::erase(old, spi);
    for (auto s : old) {
      ++stats_.initial_contact_deleted;
      delete_sa(s, "the peer sent INITIAL_CONTACT (it restarted)", false);
    }
  }

  std::optional<ChildSa> child;
  auto child_fail = [&](uint16_t n, const std::string& why) {
    ++stats_.child_failed;
    if (n == kNNoProposalChosen) ++stats_.no_proposal_chosen;
    log(fmt::format("{}: CHILD SA not created: {}", sa.who(), why));
    c.add_notify(n);
  };
  if (!sap || !tsip || !tsrp) {
    child_fail(kNInvalidSyntax, "IKE_AUTH request lacks SA, TSi or TSr");
  } else {
    auto props = parse_sa(sap->body);
    auto tsi = parse_ts(tsip->body);
    auto tsr = parse_ts(tsrp->body);
    std::optional<std::pair<Suite, const Proposal*>> sel;
    if (props) sel = select_proposal(*props, peer->esp_proposals, true);
    if (!props || !tsi || !tsr) {
      child_fail(kNInvalidSyntax, "malformed SA, TSi or TSr");
    } else if (!sel || sel->second->spi.size() != 4) {
      child_fail(kNNoProposalChosen, fmt::format("NO_PROPOSAL_CHOSEN: peer offered {}; we accept {}",
                                                 proposals_str(*props), proposals_str(peer->esp_proposals)));
    } else {
      auto remote_ts = narrow(*tsi, peer->remote_ts);
      auto local_ts = narrow(*tsr, peer->local_ts);
      if (remote_ts.empty() || local_ts.empty()) {
        child_fail(kNTsUnacceptable, fmt::format("TS_UNACCEPTABLE: peer proposed {} === {}; we allow {} === {}",
                                                 ts_list(*tsi), ts_list(*tsr), ts_list(peer->remote_ts),
                                                 ts_list(peer->local_ts)));
      } else {
        uint32_t spi_in = new_child_spi();
        child = make_child(sa, false, sel->first, spi_in, get32(sel->second->spi.data()), local_ts, remote_ts, {},
                           sa.ni, sa.nr);
        c.add(kPlSa, encode_sa({sel->first.to_proposal(sel->second->num, u32_bytes(spi_in))}));
        c.add(kPlTsi, encode_ts(remote_ts));
        c.add(kPlTsr, encode_ts(local_ts));
      }
    }
  }
  // Inbound ready before the peer can use it.
  if (child) install_child(sa, std::move(*child));
  respond(sa, m.h, c);
}

void Engine::informational_request(IkeSa& sa, const Message& m, const std::vector<Payload>& pl) {
  uint64_t spi = sa.our_spi();
  sa.req_hash = sha1(m.raw);
  ChainBuilder c;
  bool delete_ike = false;
  std::vector<Bytes> ours;
  std::vector<uint32_t> stale;
  for (auto& x : pl) {
    if (x.type != kPlDelete) continue;
    auto d = parse_delete(x.body);
    if (!d) continue;
    if (d->protocol == kProtoIke) delete_ike = true;
    if (d->protocol != kProtoEsp) continue;
    for (auto& s : d->spis) {
      // The peer names the SPI it receives on: our outbound SPI.
      uint32_t out = get32(s.data());
      auto it = std::find_if(sa.children.begin(), sa.children.end(), [&](auto& ch) { return ch.spi_out == out; });
      if (it == sa.children.end()) continue;
      ours.push_back(u32_bytes(it->spi_in));
      log(fmt::format("{}: peer deleted CHILD SA {:08x}_i {:08x}_o{}", sa.who(), it->spi_in, it->spi_out,
                      sa.is_replaced(it->spi_in) ? " (rekeyed; inbound kept a moment for packets in flight)" : ""));
      retire_child(sa, it->spi_in);
    }
  }
  for (auto& x : pl) {
    if (x.type != kPlNotify) continue;
    auto n = parse_notify(x.body);
    if (!n || n->type != kNInvalidSpi || n->data.size() != 4) continue;
    // The peer does not know an SPI we send with: that CHILD SA is stale there.
    uint32_t out = get32(n->data.data());
    auto it = std::find_if(sa.children.begin(), sa.children.end(), [&](auto& ch) { return ch.spi_out == out; });
    if (it == sa.children.end()) continue;
    log(fmt::format("{}: peer does not know CHILD SA {:08x}_o; deleting it", sa.who(), out));
    stale.push_back(it->spi_in);
  }
  if (!delete_ike && !ours.empty()) c.add(kPlDelete, encode_delete(DeletePayload{kProtoEsp, ours}));
  mobike_update(sa, pl, c);
  respond(sa, m.h, c);
  // Deletes are requests of their own; a response carries only answers (§1.4.1).
  for (uint32_t in : stale) {
    ChainBuilder d;
    d.add(kPlDelete, encode_delete(DeletePayload{kProtoEsp, {u32_bytes(in)}}));
    queue_request(sa, uint8_t(Exchange::informational), std::move(d), kReqDeleteChild, in);
  }
  if (delete_ike) {
    sa.state = State::deleting;
    delete_sa(spi, "deleted by the peer", sa.peer && sa.peer->start);
  }
}

// RFC 4555 §3.5: the peer (the original initiator) announces new addresses.
// They are the ones this authenticated request came from and to (IP
// header), never anything inside it. NAT detection is redone (§3.8) and a
// COOKIE2 echoed (§3.7).
void Engine::mobike_update(IkeSa& sa, const std::vector<Payload>& pl, ChainBuilder& c) {
  bool update = false, saw_src = false, src_ok = false, saw_dst = false, dst_ok = false;
  std::optional<Bytes> cookie2, no_nats;
  for (auto& x : pl) {
    if (x.type != kPlNotify) continue;
    auto n = parse_notify(x.body);
    if (!n) continue;
    if (n->type == kNUpdateSaAddresses) update = true;
    if (n->type == kNCookie2) cookie2 = n->data;
    if (n->type == kNNoNatsAllowed) no_nats = n->data;
    if (n->type == kNNatDetectionSourceIp) saw_src = true, src_ok |= n->data == nat_hash(sa.spi_i, sa.spi_r, sa.rx_remote);
    if (n->type == kNNatDetectionDestinationIp) saw_dst = true, dst_ok |= n->data == nat_hash(sa.spi_i, sa.spi_r, sa.rx_local);
  }
  if (cookie2 && cookie2->size() >= 8 && cookie2->size() <= 64 && opts_.echo_cookie2) c.add_notify(kNCookie2, *cookie2);
  if (!update) return;
  if (!sa.mobike || sa.original_initiator || sa.state != State::established) {
    ++stats_.mobike_ignored;
    log(fmt::format("{}: UPDATE_SA_ADDRESSES from {} ignored: {}", sa.who(), sa.rx_remote.str(),
                    !sa.mobike ? "MOBIKE was not negotiated" : "only the original initiator moves the SA"));
    return;
  }
  bool nat_remote = saw_src && !src_ok, nat_local = saw_dst && !dst_ok;
  // §3.9: the peer says which addresses it sent from and to; a NAT that
  // rewrote them, or any NAT when our tunnel allows none, moves nothing.
  bool rewritten = no_nats && *no_nats != nat_addresses(sa.rx_remote, sa.rx_local);
  if (rewritten || (sa.peer && sa.peer->no_nats_allowed && (nat_remote || nat_local))) {
    ++stats_.mobike_nat_refused;
    log(fmt::format("{}: UPDATE_SA_ADDRESSES from {}: {}; answered UNEXPECTED_NAT_DETECTED, nothing moved", sa.who(),
                    sa.rx_remote.str(),
                    rewritten ? "NO_NATS_ALLOWED names other addresses than the packet's (a NAT rewrote them)"
                              : "a NAT on the new path, and this tunnel allows none (no_nats_allowed)"));
    c.add_notify(kNUnexpectedNatDetected);
    return;
  }
  if (saw_src || saw_dst) {
    sa.nat_remote = nat_remote;
    sa.nat_local = nat_local;
    c.add_notify(kNNatDetectionSourceIp, nat_hash(sa.spi_i, sa.spi_r, sa.rx_local));
    c.add_notify(kNNatDetectionDestinationIp, nat_hash(sa.spi_i, sa.spi_r, sa.rx_remote));
  }
  ++stats_.mobike_moved;
  if (!(sa.rx_remote == sa.remote) || !(sa.rx_local == sa.local))
    log(fmt::format("{}: UPDATE_SA_ADDRESSES: the peer moved from {} to {}{}", sa.who(), sa.remote.str(),
                    sa.rx_remote.str(), sa.nat_local || sa.nat_remote ? " (NAT-T)" : ""));
  move_peer(sa, sa.rx_local, sa.rx_remote);
}

size_t Engine::local_address_changed(const IpAddr& old_addr, const IpAddr& new_addr, uint64_t now_ms) {
  now_ = now_ms;
  size_t moved = 0;
  for (auto& [spi, sp] : sas_) {
    IkeSa& sa = *sp;
    if (sa.state != State::established || !(sa.local.addr == old_addr)) continue;
    if (!sa.mobike || !sa.original_initiator) {
      log(fmt::format("{}: our address {} changed to {}; {}", sa.who(), old_addr.str(), new_addr.str(),
                      sa.mobike ? "the peer initiated this IKE SA and must move it" : "no MOBIKE with this peer"));
      continue;
    }
    log(fmt::format("{}: our address {} changed to {}: sending UPDATE_SA_ADDRESSES", sa.who(), old_addr.str(),
                    new_addr.str()));
    // Requests already queued leave from the new address too: they are
    // sealed when they leave (retransmissions of the one on the wire also).
    move_sa(sa, Endpoint{new_addr, sa.local.port}, sa.remote);
    ChainBuilder c;
    c.add_notify(kNUpdateSaAddresses);
    c.add_notify(kNNatDetectionSourceIp, nat_hash(sa.spi_i, sa.spi_r, sa.local));
    c.add_notify(kNNatDetectionDestinationIp, nat_hash(sa.spi_i, sa.spi_r, sa.remote));
    if (sa.peer && sa.peer->no_nats_allowed) c.add_notify(kNNoNatsAllowed, nat_addresses(sa.local, sa.remote));
    ++stats_.mobike_sent;
    queue_request(sa, uint8_t(Exchange::informational), std::move(c), kReqUpdateAddresses);
    ++moved;
  }
  return moved;
}

void Engine::create_child_request(IkeSa& sa, const Message& m, const std::vector<Payload>& pl) {
  sa.req_hash = sha1(m.raw);
  ChainBuilder c;
  const Payload *sap = nullptr, *np = nullptr, *kep = nullptr, *tsip = nullptr, *tsrp = nullptr;
  std::optional<uint32_t> rekey_out;
  for (auto& x : pl) {
    switch (x.type) {
      case kPlSa: sap = &x; break;
      case kPlNonce: np = &x; break;
      case kPlKe: kep = &x; break;
      case kPlTsi: tsip = &x; break;
      case kPlTsr: tsrp = &x; break;
      case kPlNotify:
        if (auto n = parse_notify(x.body); n && n->type == kNRekeySa && n->protocol == kProtoEsp && n->spi.size() == 4)
          rekey_out = get32(n->spi.data());
        break;
    }
  }
  auto refuse = [&](uint16_t n, const std::string& why) {
    log(fmt::format("{}: CREATE_CHILD_SA refused: {}", sa.who(), why));
    ChainBuilder e;
    e.add_notify(n);
    respond(sa, m.h, e);
  };
  // An IKE SA being closed (rekeyed, or its delete under way): §2.25, and
  // §2.8.2's rekey the peer sent before it saw ours complete. A CHILD SA
  // that is no longer here (it moved to the IKE SA that replaced this one)
  // does not exist on it (§2.25.2).
  if (sa.state == State::deleting && sa.peer) {
    ++stats_.rekey_refused;
    if (rekey_out && std::none_of(sa.children.begin(), sa.children.end(), [&](auto& ch) { return ch.spi_out == *rekey_out; })) {
      log(fmt::format("{}: CREATE_CHILD_SA refused: CHILD SA {:08x}_o is not on this IKE SA (it is being replaced); "
                      "CHILD_SA_NOT_FOUND", sa.who(), *rekey_out));
      ChainBuilder e;
      e.add_notify(kNChildSaNotFound, {}, kProtoEsp, u32_bytes(*rekey_out));
      respond(sa, m.h, e);
      return;
    }
    return refuse(kNTemporaryFailure, "the IKE SA is being rekeyed or deleted");
  }
  if (sa.state != State::established || !sa.peer) return refuse(kNInvalidSyntax, "IKE SA not established");
  const PeerConfig& p = *sa.peer;
  if (!sap || !np) return refuse(kNInvalidSyntax, "SA or Nonce missing");
  auto props = parse_sa(sap->body);
  auto ni = parse_nonce(np->body);
  if (!props || !ni) return refuse(kNInvalidSyntax, "malformed SA or Nonce");
  if ((*props)[0].protocol == kProtoIke) {
    rekey_ike_request(sa, m, *props, *ni, kep);
    return;
  }
  // §2.25.2: our rekey of this IKE SA is on the wire; the CHILD SAs are
  // about to move. The peer tries again on the IKE SA that survives.
  if (sa.req_active && sa.req_kind == kReqRekeyIke) {
    ++stats_.rekey_refused;
    return refuse(kNTemporaryFailure, "our rekey of the IKE SA is under way (TEMPORARY_FAILURE, §2.25.2)");
  }
  if (!tsip || !tsrp) return refuse(kNInvalidSyntax, "TSi or TSr missing");
  auto tsi = parse_ts(tsip->body);
  auto tsr = parse_ts(tsrp->body);
  if (!tsi || !tsr) return refuse(kNInvalidSyntax, "malformed TSi or TSr");
  const ChildSa* old = nullptr;
  bool collided = false;
  if (rekey_out) {
    for (auto& ch : sa.children)
      if (ch.spi_out == *rekey_out) old = &ch;
    if (!old) {
      ChainBuilder e;
      e.add_notify(kNChildSaNotFound, {}, kProtoEsp, u32_bytes(*rekey_out));
      respond(sa, m.h, e);
      return;
    }
    // Already rekeyed (by us, its delete is under way, or by an earlier
    // request of the peer's): §2.25.1.
    bool answered = std::any_of(sa.peer_rekeys.begin(), sa.peer_rekeys.end(),
                                [&](auto& r) { return r.old_in == old->spi_in; });
    if (sa.is_replaced(old->spi_in) || answered)
      return refuse(kNTemporaryFailure, fmt::format("CHILD SA {:08x}_i is already rekeyed", old->spi_in));
    // Our own rekey of the same SA not sent yet: the peer's does the job.
    auto queued = std::find_if(sa.queue.begin(), sa.queue.end(), [&](auto& r) {
      return r.kind == kReqRekeyChild && r.child_spi == old->spi_in;
    });
    if (queued != sa.queue.end()) {
      sa.queue.erase(queued);
      child_spis_.erase(sa.pending_spi);
      sa.pending_spi = 0;
      sa.pending_dh.reset();
    }
    // Ours is on the wire: a collision (§2.8.1), settled by the nonces when
    // our answer arrives. Both exchanges complete meanwhile.
    collided = sa.req_active && sa.req_kind == kReqRekeyChild && sa.req_child == old->spi_in;
  }
  std::optional<KePayload> ke;
  if (kep)
    if (auto k = parse_ke(kep->body)) ke = *k;
  auto sel = select_proposal(*props, p.esp_proposals, !ke);
  if (!sel || sel->second->spi.size() != 4)
    return refuse(kNNoProposalChosen, fmt::format("NO_PROPOSAL_CHOSEN: peer offered {}; we accept {}",
                                                  proposals_str(*props), proposals_str(p.esp_proposals)));
  Suite cs = sel->first;
  Bytes gir;
  std::unique_ptr<Dh> dh;
  if (ke) {
    if (!cs.dh) return refuse(kNNoProposalChosen, "KE sent but no DH group agreed");
    if (ke->group != cs.dh) {
      Bytes g;
      put16(g, cs.dh);
      ChainBuilder e;
      e.add_notify(kNInvalidKePayload, g);
      respond(sa, m.h, e);
      return;
    }
    auto d = Dh::create(cs.dh);
    if (!d) return refuse(kNNoProposalChosen, d.error());
    auto s = (*d)->derive(ke->data);
    if (!s) return refuse(kNInvalidSyntax, s.error());
    gir = *s;
    dh = std::move(*d);
  }
  auto remote_ts = narrow(*tsi, p.remote_ts);
  auto local_ts = narrow(*tsr, p.local_ts);
  if (remote_ts.empty() || local_ts.empty()) return refuse(kNTsUnacceptable, "traffic selectors do not match");
  Bytes nr = random_bytes(32);
  uint32_t spi_in = new_child_spi();
  auto child = make_child(sa, false, cs, spi_in, get32(sel->second->spi.data()), local_ts, remote_ts, gir, *ni, nr);
  c.add(kPlSa, encode_sa({cs.to_proposal(sel->second->num, u32_bytes(spi_in))}));
  c.add(kPlNonce, nr);
  if (dh) c.add(kPlKe, encode_ke(KePayload{cs.dh, dh->public_value()}));
  c.add(kPlTsi, encode_ts(remote_ts));
  c.add(kPlTsr, encode_ts(local_ts));
  uint32_t old_in = old ? old->spi_in : 0;
  // Inbound (and outbound, unused yet) ready before the answer leaves: the
  // peer switches to the new SA as soon as it has the answer.
  install_child(sa, *child);
  respond(sa, m.h, c);
  if (old) {
    // Make-before-break, the make: we keep sending with the old SA. Switching
    // now (as we did before) sent packets the peer could not decrypt yet — it
    // installs its inbound half only when our answer arrives (strongSwan:
    // "inbound CHILD_SA ... established" on the response). Its next request,
    // normally the delete of the old SA, tells us it has.
    ++stats_.child_rekeyed;
    sa.peer_rekeys.push_back(IkeSa::PeerRekey{old_in, spi_in, *ni, nr, collided});
    arm(sa, TimerKind::rekey_switch, now_ + opts_.rekey_switch_ms);
  }
  // The rekey initiator deletes the old SA (§2.8); until then it stays inbound.
}

// The peer rekeys the IKE SA (§1.3.2, §2.18): a new SA whose initiator is
// the rekey's initiator inherits the CHILD SAs; the old one lingers until the
// peer deletes it.
void Engine::rekey_ike_request(IkeSa& sa, const Message& m, const std::vector<Proposal>& props, const Bytes& ni,
                               const Payload* kep) {
  auto refuse = [&](uint16_t n, const std::string& why, ByteView data = {}) {
    log(fmt::format("{}: IKE SA rekey refused: {}", sa.who(), why));
    ChainBuilder e;
    e.add_notify(n, data);
    respond(sa, m.h, e);
  };
  const PeerConfig& p = *sa.peer;
  auto ke = kep ? parse_ke(kep->body) : Parsed<KePayload>(tl::unexpect, ParseError{});
  if (!ke) return refuse(kNInvalidSyntax, "KE missing or malformed");
  auto sel = select_proposal(props, p.ike_proposals, false);
  if (!sel || sel->second->spi.size() != 8 || !get64(sel->second->spi.data()))
    return refuse(kNNoProposalChosen, fmt::format("NO_PROPOSAL_CHOSEN: peer offered {}; we accept {}",
                                                  proposals_str(props), proposals_str(p.ike_proposals)));
  Suite suite = sel->first;
  if (ke->group != suite.dh) {
    Bytes g;
    put16(g, suite.dh);
    return refuse(kNInvalidKePayload, "KE for another group", g);
  }
  auto dh = Dh::create(suite.dh);
  if (!dh) return refuse(kNNoProposalChosen, dh.error());
  auto gir = (*dh)->derive(ke->data);
  if (!gir) return refuse(kNInvalidSyntax, gir.error());
  auto n = std::make_unique<IkeSa>();
  n->spi_i = get64(sel->second->spi.data());
  do n->spi_r = get64(random_bytes(8).data());
  while (!n->spi_r || sas_.count(n->spi_r));
  n->initiator = false;
  n->peer = sa.peer;
  n->local = sa.local;
  n->remote = sa.remote;
  n->nat_local = sa.nat_local;
  n->nat_remote = sa.nat_remote;
  n->peer_frag = sa.peer_frag;
  n->mobike = sa.mobike;
  n->original_initiator = sa.original_initiator;
  n->suite = suite;
  n->ni = ni;
  n->nr = random_bytes(32);
  n->keys = derive_rekeyed_ike_keys(suite, sa.suite.prf, sa.keys.sk_d, *gir, n->ni, n->nr, n->spi_i, n->spi_r);
  n->remote_id = sa.remote_id;
  n->created_ms = now_;
  n->state = State::established;
  n->established_ms = now_;
  n->last_heard_ms = now_;
  ChainBuilder c;
  c.add(kPlSa, encode_sa({suite.to_proposal(sel->second->num, [&] {
    Bytes b;
    put64(b, n->spi_r);
    return b;
  }())}));
  c.add(kPlNonce, n->nr);
  c.add(kPlKe, encode_ke(KePayload{suite.dh, (*dh)->public_value()}));
  respond(sa, m.h, c);
  adopt_children(sa, *n);
  sa.state = State::deleting;
  log(fmt::format("{}: IKE SA {:016x}_i {:016x}_r rekeyed to {:016x}_i {:016x}_r ({})", sa.who(), sa.spi_i, sa.spi_r,
                  n->spi_i, n->spi_r, suite.str()));
  IkeSa& r = *n;
  sas_[n->spi_r] = std::move(n);
  index_sa(r);
  if (r.peer->dpd_s) arm(r, TimerKind::dpd, now_ + uint64_t(r.peer->dpd_s) * 1000);
  schedule_ike_rekey(r);
  schedule_ike_expire(r);
  schedule_child_rekey(r);
  // Our own rekey of this IKE SA not sent yet: the peer's does the job.
  auto queued = std::find_if(sa.queue.begin(), sa.queue.end(), [](auto& q) { return q.kind == kReqRekeyIke; });
  if (queued != sa.queue.end()) {
    sa.queue.erase(queued);
    sa.rekey_spi = 0;
    sa.rekey_dh.reset();
  }
  // Ours is on the wire: a collision (§2.8.2), settled by the nonces when
  // our answer arrives. The CHILD SAs wait on the peer's new SA meanwhile.
  if (sa.req_active && sa.req_kind == kReqRekeyIke) {
    sa.peer_rekey_spi = r.spi_r;
    log(fmt::format("{}: IKE SA rekey collision: the peer's rekey crossed ours", sa.who()));
  } else {
    adopt_queue(sa, r);
  }
}

void Engine::adopt_children(IkeSa& from, IkeSa& to) {
  for (auto& ch : from.children) {
    ch.ike_spi_i = to.spi_i;
    ch.ike_spi_r = to.spi_r;
    child_spis_[ch.spi_in] = to.our_spi();
  }
  for (auto& ch : from.children) to.children.push_back(std::move(ch));
  for (auto& r : from.peer_rekeys) to.peer_rekeys.push_back(std::move(r));
  to.replaced.insert(to.replaced.end(), from.replaced.begin(), from.replaced.end());
  from.children.clear();
  from.peer_rekeys.clear();
  from.replaced.clear();
  if (!to.peer_rekeys.empty()) arm(to, TimerKind::rekey_switch, now_ + opts_.rekey_switch_ms);
}

// The requests still queued on an IKE SA that a rekey replaced go on the one
// that holds its CHILD SAs now: the old one only carries its own DELETE
// (§2.18), and a peer may ignore anything else there (strongSwan leaves a
// CREATE_CHILD_SA on an IKE SA it rekeyed unanswered, so the requests behind
// it, e.g. the DELETE of a CHILD SA that expired meanwhile, never went). A
// queued CHILD rekey takes its negotiation with it. Address updates and
// return routability checks stay: their NAT detection hashes the old SA's
// SPIs, their state is the old SA's.
void Engine::adopt_queue(IkeSa& from, IkeSa& to) {
  std::deque<Request> keep;
  bool moved = false;
  for (auto& r : from.queue) {
    if (r.kind == kReqInit || r.kind == kReqAuth || r.kind == kReqDeleteIke || r.kind == kReqRekeyIke ||
        r.kind == kReqUpdateAddresses || r.kind == kReqReturnRoutability) {
      keep.push_back(std::move(r));
      continue;
    }
    if (r.kind == kReqRekeyChild) {  // queued, so the pending negotiation is this one
      if (to.pending_spi) {  // the new SA negotiates already: its CHILD timer tries again later
        child_spis_.erase(from.pending_spi);
        from.pending_spi = 0;
        from.pending_dh.reset();
        continue;
      }
      to.pending_spi = from.pending_spi;
      to.pending_nonce = std::move(from.pending_nonce);
      to.pending_dh = std::move(from.pending_dh);
      from.pending_spi = 0;
      if (to.pending_spi) child_spis_[to.pending_spi] = to.our_spi();
    }
    to.queue.push_back(std::move(r));
    moved = true;
  }
  from.queue = std::move(keep);
  if (moved) pump(to);
}

tl::expected<void, std::string> Engine::rekey_ike(const std::string& tunnel, uint64_t now_ms) {
  now_ = now_ms;
  IkeSa* sa = find_established(tunnel);
  if (!sa) return tl::unexpected(fmt::format("tunnel \"{}\" has no established IKE SA", tunnel));
  if (sa->rekey_spi) return tl::unexpected(fmt::format("tunnel \"{}\": an IKE SA rekey is under way", tunnel));
  const PeerConfig& p = *sa->peer;
  uint16_t group = sa->suite.dh;
  auto dh = Dh::create(group);
  if (!dh) return tl::unexpected(dh.error());
  do sa->rekey_spi = get64(random_bytes(8).data());
  while (!sa->rekey_spi || sas_.count(sa->rekey_spi));
  sa->rekey_ni = random_bytes(32);
  sa->rekey_dh = std::move(*dh);
  Bytes spi;
  put64(spi, sa->rekey_spi);
  // Offer what the tunnel allows, the current group first so our KE fits.
  auto props = p.ike_proposals;
  for (auto& pr : props) {
    pr.spi = spi;
    std::stable_partition(pr.transforms.begin(), pr.transforms.end(),
                          [&](auto& t) { return !(t.type == kTfDh && t.id != group); });
  }
  ChainBuilder c;
  c.add(kPlSa, encode_sa(props));
  c.add(kPlNonce, sa->rekey_ni);
  c.add(kPlKe, encode_ke(KePayload{group, sa->rekey_dh->public_value()}));
  queue_request(*sa, uint8_t(Exchange::create_child_sa), std::move(c), kReqRekeyIke);
  return {};
}

void Engine::rekey_ike_response(IkeSa& sa, const std::vector<Payload>& pl) {
  auto failed = [&](const std::string& why) {
    sa.rekey_spi = 0;
    sa.rekey_dh.reset();
    if (sa.peer_rekey_spi) {
      // §2.8.2: the peer finished its rekey before it saw ours
      // (TEMPORARY_FAILURE); its new SA, which holds the CHILD SAs, stays.
      log(fmt::format("{}: our IKE SA rekey was answered {}; the peer's rekey stands", sa.who(), why));
      sa.peer_rekey_spi = 0;
      return;
    }
    log(fmt::format("{}: IKE SA rekey failed: {}; trying again later", sa.who(), why));
    // Retry in a minute: the old SA still works.
    arm(sa, TimerKind::ike_rekey, now_ + 60000);
  };
  const Payload *sap = nullptr, *np = nullptr, *kep = nullptr;
  for (auto& x : pl) {
    if (x.type == kPlNotify)
      if (auto n = parse_notify(x.body); n && n->type <= kNErrorMax)
        return failed(fmt::format("peer answered {}", notify_name(n->type)));
    if (x.type == kPlSa) sap = &x;
    if (x.type == kPlNonce) np = &x;
    if (x.type == kPlKe) kep = &x;
  }
  if (!sap || !np || !kep) return failed("response lacks SA, Nonce or KE");
  auto props = parse_sa(sap->body);
  auto nr = parse_nonce(np->body);
  auto ke = parse_ke(kep->body);
  if (!props || !nr || !ke) return failed("malformed response");
  std::optional<Suite> suite;
  if (props->size() == 1 && (*props)[0].spi.size() == 8 && get64((*props)[0].spi.data()))
    suite = accept_proposal((*props)[0], sa.peer->ike_proposals, false);
  if (!suite || suite->dh != sa.rekey_dh->group() || ke->group != suite->dh)
    return failed(fmt::format("responder chose {}", proposals_str(*props)));
  auto gir = sa.rekey_dh->derive(ke->data);
  if (!gir) return failed(gir.error());
  auto n = std::make_unique<IkeSa>();
  n->spi_i = sa.rekey_spi;
  n->spi_r = get64((*props)[0].spi.data());
  n->initiator = true;
  n->peer = sa.peer;
  n->local = sa.local;
  n->remote = sa.remote;
  n->nat_local = sa.nat_local;
  n->nat_remote = sa.nat_remote;
  n->peer_frag = sa.peer_frag;
  n->mobike = sa.mobike;
  n->original_initiator = sa.original_initiator;
  n->suite = *suite;
  n->ni = sa.rekey_ni;
  n->nr = *nr;
  n->keys = derive_rekeyed_ike_keys(*suite, sa.suite.prf, sa.keys.sk_d, *gir, n->ni, n->nr, n->spi_i, n->spi_r);
  n->remote_id = sa.remote_id;
  n->created_ms = now_;
  n->state = State::established;
  n->established_ms = now_;
  n->last_heard_ms = now_;
  sa.rekey_dh.reset();
  sa.rekey_spi = 0;
  IkeSa* theirs = nullptr;
  if (sa.peer_rekey_spi)
    if (auto t = sas_.find(sa.peer_rekey_spi); t != sas_.end()) theirs = t->second.get();
  sa.peer_rekey_spi = 0;
  if (theirs) {
    // Both ends rekeyed this IKE SA at once (§2.8.2): three IKE SAs now. The
    // new one whose exchange holds the lowest of the four nonces is
    // redundant and its creator deletes it; the other inherits every CHILD
    // SA, and its creator deletes the old IKE SA.
    ++stats_.rekey_collisions;
    auto lower = [](const Bytes& a, const Bytes& b) {
      return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end());
    };
    const Bytes& ours_min = lower(n->ni, n->nr) ? n->ni : n->nr;
    const Bytes& theirs_min = lower(theirs->ni, theirs->nr) ? theirs->ni : theirs->nr;
    if (lower(ours_min, theirs_min)) {
      log(fmt::format("{}: IKE SA rekey collision: ours ({:016x}_i {:016x}_r) holds the lowest nonce and is redundant; "
                      "deleting it, the peer's ({:016x}_i {:016x}_r) stays",
                      sa.who(), n->spi_i, n->spi_r, theirs->spi_i, theirs->spi_r));
      // It never held a CHILD SA; the peer deletes the old IKE SA.
      IkeSa& r = *n;
      r.state = State::deleting;
      r.no_reinit = true;
      sas_[n->spi_i] = std::move(n);
      index_sa(r);
      ChainBuilder d;
      d.add(kPlDelete, encode_delete(DeletePayload{kProtoIke, {}}));
      queue_request(r, uint8_t(Exchange::informational), std::move(d), kReqDeleteIke);
      sa.awaiting_delete = true;
      sa.no_reinit = true;
      arm(sa, TimerKind::half_open, now_ + opts_.half_open_timeout_ms);
      adopt_queue(sa, *theirs);
      return;
    }
    log(fmt::format("{}: IKE SA rekey collision: the peer's ({:016x}_i {:016x}_r) holds the lowest nonce and is "
                    "redundant (the peer deletes it); ours ({:016x}_i {:016x}_r) stays",
                    sa.who(), theirs->spi_i, theirs->spi_r, n->spi_i, n->spi_r));
    adopt_children(*theirs, *n);
    theirs->state = State::deleting;
    theirs->no_reinit = true;
    theirs->awaiting_delete = true;
    arm(*theirs, TimerKind::half_open, now_ + opts_.half_open_timeout_ms);
  }
  adopt_children(sa, *n);
  log(fmt::format("{}: IKE SA {:016x}_i {:016x}_r rekeyed to {:016x}_i {:016x}_r ({})", sa.who(), sa.spi_i, sa.spi_r,
                  n->spi_i, n->spi_r, suite->str()));
  IkeSa& r = *n;
  sas_[n->spi_i] = std::move(n);
  index_sa(r);
  if (r.peer->dpd_s) arm(r, TimerKind::dpd, now_ + uint64_t(r.peer->dpd_s) * 1000);
  schedule_ike_rekey(r);
  schedule_ike_expire(r);
  schedule_child_rekey(r);
  if (theirs) adopt_queue(*theirs, r);
  adopt_queue(sa, r);
  // The old SA goes (§2.18): its CHILD SAs already live on the new one.
  sa.state = State::deleting;
  sa.no_reinit = true;
  ChainBuilder d;
  d.add(kPlDelete, encode_delete(DeletePayload{kProtoIke, {}}));
  queue_request(sa, uint8_t(Exchange::informational), std::move(d), kReqDeleteIke);
}

tl::expected<void, std::string> Engine::rekey_child(const std::string& tunnel, uint64_t now_ms) {
  now_ = now_ms;
  IkeSa* sa = find_established(tunnel);
  if (!sa) return tl::unexpected(fmt::format("tunnel \"{}\" has no established IKE SA", tunnel));
  if (sa->children.empty()) return tl::unexpected(fmt::format("tunnel \"{}\" has no CHILD SA", tunnel));
  if (sa->pending_spi) return tl::unexpected(fmt::format("tunnel \"{}\": a CHILD SA negotiation is under way", tunnel));
  // The newest CHILD SA that no rekey replaced or is about to replace.
  const ChildSa* cand = nullptr;
  for (auto& c : sa->children)
    if (!sa->is_replaced(c.spi_in) &&
        std::none_of(sa->peer_rekeys.begin(), sa->peer_rekeys.end(), [&](auto& r) { return r.old_in == c.spi_in; }))
        cand = &c;
  if (!cand) return tl::unexpected(fmt::format("tunnel \"{}\": its CHILD SA is being rekeyed", tunnel));
  return start_child_rekey(*sa, cand->spi_in);
}

tl::expected<void, std::string> Engine::start_child_rekey(IkeSa& sa_ref, uint32_t old_in) {
  IkeSa* sa = &sa_ref;
  const PeerConfig& p = *sa->peer;
  const std::string& tunnel = p.name;
  auto oit = std::find_if(sa->children.begin(), sa->children.end(), [&](auto& c) { return c.spi_in == old_in; });
  if (oit == sa->children.end()) return tl::unexpected(fmt::format("tunnel \"{}\": no CHILD SA {:08x}_i", tunnel, old_in));
  if (sa->pending_spi) return tl::unexpected(fmt::format("tunnel \"{}\": a CHILD SA negotiation is under way", tunnel));
  const ChildSa& old = *oit;
  // PFS (§1.3.1): when the tunnel's ESP proposals name a DH group, the rekey
  // carries a KE for the first one (IKE_AUTH's CHILD SA cannot: §1.2).
  uint16_t group = 0;
  for (auto& pr : p.esp_proposals) {
    for (auto& t : pr.transforms)
      if (t.type == kTfDh && t.id) {
        group = t.id;
        break;
      }
    if (group) break;
  }
  std::unique_ptr<Dh> dh;
  if (group) {
    auto d = Dh::create(group);
    if (!d) return tl::unexpected(fmt::format("tunnel \"{}\": PFS: {}", tunnel, d.error()));
    dh = std::move(*d);
  }
  auto props = without_dh(p.esp_proposals, u32_bytes(0));
  if (group) {
    props = p.esp_proposals;
    for (auto& pr : props)  // our KE's group first, so the peer can take it
      std::stable_partition(pr.transforms.begin(), pr.transforms.end(),
                            [&](auto& t) { return !(t.type == kTfDh && t.id != group); });
  }
  sa->pending_spi = new_child_spi();
  child_spis_[sa->pending_spi] = sa->our_spi();
  sa->pending_nonce = random_bytes(32);
  for (auto& pr : props) pr.spi = u32_bytes(sa->pending_spi);
  ChainBuilder c;
  c.add_notify(kNRekeySa, {}, kProtoEsp, u32_bytes(old.spi_in));
  c.add(kPlSa, encode_sa(props));
  c.add(kPlNonce, sa->pending_nonce);
  if (dh) c.add(kPlKe, encode_ke(KePayload{group, dh->public_value()}));
  sa->pending_dh = std::move(dh);
  c.add(kPlTsi, encode_ts(old.local_ts));
  c.add(kPlTsr, encode_ts(old.remote_ts));
  queue_request(*sa, uint8_t(Exchange::create_child_sa), std::move(c), kReqRekeyChild, old.spi_in);
  return {};
}

void Engine::create_child_response(IkeSa& sa, const std::vector<Payload>& pl) {
  uint32_t spi_in = sa.pending_spi, old_spi = sa.req_child;
  sa.pending_spi = 0;
  std::unique_ptr<Dh> dh = std::move(sa.pending_dh);
  auto child_fail = [&](const std::string& why) {
    ++stats_.child_failed;
    child_spis_.erase(spi_in);
    log(fmt::format("{}: CHILD SA rekey failed: {}", sa.who(), why));
    // Again before the hard lifetime, a few times (the old SA still works).
    // The CHILD SA may live on another IKE SA by now (an IKE rekey crossed ours).
    auto owner = child_spis_.find(old_spi);
    auto ike = owner == child_spis_.end() ? sas_.end() : sas_.find(owner->second);
    IkeSa& home = ike == sas_.end() ? sa : *ike->second;
    for (auto& c : home.children)
      if (c.spi_in == old_spi) {
        uint64_t left = c.expire_at_ms > now_ ? c.expire_at_ms - now_ : 0;
        c.rekey_at_ms = now_ + (c.expire_at_ms ? std::clamp<uint64_t>(left / 4, 1000, 60000) : 60000);
      }
    schedule_child_rekey(home);
    if (&home != &sa) schedule_child_rekey(sa);
  };
  const Payload *sap = nullptr, *np = nullptr, *tsip = nullptr, *tsrp = nullptr, *kep = nullptr;
  for (auto& x : pl) {
    if (x.type == kPlNotify)
      if (auto n = parse_notify(x.body); n && n->type <= kNErrorMax)
        return child_fail(fmt::format("peer answered {}", notify_name(n->type)));
    if (x.type == kPlSa) sap = &x;
    if (x.type == kPlNonce) np = &x;
    if (x.type == kPlKe) kep = &x;
    if (x.type == kPlTsi) tsip = &x;
    if (x.type == kPlTsr) tsrp = &x;
  }
  if (!sap || !np || !tsip || !tsrp) return child_fail("response lacks SA, Nonce, TSi or TSr");
  auto props = parse_sa(sap->body);
  auto nr = parse_nonce(np->body);
  auto tsi = parse_ts(tsip->body);
  auto tsr = parse_ts(tsrp->body);
  if (!props || !nr || !tsi || !tsr) return child_fail("malformed response");
  std::optional<Suite> cs;
  if (props->size() == 1 && (*props)[0].spi.size() == 4)
    cs = dh ? accept_proposal((*props)[0], sa.peer->esp_proposals, false)
            : accept_proposal((*props)[0], without_dh(sa.peer->esp_proposals, {}), true);
  if (!cs) return child_fail(fmt::format("responder chose {}, not one of ours", proposals_str(*props)));
  Bytes gir;
  if (dh) {
    auto ke = kep ? parse_ke(kep->body) : Parsed<KePayload>(tl::unexpect, ParseError{});
    if (!ke || cs->dh != dh->group() || ke->group != dh->group())
      return child_fail(fmt::format("PFS: responder chose {} and {} KE", proposals_str(*props),
                                    ke ? transform_name(kTfDh, ke->group) : std::string("no")));
    auto s = dh->derive(ke->data);
    if (!s) return child_fail("PFS: responder's KE: " + s.error());
    gir = std::move(*s);
  }
  auto it = std::find_if(sa.children.begin(), sa.children.end(), [&](auto& c) { return c.spi_in == old_spi; });
  auto theirs = std::find_if(sa.peer_rekeys.begin(), sa.peer_rekeys.end(),
                             [&](auto& r) { return r.old_in == old_spi && r.collided; });
  if (theirs != sa.peer_rekeys.end()) {
    // Both ends rekeyed the same SA at once (§2.8.1): the SA of the exchange
    // holding the lowest of the four nonces is redundant; the end that
    // initiated that exchange deletes it, the other end deletes the old SA.
    ++stats_.rekey_collisions;
    auto lower = [](const Bytes& a, const Bytes& b) {
      return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end());
    };
    const Bytes& ours_min = lower(sa.pending_nonce, *nr) ? sa.pending_nonce : *nr;
    const Bytes& theirs_min = lower(theirs->ni, theirs->nr) ? theirs->ni : theirs->nr;
    if (lower(ours_min, theirs_min)) {
      log(fmt::format("{}: CHILD rekey collision on {:08x}_i: ours ({:08x}_i) holds the lowest nonce and is redundant; "
                      "deleting it, the peer's ({:08x}_i) stays",
                      sa.who(), old_spi, spi_in, theirs->new_in));
      // Never installed; the peer has it and deletes it on our request. Our
      // outbound moves to the peer's SA when the peer deletes the old one.
      ChainBuilder d;
      d.add(kPlDelete, encode_delete(DeletePayload{kProtoEsp, {u32_bytes(spi_in)}}));
      queue_request(sa, uint8_t(Exchange::informational), std::move(d), kReqDeleteChild, spi_in);
      schedule_child_rekey(sa);
      return;
    }
    log(fmt::format("{}: CHILD rekey collision on {:08x}_i: the peer's ({:08x}_i) holds the lowest nonce and is "
                    "redundant (the peer deletes it); ours ({:08x}_i) stays",
                    sa.who(), old_spi, theirs->new_in, spi_in));
    sa.peer_rekeys.erase(theirs);  // never send with the redundant one
  }
  auto c = make_child(sa, true, *cs, spi_in, get32((*props)[0].spi.data()), *tsi, *tsr, gir, sa.pending_nonce, *nr);
  if (dh) log(fmt::format("{}: CHILD SA rekey with PFS ({})", sa.who(), transform_name(kTfDh, dh->group())));
  // §2.25.2: the peer rekeyed the IKE SA while our CHILD rekey was on the
  // wire and answered it anyway; the old CHILD SA lives on the new IKE SA
  // now, and so does the new one (this IKE SA is going: its CHILD SAs with it).
  IkeSa* home = &sa;
  if (it == sa.children.end() && sa.state == State::deleting)
    if (auto o = child_spis_.find(old_spi); o != child_spis_.end())
      if (auto h = sas_.find(o->second); h != sas_.end() && h->second.get() != &sa) home = h->second.get();
  if (home != &sa) {
    c->ike_spi_i = home->spi_i;
    c->ike_spi_r = home->spi_r;
    it = std::find_if(home->children.begin(), home->children.end(), [&](auto& x) { return x.spi_in == old_spi; });
    log(fmt::format("{}: CHILD rekey answered on the IKE SA being replaced; the new CHILD SA joins {:016x}_i {:016x}_r",
                    sa.who(), home->spi_i, home->spi_r));
  }
  // The old SA may be gone: it reached its hard lifetime while this rekey
  // was on the wire. The new SA is then a fresh one (the peer deletes the
  // old one on our DELETE, queued at the expiry).
  bool replaces = it != home->children.end();
  ChildSa now = *c;
  install_child(*home, std::move(*c));
  // install_child may have reallocated: look the old one up again.
  auto old = std::find_if(home->children.begin(), home->children.end(), [&](auto& x) { return x.spi_in == old_spi; });
  if (replaces && old != home->children.end()) {
    ++stats_.child_rekeyed;
    // The responder installed the new SA before answering: switch now.
    home->replaced.push_back(old_spi);
    sink_.rekeyed(*old, now);
    ChainBuilder d;
    d.add(kPlDelete, encode_delete(DeletePayload{kProtoEsp, {u32_bytes(old_spi)}}));
    queue_request(*home, uint8_t(Exchange::informational), std::move(d), kReqDeleteChild, old_spi);
  }
}

// ---------------------------------------------------------------- operator
tl::expected<void, std::string> Engine::terminate(const std::string& tunnel, uint64_t now_ms) {
  now_ = now_ms;
  reinit_.erase(tunnel);
  std::vector<uint64_t> now_gone;
  bool any = false;
  for (uint64_t spi : tunnel_sas(tunnel)) {
    auto& sa = sas_.at(spi);
    any = true;
    sa->no_reinit = true;
    if (sa->state == State::established) {
      sa->state = State::deleting;
      ChainBuilder c;
      c.add(kPlDelete, encode_delete(DeletePayload{kProtoIke, {}}));
      sa->queue.clear();
      queue_request(*sa, uint8_t(Exchange::informational), std::move(c), kReqDeleteIke);
    } else if (sa->state != State::deleting) {
      now_gone.push_back(spi);
    }
  }
  for (auto spi : now_gone) delete_sa(spi, "terminated by the operator", false);
  if (!any) return tl::unexpected(fmt::format("tunnel \"{}\" has no IKE SA", tunnel));
  return {};
}

bool Engine::unknown_spi(uint32_t spi, const IpAddr& from, uint64_t now_ms) {
  now_ = now_ms;
  auto it = invalid_spi_at_.find(from);
  if (it != invalid_spi_at_.end() && now_ms < it->second + 1000) {
    ++stats_.invalid_spi_limited;
    return false;
  }
  if (invalid_spi_at_.size() > 4096) invalid_spi_at_.clear();  // bounded whatever arrives
  invalid_spi_at_[from] = now_ms;
  for (auto& kv : sas_) {
    IkeSa& sa = *kv.second;
    if (sa.state != State::established || !(sa.remote.addr == from)) continue;
    ChainBuilder c;
    c.add_notify(kNInvalidSpi, u32_bytes(spi), kProtoEsp);
    log(fmt::format("{}: ESP with unknown SPI {:08x}: telling the peer INVALID_SPI", sa.who(), spi));
    ++stats_.invalid_spi_sent;
    // The answer to this request doubles as the liveness check.
    queue_request(sa, uint8_t(Exchange::informational), std::move(c), kReqDpd);
    return true;
  }
  ++stats_.invalid_spi_limited;
  return false;
}

tl::expected<void, std::string> Engine::check_liveness(const std::string& tunnel, uint64_t now_ms) {
  now_ = now_ms;
  IkeSa* sa = find_established(tunnel);
  if (!sa) return tl::unexpected(fmt::format("tunnel \"{}\" has no established IKE SA", tunnel));
  queue_request(*sa, uint8_t(Exchange::informational), ChainBuilder(), kReqDpd);
  return {};
}

nlohmann::ordered_json Engine::show(uint64_t now_ms) const {
  auto out = nlohmann::ordered_json::array();
  for (auto& [spi, sa] : sas_) {
    nlohmann::ordered_json j;
    j["tunnel"] = sa->peer ? sa->peer->name : "";
    j["state"] = state_name(sa->state);
    j["role"] = sa->initiator ? "initiator" : "responder";
    j["spi_i"] = fmt::format("{:016x}", sa->spi_i);
    j["spi_r"] = fmt::format("{:016x}", sa->spi_r);
    j["peer_id"] = sa->remote_id.type ? sa->remote_id.str() : "";
    j["local"] = sa->local.str();
    j["remote"] = sa->remote.str();
    j["nat"] = sa->nat_local ? (sa->nat_remote ? "both" : "local") : (sa->nat_remote ? "remote" : "none");
    j["mobike"] = sa->mobike;
    if (sa->rr_pending)  // RFC 4555 §3.7: the IKE SA moved, the CHILD SAs wait for the COOKIE2 echo
      j["mobike_check"] = fmt::format("{} {}; ESP still to {}", sa->rr_cookie.empty() ? "failed at" : "checking",
                                      sa->remote.str(), sa->dp_remote.str());
    j["proposal"] = sa->suite.encr ? sa->suite.str() : "";
    j["age_s"] = (now_ms - sa->created_ms) / 1000;
    auto ch = nlohmann::ordered_json::array();
    for (auto& c : sa->children) {
      nlohmann::ordered_json x;
      x["spi_in"] = fmt::format("{:08x}", c.spi_in);
      x["spi_out"] = fmt::format("{:08x}", c.spi_out);
      x["proposal"] = c.suite.str();
      x["udp_encap"] = c.udp_encap;
      x["local_ts"] = ts_list(c.local_ts);
      x["remote_ts"] = ts_list(c.remote_ts);
      ch.push_back(x);
    }
    j["children"] = ch;
    out.push_back(j);
  }
  return out;
}

}  // namespace moat::ike
