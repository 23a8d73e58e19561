#pragma once
// IKEv2 cryptography over OpenSSL 3 (EVP): proposals in strongSwan's syntax,
// proposal selection, Diffie-Hellman (MODP 2048, ECP 256/384, X25519), the
// PRF and prf+ (RFC 7296 §2.13), key derivation (§2.14, §2.17) and the SK
// payload (§3.14; RFC 5282 for AES-GCM, RFC 7634 for ChaCha20-Poly1305).
// No state beyond the objects themselves; usable from any thread.
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <tl/expected.hpp>

#include "ctrl/ike/message.hh"
#include "ctrl/ike/types.hh"

namespace moat::ike {

// IANA transform IDs the engine implements.
enum EncrId : uint16_t { kEncrAesCbc = 12, kEncrAesGcm16 = 20, kEncrChacha20Poly1305 = 28 };
enum PrfId : uint16_t { kPrfSha256 = 5, kPrfSha384 = 6, kPrfSha512 = 7 };
enum IntegId : uint16_t { kIntegNone = 0, kIntegSha256 = 12, kIntegSha384 = 13, kIntegSha512 = 14 };
enum DhId : uint16_t { kDhNone = 0, kDhModp2048 = 14, kDhEcp256 = 19, kDhEcp384 = 20, kDhX25519 = 31 };

std::string transform_name(uint8_t type, uint16_t id, uint16_t key_bits = 0);

// Parses a comma-separated list of strongSwan proposals, e.g.
// "aes128gcm16-prfsha256-x25519, aes256-sha256-modp2048". `protocol` is
// kProtoIke or kProtoEsp. ESP proposals without esn/noesn get noesn; DH
// groups in ESP proposals are kept (they apply to CREATE_CHILD_SA only).
tl::expected<std::vector<Proposal>, std::string> parse_proposals(std::string_view text, uint8_t protocol);
// "AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE_25519", strongSwan's notation.
std::string proposal_str(const Proposal& p);
std::string proposals_str(const std::vector<Proposal>& ps);

// The negotiated algorithms of one SA: exactly one transform per type.
struct Suite {
  uint8_t protocol = kProtoIke;
  uint16_t encr = 0, encr_bits = 0, prf = 0, integ = 0, dh = 0;
  bool esn = false;

  bool aead() const { return encr == kEncrAesGcm16 || encr == kEncrChacha20Poly1305; }
  size_t encr_key_len() const;  // bytes, including the 4-byte salt of AEAD ciphers
  size_t integ_key_len() const;
  size_t icv_len() const;
  size_t iv_len() const;
  size_t block_len() const;
  size_t prf_len() const;
  Proposal to_proposal(uint8_t num, Bytes spi) const;
  std::string str() const;
};

// Picks the first of `ours` (our order of preference) that some offered
// proposal can satisfy with one transform per type. `ignore_dh`: the CHILD SA
// of IKE_AUTH takes no DH group (§1.2) whatever the proposals say.
// Returns the suite and the number of the offered proposal it came from.
std::optional<std::pair<Suite, const Proposal*>> select_proposal(const std::vector<Proposal>& offered,
                                                                 const std::vector<Proposal>& ours, bool ignore_dh);
// Checks a responder's answer: one proposal, one transform per type, each
// one we offered.
std::optional<Suite> accept_proposal(const Proposal& answer, const std::vector<Proposal>& ours, bool ignore_dh);

// One Diffie-Hellman key pair.
class Dh {
 public:
  static tl::expected<std::unique_ptr<Dh>, std::string> create(uint16_t group);
  virtual ~Dh() = default;
  uint16_t group() const { return group_; }
  const Bytes& public_value() const { return pub_; }
  // The shared secret g^ir, or an error when the peer's value is invalid.
  virtual tl::expected<Bytes, std::string> derive(ByteView peer) = 0;

 protected:
  uint16_t group_ = 0;
  Bytes pub_;
};
// The public value length the group requires (§3.4: exact, or INVALID_SYNTAX).
size_t dh_public_len(uint16_t group);

Bytes random_bytes(size_t n);
Bytes prf(uint16_t alg, ByteView key, ByteView data);
Bytes prf_plus(uint16_t alg, ByteView key, ByteView seed, size_t len);
Bytes sha1(ByteView data);
bool equal_ct(ByteView a, ByteView b);  // constant time

// IKE SA keys (§2.14).
struct IkeKeys {
  Bytes sk_d, sk_ai, sk_ar, sk_ei, sk_er, sk_pi, sk_pr;
};
IkeKeys derive_ike_keys(const Suite& s, ByteView g_ir, ByteView ni, ByteView nr, uint64_t spi_i, uint64_t spi_r);
// Rekeyed IKE SA (§2.18): SKEYSEED = prf(SK_d(old), g^ir (new) | Ni | Nr).
IkeKeys derive_rekeyed_ike_keys(const Suite& s, uint16_t old_prf, ByteView old_sk_d, ByteView g_ir, ByteView ni,
                                ByteView nr, uint64_t spi_i, uint64_t spi_r);

// CHILD SA keys (§2.17): initiator-to-responder first, encryption then integrity.
struct ChildKeys {
  Bytes encr_i, integ_i, encr_r, integ_r;
};
ChildKeys derive_child_keys(const Suite& child, uint16_t prf_alg, ByteView sk_d, ByteView g_ir, ByteView ni,
                            ByteView nr);

// Builds a complete encrypted message: header, SK payload around `inner`.
// With `frag_total`, an Encrypted Fragment payload (RFC 7383) instead.
Bytes sk_seal(const Suite& s, ByteView ke, ByteView ka, Header h, uint8_t first_inner, ByteView inner,
              uint16_t frag_num = 0, uint16_t frag_total = 0);
// Verifies and decrypts the SK payload of `m` (SK must be its last payload);
// returns the inner payload chain's bytes.
tl::expected<Bytes, std::string> sk_open(const Suite& s, ByteView ke, ByteView ka, const Message& m);

// PSK AUTH data (§2.15): prf(prf(psk, "Key Pad for IKEv2"), signed octets).
Bytes psk_auth(uint16_t prf_alg, ByteView psk, ByteView signed_octets);

// NAT_DETECTION_*_IP data: SHA-1(SPIi | SPIr | IP | port).
Bytes nat_hash(uint64_t spi_i, uint64_t spi_r, const Endpoint& e);

}  // namespace moat::ike
