//! Fast paths of the block, each a candle custom op with a backward pass, and each with a plain
//! twin (candle's own ops) that the tests hold it to.
//!
//! - [`GateUpOp`] `(x, Wg, Wu) → σ(x·Wgᵀ) ⊙ x·Wuᵀ`: the gate and up matmuls with the gated
//!   product fused into their epilogue (CPU).
//! - [`LinearOp`] `(h, W2) → h·W2ᵀ`: the down projection (CPU).
//! - [`GatedOp`] `(gate, up) → σ(gate) ⊙ up`: the gated product alone, in one pass with f32 math,
//!   on the CPU (AVX-512), CUDA (`gated.cu`, compiled at run time by NVRTC) and Metal
//!   (`gated.metal`, compiled at run time); on the GPUs for any layout.
//! - [`QuantGateUpOp`] and [`QuantLinearOp`]: the same matmuls on GGUF weights read in place,
//!   with no copy kept: Q4_1 decoded exactly to f32 (candle's own Q4_1 matmul has no SIMD path
//!   on x86), q8_0 and q4k in AVX512-VNNI integer dot products (candle's keeps a repacked copy
//!   of each weight); inference only.
//!
//! On CPUs without AVX-512 the CPU ops are not used; the block then runs on candle's ops.

mod avx512;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod element;
mod int8;
#[cfg(feature = "metal")]
mod metal;
pub(crate) mod strided;
#[cfg(test)]
mod tests;
mod vnni;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use half::{bf16, f16};

use crate::Activation;
use element::Element;

/// σ as the kernels see it: Swish-β covers SiLU (β = 1) and quick_gelu (β = 1.702).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Act {
    Sigmoid,
    Identity,
    Relu,
    Gelu,
    GeluTanh,
    Swish(f32),
}

impl From<Activation> for Act {
    fn from(a: Activation) -> Self {
        match a {
            Activation::Sigmoid => Act::Sigmoid,
            Activation::Identity => Act::Identity,
            Activation::Relu => Act::Relu,
            Activation::Gelu => Act::Gelu,
            Activation::GeluTanh => Act::GeluTanh,
            Activation::Silu => Act::Swish(1.0),
            Activation::Swish { beta } => Act::Swish(beta as f32),
            Activation::QuickGelu => Act::Swish(1.702),
        }
    }
}

/// Whether the CPU ops can run on this machine.
pub(crate) fn cpu_available() -> bool {
    cpu::features().avx512
}

/// The contiguous values of a CPU tensor argument, or `None` if it is strided.
fn contiguous<'a, T: WithDType>(s: &'a [T], l: &Layout) -> Option<&'a [T]> {
    l.contiguous_offsets().map(|(a, b)| &s[a..b])
}

fn not_contiguous(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: arguments must be contiguous"))
}

/// `σ(x·Wgᵀ + bg) ⊙ (x·Wuᵀ + bu)` for `x: [m, k]`, `Wg, Wu: [n, k]`, computed in f32 and
/// rounded once. The biases are constants of the op: its backward pass gives no gradient for
/// them, so the block only passes biases when nothing is being trained.
#[derive(Debug, Clone)]
pub(crate) struct GateUpOp {
    pub(crate) act: Activation,
    pub(crate) bias: Option<(Vec<f32>, Vec<f32>)>,
}

impl CustomOp3 for GateUpOp {
    fn name(&self) -> &'static str {
        "glu-gate-up"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k2 != k || l3.shape().dims() != [n, k] || !cpu_available() {
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
        let bias = match &self.bias {
            Some((bg, bu)) if bg.len() == n && bu.len() == n => cpu::Bias {
                a: Some(bg),
                b: Some(bu),
            },
            Some(_) => candle_core::bail!("glu-gate-up: biases must hold {n} values"),
            None => cpu::Bias::default(),
        };
        let act = Act::from(self.act);
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

    fn bwd(
        &self,
        x: &Tensor,
        wg: &Tensor,
        wu: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut gate = x.matmul(&wg.t()?)?;
        let mut up = x.matmul(&wu.t()?)?;
        if let Some((bg, bu)) = &self.bias {
            let b = |v: &[f32]| Tensor::new(v, x.device())?.to_dtype(x.dtype());
            gate = gate.broadcast_add(&b(bg)?)?;
            up = up.broadcast_add(&b(bu)?)?;
        }
        let (d_gate, d_up) = gated_backward(self.act, &gate, &up, grad)?;
        let dx = (d_gate.matmul(wg)? + d_up.matmul(wu)?)?;
        let dwg = d_gate.t()?.matmul(x)?;
        let dwu = d_up.t()?.matmul(x)?;
        Ok((Some(dx), Some(dwg), Some(dwu)))
    }
}

/// `h·Wᵀ + b` for `h: [m, k]`, `W: [n, k]`, with f32 accumulation. The bias is a constant of
/// the op, as in [`GateUpOp`].
#[derive(Debug, Clone)]
pub(crate) struct LinearOp {
    pub(crate) bias: Option<Vec<f32>>,
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "glu-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k2 != k || !cpu_available() {
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
        let bias = self.bias.as_deref();
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

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), Some(grad.t()?.matmul(x)?)))
    }
}

