//! The block's matmuls on GGUF q8_0 and q4k weights (and Q4_1 for up to
//! [`Q4_1_DOT_MAX_TOKENS`] tokens), read in place, with AVX512-VNNI integer dot products over
//! activations rounded to 8 bits (see [`vnni`]): `h = σ(x·Wgᵀ) ⊙ x·Wuᵀ` and `y = x·Wᵀ`, f32 in
//! and out.
//!
//! candle's own matmul for these types repacks each weight at its first call and keeps the
//! copy (+100% of a q8_0 weight's bytes, +134% of a q4k one's); these read the blocks as they
//! are. Two schedules, by the number of tokens `m`:
//!
//! - **dot** (`m ≤ DOT_MAX_TOKENS`, decode): the float kernels' dot schedule ([`dot`]), each
//!   weight row streamed once and dotted with every token, 64 values of a row against 64 of a
//!   token per VPDPBUSD;
//! - **packed**: tokens packed once; per task, 32-row tiles of weights unpacked from the blocks
//!   (codes and q4k's super-block headers transposed from row loads, q8_0's scales gathered) into a
//!   per-thread buffer (unpacked: one u32 of 4 codes per row and group; q8_0's scales in f32, q4k's
//!   scales times `d` in f32 and its 6-bit minima as integers), each used by every token while it
//!   is in L2, through a 6-token × 32-row micro-kernel (1 to 5 tokens for a last, short block: an
//!   expert's 32 tokens are not computed as 36). While a tile's tokens compute, the next tile's
//!   rows are prefetched a few lines at a time ([`vnni::Trickle`]), so that its unpacking finds
//!   them in cache.
//!
//! Measured on 7B shapes (Intel Emerald Rapids, 2 threads), the dot schedule costs about 1 ms per
//! token beyond the weights' read and the packed one a fixed ~4 ms (the tiles) plus about 0.35 ms
//! per token: dot wins up to 4 tokens. That was before the packed schedule prefetched the rows it
//! unpacks; on an AMD Zen 4 since (and before q4k's packed kernel took one activation scale per 256
//! values), dot won up to 8 tokens for q4k. The bound stays at 4 until it is measured again on the
//! Intel machines.
//!
//! Q4_1 has only the dot schedule here ([`matmul_q4_1`]): past [`Q4_1_DOT_MAX_TOKENS`] its
//! exact f32 decoding in the packed schedule is faster.

use super::parallel::{parallel_for, with_scratch, DisjointOut};
use super::vnni::{self, DotTokens, Kind, MT, NT, QK, QK_K};
use super::{column_tasks, dot, packed, Bias, Columns, Mat, Weights};

/// Up to this many tokens, the dot schedule (measured: where it beats the packed one).
pub(crate) const DOT_MAX_TOKENS: usize = 4;
/// Up to this many tokens, Q4_1 weights go through the dot schedule over 8-bit activations
/// ([`matmul_q4_1`]) rather than their exact f32 decoding (unless asked to stay exact). Measured
/// on SmolLM2's shapes (576 → 192, 576, 1536 and 1536 → 576; AMD EPYC Zen 4, 2 threads, in
/// cache): 0.7–0.9× the exact path's time from 6 to 17 tokens, 0.7–1.0× at 20; at 24 and 28 the
/// larger shapes still 0.75–0.9× but 576 → 192 1.0–1.2×; 1.05–1.5× at 64. Never slower up to
/// here, and no 8-bit rounding where it would not buy time. (Not yet measured on Intel.)
pub(crate) const Q4_1_DOT_MAX_TOKENS: usize = 20;
/// Depth of one weight block (a multiple of 256, so q4k super-blocks are never split).
const KC: usize = 1024;
/// Tiles (of 32 rows) per task.
const PANELS: usize = 8;

/// `y = x·Wᵀ` or `h = σ(x·Wgᵀ) ⊙ x·Wuᵀ`: `x` is `[m, k]`, the weights `[n, k]` in `kind`'s
/// blocks; returns `[m, n]`.
///
/// # Safety
/// [`features`](crate::kernels::detect::features)`().vnni` must be true; the weights hold `n`
/// rows of `k` values in `kind`'s blocks (`k` a positive multiple of its block).
pub(crate) unsafe fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    kind: Kind,
) -> Vec<f32> {
    // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
    // checked, and the pointers it reads and writes lie inside the buffers it was given.
    unsafe {
        debug_assert_eq!(x.len(), m * k);
        debug_assert!(k > 0 && k.is_multiple_of(kind.block_values()));
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return out;
        }
        if m <= DOT_MAX_TOKENS {
            dot_run(x, m, k, w, n, DotKind::Int8(kind), &mut out);
        } else {
            packed_run(x, m, k, w, n, kind, &mut out);
        }
        out
    }
}

