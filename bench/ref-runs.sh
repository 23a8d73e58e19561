#!/usr/bin/env bash
# Reference runs of moat-bench (docs/PERFORMANCE.md, bench/results/):
#
#   loop     the harness's own ceiling: generator looped straight to sink over
#            memif in one process, pinned to CPU 0 (bench/profiles/loop-memif.yaml);
#   moatd    Moat plain IPv4 forwarding: moat-bench (generator + sink, CPU 0)
#            ⇄ two memif links ⇄ moatd (worker on CPU 1), NDR/PDR search per size
#            (bench/profiles/router-memif.yaml.in, bench/configs/moatd-memif.yaml.in);
#   testpmd  the same with dpdk-testpmd --forward-mode=io as the router (no
#            lookup, no rewrite): what memif itself allows;
#   esp-1, esp-10000  the harness's ESP generator looped to the sink, 1 and
#            10,000 SAs (bench/profiles/loop-esp.yaml.in), max rate.
# Rounds alternate the routers so drift on a shared machine hits all alike.
# The routers' memif rings are 16384 frames (rsize=14, the client side sets
# them) for both routers: on shared vCPUs a router loses its CPU for
# milliseconds, and a 1024-frame ring then overflows at any rate worth
# measuring.
# Then the speed check of issue 6: the harness's 64-byte loop rate against
# 2 × Moat's 64-byte rate (NDR, and the most it forwarded in any trial).
#
#   bench/ref-runs.sh [BUILD_DIR] [OUT_DIR]       (defaults: build bench/results/ref)
# Environment: SIZES ("[64, 1518]"), DURATION (1), MAX_TRIALS (10), ROUNDS (1),
# ROUTERS ("moatd testpmd"), ESP_SAS ("1 10000"), TIME_LIMIT (per moat-bench run, 200),
# MOAT_BENCH, MOATD, TESTPMD (binaries).
# Writes OUT_DIR/{loop,moatd,testpmd,esp-1,esp-10000}-rN.json (moat-bench's results),
# OUT_DIR/summary.json, OUT_DIR/ref.png; prints a markdown summary.
# Exit status: 0 every run completed; 1 a run failed; 2 usage.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${2:-bench/results/ref}
sizes=${SIZES:-"[64, 1518]"}
dur=${DURATION:-1}
max_trials=${MAX_TRIALS:-10}
rounds=${ROUNDS:-1}
limit=${TIME_LIMIT:-200}
read -r -a routers <<<"${ROUTERS-moatd testpmd}"  # ROUTERS="": harness-only runs
moat_bench=${MOAT_BENCH:-$build/bench/moat-bench}
moatd=${MOATD:-$build/ctrl/moatd}
testpmd=${TESTPMD:-dpdk-testpmd}
[ -x "$moat_bench" ] || { echo "ref-runs: no moat-bench at $moat_bench (ninja -C $build)" >&2; exit 2; }
mkdir -p "$out"
rm -f "$out"/*-r[0-9]*.json  # this script's own results: the summary must not mix runs

. bench/runs-lib.sh
runs_init moat-ref

fill() {  # template → stdout
  sed -e "s|@RUN@|$run|g" -e "s|@SIZES@|$sizes|g" -e "s|@DURATION@|$dur|g" \
      -e "s|@MAX_TRIALS@|$max_trials|g" -e "s|@TIME_LIMIT@|$limit|g" "$1"
}

status=0
loop() {  # $1 round
  rm -f "$run/loop.sock"
  sed -e "s|/tmp/moat-bench-loop.sock|$run/loop.sock|" -e "s|sizes: \[64, 1518\]|sizes: $sizes|" \
      -e "s|max_trials: 12|max_trials: $max_trials|" -e "s|duration_s: 2|duration_s: $dur|" \
      bench/profiles/loop-memif.yaml >"$run/loop.yaml"
  echo "ref-runs: round $1: loop (harness ceiling)" >&2
  taskset -c 0 timeout -k 5 $((limit + 30)) "$moat_bench" "$run/loop.yaml" --output "$out/loop-r$1.json" \
    --progress </dev/null || status=1
}

router() {  # $1 moatd|testpmd, $2 round
  local dut gen
  rm -f "$run"/*.sock
  fill bench/profiles/router-memif.yaml.in >"$run/bench.yaml"
  echo "ref-runs: round $2: $1" >&2
  taskset -c 0 timeout -k 5 $((limit + 30)) "$moat_bench" "$run/bench.yaml" --output "$out/$1-r$2.json" \
    --progress </dev/null &
  gen=$!
  pids=("$gen")
  # The router's memif clients need the servers' sockets to exist.
  for _ in $(seq 100); do [ -S "$run/a.sock" ] && [ -S "$run/b.sock" ] && break; sleep 0.1; done
  if [ "$1" = moatd ]; then
    fill bench/configs/moatd-memif.yaml.in >"$run/moatd.yaml"
    timeout -k 5 $((limit + 30)) "$moatd" --config "$run/moatd.yaml" </dev/null >"$run/dut.log" 2>&1 &
  else
    timeout -k 5 $((limit + 30)) "$testpmd" -l 0,1 --main-lcore 0 --no-huge -m 512 --no-pci \
      --file-prefix moat-ref-dut --log-level '*:error' \
      --vdev "net_memif0,role=client,id=0,socket=$run/a.sock,socket-abstract=no,rsize=14,mac=02:00:00:00:0a:01" \
      --vdev "net_memif1,role=client,id=0,socket=$run/b.sock,socket-abstract=no,rsize=14,mac=02:00:00:00:0b:01" \
      -- --forward-mode=io --nb-cores=1 --auto-start --stats-period=3600 --total-num-mbufs=16384 \
      </dev/null >"$run/dut.log" 2>&1 &
  fi
  dut=$!
  pids+=("$dut")
  wait "$gen" || { echo "ref-runs: moat-bench against $1 exited with $?; router log:" >&2; tail -5 "$run/dut.log" >&2; status=1; }
  stop_process "$dut"
  pids=()  # all waited for: never signal a PID that may have been reused
}

esp_loop() {  # $1 SAs, $2 round
  rm -f "$run/esp.sock"
  sed -e "s|@SAS@|$1|g" -e "s|@RUN@|$run|g" -e "s|@DURATION@|$dur|g" -e "s|@TIME_LIMIT@|$limit|g" \
    bench/profiles/loop-esp.yaml.in >"$run/esp.yaml"
  echo "ref-runs: round $2: ESP loop, $1 SAs" >&2
  taskset -c 0 timeout -k 5 $((limit + 30)) "$moat_bench" "$run/esp.yaml" --output "$out/esp-$1-r$2.json" \
    --progress </dev/null || status=1
}

for r in $(seq "$rounds"); do
  loop "$r"
  for x in "${routers[@]}"; do router "$x" "$r"; done
  if [ -n "${ESP_SAS:-1 10000}" ]; then for n in ${ESP_SAS:-1 10000}; do esp_loop "$n" "$r"; done; fi
done

/usr/bin/python3 - "$out" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
runs = {}
for f in sorted(glob.glob(f"{out}/*-r*.json")):
    name = os.path.basename(f).rsplit("-r", 1)[0]
    runs.setdefault(name, []).append(json.load(open(f)))

def best_rx(doc, size):
    return max((t["received"]["pps"] for t in doc["trials"] if t["size"] == size), default=0)

def res(doc, size):
    return next((r for r in doc["results"] if r["size"] == size), None)

summary = {"runs": {k: [os.path.basename(d.get("profile", {}).get("path", "")) for d in v] for k, v in runs.items()},
           "sizes": {}}
first = next(iter(runs.values()))[0]
summary["versions"] = first["versions"]
# The machine is shared: how busy it was says how far to trust absolute rates.
summary["load_avg"] = {n: [d.get("load_avg") for d in docs] for n, docs in runs.items()}
sizes = []
for docs in runs.values():
    for d in docs:
        for r in d["results"]:
            if r["size"] not in sizes:
                sizes.append(r["size"])
sizes.sort(key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
print("| frame | run | NDR Mpps | NDR Gbit/s L1 | PDR (0.1 %) Mpps | most received Mpps | p99 at NDR (us) | verdict | notes |")
print("|---|---|---|---|---|---|---|---|---|")
for size in sizes:
    row = {}
    for name, docs in runs.items():
        if not any(res(d, size) for d in docs):
            continue
        ndr = [res(d, size)["ndr"]["pps"] / 1e6 for d in docs if res(d, size) and res(d, size)["ndr"]]
        pdr = [res(d, size)["pdr"]["pps"] / 1e6 for d in docs if res(d, size) and res(d, size)["pdr"]]
        gbps = [res(d, size)["ndr"]["bps_l1"] / 1e9 for d in docs if res(d, size) and res(d, size)["ndr"]]
        p99 = [res(d, size)["ndr"]["latency_ns"]["p99"] / 1e3 for d in docs if res(d, size) and res(d, size)["ndr"]]
        rx = [best_rx(d, size) / 1e6 for d in docs]
        verdicts = sorted({res(d, size)["verdict"] for d in docs if res(d, size)})
        notes = sorted({n for d in docs if res(d, size) for n in res(d, size)["notes"]})
        bound = any(res(d, size)["harness_bound"] for d in docs if res(d, size))
        row[name] = {"ndr_mpps": ndr, "pdr_mpps": pdr, "ndr_gbps_l1": gbps, "p99_us_at_ndr": p99,
                     "max_rx_mpps": rx, "verdicts": verdicts, "harness_bound": bound, "notes": notes}
        med = lambda v: f"{statistics.median(v):.3f}" if v else "—"
        print(f"| {size} B | {name} | {med(ndr)} | {med(gbps)} | {med(pdr)} | {med(rx)} | {med(p99)} | "
              f"{', '.join(verdicts)} | {'harness-bound' if bound else ''} |")
    summary["sizes"][size] = row

# Issue 6's speed check: the harness (loop, one core) against 2 × Moat at 64 B.
s64 = summary["sizes"].get("64", {})
check = {"goal": "harness loop rate >= 2 x moatd 64-byte rate"}
if "loop" in s64 and "moatd" in s64 and s64["moatd"]["max_rx_mpps"]:
    loop = statistics.median(s64["loop"]["max_rx_mpps"])
    moat_ndr = statistics.median(s64["moatd"]["ndr_mpps"]) if s64["moatd"]["ndr_mpps"] else 0
    moat_max = statistics.median(s64["moatd"]["max_rx_mpps"])
    check.update({"loop_mpps": loop, "moatd_ndr_mpps": moat_ndr, "moatd_max_rx_mpps": moat_max,
                  "ratio_to_ndr": loop / moat_ndr if moat_ndr else None, "ratio_to_max_rx": loop / moat_max,
                  "met_for_ndr": bool(moat_ndr) and loop >= 2 * moat_ndr, "met_for_max_rx": loop >= 2 * moat_max})
    print(f"\nharness loop at 64 B: {loop:.2f} Mpps; moatd 64 B: NDR {moat_ndr:.2f} Mpps, most forwarded {moat_max:.2f} Mpps")
    print(f"loop / moatd NDR = {check['ratio_to_ndr'] or 0:.2f}, loop / moatd most forwarded = {check['ratio_to_max_rx']:.2f} "
          f"(goal >= 2: {'met' if check['met_for_max_rx'] else 'NOT met'} against the most forwarded)")
else:
    check["result"] = "not measured (needs the loop and moatd runs at 64 B)"
    print("\nspeed check: not measured")
summary["speed_check"] = check
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
PY
mapfile -t figs < <(ls "$out"/loop-r1.json "$out"/moatd-r1.json "$out"/testpmd-r1.json 2>/dev/null)
((${#figs[@]})) && { /usr/bin/python3 bench/plot.py "${figs[@]}" -o "$out/ref.png" >/dev/null || status=1; }
exit $status
