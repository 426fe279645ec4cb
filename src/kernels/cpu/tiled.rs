//! The tiled schedule: prefill on the AMX tiles ([`amx`]), for dense bf16 weights and for GGUF
//! Q4_1, q8_0 and q4k weights, which are decoded to bf16 as their panels are packed (per call,
//! per depth block, into a per-thread buffer: no copy is kept). Activations are bf16, or f32
//! rounded to bf16 once as they are packed; sums are f32.
//!
//! The weights are the tile products' first operand, whose tiles are plain rows: 16 weight rows
//! of 32 values. Work is split by output columns, in panels of 32 weight rows (32 rows of one
//! matrix, or 16 gate rows and the same 16 up rows). Below [`PACK_MIN_TOKENS`] tokens a panel's
//! rows are read in place (when its 32 rows exist and the depth is a multiple of 32; else they
//! are packed as below): the call is bound by reading the weights from memory, and a copy would
//! only add to it. From [`PACK_MIN_TOKENS`] (and always for GGUF weights), per depth block, a
//! panel's rows are copied (or decoded) into contiguous tiles in a per-thread buffer (zeros
//! past the matrix's rows and depth), from which every pair of token tiles uses them: the 2×2
//! micro-kernel loads one 1 KiB tile per product, so where its operands lie bounds it (on one
//! core: 2.3 TFLOP/s from L1, 1.0–1.2 from L2, 0.85 with the tokens in L3; the products alone
//! 3.1). Every buffer starts on a cache line (a tile load off a line ran 5× slower), and the
//! depth blocks are chosen so that the tokens' block stays in L2 ([`SHALLOW`]); in shallow
//! blocks the next panel's rows are prefetched into L2 while the tiles run ([`Ahead`]).
//!
//! The tokens are packed once per call in the VNNI pair layout, 16 tokens a tile, depth block
//! by depth block ([`TokenLayout`]). Each call of the micro-kernel keeps its four tiles of sums in
//! one contiguous 4 KiB block ([`pair`]). The sums come out transposed, `C[column][token]`; the
//! epilogue adds the biases, applies `σ(gate) ⊙ up`, transposes and rounds them once into the
//! output.

use std::arch::x86_64::*;

use super::amx::{self, Tiles, TILE_BYTES};
use super::avx512::{self, Encoding};
use super::element::Element;
use super::packed::panel_rows;
use super::parallel::{parallel_for, with_buffer, with_scratch, with_tokens, DisjointOut};
use super::{column_tasks, Bias, Columns, Weights};

