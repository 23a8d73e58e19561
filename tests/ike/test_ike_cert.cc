// Certificate authentication (RFC 7427) between two engines: a test CA made
// with OpenSSL's API, ECDSA certificates, trust and identity checks.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <unistd.h>

#include <deque>
#include <filesystem>
#include <functional>

#include "ctrl/ike/cert.hh"
#include "ctrl/ike/engine.hh"

using namespace moat::ike;

namespace {

namespace fs = std::filesystem;

struct Pki {
  fs::path dir = fs::temp_directory_path() / ("moat-ike-pki-" + std::to_string(getpid()));
  Pki() { fs::create_directories(dir); }
  ~Pki() { fs::remove_all(dir); }

  static EVP_PKEY* key() { return EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"); }
  static X509* cert(const std::string& cn, EVP_PKEY* pub, X509* issuer, EVP_PKEY* issuer_key, bool ca,
                    const std::string& san) {
    X509* x = X509_new();
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), long(std::hash<std::string>()(cn) & 0x7fffffff));
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_NAME* n = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(n, "C", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("CH"), -1, -1, 0);
    X509_NAME_add_entry_by_txt(n, "O", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("Moat"), -1, -1, 0);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
    X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : n);
    X509_set_pubkey(x, pub);
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer ? issuer : x, x, nullptr, nullptr, 0);
    auto ext = [&](int nid, const char* v) {
      X509_EXTENSION* e = X509V3_EXT_conf_nid(nullptr, &ctx, nid, v);
      X509_add_ext(x, e, -1);
      X509_EXTENSION_free(e);
    };
    ext(NID_basic_constraints, ca ? "critical,CA:TRUE" : "CA:FALSE");
    if (!san.empty()) ext(NID_subject_alt_name, san.c_str());
    X509_sign(x, issuer_key, EVP_sha256());
    return x;
  }
  void write(const std::string& name, X509* x) {
    FILE* f = fopen((dir / name).c_str(), "w");
    PEM_write_X509(f, x);
    fclose(f);
  }
  void write(const std::string& name, EVP_PKEY* k) {
    FILE* f = fopen((dir / name).c_str(), "w");
    PEM_write_PrivateKey(f, k, nullptr, nullptr, 0, nullptr, nullptr);
    fclose(f);
  }
  std::string path(const std::string& n) const { return (dir / n).string(); }

  // ca.pem, other-ca.pem; moat/portal .pem/.key signed by ca.
  void make() {
    EVP_PKEY* ca_key = key();
    X509* ca = cert("Moat Test CA", ca_key, nullptr, ca_key, true, "");
    EVP_PKEY* other_key = key();
    X509* other = cert("Other CA", other_key, nullptr, other_key, true, "");
    write("ca.pem", ca);
    write("other-ca.pem", other);
    for (std::string n : {"moat", "portal"}) {
      EVP_PKEY* k = key();
      X509* c = cert(n + ".example.net", k, ca, ca_key, false, "DNS:" + n + ".example.net");
      write(n + ".pem", c);
      write(n + ".key", k);
      X509_free(c);
      EVP_PKEY_free(k);
    }
    X509_free(ca);
    X509_free(other);
    EVP_PKEY_free(ca_key);
    EVP_PKEY_free(other_key);
  }
};

struct Pkt {
  Endpoint from, to;
  Bytes data;
};

class FakeTransport : public Transport {
 public:
  FakeTransport(std::deque<Pkt>& q, IpAddr me) : q_(q), me_(me) {}
  void send(const Endpoint& l, const Endpoint& r, ByteView d) override { q_.push_back({l, r, Bytes(d.begin(), d.end())}); }
  std::optional<IpAddr> source_for(const IpAddr&) override { return me_; }

 private:
  std::deque<Pkt>& q_;
  IpAddr me_;
};

struct CountSink : ChildSaSink {
  std::vector<ChildSa> installed;
  void install(const ChildSa& sa) override { installed.push_back(sa); }
  void remove(const ChildSa&) override {}
  void rekeyed(const ChildSa&, const ChildSa&) override {}
};

class CertPair : public ::testing::Test {
 protected:
  Pki pki;
  std::deque<Pkt> q;
  IpAddr ma = *IpAddr::parse("198.51.100.7"), pa = *IpAddr::parse("192.0.2.1");
  FakeTransport mt{q, ma}, pt{q, pa};
  CountSink ms, ps;
  Engine moat{mt, ms, {}, [](const std::string&) {}};
  std::vector<std::string> portal_log;
  Engine portal{pt, ps, {}, [this](const std::string& s) { portal_log.push_back(s); }};

