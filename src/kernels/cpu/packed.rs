//! The packed schedule, for many tokens (prefill): GotoBLAS-style blocking. Tokens are packed
//! once; weights per `KC`-deep block of `PANELS × 32` columns into a per-thread buffer that stays
//! in L2; a register micro-kernel computes 12 tokens × 32 columns at a time, with f32 FMAs or,
//! for bf16 where it is faster (see [`super::Compute`]), bf16 dot products (VDPBF16PS). Work is split by
//! output columns; each task ends with the epilogue (biases, σ(gate) ⊙ up, rounding once).

use super::avx512::{self, Encoding};
use super::element::Element;
use super::parallel::{parallel_for, with_scratch, with_tokens, DisjointOut};
use super::{column_tasks, Bias, Columns, Mat, Weights};

/// Tokens per micro-kernel tile.
pub(crate) const MR: usize = 12;
/// Columns per micro-kernel tile (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// Depth of one weight block (a multiple of 32, so Q4_1 blocks are never split).
const KC: usize = 512;
/// Panels (of `NR` columns) per task: `KC × PANELS × NR` f32 is 512 KiB, inside L2.
const PANELS: usize = 8;

/// The packed schedule's register micro-kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Micro {
    /// f32 FMAs on widened values: any encoding.
    Fma,
    /// bf16 dot products (VDPBF16PS): dense bf16 weights and bf16 activations only.
    Bf16Dot,
}

