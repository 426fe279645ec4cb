//! The CPU matmuls of the block, `x · Wᵀ` with weights in their checkpoint layout `[out, in]`,
//! f32 accumulation, and the gate/up product fused into the epilogue:
//!
//! - [`gate_up`]: `h = σ(x·Wgᵀ + bg) ⊙ (x·Wuᵀ + bu)`, never materialising either product;
//! - [`linear`]: `y = x·Wᵀ + b`.
//!
//! Weights are dense f32/bf16/f16 rows or GGUF Q4_1 blocks ([`avx512::Format`]); activations and
//! outputs are f32/bf16/f16 ([`Element`]). Two schedules, chosen by the number of tokens `m`:
//!
//! - **dot** (`m ≤ DOT_MAX_TOKENS`, decode): each weight row is streamed once from memory and
//!   dotted with every token, in L1-sized chunks past three tokens; weights are read in place
//!   (past six tokens, each chunk of Q4_1 rows is decoded once into a 32 KiB per-thread buffer).
//! - **packed** (prefill): GotoBLAS-style blocking. Tokens are packed once, weights per
//!   `KC`-deep block of `PANELS × 32` columns into a per-thread buffer that stays in L2, and a
//!   register micro-kernel computes 12 tokens × 32 columns at a time, with f32 FMAs or, for bf16
//!   on CPUs where it is faster, bf16 dot products (VDPBF16PS).
//!
//! Work is split by output columns across candle's CPU worker pool. Only AVX-512 machines take
//! these paths (see [`Features`]); others use candle's ops.

use std::cell::RefCell;
use std::sync::OnceLock;

use super::avx512;
pub(crate) use super::avx512::{Dense, Format, Q4_1};
use super::element::Element;
use super::Act;

/// Up to this many tokens, the dot schedule.
pub(crate) const DOT_MAX_TOKENS: usize = 16;
/// Tokens per micro-kernel tile.
const MR: usize = 12;
/// Columns per micro-kernel tile (two 16-lane vectors).
const NR: usize = 32;
/// Depth of one weight block (a multiple of 32, so Q4_1 blocks are never split).
const KC: usize = 512;
/// Panels (of `NR` columns) per task: `KC × PANELS × NR` f32 is 512 KiB, inside L2.
const PANELS: usize = 8;

/// What this CPU offers the kernels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Features {
    /// AVX-512 F/BW/VL with FMA and F16C: every kernel here.
    pub avx512: bool,
    /// AVX512-BF16, and its dot products beat f32 FMAs here (they run at twice the FMA rate on
    /// AMD Zen 4/5, and at half of it on Intel's Sapphire Rapids).
    pub bf16_dot: bool,
    /// AVX-512 with VNNI (VPDPBUSD): the q8_0 and q4k kernels.
    pub vnni: bool,
}

/// The CPU's features, probed once.
pub(crate) fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        let bf16 = avx512 && std::arch::is_x86_feature_detected!("avx512bf16");
        Features {
            avx512,
            bf16_dot: bf16 && calibrate::bf16_dot_is_faster(),
            vnni: avx512 && std::arch::is_x86_feature_detected!("avx512vnni"),
        }
    })
}

/// How the packed schedule multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compute {
    /// f32 FMAs on widened values: any format.
    Fma,
    /// bf16 dot products: dense bf16 weights and bf16 activations only.
    Bf16Dot,
}

impl Compute {
    /// The fastest compute for dense `T` weights and activations on this CPU.
    pub(crate) fn best<T: Element>() -> Self {
        if T::DTYPE == candle_core::DType::BF16 && features().bf16_dot {
            Compute::Bf16Dot
        } else {
            Compute::Fma
        }
    }
}

/// A weight matrix `[n, k]` in some [`Format`], by its first byte.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat {
    base: *const u8,
    row_bytes: usize,
}

// SAFETY: a `Mat` is a read-only view of weights that outlive every call it is passed to.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// Dense `[n, k]` rows.
    pub(crate) fn dense<T: Element>(w: &[T], k: usize) -> Self {
        Self {
            base: w.as_ptr() as *const u8,
            row_bytes: Dense::<T>::row_bytes(k),
        }
    }

    /// Rows of `row_bytes` bytes each (GGUF blocks).
    pub(crate) fn blocks(w: &[u8], row_bytes: usize) -> Self {
        Self {
            base: w.as_ptr(),
            row_bytes,
        }
    }

    pub(super) fn row(&self, j: usize) -> *const u8 {
        self.base.wrapping_add(j * self.row_bytes)
    }
}

