//! The tiled schedule: dense bf16 prefill on the AMX tiles ([`amx`]).
//!
//! The weights are the tile products' first operand, whose tiles are plain rows: 16 weight rows
//! of 32 values. Work is split by output columns, in panels of 32 weight rows (32 rows of one
//! matrix, or 16 gate rows and the same 16 up rows); per depth block, a panel's rows are copied
//! from the weight's own `[out, in]` rows into contiguous tiles in a per-thread buffer (zeros past
//! the matrix's rows and depth), and every pair of token tiles uses them from there. No copy of
//! the weights is kept. Tiles loaded from contiguous 1 KiB beat tiles loaded straight from the
//! rows, 8 KiB apart in a 7B layer, by a third (891 against 672 GFLOP/s on one core, same data
//! in L2): tile loads, not products, bound the kernels here, and strided ones touch 16 pages.
//!
//! The tokens are bf16 already on this path; they are packed once per call in the VNNI pair
//! layout, 16 tokens a tile. The sums come out transposed, `C[column][token]`; the epilogue adds
//! the biases, applies `σ(gate) ⊙ up`, transposes and rounds them once into the output.

use std::arch::x86_64::*;

use super::amx::{self, Tiles, TILE_BYTES};
use super::avx512;
use super::parallel::{parallel_for, with_buffer, with_scratch, DisjointOut};
use super::{Bias, Mat, Weights};

/// From this many tokens the tiles beat the dot schedule's streamed rows (measured on 7B bf16;
/// below it, decode is bound by the weights' read either way).
pub(crate) const MIN_TOKENS: usize = 4;
/// Weight rows per panel, and per micro-kernel call: two tiles of 16.
const ROWS: usize = 32;
/// Values of the input dimension per tile step.
const STEP: usize = 32;
/// The most panels per task.
const PANELS: usize = 8;
/// The depth of one block: 4096 values (a panel's 32 rows of it are 256 KiB, in L2). Deeper
/// blocks mean fewer reloads of the sums; on 7B bf16 at 128 and 512 tokens 4096 was the best
/// of 1024 to 11008, by 3–25%.
const DEPTH: usize = 4096;
/// From this many tokens the weight tiles are packed (a panel's rows over one depth block,
/// into contiguous tiles) rather than read in place: measured on 7B bf16 (Intel Xeon with AMX,
/// 2 threads, alternating in one process), packed tiles were 1.09× faster at 128 tokens and
/// 1.22× at 512, and 0.88× as fast at 64, 0.65× at 16, where the call is bound by reading the
/// weights from memory and the copy only adds to it.
const PACK_MIN_TOKENS: usize = 96;
/// Bytes of sums one task may keep: 512 KiB.
const SUM_BYTES: usize = 1 << 19;

