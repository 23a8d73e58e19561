#include "ctrl/ike_host.hh"

#include <arpa/inet.h>

#include <fmt/format.h>

#include "ctrl/control.hh"
#include "ctrl/punt.hh"

namespace moat {

namespace {

uint32_t v4(const ike::IpAddr& a) {
  uint32_t x;
  memcpy(&x, a.b.data(), 4);
  return ntohl(x);
}

std::optional<Cipher> cipher_of(const ike::Suite& s) {
  if (s.encr == ike::kEncrAesGcm16) return s.encr_bits == 256 ? Cipher::aes_gcm_256 : Cipher::aes_gcm_128;
  if (s.encr == ike::kEncrChacha20Poly1305) return Cipher::chacha20_poly1305;
  if (s.encr == ike::kEncrAesCbc && s.integ == ike::kIntegSha256)
    return s.encr_bits == 256 ? Cipher::aes_cbc_256_sha256 : Cipher::aes_cbc_128_sha256;
  return std::nullopt;
}

}  // namespace

IkeHost::~IkeHost() { flush_log(); }

void IkeHost::log(std::string_view line) {
  log_.append("moatd: ike: ").append(line).push_back('\n');
  // Bounded: a pass that logs a lot still writes in pieces.
  if (log_.size() >= kLogFlushBytes) flush_log();
}

void IkeHost::flush_log() {
  if (log_.empty()) return;
  fmt::print(stderr, "{}", log_);
  log_.clear();
}

tl::expected<void, std::string> IkeHost::start(std::vector<ike::PeerConfig> peers, const std::string& netns,
                                               uint64_t now_ms) {
  tl::expected<void, std::string> opened;
  auto entered = in_netns(netns, [&] { opened = driver_.open(std::nullopt); });
  if (!entered) return entered;
  if (!opened) return tl::unexpected("IKE sockets: " + opened.error());
  engine_ = std::make_unique<ike::Engine>(driver_, *this, ike::EngineOptions{},
                                          [this](const std::string& s) { log(s); });
  driver_.attach(engine_.get());
  driver_.on_esp([this](const ike::Endpoint& local, const ike::Endpoint& remote, ike::ByteView esp) {
    if (local.addr.is_v4() && remote.addr.is_v4())
      c_.esp_reassembled(v4(local.addr), local.port, v4(remote.addr), remote.port, esp.data(), esp.size());
  });
  engine_->set_peers(std::move(peers), now_ms);
  return {};
}

void IkeHost::poll() {
  if (engine_) driver_.run_once(0);
  flush_log();
}

void IkeHost::unknown_spi(uint32_t spi, uint32_t src) {
  if (engine_) engine_->unknown_spi(spi, ike::IpAddr::v4(src), ike::UdpDriver::now_ms());
  flush_log();
}

void IkeHost::address_changed(uint32_t old, uint32_t now) {
  if (engine_) engine_->local_address_changed(ike::IpAddr::v4(old), ike::IpAddr::v4(now), ike::UdpDriver::now_ms());
  flush_log();
}

nlohmann::ordered_json IkeHost::show() const {
  if (!engine_) return nlohmann::ordered_json::array();
  return engine_->show(ike::UdpDriver::now_ms());
}

void IkeHost::install(const ike::ChildSa& sa) {
  auto tunnel = c_.tunnel_id(sa.tunnel);
  auto cipher = cipher_of(sa.suite);
  if (!tunnel || !cipher || !sa.local.addr.is_v4()) {
    log(fmt::format("CHILD SA of tunnel {} cannot be installed: {}", sa.tunnel,
                    !tunnel ? "no such tunnel" : !cipher ? "cipher not supported by the fast path" : "not IPv4"));
    return;
  }
  SaConfig base = c_.tunnel_template(*tunnel);
  base.tunnel = *tunnel;
  base.local = v4(sa.local.addr);
  base.peer = v4(sa.remote.addr);
  base.nat_t = sa.udp_encap;
  base.local_port = sa.local.port;
  base.peer_port = sa.remote.port;
  base.cipher = *cipher;
  base.esn = sa.suite.esn;
  base.hard.seconds = sa.hard_lifetime_s;
  base.hard.bytes = sa.hard_lifetime_bytes;
  // The negotiated selectors are the SA's funnels (seed 003).
  base.funnels.clear();
  for (auto& l : sa.local_ts)
    for (auto& [la, ll] : l.prefixes())
      for (auto& r : sa.remote_ts)
        for (auto& [ra, rl] : r.prefixes())
          if (base.funnels.size() < kMaxFunnels && la.is_v4() && ra.is_v4())
            base.funnels.push_back(Funnel{v4(la), v4(ra), ll, rl});
  Installed ins;
  ins.tunnel = *tunnel;
  SaConfig in = base;
  in.dir = SaDir::inbound;
  in.spi = sa.spi_in;
  in.key = sa.encr_key_in;
  in.auth_key = sa.integ_key_in;
  in.name = fmt::format("tunnel {} in (IKE)", sa.tunnel);
  SaConfig out = base;
  out.dir = SaDir::outbound;
  out.spi = sa.spi_out;
  out.key = sa.encr_key_out;
  out.auth_key = sa.integ_key_out;
  out.name = fmt::format("tunnel {} out (IKE)", sa.tunnel);
  // Inbound first: the peer may use the SA as soon as our answer leaves.
  // Outbound becomes the tunnel's only if it has none: a rekey switches in
  // rekeyed(), after the peer has the new inbound SA (make-before-break).
  auto i = c_.install_sa(in, false);
  auto o = c_.install_sa(out, false);
  if (!i || !o) {
    log(fmt::format("tunnel {}: {}", sa.tunnel, !i ? i.error() : o.error()));
    if (i) c_.remove_sa(*i);
    if (o) c_.remove_sa(*o);
    return;
  }
  ins.in = *i;
  ins.out = *o;
  sas_[sa.id] = ins;
}

void IkeHost::rekeyed(const ike::ChildSa& old, const ike::ChildSa& now) {
  auto it = sas_.find(now.id);
  if (it == sas_.end()) return;
  if (auto r = c_.switch_outbound(it->second.tunnel, it->second.out); !r) {
    log(fmt::format("tunnel {}: rekey: {}", now.tunnel, r.error()));
    return;
  }
  // The switch retired the old outbound SA; its slot is reused after the
  // grace period, so remove(old) must not name it again. Its inbound SA keeps
  // accepting until remove(old) (the engine calls it a moment after the
  // delete exchange, for packets in flight).
  if (auto o = sas_.find(old.id); o != sas_.end()) o->second.out = kNoSa;
}

void IkeHost::remove(const ike::ChildSa& sa) {
  auto it = sas_.find(sa.id);
  if (it == sas_.end()) return;
  if (it->second.in != kNoSa) c_.remove_sa(it->second.in);
  if (it->second.out != kNoSa) c_.remove_sa(it->second.out);
  sas_.erase(it);
}

void IkeHost::moved(const ike::ChildSa& sa) {
  auto it = sas_.find(sa.id);
  if (it == sas_.end()) return;
  if (it->second.out != kNoSa) {
    c_.set_sa_peer(it->second.out, v4(sa.remote.addr), sa.remote.port, sa.udp_encap);
    if (sa.local.addr.is_v4()) c_.set_sa_local(it->second.out, v4(sa.local.addr));
  }
  // The outbound SA's peer word turns ESP in UDP on or off with the move (a
  // NAT appeared or went); the inbound SA takes both anyway.
  if (it->second.in != kNoSa) c_.set_sa_peer(it->second.in, v4(sa.remote.addr), sa.remote.port, sa.udp_encap);
}

}  // namespace moat
