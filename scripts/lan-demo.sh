#!/usr/bin/env bash
# Peers on a simulated LAN of N hosts (default 4), found by mDNS with no configuration:
# one `peerwire node --serve echo` per host h1..h{N-1}, and from h0 the commands a person
# would type: peers, call, gather, then `peers --watch` while a node leaves and another
# crashes. Needs root and iproute2. Everything is torn down on exit.
#
#   sudo scripts/lan-demo.sh [N]        (KEEP=1 leaves the LAN and nodes running)
set -euo pipefail
# These nodes run without security, by explicit choice (PROTOCOL.md 10a; SECURITY.md).
export PEERWIRE_INSECURE=1
cd "$(dirname "$0")/.."
N=${1:-4}
[ "$N" -ge 3 ] || { echo "lan-demo: at least 3 hosts" >&2; exit 2; }
export LAN_TAG=${LAN_TAG:-pwdemo}
source scripts/lan.sh
lan_need
cargo build --release --quiet
PW=$PWD/target/release/peerwire
LOGS=$(mktemp -d)
cleanup() {
    [ "${KEEP:-0}" = 1 ] && return
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
    lan_down
}
trap cleanup EXIT

lan_up "$N"
echo "LAN: $N hosts 10.77.0.1-$N on one bridge (namespaces $LAN_TAG-h0..h$((N - 1))); logs in $LOGS"
declare -a PIDS
for i in $(seq 1 $((N - 1))); do
    # `ip netns exec` execs the command, so $! is the node's own pid.
    ip netns exec "$LAN_TAG-h$i" "$PW" node --name "host$i" --serve echo \
        >"$LOGS/host$i.out" 2>"$LOGS/host$i.err" &
    PIDS[$i]=$!
done

step() { echo; echo "h0\$ peerwire $*"; lan_exec 0 "$PW" "$@"; }
step peers --wait 3000
step call echo.echo '{"hello":"lan"}'
step gather echo.ping '{}' --within 500

echo
echo "h0\$ peerwire peers --watch   (host1 shuts down, host2 is killed, host1 comes back)"
ip netns exec "$LAN_TAG-h0" "$PW" peers --watch >"$LOGS/watch.out" 2>/dev/null &
WATCH=$!
sleep 1.5
kill -TERM "${PIDS[1]}"; sleep 1
# (disowned first: a crash is the point here, not a message from bash about it)
disown "${PIDS[2]}"; kill -KILL "${PIDS[2]}"; sleep 1
ip netns exec "$LAN_TAG-h1" "$PW" node --name host1 --serve echo \
    >"$LOGS/host1b.out" 2>"$LOGS/host1b.err" &
sleep 1.5
kill "$WATCH" 2>/dev/null || true
wait "$WATCH" 2>/dev/null || true
cat "$LOGS/watch.out"

if [ "${KEEP:-0}" = 1 ]; then
    echo
    echo "kept running. Try: sudo ip netns exec $LAN_TAG-h0 $PW peers"
    echo "tear down with: sudo LAN_TAG=$LAN_TAG scripts/lan.sh down"
fi
