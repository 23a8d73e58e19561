#include "ctrl/ike/crypto.hh"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/dh.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <map>

namespace moat::ike {

// ---------------------------------------------------------------- names
std::string transform_name(uint8_t type, uint16_t id, uint16_t bits) {
  switch (type) {
    case kTfEncr:
      switch (id) {
        case kEncrAesCbc: return fmt::format("AES_CBC_{}", bits);
        case kEncrAesGcm16: return fmt::format("AES_GCM_16_{}", bits);
        case kEncrChacha20Poly1305: return "CHACHA20_POLY1305";
      }
      return fmt::format("ENCR_{}{}", id, bits ? fmt::format("_{}", bits) : "");
    case kTfPrf:
      switch (id) {
        case kPrfSha256: return "PRF_HMAC_SHA2_256";
        case kPrfSha384: return "PRF_HMAC_SHA2_384";
        case kPrfSha512: return "PRF_HMAC_SHA2_512";
      }
      return fmt::format("PRF_{}", id);
    case kTfInteg:
      switch (id) {
        case kIntegNone: return "INTEG_NONE";
        case kIntegSha256: return "HMAC_SHA2_256_128";
        case kIntegSha384: return "HMAC_SHA2_384_192";
        case kIntegSha512: return "HMAC_SHA2_512_256";
      }
      return fmt::format("INTEG_{}", id);
    case kTfDh:
      switch (id) {
        case kDhNone: return "DH_NONE";
        case kDhModp2048: return "MODP_2048";
        case kDhEcp256: return "ECP_256";
        case kDhEcp384: return "ECP_384";
        case kDhX25519: return "CURVE_25519";
      }
      return fmt::format("DH_{}", id);
    case kTfEsn: return id ? "EXT_SEQ" : "NO_EXT_SEQ";
  }
  return fmt::format("TRANSFORM_{}_{}", type, id);
}

std::string proposal_str(const Proposal& p) {
  std::string s = p.protocol == kProtoIke ? "IKE:" : p.protocol == kProtoEsp ? "ESP:" : "AH:";
  bool first = true;
  for (auto& t : p.transforms) {
    if (!first) s += '/';
    first = false;
    s += transform_name(t.type, t.id, t.key_bits);
  }
  return s;
}

std::string proposals_str(const std::vector<Proposal>& ps) {
  std::string s;
  for (auto& p : ps) {
    if (!s.empty()) s += ", ";
    s += proposal_str(p);
  }
  return s;
}

// strongSwan keywords -> transforms (a subset: what the engine implements).
static const std::map<std::string, std::vector<Transform>, std::less<>>& keywords() {
  static const std::map<std::string, std::vector<Transform>, std::less<>> k = {
      {"aes128", {{kTfEncr, kEncrAesCbc, 128}}},
      {"aes192", {{kTfEncr, kEncrAesCbc, 192}}},
      {"aes256", {{kTfEncr, kEncrAesCbc, 256}}},
      {"aes", {{kTfEncr, kEncrAesCbc, 128}}},
      {"aes128gcm16", {{kTfEncr, kEncrAesGcm16, 128}}},
      {"aes128gcm128", {{kTfEncr, kEncrAesGcm16, 128}}},
      {"aes128gcm", {{kTfEncr, kEncrAesGcm16, 128}}},
      {"aes192gcm16", {{kTfEncr, kEncrAesGcm16, 192}}},
      {"aes256gcm16", {{kTfEncr, kEncrAesGcm16, 256}}},
      {"aes256gcm128", {{kTfEncr, kEncrAesGcm16, 256}}},
      {"aes256gcm", {{kTfEncr, kEncrAesGcm16, 256}}},
      {"chacha20poly1305", {{kTfEncr, kEncrChacha20Poly1305, 0}}},
      {"sha256", {{kTfInteg, kIntegSha256, 0}}},
      {"sha2_256", {{kTfInteg, kIntegSha256, 0}}},
      {"sha384", {{kTfInteg, kIntegSha384, 0}}},
      {"sha2_384", {{kTfInteg, kIntegSha384, 0}}},
      {"sha512", {{kTfInteg, kIntegSha512, 0}}},
      {"sha2_512", {{kTfInteg, kIntegSha512, 0}}},
      {"prfsha256", {{kTfPrf, kPrfSha256, 0}}},
      {"prfsha384", {{kTfPrf, kPrfSha384, 0}}},
      {"prfsha512", {{kTfPrf, kPrfSha512, 0}}},
      {"modp2048", {{kTfDh, kDhModp2048, 0}}},
      {"ecp256", {{kTfDh, kDhEcp256, 0}}},
      {"ecp384", {{kTfDh, kDhEcp384, 0}}},
      {"x25519", {{kTfDh, kDhX25519, 0}}},
      {"curve25519", {{kTfDh, kDhX25519, 0}}},
      {"esn", {{kTfEsn, 1, 0}}},
      {"noesn", {{kTfEsn, 0, 0}}},
  };
  return k;
}

static bool has_type(const Proposal& p, uint8_t type) {
  return std::any_of(p.transforms.begin(), p.transforms.end(), [&](auto& t) { return t.type == type; });
}

tl::expected<std::vector<Proposal>, std::string> parse_proposals(std::string_view text, uint8_t protocol) {
  std::vector<Proposal> out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    std::string_view one = text.substr(start, comma == text.npos ? text.npos : comma - start);
    while (!one.empty() && one.front() == ' ') one.remove_prefix(1);
    while (!one.empty() && one.back() == ' ') one.remove_suffix(1);
    if (one.empty()) return tl::unexpected(fmt::format("empty proposal in \"{}\"", text));
    Proposal p;
    p.num = uint8_t(out.size() + 1);
    p.protocol = protocol;
    size_t s = 0;
    while (s <= one.size()) {
      size_t dash = one.find('-', s);
      std::string_view kw = one.substr(s, dash == one.npos ? one.npos : dash - s);
      auto it = keywords().find(kw);
      if (it == keywords().end())
        return tl::unexpected(fmt::format("unknown algorithm \"{}\" in proposal \"{}\"", kw, one));
      for (auto& t : it->second) {
        if (protocol == kProtoIke && t.type == kTfEsn)
          return tl::unexpected(fmt::format("\"{}\" is not an IKE algorithm (proposal \"{}\")", kw, one));
        if (protocol == kProtoEsp && t.type == kTfPrf)
          return tl::unexpected(fmt::format("\"{}\" is not an ESP algorithm (proposal \"{}\")", kw, one));
        if (std::find(p.transforms.begin(), p.transforms.end(), t) == p.transforms.end()) p.transforms.push_back(t);
      }
      if (dash == one.npos) break;
      s = dash + 1;
    }
    bool aead = false, plain = false;
    for (auto& t : p.transforms)
      if (t.type == kTfEncr) (t.id == kEncrAesCbc ? plain : aead) = true;
    if (!has_type(p, kTfEncr)) return tl::unexpected(fmt::format("proposal \"{}\" has no encryption algorithm", one));
    if (aead && plain)
      return tl::unexpected(fmt::format("proposal \"{}\" mixes AEAD and non-AEAD ciphers", one));
    if (aead && has_type(p, kTfInteg))
      return tl::unexpected(fmt::format("proposal \"{}\": an AEAD cipher takes no integrity algorithm", one));
    if (plain && !has_type(p, kTfInteg))
      return tl::unexpected(fmt::format("proposal \"{}\" needs an integrity algorithm (e.g. sha256)", one));
    if (protocol == kProtoIke) {
      if (!has_type(p, kTfPrf)) {
        // strongSwan derives the PRF from the integrity algorithm; AEAD needs it spelled out.
        if (aead) return tl::unexpected(fmt::format("AEAD proposal \"{}\" needs a PRF (e.g. prfsha256)", one));
        std::vector<Transform> prfs;
        for (auto& t : p.transforms)
          if (t.type == kTfInteg) prfs.push_back({kTfPrf, uint16_t(t.id - kIntegSha256 + kPrfSha256), 0});
        p.transforms.insert(p.transforms.end(), prfs.begin(), prfs.end());
      }
      if (!has_type(p, kTfDh)) return tl::unexpected(fmt::format("IKE proposal \"{}\" has no DH group", one));
    } else if (!has_type(p, kTfEsn)) {
      p.transforms.push_back({kTfEsn, 0, 0});
    }
    // Wire order: ENCR, PRF, INTEG, DH, ESN (what peers print and expect).
    std::stable_sort(p.transforms.begin(), p.transforms.end(), [](auto& a, auto& b) {
      auto rank = [](uint8_t t) { return t == kTfEncr ? 0 : t == kTfPrf ? 1 : t == kTfInteg ? 2 : t == kTfDh ? 3 : 4; };
      return rank(a.type) < rank(b.type);
    });
    out.push_back(std::move(p));
    if (comma == text.npos) break;
    start = comma + 1;
  }
  return out;
}

