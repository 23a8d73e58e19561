#!/usr/bin/python3
"""moat-bench end to end, on virtual devices in one process (no router):

- a memif loop (generator port = memif server, sink port = a client of the
  same socket) finds an NDR > 0 and loses nothing at a low fixed rate;
- a black hole (net_null ports that receive nothing) gives the verdict
  "no_forwarding" and the run ends within its time limit; a port that floods
  frames back gives "excess";
- the sink on its own lcore loses nothing at a low fixed rate;
- a run that cannot finish in its time limit stops, says so, keeps its trials;
- a bad profile is refused with file:line:col before anything is sent;
- ESP (inbound tunnel traffic): scapy decrypts every frame the generator
  wrote to a pcap, with sequence numbers 1, 2, 3... per SA; in a memif loop
  the sink decrypts its samples and nothing is lost at a low fixed rate;
  SAs (SPI, key, outer addresses) taken from a moatd configuration file,
  and a bad one refused at its file:line:col;
- the JSON has the documented fields, and bench/plot.py draws it.

Nothing here asserts on speed: rates are far below what the loop carries
even on a loaded machine, and every check is on counts and verdicts.
Environment: MOAT_BENCH (the binary), MOAT_SRC (the source tree).
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

BENCH = os.environ["MOAT_BENCH"]
SRC = os.environ["MOAT_SRC"]
PYTHON = "/usr/bin/python3"


def run(profile_text, tmp, name, timeout=60):
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(profile_text)
    out = os.path.join(tmp, f"{name}.json")
    p = subprocess.run([BENCH, path, "--output", out, "--no-progress"], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    doc = None
    if os.path.exists(out):
        with open(out) as f:
            doc = json.load(f)
    return p, doc, out


def loop_profile(tmp, name, search, sizes="64", extra=""):
    sock = os.path.join(tmp, f"{name}.sock")
    return f"""
ports:
  - {{name: gen, device: "net_memif0,role=server,id=0,socket={sock},socket-abstract=no"}}
  - {{name: sink, device: "net_memif1,role=client,id=0,socket={sock},socket-abstract=no"}}
generator: {{port: gen, lcore: 0}}
sink: {{port: sink, lcore: 0}}
eal: {{memory_mb: 256, file_prefix: moat-bench-test-{name}-{os.getpid()}}}
traffic: {{sizes: {sizes}, flows: 64}}
trial: {{duration_s: 0.3, warmup_s: 0.1, drain_s: 0.5, link_timeout_s: 10}}
search: {search}
{extra}
"""


def pcap_profile(pcap, name, sizes, flows, esp, rate):
    """The generator writes its frames to a pcap file; nothing comes back."""
    return f"""
ports:
  - {{name: gen, device: "net_pcap0,tx_pcap={pcap}"}}
  - {{name: sink, device: "net_null1,no-rx=1"}}
generator: {{port: gen}}
sink: {{port: sink}}
eal: {{memory_mb: 256, file_prefix: moat-bench-test-{name}-{os.getpid()}}}
traffic:
  sizes: {sizes}
  flows: {flows}
  {esp}
