//! The CPU side of the custom ops, on x86-64: from candle's storage to slices, then to the
//! schedules and micro-kernels. Other architectures compile `../portable.rs` in its place.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | the ops' CPU side; the weights of a call ([`Mat`], [`Weights`], [`Bias`]); the choice of schedule; the split of output columns into tasks ([`column_tasks`]) |
//! | `dot.rs` | the dot schedule (decode, few tokens): weight rows streamed in place |
//! | `packed.rs` | the packed schedule (prefill): GotoBLAS-style blocking around a register micro-kernel |
//! | `tiled.rs` | the tiled schedule (prefill on AMX: dense bf16 and GGUF from a token count per type): weight rows as tile operands, in place or packed (GGUF: decoded to bf16) per block |
//! | `int8.rs` | both schedules for GGUF q8_0 and q4k, the dot one for Q4_1, over activations rounded to 8 bits |
//! | `parallel.rs` | candle's worker pool, disjoint output writes, per-thread scratch |
//! | `element.rs` | the element types: f32, bf16, f16 |
//! | `avx512.rs` | AVX-512 micro-kernels: loads/stores, σ in f32, f32 FMA and bf16 dot-product tiles, row encodings (dense; GGUF Q4_1, q8_0, q4k decoded to f32) |
//! | `vnni.rs` | AVX512-VNNI micro-kernels: 8-bit rounding, q8_0 and q4k dot products and tiles, Q4_1 dot products |
//! | `amx.rs` | AMX micro-kernels: the tile configuration, bf16 tile products |
//! | `tests.rs` | each micro-kernel and schedule against float64 |

mod amx;
mod avx512;
mod dot;
mod element;
mod int8;
mod packed;
mod parallel;
#[cfg(test)]
mod tests;
mod tiled;
mod vnni;

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, WithDType};
use half::{bf16, f16};

use self::avx512::{Dense, Encoding};
use self::element::Element;
use super::detect::{features, MicroKernel};
use super::ops::{GateUpOp, GatedOp, LinearOp, QuantGateUpOp, QuantLinearOp};
use crate::Activation;

/// Whether the CPU ops can run on this machine.
pub(super) fn available() -> bool {
    features().avx512()
}

/// A weight matrix `[n, k]` whose rows are `row_bytes` apart, in some encoding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat<'a> {
    bytes: &'a [u8],
    row_bytes: usize,
}

impl<'a> Mat<'a> {
    /// Dense `[n, k]` rows of `T`.
    pub(crate) fn dense<T: Element>(w: &'a [T], k: usize) -> Self {
        // SAFETY: `T` is f32, bf16 or f16: plain bits, no padding, any byte readable.
        let bytes = unsafe {
            std::slice::from_raw_parts(w.as_ptr() as *const u8, std::mem::size_of_val(w))
        };
        Self {
            bytes,
            row_bytes: Dense::<T>::row_bytes(k),
        }
    }

    /// Rows of `row_bytes` bytes each (GGUF blocks).
    pub(crate) fn blocks(bytes: &'a [u8], row_bytes: usize) -> Self {
        Self { bytes, row_bytes }
    }

    /// The bytes between two rows.
    pub(crate) fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The address of row `j` (formed without reading; past the end for `j ≥ n`).
    pub(crate) fn row(&self, j: usize) -> *const u8 {
        self.bytes.as_ptr().wrapping_add(j * self.row_bytes)
    }
}

/// The weights of one call.
#[derive(Clone, Copy)]
pub(crate) enum Weights<'a> {
    /// One matrix: `y = x·Wᵀ`.
    Single(Mat<'a>),
    /// Gate and up: `h = σ(x·Wgᵀ) ⊙ x·Wuᵀ`.
    GateUp(Mat<'a>, Mat<'a>, Activation),
}

/// One task's share of a prefill call's output columns, `[j0, j0 + cols)`, in panels of 32
/// weight rows: 32 columns of one matrix, or 16 columns from 16 gate and the same 16 up rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Columns {
    /// The task's first output column.
    pub j0: usize,
    /// How many output columns the task has.
    pub cols: usize,
    /// Output columns per panel: 32, or 16 for gate and up.
    pub per_panel: usize,
}