#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run<T: Element, E: Encoding>(
    x: &[T],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    micro: Micro,
    out: &mut [T],
) {
    // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
    // checked, and the pointers it reads and writes lie inside the buffers it was given.
    unsafe {
        let blocks = m.div_ceil(MR);
        // Tokens packed once for every task: block-major, then k, then the block's 12 tokens,
        // into a buffer kept between calls (fresh pages would cost a fault every 4 KiB).
        let len = match micro {
            Micro::Fma => blocks * k * MR,
            Micro::Bf16Dot => blocks * k.div_ceil(2) * MR,
        };
        with_tokens(len, |xp| {
            match micro {
                Micro::Fma => pack_x_f32(x, m, k, xp),
                Micro::Bf16Dot => pack_x_pairs(x, m, k, xp),
            }
            run_tasks::<T, E>(xp, blocks, m, k, w, n, bias, micro, out);
        });
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn run_tasks<T: Element, E: Encoding>(
    xp: &[f32],
    blocks: usize,
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    micro: Micro,
    out: &mut [T],
) {
    let out = DisjointOut::new(out);
    column_tasks(w, n, PANELS, |cols| {
        let task = Task {
            blocks,
            m,
            k,
            n,
            cols,
        };
        // SAFETY: tasks write disjoint column ranges of `out`.
        unsafe { task.run::<T, E>(xp, w, bias, micro, out) }
    });
}

/// One task's share: its output columns for every token.
struct Task {
    blocks: usize,
    m: usize,
    k: usize,
    n: usize,
    cols: Columns,
}

impl Task {
    unsafe fn run<T: Element, E: Encoding>(
        &self,
        xp: &[f32],
        w: Weights<'_>,
        bias: Bias<'_>,
        micro: Micro,
        out: DisjointOut<'_, T>,
    ) {
        // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
        // checked, and the pointers it reads and writes lie inside the buffers it was given.
        unsafe {
            let Task {
                blocks,
                m,
                k,
                n,
                cols,
            } = *self;
            let panels = cols.panels();
            let ldc = panels * NR;
            with_scratch(panels * KC * NR, blocks * MR * ldc, |wbuf, c| {
                for pc in (0..k).step_by(KC) {
                    let kc = KC.min(k - pc);
                    for p in 0..panels {
                        let (j, valid) = cols.panel(p);
                        let rows = panel_rows(w, j, j + valid);
                        let dst = wbuf.as_mut_ptr().add(p * KC * NR);
                        match micro {
                            Micro::Fma => {
                                for half in 0..2 {
                                    let rows = std::array::from_fn(|r| rows[half * 16 + r]);
                                    avx512::pack16_f32::<E>(&rows, pc, kc, dst.add(half * 16), NR);
                                }
                            }
                            Micro::Bf16Dot => {
                                // Dense bf16 rows only: their bits are packed as they are.
                                let dst = dst as *mut u16;
                                for half in 0..2 {
                                    let rows = std::array::from_fn(|r| {
                                        rows[half * 16 + r]
                                            .map(|p| (p as *const half::bf16).add(pc))
                                    });
                                    avx512::pack16_pairs(&rows, kc, dst.add(half * 32), 2 * NR);
                                }
                            }
                        }
                    }
                    // Panel-major: one packed weight panel serves every token block while it is
                    // hot; the tokens' blocks stream from L2 (1.4x faster than block-major here).
                    for p in 0..panels {
                        for b in 0..blocks {
                            let cp = c.as_mut_ptr().add(b * MR * ldc + p * NR);
                            let wp = wbuf.as_ptr().add(p * KC * NR);
                            match micro {
                                Micro::Fma => {
                                    let xb = xp.as_ptr().add(b * k * MR + pc * MR);
                                    avx512::fma_kernel::<MR>(kc, xb, wp, cp, ldc, pc == 0);
                                }
                                Micro::Bf16Dot => {
                                    let kp_all = k.div_ceil(2);
                                    let xb = (xp.as_ptr() as *const u32)
                                        .add(b * kp_all * MR + pc / 2 * MR);
                                    let kp = kc.div_ceil(2);
                                    let wp = wp as *const u16;
                                    avx512::dp_kernel::<MR>(kp, xb, wp, cp, ldc, pc == 0);
                                }
                            }
                        }
                    }
                }
                epilogue(c, ldc, m, w, bias, (cols, n), out);
            });
        }
    }
}

/// A task's epilogue: biases, σ(gate) ⊙ up or a plain copy, rounded once into `out`. `c`
/// holds `m` rows of `ldc` sums: per panel, 32 columns of one matrix, or 16 gate columns
/// then the same 16 up columns; the task's outputs are `cols` of `n`.
pub(crate) unsafe fn epilogue<T: Element>(
    c: &mut [f32],
    ldc: usize,
    m: usize,
    w: Weights<'_>,
    bias: Bias<'_>,
    (cols, n): (Columns, usize),
    out: DisjointOut<'_, T>,
) {
    // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
    // checked, and the pointers it reads and writes lie inside the buffers it was given.
    unsafe {
        for r in 0..m {
            let row = c.as_mut_ptr().add(r * ldc);
            for p in 0..cols.panels() {
                let (j, valid) = cols.panel(p);
                let src = row.add(p * NR);
                if let Some(b) = bias.a {
                    avx512::add_assign(src, b.as_ptr().add(j), valid);
                }
                if let Weights::GateUp(_, _, act) = w {
                    if let Some(b) = bias.b {
                        avx512::add_assign(src.add(16), b.as_ptr().add(j), valid);
                    }
                    // Rounded once, straight into `out` (not through `src` and a copy).
                    avx512::gated(act, src, src.add(16), out.at(r * n + j), valid);
                } else {
                    avx512::narrow(src, out.at(r * n + j), valid);
                }
            }
        }
    }
}

/// The 32 weight rows of the panel starting at output column `j` (up to `end`): 32 rows of
/// one matrix, or 16 gate rows then the same 16 up rows. Rows past `end` are `None` (zeros).
pub(crate) fn panel_rows(w: Weights<'_>, j: usize, end: usize) -> [Option<*const u8>; NR] {
    let row = |mat: Mat<'_>, j: usize| (j < end).then(|| mat.row(j));
    std::array::from_fn(|r| match w {
        Weights::Single(mat) => row(mat, j + r),
        Weights::GateUp(wg, wu, _) => {
            if r < NR / 2 {
                row(wg, j + r)
            } else {
                row(wu, j + r - NR / 2)
            }
        }
    })
}

/// `[blocks][k][MR]` f32 into `xp` (every value written; zero rows past `m`).
unsafe fn pack_x_f32<T: Element>(x: &[T], m: usize, k: usize, xp: &mut [f32]) {
    let blocks = xp.len() / (k * MR);
    let dst = DisjointOut::new(xp);
    parallel_for(blocks, |b| {
        let rows: Vec<*const T> = (b * MR..m.min((b + 1) * MR))
            .map(|r| x[r * k..].as_ptr())
            .collect();
        // SAFETY: each row holds k values; block b of dst holds k × MR, written by this
        // task only.
        unsafe { avx512::pack_tokens12(&rows, k, dst.at(b * k * MR)) };
    });
}

/// `[blocks][⌈k/2⌉][MR]` bf16 pairs (as u32 in an f32 buffer) into `xp` (every value
/// written; zeros past `m` and `k`). Only bf16 activations take the dot-product kernel.
unsafe fn pack_x_pairs<T: Element>(x: &[T], m: usize, k: usize, xp: &mut [f32]) {
    debug_assert_eq!(T::DTYPE, candle_core::DType::BF16);
    let kp = k.div_ceil(2);
    let blocks = xp.len() / (kp * MR);
    let dst = DisjointOut::new(xp);
    parallel_for(blocks, |b| {
        let rows: Vec<*const u16> = (b * MR..m.min((b + 1) * MR))
            .map(|r| x[r * k..].as_ptr() as *const u16)
            .collect();
        // SAFETY: each row holds k bf16 values; block b of dst holds ⌈k/2⌉ × MR u32,
        // written by this task only.
        unsafe { avx512::pack_tokens12_pairs(&rows, k, dst.at(b * kp * MR) as *mut u32) };
    });
}
