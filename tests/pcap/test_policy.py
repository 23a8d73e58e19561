#!/usr/bin/python3
"""The seeds' security policy (configs/moat.yaml) on the real moatd.

Seed 000: with N interfaces there are N! paths and most must be refused.
Every ordered pair of zones (wild, office, kids, and the tunnel's zone vpn as
a destination), and each zone to the router itself, gets a packet; only the
paths the policy allows may pass, each refused one is dropped or rejected as
the policy says, and counted.
"""
import os
import sys
import tempfile
import unittest

import yaml
from scapy.all import ICMP, IP, UDP, Ether, Raw, wrpcap, raw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pcap import Moatd, frames, not_arp  # noqa: E402

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
    cfg["eal"] = {"lcores": [0, 1], "memory_mb": 256, "no_huge": True, "file_prefix": "moat-pcap-test",
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


if __name__ == "__main__":
    unittest.main(verbosity=2)