/// From this many tokens the tiles beat the dot schedule's streamed rows (measured on 7B bf16,
/// alternating in one process: 7–8% slower at 2–3 tokens, 16% faster at 4).
pub(crate) const MIN_TOKENS: usize = 4;
/// From this many tokens GGUF Q4_1 weights are decoded to bf16 for the tiles rather than
/// decoded exactly to f32 for FMAs: measured (Intel Xeon with AMX, 2 threads, alternating)
/// on 7B, the tiles took 0.89× the exact kernels' time at 4 tokens, 0.49× at 8, 0.30× at 64.
pub(crate) const QUANT_MIN_TOKENS_Q4_1: usize = 4;
/// From this many tokens GGUF q8_0 weights are decoded to bf16 for the tiles rather than
/// multiplied in integers (VNNI): measured as above, the tiles took 1.02× the VNNI kernels'
/// time at 24 tokens and 0.92× at 28 on the small shape (576 → 1536), 0.78× at 24 and 0.70× at
/// 32 on 7B. Below, decoding a panel per call costs more than the tiles save.
pub(crate) const QUANT_MIN_TOKENS_Q8_0: usize = 28;
/// [`QUANT_MIN_TOKENS_Q8_0`] for q4k, whose blocks take longer to decode: on 7B the tiles took
/// 1.02× the VNNI kernels' time at 40 tokens, 0.92× at 44, 0.75× at 64.
pub(crate) const QUANT_MIN_TOKENS_Q4K: usize = 44;
/// Weight rows per panel, and per micro-kernel call: two tiles of 16.
const ROWS: usize = 32;
/// Values of the input dimension per tile step.
const STEP: usize = 32;
/// The most panels per task.
const PANELS: usize = 8;
/// The depth of one block when the tokens are few: 4096 values (a panel's 32 rows of it are
/// 256 KiB, in L2). Deeper blocks mean fewer reloads of the sums; on 7B bf16 at 128 tokens 4096
/// was the best of 256 to 4096 (2048: 1.01×, 1024: 1.02×, shallow 512: 1.07×).
const DEPTH: usize = 4096;
/// The depth of one block when the tokens are many (their block at [`DEPTH`] would fill
/// [`TOKEN_BLOCK_BYTES`]): 256 values, so that a panel's block (16 KiB) stays in L1 and the
/// tokens' block in L2 while every panel of the task runs against it, depth block after depth
/// block. Measured on 7B bf16 (Intel Xeon with AMX, 2 threads, alternating): 0.94× the time of
/// 4096-deep blocks panel after panel at 256 tokens, 0.80× at 384 to 1024 (128 deep: 0.88–0.96×,
/// 512: 0.89–0.92×); 0.99× at 192, 1.25× at 128, 1.54× at 64, where the short reads of each
/// row's block bound the call. Small shape (576 → 1536) at 2048 tokens: 0.87×.
const SHALLOW: usize = 256;
/// Bytes of one depth block of the packed tokens (L2 of one core, 2 MiB on these Xeons) from
/// which the blocks are [`SHALLOW`].
const TOKEN_BLOCK_BYTES: usize = 2 << 20;
/// From this many tokens the weight tiles are packed rather than read in place: measured on
/// 7B bf16 (Intel Xeon with AMX, 2 threads, alternating in one process, buffers aligned),
/// packing took 1.32× the time of reading in place at 16 tokens, 1.19× at 64, 1.01× at 96
/// (small shape: 1.38×, 1.26×, 0.96×); at 128 and 512 tokens packed tiles were faster.
const PACK_MIN_TOKENS: usize = 96;
/// How far ahead of the values it packs [`pack_panel`] prefetches each row: 32 rows at once
/// are more streams than the hardware prefetchers follow. Measured on 7B q8_0 at 4 tokens
/// (decoding bound): 256 bytes 1.25× as fast as none, 1.4× as fast as 2048; Q4_1 and q4k alike.
const PREFETCH_BYTES: usize = 256;
/// Bytes of sums one task keeps, 512 KiB, but for one panel at least (32 × tokens × 4 bytes).
const SUM_BYTES: usize = 1 << 19;

/// `y = x·Wᵀ + b`, or `h = σ(x·Wgᵀ + bg) ⊙ (x·Wuᵀ + bu)`, on the tiles: `x` is `[m, k]` of `T`
/// (rounded to bf16 unless it is bf16), the weights `[n, k]` in encoding `E` (dense bf16 read
/// as they are, any other decoded and rounded to bf16 as they are packed); writes `[m, n]` of
/// `T` into `out`, from f32 sums rounded once.
///
/// # Safety
/// [`features`](crate::kernels::detect::features)`().avx512()` and
/// [`amx_usable`](crate::kernels::detect::amx_usable)`()` must be true; `x` holds `m × k`
/// values, the weights `n` rows of `k` values in encoding `E`, biases (if any) `n` values,
/// `out` `m × n`.
pub(crate) unsafe fn run<T: Element, E: Encoding>(
    x: &[T],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    out: &mut [T],
) {
    if m == 0 || k == 0 || n == 0 {
        // (The callers never pass them: the tile loops assume at least one step.)
        return;
    }
    let tiles = m.div_ceil(16);
    let steps = k.div_ceil(STEP);
    let kc = depth_block(tiles, k);
    // Packed tokens: by depth block, then by tile of 16 tokens, then by step, a tile of 16
    // pair-rows of 64 bytes (as u16 in an f32 buffer, two per slot).
    let len = tiles * steps * TILE_BYTES / 4;
    with_tokens(len, |buf| {
        let layout = TokenLayout {
            tiles,
            steps,
            block_steps: kc / STEP,
        };
        let dst = DisjointOut::new(&mut *buf);
        parallel_for(tiles, |tb| {
            for pc in (0..k).step_by(kc) {
                let depth = kc.min(k - pc);
                let rows: [Option<*const T>; 16] = std::array::from_fn(|i| {
                    let t = tb * 16 + i;
                    (t < m).then(|| x[t * k + pc..].as_ptr())
                });
                let block_steps = depth.div_ceil(STEP);
                // SAFETY: tile tb's steps of the block (block_steps × 1 KiB from its offset) are
                // written by this task only; each row holds `depth` values from `pc`.
                // `pack16_pairs` writes every token slot of the pair-rows up to ⌈depth / 2⌉
                // (zeros past m and depth); the rest of the block's last tile is zeroed here.
                unsafe {
                    let (first, tile) = layout.block(pc);
                    let at = dst.at((first + tb * tile) / 4) as *mut u16;
                    avx512::pack16_pairs(&rows, depth, at, 32);
                    let written = depth.div_ceil(2) * 32;
                    std::ptr::write_bytes(
                        at.add(written),
                        0,
                        block_steps * TILE_BYTES / 2 - written,
                    );
                }
            }
        });
        let toks = Tokens { buf: &*buf, layout };
        // SAFETY: the caller's contract, and the tokens just packed.
        unsafe { run_tasks::<T, E>(&toks, m, k, w, n, bias, out) };
    });
}

