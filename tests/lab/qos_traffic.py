#!/usr/bin/python3
"""Seed 003's offered load and its measurement (tests/lab/test_lab_qos.sh).

  qos_traffic.py recv --addr A --iface IF --seconds S --out FILE
      in the receiver's namespace: sinks for audio (UDP 5004) and video
      (UDP 6000), a TCP sink for web (8080), a TCP echo for camera control
      (8554), and a packet socket on IF that records every IPv4 packet to A
      (time, IP length, class): the rates are measured on the wire, the
      same way for every class and for both shapers. Ends after S seconds.
  qos_traffic.py send --to A --out FILE [--phase1 S] [--phase2 S]
                      [--audio-len L] [--video-len L] [--camera-len L]
                      [--snapshot CMD]
      in the sender's namespace: camera control alone for 2 s (its base
      RTT), then phase 1 (audio CBR 25 pps, camera, web bulk, video greedy at
      400 kbit/s), then phase 2 (the same without audio). CMD (a shell
      command, e.g. moatctl --json show qos wan) runs at the start and end of
      each measuring window; its output goes into FILE.
  qos_traffic.py report --moat SEND RECV --linux SEND RECV --link BPS
      the per-class rates of both runs, the expectations of the class tree,
      the table, and the asserts (exit 1 on a failed one).

Every loop is bounded in time; sockets have timeouts.
"""
import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

PORTS = {("udp", 5004): "audio", ("tcp", 8554): "camera", ("tcp", 8080): "web", ("udp", 6000): "video"}
CLASSES = ["audio", "camera", "web", "video"]
AUDIO_PPS = 25            # 40 ms packetization
VIDEO_BPS = 400_000       # offered: about three times the link
CAMERA_PERIOD = 0.25      # one request every 250 ms
WARM1, WARM2 = 5.0, 4.0   # seconds left out at the start of each phase (TCP, queues settle)


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python does not name it


def guarded(errors, f):
    """A thread body whose exception is recorded (and fails the report)."""
    def run(*args):
        try:
            f(*args)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{f.__name__}: {type(e).__name__}: {e}")
    return run


def stamped(s):
    """Kernel receive timestamps (SO_TIMESTAMPNS): a stall of this Python
    process on the busy lab machine does not shift the times measured."""
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def recv_stamped(s, size):
    """(data, kernel receive time, address) of one recvmsg."""
    d, anc, _flags, addr = s.recvmsg(size, 64)
    t = None
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, ns = struct.unpack("qq", data[:16])
            t = sec + ns / 1e9
    return d, (t if t is not None else time.time()), addr


