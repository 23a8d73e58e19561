#!/usr/bin/python3
"""pcap in, pcap out: the real moatd binary on net_pcap vdevs.

Each test writes input pcaps with scapy, runs moatd until it has consumed
them, stops it (which flushes the output pcaps) and compares what came out,
port by port and packet by packet, with what RFC 791/792/1812 say should
come out, computed here with scapy. Drop counters are read with moatctl.
"""
import json
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from scapy.all import (ARP, ICMP, IP, IPerror, UDP, TCP, Ether, Raw, rdpcap, wrpcap, raw,
                       defragment)

MOATD = os.environ.get("MOATD", "build/ctrl/moatd")
MOATCTL = os.environ.get("MOATCTL", "build/ctrl/moatctl")

# One EAL runtime directory per test process: two runs (two checkouts, a
# benchmark next to the tests) must not share DPDK's lock and sockets.
EAL_PREFIX = f"moat-pcap-{os.getpid()}"
atexit.register(shutil.rmtree, f"/var/run/dpdk/{EAL_PREFIX}", ignore_errors=True)

R_LAN = "02:00:00:00:01:01"   # moat's lan port
R_WAN = "02:00:00:00:02:01"   # moat's wan port
HOST = "02:00:00:00:01:02"    # a host on lan, 10.1.0.2
GW = "02:00:00:00:02:02"      # the upstream gateway, 192.0.2.1
BCAST = "ff:ff:ff:ff:ff:ff"


