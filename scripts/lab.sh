#!/usr/bin/env bash
# The main job on its embedded default: builds Moat, then builds the seeds'
# lab (home-pc — moat — internet — portal — corp-host, plus kids-pc) in
# network namespaces, starts the routers, runs the checks (ping, traceroute,
# iperf3, a TCP service behind the punt path) and tears everything down.
# Usage: scripts/lab.sh [LABFILE]   (default configs/lab.yaml; needs root)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
[ -d build-hub ] || meson setup build-hub -Dprofile=hub
ninja -C build-hub
exec lab/moat-lab run "${1:-configs/lab.yaml}" --moatd build-hub/ctrl/moatd --moatctl build-hub/ctrl/moatctl