trial: {{duration_s: 0.2, warmup_s: 0}}
search: {{mode: fixed, rate_pps: {rate}}}
time_limit_s: 90  # a loaded CI machine: correctness is tested here, not speed
"""


class MoatBench(unittest.TestCase):
    def setUp(self):
        self.tmpdir = tempfile.TemporaryDirectory(prefix="moat-bench-test-")
        self.tmp = self.tmpdir.name

    def tearDown(self):
        self.tmpdir.cleanup()

    def assert_schema(self, doc):
        for k in ("tool", "schema", "status", "results", "trials", "versions", "profile", "profile_text",
                  "started_utc", "elapsed_s", "ports", "links", "eal_args"):
            self.assertIn(k, doc)
        for k in ("moat", "dpdk", "kernel", "machine"):
            self.assertTrue(doc["versions"][k], k)
        self.assertIn("DPDK", doc["versions"]["dpdk"])
        for t in doc["trials"]:
            for k in ("index", "size", "purpose", "target_pps", "duration_s", "offered", "received", "lost_packets",
                      "loss", "latency_ns", "reordered", "duplicates", "wrong_size", "flows_seen", "unexpected",
                      "verdict", "tx_late", "generator_short"):
                self.assertIn(k, t)
            for side in ("offered", "received"):
                for k in ("packets", "pps", "bps_l1", "bps_l2"):
                    self.assertIn(k, t[side])
        for r in doc["results"]:
            for k in ("size", "mix", "mode", "verdict", "ndr", "pdr", "harness_bound", "notes", "trials"):
                self.assertIn(k, r)

    def test_loop_finds_ndr_and_low_fixed_rate_loses_nothing(self):
        # Search between 1 and 50 kpps: the loop carries millions, so this
        # ends at the top with no loss.
        p, doc, out = run(loop_profile(self.tmp, "ndr", "{mode: ndr, max_rate_pps: 50000, min_rate_pps: 1000}",
                                       sizes="[64, 1518]"), self.tmp, "ndr")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assert_schema(doc)
        self.assertEqual(doc["status"], "completed")
        self.assertEqual([r["size"] for r in doc["results"]], ["64", "1518"])
        for r in doc["results"]:
            self.assertEqual(r["verdict"], "ok", r)
            self.assertGreater(r["ndr"]["pps"], 0)
        p, doc, out = run(loop_profile(self.tmp, "fixed", "{mode: fixed, rate_pps: 10000}", sizes="imix"),
                          self.tmp, "fixed")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assert_schema(doc)
        (t,) = doc["trials"]
        self.assertEqual(t["purpose"], "fixed")
        self.assertGreater(t["offered"]["packets"], 0)
        self.assertEqual(t["lost_packets"], 0, t)
        self.assertEqual(t["received"]["packets"], t["offered"]["packets"])
        self.assertEqual(t["wrong_size"], 0)
        self.assertEqual(t["reordered"], 0)
        self.assertEqual(t["duplicates"], 0)
        self.assertEqual(t["unexpected"], {"stale": 0, "foreign": 0, "reflected": 0})
        self.assertEqual(t["latency_ns"]["samples"], t["received"]["packets"])
        self.assertEqual(t["rx_ttl"], 64)  # no router in between
        self.assertEqual(t["verdict"], "ok")
        # Every flow arrived, with the IMIX's three sizes in the received bytes.
        self.assertEqual(t["flows_seen"], min(64, t["offered"]["packets"]))
        self.assertEqual(t["offered"]["bps_l2"], t["received"]["bps_l2"])

        # The plot script draws both results into one file, PNG and SVG.
        for ext in ("png", "svg"):
            fig = os.path.join(self.tmp, f"fig.{ext}")
            q = subprocess.run([PYTHON, os.path.join(SRC, "bench/plot.py"), os.path.join(self.tmp, "ndr.json"),
                                out, "-o", fig], capture_output=True, text=True, timeout=60)
            self.assertEqual(q.returncode, 0, q.stderr)
            self.assertGreater(os.path.getsize(fig), 1000)

    def test_sink_on_its_own_lcore(self):
        text = loop_profile(self.tmp, "split", "{mode: fixed, rate_pps: 5000}").replace(
            "sink: {port: sink, lcore: 0}", "sink: {port: sink, lcore: 1}")
        p, doc, _ = run(text, self.tmp, "split")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(doc["profile"]["sink"]["lcore"], 1)
        (t,) = doc["trials"]
        self.assertGreater(t["received"]["packets"], 0)
        self.assertEqual(t["lost_packets"], 0, t)
        self.assertEqual(t["latency_ns"]["samples"], t["received"]["packets"])

    def test_black_hole_says_nothing_was_forwarded(self):
        text = f"""
