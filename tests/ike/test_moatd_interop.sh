#!/bin/bash
# moatd itself (its hosted IKEv2 engine, the punt path, the ESP fast path)
# against strongSwan (charon-systemd + kernel-libipsec, so ESP always in UDP
# 4500), in network namespaces:
#
#   host ns            router ns (moatd)                      swan ns (charon)
#   10.1.0.2 lan0 ---- lan-m [lan 10.1.0.1]  [wan 198.51.100.1] wan-m ---- wan0 198.51.100.2
#                      punt TAPs + IKE sockets in ns "punt"               lan0 10.9.0.1/24
#
# Funnels 10.1.0.0/24 <-> 10.9.0.0/24, PSK, aes128gcm16-prfsha256-x25519;
# ESP aes128gcm16-x25519 (CHILD rekeys with PFS both ways).
# Phases (each must pass; the first failure ends the run):
#   responder: charon initiates; pings pass both ways through the tunnel;
#              moatctl show ike / show tunnels show the SA; charon restarted
#              brings the tunnel back by itself; then rekeys under a ping
#              flood, each of which must lose no packet: CHILD rekeys started
#              by charon (swanctl --rekey) and by moatd (moatctl ike rekey),
#              REKEY_ROUNDS (2) of each, then an IKE SA rekey by each side
#              (the CHILD SA must survive it unchanged).
#              charon behind MTU 1000: its ESP in outer fragments reaches
#              the host whole (through the kernel's reassembly and back).
#   initiator: moatd restarted with `start: true`; the tunnel comes up, pings
#              pass both ways; the same rekeys under a flood; ike terminate /
#              initiate; charon restarted: moatd brings it back.
#   reload:    moatctl ike reload after the tunnel's file is removed (the
#              tunnel goes, charon is told), put back (it comes up), and
#              broken (named at its place; the running tunnel stays).
#   MOBIKE:    charon with mobike = yes, moatd initiates; `moatctl address
#              set wan 198.51.100.5/24`: moatd sends UPDATE_SA_ADDRESSES,
#              charon moves the SAs there, pings pass both ways.
#   lifetimes: charon initiates and never rekeys (its timers: a day); moatd's
#              tunnel file has rekey 6 s, lifetime 8 s, ike_rekey 9 s: under
#              a 12 s ping flood moatd rekeys the CHILD SA (as the IKE SA's
#              responder) and then the IKE SA by itself (charon's SPIs
#              change, charon's log shows it only answered, charon becomes
#              the IKE SA's responder), no packet lost. Then charon's IKE is
#              dropped by nftables (ESP passes): moatd's next rekey goes
#              unanswered and its CHILD SA must leave the SAD (show tunnels)
#              at its hard lifetime, child_expired 1, the IKE SA standing;
#              IKE let through again, charon drops that SA and the tunnel
#              comes back without a new IKE_AUTH (charon's DPD is off here).
#   mobike_responder: charon initiates with mobike = yes, then its address
#              changes (.2 -> .3); moatd moves the IKE SA and sends a COOKIE2
#              check there. charon's answers are held by nftables for over a
#              second: meanwhile show ike names the check and every SA in
#              moatd's SAD still points at .2; released, they follow to .3;
#              mobike_checks +1, mobike_check_failed 0, the same IKE SA;
#              pings pass both ways from the new address.
#
# Needs root, charon-systemd, swanctl. Cleans up namespaces and daemons on any
# exit; every wait is bounded.   env: MOATD, MOATCTL; KEEP=1 keeps the run dir;
# ONLY="lifetimes mobike_responder" runs just those phases.
set -u
. "$(dirname "$0")/swan.sh"  # charon: CHARON, stop_pid, swan_daemon_conf, sw, charon_start, charon_stop
MOATD="${MOATD:?set MOATD}"; MOATCTL="${MOATCTL:?set MOATCTL}"
[ "$(id -u)" = 0 ] || { echo "FAIL: needs root (namespaces)"; exit 1; }
[ -x "$CHARON" ] && command -v swanctl >/dev/null || { echo "FAIL: strongSwan missing (scripts/setup.sh installs it)"; exit 1; }

P="ikm$$"
NS_H="$P-host"; NS_R="$P-rtr"; NS_P="$P-punt"; NS_S="$P-swan"
RUN="$(mktemp -d /tmp/moat-ike-moatd.XXXXXX)"; mkdir -p "$RUN/swan/swanctl" "$RUN/moats.d"
PSK="moatd-interop-psk-0123456789abcdef"
M_ID=moat.example.net; S_ID=swan@example.net
PY=/usr/bin/python3
FAILED=0

