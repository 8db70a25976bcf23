#!/usr/bin/env bash
# What the link stream (DATA_STREAM) gives over per-frame compression, in one run: migrates
# the small bookworm-webdb image into a datacentre of four neighbours (the demo's) once per
# setting, with and without `--no-stream`, and prints block data and all bytes on the link.
# Loopback (no WAN shaping; `--bandwidth` caps the sender). Needs the small images
# (test-images/build.sh --size-scale small) and a release build.
#
#   bench/stream-lever.sh [SETTING...]    default: "--zstd-level 3" "--zstd-level 9" "--bandwidth 100mbit"
set -euo pipefail
bin=${CARGO_TARGET_DIR:-/var/tmp/nbd-cas-target}/release
images=${NBD_CAS_IMAGES:-/var/tmp/nbd-cas-images}/small
[ $# -gt 0 ] || set -- "--zstd-level 3" "--zstd-level 9" "--bandwidth 100mbit"
work=$(mktemp -d /var/tmp/nbd-cas-stream.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
for n in bookworm-minimal trixie-minimal bookworm-web-b bookworm-db-b; do "$bin/cas" import "$n" "$images/$n.raw" --store dc-b >/dev/null; done
"$bin/cas" import vm "$images/bookworm-webdb.raw" --store dc-a >/dev/null
start() { # name, extra args
  local name=$1; shift
  "$bin/nbd-server" --store "$name" --unix "$name.sock" --control "$name.ctl" --migration-insecure "$@" > "$name.out" 2> "$name.log" &
  pids+=($!)
  for _ in $(seq 100); do grep -q '^ready' "$name.out" 2>/dev/null && return; sleep 0.1; done
  echo "server $name did not start"; cat "$name.log"; exit 1
}
start dc-b --migration-listen 127.0.0.1:0
start dc-a
printf '%-22s %-10s %12s %12s %12s %8s %6s %10s\n' setting mode "block data" "link total" "records raw" time level "zstd mem"
for setting in "$@"; do
  for mode in per-frame stream; do
    extra=(); [ "$mode" = per-frame ] && extra=(--no-stream)
    # shellcheck disable=SC2086
    "$bin/migrate" --source dc-a.ctl --dest dc-b.ctl --disk vm $setting "${extra[@]}" --json > r.json 2>/dev/null
    python3 - "$setting" "$mode" <<'PY'
import json, sys
r = json.load(open("r.json")); l = r["link"]; m = 1048576
print("%-22s %-10s %8.2f MiB %8.2f MiB %8.2f MiB %6.2f s %6d %6d MiB" % (sys.argv[1], sys.argv[2], l["data_wire_bytes"] / m,
      l["total_bytes"] / m, l["data_raw_bytes"] / m, r["total_seconds"], r["zstd_level"], r.get("link_stream_memory_bytes", 0) // m))
h = r.get("zstd_level_history", [])
if len(h) > 1:
    print("%-33s level over time: %s" % ("", " ".join("%.1fs:%d" % (s["seconds"], s["level"]) for s in h[:24])))
PY
    # The destination lets go of its session just after the source finishes.
    for _ in $(seq 50); do "$bin/cas" rm vm --server dc-b.ctl >/dev/null 2>&1 && break; sleep 0.2; done
  done
done