/// [`matmul`] for Q4_1 weights, through the dot schedule whatever the token count (the
/// callers take it up to [`Q4_1_DOT_MAX_TOKENS`]): Q4_1 × 8-bit activations, as llama.cpp and
/// candle multiply Q4_1.
///
/// # Safety
/// As [`matmul`], with the weights in Q4_1 blocks (`k` a positive multiple of 32).
pub(crate) unsafe fn matmul_q4_1(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
) -> Vec<f32> {
    // SAFETY: this function's `# Safety` contract is its body's.
    unsafe {
        debug_assert_eq!(x.len(), m * k);
        debug_assert!(k > 0 && k.is_multiple_of(QK));
        let mut out = vec![0f32; m * n];
        if m > 0 && n > 0 {
            dot_run(x, m, k, w, n, DotKind::Q4_1, &mut out);
        }
        out
    }
}

/// The blocks the dot schedule reads over 8-bit activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DotKind {
    /// q8_0 or q4k.
    Int8(Kind),
    /// Q4_1.
    Q4_1,
}

/// The dot schedule over `x` rounded to 8 bits as `kind` wants it.
///
/// # Safety
/// As [`matmul`]; `m`, `n` > 0; `out` holds `m × n`.
unsafe fn dot_run(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    kind: DotKind,
    out: &mut [f32],
) {
    // SAFETY: the caller's contract.
    unsafe {
        let nb = match kind {
            DotKind::Int8(kind) => k / kind.block_values(),
            DotKind::Q4_1 => k / QK,
        };
        let toks = DotBuffers::new(x, m, k, kind);
        let sums = QuantSums {
            kind,
            toks: toks.view(),
            nb,
            m,
        };
        dot::run_with(m, w, n, Bias::default(), out, &sums);
    }
}

/// Where q4k decode stores sub-block `j` of a super-block (and which it stores at `j`): the
/// order in which the weights' nibbles come, 0, 2, 1, 3, 4, 6, 5, 7.
const Q4K_ORDER: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

/// The tokens of a decode call, rounded and laid out as [`DotTokens`] describes.
struct DotBuffers {
    q: Vec<i8>,
    dxv: Vec<f32>,
    corr: Vec<i32>,
    xsv: Vec<f32>,
    kp: usize,
}

impl DotBuffers {
    unsafe fn new(x: &[f32], m: usize, k: usize, kind: DotKind) -> Self {
        // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
        // checked, and the pointers it reads and writes lie inside the buffers it was given.
        unsafe {
            let kp = k.next_multiple_of(64);
            let nbp = kp / QK;
            let mut q = vec![0i8; m * kp];
            match kind {
                DotKind::Q4_1 => {
                    // One scale per block; per pair of blocks, the codes in the weights'
                    // nibble order and the scales and sums spread as `dot_q4_1` reads them.
                    let pairs = kp / 64;
                    let (mut dxv, mut xsv) =
                        (vec![0f32; m * pairs * 16], vec![0f32; m * pairs * 4]);
                    let mut codes = [0i8; QK];
                    for t in 0..m {
                        for b in 0..k / QK {
                            let (d, s) = vnni::quantize_block(
                                x.as_ptr().add(t * k + b * QK),
                                codes.as_mut_ptr(),
                            );
                            let (i, second) = (t * pairs + b / 2, b % 2);
                            let base = t * kp + (b / 2) * 64 + 16 * second;
                            q[base..base + 16].copy_from_slice(&codes[..16]);
                            q[base + 32..base + 48].copy_from_slice(&codes[16..]);
                            dxv[16 * i + 4 * second..16 * i + 4 * second + 4].fill(d);
                            dxv[16 * i + 8 + 4 * second..16 * i + 12 + 4 * second].fill(d);
                            xsv[4 * i + 2 * second + 1] = d * s as f32;
                        }
                    }
                    Self {
                        q,
                        dxv,
                        corr: Vec::new(),
                        xsv,
                        kp,
                    }
                }
                DotKind::Int8(Kind::Q8_0) => {
                    // One scale per block.
                    let (mut d, mut s) = (vec![0f32; m * nbp], vec![0i32; m * nbp]);
                    for t in 0..m {
                        for b in 0..k / QK {
                            let i = t * nbp + b;
                            let dst = q.as_mut_ptr().add(t * kp + b * QK);
                            (d[i], s[i]) =
                                vnni::quantize_block(x.as_ptr().add(t * k + b * QK), dst);
                        }
                    }
                    let pairs = m * kp / 64;
                    let mut dxv = vec![0f32; pairs * 16];
                    let mut corr = vec![0i32; pairs * 16];
                    for (p, (v, c)) in dxv
                        .chunks_exact_mut(16)
                        .zip(corr.chunks_exact_mut(16))
                        .enumerate()
                    {
                        v[..8].fill(d[2 * p]);
                        v[8..].fill(d[2 * p + 1]);
                        (c[0], c[8]) = (-128 * s[2 * p], -128 * s[2 * p + 1]);
                    }
                    Self {
                        q,
                        dxv,
                        corr,
                        xsv: Vec::new(),
                        kp,
                    }
                }
                DotKind::Int8(Kind::Q4K) => {
                    // One scale per super-block; sub-blocks stored in the weights' nibble order.
                    let sbs = k / QK_K;
                    let (mut dxv, mut xsv) = (vec![0f32; m * sbs], vec![0f32; m * sbs * 8]);
                    let mut codes = [0i8; QK_K];
                    let mut sums = [0i32; 8];
                    for t in 0..m {
                        for sb in 0..sbs {
                            let src = x.as_ptr().add(t * k + sb * QK_K);
                            let d = vnni::quantize_shared(
                                src,
                                8,
                                codes.as_mut_ptr(),
                                sums.as_mut_ptr(),
                            );
                            let base = t * kp + sb * QK_K;
                            for (j, pos) in Q4K_ORDER.iter().enumerate() {
                                q[base + pos * QK..base + (pos + 1) * QK]
                                    .copy_from_slice(&codes[j * QK..(j + 1) * QK]);
                                xsv[(t * sbs + sb) * 8 + j] = d * sums[j] as f32;
                            }
                            dxv[t * sbs + sb] = d;
                        }
                    }
                    Self {
                        q,
                        dxv,
                        corr: Vec::new(),
                        xsv,
                        kp,
                    }
                }
            }
        }
    }

