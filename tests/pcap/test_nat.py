#!/usr/bin/python3
"""Stateful firewall and NAPT44 with the real moatd on net_pcap vdevs.

The policy is the seeds' (configs/moat.yaml): zones wild/kids/office, filter
default drop, kids -> wild masqueraded, plus a port forward. What comes out
is compared with packets scapy builds from scratch (checksums included), and
drops with the counters moatctl shows.

Ordering: with `workers.burst: 1` the one worker takes one packet from each
port in turn (ports in config order), so the first port's packet i is
handled before the second port's packet i: a reply placed at index i in the
second port's pcap comes after the packet that opened its connection.
"""
import os
import sys
import tempfile
import unittest

from scapy.all import ICMP, IP, TCP, UDP, Ether, Raw, raw, wrpcap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pcap import Moatd, frames, not_arp  # noqa: E402

R_KIDS = "02:00:00:00:03:01"
R_WAN = "02:00:00:00:02:01"
R_OFFICE = "02:00:00:00:01:01"
KID = "02:00:00:00:03:0a"
KID2 = "02:00:00:00:03:0b"
GW = "02:00:00:00:02:02"
OFFICE_HOST = "02:00:00:00:01:02"

WAN_ADDR = "192.0.2.2"


def port_yaml(name):
    mac = {"kids": R_KIDS, "wan": R_WAN, "office": R_OFFICE}[name]
    addr = {"kids": "192.168.7.1/24", "wan": "192.0.2.2/24", "office": "10.1.0.1/24"}[name]
    return f"""  - name: {name}
    device: net_pcap_{name},rx_pcap=@TMP@/in_{name}.pcap,tx_pcap=@TMP@/out_{name}.pcap
    address: {addr}
    mac: "{mac}"
"""


def moat_config(order=("kids", "wan", "office"), max_connections=65536):
    ports = "".join(port_yaml(p) for p in order)
    return f"""eal:
  lcores: [0, 1]
  memory_mb: 256
  no_huge: true
  file_prefix: moat-nat-test-{os.getpid()}
  log_level: "*:error"
ports:
{ports}
routes:
  - {{prefix: 0.0.0.0/0, via: 192.0.2.1}}
neighbors:
  - {{ip: 192.168.7.10, mac: "{KID}", port: kids}}
  - {{ip: 192.168.7.11, mac: "{KID2}", port: kids}}
  - {{ip: 192.0.2.1, mac: "{GW}", port: wan}}
  - {{ip: 10.1.0.2, mac: "{OFFICE_HOST}", port: office}}
workers:
  burst: 1
punt:
  enabled: false
icmp:
  rate_pps: 1000
  burst: 1000
conntrack:
  max_connections: {max_connections}
control:
  socket: "@SOCK@"
zones:
  wild: [wan]
  office: [office]
  kids: [kids]
filter:
  default: drop
  stateful: true
  rules:
    - {{name: spoof, from: wild, src: [10.0.0.0/8, 192.168.7.0/24], action: drop}}
    - {{name: kids-out, from: kids, to: wild, action: accept}}
    - {{name: web-in, from: wild, to: kids, proto: tcp, dport: 80, action: accept}}
    - {{name: inside-refused, from: [office, kids], action: reject}}
nat:
  default: none
  rules:
    - {{name: kids-masq, from: kids, to: wild, action: masquerade}}
    - {{name: web-fwd, from: wild, dst: 192.0.2.2, proto: tcp, dport: 8080, action: dnat, to_addr: 192.168.7.10, to_port: 80}}
"""


def rebuilt(p):
    """The frame with every checksum recomputed by scapy from scratch."""
    q = Ether(raw(p))
    for layer in (IP, TCP, UDP, ICMP):
        if layer in q:
            del q[layer].chksum
    return Ether(raw(q))


