#!/usr/bin/env bash
# Benchmark (not a test): iperf3 TCP throughput (one stream, then -P 4)
# and ping RTT between two network namespaces over
#   1. the raw veth link,
#   2. wireguard-go (Debian's userspace WireGuard),
#   3. boringtun-cli 0.7.1 (installed with cargo on first use),
#   4. relay: a TUN <-> UDP relay with no crypto, one packet per system
#      call (examples/relay.rs): the per-packet floor,
#   5. veilmesh,
#   6. veilmesh over Tox (BENCH_TOX=0 skips),
#   7. veilmesh through a relay node R: a third namespace both reach, the
#      pair's direct UDP blocked (BENCH_RELAY=0 skips),
# all in the same run, printing Gbit/s, RTT and the ratios. Needs root.
# BENCH_I2P=1 adds the I2P mode: a private network of i2pd routers (the
# harness of tests/i2p.rs), veilmesh over I2P against veilmesh over direct
# UDP between the same namespaces, in the same run.
#
#   BENCH_SECONDS=10 BENCH_ROUNDS=1 BENCH_I2P=1 bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
seconds=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-1}
umask 077

scripts/install-deps.sh
command -v boringtun-cli >/dev/null 2>&1 || cargo install boringtun-cli --version 0.7.1 --locked --quiet
cargo build --release --locked --quiet --bin veilmesh --example relay
bin=$PWD/target/release/veilmesh
relay=$PWD/target/release/examples/relay