/// `σ(gate) ⊙ up`, element-wise in one pass with f32 math, rounded once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GatedOp {
    pub(crate) act: Activation,
}

impl CustomOp2 for GatedOp {
    fn name(&self) -> &'static str {
        "glu-gated"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || !cpu_available() {
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
        let act = Act::from(self.act);
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(go(act, g, u, l1, l2)?),
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => CpuStorage::BF16(go(act, g, u, l1, l2)?),
            (CpuStorage::F16(g), CpuStorage::F16(u)) => CpuStorage::F16(go(act, g, u, l1, l2)?),
            _ => candle_core::bail!("glu-gated: gate and up must share an f32/bf16/f16 dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::gated(Act::from(self.act), s1, l1, s2, l2)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        metal::gated(Act::from(self.act), s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = gated_backward(self.act, gate, up, grad)?;
        Ok((Some(dg), Some(du)))
    }
}

/// `σ(gate) ⊙ up` in one pass where a kernel exists for the device and dtype (CPU with
/// AVX-512, CUDA, Metal), else with candle's ops; differentiable either way.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    let kernel = matches!(gate.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && gate.dtype() == up.dtype()
        && gate.shape() == up.shape()
        && gate.elem_count() > 0;
    let device = gate.device();
    if kernel && device.is_cpu() && cpu_available() {
        gate.contiguous()?
            .apply_op2(&up.contiguous()?, GatedOp { act })
    } else if kernel && gpu_kernel(device) {
        // The GPU kernels read any layout; past `strided::MAX_DIMS` dimensions that do not
        // merge, they take contiguous copies.
        if strided::GatedStrides::new(gate.layout(), up.layout()).is_some() {
            gate.apply_op2(up, GatedOp { act })
        } else {
            gate.contiguous()?
                .apply_op2(&up.contiguous()?, GatedOp { act })
        }
    } else {
        crate::ffn::gated_product(gate, up, act)
    }
}

/// Whether [`GatedOp`] has a kernel for this GPU in this build.
fn gpu_kernel(device: &candle_core::Device) -> bool {
    (cfg!(feature = "cuda") && device.is_cuda()) || (cfg!(feature = "metal") && device.is_metal())
}

/// The gradients of `σ(gate) ⊙ up` with respect to `gate` and `up`, computed in f32 (for half
/// dtypes) and returned in the inputs' dtype.
pub(crate) fn gated_backward(
    act: Activation,
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dtype = gate.dtype();
    let wide = |t: &Tensor| match dtype {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    };
    let (g, u, dy) = (wide(gate)?, wide(up)?, wide(grad)?);
    let sigma = g.apply(&act)?;
    let d_sigma = activation_derivative(act, &g)?;
    let d_gate = ((&dy * &u)? * d_sigma)?.to_dtype(dtype)?;
    let d_up = (dy * sigma)?.to_dtype(dtype)?;
    Ok((d_gate, d_up))
}

