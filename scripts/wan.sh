#!/usr/bin/env bash
# An emulated WAN link on this machine: two network namespaces joined by a veth pair,
# shaped with tbf in both directions. Used by bench.sh; usable by hand.
#
#   wan.sh up   NAME [--rate 100mbit] [--burst 32kbit] [--latency 400ms]
#   wan.sh down NAME
#   wan.sh counters NAME      # "rx_bytes tx_bytes" of the source side's veth (both directions)
#   wan.sh exec NAME src|dst CMD...
#   wan.sh list               # namespaces this script made (any NAME)
#
# NAME (letters, digits, '-', at most 8 characters) names the pair: namespaces
# nbdcas-NAME-src and nbdcas-NAME-dst, veth ends vsNAME and vdNAME. The source side is
# 10.200.0.1/24 and the destination side 10.200.0.2/24; both addresses live only inside
# the namespaces, and every packet between them stays on this machine. `down` removes
# everything `up` made (it also runs when `up` fails half-way); it is idempotent.
# Needs root (ip netns, tc). The kernel needs veth and sch_tbf (netem is not required).
set -euo pipefail

SRC_ADDR=10.200.0.1
DST_ADDR=10.200.0.2
PREFIX=nbdcas-

die() { echo "wan.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

names() {  # NAME -> sets NS_SRC NS_DST V_SRC V_DST
    [[ "$1" =~ ^[A-Za-z0-9-]{1,8}$ ]] || die "NAME must be 1-8 letters, digits or '-': '$1'"
    NS_SRC="${PREFIX}$1-src"; NS_DST="${PREFIX}$1-dst"
    V_SRC="vs$1"; V_DST="vd$1"
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

down() {
    names "$1"
    local ns pid
    for ns in "$NS_SRC" "$NS_DST"; do
        if ns_exists "$ns"; then
            # processes still inside would keep the namespace alive: end them (only those
            # inside this namespace, by pid)
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
            sleep 0.2
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    # a veth end left in the root namespace by a failed `up`
    ip link del "$V_SRC" 2>/dev/null || true
    ip link del "$V_DST" 2>/dev/null || true
}

up() {
    local name=$1; shift
    local rate=100mbit burst=32kbit latency=400ms
    while [ $# -gt 0 ]; do
        case "$1" in
            --rate) rate=$2; shift 2 ;;
            --burst) burst=$2; shift 2 ;;
            --latency) latency=$2; shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
    names "$name"
    [ "$(id -u)" = 0 ] || die "needs root (ip netns, tc)"
    ns_exists "$NS_SRC" && die "$NS_SRC exists already (wan.sh down $name)"
    trap 'down "$name"' ERR
    ip netns add "$NS_SRC"
    ip netns add "$NS_DST"
    ip link add "$V_SRC" type veth peer name "$V_DST"
    ip link set "$V_SRC" netns "$NS_SRC"
    ip link set "$V_DST" netns "$NS_DST"
    ip -n "$NS_SRC" addr add "$SRC_ADDR/24" dev "$V_SRC"
    ip -n "$NS_DST" addr add "$DST_ADDR/24" dev "$V_DST"
    for ns in "$NS_SRC" "$NS_DST"; do ip -n "$ns" link set lo up; done
    ip -n "$NS_SRC" link set "$V_SRC" up
    ip -n "$NS_DST" link set "$V_DST" up
    # shape both directions (egress of each end)
    ip netns exec "$NS_SRC" tc qdisc add dev "$V_SRC" root tbf rate "$rate" burst "$burst" latency "$latency"
    ip netns exec "$NS_DST" tc qdisc add dev "$V_DST" root tbf rate "$rate" burst "$burst" latency "$latency"
    # no offloads: packets on the wire are what the counters and the shaper see
    if command -v ethtool >/dev/null; then
        ip netns exec "$NS_SRC" ethtool -K "$V_SRC" tso off gso off gro off >/dev/null 2>&1 || true
        ip netns exec "$NS_DST" ethtool -K "$V_DST" tso off gso off gro off >/dev/null 2>&1 || true
    fi
    ip netns exec "$NS_SRC" ping -c 1 -W 2 "$DST_ADDR" >/dev/null 2>&1 || true
    trap - ERR
    echo "$NS_SRC $SRC_ADDR $V_SRC $NS_DST $DST_ADDR $V_DST $rate"
}

counters() {
    names "$1"
    local d=/sys/class/net/$V_SRC/statistics
    ip netns exec "$NS_SRC" sh -c "echo \$(cat $d/rx_bytes) \$(cat $d/tx_bytes)"
}

[ $# -ge 1 ] || { usage; exit 2; }
cmd=$1; shift
case "$cmd" in
    up) [ $# -ge 1 ] || die "up NAME"; up "$@" ;;
    down) [ $# -ge 1 ] || die "down NAME"; down "$1" ;;
    counters) [ $# -ge 1 ] || die "counters NAME"; counters "$1" ;;
    exec)
        [ $# -ge 3 ] || die "exec NAME src|dst CMD..."
        names "$1"
        case "$2" in src) ns=$NS_SRC ;; dst) ns=$NS_DST ;; *) die "src or dst, not $2" ;; esac
        shift 2
        exec ip netns exec "$ns" "$@" ;;
    list) ip netns list | awk '{print $1}' | grep "^$PREFIX" || true ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
