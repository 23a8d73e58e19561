#pragma once
// X.509 credentials for IKE_AUTH with digital signatures (RFC 7427): our
// certificate and private key (ECDSA or RSA), the CA certificates we trust
// and optional CRLs. Immutable after load; shared by the tunnels that name
// the same files. Usable from any thread once loaded.
#include <memory>
#include <string>
#include <vector>

#include <tl/expected.hpp>

#include "ctrl/ike/message.hh"
#include "ctrl/ike/types.hh"

namespace moat::ike {

// Hash algorithms for SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4).
enum HashAlg : uint16_t { kHashSha256 = 2, kHashSha384 = 3, kHashSha512 = 4 };
enum CertEncoding : uint8_t { kCertX509Signature = 4 };

class Credentials {
 public:
  // `cert` and `key` may be empty (verify-only); `ca` is required.
  static tl::expected<std::shared_ptr<const Credentials>, std::string> load(const std::string& cert,
                                                                           const std::string& key,
                                                                           const std::string& ca,
                                                                           const std::string& crl);
  ~Credentials();
  bool can_sign() const;
  const Bytes& cert_der() const { return cert_der_; }
  Identity subject() const;  // our certificate's subject DN
  // CERTREQ data: SHA-1 of each trusted CA's SubjectPublicKeyInfo (§3.7).
  Bytes certreq() const;
  // AUTH payload data for method 14: AlgorithmIdentifier length, the
  // AlgorithmIdentifier, the signature over `octets` (SHA-256).
  tl::expected<Bytes, std::string> sign(ByteView octets) const;
  // Checks the peer's end-entity certificate against our CAs (and CRLs),
  // that it names `id` (subject DN, or a subjectAltName for FQDN, RFC822 and
  // IP identities), and that `auth` (method 14) is its signature over `octets`.
  tl::expected<void, std::string> verify(ByteView peer_cert_der, const std::vector<Bytes>& intermediates,
                                         const Identity& id, uint8_t method, ByteView auth, ByteView octets) const;

 private:
  Credentials() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  Bytes cert_der_;
};

}  // namespace moat::ike
