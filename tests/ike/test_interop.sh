#!/bin/bash
# IKEv2 interop against strongSwan (charon-systemd + kernel-libipsec), in two
# network namespaces joined by a veth:
#
#   moat ns: moat-iked  192.0.2.1 ==== 192.0.2.2  swan ns: charon
#
# kernel-libipsec always claims a NAT, so every case runs over UDP 4500 with
# NAT-T on Moat's side. Each case checks strongSwan's view (swanctl
# --list-sas) against Moat's ChildSaSink log: SAs up, SPIs mirrored, ESP keys
# equal to the ones charon logs at chd=4.
#
# Needs root, charon-systemd and swanctl. Cleans up its namespaces and
# daemons on any exit; each wait is bounded.
#   env: MOAT_IKED (path to moat-iked), KEEP=1 keeps the run dir.
set -u
. "$(dirname "$0")/swan.sh"  # charon: CHARON, stop_pid, swan_daemon_conf, sw, charon_start, charon_stop
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IKED="${MOAT_IKED:?set MOAT_IKED to the moat-iked binary}"
[ "$(id -u)" = 0 ] || { echo "FAIL: needs root (namespaces)"; exit 1; }
[ -x "$CHARON" ] && command -v swanctl >/dev/null || { echo "FAIL: strongSwan missing (scripts/setup.sh installs it)"; exit 1; }

P="ikt$$"
NS_M="$P-moat"; NS_S="$P-swan"; NS_N="$P-nat"; NS_MN="$P-moatn"
RUN="$(mktemp -d /tmp/moat-ike-interop.XXXXXX)"; mkdir -p "$RUN/swan"
PSK="moat-interop-psk-0123456789abcdef"
M_WAN=192.0.2.1; S_WAN=192.0.2.2
M_ID=moat.example.net; S_ID=swan@example.net
PASS=0; FAILS=()

log() { echo "[interop] $*"; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }


