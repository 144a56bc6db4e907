#!/usr/bin/env bash
# Installs what is needed, builds veilmesh, and brings up a small mesh on
# this machine: three nodes in network namespaces on a private bridge (no
# route out), plus a LAN behind node b. Pings across it, prints what
# happened, and removes everything again. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, TUN devices)" >&2; exit 1; }

scripts/install-deps.sh
echo "building veilmesh (release)..."
cargo build --release --locked --quiet
bin=$PWD/target/release/veilmesh

ns_prefix=vmdemo
umask 077   # key files must be private: veilmesh refuses group/world-readable keys
work=$(mktemp -d /tmp/veilmesh-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for n in br a b c lan; do ip netns del "$ns_prefix-$n" 2>/dev/null || true; rm -rf "/etc/netns/$ns_prefix-$n"; done
  rm -rf "$work"
}
trap cleanup EXIT

for n in br a b c lan; do ip netns del "$ns_prefix-$n" 2>/dev/null || true; ip netns add "$ns_prefix-$n"; ip -n "$ns_prefix-$n" link set lo up; done
ip -n $ns_prefix-br link add br0 type bridge && ip -n $ns_prefix-br link set br0 up
i=0
for n in a b c; do
  i=$((i + 1))
  ip link add p$i netns $ns_prefix-br type veth peer name eth0 netns $ns_prefix-$n
  ip -n $ns_prefix-br link set p$i master br0 up
  ip -n $ns_prefix-$n addr add 198.18.0.$i/24 dev eth0
  ip -n $ns_prefix-$n link set eth0 up
done
ip link add lan0 netns $ns_prefix-b type veth peer name eth0 netns $ns_prefix-lan
ip -n $ns_prefix-b addr add 192.168.50.1/24 dev lan0 && ip -n $ns_prefix-b link set lan0 up
ip -n $ns_prefix-lan addr add 192.168.50.2/24 dev eth0 && ip -n $ns_prefix-lan link set eth0 up
ip -n $ns_prefix-lan route add default via 192.168.50.1
ip netns exec $ns_prefix-b sysctl -qw net.ipv4.ip_forward=1

# Each node's own /etc/hosts (ip netns exec bind-mounts it), for NAME.veil.
for n in a b c; do
  mkdir -p "/etc/netns/$ns_prefix-$n" && printf '127.0.0.1\tlocalhost\n' > "/etc/netns/$ns_prefix-$n/hosts"
done
for n in a b c; do
  "$bin" genkey > "$work/$n.key"
  "$bin" pubkey < "$work/$n.key" > "$work/$n.pub"
done
peer() { # name endpoint allowed_ips
  printf '[[peer]]\nname = "%s"\npublic_key = "%s"\nendpoint = "%s"\nallowed_ips = [%s]\n' \
    "$1" "$(cat "$work/$1.pub")" "$2" "$3"
}
iface() { # name addresses
  printf '[interface]\nprivate_key_file = "%s"\ncontrol_socket = "%s"\naddresses = [%s]\n' \
    "$work/$1.key" "$work/$1.sock" "$2"
}
{ iface a '"10.10.1.1/24"'; peer b 198.18.0.2:51820 '"192.168.50.0/24", "10.10.1.2/32"'; peer c 198.18.0.3:51820 ''; } > "$work/a.toml"
{ iface b '"10.10.1.2/24"'; peer a 198.18.0.1:51820 '"10.10.1.1/32"'; peer c 198.18.0.3:51820 ''; } > "$work/b.toml"
{ iface c ''; peer a 198.18.0.1:51820 ''; peer b 198.18.0.2:51820 ''; } > "$work/c.toml"

for n in a b c; do
  ip netns exec $ns_prefix-$n "$bin" up --config "$work/$n.toml" 2> "$work/$n.log" &
  pids+=($!)
done
for n in a b c; do
  for _ in $(seq 50); do "$bin" show --socket "$work/$n.sock" >/dev/null 2>&1 && break; sleep 0.1; done
done

echo
echo "== three nodes up; mesh addresses derived from their keys:"
for n in a b c; do printf '  %s  %s\n' "$n" "$("$bin" addr "$(cat "$work/$n.pub")")"; done
echo
ok=0; total=0
for from in a b c; do
  for to in a b c; do
    [ "$from" = "$to" ] && continue
    total=$((total + 1))
    addr=$("$bin" addr "$(cat "$work/$to.pub")")
    if out=$(ip netns exec $ns_prefix-$from ping -6 -n -c 3 -i 0.2 -W 2 "$addr"); then ok=$((ok + 1)); fi
    printf '  ping %s -> %s: %s\n' "$from" "$to" "$(echo "$out" | grep -E 'packets transmitted|rtt' | tr '\n' ' ')"
  done
done
total=$((total + 1))
if out=$(ip netns exec $ns_prefix-a ping -n -c 3 -i 0.2 -W 2 192.168.50.2); then ok=$((ok + 1)); fi
printf '  ping a -> 192.168.50.2 (LAN behind b): %s\n' "$(echo "$out" | grep -E 'packets transmitted' )"
total=$((total + 1))
if out=$(ip netns exec $ns_prefix-c ping -6 -n -c 3 -i 0.2 -W 2 b.veil); then ok=$((ok + 1)); fi
printf '  ping c -> b.veil (by name): %s\n' "$(echo "$out" | grep -E 'packets transmitted' )"
echo
echo "== veilmesh show (node a):"
"$bin" show --socket "$work/a.sock"
echo "== $ok of $total ping runs succeeded; cleaning up"
[ "$ok" = "$total" ]