log() { echo "[moatd-interop] $*"; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
fail() {
    FAILED=1
    log "FAIL: $*"
    log "--- moatd log"; tail -30 "$RUN/moatd.log" 2>/dev/null
    log "--- charon log"; tail -30 "$RUN/swan/charon.log" 2>/dev/null
    exit 1
}


cleanup() {
    stop_pid "$RUN/moatd.pid" moatd
    stop_pid "$RUN/charon.pid" charon-systemd
    for ns in "$NS_H" "$NS_R" "$NS_P" "$NS_S"; do ip netns del "$ns" 2>/dev/null; done
    if [ "${KEEP:-0}" = 1 ] || [ "$FAILED" = 1 ]; then log "run dir kept: $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'FAILED=1; exit 130' INT TERM

# ---------------------------------------------------------------- namespaces
for ns in "$NS_H" "$NS_R" "$NS_P" "$NS_S"; do ip netns add "$ns" || fail "cannot create namespace $ns"; done
ip link add "${P}w" type veth peer name "${P}s"
ip link add "${P}l" type veth peer name "${P}h"
ip link set "${P}w" netns "$NS_R"; ip link set "${P}l" netns "$NS_R"
ip link set "${P}s" netns "$NS_S"; ip link set "${P}h" netns "$NS_H"
nsx "$NS_R" ip link set "${P}w" name wan-m; nsx "$NS_R" ip link set "${P}l" name lan-m
nsx "$NS_S" ip link set "${P}s" name wan0; nsx "$NS_H" ip link set "${P}h" name lan0
for l in "$NS_R wan-m" "$NS_R lan-m" "$NS_S wan0" "$NS_H lan0" "$NS_R lo" "$NS_P lo" "$NS_S lo" "$NS_H lo"; do
    set -- $l; nsx "$1" ip link set "$2" up
done
# Kernel-side veths facing DPDK ports: no checksum offload (NOTES: otherwise
# UDP leaves with an unfilled checksum and moatd's peer drops it).
nsx "$NS_S" ethtool -K wan0 tx off >/dev/null
nsx "$NS_H" ethtool -K lan0 tx off >/dev/null
nsx "$NS_S" ip addr add 198.51.100.2/24 dev wan0
nsx "$NS_H" ip addr add 10.1.0.2/24 dev lan0
nsx "$NS_H" ip route add default via 10.1.0.1
# charon's protected side: kernel-libipsec routes the remote funnel from an
# address inside the local funnel.
# (A veth pair: this kernel has no dummy driver.)
nsx "$NS_S" ip link add lan0 type veth peer name lan1
nsx "$NS_S" ip addr add 10.9.0.1/24 dev lan0
nsx "$NS_S" ip link set lan1 up; nsx "$NS_S" ip link set lan0 up

# ---------------------------------------------------------------- strongSwan
swan_daemon_conf
charon_conf() { # START_ACTION (start|none): start also re-initiates whenever the tunnel dies
    cat >"$RUN/swan/swanctl/swanctl.conf" <<EOF
connections {
    lab {
        version = 2
        local_addrs = ${SW_LOCAL:-198.51.100.2}
        remote_addrs = 198.51.100.1
        proposals = aes128gcm16-prfsha256-x25519
        encap = yes
        mobike = ${SW_MOBIKE:-no}
        dpd_delay = ${SW_DPD:-2s}
        # charon never rekeys by its own timers here (a day): every rekey in
        # this test is forced, or moatd's own (the lifetimes phase).
        rekey_time = 24h
        local { auth = psk
                id = $S_ID }
        remote { auth = psk
                 id = $M_ID }
        children {
            net {
                mode = tunnel
                local_ts = 10.9.0.0/24
                remote_ts = 10.1.0.0/24
                esp_proposals = aes128gcm16-x25519
                rekey_time = 24h
                life_time = 25h
                start_action = $1
                dpd_action = $([ "$1" = start ] && echo restart || echo clear)
                close_action = $([ "$1" = start ] && echo start || echo none)
            }
        }
    }
}
secrets {
    ike-lab { id-a = $S_ID
              id-b = $M_ID
              secret = "$PSK" }
}
EOF
}
# ---------------------------------------------------------------- moatd
moatd_conf() { # START (true|false); env M_DPD (2s), M_LIFE (more lines: lifetimes)
    cat >"$RUN/moats.d/swan.yaml" <<EOF
local_id: $M_ID
remote_id: $S_ID
psk: "$PSK"
remote: 198.51.100.2
local: 198.51.100.1
start: $1
ike_proposals: aes128gcm16-prfsha256-x25519
esp_proposals: aes128gcm16-x25519
dpd: ${M_DPD:-2s}
funnels:
  - {local: 10.1.0.0/24, remote: 10.9.0.0/24}
${M_LIFE:-}
EOF
    # Policy-free: moatd forwards everything, and UDP 500/4500 to its own
    # addresses goes to the punt path, where the IKE sockets are.
    cat >"$RUN/moatd.yaml" <<EOF
eal: {lcores: [0, 1], memory_mb: 256, no_huge: true, file_prefix: $P, log_level: "*:error"}
ports:
  - {name: wan, device: "net_af_packet0,iface=wan-m", address: 198.51.100.1/24}
  - {name: lan, device: "net_af_packet1,iface=lan-m", address: 10.1.0.1/24}
workers: {idle_sleep_us: 50}
punt: {netns: $NS_P}
control: {socket: $RUN/moatd.sock}
ike: {tunnels_dir: $RUN/moats.d}
EOF
}
moatd_start() {
    rm -f "$RUN/moatd.sock"
    nsx "$NS_R" sh -c 'echo $$ >"$0"; exec "$@"' "$RUN/moatd.pid" "$MOATD" --config "$RUN/moatd.yaml" \
        >>"$RUN/moatd.log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 150); do [ -S "$RUN/moatd.sock" ] && break; sleep 0.1; done
    [ -S "$RUN/moatd.sock" ] || fail "moatd did not start"
}
ctl() { "$MOATCTL" --socket "$RUN/moatd.sock" "$@"; }

# ---------------------------------------------------------------- checks
swan_installed() { sw --list-sas 2>/dev/null | grep -q INSTALLED; }
moat_established() { # show ike names the tunnel with an established IKE SA and a CHILD SA
    ctl --json show ike 2>/dev/null | $PY -c '
import json, sys
doc = json.load(sys.stdin)
sas = doc if isinstance(doc, list) else doc.get("sas", doc.get("ike", []))
sys.exit(0 if any(s.get("tunnel") == "swan" and s.get("state") == "ESTABLISHED" and s.get("children")
                  for s in sas) else 1)' &&
    ctl --json show tunnels 2>/dev/null | $PY -c '
import json, sys
doc = json.load(sys.stdin)
ts = doc if isinstance(doc, list) else doc.get("tunnels", [])
sys.exit(0 if any(t.get("tunnel") == "swan" and t.get("state") == "up" for t in ts) else 1)'
}
wait_up() { # WHAT SECONDS: both sides see the tunnel
    local i end=$((SECONDS + $2))
    for i in $(seq 1 $(($2 * 5))); do
        swan_installed && moat_established && return 0
        [ $SECONDS -lt $end ] || break
        sleep 0.2
    done
    log "charon:"; sw --list-sas 2>&1 | tail -15; log "moatd:"; ctl show ike 2>&1 | tail -15
    fail "$1: tunnel not up within $2 s"
}
pings_both_ways() { # WHAT: host -> charon side and back, through the tunnel
    local i ok=0
    # The first packets may race the last SA install: allow a few tries.
    for i in $(seq 1 10); do nsx "$NS_H" ping -q -c 1 -W 1 10.9.0.1 >/dev/null && { ok=1; break; }; done
    [ $ok = 1 ] || fail "$1: host 10.1.0.2 cannot ping 10.9.0.1 through the tunnel"
    nsx "$NS_H" ping -q -c 5 -i 0.2 -W 1 10.9.0.1 >"$RUN/ping1" || { cat "$RUN/ping1"; fail "$1: host -> 10.9.0.1 lost packets"; }
    nsx "$NS_S" ping -q -c 5 -i 0.2 -W 1 -I 10.9.0.1 10.1.0.2 >"$RUN/ping2" || { cat "$RUN/ping2"; fail "$1: 10.9.0.1 -> host lost packets"; }
    log "$1: pings pass both ways"
}
tunnel_json() { ctl --json show tunnels; }
check_show() { # WHAT: show ike and show tunnels name the tunnel and its SAs
    ctl show ike >"$RUN/show-ike.txt" 2>&1 || fail "$1: moatctl show ike failed"
    ctl show tunnels >"$RUN/show-tunnels.txt" 2>&1 || fail "$1: moatctl show tunnels failed"
    ctl --json show tunnels >"$RUN/show-tunnels.json" 2>&1 || fail "$1: moatctl --json show tunnels failed"
    grep -q swan "$RUN/show-ike.txt" || { cat "$RUN/show-ike.txt"; fail "$1: show ike does not name tunnel swan"; }
    grep -q swan "$RUN/show-tunnels.txt" || { cat "$RUN/show-tunnels.txt"; fail "$1: show tunnels does not name tunnel swan"; }
    # The SPIs charon shows for its installed CHILD SA must be moatd's tunnel's.
    sw --list-sas >"$RUN/sas.txt" 2>&1
    $PY - "$RUN/show-tunnels.json" "$RUN/sas.txt" <<'PYEOF' || { cat "$RUN/show-tunnels.txt" "$RUN/sas.txt"; fail "$1: show tunnels does not carry charon's SPIs"; }
import json, re, sys
text = open(sys.argv[2]).read()
# Only INSTALLED CHILD SAs: after a rekey charon lists the old one (REKEYED)
# for a while, which moatd has already dropped.
spis, installed = [], False
for line in text.splitlines():
    if re.search(r"#\d+, reqid \d+, ", line):
        installed = ", INSTALLED, " in line
    m = re.match(r"^\s+(?:in|out)\s+([0-9a-f]{8})", line)
    if m and installed:
        spis.append(m.group(1))
tun = [t for t in json.load(open(sys.argv[1])) if t["tunnel"] == "swan"]
sas = {sa["spi"]: sa for t in tun for sa in t["sas"]}
missing = [s for s in spis if "0x" + s not in sas]
# Every SA charon has installed carried the pings just sent (at least 5 each
# way): traffic went through ESP, not around it.
idle = [s for s in spis if "0x" + s in sas and sas["0x" + s]["packets"] < 5]
print("charon SPIs", spis, "missing in moatctl show tunnels:", missing, "without traffic:", idle)
sys.exit(1 if missing or idle or not spis else 0)
PYEOF
    log "$1: show ike / show tunnels show the tunnel and charon's SPIs"
}

# ---------------------------------------------------------------- rekey under load
# A ping flood host -> 10.9.0.1 (charon's side) runs across the rekey; every
# echo request crosses moatd -> charon and every reply charon -> moatd, so a
# packet lost in either direction is a missing reply. Per direction, charon's
# TUN counters (kernel-libipsec delivers decrypted packets to it and reads
# the ones it protects from it) tell which way a packet was lost; moatd's
# drop counters and charon's ESP log tell why. Zero loss is required.
FLOOD=${FLOOD:-600}
drops_json() { ctl --json show stats 2>/dev/null | $PY -c '
import json, sys
d = {}
for x in json.load(sys.stdin).get("drops", []):
    d[x["reason"]] = d.get(x["reason"], 0) + x["count"]
print(json.dumps(d))'; }
tun_counts() { # RX TX packets of charon's kernel-libipsec TUN
    nsx "$NS_S" ip -s -j link show ipsec0 2>/dev/null | $PY -c '
import json, sys
l = json.load(sys.stdin)[0]["stats64"]
print(l["rx"]["packets"], l["tx"]["packets"])'; }
child_spis() { # inbound SPIs of charon's INSTALLED CHILD SAs (a rekeyed one lingers a while)
    sw --list-sas 2>/dev/null | awk '/#[0-9]+, reqid/ {inst = /INSTALLED/} inst && $1 == "in" {sub(",", "", $2); print $2}' | sort | tr '\n' ' '; }
ike_spis() { sw --list-sas 2>/dev/null | grep ESTABLISHED | grep -oE '[0-9a-f]{16}_i\*? [0-9a-f]{16}_r\*?' | tr '\n' ' '; }
rekey_under_flood() { # WHAT KIND(child|ike) COMMAND...: the rekey must happen and lose no packet
    local what=$1 kind=$2; shift 2
    local spis0 spis1 d0 d1 t0 t1 esp0 esp1 flood rc received i
    spis0=$( [ "$kind" = ike ] && ike_spis || child_spis )
    d0=$(drops_json); t0=$(tun_counts)
    esp0=$(grep -cE 'does not belong to an installed SA|could not find an outbound' "$RUN/swan/charon.log")
    nsx "$NS_H" ping -q -c "$FLOOD" -i 0.005 -W 2 10.9.0.1 >"$RUN/flood" 2>&1 &
    flood=$!
    sleep 1
    "$@" >"$RUN/rekey.out" 2>&1 || { cat "$RUN/rekey.out"; kill $flood; fail "$what: $* failed"; }
    kill -0 $flood 2>/dev/null || fail "$what: the flood ended before the rekey did (nothing was tested under load)"
    wait $flood; rc=$?
    received=$(grep -oE '[0-9]+ received' "$RUN/flood" | awk '{print $1}')
    # charon's delete of the old SA may trail the flood by a moment.
    for i in $(seq 1 20); do
        spis1=$( [ "$kind" = ike ] && ike_spis || child_spis )
        [ "$spis1" != "$spis0" ] && break; sleep 0.2
    done
    d1=$(drops_json); t1=$(tun_counts)
    esp1=$(grep -cE 'does not belong to an installed SA|could not find an outbound' "$RUN/swan/charon.log")
    $PY - "$what" "$FLOOD" "${received:-0}" "$d0" "$d1" "$t0" "$t1" "$((esp1 - esp0))" <<'PYEOF'
import json, sys
what, n, got = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d0, d1 = json.loads(sys.argv[4] or "{}"), json.loads(sys.argv[5] or "{}")
rx0, tx0 = map(int, sys.argv[6].split()); rx1, tx1 = map(int, sys.argv[7].split())
delta = {k: v - d0.get(k, 0) for k, v in d1.items() if v != d0.get(k, 0)}
# charon's TUN also carries a stray packet of its own now and then (TX one
# above the replies): per-direction figures are evidence, the replies decide.
print(f"[moatd-interop] {what}: {got}/{n} replies; charon decrypted {rx1 - rx0} of the {n} requests "
      f"(moatd -> charon), protected {tx1 - tx0} packets (charon -> moatd); "
      f"moatd drops during the flood: {delta or 'none'}; charon libipsec drop lines: {sys.argv[8]}")
PYEOF
    [ "$rc" = 0 ] && [ "${received:-0}" = "$FLOOD" ] || {
        grep -E 'does not belong to an installed SA|could not find an outbound' "$RUN/swan/charon.log" | tail -5
        fail "$what: a rekey under load lost $((FLOOD - ${received:-0})) of $FLOOD packets"; }
    [ -n "$spis1" ] && [ "$spis1" != "$spis0" ] || fail "$what: charon's $kind SA was not rekeyed ($spis0)"
    [ "$kind" != ike ] || [ "$(child_spis)" = "$CHILD_BEFORE_IKE" ] || fail "$what: the CHILD SA did not survive the IKE rekey"
    log "$what: rekeyed ($spis0-> $spis1), no packet lost"
}
rekey_rounds() { # WHO: CHILD rekeys initiated by charon and by moatd, then IKE rekeys both ways
    local r
    for r in $(seq 1 "${REKEY_ROUNDS:-2}"); do
        rekey_under_flood "$1: CHILD rekey by charon #$r" child sw --rekey --child net
        rekey_under_flood "$1: CHILD rekey by moatd #$r" child ctl ike rekey swan
    done
    # PFS (the ESP proposals name x25519): both sides' CHILD rekeys carry a KE.
    grep -q 'PFS (CURVE_25519)' "$RUN/moatd.log" || fail "$1: moatd's CHILD rekeys without PFS"
    grep -qE 'generating CREATE_CHILD_SA request [0-9]+ \[ N\(REKEY_SA\) SA No KE' "$RUN/swan/charon.log" ||
        fail "$1: charon's CHILD rekeys without PFS"
    grep -qE 'parsed CREATE_CHILD_SA response [0-9]+ \[ SA No KE TSi TSr' "$RUN/swan/charon.log" ||
        fail "$1: moatd answered charon's PFS rekey without a KE"
    CHILD_BEFORE_IKE=$(child_spis)
    rekey_under_flood "$1: IKE rekey by moatd" ike ctl ike rekey swan ike
    CHILD_BEFORE_IKE=$(child_spis)
    rekey_under_flood "$1: IKE rekey by charon" ike sw --rekey --ike lab
    [ "$(sw --list-sas 2>/dev/null | grep -c ESTABLISHED)" = 1 ] || { sw --list-sas; fail "$1: charon keeps more than one IKE SA after the IKE rekeys"; }
}

ike_stat() { ctl --json show stats 2>/dev/null | $PY -c 'import json, sys; print(json.load(sys.stdin).get("ike", {}).get(sys.argv[1], 0))' "$1"; }
rekey_collision() { # WHO: moatd and charon rekey the same CHILD SA at once (RFC 7296 §2.8.1)
    local before after c0 c1 i stopper
    before=$(child_spis); c0=$(ike_stat rekey_collisions)
    # Make the two requests cross. moatd's CREATE_CHILD_SA request is dropped
    # on arrival at charon (moatd retransmits it after 1 s); moatd is paused
    # meanwhile, so charon's own request waits in moatd's receive ring. On
    # resuming, moatd's due retransmission leaves before its answer to
    # charon's request: each end gets the other's request while its own is
    # outstanding. (IKE header: exchange type at UDP payload byte 4+18, flags
    # at 4+19; 36 = CREATE_CHILD_SA, 0x20 = response.)
    nsx "$NS_S" nft -f - <<NFT || fail "$1: nft"
table inet moatcoll {
    chain in {
        type filter hook input priority 0;
        ip saddr 198.51.100.1 udp dport 4500 @th,240,8 36 @th,248,8 & 0x20 == 0 drop
    }
}
NFT
    ctl ike rekey swan >/dev/null || fail "$1: moatctl ike rekey failed"
    sleep 0.1
    kill -STOP "$(cat "$RUN/moatd.pid")"
    sw --rekey --child net >"$RUN/rekey.out" 2>&1 &
    stopper=$!
    sleep 1.3
    nsx "$NS_S" nft delete table inet moatcoll
    kill -CONT "$(cat "$RUN/moatd.pid")"
    wait $stopper
    for i in $(seq 1 50); do
        after=$(child_spis); c1=$(ike_stat rekey_collisions)
        [ "$c1" != "$c0" ] && [ -n "$after" ] && [ "$after" != "$before" ] && [ "$(echo $after | wc -w)" = 1 ] && break
        sleep 0.2
    done
    grep -i collision "$RUN/moatd.log" | tail -1
    grep -i collision "$RUN/swan/charon.log" | tail -1
    [ "$c1" = $((c0 + 1)) ] || fail "$1: moatd saw no rekey collision (rekey_collisions $c0 -> $c1)"
    grep -qi 'collision' "$RUN/swan/charon.log" || fail "$1: charon saw no rekey collision"
    [ "$(echo $after | wc -w)" = 1 ] && [ "$after" != "$before" ] || { sw --list-sas; fail "$1: charon does not have exactly one new CHILD SA after the collision ($before -> $after)"; }
    sleep 1
    pings_both_ways "$1: after a rekey collision"
    check_show "$1: after a rekey collision"
    # Both ends agree on the surviving SA: moatd's engine lists one CHILD SA, charon's.
    ctl --json show ike | $PY -c '
import json, sys
sas = [s for s in json.load(sys.stdin) if s["tunnel"] == "swan" and s["state"] == "ESTABLISHED"]
kids = [c for s in sas for c in s["children"]]
ok = len(kids) == 1 and kids[0]["spi_out"] == sys.argv[1].strip()
print("moatd CHILD SAs after the collision:", [(c["spi_in"], c["spi_out"]) for c in kids], "charon in:", sys.argv[1].strip())
sys.exit(0 if ok else 1)' "$after" || fail "$1: moatd and charon disagree on the CHILD SA left after the collision"
    log "$1: rekey collision settled: one CHILD SA left, the same on both ends"
}

# ---------------------------------------------------------------- moatd's own lifetimes
# moatd answered the IKE SA (charon initiated) and charon never rekeys (its
# timers: a day), so whatever rekeys happen are moatd's, by the tunnel file's
# `rekey:`/`lifetime:` and `ike_rekey:` alone (RFC 7296 §2.8: either end may).
stat_json() { ctl --json show stats 2>/dev/null | $PY -c 'import json, sys; print(json.dumps(json.load(sys.stdin).get("ike", {})))'; }
moat_child() { # "spi_in spi_out" of moatd's CHILD SA of tunnel swan; empty unless exactly one
    ctl --json show ike 2>/dev/null | $PY -c '
import json, sys
kids = [c for s in json.load(sys.stdin) if s["tunnel"] == "swan" and s["state"] == "ESTABLISHED" for c in s["children"]]
print(kids[0]["spi_in"], kids[0]["spi_out"]) if len(kids) == 1 else print()'; }
sad_view() { # moatd's SAD for tunnel swan (show tunnels): "STATE SPI@PEER ..." (SPIs without 0x)
    ctl --json show tunnels 2>/dev/null | $PY -c '
import json, sys
t = [t for t in json.load(sys.stdin) if t["tunnel"] == "swan"]
print(t[0]["state"], *sorted(sa["spi"][2:] + "@" + sa["peer"] for sa in t[0]["sas"])) if t else print("absent")'; }
ike_field() { # FIELD of moatd's established IKE SA of tunnel swan (show ike)
    ctl --json show ike 2>/dev/null | $PY -c '
import json, sys
s = [x for x in json.load(sys.stdin) if x["tunnel"] == "swan" and x["state"] == "ESTABLISHED"]
print(s[0].get(sys.argv[1], "") if len(s) == 1 else "")' "$1"; }
swan_count() { grep -cE "$1" "$RUN/swan/charon.log"; }
swan_child_age() { # seconds since charon installed the CHILD SA whose inbound SPI is $1
    sw --list-sas 2>/dev/null | awk -v spi="$1" '
        /#[0-9]+, reqid/ {age = ""}
        /installed [0-9]+s ago/ {for (i = 1; i <= NF; i++) if ($i == "installed") {age = $(i + 1); sub("s", "", age)}}
        $1 == "in" {s = $2; sub(",", "", s); if (s == spi) {print age; exit}}'; }

LIFE_FLOOD=${LIFE_FLOOD:-2400}  # pings at 5 ms: 12 s, across moatd's CHILD rekey (6 s) and IKE rekey (9 s)
phase_lifetimes() {
    log "=== lifetimes: charon initiates (its rekeys: a day), moatd rekeys by its own (CHILD 6 s/8 s, IKE 9 s)"
    charon_stop; stop_pid "$RUN/moatd.pid" moatd
    # The CHILD rekey comes first, while moatd is still the IKE SA's
    # responder (the IKE rekey moatd starts makes it the new one's initiator).
    M_LIFE=$'rekey: 6s\nlifetime: 8s\nike_rekey: 9s\nike_lifetime: 60s' moatd_conf false
    moatd_start
    # charon without liveness checks: cut off below, it must not give the
    # IKE SA up on its own (its DPD would, and start again: INITIAL_CONTACT).
    SW_DPD=0 charon_conf start
    charon_start || fail "charon did not start"
    local s0 s1 gen0 child_req0 ike_req0 ike0 ike1 kids0 kids1 flood rc received i
    local child_seen="" ike_seen="" t0=$SECONDS t_child t_ike child_ike
    gen0=$(swan_count 'generating CREATE_CHILD_SA request')
    child_req0=$(swan_count 'parsed CREATE_CHILD_SA request [0-9]+ \[ N\(REKEY_SA\)')
    ike_req0=$(swan_count 'parsed CREATE_CHILD_SA request [0-9]+ \[ SA No KE \]')
    wait_up "lifetimes" 20
    t0=$SECONDS
    for i in $(seq 1 10); do nsx "$NS_H" ping -q -c 1 -W 1 10.9.0.1 >/dev/null && break; done
    s0=$(stat_json); kids0=$(child_spis); ike0=$(ike_spis)
    case "$ike0" in *_i\**) ;; *) fail "lifetimes: charon did not initiate the IKE SA ($ike0)";; esac
    nsx "$NS_H" ping -q -c "$LIFE_FLOOD" -i 0.005 -W 2 10.9.0.1 >"$RUN/flood" 2>&1 &
    flood=$!
    # Both rekeys must complete while the flood still runs.
    while kill -0 $flood 2>/dev/null; do
        ike1=$(ike_spis)
        if [ -z "$child_seen" ] && [ "$(ike_stat child_rekeyed)" -gt "$($PY -c 'import json, sys; print(json.loads(sys.argv[1]).get("child_rekeyed", 0))' "$s0")" ]; then
            child_seen=1; t_child=$((SECONDS - t0)); child_ike=$ike1  # the IKE SA it was rekeyed on
        fi
        if [ -z "$ike_seen" ]; then
            case "$ike1" in *_r\**) [ "$ike1" != "$ike0" ] && { ike_seen=1; t_ike=$((SECONDS - t0)); };; esac
        fi
        sleep 0.3
    done
    wait $flood; rc=$?
    received=$(grep -oE '[0-9]+ received' "$RUN/flood" | awk '{print $1}')
    # moatd deletes the old CHILD SA after the rekey: charon keeps one.
    for i in $(seq 1 25); do
        kids1=$(child_spis)
        [ -n "$kids1" ] && [ "$kids1" != "$kids0" ] && [ "$(echo $kids1 | wc -w)" = 1 ] && break; sleep 0.2
    done
    s1=$(stat_json)
    log "lifetimes: $received/$LIFE_FLOOD replies; CHILD rekey seen at ${t_child:-never} s, IKE rekey at ${t_ike:-never} s after the IKE SA was up; charon CHILD ${kids0}-> $kids1, IKE ${ike0}-> $(ike_spis)"
    [ "$rc" = 0 ] && [ "${received:-0}" = "$LIFE_FLOOD" ] ||
        fail "lifetimes: moatd's own rekeys under load lost $((LIFE_FLOOD - ${received:-0})) of $LIFE_FLOOD packets"
    [ -n "$child_seen" ] || fail "lifetimes: moatd did not rekey its CHILD SA by its lifetime while the flood ran"
    [ "$child_ike" = "$ike0" ] || fail "lifetimes: moatd's CHILD rekey was not on the IKE SA charon initiated ($ike0; then $child_ike)"
    [ -n "$ike_seen" ] || fail "lifetimes: moatd did not rekey the IKE SA by ike_rekey while the flood ran (charon: $ike0 -> $(ike_spis))"
    [ "$(echo $kids1 | wc -w)" = 1 ] && [ "$kids1" != "$kids0" ] || { sw --list-sas; fail "lifetimes: charon's CHILD SA was not replaced by exactly one ($kids0 -> $kids1)"; }
    # charon's own account: it answered a CHILD rekey and an IKE rekey, and
    # sent no CREATE_CHILD_SA request of its own.
    [ "$(swan_count 'generating CREATE_CHILD_SA request')" = "$gen0" ] || fail "lifetimes: charon initiated a rekey itself"
    [ "$(swan_count 'parsed CREATE_CHILD_SA request [0-9]+ \[ N\(REKEY_SA\)')" -gt "$child_req0" ] || fail "lifetimes: charon got no CHILD rekey request"
    [ "$(swan_count 'parsed CREATE_CHILD_SA request [0-9]+ \[ SA No KE \]')" -gt "$ike_req0" ] || fail "lifetimes: charon got no IKE rekey request"
    $PY - "$s0" "$s1" <<'PYEOF' || fail "lifetimes: moatd's counters do not show its rekeys"
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d = {k: b.get(k, 0) - a.get(k, 0) for k in ("child_rekeyed", "child_expired", "ike_expired", "rekey_collisions", "ike_given_up")}
print("[moatd-interop] lifetimes: moatd counter deltas", d)
sys.exit(0 if d["child_rekeyed"] >= 1 and d["child_expired"] == 0 and d["ike_expired"] == 0 and d["rekey_collisions"] == 0
         and d["ike_given_up"] == 0 else 1)
PYEOF
    pings_both_ways "lifetimes: after moatd's own rekeys"
    check_show "lifetimes: after moatd's own rekeys"

    # The peer cannot answer: charon's IKE (UDP 500, and 4500 with the
    # non-ESP marker) is dropped both ways, ESP still passes. moatd's rekey
    # at the soft lifetime goes unanswered (its retransmits last a minute),
    # so the CHILD SA must leave moatd's data path at its hard lifetime.
    # The cut comes right after moatd's next own CHILD rekey (its old SA
    # deleted), so the SA it leaves is young and no exchange is half done.
    log "--- lifetimes: charon's IKE cut off: moatd's CHILD SA must leave its SAD at the hard lifetime (8 s)"
    local cin cout age due gone="" t_gone sad0 sad1 b0 r0
    r0=$(ike_stat child_rekeyed)
    for i in $(seq 1 60); do
        [ "$(ike_stat child_rekeyed)" -gt "$r0" ] && [ -n "$(moat_child)" ] && break; sleep 0.2
    done
    [ "$(ike_stat child_rekeyed)" -gt "$r0" ] || fail "lifetimes: moatd did not rekey its CHILD SA again by its lifetime"
    nsx "$NS_S" nft -f - <<'NFT' || fail "lifetimes: nft"
table inet moatcut {
    chain out { type filter hook output priority 0;
        ip daddr 198.51.100.1 udp dport 500 counter drop
        ip daddr 198.51.100.1 udp dport 4500 @th,64,32 0 counter drop
    }
    chain in { type filter hook input priority 0;
        ip saddr 198.51.100.1 udp sport 500 counter drop
        ip saddr 198.51.100.1 udp sport 4500 @th,64,32 0 counter drop
    }
}
NFT
    b0=$SECONDS
    read -r cin cout <<<"$(moat_child)"
    [ -n "$cin" ] || { ctl show ike; fail "lifetimes: moatd does not have exactly one CHILD SA"; }
    age=$(swan_child_age "$cout")
    [ -n "$age" ] || { sw --list-sas; fail "lifetimes: charon does not list moatd's CHILD SA $cout"; }
    due=$((8 - age))
    s0=$(stat_json); sad0=$(sad_view)
    log "lifetimes: CHILD SA ${cin}_i ${cout}_o, $age s old: hard lifetime in about $due s; SAD: $sad0"
    case "$sad0" in up*"$cin@"*) ;; *) fail "lifetimes: moatd's SAD does not hold CHILD SA $cin ($sad0)";; esac
    nsx "$NS_H" ping -q -c 1 -W 1 10.9.0.1 >/dev/null || fail "lifetimes: ESP stopped as soon as IKE was cut off"
    for i in $(seq 1 $(((due + 5) * 5))); do
        [ "$(ike_stat child_expired)" -gt "$($PY -c 'import json, sys; print(json.loads(sys.argv[1]).get("child_expired", 0))' "$s0")" ] &&
            { gone=1; t_gone=$((SECONDS - b0)); break; }
        sleep 0.2
    done
    s1=$(stat_json); sad1=$(sad_view)
    log "lifetimes: child_expired seen ${t_gone:-never} s after the cut (due in $due s); SAD now: $sad1"
    [ -n "$gone" ] || { ctl show ike; fail "lifetimes: moatd did not delete the unanswered CHILD SA at its hard lifetime"; }
    [ "$t_gone" -ge $((due - 2)) ] || fail "lifetimes: the CHILD SA went ${t_gone} s after the cut, before its hard lifetime (due in $due s)"
    case " $sad1 " in *" $cin@"*|*" $cout@"*) fail "lifetimes: CHILD SA $cin/$cout is still in moatd's SAD ($sad1)";; esac
    case "$sad1" in down*) ;; *) fail "lifetimes: the tunnel still has an outbound SA after the expiry ($sad1)";; esac
    $PY - "$s0" "$s1" <<'PYEOF' || fail "lifetimes: moatd's counters do not show a hard-lifetime expiry (the IKE SA must still stand)"
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d = {k: b.get(k, 0) - a.get(k, 0) for k in ("child_expired", "child_removed", "child_rekeyed", "ike_given_up", "ike_deleted", "tx_retransmits")}
print("[moatd-interop] lifetimes: moatd counter deltas while cut off", d)
sys.exit(0 if d["child_expired"] == 1 and d["child_rekeyed"] == 0 and d["ike_given_up"] == 0 and d["ike_deleted"] == 0
         and d["tx_retransmits"] >= 1 else 1)
PYEOF
    ctl --json show ike | $PY -c '
import json, sys
sas = [s for s in json.load(sys.stdin) if s["tunnel"] == "swan"]
est = [s for s in sas if s["state"] == "ESTABLISHED"]
sys.exit(0 if len(est) == 1 and not any(s["children"] for s in sas) else 1)' ||
        { ctl show ike; fail "lifetimes: moatd's IKE SA should stand without the expired CHILD SA"; }
    nsx "$NS_H" ping -q -c 2 -i 0.2 -W 1 10.9.0.1 >/dev/null 2>&1 && fail "lifetimes: 10.9.0.1 still answers after the CHILD SA expired"
    log "lifetimes: unanswered, the CHILD SA left moatd's SAD at its hard lifetime; the IKE SA stands"
    # IKE passes again: moatd's requests waiting behind the unanswered one
    # (its retransmits: 1, 2, 4, 8 s apart) reach charon, among them the
    # DELETE of the expired SA: charon must drop it, and the tunnel come
    # back without a new IKE_AUTH (moatd's queued rekey, or charon's
    # close_action = start), with pings both ways.
    nsx "$NS_S" nft delete table inet moatcut
    for i in $(seq 1 125); do
        ! swan_child_age "$cout" | grep -q . && swan_installed && moat_established && break; sleep 0.2
    done
    swan_child_age "$cout" | grep -q . && { sw --list-sas; fail "lifetimes: charon still has the CHILD SA moatd deleted at its hard lifetime ($cout)"; }
    wait_up "lifetimes: after IKE passes again" 5
    s1=$(stat_json)
    [ "$($PY -c 'import json, sys; print(json.loads(sys.argv[2])["ike_established"] - json.loads(sys.argv[1])["ike_established"])' "$s0" "$s1")" = 0 ] ||
        fail "lifetimes: the tunnel came back through a new IKE SA (IKE_AUTH), not on the one that stood"
    pings_both_ways "lifetimes: after the expiry, IKE passing again"
    log "lifetimes: IKE back: charon dropped the expired SA, the tunnel is up again without a new IKE_AUTH"
}

