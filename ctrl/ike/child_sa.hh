#pragma once
// The SA lifecycle interface between the IKEv2 engine and the ESP data path
// (SAD). The engine calls the sink from its own thread (the control thread),
// synchronously, never from a worker. A ChildSa is a value: the sink copies
// what it needs; the engine keeps its own copy for listing and deletion.
#include <cstdint>
#include <string>
#include <vector>

#include "ctrl/ike/crypto.hh"
#include "ctrl/ike/message.hh"
#include "ctrl/ike/types.hh"

namespace moat::ike {

struct ChildSa {
  uint64_t id = 0;          // unique in this engine's lifetime; stable across endpoint moves
  std::string tunnel;       // the moat's config name
  Identity peer_id;         // authenticated identity of the peer
  uint64_t ike_spi_i = 0, ike_spi_r = 0;  // the IKE SA that negotiated it

  // SPIs in host order. ESP packets we receive carry spi_in; we send spi_out.
  uint32_t spi_in = 0;
  uint32_t spi_out = 0;

  // Cipher: suite.encr is kEncrAesGcm16 (encr_bits 128/256), kEncrAesCbc
  // (with suite.integ kIntegSha256 = HMAC-SHA-256-128) or
  // kEncrChacha20Poly1305. suite.esn: 64-bit sequence numbers (RFC 4303).
  Suite suite;
  // Keys. For AEAD ciphers the encryption key ends with the 4-byte salt
  // (RFC 4106 / RFC 7634): AES-GCM-128 = 16 + 4 bytes. integ_* empty for AEAD.
  Bytes encr_key_in, integ_key_in;    // decrypts/verifies what arrives with spi_in
  Bytes encr_key_out, integ_key_out;  // protects what leaves with spi_out

  // Outer addresses. With udp_encap, ESP travels in UDP (RFC 3948) between
  // local.port and remote.port (normally 4500 and whatever the NAT chose).
  Endpoint local, remote;
  bool udp_encap = false;

  // Traffic selectors (the tunnel's funnels), after narrowing: traffic from
  // any local_ts to any remote_ts is protected by this SA, and traffic
  // arriving on it must come from a remote_ts to a local_ts.
  // TrafficSelector::prefixes() turns each range into prefixes.
  std::vector<TrafficSelector> local_ts, remote_ts;

  // Lifetimes (0 = none). Soft: the engine rekeys (it keeps its own clock for
  // time, in either role); hard: the engine deletes the SA (INFORMATIONAL
  // DELETE, remove()) if no rekey replaced it; the data path may enforce it too.
  uint32_t soft_lifetime_s = 0, hard_lifetime_s = 0;
  uint64_t soft_lifetime_bytes = 0, hard_lifetime_bytes = 0;

  // The engine's own bookkeeping, in its clock (ms; 0 = never): when it
  // rekeys this SA (the soft lifetime minus jitter, in either role) and when
  // it deletes it if no rekey replaced it by then (the hard lifetime).
  // Hosts ignore them.
  uint64_t rekey_at_ms = 0, expire_at_ms = 0;
};

class ChildSaSink {
 public:
  virtual ~ChildSaSink() = default;
  // A new CHILD SA: install both directions. The outbound half is used only
  // if the tunnel has no outbound SA yet; a rekey's waits for rekeyed().
  virtual void install(const ChildSa& sa) = 0;
  // Stop using the SA in both directions and forget it. After rekeyed(sa, x)
  // only the inbound half is left (the engine calls this a linger time after
  // the delete exchange, for packets in flight).
  virtual void remove(const ChildSa& sa) = 0;
  // Make-before-break rekey: `now` has already been install()ed and the peer
  // has installed it too (we initiated and it answered, or it initiated and
  // has since sent another request); send with `now` from here on, give up
  // `old`'s outbound half, keep accepting `old` inbound until remove(old).
  virtual void rekeyed(const ChildSa& old, const ChildSa& now) = 0;
  // The outer addresses changed: the peer's address or port (NAT rebinding,
  // RFC 7296 §2.23, or its MOBIKE UPDATE_SA_ADDRESSES), or ours (we sent
  // UPDATE_SA_ADDRESSES after a port's address changed). Re-point the
  // outbound encapsulation of `sa` to `sa.local` -> `sa.remote`.
  virtual void moved(const ChildSa& sa) {}
};

}  // namespace moat::ike