    fn view(&self) -> DotTokens<'_> {
        DotTokens {
            q: &self.q,
            dxv: &self.dxv,
            corr: &self.corr,
            xsv: &self.xsv,
            kp: self.kp,
        }
    }
}

/// Rows of `nb` blocks of `kind` against the `m` rounded tokens `toks`.
struct QuantSums<'a> {
    kind: DotKind,
    toks: DotTokens<'a>,
    nb: usize,
    m: usize,
}

impl dot::RowSums for QuantSums<'_> {
    unsafe fn sums(
        &self,
        rows: [*const u8; dot::R],
        ahead: usize,
        put: impl FnMut(usize, usize, f32),
    ) {
        // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
        // checked, and the pointers it reads and writes lie inside the buffers it was given.
        unsafe { sums(self.kind, self.toks, self.nb, self.m, rows, ahead, put) }
    }
}

/// Calls `put(token, row, sum)` for every token and the `R` rows, up to four tokens at a time.
unsafe fn sums(
    kind: DotKind,
    toks: DotTokens<'_>,
    nb: usize,
    m: usize,
    rows: [*const u8; dot::R],
    ahead: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
    // checked, and the pointers it reads and writes lie inside the buffers it was given.
    unsafe {
        let mut t = 0;
        while t < m {
            // `$r` rows a kernel call (4 for 4 tokens: 8 × 4 accumulators would not fit in registers).
            macro_rules! tokens {
                ($tt:literal, $r:literal) => {{
                    for h in 0..dot::R / $r {
                        let rows: [*const u8; $r] = std::array::from_fn(|i| rows[h * $r + i]);
                        let mut s = [[0f32; $r]; $tt];
                        match kind {
                            DotKind::Int8(Kind::Q8_0) => {
                                vnni::dot_q8_0::<$r, $tt>(nb, rows, ahead, toks, t, &mut s)
                            }
                            DotKind::Int8(Kind::Q4K) => {
                                vnni::dot_q4k::<$r, $tt>(nb, rows, ahead, toks, t, &mut s)
                            }
                            DotKind::Q4_1 => {
                                vnni::dot_q4_1::<$r, $tt>(nb, rows, ahead, toks, t, &mut s)
                            }
                        }
                        for (i, s) in s.iter().enumerate() {
                            for (r, v) in s.iter().enumerate() {
                                put(t + i, h * $r + r, *v);
                            }
                        }
                    }
                    t += $tt;
                }};
            }
            // Q4_1 keeps 128-bit sums of the minima per token and row besides: at most 2 × 4.
            match (m - t, kind) {
                (1, _) => tokens!(1, 8),
                (_, DotKind::Q4_1) => tokens!(2, 4),
                (2, _) => tokens!(2, 8),
                (3, _) => tokens!(3, 8),
                _ => tokens!(4, 4),
            }
        }
    }
}

