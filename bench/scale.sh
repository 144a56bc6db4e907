#!/usr/bin/env bash
# Benchmark (not a test): what N configured peers cost. veilmesh and
# wireguard-go (Debian's, configured with `wg setconf`) get the same N
# keys and endpoints, each in its own network namespace where the
# endpoints lead into a veth that drops all (nothing leaves the namespace).
# Prints, for both and as ratios: start (until the control socket / `wg`
# answers), RSS, idle CPU over BENCH_IDLE seconds, and for veilmesh the
# time a reload of the same file plus one changed peer takes. Needs root.
#
#   bench/scale.sh [N]        (default 10000)
#   VEILMESH_BIN=/path/to/old/veilmesh bench/scale.sh   (another build)
#   BENCH_IDLE=30 (seconds of idle CPU measured), BENCH_KEYS=FILE (below)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
count=${1:-10000}
idle=${BENCH_IDLE:-30}
umask 077

scripts/install-deps.sh
if [ -n "${VEILMESH_BIN:-}" ]; then
  bin=$VEILMESH_BIN
else
  cargo build --release --locked --quiet
  bin=$PWD/target/release/veilmesh
fi

V=vmscale-$$-v; W=vmscale-$$-w
work=$(mktemp -d /tmp/veilmesh-scale.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del $V 2>/dev/null || true; ip netns del $W 2>/dev/null || true
  [ -n "${BENCH_KEEP:-}" ] && echo "work dir kept: $work" || rm -rf "$work"
}
trap cleanup EXIT
for n in $V $W; do
  ip netns add $n
  ip -n $n link set lo up
  # The peers' endpoints lie behind a veth whose other end drops all.
  ip -n $n link add sink0 type veth peer name sink1
  ip -n $n addr add 10.255.255.254/8 dev sink0
  ip -n $n link set sink0 up
  ip -n $n link set sink1 up
  ip -n $n neigh replace 10.255.255.253 lladdr 02:00:00:00:00:01 dev sink0 nud permanent
  ip -n $n route replace 10.0.0.0/8 via 10.255.255.253 dev sink0
done

# BENCH_KEYS=FILE keeps the generated keys there for the next run (two
# processes per key take a minute for 10,000).
"$bin" genkey > "$work/self.key"
if [ -f "${BENCH_KEYS:-}" ] && [ "$(wc -l < "$BENCH_KEYS")" -ge "$count" ]; then
  head -n "$count" "$BENCH_KEYS" > "$work/keys"
else
  echo "generating $count keys"
  for _ in $(seq "$count"); do
    key=$("$bin" genkey)
    echo "$key $(echo "$key" | "$bin" pubkey)"
  done > "$work/keys"
  if [ -n "${BENCH_KEYS:-}" ]; then cp "$work/keys" "$BENCH_KEYS"; fi
fi

# The same peers for both: endpoint 10.A.B.C:51820, no extra allowed IPs
# (veilmesh routes each peer's mesh /128; wireguard-go gets that /128).
python3 - "$work" "$count" <<'EOF'
import sys
work, count = sys.argv[1], int(sys.argv[2])
own = open(f"{work}/self.key").read().strip()
keys = [line.split() for line in open(f"{work}/keys")]
def endpoint(i):
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255 or 1}:51820"
with open(f"{work}/veil0.toml", "w") as v:
    v.write(f'[interface]\nname = "veil0"\nprivate_key = "{own}"\nlisten_port = 51820\n'
            f'control_socket = "{work}/veil0.sock"\nhosts_file = "{work}/hosts"\nuser = "root"\n')
    for i, (_, pub) in enumerate(keys):
        v.write(f'[[peer]]\nname = "p{i}"\npublic_key = "{pub}"\nendpoint = "{endpoint(i + 1)}"\n')
with open(f"{work}/wg0.conf", "w") as w:
    w.write(f"[Interface]\nPrivateKey = {own}\nListenPort = 51820\n")
    for i, (_, pub) in enumerate(keys):
        w.write(f"[Peer]\nPublicKey = {pub}\nEndpoint = {endpoint(i + 1)}\n")
EOF
chmod 600 "$work/veil0.toml"

rss_mb() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# idle_cpu PID -> percent of one core over $idle seconds
idle_cpu() {
  local before after
  before=$(cpu_ticks "$1"); sleep "$idle"; after=$(cpu_ticks "$1")
  python3 -c "print('%.2f' % (($after - $before) * 100 / $(getconf CLK_TCK) / $idle))"
}
now() { date +%s.%N; }
elapsed() { python3 -c "print('%.2f' % ($(now) - $1))"; }

echo "veilmesh: starting with $count peers"
start=$(now)
ip netns exec $V "$bin" up --config "$work/veil0.toml" --log-level warn 2>"$work/veilmesh.log" &
vpid=$!; pids+=($vpid)
until "$bin" show --socket "$work/veil0.sock" >/dev/null 2>&1; do
  kill -0 $vpid 2>/dev/null || { cat "$work/veilmesh.log"; exit 1; }
  sleep 0.05
done
v_start=$(elapsed "$start")
echo "veilmesh: control socket answers after $v_start s"
sleep 5
v_rss=$(rss_mb $vpid)
v_cpu=$(idle_cpu $vpid)
# Reload: one peer's endpoint changes, the other N-1 stay.
sed -i '0,/endpoint = "10\.0\.0\.1:/s//endpoint = "10.254.0.1:/' "$work/veil0.toml"
start=$(now)
if "$bin" reload --config "$work/veil0.toml" --socket "$work/veil0.sock" > "$work/reload.out" 2>&1; then
  v_reload=$(elapsed "$start")s
else
  v_reload=failed
fi
echo "veilmesh: reload: $(head -c 200 "$work/reload.out")"
# show --json: every peer's state, read off the control socket.
start=$(now)
"$bin" show --json --socket "$work/veil0.sock" > "$work/show.json"
v_show=$(elapsed "$start")s
python3 -c "import json,sys; n=len(json.load(open('$work/show.json'))['peers']); sys.exit(n != $count)" \
  || { echo "show --json did not list $count peers" >&2; v_show=wrong; }

echo "wireguard-go: starting with $count peers"
start=$(now)
ip netns exec $W env WG_PROCESS_FOREGROUND=1 wireguard-go wg0 >"$work/wg.log" 2>&1 &
wpid=$!; pids+=($wpid)
until ip netns exec $W wg show wg0 >/dev/null 2>&1; do sleep 0.02; done
ip netns exec $W wg setconf wg0 "$work/wg0.conf"
ip -n $W link set wg0 up
w_start=$(elapsed "$start")
sleep 5
w_rss=$(rss_mb $wpid)
w_cpu=$(idle_cpu $wpid)

printf '\n%-14s %12s %12s %8s\n' "$count peers" veilmesh wireguard-go ratio
ratio() { python3 -c "print('%.2f' % ($1 / $2) if $2 > 0 else 'n/a')"; }
printf '%-14s %11ss %11ss %8s\n' start "$v_start" "$w_start" "$(ratio "$v_start" "$w_start")"
printf '%-14s %10sMB %10sMB %8s\n' RSS "$v_rss" "$w_rss" "$(ratio "$v_rss" "$w_rss")"
printf '%-14s %11s%% %11s%% %8s\n' "idle CPU" "$v_cpu" "$w_cpu" "$(ratio "$v_cpu" "$w_cpu")"
printf '%-14s %12s\n' reload "$v_reload"
printf '%-14s %12s\n' "show --json" "$v_show"
