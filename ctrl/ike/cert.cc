#include "ctrl/ike/cert.hh"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <fmt/format.h>

#include <cstdio>

namespace moat::ike {

struct Credentials::Impl {
  X509* cert = nullptr;
  EVP_PKEY* key = nullptr;
  X509_STORE* store = nullptr;
  bool crl = false;
  ~Impl() {
    X509_free(cert);
    EVP_PKEY_free(key);
    X509_STORE_free(store);
  }
};

Credentials::~Credentials() = default;

static std::string ssl_error() {
  unsigned long e = ERR_get_error();
  char buf[256] = "unknown error";
  if (e) ERR_error_string_n(e, buf, sizeof buf);
  ERR_clear_error();
  return buf;
}

tl::expected<std::shared_ptr<const Credentials>, std::string> Credentials::load(const std::string& cert,
                                                                               const std::string& key,
                                                                               const std::string& ca,
                                                                               const std::string& crl) {
  std::shared_ptr<Credentials> c(new Credentials());
  c->impl_ = std::make_unique<Impl>();
  Impl& im = *c->impl_;
  auto open = [](const std::string& path) -> BIO* { return BIO_new_file(path.c_str(), "r"); };
  if (!cert.empty()) {
    BIO* b = open(cert);
    if (!b) return tl::unexpected(fmt::format("cannot read certificate \"{}\"", cert));
    im.cert = PEM_read_bio_X509(b, nullptr, nullptr, nullptr);
    BIO_free(b);
    if (!im.cert) return tl::unexpected(fmt::format("\"{}\" is not a PEM certificate: {}", cert, ssl_error()));
    unsigned char* der = nullptr;
    int len = i2d_X509(im.cert, &der);
    if (len > 0) c->cert_der_.assign(der, der + len);
    OPENSSL_free(der);
  }
  if (!key.empty()) {
    BIO* b = open(key);
    if (!b) return tl::unexpected(fmt::format("cannot read private key \"{}\"", key));
    im.key = PEM_read_bio_PrivateKey(b, nullptr, nullptr, nullptr);
    BIO_free(b);
    if (!im.key) return tl::unexpected(fmt::format("\"{}\" is not a PEM private key: {}", key, ssl_error()));
    if (im.cert && X509_check_private_key(im.cert, im.key) != 1)
      return tl::unexpected(fmt::format("private key \"{}\" does not belong to certificate \"{}\"", key, cert));
  }
  im.store = X509_STORE_new();
  if (X509_STORE_load_file(im.store, ca.c_str()) != 1)
    return tl::unexpected(fmt::format("cannot load CA certificates from \"{}\": {}", ca, ssl_error()));
  if (!crl.empty()) {
    if (X509_STORE_load_file(im.store, crl.c_str()) != 1)
      return tl::unexpected(fmt::format("cannot load CRL \"{}\": {}", crl, ssl_error()));
    X509_STORE_set_flags(im.store, X509_V_FLAG_CRL_CHECK);
    im.crl = true;
  }
  return std::shared_ptr<const Credentials>(c);
}

bool Credentials::can_sign() const { return impl_->key && impl_->cert; }

Identity Credentials::subject() const {
  Identity id{kIdDn, {}};
  if (!impl_->cert) return id;
  unsigned char* der = nullptr;
  int len = i2d_X509_NAME(X509_get_subject_name(impl_->cert), &der);
  if (len > 0) id.data.assign(der, der + len);
  OPENSSL_free(der);
  return id;
}

Bytes Credentials::certreq() const {
  Bytes out;
  STACK_OF(X509_OBJECT)* objs = X509_STORE_get0_objects(impl_->store);
  for (int i = 0; i < sk_X509_OBJECT_num(objs); ++i) {
    X509* x = X509_OBJECT_get0_X509(sk_X509_OBJECT_value(objs, i));
    if (!x) continue;
    unsigned char* der = nullptr;
    int len = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x), &der);
    if (len > 0) {
      unsigned char h[20];
      EVP_Digest(der, size_t(len), h, nullptr, EVP_sha1(), nullptr);
      out.insert(out.end(), h, h + 20);
    }
    OPENSSL_free(der);
  }
  return out;
}

static Bytes algorithm_identifier(int sig_nid) {
  X509_ALGOR* a = X509_ALGOR_new();
  // RSA PKCS#1 v1.5 identifiers carry NULL parameters; ECDSA ones none (RFC 5758).
  int ptype = (sig_nid == NID_sha256WithRSAEncryption) ? V_ASN1_NULL : V_ASN1_UNDEF;
  X509_ALGOR_set0(a, OBJ_nid2obj(sig_nid), ptype, nullptr);
  unsigned char* der = nullptr;
  int len = i2d_X509_ALGOR(a, &der);
  Bytes out;
  if (len > 0) out.assign(der, der + len);
  OPENSSL_free(der);
  X509_ALGOR_free(a);
  return out;
}

