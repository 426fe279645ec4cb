//! The crate's candle custom ops: each forward dispatches to the CPU kernels (`cpu/`), CUDA
//! (`cuda.rs`) or Metal (`metal.rs`); each backward is written with candle's ops from
//! [`Activation::gated_backward`]. Quantized weights are constants: their ops give the input's
//! gradient only, through the weights dequantized for the backward pass.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu;
use crate::Activation;

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
        cpu::gate_up(self, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        x: &Tensor,
        wg: &Tensor,
        wu: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, d_gate, d_up) = gate_up_backward(self.act, x, wg, wu, self.bias.as_ref(), grad)?;
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
        cpu::linear(self, s1, l1, s2, l2)
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
        cpu::gated(self, s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::gated(self.act, s1, l1, s2, l2)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        super::metal::gated(self.act, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = self.act.gated_backward(gate, up, grad)?;
        Ok((Some(dg), Some(du)))
    }
}

/// [`GateUpOp`] for GGUF weights read in place (Q4_1, q8_0, q4k); f32 activations.
#[derive(Debug, Clone)]
pub(crate) struct QuantGateUpOp {
    pub(crate) wg: Arc<QTensor>,
    pub(crate) wu: Arc<QTensor>,
    pub(crate) act: Activation,
    /// Q4_1 decoded exactly to f32 at every token count (never on the AMX tiles).
    pub(crate) exact_q4_1: bool,
}

impl CustomOp1 for QuantGateUpOp {
    fn name(&self) -> &'static str {
        "glu-gate-up-quantized"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::quant_gate_up(self, s, l)
    }

    /// The input's gradient, as [`GateUpOp`]'s, over the weights dequantized (the forward's
    /// 8-bit activations, where they apply, pass the gradient straight through).
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (wg, wu) = (dequantized(&self.wg, x)?, dequantized(&self.wu, x)?);
        Ok(Some(gate_up_backward(self.act, x, &wg, &wu, None, grad)?.0))
    }
}

/// [`LinearOp`] for GGUF weights read in place (Q4_1, q8_0, q4k); f32 activations.
#[derive(Debug, Clone)]
pub(crate) struct QuantLinearOp {
    pub(crate) w: Arc<QTensor>,
    /// As [`QuantGateUpOp::exact_q4_1`].
    pub(crate) exact_q4_1: bool,
}

impl CustomOp1 for QuantLinearOp {
    fn name(&self) -> &'static str {
        "glu-linear-quantized"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::quant_linear(self, s, l)
    }

    /// The input's gradient over the weight dequantized, as [`QuantGateUpOp`]'s.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        quantized_input_grad(&self.w, x, grad)
    }
}

/// candle's own quantized product `x·Wᵀ` (its `QMatMul` forward, on every device), with the
/// input's gradient that candle's leaves out (its op has no backward pass).
#[derive(Debug, Clone)]
pub(crate) struct QMatMulOp(pub(crate) Arc<QTensor>);

impl CustomOp1 for QMatMulOp {
    fn name(&self) -> &'static str {
        "glu-qmatmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda_fwd(s, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.0.metal_fwd(s, l)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        quantized_input_grad(&self.0, x, grad)
    }
}

/// The gate-up op's backward pass up to the weights' gradients: with `gate = x·Wgᵀ + bg` and
/// `up = x·Wuᵀ + bu` recomputed, the input's gradient and those of gate and up.
fn gate_up_backward(
    act: Activation,
    x: &Tensor,
    wg: &Tensor,
    wu: &Tensor,
    bias: Option<&(Vec<f32>, Vec<f32>)>,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut gate = x.matmul(&wg.t()?)?;
    let mut up = x.matmul(&wu.t()?)?;
    if let Some((bg, bu)) = bias {
        let b = |v: &[f32]| Tensor::new(v, x.device())?.to_dtype(x.dtype());
        gate = gate.broadcast_add(&b(bg)?)?;
        up = up.broadcast_add(&b(bu)?)?;
    }
    let (d_gate, d_up) = act.gated_backward(&gate, &up, grad)?;
    let dx = (d_gate.matmul(wg)? + d_up.matmul(wu)?)?;
    Ok((dx, d_gate, d_up))
}

/// `x·Wᵀ`'s input gradient, `grad·W`, over a quantized `W` dequantized (`x` is `[tokens, in]`
/// in f32 for every quantized op).
fn quantized_input_grad(w: &QTensor, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
    Ok(Some(grad.matmul(&dequantized(w, x)?)?))
}

/// `w` as a dense tensor on `x`'s device, in `x`'s dtype, for a backward pass: made per pass
/// and dropped with it (an op's dense weights, two for the gate-up op, and its recomputed gate
/// and up live for the duration of its backward pass; no copy is kept).
fn dequantized(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    w.dequantize(x.device())?.to_dtype(x.dtype())
}
