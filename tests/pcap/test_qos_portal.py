#!/usr/bin/python3
"""The portal's shaping (issue 7): one subtree per moat on the wan port.

Each tunnel's downstream is shaped to its moat's access rate with its own
classes inside; the class rides through ESP (the shaper sees only outer
ESP packets on the wan, yet sends each in its moat's subtree and class).
Rates are read from the wan pcap, as in test_qos.py. A second test loads
10,000 moats on one port.

Buckets of 16 kB (130 ms at 1 Mbit/s) absorb the worker being
descheduled on a loaded 2-core test machine: with one-packet buckets, time
the worker misses is capacity lost (a gap longer than a packet's time
cannot be made up), and the test would measure the machine, not the shares.
"""
import os
import sys
import tempfile
import time
import unittest

from scapy.all import IP, UDP, Ether, Raw, wrpcap
from scapy.layers.ipsec import ESP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pcap import HOST, R_LAN, Moatd, frames, not_arp, two_port_config  # noqa: E402
from test_qos import interleave, wait_drained  # noqa: E402

LINK = 2_000_000
SIZE = 900  # inner IP bytes


def key(i):
    return "0x" + bytes((i * 7 + j) & 0xff for j in range(20)).hex()


def portal_config(n, tunnel_extra=None, with_sa=True, classes=True, link=LINK):
    tunnels, routes = [], []
    for i in range(n):
        t = f"    - {{name: m{i}, local: 192.0.2.2, peer: 203.0.113.{i % 250 + 1}"
        if with_sa:
            t += f", sa: {{cipher: aes-gcm-128, out: {{spi: {0x1000 + i}, key: '{key(i)}'}}, in: {{spi: {0x9000 + i}, key: '{key(i + 1)}'}}}}"
        if tunnel_extra and i in tunnel_extra:
            t += ", " + tunnel_extra[i]
        tunnels.append(t + "}")
        routes.append(f"  - {{prefix: 10.{100 + i // 256}.{i % 256}.0/24, tunnel: m{i}}}")
    inner = """        classes:
          - {name: voice, rate: 100kbit, ceil: 500kbit, prio: 0, queue: 2000, burst: 16kb, cburst: 16kb}
          - {name: bulk, rate: 400kbit, ceil: 500kbit, prio: 1, queue: 2000, burst: 16kb, cburst: 16kb}
        default: bulk""" if classes else ""
    cfg = two_port_config(extra_routes="\n".join(routes), wan_mtu=1500)
    return cfg + f"""
tunnels:
{chr(10).join(tunnels)}
qos:
  classes: [voice]
  rules:
    - {{name: voice, proto: udp, dport: 5004, class: voice}}
  shaping:
    - port: wan
      rate: {link}bit
      burst: 16kb
      moats:
        rate: 500kbit
        ceil: 500kbit
        burst: 16kb
        cburst: 16kb
{inner}
"""


def to_moat(i, kind, n):
    eth = Ether(src=HOST, dst=R_LAN)
    ip = IP(src="10.1.0.2", dst=f"10.{100 + i // 256}.{i % 256}.9", id=n & 0xffff)
    port = 5004 if kind == "voice" else 6000
    return eth / ip / UDP(sport=port, dport=port) / Raw(b"m" * (SIZE - 28))


class PortalShaping(unittest.TestCase):
    def test_each_moat_gets_its_access_rate_and_its_classes_inside(self):
        # m0: bulk only, at its 500k; m1: voice and bulk, 100k + 400k inside
        # its 500k; m2: its own rate of 1 Mbit/s (tunnel override): 1 Mbit/s.
        n = 600
        ins = interleave([to_moat(0, "bulk", k) for k in range(n)],
                         [to_moat(1, "voice", k) for k in range(n)], [to_moat(1, "bulk", k) for k in range(n)],
                         [to_moat(2, "bulk", k) for k in range(2 * n)])
        with tempfile.TemporaryDirectory(prefix="moat-qos-portal-") as tmp:
            wrpcap(os.path.join(tmp, "in_lan.pcap"), ins, linktype=1)
            wrpcap(os.path.join(tmp, "in_wan.pcap"), [], linktype=1)
            with Moatd(tmp, portal_config(3, {2: "rate: 1mbit, ceil: 1mbit"})) as m:
                m.wait_rx(len(ins), settle=0)
                wait_drained(m, timeout=45)
                drops = m.drops()
                q = m.ctl("show", "qos", "wan")[0]
            out = [p for p in not_arp(frames(os.path.join(tmp, "out_wan.pcap"))) if ESP in p]
        self.assertEqual(len(out), len(ins), drops)
        by = {c["name"]: c for c in q["classes"]}
        # Every ESP packet went through its moat's subtree and class.
        self.assertEqual(by["m0/bulk"]["sent_pkts"], n)
        self.assertEqual(by["m1/voice"]["sent_pkts"], n)
        self.assertEqual(by["m1/bulk"]["sent_pkts"], n)
        self.assertEqual(by["m2/bulk"]["sent_pkts"], 2 * n)
        self.assertEqual(by["m0/voice"]["sent_pkts"], 0)
        # Rates while all were sending (to the first moat that ran out).
        spi_of = {0x1000: "m0", 0x1001: "m1", 0x1002: "m2"}
        t0 = float(out[0].time)
        last = {}
        for p in out:
            last[spi_of[p[ESP].spi]] = float(p.time)
        t1 = min(last.values())
        t0 += 1.0  # the full buckets' first burst (16 kB each) is over by then
        rate = {k: 0.0 for k in spi_of.values()}
        for p in out:
            if t0 <= float(p.time) < t1:
                rate[spi_of[p[ESP].spi]] += len(p) * 8 / (t1 - t0)
        self.assertAlmostEqual(rate["m0"] / 500_000, 1.0, delta=0.06, msg=rate)
        self.assertAlmostEqual(rate["m1"] / 500_000, 1.0, delta=0.06, msg=rate)
        self.assertAlmostEqual(rate["m2"] / 1_000_000, 1.0, delta=0.06, msg=rate)

    def test_ten_thousand_moats_on_one_port(self):
        # The portal's scale: 10,000 subtrees of 3 classes; moatd starts and
        # shows them, and a moat's traffic still leaves in its own subtree.
        n = 10000
        with tempfile.TemporaryDirectory(prefix="moat-qos-portal-") as tmp:
            ins = [to_moat(n - 1, "voice", k) for k in range(10)]
            wrpcap(os.path.join(tmp, "in_lan.pcap"), ins, linktype=1)
            wrpcap(os.path.join(tmp, "in_wan.pcap"), [], linktype=1)
            cfg = portal_config(n, with_sa=False, link=10_000_000_000).replace("memory_mb: 256", "memory_mb: 1024")
            with Moatd(tmp, cfg) as m:
                m.wait_rx(len(ins))
                q = m.ctl("show", "qos", "wan")[0]
                drops = m.drops()
        by = {c["name"]: c for c in q["classes"]}
        self.assertEqual(len(q["classes"]), 1 + 3 * n)
        self.assertIn(f"m{n - 1}/voice", by)
        # No SA: the tunnel is down and the packets are counted, never sent in clear.
        self.assertEqual(drops.get("tunnel_down", 0), len(ins))


if __name__ == "__main__":
    unittest.main(verbosity=2)
