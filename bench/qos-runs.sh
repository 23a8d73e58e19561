#!/usr/bin/env bash
# QoS end to end (issue 7 "Cost: forwarding with QoS ÷ without";
# docs/PERFORMANCE.md "QoS end to end"): outbound ESP through moatd
# (bench/esp-runs.sh) with 512-byte inner packets (530-byte frames), with and
# without a qos.shaping tree whose `moats:` template gives each tunnel a
# subtree of 4 classes, for 4,096 tunnels and for 1.
#
# The machine is shared: wall-clock rates move by 3x from one minute to the
# next, so the two configurations are compared inside one moatd under one
# max-rate trial (esp-runs.sh QOS=toggle): `moatctl rules reload` switches the
# shaping off and on every TOGGLE_S (2) s, in the order off on on off, for
# TOGGLES (8) segments. Each segment gives the worker's packets sent, wall
# time and CPU time; packets per worker CPU second is the capacity on a core
# of one's own, which the other jobs move less than the wall-clock rate. A
# repetition's ratio pools its segments: (packets / CPU s with) ÷ (without).
# NDR=1 also runs, per repetition and tunnel count, a separate NDR search for
# each configuration (fresh moatd each; the order alternates).
#
#   bench/qos-runs.sh [BUILD_DIR] [OUT_DIR]     (defaults: build bench/results/qos-e2e)
# Environment: REPS (3), SAS_LIST ("4096 1"), TOGGLES (8), TOGGLE_S (2),
# NDR (0), MAX_TRIALS (8), and what esp-runs.sh reads.
# Writes OUT_DIR/esp-outbound-<N>sa-r<REP>-toggle.json (the segments),
# ...-r<REP>-showqos.json (moatctl --json show qos b after the last segment
# with shaping; gzipped above 1 MB), ...-stats.json, ...-moatd.log, the moat-bench JSON, with
# NDR=1 ...-<N>sa-qos{0,1}-r<REP>.json, and OUT_DIR/summary.json; prints a
# markdown table.
# Exit status: 0 every run completed; 1 a run failed; 2 usage.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${2:-bench/results/qos-e2e}
reps=${REPS:-3}
read -r -a sas_list <<<"${SAS_LIST:-4096 1}"
toggles=${TOGGLES:-8}
toggle_s=${TOGGLE_S:-2}
export MEMORY_MB=${MEMORY_MB:-1024} DIRS=outbound SIZES="[530]" TOGGLES=$toggles TOGGLE_S=$toggle_s
mkdir -p "$out"
status=0
for rep in $(seq "$reps"); do
  for sas in "${sas_list[@]}"; do
    # 4 flows per tunnel at least (one per class), 256 at least in all.
    flows=$((4 * sas > 256 ? 4 * sas : 256))
    # Long enough for the segments and the reloads (a few seconds each with
    # 4,096 moats on a loaded machine); the trial is stopped after them.
    dur=$((toggles * (toggle_s + 15) + 20))
    echo "qos-runs: repetition $rep, $sas tunnel(s), shaping toggled" >&2
    QOS=toggle SAS=$sas FLOWS=$flows MODE=max DURATION=$dur TIME_LIMIT=$((dur + 60)) TAG="-r$rep" \
      bench/esp-runs.sh "$build" "$out" >&2 || status=1
    if [ "${NDR:-0}" = 1 ]; then
      if [ $((rep % 2)) -eq 1 ]; then order="0 1"; else order="1 0"; fi
      for q in $order; do
        echo "qos-runs: repetition $rep, $sas tunnel(s), NDR, QOS=$q" >&2
        QOS=$q SAS=$sas FLOWS=$flows MODE=ndr DURATION=1 TAG="-qos$q-r$rep" \
          bench/esp-runs.sh "$build" "$out" >&2 || status=1
      done
    fi
  done
done

/usr/bin/python3 - "$out" "$reps" "${sas_list[@]}" <<'PY'
import gzip, json, os, statistics, sys
out, reps, sas_list = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3:]]