/// The depth of a block of the sums for `tiles` token tiles and depth `k` (a multiple of
/// [`STEP`]): [`DEPTH`], or [`SHALLOW`] when the tokens' block at [`DEPTH`] would fill
/// [`TOKEN_BLOCK_BYTES`].
fn depth_block(tiles: usize, k: usize) -> usize {
    let k = k.next_multiple_of(STEP);
    let shallow = tiles * 16 * DEPTH.min(k) * 2 >= TOKEN_BLOCK_BYTES;
    if shallow { SHALLOW } else { DEPTH }.min(k)
}

/// Where a call's packed tokens lie: by depth block of `block_steps` steps (the last may be
/// shorter), then by tile of 16 tokens, then by step, so that the tiles one block runs against
/// are contiguous (a tile's steps laid end to end put every tile of a 4096-deep input 128 KiB
/// apart, in the same sets of L2).
#[derive(Clone, Copy)]
struct TokenLayout {
    tiles: usize,
    steps: usize,
    block_steps: usize,
}

impl TokenLayout {
    /// The depth block from `pc` (a multiple of [`Self::depth`]): the byte offset of its first
    /// tile, and the bytes from one tile to the next.
    fn block(&self, pc: usize) -> (usize, usize) {
        let first = pc / STEP;
        debug_assert_eq!(first % self.block_steps, 0);
        let tile = self.block_steps.min(self.steps - first) * TILE_BYTES;
        (first * self.tiles * TILE_BYTES, tile)
    }

    /// The depth of a block.
    fn depth(&self) -> usize {
        self.block_steps * STEP
    }

    /// Tokens per row of a panel's sums: the tiles' tokens, in whole pairs of tiles.
    fn sum_tokens(&self) -> usize {
        self.tiles.next_multiple_of(2) * 16
    }
}

/// A call's packed tokens, as their [`TokenLayout`] says.
struct Tokens<'a> {
    buf: &'a [f32],
    layout: TokenLayout,
}

impl Tokens<'_> {
    /// The depth block from `pc`: its first tile, and the bytes from one tile to the next.
    fn block(&self, pc: usize) -> (*const u16, usize) {
        let (first, tile) = self.layout.block(pc);
        (self.buf[first / 4..].as_ptr() as *const u16, tile)
    }
}

/// The tasks: `per_task` output columns each, in panels.
unsafe fn run_tasks<T: Element, E: Encoding>(
    toks: &Tokens<'_>,
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    out: &mut [T],
) {
    let mp = toks.layout.sum_tokens();
    let panels = (SUM_BYTES / (ROWS * mp * 4)).clamp(1, PANELS);
    let out = DisjointOut::new(out);
    column_tasks(w, n, panels, |cols| {
        let task = Task { m, k, n, cols };
        // SAFETY: tasks write disjoint column ranges of `out`; the caller's contract covers the
        // rest.
        unsafe { task.run::<T, E>(toks, w, bias, out) }
    });
}

/// One task's share: its output columns for every token.
struct Task {
    m: usize,
    k: usize,
    n: usize,
    cols: Columns,
}

impl Task {
    unsafe fn run<T: Element, E: Encoding>(
        &self,
        toks: &Tokens<'_>,
        w: Weights<'_>,
        bias: Bias<'_>,
        out: DisjointOut<'_, T>,
    ) {
        let mp = toks.layout.sum_tokens();
        let panels = self.cols.panels();
        // Sums `C[row][token]`, 32 rows a panel, in blocks of 32 tokens (see `pair`).
        with_scratch(panels * ROWS * mp, 0, |c, _| {
            // SAFETY: the caller's contract; `c` holds the panels' sums.
            unsafe { self.sums::<E>(toks, w, c) };
            for p in 0..panels {
                let (j, valid) = self.cols.panel(p);
                let sums = &c[p * ROWS * mp..(p + 1) * ROWS * mp];
                // SAFETY: the panel's sums are written; the output columns [j, j + valid) are
                // this task's; the features are the caller's contract.
                unsafe { epilogue(sums, mp, self.m, w, bias, j, valid, self.n, out) };
            }
        });
    }