tl::expected<Bytes, std::string> Credentials::sign(ByteView octets) const {
  if (!can_sign()) return tl::unexpected(std::string("no certificate and private key to sign with"));
  int type = EVP_PKEY_get_base_id(impl_->key);
  int sig_nid = type == EVP_PKEY_EC ? NID_ecdsa_with_SHA256 : type == EVP_PKEY_RSA ? NID_sha256WithRSAEncryption : 0;
  if (!sig_nid) return tl::unexpected(std::string("private key is neither ECDSA nor RSA"));
  EVP_MD_CTX* md = EVP_MD_CTX_new();
  size_t len = 0;
  Bytes sig;
  bool ok = EVP_DigestSignInit(md, nullptr, EVP_sha256(), nullptr, impl_->key) == 1 &&
            EVP_DigestSign(md, nullptr, &len, octets.data(), octets.size()) == 1;
  if (ok) {
    sig.resize(len);
    ok = EVP_DigestSign(md, sig.data(), &len, octets.data(), octets.size()) == 1;
    sig.resize(len);
  }
  EVP_MD_CTX_free(md);
  if (!ok) return tl::unexpected("signing failed: " + ssl_error());
  Bytes ai = algorithm_identifier(sig_nid);
  Bytes out{uint8_t(ai.size())};
  out.insert(out.end(), ai.begin(), ai.end());
  out.insert(out.end(), sig.begin(), sig.end());
  return out;
}

static bool names(X509* cert, const Identity& id) {
  switch (id.type) {
    case kIdDn: {
      const unsigned char* p = id.data.data();
      X509_NAME* n = d2i_X509_NAME(nullptr, &p, long(id.data.size()));
      bool same = n && X509_NAME_cmp(n, X509_get_subject_name(cert)) == 0;
      X509_NAME_free(n);
      return same;
    }
    case kIdFqdn: {
      std::string h(id.data.begin(), id.data.end());
      return X509_check_host(cert, h.c_str(), h.size(), X509_CHECK_FLAG_NO_WILDCARDS, nullptr) == 1;
    }
    case kIdRfc822: {
      std::string e(id.data.begin(), id.data.end());
      return X509_check_email(cert, e.c_str(), e.size(), 0) == 1;
    }
    case kIdIpv4:
    case kIdIpv6: return X509_check_ip(cert, id.data.data(), id.data.size(), 0) == 1;
  }
  return false;
}

tl::expected<void, std::string> Credentials::verify(ByteView peer_der, const std::vector<Bytes>& intermediates,
                                                    const Identity& id, uint8_t method, ByteView auth,
                                                    ByteView octets) const {
  if (method != kAuthDigitalSignature)
    return tl::unexpected(fmt::format("AUTH method {} (we accept digital signatures, RFC 7427)", method));
  const unsigned char* p = peer_der.data();
  X509* cert = d2i_X509(nullptr, &p, long(peer_der.size()));
  if (!cert || p != peer_der.data() + peer_der.size()) {
    X509_free(cert);
    return tl::unexpected(std::string("peer certificate does not parse"));
  }
  std::unique_ptr<X509, decltype(&X509_free)> guard(cert, X509_free);
  STACK_OF(X509)* chain = sk_X509_new_null();
  for (auto& d : intermediates) {
    const unsigned char* q = d.data();
    if (X509* x = d2i_X509(nullptr, &q, long(d.size()))) sk_X509_push(chain, x);
  }
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, impl_->store, cert, chain);
  int ok = X509_verify_cert(ctx);
  int err = X509_STORE_CTX_get_error(ctx);
  X509_STORE_CTX_free(ctx);
  sk_X509_pop_free(chain, X509_free);
  if (ok != 1) return tl::unexpected(fmt::format("peer certificate not trusted: {}", X509_verify_cert_error_string(err)));
  if (!names(cert, id)) return tl::unexpected(fmt::format("peer certificate does not name \"{}\"", id.str()));
  // RFC 7427 §3: length of the AlgorithmIdentifier, the identifier, the signature.
  if (auth.size() < 2 || auth[0] == 0 || size_t(auth[0]) + 1 >= auth.size())
    return tl::unexpected(std::string("malformed signature AUTH data"));
  const unsigned char* a = auth.data() + 1;
  X509_ALGOR* alg = d2i_X509_ALGOR(nullptr, &a, auth[0]);
  if (!alg || a != auth.data() + 1 + auth[0]) {
    X509_ALGOR_free(alg);
    return tl::unexpected(std::string("malformed AlgorithmIdentifier in AUTH"));
  }
  int sig_nid = OBJ_obj2nid(alg->algorithm), md_nid = 0, pk_nid = 0;
  X509_ALGOR_free(alg);
  if (!OBJ_find_sigid_algs(sig_nid, &md_nid, &pk_nid) || !EVP_get_digestbynid(md_nid))
    return tl::unexpected(fmt::format("signature algorithm {} not supported", OBJ_nid2sn(sig_nid)));
  EVP_PKEY* pub = X509_get0_pubkey(cert);
  int type = pub ? EVP_PKEY_get_base_id(pub) : 0;
  if (!((pk_nid == NID_X9_62_id_ecPublicKey && type == EVP_PKEY_EC) ||
        (pk_nid == NID_rsaEncryption && type == EVP_PKEY_RSA)))
    return tl::unexpected(fmt::format("signature algorithm {} does not fit the certificate's key", OBJ_nid2sn(sig_nid)));
  ByteView sig = auth.subspan(1 + auth[0]);
  EVP_MD_CTX* md = EVP_MD_CTX_new();
  bool good = EVP_DigestVerifyInit(md, nullptr, EVP_get_digestbynid(md_nid), nullptr, pub) == 1 &&
              EVP_DigestVerify(md, sig.data(), sig.size(), octets.data(), octets.size()) == 1;
  EVP_MD_CTX_free(md);
  ERR_clear_error();
  if (!good) return tl::unexpected(std::string("signature does not verify"));
  return {};
}

}  // namespace moat::ike
