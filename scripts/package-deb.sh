#!/usr/bin/env bash
# Builds target/debian/veilmesh_VERSION_ARCH.deb with dpkg-deb: the binary,
# the systemd unit, an example config, the man page and shell completions.
# Installing it starts nothing: the admin enables an instance.
# PACKAGE_PROFILE=dev packages the test build instead of a release build
# (the test suite's package check: the files matter there, not the speed).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PACKAGE_PROFILE:-release}
cargo build --profile "$profile" --locked --quiet
case "$profile" in dev) bin=target/debug/veilmesh ;; *) bin=target/$profile/veilmesh ;; esac
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
root=target/debian/root
rm -rf "$root" && mkdir -p "$root/DEBIAN"

install -D -m 0755 -s "$bin" "$root/usr/bin/veilmesh"
install -D -m 0644 systemd/veilmesh@.service "$root/lib/systemd/system/veilmesh@.service"
install -D -m 0644 systemd/veilmesh.sysusers "$root/usr/lib/sysusers.d/veilmesh.conf"
install -D -m 0644 systemd/veilmesh.tmpfiles "$root/usr/lib/tmpfiles.d/veilmesh.conf"
install -D -m 0644 systemd/veil0.toml.example "$root/usr/share/doc/veilmesh/examples/veil0.toml"
install -D -m 0644 README.md "$root/usr/share/doc/veilmesh/README.md"
mkdir -p "$root/usr/share/man/man8"
"$bin" manpage | gzip -9n > "$root/usr/share/man/man8/veilmesh.8.gz"
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d"
"$bin" completions bash > "$root/usr/share/bash-completion/completions/veilmesh"
"$bin" completions zsh > "$root/usr/share/zsh/vendor-completions/_veilmesh"
"$bin" completions fish > "$root/usr/share/fish/vendor_completions.d/veilmesh.fish"
install -d -m 0700 "$root/etc/veilmesh"
cat > "$root/usr/share/doc/veilmesh/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: veilmesh
Files: *
License: GPL-3.0-or-later
 On Debian systems the full text is in /usr/share/common-licenses/GPL-3.
COPY

cat > "$root/DEBIAN/control" <<CONTROL
Package: veilmesh
Version: $version
Architecture: $arch
Maintainer: veilmesh developers <dev@veilmesh.invalid>
Depends: libc6, iproute2
Section: net
Priority: optional
Installed-Size: $(du -sk "$root" | cut -f1)
Description: mesh VPN daemon over UDP, Tox and I2P
 veilmesh gives this machine a TUN interface onto a private mesh of peers,
 each with a stable IPv6 address in fd60:db4d:ddb5::/48 derived from its
 public key, encrypted with WireGuard's Noise protocol. Nothing runs until
 an instance is enabled: systemctl enable --now veilmesh@veil0
CONTROL
# Create the daemon user and make systemd see the unit; never enable or
# start anything.
cat > "$root/DEBIAN/postinst" <<'POST'
#!/bin/sh
set -e
if command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers veilmesh.conf
elif ! getent passwd veilmesh >/dev/null; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin veilmesh
fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then systemd-tmpfiles --create veilmesh.conf || true; fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POST
cat > "$root/DEBIAN/postrm" <<'POST'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POST
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"

deb=target/debian/veilmesh_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
