#!/usr/bin/env bash
# Builds the Debian package, installs it on this machine, checks that the
# binary, the man page and the unit are there and that nothing was started,
# then purges it again. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(scripts/package-deb.sh)
was_installed=$(dpkg-query -W -f='${Status}' veilmesh 2>/dev/null || true)
case "$was_installed" in *"ok installed"*) echo "veilmesh is already installed here; not touching it" >&2; exit 1 ;; esac
was_user=$(getent passwd veilmesh || true)
trap 'dpkg --purge veilmesh >/dev/null 2>&1 || true; [ -n "$was_user" ] || userdel veilmesh 2>/dev/null || true' EXIT
passed=0; failed=0
check() { # description command...
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then passed=$((passed + 1)); echo "ok: $what"
  else failed=$((failed + 1)); echo "FAILED: $what"; fi
}
dpkg -i "$deb" >/dev/null
check "veilmesh --help runs from /usr/bin" /usr/bin/veilmesh --help
check "man veilmesh renders" bash -c 'MANPAGER=cat man veilmesh | grep -q "veilmesh genkey\|genkey"'
check "unit installed" test -f /lib/systemd/system/veilmesh@.service
check "example config installed" test -f /usr/share/doc/veilmesh/examples/veil0.toml
check "bash completion installed" test -s /usr/share/bash-completion/completions/veilmesh
check "daemon user created" getent passwd veilmesh
check "no veilmesh process started by the install" bash -c '! pgrep -f "^/usr/bin/veilmesh"'
check "no instance enabled by the install" bash -c '! ls /etc/systemd/system/multi-user.target.wants/ 2>/dev/null | grep -q veilmesh'
dpkg --purge veilmesh >/dev/null
check "purge removes the binary" test ! -e /usr/bin/veilmesh
# The user stays (Debian policy: UIDs may own files); remove the one we made here.
if [ -z "$was_user" ]; then userdel veilmesh 2>/dev/null || true; rm -rf /run/veilmesh; fi
echo "package check: $passed passed, $failed failed"
[ "$failed" = 0 ]