cleanup() {
    stop_pid "$RUN/iked.pid" moat-iked
    stop_pid "$RUN/charon.pid" charon-systemd
    for ns in "$NS_M" "$NS_S" "$NS_N" "$NS_MN"; do ip netns del "$ns" 2>/dev/null; done
    if [ "${KEEP:-0}" = 1 ] || ((${#FAILS[@]})); then log "run dir kept: $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS_M" && ip netns add "$NS_S" || { echo "FAIL: cannot create namespaces"; exit 1; }
ip link add "${P}m" type veth peer name "${P}s"
ip link set "${P}m" netns "$NS_M"; ip link set "${P}s" netns "$NS_S"
nsx "$NS_M" ip link set "${P}m" name wan0; nsx "$NS_S" ip link set "${P}s" name wan0
nsx "$NS_M" ip addr add $M_WAN/24 dev wan0; nsx "$NS_S" ip addr add $S_WAN/24 dev wan0
for ns in "$NS_M" "$NS_S"; do nsx "$ns" ip link set lo up; nsx "$ns" ip link set wan0 up; done
# kernel-libipsec routes the remote funnel through its TUN from an address
# inside the local funnel: give charon's namespace one.
nsx "$NS_S" ip link add lan0 type veth peer name lan1; nsx "$NS_S" ip addr add 10.2.0.1/24 dev lan0
nsx "$NS_S" ip link set lan1 up; nsx "$NS_S" ip link set lan0 up
# A second moat namespace behind a masquerading NAT:
#   moatn 10.9.0.2 --- 10.9.0.1 nat 198.18.0.1 (masquerade) --- 198.18.0.2 swan
ip netns add "$NS_N" && ip netns add "$NS_MN" || { echo "FAIL: cannot create namespaces"; exit 1; }
ip link add "${P}n1" type veth peer name "${P}n2"
ip link add "${P}n3" type veth peer name "${P}n4"
ip link set "${P}n1" netns "$NS_MN"; ip link set "${P}n2" netns "$NS_N"
ip link set "${P}n3" netns "$NS_N"; ip link set "${P}n4" netns "$NS_S"
nsx "$NS_MN" ip link set "${P}n1" name wan0; nsx "$NS_N" ip link set "${P}n2" name in0
nsx "$NS_N" ip link set "${P}n3" name out0; nsx "$NS_S" ip link set "${P}n4" name wan1
nsx "$NS_MN" ip addr add 10.9.0.2/24 dev wan0; nsx "$NS_N" ip addr add 10.9.0.1/24 dev in0
nsx "$NS_N" ip addr add 198.18.0.1/24 dev out0; nsx "$NS_S" ip addr add 198.18.0.2/24 dev wan1
for l in "$NS_MN lo" "$NS_MN wan0" "$NS_N lo" "$NS_N in0" "$NS_N out0" "$NS_S wan1"; do set -- $l; nsx "$1" ip link set "$2" up; done
nsx "$NS_MN" ip route add default via 10.9.0.1
nsx "$NS_N" sysctl -qw net.ipv4.ip_forward=1
NAT_OK=1
nsx "$NS_N" nft -f - <<'NFT' || NAT_OK=0
table ip nat {
    chain post { type nat hook postrouting priority srcnat; policy accept; oifname "out0" masquerade; }
}
NFT

# ---------------------------------------------------------------- strongSwan
charon_conf() { # IKE_PROPOSALS ESP_PROPOSALS PSK START(none|start) REMOTE_ID
    SW_TRIES=2 SW_CHD_LOG=4 swan_daemon_conf
    local auth_local="auth = psk
                id = $S_ID" auth_remote="auth = psk
                 id = ${5:-$M_ID}"
    if [ "${SW_AUTH:-psk}" = pubkey ]; then
        mkdir -p "$RUN/swan/swanctl/x509" "$RUN/swan/swanctl/x509ca" "$RUN/swan/swanctl/ecdsa"
        cp "$RUN/pki/ca.pem" "$RUN/swan/swanctl/x509ca/"; cp "$RUN/pki/swan.pem" "$RUN/swan/swanctl/x509/"
        cp "$RUN/pki/swan.key" "$RUN/swan/swanctl/ecdsa/"
        auth_local="auth = pubkey
                certs = swan.pem
                id = \"$SWAN_DN\""
        auth_remote="auth = pubkey
                 id = \"$MOAT_DN\""
    fi
    cat >"$RUN/swan/swanctl/swanctl.conf" <<EOF
connections {
    lab {
        version = 2
        local_addrs = ${SW_LOCAL:-$S_WAN}
        remote_addrs = ${SW_REMOTE:-$M_WAN}
        proposals = $1
        encap = yes
        mobike = ${SW_MOBIKE:-no}
        local { $auth_local }
        remote { $auth_remote }
        children {
            net {
                mode = tunnel
                local_ts = 10.2.0.0/24
                remote_ts = 10.1.0.0/24
                esp_proposals = $2
                start_action = $4
            }
        }
    }
}
secrets {
    ike-lab { id-a = $S_ID
              id-b = ${5:-$M_ID}
              secret = "$3" }
}
EOF
}

# ---------------------------------------------------------------- Moat
moat_conf() { # IKE_PROPOSALS ESP_PROPOSALS PSK START(true|false)
    rm -rf "$RUN/moats.d"; mkdir -p "$RUN/moats.d"
    local auth="local_id: $M_ID
remote_id: $S_ID
psk: \"$3\""
    [ "${MOAT_AUTH:-psk}" = pubkey ] && auth="auth: pubkey
cert: $RUN/pki/moat.pem
key: $RUN/pki/moat.key
ca: $RUN/pki/${MOAT_CA:-ca}.pem
remote_id: \"$SWAN_DN\""
    cat >"$RUN/moats.d/swan.yaml" <<EOF
$auth
remote: ${MOAT_REMOTE:-$S_WAN}
start: $4
ike_proposals: $1
esp_proposals: $2
funnels:
  - {local: 10.1.0.0/24, remote: 10.2.0.0/24}
EOF
}

iked_start() {
    : >"$RUN/sa.log"
    nsx "${IKED_NS:-$NS_M}" sh -c 'echo $$ >"$0"; exec "$@"' "$RUN/iked.pid" "$IKED" --dir "$RUN/moats.d" \
        --sa-log "$RUN/sa.log" --show "$RUN/show.json" --retransmit-ms 500 --retransmit-tries 3 \
        --fragment-size "${MOAT_FRAG:-1280}" \
        >>"$RUN/iked.log" 2>&1 </dev/null &
    local i
    for i in $(seq 1 30); do grep -q "tunnels loaded" "$RUN/iked.log" 2>/dev/null && return 0; sleep 0.1; done
    log "moat-iked did not start"; return 1
}

iked_show() { # writes $RUN/show.json
    rm -f "$RUN/show.json"
    kill -USR2 "$(cat "$RUN/iked.pid")"
    local i; for i in $(seq 1 30); do [ -s "$RUN/show.json" ] && return 0; sleep 0.1; done
    return 1
}

stat_of() { python3 -c "import json,sys; print(json.load(open('$RUN/show.json'))['stats']['$1'])"; }

wait_installed() { # up to 10 s for strongSwan to show an INSTALLED CHILD SA
    local i
    for i in $(seq 1 50); do sw --list-sas 2>/dev/null | grep -q INSTALLED && return 0; sleep 0.2; done
    return 1
}

case_end() {
    stop_pid "$RUN/iked.pid" moat-iked
    stop_pid "$RUN/charon.pid" charon-systemd
}

result() { # NAME STATUS
    if [ "$2" = 0 ]; then log "PASS $1"; PASS=$((PASS + 1)); else log "FAIL $1"; FAILS+=("$1"); fi
}

# Case: strongSwan initiates, Moat responds.
responder_case() { # NAME IKE ESP [expect]
    local name=$1 rc=0
    log "--- $name: strongSwan -> Moat, ike=$2 esp=$3"
    : >"$RUN/swan/charon.log" 2>/dev/null
    moat_conf "$2" "$3" "$PSK" false && iked_start || rc=1
    charon_conf "$2" "$3" "$PSK" none && charon_start || rc=1
    if [ $rc = 0 ]; then
        sw --initiate --child net --timeout 10 >"$RUN/$name.initiate" 2>&1 || { log "swanctl --initiate failed"; tail -5 "$RUN/$name.initiate"; rc=1; }
        wait_installed || rc=1
        sw --list-sas >"$RUN/$name.sas" 2>&1
        python3 "$HERE/swan_check.py" "$RUN/$name.sas" "$RUN/swan/charon.log" "$RUN/sa.log" r ${4:-} || rc=1
    fi
    [ $rc = 0 ] || { tail -20 "$RUN/iked.log"; }
    case_end
    result "$name" $rc
}

# Case: Moat initiates (start: true), strongSwan responds.
initiator_case() { # NAME IKE ESP [expect]
    local name=$1 rc=0
    log "--- $name: Moat -> strongSwan, ike=$2 esp=$3"
    : >"$RUN/swan/charon.log" 2>/dev/null
    charon_conf "$2" "$3" "$PSK" none && charon_start || rc=1
    moat_conf "$2" "$3" "$PSK" true && iked_start || rc=1
    if [ $rc = 0 ]; then
        wait_installed || rc=1
        sw --list-sas >"$RUN/$name.sas" 2>&1
        python3 "$HERE/swan_check.py" "$RUN/$name.sas" "$RUN/swan/charon.log" "$RUN/sa.log" i ${4:-} || rc=1
    fi
    [ $rc = 0 ] || { tail -20 "$RUN/iked.log"; }
    case_end
    result "$name" $rc
}

# ---------------------------------------------------------------- cases
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
want resp-x25519-gcm && responder_case resp-x25519-gcm   "aes128gcm16-prfsha256-x25519"  "aes128gcm16"      "CURVE_25519"
want resp-modp-cbc && responder_case resp-modp-cbc     "aes256-sha256-modp2048"        "aes256-sha256"    "MODP_2048"
want resp-ecp384-gcm256 && responder_case resp-ecp384-gcm256 "aes256gcm16-prfsha384-ecp384" "aes256gcm16"      "ECP_384"
want init-x25519-chacha && initiator_case init-x25519-chacha "chacha20poly1305-prfsha256-x25519" "aes128gcm16" "CHACHA20_POLY1305"
want init-modp-cbc && initiator_case init-modp-cbc     "aes128-sha256-modp2048"        "aes128-sha256"    "MODP_2048"
want init-ecp256-gcm && initiator_case init-ecp256-gcm   "aes128gcm16-prfsha512-ecp256"  "aes256gcm16"      "ECP_256"

# No shared proposal: strongSwan must receive NO_PROPOSAL_CHOSEN; Moat counts it.
case_no_proposal_chosen() {
    local name=no-proposal-chosen rc=0 i first
    log "--- $name"
    : >"$RUN/swan/charon.log" 2>/dev/null
    moat_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" false && iked_start || rc=1
    charon_conf "aes256-sha384-ecp384" "aes128gcm16" "$PSK" none && charon_start || rc=1
    sw --initiate --child net --timeout 5 >"$RUN/$name.initiate" 2>&1 && { log "initiate succeeded unexpectedly"; rc=1; }
    grep -q "received NO_PROPOSAL_CHOSEN" "$RUN/swan/charon.log" || { log "charon did not get NO_PROPOSAL_CHOSEN"; rc=1; }
    grep -q "NO_PROPOSAL_CHOSEN: peer offered IKE:AES_CBC_256/HMAC_SHA2_384_192/PRF_HMAC_SHA2_384/ECP_384.*we accept IKE:AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE_25519" "$RUN/iked.log" \
        || { log "Moat's log line does not name both sides' proposals"; rc=1; }
    iked_show && [ "$(stat_of no_proposal_chosen)" -ge 1 ] || { log "no_proposal_chosen not counted"; rc=1; }
    case_end; result $name $rc
}
want no-proposal-chosen && case_no_proposal_chosen

# Wrong PSK: AUTHENTICATION_FAILED both ways, nothing installed.
case_wrong_psk() {
    local name=wrong-psk rc=0 i first
    log "--- $name"
    : >"$RUN/swan/charon.log" 2>/dev/null
    moat_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" false && iked_start || rc=1
    charon_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "not-the-right-key-0123456789" none && charon_start || rc=1
    sw --initiate --child net --timeout 5 >"$RUN/$name.initiate" 2>&1 && { log "initiate succeeded unexpectedly"; rc=1; }
    grep -q "received AUTHENTICATION_FAILED" "$RUN/swan/charon.log" || { log "charon did not get AUTHENTICATION_FAILED"; rc=1; }
    iked_show && [ "$(stat_of auth_failed)" -ge 1 ] && [ "$(stat_of child_installed)" = 0 ] || { log "auth_failed not counted or CHILD installed"; rc=1; }
    case_end; result $name $rc
}
want wrong-psk && case_wrong_psk

# Unknown identity: a peer whose ID matches no tunnel is refused, whatever its address.
case_unknown_identity() {
    local name=unknown-identity rc=0 i first
    log "--- $name"
    : >"$RUN/swan/charon.log" 2>/dev/null
    moat_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" false && iked_start || rc=1
    sed -i "s/remote_id: $S_ID/remote_id: someone-else@example.net/" "$RUN/moats.d/swan.yaml"
    stop_pid "$RUN/iked.pid" moat-iked; iked_start || rc=1
    charon_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" none && charon_start || rc=1
    sw --initiate --child net --timeout 5 >"$RUN/$name.initiate" 2>&1 && { log "initiate succeeded unexpectedly"; rc=1; }
    grep -q "no tunnel for identity \"$S_ID\"" "$RUN/iked.log" || { log "Moat did not name the unknown identity"; rc=1; }
    case_end; result $name $rc
}
want unknown-identity && case_unknown_identity

# Rekey, both directions, and delete on shutdown.
case_rekey_and_delete() {
    local name=rekey-and-delete rc=0 i first
    log "--- $name"
    : >"$RUN/swan/charon.log" 2>/dev/null
    charon_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" none && charon_start || rc=1
    moat_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" true && iked_start || rc=1
    wait_installed || rc=1
    first=$(grep -c '"install"' "$RUN/sa.log")
    kill -USR1 "$(cat "$RUN/iked.pid")"   # Moat rekeys its CHILD SA
    for i in $(seq 1 30); do grep -q '"rekeyed"' "$RUN/sa.log" && break; sleep 0.2; done
    grep -q '"rekeyed"' "$RUN/sa.log" || { log "Moat-initiated rekey did not complete"; rc=1; }
    for i in $(seq 1 30); do [ "$(grep -c '"remove"' "$RUN/sa.log")" -ge 1 ] && break; sleep 0.2; done
    sleep 0.5
    sw --list-sas >"$RUN/$name.sas1" 2>&1
    python3 "$HERE/swan_check.py" "$RUN/$name.sas1" "$RUN/swan/charon.log" "$RUN/sa.log" i || { log "after Moat's rekey"; rc=1; }
    [ "$(grep -c INSTALLED "$RUN/$name.sas1")" = 1 ] || { log "old CHILD SA not deleted at strongSwan"; rc=1; }
    sw --rekey --child net >"$RUN/$name.rekey" 2>&1 || { log "swanctl --rekey failed"; rc=1; }
    for i in $(seq 1 30); do [ "$(grep -c '"rekeyed"' "$RUN/sa.log")" -ge 2 ] && break; sleep 0.2; done
    for i in $(seq 1 30); do [ "$(grep -c '"remove"' "$RUN/sa.log")" -ge 2 ] && break; sleep 0.2; done
    sleep 0.5
    sw --list-sas >"$RUN/$name.sas2" 2>&1
    python3 "$HERE/swan_check.py" "$RUN/$name.sas2" "$RUN/swan/charon.log" "$RUN/sa.log" r || { log "after strongSwan's rekey"; rc=1; }
    # strongSwan rekeys the IKE SA: Moat answers, moves the CHILD SA to the new IKE SA.
    local old_ike new_ike
    old_ike=$(sw --list-sas 2>/dev/null | grep -o '[0-9a-f]\{16\}_i')
    sw --rekey --ike lab >"$RUN/$name.ikerekey" 2>&1 || { log "swanctl --rekey --ike failed"; rc=1; }
    for i in $(seq 1 30); do
        new_ike=$(sw --list-sas 2>/dev/null | grep ESTABLISHED | grep -o '[0-9a-f]\{16\}_i')
        [ -n "$new_ike" ] && [ "$new_ike" != "$old_ike" ] && break; sleep 0.2
    done
    [ -n "$new_ike" ] && [ "$new_ike" != "$old_ike" ] || { log "IKE SA not rekeyed ($old_ike -> $new_ike)"; rc=1; }
    sleep 0.5
    iked_show || rc=1
    python3 - "$RUN/show.json" "${new_ike%_i}" <<'PY' || { log "Moat's IKE SAs after the IKE rekey do not match"; rc=1; }
import json, sys
sas = json.load(open(sys.argv[1]))["ike_sas"]
print("moat IKE SAs:", [(s["spi_i"], s["state"], len(s["children"])) for s in sas])
assert len(sas) == 1 and sas[0]["spi_i"] == sys.argv[2] and sas[0]["state"] == "ESTABLISHED" and len(sas[0]["children"]) == 1
PY
    sw --list-sas >"$RUN/$name.sas3" 2>&1
    python3 "$HERE/swan_check.py" "$RUN/$name.sas3" "$RUN/swan/charon.log" "$RUN/sa.log" r || { log "after the IKE rekey"; rc=1; }
    # Moat rekeys the IKE SA (HUP): strongSwan sees new SPIs, the CHILD SA stays.
    old_ike=$new_ike
    kill -HUP "$(cat "$RUN/iked.pid")"
    for i in $(seq 1 30); do
        new_ike=$(sw --list-sas 2>/dev/null | grep ESTABLISHED | grep -o '[0-9a-f]\{16\}_i')
        [ -n "$new_ike" ] && [ "$new_ike" != "$old_ike" ] && [ "$(sw --list-sas 2>/dev/null | grep -c ESTABLISHED)" = 1 ] && break
        sleep 0.2
    done
    [ -n "$new_ike" ] && [ "$new_ike" != "$old_ike" ] || { log "Moat's IKE rekey not seen ($old_ike -> $new_ike)"; rc=1; }
    sw --list-sas >"$RUN/$name.sas4" 2>&1
    [ "$(grep -c ESTABLISHED "$RUN/$name.sas4")" = 1 ] || { log "old IKE SA not deleted after Moat's IKE rekey"; rc=1; }
    python3 "$HERE/swan_check.py" "$RUN/$name.sas4" "$RUN/swan/charon.log" "$RUN/sa.log" r || { log "after Moat's IKE rekey"; rc=1; }
    stop_pid "$RUN/iked.pid" moat-iked     # TERM: Moat deletes its (new) IKE SA
    for i in $(seq 1 30); do sw --list-sas 2>/dev/null | grep -q ESTABLISHED || break; sleep 0.2; done
    sw --list-sas 2>/dev/null | grep -q ESTABLISHED && { log "strongSwan still has the IKE SA after Moat's delete"; rc=1; }
    case_end; result $name $rc
}
want rekey-and-delete && case_rekey_and_delete

# strongSwan restarts: Moat (start: true, liveness checks) brings the tunnel back by itself.
case_peer_restart() {
    local name=peer-restart rc=0 i first
    log "--- $name"
    : >"$RUN/swan/charon.log" 2>/dev/null
    charon_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" none && charon_start || rc=1
    moat_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" true && echo "dpd: 2" >>"$RUN/moats.d/swan.yaml" && iked_start || rc=1
    wait_installed || rc=1
    stop_pid "$RUN/charon.pid" charon-systemd    # strongSwan deletes its SA on the way out, or not: both heal
    sleep 1
    charon_start || rc=1
    for i in $(seq 1 100); do sw --list-sas 2>/dev/null | grep -q INSTALLED && break; sleep 0.2; done
    sw --list-sas >"$RUN/$name.sas" 2>&1
    python3 "$HERE/swan_check.py" "$RUN/$name.sas" "$RUN/swan/charon.log" "$RUN/sa.log" i || rc=1
    case_end; result $name $rc
}
want peer-restart && case_peer_restart

# Moat behind a real NAT (nftables masquerade) initiates to strongSwan: NAT-D
# finds the NAT, IKE and ESP move to 4500, strongSwan sees the NAT's address.
case_behind_nat() {
    local name=behind-nat rc=0
    log "--- $name"
    [ "$NAT_OK" = 1 ] || { log "nftables masquerade could not be set up"; result $name 1; return; }
    : >"$RUN/swan/charon.log"
    SW_LOCAL=198.18.0.2 SW_REMOTE=%any charon_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" none && charon_start || rc=1
    MOAT_REMOTE=198.18.0.2 moat_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" true && IKED_NS=$NS_MN iked_start || rc=1
    wait_installed || rc=1
    sw --list-sas >"$RUN/$name.sas" 2>&1
    grep -q "remote 'moat.example.net' @ 198.18.0.1\[" "$RUN/$name.sas" || { log "strongSwan does not see the NAT's address"; rc=1; }
    python3 "$HERE/swan_check.py" "$RUN/$name.sas" "$RUN/swan/charon.log" "$RUN/sa.log" i || rc=1
    iked_show && python3 -c "import json; s=json.load(open('$RUN/show.json'))['ike_sas'][0]; print('moat sees NAT:', s['nat'], s['local'], s['remote']); assert s['nat'] in ('local','both') and s['local'].endswith(':4500')" \
        || { log "Moat did not detect that it is behind a NAT"; rc=1; }
    case_end; result $name $rc
}
want behind-nat && case_behind_nat

# MOBIKE (RFC 4555): strongSwan initiates with mobike = yes, so both ends
# negotiate it; then strongSwan's address changes (192.0.2.2 -> .3) and it
# sends UPDATE_SA_ADDRESSES from the new one: Moat must move the IKE SA
# there, check the new address (COOKIE2, which strongSwan echoes), then move
# its CHILD SA, and keep answering (liveness checks from strongSwan).
case_mobike_roam() {
    local name=mobike-roam rc=0 i
    log "--- $name"
    : >"$RUN/swan/charon.log"
    moat_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" false && iked_start || rc=1
    SW_MOBIKE=yes SW_LOCAL=%any charon_conf "aes128gcm16-prfsha256-x25519" "aes128gcm16" "$PSK" none && charon_start || rc=1
    sw --initiate --child net --timeout 10 >"$RUN/$name.initiate" 2>&1 || { log "swanctl --initiate failed"; rc=1; }
    wait_installed || rc=1
    iked_show && python3 -c "import json; s=json.load(open('$RUN/show.json'))['ike_sas'][0]; assert s['mobike'], s" \
        || { log "MOBIKE not negotiated"; rc=1; }
    nsx "$NS_S" ip addr del $S_WAN/24 dev wan0
    nsx "$NS_S" ip addr add 192.0.2.3/24 dev wan0
    # The IKE SA moves at once; the CHILD SA once strongSwan has echoed the
    # COOKIE2 of Moat's return routability check (RFC 4555 §3.7) sent there.
    for i in $(seq 1 50); do
        iked_show && python3 -c "import json; s=json.load(open('$RUN/show.json')); a=s['ike_sas'][0]; assert a['remote'].startswith('192.0.2.3:') and s['stats']['mobike_moved'] >= 1" 2>/dev/null \
            && grep -q "192.0.2.3" "$RUN/sa.log" && break
        sleep 0.2
    done
    python3 -c "import json; s=json.load(open('$RUN/show.json')); a=s['ike_sas'][0]; st=s['stats']; print('moat sees', a['remote'], 'mobike_moved', st['mobike_moved'], 'checks', st['mobike_checks'], 'failed', st['mobike_check_failed']); assert a['remote'].startswith('192.0.2.3:') and st['mobike_moved'] >= 1 and st['mobike_checks'] >= 1 and st['mobike_check_failed'] == 0" \
        || { log "Moat did not move the SA to strongSwan's new address (or its return routability check failed)"; rc=1; }
    grep -q "192.0.2.3" "$RUN/sa.log" || { log "the CHILD SA was not moved (no moved() in the sink log)"; rc=1; }
    # strongSwan checks the new path itself (liveness): the SA must stay up.
    sw --list-sas >"$RUN/$name.sas" 2>&1
    grep -q "local  '$S_ID' @ 192.0.2.3" "$RUN/$name.sas" && grep -q INSTALLED "$RUN/$name.sas" || { log "strongSwan's SA did not move or died"; cat "$RUN/$name.sas"; rc=1; }
    nsx "$NS_S" ip addr del 192.0.2.3/24 dev wan0; nsx "$NS_S" ip addr add $S_WAN/24 dev wan0
    [ $rc = 0 ] || { tail -20 "$RUN/iked.log"; grep -i "mobike\|address" "$RUN/swan/charon.log" | tail -20; }
    case_end; result $name $rc
}
want mobike-roam && case_mobike_roam

# ECDSA certificates (RFC 7427 signatures): a test CA, one certificate each.
MOAT_DN="C=CH, O=Moat, CN=moat.example.net"; SWAN_DN="C=CH, O=Moat, CN=swan.example.net"
make_pki() {
    local d="$RUN/pki" n
    mkdir -p "$d"
    for ca in ca other-ca; do
        openssl ecparam -genkey -name prime256v1 -noout -out "$d/$ca.key" &&
        openssl req -x509 -new -key "$d/$ca.key" -subj "/C=CH/O=Moat/CN=Moat $ca" -days 30 -out "$d/$ca.pem" \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign || return 1
    done
    for n in moat swan; do
        openssl ecparam -genkey -name prime256v1 -noout -out "$d/$n.key" &&
        openssl req -new -key "$d/$n.key" -subj "/C=CH/O=Moat/CN=$n.example.net" -out "$d/$n.csr" &&
        printf 'subjectAltName=DNS:%s.example.net\nkeyUsage=digitalSignature\n' $n >"$d/$n.ext" &&
        openssl x509 -req -in "$d/$n.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
            -extfile "$d/$n.ext" -out "$d/$n.pem" 2>/dev/null || return 1
    done
}
PKI_OK=1; make_pki >"$RUN/pki.log" 2>&1 || { PKI_OK=0; cat "$RUN/pki.log"; }

cert_case() { # NAME resp|init
    local name=$1 rc=0
    log "--- $name: ECDSA certificates, Moat as ${2}"
    [ "$PKI_OK" = 1 ] || { result $name 1; return; }
    : >"$RUN/swan/charon.log"
    local start=false; [ "$2" = init ] && start=true
    # Small fragment sizes: certificates make IKE_AUTH big, so both sides
    # must fragment and reassemble (RFC 7383).
    SW_FRAG=400 SW_AUTH=pubkey charon_conf "aes128gcm16-prfsha256-ecp256" "aes128gcm16" "$PSK" none && charon_start || rc=1
    MOAT_FRAG=400 MOAT_AUTH=pubkey moat_conf "aes128gcm16-prfsha256-ecp256" "aes128gcm16" "$PSK" $start && MOAT_FRAG=400 iked_start || rc=1
    [ "$2" = resp ] && { sw --initiate --child net --timeout 10 >"$RUN/$name.initiate" 2>&1 || rc=1; }
    wait_installed || rc=1
    sw --list-sas >"$RUN/$name.sas" 2>&1
    grep -q "remote '$MOAT_DN'" "$RUN/$name.sas" || { log "strongSwan did not authenticate Moat's DN"; rc=1; }
    python3 "$HERE/swan_check.py" "$RUN/$name.sas" "$RUN/swan/charon.log" "$RUN/sa.log" ${2:0:1} || rc=1
    grep -q "authentication of '$MOAT_DN' with ECDSA_WITH_SHA256_DER successful" "$RUN/swan/charon.log" \
        || { log "charon did not verify an RFC 7427 ECDSA signature"; rc=1; }
    grep -q "received fragment #" "$RUN/swan/charon.log" || { log "Moat did not fragment its IKE_AUTH"; rc=1; }
    grep -q "splitting IKE message" "$RUN/swan/charon.log" || { log "charon did not fragment its IKE_AUTH"; rc=1; }
    iked_show && [ "$(stat_of rx_fragments)" -ge 2 ] || { log "Moat did not count received fragments"; rc=1; }
    [ $rc = 0 ] || { tail -5 "$RUN/iked.log"; grep -E "IKE\]|CFG\]" "$RUN/swan/charon.log" | tail -8; }
    case_end; result $name $rc
}
want cert-resp && cert_case cert-resp resp
want cert-init && cert_case cert-init init

# A certificate from a CA Moat does not trust is refused.
case_cert_untrusted() {
    local name=cert-untrusted rc=0
    log "--- $name"
    : >"$RUN/swan/charon.log"
    SW_AUTH=pubkey charon_conf "aes128gcm16-prfsha256-ecp256" "aes128gcm16" "$PSK" none && charon_start || rc=1
    MOAT_CA=other-ca MOAT_AUTH=pubkey moat_conf "aes128gcm16-prfsha256-ecp256" "aes128gcm16" "$PSK" false && iked_start || rc=1
    sw --initiate --child net --timeout 5 >"$RUN/$name.initiate" 2>&1 && { log "initiate succeeded unexpectedly"; rc=1; }
    grep -q "received AUTHENTICATION_FAILED" "$RUN/swan/charon.log" || { log "charon did not get AUTHENTICATION_FAILED"; rc=1; }
    grep -q "peer certificate not trusted" "$RUN/iked.log" || { log "Moat did not say why"; rc=1; }
    case_end; result $name $rc
}
[ "$PKI_OK" = 1 ] && want cert-untrusted && case_cert_untrusted

log "$PASS passed, ${#FAILS[@]} failed${FAILS[*]:+: ${FAILS[*]}}"
((${#FAILS[@]} == 0))