# ---------------------------------------------------------------- MOBIKE, charon roams
# charon initiates with MOBIKE, then its address changes (198.51.100.2 -> .3):
# it sends UPDATE_SA_ADDRESSES from there. moatd moves the IKE SA at once
# but its data path only after charon echoed the COOKIE2 of its return
# routability check (RFC 4555 §3.7), sent to the new address. charon's
# answers to moatd's INFORMATIONAL requests are held back for a while by an
# nftables rule: until they pass, moatd's SAD must still send to .2.
phase_mobike_responder() {
    log "=== MOBIKE: charon initiates with mobike = yes, then moves to 198.51.100.3; moatd checks before its ESP follows"
    charon_stop; stop_pid "$RUN/moatd.pid" moatd
    # moatd sends no liveness checks: after the move its only request is the check.
    M_DPD=0 moatd_conf false
    moatd_start
    SW_MOBIKE=yes SW_LOCAL=%any charon_conf none
    charon_start || fail "charon did not start"
    sw --initiate --child net --timeout 10 >"$RUN/initiate.out" 2>&1 || { cat "$RUN/initiate.out"; fail "mobike-responder: swanctl --initiate failed"; }
    wait_up "mobike-responder" 20
    pings_both_ways "mobike-responder: before the move"
    local s0 s1 ike0 sad i held=0 t_held t_moved
    ctl --json show ike | $PY -c '
import json, sys
s = [x for x in json.load(sys.stdin) if x["tunnel"] == "swan" and x["state"] == "ESTABLISHED"]
sys.exit(0 if len(s) == 1 and s[0]["mobike"] and s[0]["role"] == "responder" else 1)' ||
        { ctl show ike; fail "mobike-responder: MOBIKE not negotiated (or moatd not the responder)"; }
    s0=$(stat_json); ike0=$(ike_spis)
    # IKE header at UDP payload byte 4 (after the non-ESP marker): exchange
    # type at +18 (37 INFORMATIONAL), flags at +19 (0x20 response).
    nsx "$NS_S" nft -f - <<'NFT' || fail "mobike-responder: nft"
table inet moathold {
    chain out { type filter hook output priority 0;
        ip daddr 198.51.100.1 udp dport 4500 @th,64,32 0 @th,240,8 37 @th,248,8 & 0x20 == 0x20 counter drop
    }
}
NFT
    nsx "$NS_S" ip addr del 198.51.100.2/24 dev wan0
    nsx "$NS_S" ip addr add 198.51.100.3/24 dev wan0
    # moatd's check reaches charon at .3 and charon answers it: held.
    for i in $(seq 1 50); do
        held=$(nsx "$NS_S" nft list table inet moathold | grep -oE 'packets [0-9]+' | awk '{print $2}')
        [ "${held:-0}" -ge 1 ] && [ -n "$(ike_field mobike_check)" ] && break
        sleep 0.2
    done
    sad=$(sad_view)
    log "mobike-responder: charon's answers held: ${held:-0}; moatd's check: $(ike_field mobike_check); SAD: $sad"
    [ "${held:-0}" -ge 1 ] || { ctl show ike; fail "mobike-responder: charon answered no INFORMATIONAL of moatd at its new address (no return routability check?)"; }
    [ "$(ike_field mobike_check)" = "checking 198.51.100.3:4500; ESP still to 198.51.100.2:4500" ] ||
        { ctl show ike; fail "mobike-responder: show ike does not name the check under way"; }
    [ "$(ike_field remote)" = 198.51.100.3:4500 ] || fail "mobike-responder: moatd's IKE SA did not move to charon's new address"
    # Through one retransmission of the check (1 s), the data path stays.
    sleep 1.2
    sad=$(sad_view)
    case "$sad" in up*) ;; *) fail "mobike-responder: the tunnel lost its SA during the check ($sad)";; esac
    [ -z "$(echo "$sad" | tr ' ' '\n' | grep '@' | grep -v '@198.51.100.2:4500$')" ] ||
        fail "mobike-responder: moatd's SAD moved before charon's answer to the check arrived ($sad)"
    nsx "$NS_S" nft delete table inet moathold
    for i in $(seq 1 50); do
        sad=$(sad_view)
        [ -z "$(echo "$sad" | tr ' ' '\n' | grep '@' | grep -v '@198.51.100.3:4500$')" ] && [ -z "$(ike_field mobike_check)" ] && break
        sleep 0.2
    done
    s1=$(stat_json)
    log "mobike-responder: released; SAD: $sad"
    [ -z "$(echo "$sad" | tr ' ' '\n' | grep '@' | grep -v '@198.51.100.3:4500$')" ] ||
        { ctl show ike; fail "mobike-responder: moatd's SAD did not follow charon to 198.51.100.3 after its echo"; }
    $PY - "$s0" "$s1" <<'PYEOF' || fail "mobike-responder: moatd's MOBIKE counters"
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d = {k: b.get(k, 0) - a.get(k, 0) for k in ("mobike_moved", "mobike_checks", "mobike_check_failed", "mobike_ignored", "ike_established")}
print("[moatd-interop] mobike-responder: moatd counter deltas", d)
sys.exit(0 if d["mobike_moved"] >= 1 and d["mobike_checks"] >= 1 and d["mobike_check_failed"] == 0
         and d["mobike_ignored"] == 0 and d["ike_established"] == 0 else 1)
