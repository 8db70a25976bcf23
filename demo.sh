#!/usr/bin/env bash
# The main job: two datacentres on one machine and a migration between them.
#
#   ./demo.sh            small images (about 1.5 GiB disks; the first run builds them from
#                        Debian packages, which takes a few minutes, then they are cached)
#   ./demo.sh --large    the benchmark's larger images
#
# Datacentre B already runs fresh Debian 12 and 13 installs and a web and a database server
# of other tenants (its neighbours). A VM that combines a web and a database stack runs in
# datacentre A, and a guest keeps writing to its disk during the whole migration, following
# the disk to B at the switch-over. The migration link uses mutual TLS. At the end the disk
# at B is compared byte for byte with what the guest wrote, and both stores are checked.
set -euo pipefail
cd "$(dirname "$0")"
scale=small
[ "${1:-}" = "--large" ] && scale=large

scripts/install-deps.sh
# The same build as ./test.sh (all targets: one feature set, so nothing compiles twice).
cargo build --release --workspace --all-targets
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release

echo "== building (or reusing) the VM images ($scale)"
test-images/build.sh --size-scale "$scale" --only bookworm-minimal,trixie-minimal,bookworm-web-b,bookworm-db-b,bookworm-webdb >/dev/null
images=${NBD_CAS_IMAGES:-/var/tmp/nbd-cas-images}/$scale

work=$(mktemp -d /var/tmp/nbd-cas-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
scripts_dir=$OLDPWD/scripts

echo "== datacentre B: importing its neighbours"
for n in bookworm-minimal trixie-minimal bookworm-web-b bookworm-db-b; do
  "$bin/cas" import "$n" "$images/$n.raw" --store dc-b
done
echo "== datacentre A: importing the VM to move"
"$bin/cas" import vm "$images/bookworm-webdb.raw" --store dc-a

"$scripts_dir/make-certs.sh" certs dc-a,dc-b >/dev/null
start() { # name, extra args...
  local name=$1; shift
  "$bin/nbd-server" --store "$name" --unix "$name.sock" --control "$name.ctl" \
    --migration-cert "certs/$name.pem" --migration-key "certs/$name.key" --migration-ca certs/ca.pem \
    "$@" > "$name.out" 2> "$name.log" &
  pids+=($!)
  for _ in $(seq 100); do grep -q '^ready' "$name.out" 2>/dev/null && return; sleep 0.1; done
  echo "server $name did not start:"; cat "$name.log"; exit 1
}
start dc-b --migration-listen 127.0.0.1:0
start dc-a

echo "== what moving vm would cost (fingerprints only, no data moves)"
"$bin/migrate" plan --source dc-a.ctl --dest dc-b.ctl --disk vm --link-rate 100mbit

echo "== migrating vm from A to B while the guest writes"
cp --sparse=always "$images/bookworm-webdb.raw" mirror.raw
/usr/bin/python3 "$scripts_dir/guest-writer.py" --source "nbd+unix:///vm?socket=dc-a.sock" \
  --dest "nbd+unix:///vm?socket=dc-b.sock" --mirror mirror.raw --after-switch 200 --stats writer.json &
writer=$!
sleep 1
"$bin/migrate" --source dc-a.ctl --dest dc-b.ctl --disk vm
wait "$writer"
echo "guest: $(cat writer.json)"

echo "== verifying"
nbdcopy "nbd+unix:///vm?socket=dc-b.sock" result.raw
cmp result.raw mirror.raw
echo "the disk at B is byte-identical to what the guest wrote (before and after the switch-over)"
for dc in dc-a dc-b; do
  python3 - "$dc.ctl" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"id":1,"method":"store.fsck","params":{"verify":true}}\n')
r = json.loads(s.makefile().readline())["result"]
print("%s fsck: %d map entries, %d blocks, %d problems" % (sys.argv[1][:-4], r["map_entries"], r["stored_blocks"], r["problem_count"]))
sys.exit(1 if r["problem_count"] else 0)
EOF
done
