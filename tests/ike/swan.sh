# strongSwan's charon as the other end of interop tests, sourced by
# tests/ike/test_interop.sh (moat-iked) and tests/ike/test_moatd_interop.sh
# (moatd). charon-systemd with kernel-libipsec (this kernel has no XFRM ESP,
# so ESP always goes in UDP 4500), driven through swanctl over its own vici
# socket; everything lives under $RUN/swan.
# Needs from the caller: RUN, NS_S (charon's namespace), nsx NS CMD...
# Knobs: SW_TRIES (retransmit_tries, 3), SW_FRAG (IKE fragment size, 1280),
# SW_CHD_LOG (log level of CHILD SA handling, 2).

CHARON=/usr/sbin/charon-systemd

stop_pid() { # PIDFILE NAME: TERM then KILL, only if it is still NAME
    local f=$1 name=$2 pid i
    [ -s "$f" ] || return 0
    pid=$(cat "$f"); rm -f "$f"
    kill -0 "$pid" 2>/dev/null && grep -q "$name" "/proc/$pid/cmdline" 2>/dev/null || return 0
    kill -TERM "$pid"
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
}

swan_daemon_conf() { # strongswan.conf: plugins, ports, retransmission, logs
    mkdir -p "$RUN/swan/swanctl"
    cat >"$RUN/swan/strongswan.conf" <<SWEOF
charon {
    load_modular = no
    load = random nonce openssl aes sha1 sha2 hmac gcm pem pkcs1 pkcs8 x509 pubkey constraints kdf kernel-libipsec kernel-netlink socket-default vici updown
    port = 500
    port_nat_t = 4500
    install_routes = yes
    routing_table = 220
    routing_table_prio = 220
    retransmit_tries = ${SW_TRIES:-3}
    retransmit_timeout = 1
    retransmit_base = 1.4
    fragment_size = ${SW_FRAG:-1280}
    plugins { vici { socket = unix://$RUN/swan/charon.vici } }
    filelog {
        main {
            path = $RUN/swan/charon.log
            append = yes
            flush_line = yes
            default = 1
            ike = 2
            chd = ${SW_CHD_LOG:-2}
            knl = 2
            esp = 1
        }
    }
}
charon-systemd { journal { default = -1 } }
swanctl {
    load = pem pkcs1 pkcs8 x509 revocation constraints pubkey openssl random
    socket = unix://$RUN/swan/charon.vici
}
SWEOF
}

sw() { nsx "$NS_S" env STRONGSWAN_CONF="$RUN/swan/strongswan.conf" SWANCTL_DIR="$RUN/swan/swanctl" swanctl "$@" --uri "unix://$RUN/swan/charon.vici"; }

charon_start() { # 1 when charon does not come up or refuses swanctl.conf
    rm -f "$RUN/swan/charon.vici"
    nsx "$NS_S" sh -c 'echo $$ >"$0"; exec "$@"' "$RUN/charon.pid" env STRONGSWAN_CONF="$RUN/swan/strongswan.conf" \
        setsid "$CHARON" >>"$RUN/swan/charon.stdout" 2>&1 </dev/null &
    local i
    for i in $(seq 1 50); do [ -S "$RUN/swan/charon.vici" ] && break; sleep 0.1; done
    [ -S "$RUN/swan/charon.vici" ] || { echo "charon did not start"; return 1; }
    sw --load-all >"$RUN/swan/load.out" 2>&1 || { echo "swanctl --load-all failed"; cat "$RUN/swan/load.out"; return 1; }
}

charon_stop() { stop_pid "$RUN/charon.pid" charon-systemd; }
