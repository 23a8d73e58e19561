#pragma once
// IKEv2 message codec (RFC 7296 §3). Parsing is strict and total: every
// length is checked against its container, and any input (truncated, lying
// lengths, garbage) yields either a value or a ParseError naming the notify
// the engine should answer with — never a crash or an out-of-bounds read.
// Encoding builds payload chains with correct Next Payload fields.
// Pure functions over bytes; no state, usable from any thread.
#include <cstdint>
#include <string>
#include <vector>

#include <tl/expected.hpp>

#include "ctrl/ike/types.hh"

namespace moat::ike {

enum class Exchange : uint8_t { ike_sa_init = 34, ike_auth = 35, create_child_sa = 36, informational = 37 };
const char* exchange_name(uint8_t e);

enum PayloadType : uint8_t {
  kPlNone = 0,
  kPlSa = 33,
  kPlKe = 34,
  kPlIdi = 35,
  kPlIdr = 36,
  kPlCert = 37,
  kPlCertReq = 38,
  kPlAuth = 39,
  kPlNonce = 40,
  kPlNotify = 41,
  kPlDelete = 42,
  kPlVendor = 43,
  kPlTsi = 44,
  kPlTsr = 45,
  kPlSk = 46,
  kPlCp = 47,
  kPlEap = 48,
  kPlSkf = 53,
};
bool payload_type_known(uint8_t t);

// Notify message types used by the engine (RFC 7296 §3.10.1, IANA).
enum NotifyType : uint16_t {
  kNUnsupportedCriticalPayload = 1,
  kNInvalidIkeSpi = 4,
  kNInvalidMajorVersion = 5,
  kNInvalidSyntax = 7,
  kNInvalidMessageId = 9,
  kNInvalidSpi = 11,
  kNNoProposalChosen = 14,
  kNInvalidKePayload = 17,
  kNAuthenticationFailed = 24,
  kNSinglePairRequired = 34,
  kNNoAdditionalSas = 35,
  kNInternalAddressFailure = 36,
  kNFailedCpRequired = 37,
  kNTsUnacceptable = 38,
  kNInvalidSelectors = 39,
  kNUnacceptableAddresses = 40,  // RFC 4555
  kNUnexpectedNatDetected = 41,  // RFC 4555
  kNTemporaryFailure = 43,
  kNChildSaNotFound = 44,
  kNErrorMax = 16383,  // types below this are errors
  kNInitialContact = 16384,
  kNSetWindowSize = 16385,
  kNNatDetectionSourceIp = 16388,
  kNNatDetectionDestinationIp = 16389,
  kNCookie = 16390,
  kNUseTransportMode = 16391,
  kNRekeySa = 16393,
  kNEspTfcPaddingNotSupported = 16394,
  kNNonFirstFragmentsAlso = 16395,
  kNMobikeSupported = 16396,
  kNUpdateSaAddresses = 16400,  // RFC 4555
  kNCookie2 = 16401,
  kNNoNatsAllowed = 16402,
  kNFragmentationSupported = 16430,
  kNSignatureHashAlgorithms = 16431,
};
std::string notify_name(uint16_t t);

enum ProtocolId : uint8_t { kProtoIke = 1, kProtoAh = 2, kProtoEsp = 3 };

enum HeaderFlags : uint8_t { kFlagInitiator = 0x08, kFlagVersion = 0x10, kFlagResponse = 0x20 };

constexpr size_t kHeaderLen = 28;
constexpr size_t kMaxMessage = 65535;

struct Header {
  uint64_t spi_i = 0;
  uint64_t spi_r = 0;
  uint8_t next = 0;
  uint8_t version = 0x20;
  uint8_t exchange = 0;
  uint8_t flags = 0;
  uint32_t mid = 0;
  uint32_t length = 0;
  bool response() const { return flags & kFlagResponse; }
  bool from_initiator() const { return flags & kFlagInitiator; }
};

// A payload as it appears on the wire: its type, critical bit and body (the
// bytes after the 4-byte generic header).
struct Payload {
  uint8_t type = 0;
  bool critical = false;
  Bytes body;
};

struct ParseError {
  uint16_t notify = kNInvalidSyntax;  // what to answer, if anything
  uint8_t payload = 0;                // for UNSUPPORTED_CRITICAL_PAYLOAD
  std::string why;
};
template <typename T>
using Parsed = tl::expected<T, ParseError>;

// A parsed datagram. When an SK payload is present it is the last one
// (RFC 7296 §3.14) and `sk_offset` is its generic header's offset in `raw`;
// its body stays encrypted until the engine decrypts it.
struct Message {
  Header h;
  std::vector<Payload> payloads;
  size_t sk_offset = 0;  // 0: no SK payload
  uint8_t sk_next = 0;   // first inner payload type
  Bytes raw;

