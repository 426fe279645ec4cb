#!/usr/bin/env bash
# Checks the build for architectures other than x86-64, where the CPU kernels are compiled out
# (src/kernels/portable.rs stands in for src/kernels/cpu/) and the block runs on candle's ops, as it
# does on x86-64 CPUs without AVX-512. No other target's standard library can be installed here,
# so this copies the tracked files to a temporary directory, turns every `target_arch = "x86_64"`
# test in src/ false (it asks for aarch64 instead), and lints and tests that copy on this machine
# (the full run needs the SmolLM2 GGUF, as the tests do: scripts/fetch_smollm2.sh).
#
#   scripts/portable_check.sh          # lints every target, runs every test (~8 min cold)
#   scripts/portable_check.sh --quick  # lints every target, runs the library's tests (CI)
#
# Builds in target/portable.
set -euo pipefail
quick=false
[ "${1:-}" = "--quick" ] && quick=true
cd "$(dirname "$0")/.."
root=$(pwd)
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$copy"
grep -rl 'target_arch = "x86_64"' "$copy/src" |
  xargs sed -i 's/target_arch = "x86_64"/target_arch = "aarch64"/g'
cd "$copy"
export CARGO_TARGET_DIR="$root/target/portable"
cargo clippy --all-targets -- -D warnings
if $quick; then
  cargo test --lib
else
  cargo test --release
fi