// ---------------------------------------------------------------- suites
size_t Suite::encr_key_len() const {
  switch (encr) {
    case kEncrAesCbc: return encr_bits / 8;
    case kEncrAesGcm16: return encr_bits / 8 + 4;
    case kEncrChacha20Poly1305: return 32 + 4;
  }
  return 0;
}
size_t Suite::integ_key_len() const {
  switch (integ) {
    case kIntegSha256: return 32;
    case kIntegSha384: return 48;
    case kIntegSha512: return 64;
  }
  return 0;
}
size_t Suite::icv_len() const {
  if (aead()) return 16;
  return integ_key_len() / 2;
}
size_t Suite::iv_len() const { return encr == kEncrAesCbc ? 16 : 8; }
size_t Suite::block_len() const { return encr == kEncrAesCbc ? 16 : 1; }
size_t Suite::prf_len() const {
  switch (prf) {
    case kPrfSha256: return 32;
    case kPrfSha384: return 48;
    case kPrfSha512: return 64;
  }
  return 0;
}

Proposal Suite::to_proposal(uint8_t num, Bytes spi) const {
  Proposal p;
  p.num = num;
  p.protocol = protocol;
  p.spi = std::move(spi);
  p.transforms.push_back({kTfEncr, encr, uint16_t(encr == kEncrChacha20Poly1305 ? 0 : encr_bits)});
  if (protocol == kProtoIke) p.transforms.push_back({kTfPrf, prf, 0});
  if (integ) p.transforms.push_back({kTfInteg, integ, 0});
  if (protocol == kProtoIke || dh) p.transforms.push_back({kTfDh, dh, 0});
  if (protocol == kProtoEsp) p.transforms.push_back({kTfEsn, uint16_t(esn), 0});
  return p;
}

