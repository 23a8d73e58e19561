#include "ctrl/ike/message.hh"

#include <arpa/inet.h>
#include <openssl/bio.h>
#include <openssl/buffer.h>
#include <openssl/x509.h>
#include <sys/socket.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace moat::ike {

uint16_t get16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
uint32_t get32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
uint64_t get64(const uint8_t* p) { return uint64_t(get32(p)) << 32 | get32(p + 4); }
void put16(Bytes& o, uint16_t v) {
  o.push_back(uint8_t(v >> 8));
  o.push_back(uint8_t(v));
}
void put32(Bytes& o, uint32_t v) {
  put16(o, uint16_t(v >> 16));
  put16(o, uint16_t(v));
}
void put64(Bytes& o, uint64_t v) {
  put32(o, uint32_t(v >> 32));
  put32(o, uint32_t(v));
}

static tl::unexpected<ParseError> bad(std::string why, uint16_t notify = kNInvalidSyntax, uint8_t pl = 0) {
  return tl::unexpected(ParseError{notify, pl, std::move(why)});
}

const char* exchange_name(uint8_t e) {
  switch (e) {
    case 34: return "IKE_SA_INIT";
    case 35: return "IKE_AUTH";
    case 36: return "CREATE_CHILD_SA";
    case 37: return "INFORMATIONAL";
  }
  return "UNKNOWN_EXCHANGE";
}

bool payload_type_known(uint8_t t) { return (t >= kPlSa && t <= kPlEap) || t == kPlSkf; }

std::string notify_name(uint16_t t) {
  switch (t) {
    case kNUnsupportedCriticalPayload: return "UNSUPPORTED_CRITICAL_PAYLOAD";
    case kNInvalidIkeSpi: return "INVALID_IKE_SPI";
    case kNInvalidMajorVersion: return "INVALID_MAJOR_VERSION";
    case kNInvalidSyntax: return "INVALID_SYNTAX";
    case kNInvalidMessageId: return "INVALID_MESSAGE_ID";
    case kNInvalidSpi: return "INVALID_SPI";
    case kNNoProposalChosen: return "NO_PROPOSAL_CHOSEN";
    case kNInvalidKePayload: return "INVALID_KE_PAYLOAD";
    case kNAuthenticationFailed: return "AUTHENTICATION_FAILED";
    case kNSinglePairRequired: return "SINGLE_PAIR_REQUIRED";
    case kNNoAdditionalSas: return "NO_ADDITIONAL_SAS";
    case kNInternalAddressFailure: return "INTERNAL_ADDRESS_FAILURE";
    case kNFailedCpRequired: return "FAILED_CP_REQUIRED";
    case kNTsUnacceptable: return "TS_UNACCEPTABLE";
    case kNInvalidSelectors: return "INVALID_SELECTORS";
    case kNUnacceptableAddresses: return "UNACCEPTABLE_ADDRESSES";
    case kNUnexpectedNatDetected: return "UNEXPECTED_NAT_DETECTED";
    case kNTemporaryFailure: return "TEMPORARY_FAILURE";
    case kNChildSaNotFound: return "CHILD_SA_NOT_FOUND";
    case kNInitialContact: return "INITIAL_CONTACT";
    case kNSetWindowSize: return "SET_WINDOW_SIZE";
    case kNNatDetectionSourceIp: return "NAT_DETECTION_SOURCE_IP";
    case kNNatDetectionDestinationIp: return "NAT_DETECTION_DESTINATION_IP";
    case kNCookie: return "COOKIE";
    case kNUseTransportMode: return "USE_TRANSPORT_MODE";
    case kNRekeySa: return "REKEY_SA";
    case kNEspTfcPaddingNotSupported: return "ESP_TFC_PADDING_NOT_SUPPORTED";
    case kNNonFirstFragmentsAlso: return "NON_FIRST_FRAGMENTS_ALSO";
    case kNMobikeSupported: return "MOBIKE_SUPPORTED";
    case kNUpdateSaAddresses: return "UPDATE_SA_ADDRESSES";
    case kNCookie2: return "COOKIE2";
    case kNNoNatsAllowed: return "NO_NATS_ALLOWED";
    case kNFragmentationSupported: return "IKEV2_FRAGMENTATION_SUPPORTED";
    case kNSignatureHashAlgorithms: return "SIGNATURE_HASH_ALGORITHMS";
  }
  return fmt::format("NOTIFY_{}", t);
}

