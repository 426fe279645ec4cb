//! AVX-512 micro-kernels: loads and stores of every element type, the row encodings the
//! f32 kernels and the AMX tiles' packing read (dense rows; GGUF Q4_1, q8_0 and q4k blocks,
//! decoded as GGUF decodes them), σ in f32, and the matmul micro-kernels
//! (f32 FMA and bf16 dot-product tiles for the packed schedule, row dot products for the dot
//! schedule).
//!
//! # Safety
//! Every function here is `unsafe` with one contract: the caller has checked
//! [`features`](crate::kernels::detect::features) (AVX-512 F, BW, VL, FMA and F16C, and
//! AVX512-BF16 for [`dp_kernel`]) and passes pointers valid for the lengths the doc comments
//! give. Each has a plain twin that the tests compare it with.

use std::arch::x86_64::*;

use candle_core::DType;

use super::element::Element;
use super::vnni::{Kind, Q4K_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK, QK_K};
use crate::Activation;

/// Loads 16 elements as f32.
#[inline(always)]
pub(crate) unsafe fn load16<T: Element>(p: *const T) -> __m512 {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm512_loadu_ps(p as *const f32),
            DType::BF16 => {
                let v = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
            }
            _ => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        }
    }
}

/// Loads the first `mask.count_ones()` of 16 elements as f32, zeros elsewhere; reads nothing
/// past them.
#[inline(always)]
pub(crate) unsafe fn load16_mask<T: Element>(p: *const T, mask: __mmask16) -> __m512 {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm512_maskz_loadu_ps(mask, p as *const f32),
            DType::BF16 => {
                let v = _mm256_maskz_loadu_epi16(mask, p as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
            }
            _ => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
        }
    }
}

/// f32 → bf16 bits, round to nearest even, NaN kept a (quiet) NaN.
#[inline(always)]
unsafe fn to_bf16_bits(v: __m512) -> __m256i {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
        let out = _mm512_mask_blend_epi32(nan, rounded, quiet);
        _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(out))
    }
}

/// Stores 16 f32 as elements, rounding to nearest even.
#[inline(always)]
pub(crate) unsafe fn store16<T: Element>(p: *mut T, v: __m512) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm512_storeu_ps(p as *mut f32, v),
            DType::BF16 => _mm256_storeu_si256(p as *mut __m256i, to_bf16_bits(v)),
            _ => _mm256_storeu_si256(
                p as *mut __m256i,
                _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
            ),
        }
    }
}

/// Stores the first `mask.count_ones()` of 16 f32 as elements; writes nothing past them.
#[inline(always)]
pub(crate) unsafe fn store16_mask<T: Element>(p: *mut T, v: __m512, mask: __mmask16) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm512_mask_storeu_ps(p as *mut f32, mask, v),
            DType::BF16 => _mm256_mask_storeu_epi16(p as *mut i16, mask, to_bf16_bits(v)),
            _ => _mm256_mask_storeu_epi16(
                p as *mut i16,
                mask,
                _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
            ),
        }
    }
}

/// The mask of the first `n` (≤ 16) lanes.
#[inline(always)]
pub(crate) fn tail_mask(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

/// How a weight matrix's rows are encoded: the kernels read 16 values at a time, as f32.
pub(crate) trait Encoding: Copy + Send + Sync + 'static {
    /// The bytes of one row of `k` values; also the offset of value `k` in a row, for `k` a
    /// multiple of the encoding's block (32 values; 256 for q4k).
    fn row_bytes(k: usize) -> usize;
    /// Where value `i` (a multiple of 32) lies in a row, in bytes, or near it (for prefetching):
    /// [`Self::row_bytes`] where blocks hold 32 values.
    fn byte_offset(i: usize) -> usize {
        Self::row_bytes(i)
    }
    /// Values `[i, i + 16)` of the row at `row`, as f32; `i` is a multiple of 16.
    unsafe fn load16(row: *const u8, i: usize) -> __m512;
    /// Values `[i, i + n)`, zeros after; `n < 16`; reads nothing past them.
    unsafe fn load16_tail(row: *const u8, i: usize, n: usize) -> __m512;

    /// Values `[i, i + 32)` as f32, two vectors (`i` a multiple of 32; the row holds them).
    /// Encodings with 32-value blocks decode the block's header once here.
    #[inline(always)]
    unsafe fn load32(row: *const u8, i: usize) -> [__m512; 2] {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe { [Self::load16(row, i), Self::load16(row, i + 16)] }
    }

    /// Values that share one header ([`Self::load256`] decodes 256 at once where it is 256).
    const HEADER_VALUES: usize = 32;
    /// Values `[i, i + 256)` as f32, 32 a step (`i` a multiple of 256; the row holds them):
    /// what eight [`Self::load32`] give, with a q4k super-block's header decoded once.
    #[inline(always)]
    unsafe fn load256(row: *const u8, i: usize) -> [[__m512; 2]; 8] {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let mut out = [[_mm512_setzero_ps(); 2]; 8];
            for (s, out) in out.iter_mut().enumerate() {
                *out = Self::load32(row, i + 32 * s);
            }
            out
        }
    }

    /// Whether, over many tokens, rows are better decoded to f32 once per chunk than on every
    /// pass over the tokens: true where decoding costs more than reading f32 from L1 (Q4_1).
    const WIDEN: bool = false;
    /// Whether the rows are bf16 as the tiles take them, so that the tiled schedule may read
    /// them in place (dense bf16 only).
    const TILE_ROWS: bool = false;
    /// `out[t][r] = Σ x[t]·w[r]`, as [`dot_kernel`] (`ahead`: as there).
    #[inline(always)]
    unsafe fn dot<const R: usize, const TT: usize>(
        k: usize,
        w: [*const u8; R],
        ahead: usize,
        x: *const f32,
        ldx: usize,
        out: &mut [[f32; R]; TT],
    ) {
        // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
        // the CPU features and passes pointers valid for the lengths documented here.
        unsafe { dot_kernel::<Self, R, TT>(k, w, ahead, x, ldx, out) }
    }
}

