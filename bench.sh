#!/usr/bin/env bash
# The benchmark: how much less data, how much faster, how short a pause, and how fast as a
# plain NBD server, against the real alternatives on the same link and the same images.
#
#   ./bench.sh                  full run (large test images; about two hours on 2 cores)
#   ./bench.sh --quick          smoke run (small images, a subset of rows, a few minutes)
#   ./bench.sh --only nbd,migration   re-run these sections, keep the others' last results
#
# Sections: similarity, indexing, migration, downtime, nbd, store, rados (the default is all).
# Full results: bench/results.json, bench/RESULTS.md, bench/plots/*.png, bench/sections/.
# --quick writes the same under bench/quick/ (so it never overwrites a full run's results).
# Needs root (network namespaces, tc) and the packages of scripts/install-deps.sh; installs
# the benchmark's own few (casync, python3-matplotlib, time) when missing.
# See bench/README.md for what each section measures and how.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE"
ORIG_ARGS="$*"

QUICK=0 ONLY="" SCALE="" BUILD=1 IMAGES_BUILD=1 VERIFY=1 OUT="" KEEP=0
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; cat <<EOF
Options:
  --quick            smoke run
  --only LIST        comma-separated sections to run
  --scale S          test-image scale (small|large; default: large, small with --quick)
  --out DIR          results directory (default bench, or bench/quick with --quick)
  --no-build         use the binaries already built (skip cargo build)
  --no-image-build   do not call test-images/build.sh (the images must exist)
  --no-verify        skip the content check after each transfer
  --keep             keep the run directory (stores, logs of the servers)
EOF
}
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --only) ONLY=$2; shift 2 ;;
        --only=*) ONLY=${1#*=}; shift ;;
        --scale) SCALE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-image-build) IMAGES_BUILD=0; shift ;;
        --no-verify) VERIFY=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "bench.sh: needs root (network namespaces, tc)" >&2; exit 1; }
if [ -z "$SCALE" ]; then [ "$QUICK" = 1 ] && SCALE=small || SCALE=large; fi
if [ -z "$OUT" ]; then [ "$QUICK" = 1 ] && OUT="$HERE/bench/quick" || OUT="$HERE/bench"; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ALL_SECTIONS=similarity,indexing,migration,downtime,nbd,store,rados
[ -n "$ONLY" ] || ONLY=$ALL_SECTIONS
log() { printf '[%s] bench.sh: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ------------------------------------------------------------------ clean-up, failures included
RUN=$(mktemp -d /var/tmp/nbd-cas-bench.XXXXXX)
PY_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$PY_PID" ] && kill -0 "$PY_PID" 2>/dev/null; then
        kill -TERM "$PY_PID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$PY_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$PY_PID" 2>/dev/null || true
    fi
    # every process the harness recorded (each leads its own process group)
    if [ -f "$RUN/pids" ]; then
        while read -r pid; do
            [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; }
        done <"$RUN/pids"
        sleep 1
        while read -r pid; do
            [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; }
        done <"$RUN/pids"
    fi
    # the rados section's Ceph cluster (in the WAN's destination namespace; the WAN's teardown
    # below would end its daemons too, this also deletes its directory)
    if [ -f "$RUN/ceph-dir" ]; then "$HERE/scripts/ceph-cluster.sh" stop "$(cat "$RUN/ceph-dir")" >/dev/null 2>&1 || true; fi
    # the emulated WAN of this run
    if [ -f "$RUN/wan" ]; then "$HERE/scripts/wan.sh" down "$(cat "$RUN/wan")" 2>/dev/null || true; fi
    if [ "$KEEP" = 1 ]; then log "kept $RUN"; else rm -rf --one-file-system "$RUN"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# ------------------------------------------------------------------ tools
need_pkgs=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
for c in qemu-nbd:qemu-utils qemu-img:qemu-utils nbdcopy:libnbd-bin fio:fio nbdkit:nbdkit rsync:rsync \
         zstd:zstd ip:iproute2 tc:iproute2 casync:casync du:coreutils; do
    have_cmd "${c%%:*}" || need_pkgs+=("${c#*:}")
done
[ -x /usr/bin/time ] || need_pkgs+=(time)
[ -x /usr/bin/python3 ] || need_pkgs+=(python3)
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need_pkgs+=(python3-matplotlib)
# the rados section's one-node cluster (scripts/ceph-cluster.sh; scripts/install-deps.sh's set)
if [[ ",$ONLY," == *,rados,* ]]; then
    for c in ceph-mon:ceph-mon ceph-osd:ceph-osd ceph:ceph-common rados:ceph-common ceph-authtool:ceph-common \
             monmaptool:ceph-common; do
        have_cmd "${c%%:*}" || need_pkgs+=("${c#*:}")
    done
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null; } \
        || log "warning: could not install ${need_pkgs[*]}; their rows will be missing"