ports:
  - {{name: gen, device: "net_null0,no-rx=1"}}
  - {{name: sink, device: "net_null1,no-rx=1"}}
generator: {{port: gen}}
sink: {{port: sink}}
eal: {{memory_mb: 256, file_prefix: moat-bench-test-hole-{os.getpid()}}}
trial: {{duration_s: 0.2, warmup_s: 0.1, drain_s: 0.2}}
time_limit_s: 90  # a loaded CI machine: correctness is tested here, not speed
"""
        p, doc, _ = run(text, self.tmp, "hole")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assert_schema(doc)
        (r,) = doc["results"]
        self.assertEqual(r["verdict"], "no_forwarding")
        self.assertIsNone(r["ndr"])
        self.assertIn("nothing arrived", r["notes"][0])
        self.assertTrue(all(t["received"]["packets"] == 0 and t["offered"]["packets"] > 0 for t in doc["trials"]))
        self.assertLess(doc["elapsed_s"], 20)
        # The sink's port never transmits: the harness sends only where told.
        self.assertEqual(doc["ports"]["sink"]["opackets"], 0)

    def test_flood_back_is_reported_as_excess(self):
        # net_null without no-rx "receives" a full burst on every poll: a
        # router that sends back far more than it was given.
        text = f"""
ports:
  - {{name: gen, device: "net_null0"}}
  - {{name: sink, device: "net_null1,no-rx=1"}}