A=vmbench-$$-a; B=vmbench-$$-b; R=vmbench-$$-r
work=$(mktemp -d /tmp/veilmesh-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for n in $A $B $R; do ip netns del $n 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for n in $A $B; do ip netns add $n; ip -n $n link set lo up; done
ip link add eth0 netns $A type veth peer name eth0 netns $B
ip -n $A addr add 198.18.1.1/24 dev eth0; ip -n $A link set eth0 up
ip -n $B addr add 198.18.1.2/24 dev eth0; ip -n $B link set eth0 up

in_a() { ip netns exec $A "$@"; }
in_b() { ip netns exec $B "$@"; }

# throughput DEST [IPERF ARGS] -> Gbit/s (receiver side), RTT DEST -> avg ms
throughput() {
  local dest=$1; shift
  ip netns exec $B iperf3 -s -1 -B "$dest" >/dev/null 2>&1 & local server=$!
  sleep 0.3
  in_a iperf3 -c "$dest" -t "$seconds" -J "$@" > "$work/iperf.json"
  wait $server || true
  python3 -c 'import json,sys; print("%.3f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e9))' "$work/iperf.json"
}
# rtt DEST -> "avg median" in ms over 200 pings. The median is printed too
# because idle vCPUs on shared VMs add rare multi-millisecond wake-ups that
# dominate the average.
rtt() {
  in_a ping -n -c 200 -i 0.005 "$1" | python3 -c '
import re, statistics, sys
t = [float(m.group(1)) for m in re.finditer(r"time=([0-9.]+) ms", sys.stdin.read())]
print("%.3f %.3f" % (statistics.mean(t), statistics.median(t)))'
}

# wait_links A_IF B_IF: until both namespaces have their interface.
wait_links() {
  for _ in $(seq 50); do ip -n $A link show "$1" >/dev/null 2>&1 && ip -n $B link show "$2" >/dev/null 2>&1 && return; sleep 0.1; done
}
# wg_pair A_IF B_IF PORT NET: a userspace WireGuard's two interfaces (just
# started) get keys, each other as peer, and NET.1 / NET.2 at MTU 1420.
wg_pair() {
  local a_if=$1 b_if=$2 port=$3 net=$4
  wait_links "$a_if" "$b_if"
  wg genkey > "$work/$a_if.key"; wg genkey > "$work/$b_if.key"
  in_a wg set "$a_if" private-key "$work/$a_if.key" listen-port "$port" \
    peer "$(wg pubkey < "$work/$b_if.key")" allowed-ips "$net.2/32" endpoint "198.18.1.2:$port"
  in_b wg set "$b_if" private-key "$work/$b_if.key" listen-port "$port" \
    peer "$(wg pubkey < "$work/$a_if.key")" allowed-ips "$net.1/32" endpoint "198.18.1.1:$port"
  ip -n $A addr add "$net.1/24" dev "$a_if"; ip -n $A link set "$a_if" mtu 1420 up
  ip -n $B addr add "$net.2/24" dev "$b_if"; ip -n $B link set "$b_if" mtu 1420 up
}

# --- wireguard-go ---------------------------------------------------------
# wireguard-go keeps its control socket in /var/run/wireguard/NAME.sock, which
# namespaces share: each side needs its own interface name.
WG_PROCESS_FOREGROUND=1 ip netns exec $A wireguard-go wga0 >/dev/null 2>&1 & pids+=($!)
WG_PROCESS_FOREGROUND=1 ip netns exec $B wireguard-go wgb0 >/dev/null 2>&1 & pids+=($!)
wg_pair wga0 wgb0 51821 198.19.0

# --- boringtun-cli -------------------------------------------------------
ip netns exec $A boringtun-cli -f --disable-drop-privileges bta0 >"$work/bta.log" 2>&1 & pids+=($!)
ip netns exec $B boringtun-cli -f --disable-drop-privileges btb0 >"$work/btb.log" 2>&1 & pids+=($!)
wg_pair bta0 btb0 51824 198.19.4

# --- the no-crypto relay ----------------------------------------------------
ip netns exec $A "$relay" rly0 198.19.3.1/24 51823 198.18.1.2:51823 & pids+=($!)
ip netns exec $B "$relay" rly0 198.19.3.2/24 51823 198.18.1.1:51823 & pids+=($!)
wait_links rly0 rly0

# --- veilmesh -------------------------------------------------------------
"$bin" genkey > "$work/a.key"; "$bin" genkey > "$work/b.key"
for side in a b; do
  other=b; addr=198.19.1.1/24; peer_ip=198.19.1.2/32; endpoint=198.18.1.2
  [ $side = b ] && { other=a; addr=198.19.1.2/24; peer_ip=198.19.1.1/32; endpoint=198.18.1.1; }
  cat > "$work/$side.toml" <<CONF
[interface]
private_key_file = "$work/$side.key"
control_socket = "$work/$side.sock"
hosts_file = ""
addresses = ["$addr"]
[[peer]]
name = "$other"
public_key = "$("$bin" pubkey < "$work/$other.key")"
endpoint = "$endpoint:51820"
allowed_ips = ["$peer_ip"]
CONF
done
# Started directly (not through a shell function) so $! is the daemon's PID.
ip netns exec $A "$bin" up --config "$work/a.toml" 2> "$work/a.log" & pids+=($!)
ip netns exec $B "$bin" up --config "$work/b.toml" 2> "$work/b.log" & pids+=($!)
for _ in $(seq 50); do "$bin" show --socket "$work/b.sock" >/dev/null 2>&1 && break; sleep 0.1; done

# --- veilmesh over Tox (BENCH_TOX=0 skips) ---------------------------------
# A second pair of daemons (veil1) that know each other only by Tox ID,
# bootstrapped to a tox-bootstrapd running in B's namespace.
paths="veth wireguard-go boringtun relay veilmesh"
declare -A tox_id
if [ "${BENCH_TOX:-1}" = 1 ]; then
  cat > "$work/bsd.conf" <<CONF
port = 33447
keys_file_path = "$work/bsd.keys"
pid_file_path = "$work/bsd.pid"
enable_ipv6 = false
enable_ipv4_fallback = true
enable_lan_discovery = false
enable_tcp_relay = false
enable_motd = false
bootstrap_nodes = ()
CONF
  ip netns exec $B tox-bootstrapd --config "$work/bsd.conf" --foreground --log-backend stdout > "$work/bsd.log" 2>&1 & pids+=($!)
  for _ in $(seq 50); do grep -q 'Public Key' "$work/bsd.log" && break; sleep 0.1; done
  bsd_key=$(sed -n 's/.*Public Key: *//p' "$work/bsd.log" | head -1)
  for side in a b; do
    addr=198.19.2.1/24; [ $side = b ] && addr=198.19.2.2/24
    "$bin" genkey > "$work/t$side.key"
    cat > "$work/t$side.toml" <<CONF
[interface]
private_key_file = "$work/t$side.key"
name = "veil1"
listen_port = 51822
control_socket = "$work/t$side.sock"
hosts_file = ""
addresses = ["$addr"]
[tox]
enabled = true
state_file = "$work/t$side.tox"
bootstrap_nodes = ["198.18.1.2:33447:$bsd_key"]
local_discovery = false
CONF
  done
  ns_of() { [ "$1" = a ] && echo $A || echo $B; }
  for side in a b; do tox_id[$side]=$(ip netns exec "$(ns_of $side)" "$bin" tox-id --config "$work/t$side.toml"); done
  for side in a b; do
    other=b; peer_ip=198.19.2.2/32; [ $side = b ] && { other=a; peer_ip=198.19.2.1/32; }
    # Tox only: on one veth the pair would otherwise move to direct UDP.
    printf '[[peer]]\nname = "%s"\npublic_key = "%s"\ntox = "%s"\nallowed_ips = ["%s"]\ntransports = ["tox"]\n' \
      "$other" "$("$bin" pubkey < "$work/t$other.key")" "${tox_id[$other]}" "$peer_ip" >> "$work/t$side.toml"
  done
  ip netns exec $A "$bin" up --config "$work/ta.toml" 2> "$work/ta.log" & pids+=($!)
  ip netns exec $B "$bin" up --config "$work/tb.toml" 2> "$work/tb.log" & pids+=($!)
  t0=$(date +%s.%N)
  for _ in $(seq 90); do in_a ping -c 1 -W 1 -q 198.19.2.2 >/dev/null 2>&1 && break; done
  echo "tox path up $(python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$t0" "$(date +%s.%N)") s after start" >&2
  paths="$paths veilmesh-tox"
