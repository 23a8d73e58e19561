#!/usr/bin/python3
"""Draws moat-bench results (the JSON of `moat-bench --output`).

    bench/plot.py RESULTS.json [MORE.json ...] -o FIGURE.png|.svg [--title T]

One figure, three panels:
  1. rate per frame size: NDR and PDR (Mpps) of each size, or the received
     rate of fixed/max-rate trials, with the L1 Gbit/s written on the bars;
  2. loss per frame size: every trial's loss against its offered rate, one
     series per size (the search's path, RFC 2544's "frame loss rate" curve);
  3. latency distribution: the CDF of each size's NDR trial (or its last
     trial), from the sink's histogram, on a log time axis.
Several files (e.g. moatd and the harness's own loop) are drawn side by
side, labelled by file name. Needs python3-matplotlib (scripts/setup.sh).
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # no display on build machines
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path) as f:
        d = json.load(f)
    if d.get("tool") != "moat-bench":
        sys.exit(f"plot: {path}: not a moat-bench result")
    return d


def rate_of(result, trials):
    """(Mpps, label, L1 Gbit/s) per result: NDR if the search found one."""
    out = []
    for key in ("ndr", "pdr"):
        point = result.get(key)
        if point:
            out.append((point["pps"] / 1e6, key.upper(), point.get("bps_l1", 0) / 1e9))
    if not out and result.get("trials"):
        t = trials[result["trials"][-1]]
        out.append((t["received"]["pps"] / 1e6, "received", t["received"]["bps_l1"] / 1e9))
    return out


def latency_trial(result, trials):
    point = result.get("ndr") or result.get("pdr")
    if point and "trial" in point:
        return trials[point["trial"]]
    return trials[result["trials"][-1]] if result.get("trials") else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("-o", "--output", required=True, help="figure file: .png or .svg")
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    docs = [(os.path.splitext(os.path.basename(p))[0], load(p)) for p in a.results]

    fig, (ax_rate, ax_loss, ax_lat) = plt.subplots(1, 3, figsize=(17, 5.2))
    sizes = []
    for _, d in docs:
        for r in d.get("results", []):
            if r["size"] not in sizes:
                sizes.append(r["size"])
    width = 0.8 / max(1, len(docs) * 2)
    bar = 0
    for di, (name, d) in enumerate(docs):
        trials = d.get("trials", [])
        for kind in ("NDR", "PDR", "received"):
            xs, ys, notes = [], [], []
            for r in d.get("results", []):
                for mpps, label, gbps in rate_of(r, trials):
                    if label == kind:
                        xs.append(sizes.index(r["size"]) + bar * width - 0.4 + width / 2)
                        ys.append(mpps)
                        notes.append(f"{gbps:.1f}G")
            if not xs:
                continue
            bars = ax_rate.bar(xs, ys, width, label=f"{name} {kind}")
            for b, n in zip(bars, notes):
                ax_rate.annotate(n, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                                 fontsize=7)
            bar += 1
        for r in d.get("results", []):
            ts = [trials[i] for i in r.get("trials", [])]
            pts = sorted((t["offered"]["pps"] / 1e6, max(t["loss"], 0) * 100) for t in ts)
            if pts:
                ax_loss.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"{name} {r['size']} B")
            t = latency_trial(r, trials)
            h = (t or {}).get("latency_ns", {}).get("histogram") if t else None
            if h:
                total = sum(c for _, _, c in h)
                xs, ys, acc = [], [], 0
                for lo, hi, c in h:
                    acc += c
                    xs.append(max(hi, 1) / 1e3)
                    ys.append(acc / total)
                ax_lat.step(xs, ys, where="post",
                            label=f"{name} {r['size']} B @ {t['offered']['pps'] / 1e6:.2f} Mpps "
                                  f"(p99 {t['latency_ns']['p99'] / 1e3:.1f} us)")
    ax_rate.set_xticks(range(len(sizes)))
    ax_rate.set_xticklabels([f"{s} B" for s in sizes])
    ax_rate.set_ylabel("Mpps (label: Gbit/s at L1)")
    ax_rate.set_title("rate per frame size")
    ax_rate.legend(fontsize=7)
    ax_loss.set_xlabel("offered Mpps")
    ax_loss.set_ylabel("loss %")
    ax_loss.set_yscale("symlog", linthresh=0.001)
    ax_loss.set_title("loss per trial")
    if ax_loss.has_data():
        ax_loss.legend(fontsize=7)
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("latency (us)")
    ax_lat.set_ylabel("fraction of frames at or below")
    ax_lat.set_title("latency distribution")
    if ax_lat.has_data():
        ax_lat.legend(fontsize=7)
    first = docs[0][1]
    v = first.get("versions", {})
    fig.suptitle(a.title or f"moat-bench — {', '.join(n for n, _ in docs)} — moat {v.get('moat', '?')}, "
                 f"{v.get('dpdk', '?')}, {first.get('started_utc', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(a.output)
    print(a.output)


if __name__ == "__main__":
    main()