impl Columns {
    /// The task's panels.
    pub(crate) fn panels(&self) -> usize {
        self.cols.div_ceil(self.per_panel)
    }

    /// Panel `p`'s first output column, and how many of its columns exist.
    pub(crate) fn panel(&self, p: usize) -> (usize, usize) {
        let j = self.j0 + p * self.per_panel;
        (j, self.per_panel.min(self.j0 + self.cols - j))
    }
}

/// Splits `n` output columns into tasks of at most `panels` panels of 32 weight rows each (as
/// [`task_panels`] balances them over the threads), and runs `task` for each on candle's worker
/// pool. Tasks get disjoint column ranges.
pub(crate) fn column_tasks(w: Weights<'_>, n: usize, panels: usize, task: impl Fn(Columns) + Sync) {
    let per_panel = match w {
        Weights::Single(_) => 32,
        Weights::GateUp(..) => 16,
    };
    let panels = task_panels(n.div_ceil(per_panel), panels, parallel::threads());
    let per_task = per_panel * panels;
    parallel::parallel_for(n.div_ceil(per_task), |t| {
        let j0 = t * per_task;
        task(Columns {
            j0,
            cols: per_task.min(n - j0),
            per_panel,
        })
    });
}

/// Panels per task for `total` panels on `threads` threads: the most, up to `most`, with which
/// the busiest thread gets the fewest panels, tasks taken in turn (`cpu/tests.rs` checks that
/// it gets its even share against a simulation of candle's pool). Eight panels a task leave 18
/// panels (the down projection of a 576-wide model) as 8 + 2 against 8 on two threads; three a
/// task, 9 against 9.
fn task_panels(total: usize, most: usize, threads: usize) -> usize {
    // The panels of the busiest thread, tasks of `per` panels (the last one short) in turn.
    let busiest = |per: usize| {
        let tasks = total.div_ceil(per);
        let short = tasks * per - total;
        (0..threads.min(tasks))
            .map(|t| {
                let own = (tasks - t).div_ceil(threads) * per;
                own - if (tasks - 1) % threads == t { short } else { 0 }
            })
            .max()
            .unwrap_or(0)
    };
    let most = most.max(1);
    let best = (1..=most).map(busiest).min().unwrap_or(0);
    (1..=most)
        .rev()
        .find(|&per| busiest(per) == best)
        .unwrap_or(most)
}

/// How a call of dense `T` weights multiplies: chosen per call from the element type and the
/// kernels of this process ([`features`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compute {
    /// f32 FMAs on widened values: any encoding.
    Fma,
    /// bf16 dot products (VDPBF16PS) in the packed schedule: dense bf16 only.
    Bf16Dot,
    /// The AMX tiles (the tiled schedule) from [`tiled::MIN_TOKENS`] tokens, f32 FMAs below:
    /// dense bf16 only.
    Amx,
}

/// The micro-kernel [`matmul`] runs for `m` tokens of depth `k`, with `compute`, on weights of
/// dtype bf16 (`bf16`) or another: the one place that choice is made.
fn dense_kernel(compute: Compute, bf16: bool, m: usize, k: usize) -> MicroKernel {
    if compute == Compute::Amx && bf16 && m >= tiled::MIN_TOKENS && k > 0 {
        MicroKernel::AmxBf16
    } else if m <= dot::MAX_TOKENS || k == 0 {
        MicroKernel::FmaRows
    } else if compute == Compute::Bf16Dot && bf16 {
        MicroKernel::Avx512Bf16
    } else {
        MicroKernel::FmaPacked
    }
}

/// The micro-kernel [`quant_matmul`] runs for `m` tokens of `qtype` weights.
fn quant_kernel(qtype: QuantType, m: usize, exact_q4_1: bool) -> MicroKernel {
    let tiles = !(exact_q4_1 && qtype == QuantType::Q4_1);
    match qtype {
        _ if tiles && features().amx_bf16() && m >= qtype.tile_min_tokens() => MicroKernel::AmxBf16,
        QuantType::Q4_1 if !exact_q4_1 && features().vnni() && m <= int8::Q4_1_DOT_MAX_TOKENS => {
            MicroKernel::VnniRows
        }
        QuantType::Q4_1 => dense_kernel(Compute::Fma, false, m, 1),
        QuantType::Int8(_) if m <= int8::DOT_MAX_TOKENS => MicroKernel::VnniRows,
        QuantType::Int8(_) => MicroKernel::VnniPacked,
    }
}