  const Payload* find(uint8_t type) const;
  std::vector<const Payload*> all(uint8_t type) const;
};

Parsed<Header> parse_header(ByteView b);
// Whole datagram (IKE header first; the non-ESP marker already removed).
Parsed<Message> parse_message(ByteView b);
// A payload chain (e.g. the decrypted contents of SK) starting with `first`.
Parsed<std::vector<Payload>> parse_chain(uint8_t first, ByteView b);

// ---- typed payload bodies ----
enum TransformType : uint8_t { kTfEncr = 1, kTfPrf = 2, kTfInteg = 3, kTfDh = 4, kTfEsn = 5 };

struct Transform {
  uint8_t type = 0;
  uint16_t id = 0;
  uint16_t key_bits = 0;  // Key Length attribute; 0 = absent
  bool operator==(const Transform&) const = default;
};

struct Proposal {
  uint8_t num = 1;
  uint8_t protocol = kProtoIke;
  Bytes spi;
  std::vector<Transform> transforms;
};

struct KePayload {
  uint16_t group = 0;
  Bytes data;
};

enum IdType : uint8_t { kIdIpv4 = 1, kIdFqdn = 2, kIdRfc822 = 3, kIdIpv6 = 5, kIdDn = 9, kIdKeyId = 11 };

struct Identity {
  uint8_t type = 0;
  Bytes data;
  bool operator==(const Identity&) const = default;
  std::string str() const;  // as strongSwan prints it
  // Same identity: DNs compare by canonical form (X509_NAME_cmp), FQDN and
  // RFC822 case-insensitively, the rest byte for byte.
  bool matches(const Identity& o) const;
  // A hash key: equal for identities that match(). Type and data, case-folded
  // where matches() ignores case; every DN of a type shares one key (their
  // canonical form has no public encoding), so a lookup still calls matches().
  std::string key() const;
  // strongSwan's syntax: "@fqdn", "user@domain", "@#hex" (KEY_ID), "C=.., O=.., CN=.." (DN),
  // an IP address, or a bare name (FQDN).
  static tl::expected<Identity, std::string> parse(std::string_view s);
};

enum AuthMethod : uint8_t { kAuthRsa = 1, kAuthPsk = 2, kAuthDss = 3, kAuthDigitalSignature = 14 };

struct AuthPayload {
  uint8_t method = 0;
  Bytes data;
};

struct NotifyPayload {
  uint8_t protocol = 0;
  Bytes spi;
  uint16_t type = 0;
  Bytes data;
};

struct DeletePayload {
  uint8_t protocol = 0;
  std::vector<Bytes> spis;
};

enum TsType : uint8_t { kTsIpv4 = 7, kTsIpv6 = 8 };

struct TrafficSelector {
  uint8_t proto = 0;  // 0 = any
  uint16_t port_lo = 0;
  uint16_t port_hi = 65535;
  IpAddr lo, hi;  // same family
  // Every address of `prefix`/`len`, any protocol and port.
  static TrafficSelector from_prefix(const IpAddr& prefix, uint8_t len);
  // The intersection, if not empty.
  std::optional<TrafficSelector> intersect(const TrafficSelector& o) const;
  bool contains(const TrafficSelector& o) const;
  // The smallest list of prefixes covering exactly [lo, hi].
  std::vector<std::pair<IpAddr, uint8_t>> prefixes() const;
  std::string str() const;
  bool operator==(const TrafficSelector&) const = default;
};

struct CpPayload {
  uint8_t cfg_type = 0;
  std::vector<std::pair<uint16_t, Bytes>> attrs;
};

Parsed<std::vector<Proposal>> parse_sa(ByteView body);
Parsed<KePayload> parse_ke(ByteView body);
Parsed<Bytes> parse_nonce(ByteView body);
Parsed<Identity> parse_id(ByteView body);
Parsed<AuthPayload> parse_auth(ByteView body);
Parsed<NotifyPayload> parse_notify(ByteView body);
Parsed<DeletePayload> parse_delete(ByteView body);
Parsed<std::vector<TrafficSelector>> parse_ts(ByteView body);
Parsed<CpPayload> parse_cp(ByteView body);

Bytes encode_sa(const std::vector<Proposal>& ps);
Bytes encode_ke(const KePayload& ke);
Bytes encode_id(const Identity& id);
Bytes encode_auth(const AuthPayload& a);
Bytes encode_notify(const NotifyPayload& n);
Bytes encode_delete(const DeletePayload& d);
Bytes encode_ts(const std::vector<TrafficSelector>& ts);

// Builds a payload chain: each add() fixes the previous payload's Next Payload.
class ChainBuilder {
 public:
  void add(uint8_t type, ByteView body, bool critical = false);
  void add_notify(uint16_t type, ByteView data = {}, uint8_t protocol = 0, ByteView spi = {});
  uint8_t first() const { return first_; }
  const Bytes& bytes() const { return out_; }
  bool empty() const { return out_.empty(); }

 private:
  Bytes out_;
  uint8_t first_ = kPlNone;
  size_t last_ = SIZE_MAX;  // offset of the last generic header
};

// Header (with `length` computed) followed by an unencrypted chain.
Bytes encode_plain(Header h, const ChainBuilder& chain);
void put_header(Bytes& out, const Header& h);
void put16(Bytes& out, uint16_t v);
void put32(Bytes& out, uint32_t v);
void put64(Bytes& out, uint64_t v);
uint16_t get16(const uint8_t* p);
uint32_t get32(const uint8_t* p);
uint64_t get64(const uint8_t* p);

}  // namespace moat::ike
