#!/usr/bin/env bash
# Seed 003's uplink (issue 7): configs/lab-qos.yaml brings up home — moat —
# internet — portal — receiver with the moat's wan shaped at 128 kbit/s,
# and tests/lab/qos_traffic.py offers audio (UDP 64 kbit/s of inner
# packets), camera control (small TCP requests, RTT measured), web (TCP
# bulk) and video (greedy UDP) at once through the ESP tunnel; then audio
# stops. The same class tree is built with Linux `tc htb` on a veth between
# three namespaces, offered the same frame sizes, and measured the same way.
# qos_traffic.py report prints both side by side and asserts: audio ≥ 97 %
# delivered, camera's median RTT below one 1514-byte frame time, every
# class within ±5 % of the link of the tree's share and of Linux HTB's,
# video borrowing audio's share in phase 2 (moatctl's counters too).
# Needs root. QOS_TABLE=FILE also writes the table there; QOS_KEEP=DIR keeps
# the raw measurements (qos_traffic.py's send/recv files) in DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
MOATD=${MOATD:-$root/build/ctrl/moatd}
MOATCTL=${MOATCTL:-$root/build/ctrl/moatctl}
PY=/usr/bin/python3
traffic="$root/tests/lab/qos_traffic.py"
lab="$root/configs/lab-qos.yaml"
prefix=qlab                       # namespaces qlab-q*, veths qlabk*: beside other labs
P1=${QOS_PHASE1:-18} P2=${QOS_PHASE2:-14}
RECV_SECONDS=$((2 + P1 + P2 + 8))  # the senders' run, then the queues drain
LX=qlx                            # the Linux comparison: namespaces qlx-{snd,rtr,rcv}
tmp=$(mktemp -d /tmp/moat-qoslab.XXXXXX)
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$root/lab/moat-lab" down "$lab" --prefix $prefix >/dev/null 2>&1 || true
  for n in snd rtr rcv; do ip netns del $LX-$n 2>/dev/null || true; done
  if [ -n "${QOS_KEEP:-}" ]; then mkdir -p "$QOS_KEEP" && cp "$tmp"/*.send "$tmp"/*.recv "$QOS_KEEP"/ 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
# Leftovers of a crashed run (ours only: qlx-* namespaces, the qlab lab).
for n in snd rtr rcv; do ip netns del $LX-$n 2>/dev/null || true; done

# The receiver in namespace $1 on its only veth ($2: its address), the
# sender in $3 towards $2; $4: extra send arguments. Results in $tmp/$5.*.
measure() {
  local rns=$1 addr=$2 sns=$3 extra=$4 tag=$5 snap=${6:-}
  local ifc
  ifc=$(ip -n "$rns" -o link show | awk -F': ' '$2 != "lo" {sub(/@.*/, "", $2); print $2; exit}')
  # One packet seen per packet sent: no GRO on the receiver.
  ip netns exec "$rns" ethtool -K "$ifc" gro off >/dev/null 2>&1 || true
  rm -f "$tmp/$tag.recv.ready"
  ip netns exec "$rns" $PY "$traffic" recv --addr "$addr" --iface "$ifc" --seconds $RECV_SECONDS \
    --out "$tmp/$tag.recv" &
  pids+=($!)
  local rpid=$!
  for _ in $(seq 50); do [ -e "$tmp/$tag.recv.ready" ] && break; sleep 0.1; done
  [ -e "$tmp/$tag.recv.ready" ] || { echo "FAIL: $tag receiver did not start"; exit 1; }
  # shellcheck disable=SC2086
  timeout $((RECV_SECONDS + 10)) ip netns exec "$sns" $PY "$traffic" send --to "$addr" --out "$tmp/$tag.send" \
    --phase1 "$P1" --phase2 "$P2" $extra ${snap:+--snapshot "$snap"}
  wait "$rpid"
  pids=()  # done: nothing of ours left to stop
}

# ---------------------------------------------------------------- Moat ---
run_moat() {
  echo "== Moat: $lab (shaped wan, ESP tunnel)"
  "$root/lab/moat-lab" up "$lab" --prefix $prefix --moatd "$MOATD" --moatctl "$MOATCTL"
  sock="$root/lab/run/$prefix-qos/qmoat.sock"
  ip netns exec $prefix-qhome ping -c 3 -i 0.2 -W 2 10.69.0.2 >/dev/null \
    || { echo "FAIL: no path qhome → qcorp through the tunnel"; exit 1; }
  measure $prefix-qcorp 10.69.0.2 $prefix-qhome "--audio-len 320 --video-len 1000 --camera-len 32" moat \
    "$MOATCTL --socket $sock --json show qos wan"
  "$MOATCTL" --socket "$sock" --json show qos wan | $PY -c "import json,sys; [print(c[\"name\"], {k: c[k] for k in (\"sent_pkts\", \"sent_bytes\", \"dropped_pkts\", \"borrowed_bytes\")}) for c in json.load(sys.stdin)[0][\"classes\"]]"
  for r in qmoat qportal; do
  "$MOATCTL" --socket "$root/lab/run/$prefix-qos/$r.sock" --json show stats | $PY -c '
import json, sys
d = {x["reason"]: x["count"] for x in json.load(sys.stdin)["drops"] if x["count"]}
print(sys.argv[1], "drops:", d)
bad = {k: v for k, v in d.items() if k in ("tx_full", "qos_handoff_full", "esp_bad_icv", "esp_too_old", "esp_replayed", "ip_truncated")}
assert not bad, f"unexpected drops: {bad}"
  ' $r
  done
  # The portal's view of the tunnel: the numbers the moat's full queues
  # consumed read as loss there (docs/CONFIGURATION.md, shaping).
  "$MOATCTL" --socket "$root/lab/run/$prefix-qos/qportal.sock" --json show tunnels | $PY -c '
import json, sys
for t in json.load(sys.stdin):
    print("qportal tunnel", t.get("tunnel"), {k: v for k, v in t.items() if k not in ("sas", "tunnel")})
  '
  "$root/lab/moat-lab" down "$lab" --prefix $prefix >/dev/null
}