const Payload* Message::find(uint8_t type) const {
  for (auto& p : payloads)
    if (p.type == type) return &p;
  return nullptr;
}

std::vector<const Payload*> Message::all(uint8_t type) const {
  std::vector<const Payload*> r;
  for (auto& p : payloads)
    if (p.type == type) r.push_back(&p);
  return r;
}

Parsed<Header> parse_header(ByteView b) {
  if (b.size() < kHeaderLen) return bad(fmt::format("datagram of {} bytes is shorter than an IKE header", b.size()));
  Header h;
  const uint8_t* p = b.data();
  h.spi_i = get64(p);
  h.spi_r = get64(p + 8);
  h.next = p[16];
  h.version = p[17];
  h.exchange = p[18];
  h.flags = p[19];
  h.mid = get32(p + 20);
  h.length = get32(p + 24);
  if ((h.version >> 4) != 2)
    return bad(fmt::format("IKE major version {}", h.version >> 4), kNInvalidMajorVersion);
  if (h.length != b.size())
    return bad(fmt::format("header length {} but datagram has {} bytes", h.length, b.size()));
  return h;
}

// Walks a chain; SK (and SKF) must be last and keep their bodies opaque.
static Parsed<std::vector<Payload>> walk(uint8_t next, ByteView b, size_t base, Message* m) {
  std::vector<Payload> out;
  size_t off = 0;
  while (next != kPlNone) {
    if (b.size() - off < 4) return bad(fmt::format("payload {} truncated: {} bytes left for its header", next, b.size() - off));
    const uint8_t* p = b.data() + off;
    uint16_t len = get16(p + 2);
    if (len < 4) return bad(fmt::format("payload {} claims length {}", next, len));
    if (len > b.size() - off)
      return bad(fmt::format("payload {} claims length {} but only {} bytes remain", next, len, b.size() - off));
    bool critical = p[1] & 0x80;
    uint8_t type = next;
    next = p[0];
    if (type == kPlSk || type == kPlSkf) {
      if (!m) return bad("encrypted payload inside an encrypted payload");
      if (off + len != b.size()) return bad("encrypted payload is not the last payload");
      m->sk_offset = base + off;
      m->sk_next = next;
      out.push_back(Payload{type, critical, Bytes(p + 4, p + len)});
      return out;
    }
    if (!payload_type_known(type)) {
      if (critical)
        return bad(fmt::format("unknown critical payload type {}", type), kNUnsupportedCriticalPayload, type);
    } else {
      out.push_back(Payload{type, critical, Bytes(p + 4, p + len)});
    }
    off += len;
  }
  if (off != b.size()) return bad(fmt::format("{} trailing bytes after the last payload", b.size() - off));
  return out;
}

Parsed<Message> parse_message(ByteView b) {
  auto h = parse_header(b);
  if (!h) return tl::unexpected(h.error());
  Message m;
  m.h = *h;
  auto ps = walk(h->next, b.subspan(kHeaderLen), kHeaderLen, &m);
  if (!ps) return tl::unexpected(ps.error());
  m.payloads = std::move(*ps);
  m.raw.assign(b.begin(), b.end());
  return m;
}

Parsed<std::vector<Payload>> parse_chain(uint8_t first, ByteView b) { return walk(first, b, 0, nullptr); }