# ------------------------------------------------------------------ recv ---
def recv(a):
    stop = time.time() + a.seconds
    audio_seen = {}
    lock = threading.Lock()

    def udp_sink(port, record):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((a.addr, port))
        s.settimeout(0.2)
        stamped(s)
        while time.time() < stop:
            try:
                d, t, _ = recv_stamped(s, 4096)
            except socket.timeout:
                continue
            if record and len(d) >= 12:
                seq, sent = struct.unpack("!Id", d[:12])
                with lock:
                    audio_seen[seq] = t - sent

    def tcp_server(port, echo):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((a.addr, port))
        ls.listen(4)
        ls.settimeout(0.2)
        while time.time() < stop:
            try:
                c, _ = ls.accept()
            except socket.timeout:
                continue
            threading.Thread(target=tcp_conn, args=(c, echo), daemon=True).start()

    def tcp_conn(c, echo):
        c.settimeout(0.2)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.time() < stop:
            try:
                d = c.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not d:
                break
            if echo:
                try:
                    c.sendall(d)
                except OSError:
                    break
        c.close()

    pkts = []

    def sniff():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        s.bind((a.iface, 0))
        s.settimeout(0.2)
        stamped(s)
        dst = socket.inet_aton(a.addr)
        while time.time() < stop:
            try:
                d, t, addr = recv_stamped(s, 256)
            except socket.timeout:
                continue
            if addr[2] == socket.PACKET_OUTGOING or len(d) < 38 or d[30:34] != dst:
                continue
            ip = d[14:]
            ihl = (ip[0] & 0x0f) * 4
            length = struct.unpack("!H", ip[2:4])[0]
            proto = {6: "tcp", 17: "udp"}.get(ip[9])
            dport = struct.unpack("!H", ip[ihl + 2:ihl + 4])[0] if proto and len(ip) >= ihl + 4 else 0
            pkts.append((t, length, PORTS.get((proto, dport), "other")))

    errors = []
    threads = [threading.Thread(target=guarded(errors, sniff), daemon=True),
               threading.Thread(target=guarded(errors, udp_sink), args=(5004, True), daemon=True),
               threading.Thread(target=guarded(errors, udp_sink), args=(6000, False), daemon=True),
               threading.Thread(target=guarded(errors, tcp_server), args=(8554, True), daemon=True),
               threading.Thread(target=guarded(errors, tcp_server), args=(8080, False), daemon=True)]
    for t in threads:
        t.start()
    open(a.out + ".ready", "w").close()
    for t in threads:
        t.join(timeout=max(0.1, stop - time.time() + 2))
    with lock:
        json.dump({"packets": pkts, "audio": {str(k): v for k, v in audio_seen.items()}, "errors": errors},
                  open(a.out, "w"))


