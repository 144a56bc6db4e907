#!/usr/bin/env bash
# Benchmark (not a test): a mesh of N veilmesh nodes (default 10) on one
# bridge, every node configured with every other; N/2 disjoint pairs run
# iperf3 TCP at the same time over the mesh, then the same pairs over
# wireguard-go configured the same way (full mesh, same keys per node).
# Prints the sum and each pair, and the ratio. Needs root.
#
#   BENCH_SECONDS=10 bench/mesh.sh 10
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
n=${1:-10}
seconds=${BENCH_SECONDS:-10}
[ $((n % 2)) = 0 ] && [ "$n" -ge 2 ] && [ "$n" -le 100 ] || { echo "N: an even number 2..100" >&2; exit 1; }
umask 077
scripts/install-deps.sh
cargo build --release --locked --quiet --bin veilmesh
bin=$PWD/target/release/veilmesh

tag=vmmesh-$$
work=$(mktemp -d /tmp/veilmesh-mesh.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for i in $(seq "$n"); do ip netns del "$tag-$i" 2>/dev/null || true; done
  ip netns del "$tag-br" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$tag-br"
ip -n "$tag-br" link add br0 type bridge
ip -n "$tag-br" link set br0 up
for i in $(seq "$n"); do
  ns=$tag-$i
  ip netns add "$ns"; ip -n "$ns" link set lo up
  ip -n "$tag-br" link add "v$i" type veth peer name eth0 netns "$ns"
  ip -n "$tag-br" link set "v$i" master br0 up
  ip -n "$ns" addr add "198.18.2.$i/24" dev eth0; ip -n "$ns" link set eth0 up
  "$bin" genkey > "$work/$i.key"
  wg genkey > "$work/$i.wgkey"
done

# veilmesh: node i has 10.88.0.i on its TUN and routes 10.88.0.j to peer j.
for i in $(seq "$n"); do
  {
    printf '[interface]\nprivate_key_file = "%s"\ncontrol_socket = "%s"\nhosts_file = ""\nuser = "root"\naddresses = ["10.88.0.%s/24"]\n' \
      "$work/$i.key" "$work/$i.sock" "$i"
    for j in $(seq "$n"); do
      [ "$i" = "$j" ] && continue
      printf '[[peer]]\nname = "n%s"\npublic_key = "%s"\nendpoint = "198.18.2.%s:51820"\nallowed_ips = ["10.88.0.%s/32"]\n' \
        "$j" "$("$bin" pubkey < "$work/$j.key")" "$j" "$j"
    done
  } > "$work/$i.toml"
  ip netns exec "$tag-$i" "$bin" up --config "$work/$i.toml" 2> "$work/$i.log" & pids+=($!)
done
# wireguard-go: node i has 10.89.0.i on wgI.
for i in $(seq "$n"); do
  ip netns exec "$tag-$i" env WG_PROCESS_FOREGROUND=1 wireguard-go "wgm$i" >/dev/null 2>&1 & pids+=($!)
done
for i in $(seq "$n"); do
  for _ in $(seq 50); do ip -n "$tag-$i" link show "wgm$i" >/dev/null 2>&1 && break; sleep 0.1; done
  args=(private-key "$work/$i.wgkey" listen-port 51821)
  for j in $(seq "$n"); do
    [ "$i" = "$j" ] && continue
    args+=(peer "$(wg pubkey < "$work/$j.wgkey")" allowed-ips "10.89.0.$j/32" endpoint "198.18.2.$j:51821")
  done
  ip netns exec "$tag-$i" wg set "wgm$i" "${args[@]}"
  ip -n "$tag-$i" addr add "10.89.0.$i/24" dev "wgm$i"; ip -n "$tag-$i" link set "wgm$i" mtu 1420 up
done
for i in $(seq "$n"); do
  for _ in $(seq 50); do "$bin" show --socket "$work/$i.sock" >/dev/null 2>&1 && break; sleep 0.1; done
done

# pairs (1,2), (3,4), ...: odd sends to even, all at once.
run_pairs() {
  local net=$1 label=$2
  for i in $(seq 1 2 "$n"); do
    ip netns exec "$tag-$((i + 1))" iperf3 -s -1 -B "$net.$((i + 1))" >/dev/null 2>&1 & pids+=($!)
  done
  for i in $(seq 1 2 "$n"); do ip netns exec "$tag-$i" ping -c 2 -i 0.2 -q "$net.$((i + 1))" >/dev/null; done
  local clients=()
  for i in $(seq 1 2 "$n"); do
    ip netns exec "$tag-$i" iperf3 -c "$net.$((i + 1))" -t "$seconds" -J > "$work/$label-$i.json" &
    clients+=($!)
  done
  wait "${clients[@]}" || true
  python3 - "$label" "$work" "$n" <<'PY'
import json, sys
label, work, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
total = 0.0
for i in range(1, n, 2):
    try:
        g = json.load(open(f"{work}/{label}-{i}.json"))["end"]["sum_received"]["bits_per_second"] / 1e9
    except Exception:
        g = 0.0
    total += g
    print(f"{label}: n{i} -> n{i+1}: {g:.3f} Gbit/s", file=sys.stderr)
print(f"{total:.3f}")
PY
}
vm=$(run_pairs 10.88.0 veilmesh)
wg=$(run_pairs 10.89.0 wireguard-go)
echo
echo "$n-node mesh, $((n / 2)) TCP streams at once (sum):"
printf '%-14s %10s\n' veilmesh "$vm Gbit/s" wireguard-go "$wg Gbit/s"
python3 -c "import sys; a,b=map(float,sys.argv[1:]); print('veilmesh / wireguard-go: %.2f' % (a/b if b else 0))" "$vm" "$wg"