std::string Suite::str() const { return proposal_str(to_proposal(1, {})); }

static bool implemented(const Transform& t) {
  switch (t.type) {
    case kTfEncr:
      if (t.id == kEncrChacha20Poly1305) return t.key_bits == 0;
      return (t.id == kEncrAesCbc || t.id == kEncrAesGcm16) &&
             (t.key_bits == 128 || t.key_bits == 192 || t.key_bits == 256);
    case kTfPrf: return t.id >= kPrfSha256 && t.id <= kPrfSha512;
    case kTfInteg: return t.id == kIntegNone || (t.id >= kIntegSha256 && t.id <= kIntegSha512);
    case kTfDh:
      return t.id == kDhNone || t.id == kDhModp2048 || t.id == kDhEcp256 || t.id == kDhEcp384 || t.id == kDhX25519;
    case kTfEsn: return t.id <= 1;
  }
  return false;
}

// Picks one transform per type, ours ∩ theirs, in our order.
static std::optional<Suite> match(const Proposal& theirs, const Proposal& ours, bool ignore_dh) {
  if (theirs.protocol != ours.protocol) return std::nullopt;
  // Transform types we do not know make the proposal unacceptable (§3.3.6).
  for (auto& t : theirs.transforms)
    if (t.type < kTfEncr || t.type > kTfEsn) return std::nullopt;
  Suite s;
  s.protocol = ours.protocol;
  for (uint8_t type = kTfEncr; type <= kTfEsn; ++type) {
    if (type == kTfDh && ignore_dh) continue;
    std::vector<Transform> mine, peer;
    for (auto& t : ours.transforms)
      if (t.type == type) mine.push_back(t);
    for (auto& t : theirs.transforms)
      if (t.type == type && implemented(t)) peer.push_back(t);
    bool peer_has_type = has_type(theirs, type);
    const Transform* pick = nullptr;
    Transform none{type, 0, 0};
    if (mine.empty()) {
      // We want none of this type: fine if they offer none, or NONE among them.
      if (type == kTfEncr) return std::nullopt;
      if (!peer_has_type) continue;
      if (type == kTfEsn) return std::nullopt;
      if (std::find(peer.begin(), peer.end(), none) == peer.end()) return std::nullopt;
      continue;
    }
    if (!peer_has_type) {
      // Missing ESN in an ESP proposal means no ESN; missing DH in a CHILD proposal means none.
      if (type == kTfEsn && std::find(mine.begin(), mine.end(), none) != mine.end()) continue;
      if (type == kTfDh && ours.protocol == kProtoEsp) continue;
      return std::nullopt;
    }
    for (auto& m : mine) {
      if (std::find(peer.begin(), peer.end(), m) != peer.end()) {
        pick = &m;
        break;
      }
    }
    if (!pick) return std::nullopt;
    switch (type) {
      case kTfEncr:
        s.encr = pick->id;
        s.encr_bits = pick->id == kEncrChacha20Poly1305 ? 256 : pick->key_bits;
        break;
      case kTfPrf: s.prf = pick->id; break;
      case kTfInteg: s.integ = pick->id; break;
      case kTfDh: s.dh = pick->id; break;
      case kTfEsn: s.esn = pick->id == 1; break;
    }
  }
  return s;
}

std::optional<std::pair<Suite, const Proposal*>> select_proposal(const std::vector<Proposal>& offered,
                                                                 const std::vector<Proposal>& ours, bool ignore_dh) {
  for (auto& o : ours)
    for (auto& t : offered)
      if (auto s = match(t, o, ignore_dh)) return std::make_pair(*s, &t);
  return std::nullopt;
}

std::optional<Suite> accept_proposal(const Proposal& answer, const std::vector<Proposal>& ours, bool ignore_dh) {
  uint8_t count[6] = {};
  for (auto& t : answer.transforms)
    if (t.type >= kTfEncr && t.type <= kTfEsn && ++count[t.type] > 1) return std::nullopt;
  for (auto& o : ours)
    if (auto s = match(answer, o, ignore_dh)) return s;
  return std::nullopt;
}

