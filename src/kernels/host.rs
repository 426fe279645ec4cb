//! The CPU side of the custom ops on x86-64: the AVX-512 kernels of [`super::cpu`] and
//! [`super::int8`]. Other architectures compile `host_portable.rs` in its place.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, WithDType};
use half::{bf16, f16};

use super::element::Element;
use super::{cpu, int8, vnni, Act, GateUpOp, GatedOp, LinearOp, QuantGateUpOp, QuantLinearOp};

/// Whether the CPU ops can run on this machine.
pub(super) fn available() -> bool {
    cpu::features().avx512
}

/// Whether the quantized ops can take these weights: all read in place, in one format.
pub(super) fn quantized_available(ws: &[&QTensor]) -> bool {
    let formats: Option<Vec<Blocks>> = ws.iter().map(|q| blocks(q).map(|b| b.0)).collect();
    formats.is_some_and(|f| f.windows(2).all(|w| w[0] == w[1]))
}

/// The contiguous values of a CPU tensor argument, or `None` if it is strided.
fn contiguous<'a, T: WithDType>(s: &'a [T], l: &Layout) -> Option<&'a [T]> {
    l.contiguous_offsets().map(|(a, b)| &s[a..b])
}

fn not_contiguous(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: arguments must be contiguous"))
}

/// The GGUF formats the CPU ops read in place, with the CPU features each needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blocks {
    /// Q4_1, decoded exactly to f32 (AVX-512).
    Q4_1,
    /// q8_0 or q4k, in integer dot products (AVX512-VNNI).
    Int8(vnni::Kind),
}

impl Blocks {
    fn of(dtype: GgmlDType) -> Option<Self> {
        let features = cpu::features();
        match dtype {
            GgmlDType::Q4_1 if features.avx512 => Some(Blocks::Q4_1),
            GgmlDType::Q8_0 if features.vnni => Some(Blocks::Int8(vnni::Kind::Q8_0)),
            GgmlDType::Q4K if features.vnni => Some(Blocks::Int8(vnni::Kind::Q4K)),
            _ => None,
        }
    }

    fn block_values(self) -> usize {
        match self {
            Blocks::Q4_1 => 32,
            Blocks::Int8(kind) => kind.block_values(),
        }
    }

    fn row_bytes(self, k: usize) -> usize {
        match self {
            Blocks::Q4_1 => <cpu::Q4_1 as cpu::Format>::row_bytes(k),
            Blocks::Int8(kind) => kind.row_bytes(k),
        }
    }
}

/// A CPU `QTensor` `[n, k]` the ops can read in place: its format, its raw blocks, `n`, `k`.
fn blocks(q: &QTensor) -> Option<(Blocks, Cow<'_, [u8]>, usize, usize)> {
    let (n, k) = q.shape().dims2().ok()?;
    let format = Blocks::of(q.dtype())?;
    let ok = q.device().is_cpu() && k > 0 && k.is_multiple_of(format.block_values());
    let data = q.data().ok()?;
    (ok && data.len() == n * format.row_bytes(k)).then_some((format, data, n, k))
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
    fn go<T: Element + WithDType>(
        act: Act,
        bias: cpu::Bias<'_>,
        (x, wg, wu): (&[T], &[T], &[T]),
        (l1, l2, l3): (&Layout, &Layout, &Layout),
        (m, k, n): (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let (Some(x), Some(wg), Some(wu)) =
            (contiguous(x, l1), contiguous(wg, l2), contiguous(wu, l3))
        else {
            return Err(not_contiguous("glu-gate-up"));
        };
        let compute = cpu::Compute::best::<T>();
        // SAFETY: `cpu_available()` was checked; slices have the lengths of their shapes.
        let (wg, wu) = (cpu::Mat::dense(wg, k), cpu::Mat::dense(wu, k));
        Ok(unsafe { cpu::gate_up::<T, cpu::Dense<T>>(x, m, k, wg, wu, n, act, bias, compute) })
    }
    let bias = match &op.bias {
        Some((bg, bu)) if bg.len() == n && bu.len() == n => cpu::Bias {
            a: Some(bg),
            b: Some(bu),
        },
        Some(_) => candle_core::bail!("glu-gate-up: biases must hold {n} values"),
        None => cpu::Bias::default(),
    };
    let act = Act::from(op.act);
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
    fn go<T: Element + WithDType>(
        bias: Option<&[f32]>,
        (x, w): (&[T], &[T]),
        (l1, l2): (&Layout, &Layout),
        (m, k, n): (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let (Some(x), Some(w)) = (contiguous(x, l1), contiguous(w, l2)) else {
            return Err(not_contiguous("glu-linear"));
        };
        let compute = cpu::Compute::best::<T>();
        // SAFETY: `cpu_available()` was checked; slices have the lengths of their shapes.
        let w = cpu::Mat::dense(w, k);
        Ok(unsafe { cpu::linear::<T, cpu::Dense<T>>(x, m, k, w, n, bias, compute) })
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
        act: Act,
        g: &[T],
        u: &[T],
        l1: &Layout,
        l2: &Layout,
    ) -> Result<Vec<T>> {
        let (Some(g), Some(u)) = (contiguous(g, l1), contiguous(u, l2)) else {
            return Err(not_contiguous("glu-gated"));
        };
        let mut out = vec![T::default(); g.len()];
        // SAFETY: `cpu_available()` was checked; all three have `g.len()` values.
        unsafe { cpu::gated(act, g, u, &mut out) };
        Ok(out)
    }
    let act = Act::from(op.act);
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
        candle_core::bail!("glu-gate-up-quantized: weights of different shapes or formats")
    }
    let (g, u) = (
        cpu::Mat::blocks(&wg, fg.row_bytes(k)),
        cpu::Mat::blocks(&wu, fg.row_bytes(k)),
    );
    let act = Act::from(op.act);
    // SAFETY: `blocks` checked the CPU features and that the blocks hold n rows of k
    // values; x holds m × k.
    let h = unsafe {
        match fg {
            Blocks::Q4_1 => cpu::gate_up::<f32, cpu::Q4_1>(
                x,
                m,
                k,
                g,
                u,
                n,
                act,
                cpu::Bias::default(),
                cpu::Compute::Fma,
            ),
            Blocks::Int8(kind) => int8::gate_up(x, m, k, g, u, n, act, kind),
        }
    };
    Ok((CpuStorage::F32(h), Shape::from((m, n))))
}

/// [`QuantLinearOp`]'s forward pass.
pub(super) fn quant_linear(
    op: &QuantLinearOp,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, m, k) = f32_input(op.name(), s, l)?;
    let Some((format, w, n, kw)) = blocks(&op.w) else {
        candle_core::bail!("glu-linear-quantized: a weight this CPU cannot read in place")
    };
    if kw != k {
        candle_core::bail!("glu-linear-quantized: the weight has {kw} inputs, x has {k}")
    }
    let w = cpu::Mat::blocks(&w, format.row_bytes(k));
    // SAFETY: as in QuantGateUpOp.
    let y = unsafe {
        match format {
            Blocks::Q4_1 => cpu::linear::<f32, cpu::Q4_1>(x, m, k, w, n, None, cpu::Compute::Fma),
            Blocks::Int8(kind) => int8::linear(x, m, k, w, n, kind),
        }
    };
    Ok((CpuStorage::F32(y), Shape::from((m, n))))
}