/// `y = x·Wᵀ + b`, or `h = σ(x·Wgᵀ + bg) ⊙ (x·Wuᵀ + bu)`, on the tiles: `x` is `[m, k]` bf16 (as
/// bits), the weights `[n, k]` dense bf16; writes `[m, n]` bf16 into `out`.
///
/// # Safety
/// [`features`](crate::kernels::detect::features)`().amx_bf16` must be true; `x` holds `m × k`
/// values, the weights `n` rows of `k` bf16, biases (if any) `n` values, `out` `m × n`.
pub(crate) unsafe fn run(
    x: &[u16],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    out: &mut [u16],
) {
    debug_assert!(m > 0 && k > 0 && n > 0);
    let tiles = m.div_ceil(16);
    let steps = k.div_ceil(STEP);
    thread_local! {
        static TOKENS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // Packed tokens: by tile of 16 tokens, then by step, a tile of 16 pair-rows of 64 bytes
    // (as u16 in an f32 buffer, two per slot).
    let len = tiles * steps * TILE_BYTES / 4;
    with_buffer(&TOKENS, len, |buf| {
        buf.fill(0.0);
        let dst = DisjointOut::new(&mut *buf);
        parallel_for(tiles, |tb| {
            let rows: [Option<*const u16>; 16] = std::array::from_fn(|i| {
                let t = tb * 16 + i;
                (t < m).then(|| x[t * k..].as_ptr())
            });
            // SAFETY: tile tb of the buffer (steps × 1 KiB) is written by this task only; each
            // row holds k values; the pair-rows past k stay the zeros written above.
            unsafe {
                let at = dst.at(tb * steps * TILE_BYTES / 4) as *mut u16;
                avx512::pack16_pairs(&rows, k, at, 32);
            }
        });
        let toks = Tokens {
            base: buf.as_ptr() as *const u16,
            tiles,
            steps,
        };
        // SAFETY: the caller's contract, and the tokens just packed.
        unsafe { run_tasks(&toks, m, k, w, n, bias, out) };
    });
}

/// The packed tokens of a call.
struct Tokens {
    base: *const u16,
    tiles: usize,
    steps: usize,
}

// SAFETY: the packed tokens are only read while the tasks run, and outlive them.
unsafe impl Sync for Tokens {}

impl Tokens {
    /// Token tile `tb` at step `s`.
    fn at(&self, tb: usize, s: usize) -> *const u16 {
        self.base
            .wrapping_byte_add((tb * self.steps + s) * TILE_BYTES)
    }
}

/// The tasks: `per_task` output columns each, in panels.
unsafe fn run_tasks(
    toks: &Tokens,
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    out: &mut [u16],
) {
    let mp = toks.tiles * 16;
    // Output columns per panel: 32 of one matrix, or 16 (16 gate and 16 up rows).
    let per_panel = match w {
        Weights::Single(_) => ROWS,
        Weights::GateUp(..) => ROWS / 2,
    };
    let panels = (SUM_BYTES / (ROWS * mp * 4)).clamp(1, PANELS);
    let per_task = per_panel * panels;
    // Whole steps: the packed panel's buffer holds `kc` values a row.
    let kc = DEPTH.min(k.next_multiple_of(STEP));
    let out = DisjointOut::new(out);
    parallel_for(n.div_ceil(per_task), |t| {
        let j0 = t * per_task;
        let cols = per_task.min(n - j0);
        let task = Task {
            m,
            k,
            n,
            kc,
            j0,
            cols,
            per_panel,
        };
        // SAFETY: tasks write disjoint column ranges [j0, j0 + cols) of `out`; the caller's
        // contract covers the rest.
        unsafe { task.run(toks, w, bias, out) }
    });
}

/// One task's share: output columns `[j0, j0 + cols)` for every token.
struct Task {
    m: usize,
    k: usize,
    n: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    per_panel: usize,
}

impl Task {
    unsafe fn run(&self, toks: &Tokens, w: Weights<'_>, bias: Bias<'_>, out: DisjointOut<'_, u16>) {
        let Task {
            m,
            k,
            kc,
            j0,
            cols,
            per_panel,
            ..
        } = *self;
        let mp = toks.tiles * 16;
        let panels = cols.div_ceil(per_panel);
        // Sums `C[row][token]`, 32 rows a panel; a panel's rows over one depth block, packed.
        with_scratch(panels * ROWS * mp, ROWS * kc / 2, |c, packed| {
            // SAFETY: `features().amx_bf16` is the caller's contract.
            let _tiles = unsafe { Tiles::configure() };
            let cs = mp * 4;
            // Panel after panel, a depth block at a time, each against every token: a panel's
            // rows stream from memory once. (Chunks of tokens small enough to keep their tiles
            // in L2 while every panel used them were no faster at 512 tokens: the tiles' loads,
            // not the caches, bound the kernels.)
            let pairs = toks.tiles.div_ceil(2);
            let blocks = (0..panels).flat_map(|p| (0..k).step_by(kc).map(move |pc| (p, pc)));
            for (p, pc) in blocks {
                let depth = kc.min(k - pc);
                let steps = depth.div_ceil(STEP);
                let j = j0 + p * per_panel;
                let valid = per_panel.min(j0 + cols - j);
                let a = match in_place(w, j, valid, k).filter(|_| m < PACK_MIN_TOKENS) {
                    Some((a0, a1, stride)) => {
                        (a0.wrapping_add(pc), a1.wrapping_add(pc), stride, 64)
                    }
                    None => {
                        // SAFETY: `packed` holds 32 rows of kc values (checked in `pack_panel`);
                        // the weights hold their rows.
                        unsafe { pack_panel(w, j, valid, pc, depth, &mut *packed) };
                        let a0 = packed.as_ptr() as *const u16;
                        let a1 = a0.wrapping_byte_add(steps * TILE_BYTES);
                        (a0, a1, 64, TILE_BYTES)
                    }
                };
                let cp = c.as_mut_ptr().wrapping_add(p * ROWS * mp);
                for pair in 0..pairs {
                    let tb = 2 * pair;
                    let (b0, s) = (toks.at(tb, pc / STEP), pc > 0);
                    let ct = cp.wrapping_add(tb * 16);
                    // SAFETY: the packed panel holds `steps` tiles a group, the token tiles exist
                    // for every step, and `ct` has 32 rows of `mp` sums; this thread's tiles are
                    // configured.
                    unsafe {
                        if tb + 1 < toks.tiles {
                            let b1 = toks.at(tb + 1, pc / STEP);
                            amx::bf16_2x2(steps, a, (b0, b1), ct, cs, s);
                        } else {
                            amx::bf16_2x1(steps, a, b0, ct, cs, s);
                        }
                    }
                }
            }
            drop(_tiles);
            for p in 0..panels {
                let j = j0 + p * per_panel;
                let valid = per_panel.min(j0 + cols - j);
                let sums = c.as_ptr().wrapping_add(p * ROWS * mp);
                // SAFETY: the panel's sums are written; the output columns [j, j + valid) are
                // this task's; the features are the caller's contract.
                unsafe { epilogue(sums, mp, m, w, bias, j, valid, self.n, out) };
            }
        });
    }
}

/// The panel's two groups of 16 rows in place, and their distance in bytes, when both are whole
/// and the depth is a multiple of 32 (the tiles then never read past a row).
fn in_place(
    w: Weights<'_>,
    j: usize,
    valid: usize,
    k: usize,
) -> Option<(*const u16, *const u16, usize)> {
    let (m0, r0, m1, r1, whole) = match w {
        Weights::Single(mat) => (mat, j, mat, j + 16, valid == 32),
        Weights::GateUp(wg, wu, _) => (wg, j, wu, j, valid == 16),
    };
    (whole && k.is_multiple_of(STEP)).then(|| {
        (
            m0.row(r0) as *const u16,
            m1.row(r1) as *const u16,
            m0.row_bytes(),
        )
    })
}

/// Packs the panel of output columns `[j, j + valid)` over values `[pc, pc + depth)` into
/// `dst` as the kernels' first operand: two groups of 16 rows (32 rows of one matrix, or 16 gate
/// and the same 16 up rows), each a tile per step of 32 values (16 rows of 64 bytes, 1 KiB),
/// group after group; zeros past the matrix's rows and past `depth`.
///
/// # Safety
/// The weights hold their rows of bf16 up to `pc + depth`.
///
/// # Panics
/// If `dst` is shorter than `2 × ⌈depth / 32⌉` KiB (a bug of the schedule).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn pack_panel(
    w: Weights<'_>,
    j: usize,
    valid: usize,
    pc: usize,
    depth: usize,
    dst: &mut [f32],
) {
    let groups: [(Mat<'_>, usize, usize); 2] = match w {
        Weights::Single(mat) => [
            (mat, j, valid.min(16)),
            (mat, j + 16, valid.saturating_sub(16)),
        ],
        Weights::GateUp(wg, wu, _) => [(wg, j, valid), (wu, j, valid)],
    };
    let steps = depth.div_ceil(STEP);
    assert!(
        std::mem::size_of_val(dst) >= 2 * steps * TILE_BYTES,
        "packed panel buffer"
    );
    let dst = dst.as_mut_ptr() as *mut u16;
    // SAFETY: the caller's contract: every row read exists and holds `pc + depth` values; every
    // tile written lies in `dst` (just checked).
    unsafe {
        // Step by step across the 32 rows, as the kernels read them: 32 streams at once keep
        // memory busier than one row after another.
        let srcs: [*const u16; ROWS] = std::array::from_fn(|i| {
            let (mat, r0, _) = groups[i / 16];
            (mat.row(r0 + i % 16) as *const u16).wrapping_add(pc)
        });
        for s in 0..steps {
            let n = (depth - s * STEP).min(STEP);
            for (i, src) in srcs.iter().enumerate() {
                let (g, r) = (i / 16, i % 16);
                let mask = if r < groups[g].2 {
                    u32::MAX >> (32 - n)
                } else {
                    0
                };
                let v = _mm512_maskz_loadu_epi16(mask, src.wrapping_add(s * STEP) as *const i16);
                let tile = dst.add((g * steps + s) * TILE_BYTES / 2);
                _mm512_storeu_si512(tile.add(r * STEP) as *mut _, v);
            }
        }
    }
}

/// A panel's epilogue: `sums` holds 32 rows (`C[row][token]`, `mp` tokens a row) for output
/// columns `[j, j + valid)`: 32 columns of one matrix, or 16 gate then the same 16 up columns.
/// Adds the biases, applies `σ(gate) ⊙ up`, and writes `out[token][j..]` for the `m` tokens,
/// rounded once to bf16.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn epilogue(
    sums: *const f32,
    mp: usize,
    m: usize,
    w: Weights<'_>,
    bias: Bias<'_>,
    j: usize,
    valid: usize,
    n: usize,
    out: DisjointOut<'_, u16>,
) {
    let bias_at = |b: Option<&[f32]>, c: usize| b.map_or(0.0, |b| b[j + c]);
    // SAFETY: the caller's contract: the sums, the biases' n values and the output's m × n
    // values hold every index below; the features are checked.
    unsafe {
        for t0 in (0..m).step_by(16) {
            let tokens = (m - t0).min(16);
            let row = |r: usize| _mm512_loadu_ps(sums.add(r * mp + t0));
            // Per group of 16 output columns: the column vectors (16 tokens each), then
            // transposed to token rows.
            let groups: &[usize] = match w {
                Weights::Single(_) => &[0, 16],
                Weights::GateUp(..) => &[0],
            };
            for &g in groups {
                let cols = valid.saturating_sub(g).min(16);
                if cols == 0 {
                    continue;
                }
                let mut v = [_mm512_setzero_ps(); 16];
                for (c, v) in v.iter_mut().enumerate().take(cols) {
                    *v = match w {
                        Weights::Single(_) => {
                            let b = _mm512_set1_ps(bias_at(bias.a, g + c));
                            _mm512_add_ps(row(g + c), b)
                        }
                        Weights::GateUp(_, _, act) => {
                            let gate = _mm512_add_ps(row(c), _mm512_set1_ps(bias_at(bias.a, c)));
                            let up = _mm512_add_ps(row(16 + c), _mm512_set1_ps(bias_at(bias.b, c)));
                            _mm512_mul_ps(avx512::activation(act, gate), up)
                        }
                    };
                }
                avx512::transpose16(&mut v);
                let mask = avx512::tail_mask(cols);
                for (i, v) in v.iter().enumerate().take(tokens) {
                    let dst = out.at((t0 + i) * n + j + g) as *mut half::bf16;
                    avx512::store16_mask(dst, *v, mask);
                }
            }
        }
    }
}