PYEOF
    [ "$(ike_spis)" = "$ike0" ] || fail "mobike-responder: the IKE SA was replaced ($ike0 -> $(ike_spis)), not moved"
    sw --list-sas 2>/dev/null | grep -q "local  '$S_ID' @ 198.51.100.3" || { sw --list-sas; fail "mobike-responder: charon's SA is not at 198.51.100.3"; }
    pings_both_ways "mobike-responder: from charon's new address"
    check_show "mobike-responder: from charon's new address"
}

# ONLY="lifetimes mobike_responder": just these phases (each starts its own
# moatd and charon), e.g. while working on one.
if [ -n "${ONLY:-}" ]; then
    for ph in $ONLY; do "phase_$ph"; done
    log "PASS: $ONLY"
    exit 0
fi

# ================================================================ responder
log "=== moatd responds, charon initiates"
moatd_conf false
moatd_start
charon_conf start
charon_start || fail "charon did not start"
wait_up responder 20
pings_both_ways responder
check_show responder

log "--- charon restarted (start_action=start): the tunnel comes back by itself"
charon_stop
charon_start || fail "charon did not start"
sleep 1
wait_up "responder after charon restart" 30
pings_both_ways "responder after charon restart"
check_show "responder after charon restart"

# charon behind a small MTU: its ESP in UDP leaves in outer IP fragments
# (libipsec's socket lets the kernel fragment). moatd's fast path hands UDP
# fragments to the kernel behind the punt path, which reassembles them for
# the IKE socket; moatd must take the ESP from there back to a worker and
# decrypt it. Datagrams from charon's side to the host must arrive whole.
log "--- ESP in outer fragments (charon's link MTU 1000)"
nsx "$NS_S" ip link set wan0 mtu 1000
inj0=$(ctl --json show stats | $PY -c 'import json, sys; print(sum(w["injected"] for w in json.load(sys.stdin)["workers"]))')
nsx "$NS_H" timeout 10 $PY -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.1.0.2", 9999)); s.settimeout(8)
d, a = s.recvfrom(4000)
print(len(d), a[0])' >"$RUN/frag-rx.txt" 2>&1 &
rx=$!
sleep 0.5
for i in 1 2 3; do
    nsx "$NS_S" $PY -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.9.0.1", 0)); s.sendto(b"m" * 1300, ("10.1.0.2", 9999))'
    sleep 0.3