generator: {{port: gen}}
sink: {{port: sink}}
eal: {{memory_mb: 256, file_prefix: moat-bench-test-flood-{os.getpid()}}}
trial: {{duration_s: 0.2, warmup_s: 0, drain_s: 0.1}}
search: {{mode: ndr, max_rate_pps: 10000}}
time_limit_s: 90  # a loaded CI machine: correctness is tested here, not speed
"""
        p, doc, _ = run(text, self.tmp, "flood")
        self.assertEqual(p.returncode, 0, p.stderr)
        (r,) = doc["results"]
        self.assertEqual(r["verdict"], "excess")
        self.assertEqual(len(r["trials"]), 1)  # the search stops at once
        (t,) = doc["trials"]
        self.assertGreater(t["unexpected"]["reflected"], t["tx_accepted"])
        self.assertIn("came back on the generator's port", r["notes"][0])

    def test_time_limit_stops_the_run_and_keeps_finished_trials(self):
        # Six one-second trials cannot fit in four seconds.
        text = loop_profile(self.tmp, "limit", "{mode: fixed, rate_pps: 1000}", sizes="[64, 128, 256, 512, 1024, 1518]",
                            extra="time_limit_s: 4").replace("duration_s: 0.3", "duration_s: 1")
        p, doc, _ = run(text, self.tmp, "limit")
        self.assertEqual(p.returncode, 4, p.stderr)
        self.assertEqual(doc["status"], "time_limit")
        self.assertLess(doc["elapsed_s"], 4)
        self.assertGreaterEqual(len(doc["trials"]), 1)
        self.assertLess(len(doc["trials"]), 6)
        self.assertEqual(doc["results"][-1]["verdict"], "stopped")

    def test_bad_profile_is_refused_with_its_place(self):
        path = os.path.join(self.tmp, "bad.yaml")
        with open(path, "w") as f:
            f.write("ports:\n  - {name: gen, device: net_null0}\n  - {name: sink, device: net_null1}\n"
                    "generator: {port: gen}\nsink: {port: sink}\ntraffic: {sizes: 40, flows: 0}\n")
        p = subprocess.run([BENCH, path], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 2)
        self.assertEqual(p.stdout, "")
        self.assertIn(f"{path}:6:18: traffic.sizes: 40 bytes is smaller than its headers", p.stderr)
        self.assertIn(f"{path}:6:29: traffic.flows: 0 flows", p.stderr)

    ESP = ("esp: {{direction: inbound, sas: {sas}, spi: 0x1000, outer_src: 192.0.2.10, outer_dst: 192.0.2.1, "
           "key: 0x00112233445566778899aabbccddeeff01020304, verify_every: {every}}}")
    KEY = bytes.fromhex("00112233445566778899aabbccddeeff01020304")

    def test_esp_frames_decrypt_with_scapy(self):
        from scapy.all import IP, UDP, ESP, raw, rdpcap
        from scapy.layers.ipsec import SecurityAssociation
        pcap = os.path.join(self.tmp, "esp.pcap")
        text = pcap_profile(pcap, "pcap", "[130, 1518]", 6, self.ESP.format(sas=3, every=1), 200)
        p, doc, _ = run(text, self.tmp, "pcap")
        self.assertEqual(p.returncode, 0, p.stderr)
        frames = rdpcap(pcap)
        self.assertGreaterEqual(len(frames), 20)
        seqs = {}
        for f in frames:
            self.assertIn(len(f), (126, 1514))
            ip = IP(raw(f[IP]))
            spi, seq = ip[ESP].spi, ip[ESP].seq
            sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=self.KEY,
                                     tunnel_header=IP(src=ip.src, dst=ip.dst))
            inner = sa.decrypt(ip)  # raises when the ICV does not match
            self.assertEqual(ip.src, f"192.0.2.{10 + spi - 0x1000}")
            self.assertEqual(inner[IP].dst, "10.0.2.2")
            again = IP(raw(inner))
            del again[UDP].chksum
            self.assertEqual(IP(raw(again))[UDP].chksum, inner[UDP].chksum)
            seqs.setdefault(spi, []).append(seq)
        self.assertEqual(sorted(seqs), [0x1000, 0x1001, 0x1002])
        for spi, s in seqs.items():
            self.assertEqual(s, list(range(1, len(s) + 1)), hex(spi))

    def test_esp_loop_sink_verifies_and_loses_nothing(self):
        text = loop_profile(self.tmp, "esp", "{mode: fixed, rate_pps: 5000}", sizes="[200, 1518]").replace(
            "flows: 64}", "flows: 64, " + self.ESP.format(sas=16, every=4) + "}")
        p, doc, _ = run(text, self.tmp, "esp")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertNotIn("00112233445566778899aabbccddeeff01020304", json.dumps(doc))  # keys stay out of results
        self.assertEqual(len(doc["trials"]), 2)
        for t in doc["trials"]:
            self.assertEqual(t["lost_packets"], 0, t)
            self.assertEqual(t["esp"]["failed"], 0)
            self.assertEqual(t["esp"]["checked"], t["received"]["packets"] // 4)
            self.assertEqual(t["latency_ns"]["samples"], t["esp"]["checked"])
            self.assertEqual(t["wrong_size"], 0)

    MOATD_CONF = """# moatd's own configuration: moat-bench takes the SAs from here
tunnels:
  - name: branch-a
    local: 192.0.2.1
    peer: 198.51.100.7
    sa: {cipher: aes-gcm-128, out: {spi: 0x7001, key: 0x0f0e0d0c0b0a09080706050403020100a1a2a3a4},
         in: {spi: 0x2005, key: 0x101112131415161718191a1b1c1d1e1f20212223}}
  - name: by-ike
    local: 192.0.2.1
    peer: 203.0.113.9
  - name: branch-b
    local: 192.0.2.1
    peer: 198.51.100.99
    sa:
      cipher: aes-gcm-128
      out: {spi: 0x7002, key: 0x303132333435363738393a3b3c3d3e3f40414243}
      in:
        - {spi: 0x3001, key: 0x505152535455565758595a5b5c5d5e5f60616263}
        - {spi: 0x3002, key: 0x707172737475767778797a7b7c7d7e7f80818283}
