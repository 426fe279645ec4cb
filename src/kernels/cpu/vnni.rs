//! AVX512-VNNI building blocks for GGUF q8_0, q4k and Q4_1 weights, read in place.
//!
//! Activations are rounded to 8 bits in blocks of 32 values, each block with its own f32 scale
//! (as llama.cpp's q8_0 activations; finer than the 256-value blocks candle uses with these
//! weights), except for q4k ([`dot_q4k`], [`packed_kernel_q4k`]), which takes one scale per 256
//! values (as llama.cpp and candle do) so that only the weights' sub-block scales vary inside a
//! super-block (applied in integers for decode, in f32 per sub-block for prefill). Weights
//! and activations meet in integer dot products (VPDPBUSD: u8 × i8, four products summed per
//! i32 lane), and the scales are applied in f32 once per 32 values (per 256 for q4k).
//!
//! VPDPBUSD needs one operand unsigned. q4k's 4-bit codes are; q8_0's signed weights are offset
//! by +128 (their sign bit flipped), and the `128·Σq` this adds to each activation block's sum
//! is taken back through the accumulator's starting value.
//!
//! # Safety
//! Every function here is `unsafe` with one contract: the caller has checked
//! [`features`](crate::kernels::detect::features)`().vnni` and passes pointers valid for the
//! lengths the docs give.

use std::arch::x86_64::*;

use super::avx512::{self, Q4_1_BLOCK_BYTES};

/// Values per block of activations, of q8_0 weights and of q4k sub-blocks.
pub(crate) const QK: usize = 32;
/// Values per q4k super-block.
pub(crate) const QK_K: usize = 256;
/// Bytes of a q8_0 block: an f16 scale `d`, then 32 signed codes; a value is `d·q`.
pub(crate) const Q8_0_BLOCK_BYTES: usize = 34;
/// Bytes of a q4k super-block: f16 `d` and `dmin`, 12 bytes of 6-bit sub-block scales and
/// minima, 128 bytes of 4-bit codes; value `i` of sub-block `j` is `d·sc[j]·q − dmin·m[j]`.
pub(crate) const Q4K_BLOCK_BYTES: usize = 144;
/// How far ahead of the loads the decode kernels prefetch each weight row into L1 where they
/// read the rows in lockstep (Q4_1, and q8_0 and q4k for 2–4 tokens; tuned on 7B decode when
/// one token read them so too: 1024 bytes ahead was 10–25% slower).
const PREFETCH_BYTES: usize = 512;
const PREFETCH_BYTES_Q4K: usize = 256;

/// Prefetches the lines of a weight block of `BYTES` bytes at `p`: `near` bytes ahead into L1,
/// and `ahead` bytes ahead (the same block of the rows that the schedule takes next, or for
/// q4k some calls later: [`avx512::lead`]) into L2.
///
/// The L2 prefetch is what lets the lockstep order stream at the memory's pace: eight rows read
/// in lockstep are eight streams, more than the hardware prefetchers follow well. On 7B decode
/// (when one token took that order too), taking turns over copies of the weights (so every run
/// reads them from memory), it cut q4k from 1.27–1.43× to 1.00–1.15× the read floor, and q8_0
/// from 1.04–1.06× to 0.91–1.03×.
#[inline(always)]
unsafe fn prefetch_block<const BYTES: usize>(p: *const u8, near: usize, ahead: usize) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        for line in 0..BYTES.div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(near + 64 * line) as *const i8);
        }
        avx512::prefetch_l2(p, BYTES, ahead);
    }
}

/// The GGUF block formats these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// q8_0: blocks of 32 signed bytes and one scale.
    Q8_0,
    /// q4k ("Q4_K"): super-blocks of 256 values in 8 sub-blocks of 32.
    Q4K,
}

impl Kind {
    /// Values per block.
    pub(crate) fn block_values(self) -> usize {
        match self {
            Kind::Q8_0 => QK,
            Kind::Q4K => QK_K,
        }
    }

    /// Bytes of a row of `k` values (`k` a multiple of [`Self::block_values`]).
    pub(crate) fn row_bytes(self, k: usize) -> usize {
        match self {
            Kind::Q8_0 => k / QK * Q8_0_BLOCK_BYTES,
            Kind::Q4K => k / QK_K * Q4K_BLOCK_BYTES,
        }
    }
}

/// Rounds `nb` blocks of 32 f32 values to 8 bits with one scale: `d = max|x| / 127`,
/// `q = round(x / d)` (to nearest even), written to `q`, with each block's `Σq` in `sums`.
/// Returns `d`. Blocks with a NaN or an infinity make `d` NaN (and the codes zeros), so that the
/// sums they enter are NaN, as they would be in f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn quantize_shared(x: *const f32, nb: usize, q: *mut i8, sums: *mut i32) -> f32 {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let zero = _mm512_setzero_ps();
        let (mut amax, mut bad) = (zero, 0u16);
        for i in 0..2 * nb {
            let v = _mm512_loadu_ps(x.add(16 * i));
            // v·0 is 0 for finite v, NaN otherwise.
            bad |= _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(_mm512_mul_ps(v, zero), zero);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        }
        let amax = _mm512_reduce_max_ps(amax);
        if bad != 0 || amax == 0.0 {
            std::ptr::write_bytes(q, 0, 32 * nb);
            std::ptr::write_bytes(sums, 0, nb);
            return if bad != 0 { f32::NAN } else { 0.0 };
        }
        // Below 127 / f32::MAX (about 3.7e-37), 127 / amax is +inf, and x·inf is NaN or ±inf:
        // such a block is rounded as the same values scaled by 2^64 (exactly: a power of two),
        // off the common path, which stays one multiply a vector.
        let id = 127.0 / amax;
        if !id.is_finite() {
            let scaled: Vec<f32> = (0..32 * nb).map(|i| *x.add(i) * TINY_PRE).collect();
            quantize_shared(scaled.as_ptr(), nb, q, sums);
            return amax / 127.0;
        }
        let id = _mm512_set1_ps(id);
        for b in 0..nb {
            let qa = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x.add(32 * b)), id));
            let qb = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x.add(32 * b + 16)), id));
            _mm_storeu_si128(q.add(32 * b) as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128(
                q.add(32 * b + 16) as *mut __m128i,
                _mm512_cvtsepi32_epi8(qb),
            );
            *sums.add(b) = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
        }
        amax / 127.0
    }
}

