#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests in network
# namespaces (needs root, as CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the end-to-end tests create network namespaces and TUN devices" >&2; exit 1; }
scripts/install-deps.sh
cargo fmt --all --check || { echo "run cargo fmt" >&2; exit 1; }
# The package check and the fuzz targets (each parser, 20 s: a smoke run
# of the corpora; scripts/fuzz.sh 600 for a real campaign) first, so
# cargo's summary closes the output.
# The package check packages the test build: a release build (thin LTO)
# would add minutes to every CI run and test nothing the files do not.
PACKAGE_PROFILE=dev scripts/check-package.sh
scripts/fuzz.sh 20
cargo test --workspace --locked --color never
