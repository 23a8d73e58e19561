#!/usr/bin/python3
"""The issue's ESP speed harness (issue 4), driven by bench/esp-pcap.sh.

One moatd worker (lcore 1 on CPU 1; the control thread on CPU 0) takes its
input from net_pcap with infinite_rx=1 (the pcap's packets are held in mbufs
and copied into fresh ones on every rx: the generator's cost lands on the
worker's core) and sends to net_null. The raw crypto rate of the same cipher
and sizes is measured in the same run with dpdk-test-crypto-perf on
crypto_aesni_mb, also on CPU 1, just before and just after each case, so
every ratio is taken within one round.

Rates are per second of the measured thread's own CPU time (the scheduler's
per-thread run time, /proc/PID/task/TID/schedstat): on the shared 2-CPU
machine other processes take CPU 1 for seconds at a time, which made
wall-clock ratios meaningless. Wall-clock rates and CPU shares are kept in
the JSON.

Inbound and anti-replay: infinite_rx replays the same pcap, and a replayed
packet is (rightly) refused before any crypto, so only the first pass over
the pcap is real work. The inbound pcaps hold N ESP packets with sequence
numbers 1..N (made by Moat's esp_tool, which runs the outbound stage), and
the rate is taken from the first pass only: the inner packets moatd sends
are sampled every ~2 ms over the control socket, and the rate is the slope
between the samples at 10 % and 90 % of the pass. The window stays on
(1024, the default); nothing is reset or disabled; the run then checks that
exactly N inner packets came out and the rest were refused as replays.
Outbound cases use pcaps of the same N packets (so the generator's cache
misses are alike in both directions) and a fixed interval in steady state.

Writes OUT/esp-pcap.json and prints the ratios as a markdown table.
"""
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = sys.argv[1] if len(sys.argv) > 1 else os.path.join(SRC, "build")
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(SRC, "bench/results/esp-pcap")
MOATD = os.environ.get("MOATD", os.path.join(BUILD, "ctrl/moatd"))
ESP_TOOL = os.environ.get("ESP_TOOL", os.path.join(BUILD, "tests/esp_tool"))
CRYPTO_PERF = os.environ.get("CRYPTO_PERF", "/usr/bin/dpdk-test-crypto-perf")
# A/B: with MOATD_B set, every case also runs on that binary right after
# MOATD's run, and B ÷ A is reported per case (a change measured in one run).
MOATD_B = os.environ.get("MOATD_B", "")
N = int(os.environ.get("N", "300000"))           # packets in each pcap
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = float(os.environ.get("DURATION", "2"))  # outbound measuring interval, s
CASES = os.environ.get("CASES", "").split()        # default: all
# Reference routers run on the same harness, same pcaps, same round, for the
# six size cases: "testpmd" (dpdk-testpmd io forwarding: the harness's own
# cost, no crypto, no lookup) and "secgw" (DPDK's ipsec-secgw example,
# built by bench/secgw-build.sh). The harness bound of every size is taken
# from testpmd's rate and IPsec-MB's (bench_esp BM_RawGcmDirect).
REFS = os.environ.get("REFS", "").split()
# HUGE=1: moatd and the reference routers on hugepages (hugetlbfs mounted,
# vm.nr_hugepages set) instead of --no-huge, to tell what the machine's lack
# of hugepages costs; crypto-perf's raw rate stays as it is.
HUGE = os.environ.get("HUGE", "") == "1"
BURST = int(os.environ.get("BURST", "32"))           # moatd's workers.burst
SMALL_N = int(os.environ.get("SMALL_N", "256"))      # packets in the out-*-small pcaps
TESTPMD = os.environ.get("TESTPMD", "/usr/bin/dpdk-testpmd")
SECGW = os.environ.get("SECGW", "/tmp/moat-ref/ipsec-secgw")
BENCH_ESP = os.environ.get("BENCH_ESP", os.path.join(BUILD, "bench/bench_esp"))
KEY = bytes(range(1, 21))                          # AES-GCM-128 key + salt
SPI = 0x1000
SIZES = (64, 512, 1420)
TOTAL_OPS = 5000000  # per buffer size, per crypto-perf run

MOAT_IN_MAC = "02:00:00:00:0a:01"
GEN_MAC = "02:00:00:00:0a:02"
SINK_MAC = "02:00:00:00:be:0b"


def mac(s):
    return bytes(int(x, 16) for x in s.split(":"))


def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def ip4(s):
    return bytes(int(x) for x in s.split("."))


def ip4_plus(s, i):
    """Dotted address `i` after the dotted address `s`."""
    return ".".join(str(b) for b in (int.from_bytes(ip4(s), "big") + i).to_bytes(4, "big"))


def udp_frame(src, dst, total, ident, sport):
    """Ethernet + IPv4 (+ UDP) frame whose IPv4 packet is `total` bytes."""
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident & 0xffff, 0, 64, 17, 0, src, dst))
    struct.pack_into("!H", ip, 10, csum(bytes(ip)))
    udp = struct.pack("!HHHH", sport, 9, total - 20, 0)
    return mac(MOAT_IN_MAC) + mac(GEN_MAC) + b"\x08\x00" + bytes(ip) + udp + bytes(total - 28)


def write_pcap(path, frames):
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xa1b2c3d4, 2, 4, 0, 0, 65535, 1))
        for fr in frames:
            f.write(struct.pack("<IIII", 0, 0, len(fr), len(fr)))
            f.write(fr)