class Moatd:
    """Runs moatd on a config; stops it on exit, always."""

    def __init__(self, tmp, config_text, name="moat"):
        self.tmp = tmp
        self.sock = os.path.join(tmp, name + ".sock")
        self.cfg = os.path.join(tmp, name + ".yaml")
        with open(self.cfg, "w") as f:
            f.write(config_text.replace("@SOCK@", self.sock).replace("@TMP@", tmp))
        self.log = open(os.path.join(tmp, name + ".log"), "w+")  # closed in stop()
        self.p = None

    def __enter__(self):
        self.p = subprocess.Popen([MOATD, "--config", self.cfg], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError("moatd exited: " + self.logtext())
            if os.path.exists(self.sock) and self.ctl("show", "stats", check=False) is not None:
                return self
            time.sleep(0.1)
        raise RuntimeError("moatd did not open its socket: " + self.logtext())

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.p = None
        self.log.close()

    def logtext(self):
        if self.log.closed:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def ctl(self, *args, check=True):
        r = subprocess.run([MOATCTL, "--socket", self.sock, "--json", *args], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            if check:
                raise RuntimeError(f"moatctl {' '.join(args)}: {r.stderr}")
            return None
        return json.loads(r.stdout)

    def drops(self):
        out = {}
        for d in self.ctl("show", "stats")["drops"]:
            out[d["reason"]] = out.get(d["reason"], 0) + d["count"]
        return out

    def rx(self):
        return sum(w["rx"] for w in self.ctl("show", "stats")["workers"])

    def telemetry(self, cmd):
        """Asks DPDK's telemetry socket (v2 protocol) of this moatd."""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        s.connect(f"/var/run/dpdk/{EAL_PREFIX}/dpdk_telemetry.v2")
        s.recv(4096)  # greeting
        s.send(cmd.encode())
        out = json.loads(s.recv(65536).decode())
        s.close()
        return out[cmd.split(",")[0]]  # the answer is keyed by the command without its parameters

    def wait_rx(self, n, settle=0.3, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.rx() >= n:
                time.sleep(settle)
                return
            time.sleep(0.05)
        raise AssertionError(f"moatd received {self.rx()} of {n} packets")


def two_port_config(extra_routes="", lan_mtu=1500, wan_mtu=1280, neighbors=True, arp=""):
    nb = f"""neighbors:
  - {{ip: 10.1.0.2, mac: "{HOST}", port: lan}}
  - {{ip: 192.0.2.1, mac: "{GW}", port: wan}}
""" if neighbors else ""
    return f"""eal:
  lcores: [0, 1]
  memory_mb: 256
  no_huge: true
  file_prefix: {EAL_PREFIX}
  log_level: "*:error"
ports:
  - name: lan
    device: net_pcap0,rx_pcap=@TMP@/in_lan.pcap,tx_pcap=@TMP@/out_lan.pcap
    address: 10.1.0.1/24
    mac: "{R_LAN}"
    mtu: {lan_mtu}
  - name: wan
    device: net_pcap1,rx_pcap=@TMP@/in_wan.pcap,tx_pcap=@TMP@/out_wan.pcap
    address: 192.0.2.2/24
    mac: "{R_WAN}"
    mtu: {wan_mtu}
routes:
  - {{prefix: 0.0.0.0/0, via: 192.0.2.1}}
{extra_routes}
{nb}
punt:
  enabled: false
icmp:
  rate_pps: 1000
  burst: 1000
{arp}
control:
  socket: "@SOCK@"
"""


def icmp_error(offender, icmp_type, code, src, mtu=0):
    """The error RFC 792/1812 want for `offender` (an IP packet as received)."""
    quote = raw(offender)[:548]
    ic = ICMP(type=icmp_type, code=code)
    if mtu:
        ic.nexthopmtu = mtu
    return IP(src=src, dst=offender[IP].src, ttl=64, id=0, tos=0xc0, flags=0) / ic / Raw(quote)


def frames(path):
    return [] if not os.path.exists(path) or os.path.getsize(path) == 0 else list(rdpcap(path))


def not_arp(pkts):
    return [p for p in pkts if ARP not in p]


class PcapForwarding(unittest.TestCase):
    def setUp(self):
        self.tmpdir = tempfile.TemporaryDirectory(prefix="moat-pcap-")
        self.tmp = self.tmpdir.name

    def tearDown(self):
        self.tmpdir.cleanup()

    def run_moatd(self, lan_in, wan_in, config, expect_rx=None, settle=0.3):
        wrpcap(os.path.join(self.tmp, "in_lan.pcap"), lan_in or [], linktype=1)
        wrpcap(os.path.join(self.tmp, "in_wan.pcap"), wan_in or [], linktype=1)
        with Moatd(self.tmp, config) as m:
            m.wait_rx(expect_rx if expect_rx is not None else len(lan_in) + len(wan_in), settle=settle)
            drops = m.drops()
            stats = m.ctl("show", "stats")
            self.telemetry_drops = m.telemetry("/moat/drops")
        return (frames(os.path.join(self.tmp, "out_lan.pcap")), frames(os.path.join(self.tmp, "out_wan.pcap")),
                drops, stats)

    def assertSamePackets(self, got, want, what):
        g = sorted(raw(p) for p in got)
        w = sorted(raw(p) for p in want)
        if g != w:
            msg = [f"{what}: {len(got)} packets out, {len(want)} expected"]
            for p in got:
                msg.append("got:  " + p.summary() + " " + raw(p).hex())
            for p in want:
                msg.append("want: " + p.summary() + " " + raw(p).hex())
            self.fail("\n".join(msg))

    def test_forwarding_and_icmp(self):
        lan = Ether(src=HOST, dst=R_LAN)
        udp = IP(src="10.1.0.2", dst="8.8.8.8", ttl=64, id=1) / UDP(sport=1000, dport=53) / Raw(b"x" * 30)
        ttl1 = IP(src="10.1.0.2", dst="8.8.8.8", ttl=1, id=2) / UDP(sport=1001, dport=33434) / Raw(b"t" * 12)
        echo = IP(src="10.1.0.2", dst="10.1.0.1", ttl=7, id=3) / ICMP(type=8, id=77, seq=1) / Raw(b"ping" * 10)
        echo_far = IP(src="10.1.0.2", dst="192.0.2.2", ttl=7, id=4) / ICMP(type=8, id=77, seq=2) / Raw(b"pong")
        big_df = IP(src="10.1.0.2", dst="8.8.4.4", ttl=64, id=5, flags="DF") / UDP(sport=7, dport=7) / Raw(b"d" * 1372)
        big = IP(src="10.1.0.2", dst="8.8.4.4", ttl=64, id=6) / UDP(sport=8, dport=8) / Raw(bytes(range(256)) * 5 + b"e" * 92)
        to_us_udp = IP(src="10.1.0.2", dst="10.1.0.1", ttl=64, id=7) / UDP(sport=5, dport=9) / Raw(b"u")
        prohibited = IP(src="10.1.0.2", dst="10.66.1.1", ttl=64, id=8) / TCP(sport=1234, dport=22, flags="S")
        unreachable = IP(src="10.1.0.2", dst="10.67.1.1", ttl=64, id=9) / UDP(sport=1, dport=2)
        blackholed = IP(src="10.1.0.2", dst="10.68.1.1", ttl=64, id=10) / UDP(sport=1, dport=2)
        ins = [udp, ttl1, echo, echo_far, big_df, big, to_us_udp, prohibited, unreachable, blackholed]
        lan_in = [lan / p for p in ins]
        routes = """  - {prefix: 10.66.0.0/16, type: prohibit}
  - {prefix: 10.67.0.0/16, type: unreachable}
  - {prefix: 10.68.0.0/16, type: blackhole}"""
        out_lan, out_wan, drops, _ = self.run_moatd(lan_in, [], two_port_config(routes))

        # WAN: the UDP packet with TTL-1 and a fresh checksum, then big's fragments.
        fwd = IP(raw(udp))
        fwd.ttl = 63
        del fwd.chksum
        wan_ip = [p for p in not_arp(out_wan)]
        whole = [p for p in wan_ip if p[IP].flags.MF == 0 and p[IP].frag == 0]
        frags = [p for p in wan_ip if p not in whole]
        self.assertSamePackets(whole, [Ether(src=R_WAN, dst=GW) / fwd], "wan unfragmented")
        for p in wan_ip:
            self.assertEqual((p.src, p.dst), (R_WAN, GW))
            self.assertLessEqual(len(p[IP]), 1280)
            self.assertEqual(p[IP].chksum, IP(raw(p[IP]))[IP].__class__(raw(p[IP])).chksum)
            q = IP(raw(p[IP]))
            del q.chksum
            self.assertEqual(IP(raw(q)).chksum, p[IP].chksum, "fragment checksum")
        self.assertGreaterEqual(len(frags), 2)
        re = defragment(frags)
        self.assertEqual(len(re), 1)
        want_big = IP(raw(big))
        want_big.ttl = 63
        self.assertEqual(bytes(re[0][IP].payload), bytes(want_big.payload), "reassembled payload")

        # LAN: ICMP answers, each built from the offender as it arrived.
        src = "10.1.0.1"
        def reply(req):
            r = IP(src=req[IP].dst, dst=req[IP].src, ttl=64, id=req[IP].id) / ICMP(type=0, id=req[ICMP].id, seq=req[ICMP].seq) / req[Raw]
            return r
        want_lan = [
            icmp_error(ttl1, 11, 0, src),
            reply(echo),
            reply(echo_far),
            icmp_error(big_df, 3, 4, src, mtu=1280),
            icmp_error(to_us_udp, 3, 3, src),
            icmp_error(prohibited, 3, 13, src),
            icmp_error(unreachable, 3, 0, src),
        ]
        self.assertSamePackets(not_arp(out_lan), [Ether(src=R_LAN, dst=HOST) / IP(raw(p)) for p in want_lan], "lan")
        self.assertEqual(drops.get("ttl_expired"), 1)
        self.assertEqual(drops.get("frag_needed"), 1)
        self.assertEqual(drops.get("port_unreachable"), 1)
        self.assertEqual(drops.get("prohibited_route"), 1)
        self.assertEqual(drops.get("unreachable_route"), 1)
        self.assertEqual(drops.get("blackhole_route"), 1)

    def test_malformed_corpus_is_dropped_and_counted(self):
        good = Ether(src=HOST, dst=R_LAN) / IP(src="10.1.0.2", dst="8.8.8.8", id=1) / UDP() / Raw(b"z" * 20)
        g = bytearray(raw(good))
        def mut(f):
            b = bytearray(g)
            f(b)
            return Ether(bytes(b))
        def setck(b):
            b[24] = b[25] = 0
            s = 0
            for i in range(14, 34, 2):
                s += (b[i] << 8) | b[i + 1]
            while s >> 16:
                s = (s & 0xffff) + (s >> 16)
            s = ~s & 0xffff
            b[24], b[25] = s >> 8, s & 0xff
        corpus = {
            "runt": [Raw(raw(good)[:10])],
            "not_for_us_l2": [Ether(src=HOST, dst="02:00:00:00:99:99") / IP(src="10.1.0.2", dst="8.8.8.8") / UDP()],
            "multicast_l2": [Ether(src=HOST, dst="01:00:5e:00:00:01") / IP(src="10.1.0.2", dst="224.0.0.1") / UDP()],
            "ethertype_unknown": [Ether(src=HOST, dst=R_LAN, type=0x86dd) / Raw(b"\x60" + b"\x00" * 60)],
            "ip_truncated": [Ether(raw(good)[:14 + 12]), mut(lambda b: b.__setitem__(slice(16, 18), b"\x05\xdc"))],
            "ip_version": [mut(lambda b: (b.__setitem__(14, 0x65), setck(b)))],
            "ip_ihl": [mut(lambda b: (b.__setitem__(14, 0x43), setck(b)))],
            "ip_checksum": [mut(lambda b: b.__setitem__(24, b[24] ^ 0xff))],
            "ip_options": [Ether(src=HOST, dst=R_LAN) / IP(src="10.1.0.2", dst="8.8.8.8", options=[b"\x01\x01\x01\x00"]) / UDP()],
            "ip_martian": [Ether(src=HOST, dst=R_LAN) / IP(src="127.0.0.1", dst="8.8.8.8") / UDP()],
            "vlan_unknown": [Ether(raw(good)[:12] + b"\x81\x00\x00\x07" + raw(good)[12:])],
            "arp_malformed": [Ether(src=HOST, dst=BCAST, type=0x0806) / Raw(b"\x00\x01\x08\x00")],
            "arp_unsolicited": [Ether(src="02:00:00:00:01:66", dst=R_LAN) / ARP(op=2, hwsrc="02:00:00:00:01:66", psrc="10.1.0.66", hwdst=R_LAN, pdst="10.1.0.1")],
            "arp_not_for_us": [Ether(src=HOST, dst=BCAST) / ARP(op=1, hwsrc=HOST, psrc="10.1.0.2", pdst="10.1.0.99")],
            "broadcast_l3": [Ether(src=HOST, dst=BCAST) / IP(src="10.1.0.2", dst="10.1.0.255") / UDP(dport=137)] * 50,
        }
        lan_in = [p for ps in corpus.values() for p in ps]
        out_lan, out_wan, drops, _ = self.run_moatd(lan_in, [], two_port_config())
        for reason, pkts in corpus.items():
            self.assertEqual(drops.get(reason, 0), len(pkts), f"drop counter {reason}: {drops}")
        self.assertEqual(not_arp(out_wan), [], "nothing malformed is forwarded")
        # The same counters are exported over DPDK telemetry.
        self.assertEqual({k: v for k, v in self.telemetry_drops.items() if v}, drops)
        self.assertEqual(not_arp(out_lan), [])
        # The unsolicited reply did not poison the cache.
        # (moatd is gone now; the counters above and the absence of output prove it.)

    def test_arp_answers_requests_and_resolves_next_hops(self):
        # No static neighbours: the router must ARP for the host and the gateway.
        req = Ether(src=HOST, dst=BCAST) / ARP(op=1, hwsrc=HOST, psrc="10.1.0.2", pdst="10.1.0.1")
        to_gw = Ether(src=HOST, dst=R_LAN) / IP(src="10.1.0.2", dst="8.8.8.8", id=1) / UDP() / Raw(b"a")
        to_absent = Ether(src=HOST, dst=R_LAN) / IP(src="10.1.0.2", dst="10.1.0.77", id=2) / UDP() / Raw(b"b")
        arp = "arp:\n  retry_ms: 50\n  max_retries: 2\n  hold_packets: 4\n"
        out_lan, out_wan, drops, _ = self.run_moatd([req, to_gw, to_absent], [], two_port_config(neighbors=False, arp=arp),
                                                    settle=1.0)
        lan_arp = [p for p in out_lan if ARP in p]
        reply = [p for p in lan_arp if p[ARP].op == 2]
        self.assertEqual(len(reply), 1)
        self.assertEqual((reply[0].dst, reply[0][ARP].hwsrc, reply[0][ARP].psrc, reply[0][ARP].pdst, reply[0][ARP].hwdst),
                         (HOST, R_LAN, "10.1.0.1", "10.1.0.2", HOST))
        requests = [p for p in lan_arp if p[ARP].op == 1 and p[ARP].pdst == "10.1.0.77"]
        self.assertEqual(len(requests), 2, "initial request + one retry (max_retries 2)")
        for p in requests:
            self.assertEqual((p.dst, p[ARP].psrc, p[ARP].hwsrc), (BCAST, "10.1.0.1", R_LAN))
        garp = [p for p in lan_arp if p[ARP].op == 1 and p[ARP].psrc == p[ARP].pdst == "10.1.0.1"]
        self.assertEqual(len(garp), 1, "gratuitous ARP at start")
        wan_req = [p for p in out_wan if ARP in p and p[ARP].pdst == "192.0.2.1"]
        self.assertGreaterEqual(len(wan_req), 1, "the gateway is resolved")
        # The host's request for us taught us its MAC (RFC 826), so the two
        # failures come back to it as ICMP host unreachable.
        self.assertEqual(drops.get("arp_failed"), 2, "10.1.0.77 and the gateway never answer")
        unreach = [p for p in not_arp(out_lan) if ICMP in p and p[ICMP].type == 3 and p[ICMP].code == 1]
        self.assertEqual(sorted(p[IPerror].dst for p in unreach), ["10.1.0.77", "8.8.8.8"])
        for p in unreach:
            self.assertEqual((p.dst, p[IP].src, p[IP].dst), (HOST, "10.1.0.1", "10.1.0.2"))
        self.assertEqual(not_arp(out_wan), [])

    def test_address_change_moves_connected_routes_and_announces(self):
        wrpcap(os.path.join(self.tmp, "in_lan.pcap"), [], linktype=1)
        wrpcap(os.path.join(self.tmp, "in_wan.pcap"), [], linktype=1)
        with Moatd(self.tmp, two_port_config(neighbors=False)) as m:
            r = subprocess.run([MOATCTL, "--socket", m.sock, "address", "set", "lan", "10.5.0.1/16"],
                               capture_output=True, text=True, timeout=10)
            self.assertEqual(r.returncode, 0, r.stderr)
            bad = subprocess.run([MOATCTL, "--socket", m.sock, "address", "set", "lan", "192.0.2.9/24"],
                                 capture_output=True, text=True, timeout=10)
            self.assertEqual(bad.returncode, 1)
            self.assertIn("overlaps port wan", bad.stderr)
            routes = {r["prefix"]: r for r in m.ctl("show", "routes")}
            ifs = {i["name"]: i for i in m.ctl("show", "interfaces")}
            time.sleep(0.3)
        self.assertIn("10.5.0.0/16", routes)
        self.assertEqual(routes["10.5.0.0/16"]["origin"], "connected")
        self.assertNotIn("10.1.0.0/24", routes)
        self.assertEqual(ifs["lan"]["address"], "10.5.0.1/16")
        garps = [p for p in frames(os.path.join(self.tmp, "out_lan.pcap"))
                 if ARP in p and p[ARP].op == 1 and p[ARP].psrc == p[ARP].pdst]
        self.assertEqual([p[ARP].psrc for p in garps], ["10.1.0.1", "10.5.0.1"], "gratuitous ARP at start and on change")

    def test_route_changes_under_traffic_lose_nothing(self):
        # net_pcap replays the input forever; two net_null sinks. Routes flip
        # the flow between the two sinks 40 times while it runs.
        flow = [Ether(src=HOST, dst=R_LAN) / IP(src="10.1.0.2", dst="10.2.%d.%d" % (i // 200, i % 200 + 1), id=i) / UDP(sport=1000 + i, dport=9) / Raw(b"r" * 18)
                for i in range(256)]
        wrpcap(os.path.join(self.tmp, "flow.pcap"), flow)
        cfg = f"""eal:
  lcores: [0, 1]
  memory_mb: 256
  no_huge: true
  log_level: "*:error"
ports:
  - {{name: lan, device: "net_pcap0,rx_pcap=@TMP@/flow.pcap,infinite_rx=1", address: 10.1.0.1/24, mac: "{R_LAN}"}}
  - {{name: a, device: "net_null0,no-rx=1", address: 10.3.0.1/24}}
  - {{name: b, device: "net_null1,no-rx=1", address: 10.4.0.1/24}}
neighbors:
  - {{ip: 10.3.0.2, mac: "02:00:00:00:03:02", port: a}}
  - {{ip: 10.4.0.2, mac: "02:00:00:00:04:02", port: b}}
routes:
  - {{prefix: 0.0.0.0/0, via: 10.4.0.2}}
punt:
  enabled: false
control:
  socket: "@SOCK@"
"""
        with Moatd(self.tmp, cfg) as m:
            def tx():
                ports = {p["name"]: p["tx_packets"] for p in m.ctl("show", "interfaces")}
                return ports["a"], ports["b"]
            def grows(port):
                # The worker may be off its CPU for a while on a loaded
                # machine: wait (bounded) for the port's count to move.
                before = tx()[port]
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    time.sleep(0.02)
                    if tx()[port] > before:
                        return True
                return False
            m.wait_rx(10000, settle=0)
            for i in range(40):
                m.ctl("route", "add", "10.2.0.0/16", "via", "10.3.0.2")
                self.assertTrue(grows(0), f"round {i}: the /16 sends to a")
                m.ctl("route", "del", "10.2.0.0/16")
                self.assertTrue(grows(1), f"round {i}: without the /16, the default sends to b")
            drops = m.drops()
            stats = m.ctl("show", "stats")
            routes = m.ctl("show", "routes")
        self.assertEqual(drops, {}, "no packet dropped during 80 route changes")
        w = stats["workers"][0]
        self.assertLessEqual(w["rx"] - w["tx"], 128, "everything received was sent (up to a burst in flight)")
        self.assertGreater(w["rx"], 100000)
        self.assertNotIn("10.2.0.0/16", [r["prefix"] for r in routes])


if __name__ == "__main__":
    unittest.main(verbosity=2)