fi

# --- veilmesh through a relay (BENCH_RELAY=0 skips) --------------------------
# A third pair of daemons (veil2, port 51825) whose direct UDP over the
# A-B link is dropped; R (its own links to A and B) relays for them.
if [ "${BENCH_RELAY:-1}" = 1 ]; then
  ip netns add $R; ip -n $R link set lo up
  ip link add ra netns $R type veth peer name r0 netns $A
  ip link add rb netns $R type veth peer name r0 netns $B
  ip -n $R addr add 198.18.3.1/24 dev ra; ip -n $R addr add 198.18.4.1/24 dev rb
  ip -n $A addr add 198.18.3.2/24 dev r0; ip -n $B addr add 198.18.4.2/24 dev r0
  for n in $R $A $B; do for l in ra rb r0; do ip -n $n link set $l up 2>/dev/null || true; done; done
  ip -n $A route add 198.18.4.0/24 via 198.18.3.1; ip -n $B route add 198.18.3.0/24 via 198.18.4.1
  ip netns exec $R sysctl -qw net.ipv4.ip_forward=0
  for n in $A $B; do ip netns exec $n iptables -w -A OUTPUT -o eth0 -p udp --dport 51825 -j DROP; done
  for side in a b r; do "$bin" genkey > "$work/r$side.key"; done
  pub() { "$bin" pubkey < "$work/r$1.key"; }
  cat > "$work/rr.toml" <<CONF
[interface]
private_key_file = "$work/rr.key"
name = "veil2"
listen_port = 51825
relay = true
# The data path, not the default per-peer limit (1 Gbit/s).
relay_rate_mbit = 100000
control_socket = "$work/rr.sock"
hosts_file = ""
[[peer]]
name = "a"
public_key = "$(pub a)"
endpoint = "198.18.3.2:51825"
[[peer]]
name = "b"
public_key = "$(pub b)"
endpoint = "198.18.4.2:51825"
CONF
  for side in a b; do
    other=b; addr=198.19.5.1/24; peer_ip=198.19.5.2/32; endpoint=198.18.1.2; r_ip=198.18.3.1
    [ $side = b ] && { other=a; addr=198.19.5.2/24; peer_ip=198.19.5.1/32; endpoint=198.18.1.1; r_ip=198.18.4.1; }
    cat > "$work/r$side.toml" <<CONF
