#!/usr/bin/python3
"""Profiles one bench/esp-pcap.sh case: `perf record -g` (cpu-clock: this
VM has no hardware counters) on moatd's worker thread, attached before the
worker starts, until 95 % of an inbound case's first pass is out (the
replays after it are refused before any crypto) or for 4 s of an outbound
case. bench/esp_pcap.py makes the pcap and the config, as for the figures.

  bench/esp-pcap-perf.py BUILD CASE OUT.data [MOATD]
  perf report -i OUT.data --no-children --sort dso,sym -g none

With OUT.data "-", no perf: the run goes to the end of an inbound case's
first pass and prints the lines of moatd's log that start with "STAGE",
which a moatd built with bench/stage-tsc.patch writes as it stops (TSC
cycles per packet by stage, first-pass bursts only; docs/PERFORMANCE.md).

Run it under the benchmark lock like any benchmark (docs/PERFORMANCE.md).
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
build, case, outp = sys.argv[1], sys.argv[2], sys.argv[3]
moatd_arg = sys.argv[4] if len(sys.argv) > 4 else None
work = tempfile.mkdtemp(prefix="moat-esp-perf-", dir="/tmp")
sys.argv = [sys.argv[0], build, work]
import esp_pcap as E  # noqa: E402  (reads sys.argv and the environment)

moatd = moatd_arg or E.MOATD
pcap, direction, sas, mtu, workers = E.CASES_ALL[case]
pcaps = E.make_pcaps(work, [pcap])
per_queue = E.pcap_count(pcaps[pcap])
cfg = os.path.join(work, "moatd.yaml")
with open(cfg, "w") as f:
    f.write(E.moatd_config(work, pcaps[pcap], direction, sas, mtu, workers, per_queue * workers + 32768))
sock = os.path.join(work, "moatd.sock")
log = open(os.path.join(work, "moatd.log"), "w+")
p = subprocess.Popen([moatd, "--config", cfg], stdout=log, stderr=subprocess.STDOUT, preexec_fn=E.all_cpus)
try:
    tid = sorted(E.lcore_threads(p.pid))[0]
    perf = None if outp == "-" else subprocess.Popen(
        ["perf", "record", "-e", "cpu-clock", "-F", "20000", "-g", "-t", str(tid), "-o", outp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            E.counters(sock)
            break
        except (OSError, ValueError):
            time.sleep(0.02)
    if direction == "out":
        time.sleep(4)
    else:
        inner_total = per_queue if mtu >= 1500 else per_queue // 2
        while E.counters(sock)[2] < (0.95 if perf else 1.0) * inner_total:
            time.sleep(0.002)
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    _, rx, tx, d = E.counters(sock)
    print(f"esp-pcap-perf: {case}: rx {rx} tx {tx} drops {d}", file=sys.stderr)
finally:
    p.terminate()
    p.wait(30)
    if outp == "-":
        log.seek(0)
        print("".join(line for line in log if line.startswith("STAGE")), end="")
    log.close()
    shutil.rmtree(work, ignore_errors=True)
