# Sourced by scripts/cuda_check.sh and scripts/gpu_h200.sh: a CUDA toolkit and link-time
# stand-ins for the NVIDIA libraries, so that `--features cuda` builds and links on a machine with
# no GPU and no driver. Idempotent; everything lives under ~/.cache/candle-glu/cuda.
#
#   CANDLE_GLU_CUDA_TOOLKIT  PyPI `cuda-toolkit` version (default 13.4.3; candle 0.11.1's cudarc
#                            knows no CUDA newer than 13.4)
#   CUDA_COMPUTE_CAP         the GPU generation candle-kernels compiles for (default 90, Hopper)
#
# Exports CUDA_HOME, PATH, CUDA_COMPUTE_CAP, CANDLE_GLU_CUDA_LIBS (the folders a program built
# here needs on LD_LIBRARY_PATH to start without a driver: the toolkit's libs and the stubs) and
# CANDLE_GLU_CUDA_ROOT (the toolkit's folder, named by its version).

cuda_env_setup() {
    local version="${CANDLE_GLU_CUDA_TOOLKIT:-13.4.3}"
    local major="${version%%.*}"
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/candle-glu/cuda"
    local root="$cache/$version"
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

    # 1. nvcc, the CUDA headers and cudart, from PyPI (about 130 MB), into a folder of our own:
    #    the system's Python packages are left alone.
    if [ ! -x "$root/nvidia/cu$major/bin/nvcc" ]; then
        echo "cuda_env: installing cuda-toolkit[nvcc,cccl]==$version into $root" >&2
        rm -rf "$root.tmp"
        python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check \
            --root-user-action=ignore --no-warn-conflicts --target "$root.tmp" "cuda-toolkit[nvcc,cccl]==$version"
        rm -rf "$root"
        mv "$root.tmp" "$root"
    fi
    export CUDA_HOME="$root/nvidia/cu$major"
    export PATH="$CUDA_HOME/bin:$PATH"
    # Without it candle-kernels asks nvidia-smi, which a machine without a GPU lacks.
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    # candle-kernels links `-lcudart`; the wheel has only the versioned name.
    ln -sfn "libcudart.so.$major" "$CUDA_HOME/lib/libcudart.so"

    # 2. Link-time stand-ins for libcuda, cuBLAS, cuBLASLt, cuRAND and NVRTC, generated from the
    #    declarations of the cudarc that Cargo.lock picks, under the real sonames: a binary linked
    #    against them loads the real libraries on a GPU machine.
    # (In an `if`, so that a failing cargo or an empty grep reaches the message below rather
    # than ending the script silently under `set -e -o pipefail`; cargo's own errors are kept.)
    local cudarc=""
    if ! cudarc="$(cd "$repo" && cargo metadata --format-version 1 --features cuda \
        | grep -o '"manifest_path":"[^"]*/cudarc-[0-9][^"/]*/Cargo.toml"' | head -n 1 \
        | sed -e 's/^"manifest_path":"//' -e 's#/Cargo.toml"$##')"; then
        cudarc=""
    fi
    if [ -z "$cudarc" ] || [ ! -d "$cudarc/src" ]; then
        echo "cuda_env: cannot find cudarc's sources through cargo metadata" >&2
        return 1
    fi
    local stubs="$CUDA_HOME/lib/stubs"
    mkdir -p "$stubs"
    local spec lib module soname status
    for spec in "cuda driver libcuda.so.1 34" \
        "cublas cublas libcublas.so.$major 1" \
        "cublasLt cublaslt libcublasLt.so.$major 1" \
        "curand curand libcurand.so.10 203" \
        "nvrtc nvrtc libnvrtc.so.$major 11"; do
        read -r lib module soname status <<<"$spec"
        # One line per entry point, by what it returns: a status, a size, a string or nothing.
        awk '/^pub unsafe fn (cu|nvrtc)[A-Za-z0-9_]*\(/ {
                name = $4; sub(/\(.*/, "", name)
                if (name == "culib" || seen[name]++) next
                if ($0 ~ /-> \*const ::core::ffi::c_char \{$/) kind = "STUB_STR"
                else if ($0 ~ /-> usize \{$/) kind = "STUB_SIZE"
                else if ($0 !~ /\) ->/) kind = "STUB_VOID"
                else kind = "STUB"
                print kind "(" name ")"
            }' "$cudarc/src/$module/sys/mod.rs" >"$stubs/$lib.list.new"
        local stamp
        stamp="$(cat "$repo/scripts/cuda-stub/cuda_stub.c" "$stubs/$lib.list.new" | cksum) $soname $status"
        if [ ! -f "$stubs/$soname" ] || [ "$(cat "$stubs/$lib.stamp" 2>/dev/null)" != "$stamp" ]; then
            mv "$stubs/$lib.list.new" "$stubs/$lib.list"
            gcc -shared -fPIC -O1 -o "$stubs/$soname" -Wl,-soname,"$soname" \
                -DSTUB_STATUS="$status" -DSTUB_LIST="\"$stubs/$lib.list\"" \
                "$repo/scripts/cuda-stub/cuda_stub.c" || return 1
            echo "$stamp" >"$stubs/$lib.stamp"
        else
            rm -f "$stubs/$lib.list.new"
        fi
        ln -sfn "$soname" "$stubs/lib$lib.so"
    done
    export CANDLE_GLU_CUDA_LIBS="$CUDA_HOME/lib:$stubs"
    export CANDLE_GLU_CUDA_ROOT="$root"
}
