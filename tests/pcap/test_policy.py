#!/usr/bin/python3
"""The seeds' security policy (configs/moat.yaml) on the real moatd.

Seed 000: with N interfaces there are N! paths and most must be refused.
Every ordered pair of zones (wild, office, kids, and the tunnel's zone vpn as
a destination), and each zone to the router itself, gets a packet; only the
paths the policy allows may pass, each refused one is dropped or rejected as
the policy says, and counted.
"""
import json
import os
import socket
import sys
import tempfile
import time
import unittest

import yaml
from scapy.all import ICMP, IP, UDP, Ether, Raw, wrpcap, raw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pcap import EAL_PREFIX, R_LAN, HOST as LAN_HOST, Moatd, frames, not_arp  # noqa: E402

SRC = os.environ.get("MOAT_SRC", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

MAC = {"wan": "02:00:00:00:0a:01", "office": "02:00:00:00:0b:01", "kids": "02:00:00:00:0c:01"}
# One host per zone on the moat's links, plus a second one for hairpin paths.
HOST = {"wan": ("192.0.2.1", "02:00:00:00:0a:02"), "office": ("10.1.0.2", "02:00:00:00:0b:02"),
        "kids": ("192.168.7.2", "02:00:00:00:0c:02")}
HOST2 = {"wan": ("192.0.2.3", "02:00:00:00:0a:03"), "office": ("10.1.0.3", "02:00:00:00:0b:03"),
         "kids": ("192.168.7.3", "02:00:00:00:0c:03")}
ROUTER = {"wan": "192.0.2.2", "office": "10.1.0.1", "kids": "192.168.7.1"}
# Where a packet goes to reach a zone: an internet host, a host on the LAN,
# a corporate host (routed into the tunnel corp).
DEST = {"wild": "198.51.100.7", "office": HOST2["office"][0], "kids": HOST2["kids"][0], "vpn": "10.9.0.2"}
ZONE_PORT = {"wild": "wan", "office": "office", "kids": "kids"}


def policy_config(tmp):
    """configs/moat.yaml as shipped, its ports swapped for pcap files."""
    with open(os.path.join(SRC, "configs", "moat.yaml")) as f:
        cfg = yaml.safe_load(f)
    for p in cfg["ports"]:
        n = p["name"]
        p["device"] = f"net_pcap_{n},rx_pcap={tmp}/in_{n}.pcap,tx_pcap={tmp}/out_{n}.pcap"
        p["mac"] = MAC[n]
    cfg["eal"] = {"lcores": [0, 1], "memory_mb": 256, "no_huge": True, "file_prefix": EAL_PREFIX,
                  "log_level": "*:error"}
    cfg["neighbors"] = [{"ip": h[0], "mac": h[1], "port": n} for d in (HOST, HOST2) for n, h in d.items()]
    cfg["punt"] = {"enabled": False}
    cfg["icmp"] = {"rate_pps": 100000, "burst": 100000}
    cfg["control"] = {"socket": "@SOCK@"}
    return yaml.safe_dump(cfg)


class ZoneMatrix(unittest.TestCase):
    def test_only_allowed_paths_pass(self):
        # (from zone, to zone, expected): pass = forwarded or answered;
        # reject = ICMP admin-prohibited back; drop = silence; tunnel = handed
        # to the tunnel (no SA in this test: counted tunnel_down, never clear).
        want = {
            ("wild", "wild"): "drop", ("wild", "office"): "drop", ("wild", "kids"): "drop",
            ("wild", "vpn"): "drop", ("wild", "local"): "drop", ("wild", "local-svc"): "drop",
            ("office", "wild"): "reject", ("office", "office"): "reject", ("office", "kids"): "reject",
            ("office", "vpn"): "tunnel", ("office", "local"): "pass", ("office", "local-svc"): "reject",
            ("kids", "wild"): "pass", ("kids", "office"): "reject", ("kids", "kids"): "reject",
            ("kids", "vpn"): "reject", ("kids", "local"): "pass", ("kids", "local-svc"): "reject",
        }
        ins = {"wan": [], "office": [], "kids": []}
        sent = {}
        ident = 100
        for (src_zone, dst_zone), _ in sorted(want.items()):
            port = ZONE_PORT[src_zone]
            src_ip = "203.0.113.9" if src_zone == "wild" else HOST[port][0]
            eth = Ether(src=HOST[port][1], dst=MAC[port])
            if dst_zone == "local":  # a ping to the router's own address on that side
                pkt = IP(src=src_ip, dst=ROUTER[port], id=ident, ttl=64) / ICMP(type=8, id=ident, seq=1) / Raw(b"p" * 8)
            elif dst_zone == "local-svc":  # a UDP port the router offers to no one
                pkt = IP(src=src_ip, dst=ROUTER[port], id=ident, ttl=64) / UDP(sport=4000, dport=9999) / Raw(b"s")
            else:
                pkt = IP(src=src_ip, dst=DEST[dst_zone], id=ident, ttl=64) / UDP(sport=4000, dport=9999) / Raw(b"t")
            ins[port].append(eth / pkt)
            sent[ident] = (src_zone, dst_zone)
            ident += 1
        # Anti-spoofing: the wild side claiming an office source, to an open
        # port of the router (IKE), is dropped; the same from a real internet
        # address is accepted (and, with no punt path, answered port-unreachable).
        spoof = Ether(src=HOST["wan"][1], dst=MAC["wan"]) / IP(src="10.1.0.77", dst=ROUTER["wan"], id=900) / UDP(sport=500, dport=500)
        ike = Ether(src=HOST["wan"][1], dst=MAC["wan"]) / IP(src="203.0.113.9", dst=ROUTER["wan"], id=901) / UDP(sport=500, dport=500)
        ins["wan"] += [spoof, ike]

        with tempfile.TemporaryDirectory(prefix="moat-policy-") as tmp:
            for port, pkts in ins.items():
                wrpcap(os.path.join(tmp, f"in_{port}.pcap"), pkts, linktype=1)
            with Moatd(tmp, policy_config(tmp)) as m:
                m.wait_rx(sum(len(p) for p in ins.values()))
                drops = m.drops()
            out = {p: not_arp(frames(os.path.join(tmp, f"out_{p}.pcap"))) for p in ins}

        got = {}
        for port, pkts in out.items():
            for p in pkts:
                ip = p[IP]
                if ICMP in ip and ip[ICMP].type == 0:  # echo reply from the router
                    got[ip[ICMP].id] = ("pass", port)
                elif ICMP in ip and ip[ICMP].type == 3 and ip[ICMP].code == 13:  # admin prohibited
                    got[IP(raw(ip[ICMP].payload)).id] = ("reject", port)
                elif ICMP in ip and ip[ICMP].type == 3 and ip[ICMP].code == 3:  # port unreachable
                    got[IP(raw(ip[ICMP].payload)).id] = ("port-unreachable", port)
                else:
                    got[ip.id] = ("pass", port)
        expect_counts = {"filter_drop": 0, "filter_reject": 0, "tunnel_down": 0}
        for ident, pair in sent.items():
            w = want[pair]
            src_port = ZONE_PORT[pair[0]]
            with self.subTest(path=f"{pair[0]} -> {pair[1]}"):
                if w == "pass":
                    self.assertIn(ident, got, "allowed path produced nothing")
                    self.assertEqual(got[ident][0], "pass")
                    # Forwarded out of the destination zone's port, or answered on the way in.
                    self.assertEqual(got[ident][1], src_port if pair[1] == "local" else ZONE_PORT[pair[1]])
                elif w == "reject":
                    self.assertEqual(got.get(ident), ("reject", src_port))
                    expect_counts["filter_reject"] += 1
                else:
                    self.assertNotIn(ident, got, f"{w}: nothing may come out")
                    expect_counts["filter_drop" if w == "drop" else "tunnel_down"] += 1
        self.assertNotIn(900, got, "spoofed source passed")
        self.assertEqual(got.get(901), ("port-unreachable", "wan"), "IKE from the wild side is allowed to the router")
        expect_counts["filter_drop"] += 1  # the spoofed packet
        for reason, n in expect_counts.items():
            self.assertEqual(drops.get(reason, 0), n, f"{reason}: {drops}")


def rules_file(path, block_port):
    """A rule set in which every flow packet is accepted, except UDP to
    `block_port` (0: none); many decoy rules make the build non-trivial."""
    decoys = "\n".join(f"    - {{from: lan, dst: 172.{16 + i // 250}.{i % 250}.0/24, proto: tcp, dport: {1000 + i}, action: drop}}"
                        for i in range(100))
    block = f"    - {{name: block, proto: udp, dport: {block_port}, action: drop}}\n" if block_port else ""
    with open(path, "w") as f:
        # Stateless: a stateful filter would let the flows A accepted go on
        # under B (established connections skip the rules, as they should).
        f.write(f"""filter:
  default: drop
  stateful: false
  rules:
{decoys}
{block}    - {{name: flow, from: lan, to: sink, dst: 10.2.0.0/16, action: accept}}
qos:
  classes: [bulk]
  rules:
    - {{dscp: 0, class: bulk, mark: {8 if block_port else 16}}}
""")


class CtlSocket:
    """moatctl's protocol spoken directly: one JSON request per connection,
    without a process per call, so 1,000 reloads take seconds."""

    def __init__(self, path):
        self.path = path

    def __call__(self, *args):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)  # a loaded CI machine; correctness, not speed, is tested here
        s.connect(self.path)
        s.sendall((json.dumps({"args": list(args)}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        s.close()
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise RuntimeError(f"{' '.join(args)}: {reply.get('error')}")
        return reply["data"]


class HotUpdate(unittest.TestCase):
    def test_thousand_rule_changes_under_traffic_lose_nothing(self):
        # The flow: UDP to ports 9 and 10, looped forever by net_pcap. Rule
        # set A accepts all of it; B drops port 10. Every packet received is
        # either sent or counted as dropped by B's rule: none is lost, and
        # none meets a missing or half-built rule set (its default is drop,
        # which would show as more filter drops than B's rule explains).
        with tempfile.TemporaryDirectory(prefix="moat-hot-") as tmp:
            flow = [Ether(src=LAN_HOST, dst=R_LAN) / IP(src="10.1.0.2", dst="10.2.%d.%d" % (i // 200, i % 200 + 1), id=i) /
                    UDP(sport=1000 + i, dport=9 + (i % 2)) / Raw(b"h" * 18) for i in range(256)]
            wrpcap(os.path.join(tmp, "flow.pcap"), flow)
            a, b = os.path.join(tmp, "a.yaml"), os.path.join(tmp, "b.yaml")
            rules_file(a, 0)
            rules_file(b, 10)
            base = f"""eal:
  lcores: [0, 1]
  memory_mb: 256
  no_huge: true
  file_prefix: {EAL_PREFIX}
  log_level: "*:error"
ports:
  - {{name: lan, device: "net_pcap0,rx_pcap={tmp}/flow.pcap,infinite_rx=1", address: 10.1.0.1/24, mac: "{R_LAN}"}}
  - {{name: sink, device: "net_null0,no-rx=1", address: 10.4.0.1/24}}
neighbors:
  - {{ip: 10.4.0.2, mac: "02:00:00:00:04:02", port: sink}}
routes:
  - {{prefix: 0.0.0.0/0, via: 10.4.0.2}}
punt:
  enabled: false
control:
  socket: "@SOCK@"
"""
            # Each rule file is a whole config: ports as above, its own rules.
            for path in (a, b):
                with open(path) as f:
                    rules = f.read()
                with open(path, "w") as f:
                    f.write(base.replace("@SOCK@", os.path.join(tmp, "moat.sock")) + rules)
            with open(a) as f:
                cfg = f.read()
            with Moatd(tmp, cfg) as m:
                ctl = CtlSocket(m.sock)
                m.wait_rx(10000, settle=0)

                def filter_drops():
                    return sum(d["count"] for d in ctl("show", "stats")["drops"] if d["reason"] == "filter_drop")

                gen0 = ctl("show", "rules")["generation"]
                for i in range(1000):
                    r = ctl("rules", "reload", b if i % 2 == 0 else a)
                    self.assertEqual(r["generation"], gen0 + i + 1)
                    if i % 100 == 0:  # B in force now: port 10 is dropped
                        d0 = filter_drops()
                        time.sleep(0.02)
                        self.assertGreater(filter_drops(), d0, f"reload {i}: rule set B is in force")
                    elif i % 100 == 1:  # A in force now: nothing is dropped
                        d0 = filter_drops()
                        time.sleep(0.02)
                        self.assertEqual(filter_drops(), d0, f"reload {i}: rule set A is in force")
                # A broken file changes nothing: the rules in force stay.
                broken = os.path.join(tmp, "broken.yaml")
                with open(a) as f:
                    text = f.read()
                with open(broken, "w") as f:
                    f.write(text.replace("action: accept", "action: acept"))
                with self.assertRaises(RuntimeError) as err:
                    ctl("rules", "reload", broken)
                self.assertIn("broken.yaml:", str(err.exception))
                self.assertIn("unknown action", str(err.exception))
                self.assertEqual(ctl("show", "rules")["generation"], gen0 + 1000)
                stats = ctl("show", "stats")
                ifs = {p["name"]: p for p in ctl("show", "interfaces")}
            drops = {d["reason"]: d["count"] for d in stats["drops"] if d["count"]}
            w = stats["workers"][0]
            self.assertEqual(set(drops) - {"filter_drop"}, set(), f"only B's rule may drop: {drops}")
            self.assertGreater(w["rx"], 100000)
            self.assertLessEqual(w["rx"] - w["tx"] - drops.get("filter_drop", 0), 128,
                                 "every packet received was sent or dropped by B's rule (up to a burst in flight)")
            self.assertGreater(ifs["sink"]["tx_packets"], 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