/// The micro-kernel the dense ops run for `m` tokens of depth `k` on `dtype` weights, if the
/// CPU ops take them.
pub(super) fn dense_micro_kernel(dtype: DType, m: usize, k: usize) -> Option<MicroKernel> {
    let compute = match dtype {
        DType::F32 => Compute::best::<f32>(),
        DType::BF16 => Compute::best::<bf16>(),
        DType::F16 => Compute::best::<f16>(),
        _ => return None,
    };
    available().then(|| dense_kernel(compute, dtype == DType::BF16, m, k))
}

/// The micro-kernel the quantized ops run for `m` tokens of weight `w`, if they take it.
pub(super) fn quant_micro_kernel(w: &QTensor, m: usize, exact_q4_1: bool) -> Option<MicroKernel> {
    let qtype = blocks(w)?.0;
    Some(quant_kernel(qtype, m, exact_q4_1))
}

impl Compute {
    /// The compute for dense `T` weights and activations in this process: for bf16, AMX tiles
    /// or bf16 dot products where [`features`] chose them (see `detect.rs`); else f32 FMAs.
    pub(crate) fn best<T: Element>() -> Self {
        let bf16 = T::DTYPE == DType::BF16;
        if bf16 && features().amx_bf16() {
            Compute::Amx
        } else if bf16 && features().bf16_dot() {
            Compute::Bf16Dot
        } else {
            Compute::Fma
        }
    }
}

/// Biases added before the epilogue, `n` f32 each: the single matrix's (or the gate's) in `a`,
/// the up projection's in `b`.
#[derive(Clone, Copy, Default)]
pub(crate) struct Bias<'a> {
    pub a: Option<&'a [f32]>,
    pub b: Option<&'a [f32]>,
}

/// `y = x·Wᵀ + b`, or `h = σ(x·Wgᵀ + bg) ⊙ (x·Wuᵀ + bu)`: `x` is `[m, k]`, the weights `[n, k]`
/// in encoding `E`; returns `[m, n]`. The tiled schedule (AMX) from [`tiled::MIN_TOKENS`] tokens
/// where `compute` says so; else the dot schedule up to [`dot::MAX_TOKENS`] tokens, the packed
/// one past them.
///
/// # Safety
/// [`features`]`().avx512()` must be true, and for [`Compute::Bf16Dot`] the CPU must have
/// AVX512-BF16, for [`Compute::Amx`] AMX granted to this process
/// ([`amx_usable`](crate::kernels::detect::amx_usable)); the weights hold `n` rows of `k`
/// values in encoding `E`; biases, if any, hold `n` values; `Bf16Dot` and `Amx` only with
/// `T = bf16` and `E = Dense<bf16>`.
pub(crate) unsafe fn matmul<T: Element, E: Encoding>(
    x: &[T],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Bias<'_>,
    compute: Compute,
) -> Vec<T> {
    debug_assert_eq!(x.len(), m * k);
    let mut out = vec![T::default(); m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let bf16 = T::DTYPE == DType::BF16;
    // SAFETY: the caller's contract is the schedules'; the tiles and bf16 dot products are
    // chosen only for bf16 (dense, by the contract).
    unsafe {
        match dense_kernel(compute, bf16, m, k) {
            MicroKernel::AmxBf16 => tiled::run::<T, E>(x, m, k, w, n, bias, &mut out),
            // The dot schedule also takes k = 0 (sums of nothing, plus the biases).
            MicroKernel::FmaRows => dot::run::<T, E>(x, m, k, w, n, bias, &mut out),
            MicroKernel::Avx512Bf16 => {
                packed::run::<T, E>(x, m, k, w, n, bias, packed::Micro::Bf16Dot, &mut out)
            }
            _ => packed::run::<T, E>(x, m, k, w, n, bias, packed::Micro::Fma, &mut out),
        }
    }
    out
}

/// Whether the quantized ops can take these weights: all read in place, in one format.
pub(super) fn quantized_available(ws: &[&QTensor]) -> bool {
    let types: Option<Vec<QuantType>> = ws.iter().map(|q| blocks(q).map(|b| b.0)).collect();
    types.is_some_and(|t| t.windows(2).all(|w| w[0] == w[1]))
}

/// The contiguous values of a CPU tensor argument, or `None` if it is strided.
fn contiguous<'a, T: WithDType>(s: &'a [T], l: &Layout) -> Option<&'a [T]> {
    l.contiguous_offsets().map(|(a, b)| &s[a..b])
}

