#!/usr/bin/env bash
# Installs what is needed, builds veilmesh, and brings up a mesh of every
# transport on this machine, all in network namespaces on one private
# bridge with no route out:
#   a <-> b  over UDP (a LAN behind b), Tox allowed as the fallback
#   a <-> c  over Tox only, through a local tox-bootstrapd
#   a <-> d  over I2P only, through a private network of three i2pd routers
# Pings across each pair, blocks the UDP path between a and b to show the
# failover to Tox, prints `veilmesh show` of a, and removes everything
# again. Needs root; about two minutes once built.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, TUN devices)" >&2; exit 1; }

scripts/install-deps.sh
echo "building veilmesh (release)..."
cargo build --release --locked --quiet
bin=$PWD/target/release/veilmesh

P=vmdemo
spaces=(br r1 r2 r3 boot a b c d lan)
umask 077   # key files must be private: veilmesh refuses group/world-readable keys
work=$(mktemp -d /tmp/veilmesh-demo.XXXXXX)
pids=()
cleanup() {
  local status=$?
  if [ "$status" != 0 ] && [ -d "$work" ]; then
    rm -rf /tmp/veilmesh-demo-logs && mkdir -p /tmp/veilmesh-demo-logs
    cp "$work"/*.log /tmp/veilmesh-demo-logs/ 2>/dev/null || true
    for r in r1 r2 r3; do cp "$work/$r/i2pd.log" "/tmp/veilmesh-demo-logs/$r-i2pd.log" 2>/dev/null || true; done
    echo "the demo failed; its logs are in /tmp/veilmesh-demo-logs" >&2
  fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  for n in "${spaces[@]}"; do ip netns del "$P-$n" 2>/dev/null || true; rm -rf "/etc/netns/$P-$n"; done
  rm -rf "$work"
}
trap cleanup EXIT
t0=$(date +%s)
say() { printf '\n== [%3ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
in_ns() { local n=$1; shift; ip netns exec "$P-$n" "$@"; }
# Runs a program in a namespace in the background; its PID is killed at exit.
# (ip netns exec execs the program: $! is the program's own PID.)
background() { local n=$1 log=$2; shift 2; ip netns exec "$P-$n" "$@" > "$log" 2>&1 & pids+=($!); }

# --- the network: one bridge, 198.18.0.0/24 (i2pd refuses private ranges)
for n in "${spaces[@]}"; do
  ip netns del "$P-$n" 2>/dev/null || true
  ip netns add "$P-$n"
  ip -n "$P-$n" link set lo up
done
ip -n $P-br link add br0 type bridge && ip -n $P-br link set br0 up
declare -A ip_of=([r1]=1 [r2]=2 [r3]=3 [boot]=4 [a]=11 [b]=12 [c]=13 [d]=14)
port=0
for n in r1 r2 r3 boot a b c d; do
  port=$((port + 1))
  ip link add p$port netns $P-br type veth peer name eth0 netns $P-$n
  ip -n $P-br link set p$port master br0 up
  ip -n $P-$n addr add 198.18.0.${ip_of[$n]}/24 dev eth0
  ip -n $P-$n link set eth0 up
done
ip link add lan0 netns $P-b type veth peer name eth0 netns $P-lan
ip -n $P-b addr add 192.168.50.1/24 dev lan0 && ip -n $P-b link set lan0 up
ip -n $P-lan addr add 192.168.50.2/24 dev eth0 && ip -n $P-lan link set eth0 up
ip -n $P-lan route add default via 192.168.50.1
in_ns b sysctl -qw net.ipv4.ip_forward=1
# Each node's own /etc/hosts (ip netns exec bind-mounts it), for NAME.veil.
for n in a b c d; do
  mkdir -p "/etc/netns/$P-$n" && printf '127.0.0.1\tlocalhost\n' > "/etc/netns/$P-$n/hosts"
done

# --- a private I2P network: r3 is the floodfill, r1 and r2 host SAM
# sessions. No reseed servers, NTP or UPnP; reseeded from a zip of the
# routers' own identities.
declare -A i2pd_pid
start_i2pd() { # router
  local dir=$work/$1
  background "$1" "$dir/stdout" i2pd --datadir="$dir/data" --conf="$dir/i2pd.conf" \
    --tunconf="$dir/tunnels.conf" --tunnelsdir="$dir/tunnels.d" --certsdir=/usr/share/i2pd/certificates
  i2pd_pid[$1]=$!
}
for r in r1 r2 r3; do
  dir=$work/$r ip=198.18.0.${ip_of[$r]}
  mkdir -p "$dir/data" "$dir/tunnels.d"
  : > "$dir/tunnels.conf"; : > "$dir/data/hosts.txt"; echo "# none" > "$dir/data/subscriptions.txt"
  floodfill=false; [ $r = r3 ] && floodfill=true
  cat > "$dir/i2pd.conf" <<EOF
log = file
logfile = $dir/i2pd.log
loglevel = warn
daemon = false
service = false
netid = 77
ipv4 = true
ipv6 = false
host = $ip
address4 = $ip
nat = false
port = 12345
reservedrange = false
floodfill = $floodfill
bandwidth = X
[ntcp2]
enabled = true
published = true
port = 12345
[ssu2]
enabled = true
published = true
port = 12345
[nettime]
enabled = false
frompeers = false
[upnp]
enabled = false
[reseed]
verify = false
urls =
yggurls =
zipfile = $work/seed.zip
threshold = 0
[addressbook]
enabled = true
defaulturl = http://127.0.0.1/none
[http]
enabled = false
[httpproxy]
enabled = false
[socksproxy]
enabled = false
[sam]
enabled = true
address = 0.0.0.0
port = 7656
singlethread = true
[bob]
enabled = false
[i2cp]
enabled = false
[i2pcontrol]
enabled = false
[exploratory]
inbound.length = 1
outbound.length = 1
inbound.quantity = 2
outbound.quantity = 2
[persist]
profiles = false
addressbook = false
EOF
  start_i2pd $r
done
for r in r1 r2 r3; do
  for _ in $(seq 200); do [ -s "$work/$r/data/router.info" ] && break; sleep 0.1; done
done
sleep 0.5
for r in r1 r2 r3; do kill "${i2pd_pid[$r]}"; wait "${i2pd_pid[$r]}" 2>/dev/null || true; done
for r in r1 r2 r3; do cp "$work/$r/data/router.info" "$work/routerInfo-$r.dat"; done
(cd "$work" && zip -q -0 seed.zip routerInfo-r*.dat)
for r in r1 r2 r3; do rm -rf "$work/$r/data/netDb" "$work/$r/i2pd.log"; start_i2pd $r; done

# --- a Tox bootstrap node (and TCP relay), LAN discovery off everywhere
cat > "$work/boot.conf" <<EOF
port = 33445
keys_file_path = "$work/boot.keys"
pid_file_path = "$work/boot.pid"
enable_ipv6 = false
enable_ipv4_fallback = true
enable_lan_discovery = false
enable_tcp_relay = true
tcp_relay_ports = [33446]
enable_motd = false
bootstrap_nodes = ()
EOF
background boot "$work/boot.log" tox-bootstrapd --config "$work/boot.conf" --foreground --log-backend stdout
boot_key=
for _ in $(seq 100); do
  boot_key=$(sed -n 's/.*Public Key: \([0-9A-F]*\).*/\1/p' "$work/boot.log" | head -1)
  [ -n "$boot_key" ] && break; sleep 0.1
done
[ -n "$boot_key" ] || { echo "tox-bootstrapd printed no key:"; cat "$work/boot.log"; exit 1; }

# --- the four nodes
for n in a b c d; do
  "$bin" genkey > "$work/$n.key"
  "$bin" pubkey < "$work/$n.key" > "$work/$n.pub"
done
iface() { # node addresses
  printf '[interface]\nprivate_key_file = "%s"\ncontrol_socket = "%s"\nuser = "root"\naddresses = [%s]\n' \
    "$work/$1.key" "$work/$1.sock" "$2"
}
tox() { # node
  printf '[tox]\nenabled = true\nstate_file = "%s"\nbootstrap_nodes = ["198.18.0.4:33445:%s"]\ntcp_relays = ["198.18.0.4:33446:%s"]\nlocal_discovery = false\n' \
    "$work/$1.tox" "$boot_key" "$boot_key"
}
i2p() { # node router
  printf '[i2p]\nenabled = true\nsam = ["198.18.0.%s:7656"]\nkey_file = "%s"\ninbound_length = 1\noutbound_length = 0\n' \
    "${ip_of[$2]}" "$work/$1.i2p"
}
peer() { # name, then extra lines
  printf '[[peer]]\nname = "%s"\npublic_key = "%s"\n' "$1" "$(cat "$work/$1.pub")"
  shift; printf '%s\n' "$@"
}
config() { # node: everything but the I2P peers, whose addresses come later
  case $1 in
    a) iface a '"10.10.1.1/24"'; tox a; i2p a r1
       peer b 'endpoint = "198.18.0.12:51820"' "tox = \"$tox_b\"" 'transports = ["udp", "tox"]' 'allowed_ips = ["192.168.50.0/24", "10.10.1.2/32"]'
       peer c "tox = \"$tox_c\"" 'transports = ["tox"]' ;;
    b) iface b '"10.10.1.2/24"'; tox b
       peer a 'endpoint = "198.18.0.11:51820"' "tox = \"$tox_a\"" 'transports = ["udp", "tox"]' 'allowed_ips = ["10.10.1.1/32"]' ;;
    c) iface c ''; tox c
       peer a "tox = \"$tox_a\"" 'transports = ["tox"]' ;;
    d) iface d ''; i2p d r2 ;;
  esac
}
# Tox IDs first (the state file is made on first use): each config names the other's.
tox_a= tox_b= tox_c=
for n in a b c; do { iface $n ''; tox $n; } > "$work/$n.toml"; done
for n in a b c; do declare "tox_$n=$(in_ns $n "$bin" tox-id --config "$work/$n.toml")"; done
for n in a b c d; do
  config $n > "$work/$n.toml"
  background $n "$work/$n.log" "$bin" up --config "$work/$n.toml"
