#!/usr/bin/env bash
# Measures discovery on a simulated LAN (scripts/lan.sh): how long until a new node is in
# another node's peer table (join), until a node that shuts down is gone (leave), until a
# node killed with SIGKILL is gone (crash), until a host whose cable is pulled is gone
# (partition: heartbeats only, no FIN or RST), and until a node restarted on another port
# is reached there (restart). Prints a Markdown table of median and max over ROUNDS.
#
#   sudo scripts/discovery-times.sh [ROUNDS=10] [HOSTS=4]
#
# The observer is `peerwire peers --watch --json` on h0; each event it prints carries its
# own clock ("t", Unix ms), and the script notes the time just before it acts, so a
# measurement is (event t) - (action time), process start-up included.
set -euo pipefail
# These nodes run without security, by explicit choice (PROTOCOL.md 10a; SECURITY.md).
export PEERWIRE_INSECURE=1
cd "$(dirname "$0")/.."
ROUNDS=${1:-10}
HOSTS=${2:-4}
export LAN_TAG=${LAN_TAG:-pwtimes}
source scripts/lan.sh
lan_need
cargo build --release --quiet
PW=$PWD/target/release/peerwire
DIR=$(mktemp -d)
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
    lan_down
}
trap cleanup EXIT
lan_up "$HOSTS"

# Bystanders, so the LAN is not empty.
for i in $(seq 2 $((HOSTS - 1))); do
    ip netns exec "$LAN_TAG-h$i" "$PW" node --name "bystander$i" --serve echo >/dev/null 2>&1 &
done
ip netns exec "$LAN_TAG-h0" "$PW" peers --watch --json >"$DIR/watch.jsonl" 2>"$DIR/watch.err" &
sleep 2

now_ms() { date +%s%3N; }
# wait_event EVENT NAME [PORT]: sets T to the "t" of the next matching line after the
# lines already consumed (not in a subshell: SEEN must advance); fails after 20 s.
SEEN=0
T=0
wait_event() {
    local ev=$1 name=$2 port=${3:-} deadline=$(( $(date +%s) + 20 )) line
    while :; do
        line=$(tail -n +$((SEEN + 1)) "$DIR/watch.jsonl" | grep -n "\"event\":\"$ev\"" \
            | grep "\"name\":\"$name\"" | grep "${port:+:$port\"}" | head -1 || true)
        if [ -n "$line" ]; then
            SEEN=$((SEEN + ${line%%:*}))
            T=$(echo "$line" | grep -o '"t":[0-9]*' | cut -d: -f2)
            return
        fi
        [ "$(date +%s)" -lt "$deadline" ] || { echo "no $ev of $name within 20 s" >&2; exit 1; }
        sleep 0.01
    done
}
start_node() { # start_node NAME PORT: sets PID
    ip netns exec "$LAN_TAG-h1" "$PW" node --name "$1" --serve echo --port "$2" >/dev/null 2>&1 &
    PID=$!
}

declare -a JOIN LEAVE CRASH PART RESTART
for r in $(seq 1 "$ROUNDS"); do
    name="probe$r"
    port=$((7100 + 2 * r))
    # Rounds a little apart: an mDNS responder may not repeat a record within 1 s, and
    # joins on a real LAN are not back to back.
    sleep 1.2
    t0=$(now_ms); start_node "$name" "$port"
    wait_event joined "$name"; JOIN+=($((T - t0)))
    t0=$(now_ms); kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
    wait_event left "$name"; LEAVE+=($((T - t0)))

    sleep 1.2
    start_node "$name" "$port"; wait_event joined "$name"
    t0=$(now_ms); kill -KILL "$PID"; wait "$PID" 2>/dev/null || true
    wait_event left "$name"; CRASH+=($((T - t0)))

    t0=$(now_ms); start_node "$name" $((port + 1))
    wait_event joined "$name" $((port + 1)); RESTART+=($((T - t0)))
    t0=$(now_ms); lan_cut 1
    wait_event left "$name"; PART+=($((T - t0)))
    lan_heal 1
    kill -KILL "$PID"; wait "$PID" 2>/dev/null || true
    echo "round $r: join ${JOIN[-1]} ms, leave ${LEAVE[-1]} ms, crash ${CRASH[-1]} ms, restart ${RESTART[-1]} ms, partition ${PART[-1]} ms" >&2
done

stats() { # median and max of the arguments
    local sorted n
    sorted=($(printf '%s\n' "$@" | sort -n)); n=${#sorted[@]}
    echo "${sorted[$((n / 2))]} | ${sorted[$((n - 1))]}"
}
echo
echo "Discovery on a simulated LAN of $HOSTS hosts (network namespaces, one bridge), $ROUNDS rounds, ms:"
echo
echo "| event | median | max | target |"
echo "|---|---|---|---|"
echo "| join (start → in the observer's table) | $(stats "${JOIN[@]}") | ≤ 1000 median |"
echo "| graceful leave (SIGTERM → gone) | $(stats "${LEAVE[@]}") | ≤ 1000 |"
echo "| crash (SIGKILL → gone) | $(stats "${CRASH[@]}") | ≤ 3000 |"
echo "| partition (cable pulled → gone, heartbeats) | $(stats "${PART[@]}") | ≤ 3000 |"
echo "| restart on a new port (start → reached there) | $(stats "${RESTART[@]}") | |"