# ------------------------------------------------------------------ send ---
def send(a):
    out = {"snapshots": {}}
    tb = time.time()
    t0 = tb + 2.0
    t1 = t0 + a.phase1
    t2 = t1 + a.phase2
    out.update(tb=tb, t0=t0, t1=t1, t2=t2, w1=[t0 + WARM1, t1], w2=[t1 + WARM2, t2])
    errors = []

    def sleep_until(t):
        d = t - time.time()
        if d > 0:
            time.sleep(d)

    def audio():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        pad = b"a" * (a.audio_len - 28 - 12)
        sleep_until(t0)
        seq = 0
        while True:
            when = t0 + seq / AUDIO_PPS
            if when >= t1:
                break
            sleep_until(when)
            s.sendto(struct.pack("!Id", seq, time.time()) + pad, (a.to, 5004))
            seq += 1
        out["audio_sent"] = seq

    def video():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        pay = b"v" * (a.video_len - 28)
        gap = a.video_len * 8 / VIDEO_BPS
        sleep_until(t0)
        n = 0
        while True:
            when = t0 + n * gap
            if when >= t2:
                break
            sleep_until(when)
            try:
                s.sendto(pay, (a.to, 6000))
            except OSError:
                pass
            n += 1
        out["video_sent"] = n

    def web():
        sleep_until(t0)
        try:
            s = socket.create_connection((a.to, 8080), timeout=5)
            s.settimeout(0.5)
            chunk = b"w" * 16384
            while time.time() < t2:
                try:
                    s.send(chunk)
                except socket.timeout:
                    pass
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        except OSError as e:
            errors.append(f"web: {e}")

    def camera():
        rtts = []
        try:
            s = socket.create_connection((a.to, 8554), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(3.0)
            stamped(s)
            msg = b"c" * a.camera_len
            k = 0
            while True:
                when = tb + k * CAMERA_PERIOD
                if when >= t2:
                    break
                sleep_until(when)
                t = time.time()
                s.sendall(msg)
                got = 0
                while got < len(msg):
                    d, t_in, _ = recv_stamped(s, len(msg) - got)
                    if not d:
                        raise OSError("camera: connection closed")
                    got += len(d)
                rtts.append((t, t_in - t))
                k += 1
            s.close()
        except OSError as e:
            errors.append(f"camera: {e}")
        out["camera"] = rtts

    def snapshots():
        for name, t in (("w1_start", t0 + WARM1), ("w1_end", t1), ("w2_start", t1 + WARM2), ("w2_end", t2)):
            sleep_until(t)
            if a.snapshot:
                r = subprocess.run(a.snapshot, shell=True, capture_output=True, text=True, timeout=5)
                out["snapshots"][name] = {"t": time.time(), "out": r.stdout, "err": r.stderr}

    threads = [threading.Thread(target=guarded(errors, f), daemon=True) for f in (audio, video, web, camera, snapshots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.1, t2 - time.time() + 8))
    out["errors"] = errors
    json.dump(out, open(a.out, "w"))


# ---------------------------------------------------------------- report ---
def esp_frame(ip_len):
    """The outer frame of an inner IPv4 packet in the lab's AES-GCM tunnel
    (configs/lab-qos.yaml): ceil4(L + 2) + 66."""
    return ((ip_len + 2 + 3) & ~3) + 66


def plain_frame(ip_len):
    return ip_len + 14


TREE = {  # configs/lab-qos.yaml (bit/s); the Linux run builds the same tree
    "audio": dict(parent=None, rate=80_000, ceil=128_000, prio=1),
    "camera": dict(parent=None, rate=12_000, ceil=128_000, prio=0),
    "data": dict(parent=None, rate=36_000, ceil=128_000, prio=None),
    "web": dict(parent="data", rate=24_000, ceil=32_000, prio=2),
    "video": dict(parent="data", rate=12_000, ceil=128_000, prio=3),
}


def htb_fluid(link, demand):
    """What HTB promises, as a fluid: every leaf gets min(demand, rate); the
    link's spare goes to the leaves in priority order, each up to its ceiling
    and its ancestors' ceilings (one class per priority here)."""
    got = {c: min(demand[c], TREE[c]["rate"]) for c in CLASSES}
    spare = link - sum(got.values())
    for c in sorted(CLASSES, key=lambda c: TREE[c]["prio"]):
        cap = TREE[c]["ceil"]
        p = TREE[c]["parent"]
        room = min(cap - got[c], demand[c] - got[c])
        if p:
            kids = [k for k in CLASSES if TREE[k]["parent"] == p]
            room = min(room, TREE[p]["ceil"] - sum(got[k] for k in kids))
        take = max(0.0, min(room, spare))
        got[c] += take
        spare -= take
    return got


def rates(recv, window, frame):
    t0, t1 = window
    b = {c: 0 for c in CLASSES + ["other"]}
    for t, length, cls in recv["packets"]:
        if t0 <= t < t1:
            b[cls] += frame(length)
    return {c: v * 8 / (t1 - t0) for c, v in b.items()}


def report(a):
    link = a.link
    tol = 0.05 * link  # ±5 % of the link: 6.4 kbit/s, five 1514-byte frames in a 10-s window
    fails = []
    runs = {}
    for name, (sf, rf), frame in (("moat", a.moat, esp_frame), ("linux", a.linux, plain_frame)):
        s, r = json.load(open(sf)), json.load(open(rf))
        if s.get("errors") or r.get("errors"):
            fails.append(f"{name}: traffic errors: {s.get('errors')} {r.get('errors')}")
        p1, p2 = rates(r, s["w1"], frame), rates(r, s["w2"], frame)
        sent = s.get("audio_sent", 0)
        # Audio sent in phase 1 that arrived (late packets count: the
        # receiver ran on after the senders stopped).
        got = len(r["audio"])
        delays = sorted(r["audio"].values())
        cam = s.get("camera", [])
        base = [x for t, x in cam if t < s["t0"]]
        loaded = [x for t, x in cam if s["w1"][0] <= t < s["w1"][1]]
        runs[name] = dict(p1=p1, p2=p2, sent=sent, got=got, s=s,
                          audio_delay=(statistics.median(delays) if delays else float("nan"),
                                       delays[-1] if delays else float("nan")),
                          cam_base=statistics.median(base) if base else float("nan"),
                          cam_med=statistics.median(loaded) if loaded else float("nan"),
                          cam_p90=sorted(loaded)[int(0.9 * len(loaded))] if loaded else float("nan"),
                          cam_n=len(loaded))
        # The tree's expectation given what audio and camera actually offered
        # (web and video are greedy).
        exp1 = htb_fluid(link, {"audio": p1["audio"], "camera": p1["camera"], "web": 1e12, "video": 1e12})
        exp2 = htb_fluid(link, {"audio": 0, "camera": p2["camera"], "web": 1e12, "video": 1e12})
        runs[name].update(exp1=exp1, exp2=exp2)

    m, lx = runs["moat"], runs["linux"]
    k = lambda v: f"{v / 1000:6.1f}"  # noqa: E731
    lines = [f"link {link / 1000:.0f} kbit/s; kbit/s of frames on the shaped link (Moat: ESP frames; Linux: "
             f"cleartext frames of the same sizes); expected = the tree (HTB as a fluid) given audio's and "
             f"camera's measured load",
             "",
             "| phase | class | Moat | expected (Moat) | Linux HTB | expected (Linux) | Moat − HTB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for ph, label in (("p1", "1: all"), ("p2", "2: no audio")):
        e = "exp1" if ph == "p1" else "exp2"
        for c in CLASSES:
            lines.append(f"| {label} | {c} | {k(m[ph][c])} | {k(m[e][c])} | {k(lx[ph][c])} | {k(lx[e][c])} | "
                         f"{k(m[ph][c] - lx[ph][c])} |")
        lines.append(f"| {label} | total | {k(sum(m[ph][c] for c in CLASSES))} | | "
                     f"{k(sum(lx[ph][c] for c in CLASSES))} | | |")
    lines.append("")
    for name, r in runs.items():
        lines.append(f"{name}: audio {r['got']}/{r['sent']} packets arrived "
                     f"({100 * r['got'] / max(1, r['sent']):.1f} %), one-way delay median "
                     f"{1000 * r['audio_delay'][0]:.0f} ms, max {1000 * r['audio_delay'][1]:.0f} ms; camera RTT "
                     f"unloaded {1000 * r['cam_base']:.1f} ms, loaded median {1000 * r['cam_med']:.0f} ms, "
                     f"p90 {1000 * r['cam_p90']:.0f} ms ({r['cam_n']} samples)")
    print("\n".join(lines))
    if a.table:
        open(a.table, "w").write("\n".join(lines) + "\n")

    # One 1514-byte frame at the link rate: the longest a camera request
    # (prio 0: it passes every queue) waits behind a frame already on the
    # wire; the median must stay below it (plus the unloaded RTT and 10 ms
    # for its own 154-byte frame and the lab's scheduling noise). Linux HTB
    # on a veth has no wire to wait for (a class within its rate sends at
    # once, the veth is as fast as the CPU): its RTT is the base RTT.
    frame_time = 1514 * 8 / link
    for name, r in runs.items():
        if r["got"] < 0.97 * r["sent"]:
            fails.append(f"{name}: audio {r['got']} of {r['sent']} packets arrived (< 97 %)")
        if not r["cam_med"] < frame_time + r["cam_base"] + 0.010:
            fails.append(f"{name}: camera median RTT {1000 * r['cam_med']:.0f} ms ≥ one frame time "
                         f"{1000 * frame_time:.0f} ms + base {1000 * r['cam_base']:.1f} ms + 10 ms")
        for ph in ("p1", "p2"):
            e = "exp1" if ph == "p1" else "exp2"
            tot = sum(r[ph][c] for c in CLASSES)
            if not link - tol <= tot <= link + tol:
                fails.append(f"{name} phase {ph[1]}: total {tot:.0f} bit/s, link {link}")
            for c in ("audio", "web", "video"):
                if abs(r[ph][c] - r[e][c]) > tol:
                    fails.append(f"{name} phase {ph[1]}: {c} {r[ph][c]:.0f} bit/s, the tree says {r[e][c]:.0f} "
                                 f"(± {tol:.0f})")
        # Borrowing: video takes (most of) audio's share when audio stops.
        rise = r["p2"]["video"] - r["p1"]["video"]
        want = r["exp2"]["video"] - r["exp1"]["video"]
        if abs(rise - want) > tol:
            fails.append(f"{name}: video rose by {rise:.0f} bit/s when audio stopped, the tree says {want:.0f}")
    # Seed 003: video gets 10 to 30 kbit/s of the uplink while audio talks.
    if not 10_000 <= m["p1"]["video"] <= 30_000:
        fails.append(f"moat: video {m['p1']['video']:.0f} bit/s in phase 1, the seed's 10-30 kbit/s")
    for ph in ("p1", "p2"):
        for c in ("audio", "web", "video"):
            if abs(m[ph][c] - lx[ph][c]) > tol:
                fails.append(f"phase {ph[1]}: {c}: Moat {m[ph][c]:.0f} bit/s, Linux HTB {lx[ph][c]:.0f} (± {tol:.0f})")
    # Moat's own counters over the same windows: what it sent per class
    # matches the receiver's count; video borrowed in phase 2; no audio drop.
    snaps = m["s"]["snapshots"]
    try:
        q = {n: {c["name"]: c for c in json.loads(snaps[n]["out"])[0]["classes"]} for n in snaps}
        for w, ph in (("w1", "p1"), ("w2", "p2")):
            t0, t1 = snaps[w + "_start"]["t"], snaps[w + "_end"]["t"]
            row = []
            for c in CLASSES:
                sent = (q[w + "_end"][c]["sent_bytes"] - q[w + "_start"][c]["sent_bytes"]) * 8 / (t1 - t0)
                row.append(f"{c} {sent / 1000:.1f}")
                if c in ("audio", "web", "video") and abs(sent - m[ph][c]) > tol:
                    fails.append(f"moatctl {w}: {c} sent {sent:.0f} bit/s, the receiver saw {m[ph][c]:.0f}")
            print(f"moatctl show qos wan, window {w}: kbit/s sent " + ", ".join(row))
        vb = q["w2_end"]["video"]["borrowed_bytes"] - q["w2_start"]["video"]["borrowed_bytes"]
        print(f"moatctl: video borrowed {vb} bytes in phase 2; audio dropped "
              f"{q['w2_end']['audio']['dropped_pkts']} packets; video dropped {q['w2_end']['video']['dropped_pkts']}")
        if vb <= 0:
            fails.append("moatctl: video borrowed nothing in phase 2")
        if q["w2_end"]["audio"]["dropped_pkts"] != 0:
            fails.append(f"moatctl: audio dropped {q['w2_end']['audio']['dropped_pkts']} packets")
    except (KeyError, IndexError, ValueError) as e:
        fails.append(f"moatctl snapshots unusable: {type(e).__name__}: {e}: {list(snaps)}")
    for f in fails:
        print("FAIL:", f)
    print("PASS" if not fails else f"{len(fails)} failed")
    return 1 if fails else 0


def main():
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--addr", required=True)
    r.add_argument("--iface", required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--out", required=True)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--phase1", type=float, default=18)
    s.add_argument("--phase2", type=float, default=14)
    s.add_argument("--audio-len", type=int, default=320)
    s.add_argument("--video-len", type=int, default=1000)
    s.add_argument("--camera-len", type=int, default=32)
    s.add_argument("--snapshot")
    p = sub.add_parser("report")
    p.add_argument("--moat", nargs=2, required=True)
    p.add_argument("--linux", nargs=2, required=True)
    p.add_argument("--link", type=int, default=128_000)
    p.add_argument("--table")
    a = ap.parse_args()
    return {"recv": recv, "send": send, "report": report}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main())
