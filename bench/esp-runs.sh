#!/usr/bin/env bash
# ESP end-to-end reference runs (docs/PERFORMANCE.md "ESP end to end"):
# moat-bench (generator + sink, CPU 0) ⇄ two memif links ⇄ moatd (worker on
# CPU 1) as a tunnel endpoint with one static AES-GCM-128 SA, NDR/PDR search
# per size (bench/profiles/router-esp.yaml.in, bench/configs/moatd-esp.yaml.in):
#   outbound  cleartext in (inner IPv4 packets of 64/512/1420 bytes: frames of
#             82/530/1438 bytes with FCS), ESP out; the sink decrypts 1 in 64;
#   inbound   ESP in (frames of 138/586/1494 bytes: inner packets of
#             66/514/1422 bytes, the generator's ESP has no padding so the
#             inner length is 2 mod 4), cleartext out; anti-replay on,
#             sequence numbers increasing.
#
#   bench/esp-runs.sh [BUILD_DIR] [OUT_DIR]       (defaults: build bench/results/esp)
# Environment: DIRS ("outbound inbound"), SAS (1: SAs, one tunnel each,
# traffic interleaved across all), DURATION (1), MAX_TRIALS (8),
# TIME_LIMIT (per run, 200), SIZES (frame sizes, e.g. "[530]"; default per
# direction as above), FLOWS (max(SAS, 256); flow f goes to tunnel f mod SAS
# from source port 1024 + f div SAS), MODE (ndr | max | fixed at RATE pps), TAG (suffix of the
# result files), MEMORY_MB (moatd's EAL memory, 256; 4,096 moats need 1024),
# MOAT_BENCH, MOATD, MOATCTL.
#   QOS=1 (outbound only; bench/qos-runs.sh): a qos.shaping tree on port b
#   whose `moats:` template gives every tunnel a subtree of 4 leaves c0..c3,
#   and qos rules putting source ports into the 4 classes so that every
#   tunnel's flows spread evenly over its 4 leaves (FLOWS a multiple of
#   4 x SAS). The link is QOS_LINK (40gbit), far above what moatd forwards;
#   each moat is guaranteed 80 % of it / SAS, its classes a quarter each,
#   all may borrow up to the link: the scheduler is on the path, never the
#   limit. After the search, `moatctl --json show qos b` goes to
#   OUT_DIR/esp-outbound-<SAS>sa<TAG>-showqos.json.
#   QOS=toggle (with MODE=max and a long DURATION): one moatd whose shaping
#   is switched off and on with `moatctl rules reload` (moatd.yaml without,
#   moatd-qos.yaml with) every TOGGLE_S (2) seconds, TOGGLES (16) segments
#   in the order off on on off..., during one max-rate trial; each segment's
#   worker packets, wall and CPU time go to ...-toggle.json.
# After each run moatd's counters (`moatctl --json show stats`) go to
# OUT_DIR/esp-<DIR>-<SAS>sa<TAG>-stats.json (when MOATCTL is there). With
# MODE=max, the worker's packets per CPU second go to ...-cpu.json (below).
# Writes OUT_DIR/esp-{outbound,inbound}-<SAS>sa<TAG>.json and prints a markdown table.
# Exit status: 0 every run completed; 1 a run failed; 2 usage.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${2:-bench/results/esp}
dur=${DURATION:-1}
max_trials=${MAX_TRIALS:-8}
limit=${TIME_LIMIT:-200}
read -r -a dirs <<<"${DIRS:-outbound inbound}"
sas=${SAS:-1}
flows=${FLOWS:-$((sas > 256 ? sas : 256))}
mode=${MODE:-ndr}
tag=${TAG:-}
qos=${QOS:-0}
qos_link=${QOS_LINK:-40gbit}
moat_bench=${MOAT_BENCH:-$build/bench/moat-bench}
moatd=${MOATD:-$build/ctrl/moatd}
moatctl=${MOATCTL:-$build/ctrl/moatctl}
[ -x "$moat_bench" ] && [ -x "$moatd" ] || { echo "esp-runs: no moat-bench/moatd in $build" >&2; exit 2; }
if [ "$qos" != 0 ]; then
  case $qos in 1|toggle) ;; *) echo "esp-runs: QOS is 0, 1 or toggle" >&2; exit 2 ;; esac
  [ "${DIRS:-}" = outbound ] || { echo "esp-runs: QOS=$qos needs DIRS=outbound" >&2; exit 2; }
  [ $((flows % (4 * sas))) -eq 0 ] || { echo "esp-runs: QOS=$qos needs FLOWS a multiple of 4 x SAS" >&2; exit 2; }
  [ -x "$moatctl" ] || { echo "esp-runs: no moatctl in $build" >&2; exit 2; }