// ---------------------------------------------------------------- primitives
Bytes random_bytes(size_t n) {
  Bytes b(n);
  if (n && RAND_bytes(b.data(), int(n)) != 1) abort();  // no entropy: nothing safe to do
  return b;
}

// OpenSSL 3 looks an algorithm up by name (a locked method store and a
// property query) on every implicit use: HMAC(), SHA1(), EVP_sha256() or
// EVP_aes_128_gcm() handed to an init call. At thousands of IKE SAs per
// second those look-ups were a large share of the responder's time, so the
// algorithms are fetched once per process and the contexts built from them
// are kept per thread and re-keyed for each use.
namespace {

template <class T, void (*Free)(T*)>
struct Owned {
  T* p = nullptr;
  ~Owned() { Free(p); }
};

// Fetched algorithms live as long as the process (OpenSSL keeps them
// reference-counted; nothing gains from freeing them at exit).
EVP_MAC* hmac_alg() {
  static EVP_MAC* m = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  return m;
}

const EVP_MD* fetched_md(const char* name) {
  static EVP_MD* sha1 = EVP_MD_fetch(nullptr, "SHA1", nullptr);
  static EVP_MD* sha256 = EVP_MD_fetch(nullptr, "SHA2-256", nullptr);
  static EVP_MD* sha384 = EVP_MD_fetch(nullptr, "SHA2-384", nullptr);
  static EVP_MD* sha512 = EVP_MD_fetch(nullptr, "SHA2-512", nullptr);
  std::string_view n(name);
  return n == "SHA1" ? sha1 : n == "SHA2-256" ? sha256 : n == "SHA2-384" ? sha384 : sha512;
}

const char* prf_md(uint16_t alg) {
  switch (alg) {
    case kPrfSha256: return "SHA2-256";
    case kPrfSha384: return "SHA2-384";
    case kPrfSha512: return "SHA2-512";
  }
  return nullptr;
}

const char* integ_md(uint16_t alg) {
  switch (alg) {
    case kIntegSha256: return "SHA2-256";
    case kIntegSha384: return "SHA2-384";
    case kIntegSha512: return "SHA2-512";
  }
  return nullptr;
}

// One HMAC context per digest and thread; EVP_MAC_init with a key re-keys it
// and keeps the digest set once.
EVP_MAC_CTX* hmac_ctx(const char* digest) {
  thread_local Owned<EVP_MAC_CTX, EVP_MAC_CTX_free> ctx[3];
  std::string_view d(digest);
  auto& c = ctx[d == "SHA2-256" ? 0 : d == "SHA2-384" ? 1 : 2];
  if (!c.p) {
    c.p = EVP_MAC_CTX_new(hmac_alg());
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, const_cast<char*>(digest), 0),
                           OSSL_PARAM_construct_end()};
    if (!c.p || EVP_MAC_CTX_set_params(c.p, params) != 1) abort();  // no HMAC in this OpenSSL: nothing works
  }
  return c.p;
}

}  // namespace

static Bytes hmac(const char* digest, ByteView key, ByteView data) {
  EVP_MAC_CTX* c = hmac_ctx(digest);
  Bytes out(EVP_MAX_MD_SIZE);
  size_t len = 0;
  // An empty key is valid for HMAC, but OpenSSL wants a non-null pointer.
  static const uint8_t kEmpty = 0;
  if (EVP_MAC_init(c, key.empty() ? &kEmpty : key.data(), key.size(), nullptr) != 1 ||
      EVP_MAC_update(c, data.data(), data.size()) != 1 || EVP_MAC_final(c, out.data(), &len, out.size()) != 1)
    abort();  // cannot happen with a fetched HMAC and a valid digest; a wrong MAC would be worse
  out.resize(len);
  return out;
}

Bytes prf(uint16_t alg, ByteView key, ByteView data) { return hmac(prf_md(alg), key, data); }

Bytes prf_plus(uint16_t alg, ByteView key, ByteView seed, size_t len) {
  Bytes out, t, in;
  for (unsigned n = 1; out.size() < len; ++n) {
    in = t;
    in.insert(in.end(), seed.begin(), seed.end());
    in.push_back(uint8_t(n));
    t = prf(alg, key, in);
    out.insert(out.end(), t.begin(), t.end());
  }
  out.resize(len);
  return out;
}

Bytes sha1(ByteView data) {
  Bytes out(SHA_DIGEST_LENGTH);
  if (EVP_Digest(data.data(), data.size(), out.data(), nullptr, fetched_md("SHA1"), nullptr) != 1) abort();
  return out;
}

bool equal_ct(ByteView a, ByteView b) { return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0; }

// ---------------------------------------------------------------- DH
size_t dh_public_len(uint16_t g) {
  switch (g) {
    case kDhModp2048: return 256;
    case kDhEcp256: return 64;
    case kDhEcp384: return 96;
    case kDhX25519: return 32;
  }
  return 0;
}

