#!/usr/bin/env bash
# Which moat-bench transmit mode is fastest (docs/PERFORMANCE.md)? For each
# frame size and --tx-mode (prebuilt, copy, refcnt), in alternating rounds:
#   null     generator alone: port A is net_null (frees what it is given), so
#            this is the cost of producing frames, nothing else;
#   testpmd  the fwd-e2e ceiling: memif ⇄ dpdk-testpmd io (CPU 1) ⇄ memif.
# Writes bench/results/tx-modes.json and prints medians (Mpps).
#   bench/tx-modes.sh [BUILD_DIR] [DURATION_S] [ROUNDS]     (defaults: build 3 3)
# Environment: MOAT_BENCH, TESTPMD, SIZES ("64 1500"), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
dur=${2:-3}
rounds=${3:-3}
moat_bench=${MOAT_BENCH:-$build/bench/moat-bench}
testpmd=${TESTPMD:-dpdk-testpmd}
read -r -a sizes <<<"${SIZES:-64 1500}"
modes=(prebuilt copy refcnt)
out=${OUT:-bench/results/tx-modes.json}
limit=$((dur + 30))
[ -x "$moat_bench" ] || { echo "tx-modes: no moat-bench at $moat_bench" >&2; exit 2; }

run=$(mktemp -d /tmp/moat-txm.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

memif() { echo "net_memif$1,role=$2,id=0,socket=$run/$1.sock,socket-abstract=no"; }

n=0
one() {  # $1 null|testpmd, $2 size, $3 mode, $4 round
  n=$((n + 1))
  local a b gen dut=""
  if [ "$1" = null ]; then
    a=net_null0,no-rx=1 b=net_null1,no-rx=1
  else
    rm -f "$run"/*.sock
    a=$(memif 0 server) b=$(memif 1 server)
  fi
  taskset -c 0 timeout -k 5 "$limit" "$moat_bench" --port-a "$a" --port-b "$b" --lcore 0 \
    --size "$2" --tx-mode "$3" --duration "$dur" --warmup 1 --file-prefix moat-txm-gen \
    >"$run/r-$n.json" 2>"$run/r-$n.err" </dev/null &
  gen=$!
  pids=("$gen")
  if [ "$1" = testpmd ]; then
    for _ in $(seq 100); do [ -S "$run/0.sock" ] && [ -S "$run/1.sock" ] && break; sleep 0.1; done
    timeout -k 5 "$limit" "$testpmd" -l 0,1 --main-lcore 0 --no-huge -m 512 --no-pci \
      --file-prefix moat-txm-dut --log-level '*:error' --vdev "$(memif 0 client)" --vdev "$(memif 1 client)" \
      -- --forward-mode=io --nb-cores=1 --auto-start --stats-period=3600 --total-num-mbufs=16384 \
      </dev/null >"$run/dut.log" 2>&1 &
    dut=$!
    pids+=("$dut")
  fi
  wait "$gen" || echo "tx-modes: moat-bench failed: $(cat "$run/r-$n.err")" >&2
  if [ -n "$dut" ]; then kill -TERM "$dut" 2>/dev/null || true; wait "$dut" 2>/dev/null || true; fi
  pids=()
  echo "{\"path\": \"$1\", \"size\": $2, \"mode\": \"$3\", \"round\": $4, \"file\": \"$run/r-$n.json\"}" >>"$run/index"
}

for r in $(seq "$rounds"); do
  for s in "${sizes[@]}"; do
    for path in null testpmd; do
      for m in "${modes[@]}"; do
        echo "tx-modes: round $r, $s B, $path, $m" >&2
        one "$path" "$s" "$m" "$r"
      done
    done
  done
done

mkdir -p "$(dirname "$out")"
/usr/bin/python3 - "$run/index" "$out" "$dur" "$rounds" <<'PY'
import datetime, json, os, statistics, subprocess, sys
index, out, dur, rounds = sys.argv[1:]
rows = []
for line in open(index):
    e = json.loads(line)
    try:
        e["result"] = json.load(open(e.pop("file")))
    except Exception as x:
        e["error"] = str(x)
    rows.append(e)
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
doc = {"benchmark": "tx-modes", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "machine": f"{os.cpu_count()} CPUs, {model}", "commit": commit, "duration_s": float(dur),
       "rounds": int(rounds), "trials": rows}
json.dump(doc, open(out, "w"), indent=1)
key = {"null": "tx_mpps", "testpmd": "rx_mpps"}
print("| frame (B) | path | prebuilt Mpps | copy Mpps | refcnt Mpps |")
print("|---|---|---|---|---|")
for size in sorted({r["size"] for r in rows}):
    for path in ("null", "testpmd"):
        cells = []
        for mode in ("prebuilt", "copy", "refcnt"):
            v = [r["result"][key[path]] for r in rows if r["size"] == size and r["path"] == path
                 and r["mode"] == mode and "result" in r]
            cells.append(f"{statistics.median(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})" if v else "—")
        label = "generator alone (net_null)" if path == "null" else "memif ⇄ testpmd io"
        print(f"| {size} | {label} | " + " | ".join(cells) + " |")
print(f"\nMedians (each round); {rounds} rounds of {dur} s; {doc['machine']}; commit {commit}; {out}")
PY