    /// The sums: a depth block at a time against every token, the rows read in place or packed
    /// as the module's doc says. Few tokens: panel after panel, each through its depth blocks
    /// (a panel's rows stream from memory once); many: depth block after depth block, each
    /// through the task's panels (the tokens' block stays in L2), as [`SHALLOW`] says.
    unsafe fn sums<E: Encoding>(&self, toks: &Tokens<'_>, w: Weights<'_>, c: &mut [f32]) {
        let k = self.k;
        let mp = toks.layout.sum_tokens();
        let kc = toks.layout.depth();
        let shallow = kc < DEPTH.min(k.next_multiple_of(STEP));
        let pack = self.m >= PACK_MIN_TOKENS;
        with_packed(ROWS * kc / 2, |packed| {
            // SAFETY: the AMX contract is the caller's.
            let tiles = unsafe { Tiles::configure() };
            // Panel `p`'s sums over the depth block from `pc`.
            let mut block =
                |p: usize, pc: usize, sums: &mut [f32], next: Option<(usize, usize)>| {
                    let (j, valid) = self.cols.panel(p);
                    let rows = panel_rows(w, j, j + valid);
                    let depth = kc.min(k - pc);
                    let steps = depth.div_ceil(STEP);
                    let in_place = if pack {
                        None
                    } else {
                        in_place::<E>(&rows, w, k)
                    };
                    let a = match in_place {
                        Some((a0, a1, stride)) => {
                            (a0.wrapping_add(pc), a1.wrapping_add(pc), stride, 64)
                        }
                        None => {
                            // SAFETY: the rows hold `pc + depth` values; `packed` holds 32 rows of
                            // `kc`.
                            unsafe { pack_panel::<E>(&rows, pc, depth, &mut *packed) };
                            let a0 = packed.as_ptr() as *const u16;
                            (a0, a0.wrapping_byte_add(steps * TILE_BYTES), 64, TILE_BYTES)
                        }
                    };
                    let b = toks.block(pc);
                    let ahead = next.map(|(p, pc)| {
                        let (j, valid) = self.cols.panel(p);
                        let to = E::byte_offset((pc + kc).min(k));
                        Ahead::new(panel_rows(w, j, j + valid), E::byte_offset(pc), to)
                    });
                    let calls = toks.layout.tiles.div_ceil(2);
                    for (i, tb) in (0..toks.layout.tiles).step_by(2).enumerate() {
                        // SAFETY: the panel's tiles hold `steps` steps, the block's token tiles
                        // as many.
                        unsafe { pair(&tiles, b, tb, toks.layout.tiles, (pc, steps), a, sums) };
                        if let Some(ahead) = &ahead {
                            ahead.prefetch(i, calls);
                        }
                    }
                };
            if shallow {
                let panels = c.len() / (ROWS * mp);
                for pc in (0..k).step_by(kc) {
                    for (p, sums) in c.chunks_exact_mut(ROWS * mp).enumerate() {
                        let next = if p + 1 < panels {
                            Some((p + 1, pc))
                        } else {
                            (pc + kc < k).then_some((0, pc + kc))
                        };
                        block(p, pc, sums, next.filter(|_| pack));
                    }
                }
            } else {
                for (p, sums) in c.chunks_exact_mut(ROWS * mp).enumerate() {
                    for pc in (0..k).step_by(kc) {
                        block(p, pc, sums, None);
                    }
                }
            }
        });
    }
}

/// The rows of the panel block that a task packs next, prefetched into L2 a share at a time
/// while the tiles run on the current one (in shallow blocks, where the tiles would otherwise
/// wait on memory for each block: 7B bf16 × 512 tokens 0.94× the time, Intel Xeon with AMX).
struct Ahead {
    rows: [Option<*const u8>; ROWS],
    /// The block's bytes of each row: from this offset, this many cache lines.
    from: usize,
    lines: usize,
}

impl Ahead {
    /// The block spanning bytes `[from, to)` of each row.
    fn new(rows: [Option<*const u8>; ROWS], from: usize, to: usize) -> Self {
        // One line more, for rows that do not start on a line.
        let lines = (to - from).div_ceil(64) + 1;
        Self { rows, from, lines }
    }

