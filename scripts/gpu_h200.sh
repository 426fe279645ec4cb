#!/usr/bin/env bash
# The GPU checks for a machine with an NVIDIA GPU (written for the H200 that some sessions are
# lent: 16 cores, the NVIDIA driver, nvcc and PyTorch's CUDA libraries, no network, and
# possibly no Rust toolchain). Two steps:
#
#   scripts/gpu_h200.sh prepare   on a build machine (no GPU needed): builds the GPU tests, the
#                                 benchmark and the CLI with `--features cuda` into .gpu/
#                                 (xz-compressed, about 35 MB; git-ignored: name it in the
#                                 device tool's `carry`)
#   scripts/gpu_h200.sh [run]     on the GPU machine: says which CUDA libraries it has, uses
#                                 .gpu/ if present or else builds with cargo (offline), then runs
#                                 the GPU tests, the CLI on the GPU, the 7B FFN benchmark (bf16,
#                                 1, 128 and 2048 tokens, ours against the naive candle MLP) and
#                                 the MoE benchmark (Qwen3-MoE and Mixtral layers against
#                                 candle-transformers' loop over experts)
#
# Output goes to stdout and, when $OUT is set, to $OUT/gpu_h200.log and $OUT/bench.json. With
# the device tool: run `prepare` here, then `run` with carry [".gpu"] and the command
# `scripts/gpu_h200.sh` (about 2 minutes of device time once the machine is up). `run` refuses
# binaries built from other sources than the ones beside them (.gpu/SOURCE), and keeps every
# stage inside one budget, CANDLE_GLU_GPU_BUDGET_S (default 540 s: give the device call a
# timeout_s of about 580, under its 600 s limit).
#
# Why prepare with CUDA 13.0: candle compiles its own kernels to PTX at build time, and a driver
# refuses PTX from a newer toolkit than its own (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). The H200s
# seen here run driver 580 (CUDA 13.0), so .gpu/ is built with PyPI's cuda-toolkit 13.0.3.0
# (override: CANDLE_GLU_CUDA_TOOLKIT). Our own kernel is compiled at run time by the machine's
# NVRTC and has no such constraint.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
mode="${1:-run}"
carry="$repo/.gpu"

# Temporary files go on every exit.
json="" bin=""
cleanup() { rm -rf "${json:-}" "${bin:-}"; }
trap cleanup EXIT
# The executable for `$1` (a path pattern under the target directory) in cargo's JSON messages.
pick() {
    grep -o "\"executable\":\"[^\"]*/$1\"" "$json" | tail -n 1 | sed -e 's/^"executable":"//' -e 's/"$//'
}

