#!/usr/bin/env bash
# Prints the CPU kernels that candle_glu::cpu_kernels() should report on this machine, as its
# `Display` writes them (e.g. `avx512 (int8: vnni)`), from /proc/cpuinfo and the rule in
# src/kernels/detect.rs; nothing where the crate's kernels do not run. CI sets
# CANDLE_GLU_REQUIRE_KERNELS to this, so that the tests fail if other kernels ran.
set -euo pipefail
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
vendor=$(grep -m1 '^vendor_id' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
if [ "${CANDLE_GLU_KERNELS:-auto}" != auto ] || [ "$(uname -m)" != x86_64 ]; then
  exit 0 # forced by hand, or no kernels on this architecture: nothing to require
fi
if ! { has avx512f && has avx512bw && has avx512vl && has fma && has f16c; }; then
  exit 0
fi
set_name=avx512
if has amx_tile && has amx_bf16; then
  # The flags mean the CPU has AMX and the kernel enables its state; Linux grants it to every
  # process that asks (arch_prctl), as the crate does.
  set_name=amx
elif has avx512_bf16 && [[ "$vendor" == *AuthenticAMD* ]]; then
  set_name=avx512-bf16
fi
int8=candle
has avx512_vnni && int8=vnni
echo "$set_name (int8: $int8)"
