#!/usr/bin/env bash
# The project's test command (README; CI runs exactly this through .ci/run).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
# A throwaway one-node Ceph cluster for the RADOS block pool's tests (stopped on exit, unless
# one was already running, which is kept).
if ! scripts/ceph-cluster.sh status >/dev/null 2>&1; then
  scripts/ceph-cluster.sh start
  trap 'scripts/ceph-cluster.sh stop' EXIT
fi
eval "$(scripts/ceph-cluster.sh env)"
export NBD_CAS_REQUIRE_CEPH=1
# The VM tests (a QEMU guest moving live, the kernel nbd-client) must run, not skip.
export NBD_CAS_REQUIRE_QEMU=1
python3 test-images/test_similarity.py
cargo build --release --workspace --all-targets
# nextest runs every test in its own process and ends with one summary line.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --workspace --no-fail-fast
else
  cargo test --release --workspace --no-fail-fast
fi
