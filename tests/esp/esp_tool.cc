// esp_tool: Moat's ESP stages over pcap files, for checks by independent
// implementations (scapy, tshark, strongSwan captures) in tests/esp/*.py.
//
//   esp_tool encrypt|decrypt --cipher NAME --key HEX [--auth-key HEX] --spi N
//            [--esn] [--nat-t] [--seq N] [--local A.B.C.D] [--peer A.B.C.D]
//            [--mtu N] [--window N] [--sas K] IN.pcap OUT.pcap
//
// --sas K: K SAs alike but for SPI N+i and local address A.B.C.D+i (K moats
// sealing for one portal); frame j goes through SA j mod K, so each SA's
// sequence numbers rise through the file.
// encrypt: every IPv4 frame of IN goes through esp_mtu + esp_outbound of an
// outbound SA; decrypt: every frame through esp_inbound of an inbound SA.
// --seq sets the SA's sequence state first (outbound: last sent; inbound: the
// highest received), to test ESN wrap. Prints one JSON object: packets in,
// packets out, drops by reason.
#include <arpa/inet.h>
#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_ether.h>
#include <rte_malloc.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "dataplane/esp.hh"
#include "dataplane/worker.hh"

using namespace moat;

namespace {

[[noreturn]] void die(const std::string& s) {
  fprintf(stderr, "esp_tool: %s\n", s.c_str());
  exit(2);
}

std::vector<uint8_t> unhex(const std::string& h) {
  std::vector<uint8_t> v;
  std::string s = h.rfind("0x", 0) == 0 ? h.substr(2) : h;
  if (s.size() % 2) die("odd hex length: " + h);
  for (size_t i = 0; i < s.size(); i += 2) v.push_back(uint8_t(std::stoul(s.substr(i, 2), nullptr, 16)));
  return v;
}

uint32_t ip4(const std::string& s) {
  in_addr a{};
  if (inet_pton(AF_INET, s.c_str(), &a) != 1) die("bad IPv4 address: " + s);
  return ntohl(a.s_addr);
}

struct Pcap {
  uint32_t linktype = 1;
  std::vector<std::vector<uint8_t>> frames;
};

Pcap read_pcap(const std::string& path) {
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) die(path + ": cannot open");
  uint32_t gh[6];
  if (fread(gh, 4, 6, f) != 6) die(path + ": short pcap header");
  bool swap = gh[0] == 0xd4c3b2a1 || gh[0] == 0x4d3cb2a1;
  if (!swap && gh[0] != 0xa1b2c3d4 && gh[0] != 0xa1b23c4d) die(path + ": not a pcap file");
  auto fix = [&](uint32_t v) { return swap ? __builtin_bswap32(v) : v; };
  Pcap p;
  p.linktype = fix(gh[5]);
  uint32_t rh[4];
  while (fread(rh, 4, 4, f) == 4) {
    std::vector<uint8_t> b(fix(rh[2]));
    if (fread(b.data(), 1, b.size(), f) != b.size()) die(path + ": truncated record");
    if (p.linktype == 101 || p.linktype == 228) {  // raw IPv4: give it an Ethernet header
      std::vector<uint8_t> e(14, 0);
      e[12] = 0x08;
      b.insert(b.begin(), e.begin(), e.end());
    } else if (p.linktype == 113) {  // Linux cooked (SLL): 16-byte header
      b.erase(b.begin(), b.begin() + 2);
    } else if (p.linktype != 1) {
      die(path + ": linktype " + std::to_string(p.linktype) + " not supported");
    }
    p.frames.push_back(std::move(b));
  }
  fclose(f);
  return p;
}

void write_pcap(const std::string& path, const std::vector<std::vector<uint8_t>>& frames) {
  FILE* f = fopen(path.c_str(), "wb");
  if (!f) die(path + ": cannot create");
  uint32_t gh[6] = {0xa1b2c3d4, 0x00040002, 0, 0, 65535, 1};
  fwrite(gh, 4, 6, f);
  uint32_t t = 0;
  for (const auto& b : frames) {
    uint32_t rh[4] = {++t, 0, uint32_t(b.size()), uint32_t(b.size())};
    fwrite(rh, 4, 4, f);
    fwrite(b.data(), 1, b.size(), f);
  }
  fclose(f);
}