/// Tokens packed for [`vnni::packed_kernel`] and [`vnni::packed_kernel_q4k`]: by block of
/// `MT` tokens, `[nb][8][MT]` u32 of codes, code sums per 32 values (q8_0: `[nb][MT]` i32;
/// q4k: `[nb / 2][MT]` pairs of i16) and scales (q8_0: `[nb][MT]`, one per 32 values; q4k:
/// `[nb / 8][MT]`, one per 256). Zeros for the tokens past `m`.
struct PackedTokens {
    q: Vec<i32>,
    d: Vec<f32>,
    s: Vec<i32>,
    nb: usize,
    /// 32-value blocks per scale: 1 (q8_0) or 8 (q4k).
    per_scale: usize,
    /// 32-value blocks per stored code sum: 1 (q8_0, an i32) or 2 (q4k, an i16 pair).
    per_sum: usize,
}

impl PackedTokens {
    unsafe fn new(x: &[f32], m: usize, k: usize, kind: Kind) -> Self {
        let nb = k / QK;
        let per_scale = kind.block_values() / QK;
        let per_sum = match kind {
            Kind::Q8_0 => 1,
            Kind::Q4K => 2,
        };
        let tbs = m.div_ceil(MT);
        let mut q = vec![0i32; tbs * nb * 8 * MT];
        let mut d = vec![0f32; tbs * nb / per_scale * MT];
        let mut s = vec![0i32; tbs * nb / per_sum * MT];
        let (qp, dp, sp) = (
            DisjointOut::new(&mut q),
            DisjointOut::new(&mut d),
            DisjointOut::new(&mut s),
        );
        parallel_for(tbs, |tb| {
            let mut codes = [0i32; QK_K / 4];
            let mut sums = [0i32; 8];
            for t in tb * MT..m.min((tb + 1) * MT) {
                let lane = t % MT;
                for sc in 0..nb / per_scale {
                    let b0 = sc * per_scale;
                    // SAFETY: block tb of each buffer is written by this task only; x holds
                    // m × k values; `codes` and `sums` hold a scale's 8 blocks.
                    unsafe {
                        let src = x.as_ptr().add(t * k + b0 * QK);
                        let dst = codes.as_mut_ptr() as *mut i8;
                        *dp.at((tb * nb / per_scale + sc) * MT + lane) =
                            vnni::quantize_shared(src, per_scale, dst, sums.as_mut_ptr());
                        for j in 0..per_scale {
                            let i = tb * nb + b0 + j;
                            if per_sum == 1 {
                                *sp.at(i * MT + lane) = sums[j];
                            } else if j % 2 == 0 {
                                // An i16 pair (each sum below 32·128 in magnitude).
                                let pair = (sums[j] as u16 as u32) | (sums[j + 1] as u32) << 16;
                                *sp.at(i / 2 * MT + lane) = pair as i32;
                            }
                            for g in 0..8 {
                                *qp.at((i * 8 + g) * MT + lane) = codes[j * 8 + g];
                            }
                        }
                    }
                }
            }
        });
        Self {
            q,
            d,
            s,
            nb,
            per_scale,
            per_sum,
        }
    }

    /// The kernels' token pointers for token block `tb`, from block `b` (for q4k, the first
    /// of a super-block).
    fn at(&self, tb: usize, b: usize) -> (*const i32, *const f32, *const i32) {
        debug_assert_eq!(b % self.per_scale, 0);
        let i = tb * self.nb + b;
        (
            self.q[i * 8 * MT..].as_ptr(),
            self.d[i / self.per_scale * MT..].as_ptr(),
            self.s[i / self.per_sum * MT..].as_ptr(),
        )
    }
}

unsafe fn packed_run(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    kind: Kind,
    out: &mut [f32],
) {
    // SAFETY: the caller's contract (features checked, x holds m × k) is the packer's.
    let toks = unsafe { PackedTokens::new(x, m, k, kind) };
    let toks = &toks;
    let out = DisjointOut::new(out);
    column_tasks(w, n, PANELS, |cols| {
        // SAFETY: tasks write disjoint column ranges of `out`.
        unsafe { packed_task(toks, m, k, w, n, kind, cols, out) }
    });
}