// ---- SA ----
Parsed<std::vector<Proposal>> parse_sa(ByteView b) {
  std::vector<Proposal> out;
  size_t off = 0;
  bool more = true;
  while (more) {
    if (b.size() - off < 8) return bad("SA: proposal truncated");
    const uint8_t* p = b.data() + off;
    if (p[0] != 0 && p[0] != 2) return bad(fmt::format("SA: proposal Last Substruc {}", p[0]));
    more = p[0] == 2;
    uint16_t plen = get16(p + 2);
    if (plen < 8 || plen > b.size() - off) return bad(fmt::format("SA: proposal length {} does not fit", plen));
    Proposal pr;
    pr.num = p[4];
    pr.protocol = p[5];
    uint8_t spi_size = p[6];
    uint8_t ntf = p[7];
    if (8u + spi_size > plen) return bad("SA: proposal SPI overruns the proposal");
    pr.spi.assign(p + 8, p + 8 + spi_size);
    size_t t = 8 + spi_size;
    bool tmore = ntf > 0;
    unsigned seen = 0;
    while (tmore) {
      if (plen - t < 8) return bad("SA: transform truncated");
      const uint8_t* q = p + t;
      if (q[0] != 0 && q[0] != 3) return bad(fmt::format("SA: transform Last Substruc {}", q[0]));
      tmore = q[0] == 3;
      uint16_t tlen = get16(q + 2);
      if (tlen < 8 || tlen > plen - t) return bad(fmt::format("SA: transform length {} does not fit", tlen));
      Transform tf;
      tf.type = q[4];
      tf.id = get16(q + 6);
      bool unknown_attr = false;
      for (size_t a = 8; a < tlen;) {
        if (tlen - a < 4) return bad("SA: transform attribute truncated");
        uint16_t at = get16(q + a);
        if (at & 0x8000) {  // TV
          if ((at & 0x7fff) == 14) tf.key_bits = get16(q + a + 2);
          else unknown_attr = true;
          a += 4;
        } else {  // TLV
          uint16_t alen = get16(q + a + 2);
          if (alen > tlen - a - 4) return bad("SA: transform attribute overruns the transform");
          unknown_attr = true;
          a += 4 + alen;
        }
      }
      // A transform with an attribute we do not understand must not be chosen (§3.3.6).
      if (!unknown_attr) pr.transforms.push_back(tf);
      else pr.transforms.push_back(Transform{tf.type, 0xffff, 0});
      t += tlen;
      ++seen;
    }
    if (seen != ntf) return bad(fmt::format("SA: proposal says {} transforms, has {}", ntf, seen));
    if (t != plen) return bad("SA: bytes after the last transform");
    out.push_back(std::move(pr));
    off += plen;
  }
  if (off != b.size()) return bad("SA: bytes after the last proposal");
  if (out.empty()) return bad("SA: no proposal");
  return out;
}

Bytes encode_sa(const std::vector<Proposal>& ps) {
  Bytes o;
  for (size_t i = 0; i < ps.size(); ++i) {
    auto& p = ps[i];
    size_t start = o.size();
    o.push_back(i + 1 < ps.size() ? 2 : 0);
    o.push_back(0);
    put16(o, 0);
    o.push_back(p.num);
    o.push_back(p.protocol);
    o.push_back(uint8_t(p.spi.size()));
    o.push_back(uint8_t(p.transforms.size()));
    o.insert(o.end(), p.spi.begin(), p.spi.end());
    for (size_t j = 0; j < p.transforms.size(); ++j) {
      auto& t = p.transforms[j];
      o.push_back(j + 1 < p.transforms.size() ? 3 : 0);
      o.push_back(0);
      put16(o, t.key_bits ? 12 : 8);
      o.push_back(t.type);
      o.push_back(0);
      put16(o, t.id);
      if (t.key_bits) {
        put16(o, 0x8000 | 14);
        put16(o, t.key_bits);
      }
    }
    size_t len = o.size() - start;
    o[start + 2] = uint8_t(len >> 8);
    o[start + 3] = uint8_t(len);
  }
  return o;
}

// ---- KE, Nonce ----
Parsed<KePayload> parse_ke(ByteView b) {
  if (b.size() < 4) return bad("KE: truncated");
  return KePayload{get16(b.data()), Bytes(b.begin() + 4, b.end())};
}