if [ "$mode" = prepare ]; then
    export CANDLE_GLU_CUDA_TOOLKIT="${CANDLE_GLU_CUDA_TOOLKIT:-13.0.3.0}"
    # shellcheck source=scripts/cuda_env.sh
    source scripts/cuda_env.sh
    cuda_env_setup
    export CARGO_TARGET_DIR="${CANDLE_GLU_CUDA_TARGET_DIR:-target/cuda-$CANDLE_GLU_CUDA_TOOLKIT}"
    echo "prepare: $(nvcc --version | grep -o 'release [0-9.]*'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2
    json="$(mktemp)"
    cargo test --release --features cuda --no-run --message-format=json >"$json"
    cargo bench --features cuda --bench compare --no-run --message-format=json >>"$json"
    cargo bench --features cuda --bench moe --no-run --message-format=json >>"$json"
    rm -rf "$carry"
    mkdir -p "$carry"
    # The executables of the lib's unit tests, tests/gpu.rs, the two benches and the infer CLI.
    for spec in "lib_tests deps/candle_glu-[0-9a-f]*" "gpu_tests deps/gpu-[0-9a-f]*" \
        "compare deps/compare-[0-9a-f]*" "moe deps/moe-[0-9a-f]*" "infer examples/infer"; do
        read -r name pattern <<<"$spec"
        exe="$(pick "$pattern")"
        if [ -z "$exe" ]; then
            echo "prepare: no executable for $name" >&2
            exit 1
        fi
        cp "$exe" "$carry/$name"
        strip "$carry/$name"
        # About 220 MB stripped, 30-35 MB compressed: the device tool carries 64 MiB in all.
        xz -T0 -6 -f "$carry/$name"
    done
    rm -f "$json"
    nvcc --version | grep -o 'release [0-9.]*' >"$carry/TOOLKIT"
    # The sources the binaries were built from, for `run` to check against the copy beside them.
    git ls-files -z src tests benches examples weights Cargo.toml Cargo.lock |
        xargs -0 sha256sum >"$carry/SOURCE"
    echo "$CUDA_COMPUTE_CAP" >"$carry/COMPUTE_CAP"
    du -ch "$carry"/* | tail -n 1 >&2
    echo "prepare: done; carry .gpu to the GPU machine and run scripts/gpu_h200.sh there" >&2
    exit 0
fi
if [ "$mode" != run ]; then
    echo "usage: scripts/gpu_h200.sh [prepare|run]" >&2
    exit 2
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_h200.log") 2>&1
fi
start=$(date +%s)
section() { echo; echo "== $* ($(($(date +%s) - start)) s)"; }
# Every stage's timeout is its own or what is left of the budget, whichever is less.
deadline=$((start + ${CANDLE_GLU_GPU_BUDGET_S:-540}))
budget() {
    local left=$((deadline - $(date +%s)))
    if [ "$left" -lt 10 ]; then left=1; fi
    echo $(($1 < left ? $1 : left))
}

section "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
# The driver's CUDA version: our kernel's PTX (the machine's NVRTC's) must not be newer.
nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' || true
command -v nvcc >/dev/null && nvcc --version | grep -o 'release [0-9.]*' || echo "no nvcc"
command -v cargo >/dev/null && cargo --version || echo "no cargo"
nproc

# The NVIDIA libraries a `--features cuda` binary loads: the driver, cuBLAS(Lt), cuRAND, NVRTC
# and cudart. Look where the machine keeps them: the loader's cache, the driver's folder, the
# CUDA toolkit, and the Python packages (PyTorch's nvidia-* wheels).
section "CUDA libraries"
dirs=()
add_dir() {
    if [ -d "$1" ] && [[ ":$(IFS=:; echo "${dirs[*]:-}"):" != *":$1:"* ]]; then
        dirs+=("$1")
    fi
}
IFS=: read -r -a given <<<"${LD_LIBRARY_PATH:-}"
for d in "${given[@]}" /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 \
    /usr/local/cuda/targets/x86_64-linux/lib; do
    add_dir "$d"
done
for py in python3 /opt/torch/.venv/bin/python3; do
    command -v "$py" >/dev/null || continue
    for d in $("$py" -c 'import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
print("\n".join(sorted(d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")))))' \
        2>/dev/null || true); do
        add_dir "$d"
    done
done
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 \
    libcudart.so.13; do
    found="$(ldconfig -p 2>/dev/null | grep -m1 -E "^[[:space:]]*$lib " | sed 's/.*=> //' || true)"
    if [ -z "$found" ]; then
        for d in "${dirs[@]}"; do
            if [ -e "$d/$lib" ]; then found="$d/$lib"; break; fi
        done
    fi
    # Resolved, so that the versions show (libnvrtc.so.13 -> libnvrtc.so.13.0.88).
    printf '%-20s %s\n' "$lib" "$(if [ -n "$found" ]; then readlink -f "$found"; else echo MISSING; fi)"
    [ -n "$found" ] || missing="${missing:-} $lib"
done
if [ -n "${missing:-}" ]; then
    echo "missing:$missing; a --features cuda binary cannot start without them" >&2
    exit 1
fi
LD_LIBRARY_PATH="$(IFS=:; echo "${dirs[*]:-}")"
export LD_LIBRARY_PATH

section "binaries"
if [ -f "$carry/gpu_tests.xz" ]; then
    echo "prebuilt in .gpu/ ($(cat "$carry/TOOLKIT" 2>/dev/null), compute cap $(cat "$carry/COMPUTE_CAP" 2>/dev/null))"
    if ! sha256sum --quiet -c "$carry/SOURCE" >/dev/null 2>&1; then
        echo ".gpu/ was built from other sources than these (.gpu/SOURCE): run" \
            "'scripts/gpu_h200.sh prepare' again and carry the new .gpu" >&2
        sha256sum --quiet -c "$carry/SOURCE" 2>&1 | head -n 5 >&2 || true
        exit 1
    fi
    bin="$(mktemp -d)"
    for name in lib_tests gpu_tests compare moe infer; do
        if command -v xz >/dev/null; then
            xz -dc "$carry/$name.xz" >"$bin/$name"
        else
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                "$carry/$name.xz" "$bin/$name"
        fi
        chmod +x "$bin/$name"
    done
elif command -v cargo >/dev/null && command -v nvcc >/dev/null; then
    # CUDA_HOME for cudarc's link search; the compute capability from the GPU itself.
    export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)}"
    export CARGO_TARGET_DIR=target/cuda-gpu
    echo "building with $(nvcc --version | grep -o 'release [0-9.]*'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    json="$(mktemp)"
    cargo test --release --features cuda --offline --no-run --message-format=json >"$json"
    cargo bench --features cuda --offline --bench compare --no-run --message-format=json >>"$json"
    cargo bench --features cuda --offline --bench moe --no-run --message-format=json >>"$json"
    bin="$(mktemp -d)"
    # By cargo's own account of what it built (a name prefix matched tests/moe.rs for the bench).
    for spec in "lib_tests deps/candle_glu-[0-9a-f]*" "gpu_tests deps/gpu-[0-9a-f]*" \
        "compare deps/compare-[0-9a-f]*" "moe deps/moe-[0-9a-f]*" "infer examples/infer"; do
        read -r name pattern <<<"$spec"
        exe="$(pick "$pattern")"
        [ -n "$exe" ] || { echo "no executable for $name" >&2; exit 1; }
        cp "$exe" "$bin/$name"
    done
else
    echo "no .gpu/ binaries and no cargo + nvcc to build them: run 'scripts/gpu_h200.sh prepare'" \
        "on a build machine and carry .gpu" >&2
    exit 1
fi

status=0
# The tests read the fixtures under the repository, wherever it is now.
export CARGO_MANIFEST_DIR="$repo"
export CANDLE_GLU_REQUIRE_GPU=1

section "unit tests (NVRTC compiles gated.cu, strided walks)"
# (A filter that matches nothing passes: the count must not be 0.)
out="$(timeout "$(budget 300)" "$bin/lib_tests" --test-threads 4 nvrtc strided 2>&1)" || status=1
echo "$out"
grep -q "test result: ok. [1-9][0-9]* passed" <<<"$out" || status=1

section "GPU tests (tests/gpu.rs)"
timeout "$(budget 300)" "$bin/gpu_tests" --nocapture --test-threads 1 2>&1 || status=1

section "the CLI on the GPU"
timeout "$(budget 120)" "$bin/infer" --weights "$repo/weights" --device cuda --dtype bf16 --tokens 128 \
    --bench 20 || status=1
timeout "$(budget 60)" "$bin/infer" --weights "$repo/weights" --device auto --json || status=1

section "7B FFN (hidden 4096, intermediate 11008), bf16, ours vs naive candle MLP"
json_out="${OUT:-/tmp}/bench.json"
timeout "$(budget 300)" "$bin/compare" --device cuda --shape 7b --dtype bf16 --tokens 1,128,2048 \
    --rounds 30 --json "$json_out" || status=1

section "mixtures of experts: Qwen3-30B-A3B's and Mixtral-8x7B's layers, ours vs candle-transformers' loop"
timeout "$(budget 300)" "$bin/moe" --device cuda --shape qwen3,mixtral --dtype bf16 --tokens 1,16,128,512 \
    --rounds 3 || status=1
timeout "$(budget 200)" "$bin/moe" --device cuda --shape qwen3 --dtype q4k --tokens 1,16,128 --rounds 3 ||
    status=1

section "done, status $status"
exit "$status"
