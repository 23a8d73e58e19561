#!/bin/bash
# IKE scale benchmark: ike-load opens N IKE SAs (one CHILD SA each, its own
# identity each) against a responder in another namespace — Moat's moat-iked
# or strongSwan's charon, pinned to the same CPU, same proposal (PSK + X25519).
#   bench/ike-scale.sh BUILD_DIR [N=1000] [moat|charon|both]
# Prints one JSON line per responder: the client's figures (wall-clock rate,
# the client's own CPU seconds) and the responder's CPU seconds over the run
# (utime+stime of the whole process, all threads, from /proc/PID/stat), so
# "IKE SAs per responder CPU-second" — what "on one control core" means —
# stands on this shared, noisy machine. Root; cleans up after itself.
# Serialize with other benchmarks: flock /tmp/moat-bench.lock bench/ike-scale.sh ...
set -u
B="$(cd "${1:?build dir}" && pwd)"; N="${2:-1000}"; WHO="${3:-both}"
CPU="${CPU:-1}"; PROPOSAL="${PROPOSAL:-aes128gcm16-prfsha256-x25519}"
PSK="moat-bench-pre-shared-key-0123456789"
P="iks$$"; NC="$P-c"; NR="$P-r"; RUN="$(mktemp -d /tmp/moat-ike-scale.XXXXXX)"
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
cleanup() {
    for f in "$RUN"/*.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
    sleep 0.5; ip netns del "$NC" 2>/dev/null; ip netns del "$NR" 2>/dev/null; rm -rf "$RUN"
}
trap cleanup EXIT
ip netns add "$NC"; ip netns add "$NR"
ip link add "${P}c" type veth peer name "${P}r"
ip link set "${P}c" netns "$NC"; ip link set "${P}r" netns "$NR"
nsx "$NC" ip addr add 192.0.2.1/24 dev "${P}c"; nsx "$NR" ip addr add 192.0.2.2/24 dev "${P}r"
# kernel-libipsec routes a CHILD SA only from an address inside its local selector.
nsx "$NR" ip addr add 172.16.0.1/12 dev "${P}r"
for ns in "$NC" "$NR"; do nsx "$ns" ip link set lo up; done
nsx "$NC" ip link set "${P}c" up; nsx "$NR" ip link set "${P}r" up

WINDOW="${WINDOW:-64}"
# CPU seconds (user + system, every thread) a process has used so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat"; }
# run_client PIDFILE: one JSON line, the client's and the responder's figures.
run_client() {
    local pid c0 c1 out
    pid=$(cat "$1"); c0=$(cpu_s "$pid")
    out=$(nsx "$NC" taskset -c 0 "$B/bench/ike-load" --target 192.0.2.2 --n "$N" --window "$WINDOW" --psk "$PSK" \
        --proposal "$PROPOSAL" --timeout 120)
    c1=$(cpu_s "$pid")
    echo "$out" | python3 -c '
import json, sys
j = json.loads(sys.stdin.read()); cpu = float(sys.argv[2]) - float(sys.argv[1])
j["responder_cpu_seconds"] = round(cpu, 2)
j["per_responder_cpu_second"] = round(j["child_sas"] / cpu, 1) if cpu > 0 else None
print(json.dumps(j)[1:])' "$c0" "$c1"
}

if [ "$WHO" = moat ] || [ "$WHO" = both ]; then
    mkdir -p "$RUN/moats.d"
    for i in $(seq 0 $((N - 1))); do
        printf 'local_id: responder.bench.moat\nremote_id: load-%d@bench.moat\npsk: "%s"\nike_proposals: %s\nfunnels: [{local: 172.16.0.0/12, remote: 10.0.0.0/8}]\n' \
            "$i" "$PSK" "$PROPOSAL" >"$RUN/moats.d/load-$i.yaml"
    done
    nsx "$NR" sh -c 'echo $$ >"$0"; exec taskset -c "$1" "$2" --dir "$3"' "$RUN/iked.pid" "$CPU" "$B/ctrl/ike/moat-iked" \
        "$RUN/moats.d" >"$RUN/iked.log" 2>&1 &
    for i in $(seq 1 100); do grep -q "tunnels loaded" "$RUN/iked.log" 2>/dev/null && break; sleep 0.1; done
    echo -n '{"responder": "moat", '; run_client "$RUN/iked.pid"
    # moat-iked says goodbye to its peers for up to 2 s; charon cannot bind
    # UDP 500 before it is gone.
    pid=$(cat "$RUN/iked.pid"); kill "$pid"; rm -f "$RUN/iked.pid"
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
fi

if [ "$WHO" = charon ] || [ "$WHO" = both ]; then
    mkdir -p "$RUN/swan/swanctl"
    cat >"$RUN/swan/strongswan.conf" <<EOC
charon {
    load_modular = no
    load = random nonce openssl aes sha1 sha2 hmac gcm pem pkcs1 x509 kdf kernel-libipsec kernel-netlink socket-default vici
    install_routes = no
    cookie_threshold = 100000
    cookie_threshold_ip = 100000
    block_threshold = 100000
    plugins { vici { socket = unix://$RUN/swan/charon.vici } }
    filelog { main { path = $RUN/swan/charon.log
                     default = 0
                     ike = 1 } }
}
charon-systemd { journal { default = -1 } }
swanctl {
    load = pem pkcs1 x509 pubkey openssl random
    socket = unix://$RUN/swan/charon.vici
}
EOC
    cat >"$RUN/swan/swanctl/swanctl.conf" <<EOC
connections { load { version = 2
    local_addrs = 192.0.2.2
    proposals = $PROPOSAL
    local { auth = psk
            id = responder.bench.moat }
    remote { auth = psk }
    children { net { local_ts = 172.16.0.0/12
                     remote_ts = 10.0.0.0/8
                     esp_proposals = aes128gcm16 } } } }
secrets { ike-any { secret = "$PSK" } }
EOC
    nsx "$NR" sh -c 'echo $$ >"$0"; exec taskset -c "$1" env STRONGSWAN_CONF="$2" /usr/sbin/charon-systemd' \
        "$RUN/charon.pid" "$CPU" "$RUN/swan/strongswan.conf" >/dev/null 2>&1 &
    for i in $(seq 1 50); do [ -S "$RUN/swan/charon.vici" ] && break; sleep 0.1; done
    nsx "$NR" env STRONGSWAN_CONF="$RUN/swan/strongswan.conf" SWANCTL_DIR="$RUN/swan/swanctl" \
        swanctl --load-all --uri "unix://$RUN/swan/charon.vici" >"$RUN/swan/load.log" 2>&1 || cat "$RUN/swan/load.log"
    echo -n '{"responder": "charon", '; run_client "$RUN/charon.pid"
    if [ -n "${KEEP_LOG:-}" ]; then cp "$RUN/swan/charon.log" "$KEEP_LOG"; fi
fi