/// Values `[i, i + n)` of a row as f32, two vectors (zeros past `n ≤ 32`; `i` a multiple of
/// 32): [`Encoding::load32`] for whole steps, the tails masked. Reads nothing past them.
#[inline(always)]
pub(crate) unsafe fn load32_f32<E: Encoding>(row: *const u8, i: usize, n: usize) -> [__m512; 2] {
    // SAFETY: the module's contract (`# Safety` above) is this function's.
    // (No closures here: they would not inherit the caller's target features.)
    unsafe {
        if n == 32 {
            E::load32(row, i)
        } else if n > 16 {
            [E::load16(row, i), E::load16_tail(row, i + 16, n - 16)]
        } else {
            [E::load16_tail(row, i, n), _mm512_setzero_ps()]
        }
    }
}

/// Values `[0, n)` of dense `T` at `p` as bf16 bits (32 lanes, zeros past `n ≤ 32`): bf16 as
/// it is, others rounded to nearest even. Reads nothing past them.
#[inline(always)]
pub(crate) unsafe fn load32_bf16<T: Element>(p: *const T, n: usize) -> __m512i {
    // SAFETY: the module's contract (`# Safety` above) is this function's.
    unsafe {
        if T::DTYPE == DType::BF16 {
            let mask = (((1u64 << n) - 1) & 0xffff_ffff) as __mmask32;
            _mm512_maskz_loadu_epi16(mask, p as *const i16)
        } else {
            let [lo, hi] = load32_f32::<Dense<T>>(p as *const u8, 0, n);
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(to_bf16_bits(lo)), to_bf16_bits(hi))
        }
    }
}

/// Plain rows of `T`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dense<T>(std::marker::PhantomData<T>);

impl<T: Element> Encoding for Dense<T> {
    const TILE_ROWS: bool = matches!(T::DTYPE, DType::BF16);
    fn row_bytes(k: usize) -> usize {
        k * std::mem::size_of::<T>()
    }
    #[inline(always)]
    unsafe fn load16(row: *const u8, i: usize) -> __m512 {
        // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
        // the CPU features and passes pointers valid for the lengths documented here.
        unsafe { load16((row as *const T).add(i)) }
    }
    #[inline(always)]
    unsafe fn load16_tail(row: *const u8, i: usize, n: usize) -> __m512 {
        // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
        // the CPU features and passes pointers valid for the lengths documented here.
        unsafe { load16_mask((row as *const T).add(i), tail_mask(n)) }
    }
}

/// GGUF's Q4_1: blocks of 32 values, each an f16 scale `d`, an f16 minimum `m` and 16 bytes of
/// 4-bit codes `q` (value `j` in the low nibble of byte `j`, value `16 + j` in its high nibble);
/// a value is `d·q + m`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q4_1;

/// Bytes of one Q4_1 block.
pub(crate) const Q4_1_BLOCK_BYTES: usize = 20;

impl Q4_1 {
    /// The block holding value `i` of a row: its scale `d` and minimum `m` (broadcast), and its
    /// 16 code bytes widened to 32 bits (values `j` and `16 + j` in the low and high nibble).
    #[inline(always)]
    unsafe fn block(row: *const u8, i: usize) -> (__m512, __m512, __m512i) {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let block = row.add(i / 32 * Q4_1_BLOCK_BYTES);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
            let d = _mm512_broadcastss_ps(dm);
            let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
            let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(block.add(4) as *const __m128i));
            (d, m, codes)
        }
    }
}

