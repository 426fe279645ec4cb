//! The dot schedule, for few tokens (decode): each weight row is streamed once from memory,
//! in place, and dotted with every token, `R` rows a call; past three tokens in L1-sized chunks,
//! and past six, Q4_1 rows are decoded once per chunk into a per-thread buffer. Work is split by
//! output columns. The int8 kernels reuse the schedule through [`RowSums`].

use std::cell::RefCell;

use super::avx512::{self, Dense, Encoding};
use super::element::Element;
use super::parallel::{parallel_for, with_buffer, with_scratch, DisjointOut};
use super::{Bias, Mat, Weights};

/// Up to this many tokens, the dot schedule.
pub(crate) const MAX_TOKENS: usize = 16;

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

pub(super) unsafe fn run<T: Element, E: Encoding>(
    x: &[T],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    out: &mut [T],
) {
    // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
    // checked, and the pointers it reads and writes lie inside the buffers it was given.
    unsafe {
        // Tokens as f32, once.
        let mut xf = vec![0f32; m * k];
        avx512::widen(x.as_ptr(), xf.as_mut_ptr(), m * k);
        let sums = DenseSums::<E> {
            xf: &xf,
            m,
            k,
            encoding: std::marker::PhantomData,
        };
        run_with(m, w, n, bias, out, &sums);
    }
}

/// A way of taking the sums of `R` weight rows with every token of a call (generic, so
/// that `put` inlines: it runs once per row and token).
pub(crate) trait RowSums: Sync {
    /// Calls `put(token, row, sum)` for every token and the `R` rows. `ahead` is how many
    /// bytes past each row the same row of the next call starts, for prefetching (Q4_1's exact
    /// rows past six tokens, widened a chunk at a time, ignore it).
    ///
    /// # Safety
    /// The rows hold the values the implementation was made for, in its encoding.
    unsafe fn sums(&self, rows: [*const u8; R], ahead: usize, put: impl FnMut(usize, usize, f32));
}

/// Rows in encoding `E` against f32 tokens `xf` (`m` of `k` values).
struct DenseSums<'a, E> {
    xf: &'a [f32],
    m: usize,
    k: usize,
    encoding: std::marker::PhantomData<E>,
}

impl<E: Encoding> RowSums for DenseSums<'_, E> {
    unsafe fn sums(&self, rows: [*const u8; R], ahead: usize, put: impl FnMut(usize, usize, f32)) {
        // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
        // checked, and the pointers it reads and writes lie inside the buffers it was given.
        unsafe { sums::<E>(self.xf, self.m, self.k, rows, ahead, put) }
    }
}

/// The schedule around a way of taking row sums: tasks of `COLS` output columns, each
/// adding biases, the gated product and the rounding to `T` to its rows' sums.
///
/// # Safety
/// The CPU has AVX-512 (the epilogue's kernels); `out` holds `m × n` values; `w` holds `n`
/// rows and the biases `n` values each; `sums` may be called on any `R` of `w`'s rows.
pub(crate) unsafe fn run_with<T: Element, S: RowSums>(
    m: usize,
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    out: &mut [T],
    sums: &S,
) {
    let out = DisjointOut::new(out);
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
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    j0: usize,
    cols: usize,
    out: DisjointOut<'_, T>,
    sums: &S,
) {
    // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
    // checked, and the pointers it reads and writes lie inside the buffers it was given.
    unsafe {
        let add = |b: Option<&[f32]>, j: usize| b.map_or(0.0, |b| b[j0 + j]);
        // Past the task's last column, rows repeat the last one; their sums are dropped.
        let row = |mat: Mat<'_>, j: usize| mat.row(j0 + j.min(cols - 1));
        // Row sums for the task's columns: gate (or plain) in `a`, up in `b`.
        with_scratch(m * cols, m * cols, |a, b| {
            match w {
                Weights::Single(mat) => {
                    for j in (0..cols).step_by(R) {
                        let rows = std::array::from_fn(|r| row(mat, j + r));
                        sums.sums(rows, R * mat.row_bytes(), |t, r, s| {
                            if j + r < cols {
                                a[t * cols + j + r] = s + add(bias.a, j + r);
                            }
                        });
                    }
                    for t in 0..m {
                        avx512::narrow(a.as_ptr().add(t * cols), out.at(t * n + j0), cols);
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
                        debug_assert_eq!(wg.row_bytes(), wu.row_bytes());
                        sums.sums(rows, half * wg.row_bytes(), |t, r, s| {
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
                    // Rounded once, straight into `out` (as `packed::epilogue` does).
                    for t in 0..m {
                        let (g, u) = (a.as_ptr().add(t * cols), b.as_ptr().add(t * cols));
                        avx512::gated(act, g, u, out.at(t * n + j0), cols);
                    }
                }
            }
        });
    }
}

/// Calls `put(token, row, sum)` for every token and the `R` rows, three tokens at a time.
///
/// Past three tokens, the rows are taken `CHUNK` values at a time, so that every pass over
/// the tokens reads them from L1 rather than L2; past six tokens, Q4_1 rows are dequantized
/// once per chunk rather than once per pass.
unsafe fn sums<E: Encoding>(
    xf: &[f32],
    m: usize,
    k: usize,
    rows: [*const u8; R],
    ahead: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
    // checked, and the pointers it reads and writes lie inside the buffers it was given.
    unsafe {
        // Sums of nothing; the schedule takes more than MAX_TOKENS tokens only then.
        if k == 0 {
            for t in 0..m {
                for r in 0..R {
                    put(t, r, 0.0);
                }
            }
            return;
        }
        let mut total = [[0f32; R]; MAX_TOKENS];
        let step = if m <= 3 { k } else { CHUNK };
        let widen = m > 6 && E::WIDEN;
        with_buffer(&WIDE, if widen { R * CHUNK } else { 0 }, |wide| {
            let mut c0 = 0;
            while c0 < k {
                let kc = step.min(k - c0);
                let rows = rows.map(|row| row.add(E::row_bytes(c0)));
                if widen {
                    for (r, row) in rows.iter().enumerate() {
                        avx512::widen_row::<E>(*row, wide.as_mut_ptr().add(r * CHUNK), kc);
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
                                Dense::<f32>::dot::<R, $tt>(kc, wide_rows, 0, x, k, &mut s);
                            } else {
                                // The first pass over a chunk reads it from memory: it
                                // prefetches the rows of later calls.
                                let ahead = if t == 0 { ahead } else { 0 };
                                E::dot::<R, $tt>(kc, rows, ahead, x, k, &mut s);
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
