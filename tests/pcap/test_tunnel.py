#!/usr/bin/python3
"""The moat's tunnel on the real moatd (configs/moat.yaml plus static SAs):
office traffic to the corporation leaves the wan port as ESP that scapy
decrypts; ESP that scapy makes arrives in the office decrypted; a 1500-byte
DF packet crosses a 1400-byte path as two ESP packets (fragment-inner, seed
000) whose inner fragments reassemble to the original; the tunnel's zone
(vpn) reaches the office and nothing else; a replayed or forged packet is a
counted drop; `moatctl show tunnels` shows the per-tunnel counters.
"""
import os
import sys
import tempfile
import unittest

import yaml
from scapy.all import ICMP, IP, UDP, TCP, Ether, Raw, raw, wrpcap, defragment
from scapy.layers.ipsec import ESP, SecurityAssociation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pcap import Moatd, frames, not_arp  # noqa: E402
from test_policy import HOST, MAC, policy_config  # noqa: E402

KEY_OUT = bytes(range(1, 21))   # AES-GCM-128 key + salt, moat → portal
KEY_IN = bytes(range(41, 61))   # portal → moat
SPI_OUT, SPI_IN = 0x1001, 0x2001
MOAT, PORTAL = "192.0.2.2", "198.51.100.2"
OFFICE_HOST, CORP_HOST = HOST["office"][0], "10.9.0.2"


FUNNELS = [{"local": "10.1.0.0/24", "remote": "10.9.0.0/16"}, {"local": "10.1.0.0/24", "remote": "10.10.0.0/16"}]


def tunnel_config(tmp, mtu=1500, funnels=FUNNELS):
    cfg = yaml.safe_load(policy_config(tmp))
    cfg["tunnels"] = [{
        "name": "corp", "zone": "vpn", "local": MOAT, "peer": PORTAL, "mtu": mtu,
        "funnels": funnels,
        "sa": {"cipher": "aes-gcm-128", "out": {"spi": hex(SPI_OUT), "key": "0x" + KEY_OUT.hex()},
               "in": {"spi": hex(SPI_IN), "key": "0x" + KEY_IN.hex()}},
    }]
    return yaml.safe_dump(cfg)


def sa(spi, key, src, dst):
    return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key, tunnel_header=IP(src=src, dst=dst))