impl Encoding for Q4_1 {
    const WIDEN: bool = true;
    fn row_bytes(k: usize) -> usize {
        k / 32 * Q4_1_BLOCK_BYTES
    }
    #[inline(always)]
    unsafe fn load16(row: *const u8, i: usize) -> __m512 {
        // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
        // the CPU features and passes pointers valid for the lengths documented here.
        unsafe {
            let (d, m, codes) = Self::block(row, i);
            let q = if i.is_multiple_of(32) {
                _mm512_and_si512(codes, _mm512_set1_epi32(0xf))
            } else {
                _mm512_srli_epi32::<4>(codes)
            };
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d, m)
        }
    }
    #[inline(always)]
    unsafe fn load32(row: *const u8, i: usize) -> [__m512; 2] {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let (d, m, codes) = Self::block(row, i);
            let lo = _mm512_and_si512(codes, _mm512_set1_epi32(0xf));
            let hi = _mm512_srli_epi32::<4>(codes);
            [
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m),
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load16_tail(row: *const u8, i: usize, n: usize) -> __m512 {
        // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
        // the CPU features and passes pointers valid for the lengths documented here.
        unsafe {
            // Rows are whole blocks, so a tail never starts here; keep the contract anyway.
            _mm512_maskz_mov_ps(tail_mask(n), Self::load16(row, i))
        }
    }

    #[inline(always)]
    unsafe fn dot<const R: usize, const TT: usize>(
        k: usize,
        w: [*const u8; R],
        ahead: usize,
        x: *const f32,
        ldx: usize,
        out: &mut [[f32; R]; TT],
    ) {
        // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
        // the CPU features and passes pointers valid for the lengths documented here.
        unsafe { dot_kernel_q4_1::<R, TT>(k, w, ahead, x, ldx, out) }
    }
}

/// GGUF's q8_0: blocks of 32 values, each an f16 scale `d` and 32 signed codes `q`; a value is
/// `d·q`. (The VNNI kernels read these blocks in integers; this decodes them to f32, for the
/// AMX tiles' bf16 operands.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8_0;

impl Encoding for Q8_0 {
    fn row_bytes(k: usize) -> usize {
        Kind::Q8_0.row_bytes(k)
    }
    #[inline(always)]
    unsafe fn load16(row: *const u8, i: usize) -> __m512 {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let block = row.add(i / QK * Q8_0_BLOCK_BYTES);
            let d = f16_at(block);
            let codes = _mm_loadu_si128(block.add(2 + i % QK) as *const __m128i);
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), d)
        }
    }
    #[inline(always)]
    unsafe fn load32(row: *const u8, i: usize) -> [__m512; 2] {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let block = row.add(i / QK * Q8_0_BLOCK_BYTES);
            let d = f16_at(block);
            let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(2) as *const __m128i));
            let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(18) as *const __m128i));
            [
                _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load16_tail(row: *const u8, i: usize, n: usize) -> __m512 {
        // SAFETY: rows are whole blocks: a tail reads inside its block.
        unsafe { _mm512_maskz_mov_ps(tail_mask(n), Self::load16(row, i)) }
    }
}

/// GGUF's q4k ("Q4_K"): super-blocks of 256 values in 8 sub-blocks of 32, each with a 6-bit
/// scale `sc[j]` and minimum `m[j]` under the super-block's f16 `d` and `dmin`; a value is
/// `(d·sc[j])·q − dmin·m[j]`, as GGUF (and candle) decode it. Decoded to f32 for the AMX tiles.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q4K;

impl Q4K {
    /// Sub-block `j`'s 6-bit scale and minimum from the super-block's 12 packed bytes.
    #[inline(always)]
    fn scale_min(packed: &[u8; 12], j: usize) -> (u8, u8) {
        if j < 4 {
            (packed[j] & 63, packed[j + 4] & 63)
        } else {
            (
                (packed[j + 4] & 0xf) | ((packed[j - 4] >> 6) << 4),
                (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
            )
        }
    }

    /// The sub-block holding value `i` of a row: its scale `d·sc[j]`, its minimum `dmin·m[j]`
    /// (both broadcast), its 32 bytes of codes, and whether its codes are the high nibbles.
    #[inline(always)]
    unsafe fn sub_block(row: *const u8, i: usize) -> (__m512, __m512, *const u8, bool) {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let block = row.add(i / QK_K * Q4K_BLOCK_BYTES);
            let (d, dmin) = (f16_at(block), f16_at(block.add(2)));
            Self::sub_block_of(block, d, dmin, i % QK_K / QK)
        }
    }

