#!/usr/bin/env bash
# The narrow-WAN lab (configs/lab-mtu.yaml): a 1400-byte internet hop under
# the ESP tunnel. fragment-inner delivers 1500-byte DF packets intact,
# honor-df answers with the tunnel's inner MTU, clamp-mss makes TCP fit,
# and plain forwarding gets "fragmentation needed". Needs root.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "$root/lab/moat-lab" run "$root/configs/lab-mtu.yaml" \
  --moatd "${MOATD:-$root/build/ctrl/moatd}" --moatctl "${MOATCTL:-$root/build/ctrl/moatctl}"