  void SetUp() override { pki.make(); }

  PeerConfig tunnel(const std::string& me, const std::string& peer_id, const std::string& ca) {
    PeerConfig p;
    p.name = "t";
    auto c = Credentials::load(pki.path(me + ".pem"), pki.path(me + ".key"), pki.path(ca), "");
    EXPECT_TRUE(c) << c.error();
    if (c) p.creds = *c;
    if (p.creds) p.local_id = p.creds->subject();
    p.remote_id = *Identity::parse(peer_id);
    p.ike_proposals = *parse_proposals("aes128gcm16-prfsha256-ecp256", kProtoIke);
    p.esp_proposals = *parse_proposals("aes128gcm16", kProtoEsp);
    p.local_ts = p.remote_ts = {TrafficSelector::from_prefix(IpAddr::v4(0x0a000000), 8)};
    return p;
  }

  bool said(const std::string& what) const {
    for (auto& l : portal_log)
      if (l.find(what) != std::string::npos) return true;
    return false;
  }

  void connect(PeerConfig m, PeerConfig p) {
    m.remote = Endpoint{pa, kIkePort};
    moat.set_peers({m}, 0);
    portal.set_peers({p}, 0);
    ASSERT_TRUE(moat.initiate("t", 0));
    for (int i = 0; i < 50 && !q.empty(); ++i) {
      Pkt k = q.front();
      q.pop_front();
      (k.to.addr == pa ? portal : moat).receive(k.to, k.from, k.data, 0);
    }
  }
};

TEST_F(CertPair, EcdsaCertificatesAuthenticateBothWays) {
  connect(tunnel("moat", "C=CH, O=Moat, CN=portal.example.net", "ca.pem"),
          tunnel("portal", "C=CH, O=Moat, CN=moat.example.net", "ca.pem"));
  ASSERT_EQ(ms.installed.size(), 1u);
  ASSERT_EQ(ps.installed.size(), 1u);
  EXPECT_EQ(ms.installed[0].encr_key_out, ps.installed[0].encr_key_in);
  EXPECT_EQ(ps.installed[0].peer_id.str(), "C=CH, O=Moat, CN=moat.example.net");
}

TEST_F(CertPair, FqdnIdentityIsCheckedAgainstSubjectAltName) {
  auto m = tunnel("moat", "C=CH, O=Moat, CN=portal.example.net", "ca.pem");
  m.local_id = *Identity::parse("moat.example.net");  // in the certificate's SAN
  connect(m, tunnel("portal", "moat.example.net", "ca.pem"));
  EXPECT_EQ(ps.installed.size(), 1u);
  EXPECT_EQ(portal.stats().auth_failed, 0u);
}

TEST_F(CertPair, UntrustedCaIsRefused) {
  connect(tunnel("moat", "C=CH, O=Moat, CN=portal.example.net", "ca.pem"),
          tunnel("portal", "C=CH, O=Moat, CN=moat.example.net", "other-ca.pem"));
  EXPECT_EQ(portal.stats().auth_failed, 1u);
  EXPECT_EQ(ps.installed.size(), 0u);
  EXPECT_EQ(ms.installed.size(), 0u);
  EXPECT_TRUE(said("peer certificate not trusted"));
}

TEST_F(CertPair, CertificateMustNameTheIdentity) {
  // The moat claims an identity its certificate does not carry.
  auto m = tunnel("moat", "C=CH, O=Moat, CN=portal.example.net", "ca.pem");
  m.local_id = *Identity::parse("C=CH, O=Moat, CN=somebody-else");
  connect(m, tunnel("portal", "C=CH, O=Moat, CN=somebody-else", "ca.pem"));
  EXPECT_EQ(portal.stats().auth_failed, 1u);
  EXPECT_TRUE(said("does not name"));
}

TEST(IkeCredentials, KeyMustMatchCertificate) {
  Pki pki;
  pki.make();
  auto c = Credentials::load(pki.path("moat.pem"), pki.path("portal.key"), pki.path("ca.pem"), "");
  ASSERT_FALSE(c);
  EXPECT_NE(c.error().find("does not belong"), std::string::npos) << c.error();
}

}  // namespace
