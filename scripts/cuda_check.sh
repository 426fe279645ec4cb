#!/usr/bin/env bash
# The CUDA build, checked on a machine without a GPU: lints and compiles (and links) every target
# with `--features cuda`, in its own target directory so the default CPU build is untouched.
# Nothing runs on a GPU here; the GPU tests (tests/gpu.rs) are built, and run where a GPU is. Our
# CUDA kernel (gated.cu) is compiled by the real NVRTC, which needs no GPU.
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
# gated.cu, compiled by the real NVRTC (which needs no GPU): the one kernel source nothing else
# here compiles. PyPI's NVRTC of the same toolkit (about 130 MB, once), ahead of the stand-ins.
nvrtc="$CANDLE_GLU_CUDA_ROOT-nvrtc"
if [ ! -d "$nvrtc/nvidia" ]; then
    version="$(basename "$CANDLE_GLU_CUDA_ROOT")"
    echo "cuda_check: installing cuda-toolkit[nvrtc]==$version into $nvrtc" >&2
    rm -rf "$nvrtc.tmp"
    python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check \
        --root-user-action=ignore --no-warn-conflicts --target "$nvrtc.tmp" "cuda-toolkit[nvrtc]==$version"
    rm -rf "$nvrtc" # a half-made one would take the new copy inside it
    mv "$nvrtc.tmp" "$nvrtc"
fi
lib_tests="$(cargo test --features cuda --lib --no-run --message-format=json |
    grep -o '"executable":"[^"]*/deps/candle_glu-[0-9a-f]*"' | tail -n 1 |
    sed -e 's/^"executable":"//' -e 's/"$//')"
nvrtc_lib="$(dirname "$(find "$nvrtc/nvidia" -name 'libnvrtc.so.*' | head -n 1)")"
# By its exact name, and it must have run: a filter that matches nothing passes.
out="$(LD_LIBRARY_PATH="$nvrtc_lib:$CANDLE_GLU_CUDA_LIBS" CANDLE_GLU_REQUIRE_NVRTC=1 \
    "$lib_tests" --exact kernels::cuda::tests::nvrtc_compiles_the_gated_kernels 2>&1)" || {
    echo "$out"
    exit 1
}
echo "$out"
grep -q "test result: ok. 1 passed" <<<"$out" || {
    echo "cuda_check: the NVRTC test did not run" >&2
    exit 1
}