    /// Prefetches share `i` of `of`.
    fn prefetch(&self, i: usize, of: usize) {
        let all = ROWS * self.lines;
        for l in all * i / of..all * (i + 1) / of {
            if let Some(row) = self.rows[l / self.lines] {
                let at = row.wrapping_add(self.from + l % self.lines * 64);
                // SAFETY: a prefetch reads nothing the program sees and never faults, whatever
                // the address.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(at as *const i8) };
            }
        }
    }
}

/// Runs `f` on this thread's buffer for packed weight tiles, of `len` f32.
fn with_packed(len: usize, f: impl FnOnce(&mut [f32])) {
    thread_local! {
        static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    with_buffer(&PACKED, len, f)
}

/// One micro-kernel call: token tiles `tb` and `tb + 1` (or `tb` alone, the last of `tiles`) of
/// the depth block from `pc` (its first tile and the bytes between tiles, as
/// [`Tokens::block`] gives them) against a panel's tiles `a` (as the kernels take them) over
/// `steps` steps, into the panel's sums, accumulated after the first depth block.
///
/// A panel's sums are `mp / 32` blocks of 32 rows × 32 tokens (4 KiB, token tiles `tb` and
/// `tb + 1` for even `tb`), so that each call's four tiles of sums are one contiguous block: rows
/// of a whole `[32][mp]` matrix lay `4 × mp` bytes apart, and storing and reloading them took a
/// third of the kernel's time at 512 tokens (1.32× faster contiguous, one core, 256-deep steps).
///
/// # Safety
/// The panel's tiles and the block's token tiles hold `steps` steps.
unsafe fn pair(
    tiles: &Tiles,
    (first, tile_bytes): (*const u16, usize),
    tb: usize,
    tiles_in_all: usize,
    (pc, steps): (usize, usize),
    a: (*const u16, *const u16, usize, usize),
    sums: &mut [f32],
) {
    debug_assert!(sums.len() >= (tb + 2) * 16 * ROWS);
    let (b0, acc) = (first.wrapping_byte_add(tb * tile_bytes), pc > 0);
    let ct = sums[tb * 16 * ROWS..].as_mut_ptr();
    // SAFETY: the caller's contract; the sums' block for tiles tb and tb + 1 (32 rows of 32
    // tokens from tb·16·32, tb even) lies in `sums`, the token tiles in the tokens' buffer.
    unsafe {
        if tb + 1 < tiles_in_all {
            let b1 = b0.wrapping_byte_add(tile_bytes);
            amx::bf16_2x2(tiles, steps, a, (b0, b1), ct, 2 * 64, acc);
        } else {
            amx::bf16_2x1(tiles, steps, a, b0, ct, 2 * 64, acc);
        }
    }
}

/// The panel's two groups of 16 rows in place (each group's first row), and the distance
/// between rows in bytes, when they are dense bf16, its 32 rows all exist and the depth is a
/// multiple of 32 (the tiles then never read past a row).
fn in_place<E: Encoding>(
    rows: &[Option<*const u8>; ROWS],
    w: Weights<'_>,
    k: usize,
) -> Option<(*const u16, *const u16, usize)> {
    let stride = match w {
        Weights::Single(mat) | Weights::GateUp(mat, ..) => mat.row_bytes(),
    };
    let (a0, a1) = (rows[0]?, rows[16]?);
    // Rows of a group are `stride` apart (gate and up are two matrices of one shape).
    let regular = rows.iter().enumerate().all(|(i, r)| {
        let first = if i < 16 { a0 } else { a1 };
        *r == Some(first.wrapping_add(i % 16 * stride))
    });
    let ok = E::TILE_ROWS && regular && k.is_multiple_of(STEP);
    ok.then_some((a0 as *const u16, a1 as *const u16, stride))
}

/// Packs 32 weight rows (`None`: zeros) over values `[pc, pc + depth)` into `dst` as the
/// kernels' first operand, in bf16: two groups of 16 rows, each a tile per step of 32 values
/// (16 rows of 64 bytes, 1 KiB), group after group; zeros past `depth`.
///
/// # Safety
/// The rows hold values of encoding `E` up to `pc + depth` (`pc` a multiple of 32); `dst`
/// holds `2 × ⌈depth / 32⌉` KiB (a debug assertion checks it).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c,avx512bf16")]
unsafe fn pack_panel<E: Encoding>(
    rows: &[Option<*const u8>; ROWS],
    pc: usize,
    depth: usize,
    dst: &mut [f32],
) {
    let steps = depth.div_ceil(STEP);
    debug_assert!(std::mem::size_of_val(dst) >= 2 * steps * TILE_BYTES);
    let dst = dst.as_mut_ptr() as *mut u16;
    // SAFETY: the caller's contract: every row read holds `pc + depth` values (masked loads
    // read nothing past `depth` and nothing of a missing row); every tile written lies in `dst`.
    unsafe {
        // Step by step across the 32 rows, as the kernels read them: 32 streams at once keep
        // memory busier than one row after another. Where a header covers several steps (q4k's
        // super-blocks), those steps of a row at once, the header decoded once.
        let per_header = E::HEADER_VALUES / STEP;
        let mut s = 0;
        while per_header > 1 && (s + per_header) * STEP <= depth {
            let at = pc + s * STEP;
            debug_assert_eq!(at % E::HEADER_VALUES, 0);
            let ahead = E::byte_offset(at) + PREFETCH_BYTES;
            for (i, row) in rows.iter().enumerate() {
                let (g, r) = (i / 16, i % 16);
                let v = match row {
                    Some(p) => {
                        for line in 0..3 {
                            let at = p.wrapping_add(ahead + 64 * line);
                            _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
                        }
                        E::load256(*p, at)
                    }
                    None => [[_mm512_setzero_ps(); 2]; 8],
                };
                // (A loop, not a closure: closures would not inherit the target features.)
                for (t, [lo, hi]) in v.iter().enumerate().take(per_header) {
                    let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(*hi, *lo));
                    let tile = dst.add((g * steps + s + t) * TILE_BYTES / 2);
                    _mm512_storeu_si512(tile.add(r * STEP) as *mut _, v);
                }
            }
            s += per_header;
        }
        for s in s..steps {
            let n = (depth - s * STEP).min(STEP);
            let ahead = E::byte_offset(pc + s * STEP) + PREFETCH_BYTES;
            for (i, row) in rows.iter().enumerate() {
                let (g, r) = (i / 16, i % 16);
                let v = match row {
                    Some(p) => {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
                        load32::<E>(*p, pc + s * STEP, n)
                    }
                    None => _mm512_setzero_si512(),
                };
                let tile = dst.add((g * steps + s) * TILE_BYTES / 2);
                _mm512_storeu_si512(tile.add(r * STEP) as *mut _, v);
            }
        }
    }
}