fn not_contiguous(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: arguments must be contiguous"))
}

/// The GGUF types the CPU ops read in place, with the CPU features each needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuantType {
    /// Q4_1, in integers over 8-bit activations for few tokens (AVX512-VNNI), decoded exactly
    /// to f32 (AVX-512), or to bf16 for the AMX tiles.
    Q4_1,
    /// q8_0 or q4k, in integer dot products (AVX512-VNNI), or decoded to bf16 for the tiles.
    Int8(vnni::Kind),
}

impl QuantType {
    fn of(dtype: GgmlDType) -> Option<Self> {
        let features = features();
        match dtype {
            GgmlDType::Q4_1 if features.avx512() => Some(QuantType::Q4_1),
            GgmlDType::Q8_0 if features.vnni() => Some(QuantType::Int8(vnni::Kind::Q8_0)),
            GgmlDType::Q4K if features.vnni() => Some(QuantType::Int8(vnni::Kind::Q4K)),
            _ => None,
        }
    }

    /// From this many tokens the AMX tiles take these weights (on AMX machines).
    fn tile_min_tokens(self) -> usize {
        match self {
            QuantType::Q4_1 => tiled::QUANT_MIN_TOKENS_Q4_1,
            QuantType::Int8(vnni::Kind::Q8_0) => tiled::QUANT_MIN_TOKENS_Q8_0,
            QuantType::Int8(vnni::Kind::Q4K) => tiled::QUANT_MIN_TOKENS_Q4K,
        }
    }

    fn block_values(self) -> usize {
        match self {
            QuantType::Q4_1 => 32,
            QuantType::Int8(kind) => kind.block_values(),
        }
    }

    fn row_bytes(self, k: usize) -> usize {
        match self {
            QuantType::Q4_1 => avx512::Q4_1::row_bytes(k),
            QuantType::Int8(kind) => kind.row_bytes(k),
        }
    }
}

/// Runs `f(i)` for `i` in `0..n` on candle's worker pool, the kernels inside each task on its
/// thread alone.
pub(super) use parallel::{parallel_for as tasks, threads};

/// Row bytes past which a quantized weight is left to candle: q8_0's unpacking gathers 16
/// rows' scales with 32-bit offsets (15 rows × this stay below `i32::MAX`). Real rows are
/// kilobytes.
const MAX_QUANT_ROW_BYTES: usize = i32::MAX as usize / 16;

/// A CPU `QTensor` `[n, k]` the ops can read in place: its type, its raw blocks, `n`, `k`.
fn blocks(q: &QTensor) -> Option<(QuantType, Cow<'_, [u8]>, usize, usize)> {
    // On the host only (checked before `data`, which would copy a GPU tensor back).
    if !q.device().is_cpu() {
        return None;
    }
    let (n, k) = q.shape().dims2().ok()?;
    let qtype = QuantType::of(q.dtype())?;
    // Every type here takes at least 4 bits a value: past 2 × the row bound, `row_bytes`
    // could wrap rather than exceed it.
    let ok = k > 0 && k.is_multiple_of(qtype.block_values()) && k <= 2 * MAX_QUANT_ROW_BYTES;
    let row_bytes = qtype.row_bytes(k);
    if !ok || row_bytes > MAX_QUANT_ROW_BYTES {
        return None;
    }
    let data = q.data().ok()?;
    (n.checked_mul(row_bytes) == Some(data.len())).then_some((qtype, data, n, k))
}

