#!/usr/bin/env bash
# Builds DPDK's own ipsec-secgw example (the reference the ESP harness sets
# Moat against: bench/esp_pcap.py REFS=secgw) from the source of the
# installed DPDK package, with the flags Moat's hub build uses.
#
#   bench/secgw-build.sh [OUT_DIR]        (default /tmp/moat-ref; writes OUT_DIR/ipsec-secgw)
#
# One change to the example, and why: its port configuration demands RX
# checksum offload, which the harness's virtual ports (net_pcap, net_null)
# do not have, so it would refuse to start. Without it secgw checks no IP
# checksum in software either: a little less work than Moat does.
# Needs Debian's source archive (a deb-src line for bookworm; added to
# /etc/apt/sources.list.d/moat-src.sources if none is there).
set -euo pipefail
out=${1:-/tmp/moat-ref}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > /etc/apt/sources.list.d/moat-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -q >/dev/null
fi
ver=$(dpkg-query -W -f='${Version}' libdpdk-dev)
(cd "$work" && apt-get source -q --download-only "dpdk=$ver" >/dev/null 2>&1)
tar -C "$work" -xJf "$work"/dpdk_*.orig.tar.xz --wildcards '*/examples/ipsec-secgw/*' '*/examples/common/*'
src=$(echo "$work"/dpdk-*/examples/ipsec-secgw)
grep -q '.offloads = RTE_ETH_RX_OFFLOAD_CHECKSUM,' "$src/ipsec-secgw.c" ||
  { echo "secgw-build: the example's port configuration changed; check the edit" >&2; exit 1; }
sed -i 's/.offloads = RTE_ETH_RX_OFFLOAD_CHECKSUM,/.offloads = 0,/' "$src/ipsec-secgw.c"
# shellcheck disable=SC2046
cc -O3 $(pkg-config --cflags libdpdk) -march=native -DALLOW_EXPERIMENTAL_API -Wno-address-of-packed-member \
  -I"$src/../common" "$src"/{parser,ipsec,esp,sp4,sp6,sa,sad,rt,ipsec_process,ipsec-secgw,ipsec_worker,event_helper,flow}.c \
  -o "$out/ipsec-secgw" $(pkg-config --libs libdpdk) -lbsd
echo "secgw-build: $out/ipsec-secgw (DPDK $ver)"