/// Values `[i, i + n)` of a row as bf16 bits (zeros past `n ≤ 32`): dense bf16 as it is,
/// others decoded to f32 and rounded to nearest even by VCVTNE2PS2BF16 (one instruction where
/// plain AVX-512 takes nine per 16 values; every CPU with AMX has it).
#[inline(always)]
pub(super) unsafe fn load32<E: Encoding>(row: *const u8, i: usize, n: usize) -> __m512i {
    // SAFETY: the caller's contract (pack_panel's): the row holds the values, the features.
    unsafe {
        if E::TILE_ROWS {
            // Dense bf16: its bits as they are.
            return avx512::load32_bf16((row as *const half::bf16).add(i), n);
        }
        let [lo, hi] = avx512::load32_f32::<E>(row, i, n);
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }
}

/// A panel's epilogue: `sums` holds 32 rows (`C[row][token]`, blocks of 32 tokens as [`pair`]
/// writes them, `mp` tokens in all) for output
/// columns `[j, j + valid)`: 32 columns of one matrix, or 16 gate then the same 16 up columns.
/// Adds the biases, applies `σ(gate) ⊙ up`, and writes `out[token][j..]` for the `m` tokens,
/// rounded once to `T`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn epilogue<T: Element>(
    sums: &[f32],
    mp: usize,
    m: usize,
    w: Weights<'_>,
    bias: Bias<'_>,
    j: usize,
    valid: usize,
    n: usize,
    out: DisjointOut<'_, T>,
) {
    debug_assert!(sums.len() >= ROWS * mp);
    let bias_at = |b: Option<&[f32]>, c: usize| b.map_or(0.0, |b| b[j + c]);
    let sums = sums.as_ptr();
    // SAFETY: the caller's contract: the sums, the biases' n values and the output's m × n
    // values hold every index below; the features are checked.
    unsafe {
        for t0 in (0..m).step_by(16) {
            let tokens = (m - t0).min(16);
            let row = |r: usize| _mm512_loadu_ps(sums.add(t0 / 32 * 32 * ROWS + r * 32 + t0 % 32));
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
                    avx512::store16_mask(out.at((t0 + i) * n + j + g), *v, mask);
                }
            }
        }
    }
}
