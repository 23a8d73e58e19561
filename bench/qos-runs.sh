#!/usr/bin/env bash
# QoS end to end (issue 7 "Cost: forwarding with QoS ÷ without";
# docs/PERFORMANCE.md "QoS end to end"): outbound ESP through moatd
# (bench/esp-runs.sh) with 512-byte inner packets (530-byte frames), with and
# without a qos.shaping tree whose `moats:` template gives each tunnel a
# subtree of 4 classes (QOS=1 in esp-runs.sh), for 4,096 tunnels and for 1.
# The two configurations run interleaved (the order alternates between
# repetitions), so each repetition gives a ratio measured under the same load.
#
#   bench/qos-runs.sh [BUILD_DIR] [OUT_DIR]     (defaults: build bench/results/qos-e2e)
# Environment: REPS (3), SAS_LIST ("4096 1"), MODE (ndr | max), MAX_TRIALS (8),
# DURATION (1), and what esp-runs.sh reads.
# Writes OUT_DIR/esp-outbound-<N>sa-qos{0,1}-r<REP>.json (moat-bench),
# ...-qos1-r<REP>-showqos.json (moatctl --json show qos b after the run) and
# OUT_DIR/summary.json; prints a markdown table.
# Exit status: 0 every run completed; 1 a run failed; 2 usage.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${2:-bench/results/qos-e2e}
reps=${REPS:-3}
read -r -a sas_list <<<"${SAS_LIST:-4096 1}"
export DIRS=outbound SIZES="[530]" MODE=${MODE:-ndr} MAX_TRIALS=${MAX_TRIALS:-8} DURATION=${DURATION:-1}
mkdir -p "$out"
status=0
for rep in $(seq "$reps"); do
  for sas in "${sas_list[@]}"; do
    # 4 flows per tunnel at least (one per class), 256 at least in all.
    flows=$((4 * sas > 256 ? 4 * sas : 256))
    if [ $((rep % 2)) -eq 1 ]; then order="0 1"; else order="1 0"; fi
    for q in $order; do
      echo "qos-runs: repetition $rep, $sas tunnel(s), QOS=$q" >&2
      QOS=$q SAS=$sas FLOWS=$flows TAG="-qos$q-r$rep" bench/esp-runs.sh "$build" "$out" >&2 || status=1
    done
  done
done

/usr/bin/python3 - "$out" "$reps" "${sas_list[@]}" <<'PY'
import json, os, statistics, sys
out, reps, sas_list = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3:]]


def figures(f):
    doc = json.load(open(f))
    r = doc["results"][0]
    rx = max((t["received"]["pps"] for t in doc["trials"]), default=0)
    ndr = r["ndr"]["pps"] if r.get("ndr") else None
    return {"ndr_pps": ndr, "max_received_pps": rx, "verdict": r.get("verdict"), "load_avg": doc.get("load_avg")}


def leaves(f):
    # Which moats' leaves sent packets (the tree's classes named TUNNEL/CLASS).
    q = json.load(open(f))[0]
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
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": xs}


summary = {"frame_bytes": 530, "inner_ip_bytes": 512, "cases": []}
print("| tunnels | metric | without QoS Mpps (median) | with QoS Mpps (median) | ratio median | ratio min–max |")
print("|---|---|---|---|---|---|")
for sas in sas_list:
    case = {"tunnels": sas, "repetitions": []}
    for rep in range(1, reps + 1):
        f0, f1 = (f"{out}/esp-outbound-{sas}sa-qos{q}-r{rep}.json" for q in (0, 1))
        if not (os.path.exists(f0) and os.path.exists(f1)):
            continue
        a, b = figures(f0), figures(f1)
        e = {"rep": rep, "without": a, "with": b,
             "ndr_ratio": b["ndr_pps"] / a["ndr_pps"] if a["ndr_pps"] and b["ndr_pps"] else None,
             "max_ratio": b["max_received_pps"] / a["max_received_pps"] if a["max_received_pps"] else None}
        sq = f"{out}/esp-outbound-{sas}sa-qos1-r{rep}-showqos.json"
        if os.path.exists(sq):
            e["show_qos"] = leaves(sq)
        case["repetitions"].append(e)
    rs = case["repetitions"]
    for m, key in (("NDR", "ndr"), ("most forwarded", "max")):
        ratio = spread([e[f"{key}_ratio"] for e in rs])
        src = "ndr_pps" if key == "ndr" else "max_received_pps"
        w0 = spread([e["without"][src] for e in rs])
        w1 = spread([e["with"][src] for e in rs])
        case[f"{key}_ratio"], case[f"{key}_without_pps"], case[f"{key}_with_pps"] = ratio, w0, w1
        if ratio:
            print(f"| {sas} | {m} | {w0['median'] / 1e6:.3f} | {w1['median'] / 1e6:.3f} | "
                  f"{ratio['median']:.3f} | {ratio['min']:.3f}–{ratio['max']:.3f} |")
    summary["cases"].append(case)
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
PY
exit $status
