#!/usr/bin/env bash
# Attacks a release `peerwire node` on loopback, one attack at a time, while a legitimate
# client calls it every 100 ms, and prints for each: the share of legitimate calls
# answered within 1 s, the worst of their latencies, the victim's resident memory before,
# at its peak, and 30 s after the attack stopped, and how much the victim logged. Figures
# go in RELIABILITY.md.
#
# The victim logs warnings (RUST_LOG=warn) to a file, except for `log-flood-pipe`, where
# its standard output and error are a pipe that nobody reads: logging must never block it.
#
#   scripts/abuse.sh [SECONDS_PER_ATTACK]    (default 10)
#
# Everything stays on this machine: the victim listens on 127.0.0.1 with mDNS off, and
# the attacker only ever connects to it (and the HELLOs it forges name 127.0.0.3).
set -euo pipefail
# These nodes run without security, by explicit choice (PROTOCOL.md 10a; SECURITY.md).
export PEERWIRE_INSECURE=1
cd "$(dirname "$0")/.."
secs=${1:-10}
attacks=${ATTACKS:-"silent-conns unread-replies hello-flood big-catalogs malformed slow-subscribers log-flood log-flood-pipe"}

cargo build --release --quiet --bin peerwire --example attack
bin=target/release/peerwire
attack=target/release/examples/attack

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

printf '| attack | legitimate calls answered | worst latency | RSS before | RSS peak | RSS 30 s after | victim log |\n'
printf '|---|---|---|---|---|---|---|\n'
for a in $attacks; do
    out=$(mktemp)
    log=$(mktemp)
    kind=$a
    if [ "$a" = log-flood-pipe ]; then
        # A pipe held open (read-write) by this script and never read: once its 64 KiB
        # fill, every write to it would block.
        kind=log-flood
        fifo=$(mktemp -u)
        mkfifo "$fifo"
        exec 3<>"$fifo"
        PEERWIRE_MDNS=off RUST_LOG=warn "$bin" node --name victim --serve echo >&3 2>&3 &
        victim=$!
        # The endpoint line is the first thing written; read just that from the pipe.
        endpoint=$(timeout 5 head -1 <&3 || true)
    else
        PEERWIRE_MDNS=off RUST_LOG=warn "$bin" node --name victim --serve echo >"$out" 2>"$log" &
        victim=$!
        for _ in $(seq 50); do [ -s "$out" ] && break; sleep 0.1; done
        endpoint=$(head -1 "$out")
    fi
    sleep 1
    before=$(rss_kib $victim)
    peak=$before
    result=$(mktemp)
    "$attack" "$kind" "$endpoint" "$secs" >"$result" 2>/dev/null &
    attacker=$!
    while kill -0 $attacker 2>/dev/null; do
        now=$(rss_kib $victim)
        [ "$now" -gt "$peak" ] && peak=$now
        sleep 0.2
    done
    wait $attacker || true
    sleep 30
    after=$(rss_kib $victim)
    line=$(cat "$result")
    calls=$(echo "$line" | sed -n 's/.*"calls":\([0-9]*\).*/\1/p')
    ok=$(echo "$line" | sed -n 's/.*"ok":\([0-9]*\).*/\1/p')
    worst=$(echo "$line" | sed -n 's/.*"worst_ms":\([0-9]*\).*/\1/p')
    if [ "$a" = log-flood-pipe ]; then
        logged="a pipe nobody reads"
    else
        logged="$(wc -l <"$log") lines, $(( $(wc -c <"$log") / 1024 )) KiB"
    fi
    printf '| %s | %s/%s | %s ms | %s MiB | %s MiB | %s MiB | %s |\n' "$a" "${ok:-?}" "${calls:-?}" \
        "${worst:-?}" $((before / 1024)) $((peak / 1024)) $((after / 1024)) "$logged"
    kill $victim 2>/dev/null || true
    wait $victim 2>/dev/null || true
    if [ "$a" = log-flood-pipe ]; then
        exec 3>&-
        rm -f "$fifo"
    fi
    rm -f "$out" "$log" "$result"
done
