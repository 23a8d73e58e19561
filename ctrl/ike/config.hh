#pragma once
// Tunnels from a directory with one YAML file per moat (seed 000's one
// record per moat). A broken record is reported with file:line:col and
// skipped; every other record loads ("if one of the tunnels cannot be
// brought up, the system does not hang waiting for it, but goes on to the
// next"). Keys are documented in docs/IKE.md. Owner: the control thread.
//
//   # moats.d/branch-17.yaml
//   name: branch-17                       # default: the file name without .yaml
//   local_id: portal.example.net          # strongSwan identity syntax
//   remote_id: branch-17@moats.example.net
//   psk: "a long random secret"           # or psk_file: /etc/moat/psk/branch-17
//   # or certificates (RFC 7427 signatures, ECDSA or RSA):
//   # auth: pubkey, cert: moat.pem, key: moat.key, ca: ca.pem, crl: ca.crl (optional);
//   # local_id defaults to the certificate's subject DN
//   remote: 198.51.100.7                  # optional: where to initiate to (addr or addr:port)
//   local: 192.0.2.1                      # optional: our source address
//   start: true                           # initiate now and whenever the SA dies
//   ike_proposals: aes128gcm16-prfsha256-x25519, aes256-sha256-modp2048
//   esp_proposals: aes128gcm16, aes256-sha256
//   funnels:                              # local/remote prefix pairs
//     - {local: 10.1.0.0/24, remote: 10.2.0.0/24}
//   lifetime: 3600                        # CHILD SA hard lifetime, seconds
//   rekey: 3240                           # CHILD SA rekey time; default 90% of lifetime
//   dpd: 30                               # liveness check after this much silence; 0 = off
#include <sched.h>

#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "ctrl/ike/engine.hh"

namespace moat::ike {

struct TunnelError {
  std::string file;
  int line = 0, col = 0;  // 1-based; 0 when the whole file is concerned
  std::string what;
  std::string str() const;
};

struct TunnelDir {
  std::vector<PeerConfig> tunnels;
  std::vector<TunnelError> errors;
  // Loaded once for all the tunnels that name the same files (thousands of
  // moats share one CA).
  std::map<std::string, std::shared_ptr<const Credentials>> credentials;
  // Duplicate checks while loading, by name and by Identity::key(): a scan
  // of the loaded tunnels per record made a 10,000-moat directory take
  // seconds. Indexes into `tunnels`.
  std::unordered_map<std::string, size_t> by_name;
  std::unordered_map<std::string, std::vector<size_t>> by_remote_id;
};

// Every *.yaml and *.yml file of `dir`, in name order. With two or more
// `cpus` (and enough files), the files are read by one thread pinned to each
// of those CPU sets while the caller waits; the result, errors and their
// order included, is the one-thread result. moatd passes its lcores' CPUs
// at start, before its workers poll; at run time (ike reload) none.
TunnelDir load_tunnel_dir(const std::string& dir, const std::vector<cpu_set_t>& cpus = {});
// One record (exposed for tests): appends to `out` or to `out.errors`.
void load_tunnel_file(const std::string& path, TunnelDir& out);

std::optional<std::pair<IpAddr, uint8_t>> parse_prefix(std::string_view s, std::string* why);

}  // namespace moat::ike
