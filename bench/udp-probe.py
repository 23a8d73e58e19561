#!/usr/bin/env python3
"""A bounded UDP probe stream through a router, for loss in a time window.

bench/ike-restart.sh runs it across moatd while thousands of IKE SAs are set
up, to show the fast path keeps forwarding other traffic meanwhile.

  udp-probe.py recv --bind ADDR:PORT --out FILE --seconds S
  udp-probe.py send --to ADDR:PORT --rate PPS --seconds S --out FILE
  udp-probe.py loss --sent FILE --received FILE [--from T0 --to T1]

Every datagram carries its sequence number. The sender writes "seq
send_time" lines (CLOCK_MONOTONIC seconds, the clock ike-load reports in, one
clock for all namespaces), the receiver the sequence numbers it got; `loss`
counts, for the datagrams sent in [T0, T1), how many never arrived. Both
ends stop after S seconds or on SIGTERM, whichever comes first, and flush.
"""
import argparse
import json
import signal
import socket
import struct
import sys
import time


def endpoint(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


class Stop(Exception):
    pass


def on_term(*_):
    raise Stop()


def recv(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(endpoint(a.bind))
    end = time.monotonic() + a.seconds
    with open(a.out, "w") as f:
        try:
            while time.monotonic() < end:
                s.settimeout(max(0.01, min(0.5, end - time.monotonic())))
                try:
                    d = s.recv(2048)
                except socket.timeout:
                    continue
                if len(d) >= 8:
                    f.write("%d\n" % struct.unpack("!Q", d[:8])[0])
        except Stop:
            pass


def send(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    to = endpoint(a.to)
    period = 1.0 / a.rate
    pad = b"\0" * max(0, a.size - 8)
    start = time.monotonic()
    end = start + a.seconds
    seq = 0
    with open(a.out, "w") as f:
        try:
            while True:
                due = start + seq * period
                now = time.monotonic()
                if due >= end:
                    break
                if due > now:
                    time.sleep(due - now)
                    now = time.monotonic()
                try:
                    s.sendto(struct.pack("!Q", seq) + pad, to)
                except OSError:
                    pass  # no route for a moment is loss too: counted at the receiver
                f.write("%d %.6f\n" % (seq, now))
                seq += 1
        except Stop:
            pass


def loss(a):
    sent = {}
    for line in open(a.sent):
        p = line.split()
        if len(p) == 2:
            sent[int(p[0])] = float(p[1])
    got = set()
    for line in open(a.received):
        if line.strip():
            got.add(int(line))
    t0 = a.from_ if a.from_ is not None else float("-inf")
    t1 = a.to if a.to is not None else float("inf")
    # The last half second's datagrams may still be on their way when the
    # receiver stops: a window never ends later than that.
    last = max(sent.values(), default=0.0) - 0.5
    t1 = min(t1, last)
    window = [q for q, t in sent.items() if t0 <= t < t1]
    lost = [q for q in window if q not in got]
    out = {"sent": len(window), "lost": len(lost),
           "loss": round(len(lost) / len(window), 6) if window else None,
           "from": round(t0, 3) if window else None, "to": round(t1, 3) if window else None}
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--seconds", type=float, required=True)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--rate", type=float, default=1000)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--out", required=True)
    l = sub.add_parser("loss")
    l.add_argument("--sent", required=True)
    l.add_argument("--received", required=True)
    l.add_argument("--from", dest="from_", type=float)
    l.add_argument("--to", type=float)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    {"recv": recv, "send": send, "loss": loss}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