namespace {

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct CtxFree {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;
using CtxPtr = std::unique_ptr<EVP_PKEY_CTX, CtxFree>;

tl::expected<Bytes, std::string> derive_with(EVP_PKEY* mine, EVP_PKEY* peer, bool pad) {
  CtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, mine, nullptr));
  size_t len = 0;
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1) return tl::unexpected(std::string("derive init failed"));
  // OpenSSL strips leading zero bytes of a MODP secret by default; IKE uses the
  // full-length value (§2.14), or one key in 256 would differ from the peer's.
  if (pad && EVP_PKEY_CTX_set_dh_pad(ctx.get(), 1) != 1) return tl::unexpected(std::string("cannot pad DH secret"));
  if (EVP_PKEY_derive_set_peer(ctx.get(), peer) != 1) return tl::unexpected(std::string("peer public value rejected"));
  if (EVP_PKEY_derive(ctx.get(), nullptr, &len) != 1) return tl::unexpected(std::string("derive failed"));
  Bytes out(len);
  if (EVP_PKEY_derive(ctx.get(), out.data(), &len) != 1) return tl::unexpected(std::string("derive failed"));
  out.resize(len);
  return out;
}

class X25519 : public Dh {
 public:
  bool init() {
    group_ = kDhX25519;
    // The key generation and import contexts are made once per thread (see
    // hmac_alg: each new one would look X25519 up in OpenSSL's store again).
    EVP_PKEY_CTX* gen = x25519_ctx(true);
    EVP_PKEY* k = nullptr;
    if (!gen || EVP_PKEY_keygen(gen, &k) != 1) return false;
    key_.reset(k);
    pub_.resize(32);
    size_t len = 32;
    return EVP_PKEY_get_raw_public_key(k, pub_.data(), &len) == 1 && len == 32;
  }
  tl::expected<Bytes, std::string> derive(ByteView peer) override {
    if (peer.size() != 32) return tl::unexpected(fmt::format("X25519 public value of {} bytes", peer.size()));
    EVP_PKEY_CTX* imp = x25519_ctx(false);
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, const_cast<uint8_t*>(peer.data()), peer.size()),
        OSSL_PARAM_construct_end()};
    EVP_PKEY* raw = nullptr;
    if (!imp || EVP_PKEY_fromdata(imp, &raw, EVP_PKEY_PUBLIC_KEY, params) != 1)
      return tl::unexpected(std::string("X25519 public value rejected"));
    PkeyPtr p(raw);
    auto s = derive_with(key_.get(), p.get(), false);
    // An all-zero result means a low-order point (RFC 7748 §6.1).
    if (s && std::all_of(s->begin(), s->end(), [](uint8_t c) { return c == 0; }))
      return tl::unexpected(std::string("X25519 shared secret is zero"));
    return s;
  }

 private:
  // keygen: a key generation context; else one for importing public values.
  static EVP_PKEY_CTX* x25519_ctx(bool keygen) {
    thread_local Owned<EVP_PKEY_CTX, EVP_PKEY_CTX_free> ctx[2];
    auto& c = ctx[keygen ? 0 : 1];
    if (!c.p) {
      c.p = EVP_PKEY_CTX_new_from_name(nullptr, "X25519", nullptr);
      if (c.p && (keygen ? EVP_PKEY_keygen_init(c.p) : EVP_PKEY_fromdata_init(c.p)) != 1) {
        EVP_PKEY_CTX_free(c.p);
        c.p = nullptr;
      }
    }
    return c.p;
  }
  PkeyPtr key_;
};

class Ecp : public Dh {
 public:
  bool init(uint16_t g) {
    group_ = g;
    curve_ = g == kDhEcp256 ? "P-256" : "P-384";
    CtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
    EVP_PKEY* k = nullptr;
    if (!ctx || EVP_PKEY_keygen_init(ctx.get()) != 1) return false;
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, const_cast<char*>(curve_), 0),
                           OSSL_PARAM_construct_end()};
    if (EVP_PKEY_CTX_set_params(ctx.get(), params) != 1 || EVP_PKEY_keygen(ctx.get(), &k) != 1) return false;
    key_.reset(k);
    unsigned char buf[1 + 96];
    size_t len = 0;
    if (EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, buf, sizeof buf, &len) != 1) return false;
    if (len != 1 + dh_public_len(g) || buf[0] != 4) return false;
    pub_.assign(buf + 1, buf + len);  // RFC 5903: x | y, no point-format octet
    return true;
  }
  tl::expected<Bytes, std::string> derive(ByteView peer) override {
    if (peer.size() != dh_public_len(group_))
      return tl::unexpected(fmt::format("{} public value of {} bytes", curve_, peer.size()));
    Bytes enc{4};
    enc.insert(enc.end(), peer.begin(), peer.end());
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, const_cast<char*>(curve_), 0),
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, enc.data(), enc.size()), OSSL_PARAM_construct_end()};
    CtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
    EVP_PKEY* p = nullptr;
    if (!ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
        EVP_PKEY_fromdata(ctx.get(), &p, EVP_PKEY_PUBLIC_KEY, params) != 1)
      return tl::unexpected(fmt::format("{} public value is not a point", curve_));
    PkeyPtr pp(p);
    CtxPtr chk(EVP_PKEY_CTX_new_from_pkey(nullptr, p, nullptr));
    if (!chk || EVP_PKEY_public_check(chk.get()) != 1)
      return tl::unexpected(fmt::format("{} public value is not on the curve", curve_));
    return derive_with(key_.get(), p, false);
  }

 private:
  const char* curve_ = "";
  PkeyPtr key_;
};

