#!/usr/bin/env bash
# Installs what veilmesh's build, tests, demo and benchmarks need on Debian.
# Idempotent; needs root. Starts no service.
set -euo pipefail

packages=(
  iproute2        # ip netns / link / route: the daemon installs routes with it
  iputils-ping    # tests ping across the mesh
  iperf3          # benchmark throughput
  iptables        # NAT and firewall rules in test namespaces
  wireguard-go    # benchmark reference
  wireguard-tools # `wg`: configures wireguard-go; key-compatibility test
  tcpdump         # captures in tests
  curl            # scrapes the metrics endpoint in tests
  procps          # sysctl, pgrep
  man-db          # the package check reads the man page
  xz-utils        # dpkg-deb -Zxz
  zip             # the demo reseeds its private i2pd routers from a zip
  pkg-config      # finds c-toxcore
  libtoxcore-dev  # the Tox transport links c-toxcore
  toxcore-utils   # tox-bootstrapd: a local DHT node / TCP relay in tests
  i2pd            # the I2P transport's tests run a private network of i2pd routers
  coturn          # STUN server for the NAT traversal tests
  conntrack       # NAT tests flush and show conntrack tables
  ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps package scripts from starting daemons outside our namespaces.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install a Rust toolchain (1.85 or newer), e.g. with rustup, then re-run." >&2
  exit 1
fi
