#!/usr/bin/env bash
# Install what replicad needs to build and test on Debian/Ubuntu.
# Idempotent: does nothing when everything is present.
set -euo pipefail

# Build: pkg-config libhwloc-dev libudev-dev gcc. Tests: util-linux
# (setpriv), attr, python3 and coreutils (real programs under the shim),
# qemu-system-x86 + busybox-static + binutils (the multi-NUMA test guest;
# its kernel is fetched with apt-get download on first use). Fuzzing: g++
# (libfuzzer-sys builds libFuzzer, which is C++).
packages=(pkg-config libhwloc-dev libudev-dev gcc g++ util-linux attr python3 coreutils
          qemu-system-x86 busybox-static binutils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: install Rust 1.95 (https://rustup.rs), then run this again" >&2
  exit 1
fi
# cargo-fuzz (scripts/fuzz.sh), pinned, built from crates.io into
# ~/.cargo/bin once (about a minute); a machine that keeps ~/.cargo keeps it.
cargo_fuzz=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $cargo_fuzz" ]; then
  echo "setup: installing cargo-fuzz $cargo_fuzz"
  cargo install --quiet --locked cargo-fuzz --version "$cargo_fuzz"
fi
echo "setup: ok ($(cargo --version), $(cargo fuzz --version))"
