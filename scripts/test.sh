#!/usr/bin/env bash
# Run every check CI runs: format, lints, the whole test suite (unit,
# integration with a real daemon and real processes), then every fuzz
# target for $FUZZ_SECONDS (default 60) seconds (scripts/fuzz.sh).
#
# Skips: a test that cannot run (not root, a missing tool such as cc,
# taskset or qemu, a tmpfs mount that fails) prints SKIP and passes only
# when REPLICAD_STRICT is not 1. This script sets REPLICAD_STRICT=1 in CI
# (CI=true) and whenever it runs as root: as root every test can run, so a
# developer running README's command as root gets the same verdict as CI
# and a skip there is a failure, not a quiet pass. Run unprivileged (or set
# REPLICAD_STRICT=0 explicitly) to let root-only tests skip. Skips for
# hardware CI never has (a GPU) never fail (skip_no_hardware).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${REPLICAD_STRICT:-}" ]] && { [[ "${CI:-}" == "true" ]] || [[ "$(id -u)" == 0 ]]; }; then
    export REPLICAD_STRICT=1
fi
echo "== REPLICAD_STRICT=${REPLICAD_STRICT:-0}"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo fmt --check, cargo clippy: fuzz/ (a workspace of its own)"
(cd fuzz && cargo fmt -- --check)
cargo clippy --manifest-path fuzz/Cargo.toml --locked --all-targets --target-dir target -- -D warnings
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
# After the tests, not beside them: the fuzzers keep every CPU busy, and the
# integration tests time real waits. cargo-fuzz missing is a skip, which
# fails under REPLICAD_STRICT=1 like any other.
echo "== fuzz (scripts/fuzz.sh, ${FUZZ_SECONDS:-60} s per target)"
if cargo fuzz --version >/dev/null 2>&1; then
  scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
elif [ "${REPLICAD_STRICT:-0}" = 1 ]; then
  echo "test.sh: cargo-fuzz is not installed (scripts/setup.sh installs it)" >&2
  exit 1
else
  echo "SKIP fuzz: cargo-fuzz is not installed (scripts/setup.sh installs it)"
fi