done
wait $rx
nsx "$NS_S" ip link set wan0 mtu 1500
inj1=$(ctl --json show stats | $PY -c 'import json, sys; print(sum(w["injected"] for w in json.load(sys.stdin)["workers"]))')
[ "$(cat "$RUN/frag-rx.txt")" = "1300 10.9.0.1" ] || { cat "$RUN/frag-rx.txt"; fail "outer fragments: the host did not get charon's 1300-byte datagram"; }
[ "$inj1" -gt "$inj0" ] || fail "outer fragments: moatd injected nothing back (the ESP did not come through the kernel)"
log "outer fragments: charon's fragmented ESP reassembled, decrypted, delivered (1300 bytes)"
pings_both_ways "after outer fragments"

log "--- forced rekeys under a ping flood (moatd answered the IKE SA)"
rekey_rounds responder
log "--- simultaneous CHILD rekeys (collision)"
rekey_collision responder
pings_both_ways "after rekey"
check_show "after rekey"

# ================================================================ initiator
log "=== moatd initiates (start: true), charon responds"
charon_stop
stop_pid "$RUN/moatd.pid" moatd
charon_conf none
charon_start || fail "charon did not start"
moatd_conf true
moatd_start
wait_up initiator 30
pings_both_ways initiator
check_show initiator