[interface]
private_key_file = "$work/r$side.key"
name = "veil2"
listen_port = 51825
control_socket = "$work/r$side.sock"
hosts_file = ""
addresses = ["$addr"]
[[peer]]
name = "$other"
public_key = "$(pub $other)"
endpoint = "$endpoint:51825"
allowed_ips = ["$peer_ip"]
[[peer]]
name = "r"
public_key = "$(pub r)"
endpoint = "$r_ip:51825"
relay = true
CONF
  done
  ip netns exec $R "$bin" up --config "$work/rr.toml" 2> "$work/rr.log" & pids+=($!)
  ip netns exec $A "$bin" up --config "$work/ra.toml" 2> "$work/ra.log" & pids+=($!)
  ip netns exec $B "$bin" up --config "$work/rb.toml" 2> "$work/rb.log" & pids+=($!)
  for _ in $(seq 100); do in_a ping -c 1 -W 1 -q 198.19.5.2 >/dev/null 2>&1 && break; sleep 0.1; done
  for _ in $(seq 50); do
    "$bin" show --socket "$work/ra.sock" 2>/dev/null | grep -q 'path: relay via r' && break; sleep 0.2
  done
  paths="$paths veilmesh-relay"
fi

# Warm up the tunnels (handshakes) before measuring.
for dst in 198.19.0.2 198.19.1.2 198.19.3.2 198.19.4.2; do
  in_a ping -c 2 -i 0.2 -q $dst >/dev/null
done

declare -A tput tput4 rt rtm
dest_of() {
  case $1 in
    veth) echo 198.18.1.2 ;;
    wireguard-go) echo 198.19.0.2 ;;
    veilmesh) echo 198.19.1.2 ;;
    veilmesh-tox) echo 198.19.2.2 ;;
    veilmesh-relay) echo 198.19.5.2 ;;
    relay) echo 198.19.3.2 ;;
    boringtun) echo 198.19.4.2 ;;
  esac
}
for r in $(seq "$rounds"); do
  for path in $paths; do
    dst=$(dest_of $path)
    g=$(throughput $dst); read -r t m <<< "$(rtt $dst)"
    tput[$path]="${tput[$path]:-} $g"; rt[$path]="${rt[$path]:-} $t"; rtm[$path]="${rtm[$path]:-} $m"
    echo "round $r: $path: $g Gbit/s, rtt avg $t ms, median $m ms" >&2
    if [ "$path" != veilmesh-tox ]; then
      g4=$(throughput $dst -P 4); tput4[$path]="${tput4[$path]:-} $g4"
      echo "round $r: $path: $g4 Gbit/s with 4 streams" >&2
    fi
  done
done

avg() { python3 -c 'import sys; v=[float(x) for x in sys.argv[1:]]; print("%.3f" % (sum(v)/len(v)))' $1; }
echo
printf '%-14s %10s %12s %14s %14s\n' path "Gbit/s" "-P 4 Gbit/s" "rtt avg ms" "rtt median ms"
for path in veth wireguard-go boringtun relay veilmesh; do
  printf '%-14s %10s %12s %14s %14s\n' $path "$(avg "${tput[$path]}")" "$(avg "${tput4[$path]}")" \
    "$(avg "${rt[$path]}")" "$(avg "${rtm[$path]}")"
done
python3 - "$(avg "${tput[veilmesh]}")" "$(avg "${tput[wireguard-go]}")" "$(avg "${tput[boringtun]}")" \
  "$(avg "${tput[relay]}")" "$(avg "${tput[veth]}")" "$(avg "${tput4[veilmesh]}")" "$(avg "${tput4[boringtun]}")" \
  "$(avg "${rtm[veilmesh]}")" "$(avg "${rtm[boringtun]}")" "$(avg "${rtm[veth]}")" "$(avg "${rtm[relay]}")" <<'PY'
import sys
vm, wg, bt, relay, veth, vm4, bt4, vm_m, bt_m, veth_m, relay_m = map(float, sys.argv[1:])
ratio = lambda a, b: "%.2f" % (a / b) if b > 0 else "n/a"
print()
print("throughput veilmesh / boringtun-cli:    %s" % ratio(vm, bt))
print("throughput veilmesh / wireguard-go:     %s" % ratio(vm, wg))
print("throughput veilmesh / no-crypto relay:  %s" % ratio(vm, relay))
print("throughput veilmesh / veth:             %s" % ratio(vm, veth))
print("-P 4: veilmesh / boringtun-cli:         %s" % ratio(vm4, bt4))
print("median rtt veilmesh - boringtun-cli:    %+.3f ms" % (vm_m - bt_m))
print("median rtt added over veth: veilmesh %.3f ms, boringtun-cli %.3f ms, relay %.3f ms"
      % (vm_m - veth_m, bt_m - veth_m, relay_m - veth_m))