class NatPcap(unittest.TestCase):
    def setUp(self):
        self.tmpdir = tempfile.TemporaryDirectory(prefix="moat-nat-")
        self.tmp = self.tmpdir.name

    def tearDown(self):
        self.tmpdir.cleanup()

    def run_moatd(self, inputs, config, ctl=()):
        """inputs: {port: [frames]}; returns ({port: out frames}, drops, ctl results)."""
        for name in ("kids", "wan", "office"):
            wrpcap(os.path.join(self.tmp, f"in_{name}.pcap"), inputs.get(name, []), linktype=1)
        total = sum(len(v) for v in inputs.values())
        with Moatd(self.tmp, config) as m:
            m.wait_rx(total)
            drops = m.drops()
            results = [m.ctl(*c) for c in ctl]
        outs = {n: not_arp(frames(os.path.join(self.tmp, f"out_{n}.pcap"))) for n in ("kids", "wan", "office")}
        return outs, drops, results

    def assertSamePackets(self, got, want, what):
        g = [raw(p) for p in got]
        w = [raw(p) for p in want]
        if g != w:
            msg = [f"{what}: {len(got)} packets out, {len(want)} expected"]
            msg += ["got:  " + p.summary() + " " + raw(p).hex() for p in got]
            msg += ["want: " + p.summary() + " " + raw(p).hex() for p in want]
            self.fail("\n".join(msg))

    def test_masquerade_round_trip_and_unsolicited_inbound(self):
        k = Ether(src=KID, dst=R_KIDS)
        g = Ether(src=GW, dst=R_WAN)
        kid_udp = IP(src="192.168.7.10", dst="8.8.8.8", id=1) / UDP(sport=5555, dport=53) / Raw(b"query")
        kid_ping = IP(src="192.168.7.10", dst="8.8.8.8", id=2) / ICMP(type=8, id=0x4242, seq=1) / Raw(b"ping" * 4)
        kid_syn = IP(src="192.168.7.10", dst="93.184.216.34", id=3) / TCP(sport=40000, dport=80, flags="S", seq=100)
        kid_nocsum = IP(src="192.168.7.10", dst="8.8.4.4", id=4) / UDP(sport=6000, dport=53, chksum=0) / Raw(b"nocsum")
        udp_reply = IP(src="8.8.8.8", dst=WAN_ADDR, id=11) / UDP(sport=53, dport=5555) / Raw(b"answer")
        ping_reply = IP(src="8.8.8.8", dst=WAN_ADDR, id=12) / ICMP(type=0, id=0x4242, seq=1) / Raw(b"ping" * 4)
        syn_ack = IP(src="93.184.216.34", dst=WAN_ADDR, id=13) / TCP(sport=80, dport=40000, flags="SA", seq=900, ack=101)
        # Unsolicited: to the masquerading address on a port nobody opened,
        # and straight at an inside host.
        stray = IP(src="8.8.8.8", dst=WAN_ADDR, id=14) / UDP(sport=53, dport=5556) / Raw(b"stray")
        direct = IP(src="8.8.8.8", dst="192.168.7.10", id=15) / UDP(sport=53, dport=5555) / Raw(b"direct")
        kids_in = [k / p for p in (kid_udp, kid_ping, kid_syn, kid_nocsum)]
        wan_in = [g / p for p in (udp_reply, ping_reply, syn_ack, stray, direct)]
        outs, drops, (ct,) = self.run_moatd({"kids": kids_in, "wan": wan_in}, moat_config(),
                                            ctl=[("show", "conntrack")])

        def masq(p):
            q = IP(raw(p))
            q.src = WAN_ADDR
            q.ttl -= 1
            return rebuilt(Ether(src=R_WAN, dst=GW) / q)

        def demasq(p):
            q = IP(raw(p))
            q.dst = "192.168.7.10"
            q.ttl -= 1
            return rebuilt(Ether(src=R_KIDS, dst=KID) / q)

        want_wan = [masq(p) for p in (kid_udp, kid_ping, kid_syn)]
        nocsum = IP(raw(kid_nocsum))
        nocsum.src = WAN_ADDR
        nocsum.ttl -= 1
        del nocsum.chksum  # the IP header's; UDP's stays 0 ("none")
        want_wan.append(Ether(src=R_WAN, dst=GW) / IP(raw(nocsum)))
        self.assertSamePackets(outs["wan"], want_wan, "wan: masqueraded, ports and id kept")
        self.assertSamePackets(outs["kids"], [demasq(p) for p in (udp_reply, ping_reply, syn_ack)],
                               "kids: replies de-masqueraded")
        self.assertEqual(drops.get("filter_drop"), 2, drops)
        self.assertEqual(ct["in_use"], 4)
        self.assertEqual(sorted(c["nat"] for c in ct["connections"]), ["src"] * 4)
        states = sorted(c["state"] for c in ct["connections"])
        self.assertEqual(states, ["icmp", "syn_recv", "udp", "udp_stream"])

    def test_dnat_port_forward(self):
        g = Ether(src=GW, dst=R_WAN)
        k = Ether(src=KID, dst=R_KIDS)
        syn = IP(src="203.0.113.5", dst=WAN_ADDR, id=1) / TCP(sport=40000, dport=8080, flags="S", seq=7)
        syn_ack = IP(src="192.168.7.10", dst="203.0.113.5", id=2) / TCP(sport=80, dport=40000, flags="SA", seq=70, ack=8)
        other = IP(src="203.0.113.5", dst=WAN_ADDR, id=3) / TCP(sport=40001, dport=8081, flags="S", seq=7)
        # wan first: the SYN opens the forward before the server answers.
        outs, drops, _ = self.run_moatd({"wan": [g / syn, g / other], "kids": [k / syn_ack]},
                                        moat_config(order=("wan", "kids", "office")))
        fwd = IP(raw(syn))
        fwd.dst = "192.168.7.10"
        fwd[TCP].dport = 80
        fwd.ttl -= 1
        back = IP(raw(syn_ack))
        back.src = WAN_ADDR
        back[TCP].sport = 8080
        back.ttl -= 1
        self.assertSamePackets(outs["kids"], [rebuilt(Ether(src=R_KIDS, dst=KID) / fwd)], "kids: forwarded")
        self.assertSamePackets(outs["wan"], [rebuilt(Ether(src=R_WAN, dst=GW) / back)], "wan: answer from 8080")
        self.assertEqual(drops.get("filter_drop"), 1, drops)  # 8081 is not forwarded

    def test_icmp_error_about_masqueraded_flow(self):
        k = Ether(src=KID, dst=R_KIDS)
        g = Ether(src=GW, dst=R_WAN)
        kid_udp = IP(src="192.168.7.10", dst="198.51.100.9", id=5, ttl=64) / UDP(sport=33434, dport=33435) / Raw(b"t" * 12)
        left = IP(raw(kid_udp))
        left.src = WAN_ADDR
        left.ttl = 63
        del left.chksum
        del left[UDP].chksum
        left = IP(raw(left))
        err = IP(src="203.0.113.1", dst=WAN_ADDR, id=9) / ICMP(type=11, code=0) / raw(left)[:28]
        outs, drops, _ = self.run_moatd({"kids": [k / kid_udp], "wan": [g / err]}, moat_config())
        # What the kid gets: the error to itself, quoting its own packet (as
        # the router saw it: TTL 63), checksums right.
        quote = IP(raw(kid_udp))
        quote.ttl = 63
        del quote.chksum
        want = IP(src="203.0.113.1", dst="192.168.7.10", id=9, ttl=63) / ICMP(type=11, code=0) / raw(IP(raw(quote)))[:28]
        self.assertSamePackets(outs["kids"], [Ether(src=R_KIDS, dst=KID) / IP(raw(want))], "kids: translated error")
        self.assertEqual(drops, {}, drops)

    def test_reject_answers_tcp_with_reset(self):
        k = Ether(src=KID, dst=R_KIDS)
        syn = IP(src="192.168.7.10", dst="10.1.0.2", id=1) / TCP(sport=41000, dport=22, flags="S", seq=555)
        outs, drops, _ = self.run_moatd({"kids": [k / syn]}, moat_config())
        rst = IP(src="10.1.0.2", dst="192.168.7.10", ttl=64, id=0, flags=0) / TCP(sport=22, dport=41000, flags="RA", seq=0, ack=556, window=0)
        self.assertSamePackets(outs["kids"], [Ether(src=R_KIDS, dst=KID) / IP(raw(rst))], "kids: RST")
        self.assertEqual(outs["office"], [])
        self.assertEqual(drops.get("filter_reject"), 1, drops)

    def test_flood_from_one_source_leaves_established_flow_alone(self):
        k = Ether(src=KID, dst=R_KIDS)
        g = Ether(src=GW, dst=R_WAN)
        srv = "93.184.216.34"
        syn = IP(src="192.168.7.10", dst=srv, id=1) / TCP(sport=40000, dport=443, flags="S", seq=100)
        synack = IP(src=srv, dst=WAN_ADDR, id=2) / TCP(sport=443, dport=40000, flags="SA", seq=900, ack=101)
        ack = IP(src="192.168.7.10", dst=srv, id=3) / TCP(sport=40000, dport=443, flags="A", seq=101, ack=901)
        flood = [IP(src="192.168.7.11", dst="8.8.8.8", id=100 + i) / UDP(sport=10000 + i, dport=53) / Raw(b"f")
                 for i in range(200)]
        late_out = IP(src="192.168.7.10", dst=srv, id=4) / TCP(sport=40000, dport=443, flags="PA", seq=101, ack=901) / Raw(b"GET /")
        late_in = IP(src=srv, dst=WAN_ADDR, id=5) / TCP(sport=443, dport=40000, flags="PA", seq=901, ack=106) / Raw(b"200 OK")
        # Interleaving (kids first): syn | synack, ack | stray, flood... | stray..., late_out | late_in
        stray = [IP(src="8.8.8.8", dst=WAN_ADDR, id=50 + i) / UDP(sport=53, dport=60000 + i) for i in range(201)]
        kids_in = [k / p for p in [syn, ack] + flood + [late_out]]
        wan_in = [g / p for p in [synack] + stray + [late_in]]
        outs, drops, (ct,) = self.run_moatd({"kids": kids_in, "wan": wan_in}, moat_config(max_connections=64),
                                            ctl=[("show", "conntrack")])
        # 64 entries: the TCP connection and 63 of the flood; the rest refused.
        self.assertEqual(drops.get("ct_full"), 200 - 63, drops)
        self.assertEqual(ct["in_use"], 64)
        self.assertEqual(drops.get("filter_drop"), 201, drops)
        wan_tcp = [p for p in outs["wan"] if TCP in p]
        self.assertEqual([bytes(p[TCP].payload) for p in wan_tcp], [b"", b"", b"GET /"], "established flow out")
        kids_tcp = [p for p in outs["kids"] if TCP in p]
        self.assertEqual([bytes(p[TCP].payload) for p in kids_tcp], [b"", b"200 OK"], "established flow in")
        est = [c for c in ct["connections"] if c["proto"] == 6]
        self.assertEqual(est[0]["state"], "established")


if __name__ == "__main__":
    unittest.main(verbosity=2)