class Modp : public Dh {
 public:
  bool init() {
    group_ = kDhModp2048;
    CtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "DH", nullptr));
    EVP_PKEY* k = nullptr;
    if (!ctx || EVP_PKEY_keygen_init(ctx.get()) != 1) return false;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, const_cast<char*>("modp_2048"), 0),
        OSSL_PARAM_construct_end()};
    if (EVP_PKEY_CTX_set_params(ctx.get(), params) != 1 || EVP_PKEY_keygen(ctx.get(), &k) != 1) return false;
    key_.reset(k);
    BIGNUM* y = nullptr;
    if (EVP_PKEY_get_bn_param(k, OSSL_PKEY_PARAM_PUB_KEY, &y) != 1) return false;
    pub_.assign(256, 0);
    int ok = BN_bn2binpad(y, pub_.data(), 256);
    BN_free(y);
    return ok == 256;
  }
  tl::expected<Bytes, std::string> derive(ByteView peer) override {
    if (peer.size() != 256) return tl::unexpected(fmt::format("MODP_2048 public value of {} bytes", peer.size()));
    BIGNUM* y = BN_bin2bn(peer.data(), 256, nullptr);
    OSSL_PARAM_BLD* bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "modp_2048", 0);
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PUB_KEY, y);
    OSSL_PARAM* params = OSSL_PARAM_BLD_to_param(bld);
    CtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "DH", nullptr));
    EVP_PKEY* p = nullptr;
    int ok = ctx && EVP_PKEY_fromdata_init(ctx.get()) == 1 &&
             EVP_PKEY_fromdata(ctx.get(), &p, EVP_PKEY_PUBLIC_KEY, params) == 1;
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(y);
    if (!ok) return tl::unexpected(std::string("MODP_2048 public value rejected"));
    PkeyPtr pp(p);
    // Rejects 0, 1 and p-1 and values >= p (small-subgroup confinement).
    CtxPtr chk(EVP_PKEY_CTX_new_from_pkey(nullptr, p, nullptr));
    if (!chk || EVP_PKEY_public_check(chk.get()) != 1)
      return tl::unexpected(std::string("MODP_2048 public value out of range"));
    return derive_with(key_.get(), p, true);
  }

 private:
  PkeyPtr key_;
};

}  // namespace

tl::expected<std::unique_ptr<Dh>, std::string> Dh::create(uint16_t group) {
  switch (group) {
    case kDhX25519: {
      auto d = std::make_unique<X25519>();
      if (d->init()) return d;
      break;
    }
    case kDhEcp256:
    case kDhEcp384: {
      auto d = std::make_unique<Ecp>();
      if (d->init(group)) return d;
      break;
    }
    case kDhModp2048: {
      auto d = std::make_unique<Modp>();
      if (d->init()) return d;
      break;
    }
    default: return tl::unexpected(fmt::format("DH group {} not implemented", group));
  }
  return tl::unexpected(fmt::format("cannot generate a {} key", transform_name(kTfDh, group)));
}

// ---------------------------------------------------------------- keys
static Bytes cat(std::initializer_list<ByteView> parts) {
  Bytes o;
  for (auto p : parts) o.insert(o.end(), p.begin(), p.end());
  return o;
}

static IkeKeys split_ike_keys(const Suite& s, ByteView skeyseed, ByteView ni, ByteView nr, uint64_t spi_i,
                              uint64_t spi_r) {
  Bytes spis;
  put64(spis, spi_i);
  put64(spis, spi_r);
  size_t pl = s.prf_len(), il = s.aead() ? 0 : s.integ_key_len(), el = s.encr_key_len();
  Bytes km = prf_plus(s.prf, skeyseed, cat({ni, nr, spis}), 3 * pl + 2 * il + 2 * el);
  IkeKeys k;
  size_t o = 0;
  auto take = [&](Bytes& dst, size_t n) {
    dst.assign(km.begin() + long(o), km.begin() + long(o + n));
    o += n;
  };
  take(k.sk_d, pl);
  take(k.sk_ai, il);
  take(k.sk_ar, il);
  take(k.sk_ei, el);
  take(k.sk_er, el);
  take(k.sk_pi, pl);
  take(k.sk_pr, pl);
  OPENSSL_cleanse(km.data(), km.size());
  return k;
}