/// The weights of one call.
#[derive(Clone, Copy)]
pub(crate) enum Weights {
    /// One matrix: `y = x·Wᵀ`.
    Single(Mat),
    /// Gate and up: `h = σ(x·Wgᵀ) ⊙ x·Wuᵀ`.
    GateUp(Mat, Mat, Act),
}

/// Biases added before the epilogue, `n` f32 each: the single matrix's (or the gate's) in `a`,
/// the up projection's in `b`.
#[derive(Clone, Copy, Default)]
pub(crate) struct Bias<'a> {
    pub a: Option<&'a [f32]>,
    pub b: Option<&'a [f32]>,
}

/// `h = σ(x·Wgᵀ + bg) ⊙ (x·Wuᵀ + bu)`: `x` is `[m, k]`, `wg` and `wu` `[n, k]` in format `F`;
/// returns `[m, n]`.
///
/// # Safety
/// [`features`]`().avx512` must be true; `wg` and `wu` hold `n` rows of `k` values in format
/// `F`; biases, if any, hold `n` values; [`Compute::Bf16Dot`] only with `F = Dense<bf16>`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gate_up<T: Element, F: Format>(
    x: &[T],
    m: usize,
    k: usize,
    wg: Mat,
    wu: Mat,
    n: usize,
    act: Act,
    bias: Bias<'_>,
    compute: Compute,
) -> Vec<T> {
    run::<T, F>(x, m, k, Weights::GateUp(wg, wu, act), n, bias, compute)
}

/// `y = x·Wᵀ + b`: `x` is `[m, k]`, `w` `[n, k]` in format `F`; returns `[m, n]`.
///
/// # Safety
/// As [`gate_up`].
pub(crate) unsafe fn linear<T: Element, F: Format>(
    x: &[T],
    m: usize,
    k: usize,
    w: Mat,
    n: usize,
    bias: Option<&[f32]>,
    compute: Compute,
) -> Vec<T> {
    let bias = Bias { a: bias, b: None };
    run::<T, F>(x, m, k, Weights::Single(w), n, bias, compute)
}

unsafe fn run<T: Element, F: Format>(
    x: &[T],
    m: usize,
    k: usize,
    w: Weights,
    n: usize,
    bias: Bias<'_>,
    compute: Compute,
) -> Vec<T> {
    debug_assert_eq!(x.len(), m * k);
    let mut out = vec![T::default(); m * n];
    if m == 0 || n == 0 {
        return out;
    }
    // The dot schedule also takes k = 0 (sums of nothing, plus the biases).
    if m <= DOT_MAX_TOKENS || k == 0 {
        dot::run::<T, F>(x, m, k, w, n, bias, &mut out);
    } else {
        packed::run::<T, F>(x, m, k, w, n, bias, compute, &mut out);
    }
    out
}

/// Runs `f(i)` for every `i` in `0..n` on candle's own CPU worker pool (the one its quantized
/// matmuls use), this thread included. Sharing candle's pool rather than keeping one of our own
/// means a model's other layers and this block never have two sets of threads spinning for the
/// same cores.
pub(super) fn parallel_for(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |range| range.for_each(&f));
}

/// A pointer that tasks writing disjoint parts of one buffer share.
#[derive(Clone, Copy)]
pub(super) struct SendPtr<T>(pub(super) *mut T);
// SAFETY: every task writes its own disjoint columns; see the callers.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

