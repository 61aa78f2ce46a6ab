#!/usr/bin/env bash
# Run every check CI runs: format, lints, and the whole test suite (unit,
# integration with a real daemon and real processes). Tests that need root
# (tmpfs mounts, leases on any file) say SKIP when run unprivileged.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