IkeKeys derive_ike_keys(const Suite& s, ByteView g_ir, ByteView ni, ByteView nr, uint64_t spi_i, uint64_t spi_r) {
  Bytes skeyseed = prf(s.prf, cat({ni, nr}), g_ir);
  auto k = split_ike_keys(s, skeyseed, ni, nr, spi_i, spi_r);
  OPENSSL_cleanse(skeyseed.data(), skeyseed.size());
  return k;
}

IkeKeys derive_rekeyed_ike_keys(const Suite& s, uint16_t old_prf, ByteView old_sk_d, ByteView g_ir, ByteView ni,
                                ByteView nr, uint64_t spi_i, uint64_t spi_r) {
  Bytes skeyseed = prf(old_prf, old_sk_d, cat({g_ir, ni, nr}));
  auto k = split_ike_keys(s, skeyseed, ni, nr, spi_i, spi_r);
  OPENSSL_cleanse(skeyseed.data(), skeyseed.size());
  return k;
}

ChildKeys derive_child_keys(const Suite& c, uint16_t prf_alg, ByteView sk_d, ByteView g_ir, ByteView ni, ByteView nr) {
  size_t el = c.encr_key_len(), il = c.aead() ? 0 : c.integ_key_len();
  Bytes km = prf_plus(prf_alg, sk_d, cat({g_ir, ni, nr}), 2 * (el + il));
  ChildKeys k;
  auto at = [&](size_t o, size_t n) { return Bytes(km.begin() + long(o), km.begin() + long(o + n)); };
  k.encr_i = at(0, el);
  k.integ_i = at(el, il);
  k.encr_r = at(el + il, el);
  k.integ_r = at(2 * el + il, il);
  OPENSSL_cleanse(km.data(), km.size());
  return k;
}

// ---------------------------------------------------------------- SK payload
// Fetched once (see hmac_alg above); a context per thread, reset per use.
static const EVP_CIPHER* cipher(const Suite& s) {
  static EVP_CIPHER* const kAll[] = {
      EVP_CIPHER_fetch(nullptr, "AES-128-CBC", nullptr), EVP_CIPHER_fetch(nullptr, "AES-192-CBC", nullptr),
      EVP_CIPHER_fetch(nullptr, "AES-256-CBC", nullptr), EVP_CIPHER_fetch(nullptr, "AES-128-GCM", nullptr),
      EVP_CIPHER_fetch(nullptr, "AES-192-GCM", nullptr), EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr),
      EVP_CIPHER_fetch(nullptr, "ChaCha20-Poly1305", nullptr)};
  int bits = s.encr_bits == 128 ? 0 : s.encr_bits == 192 ? 1 : 2;
  switch (s.encr) {
    case kEncrAesCbc: return kAll[bits];
    case kEncrAesGcm16: return kAll[3 + bits];
    case kEncrChacha20Poly1305: return kAll[6];
  }
  return nullptr;
}

struct CipherCtx {
  EVP_CIPHER_CTX* c;
  CipherCtx() {
    thread_local Owned<EVP_CIPHER_CTX, EVP_CIPHER_CTX_free> ctx;
    if (!ctx.p) ctx.p = EVP_CIPHER_CTX_new();
    c = ctx.p;
  }
  ~CipherCtx() { EVP_CIPHER_CTX_reset(c); }  // no key material left behind
};

Bytes sk_seal(const Suite& s, ByteView ke, ByteView ka, Header h, uint8_t first_inner, ByteView inner,
              uint16_t frag_num, uint16_t frag_total) {
  const size_t iv_len = s.iv_len(), icv = s.icv_len(), blk = s.block_len();
  size_t pad = blk > 1 ? (blk - (inner.size() + 1) % blk) % blk : 0;
  size_t pt_len = inner.size() + pad + 1;
  size_t hdr = frag_total ? 8 : 4;
  size_t sk_len = hdr + iv_len + pt_len + icv;
  h.next = frag_total ? kPlSkf : kPlSk;
  h.length = uint32_t(kHeaderLen + sk_len);
  Bytes o;
  o.reserve(h.length);
  put_header(o, h);
  o.push_back(first_inner);
  o.push_back(0);
  put16(o, uint16_t(sk_len));
  if (frag_total) {
    // Fragment Number and Total Fragments are authenticated with the header.
    put16(o, frag_num);
    put16(o, frag_total);
  }
  size_t aad_len = o.size();
  Bytes iv = random_bytes(iv_len);
  o.insert(o.end(), iv.begin(), iv.end());
  Bytes pt(inner.begin(), inner.end());
  pt.resize(inner.size() + pad, 0);
  pt.push_back(uint8_t(pad));
  size_t ct_off = o.size();
  o.resize(ct_off + pt_len + icv);
  CipherCtx cc;
  int outl = 0;
  if (s.aead()) {
    size_t klen = ke.size() - 4;
    uint8_t nonce[12];
    memcpy(nonce, ke.data() + klen, 4);
    memcpy(nonce + 4, iv.data(), 8);
    EVP_EncryptInit_ex(cc.c, cipher(s), nullptr, nullptr, nullptr);
    EVP_CIPHER_CTX_ctrl(cc.c, EVP_CTRL_AEAD_SET_IVLEN, 12, nullptr);
    EVP_EncryptInit_ex(cc.c, nullptr, nullptr, ke.data(), nonce);
    EVP_EncryptUpdate(cc.c, nullptr, &outl, o.data(), int(aad_len));
    EVP_EncryptUpdate(cc.c, o.data() + ct_off, &outl, pt.data(), int(pt.size()));
    EVP_EncryptFinal_ex(cc.c, o.data() + ct_off + outl, &outl);
    EVP_CIPHER_CTX_ctrl(cc.c, EVP_CTRL_AEAD_GET_TAG, 16, o.data() + ct_off + pt_len);
  } else {
    EVP_EncryptInit_ex(cc.c, cipher(s), nullptr, ke.data(), iv.data());
    EVP_CIPHER_CTX_set_padding(cc.c, 0);
    EVP_EncryptUpdate(cc.c, o.data() + ct_off, &outl, pt.data(), int(pt.size()));
    Bytes mac = hmac(integ_md(s.integ), ka, ByteView(o.data(), ct_off + pt_len));
    memcpy(o.data() + ct_off + pt_len, mac.data(), icv);
  }
  OPENSSL_cleanse(pt.data(), pt.size());
  return o;
}

