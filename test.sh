#!/usr/bin/env bash
# The project's test command (README; CI runs exactly this through .ci/run).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace
