#!/usr/bin/env bash
# Memory of a migration of a large thin disk (issue 14's fourth item: each server's RSS under
# 512 MiB for a 2 TiB disk with 10 M allocated blocks). The disk is built straight in a
# store (tools/examples/thin_disk.rs: BLOCKS blocks spread over 2 TiB, DISTINCT contents of
# random bytes in turn, so block i holds content i % DISTINCT); two nbd-servers on loopback
# migrate it (no TLS, no shaping: the listing runs as fast as it can, which is what would
# grow the destination's bookkeeping without the listing window). Prints both servers' peak
# RSS (VmHWM), the destination's RSS over time and its RocksDB memory, and the report's
# `missing_peak` (most blocks listed and not yet local at once).
# BLOCKS (default 10000000) and DISTINCT (default 1000000); needs a release build with
# examples (`cargo build --release --workspace --all-targets`) and 10 GB free in /var/tmp.
set -euo pipefail
bin=${CARGO_TARGET_DIR:-/var/tmp/nbd-cas-target}/release
blocks=${BLOCKS:-10000000}
distinct=${DISTINCT:-1000000}
work=$(mktemp -d /var/tmp/nbd-cas-thin.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
"$bin/examples/thin_disk" --store src --blocks "$blocks" --distinct "$distinct"
"$bin/nbd-server" --store src --unix src.nbd --control src.ctl > src.out 2> src.log & src=$!
pids+=("$src")
"$bin/nbd-server" --store dst --unix dst.nbd --control dst.ctl --migration-listen 127.0.0.1:0 --migration-insecure > dst.out 2> dst.log & dst=$!
pids+=("$dst")
for f in src.out dst.out; do for _ in $(seq 300); do grep -q '^ready' "$f" 2>/dev/null && break; sleep 0.1; done; done
rss() { awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }
( while kill -0 "$dst" 2>/dev/null; do echo "$(rss "$src") $(rss "$dst")"; sleep 5; done ) > rss.txt 2>/dev/null & pids+=($!)
( while kill -0 "$dst" 2>/dev/null; do sleep 30; "$bin/cas" stats --server dst.ctl --json 2>/dev/null \
    | python3 -c "import json,sys; m=json.load(sys.stdin)['store'].get('engine_memory') or {}; print(' '.join('%s %d MiB' % (k, v >> 20) for k, v in sorted(m.items())))" || true; done ) > engine.txt & pids+=($!)
start=$(date +%s.%N)
"$bin/migrate" --source src.ctl --dest dst.ctl --disk thin --json > report.json
seconds=$(echo "$(date +%s.%N) - $start" | bc)
hwm() { awk '/^VmHWM/ {print int($2 / 1024)}' "/proc/$1/status"; }
python3 - "$seconds" "$(hwm "$src")" "$(hwm "$dst")" <<'PY'
import json, sys
r = json.load(open("report.json"))
d = r["destination"]
print("migrated %d blocks (%d distinct) in %.1f s: phase %s, downtime %.1f ms" % (
    d["blocks_listed"], d["wanted"], float(sys.argv[1]), r["phase"], r.get("downtime_ms") or 0))
print("peak RSS: source %s MiB, destination %s MiB" % (sys.argv[2], sys.argv[3]))
print("destination: most blocks missing at once %d; source's zstd stream %d MiB" % (
    d.get("missing_peak", 0), r.get("link_stream_memory_bytes", 0) >> 20))
PY
echo "RSS MiB over time (source destination), every 5 s:"
tr '\n' ',' < rss.txt; echo
echo "destination RocksDB memory every 30 s:"
cat engine.txt