    /// [`Self::sub_block`] for sub-block `j` of the super-block at `block`, whose `d` and
    /// `dmin` (broadcast) are read already.
    #[inline(always)]
    unsafe fn sub_block_of(
        block: *const u8,
        d: __m512,
        dmin: __m512,
        j: usize,
    ) -> (__m512, __m512, *const u8, bool) {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let (sc, m) = Self::scale_min(&*(block.add(4) as *const [u8; 12]), j);
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(f32::from(sc)));
            let min = _mm512_mul_ps(dmin, _mm512_set1_ps(f32::from(m)));
            // Sub-blocks 2c and 2c + 1 share 32 bytes of codes: low nibbles, then high.
            (scale, min, block.add(16 + 32 * (j / 2)), j % 2 == 1)
        }
    }

    /// 16 values from 16 bytes of codes at `at`: `scale·q − min`, in two roundings as GGUF's
    /// own decoding (bit-identical to candle's dequantization).
    #[inline(always)]
    unsafe fn decode16(at: *const u8, high: bool, scale: __m512, min: __m512) -> __m512 {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(at as *const __m128i));
            let q = if high {
                _mm512_srli_epi32::<4>(codes)
            } else {
                _mm512_and_si512(codes, _mm512_set1_epi32(0xf))
            };
            _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), scale), min)
        }
    }
}

impl Encoding for Q4K {
    fn row_bytes(k: usize) -> usize {
        Kind::Q4K.row_bytes(k)
    }
    fn byte_offset(i: usize) -> usize {
        // The codes of sub-blocks 2c and 2c + 1 (32 bytes) follow the 16-byte header.
        i / QK_K * Q4K_BLOCK_BYTES + 16 + i % QK_K / 64 * 32
    }
    #[inline(always)]
    unsafe fn load16(row: *const u8, i: usize) -> __m512 {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let (scale, min, codes, high) = Self::sub_block(row, i);
            Self::decode16(codes.add(i % QK), high, scale, min)
        }
    }
    #[inline(always)]
    unsafe fn load32(row: *const u8, i: usize) -> [__m512; 2] {
        // SAFETY: the module's contract (`# Safety` above) is this function's.
        unsafe {
            let (scale, min, codes, high) = Self::sub_block(row, i);
            [
                Self::decode16(codes, high, scale, min),
                Self::decode16(codes.add(16), high, scale, min),
            ]
        }
    }
    #[inline(always)]
    unsafe fn load16_tail(row: *const u8, i: usize, n: usize) -> __m512 {
        // SAFETY: rows are whole super-blocks: a tail reads inside its block.
        unsafe { _mm512_maskz_mov_ps(tail_mask(n), Self::load16(row, i)) }
    }
    const HEADER_VALUES: usize = QK_K;
    #[inline(always)]
    unsafe fn load256(row: *const u8, i: usize) -> [[__m512; 2]; 8] {
        // SAFETY: the module's contract (`# Safety` above) is this function's; `i` starts a
        // super-block, which the row holds whole.
        unsafe {
            let block = row.add(i / QK_K * Q4K_BLOCK_BYTES);
            let (d, dmin) = (f16_at(block), f16_at(block.add(2)));
            let mut out = [[_mm512_setzero_ps(); 2]; 8];
            for (j, out) in out.iter_mut().enumerate() {
                let (scale, min, codes, high) = Self::sub_block_of(block, d, dmin, j);
                *out = [
                    Self::decode16(codes, high, scale, min),
                    Self::decode16(codes.add(16), high, scale, min),
                ];
            }
            out
        }
    }
}

/// The f16 at `p`, widened and broadcast.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> __m512 {
    // SAFETY: the module's contract (`# Safety` above) is this function's.
    unsafe {
        let h = (p as *const u16).read_unaligned();
        _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
    }
}