fi

# ------------------------------------------------------------------ build
TARGET=${CARGO_TARGET_DIR:-/var/tmp/nbd-cas-target}
if [ "$BUILD" = 1 ]; then
    log "cargo build --release --workspace --all-targets"
    cargo build --release --workspace --all-targets >&2
fi
# a snapshot of the binaries: a rebuild in the shared target directory during a long run
# must not change what is measured half-way
BIN="$RUN/bin"
mkdir -p "$BIN"
for b in nbd-server cas migrate; do
    [ -x "$TARGET/release/$b" ] || { echo "bench.sh: $TARGET/release/$b missing (cargo build --release --workspace)" >&2; exit 1; }
    cp "$TARGET/release/$b" "$BIN/$b"
done

# ------------------------------------------------------------------ images
IMAGES=${NBD_CAS_IMAGES:-/var/tmp/nbd-cas-images}
if [ "$QUICK" = 1 ]; then
    IMGS=bookworm-minimal,bookworm-web,bookworm-web-b
    # the migration section moves bookworm-webdb-later into its older version's datacentre
    if [ -z "$ONLY" ] || [[ ",$ONLY," == *,migration,* ]]; then
        IMGS=$IMGS,bookworm-webdb,bookworm-webdb-later
    fi
    # the gang section moves four VMs of one stack
    if [ -z "$ONLY" ] || [[ ",$ONLY," == *,gang,* ]]; then
        IMGS=$IMGS,bookworm-webdb,bookworm-db-b
    fi
else
    IMGS=bookworm-minimal,trixie-minimal,bookworm-web-b,bookworm-db-b,bookworm-web,bookworm-db,trixie-app,bookworm-webdb,bookworm-webdb-later
fi
if [ "$IMAGES_BUILD" = 1 ]; then
    log "test images ($SCALE): test-images/build.sh --size-scale $SCALE --only $IMGS"
    NBD_CAS_IMAGES=$IMAGES "$HERE/test-images/build.sh" --size-scale "$SCALE" --only "$IMGS" >&2
fi

# ------------------------------------------------------------------ run
ARGS=(--bin "$BIN" --images "$IMAGES" --out "$OUT" --run-dir "$RUN" --only "$ONLY" --scale "$SCALE")
[ "$QUICK" = 1 ] && ARGS+=(--quick)
[ "$VERIFY" = 1 ] || ARGS+=(--no-verify)
CMDLINE="./bench.sh${ORIG_ARGS:+ $ORIG_ARGS}"
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
rc=0
/usr/bin/python3 "$HERE/bench/bench.py" "${ARGS[@]}" &
PY_PID=$!
wait "$PY_PID" || rc=$?
PY_PID=""
log "report"
/usr/bin/python3 "$HERE/bench/report.py" --out "$OUT" --started "$STARTED" --only "$ONLY" \
    --mode "$([ "$QUICK" = 1 ] && echo quick || echo full)" --scale "$SCALE" --cmdline "$CMDLINE" || rc=1
[ "$rc" = 0 ] || log "some sections failed (exit $rc): see $OUT/RESULTS.md and $OUT/logs/"
exit "$rc"
