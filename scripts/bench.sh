#!/usr/bin/env bash
# Runs `peerwire bench` between two processes on this machine (a responder and the
# measuring side) and writes what BENCHMARKS.md shows: the table, the JSON and the
# latency plot.
#
#   scripts/bench.sh [OUT=benches/results] [extra `bench run` arguments...]
#
# SECURE=1: both sides secured with CURVE (default: NULL, --insecure, to measure the
# transport and the node rather than the cipher). PIN=1: each process pinned to a core
# of its own with taskset (on a VM this measures the cross-core wake-up as much as
# peerwire).
#
# Writes OUT/bench.md (the table), OUT/bench.json and OUT/latency.svg. Loopback only,
# mDNS off: nothing leaves the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benches/results}
shift || true
mkdir -p "$OUT"
cargo build --release --quiet
PW=$PWD/target/release/peerwire
export PEERWIRE_MDNS=off
PIN_A=() PIN_B=()
if [ "${PIN:-0}" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    PIN_A=(taskset -c 0) PIN_B=(taskset -c 1)
fi
SECURITY=--insecure
[ "${SECURE:-0}" = 1 ] && SECURITY=--secure
LINE=$(mktemp)
"${PIN_A[@]}" "$PW" bench serve $SECURITY >"$LINE" 2>/dev/null &
RESPONDER=$!
trap 'kill $RESPONDER 2>/dev/null || true; rm -f "$LINE"' EXIT
for _ in $(seq 100); do [ -s "$LINE" ] && break; sleep 0.05; done
ENDPOINT=$(head -1 "$LINE")
# The measuring side: secured if the responder is (its #KEY does it), else --insecure.
"${PIN_B[@]}" "$PW" bench run $([ "$SECURITY" = --insecure ] && echo --insecure) --peer "$ENDPOINT" --json --svg "$OUT/latency.svg" "$@" >"$OUT/bench.json"
# The same figures as a table (from the JSON, not a second run).
python3 - "$OUT/bench.json" >"$OUT/bench.md" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("| style | size | count | p50 | p90 | p99 | p99.9 | max | msg/s | p50 vs tcp |")
print("|---|---|---|---|---|---|---|---|---|---|")
for l in r["latency"]:
    vs = "" if l["p50_vs_tcp"] is None else "%.2f×" % l["p50_vs_tcp"]
    print("| %s | %d | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f | %s |" % (
        l["style"], l["size"], l["count"], l["p50_us"], l["p90_us"], l["p99_us"],
        l["p999_us"], l["max_us"], l["msgs_per_s"], vs))
print()
print("| style | size | receiver | sent | received | lost | missed | msg/s |")
print("|---|---|---|---|---|---|---|---|")
for t in r["throughput"]:
    print("| %s | %d | %s | %d | %d | %d | %d | %.0f |" % (
        t["style"], t["size"], t["receiver"], t["sent"], t["received"], t["lost"],
        t["missed"], t["msgs_per_s"]))
EOF
cat "$OUT/bench.md"
echo "wrote $OUT/bench.md, $OUT/bench.json and $OUT/latency.svg" >&2