/// That an output of `m × n` values has a size: the products that size the kernels' outputs
/// are plain ones, and with `k = 0` the inputs' checked sizes bound neither `m` nor `n`.
fn check_output(op: &str, m: usize, n: usize) -> Result<()> {
    match m.checked_mul(n).and_then(|c| c.checked_mul(8)) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
        _ => candle_core::bail!("{op}: an output of {m} × {n} values is too large"),
    }
}

/// The f32 activations `[m, k]` of a quantized op.
fn f32_input<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], usize, usize)> {
    let (m, k) = l.shape().dims2()?;
    let CpuStorage::F32(x) = s else {
        candle_core::bail!("{op}: activations must be f32")
    };
    let Some(x) = contiguous(x, l) else {
        return Err(not_contiguous(op));
    };
    // A checked product, as in `gate_up`.
    if m.checked_mul(k) != Some(x.len()) {
        candle_core::bail!("{op}: the storage does not hold the shape")
    }
    Ok((x, m, k))
}

/// [`GateUpOp`]'s forward pass.
pub(super) fn gate_up(
    op: &GateUpOp,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k2 != k || l3.shape().dims() != [n, k] || !available() {
        candle_core::bail!("glu-gate-up: bad shapes or no AVX-512")
    }
    check_output("glu-gate-up", m, n)?;
    fn go<T: Element + WithDType>(
        act: Activation,
        bias: Bias<'_>,
        (x, wg, wu): (&[T], &[T], &[T]),
        (l1, l2, l3): (&Layout, &Layout, &Layout),
        (m, k, n): (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let (Some(x), Some(wg), Some(wu)) =
            (contiguous(x, l1), contiguous(wg, l2), contiguous(wu, l3))
        else {
            return Err(not_contiguous("glu-gate-up"));
        };
        // Checked products: candle's element counts are plain products, which a shape of
        // absurd dimensions wraps in release builds.
        let holds = |len: usize, rows: usize| rows.checked_mul(k) == Some(len);
        if !holds(x.len(), m) || !holds(wg.len(), n) || !holds(wu.len(), n) {
            candle_core::bail!("glu-gate-up: the storage does not hold the shapes")
        }
        let w = Weights::GateUp(Mat::dense(wg, k), Mat::dense(wu, k), act);
        // SAFETY: `available()` was checked by the caller; the slices hold their shapes; the
        // biases were checked to hold n values; `Compute::best` picks bf16 dot products only
        // for bf16, whose weights are then dense bf16.
        Ok(unsafe { matmul::<T, Dense<T>>(x, m, k, w, n, bias, Compute::best::<T>()) })
    }
    let bias = match &op.bias {
        Some((bg, bu)) if bg.len() == n && bu.len() == n => Bias {
            a: Some(bg),
            b: Some(bu),
        },
        Some(_) => candle_core::bail!("glu-gate-up: biases must hold {n} values"),
        None => Bias::default(),
    };
    let act = op.act;
    let ls = (l1, l2, l3);
    let dims = (m, k, n);
    let out = match (s1, s2, s3) {
        (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(u)) => {
            CpuStorage::F32(go(act, bias, (x, g, u), ls, dims)?)
        }
        (CpuStorage::BF16(x), CpuStorage::BF16(g), CpuStorage::BF16(u)) => {
            CpuStorage::BF16(go::<bf16>(act, bias, (x, g, u), ls, dims)?)
        }
        (CpuStorage::F16(x), CpuStorage::F16(g), CpuStorage::F16(u)) => {
            CpuStorage::F16(go::<f16>(act, bias, (x, g, u), ls, dims)?)
        }
        _ => candle_core::bail!("glu-gate-up: x, Wg and Wu must share an f32/bf16/f16 dtype"),
    };
    Ok((out, Shape::from((m, n))))
}

/// [`LinearOp`]'s forward pass.
pub(super) fn linear(
    op: &LinearOp,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k2 != k || !available() {
        candle_core::bail!("glu-linear: bad shapes or no AVX-512")
    }
    check_output("glu-linear", m, n)?;
    fn go<T: Element + WithDType>(
        bias: Option<&[f32]>,
        (x, w): (&[T], &[T]),
        (l1, l2): (&Layout, &Layout),
        (m, k, n): (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let (Some(x), Some(w)) = (contiguous(x, l1), contiguous(w, l2)) else {
            return Err(not_contiguous("glu-linear"));
        };
        // Checked products, as in `gate_up`.
        if m.checked_mul(k) != Some(x.len()) || n.checked_mul(k) != Some(w.len()) {
            candle_core::bail!("glu-linear: the storage does not hold the shapes")
        }
        let w = Weights::Single(Mat::dense(w, k));
        let bias = Bias { a: bias, b: None };
        // SAFETY: as in `gate_up`.
        Ok(unsafe { matmul::<T, Dense<T>>(x, m, k, w, n, bias, Compute::best::<T>()) })
    }
    let bias = op.bias.as_deref();
    if bias.is_some_and(|b| b.len() != n) {
        candle_core::bail!("glu-linear: the bias must hold {n} values")
    }
    let out = match (s1, s2) {
        (CpuStorage::F32(x), CpuStorage::F32(w)) => {
            CpuStorage::F32(go(bias, (x, w), (l1, l2), (m, k, n))?)
        }
        (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
            CpuStorage::BF16(go(bias, (x, w), (l1, l2), (m, k, n))?)
        }
        (CpuStorage::F16(x), CpuStorage::F16(w)) => {
            CpuStorage::F16(go(bias, (x, w), (l1, l2), (m, k, n))?)
        }
        _ => candle_core::bail!("glu-linear: h and W must share an f32/bf16/f16 dtype"),
    };
    Ok((out, Shape::from((m, n))))
}

/// [`GatedOp`]'s forward pass.
pub(super) fn gated(
    op: &GatedOp,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    if l1.shape() != l2.shape() || !available() {
        candle_core::bail!("glu-gated: gate and up differ in shape, or no AVX-512")
    }
    fn go<T: Element + WithDType>(
        act: Activation,
        g: &[T],
        u: &[T],
        l1: &Layout,
        l2: &Layout,
    ) -> Result<Vec<T>> {
        let (Some(g), Some(u)) = (contiguous(g, l1), contiguous(u, l2)) else {
            return Err(not_contiguous("glu-gated"));
        };
        if g.len() != u.len() {
            candle_core::bail!("glu-gated: the storage does not hold the shapes")
        }
        let mut out = vec![T::default(); g.len()];
        // SAFETY: `available()` was checked; all three have `g.len()` values.
        unsafe { gated_product(act, g, u, &mut out) };
        Ok(out)
    }
    let act = op.act;
    let out = match (s1, s2) {
        (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(go(act, g, u, l1, l2)?),
        (CpuStorage::BF16(g), CpuStorage::BF16(u)) => CpuStorage::BF16(go(act, g, u, l1, l2)?),
        (CpuStorage::F16(g), CpuStorage::F16(u)) => CpuStorage::F16(go(act, g, u, l1, l2)?),
        _ => candle_core::bail!("glu-gated: gate and up must share an f32/bf16/f16 dtype"),
    };
    Ok((out, l1.shape().clone()))
}

/// [`QuantGateUpOp`]'s forward pass.
pub(super) fn quant_gate_up(
    op: &QuantGateUpOp,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, m, k) = f32_input(op.name(), s, l)?;
    let (Some((fg, wg, n, kg)), Some((fu, wu, n2, ku))) = (blocks(&op.wg), blocks(&op.wu)) else {
        candle_core::bail!("glu-gate-up-quantized: weights this CPU cannot read in place")
    };
    if (kg, ku, n2, fu) != (k, k, n, fg) {
        candle_core::bail!("glu-gate-up-quantized: weights of different shapes or types")
    }
    check_output(op.name(), m, n)?;
    let row_bytes = fg.row_bytes(k);
    let w = Weights::GateUp(
        Mat::blocks(&wg, row_bytes),
        Mat::blocks(&wu, row_bytes),
        op.act,
    );
    // SAFETY: `blocks` checked the CPU features and that the blocks hold n rows of k
    // values; `f32_input` that x holds m × k.
    let h = unsafe { quant_matmul(x, m, k, w, n, fg, op.exact_q4_1) };
    Ok((CpuStorage::F32(h), Shape::from((m, n))))
}

/// [`QuantLinearOp`]'s forward pass.
pub(super) fn quant_linear(
    op: &QuantLinearOp,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, m, k) = f32_input(op.name(), s, l)?;
    let Some((qtype, w, n, kw)) = blocks(&op.w) else {
        candle_core::bail!("glu-linear-quantized: a weight this CPU cannot read in place")
    };
    if kw != k {
        candle_core::bail!("glu-linear-quantized: the weight has {kw} inputs, x has {k}")
    }
    check_output(op.name(), m, n)?;
    let w = Weights::Single(Mat::blocks(&w, qtype.row_bytes(k)));
    // SAFETY: as in `quant_gate_up`.
    let y = unsafe { quant_matmul(x, m, k, w, n, qtype, op.exact_q4_1) };
    Ok((CpuStorage::F32(y), Shape::from((m, n))))
}

/// The quantized ops' product, `[m, n]` f32: on the AMX tiles from
/// [`QuantType::tile_min_tokens`] tokens where [`features`] chose them (weights decoded to bf16
/// per block as they are packed, activations rounded to bf16); below, or without AMX, q8_0/q4k
/// in integers over 8-bit activations (`int8.rs`), Q4_1 too up to
/// [`int8::Q4_1_DOT_MAX_TOKENS`] tokens and decoded exactly to f32 past them. With
/// `exact_q4_1`, Q4_1 is decoded exactly at every token count.
///
/// # Safety
/// As [`matmul`]'s, with `w` in `qtype`'s blocks (checked by [`blocks`]).
unsafe fn quant_matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    qtype: QuantType,
    exact_q4_1: bool,
) -> Vec<f32> {
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    // SAFETY: the caller's contract; `quant_kernel` takes the tiles only where `features`
    // chose them, which says they are granted.
    unsafe {
        match (quant_kernel(qtype, m, exact_q4_1), qtype) {
            (MicroKernel::AmxBf16, _) => quant_tiles(x, m, k, w, n, qtype),
            (MicroKernel::VnniRows, QuantType::Q4_1) => int8::matmul_q4_1(x, m, k, w, n),
            (_, QuantType::Q4_1) => {
                matmul::<f32, avx512::Q4_1>(x, m, k, w, n, Bias::default(), Compute::Fma)
            }
            (_, QuantType::Int8(kind)) => int8::matmul(x, m, k, w, n, kind),
        }
    }
}

