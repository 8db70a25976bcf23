#!/usr/bin/env bash
# The main job: a local demonstration. Until migration lands, it shows the block store on
# synthetic disks that share content: import, dedupe, export byte-exact, fsck.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
cargo build --release -p tools
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== two synthetic disks sharing 75% of their blocks"
head -c 48M /dev/urandom > "$work/a.raw"; truncate -s 64M "$work/a.raw"
cp "$work/a.raw" "$work/b.raw"
dd if=/dev/urandom of="$work/b.raw" bs=1M count=12 seek=8 conv=notrunc status=none
"$bin/cas" import a "$work/a.raw" --store "$work/store"
"$bin/cas" import b "$work/b.raw" --store "$work/store"
"$bin/cas" stats --store "$work/store"
"$bin/cas" export b "$work/b.out" --store "$work/store"
cmp "$work/b.raw" "$work/b.out" && echo "export of b is byte-identical"
"$bin/cas" fsck --verify --store "$work/store"
