#!/usr/bin/env bash
# Builds the fuzz targets (cargo-fuzz, nightly) and runs each for SECONDS
# (default 60) inside a network namespace of its own, with no interface
# but a down loopback: the config target resolves host names, and nothing
# may leave this machine. Prints each target's executions; fails on a crash.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   FUZZ_RUNS=10000000 scripts/fuzz.sh 0 [TARGET...]   # a number of runs instead
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
shift || true
[ "$(id -u)" = 0 ] || { echo "run as root: each target runs in its own network namespace" >&2; exit 1; }
rustup toolchain list | grep -q '^nightly' || { echo "the nightly toolchain is missing (rustup toolchain install nightly)" >&2; exit 1; }
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
targets=("$@")
# Safe Rust needs no AddressSanitizer (the targets reach no unsafe code);
# debug assertions make an integer overflow on network input a crash.
flags=(-O -a -s none)
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
  cargo +nightly fuzz build "${flags[@]}"
else
  for t in "${targets[@]}"; do cargo +nightly fuzz build "${flags[@]}" "$t"; done
fi
bin=target/x86_64-unknown-linux-gnu/release
total=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log=$(mktemp)
  # -rss_limit_mb: the node under test keeps 64 KiB buffers; 2 GiB is plenty.
  if [ -n "${FUZZ_RUNS:-}" ]; then limit=(-runs="$FUZZ_RUNS"); else limit=(-max_total_time="$seconds"); fi
  start=$(date +%s)
  if ! unshare --net "$bin/$t" "${limit[@]}" -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 "corpus/$t" >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $t FAILED (crash input in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  echo "fuzz: $t: $runs executions in $(( $(date +%s) - start )) s, 0 crashes"
  total=$((total + runs))
  rm -f "$log"
done
echo "fuzz: ${#targets[@]} targets, $total executions, 0 crashes"