# ------------------------------------------------------- Linux HTB ---
# snd (10.71.0.2) — rtr — rcv (10.72.0.2); HTB on rtr's veth towards rcv,
# the same tree as configs/lab-qos.yaml. No ESP here: the senders send
# cleartext packets as large as Moat's ESP frames (audio 376 + 14 = 390,
# video 1056 + 14 = 1070, camera requests 56 bytes larger, TCP segments
# 1514-byte frames on both), so both shapers see the same frame sizes.
run_linux() {
  echo "== Linux: tc htb on a veth, the same tree and frame sizes"
  for n in snd rtr rcv; do ip netns del $LX-$n 2>/dev/null || true; done  # a previous attempt's
  for n in snd rtr rcv; do ip netns add $LX-$n; ip -n $LX-$n link set lo up; done
  ip link add qlxs0 type veth peer name qlxr0
  ip link add qlxr1 type veth peer name qlxd0
  ip link set qlxs0 netns $LX-snd; ip link set qlxr0 netns $LX-rtr
  ip link set qlxr1 netns $LX-rtr; ip link set qlxd0 netns $LX-rcv
  ip -n $LX-snd addr add 10.71.0.2/24 dev qlxs0
  ip -n $LX-rtr addr add 10.71.0.1/24 dev qlxr0
  ip -n $LX-rtr addr add 10.72.0.1/24 dev qlxr1
  ip -n $LX-rcv addr add 10.72.0.2/24 dev qlxd0
  for x in "$LX-snd qlxs0" "$LX-rtr qlxr0" "$LX-rtr qlxr1" "$LX-rcv qlxd0"; do
    set -- $x
    ip -n "$1" link set "$2" up
    # Frames as on a real link: no GSO/TSO super-packets through HTB.
    ip netns exec "$1" ethtool -K "$2" tso off gso off gro off >/dev/null
  done
  ip -n $LX-snd route add default via 10.71.0.1
  ip -n $LX-rcv route add default via 10.72.0.1
  ip netns exec $LX-rtr sysctl -qw net.ipv4.ip_forward=1
  tc() { ip netns exec $LX-rtr tc "$@"; }
  b="burst 1514 cburst 1514 quantum 1514"
  tc qdisc add dev qlxr1 root handle 1: htb default 30
  tc class add dev qlxr1 parent 1: classid 1:1 htb rate 128kbit ceil 128kbit $b
  tc class add dev qlxr1 parent 1:1 classid 1:10 htb rate 80kbit ceil 128kbit prio 1 $b  # audio
  tc class add dev qlxr1 parent 1:1 classid 1:20 htb rate 12kbit ceil 128kbit prio 0 $b  # camera
  tc class add dev qlxr1 parent 1:1 classid 1:2 htb rate 36kbit ceil 128kbit $b          # data
  tc class add dev qlxr1 parent 1:2 classid 1:30 htb rate 24kbit ceil 32kbit prio 2 $b   # web
  tc class add dev qlxr1 parent 1:2 classid 1:40 htb rate 12kbit ceil 128kbit prio 3 $b  # video
  for x in "10 16" "20 16" "30 12" "40 10"; do
    set -- $x
    tc qdisc add dev qlxr1 parent 1:$1 handle $1: pfifo limit "$2"   # the lab's queue: sizes
  done
  tc filter add dev qlxr1 parent 1: protocol ip prio 1 u32 match ip protocol 17 0xff match ip dport 5004 0xffff flowid 1:10
  tc filter add dev qlxr1 parent 1: protocol ip prio 1 u32 match ip protocol 6 0xff match ip dport 8554 0xffff flowid 1:20
  tc filter add dev qlxr1 parent 1: protocol ip prio 1 u32 match ip protocol 6 0xff match ip dport 8080 0xffff flowid 1:30
  tc filter add dev qlxr1 parent 1: protocol ip prio 1 u32 match ip protocol 17 0xff match ip dport 6000 0xffff flowid 1:40
  ip netns exec $LX-snd ping -c 2 -i 0.2 -W 2 10.72.0.2 >/dev/null || { echo "FAIL: no Linux path"; exit 1; }
  measure $LX-rcv 10.72.0.2 $LX-snd "--audio-len 376 --video-len 1056 --camera-len 88" linux \
    "ip netns exec $LX-rtr tc -s -j class show dev qlxr1"
  tc -s class show dev qlxr1 | grep -E "^class|Sent"
}

# -------------------------------------------------------------- report ---
# A second attempt when the first fails: the 2-core machine is shared with
# other builds and labs, and a process that is not scheduled for a second
# (a sender, the shaper's worker) costs the lowest class its rate. A shaper
# that is wrong fails both; the first attempt's failures stay in the log.
for attempt in 1 2; do
  run_moat
  run_linux
  if $PY "$traffic" report --moat "$tmp/moat.send" "$tmp/moat.recv" --linux "$tmp/linux.send" "$tmp/linux.recv" \
      --link 128000 ${QOS_TABLE:+--table "$QOS_TABLE"}; then
    exit 0
  fi
  [ $attempt = 1 ] && echo "== attempt 1 failed (above); once more"
done
exit 1