/// [`dot_kernel`] for [`Q4_1`] rows, with each block's scale, minimum and codes unpacked once
/// per block rather than once per 16 values. Values are still `d·q + m` rounded to f32 and
/// summed in the same order, so the sums are bit-identical to those over the f32 dequantization.
/// It prefetches into L2 as [`dot_kernel`] does (one token of the 7B FFN 0.80× the time with
/// that prefetch, 3 tokens 0.85×, on an AMD Zen 4); past six tokens the schedule widens the
/// rows to f32 a chunk at a time instead, without it.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn dot_kernel_q4_1<const R: usize, const TT: usize>(
    k: usize,
    w: [*const u8; R],
    ahead: usize,
    x: *const f32,
    ldx: usize,
    out: &mut [[f32; R]; TT],
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let lead = lead(ahead);
        let mut acc = [[_mm512_setzero_ps(); R]; TT];
        for b in 0..k / 32 {
            if b % 2 == 0 {
                for row in &w {
                    _mm_prefetch::<_MM_HINT_T0>(
                        row.wrapping_add(b * Q4_1_BLOCK_BYTES + PREFETCH_BYTES) as *const i8,
                    );
                }
                if lead > 0 {
                    for row in &w {
                        prefetch_l2(
                            row.wrapping_add(b * Q4_1_BLOCK_BYTES),
                            2 * Q4_1_BLOCK_BYTES,
                            lead,
                        );
                    }
                }
            }
            let mut xv = [[_mm512_setzero_ps(); 2]; TT];
            for (t, v) in xv.iter_mut().enumerate() {
                let xt = x.add(t * ldx + 32 * b);
                *v = [_mm512_loadu_ps(xt), _mm512_loadu_ps(xt.add(16))];
            }
            for (r, row) in w.iter().enumerate() {
                let [wl, wh] = Q4_1::load32(*row, 32 * b);
                for (a, [xl, xh]) in acc.iter_mut().zip(&xv) {
                    a[r] = _mm512_fmadd_ps(*xh, wh, _mm512_fmadd_ps(*xl, wl, a[r]));
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, a) in o.iter_mut().zip(a) {
                *o = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

/// e^x in f32, to about 2 ulp: 2^n · p(r) with x = n·ln2 + r, |r| ≤ ln2/2 (Cephes' expf
/// polynomial). Saturates to 0 and +inf; NaN stays NaN.
#[inline(always)]
unsafe fn exp(x: __m512) -> __m512 {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        // min/max return their second operand for NaN, so NaN passes through.
        let x = _mm512_max_ps(
            _mm512_set1_ps(-104.0),
            _mm512_min_ps(_mm512_set1_ps(89.0), x),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(p, n)
    }
}

/// `x / (1 + e^(-s·x))`: x·sigmoid(s·x).
#[inline(always)]
unsafe fn x_sigmoid(x: __m512, s: f32) -> __m512 {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let e = exp(_mm512_mul_ps(x, _mm512_set1_ps(-s)));
        _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
    }
}

/// Φ(x), the standard normal CDF, as ½·erfc(-x/√2) with Numerical Recipes' erfc (relative
/// error below 1.2e-7 for every x in exact arithmetic, so the left tail keeps its digits; in
/// f32 the rounding of z = |x|/√2 and of the exponent adds about z²·2⁻²³: 4e-6 at x = -8).
// The coefficients are Numerical Recipes' as published; f32 rounds them.
#[allow(clippy::excessive_precision)]
#[inline(always)]
unsafe fn normal_cdf(x: __m512) -> __m512 {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let z = _mm512_abs_ps(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
        ));
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.5), z, one));
        let mut p = _mm512_set1_ps(0.170_872_77);
        for c in [
            -0.822_152_23,
            1.488_515_87,
            -1.135_203_98,
            0.278_868_07,
            -0.186_288_06,
            0.096_784_18,
            0.374_091_96,
            1.000_023_68,
            -1.265_512_23,
        ] {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
        }
        // erfc(z) = t·exp(-z² + p(t))
        let erfc = _mm512_mul_ps(t, exp(_mm512_fnmadd_ps(z, z, p)));
        let half = _mm512_mul_ps(erfc, _mm512_set1_ps(0.5));
        let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, half), half)
    }
}

/// σ(x) for every activation, in f32.
#[inline(always)]
pub(crate) unsafe fn activation(act: Activation, x: __m512) -> __m512 {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        match act {
            Activation::Sigmoid => {
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), x));
                _mm512_div_ps(_mm512_set1_ps(1.0), _mm512_add_ps(_mm512_set1_ps(1.0), e))
            }
            Activation::Identity => x,
            // max returns its second operand for NaN: NaN stays NaN, as in PyTorch.
            Activation::Relu => _mm512_max_ps(_mm512_setzero_ps(), x),
            Activation::Gelu => _mm512_mul_ps(x, normal_cdf(x)),
            Activation::GeluTanh => {
                // ½x(1 + tanh(u)) = x·sigmoid(2u), u = √(2/π)(x + 0.044715x³): no cancellation.
                const C: f32 = 0.797_884_6; // √(2/π)
                let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
                let u = _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044_715), x);
                let e = exp(_mm512_mul_ps(u, _mm512_set1_ps(-2.0 * C)));
                _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
            }
            // Swish-β: SiLU, swish(β), quick_gelu.
            Activation::Silu | Activation::Swish { .. } | Activation::QuickGelu => {
                x_sigmoid(x, act.swish_beta().unwrap_or(1.0) as f32)
            }
        }
    }
}

