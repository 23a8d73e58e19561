#!/usr/bin/env bash
# Installs the Debian 12 packages Moat needs to build, test and run its lab,
# only when some are missing, so a fresh machine needs nothing done by hand.
set -euo pipefail
pkgs=(
  build-essential meson ninja-build pkg-config
  dpdk dpdk-dev libdpdk-dev libipsec-mb-dev libyaml-cpp-dev libssl-dev
  libgtest-dev libbenchmark-dev libexpected-dev libfmt-dev nlohmann-json3-dev
  python3 python3-yaml python3-scapy python3-matplotlib tshark iperf3 iproute2 iputils-ping
  traceroute ethtool tcpdump netcat-openbsd socat openssh-server dnsmasq-base
  strongswan-swanctl charon-systemd libcharon-extra-plugins strongswan-libcharon
  libstrongswan-standard-plugins nftables clang
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
