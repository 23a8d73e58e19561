#!/bin/bash
# IKE at scale through moatd: N moats (ike-load, one IKE SA and one CHILD SA
# each, own identity each) come up against moatd as their portal; then the
# portal restarts (SIGKILL: its state is gone, as after a crash or power
# loss) and the moats re-establish. Meanwhile a bounded UDP probe stream
# (bench/udp-probe.py) crosses moatd's fast path between two other hosts,
# plain forwarding, to show that other traffic keeps passing while the
# control thread sets up thousands of SAs.
#
#   host ns (probe)           router ns (moatd)                       client ns (ike-load, probe sink)
#   192.168.1.2 lan0 ---- lan-m [lan 192.168.1.1]  [wan 198.51.100.1] wan-m ---- c0 198.51.100.2
#                               punt TAPs + IKE sockets in the punt ns
#
# CPUs: moatd's control thread (EAL main lcore, where the IKE engine runs)
# on CPU 1, its worker on CPU 0; ike-load on CPU 0 at nice 19, so the
# worker (idle_sleep_us) gets CPU 0 whenever it has packets: the client
# does the same cryptography as the portal and would otherwise starve the
# fast path of this 2-core machine, which a real portal's worker cores never
# share with 10,000 moats.
#
# Figures (one JSON object, last line of the output):
#   establish:      ike-load's first round against a fresh moatd
#   restart_s:      SIGKILL to the new moatd answering on its control socket
#                   (EAL, ports, N tunnels, routes, SAD)
#   reestablish:    ike-load's second round: from the signal that the portal
#                   restarted (sent once moatd is up) until the last CHILD SA
#                   is installed; at most WINDOW negotiations in flight
#   total_s:        restart_s + reestablish seconds (the goal: <= 10 s)
#   probe_*:        the UDP stream's loss while each round ran (moatd up)
#   control_cpu_seconds, per_control_cpu_second (in each round): CPU time of
#                   moatd's control thread in the round, and CHILD SAs per
#                   CPU second of it
#   moatd_*:        moatd's own counters after the run (IKE SAs established,
#                   CHILD SAs installed, SAD SAs, worker drops)
# A moat's own time to notice (its dpd: plus retransmissions) is not in it.
#
#   flock /tmp/moat-bench.lock bench/ike-restart.sh BUILD_DIR [N=10000]
#   env: WINDOW (ike-load in flight, 64), RATE (probe datagrams/s, 1000),
#        KEEP=1 (keep the run directory)
# Root; every wait is bounded; cleans up namespaces and daemons on any exit.
set -u
B="$(cd "${1:?build dir}" && pwd)"; N="${2:-10000}"
WINDOW="${WINDOW:-64}"; RATE="${RATE:-1000}"
PROPOSAL=aes128gcm16-prfsha256-x25519
PSK="moat-bench-pre-shared-key-0123456789"
HERE="$(cd "$(dirname "$0")" && pwd)"
P="ikr$$"; NS_H="$P-h"; NS_R="$P-r"; NS_P="$P-p"; NS_C="$P-c"
RUN="$(mktemp -d /tmp/moat-ike-restart.XXXXXX)"
PY=/usr/bin/python3
log() { echo "[ike-restart] $*" >&2; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
now() { $PY -c 'import time; print("%.6f" % time.monotonic())'; }
stop_pid() { # PIDFILE NAME [SIGNAL]: the process, only if it is still NAME; bounded
    local f=$1 name=$2 sig=${3:-TERM} pid i
    [ -s "$f" ] || return 0
    pid=$(cat "$f"); rm -f "$f"
    kill -0 "$pid" 2>/dev/null && grep -q "$name" "/proc/$pid/cmdline" 2>/dev/null || return 0
    kill "-$sig" "$pid"
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
}
cleanup() {
    stop_pid "$RUN/load.pid" ike-load
    stop_pid "$RUN/moatd.pid" moatd
    stop_pid "$RUN/send.pid" udp-probe; stop_pid "$RUN/recv.pid" udp-probe
    for ns in "$NS_H" "$NS_R" "$NS_P" "$NS_C"; do ip netns del "$ns" 2>/dev/null; done
    if [ "${KEEP:-0}" = 1 ]; then log "run dir kept: $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
die() { log "FAIL: $*"; tail -20 "$RUN/moatd.log" >&2 2>/dev/null; exit 1; }

# ---------------------------------------------------------------- namespaces
for ns in "$NS_H" "$NS_R" "$NS_P" "$NS_C"; do ip netns add "$ns" || die "cannot create namespace $ns"; done
ip link add "${P}w" type veth peer name "${P}c"
ip link add "${P}l" type veth peer name "${P}h"
ip link set "${P}w" netns "$NS_R"; ip link set "${P}l" netns "$NS_R"
ip link set "${P}c" netns "$NS_C"; ip link set "${P}h" netns "$NS_H"
nsx "$NS_R" ip link set "${P}w" name wan-m; nsx "$NS_R" ip link set "${P}l" name lan-m
nsx "$NS_C" ip link set "${P}c" name c0; nsx "$NS_H" ip link set "${P}h" name lan0
for l in "$NS_R wan-m" "$NS_R lan-m" "$NS_C c0" "$NS_H lan0" "$NS_R lo" "$NS_P lo" "$NS_C lo" "$NS_H lo"; do
    set -- $l; nsx "$1" ip link set "$2" up
done
# Kernel veths facing DPDK ports: no checksum offload (UDP would leave with
# an unfilled checksum, which moatd's peers drop).
nsx "$NS_C" ethtool -K c0 tx off >/dev/null; nsx "$NS_H" ethtool -K lan0 tx off >/dev/null
nsx "$NS_C" ip addr add 198.51.100.2/24 dev c0
nsx "$NS_C" ip route add 192.168.1.0/24 via 198.51.100.1
nsx "$NS_H" ip addr add 192.168.1.2/24 dev lan0
nsx "$NS_H" ip route add default via 192.168.1.1

# ---------------------------------------------------------------- moatd
# One file per moat, as ike-load's tunnels: moat i protects 10.0.0.0/24 + i.
mkdir -p "$RUN/moats.d"
$PY - "$RUN/moats.d" "$N" "$PSK" "$PROPOSAL" <<'EOF'
import ipaddress, sys
d, n, psk, prop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
for i in range(n):
    net = ipaddress.IPv4Address(0x0A000000 + (i << 8))
    with open(f"{d}/load-{i}.yaml", "w") as f:
        f.write(f'local_id: responder.bench.moat\nremote_id: load-{i}@bench.moat\npsk: "{psk}"\n'
                f'ike_proposals: {prop}\nfunnels: [{{local: 172.16.0.0/12, remote: {net}/24}}]\n')
EOF
MAX_SAS=$(( (4 * N + 4096 + 1023) / 1024 * 1024 ))
cat >"$RUN/moatd.yaml" <<EOF
eal: {lcores: [1, 0], memory_mb: 1024, no_huge: true, file_prefix: $P, log_level: "*:error"}
ports:
  - {name: wan, device: "net_af_packet0,iface=wan-m", address: 198.51.100.1/24}
  - {name: lan, device: "net_af_packet1,iface=lan-m", address: 192.168.1.1/24}
workers: {idle_sleep_us: 50}
punt: {netns: $NS_P}
control: {socket: $RUN/moatd.sock, max_sas: $MAX_SAS}
ike: {tunnels_dir: $RUN/moats.d}
EOF
ctl() { "$B/ctrl/moatctl" --socket "$RUN/moatd.sock" "$@"; }
moatd_start() {
    rm -f "$RUN/moatd.sock"
    nsx "$NS_R" sh -c 'echo $$ >"$0"; exec "$@"' "$RUN/moatd.pid" "$B/ctrl/moatd" --config "$RUN/moatd.yaml" \
        >>"$RUN/moatd.log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 600); do
        [ -S "$RUN/moatd.sock" ] && ctl --json show stats >/dev/null 2>&1 && return 0
        [ -s "$RUN/moatd.pid" ] && ! kill -0 "$(cat "$RUN/moatd.pid")" 2>/dev/null && die "moatd exited"
        sleep 0.05
    done
    die "moatd did not come up within 30 s"
}
moatd_stats() { ctl --json show stats 2>/dev/null; }
# CPU seconds of moatd's control thread (the EAL main lcore is the process's
# main thread, where the IKE engine runs): "IKE SAs per control-core second".
ctrl_cpu() { local pid; pid=$(cat "$RUN/moatd.pid")
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$pid/task/$pid/stat"; }

log "moatd with $N tunnel files"
moatd_start
# The punt namespace's routes: moatd's answers leave through the fast path.
sleep 0.5

# ---------------------------------------------------------------- probe stream
PROBE_S=$(( N / 100 + 120 ))  # bounded: well past both rounds at any sane rate
nsx "$NS_C" sh -c 'echo $$ >"$0"; exec "$@"' "$RUN/recv.pid" $PY "$HERE/udp-probe.py" recv \
    --bind 198.51.100.2:9000 --out "$RUN/probe.recv" --seconds "$((PROBE_S + 5))" &
sleep 0.3
nsx "$NS_H" sh -c 'echo $$ >"$0"; exec "$@"' "$RUN/send.pid" $PY "$HERE/udp-probe.py" send \
    --to 198.51.100.2:9000 --rate "$RATE" --seconds "$PROBE_S" --out "$RUN/probe.sent" &
sleep 1

# ---------------------------------------------------------------- round 1
log "ike-load: $N moats, window $WINDOW"
C1_START=$(ctrl_cpu)
nsx "$NS_C" sh -c 'echo $$ >"$0"; exec "$@"' "$RUN/load.pid" taskset -c 0 nice -n 19 "$B/bench/ike-load" \
    --target 198.51.100.1 --n "$N" --window "$WINDOW" --psk "$PSK" --proposal "$PROPOSAL" \
    --timeout 300 --reconnect 1 >"$RUN/load.out" 2>"$RUN/load.err" &
for i in $(seq 1 6000); do
    grep -q '"phase": "establish"' "$RUN/load.out" 2>/dev/null && break
    [ -s "$RUN/load.pid" ] && ! kill -0 "$(cat "$RUN/load.pid")" 2>/dev/null && break
    sleep 0.05
done
grep -q '"phase": "establish"' "$RUN/load.out" || { cat "$RUN/load.err" >&2; die "ike-load's first round did not end"; }
log "round 1: $(grep establish "$RUN/load.out")"
T1_END=$(now)
C1_END=$(ctrl_cpu)
STATS1=$(moatd_stats)

# ---------------------------------------------------------------- restart
log "portal restart: SIGKILL moatd, start it again"
T_KILL=$(now)
stop_pid "$RUN/moatd.pid" moatd KILL
moatd_start
T_READY=$(now)
C2_START=$(ctrl_cpu)
kill -USR1 "$(cat "$RUN/load.pid")"
for i in $(seq 1 6000); do
    grep -q '"phase": "reconnect"' "$RUN/load.out" 2>/dev/null && break
    kill -0 "$(cat "$RUN/load.pid")" 2>/dev/null || break
    sleep 0.05
done
T2_END=$(now)
C2_END=$(ctrl_cpu)
grep -q '"phase": "reconnect"' "$RUN/load.out" || { cat "$RUN/load.err" >&2; die "ike-load's second round did not end"; }
log "round 2: $(grep reconnect "$RUN/load.out")"
sleep 1  # the counters of the last SAs
STATS2=$(moatd_stats)
stop_pid "$RUN/send.pid" udp-probe; sleep 1; stop_pid "$RUN/recv.pid" udp-probe

# ---------------------------------------------------------------- figures
R1=$(grep '"phase": "establish"' "$RUN/load.out")
R2=$(grep '"phase": "reconnect"' "$RUN/load.out")
# Round 1 ran from the load's start to T1_END; its own seconds say how long.
L1=$($PY -c 'import json,sys; r=json.loads(sys.argv[1]); print("%.6f" % (float(sys.argv[2]) - r["seconds"]))' "$R1" "$T1_END")
P1=$($PY "$HERE/udp-probe.py" loss --sent "$RUN/probe.sent" --received "$RUN/probe.recv" --from "$L1" --to "$T1_END")
P2=$($PY "$HERE/udp-probe.py" loss --sent "$RUN/probe.sent" --received "$RUN/probe.recv" --from "$T_READY" --to "$T2_END")
$PY - "$N" "$WINDOW" "$RATE" "$R1" "$R2" "$T_KILL" "$T_READY" "$P1" "$P2" "$STATS1" "$STATS2" \
    "$C1_START" "$C1_END" "$C2_START" "$C2_END" <<'EOF'
import json, sys
n, window, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
r1, r2 = json.loads(sys.argv[4]), json.loads(sys.argv[5])
t_kill, t_ready = float(sys.argv[6]), float(sys.argv[7])
p1, p2 = json.loads(sys.argv[8]), json.loads(sys.argv[9])
def moatd(doc):
    d = json.loads(doc) if doc.strip() else {}
    ike = d.get("ike", {})
    drops = {}
    for x in d.get("drops", []):
        drops[x["reason"]] = drops.get(x["reason"], 0) + x["count"]
    return {"ike_established": ike.get("ike_established"), "child_installed": ike.get("child_installed"),
            "cookie_sent": ike.get("cookie_sent"), "rx_retransmit": ike.get("rx_retransmit"), "drops": drops}
c1 = float(sys.argv[13]) - float(sys.argv[12])
c2 = float(sys.argv[15]) - float(sys.argv[14])
r1["control_cpu_seconds"], r2["control_cpu_seconds"] = round(c1, 2), round(c2, 2)
r1["per_control_cpu_second"] = round(r1["child_sas"] / c1, 1) if c1 > 0 else None
r2["per_control_cpu_second"] = round(r2["child_sas"] / c2, 1) if c2 > 0 else None
out = {"moats": n, "window": window, "probe_rate": rate,
       "establish": r1, "restart_s": round(t_ready - t_kill, 3), "reestablish": r2,
       "total_s": round(t_ready - t_kill + r2["seconds"], 3),
       "probe_during_establish": p1, "probe_during_reestablish": p2,
       "moatd_after_establish": moatd(sys.argv[10]), "moatd_after_reestablish": moatd(sys.argv[11])}
print(json.dumps(out))
ok = r1["child_sas"] == n and r2["child_sas"] == n
sys.exit(0 if ok else 1)
EOF