done
for n in a b c d; do
  for _ in $(seq 100); do "$bin" show --socket "$work/$n.sock" >/dev/null 2>&1 && break; sleep 0.1; done
done
say "four nodes up; mesh addresses derived from their keys:"
for n in a b c d; do printf '  %s  %s\n' "$n" "$("$bin" addr "$(cat "$work/$n.pub")")"; done

# I2P addresses exist once each daemon's first session made its destination.
i2p_address() { # node
  for _ in $(seq 600); do
    addr=$("$bin" show --socket "$work/$1.sock" | grep -o '[a-z2-7]\{52\}\.b32\.i2p' | head -1 || true)
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "node $1 got no I2P destination:" >&2; tail -5 "$work/$1.log" >&2; exit 1
}
i2p_a=$(i2p_address a) i2p_d=$(i2p_address d)
{ config a; peer d "i2p = \"$i2p_d\"" 'transports = ["i2p"]'; } > "$work/a.toml"
{ config d; peer a "i2p = \"$i2p_a\"" 'transports = ["i2p"]'; } > "$work/d.toml"
for n in a d; do "$bin" reload --config "$work/$n.toml" --socket "$work/$n.sock" >/dev/null; done

ok=0 total=0
# Pings PEER's mesh address from a until it answers (up to LIMIT seconds),
# then asks veilmesh which transport carried it.
reach() { # peer limit what
  local target start=$SECONDS answered=no
  target=$("$bin" addr "$(cat "$work/$1.pub")")
  total=$((total + 1))
  while [ $((SECONDS - start)) -lt "$2" ]; do
    if in_ns a ping -6 -n -c 1 -W 2 "$target" >/dev/null 2>&1; then answered=yes; break; fi
    sleep 0.5
  done
  if [ $answered = yes ]; then
    ok=$((ok + 1))
    out=$(in_ns a ping -6 -n -c 5 -i 0.2 -W 2 "$target" | grep -E 'packets transmitted|rtt' | tr '\n' ' ')
    printf '  a -> %s (%s): answered after %ss; %s\n' "$1" "$3" $((SECONDS - start)) "$out"
    printf '  %s\n' "$("$bin" ping "$1" -n 1 --socket "$work/a.sock" | head -1)"
  else
    printf '  a -> %s (%s): NO ANSWER in %ss\n' "$1" "$3" "$2"
  fi
}
say "UDP: a and b on the bridge, the LAN 192.168.50.0/24 behind b"
reach b 20 udp
total=$((total + 1))
if out=$(in_ns a ping -n -c 3 -i 0.2 -W 2 192.168.50.2); then ok=$((ok + 1)); fi
printf '  a -> 192.168.50.2 (LAN behind b): %s\n' "$(echo "$out" | grep 'packets transmitted')"
total=$((total + 1))
if out=$(in_ns a ping -6 -n -c 3 -i 0.2 -W 2 b.veil); then ok=$((ok + 1)); fi
printf '  a -> b.veil (by name): %s\n' "$(echo "$out" | grep 'packets transmitted')"
say "Tox: a and c are Tox friends only (through the local bootstrap node)"
reach c 90 tox
say "I2P: a and d know each other only by I2P destination (three private i2pd routers)"
reach d 60 i2p
say "failover: UDP between a and b blocked (iptables on a); Tox takes over"
in_ns a iptables -w -A OUTPUT -p udp -d 198.18.0.12 --dport 51820 -j DROP
in_ns a iptables -w -A INPUT -p udp -s 198.18.0.12 --sport 51820 -j DROP
reach b 60 "udp blocked"
say "veilmesh show (node a):"
"$bin" show --socket "$work/a.sock"
say "$ok of $total ping runs succeeded; cleaning up"
[ "$ok" = "$total" ]