Bytes encode_ke(const KePayload& ke) {
  Bytes o;
  put16(o, ke.group);
  put16(o, 0);
  o.insert(o.end(), ke.data.begin(), ke.data.end());
  return o;
}

Parsed<Bytes> parse_nonce(ByteView b) {
  // §2.10: at least 128 bits, at most 2048.
  if (b.size() < 16 || b.size() > 256) return bad(fmt::format("Nonce of {} bytes (16-256 allowed)", b.size()));
  return Bytes(b.begin(), b.end());
}

// ---- ID ----
Parsed<Identity> parse_id(ByteView b) {
  if (b.size() < 5) return bad("ID: truncated");
  Identity id{b[0], Bytes(b.begin() + 4, b.end())};
  if (id.type == kIdIpv4 && id.data.size() != 4) return bad("ID_IPV4_ADDR of wrong length");
  if (id.type == kIdIpv6 && id.data.size() != 16) return bad("ID_IPV6_ADDR of wrong length");
  return id;
}

Bytes encode_id(const Identity& id) {
  Bytes o(4 + id.data.size(), 0);
  o[0] = id.type;
  std::copy(id.data.begin(), id.data.end(), o.begin() + 4);
  return o;
}

static std::string printable(const Bytes& d) {
  std::string s;
  for (uint8_t c : d) s += (c >= 0x20 && c < 0x7f) ? char(c) : '?';
  return s;
}

std::string Identity::str() const {
  switch (type) {
    case kIdFqdn:
    case kIdRfc822: return printable(data);
    case kIdKeyId: return "@#" + hex(data);
    case kIdIpv4:
    case kIdIpv6: {
      IpAddr a;
      a.family = type == kIdIpv4 ? AF_INET : AF_INET6;
      std::copy(data.begin(), data.end(), a.b.begin());
      return a.str();
    }
    case kIdDn: {
      const unsigned char* p = data.data();
      X509_NAME* n = d2i_X509_NAME(nullptr, &p, long(data.size()));
      if (!n) return "(invalid DN)";
      BIO* bio = BIO_new(BIO_s_mem());
      X509_NAME_print_ex(bio, n, 0, XN_FLAG_ONELINE & ~XN_FLAG_SPC_EQ);
      BUF_MEM* bm;
      BIO_get_mem_ptr(bio, &bm);
      std::string s(bm->data, bm->length);
      BIO_free(bio);
      X509_NAME_free(n);
      return s;
    }
  }
  return fmt::format("(ID type {}) {}", type, hex(data));
}

bool Identity::matches(const Identity& o) const {
  if (type != o.type) return false;
  if (type == kIdFqdn || type == kIdRfc822)
    return data.size() == o.data.size() &&
           std::equal(data.begin(), data.end(), o.data.begin(), [](uint8_t a, uint8_t b) { return tolower(a) == tolower(b); });
  if (type == kIdDn) {
    const unsigned char *p = data.data(), *q = o.data.data();
    X509_NAME* a = d2i_X509_NAME(nullptr, &p, long(data.size()));
    X509_NAME* b = d2i_X509_NAME(nullptr, &q, long(o.data.size()));
    bool same = a && b && X509_NAME_cmp(a, b) == 0;
    X509_NAME_free(a);
    X509_NAME_free(b);
    return same;
  }
  return data == o.data;
}

std::string Identity::key() const {
  std::string k(1, char(type));
  if (type == kIdDn) return k;
  for (uint8_t c : data) k.push_back(type == kIdFqdn || type == kIdRfc822 ? char(tolower(c)) : char(c));
  return k;
}

static std::string trim(std::string_view s) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return std::string(s);
}

