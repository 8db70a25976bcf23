#!/usr/bin/env bash
# Snapshot and clone of a 6 GiB disk with about 1.7 GiB allocated (issue 16's target: each
# under 2 s, no increase in stored bytes). The disk is the small bookworm-webdb and
# bookworm-db-b images laid side by side in a sparse 6 GiB file, imported into a store that a
# running nbd-server holds; `cas snapshot` and `cas clone` go through its control socket.
# Needs the small images (test-images/build.sh --size-scale small) and a release build.
# ROUNDS=N (default 3) makes N snapshots and N clones.
set -euo pipefail
bin=${CARGO_TARGET_DIR:-/var/tmp/nbd-cas-target}/release
images=${NBD_CAS_IMAGES:-/var/tmp/nbd-cas-images}/small
work=$(mktemp -d /var/tmp/nbd-cas-snap.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
truncate -s 6G vm.raw
dd if="$images/bookworm-webdb.raw" of=vm.raw conv=sparse,notrunc bs=1M status=none
dd if="$images/bookworm-db-b.raw" of=vm.raw conv=sparse,notrunc bs=1M seek=3072 status=none
"$bin/cas" import vm vm.raw --store st > /dev/null
"$bin/nbd-server" --store st --unix nbd.sock --control ctl > out 2> log & pid=$!
for _ in $(seq 100); do grep -q '^ready' out 2>/dev/null && break; sleep 0.1; done
stat() { "$bin/cas" stats --server ctl --json | python3 -c "import json,sys; s=json.load(sys.stdin)['store']; print(s['$1'])"; }
alloc=$("$bin/cas" stats vm --server ctl --json | python3 -c "import json,sys; print(json.load(sys.stdin)['disks'][0]['allocated_bytes'])")
before=$(stat stored_bytes)
printf '%-10s %12s %14s %10s\n' step seconds "stored bytes" "GiB alloc"
printf '%-10s %12s %14s %10.2f\n' import - "$before" "$(echo "$alloc/1073741824" | bc -l)"
for round in $(seq "${ROUNDS:-3}"); do
  s=$("$bin/cas" snapshot vm "vm@s$round" --server ctl --json | python3 -c "import json,sys; print('%.3f' % json.load(sys.stdin)['seconds'])")
  c=$("$bin/cas" clone "vm@s$round" "vm-c$round" --server ctl --json | python3 -c "import json,sys; print('%.3f' % json.load(sys.stdin)['seconds'])")
  printf '%-10s %12s %14s\n' "snapshot" "$s" "$(stat stored_bytes)"
  printf '%-10s %12s %14s\n' "clone" "$c" "$(stat stored_bytes)"
done