/// [`quant_matmul`] on the AMX tiles, whatever the token count.
///
/// # Safety
/// As [`quant_matmul`]'s, and the tiles usable
/// ([`amx_usable`](crate::kernels::detect::amx_usable)); `m`, `k`, `n` > 0.
unsafe fn quant_tiles(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    qtype: QuantType,
) -> Vec<f32> {
    let (mut out, bias) = (vec![0.0; m * n], Bias::default());
    // SAFETY: the caller's contract is the tiled schedule's.
    unsafe {
        match qtype {
            QuantType::Q4_1 => tiled::run::<f32, avx512::Q4_1>(x, m, k, w, n, bias, &mut out),
            QuantType::Int8(vnni::Kind::Q8_0) => {
                tiled::run::<f32, avx512::Q8_0>(x, m, k, w, n, bias, &mut out)
            }
            QuantType::Int8(vnni::Kind::Q4K) => {
                tiled::run::<f32, avx512::Q4K>(x, m, k, w, n, bias, &mut out)
            }
        }
    }
    out
}

/// `out = σ(g) ⊙ u`, element-wise, split across threads.
///
/// # Safety
/// [`features`]`().avx512` must be true; the three slices have the same length.
unsafe fn gated_product<T: Element>(act: Activation, g: &[T], u: &[T], out: &mut [T]) {
    const CHUNK: usize = 1 << 14;
    let len = out.len();
    let out = parallel::DisjointOut::new(out);
    parallel::parallel_for(len.div_ceil(CHUNK), |i| {
        let s = i * CHUNK;
        // SAFETY: chunk `i` covers [s, s + CHUNK) ∩ [0, len) of all three slices, and only this
        // task writes it; the caller checked the features.
        unsafe {
            avx512::gated(
                act,
                g.as_ptr().add(s),
                u.as_ptr().add(s),
                out.at(s),
                CHUNK.min(len - s),
            )
        }
    });
}
