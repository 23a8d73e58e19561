#!/usr/bin/env bash
# The lab always cleans up: after a failed check and after Ctrl-C in the
# middle of a run, no namespace, veth or router process of the lab remains.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
lab="$root/lab/moat-lab"
tmp=$(mktemp -d /tmp/moat-labtd.XXXXXX)
trap 'rm -rf "$tmp"; "$lab" down "$tmp/failing.yaml" >/dev/null 2>&1 || true' EXIT

leftovers() {
  { ip netns list | grep -E '^ml-' || true; ip -o link show | grep -E ': mlk' || true; pgrep -f "moatd --config $root/lab/run/teardown" || true; }
}

# A small lab whose second check must fail.
sed -e 's/^name: seeds/name: teardown/' "$root/configs/lab.yaml" | /usr/bin/python3 -c '
import sys, yaml
lab = yaml.safe_load(sys.stdin)
lab["checks"] = [{"ping": {"from": "home-pc", "to": "10.1.0.1"}},
                 {"ping": {"from": "home-pc", "to": "10.77.0.1"}}]
yaml.safe_dump(lab, sys.stdout)' >"$tmp/failing.yaml"

set +e
"$lab" run "$tmp/failing.yaml" --moatd "${MOATD:?}" --moatctl "${MOATCTL:?}" >"$tmp/fail.log" 2>&1
rc=$?
set -e
cat "$tmp/fail.log"
[ "$rc" -eq 1 ] || { echo "FAIL: a failing check must exit 1, got $rc"; exit 1; }
grep -q "1 passed, 1 failed" "$tmp/fail.log" || { echo "FAIL: summary"; exit 1; }
[ -z "$(leftovers)" ] || { echo "FAIL: leftovers after a failed run:"; leftovers; exit 1; }

# Ctrl-C while the routers run.
"$lab" run "$tmp/failing.yaml" --moatd "$MOATD" --moatctl "$MOATCTL" >"$tmp/int.log" 2>&1 &
pid=$!
for _ in $(seq 300); do grep -q "router portal: up" "$tmp/int.log" && break; sleep 0.1; done
grep -q "router portal: up" "$tmp/int.log" || { echo "FAIL: lab did not come up"; cat "$tmp/int.log"; exit 1; }
kill -INT "$pid"
set +e
wait "$pid"
rc=$?
set -e
cat "$tmp/int.log"
[ "$rc" -eq 130 ] || { echo "FAIL: Ctrl-C must exit 130, got $rc"; exit 1; }
[ -z "$(leftovers)" ] || { echo "FAIL: leftovers after Ctrl-C:"; leftovers; exit 1; }
echo "PASS: torn down after a failed check and after Ctrl-C"
