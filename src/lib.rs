//! Gated feed-forward blocks for [candle](https://github.com/huggingface/candle):
//!
//! `FFN(x) = W2 · (σ(x·W) ⊙ x·V)` (Shazeer 2020, "GLU Variants Improve Transformer"),
//!
//! with W the gate, V the up and W2 the down projection, and σ any member of the GLU family:
//! sigmoid (GLU), identity (Bilinear), ReLU (ReGLU), GELU (GEGLU), Swish/SiLU (SwiGLU).
//!
//! [`GluFeedForward`] reads Llama, Mistral, Qwen, Gemma, SmolLM, Phi-3 (fused `gate_up_proj`),
//! T5 v1.1 (`wi_0/wi_1/wo`), Mixtral expert and GGUF checkpoints through a
//! [`candle_nn::VarBuilder`], and implements [`candle_core::Module`], so it drops into any candle
//! model as `xs.apply(&ffn)`.
//!
//! ```rust
//! use candle_core::{DType, Device, Tensor};
//! use candle_glu::{Activation, GluConfig, GluFeedForward};
//! # fn main() -> candle_core::Result<()> {
//! # let dev = Device::Cpu;
//! # let mut ws = std::collections::HashMap::new();
//! # for (n, s) in [("gate_proj", (1536, 576)), ("up_proj", (1536, 576)), ("down_proj", (576, 1536))] {
//! #     ws.insert(format!("model.layers.0.mlp.{n}.weight"), Tensor::randn(0f32, 0.02, s, &dev)?);
//! # }
//! # let vb = candle_nn::VarBuilder::from_tensors(ws, DType::F32, &dev);
//! let act: Activation = "silu".parse()?;
//! let cfg = GluConfig::new(576, 1536).with_activation(act).with_bias(false);
//! let ffn = GluFeedForward::new(&cfg, vb.pp("model.layers.0.mlp"))?;
//! let x = Tensor::randn(0f32, 1., (1, 7, 576), &dev)?;
//! let y = x.apply(&ffn)?;
//! assert_eq!(y.dims(), &[1, 7, 576]);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
// Only the kernels and `loading::host` (candle's blocks viewed in one buffer) need `unsafe`;
// every other module says `#![forbid(unsafe_code)]` (`loading` denies it, for `host`).

pub mod activation;
pub mod config;
pub mod device;
pub mod error;
pub mod ffn;
mod files;
mod kernels;
pub mod layout;
pub mod loading;
pub mod moe;
pub mod projection;

pub use activation::Activation;
pub use config::GluConfig;
pub use error::{ConversionError, Error, ParseError, Result};
pub use ffn::{ForwardPath, GluFeedForward};
pub use kernels::detect::{CpuKernels, MicroKernel};
pub use layout::WeightLayout;
#[cfg(feature = "hub")]
pub use loading::hub::{fetch_model, DownloadProgress, HubOptions};
pub use moe::{GluExperts, MoeConfig, Routing, Scoring, SparseLayers};
pub use projection::Projection;

/// The crate's CPU kernels that run in this process, or `None` where they do not (a CPU
/// without AVX-512 F/BW/VL, FMA and F16C; an architecture other than x86-64; or
/// `CANDLE_GLU_KERNELS=candle`). Without them, [`GluFeedForward`] computes the same results
/// with candle's own ops, more slowly.
///
/// The kernels are chosen once per process from the CPU's features and vendor, and the
/// environment variable `CANDLE_GLU_KERNELS` (`auto`, `candle`, `avx512`, `avx512-bf16`, `amx`)
/// can force a set, so that every path can be run on one machine; see `docs/performance.md`.
/// Where the set is `amx`, the first call asks Linux for the tile state, which grows every
/// signal frame of the process by about 8 KiB; `CANDLE_GLU_KERNELS=avx512` avoids it.
///
/// ```rust
/// match candle_glu::cpu_kernels() {
///     Some(k) => println!("kernels: {k}"), // e.g. "avx512 (int8: vnni)"
///     None => println!("kernels: candle's ops"),
/// }
/// ```
pub fn cpu_kernels() -> Option<CpuKernels> {
    kernels::detect::cpu_kernels()
}

/// `σ(gate) ⊙ up` in one pass: the crate's kernel where one exists for the device and dtype
/// (f32, bf16, f16 on a CPU with the kernels, CUDA and Metal; any layout on the GPUs), else
/// candle's ops ([`Activation::gated`], its plain twin). f32 math for f32, f16 and bf16 (rounded
/// once to the inputs' dtype), f64 for f64; differentiable. Other dtypes are an error.
///
/// ```rust
/// use candle_core::{Device, Tensor};
/// use candle_glu::Activation;
/// let gate = Tensor::new(&[[-1f32, 2.]], &Device::Cpu)?;
/// let up = Tensor::new(&[[3f32, 0.5]], &Device::Cpu)?;
/// let h = candle_glu::gated_product(&gate, &up, Activation::Relu)?;
/// assert_eq!(h.to_vec2::<f32>()?, [[0., 1.]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// `gate` and `up` of different shapes, dtypes or devices.
pub fn gated_product(
    gate: &candle_core::Tensor,
    up: &candle_core::Tensor,
    act: Activation,
) -> candle_core::Result<candle_core::Tensor> {
    kernels::gated(gate, up, act)
}

// The README's examples compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
