#!/usr/bin/env bash
# A simulated LAN on this machine: N hosts, each a network namespace with eth0
# (10.77.0.N/24), joined by a bridge that lives in a namespace of its own. Nothing touches
# the host's real interfaces, so mDNS can run for real. Needs root and iproute2 (`ip`).
#
#   scripts/lan.sh up N [TAG]     build it (hosts TAG-h0 .. TAG-h{N-1}, switch TAG-sw)
#   scripts/lan.sh down [TAG]     tear it down
#   scripts/lan.sh exec I CMD...  run CMD on host I (TAG from $LAN_TAG, default pwlan)
#   scripts/lan.sh cut I | heal I pull / plug host I's cable (a partition)
#
# Sourced, it defines the same as functions: lan_up, lan_down, lan_exec, lan_cut, lan_heal.
set -euo pipefail

LAN_TAG=${LAN_TAG:-pwlan}

lan_need() {
    if [ "$(id -u)" != 0 ]; then echo "lan.sh: needs root (network namespaces)" >&2; exit 2; fi
    command -v ip >/dev/null || { echo "lan.sh: needs iproute2 (apt-get install iproute2)" >&2; exit 2; }
}

lan_up() {
    local n=$1 tag=${2:-$LAN_TAG}
    lan_need
    lan_down "$tag"
    ip netns add "$tag-sw"
    ip -n "$tag-sw" link add br0 type bridge
    ip -n "$tag-sw" link set br0 up
    for i in $(seq 0 $((n - 1))); do
        local h="$tag-h$i"
        ip netns add "$h"
        ip link add eth0 netns "$h" type veth peer name "p$i" netns "$tag-sw"
        ip -n "$tag-sw" link set "p$i" master br0
        ip -n "$tag-sw" link set "p$i" up
        ip -n "$h" addr add "10.77.0.$((i + 1))/24" dev eth0
        ip -n "$h" link set eth0 up
        ip -n "$h" link set lo up
    done
}

lan_down() {
    local tag=${1:-$LAN_TAG} ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$tag-(sw|h[0-9]+)$" || true); do
        # Whatever still runs in there goes first.
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns"
    done
}

lan_exec() {
    local i=$1; shift
    ip netns exec "$LAN_TAG-h$i" "$@"
}

lan_cut() { ip -n "$LAN_TAG-sw" link set "p$1" down; }
lan_heal() { ip -n "$LAN_TAG-sw" link set "p$1" up; }

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    cmd=${1:-}; shift || true
    case "$cmd" in
        up) lan_up "$@" ;;
        down) lan_need; lan_down "$@" ;;
        exec) lan_exec "$@" ;;
        cut) lan_cut "$@" ;;
        heal) lan_heal "$@" ;;
        *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
fi