/// The exact factor (2^64) a block too small for its scale is multiplied by first.
const TINY_PRE: f32 = 18_446_744_073_709_551_616.0;

/// [`quantize_shared`] for one block: returns `(d, Σq)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn quantize_block(x: *const f32, q: *mut i8) -> (f32, i32) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut sum = 0;
        let d = quantize_shared(x, 1, q, &mut sum);
        (d, sum)
    }
}

/// An f16 at `p` (unaligned), as its bits.
#[inline(always)]
unsafe fn f16_bits(p: *const u8) -> i16 {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe { (p as *const i16).read_unaligned() }
}

/// q8_0 blocks `b` and `b + 1` of a row: their 64 codes offset to u8 (as one vector) and
/// `[d_b ×8, d_b+1 ×8]`. With `second` false, only block `b` exists: the other half is codes
/// 128 (zero after the offset) with `d_b`, and reads nothing past block `b`.
#[inline(always)]
unsafe fn q8_0_pair(row: *const u8, b: usize, second: bool) -> (__m512i, __m512) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let pa = row.add(b * Q8_0_BLOCK_BYTES);
        let lo = _mm256_loadu_si256(pa.add(2) as *const __m256i);
        let da = _mm_set1_epi16(f16_bits(pa));
        let (codes, db) = if second {
            let pb = pa.add(Q8_0_BLOCK_BYTES);
            let hi = _mm256_loadu_si256(pb.add(2) as *const __m256i);
            (
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
                _mm_set1_epi16(f16_bits(pb)),
            )
        } else {
            (_mm512_zextsi256_si512(lo), da)
        };
        let codes = _mm512_xor_si512(codes, _mm512_set1_epi8(-128));
        (codes, _mm512_cvtph_ps(_mm256_set_m128i(db, da)))
    }
}

/// A q4k super-block's 6-bit scales and minima, unpacked to bytes `[sc[0..4], m[0..4],
/// sc[4..8], m[4..8]]` (see [`q4k_scale_byte`]).
#[inline(always)]
unsafe fn q4k_fields(blk: *const u8) -> __m128i {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        // Dwords [d|dmin, u0, u1, u2]: sc[0..4] and m[0..4] are the low 6 bits of u0 and u1;
        // sc[4..8] and m[4..8] the low and high nibbles of u2, topped by the high 2 bits of u0, u1.
        let v = _mm_loadu_si128(blk as *const __m128i);
        let low = _mm_srlv_epi32(
            _mm_shuffle_epi32::<0b11_11_10_01>(v),
            _mm_set_epi32(4, 0, 0, 0),
        );
        let low = _mm_and_si128(
            low,
            _mm_set_epi32(0x0f0f0f0f, 0x0f0f0f0f, 0x3f3f3f3f, 0x3f3f3f3f),
        );
        let top = _mm_srli_epi32::<2>(_mm_shuffle_epi32::<0b10_01_10_01>(v));
        // low | (top & 0x30 in the upper two dwords)
        _mm_ternarylogic_epi32::<0xf8>(low, top, _mm_set_epi32(0x30303030, 0x30303030, 0, 0))
    }
}

/// Where [`q4k_fields`] puts `sc[j]` (and `m[j]`, 4 bytes later).
const fn q4k_scale_byte(j: usize) -> i32 {
    (if j < 4 { j } else { j + 4 }) as i32
}

/// The i16 scales for [`_mm512_packs_epi32`] of two code vectors' dot products, the first's
/// sub-blocks `(A, B)` (128-bit lanes 0–1 and 2–3), the second's `(C, D)`: per 128-bit lane,
/// four i16 of the first's scale, then four of the second's (bytes of [`q4k_fields`], in
/// every 128-bit lane of `fields`).
#[inline(always)]
unsafe fn pair_scales<const A: usize, const B: usize, const C: usize, const D: usize>(
    fields: __m512i,
) -> __m512i {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        // Byte 0 of each i16 from byte `sc[·]`, byte 1 zero (index bit 7 set).
        let byte = |j: usize| q4k_scale_byte(j) | 0xff00;
        let (a, b, c, d) = (byte(A), byte(B), byte(C), byte(D));
        let lane = |first: i32, second: i32| {
            let f = first | (first << 16);
            let s = second | (second << 16);
            [f, f, s, s]
        };
        let (l0, l2) = (lane(a, c), lane(b, d));
        let idx = _mm512_setr_epi32(
            l0[0], l0[1], l0[2], l0[3], l0[0], l0[1], l0[2], l0[3], l2[0], l2[1], l2[2], l2[3],
            l2[0], l2[1], l2[2], l2[3],
        );
        _mm512_shuffle_epi8(fields, idx)
    }
}

/// The minima `m[0..8]` as f32, from the bytes of [`q4k_fields`] (in both 128-bit lanes of
/// `fields`): 256 bits wide, as the minima's sums are kept (on an AMD Zen 4, a 512-bit
/// operation takes a pipe for two cycles).
#[inline(always)]
unsafe fn q4k_minima(fields: __m256i) -> __m256 {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        // Lane j (of 128-bit lane j / 4): byte 0 from byte `m[j]`, the others zero (index bit
        // 7 set).
        const IDX: [i32; 8] = {
            let mut idx = [-1; 8];
            let mut j = 0;
            while j < 8 {
                idx[j] = ((q4k_scale_byte(j) + 4) % 16) | -256;
                j += 1;
            }
            idx
        };
        let idx = _mm256_loadu_si256(IDX.as_ptr() as *const _);
        _mm256_cvtepi32_ps(_mm256_shuffle_epi8(fields, idx))
    }
}

/// `acc + Σ` of `a`'s and `b`'s i16 pairs' products per i32 lane (VPDPWSSD), as one instruction:
/// LLVM otherwise splits a chain of them into VPMADDWD and VPADDD, one more uop each on the
/// ports that q4k decode is short of.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut acc = acc;
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }
}