/// `out[i] = σ(gate[i]) · up[i]` over `n` f32 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn gated<T: Element, U: Element>(
    act: Activation,
    gate: *const T,
    up: *const T,
    out: *mut U,
    n: usize,
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut i = 0;
        while i + 16 <= n {
            let g = activation(act, load16(gate.add(i)));
            store16(out.add(i), _mm512_mul_ps(g, load16(up.add(i))));
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            let g = activation(act, load16_mask(gate.add(i), m));
            store16_mask(out.add(i), _mm512_mul_ps(g, load16_mask(up.add(i), m)), m);
        }
    }
}

/// The FMA micro-kernel: `C[r][0..32] (+)= Σ_k x[k][r] · w[k][0..32]` for `MR` rows.
///
/// - `xp`: `kc × MR` f32, row `k` holding the `MR` rows' k-th values;
/// - `wp`: `kc × 32` f32, the panel's 32 columns at each k;
/// - `c`: `MR` rows of 32 f32, `ldc` apart; overwritten if `first`, else accumulated into.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn fma_kernel<const MR: usize>(
    kc: usize,
    xp: *const f32,
    wp: *const f32,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if !first {
            for (r, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_loadu_ps(c.add(r * ldc));
                a[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
            }
        }
        for k in 0..kc {
            let w0 = _mm512_loadu_ps(wp.add(k * 32));
            let w1 = _mm512_loadu_ps(wp.add(k * 32 + 16));
            let x = xp.add(k * MR);
            for (r, a) in acc.iter_mut().enumerate() {
                let xr = _mm512_set1_ps(*x.add(r));
                a[0] = _mm512_fmadd_ps(xr, w0, a[0]);
                a[1] = _mm512_fmadd_ps(xr, w1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), a[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), a[1]);
        }
    }
}

/// The bf16 dot-product micro-kernel (VDPBF16PS): like [`fma_kernel`], over k in pairs.
///
/// - `xp`: `kp × MR` u32, each two bf16 (k even in the low half, k odd in the high half);
/// - `wp`: `kp × 32 × 2` bf16 bits: at each k-pair, the 32 columns' (k even, k odd) pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c,avx512bf16")]
pub(crate) unsafe fn dp_kernel<const MR: usize>(
    kp: usize,
    xp: *const u32,
    wp: *const u16,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if !first {
            for (r, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_loadu_ps(c.add(r * ldc));
                a[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
            }
        }
        for k in 0..kp {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(k * 64) as *const _));
            let w1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(wp.add(k * 64 + 32) as *const _));
            let x = xp.add(k * MR);
            for (r, a) in acc.iter_mut().enumerate() {
                let xr: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(r) as i32));
                a[0] = _mm512_dpbf16_ps(a[0], xr, w0);
                a[1] = _mm512_dpbf16_ps(a[1], xr, w1);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), a[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), a[1]);
        }
    }
}

/// How far ahead of the loads the decode kernel prefetches each weight row into L1.
const PREFETCH_BYTES: usize = 1024;
/// At least how far ahead the decode kernels (dense, Q4_1's exact one, and q4k's) prefetch
/// into L2: the same values of the rows some calls later (whole calls, [`lead`]). Eight rows
/// read in lockstep are eight short streams, which the hardware prefetchers follow late. On an
/// AMD EPYC Zen 4 (2 threads, alternating in one process), with it one token of a 7B FFN in
/// bf16 (4096 → 11008) took 0.73–0.80× the time, in f32 0.97–0.99×; SmolLM2's shape (576 →
/// 1536, rows of 1.1 and 3 KiB) in bf16 0.47–0.51×; Qwen3-MoE's layer (each expert's rows on
/// one thread) 0.69–0.70× in bf16 and 0.87–0.91× in f32. 8 and 32 KiB did no better. For q4k,
/// whose rows are shorter still (a Qwen3-MoE expert's: 3.4 and 4.5 KiB a call), the layer took
/// 0.86–0.92× the time against one call ahead, and 7B decode 0.94–1.02× (noise); q8_0, with
/// twice the bytes a call, gained nothing over one call ahead and keeps that.
pub(crate) const LEAD_BYTES: usize = 16 << 10;

/// The distance of the L2 prefetches for calls whose rows are `ahead` bytes apart: whole
/// calls, at least [`LEAD_BYTES`] (0 for 0: nothing to fetch).
#[inline(always)]
pub(crate) fn lead(ahead: usize) -> usize {
    if ahead == 0 {
        0
    } else {
        ahead * LEAD_BYTES.div_ceil(ahead)
    }
}

