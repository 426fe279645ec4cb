/*
 * Link-time stand-ins for the NVIDIA libraries that candle 0.11's cudarc links against
 * (`dynamic-linking`): the driver (libcuda.so.1), cuBLAS, cuBLASLt, cuRAND and NVRTC.
 *
 * They exist so that `cargo test --features cuda --no-run` links on a machine with no GPU and no
 * driver (CI). Every entry point fails: status-returning functions return STUB_STATUS (for the
 * driver, CUDA_ERROR_STUB_LIBRARY, as NVIDIA's own lib64/stubs/libcuda.so does), so a program
 * run against them reports "no CUDA device" instead of crashing. They are never meant to run
 * kernels: on a GPU machine the real libraries, with the same sonames, take their place.
 *
 * STUB_LIST names a file of STUB(name), STUB_SIZE(name), STUB_STR(name) and STUB_VOID(name)
 * lines that scripts/cuda_check.sh generates from cudarc's own declarations, so the symbols are
 * exactly those of the cudarc version in Cargo.lock. Arguments are ignored: on x86-64 and
 * aarch64 the caller owns them, so a function defined with none may be called with any.
 */
#include <stddef.h>

#ifndef STUB_STATUS
#error "define STUB_STATUS, the error code every status-returning entry point returns"
#endif
#ifndef STUB_LIST
#error "define STUB_LIST, the file listing the entry points"
#endif

#define STUB(name) int name(void) { return STUB_STATUS; }
#define STUB_SIZE(name) size_t name(void) { return 0; }
#define STUB_STR(name) const char *name(void) { return "stub library: no NVIDIA driver or GPU"; }
#define STUB_VOID(name) void name(void) {}

#include STUB_LIST
