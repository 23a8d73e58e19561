#!/usr/bin/env bash
# The seeds' lab end to end: namespaces, two moatd routers on af_packet
# veths, ping/traceroute/iperf3 through them, TCP to a daemon behind the
# punt path, moatctl views. Needs root. Exit status: the lab's.
# MOATD/MOATCTL (set by meson test) default to build/ctrl/.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "$root/lab/moat-lab" run "$root/configs/lab.yaml" \
  --moatd "${MOATD:-$root/build/ctrl/moatd}" --moatctl "${MOATCTL:-$root/build/ctrl/moatctl}"