/// Prefetches into L2 the lines of the `bytes` bytes at `ahead` bytes past `p` (into L2, not
/// L1: where the rows are read in order, the hardware prefetchers bring them on to L1 in time).
/// Callers pass constant `bytes`, so that the loop unrolls. A prefetch reads nothing the program
/// sees and never faults, whatever the address.
#[inline(always)]
pub(crate) fn prefetch_l2(p: *const u8, bytes: usize, ahead: usize) {
    for line in 0..bytes.div_ceil(64) {
        // SAFETY: a prefetch never faults (above); SSE, which it needs, is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(ahead + 64 * line) as *const i8) };
    }
}

/// Dot products for few tokens, straight from the weights' own `[out, in]` rows:
/// `out[t][r] = Σ_k x[t][k] · w[r][k]` for `R` weight rows and `TT` tokens, over `k` values.
///
/// `x` rows are f32, `ldx` apart; weight rows are in encoding `E`, given by pointer. `ahead`:
/// how many bytes past each row the same row of the caller's next call starts, for the L2
/// prefetch ([`LEAD_BYTES`]); 0 where there is nothing to fetch (rows already in cache). The
/// rows that far ahead need not exist: they are only prefetched, which never faults.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn dot_kernel<E: Encoding, const R: usize, const TT: usize>(
    k: usize,
    w: [*const u8; R],
    ahead: usize,
    x: *const f32,
    ldx: usize,
    out: &mut [[f32; R]; TT],
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let lead = lead(ahead);
        let mut acc = [[_mm512_setzero_ps(); R]; TT];
        let mut i = 0;
        while i < k {
            let n = (k - i).min(16);
            if i % 32 == 0 {
                // Software prefetch a little ahead on every row: the hardware prefetcher alone does
                // not keep R streams per core busy enough to saturate memory.
                for row in &w {
                    _mm_prefetch::<_MM_HINT_T0>(
                        row.wrapping_add(E::byte_offset(i) + PREFETCH_BYTES) as *const i8,
                    );
                }
                if lead > 0 {
                    // The bytes of 32 values (128 for f32: two lines).
                    let bytes = E::row_bytes(256) / 8;
                    for row in &w {
                        prefetch_l2(row.wrapping_add(E::byte_offset(i)), bytes, lead);
                    }
                }
            }
            let mut wv = [_mm512_setzero_ps(); R];
            for (v, row) in wv.iter_mut().zip(&w) {
                *v = if n == 16 {
                    E::load16(*row, i)
                } else {
                    E::load16_tail(*row, i, n)
                };
            }
            for (t, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(tail_mask(n), x.add(t * ldx + i));
                for (a, v) in a.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
            i += 16;
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, a) in o.iter_mut().zip(a) {
                *o = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

/// `dst[i] += src[i]`, for `n` f32 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn add_assign(dst: *mut f32, src: *const f32, n: usize) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut i = 0;
        while i < n {
            let m = tail_mask(n - i);
            let v = _mm512_add_ps(
                _mm512_maskz_loadu_ps(m, dst.add(i)),
                _mm512_maskz_loadu_ps(m, src.add(i)),
            );
            _mm512_mask_storeu_ps(dst.add(i), m, v);
            i += 16;
        }
    }
}

/// `dst[i] = src[i]` as f32, for `n` values (`T` rows of any length).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn widen<T: Element>(src: *const T, dst: *mut f32, n: usize) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(dst.add(i), load16(src.add(i)));
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            _mm512_mask_storeu_ps(dst.add(i), m, load16_mask(src.add(i), m));
        }
    }
}

/// The first `n` values of a row in encoding `E`, as f32 into `dst`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn widen_row<E: Encoding>(row: *const u8, dst: *mut f32, n: usize) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(dst.add(i), E::load16(row, i));
            i += 16;
        }
        if i < n {
            _mm512_mask_storeu_ps(dst.add(i), tail_mask(n - i), E::load16_tail(row, i, n - i));
        }
    }
}

/// `dst[i] = src[i]` rounded from f32, for `n` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn narrow<T: Element>(src: *const f32, dst: *mut T, n: usize) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut i = 0;
        while i + 16 <= n {
            store16(dst.add(i), _mm512_loadu_ps(src.add(i)));
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            store16_mask(dst.add(i), _mm512_maskz_loadu_ps(m, src.add(i)), m);
        }
    }
}