thread_local! {
    /// Per-thread scratch, kept between calls: packed weights and the task's accumulators.
    static SCRATCH_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's buffer in `key`, grown to at least `len` f32 and kept between
/// calls (fresh pages would cost a fault every 4 KiB); on a fresh one should it be in use, as
/// when a forward runs inside another's task on the same thread.
fn with_buffer<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| {
        let (mut guard, mut own) = (cell.try_borrow_mut().ok(), Vec::new());
        let buf = guard.as_deref_mut().unwrap_or(&mut own);
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Borrows this thread's two scratch buffers, of at least `a` and `b` f32.
pub(super) fn with_scratch<R>(
    a: usize,
    b: usize,
    f: impl FnOnce(&mut [f32], &mut [f32]) -> R,
) -> R {
    with_buffer(&SCRATCH_A, a, |sa| {
        with_buffer(&SCRATCH_B, b, |sb| f(sa, sb))
    })
}

pub(super) mod dot {
    //! Few tokens: weight rows streamed in place, 8 at a time, dotted with up to 3 tokens.

    use super::*;

    /// Weight rows per kernel call.
    pub(crate) const R: usize = 8;
    /// Output columns per task.
    const COLS: usize = 64;
    /// Values of each row per pass over more than three tokens (a multiple of 32, for Q4_1):
    /// 8 rows of 1024 f32 are 32 KiB, inside L1.
    const CHUNK: usize = 1024;

    thread_local! {
        /// Per-thread buffer for a chunk of `R` rows widened to f32.
        static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) unsafe fn run<T: Element, F: Format>(
        x: &[T],
        m: usize,
        k: usize,
        w: Weights,
        n: usize,
        bias: Bias<'_>,
        out: &mut [T],
    ) {
        // Tokens as f32, once.
        let mut xf = vec![0f32; m * k];
        avx512::widen(x.as_ptr(), xf.as_mut_ptr(), m * k);
        let sums = DenseSums::<F> {
            xf: &xf,
            m,
            k,
            format: std::marker::PhantomData,
        };
        run_with(m, w, n, bias, out, &sums);
    }

    /// A way of taking the sums of `R` weight rows with every token of a call (generic, so
    /// that `put` inlines: it runs once per row and token).
    pub(crate) trait RowSums: Sync {
        /// Calls `put(token, row, sum)` for every token and the `R` rows. `ahead` is how many
        /// bytes past each row the same row of the next call starts, for prefetching (the
        /// dense kernels, already at the read floor, ignore it).
        ///
        /// # Safety
        /// The rows hold the values the implementation was made for, in its format.
        unsafe fn sums(
            &self,
            rows: [*const u8; R],
            ahead: usize,
            put: impl FnMut(usize, usize, f32),
        );
    }

    /// Rows in format `F` against f32 tokens `xf` (`m` of `k` values).
    struct DenseSums<'a, F> {
        xf: &'a [f32],
        m: usize,
        k: usize,
        format: std::marker::PhantomData<F>,
    }

    impl<F: Format> RowSums for DenseSums<'_, F> {
        unsafe fn sums(
            &self,
            rows: [*const u8; R],
            _ahead: usize,
            put: impl FnMut(usize, usize, f32),
        ) {
            sums::<F>(self.xf, self.m, self.k, rows, put)
        }
    }

    /// The schedule around a way of taking row sums: tasks of `COLS` output columns, each
    /// adding biases, the gated product and the rounding to `T` to its rows' sums.
    pub(crate) fn run_with<T: Element, S: RowSums>(
        m: usize,
        w: Weights,
        n: usize,
        bias: Bias<'_>,
        out: &mut [T],
        sums: &S,
    ) {
        let out = SendPtr(out.as_mut_ptr());
        parallel_for(n.div_ceil(COLS), |t| {
            let j0 = t * COLS;
            let cols = COLS.min(n - j0);
            // SAFETY: tasks write disjoint column ranges [j0, j0 + cols) of `out`.
            unsafe { task::<T, S>(m, w, n, bias, j0, cols, out, sums) }
        });
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn task<T: Element, S: RowSums>(
        m: usize,
        w: Weights,
        n: usize,
        bias: Bias<'_>,
        j0: usize,
        cols: usize,
        out: SendPtr<T>,
        sums: &S,
    ) {
        let add = |b: Option<&[f32]>, j: usize| b.map_or(0.0, |b| b[j0 + j]);
        // Past the task's last column, rows repeat the last one; their sums are dropped.
        let row = |mat: Mat, j: usize| mat.row(j0 + j.min(cols - 1));
        // Row sums for the task's columns: gate (or plain) in `a`, up in `b`.
        with_scratch(m * cols, m * cols, |a, b| {
            match w {
                Weights::Single(mat) => {
                    for j in (0..cols).step_by(R) {
                        let rows = std::array::from_fn(|r| row(mat, j + r));
                        sums.sums(rows, R * mat.row_bytes, |t, r, s| {
                            if j + r < cols {
                                a[t * cols + j + r] = s + add(bias.a, j + r);
                            }
                        });
                    }
                }
                Weights::GateUp(wg, wu, act) => {
                    // Four columns a call: their gate rows, then their up rows.
                    let half = R / 2;
                    for j in (0..cols).step_by(half) {
                        let rows = std::array::from_fn(|r| {
                            if r < half {
                                row(wg, j + r)
                            } else {
                                row(wu, j + r - half)
                            }
                        });
                        // Gate and up rows are alike, so one distance serves both.
                        debug_assert_eq!(wg.row_bytes, wu.row_bytes);
                        sums.sums(rows, half * wg.row_bytes, |t, r, s| {
                            let (buf, c, bb) = if r < half {
                                (&mut *a, r, bias.a)
                            } else {
                                (&mut *b, r - half, bias.b)
                            };
                            if j + c < cols {
                                buf[t * cols + j + c] = s + add(bb, j + c);
                            }
                        });
                    }
                    for t in 0..m {
                        let (g, u) = (a.as_mut_ptr().add(t * cols), b.as_ptr().add(t * cols));
                        avx512::gated(act, g, u, g, cols);
                    }
                }
            }
            for t in 0..m {
                avx512::narrow(a.as_ptr().add(t * cols), out.0.add(t * n + j0), cols);
            }
        });
    }

    /// Calls `put(token, row, sum)` for every token and the `R` rows, three tokens at a time.
    ///
    /// Past three tokens, the rows are taken `CHUNK` values at a time, so that every pass over
    /// the tokens reads them from L1 rather than L2; past six tokens, Q4_1 rows are dequantized
    /// once per chunk rather than once per pass.
    unsafe fn sums<F: Format>(
        xf: &[f32],
        m: usize,
        k: usize,
        rows: [*const u8; R],
        mut put: impl FnMut(usize, usize, f32),
    ) {
        // Sums of nothing; the schedule takes more than DOT_MAX_TOKENS tokens only then.
        if k == 0 {
            for t in 0..m {
                for r in 0..R {
                    put(t, r, 0.0);
                }
            }
            return;
        }
        let mut total = [[0f32; R]; DOT_MAX_TOKENS];
        let step = if m <= 3 { k } else { CHUNK };
        let widen = m > 6 && F::WIDEN;
        with_buffer(&WIDE, if widen { R * CHUNK } else { 0 }, |wide| {
            let mut c0 = 0;
            while c0 < k {
                let kc = step.min(k - c0);
                let rows = rows.map(|row| row.add(F::row_bytes(c0)));
                if widen {
                    for (r, row) in rows.iter().enumerate() {
                        avx512::widen_row::<F>(*row, wide.as_mut_ptr().add(r * CHUNK), kc);
                    }
                }
                let wide_rows: [*const u8; R] =
                    std::array::from_fn(|r| wide.as_ptr().wrapping_add(r * CHUNK) as *const u8);
                let mut t = 0;
                while t < m {
                    let x = xf.as_ptr().add(t * k + c0);
                    macro_rules! tokens {
                        ($tt:literal) => {{
                            let mut s = [[0f32; R]; $tt];
                            if widen {
                                Dense::<f32>::dot::<R, $tt>(kc, wide_rows, x, k, &mut s);
                            } else {
                                F::dot::<R, $tt>(kc, rows, x, k, &mut s);
                            }
                            for (total, s) in total[t..].iter_mut().zip(&s) {
                                for (total, s) in total.iter_mut().zip(s) {
                                    *total += s;
                                }
                            }
                            t += $tt;
                        }};
                    }
                    match m - t {
                        1 => tokens!(1),
                        2 => tokens!(2),
                        _ => tokens!(3),
                    }
                }
                c0 += kc;
            }
        });
        for (t, total) in total[..m].iter().enumerate() {
            for (r, s) in total.iter().enumerate() {
                put(t, r, *s);
            }
        }
    }
}

pub(super) mod packed {
    //! Many tokens: packed operands and a register-blocked micro-kernel.

    use super::*;

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run<T: Element, F: Format>(
        x: &[T],
        m: usize,
        k: usize,
        w: Weights,
        n: usize,
        bias: Bias<'_>,
        compute: Compute,
        out: &mut [T],
    ) {
        let blocks = m.div_ceil(MR);
        // Tokens packed once for every task: block-major, then k, then the block's 12 tokens,
        // into a buffer kept between calls (fresh pages would cost a fault every 4 KiB).
        let len = match compute {
            Compute::Fma => blocks * k * MR,
            Compute::Bf16Dot => blocks * k.div_ceil(2) * MR,
        };
        with_packed_tokens(len, |xp| {
            match compute {
                Compute::Fma => pack_x_f32(x, m, k, xp),
                Compute::Bf16Dot => pack_x_pairs(x, m, k, xp),
            }
            run_tasks::<T, F>(xp, blocks, m, k, w, n, bias, compute, out);
        });
    }

    /// Runs `f` on this thread's packed-token buffer of `len` f32, or on a fresh one if it is in
    /// use (a forward called from inside another's task on the same thread).
    fn with_packed_tokens(len: usize, f: impl FnOnce(&mut [f32])) {
        thread_local! {
            static TOKENS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        with_buffer(&TOKENS, len, f)
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn run_tasks<T: Element, F: Format>(
        xp: &[f32],
        blocks: usize,
        m: usize,
        k: usize,
        w: Weights,
        n: usize,
        bias: Bias<'_>,
        compute: Compute,
        out: &mut [T],
    ) {
        // Output columns per panel: 32, or 16 gate + 16 up columns giving 16 outputs.
        let per_panel = match w {
            Weights::Single(_) => NR,
            Weights::GateUp(..) => NR / 2,
        };
        let per_task = per_panel * PANELS;
        let out = SendPtr(out.as_mut_ptr());
        parallel_for(n.div_ceil(per_task), |t| {
            let j0 = t * per_task;
            let cols = per_task.min(n - j0);
            let task = Task {
                blocks,
                m,
                k,
                n,
                j0,
                cols,
                per_panel,
            };
            // SAFETY: tasks write disjoint column ranges [j0, j0 + cols) of `out`.
            unsafe { task.run::<T, F>(xp, w, bias, compute, out) }
        });
    }

    /// One task's share: output columns `[j0, j0 + cols)` for every token.
    struct Task {
        blocks: usize,
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        cols: usize,
        per_panel: usize,
    }

    impl Task {
        unsafe fn run<T: Element, F: Format>(
            &self,
            xp: &[f32],
            w: Weights,
            bias: Bias<'_>,
            compute: Compute,
            out: SendPtr<T>,
        ) {
            let Task {
                blocks,
                m,
                k,
                n,
                j0,
                cols,
                per_panel,
            } = *self;
            let panels = cols.div_ceil(per_panel);
            let ldc = panels * NR;
            with_scratch(panels * KC * NR, blocks * MR * ldc, |wbuf, c| {
                for pc in (0..k).step_by(KC) {
                    let kc = KC.min(k - pc);
                    for p in 0..panels {
                        let rows = panel_rows(w, j0 + p * per_panel, j0 + cols);
                        let dst = wbuf.as_mut_ptr().add(p * KC * NR);
                        match compute {
                            Compute::Fma => {
                                for half in 0..2 {
                                    let rows = std::array::from_fn(|r| rows[half * 16 + r]);
                                    avx512::pack16_f32::<F>(&rows, pc, kc, dst.add(half * 16), NR);
                                }
                            }
                            Compute::Bf16Dot => {
                                // Dense bf16 rows only: their bits are packed as they are.
                                let dst = dst as *mut u16;
                                for half in 0..2 {
                                    let rows = std::array::from_fn(|r| {
                                        rows[half * 16 + r].map(|p| (p as *const u16).add(pc))
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
                            match compute {
                                Compute::Fma => {
                                    let xb = xp.as_ptr().add(b * k * MR + pc * MR);
                                    avx512::fma_kernel::<MR>(kc, xb, wp, cp, ldc, pc == 0);
                                }
                                Compute::Bf16Dot => {
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
                epilogue(c, ldc, m, w, bias, (j0, cols, per_panel, n), out);
            });
        }
    }

    /// A task's epilogue: biases, σ(gate) ⊙ up or a plain copy, rounded once into `out`. `c`
    /// holds `m` rows of `ldc` sums: per panel, 32 columns of one matrix, or 16 gate columns
    /// then the same 16 up columns; the task's outputs are columns `[j0, j0 + cols)` of `n`.
    pub(crate) unsafe fn epilogue<T: Element>(
        c: &mut [f32],
        ldc: usize,
        m: usize,
        w: Weights,
        bias: Bias<'_>,
        (j0, cols, per_panel, n): (usize, usize, usize, usize),
        out: SendPtr<T>,
    ) {
        let panels = cols.div_ceil(per_panel);
        for r in 0..m {
            let row = c.as_mut_ptr().add(r * ldc);
            for p in 0..panels {
                let valid = per_panel.min(cols - p * per_panel);
                let j = j0 + p * per_panel;
                let src = row.add(p * NR);
                if let Some(b) = bias.a {
                    avx512::add_assign(src, b.as_ptr().add(j), valid);
                }
                if let Weights::GateUp(_, _, act) = w {
                    if let Some(b) = bias.b {
                        avx512::add_assign(src.add(16), b.as_ptr().add(j), valid);
                    }
                    avx512::gated(act, src, src.add(16), src, valid);
                }
                avx512::narrow(src, out.0.add(r * n + j), valid);
            }
        }
    }

    /// The 32 weight rows of the panel starting at output column `j` (up to `end`): 32 rows of
    /// one matrix, or 16 gate rows then the same 16 up rows. Rows past `end` are `None` (zeros).
    fn panel_rows(w: Weights, j: usize, end: usize) -> [Option<*const u8>; NR] {
        let row = |mat: Mat, j: usize| (j < end).then(|| mat.row(j));
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
        let dst = SendPtr(xp.as_mut_ptr());
        parallel_for(xp.len() / (k * MR), |b| {
            let rows: Vec<*const T> = (b * MR..m.min((b + 1) * MR))
                .map(|r| x[r * k..].as_ptr())
                .collect();
            // SAFETY: each row holds k values; block b of dst holds k × MR, written by this
            // task only.
            unsafe { avx512::pack_tokens12(&rows, k, dst.get().add(b * k * MR)) };
        });
    }

    /// `[blocks][⌈k/2⌉][MR]` bf16 pairs (as u32 in an f32 buffer) into `xp` (every value
    /// written; zeros past `m` and `k`). Only bf16 activations take the dot-product kernel.
    unsafe fn pack_x_pairs<T: Element>(x: &[T], m: usize, k: usize, xp: &mut [f32]) {
        debug_assert_eq!(T::DTYPE, candle_core::DType::BF16);
        let kp = k.div_ceil(2);
        let dst = SendPtr(xp.as_mut_ptr());
        parallel_for(xp.len() / (kp * MR), |b| {
            let rows: Vec<*const u16> = (b * MR..m.min((b + 1) * MR))
                .map(|r| x[r * k..].as_ptr() as *const u16)
                .collect();
            // SAFETY: each row holds k bf16 values; block b of dst holds ⌈k/2⌉ × MR u32,
            // written by this task only.
            unsafe {
                avx512::pack_tokens12_pairs(&rows, k, dst.get().add(b * kp * MR) as *mut u32)
            };
        });
    }
}

mod calibrate {
    //! Whether bf16 dot products beat f32 FMAs on this CPU, measured once (about a millisecond).

    use std::time::Instant;

    use super::*;

    pub(super) fn bf16_dot_is_faster() -> bool {
        const K: usize = 256;
        let x = vec![0f32; K * MR];
        let w = vec![0f32; K * NR];
        let mut c = vec![0f32; MR * NR];
        let time = |f: &mut dyn FnMut()| {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..20 {
                    f();
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        };
        // The same multiply-adds both ways: K steps of f32 FMAs, or K/2 steps of bf16 pair dot
        // products. SAFETY: the caller checked AVX-512 and AVX512-BF16; the buffers hold what the
        // kernels read and write.
        let fma = time(&mut || unsafe {
            avx512::fma_kernel::<MR>(K, x.as_ptr(), w.as_ptr(), c.as_mut_ptr(), NR, false)
        });
        let dp = time(&mut || unsafe {
            let (xp, wp) = (x.as_ptr() as *const u32, w.as_ptr() as *const u16);
            avx512::dp_kernel::<MR>(K / 2, xp, wp, c.as_mut_ptr(), NR, false)
        });
        // Demand a clear win: the f32 kernel is the one tuned against PyTorch everywhere.
        dp < 0.8 * fma
    }
}

/// `out = σ(g) ⊙ u`, element-wise, split across threads.
///
/// # Safety
/// [`features`]`().avx512` must be true; the three slices have the same length.
pub(crate) unsafe fn gated<T: Element>(act: Act, g: &[T], u: &[T], out: &mut [T]) {
    const CHUNK: usize = 1 << 14;
    let (len, o) = (out.len(), SendPtr(out.as_mut_ptr()));
    parallel_for(len.div_ceil(CHUNK), |i| {
        let s = i * CHUNK;
        // SAFETY: chunk `i` covers [s, s + CHUNK) ∩ [0, len) of all three slices, and only this
        // task writes it.
        unsafe {
            avx512::gated(
                act,
                g.as_ptr().add(s),
                u.as_ptr().add(s),
                o.get().add(s),
                CHUNK.min(len - s),
            )
        }
    });
}