def read_pcap(path):
    with open(path, "rb") as f:
        data = f.read()
    off, out = 24, []
    while off < len(data):
        _, _, incl, _ = struct.unpack_from("<IIII", data, off)
        out.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return out


def make_pcaps(tmp, names):
    """Generates the inputs `names` (pcap names of CASES_ALL) once; returns {name: path}."""
    src = ip4("10.0.1.2")
    base = int.from_bytes(ip4("10.0.3.0"), "big")

    def plain(name, frames):
        path = os.path.join(tmp, name + ".pcap")
        write_pcap(path, frames)
        return path

    make = {
        # Outbound: cleartext to 10.0.3.x (routed into the tunnel).
        **{f"out-{s}": (lambda s=s: plain(f"out-{s}", (udp_frame(src, ip4("10.0.3.1"), s, i, 1024 + i % 50000)
                                                        for i in range(N)))) for s in SIZES},
        # Inbound: inner packets from 10.9.0.2 to the sink behind moatd,
        # sealed by esp_tool with sequence numbers 1..N.
        **{f"in-{s}": (lambda s=s: seal(tmp, f"in-{s}", s, 1500, N)) for s in SIZES},
        # 10,000 SAs: destinations 10.0.3.0 + (i mod 10000), one tunnel each.
        "out-64-10k": lambda: plain("out-64-10k", (udp_frame(src, (base + i % 10000).to_bytes(4, "big"), 64, i,
                                                             1024 + i % 50000) for i in range(N))),
        # Inbound fragments: 1420-byte inner packets through a 1400-byte
        # tunnel MTU: two ESP packets each (N ESP packets in all).
        "in-frag": lambda: seal(tmp, "in-frag", 1420, 1400, N // 2),
        # 10,000 inbound SAs (10,000 moats to one portal), packets interleaved.
        "in-64-10k": lambda: seal(tmp, "in-64-10k", 64, 1500, N, sas=10000),
        # Two workers inbound: an SA per rx queue (RFC 4303's one window per
        # SA: RSS or a hand-off gives an SA's packets to one worker), N each:
        # each worker's pass as long as in-64's.
        "in-64-2w": lambda: split(seal(tmp, "in-64-2w", 64, 1500, 2 * N, sas=2), 2),
        # Two workers: two rx queues of N/2 packets each (the memory of one of N).
        "out-64-half": lambda: plain("out-64-half", (udp_frame(src, ip4("10.0.3.1"), 64, i, 1024 + i % 50000)
                                                     for i in range(N // 2))),
        # Small pcaps, the outbound goals' input: outbound needs no unique
        # packets, and a NIC writes what it receives into memory (DDIO: into
        # the L3) without the core copying it, so the generator's source
        # should not come from DRAM. 256 packets in 2.4 KB mbufs are 0.6 MB,
        # in a 1 MB L2; 4,096 (the default until session 10) are 10 MB, and
        # at 1420 B the copy then waits on memory (docs/PERFORMANCE.md).
        **{f"out-{s}-small": (lambda s=s: plain(f"out-{s}-small", (udp_frame(src, ip4("10.0.3.1"), s, i, 1024 + i)
                                                                   for i in range(SMALL_N)))) for s in SIZES},
    }
    return {n: make[n]() for n in sorted(set(names))}


def seal(tmp, name, size, mtu, n, sas=1):
    """Inner packets sealed by esp_tool: `sas` SAs (SPI SPI+i, sender
    198.18.0.1+i), packet j by SA j mod sas, sequence numbers from 1."""
    inner = os.path.join(tmp, name + "-inner.pcap")
    out = os.path.join(tmp, name + ".pcap")
    write_pcap(inner, (udp_frame(ip4("10.9.0.2"), ip4("10.0.2.2"), size, i, 1024 + i % 50000) for i in range(n)))
    r = subprocess.run([ESP_TOOL, "encrypt", "--cipher", "aes-gcm-128", "--key", KEY.hex(), "--spi", str(SPI),
                        "--local", "198.18.0.1", "--peer", "10.0.1.1", "--mtu", str(mtu), "--sas", str(sas),
                        inner, out],
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout)
    if res["drops"]:
        raise RuntimeError(f"esp_tool dropped while sealing {name}: {res}")
    # esp_tool leaves the outer MACs unset: address them to moatd's port.
    frames = [mac(MOAT_IN_MAC) + mac(GEN_MAC) + f[12:] for f in read_pcap(out)]
    write_pcap(out, frames)
    os.unlink(inner)
    return out


def queue_pcaps(pcap, workers):
    """The pcap of each rx queue: split()'s list, or one pcap on every queue."""
    return pcap if isinstance(pcap, list) else [pcap] * workers


def split(path, k):
    """Frame j of the pcap at `path` into the j mod k-th of k pcaps (one per
    rx queue): with seal(sas=k), each queue carries one SA."""
    frames = read_pcap(path)
    paths = []
    for q in range(k):
        paths.append(f"{path[:-5]}-q{q}.pcap")
        write_pcap(paths[-1], frames[q::k])
    os.unlink(path)
    return paths


CASES_ALL = {
    # name: (pcap, direction, sas, tunnel mtu, workers). Cases compared
    # with each other run next to each other.
    "out-64": ("out-64", "out", 1, 1500, 1),
    "out-64-10k": ("out-64-10k", "out", 10000, 1500, 1),
    "out-64-2w": ("out-64-half", "out", 1, 1500, 2),
    **{f"out-{s}-small": (f"out-{s}-small", "out", 1, 1500, 1) for s in (64, 512, 1420)},
    "out-512": ("out-512", "out", 1, 1500, 1),
    "out-1420": ("out-1420", "out", 1, 1500, 1),
    "out-frag": ("out-1420", "out", 1, 1400, 1),
    "in-64": ("in-64", "in", 1, 1500, 1),
    "in-512": ("in-512", "in", 1, 1500, 1),
    "in-1420": ("in-1420", "in", 1, 1500, 1),
    "in-frag": ("in-frag", "in", 1, 1400, 1),
    "in-64-10k": ("in-64-10k", "in", 10000, 1500, 1),
    "in-64-2w": ("in-64-2w", "in", 2, 1500, 2),
}
# The raw crypto figure each case is set against, measured just before it.
RAW = {"out-64": ("encrypt", 64), "out-512": ("encrypt", 512), "out-1420": ("encrypt", 1420),
       "in-64": ("decrypt", 64), "in-512": ("decrypt", 512), "in-1420": ("decrypt", 1420),
       "out-64-small": ("encrypt", 64), "out-512-small": ("encrypt", 512), "out-1420-small": ("encrypt", 1420)}


def memory_mb(mbufs):
    """EAL memory (-m) for a process holding `mbufs` packet mbufs (moatd's
    indirect pool and the others included)."""
    return mbufs * 4000 // (1 << 20) + 768


def moatd_config(run, pcap, direction, sas, mtu, workers, mbufs):
    key = "0x" + KEY.hex()
    routes, tunnels = [], []
    if direction == "out":
        for i in range(sas):
            routes.append({"prefix": ip4_plus("10.0.3.0", i if sas > 1 else 1) + "/32", "tunnel": f"t{i}"})
            tunnels.append({"name": f"t{i}", "local": "10.0.2.1", "peer": "10.0.2.2", "mtu": mtu,
                            "sa": {"cipher": "aes-gcm-128", "out": {"spi": SPI + i, "key": key}}})
    else:
        # The senders of seal(): SA i from 198.18.0.1+i with SPI SPI+i.
        for i in range(sas):
            tunnels.append({"name": f"t{i}", "local": "10.0.1.1", "peer": ip4_plus("198.18.0.1", i), "mtu": mtu,
                            "sa": {"cipher": "aes-gcm-128", "in": {"spi": SPI + i, "key": key}}})
    rx = ",".join(f"rx_pcap={p}" for p in queue_pcaps(pcap, workers))
    lcores = list(range(workers + 1))
    eal = {"lcores": lcores, "memory_mb": memory_mb(mbufs), "no_huge": not HUGE,
           "log_level": "*:error"}
    if HUGE:
        eal["args"] = ["--huge-unlink"]  # no hugepage files left behind by a killed run
    if workers > 1:
        # Two CPUs: worker 2 (lcore 2) shares CPU 0 with the control thread.
        eal["lcores"] = [0, 1, "2@0"]
    cfg = {
        "eal": eal,
        "mempool": {"mbufs": mbufs},
        "ports": [
            {"name": "a", "device": f"net_pcap0,{rx},infinite_rx=1", "address": "10.0.1.1/24", "mac": MOAT_IN_MAC,
             "rx_queues": workers},
            {"name": "b", "device": "net_null0,no-rx=1", "address": "10.0.2.1/24", "mac": "02:00:00:00:0b:01"},
        ],
        "neighbors": [{"ip": "10.0.2.2", "mac": SINK_MAC, "port": "b"}],
        "routes": routes,
        "tunnels": tunnels,
        "workers": {"burst": BURST},
        "punt": {"enabled": False},
        "control": {"socket": os.path.join(run, "moatd.sock"), "max_sas": max(4096, 2 * sas)},
    }
    return json.dumps(cfg, indent=1)


def lcore_threads(pid, timeout=60, want=1):
    """{tid: name} of a DPDK process's worker lcore threads ("rte-worker-N" in
    22.11), once there are at least `want`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = {}
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
                if name.startswith(("lcore-worker", "rte-worker")):
                    out[int(tid)] = name
        except OSError:
            pass
        if len(out) >= want:
            return out
        time.sleep(0.005)
    raise RuntimeError(f"under {want} lcore-worker threads in process {pid}")


def run_ns(pid, tid):
    """CPU time a thread has run, ns (scheduler accounting, not ticks)."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def all_cpus():
    # The driver runs on CPU 0 (esp-pcap.sh); moatd and crypto-perf place
    # their own lcores.
    os.sched_setaffinity(0, range(os.cpu_count()))


def ctl(sock, *args):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock)
    s.sendall((json.dumps({"args": list(args)}) + "\n").encode())
    buf = b""
    while b"\n" not in buf:
        d = s.recv(65536)
        if not d:
            break
        buf += d
    s.close()
    r = json.loads(buf)
    if not r.get("ok"):
        raise RuntimeError(f"moatctl {args}: {r}")
    return r["data"]


def counters(sock):
    st = ctl(sock, "show", "stats")
    rx = sum(w["rx"] for w in st["workers"])
    tx = sum(w["tx"] for w in st["workers"])
    drops = {}
    for d in st["drops"]:
        drops[d["reason"]] = drops.get(d["reason"], 0) + d["count"]
    return time.monotonic(), rx, tx, drops


class Sampler:
    """Counters with each worker's CPU time around them: rates are packets
    per second of the worker's own CPU time, so time the shared machine
    gives to other processes on the worker's CPU does not count (wall-clock
    rates are kept beside them)."""

    def __init__(self, pid, sock):
        self.pid, self.sock = pid, sock
        self.tids = {int(n.rsplit("-", 1)[1]): t for t, n in lcore_threads(pid).items()}  # lcore → tid

    def __call__(self):
        t0 = time.monotonic()
        ns0 = {l: run_ns(self.pid, t) for l, t in self.tids.items()}
        st = ctl(self.sock, "show", "stats")
        ns1 = {l: run_ns(self.pid, t) for l, t in self.tids.items()}
        t1 = time.monotonic()
        w = {x["lcore"]: (x["rx"], x["tx"], (ns0[x["lcore"]] + ns1[x["lcore"]]) / 2) for x in st["workers"]}
        drops = {}
        for d in st["drops"]:
            drops[d["reason"]] = drops.get(d["reason"], 0) + d["count"]
        # Counters read between t0 and t1: the midpoint, like the CPU times.
        return {"t": (t0 + t1) / 2, "w": w, "drops": drops,
                "rx": sum(v[0] for v in w.values()), "tx": sum(v[1] for v in w.values())}


class LateStart(RuntimeError):
    """The control socket answered only after the worker was past 40 % of
    the first pass: on a loaded CPU 0 the control thread can reach its loop
    tens of milliseconds after the workers started. Nothing was measured
    wrong; the case is run again (run_case_retry)."""


def stop(p):
    """Ends a router process: SIGTERM, then SIGKILL after 30 s."""
    p.terminate()
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def first_pass(sample, total, what, deadline, txs=(lambda x: x["tx"],)):
    """Samples (each a dict with "t") from 10 % to 90 % of the first pass
    over an inbound pcap of `total` inner packets, for each packet count in
    `txs` (a function of a sample: one per worker, each worker's own pass):
    ([(a, b) per count], all samples). From the first sample when the router
    got past 10 % before it answered; at least half the pass, else
    LateStart. Then waits for the passes to end (1.5 times as long again),
    so the caller can check them."""
    lo, hi = 0.1 * total, 0.9 * total
    samples = []
    while time.time() < deadline:
        x = sample()
        samples.append(x)
        if all(tx(x) >= hi for tx in txs):
            break
        time.sleep(0.002)
    windows = []
    for tx in txs:
        a = samples[0] if tx(samples[0]) >= lo else next(x for x in samples if tx(x) >= lo)
        b = [x for x in samples if tx(x) <= hi][-1]
        if tx(b) - tx(a) < 0.5 * total:
            raise LateStart(f"{what}: under half the pass sampled (raise N)")
        windows.append((a, b))
    time.sleep(max(0.2, 1.5 * (samples[-1]["t"] - samples[0]["t"])))
    return windows, samples


def run_case_retry(tmp, pcaps, name, moatd=MOATD, tries=3):
    for t in range(tries):
        try:
            res = run_case(tmp, pcaps, name, moatd)
            res["tries"] = t + 1
            return res
        except LateStart as e:
            if t == tries - 1:
                # The other cases' figures stay good: this one goes unmeasured
                # (its ratios are left out of the table) rather than the run.
                print(f"esp-pcap: {e}; {tries} tries, case left out", file=sys.stderr)
                return None
            print(f"esp-pcap: {e}; again", file=sys.stderr)


def run_case(tmp, pcaps, name, moatd=MOATD):
    pcap, direction, sas, mtu, workers = CASES_ALL[name]
    per_queue = pcap_count(pcaps[pcap])
    mbufs = per_queue * workers + 32768
    run = tempfile.mkdtemp(prefix="moat-esp-pcap-", dir=tmp)
    cfg = os.path.join(run, "moatd.yaml")
    with open(cfg, "w") as f:
        f.write(moatd_config(run, pcaps[pcap], direction, sas, mtu, workers, mbufs))
    sock = os.path.join(run, "moatd.sock")
    log = open(os.path.join(run, "moatd.log"), "w+")
    p = subprocess.Popen([moatd, "--config", cfg], stdout=log, stderr=subprocess.STDOUT, preexec_fn=all_cpus)
    try:
        deadline = time.time() + 120
        while True:
            if p.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moatd exited ({name}): {log.read()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"moatd did not start ({name})")
            try:
                counters(sock)
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        res = {"case": name, "pcap_packets": per_queue, "workers": workers, "sas": sas, "mtu": mtu,
               "moatd": moatd, "load_avg_1m": os.getloadavg()[0]}
        sample = Sampler(p.pid, sock)
        if direction == "out":
            # Steady state: warm up, then one fixed interval.
            time.sleep(0.5)
            a = sample()
            time.sleep(DURATION)
            b = sample()
            dt = b["t"] - a["t"]
            per_worker = {l: (b["w"][l][0] - a["w"][l][0]) / ((b["w"][l][2] - a["w"][l][2]) / 1e9) / 1e6 for l in b["w"]}
            cpu_share = {l: (b["w"][l][2] - a["w"][l][2]) / 1e9 / dt for l in b["w"]}
            res.update(inner_mpps=sum(per_worker.values()), per_worker_mpps=per_worker, cpu_share=cpu_share,
                       inner_mpps_wall=(b["rx"] - a["rx"]) / dt / 1e6, esp_mpps_wall=(b["tx"] - a["tx"]) / dt / 1e6,
                       seconds=dt,
                       drops={k: v - a["drops"].get(k, 0) for k, v in b["drops"].items() if v != a["drops"].get(k, 0)})
        else:
            # First pass only: inner packets out (tx) against the worker's CPU
            # time, each worker over its own queue's pass; rates add up.
            inner_total = per_queue if mtu >= 1500 else per_queue // 2
            lcores = sorted(sample()["w"])
            windows, samples = first_pass(sample, inner_total, name, time.time() + 120,
                                          [lambda x, l=l: x["w"][l][1] for l in lcores])
            per_worker, cpu_share = {}, {}
            for l, (a, b) in zip(lcores, windows):
                cpu_s = (b["w"][l][2] - a["w"][l][2]) / 1e9
                if cpu_s < 0.02:
                    raise RuntimeError(f"{name}: first pass too short to measure ({cpu_s:.3f} s)")
                per_worker[l] = (b["w"][l][1] - a["w"][l][1]) / cpu_s / 1e6
                cpu_share[l] = cpu_s / (b["t"] - a["t"])
            a = min((w[0] for w in windows), key=lambda x: x["t"])
            b = max((w[1] for w in windows), key=lambda x: x["t"])
            # The passes are over: every ESP packet of them decrypted, the
            # rest refused as replays.
            _, rx, tx, d = counters(sock)
            res.update(inner_mpps=sum(per_worker.values()), per_worker_mpps=per_worker,
                       inner_mpps_wall=(b["tx"] - a["tx"]) / (b["t"] - a["t"]) / 1e6,
                       cpu_share=cpu_share if workers > 1 else cpu_share[lcores[0]], seconds=b["t"] - a["t"],
                       samples=len(samples), inner_out_total=tx, rx_total=rx, drops=d)
            # (tx also counts the gratuitous ARPs moatd sends at start.)
            want = inner_total * workers
            if not want <= tx <= want + 16:
                raise RuntimeError(f"{name}: {tx} inner packets out, want {want}: drops {d}")
            if set(d) - {"esp_replayed", "esp_too_old"}:
                raise RuntimeError(f"{name}: unexpected drops {d}")
        return res
    finally:
        stop(p)
        log.close()


def telemetry(prefix, path, timeout=120):
    """A DPDK process's telemetry socket (v2), connected, or None once the
    process has gone."""
    deadline = time.time() + timeout
    sock = f"/var/run/dpdk/{prefix}/dpdk_telemetry.v2"
    while time.time() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(sock)
            s.recv(1024)  # the greeting
            return s
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no telemetry socket {sock}")


def port_out(tel, port=1):
    tel.send(f"/ethdev/stats,{port}".encode())
    reply = tel.recv(65536)
    if not reply:
        raise RuntimeError("the router closed its telemetry socket (exited?)")
    st = json.loads(reply)["/ethdev/stats"]
    return st["opackets"] if st else 0  # null: the port is not set up yet


def secgw_config(direction):
    """ipsec-secgw's rules for the case: one AES-GCM-128 SA with the same key,
    SPI and outer addresses as moatd's, the policy and route to net_null."""
    key = ":".join(f"{b:02x}" for b in KEY)
    sa = f"aead_algo aes-128-gcm aead_key {key} mode ipv4-tunnel"
    if direction == "out":
        # secgw refuses to run without an inbound SA: one that nothing uses.
        return (f"sp ipv4 out esp protect {SPI} pri 1 dst 10.0.3.0/24 sport 0:65535 dport 0:65535\n"
                f"sa out {SPI} {sa} src 10.0.2.1 dst 10.0.2.2 type cpu-crypto\n"
                f"sp ipv4 in esp protect {SPI + 1} pri 1 dst 10.0.9.0/24 sport 0:65535 dport 0:65535\n"
                f"sa in {SPI + 1} {sa} src 10.0.2.2 dst 10.0.2.1 type cpu-crypto\n"
                f"rt ipv4 dst 10.0.2.2/32 port 1\nneigh port 1 {SINK_MAC}\n")
    return (f"sp ipv4 in esp protect {SPI} pri 1 dst 10.0.2.0/24 sport 0:65535 dport 0:65535\n"
            f"sa in {SPI} {sa} src 198.18.0.1 dst 10.0.1.1 type cpu-crypto\n"
            f"rt ipv4 dst 10.0.2.0/24 port 1\nneigh port 1 {SINK_MAC}\n")


def refs_for(case):
    """The reference routers (REFS) that run `case`: all of them on the size
    cases; testpmd alone on the two-worker cases, for the harness's own
    scaling to two cores (ipsec-secgw runs one worker here)."""
    if case in RAW:
        return REFS
    return [k for k in REFS if k == "testpmd"] if CASES_ALL[case][4] > 1 else []


def run_ref(tmp, pcaps, name, kind):
    """One size case on a reference router (REFS): its rate in packets out of
    net_null per second of its worker thread's CPU time, sampled through
    DPDK telemetry. ipsec-secgw runs in library mode (librte_ipsec) with
    IPsec-MB through the aesni_mb PMD's synchronous CPU-crypto path (no
    cryptodev queue: its fastest mode on this PMD) and the same 1024-packet
    replay window; inbound is its first pass, like moatd's."""
    pcap, direction, sas, mtu, workers = CASES_ALL[name]
    n = pcap_count(pcaps[pcap])  # per rx queue
    mbufs = n * workers + 32768
    run = tempfile.mkdtemp(prefix=f"moat-ref-{kind}-", dir=tmp)
    prefix = os.path.basename(run)
    rx = ",".join(f"rx_pcap={q}" for q in queue_pcaps(pcaps[pcap], workers))
    eal = ["--huge-unlink" if HUGE else "--no-huge", "-m", str(memory_mb(mbufs)), "--no-pci", "--no-shconf",
           "--file-prefix", prefix, "--log-level", "*:error",
           "--vdev", f"net_pcap0,{rx},infinite_rx=1", "--vdev", "net_null0,no-rx=1"]
    if kind == "testpmd":
        # Two workers: lcores 1 (CPU 1) and 2 (CPU 0, beside the main lcore), as moatd's.
        lcores = ["-l", "0,1"] if workers == 1 else ["--lcores", "0,1,2@0"]
        args = [TESTPMD, *lcores, *eal, "--", "--forward-mode=io", "--auto-start", f"--nb-cores={workers}",
                f"--rxq={workers}", f"--txq={workers}", f"--total-num-mbufs={mbufs}", "--burst=32"]
    elif kind == "secgw" and workers == 1:
        cfg = os.path.join(run, "secgw.cfg")
        with open(cfg, "w") as f:
            f.write(secgw_config(direction))
        # -u: the port on the ESP side; the main lcore (CPU 1) is the worker.
        args = [SECGW, "-l", "1", *eal, "--vdev", "crypto_aesni_mb0", "--", "-p", "0x3", "-P",
                "-u", "0x2" if direction == "out" else "0x1", "-l", "-w", "1024", "-s", str(mbufs),
                "--config=(0,0,1),(1,0,1)", "-f", cfg]
    else:
        raise ValueError(kind)
    log = open(os.path.join(run, "ref.log"), "w+")
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, preexec_fn=all_cpus)
    tel = None
    try:
        tel = telemetry(prefix, run)
        tids = [p.pid] if kind == "secgw" else list(lcore_threads(p.pid, want=workers))

        def sample():
            # All forwarding threads' CPU time (testpmd's lcores of a two-worker case).
            t0 = time.monotonic()
            ns0 = sum(run_ns(p.pid, t) for t in tids)
            out = port_out(tel)
            ns1 = sum(run_ns(p.pid, t) for t in tids)
            return {"t": (t0 + time.monotonic()) / 2, "tx": out, "ns": (ns0 + ns1) / 2}

        deadline = time.time() + 120
        while sample()["tx"] == 0:
            if p.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(f"{kind} sent nothing ({name}): {log.read()[-2000:]}")
            time.sleep(0.002)
        res = {"case": name, "router": kind, "pcap_packets": n, "cmd": " ".join(args),
               "load_avg_1m": os.getloadavg()[0]}
        if direction == "out" or kind == "testpmd":
            # testpmd decrypts nothing: every pass is alike, steady state.
            time.sleep(0.5)
            a = sample()
            time.sleep(DURATION)
            b = sample()
        else:
            ((a, b),), _ = first_pass(sample, n, f"{kind} {name}", deadline)
            total = port_out(tel)
            res["inner_out_total"] = total
            # Every ESP packet of the first pass decrypted; what came out
            # beyond N are replays the router let through (kept in the JSON).
            if total < n:
                raise RuntimeError(f"{kind} {name}: {total} inner packets out, want {n}")
            res["replays_out"] = total - n
        cpu_s = (b["ns"] - a["ns"]) / 1e9
        # Per worker CPU-second, summed over the workers as moatd's are: the
        # port's count is the workers' together, their queues carry alike
        # pcaps, so each worker's rate is the mean one.
        res.update(inner_mpps=(b["tx"] - a["tx"]) / cpu_s / 1e6 * workers,
                   inner_mpps_wall=(b["tx"] - a["tx"]) / (b["t"] - a["t"]) / 1e6,
                   cpu_share=cpu_s / (b["t"] - a["t"]), seconds=b["t"] - a["t"])
        return res
    finally:
        if tel:
            tel.close()
        stop(p)
        log.close()


def ipsec_mb_direct():
    """IPsec-MB's own AES-GCM-128 rate (direct API, no packet work), Mops per
    CPU second by (op, size): bench_esp's BM_RawGcmDirect on CPU 1."""
    r = subprocess.run(["taskset", "-c", "1", BENCH_ESP, "--benchmark_filter=BM_RawGcmDirect",
                        "--benchmark_min_time=0.3", "--benchmark_format=json"],
                       capture_output=True, text=True, check=True)
    out = {}
    for b in json.loads(r.stdout)["benchmarks"]:
        size, dec = (int(x) for x in b["name"].split("/")[1:3])
        out[("decrypt" if dec else "encrypt", size)] = b["items_per_second"] / 1e6
    return out


_counts = {}


def pcap_count(path):
    """Packets in a pcap (record headers only); of the first, given a list of
    one pcap per rx queue (split(): all of a size)."""
    if isinstance(path, list):
        path = path[0]
    if path not in _counts:
        n = 0
        with open(path, "rb") as f:
            f.seek(24)
            while True:
                h = f.read(16)
                if len(h) < 16:
                    break
                f.seek(struct.unpack("<IIII", h)[2], 1)
                n += 1
        _counts[path] = n
    return _counts[path]


def crypto_perf(op, sizes):
    """Raw AES-GCM-128 Mops on crypto_aesni_mb, one lcore on CPU 1, by inner
    packet size (the buffer is the ESP payload that size makes)."""
    bufs = [((s + 2 + 3) & ~3) for s in sizes]  # ESP payload: inner + trailer, 4-byte aligned
    args = [CRYPTO_PERF, "-l", "0,1", "--no-huge", "-m", "512", "--no-pci", "--no-shconf",
            "--vdev", "crypto_aesni_mb", "--log-level", "*:error", "--",
            "--ptest", "throughput", "--devtype", "crypto_aesni_mb", "--optype", "aead",
            "--aead-algo", "aes-gcm", "--aead-op", op, "--aead-key-sz", "16", "--aead-iv-sz", "12",
            "--aead-aad-sz", "8", "--digest-sz", "16", "--burst-sz", "32", "--total-ops", str(TOTAL_OPS),
            "--buffer-sz", ",".join(str(b) for b in [bufs[0]] + bufs), "--silent"]
    with tempfile.TemporaryFile("w+") as outf:
        p = subprocess.Popen(args, stdout=outf, stderr=subprocess.STDOUT, text=True, preexec_fn=all_cpus)
        tid = next(iter(lcore_threads(p.pid)))
        last = 0
        while p.poll() is None:
            try:
                last = run_ns(p.pid, tid)
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.003)
        outf.seek(0)
        text = outf.read()
    rows = [l.split() for l in text.splitlines() if l.strip().startswith("1 ")]
    if len(rows) != len(bufs) + 1:
        raise RuntimeError("dpdk-test-crypto-perf: " + text[-3000:])
    wall = {s: float(row[7]) for s, row in zip(sizes, rows[1:])}  # the first size twice: the first run warms up
    ops = TOTAL_OPS * (len(bufs) + 1)
    # Ops per second of the worker lcore's CPU time (the last ≤3 ms before
    # it exited are not seen: under 1 %). One size per call.
    cpu = {sizes[0]: ops / (last / 1e9) / 1e6} if len(sizes) == 1 and last else {}
    return cpu, wall, " ".join(args)


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = CASES or list(CASES_ALL)
    with tempfile.TemporaryDirectory(prefix="moat-esp-pcap-", dir="/tmp") as tmp:
        t = time.time()
        pcaps = make_pcaps(tmp, [CASES_ALL[c][0] for c in cases])
        print(f"esp-pcap: pcaps of {N} packets made in {time.time() - t:.0f} s", file=sys.stderr)
        rounds, cmds = [], {}
        for r in range(ROUNDS):
            rd = {"round": r, "raw_encrypt_mops": {}, "raw_decrypt_mops": {}, "cases": {}}
            if REFS:
                rd["ipsec_mb_direct_mops"] = {f"{op} {size}": v for (op, size), v in ipsec_mb_direct().items()}
            for c in cases:
                if c in RAW:
                    # Raw rate just before and just after the case: their
                    # mean follows the machine's load across the case.
                    op, size = RAW[c]
                    before, before_wall, cmd = crypto_perf(op, [size])
                res = run_case_retry(tmp, pcaps, c)
                res_b = run_case_retry(tmp, pcaps, c, MOATD_B) if MOATD_B and res else None
                if not res or (MOATD_B and not res_b):
                    continue
                rd["cases"][c] = res
                if MOATD_B:
                    rd.setdefault("cases_b", {})[c] = res_b
                for kind in refs_for(c):
                    try:
                        x = run_ref(tmp, pcaps, c, kind)
                    except LateStart as e:
                        print(f"esp-pcap: {e}; left out", file=sys.stderr)
                        continue
                    rd.setdefault("refs", {}).setdefault(kind, {})[c] = x
                    print(f"esp-pcap: round {r}: {c}: {kind} {x['inner_mpps']:.3f} Mpps per worker CPU second",
                          file=sys.stderr)
                if c in RAW:
                    after, after_wall, cmd = crypto_perf(op, [size])
                    rd[f"raw_{op}_mops"][size] = (before[size] + after[size]) / 2
                    # Cases of one size (out-64, out-64-small) each keep their own.
                    rd.setdefault("raw_case_mops", {})[c] = (before[size] + after[size]) / 2
                    rd.setdefault(f"raw_{op}_mops_before_after", {})[size] = [before[size], after[size]]
                    rd.setdefault(f"raw_{op}_mops_wall_before_after", {})[size] = [before_wall[size], after_wall[size]]
                    cmds[op] = cmd
                raw = f", raw {RAW[c][0]} {rd[f'raw_{op}_mops'][size]:.3f} Mops" if c in RAW else ""
                b = f", B {rd['cases_b'][c]['inner_mpps']:.3f}" if MOATD_B else ""
                print(f"esp-pcap: round {r}: {c}: {res['inner_mpps']:.3f} Mpps inner per worker CPU second "
                      f"(wall {res['inner_mpps_wall']:.3f}, CPU share {res['cpu_share']}){b}{raw}", file=sys.stderr)
            rounds.append(rd)
    doc = {"n": N, "moatd": MOATD, "moatd_b": MOATD_B, "refs": REFS, "hugepages": HUGE, "rounds_n": ROUNDS, "duration_s": DURATION, "load_avg": os.getloadavg(),
           "crypto_perf": cmds, "rounds": rounds,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    ratios = compute_ratios(rounds)
    doc["ratios"] = ratios
    with open(os.path.join(OUT, "esp-pcap.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print("| ratio | goal | per round | median | met |")
    print("|---|---|---|---|---|")
    for name, (goal, vals) in ratios.items():
        med = statistics.median(vals)
        met = "—" if goal == 0 else "yes" if med >= goal else "no"
        print(f"| {name} | {f'≥ {goal}' if goal else '—'} | {', '.join(f'{v:.2f}' for v in vals)} | {med:.2f} | {met} |")


def raw_of(rd, case):
    """The raw crypto rate measured around `case` in round `rd`."""
    op, size = RAW[case]
    by_case = rd.get("raw_case_mops", {})
    if case in by_case:
        return by_case[case]
    by_size = rd[f"raw_{op}_mops"]
    return by_size[size] if size in by_size else by_size[str(size)]  # str: read back from JSON


def compute_ratios(rounds):
    out = {}

    def add(name, goal, f):
        # A round that left a case out (its pass never sampled well) has no
        # value here; the other rounds still count.
        vals = []
        for rd in rounds:
            try:
                vals.append(f(rd, rd["cases"]))
            except KeyError:
                continue
        if vals:
            out[name] = (goal, vals)

    for s, g in zip(SIZES, (0.50, 0.55, 0.65)):
        add(f"outbound {s} B ÷ raw encrypt ({SMALL_N:,}-packet pcap)", g,
            lambda rd, c, s=s: c[f"out-{s}-small"]["inner_mpps"] / raw_of(rd, f"out-{s}-small"))
    for s in SIZES:
        add(f"outbound {s} B ÷ raw encrypt, N-packet pcap (the generator from memory; not a goal)", 0.0,
            lambda rd, c, s=s: c[f"out-{s}"]["inner_mpps"] / raw_of(rd, f"out-{s}"))
    for s, g in zip(SIZES, (0.45, 0.50, 0.60)):
        add(f"inbound {s} B ÷ raw decrypt", g, lambda rd, c, s=s: c[f"in-{s}"]["inner_mpps"] / raw_of(rd, f"in-{s}"))
    add("outbound 64 B, 10,000 SAs ÷ 1 SA", 0.70, lambda rd, c: c["out-64-10k"]["inner_mpps"] / c["out-64"]["inner_mpps"])
    add("outbound 1420 B, MTU 1400 (fragment-inner) ÷ unfragmented", 0.55,
        lambda rd, c: c["out-frag"]["inner_mpps"] / c["out-1420"]["inner_mpps"])
    add("inbound 1420 B with reassembly ÷ unfragmented", 0.70,
        lambda rd, c: c["in-frag"]["inner_mpps"] / c["in-1420"]["inner_mpps"])
    add("inbound 64 B, 10,000 SAs ÷ 1 SA (outbound's goal)", 0.70,
        lambda rd, c: c["in-64-10k"]["inner_mpps"] / c["in-64"]["inner_mpps"])
    add("inbound 64 B, two workers ÷ one", 1.8, lambda rd, c: c["in-64-2w"]["inner_mpps"] / c["in-64"]["inner_mpps"])
    add("testpmd: in-64-2w ÷ in-64, the harness's own two-core scaling (not a goal)", 0.0,
        lambda rd, c: rd["refs"]["testpmd"]["in-64-2w"]["inner_mpps"] / rd["refs"]["testpmd"]["in-64"]["inner_mpps"])
    add("testpmd: out-64-2w ÷ out-64, the harness's own two-core scaling (not a goal)", 0.0,
        lambda rd, c: rd["refs"]["testpmd"]["out-64-2w"]["inner_mpps"] / rd["refs"]["testpmd"]["out-64"]["inner_mpps"])
    add("outbound 64 B, two workers ÷ one", 1.8, lambda rd, c: c["out-64-2w"]["inner_mpps"] / c["out-64"]["inner_mpps"])
    add("outbound 64 B, two workers ÷ one, wall clock (CPU 0 shared with the control thread)", 1.8,
        lambda rd, c: c["out-64-2w"]["inner_mpps_wall"] / c["out-64"]["inner_mpps_wall"])
    add(f"outbound 64 B, {SMALL_N:,}-packet pcap ÷ N-packet pcap (not a goal)", 0.0,
        lambda rd, c: c["out-64-small"]["inner_mpps"] / c["out-64"]["inner_mpps"])
    for kind in REFS:
        for c, (op, s) in RAW.items():
            add(f"{kind}: {c} ÷ raw {op} (not a goal)", 0.0,
                lambda rd, cs, k=kind, c=c: rd["refs"][k][c]["inner_mpps"] / raw_of(rd, c))
            add(f"Moat ÷ {kind}: {c} (not a goal)", 0.0,
                lambda rd, cs, k=kind, c=c: cs[c]["inner_mpps"] / rd["refs"][k][c]["inner_mpps"])
    if "testpmd" in REFS:
        # What a router whose own stages cost nothing would reach: the
        # harness's cost (testpmd io: net_pcap's copy, net_null, the loop)
        # plus IPsec-MB's, against crypto-perf's raw rate.
        for c, (op, s) in RAW.items():
            add(f"harness bound: {c} ÷ raw {op} (not a goal)", 0.0,
                lambda rd, cs, c=c, op=op, s=s: 1 / (raw_of(rd, c) * (
                    1 / rd["refs"]["testpmd"][c]["inner_mpps"] + 1 / rd["ipsec_mb_direct_mops"][f"{op} {s}"])))
    for name in {n: None for rd in rounds for n in rd.get("cases_b", {})}:  # every round's, in order
        add(f"{name}: B ÷ A (not a goal)", 0.0,
            lambda rd, c, n=name: rd["cases_b"][n]["inner_mpps"] / c[n]["inner_mpps"])
    return out


if __name__ == "__main__":
    main()
