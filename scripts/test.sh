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
# The engine's state machine tests need no root (a stand-in for the kernel's
# fence calls, a memfd store, /proc fixtures): prove it by running them as
# nobody, with no capabilities.
if [ "$(id -u)" = 0 ]; then
  echo "== root-free unit tests as nobody (setpriv)"
  bin=$(cargo test -p replicad-replicator --lib --no-run 2>&1 |
        grep -o 'target/debug/deps/replicad_replicator-[0-9a-f]*' | tail -n 1)
  [ -n "$bin" ] || { echo "test.sh: cannot find the replicator's unit-test binary" >&2; exit 1; }
  (cd / && setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all \
     --bounding-set=-all "$OLDPWD/$bin" engine::tests fence::) 2>&1 | tee -a target/test.log
fi