/// The tokens of a decode call, rounded to 8 bits and laid out for [`dot_q8_0`], [`dot_q4k`]
/// and [`dot_q4_1`]: by token, `q` codes (i8).
///
/// - q8_0: one scale per 32-value block; per pair of blocks, `dxv` holds the two scales spread
///   over 8 lanes each and `corr` `−128·Σq` of each block in lanes 0 and 8.
/// - Q4_1: one scale per 32-value block; per pair of blocks `a`, `b`, the codes are stored as
///   `[a 0..16, b 0..16, a 16..32, b 16..32]` (as the weights' nibbles come), `dxv` holds
///   `[d_a ×4, d_b ×4, d_a ×4, d_b ×4]` and `xsv` `[0, d_a·Σq_a, 0, d_b·Σq_b]`.
/// - q4k: one scale `d` per super-block of 256 values (as llama.cpp's and candle's q8K), in
///   `dxv`; `xsv` per super-block holds `d·Σq` of its 8 sub-blocks; the codes of each
///   super-block are stored with its sub-blocks in the order 0, 2, 1, 3, 4, 6, 5, 7, as the
///   weights' nibbles come.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DotTokens<'a> {
    pub q: &'a [i8],
    pub dxv: &'a [f32],
    /// q8_0 only.
    pub corr: &'a [i32],
    /// q4k and Q4_1 only.
    pub xsv: &'a [f32],
    /// Codes per token (a multiple of 64).
    pub kp: usize,
}

/// `out[t][r] = Σ x[t]·w[r]` over `nb` q8_0 blocks of `R` weight rows, for `TT` tokens from
/// `toks` starting at token `t0`.
///
/// One token takes the rows two at a time, each pair from start to end (two forward streams
/// where the lockstep order of several tokens makes `R`; two rather than one, so that the
/// sums' additions overlap): Qwen3-MoE's layer at one token (128 experts, top-8, from memory,
/// 2 threads, AMD Zen 4) took 0.95× the time; one FFN of SmolLM2's or a Qwen3 expert's shape,
/// in cache, 0.82–0.88×.
/// Both orders do the same arithmetic per row, so the sums are the same to the bit.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(crate) unsafe fn dot_q8_0<const R: usize, const TT: usize>(
    nb: usize,
    w: [*const u8; R],
    ahead: usize,
    toks: DotTokens<'_>,
    t0: usize,
    out: &mut [[f32; R]; TT],
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let pairs = nb.div_ceil(2);
        // `a + Σ` over a pair of blocks (`codes`, scales `dw`: `q8_0_pair`) and token `t`.
        let add_token = |(codes, dw): (__m512i, __m512), t: usize, p: usize, a: &mut __m512| {
            let i = t * (toks.kp / 64) + p;
            let x = _mm512_loadu_si512(toks.q.as_ptr().add(64 * i) as *const _);
            let c = _mm512_loadu_si512(toks.corr.as_ptr().add(16 * i) as *const _);
            let isum = _mm512_dpbusd_epi32(c, codes, x);
            let s = _mm512_mul_ps(dw, _mm512_loadu_ps(toks.dxv.as_ptr().add(16 * i)));
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, *a);
        };
        if TT == 1 {
            for r0 in (0..R).step_by(2) {
                let rows = &w[r0..(r0 + 2).min(R)];
                let mut acc = [_mm512_setzero_ps(); 2];
                for p in 0..pairs {
                    for (row, a) in rows.iter().zip(&mut acc) {
                        let blocks = row.add(2 * p * Q8_0_BLOCK_BYTES);
                        avx512::prefetch_l2(blocks, 2 * Q8_0_BLOCK_BYTES, ahead);
                        add_token(q8_0_pair(*row, 2 * p, 2 * p + 1 < nb), t0, p, a);
                    }
                }
                for (o, a) in out[0][r0..].iter_mut().zip(&acc[..rows.len()]) {
                    *o = _mm512_reduce_add_ps(*a);
                }
            }
            return;
        }
        let mut acc = [[_mm512_setzero_ps(); R]; TT];
        for p in 0..pairs {
            for row in &w {
                prefetch_block::<{ 2 * Q8_0_BLOCK_BYTES }>(
                    row.wrapping_add(2 * p * Q8_0_BLOCK_BYTES),
                    PREFETCH_BYTES,
                    ahead,
                );
            }
            for (r, row) in w.iter().enumerate() {
                let blocks = q8_0_pair(*row, 2 * p, 2 * p + 1 < nb);
                for (t, a) in acc.iter_mut().enumerate() {
                    add_token(blocks, t0 + t, p, &mut a[r]);
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

/// `out[t][r] = Σ x[t]·w[r]` over `nb` q4k super-blocks of `R` weight rows, for `TT` tokens
/// from `toks` starting at token `t0`.
///
/// With one activation scale per super-block, the sub-block scales apply in integers, as in
/// llama.cpp: VPDPBUSD gives the codes' dot products (at most 4·15·128 per lane, so they fit
/// in 16 bits), two vectors of them are packed into one of i16, and VPDPWSSD multiplies them by
/// the 6-bit scales and sums the super-block (with two VPDPWSSD instead of four, one Qwen3-MoE
/// expert at one token takes 0.96× the time on one core of an AMD Zen 4, in cache); one
/// conversion to f32 per super-block and token.
///
/// One token takes the rows one after another, each from its start to its end, so that a call
/// reads its rows as one forward stream (two for gate and up), which the hardware prefetchers
/// follow, rather than as `R` streams in lockstep: Qwen3-MoE's layer at one token (128 experts,
/// top-8, from memory, 2 threads, AMD Zen 4, alternating in one process) took 0.85× the time.
/// Both orders do the same arithmetic per row, so the sums are the same to the bit.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(crate) unsafe fn dot_q4k<const R: usize, const TT: usize>(
    nb: usize,
    w: [*const u8; R],
    ahead: usize,
    toks: DotTokens<'_>,
    t0: usize,
    out: &mut [[f32; R]; TT],
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let ahead = avx512::lead(ahead);
        if TT == 1 {
            for (r, row) in w.iter().enumerate() {
                let (mut a, mut am) = (_mm512_setzero_ps(), _mm256_setzero_ps());
                for sb in 0..nb {
                    let blk = row.add(sb * Q4K_BLOCK_BYTES);
                    avx512::prefetch_l2(blk, Q4K_BLOCK_BYTES, ahead);
                    Q4kBlock::load(blk).add_token(toks, t0, sb, &mut a, &mut am);
                }
                out[0][r] = q4k_total(a, am);
            }
            return;
        }
        let mut acc = [[_mm512_setzero_ps(); R]; TT];
        // The minima's sums, apart (256 bits wide).
        let mut am = [[_mm256_setzero_ps(); R]; TT];
        for sb in 0..nb {
            for row in &w {
                prefetch_block::<Q4K_BLOCK_BYTES>(
                    row.wrapping_add(sb * Q4K_BLOCK_BYTES),
                    PREFETCH_BYTES_Q4K,
                    ahead,
                );
            }
            for (r, row) in w.iter().enumerate() {
                let blk = Q4kBlock::load(row.add(sb * Q4K_BLOCK_BYTES));
                for (t, (a, am)) in acc.iter_mut().zip(&mut am).enumerate() {
                    blk.add_token(toks, t0 + t, sb, &mut a[r], &mut am[r]);
                }
            }
        }
        for ((o, a), am) in out.iter_mut().zip(&acc).zip(&am) {
            for ((o, a), am) in o.iter_mut().zip(a).zip(am) {
                *o = q4k_total(*a, *am);
            }
        }
    }
}

/// A q4k super-block of one weight row, unpacked for [`Q4kBlock::add_token`].
struct Q4kBlock {
    /// `d` in every lane.
    d: __m512,
    /// `dmin·m[j]`, `j` in 0..8.
    mins: __m256,
    /// The codes: vector `i` holds sub-blocks (0, 2), (1, 3), (4, 6), (5, 7).
    codes: [__m512i; 4],
    /// The 6-bit scales of code vectors (0, 1) and (2, 3), as [`pair_scales`] lays them out.
    scales: [__m512i; 2],
}

impl Q4kBlock {
    /// Unpacks the super-block at `blk`.
    #[inline(always)]
    unsafe fn load(blk: *const u8) -> Self {
        // SAFETY: the module's contract (`# Safety` above) is this function's: the caller
        // checked the CPU features and passes a pointer to a whole super-block.
        unsafe {
            let low = _mm512_set1_epi8(0x0f);
            let fields = _mm512_broadcast_i32x4(q4k_fields(blk));
            // [d, dmin, 0, 0]; d in every lane of 512 bits, dmin of 256.
            let dd = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
            let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
            let q0 = _mm512_loadu_si512(blk.add(16) as *const _);
            let q1 = _mm512_loadu_si512(blk.add(80) as *const _);
            Self {
                d: _mm512_broadcastss_ps(dd),
                mins: _mm256_mul_ps(q4k_minima(_mm512_castsi512_si256(fields)), dmin),
                codes: [
                    _mm512_and_si512(q0, low),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(q0), low),
                    _mm512_and_si512(q1, low),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(q1), low),
                ],
                scales: [
                    pair_scales::<0, 2, 1, 3>(fields),
                    pair_scales::<4, 6, 5, 7>(fields),
                ],
            }
        }
    }

    /// Adds this super-block's (number `sb` of its row) dot product with token `t` of `toks`
    /// to `a` (the codes' part) and `am` (the minima's).
    #[inline(always)]
    unsafe fn add_token(
        &self,
        toks: DotTokens<'_>,
        t: usize,
        sb: usize,
        a: &mut __m512,
        am: &mut __m256,
    ) {
        // SAFETY: the module's contract (`# Safety` above) is this function's: the caller
        // checked the CPU features, and `toks` holds token `t` and super-block `sb`.
        unsafe {
            let pp = toks.kp / 64;
            let sbs = toks.kp / QK_K;
            let mut dots = [_mm512_setzero_si512(); 4];
            for (i, (codes, d)) in self.codes.iter().zip(&mut dots).enumerate() {
                let pi = t * pp + 4 * sb + i;
                let x = _mm512_loadu_si512(toks.q.as_ptr().add(64 * pi) as *const _);
                *d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), *codes, x);
            }
            // Two code vectors' dot products packed into one vector of i16 (each below
            // 4·15·128), then scaled and summed by one VPDPWSSD: per 128-bit lane, four of the
            // first vector's sums, then four of the second's.
            let mut isum = _mm512_setzero_si512();
            for (h, scale) in self.scales.iter().enumerate() {
                let packed = _mm512_packs_epi32(dots[2 * h], dots[2 * h + 1]);
                isum = dpwssd(isum, packed, *scale);
            }
            let dx = _mm512_set1_ps(*toks.dxv.get_unchecked(t * sbs + sb));
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(self.d, dx), *a);
            // The minima: Σ_j dmin·m[j] · d_x·Σq[j].
            let xs = toks.xsv.as_ptr().add(8 * (t * sbs + sb));
            *am = _mm256_fnmadd_ps(self.mins, _mm256_loadu_ps(xs), *am);
        }
    }
}