"""
    # SPI -> (key, outer source) that the moatd configuration above implies for inbound traffic.
    MOATD_IN = {0x2005: ("101112131415161718191a1b1c1d1e1f20212223", "198.51.100.7"),
                0x3001: ("505152535455565758595a5b5c5d5e5f60616263", "198.51.100.99")}

    def test_esp_keys_come_from_a_moatd_config(self):
        from scapy.all import IP, ESP, raw, rdpcap
        from scapy.layers.ipsec import SecurityAssociation
        with open(os.path.join(self.tmp, "moatd.yaml"), "w") as f:
            f.write(self.MOATD_CONF)
        pcap = os.path.join(self.tmp, "esp.pcap")
        # moat_config relative to the profile's directory.
        text = pcap_profile(pcap, "conf", "[200]", 4, "esp: {direction: inbound, moat_config: moatd.yaml, verify_every: 1}",
                            100)
        p, doc, _ = run(text, self.tmp, "conf")
        self.assertEqual(p.returncode, 0, p.stderr)
        esp = doc["profile"]["traffic"]["esp"]
        self.assertEqual([s["tunnel"] for s in esp["list"]], ["branch-a", "branch-b"])
        self.assertNotIn("101112131415161718191a1b1c1d1e1f20212223", json.dumps(doc))
        seen = set()
        for f in rdpcap(pcap):
            ip = IP(raw(f[IP]))
            spi = ip[ESP].spi
            key, src = self.MOATD_IN[spi]
            self.assertEqual((ip.src, ip.dst), (src, "192.0.2.1"))
            sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(key),
                                     tunnel_header=IP(src=ip.src, dst=ip.dst))
            sa.decrypt(ip)  # raises when the ICV does not match
            seen.add(spi)
        self.assertEqual(seen, set(self.MOATD_IN))
        # The sink finds each SA's key by its SPI (not contiguous here).
        text = loop_profile(self.tmp, "confloop", "{mode: fixed, rate_pps: 2000}", sizes="[200]").replace(
            "flows: 64}", "flows: 64, esp: {direction: inbound, moat_config: moatd.yaml, verify_every: 2}}")
        p, doc, _ = run(text, self.tmp, "confloop")
        self.assertEqual(p.returncode, 0, p.stderr)
        t = doc["trials"][0]
        self.assertEqual(t["lost_packets"], 0, t)
        self.assertEqual(t["esp"]["failed"], 0)
        self.assertEqual(t["esp"]["checked"], t["received"]["packets"] // 2)

    def test_bad_moatd_config_is_refused_with_its_place(self):
        conf = os.path.join(self.tmp, "moatd.yaml")
        with open(conf, "w") as f:
            f.write(self.MOATD_CONF.replace("cipher: aes-gcm-128\n", "cipher: chacha20-poly1305\n"))
        path = os.path.join(self.tmp, "p.yaml")
        with open(path, "w") as f:
            f.write("ports:\n  - {name: gen, device: net_null0}\n  - {name: sink, device: net_null1}\n"
                    "generator: {port: gen}\nsink: {port: sink}\n"
                    f"traffic: {{sizes: 200, esp: {{direction: inbound, moat_config: {conf}, spi: 0x1000}}}}\n")
        p = subprocess.run([BENCH, path, "--check"], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn(f"{conf}:15:15: tunnel branch-b: sa.cipher: chacha20-poly1305: moat-bench generates and "
                      "checks aes-gcm-128 only", p.stderr)
        self.assertIn(f"{path}:6:", p.stderr)
        self.assertIn("come from moat_config; drop this key", p.stderr)

    def test_example_profiles_are_valid(self):
        d = os.path.join(SRC, "bench/profiles")
        for name in sorted(os.listdir(d)):
            if name.endswith(".yaml"):
                p = subprocess.run([BENCH, os.path.join(d, name), "--check"], capture_output=True, text=True, timeout=30)
                self.assertEqual(p.returncode, 0, f"{name}: {p.stderr}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
