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
//! On CPUs without AVX-512, and on other architectures than x86-64 (where `host_portable.rs`
//! stands in for `host.rs`), the CPU ops are not used; the block then runs on candle's ops.

// Elsewhere than x86-64 the ops exist (the block and the GPUs build them) but their CPU
// side is a stub: what only it would read is unread there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(target_arch = "x86_64")]
mod element;
// The CPU side of the ops: the kernels on x86-64; elsewhere, none (the block uses candle's ops).
#[cfg_attr(not(target_arch = "x86_64"), path = "host_portable.rs")]
mod host;
#[cfg(target_arch = "x86_64")]
mod int8;
#[cfg(feature = "metal")]
mod metal;
pub(crate) mod strided;
#[cfg(all(test, target_arch = "x86_64"))]
mod tests;
#[cfg(target_arch = "x86_64")]
mod vnni;

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::Activation;

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
    host::available()
}

/// Whether the quantized ops can take these weights: all read in place, in one format.
pub(crate) fn quantized_available(ws: &[&QTensor]) -> bool {
    host::quantized_available(ws)
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
        host::gate_up(self, s1, l1, s2, l2, s3, l3)
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
        host::linear(self, s1, l1, s2, l2)
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
        host::gated(self, s1, l1, s2, l2)
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

/// [`GateUpOp`] for GGUF weights read in place (Q4_1, q8_0, q4k); f32 activations.
#[derive(Debug, Clone)]
pub(crate) struct QuantGateUpOp {
    pub(crate) wg: Arc<QTensor>,
    pub(crate) wu: Arc<QTensor>,
    pub(crate) act: Activation,
}

impl CustomOp1 for QuantGateUpOp {
    fn name(&self) -> &'static str {
        "glu-gate-up-quantized"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        host::quant_gate_up(self, s, l)
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
        host::quant_linear(self, s, l)
    }
}
