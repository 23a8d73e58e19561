#!/usr/bin/env bash
# Several RX queues spread over several workers: an af_packet port with two
# queue pairs (kernel fanout hashes flows over them), two workers, and 16
# flows (one per source address) of pings to the router. Every ping must be
# answered and both workers must have received and sent packets.
set -euo pipefail
: "${MOATD:?}" "${MOATCTL:?}"
tmp=$(mktemp -d /tmp/moat-mq.XXXXXX)
cleanup() {
  [ -f "$tmp/pid" ] && kill "$(cat "$tmp/pid")" 2>/dev/null && sleep 1
  ip netns del mq-h 2>/dev/null || true
  ip netns del mq-r 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
ip netns add mq-h
ip netns add mq-r
ip link add mqh0 type veth peer name mqr0
ip link set mqh0 netns mq-h
ip link set mqr0 netns mq-r
ip -n mq-h link set mqh0 up
ip -n mq-r link set mqr0 up
ip netns exec mq-h ethtool -K mqh0 tx off >/dev/null
for i in $(seq 2 17); do ip -n mq-h addr add 10.50.0.$i/24 dev mqh0; done

cat >"$tmp/moatd.yaml" <<EOF2
eal: {lcores: [0, "1@1", "2@1"], memory_mb: 256, no_huge: true, file_prefix: moat-mq, log_level: "*:error"}
ports:
  - {name: lan, device: "net_af_packet0,iface=mqr0,qpairs=2", address: 10.50.0.1/24}
workers: {idle_sleep_us: 50}
punt: {enabled: false}
control: {socket: $tmp/moatd.sock}
EOF2
ip netns exec mq-r sh -c "echo \$\$ >$tmp/pid; exec $MOATD --config $tmp/moatd.yaml" >"$tmp/log" 2>&1 &
for _ in $(seq 100); do [ -S "$tmp/moatd.sock" ] && break; sleep 0.1; done
[ -S "$tmp/moatd.sock" ] || { echo "FAIL: moatd did not start"; cat "$tmp/log"; exit 1; }

queues=$("$MOATCTL" --socket "$tmp/moatd.sock" --json show interfaces | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["rx_queues"])')
[ "$queues" = 2 ] || { echo "FAIL: lan has $queues RX queues, expected 2"; exit 1; }
lost=0
for i in $(seq 2 17); do
  ip netns exec mq-h ping -q -c 3 -i 0.05 -W 1 -I 10.50.0.$i 10.50.0.1 >/dev/null || lost=$((lost + 1))
done
[ "$lost" = 0 ] || { echo "FAIL: $lost of 16 sources got no answer"; exit 1; }
"$MOATCTL" --socket "$tmp/moatd.sock" --json show stats | /usr/bin/python3 -c '
import json, sys
w = json.load(sys.stdin)["workers"]
print("workers:", [(x["worker"], x["rx"], x["tx"]) for x in w])
assert len(w) == 2, "two workers"
assert all(x["rx"] > 0 and x["tx"] > 0 for x in w), "both workers receive and transmit"
'
echo "PASS: 16 flows over 2 RX queues and 2 workers, all answered"
