#!/usr/bin/env bash
# Prints the CPU kernels that candle_glu::cpu_kernels() should report on this machine, as its
# `Display` writes them (e.g. `avx512 (int8: vnni)`), from /proc/cpuinfo and the rule in
# src/kernels/detect.rs; nothing where the crate's kernels do not run. CI sets
# CANDLE_GLU_REQUIRE_KERNELS to this, so that the tests fail if other kernels ran.
#
#   scripts/expected_kernels.sh              # what `auto` takes (CANDLE_GLU_KERNELS unset)
#   scripts/expected_kernels.sh avx512-bf16  # what that forced set gives here, or nothing
set -euo pipefail
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
vendor=$(grep -m1 '^vendor_id' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
[ "$(uname -m)" = x86_64 ] || exit 0 # no kernels on this architecture
if ! { has avx512f && has avx512bw && has avx512vl && has fma && has f16c; }; then
  exit 0
fi
auto=avx512
if has amx_tile && has amx_bf16 && has avx512_bf16 && has avx512_vnni; then
  # The flags mean the CPU has AMX and the kernel enables its state; Linux grants it to every
  # process that asks (arch_prctl), as the crate does. The crate's `amx` set also needs
  # AVX512-BF16 and VNNI, which every AMX CPU has (a VM may hide them).
  auto=amx
elif has avx512_bf16 && [[ "$vendor" == *AuthenticAMD* ]]; then
  auto=avx512-bf16
fi
wanted=$(echo "${1:-auto}" | tr '[:upper:]' '[:lower:]' | tr -d '[:space:]')
case "$wanted" in
  auto | "") set_name=$auto ;;
  avx512) set_name=avx512 ;;
  avx512-bf16) if has avx512_bf16; then set_name=avx512-bf16; else exit 0; fi ;;
  amx) if [ "$auto" = amx ]; then set_name=amx; else exit 0; fi ;;
  *) exit 0 ;; # candle, or a value the crate reads as auto: not what this script is for
esac
int8=candle
has avx512_vnni && int8=vnni
echo "$set_name (int8: $int8)"