/// A q4k row's dot product from its two sums.
#[inline(always)]
unsafe fn q4k_total(a: __m512, am: __m256) -> f32 {
    // SAFETY: the caller checked the CPU features.
    unsafe { _mm512_reduce_add_ps(_mm512_add_ps(a, _mm512_zextps256_ps512(am))) }
}

/// `out[t][r] = Σ x[t]·w[r]` over `nb` Q4_1 blocks of `R` weight rows, for `TT` tokens from
/// `toks` (laid out for Q4_1: [`DotTokens`]) starting at token `t0`.
///
/// A Q4_1 value is `d·q + m` (`q` a 4-bit code, `d` and `m` f16 per 32 values), so a block's
/// dot product with 8-bit activations `d_x·xq` is `d·d_x·Σ q·xq + m·d_x·Σ xq`: VPDPBUSD takes
/// the codes as they are (unsigned) against the activations, two blocks per vector, and the
/// minima's term `m·(d_x·Σ xq)` is summed apart, 128 bits wide, from the blocks' headers as
/// they come (`[d, m]` of both blocks), as llama.cpp's Q4_1 × Q8_1 dot product does.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(crate) unsafe fn dot_q4_1<const R: usize, const TT: usize>(
    nb: usize,
    w: [*const u8; R],
    ahead: usize,
    toks: DotTokens<'_>,
    t0: usize,
    out: &mut [[f32; R]; TT],
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); R]; TT];
        let mut am = [[_mm_setzero_ps(); R]; TT];
        let pp = toks.kp / 64;
        let low = _mm256_set1_epi8(0x0f);
        // Lanes 0–3 and 8–11 hold the first block's sums, 4–7 and 12–15 the second's.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
        for p in 0..nb.div_ceil(2) {
            let second = 2 * p + 1 < nb;
            for row in &w {
                prefetch_block::<{ 2 * Q4_1_BLOCK_BYTES }>(
                    row.wrapping_add(2 * p * Q4_1_BLOCK_BYTES),
                    PREFETCH_BYTES,
                    ahead,
                );
            }
            for (r, row) in w.iter().enumerate() {
                let pa = row.add(2 * p * Q4_1_BLOCK_BYTES);
                let qa = _mm_loadu_si128(pa.add(4) as *const __m128i);
                let ha = (pa as *const i32).read_unaligned();
                let (qb, hb) = if second {
                    let pb = pa.add(Q4_1_BLOCK_BYTES);
                    (
                        _mm_loadu_si128(pb.add(4) as *const __m128i),
                        (pb as *const i32).read_unaligned(),
                    )
                } else {
                    (_mm_setzero_si128(), 0)
                };
                // [d_a, m_a, d_b, m_b]
                let dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, hb, ha));
                let dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dm));
                // Codes [a 0..16, b 0..16, a 16..32, b 16..32], as the tokens are laid out.
                let both = _mm256_set_m128i(qb, qa);
                let codes = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_and_si256(both, low)),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(both), low),
                );
                for (t, (a, am)) in acc.iter_mut().zip(&mut am).enumerate() {
                    let i = (t0 + t) * pp + p;
                    let x = _mm512_loadu_si512(toks.q.as_ptr().add(64 * i) as *const _);
                    let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, x);
                    let s = _mm512_mul_ps(dw, _mm512_loadu_ps(toks.dxv.as_ptr().add(16 * i)));
                    a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, a[r]);
                    // [0, d_x·Σxq of a, 0, that of b]
                    let xs = _mm_loadu_ps(toks.xsv.as_ptr().add(4 * i));
                    am[r] = _mm_fmadd_ps(dm, xs, am[r]);
                }
            }
        }
        for ((o, a), am) in out.iter_mut().zip(&acc).zip(&am) {
            for ((o, a), am) in o.iter_mut().zip(a).zip(am) {
                *o = _mm512_reduce_add_ps(_mm512_add_ps(*a, _mm512_castps128_ps512(*am)));
            }
        }
    }
}