log "--- forced rekeys under a ping flood (moatd initiated the IKE SA)"
rekey_rounds initiator
pings_both_ways "initiator after rekeys"
check_show "initiator after rekeys"

log "--- moatctl ike terminate / initiate"
before=$(sw --list-sas 2>/dev/null | grep -oE '^\s+in\s+[0-9a-f]{8}' | awk '{print $2}')
ctl ike terminate swan >/dev/null || fail "moatctl ike terminate failed"
ctl ike initiate swan >/dev/null || fail "moatctl ike initiate failed"
sleep 1
wait_up "after ike terminate/initiate" 20
after=$(sw --list-sas 2>/dev/null | grep -oE '^\s+in\s+[0-9a-f]{8}' | awk '{print $2}')
[ -n "$after" ] && [ "$before" != "$after" ] || fail "ike terminate/initiate: charon still has the old CHILD SA ($before)"
pings_both_ways "after ike terminate/initiate"
check_show "after ike terminate/initiate"

log "--- charon restarted (start_action=none): moatd brings the tunnel back"
charon_stop
charon_start || fail "charon did not start"
wait_up "initiator after charon restart" 60
pings_both_ways "initiator after charon restart"

# The tunnels directory changed at run time (moatctl ike reload): a removed
# record tears its tunnel down (charon is told, the route into it goes); a
# record added back comes up by itself; a broken record is named with its
# file:line:col and skipped, and a broken record of a running tunnel keeps
# that tunnel as it was.
log "--- moatctl ike reload: tunnels removed, added and broken at run time"
reload_json() { ctl --json ike reload >"$RUN/reload.json" 2>&1 || { cat "$RUN/reload.json"; fail "$1: moatctl ike reload failed"; }; }
reload_has() { # WHAT PYTHON-EXPRESSION over r (the reply)
    $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)' \
        "$RUN/reload.json" "$2" || { cat "$RUN/reload.json"; fail "$1: reload reply: not $2"; }
}
mv "$RUN/moats.d/swan.yaml" "$RUN/swan.yaml.saved"
reload_json "remove"
reload_has "remove" 'r["removed"] == ["swan"] and r["tunnels"] == 0'
for i in $(seq 1 50); do swan_installed || break; sleep 0.2; done
swan_installed && { sw --list-sas; fail "ike reload: charon still has the CHILD SA of the removed tunnel"; }
ctl --json show tunnels | $PY -c 'import json, sys; sys.exit(1 if any(t["tunnel"] == "swan" for t in json.load(sys.stdin)) else 0)' \
    || fail "ike reload: show tunnels still lists the removed tunnel"