fi
[ -x "$moatctl" ] || moatctl=true
mkdir -p "$out"
key=0x00112233445566778899aabbccddeeff01020304

. bench/runs-lib.sh
runs_init moat-esp
# moatd's worker now ($dut: the timeout wrapping moatd): "time ticks tx"
# (utime + stime of the worker thread; packets the workers sent), or nothing
# when moatd did not answer.
sample() {
  local d t ticks tx
  d=$(pgrep -P "$dut" | head -1) || return 0
  t=$(grep -l '^rte-worker' /proc/"$d"/task/*/comm | head -1) || return 0
  ticks=$(awk '{print $14 + $15}' "${t%/comm}/stat") || return 0
  tx=$("$moatctl" --socket "$run/moatd.sock" --json show stats |
       /usr/bin/python3 -c 'import json, sys; print(sum(w["tx"] for w in json.load(sys.stdin)["workers"]))') || return 0
  echo "$(date +%s.%N) $ticks $tx"
}
# moatd's rule generation (one more per reload), or nothing.
rules_generation() {
  "$moatctl" --socket "$run/moatd.sock" --json show rules 2>/dev/null |
    /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["generation"])' 2>/dev/null || true
}

status=0
for dir in "${dirs[@]}"; do
  case $dir in
    outbound)  # cleartext to 10.0.3.0 + i, routed into tunnel i; ESP to the sink (10.0.2.2)
      sizes="[82, 530, 1438]" outer_dst=10.0.2.2
      dst=$(/usr/bin/python3 -c "import ipaddress as i; a=i.ip_address('10.0.3.0'); print(f'{a}-{a + $sas - 1}')") ;;
    inbound)   # ESP from 198.18.0.1 + i to moatd's 10.0.1.1; inner to 10.0.2.2 (the sink)
      sizes="[138, 586, 1494]" dst=10.0.2.2 outer_dst=10.0.1.1 ;;
    *) echo "esp-runs: unknown direction $dir" >&2; exit 2 ;;
  esac
  [ -n "${SIZES:-}" ] && sizes=$SIZES
  rm -f "$run"/*.sock "$run/ready"
  sed -e "s|@RUN@|$run|g" -e "s|@SIZES@|$sizes|g" -e "s|@DIR@|$dir|g" -e "s|@DST@|$dst|g" \
      -e "s|@OUTER_DST@|$outer_dst|g" -e "s|@DURATION@|$dur|g" -e "s|@MAX_TRIALS@|$max_trials|g" \
      -e "s|@TIME_LIMIT@|$limit|g" -e "s|@SAS@|$sas|g" -e "s|@FLOWS@|$flows|g" -e "s|@MODE@|$mode|g" -e "s|@RATE@|${RATE:-0}|g" \
      bench/profiles/router-esp.yaml.in >"$run/bench.yaml"
  # SA i: SPI 0x1000 + i, the profile's key; outbound, tunnel i carries
  # 10.0.3.0 + i; inbound, it comes from 198.18.0.1 + i (moat-bench's layout).
  # QOS=1: moatd.yaml has the shaping; QOS=toggle: moatd.yaml has none,
  # moatd-qos.yaml is the same plus the shaping.
  /usr/bin/python3 - "$dir" "$sas" "$key" "$run" "$qos" "$flows" "$qos_link" "${MEMORY_MB:-256}" <<'PY'
import ipaddress, json, sys
d, n, key, run = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
qos, flows, link, mem = sys.argv[5], int(sys.argv[6]), sys.argv[7], sys.argv[8]
routes, tunnels = [], []
for i in range(n):
    sa = {"spi": 0x1000 + i, "key": key}
    if d == "outbound":
        routes.append({"prefix": f"{ipaddress.ip_address('10.0.3.0') + i}/32", "tunnel": f"t{i}"})
        tunnels.append({"name": f"t{i}", "local": "10.0.2.1", "peer": "10.0.2.2",
                        "sa": {"cipher": "aes-gcm-128", "out": sa}})
    else:
        tunnels.append({"name": f"t{i}", "local": "10.0.1.1", "peer": str(ipaddress.ip_address("198.18.0.1") + i),
                        "sa": {"cipher": "aes-gcm-128", "in": sa}})
text = open("bench/configs/moatd-esp.yaml.in").read().replace("@RUN@", run).replace("@MEMORY_MB@", mem)
text = text.replace("@ROUTES@", json.dumps(routes)).replace("@TUNNELS@", json.dumps(tunnels))
if qos in ("1", "toggle"):
    # Flow f leaves from port 1024 + f // n: each tunnel sees k = flows / n
    # source ports; a quarter of them per class.
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1}
    u = next(x for x in units if link.endswith(x))
    link_bits = float(link[: -len(u)]) * units[u]
    k = flows // n
    rules = [{"name": f"c{j}", "proto": "udp", "sport": f"{1024 + j * k // 4}-{1024 + (j + 1) * k // 4 - 1}",
              "class": f"c{j}"} for j in range(4)]
    moat = int(link_bits * 0.8 / n) // 32 * 32  # whole bytes per second for each leaf
    leaves = [{"name": f"c{j}", "rate": f"{moat // 4}bit", "ceil": link, "prio": j} for j in range(4)]
    block = "qos: " + json.dumps({"classes": [f"c{j}" for j in range(4)], "rules": rules,
                                  "shaping": [{"port": "b", "rate": link,
                                               "moats": {"rate": f"{moat}bit", "ceil": link, "classes": leaves,
                                                         "default": "c3"}}]}) + "\n"
    open(f"{run}/moatd-qos.yaml", "w").write(text + block)
open(f"{run}/moatd.yaml", "w").write(text + block if qos == "1" else text)
PY
  for f in "$run"/moatd*.yaml; do
    "$moatd" --config "$f" --check >/dev/null || { echo "esp-runs: moatd config $f rejected" >&2; exit 1; }
  done
  echo "esp-runs: $dir, $sas SA(s)" >&2
  taskset -c 0 timeout -k 5 $((limit + 30)) "$moat_bench" "$run/bench.yaml" --output "$out/esp-$dir-${sas}sa$tag.json" \
    --progress </dev/null &
  gen=$!
  pids=("$gen")
  # moatd's memif clients need the servers' sockets to exist.
  for _ in $(seq 100); do [ -S "$run/a.sock" ] && [ -S "$run/b.sock" ] && break; sleep 0.1; done
  timeout -k 5 $((limit + 30)) "$moatd" --config "$run/moatd.yaml" </dev/null >"$run/dut.log" 2>&1 &
  dut=$!
  pids+=("$dut")
  # moatd brings its memif ports up before its tables and workers (with
  # thousands of tunnels that takes seconds on a loaded machine): the
  # generator's first trial waits for $run/ready (trial.ready_file), made
  # once moatd's control loop answers, i.e. its workers run.
  for _ in $(seq $((limit * 5))); do
    kill -0 "$dut" 2>/dev/null || break
    if [ "$moatctl" = true ] || timeout 5 "$moatctl" --socket "$run/moatd.sock" show stats >/dev/null 2>&1; then
      touch "$run/ready"
      break
    fi
    sleep 0.2
  done
  # MODE=max: the worker's CPU time and packets sent over the middle of the
  # max-rate window (after the 1 s warm-up, until 0.5 s before its end),
  # where the generator keeps moatd's receive ring full: packets per CPU
  # second of the worker is its capacity on a core of its own, which a
  # machine shared with other jobs does not change as it changes wall-clock
  # rates. To OUT_DIR/esp-<DIR>-<SAS>sa<TAG>-cpu.json.
  if [ "$qos" = toggle ] && [ -e "$run/ready" ]; then
    # One moatd, the shaping switched on and off by `moatctl rules reload`
    # every TOGGLE_S seconds during one max-rate trial (MODE=max, DURATION
    # long enough), in the order off on on off (repeated): neighbouring
    # segments see the same machine. Each segment starts once the reload
    # returned (plus 0.3 s for the old plan's queues to leave) and gives the
    # worker's packets sent, wall time and CPU time.
    toggle_s=${TOGGLE_S:-2}
    sleep 1.5
    : >"$run/segments"
    for seg in $(seq "${TOGGLES:-16}"); do
      kill -0 "$dut" 2>/dev/null || { echo "esp-runs: moatd is gone (segment $seg)" >&2; status=1; break; }
      case $((seg % 4)) in 1|0) on=0 ;; *) on=1 ;; esac
      if [ $on = 1 ]; then f=$run/moatd-qos.yaml; else f=$run/moatd.yaml; fi
      gen_before=$(rules_generation)
      if ! "$moatctl" --socket "$run/moatd.sock" rules reload "$f" >/dev/null 2>&1; then
        # moatctl waits 5 s for an answer; a reload of 4,096 moats on a
        # loaded machine may take longer. It goes on: wait for its generation.
        for _ in $(seq 300); do
          kill -0 "$dut" 2>/dev/null || break
          g=$(rules_generation)
          [ -n "$g" ] && [ -n "$gen_before" ] && [ "$g" -gt "$gen_before" ] && break
          sleep 0.2
        done
        if [ "$(rules_generation)" -le "${gen_before:-0}" ]; then echo "esp-runs: reload $f failed" >&2; status=1; break; fi
      fi
      sleep 0.3
      a=$(sample)
      sleep "$toggle_s"
      b=$(sample)
      if [ -z "$a" ] || [ -z "$b" ]; then
        echo "esp-runs: segment $seg not sampled (moatd did not answer)" >&2
        continue
      fi
      echo "$on $a $b" >>"$run/segments"
      # The last segment with shaping: which leaves its packets went through.
      if [ $on = 1 ]; then
        "$moatctl" --socket "$run/moatd.sock" --json show qos b >"$out/esp-$dir-${sas}sa$tag-showqos.json" || true
      fi
    done
    /usr/bin/python3 - "$run/segments" "$(getconf CLK_TCK)" <<'PY' >"$out/esp-$dir-${sas}sa$tag-toggle.json"
import json, sys
segs = []
for line in open(sys.argv[1]):
    on, t0, c0, p0, t1, c1, p1 = line.split()
    cpu = (float(c1) - float(c0)) / float(sys.argv[2])
    pk = float(p1) - float(p0)
    segs.append({"qos": on == "1", "wall_s": float(t1) - float(t0), "worker_cpu_s": cpu, "worker_tx_pkts": pk,
                 "wall_pps": pk / (float(t1) - float(t0)), "pps_per_cpu_s": pk / cpu if cpu else None})
print(json.dumps({"segments": segs}, indent=1))
PY
    # The segments are the measurement: the trial's own figures are not.
    kill -TERM "$gen" 2>/dev/null || true
  fi
  if [ "$mode" = max ] && [ "$qos" != toggle ] && [ "$moatctl" != true ] && [ -e "$run/ready" ]; then
    sleep 1.5
    a=$(sample)
    sleep "$(/usr/bin/python3 -c "print(max($dur - 1, 0.5))")"
    b=$(sample)
    /usr/bin/python3 - "$a" "$b" "$(getconf CLK_TCK)" <<'PY' >"$out/esp-$dir-${sas}sa$tag-cpu.json"
import json, sys
(t0, c0, p0), (t1, c1, p1) = ([float(x) for x in v.split()] for v in sys.argv[1:3])
cpu = (c1 - c0) / float(sys.argv[3])
print(json.dumps({"wall_s": t1 - t0, "worker_cpu_s": cpu, "worker_tx_pkts": p1 - p0,
                  "pps_per_cpu_s": (p1 - p0) / cpu if cpu else None, "wall_pps": (p1 - p0) / (t1 - t0)}))
PY
  fi
  if ! wait "$gen" && [ "$qos" != toggle ]; then
    echo "esp-runs: moat-bench ($dir) exited with $?; moatd log:" >&2; tail -5 "$run/dut.log" >&2; status=1
  fi
  if [ "$qos" = 1 ]; then
    "$moatctl" --socket "$run/moatd.sock" --json show qos b >"$out/esp-$dir-${sas}sa$tag-showqos.json" ||
      { echo "esp-runs: moatctl show qos b failed" >&2; status=1; }
  fi
  "$moatctl" --socket "$run/moatd.sock" --json show stats >"$out/esp-$dir-${sas}sa$tag-stats.json" 2>/dev/null || true
  stop_process "$dut"
  cp "$run/dut.log" "$out/esp-$dir-${sas}sa$tag-moatd.log"
  pids=()
done

/usr/bin/python3 - "$out" "$sas" "$tag" "${dirs[@]}" <<'PY'
import json, os, sys
out, sas, tag, dirs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
print("| direction | frame in | NDR Mpps | PDR (0.1 %) Mpps | most received Mpps | ESP checked / failed | load avg | verdict |")
print("|---|---|---|---|---|---|---|---|")
for d in dirs:
    f = f"{out}/esp-{d}-{sas}sa{tag}.json"
    if not os.path.exists(f):
        continue
    doc = json.load(open(f))
    for r in doc["results"]:
        size = r["size"]
        trials = [t for t in doc["trials"] if t["size"] == size]
        rx = max((t["received"]["pps"] for t in trials), default=0) / 1e6
        chk = sum(t.get("esp", {}).get("checked", 0) for t in trials)
        bad = sum(t.get("esp", {}).get("failed", 0) for t in trials)
        ndr = f"{r['ndr']['pps'] / 1e6:.3f}" if r.get("ndr") else "—"
        pdr = f"{r['pdr']['pps'] / 1e6:.3f}" if r.get("pdr") else "—"
        print(f"| {d} | {size} B | {ndr} | {pdr} | {rx:.3f} | {chk} / {bad} | {doc.get('load_avg')} | {r['verdict']} |")
PY
exit $status
