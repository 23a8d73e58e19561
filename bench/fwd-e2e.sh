#!/usr/bin/env bash
# End-to-end forwarding benchmark: moat-bench (generator + sink, CPU 0) ⇄ two
# memif links ⇄ router under test (forwarding on CPU 1). In one run, for each
# frame size, the ceiling of the harness with dpdk-testpmd --forward-mode=io
# in the middle, then moatd (full validation, route lookup, ARP table,
# counters). Prints a markdown table and writes bench/results/fwd-e2e.json.
# Trials alternate testpmd/moatd and repeat REPEAT times (default 3); the
# table shows medians, because these shared machines are noisy.
#   bench/fwd-e2e.sh [BUILD_DIR] [DURATION_S] [REPEAT]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
dur=${2:-5}
repeat=${3:-3}
sizes=(64 1500)
run=$(mktemp -d /tmp/moat-fwd.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$run"
}
trap cleanup EXIT INT TERM

bench_args() {  # $1 size
  echo --port-a "net_memif0,role=server,socket=$run/a.sock,socket-abstract=no,id=0" \
       --port-b "net_memif1,role=server,socket=$run/b.sock,socket-abstract=no,id=0" \
       --lcore 0 --size "$1" --flows 256 --duration "$dur" --warmup 1 \
       --dst-mac 02:00:00:00:0a:01 --mac-a 02:00:00:00:be:0a --mac-b 02:00:00:00:be:0b \
       --src-ip 10.0.1.2 --dst-ip 10.0.2.2 --file-prefix moat-bench-gen
}

trial() {  # $1 router (testpmd|moatd) $2 size → JSON line
  rm -f "$run"/*.sock
  "$build/bench/moat-bench" $(bench_args "$2") >"$run/gen.json" 2>"$run/gen.err" &
  local gen=$!
  pids+=("$gen")
  sleep 1  # the memif servers listen before the router connects
  if [ "$1" = testpmd ]; then
    timeout $((dur + 30)) dpdk-testpmd -l 0,1 --main-lcore 0 --no-huge -m 512 --no-pci --file-prefix moat-bench-dut \
      --log-level '*:error' \
      --vdev "net_memif0,role=client,socket=$run/a.sock,socket-abstract=no,id=0" \
      --vdev "net_memif1,role=client,socket=$run/b.sock,socket-abstract=no,id=0" \
      -- --forward-mode=io --nb-cores=1 --auto-start --stats-period=3600 --total-num-mbufs=16384 </dev/null \
      >"$run/dut.log" 2>&1 &
  else
    cat >"$run/moatd.yaml" <<EOF2
eal: {lcores: [0, 1], memory_mb: 512, no_huge: true, file_prefix: moat-bench-dut, log_level: "*:error"}
mempool: {mbufs: 16383}
ports:
  - {name: a, device: "net_memif0,role=client,socket=$run/a.sock,socket-abstract=no,id=0", address: 10.0.1.1/24, mac: "02:00:00:00:0a:01"}
  - {name: b, device: "net_memif1,role=client,socket=$run/b.sock,socket-abstract=no,id=0", address: 10.0.2.1/24, mac: "02:00:00:00:0b:01"}
neighbors:
  - {ip: 10.0.2.2, mac: "02:00:00:00:be:0b", port: b}
  - {ip: 10.0.2.3, mac: "02:00:00:00:be:0b", port: b}
workers: {burst: 32}
punt: {enabled: false}
control: {socket: $run/moatd.sock}
EOF2
    timeout $((dur + 30)) "$build/ctrl/moatd" --config "$run/moatd.yaml" >"$run/dut.log" 2>&1 &
  fi
  local dut=$!
  pids+=("$dut")
  wait "$gen" || { echo "moat-bench failed: $(cat "$run/gen.err")" >&2; exit 1; }
  if [ "$1" = moatd ]; then
    "$build/ctrl/moatctl" --socket "$run/moatd.sock" --json show stats >"$run/moatd-stats.json" 2>/dev/null || true
  fi
  kill "$dut" 2>/dev/null || true
  wait "$dut" 2>/dev/null || true
  cat "$run/gen.json"
}

mkdir -p bench/results
out=bench/results/fwd-e2e.json
{
  echo "{\"machine\": \"$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\","
  echo " \"dpdk\": \"$(pkg-config --modversion libdpdk)\", \"commit\": \"$(git rev-parse --short HEAD)\", \"duration_s\": $dur,"
  echo " \"trials\": ["
  first=1
  for i in $(seq "$repeat"); do
    for s in "${sizes[@]}"; do
      for r in testpmd moatd; do
        j=$(trial "$r" "$s")
        [ $first = 1 ] || echo ","
        first=0
        echo "  {\"router\": \"$r\", \"round\": $i, \"result\": $j}"
      done
    done
  done
  echo " ]}"
} >"$out"

/usr/bin/python3 - "$out" <<'EOF3'
import json, statistics, sys
d = json.load(open(sys.argv[1]))
rows = {}
for t in d["trials"]:
    rows.setdefault(t["result"]["size"], {}).setdefault(t["router"], []).append(t["result"])
print(f"| frame | testpmd io Mpps (median) | moatd Mpps (median) | moatd / testpmd | per-round ratios | moatd worst loss |")
print(f"|---|---|---|---|---|---|")
for size, r in sorted(rows.items()):
    tp = [x["rx_mpps"] for x in r["testpmd"]]
    mo = [x["rx_mpps"] for x in r["moatd"]]
    ratios = [m / t if t else 0 for m, t in zip(mo, tp)]
    mt, mm = statistics.median(tp), statistics.median(mo)
    print(f"| {size} B | {mt:.3f} | {mm:.3f} | {mm / mt if mt else 0:.2f} | {', '.join(f'{x:.2f}' for x in ratios)} | "
          f"{max(x['loss'] for x in r['moatd']):.4f} |")
print(f"\n{sys.argv[1]}: {d['machine']}, DPDK {d['dpdk']}, commit {d['commit']}")
EOF3