nsx "$NS_H" ping -q -c 2 -i 0.2 -W 1 10.9.0.1 >/dev/null 2>&1 && fail "ike reload: 10.9.0.1 still answers after its tunnel was removed"
log "removed: charon's SA is gone, so is the tunnel"
printf 'remote_id: other@moat.test\npsk: "x"\nfunnels: 5\n' >"$RUN/moats.d/broken.yaml"
cp "$RUN/swan.yaml.saved" "$RUN/moats.d/swan.yaml"
reload_json "add back"
reload_has "add back" 'r["added"] == ["swan"] and r["tunnels"] == 1'
reload_has "add back" 'any("broken.yaml:3:" in e for e in r["errors"])'
wait_up "after ike reload added the tunnel back" 30
pings_both_ways "after ike reload added the tunnel back"
echo "funnels: [oops" >>"$RUN/moats.d/swan.yaml"
reload_json "broken"
reload_has "broken" 'r["kept_as_they_were"] == ["swan"] and any("swan.yaml:" in e for e in r["errors"])'
sleep 1
moat_established || fail "ike reload: a broken record took its running tunnel down"
pings_both_ways "after ike reload of a broken record"
cp "$RUN/swan.yaml.saved" "$RUN/moats.d/swan.yaml"; rm -f "$RUN/moats.d/broken.yaml"
reload_json "repaired"
reload_has "repaired" 'r["errors"] == [] and r["added"] == [] and r["removed"] == []'