std::vector<uint8_t> bytes_of(const rte_mbuf* m) {
  std::vector<uint8_t> v(rte_pktmbuf_pkt_len(m));
  const void* p = rte_pktmbuf_read(m, 0, uint32_t(v.size()), v.data());
  if (p != v.data()) std::memcpy(v.data(), p, v.size());
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  const char* eal[] = {"esp_tool", "--no-huge", "-m", "256", "--no-pci", "--no-shconf", "-l", "0", "--log-level", "*:error"};
  if (rte_eal_init(sizeof(eal) / sizeof(eal[0]), const_cast<char**>(eal)) < 0) die("EAL init failed");
  if (argc < 2) die("usage: esp_tool encrypt|decrypt OPTIONS IN.pcap OUT.pcap");
  std::string mode = argv[1];
  SaConfig c;
  c.name = "esp_tool";
  c.local = ip4("192.0.2.1");
  c.peer = ip4("192.0.2.2");
  uint64_t seq = 0;
  bool seq_set = false;
  uint32_t sas = 1;
  std::vector<std::string> files;
  for (int i = 2; i < argc; i++) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " wants a value");
      return argv[++i];
    };
    if (a == "--cipher") { if (!cipher_from_name(val(), c.cipher)) die("unknown cipher"); }
    else if (a == "--key") c.key = unhex(val());
    else if (a == "--auth-key") c.auth_key = unhex(val());
    else if (a == "--spi") c.spi = uint32_t(std::stoul(val(), nullptr, 0));
    else if (a == "--esn") c.esn = true;
    else if (a == "--nat-t") c.nat_t = true;
    else if (a == "--seq") { seq = std::stoull(val(), nullptr, 0); seq_set = true; }
    else if (a == "--local") c.local = ip4(val());
    else if (a == "--peer") c.peer = ip4(val());
    else if (a == "--mtu") c.mtu = uint16_t(std::stoul(val()));
    else if (a == "--window") c.replay_window = uint32_t(std::stoul(val()));
    else if (a == "--sas") sas = uint32_t(std::stoul(val()));
    else files.push_back(a);
  }
  if (files.size() != 2 || (mode != "encrypt" && mode != "decrypt")) die("usage: esp_tool encrypt|decrypt OPTIONS IN.pcap OUT.pcap");
  c.dir = mode == "encrypt" ? SaDir::outbound : SaDir::inbound;

  rte_mempool* mp = rte_pktmbuf_pool_create("esp_tool", 8191, 0, kMbufPrivSize, RTE_MBUF_DEFAULT_BUF_SIZE, 0);
  if (!mp) die("mbuf pool");
  if (sas < 1 || sas > 100000) die("--sas wants 1..100000");
  auto sad_r = Sad::create("tool", std::max<uint32_t>(16, sas), nullptr);
  if (!sad_r) die(sad_r.error());
  std::unique_ptr<Sad> sad(*sad_r);
  std::vector<uint32_t> idx;
  for (uint32_t k = 0; k < sas; k++) {
    SaConfig ck = c;
    ck.spi = c.spi + k;
    ck.local = c.local + k;
    auto i = sad->add_sa(ck);
    if (!i) die(i.error());
    if (seq_set) sad->sa(*i).seq = seq;
    idx.push_back(*i);
  }
  auto w = std::make_unique<Worker>();
  w->direct_pool = mp;
  w->indirect_pool = mp;
  w->icmp_limiter.configure(1000, 100, rte_get_tsc_hz());
  auto ew = std::make_unique<EspWorker>();
  if (auto r = esp_worker_init(*ew, "tool"); !r) die(r.error());
  auto pt = std::make_unique<PortTable>();
  pt->port[0].configured = true;
  pt->port[0].addr = c.local;

  Pcap in = read_pcap(files[0]);
  std::vector<std::vector<uint8_t>> out;
  unsigned punted = 0;
  for (size_t base = 0; base < in.frames.size(); base += 32) {
    Burst b;
    for (size_t i = base; i < in.frames.size() && i < base + 32; i++) {
      rte_mbuf* m = rte_pktmbuf_alloc(mp);
      const auto& f = in.frames[i];
      std::memcpy(rte_pktmbuf_append(m, uint16_t(f.size())), f.data(), f.size());
      PktMeta& md = meta(m);
      md = PktMeta{};
      md.l3_off = 14;
      md.in_port = 0;
      md.sa = idx[i % sas];
      b.push(m);
    }
    w->now_tsc = rte_rdtsc();
    if (c.dir == SaDir::outbound) {
      while (b.n) {
        Burst o;
        esp_mtu(*w, *ew, *sad, *pt, b, o);
        esp_outbound(*w, *ew, *sad, o);
        for (uint16_t k = 0; k < o.n; k++) { out.push_back(bytes_of(o.pkts[k])); rte_pktmbuf_free(o.pkts[k]); }
      }
    } else {
      esp_inbound(*w, *ew, *sad, b);
      for (uint16_t k = 0; k < b.n; k++) { out.push_back(bytes_of(b.pkts[k])); rte_pktmbuf_free(b.pkts[k]); }
    }
    punted += w->punt.n;
    for (uint16_t k = 0; k < w->punt.n; k++) rte_pktmbuf_free(w->punt.pkts[k]);
    w->punt.n = 0;
    for (uint16_t k = 0; k < w->generated.n; k++) rte_pktmbuf_free(w->generated.pkts[k]);
    w->generated.n = 0;
    esp_housekeeping(*w, *ew);
  }
  write_pcap(files[1], out);
  printf("{\"in\": %zu, \"out\": %zu, \"punted\": %u, \"drops\": {", in.frames.size(), out.size(), punted);
  bool first = true;
  for (unsigned d = 0; d < kDropCount; d++) {
    uint64_t v = w->stats.drops[d].load();
    if (!v) continue;
    printf("%s\"%s\": %lu", first ? "" : ", ", kDropNames[d], (unsigned long)v);
    first = false;
  }
  printf("}}\n");
  esp_worker_fini(*ew);
  sad.reset();
  rte_eal_cleanup();
  return 0;
}
