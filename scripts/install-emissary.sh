#!/usr/bin/env bash
# Builds emissary 0.4.0 (a Rust I2P router: the second SAM implementation
# the I2P interop test talks to) into /usr/local/bin. Debian has no
# package; from source it takes ~4 minutes here, so scripts/test.sh runs
# this at nice 19 beside the other steps. Idempotent; needs root.
set -euo pipefail
version=0.4.0
if [ "$(emissary-cli --version 2>/dev/null || true)" = "emissary-cli $version" ]; then
  exit 0
fi
# --no-default-features: no native UI (iced, a GUI toolkit: minutes more to build).
cargo install emissary-cli --version "$version" --no-default-features --locked \
  --root /usr/local --quiet