tl::expected<Identity, std::string> Identity::parse(std::string_view s) {
  if (s.empty()) return tl::unexpected(std::string("empty identity"));
  if (s.starts_with("@#")) {
    std::string h(s.substr(2));
    if (h.empty() || h.size() % 2 || h.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
      return tl::unexpected(fmt::format("KEY_ID \"{}\" is not an even number of hex digits", s));
    Bytes d;
    for (size_t i = 0; i < h.size(); i += 2) d.push_back(uint8_t(std::stoi(h.substr(i, 2), nullptr, 16)));
    return Identity{kIdKeyId, d};
  }
  if (s.starts_with("@")) return Identity{kIdFqdn, to_bytes(s.substr(1))};
  if (s.find('=') != std::string_view::npos) {
    // Comma-separated RDNs, strongSwan's order (C first). No escaped commas.
    X509_NAME* n = X509_NAME_new();
    size_t start = 0;
    std::string err;
    while (start <= s.size()) {
      size_t comma = s.find(',', start);
      std::string rdn = trim(s.substr(start, comma == std::string_view::npos ? s.npos : comma - start));
      auto eq = rdn.find('=');
      if (eq == std::string::npos || eq == 0) {
        err = fmt::format("DN \"{}\": \"{}\" is not KEY=value", s, rdn);
        break;
      }
      std::string k = trim(rdn.substr(0, eq)), v = trim(rdn.substr(eq + 1));
      if (!X509_NAME_add_entry_by_txt(n, k.c_str(), MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(v.c_str()),
                                      -1, -1, 0)) {
        err = fmt::format("DN \"{}\": unknown attribute \"{}\"", s, k);
        break;
      }
      if (comma == std::string_view::npos) break;
      start = comma + 1;
    }
    Identity id{kIdDn, {}};
    if (err.empty()) {
      unsigned char* der = nullptr;
      int len = i2d_X509_NAME(n, &der);
      if (len > 0) id.data.assign(der, der + len);
      OPENSSL_free(der);
    }
    X509_NAME_free(n);
    if (!err.empty()) return tl::unexpected(err);
    return id;
  }
  if (auto a = IpAddr::parse(s)) {
    Identity id{a->is_v4() ? uint8_t(kIdIpv4) : uint8_t(kIdIpv6), {}};
    auto bb = a->bytes();
    id.data.assign(bb.begin(), bb.end());
    return id;
  }
  if (s.find('@') != std::string_view::npos) return Identity{kIdRfc822, to_bytes(s)};
  return Identity{kIdFqdn, to_bytes(s)};
}

// ---- AUTH, Notify, Delete ----
Parsed<AuthPayload> parse_auth(ByteView b) {
  if (b.size() < 5) return bad("AUTH: truncated");
  return AuthPayload{b[0], Bytes(b.begin() + 4, b.end())};
}

Bytes encode_auth(const AuthPayload& a) {
  Bytes o(4 + a.data.size(), 0);
  o[0] = a.method;
  std::copy(a.data.begin(), a.data.end(), o.begin() + 4);
  return o;
}

Parsed<NotifyPayload> parse_notify(ByteView b) {
  if (b.size() < 4) return bad("Notify: truncated");
  NotifyPayload n;
  n.protocol = b[0];
  uint8_t spi_size = b[1];
  n.type = get16(b.data() + 2);
  if (b.size() - 4 < spi_size) return bad("Notify: SPI overruns the payload");
  n.spi.assign(b.begin() + 4, b.begin() + 4 + spi_size);
  n.data.assign(b.begin() + 4 + spi_size, b.end());
  return n;
}

Bytes encode_notify(const NotifyPayload& n) {
  Bytes o{n.protocol, uint8_t(n.spi.size())};
  put16(o, n.type);
  o.insert(o.end(), n.spi.begin(), n.spi.end());
  o.insert(o.end(), n.data.begin(), n.data.end());
  return o;
}

Parsed<DeletePayload> parse_delete(ByteView b) {
  if (b.size() < 4) return bad("Delete: truncated");
  DeletePayload d;
  d.protocol = b[0];
  uint8_t spi_size = b[1];
  uint16_t n = get16(b.data() + 2);
  if (d.protocol == kProtoIke ? spi_size != 0 || n != 0 : spi_size != 4)
    return bad(fmt::format("Delete: protocol {} with SPI size {} and {} SPIs", d.protocol, spi_size, n));
  if (size_t(spi_size) * n != b.size() - 4) return bad("Delete: SPI count does not match the payload length");
  for (unsigned i = 0; i < n; ++i) d.spis.emplace_back(b.begin() + 4 + i * spi_size, b.begin() + 4 + (i + 1) * spi_size);
  return d;
}

Bytes encode_delete(const DeletePayload& d) {
  Bytes o{d.protocol, uint8_t(d.protocol == kProtoIke ? 0 : 4)};
  put16(o, uint16_t(d.spis.size()));
  for (auto& s : d.spis) o.insert(o.end(), s.begin(), s.end());
  return o;
}

// ---- TS ----
Parsed<std::vector<TrafficSelector>> parse_ts(ByteView b) {
  if (b.size() < 4) return bad("TS: truncated");
  unsigned n = b[0];
  if (n == 0) return bad("TS: no traffic selector");
  std::vector<TrafficSelector> out;
  size_t off = 4;
  for (unsigned i = 0; i < n; ++i) {
    if (b.size() - off < 8) return bad("TS: selector truncated");
    const uint8_t* p = b.data() + off;
    uint16_t len = get16(p + 2);
    size_t alen = p[0] == kTsIpv4 ? 4 : p[0] == kTsIpv6 ? 16 : 0;
    if (len < 8 || len > b.size() - off) return bad(fmt::format("TS: selector length {} does not fit", len));
    off += len;
    if (!alen) continue;  // unknown TS types are skipped (RFC 4301 fine-grained types)
    if (len != 8 + 2 * alen) return bad(fmt::format("TS: type {} selector of length {}", p[0], len));
    TrafficSelector ts;
    ts.proto = p[1];
    ts.port_lo = get16(p + 4);
    ts.port_hi = get16(p + 6);
    ts.lo.family = ts.hi.family = alen == 4 ? AF_INET : AF_INET6;
    std::copy(p + 8, p + 8 + alen, ts.lo.b.begin());
    std::copy(p + 8 + alen, p + 8 + 2 * alen, ts.hi.b.begin());
    out.push_back(ts);
  }
  if (off != b.size()) return bad("TS: bytes after the last selector");
  return out;
}

Bytes encode_ts(const std::vector<TrafficSelector>& ts) {
  Bytes o{uint8_t(ts.size()), 0, 0, 0};
  for (auto& t : ts) {
    bool v4 = t.lo.is_v4();
    o.push_back(v4 ? kTsIpv4 : kTsIpv6);
    o.push_back(t.proto);
    put16(o, uint16_t(v4 ? 16 : 40));
    put16(o, t.port_lo);
    put16(o, t.port_hi);
    auto lo = t.lo.bytes(), hi = t.hi.bytes();
    o.insert(o.end(), lo.begin(), lo.end());
    o.insert(o.end(), hi.begin(), hi.end());
  }
  return o;
}

TrafficSelector TrafficSelector::from_prefix(const IpAddr& a, uint8_t len) {
  TrafficSelector t;
  t.lo = t.hi = a;
  size_t bits = a.size() * 8;
  for (size_t i = 0; i < bits; ++i) {
    if (i < len) continue;
    uint8_t m = uint8_t(0x80 >> (i % 8));
    t.lo.b[i / 8] &= uint8_t(~m);
    t.hi.b[i / 8] |= m;
  }
  return t;
}

std::optional<TrafficSelector> TrafficSelector::intersect(const TrafficSelector& o) const {
  if (lo.family != o.lo.family) return std::nullopt;
  if (proto && o.proto && proto != o.proto) return std::nullopt;
  TrafficSelector r;
  r.proto = proto ? proto : o.proto;
  r.port_lo = std::max(port_lo, o.port_lo);
  r.port_hi = std::min(port_hi, o.port_hi);
  r.lo = std::max(lo, o.lo);
  r.hi = std::min(hi, o.hi);
  if (r.port_lo > r.port_hi || r.hi < r.lo) return std::nullopt;
  return r;
}

bool TrafficSelector::contains(const TrafficSelector& o) const {
  auto i = intersect(o);
  return i && *i == o;
}

std::vector<std::pair<IpAddr, uint8_t>> TrafficSelector::prefixes() const {
  std::vector<std::pair<IpAddr, uint8_t>> out;
  const size_t bits = lo.size() * 8;
  IpAddr cur = lo;
  auto bit = [&](const IpAddr& a, size_t i) { return (a.b[i / 8] >> (7 - i % 8)) & 1; };
  while (true) {
    // Largest aligned block at `cur` that stays within `hi`.
    size_t len = bits;
    while (len > 0) {
      size_t host = len - 1;  // try making bit `host` a host bit
      if (bit(cur, host)) break;
      auto t = from_prefix(cur, uint8_t(host));
      if (t.lo != cur || hi < t.hi) break;
      len = host;
    }
    out.emplace_back(cur, uint8_t(len));
    auto blk = from_prefix(cur, uint8_t(len));
    if (blk.hi == hi) break;
    // cur = blk.hi + 1
    cur = blk.hi;
    for (size_t i = cur.size(); i-- > 0;)
      if (++cur.b[i] != 0) break;
    if (out.size() > 256) break;  // defensive: ranges from peers may be arbitrary
  }
  return out;
}

std::string TrafficSelector::str() const {
  std::string s;
  auto ps = prefixes();
  if (ps.size() == 1) s = fmt::format("{}/{}", ps[0].first.str(), ps[0].second);
  else s = fmt::format("{}..{}", lo.str(), hi.str());
  if (proto || port_lo != 0 || port_hi != 65535) {
    s += fmt::format("[{}", proto);
    if (port_lo == port_hi) s += fmt::format("/{}", port_lo);
    else if (port_lo != 0 || port_hi != 65535) s += fmt::format("/{}-{}", port_lo, port_hi);
    s += "]";
  }
  return s;
}

Parsed<CpPayload> parse_cp(ByteView b) {
  if (b.size() < 4) return bad("CP: truncated");
  CpPayload cp;
  cp.cfg_type = b[0];
  for (size_t off = 4; off < b.size();) {
    if (b.size() - off < 4) return bad("CP: attribute truncated");
    uint16_t t = get16(b.data() + off) & 0x7fff, l = get16(b.data() + off + 2);
    if (l > b.size() - off - 4) return bad("CP: attribute overruns the payload");
    cp.attrs.emplace_back(t, Bytes(b.begin() + off + 4, b.begin() + off + 4 + l));
    off += 4 + l;
  }
  return cp;
}

// ---- building ----
void ChainBuilder::add(uint8_t type, ByteView body, bool critical) {
  if (last_ == SIZE_MAX) first_ = type;
  else out_[last_] = type;
  last_ = out_.size();
  out_.push_back(kPlNone);
  out_.push_back(critical ? 0x80 : 0);
  put16(out_, uint16_t(body.size() + 4));
  out_.insert(out_.end(), body.begin(), body.end());
}

void ChainBuilder::add_notify(uint16_t type, ByteView data, uint8_t protocol, ByteView spi) {
  add(kPlNotify, encode_notify(NotifyPayload{protocol, Bytes(spi.begin(), spi.end()), type, Bytes(data.begin(), data.end())}));
}

void put_header(Bytes& o, const Header& h) {
  put64(o, h.spi_i);
  put64(o, h.spi_r);
  o.push_back(h.next);
  o.push_back(0x20);
  o.push_back(h.exchange);
  o.push_back(h.flags);
  put32(o, h.mid);
  put32(o, h.length);
}

Bytes encode_plain(Header h, const ChainBuilder& c) {
  Bytes o;
  h.next = c.first();
  h.length = uint32_t(kHeaderLen + c.bytes().size());
  put_header(o, h);
  o.insert(o.end(), c.bytes().begin(), c.bytes().end());
  return o;
}

}  // namespace moat::ike
