#!/usr/bin/env bash
# The main job: two datacentres on one machine and a migration between them.
#
#   ./demo.sh            small images (about 1.5 GiB disks; the first run builds them from
#                        Debian packages, which takes a few minutes, then they are cached)
#   ./demo.sh --large    the benchmark's larger images
#
# Datacentre B already runs fresh Debian 12 and 13 installs and a web and a database server
# of other tenants (its neighbours). A VM whose disk holds a web and a database stack (Debian
# 12) runs in datacentre A: a real Linux guest under QEMU (TCG), writing files with fsync.
# It moves live to B, disk and all: the disk pre-copies while the VM runs (`migrate
# --switch-after manual`), QEMU at B starts with `-incoming` on B's standby export, QEMU's own
# migration pauses the VM at `pre-switchover`, `migrate switch` moves the disk, and the VM
# resumes at B and goes on writing, then verifies everything it wrote. The migration link
# uses mutual TLS. At the end B's disk is checked with e2fsck and both stores with fsck.
#
# Without QEMU system emulation (qemu-system-x86_64 and scripts/guest-kit.sh's guest), the
# demo says so and falls back to a libnbd script as the guest, which follows its disk to B at
# the switch-over; B's disk is then compared byte for byte with what it wrote.
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

kit=""
if command -v qemu-system-x86_64 >/dev/null; then
  kit=$("$scripts_dir/guest-kit.sh" 2>guest-kit.log | tail -n 1) || kit=""
fi
if [ -n "$kit" ] && [ -f "$kit/vmlinuz" ]; then
  echo "== moving the running VM from A to B (QEMU $(qemu-system-x86_64 --version | head -n 1 | awk '{print $4}'), TCG)"
  /usr/bin/python3 "$scripts_dir/live-vm.py" --kit "$kit" --migrate "$bin/migrate" \
    --src-sock dc-a.sock --dst-sock dc-b.sock --src-ctl dc-a.ctl --dst-ctl dc-b.ctl --disk vm
  echo "== verifying"
  if "$bin/cas" ls --server dc-a.ctl | awk '{print $1}' | grep -qx vm; then
    echo "A still holds the disk"; exit 1
  fi
  echo "A has released the disk (--delete-source)"
  nbdcopy "nbd+unix:///vm?socket=dc-b.sock" result.raw
  e2fsck -fn result.raw >e2fsck.log 2>&1 || { cat e2fsck.log; exit 1; }
  echo "e2fsck of the disk at B: clean ($(tail -n 1 e2fsck.log))"
else
  echo "== QEMU system emulation is not available here (see guest-kit.log): FALLING BACK to a"
  echo "   libnbd script as the guest instead of a real VM"
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
fi
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