tl::expected<Bytes, std::string> sk_open(const Suite& s, ByteView ke, ByteView ka, const Message& m) {
  if (!m.sk_offset || m.payloads.empty()) return tl::unexpected(std::string("no encrypted payload"));
  const size_t iv_len = s.iv_len(), icv = s.icv_len(), blk = s.block_len();
  const uint8_t* raw = m.raw.data();
  bool frag = m.payloads.back().type == kPlSkf;
  size_t body = m.sk_offset + (frag ? 8 : 4), end = m.raw.size();
  if (body > end) return tl::unexpected(std::string("encrypted fragment too short"));
  if (end - body < iv_len + icv + 1) return tl::unexpected(std::string("encrypted payload too short"));
  size_t ct_off = body + iv_len, ct_len = end - icv - ct_off;
  if (ct_len % blk) return tl::unexpected(std::string("ciphertext is not a whole number of blocks"));
  Bytes pt(ct_len);
  CipherCtx cc;
  int outl = 0;
  if (s.aead()) {
    size_t klen = ke.size() - 4;
    uint8_t nonce[12];
    memcpy(nonce, ke.data() + klen, 4);
    memcpy(nonce + 4, raw + body, 8);
    EVP_DecryptInit_ex(cc.c, cipher(s), nullptr, nullptr, nullptr);
    EVP_CIPHER_CTX_ctrl(cc.c, EVP_CTRL_AEAD_SET_IVLEN, 12, nullptr);
    EVP_DecryptInit_ex(cc.c, nullptr, nullptr, ke.data(), nonce);
    EVP_DecryptUpdate(cc.c, nullptr, &outl, raw, int(body));
    EVP_DecryptUpdate(cc.c, pt.data(), &outl, raw + ct_off, int(ct_len));
    EVP_CIPHER_CTX_ctrl(cc.c, EVP_CTRL_AEAD_SET_TAG, 16, const_cast<uint8_t*>(raw + end - icv));
    if (EVP_DecryptFinal_ex(cc.c, pt.data() + outl, &outl) != 1)
      return tl::unexpected(std::string("ICV check failed"));
  } else {
    Bytes mac = hmac(integ_md(s.integ), ka, ByteView(raw, end - icv));
    if (!equal_ct(ByteView(mac.data(), icv), ByteView(raw + end - icv, icv)))
      return tl::unexpected(std::string("ICV check failed"));
    EVP_DecryptInit_ex(cc.c, cipher(s), nullptr, ke.data(), raw + body);
    EVP_CIPHER_CTX_set_padding(cc.c, 0);
    EVP_DecryptUpdate(cc.c, pt.data(), &outl, raw + ct_off, int(ct_len));
  }
  uint8_t pad = pt.back();
  if (size_t(pad) + 1 > pt.size()) return tl::unexpected(std::string("pad length exceeds the plaintext"));
  pt.resize(pt.size() - pad - 1);
  return pt;
}

Bytes psk_auth(uint16_t prf_alg, ByteView psk, ByteView signed_octets) {
  static const char kPad[] = "Key Pad for IKEv2";
  Bytes k = prf(prf_alg, psk, ByteView(reinterpret_cast<const uint8_t*>(kPad), sizeof kPad - 1));
  Bytes a = prf(prf_alg, k, signed_octets);
  OPENSSL_cleanse(k.data(), k.size());
  return a;
}

Bytes nat_hash(uint64_t spi_i, uint64_t spi_r, const Endpoint& e) {
  Bytes d;
  put64(d, spi_i);
  put64(d, spi_r);
  auto a = e.addr.bytes();
  d.insert(d.end(), a.begin(), a.end());
  put16(d, e.port);
  return sha1(d);
}

}  // namespace moat::ike