/// Tokens per tile of [`packed_kernel`] (the schedule takes 1 to 5 for a last, short block,
/// and dispatches those widths one by one: hence the assertion).
pub(crate) const MT: usize = 6;
const _: () = assert!(MT == 6);
/// Weight rows per tile of [`packed_kernel`] (two vectors of 16).
pub(crate) const NT: usize = 32;

/// The packed micro-kernel for q8_0: `C[t][0..32] (+)= Σ_b` over `nb` 32-value blocks, for
/// the first `R` (≤ `MT`) of a block of `MT` tokens and 32 weight rows, each block's integer
/// sums scaled once. (A last block of fewer than `MT` tokens takes a smaller `R`.)
///
/// - `xq`: `[nb][8][MT]` u32, each 4 activation codes (i8); `xd`, `xs`: `[nb][MT]` scales
///   and code sums;
/// - `wq`: `[nb][8][32]` u32, each 4 weight codes offset by +128 (u8); `wd`: `[nb][32]` scales;
/// - `c`: `R` rows of 32 f32, `ldc` apart; overwritten if `first`, else accumulated into;
/// - `ahead()` is called before each 32-value block (for the caller's prefetches).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(crate) unsafe fn packed_kernel<const R: usize>(
    nb: usize,
    (xq, xd, xs): (*const i32, *const f32, *const i32),
    (wq, wd): (*const i32, *const f32),
    c: *mut f32,
    ldc: usize,
    first: bool,
    mut ahead: impl FnMut(),
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if !first {
            for (t, a) in acc.iter_mut().enumerate() {
                a[0] = _mm512_loadu_ps(c.add(t * ldc));
                a[1] = _mm512_loadu_ps(c.add(t * ldc + 16));
            }
        }
        for b in 0..nb {
            ahead();
            // The +128 offset adds 128·Σq to every row's sum.
            let mut isum = [[_mm512_setzero_si512(); 2]; R];
            for (t, s) in isum.iter_mut().enumerate() {
                let corr = _mm512_set1_epi32(-128 * *xs.add(b * MT + t));
                *s = [corr, corr];
            }
            block_sums(wq.add(b * 8 * NT), xq.add(b * 8 * MT), &mut isum);
            let (d0, d1) = (
                _mm512_loadu_ps(wd.add(b * NT)),
                _mm512_loadu_ps(wd.add(b * NT + 16)),
            );
            for (t, (a, s)) in acc.iter_mut().zip(&isum).enumerate() {
                let dxv = _mm512_set1_ps(*xd.add(b * MT + t));
                a[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[0]), _mm512_mul_ps(d0, dxv), a[0]);
                a[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[1]), _mm512_mul_ps(d1, dxv), a[1]);
            }
        }
        for (t, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(t * ldc), a[0]);
            _mm512_storeu_ps(c.add(t * ldc + 16), a[1]);
        }
    }
}

/// Adds one 32-value block's integer dot products of the first `R` of `MT` tokens (`x`:
/// `[8][MT]` u32 of 4 codes) with 32 rows (`w`: `[8][32]` u32 of 4 codes) to `isum`.
#[inline(always)]
unsafe fn block_sums<const R: usize>(w: *const i32, x: *const i32, isum: &mut [[__m512i; 2]; R]) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        for g in 0..8 {
            let w = w.add(g * NT);
            let (w0, w1) = (
                _mm512_loadu_si512(w as *const _),
                _mm512_loadu_si512(w.add(16) as *const _),
            );
            let x = x.add(g * MT);
            for (t, s) in isum.iter_mut().enumerate() {
                let xb = _mm512_set1_epi32(*x.add(t));
                s[0] = _mm512_dpbusd_epi32(s[0], w0, xb);
                s[1] = _mm512_dpbusd_epi32(s[1], w1, xb);
            }
        }
    }
}