/// Transposes a 16 × 16 matrix of 32-bit lanes held in 16 registers.
#[inline(always)]
pub(crate) unsafe fn transpose16(r: &mut [__m512; 16]) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        // Stage 1: interleave 32-bit lanes of row pairs.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // Stage 2: interleave 64-bit pairs of row quads.
        for i in 0..4 {
            let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            r[4 * i] =
                _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
            r[4 * i + 1] =
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
            r[4 * i + 2] =
                _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
            r[4 * i + 3] =
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
        }
        // Stage 3: exchange 128-bit blocks between rows i and i + 4 of each half.
        for h in 0..2 {
            for i in 0..4 {
                let (a, b) = (r[8 * h + i], r[8 * h + i + 4]);
                t[8 * h + i] = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
                t[8 * h + i + 4] = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
            }
        }
        // Stage 4: exchange 128-bit blocks between the halves.
        for i in 0..8 {
            let (a, b) = (t[i], t[i + 8]);
            r[i] = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
            r[i + 8] = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
        }
    }
}

/// Packs 16 weight rows' values `[k0, k0 + kc)` into `dst[kk * ld + (0..16)]` as f32: a
/// transpose, 16 × 16 at a time. `k0` is a multiple of 32. Rows that are `None` pack as zeros.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn pack16_f32<E: Encoding>(
    rows: &[Option<*const u8>; 16],
    k0: usize,
    kc: usize,
    dst: *mut f32,
    ld: usize,
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut kk = 0;
        while kk < kc {
            let n = (kc - kk).min(16);
            let mut r = [_mm512_setzero_ps(); 16];
            for (v, row) in r.iter_mut().zip(rows) {
                if let Some(p) = row {
                    *v = if n == 16 {
                        E::load16(*p, k0 + kk)
                    } else {
                        E::load16_tail(*p, k0 + kk, n)
                    };
                }
            }
            transpose16(&mut r);
            for (i, v) in r.iter().take(n).enumerate() {
                _mm512_storeu_ps(dst.add((kk + i) * ld), *v);
            }
            kk += 16;
        }
    }
}

/// Packs 16 rows' values `[0, kc)` as bf16 pairs (weight rows for the packed schedule, token
/// rows for the tiled one; bf16 rows as they are, others rounded to nearest even):
/// `dst[p * ld + 2·row + (0, 1)]` holds the row's values `2p` and `2p + 1` (zeros past `kc` and
/// for a missing row), for `p < ⌈kc / 2⌉`. `ld` counts u16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn pack16_pairs<T: Element>(
    rows: &[Option<*const T>; 16],
    kc: usize,
    dst: *mut u16,
    ld: usize,
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut kk = 0;
        while kk < kc {
            // 32 values (16 pairs) of each row per step.
            let n = (kc - kk).min(32);
            let mut r = [_mm512_setzero_ps(); 16];
            for (v, row) in r.iter_mut().zip(rows) {
                if let Some(p) = row {
                    *v = _mm512_castsi512_ps(load32_bf16(p.add(kk), n));
                }
            }
            transpose16(&mut r);
            for (i, v) in r.iter().take(n.div_ceil(2)).enumerate() {
                _mm512_storeu_ps(dst.add((kk / 2 + i) * ld) as *mut f32, *v);
            }
            kk += 32;
        }
    }
}

/// Packs up to 12 token rows (of `k` values) for the micro-kernels: `dst[kk * 12 + r] = x[r][kk]`
/// as f32, zeros for the rows past `rows.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn pack_tokens12<T: Element>(rows: &[*const T], k: usize, dst: *mut f32) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut kk = 0;
        while kk < k {
            let n = (k - kk).min(16);
            let mut r = [_mm512_setzero_ps(); 16];
            for (v, row) in r.iter_mut().zip(rows) {
                *v = load16_mask(row.add(kk), tail_mask(n));
            }
            transpose16(&mut r);
            for (i, v) in r.iter().take(n).enumerate() {
                _mm512_mask_storeu_ps(dst.add((kk + i) * 12), 0x0fff, *v);
            }
            kk += 16;
        }
    }
}

/// [`pack_tokens12`] for the bf16 dot-product kernel: `dst[p * 12 + r]` holds row `r`'s bf16
/// values `2p` and `2p + 1` as one u32 (zero past `k`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn pack_tokens12_pairs(rows: &[*const u16], k: usize, dst: *mut u32) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut kk = 0;
        while kk < k {
            let n = (k - kk).min(32);
            let m = (((1u64 << n) - 1) & 0xffff_ffff) as __mmask32;
            let mut r = [_mm512_setzero_ps(); 16];
            for (v, row) in r.iter_mut().zip(rows) {
                *v = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, row.add(kk) as *const i16));
            }
            transpose16(&mut r);
            for (i, v) in r.iter().take(n.div_ceil(2)).enumerate() {
                _mm512_mask_storeu_ps(dst.add((kk / 2 + i) * 12) as *mut f32, 0x0fff, *v);
            }
            kk += 32;
        }
    }
}