/// σ'(g), from the closed forms.
fn activation_derivative(act: Activation, g: &Tensor) -> Result<Tensor> {
    let sigmoid = |t: &Tensor| candle_nn::ops::sigmoid(t);
    match act {
        Activation::Sigmoid => {
            let s = sigmoid(g)?;
            &s * (1.0 - &s)?
        }
        Activation::Identity => g.ones_like(),
        Activation::Relu => g.gt(0.0)?.to_dtype(g.dtype()),
        Activation::Gelu => {
            // Φ(g) + g·φ(g)
            let cdf = ((g / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
            let pdf = (g.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
            cdf? + (g * pdf?)?
        }
        Activation::GeluTanh => {
            // u = c(g + a·g³), σ = ½g(1 + tanh u), σ' = ½(1 + tanh u) + ½g(1 - tanh²u)·c(1 + 3a·g²)
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let a = 0.044715;
            let t = ((g + (g.powf(3.0)? * a)?)? * c)?.tanh()?;
            let left = ((&t + 1.0)? * 0.5)?;
            let inner = ((g.sqr()? * (3.0 * a))? + 1.0)? * c;
            let right = ((g * 0.5)? * (1.0 - t.sqr()?)?)? * inner?;
            left + right?
        }
        Activation::Silu | Activation::Swish { .. } | Activation::QuickGelu => {
            let beta = match act {
                Activation::Swish { beta } => beta,
                Activation::QuickGelu => 1.702,
                _ => 1.0,
            };
            // σ = g·s(βg), σ' = s + βg·s(1 - s)
            let s = sigmoid(&(g * beta)?)?;
            let ds = ((&s * (1.0 - &s)?)? * g)? * beta;
            s + ds?
        }
    }
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
fn blocks(q: &QTensor) -> Option<(Blocks, std::borrow::Cow<'_, [u8]>, usize, usize)> {
    let (n, k) = q.shape().dims2().ok()?;
    let format = Blocks::of(q.dtype())?;
    let ok = q.device().is_cpu() && k > 0 && k.is_multiple_of(format.block_values());
    let data = q.data().ok()?;
    (ok && data.len() == n * format.row_bytes(k)).then_some((format, data, n, k))
}

/// Whether the quantized ops can take these weights: all read in place, in one format.
pub(crate) fn quantized_available(ws: &[&QTensor]) -> bool {
    let formats: Option<Vec<Blocks>> = ws.iter().map(|q| blocks(q).map(|b| b.0)).collect();
    formats.is_some_and(|f| f.windows(2).all(|w| w[0] == w[1]))
}

/// [`GateUpOp`] for GGUF weights read in place (Q4_1, q8_0, q4k); f32 activations.
#[derive(Debug, Clone)]
pub(crate) struct QuantGateUpOp {
    pub(crate) wg: Arc<QTensor>,
    pub(crate) wu: Arc<QTensor>,
    pub(crate) act: Activation,
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

impl CustomOp1 for QuantGateUpOp {
    fn name(&self) -> &'static str {
        "glu-gate-up-quantized"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m, k) = f32_input(self.name(), s, l)?;
        let (Some((fg, wg, n, kg)), Some((fu, wu, n2, ku))) = (blocks(&self.wg), blocks(&self.wu))
        else {
            candle_core::bail!("glu-gate-up-quantized: weights this CPU cannot read in place")
        };
        if (kg, ku, n2, fu) != (k, k, n, fg) {
            candle_core::bail!("glu-gate-up-quantized: weights of different shapes or formats")
        }
        let (g, u) = (
            cpu::Mat::blocks(&wg, fg.row_bytes(k)),
            cpu::Mat::blocks(&wu, fg.row_bytes(k)),
        );
        let act = Act::from(self.act);
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
}

/// [`LinearOp`] for GGUF weights read in place (Q4_1, q8_0, q4k); f32 activations.
#[derive(Debug, Clone)]
pub(crate) struct QuantLinearOp {
    pub(crate) w: Arc<QTensor>,
}

impl CustomOp1 for QuantLinearOp {
    fn name(&self) -> &'static str {
        "glu-linear-quantized"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m, k) = f32_input(self.name(), s, l)?;
        let Some((format, w, n, kw)) = blocks(&self.w) else {
            candle_core::bail!("glu-linear-quantized: a weight this CPU cannot read in place")
        };
        if kw != k {
            candle_core::bail!("glu-linear-quantized: the weight has {kw} inputs, x has {k}")
        }
        let w = cpu::Mat::blocks(&w, format.row_bytes(k));
        // SAFETY: as in QuantGateUpOp.
        let y = unsafe {
            match format {
                Blocks::Q4_1 => {
                    cpu::linear::<f32, cpu::Q4_1>(x, m, k, w, n, None, cpu::Compute::Fma)
                }
                Blocks::Int8(kind) => int8::linear(x, m, k, w, n, kind),
            }
        };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}