/// The packed micro-kernel for q4k: `C[t][0..32] (+)= Σ` over `nsb` super-blocks of 256
/// values, for the first `R` (≤ `MT`) of a block of `MT` tokens and 32 weight rows.
///
/// The activations have one scale per super-block (as in [`dot_q4k`]), so that per
/// super-block and token only the weights' scales vary: `Σ_j (d·sc[j])·Σq·xq` (one FMA a
/// sub-block, `d·sc[j]` exact in f32) `− dmin·Σ_j m[j]·Σxq` (the minima in integers, two
/// sub-blocks a VPDPWSSD), then one scaling by `d_x`. On an AMD Zen 4 a float multiply or FMA,
/// a VPMULLD and a VPDPWSSD each take a dot product's issue slot, while integer adds and
/// conversions do not: per 64 dot products that is 8 FMAs, 4 VPDPWSSD and 2 float operations
/// (at most 82% of the dot products' rate). The sub-block scales applied in integers
/// (VPMULLD, then `d` once) took one more float operation a super-block: a Mixtral expert
/// (4096 → 14336, 128 tokens) 1.011–1.015× this kernel's time, alternating in one process on
/// that CPU; 3 float operations per 8 (73%) when every 32-value block was scaled in f32.
///
/// - `xq`: `[nsb·8][8][MT]` u32, each 4 activation codes (i8); `xd`: `[nsb][MT]` scales;
///   `xs`: `[nsb·4][MT]` code sums per 32 values, those of sub-blocks `2p` and `2p + 1` as
///   an i16 pair;
/// - `wq`: `[nsb·8][8][32]` u32, each 4 weight codes (u8); `wsc`: `[nsb·8][32]` scales
///   `d·sc` (f32); `wmn`: `[nsb·4][32]` 6-bit minima, of sub-blocks `2p` and `2p + 1` as an
///   i16 pair; `wmin`: `[nsb][32]` `dmin` (f32);
/// - `c`: `R` rows of 32 f32, `ldc` apart; overwritten if `first`, else accumulated into;
/// - `ahead()` is called before each super-block (for the caller's prefetches).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(crate) unsafe fn packed_kernel_q4k<const R: usize>(
    nsb: usize,
    (xq, xd, xs): (*const i32, *const f32, *const i32),
    (wq, wsc, wmn, wmin): (*const i32, *const f32, *const i32, *const f32),
    c: *mut f32,
    ldc: usize,
    first: bool,
    mut ahead: impl FnMut(),
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        if first {
            for t in 0..R {
                _mm512_storeu_ps(c.add(t * ldc), _mm512_setzero_ps());
                _mm512_storeu_ps(c.add(t * ldc + 16), _mm512_setzero_ps());
            }
        }
        for sb in 0..nsb {
            ahead();
            // Σ_j d·sc[j]·(sub-block j's dot product), per token and row.
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for j in 0..8 {
                let b = sb * 8 + j;
                let mut isum = [[_mm512_setzero_si512(); 2]; R];
                block_sums(wq.add(b * 8 * NT), xq.add(b * 8 * MT), &mut isum);
                let sc = [
                    _mm512_loadu_ps(wsc.add(b * NT)),
                    _mm512_loadu_ps(wsc.add(b * NT + 16)),
                ];
                for (a, s) in acc.iter_mut().zip(&isum) {
                    for v in 0..2 {
                        a[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[v]), sc[v], a[v]);
                    }
                }
            }
            let mut mn = [[_mm512_setzero_si512(); 2]; 4];
            for (p, mn) in mn.iter_mut().enumerate() {
                let at = wmn.add((sb * 4 + p) * NT);
                *mn = [
                    _mm512_loadu_si512(at as *const _),
                    _mm512_loadu_si512(at.add(16) as *const _),
                ];
            }
            let dmin = [
                _mm512_loadu_ps(wmin.add(sb * NT)),
                _mm512_loadu_ps(wmin.add(sb * NT + 16)),
            ];
            // Token by token, unrolled (a loop over `t` kept `acc` on the stack).
            macro_rules! token {
                ($t:expr) => {
                    if let Some(a) = acc.get($t) {
                        let t = $t;
                        // Σ_j m[j]·Σxq[j], two sub-blocks per VPDPWSSD (both as i16 pairs).
                        let mut mins = [_mm512_setzero_si512(); 2];
                        for (p, mn) in mn.iter().enumerate() {
                            let xb = _mm512_set1_epi32(*xs.add((sb * 4 + p) * MT + t));
                            for v in 0..2 {
                                mins[v] = dpwssd(mins[v], mn[v], xb);
                            }
                        }
                        let dx = _mm512_set1_ps(*xd.add(sb * MT + t));
                        for v in 0..2 {
                            let f = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins[v]), dmin[v], a[v]);
                            let at = c.add(t * ldc + 16 * v);
                            _mm512_storeu_ps(at, _mm512_fmadd_ps(f, dx, _mm512_loadu_ps(at)));
                        }
                    }
                };
            }
            token!(0);
            token!(1);
            token!(2);
            token!(3);
            token!(4);
            token!(5);
        }
    }
}

/// 16 weight rows for [`pack16`]: the first at `base`, the next `stride` bytes apart; only the
/// first `valid` exist (for the others [`pack16`] reads row 0 and packs zero scales).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows16 {
    pub base: *const u8,
    pub stride: usize,
    pub valid: usize,
}

impl Rows16 {
    /// No rows.
    const NONE: Self = Self {
        base: std::ptr::null(),
        stride: 0,
        valid: 0,
    };

    /// A lane mask of the rows that exist.
    #[inline(always)]
    fn mask(&self) -> __mmask16 {
        ((1u32 << self.valid) - 1) as __mmask16
    }

    /// The start of row `i`, or of row 0 for a row that does not exist (its values are read
    /// but its scales packed as zeros).
    ///
    /// # Safety
    /// At least one row exists.
    #[inline(always)]
    unsafe fn row(&self, i: usize) -> *const u8 {
        // SAFETY: row 0 exists, and so does row `i` where `i < valid`.
        unsafe {
            self.base
                .add(if i < self.valid { i * self.stride } else { 0 })
        }
    }

    /// Prefetches `LINES` lines of every row that exists, with hint `HINT`, from the one that
    /// holds byte `from`: a fixed count, cheaper than the exact one for short blocks (q8_0's
    /// pairs of 68 bytes take 2 lines, or 3 for 3 of 64 alignments; q4k's super-blocks of 144
    /// bytes 3, or 4 where one starts 49 to 63 bytes into a line, which rows 16-byte aligned
    /// never do), the next block's lines covering the rest. Counting q4k's exact lines row by
    /// row made a Mixtral expert 1.02–1.05× slower at 8 to 128 tokens on an AMD Zen 4.
    #[inline(always)]
    fn prefetch_lines<const HINT: i32, const LINES: usize>(&self, from: usize) {
        for i in 0..self.valid {
            let start = self.base.wrapping_add(i * self.stride + from) as usize & !63;
            for line in 0..LINES {
                // SAFETY: a prefetch reads nothing the program sees and never faults, whatever
                // the address.
                unsafe { _mm_prefetch::<HINT>((start + 64 * line) as *const i8) };
            }
        }
    }
}

/// Prefetches the rows of a panel a few lines at a time, in order (of each row, `len` bytes
/// from the line that holds its byte `from`), so that their reads from memory are spread
/// over the work before them rather than made while they are unpacked.
#[derive(Debug, Clone)]
pub(crate) struct Trickle {
    rows: [Rows16; 2],
    from: usize,
    len: usize,
    per_step: usize,
    /// The half and row whose lines `[at, end)` come next.
    half: usize,
    row: usize,
    at: usize,
    end: usize,
}

