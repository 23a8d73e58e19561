// libFuzzer target for the IKEv2 parser and the responder's handling of
// unauthenticated input: whatever the bytes, the engine answers with a
// notify, counts a drop, or ignores — never crashes, never reads out of
// bounds (built with ASan and UBSan).
#include <cstddef>
#include <cstdint>

#include "ctrl/ike/engine.hh"
#include "ctrl/ike/message.hh"

using namespace moat::ike;

namespace {

struct NullTransport : Transport {
  void send(const Endpoint&, const Endpoint&, ByteView) override {}
  std::optional<IpAddr> source_for(const IpAddr&) override { return IpAddr::v4(0xc0000201); }
};
struct NullSink : ChildSaSink {
  void install(const ChildSa&) override {}
  void remove(const ChildSa&) override {}
  void rekeyed(const ChildSa&, const ChildSa&) override {}
};

Engine& engine() {
  static NullTransport t;
  static NullSink s;
  static Engine e(t, s, {}, [](const std::string&) {});
  static bool init = [] {
    PeerConfig p;
    p.name = "fuzz";
    p.local_id = *Identity::parse("portal.example.net");
    p.remote_id = *Identity::parse("moat@example.net");
    p.psk = to_bytes("fuzzing-pre-shared-key");
    p.ike_proposals = *parse_proposals("aes128gcm16-prfsha256-x25519, aes128-sha256-ecp256", kProtoIke);
    p.esp_proposals = *parse_proposals("aes128gcm16", kProtoEsp);
    p.local_ts = {TrafficSelector::from_prefix(IpAddr::v4(0x0a000000), 8)};
    p.remote_ts = p.local_ts;
    e.set_peers({p}, 0);
    return true;
  }();
  (void)init;
  return e;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ByteView b(data, size);
  if (auto m = parse_message(b)) {
    for (auto& p : m->payloads) {
      (void)parse_sa(p.body);
      (void)parse_ke(p.body);
      (void)parse_nonce(p.body);
      (void)parse_id(p.body);
      (void)parse_auth(p.body);
      (void)parse_notify(p.body);
      (void)parse_delete(p.body);
      (void)parse_ts(p.body);
      (void)parse_cp(p.body);
    }
  }
  if (size > 0) (void)parse_chain(data[0], b.subspan(1));
  static uint64_t now = 0;
  now += 10;
  Engine& e = engine();
  Endpoint local{IpAddr::v4(0xc0000201), size & 1 ? kNattPort : kIkePort};
  Endpoint remote{IpAddr::v4(0xc6336407), 500};
  e.receive(local, remote, b, now);
  e.tick(now);
  return 0;
}
