#!/usr/bin/env bash
# The CUDA build, checked on a machine without a GPU: lints and compiles (and links) every target
# with `--features cuda`, in its own target directory so the default CPU build is untouched.
# Nothing runs on a GPU here; the GPU tests (tests/gpu.rs) are built, and run where a GPU is.
#
# Needs python3 with pip (for PyPI's cuda-toolkit, cached in ~/.cache/candle-glu/cuda), gcc and
# g++. A cold run takes about 11 minutes on 2 cores (lints 9, links 2); a warm one seconds. See
# docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh
cuda_env_setup
export CARGO_TARGET_DIR="${CANDLE_GLU_CUDA_TARGET_DIR:-target/cuda}"
# Nothing here is debugged or run: without debug info, linking the test binaries against the
# CUDA libraries takes 110 s instead of 540 s (cold, 2 cores).
export CARGO_PROFILE_DEV_DEBUG=0 CARGO_INCREMENTAL=0
echo "cuda_check: $(nvcc --version | grep -o 'release [0-9.]*'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR" >&2

cargo clippy --all-targets --features cuda -- -D warnings
cargo test --features cuda --no-run