impl Trickle {
    /// A trickle over `rows` (none if `None`) that ends within `steps` calls to [`Self::step`].
    pub(crate) fn new(rows: Option<[Rows16; 2]>, from: usize, len: usize, steps: usize) -> Self {
        let rows = rows.unwrap_or([Rows16::NONE; 2]);
        let lines = (len.div_ceil(64) + 1) * (rows[0].valid + rows[1].valid);
        let mut t = Self {
            rows,
            from,
            len,
            per_step: lines.div_ceil(steps.max(1)),
            half: 0,
            row: 0,
            at: 0,
            end: 0,
        };
        t.seek();
        t
    }

    /// Points `at` and `end` at row `row` of half `half`, or of the next half with rows.
    fn seek(&mut self) {
        while self.half < 2 && self.row == self.rows[self.half].valid {
            (self.half, self.row) = (self.half + 1, 0);
        }
        if self.half < 2 {
            let r = self.rows[self.half];
            let start = r.base as usize + self.row * r.stride + self.from;
            (self.at, self.end) = (start & !63, start + self.len);
        }
    }

    /// Prefetches the next lines (with the L2 hint).
    #[inline(always)]
    pub(crate) fn step(&mut self) {
        for _ in 0..self.per_step {
            if self.at >= self.end {
                if self.half == 2 {
                    return;
                }
                self.row += 1;
                self.seek();
                if self.half == 2 {
                    return;
                }
            }
            // SAFETY: a prefetch reads nothing the program sees and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(self.at as *const i8) };
            self.at += 64;
        }
    }
}

/// How many q8_0 blocks (and q4k super-blocks) ahead [`pack16`] prefetches its rows into L1.
const PACK_AHEAD_Q8_0: usize = 8;
const PACK_AHEAD_Q4K: usize = 2;

/// Transposes a 16 × 16 matrix of u32 held in 16 registers.
#[inline(always)]
unsafe fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        // Loops, not closures: an intrinsic inside a closure (a function without the CPU
        // features) may stay a call.
        let mut f = [_mm512_setzero_ps(); 16];
        for (f, r) in f.iter_mut().zip(&r) {
            *f = _mm512_castsi512_ps(*r);
        }
        avx512::transpose16(&mut f);
        let mut out = [_mm512_setzero_si512(); 16];
        for (o, f) in out.iter_mut().zip(&f) {
            *o = _mm512_castps_si512(*f);
        }
        out
    }
}

/// The 16-byte headers (`d`, `dmin` and the 12 bytes of 6-bit fields) of the q4k super-block
/// at byte `blk` of 16 rows, as 4 vectors of their u32 `0..4` for the 16 rows (zeros for the
/// rows that do not exist): loaded by row, 4 rows a vector, and transposed in registers.
#[inline(always)]
unsafe fn headers(rows: Rows16, blk: usize) -> (__m512i, __m512i, __m512i, __m512i) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes at least one row (the absent ones read row 0; `pack16`
    // returns before this when there are none), each valid for 16 bytes from `blk`.
    unsafe {
        let head = |i: usize| _mm_loadu_si128(rows.row(i).add(blk) as *const __m128i);
        // z[a]'s 128-bit lane i: row 4i + a.
        let mut z = [_mm512_setzero_si512(); 4];
        for (a, z) in z.iter_mut().enumerate() {
            let v = _mm512_castsi128_si512(head(a));
            let v = _mm512_inserti32x4::<1>(v, head(4 + a));
            let v = _mm512_inserti32x4::<2>(v, head(8 + a));
            *z = _mm512_inserti32x4::<3>(v, head(12 + a));
        }
        let (t0, t1) = (
            _mm512_unpacklo_epi32(z[0], z[1]),
            _mm512_unpackhi_epi32(z[0], z[1]),
        );
        let (t2, t3) = (
            _mm512_unpacklo_epi32(z[2], z[3]),
            _mm512_unpackhi_epi32(z[2], z[3]),
        );
        let mask = rows.mask();
        (
            _mm512_maskz_mov_epi32(mask, _mm512_unpacklo_epi64(t0, t2)),
            _mm512_maskz_mov_epi32(mask, _mm512_unpackhi_epi64(t0, t2)),
            _mm512_maskz_mov_epi32(mask, _mm512_unpacklo_epi64(t1, t3)),
            _mm512_maskz_mov_epi32(mask, _mm512_unpackhi_epi64(t1, t3)),
        )
    }
}