def leaves(f):
    # Which moats' leaves sent packets (the tree's classes named TUNNEL/CLASS).
    q = json.load(gzip.open(f) if f.endswith(".gz") else open(f))[0]
    sent = {}
    for c in q["classes"]:
        if "/" in c["name"]:
            t, cls = c["name"].split("/", 1)
            sent.setdefault(t, {})[cls] = c["sent_pkts"]
    return {"moats": len(sent),
            "moats_all_4_classes_sent": sum(1 for v in sent.values() if len(v) == 4 and all(x > 0 for x in v.values())),
            "leaf_sent_pkts": sum(sum(v.values()) for v in sent.values()),
            "example": {t: sent[t] for t in list(sent)[:2] + list(sent)[-1:]}}


def spread(xs):
    xs = [x for x in xs if x is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": xs} if xs else None


def ndr(f):
    if not os.path.exists(f):
        return None
    r = json.load(open(f))["results"][0]
    return r["ndr"]["pps"] if r.get("ndr") else None


summary = {"frame_bytes": 530, "inner_ip_bytes": 512, "cases": []}
rows = []
for sas in sas_list:
    case = {"tunnels": sas, "repetitions": []}
    for rep in range(1, reps + 1):
        f = f"{out}/esp-outbound-{sas}sa-r{rep}-toggle.json"
        if not os.path.exists(f):
            continue
        segs = json.load(open(f))["segments"]
        pool = {}
        for on in (False, True):
            s = [x for x in segs if x["qos"] == on]
            pk, cpu, wall = (sum(x[k] for x in s) for k in ("worker_tx_pkts", "worker_cpu_s", "wall_s"))
            pool[on] = {"segments": len(s), "pkts": pk, "cpu_s": cpu, "wall_s": wall,
                        "pps_per_cpu_s": pk / cpu if cpu else None, "wall_pps": pk / wall if wall else None}
        e = {"rep": rep, "without": pool[False], "with": pool[True],
             "cpu_ratio": pool[True]["pps_per_cpu_s"] / pool[False]["pps_per_cpu_s"],
             "wall_ratio": pool[True]["wall_pps"] / pool[False]["wall_pps"]}
        sq = f"{out}/esp-outbound-{sas}sa-r{rep}-showqos.json"
        if os.path.getsize(sq) > 1 << 20 if os.path.exists(sq) else False:
            # 4,096 moats: about 10 MB of JSON; kept gzipped.
            with open(sq, "rb") as src, gzip.open(sq + ".gz", "wb", 9) as dst:
                dst.write(src.read())
            os.remove(sq)
        if os.path.exists(sq + ".gz"):
            sq += ".gz"
        if os.path.exists(sq):
            e["show_qos"] = leaves(sq)
        n0, n1 = ndr(f"{out}/esp-outbound-{sas}sa-qos0-r{rep}.json"), ndr(f"{out}/esp-outbound-{sas}sa-qos1-r{rep}.json")
        if n0 is not None or n1 is not None:
            e["ndr"] = {"without_pps": n0, "with_pps": n1, "ratio": n1 / n0 if n0 and n1 else None}
        case["repetitions"].append(e)
    rs = case["repetitions"]
    for name, key, src in (("packets per worker CPU second", "cpu", "pps_per_cpu_s"),
                           ("wall-clock rate", "wall", "wall_pps")):
        case[key] = {"ratio": spread([e[f"{key}_ratio"] for e in rs]),
                     "without_pps": spread([e["without"][src] for e in rs]),
                     "with_pps": spread([e["with"][src] for e in rs])}
        if case[key]["ratio"]:
            rows.append((sas, name, case[key]))
    nd = [e["ndr"] for e in rs if e.get("ndr")]
    if nd:
        case["ndr"] = {"ratio": spread([x["ratio"] for x in nd]), "without_pps": spread([x["without_pps"] for x in nd]),
                       "with_pps": spread([x["with_pps"] for x in nd])}
        if case["ndr"]["ratio"]:
            rows.append((sas, "NDR, separate runs (wall clock)", case["ndr"]))
    summary["cases"].append(case)
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print("| tunnels | metric | without Mpps (median) | with Mpps (median) | with ÷ without, median | min–max | repetitions |")
print("|---|---|---|---|---|---|---|")
for sas, name, c in rows:
    r = c["ratio"]
    print(f"| {sas} | {name} | {c['without_pps']['median'] / 1e6:.3f} | {c['with_pps']['median'] / 1e6:.3f} | "
          f"**{r['median']:.3f}** | {r['min']:.3f}–{r['max']:.3f} | {len(r['values'])} |")
PY
exit $status
