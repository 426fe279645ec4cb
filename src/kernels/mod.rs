//! The crate's fast paths: candle custom ops with backward passes, and the kernels behind them,
//! each with a plain twin (candle's own ops) that the tests hold it to.
//!
//! - [`GateUpOp`] `(x, Wg, Wu) → σ(x·Wgᵀ) ⊙ x·Wuᵀ`: the gate and up matmuls with the gated
//!   product fused into their epilogue (CPU).
//! - [`LinearOp`] `(h, W2) → h·W2ᵀ`: the down projection (CPU).
//! - [`GatedOp`] `(gate, up) → σ(gate) ⊙ up`: the gated product alone, in one pass with f32 math,
//!   on the CPU (AVX-512), CUDA (`gated.cu`, compiled at run time by NVRTC) and Metal
//!   (`gated.metal`, compiled at run time); on the GPUs for any layout.
//! - [`QuantGateUpOp`] and [`QuantLinearOp`]: the same matmuls on GGUF weights read in place,
//!   with no copy kept: q8_0 and q4k in AVX512-VNNI integer dot products (candle's keeps a
//!   repacked copy of each weight), Q4_1 too up to 20 tokens, past them (or when asked to stay
//!   exact) decoded exactly to f32 (candle's own Q4_1 matmul has no SIMD path on x86); on AMX,
//!   prefill decodes the blocks to bf16 for the tiles (Q4_1 from 4 tokens unless asked to stay
//!   exact, q8_0 from 28, q4k from 44). Their backward passes give the input's gradient only,
//!   over the weights dequantized (the weights are constants); [`QMatMulOp`] gives candle's own
//!   quantized product the same backward pass.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | this map; [`gated`], the dispatch of the gated product |
//! | `ops.rs` | the custom ops: candle's side (forward per device, backward) |
//! | `detect.rs` | which CPU kernels run: the CPU's features, `CANDLE_GLU_KERNELS` |
//! | `cpu/` | the ops' CPU side on x86-64: schedules and micro-kernels per instruction set (see its map) |
//! | `portable.rs` | the ops' CPU side elsewhere: none (the block uses candle's ops) |
//! | `cuda.rs`, `gated.cu` | the gated product on CUDA |
//! | `metal.rs`, `gated.metal` | the gated product on Metal |
//! | `strided.rs` | the GPU kernels' view of strided layouts |
//!
//! Nothing here imports the block, the loaders or the config: kernels see weights as tensors
//! and σ as an [`Activation`].

// Kernels are the one place where the crate needs `unsafe`: every unsafe operation is in an
// `unsafe` block that says why it is sound.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// Elsewhere than x86-64 the ops exist (the block and the GPUs build them) but their CPU
// side is a stub: what only it would read is unread there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

// The CPU side of the ops: the kernels on x86-64; elsewhere, none (the block uses candle's ops).
#[cfg_attr(not(target_arch = "x86_64"), path = "portable.rs")]
mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod detect;
#[cfg(feature = "metal")]
mod metal;
mod ops;
pub(crate) mod strided;

use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor};

pub(crate) use self::ops::{GateUpOp, GatedOp, LinearOp, QMatMulOp, QuantGateUpOp, QuantLinearOp};
use crate::Activation;

/// Whether the quantized ops can take these weights: all read in place, of one type.
pub(crate) fn quantized_available(ws: &[&QTensor]) -> bool {
    cpu::quantized_available(ws)
}

/// The micro-kernel the dense CPU ops run for `m` tokens of depth `k` on `dtype` weights
/// (`None` where they do not run).
pub(crate) fn dense_micro_kernel(dtype: DType, m: usize, k: usize) -> Option<detect::MicroKernel> {
    cpu::dense_micro_kernel(dtype, m, k)
}

/// The micro-kernel the quantized CPU ops run for `m` tokens of weight `w` (`None` where they
/// do not take it).
pub(crate) fn quant_micro_kernel(
    w: &QTensor,
    m: usize,
    exact_q4_1: bool,
) -> Option<detect::MicroKernel> {
    cpu::quant_micro_kernel(w, m, exact_q4_1)
}

/// Runs `f(i)` for every `i` in `0..n` on candle's CPU worker pool, one task per thread at a
/// time, the crate's CPU kernels inside a task running on that task's thread alone: how a
/// mixture of experts shares the threads across experts. Elsewhere than x86-64, one after
/// another.
pub(crate) fn tasks(n: usize, f: impl Fn(usize) + Sync) {
    cpu::tasks(n, f)
}

/// The threads [`tasks`] runs on: candle's pool with the calling thread, one inside a task
/// (and elsewhere than x86-64, where tasks run one after another).
pub(crate) fn threads() -> usize {
    cpu::threads()
}

/// `σ(gate) ⊙ up` in one pass where a kernel exists for the device and dtype (CPU with
/// AVX-512, CUDA, Metal), else with candle's ops ([`Activation::gated`]); differentiable
/// either way.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    let kernel = matches!(gate.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && gate.dtype() == up.dtype()
        && gate.shape() == up.shape()
        && gate.elem_count() > 0;
    let device = gate.device();
    if kernel && device.is_cpu() && cpu::available() {
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
        act.gated(gate, up)
    }
}

/// Whether [`GatedOp`] has a kernel for this GPU in this build.
fn gpu_kernel(device: &candle_core::Device) -> bool {
    (cfg!(feature = "cuda") && device.is_cuda()) || (cfg!(feature = "metal") && device.is_metal())
}

/// σ's number in `gated.cu` and `gated.metal` (`ACT_SIGMOID` ...), and β for Swish-β.
#[cfg_attr(not(any(feature = "cuda", feature = "metal")), allow(dead_code))]
pub(crate) fn activation_code(act: crate::Activation) -> (i32, f32) {
    use crate::Activation;
    match act {
        Activation::Sigmoid => (0, 0.0),
        Activation::Identity => (1, 0.0),
        Activation::Relu => (2, 0.0),
        Activation::Gelu => (3, 0.0),
        Activation::GeluTanh => (4, 0.0),
        Activation::Silu | Activation::Swish { .. } | Activation::QuickGelu => {
            (5, act.swish_beta().unwrap_or(1.0) as f32)
        }
    }
}