/// Packs 16 weight rows' 32-value blocks `[b0, b0 + nb)` (`b0` a multiple of 8 for q4k) for
/// [`packed_kernel`] or [`packed_kernel_q4k`]: codes into `wq[(b·8 + g)·32 + i]`, with
/// `i = i0 + row`; for q8_0 the scales into `wd[b·32 + i]` (f32); for q4k the scales times
/// their super-block's `d` into `wd[b·32 + i]` (f32), the 6-bit minima of blocks `2p` and
/// `2p + 1` into `wm[p·32 + i]` (an i16 pair), and each super-block `s`'s `dmin` into
/// `wmin[s·32 + i]`. Codes, and q4k's headers, are loaded by row and transposed in
/// registers; q8_0's scales are gathered from the blocks, one gather per vector of 16 rows'
/// values. (Gathering q4k's headers too made a Mixtral expert 1.015× slower at 32 tokens and
/// 1.04× at 8 on an AMD Zen 4.)
///
/// The rows are read in lockstep, 16 streams or more, which the hardware prefetchers do not
/// follow: the blocks a few steps ahead are prefetched into L1. (The caller brings the rows
/// from memory beforehand: [`Trickle`].)
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(crate) unsafe fn pack16(
    kind: Kind,
    rows: Rows16,
    b0: usize,
    nb: usize,
    (wq, wd, wm, wmin): (*mut i32, *mut f32, *mut i32, *mut f32),
    i0: usize,
) {
    // SAFETY: the module's contract (`# Safety` above) is this function's: the caller checked
    // the CPU features and passes pointers valid for the lengths documented here.
    unsafe {
        if rows.valid == 0 {
            // No rows (past the matrix's end): zero scales and minima, and nothing read.
            for b in 0..nb {
                std::ptr::write_bytes(wd.add(b * NT + i0), 0, 16);
            }
            if kind == Kind::Q4K {
                for p in 0..nb / 2 {
                    std::ptr::write_bytes(wm.add(p * NT + i0), 0, 16);
                }
                for sb in 0..nb / 8 {
                    std::ptr::write_bytes(wmin.add(sb * NT + i0), 0, 16);
                }
            }
            return;
        }
        let store = |b: usize, g: usize, v: __m512i| {
            _mm512_storeu_si512(wq.add((b * 8 + g) * NT + i0) as *mut _, v)
        };
        match kind {
            Kind::Q8_0 => {
                let idx = _mm512_mullo_epi32(
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                    _mm512_set1_epi32(rows.stride as i32),
                );
                // The u32 at byte `off` of each row (zeros for the rows that do not exist).
                let gather = |off: usize| {
                    _mm512_mask_i32gather_epi32::<1>(
                        _mm512_setzero_si512(),
                        rows.mask(),
                        idx,
                        rows.base.wrapping_add(off) as *const i32,
                    )
                };
                // Codes by row (blocks b and b + 1 as 16 u32), transposed in registers: cheaper than
                // 8 gathers a block. Rows that do not exist read row 0; their scales are zeros.
                for p in (0..nb).step_by(2) {
                    let (b, second) = (b0 + p, p + 1 < nb);
                    let at = b * Q8_0_BLOCK_BYTES;
                    if p + PACK_AHEAD_Q8_0 < nb {
                        let ahead = at + PACK_AHEAD_Q8_0 * Q8_0_BLOCK_BYTES;
                        rows.prefetch_lines::<_MM_HINT_T0, 2>(ahead);
                    }
                    // Two paths with fixed counts: with a count known only at run time, the
                    // transposed vectors went through the stack.
                    let mut v = [_mm512_setzero_si512(); 16];
                    if second {
                        for (i, v) in v.iter_mut().enumerate() {
                            *v = q8_0_pair(rows.row(i), b, true).0;
                        }
                        for (h, v) in transpose(v).iter().enumerate() {
                            store(p + h / 8, h % 8, *v);
                        }
                    } else {
                        for (i, v) in v.iter_mut().enumerate() {
                            *v = q8_0_pair(rows.row(i), b, false).0;
                        }
                        for (h, v) in transpose(v).iter().enumerate().take(8) {
                            store(p, h, *v);
                        }
                    }
                    for bb in p..nb.min(p + 2) {
                        let d = _mm512_cvtepi32_epi16(gather((b0 + bb) * Q8_0_BLOCK_BYTES));
                        _mm512_storeu_ps(wd.add(bb * NT + i0), _mm512_cvtph_ps(d));
                    }
                }
            }
            Kind::Q4K => {
                let low = _mm512_set1_epi8(0x0f);
                for sb in 0..nb / 8 {
                    let blk = (b0 / 8 + sb) * Q4K_BLOCK_BYTES;
                    if sb + PACK_AHEAD_Q4K < nb / 8 {
                        let ahead = blk + PACK_AHEAD_Q4K * Q4K_BLOCK_BYTES;
                        rows.prefetch_lines::<_MM_HINT_T0, 3>(ahead);
                    }
                    // The 32 u32 of codes of each row, loaded by row and transposed in registers
                    // into word `8c + g` of the 16 rows (with gathers, a whole call took 1.2× as
                    // long on an AMD Zen 4). Rows that do not exist read row 0; their scales are
                    // zeros.
                    for half in 0..2 {
                        let mut words = [_mm512_setzero_si512(); 16];
                        for (i, w) in words.iter_mut().enumerate() {
                            let at = rows.row(i).add(blk + 16 + 64 * half);
                            *w = _mm512_loadu_si512(at as *const _);
                        }
                        let words = transpose(words);
                        for (w, v) in words.iter().enumerate() {
                            let (c, g) = (2 * half + w / 8, w % 8);
                            let b = sb * 8 + 2 * c;
                            store(b, g, _mm512_and_si512(*v, low));
                            store(b + 1, g, _mm512_and_si512(_mm512_srli_epi16::<4>(*v), low));
                        }
                    }
                    // d, dmin and the 6-bit fields, unpacked for 16 rows at once (the layout is in
                    // `q4k_fields`, which unpacks one row's for decode).
                    let (dd, u0, u1, u2) = headers(rows, blk);
                    let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
                    let dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dd)));
                    let m6 = _mm512_set1_epi32(0x3f3f_3f3f);
                    let (m4, m2) = (
                        _mm512_set1_epi32(0x0f0f_0f0f),
                        _mm512_set1_epi32(0x0303_0303),
                    );
                    let top = |u: __m512i| {
                        _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(u), m2))
                    };
                    let fields = [
                        (_mm512_and_si512(u0, m6), _mm512_and_si512(u1, m6)),
                        (
                            _mm512_or_si512(_mm512_and_si512(u2, m4), top(u0)),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi32::<4>(u2), m4),
                                top(u1),
                            ),
                        ),
                    ];
                    for (half, (sc, mn)) in fields.iter().enumerate() {
                        for byte in 0..4 {
                            let j = sb * 8 + 4 * half + byte;
                            let field = |v: __m512i| {
                                _mm512_and_si512(
                                    _mm512_srlv_epi32(v, _mm512_set1_epi32(8 * byte as i32)),
                                    _mm512_set1_epi32(0xff),
                                )
                            };
                            let scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(field(*sc)));
                            _mm512_storeu_ps(wd.add(j * NT + i0), scale);
                        }
                        // The minima of sub-blocks (2p, 2p + 1) as i16 pairs: bytes 0, 1 of
                        // `mn` (p = 2·half), then bytes 2, 3.
                        let lo = _mm512_set1_epi32(0xff);
                        let pairs = [
                            _mm512_or_si512(
                                _mm512_and_si512(*mn, lo),
                                _mm512_slli_epi32::<8>(_mm512_and_si512(
                                    *mn,
                                    _mm512_set1_epi32(0xff00),
                                )),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi32::<16>(*mn), lo),
                                _mm512_slli_epi32::<16>(_mm512_srli_epi32::<24>(*mn)),
                            ),
                        ];
                        for (i, v) in pairs.iter().enumerate() {
                            let p = sb * 4 + 2 * half + i;
                            _mm512_storeu_si512(wm.add(p * NT + i0) as *mut _, *v);
                        }
                    }
                    _mm512_storeu_ps(wmin.add(sb * NT + i0), dmin);
                }
            }
        }
    }
}