# MOBIKE (RFC 4555): moatd initiated the IKE SA with MOBIKE; its WAN port's
# address changes (moatctl address set); it sends UPDATE_SA_ADDRESSES from
# the new address, charon moves the SAs, ESP leaves from the new address.
log "--- MOBIKE: moatctl address set moves the SAs moatd initiated"
charon_stop
SW_MOBIKE=yes charon_conf none
charon_start || fail "charon did not start"
ctl ike terminate swan >/dev/null 2>&1; ctl ike initiate swan >/dev/null 2>&1
sleep 1
wait_up "MOBIKE" 20
ctl --json show ike | $PY -c '
import json, sys
doc = json.load(sys.stdin)
sas = doc if isinstance(doc, list) else doc.get("sas", doc.get("ike", []))
s = [x for x in sas if x.get("state") == "ESTABLISHED"]
sys.exit(0 if s and s[0].get("mobike") else 1)' \
    || fail "MOBIKE: not negotiated with charon (mobike = yes)"
ctl address set wan 198.51.100.5/24 >/dev/null || fail "moatctl address set failed"
for i in $(seq 1 50); do sw --list-sas 2>/dev/null | grep -q "remote '$M_ID' @ 198.51.100.5" && break; sleep 0.2; done
sw --list-sas 2>/dev/null | grep -q "remote '$M_ID' @ 198.51.100.5" || { sw --list-sas; fail "MOBIKE: charon did not move the SA to moatd's new address"; }
[ "$(ike_stat mobike_sent)" -ge 1 ] || fail "MOBIKE: moatd counted no UPDATE_SA_ADDRESSES"
pings_both_ways "after moatd's address change (MOBIKE)"

phase_lifetimes
phase_mobike_responder

log "PASS: moatd <-> strongSwan: both roles, traffic both ways, show ike/tunnels, charon restarts, rekey under load, ike reload, MOBIKE both ways, moatd's own lifetimes"
