#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests in network
# namespaces (needs root, as CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the end-to-end tests create network namespaces and TUN devices" >&2; exit 1; }
phase() { echo "=== $1 (at $((SECONDS / 60))m$((SECONDS % 60))s)"; }
phase "install dependencies"
scripts/install-deps.sh
# emissary (the second SAM implementation of the I2P interop test) builds
# from source: minutes of both cores. As an idle-class process it takes
# only the CPU the other steps leave unused (the end-to-end tests mostly
# wait), and the one test that needs it runs last. Its own process group
# (set -m) so it can be stopped, but not its own session: the kernel's
# autogroups would give a new session an equal share of the CPU.
mkdir -p target
set -m
chrt --idle 0 scripts/install-emissary.sh >target/install-emissary.log 2>&1 &
emissary_build=$!
set +m
trap 'kill -- -$emissary_build 2>/dev/null || true' EXIT
cargo fmt --all --check || { echo "run cargo fmt" >&2; exit 1; }
# The package check and the fuzz targets (each parser, 20 s: a smoke run
# of the corpora; scripts/fuzz.sh 600 for a real campaign) first, so
# cargo's summary closes the output.
# The package check packages the test build: a release build (thin LTO)
# would add minutes to every CI run and test nothing the files do not.
phase "package check"
PACKAGE_PROFILE=dev scripts/check-package.sh
phase "fuzz smoke run"
scripts/fuzz.sh 20
phase "tests"
interop=interop_emissary
cargo test --workspace --locked --color never -- --skip "$interop"
# The end-to-end tests again with segmentation offload (TUN and UDP)
# forced off; the daemons inherit the variable. All but the I2P and NAT
# tests (6 of the 7.5 minutes; they ran green with offload off too, and
# their transports see the same TUN path as Tox's).
phase "end-to-end tests without offload"
VEILMESH_OFFLOAD=off cargo test --locked --color never --test offload --test mesh \
  --test event_loop --test tox --test reload --test service --test invite --test cli --test accept --test wireguard --test netcheck
# Its own build: with boringtun reading a mock clock, a daemon built in the
# same cargo run (features unify) would never see its timers fire.
phase "core in virtual time"
cargo test -p veilmesh-core --features test-clock --locked --color never
phase "waiting for emissary"
wait "$emissary_build" || { cat target/install-emissary.log; echo "emissary did not build" >&2; exit 1; }
phase "I2P interop test"
cargo test --locked --color never --test i2p -- "$interop"
phase "done"
