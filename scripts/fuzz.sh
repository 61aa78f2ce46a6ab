#!/usr/bin/env bash
# Run every fuzz target (fuzz/fuzz_targets/) under libFuzzer, through
# cargo-fuzz, for a fixed time each:
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]
#
# SECONDS_PER_TARGET defaults to $FUZZ_SECONDS, else 60; no TARGET means
# all of them (`cargo fuzz list`). Targets run $FUZZ_JOBS at a time
# (default: one per CPU).
#
# Stable Rust: the targets are built with `-s none`. cargo-fuzz's default
# AddressSanitizer needs -Zsanitizer, which only nightly takes; without it
# every flag cargo-fuzz passes is a stable -C flag (-Cpasses=sancov-module
# and the -Cllvm-args=-sanitizer-coverage-* that give libFuzzer its
# coverage), with debug assertions and overflow checks on.
#
# Each target first replays its committed seeds (fuzz/corpus/<target>/,
# read only) and what earlier runs found (target/fuzz/corpus/<target>/,
# where new inputs go), then mutates them until its time is up. A panic, a
# failed assertion, one input running over 10 s or the process going over
# 2 GiB fails the script: libFuzzer saves the input under
# fuzz/artifacts/<target>/, and this script prints it (base64) and the
# command that replays it. Per target, the log shows the runs, the
# coverage reached and the crashes; libFuzzer's whole output is in
# target/fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-${FUZZ_SECONDS:-60}}
if [ $# -gt 0 ]; then shift; fi
jobs=${FUZZ_JOBS:-$(nproc)}
if ! [[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 && "$jobs" =~ ^[0-9]+$ && "$jobs" -gt 0 ]]; then
  echo "fuzz.sh: seconds ($seconds) and FUZZ_JOBS ($jobs) must be positive integers" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: cargo-fuzz is not installed (scripts/setup.sh installs it)" >&2
  exit 2
fi

# Relative paths, so that the printed commands work from the repository root.
flags=(-s none --target-dir target/fuzz)
out=target/fuzz
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi
for t in "${targets[@]}"; do
  if ! compgen -G "fuzz/corpus/$t/*" >/dev/null; then
    echo "fuzz.sh: target $t has no seeds in fuzz/corpus/$t/" >&2
    exit 2
  fi
done

echo "fuzz: building every target (cargo fuzz build ${flags[*]})"
cargo fuzz build "${flags[@]}"

rm -rf "$out/logs"
mkdir -p "$out/logs"
# The targets that write their input to a file (published, pagemap, sysfs)
# make it under $TMPDIR: a tmpfs when there is one (on ext4, sysfs's
# tree of files runs 20 times slower).
scratch=$(mktemp -d /dev/shm/replicad-fuzz.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch

# One target: libFuzzer for $seconds, its output in logs/<target>.log and
# its exit status in logs/<target>.rc. `timeout` is a backstop only:
# -max_total_time ends the run and -timeout=10 catches a hung input.
fuzz_one() {
  local t=$1
  mkdir -p "$out/corpus/$t" "fuzz/artifacts/$t"
  # libFuzzer never deletes an input it found a smaller one for: past
  # $cmin_above files, keep only those that add coverage (seconds).
  if [ "$(find "$out/corpus/$t" -type f | wc -l)" -gt "$cmin_above" ]; then
    echo "fuzz: $t: minimizing $out/corpus/$t (cargo fuzz cmin)"
    cargo fuzz cmin "${flags[@]}" "$t" "$out/corpus/$t" >"$out/logs/$t.cmin.log" 2>&1 ||
      echo "fuzz: $t: cargo fuzz cmin failed, see $out/logs/$t.cmin.log"
  fi
  local rc=0
  timeout --kill-after=30 $((seconds + 120)) \
    cargo fuzz run "${flags[@]}" "$t" "$out/corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$out/logs/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$out/logs/$t.rc"
}

cmin_above=10000
start=$(date +%s)
echo "fuzz: ${#targets[@]} targets, $seconds s each, $jobs at a time"
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  fuzz_one "$t" &
  running=$((running + 1))
done
wait

failed=()
for t in "${targets[@]}"; do
  log=$out/logs/$t.log
  rc=$(cat "$out/logs/$t.rc" 2>/dev/null || echo "?")
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(sed -n 's/^#[0-9].* cov: \([0-9]*\) .*/\1/p' "$log" | tail -n 1)
  # Not counted as seeds: what a run by hand added there (40 hex digits).
  seeds=$(find "fuzz/corpus/$t" -maxdepth 1 -type f -regextype posix-extended ! -regex '.*/[0-9a-f]{40}' | wc -l)
  found=$(find "$out/corpus/$t" -maxdepth 1 -type f | wc -l)
  mapfile -t saved < <(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")
  echo "fuzz: $t: ${runs:-?} runs, coverage ${cov:-?}, ${#saved[@]} crashes," \
       "corpus $seeds seeds + $found found, exit $rc"
  if [ "$rc" != 0 ] || [ "${#saved[@]}" -gt 0 ]; then
    failed+=("$t")
    echo "---- $t: what failed (all of it in $log)"
    grep -E -A 2 "panicked at|^==[0-9]+== ERROR|^SUMMARY: libFuzzer" "$log" | head -n 30 || true
    echo "---- $t: last lines of $log"
    tail -n 25 "$log"
    for f in "${saved[@]}"; do
      echo "---- $t: input saved in $f ($(stat -c %s "$f") bytes), base64:"
      base64 -w 76 "$f"
      echo "---- $t: reproduce with:"
      echo "  cargo fuzz run ${flags[*]} $t $f"
    done
    if [ "${#saved[@]}" -eq 0 ]; then
      echo "---- $t: exit $rc without a saved input; rerun with: scripts/fuzz.sh $seconds $t"
    fi
  fi
done
echo "fuzz: ${#targets[@]} targets in $(( $(date +%s) - start )) s," \
     "${#failed[@]} failed${failed[*]:+: ${failed[*]}}"
[ "${#failed[@]}" -eq 0 ]
