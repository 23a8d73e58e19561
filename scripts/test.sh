#!/usr/bin/env bash
# Runs every test: installs what is missing, builds both profiles (hub and
# portable), runs unit, pcap and namespace-lab suites. Exit status is non-zero
# if any test fails. Needs root (namespaces, TAP devices).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
status=0
dirs=()
for profile in hub portable; do
  dir=build-$profile
  dirs+=("$dir")
  [ -d "$dir" ] || meson setup "$dir" -Dprofile=$profile
  ninja -C "$dir"
  # The namespace lab runs once (hub build); unit and pcap suites on both.
  suites=(--suite unit --suite pcap)
  # IKE interop (strongSwan in namespaces) and the bounded fuzz run: hub only.
  [ "$profile" = hub ] && suites+=(--suite lab --suite ike --suite fuzz)
  if ! meson test -C "$dir" --print-errorlogs "${suites[@]}"; then
    status=1
  fi
done
# Last, so that a log cut to its tail still names what failed.
./scripts/failed-tests.py "${dirs[@]}" || true
exit $status