/// The depth of the weight blocks for `m` tokens of `k` values: all of `k` while the tokens'
/// codes fit in half of L2 beside the tile (each row then streams from memory in one piece),
/// else `KC`.
fn depth(m: usize, k: usize) -> usize {
    if m * k <= 1 << 20 {
        k
    } else {
        KC
    }
}

/// f32 slots of one tile of 32 rows × `kc` values: codes (as i32), scales and minima per 32
/// values, then (q4k) `dmin` per 256.
fn tile_floats(kc: usize) -> usize {
    kc / QK * (8 + 2) * NT + kc.div_ceil(QK_K) * NT
}

#[allow(clippy::too_many_arguments)]
unsafe fn packed_task(
    toks: &PackedTokens,
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    kind: Kind,
    cols: Columns,
    out: DisjointOut<'_, f32>,
) {
    // SAFETY: this function's `# Safety` contract is its body's: the CPU features were
    // checked, and the pointers it reads and writes lie inside the buffers it was given.
    unsafe {
        let panels = cols.panels();
        let ldc = panels * NT;
        let tbs = m.div_ceil(MT);
        let kc = depth(m, k);
        with_scratch(tile_floats(kc), tbs * MT * ldc, |tile, c| {
            let wq = tile.as_mut_ptr() as *mut i32;
            let wd = tile.as_mut_ptr().add(kc / QK * 8 * NT);
            let wm = wd.add(kc / QK * NT);
            let wmin = wm.add(kc / QK * NT);
            for pc in (0..k).step_by(kc) {
                let nb = kc.min(k - pc) / QK;
                // One panel at a time: unpacked, then used by every token while it is in L2.
                // The two halves of 16 rows of panel `p`: its first 32 rows, or 16 gate and 16 up.
                let halves = |p: usize| {
                    let (j, valid) = cols.panel(p);
                    let rows = |mat: Mat<'_>, j: usize, valid: usize| vnni::Rows16 {
                        base: mat.row(j),
                        stride: kind.row_bytes(k),
                        valid,
                    };
                    match w {
                        Weights::Single(mat) => [
                            rows(mat, j, valid.min(16)),
                            rows(mat, j + 16, valid.saturating_sub(16)),
                        ],
                        Weights::GateUp(wg, wu, _) => [rows(wg, j, valid), rows(wu, j, valid)],
                    }
                };
                let (from, len) = (kind.row_bytes(pc), kind.row_bytes(nb * QK));
                for p in 0..panels {
                    let next = (p + 1 < panels).then(|| halves(p + 1));
                    for (half, rows) in halves(p).into_iter().enumerate() {
                        let parts = (wq, wd, wm as *mut i32, wmin);
                        vnni::pack16(kind, rows, pc / QK, nb, parts, half * 16);
                    }
                    // The next panel's rows from memory while this one's tiles compute.
                    // (The kernels call `ahead` once per scale of the tokens: per 32 values for
                    // q8_0, per 256 for q4k.)
                    let steps = tbs * nb / toks.per_scale;
                    let mut trickle = vnni::Trickle::new(next, from, len, steps);
                    for tb in 0..tbs {
                        let cp = c.as_mut_ptr().add(tb * MT * ldc + p * NT);
                        let xs = toks.at(tb, pc / QK);
                        let first = pc == 0;
                        let ahead = || trickle.step();
                        // The last block's tokens only (not padded to MT: at 32 tokens an
                        // expert, MT = 6 would compute 36).
                        macro_rules! tile {
                            ($r:expr) => {
                                match kind {
                                    Kind::Q8_0 => {
                                        let ws = (wq as *const i32, wd as *const f32);
                                        vnni::packed_kernel::<$r>(nb, xs, ws, cp, ldc, first, ahead)
                                    }
                                    Kind::Q4K => {
                                        let ws = (
                                            wq as *const i32,
                                            wd as *const f32,
                                            wm as *const i32,
                                            wmin as *const f32,
                                        );
                                        let nsb = nb / 8;
                                        vnni::packed_kernel_q4k::<$r>(
                                            nsb, xs, ws, cp, ldc, first, ahead,
                                        )
                                    }
                                }
                            };
                        }
                        // (The arms below are the widths under MT: vnni asserts MT == 6.)
                        match m - tb * MT {
                            1 => tile!(1),
                            2 => tile!(2),
                            3 => tile!(3),
                            4 => tile!(4),
                            5 => tile!(5),
                            _ => tile!(MT),
                        }
                    }
                }
            }
            packed::epilogue(c, ldc, m, w, Bias::default(), (cols, n), out);
        });
    }
}