class Tunnel(unittest.TestCase):
    def run_moatd(self, ins, mtu=1500, funnels=FUNNELS):
        with tempfile.TemporaryDirectory(prefix="moat-tunnel-") as tmp:
            for port in ("wan", "office", "kids"):
                wrpcap(os.path.join(tmp, f"in_{port}.pcap"), ins.get(port, []), linktype=1)
            with Moatd(tmp, tunnel_config(tmp, mtu, funnels)) as m:
                m.wait_rx(sum(len(v) for v in ins.values()))
                drops = m.drops()
                tunnels = m.ctl("show", "tunnels")
            out = {p: not_arp(frames(os.path.join(tmp, f"out_{p}.pcap"))) for p in ("wan", "office", "kids")}
        return out, drops, tunnels

    def test_both_directions_and_the_tunnel_zone(self):
        office = Ether(src=HOST["office"][1], dst=MAC["office"])
        to_corp = [IP(src=OFFICE_HOST, dst=CORP_HOST, id=10 + i, ttl=64) / UDP(sport=5000, dport=7) / Raw(b"c%d" % i * 20)
                   for i in range(3)]
        # From the portal: inner packets to the office (allowed) and to the
        # kids' LAN (the tunnel reaches only the office), then a replay of the
        # first and one with a flipped ciphertext bit.
        portal = sa(SPI_IN, KEY_IN, PORTAL, MOAT)
        to_office = IP(src=CORP_HOST, dst=OFFICE_HOST, id=20, ttl=64) / UDP(sport=7, dport=5000) / Raw(b"back" * 10)
        to_kids = IP(src=CORP_HOST, dst=HOST["kids"][0], id=21, ttl=64) / UDP(sport=7, dport=5000) / Raw(b"nope")
        e1 = portal.encrypt(to_office)
        e2 = portal.encrypt(to_kids)
        forged = bytearray(raw(portal.encrypt(to_office)))
        forged[40] ^= 1
        wan = Ether(src=HOST["wan"][1], dst=MAC["wan"])
        ins = {"office": [office / p for p in to_corp],
               "wan": [wan / e1, wan / e2, wan / e1, wan / IP(bytes(forged))]}
        out, drops, tunnels = self.run_moatd(ins)

        # Outbound: ESP from the moat to the portal, decryptable, inner intact
        # (TTL − 1: the moat routed it), sequence numbers 1, 2, 3.
        esp = [p for p in out["wan"] if ESP in p]
        self.assertEqual(len(esp), 3, [p.summary() for p in out["wan"]])
        self.assertEqual(len(out["wan"]), 3, "nothing for the corporation leaves in clear")
        rx = sa(SPI_OUT, KEY_OUT, MOAT, PORTAL)
        for i, p in enumerate(esp):
            self.assertEqual((p[IP].src, p[IP].dst), (MOAT, PORTAL))
            self.assertEqual(p[ESP].spi, SPI_OUT)
            self.assertEqual(p[ESP].seq, i + 1)
            inner = rx.decrypt(p[IP])
            want = IP(raw(to_corp[i]))
            want.ttl = 63
            del want.chksum
            self.assertEqual(raw(inner), raw(IP(raw(want))))
        # Inbound: the office gets the decrypted packet; kids get nothing.
        got = [p for p in out["office"] if UDP in p]
        self.assertEqual(len(got), 1, [p.summary() for p in out["office"]])
        self.assertEqual(bytes(got[0][UDP].payload), b"back" * 10)
        self.assertEqual(got[0][IP].ttl, 63)
        self.assertEqual(out["kids"], [])
        self.assertEqual(drops.get("esp_replayed", 0), 1, drops)
        self.assertEqual(drops.get("esp_bad_icv", 0), 1, drops)
        # vpn → kids: outside the SA's funnels, so refused before the filter.
        self.assertEqual(drops.get("esp_selector_mismatch", 0), 1, drops)
        t = tunnels[0]
        self.assertEqual((t["tunnel"], t["state"], t["packets_out"], t["packets_in"]), ("corp", "up", 3, 1))  # the one outside the funnels is not counted in

    def test_the_tunnel_zone_reaches_only_the_office(self):
        # With funnels wide enough to let anything out of the tunnel, the
        # filter is what keeps the tunnel's zone (vpn) out of the kids' LAN,
        # the wild side and the router's services (seed 000's N! paths).
        portal = sa(SPI_IN, KEY_IN, PORTAL, MOAT)
        wan = Ether(src=HOST["wan"][1], dst=MAC["wan"])
        dsts = {"office": OFFICE_HOST, "kids": HOST["kids"][0], "wild": "203.0.113.5", "local-svc": "10.1.0.1"}
        inner = {z: IP(src=CORP_HOST, dst=d, id=30 + i, ttl=64) / UDP(sport=7, dport=9999) / Raw(b"z")
                 for i, (z, d) in enumerate(sorted(dsts.items()))}
        ins = {"wan": [wan / portal.encrypt(p) for p in inner.values()]}
        out, drops, _ = self.run_moatd(ins, funnels=[{"local": "0.0.0.0/0", "remote": "10.9.0.0/16"}])
        self.assertEqual([p[IP].id for p in out["office"] if UDP in p], [inner["office"].id])
        self.assertEqual(out["kids"], [])
        self.assertEqual([p for p in out["wan"] if UDP in p and p[UDP].dport == 9999], [])
        self.assertEqual(drops.get("filter_drop", 0), 3, drops)
        self.assertEqual(drops.get("esp_selector_mismatch", 0), 0, drops)

    def test_fragment_inner_gives_a_large_virtual_mtu(self):
        # A 1500-byte packet with DF, as TCP clients send, over a 1400-byte
        # path: plain forwarding would answer "fragmentation needed"; the
        # tunnel fragments the inner packet and the portal reassembles it.
        office = Ether(src=HOST["office"][1], dst=MAC["office"])
        big = IP(src=OFFICE_HOST, dst=CORP_HOST, id=77, ttl=64, flags="DF") / UDP(sport=40000, dport=80) / Raw(bytes(range(256)) * 5 + b"z" * 192)
        self.assertEqual(len(big), 1500)
        out, drops, _ = self.run_moatd({"office": [office / big]}, mtu=1400)
        esp = [p for p in out["wan"] if ESP in p]
        self.assertEqual(len(esp), 2, [p.summary() for p in out["wan"]])
        rx = sa(SPI_OUT, KEY_OUT, MOAT, PORTAL)
        inner = []
        for p in esp:
            self.assertLessEqual(len(p[IP]), 1400)
            inner.append(rx.decrypt(p[IP]))
        whole = defragment(inner)
        self.assertEqual(len(whole), 1)
        self.assertEqual(bytes(whole[0][UDP].payload), bytes(big[UDP].payload))
        self.assertEqual(drops.get("frag_needed", 0), 0)
        self.assertEqual([p for p in out["office"] if ICMP in p], [], "no ICMP frag-needed to the sender")


if __name__ == "__main__":
    unittest.main(verbosity=2)
