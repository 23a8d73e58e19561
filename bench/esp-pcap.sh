#!/usr/bin/env bash
# The issue's ESP speed harness (issue 4; docs/PERFORMANCE.md "ESP on the
# issue's harness"): moatd with one worker (CPU 1), input from net_pcap with
# infinite_rx=1, output to net_null; the raw AES-GCM-128 rate of the same
# sizes from dpdk-test-crypto-perf on crypto_aesni_mb (also CPU 1), in the
# same run, rounds alternating; every ratio is taken within one round.
#
#   bench/esp-pcap.sh [BUILD_DIR] [OUT_DIR]     (defaults: build bench/results/esp-pcap)
# Environment: N (300000: packets per pcap), ROUNDS (3), DURATION (2 s,
# outbound interval), CASES (all: out-64 out-512 out-1420 in-64 in-512
# in-1420 out-64-10k out-frag in-frag out-64-2w out-64-small out-512-small
# out-1420-small: outbound from a SMALL_N-packet pcap; in-64-10k: 10,000
# inbound SAs; in-64-2w: two workers, an SA each), SMALL_N (256: the outbound
# goals' pcap, in a 1 MB L2; 4096 before session 10), BURST (32: moatd's workers.burst), MOATD,
# ESP_TOOL, CRYPTO_PERF, HUGE (1: moatd and the references on hugetlbfs, which
# the caller mounts and reserves; default --no-huge). Needs about 1.7 GB of memory per moatd run (N mbufs); moatd takes ~20 s to load 300,000 packets.
# How inbound stays honest under infinite_rx replay: bench/esp_pcap.py.
# Writes OUT_DIR/esp-pcap.json and prints the ratios as a markdown table.
# Exit status: 0 done; 1 a run failed; 2 usage (missing binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${2:-bench/results/esp-pcap}
for b in "${MOATD:-$build/ctrl/moatd}" "${ESP_TOOL:-$build/tests/esp_tool}" "${CRYPTO_PERF:-/usr/bin/dpdk-test-crypto-perf}"; do
  [ -x "$b" ] || { echo "esp-pcap: $b missing (ninja -C $build ctrl/moatd tests/esp_tool; apt-get install dpdk)" >&2; exit 2; }
done
# The driver and its pollers stay off the worker's CPU.
exec taskset -c 0 /usr/bin/python3 bench/esp_pcap.py "$build" "$out"