PY
vm_g=$(avg "${tput[veilmesh]}"); veth_r=$(avg "${rt[veth]}")
if [ -n "${tput[veilmesh-tox]:-}" ]; then
  tx_g=$(avg "${tput[veilmesh-tox]}"); tx_r=$(avg "${rt[veilmesh-tox]}"); tx_m=$(avg "${rtm[veilmesh-tox]}")
  printf '%-14s %10s %14s %14s\n' veilmesh-tox "$tx_g" "$tx_r" "$tx_m"
  python3 -c 'import sys; g,u,r,v=map(float,sys.argv[1:]); print("throughput veilmesh tox / udp:      %.2f" % (g/u)); print("added rtt veilmesh tox - veth:      %.3f ms avg" % (r-v))' "$tx_g" "$vm_g" "$tx_r" "$veth_r"
  # toxcore's own lossy ceiling in the same run: two Tox friends of a
  # C probe (bench/tox_probe.c), one sending flat out, over the same
  # bootstrap node and veth. Twice: as veilmesh runs toxcore (libsodium's
  # per-packet memory locking replaced by stand-ins: see memlock.rs in the
  # Tox crate), and as shipped (two mlocked scratch buffers per packet).
  cc -O2 -o "$work/tox_probe_shipped" bench/tox_probe.c $(pkg-config --cflags --libs toxcore)
  cc -O2 -DVEILMESH_MEMLOCK -Wl,--export-dynamic-symbol=sodium_mlock -Wl,--export-dynamic-symbol=sodium_munlock \
    -o "$work/tox_probe_veilmesh" bench/tox_probe.c $(pkg-config --cflags --libs toxcore)
  # probe NAME: Gbit/s of tox_probe_NAME into $work/NAME.out's second line.
  probe() {
    local out=$work/$1.out probe=$work/tox_probe_$1
    ip netns exec $B "$probe" recv 198.18.1.2 33447 "$bsd_key" > "$out" 2> "$work/probe.err" &
    local receiver=$!; pids+=($receiver)
    for _ in $(seq 50); do [ -s "$out" ] && break; sleep 0.1; done
    in_a "$probe" send 198.18.1.2 33447 "$bsd_key" "$(head -1 "$out")" "$seconds" \
      2>> "$work/probe.err" || true
    wait $receiver || true
  }
  probe veilmesh
  probe shipped
  ceiling=$(sed -n 2p "$work/veilmesh.out"); shipped=$(sed -n 2p "$work/shipped.out")
  if [ -n "$ceiling" ] && [ -n "$shipped" ]; then
    python3 -c 'import sys; g,c,s=map(float,sys.argv[1:]); print("toxcore lossy ceiling (tox_probe):  %.3f Gbit/s as veilmesh runs it, as shipped (mlock per packet) %.3f" % (c, s)); print("throughput veilmesh tox / ceiling:  %.2f (/ as shipped: %.2f)" % (g/c, g/s))' "$tx_g" "$ceiling" "$shipped"
  else
    echo "tox_probe measured nothing:"; cat "$work/probe.err"
  fi
fi

if [ -n "${tput[veilmesh-relay]:-}" ]; then
  ry_g=$(avg "${tput[veilmesh-relay]}"); ry_4=$(avg "${tput4[veilmesh-relay]}"); ry_m=$(avg "${rtm[veilmesh-relay]}")
  printf '%-14s %10s %12s %14s %14s\n' veilmesh-relay "$ry_g" "$ry_4" "$(avg "${rt[veilmesh-relay]}")" "$ry_m"
  python3 -c 'import sys; g,u,m,d=map(float,sys.argv[1:]); print("throughput veilmesh relay / direct: %.2f" % (g/u)); print("median rtt relay - direct:          %+.3f ms" % (m-d))' \
    "$ry_g" "$vm_g" "$ry_m" "$(avg "${rtm[veilmesh]}")"
fi

# --- veilmesh over I2P (BENCH_I2P=1) ----------------------------------------
if [ "${BENCH_I2P:-0}" = 1 ]; then
  echo
  echo "I2P mode: private i2pd network, ${seconds} s iperf3 per path"
  BENCH_SECONDS=$seconds cargo test --release --locked --quiet --test i2p \
    -- --ignored --exact bench_i2p_against_direct_udp --nocapture 2>&1 | sed -n 's/^bench: //p'
fi
