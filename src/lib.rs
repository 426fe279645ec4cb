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

pub mod activation;
pub mod config;
pub mod device;
pub mod error;
pub mod ffn;
mod kernels;
pub mod layout;
pub mod loading;

pub use activation::Activation;
pub use config::GluConfig;
pub use error::{Error, Result};
pub use ffn::{GluFeedForward, Projection};
pub use layout::WeightLayout;

/// Whether this CPU runs the fused kernels (AVX-512 with FMA and F16C). Without them,
/// [`GluFeedForward`] computes the same results with candle's own ops, more slowly.
pub fn cpu_kernels_available() -> bool {
    kernels::cpu_available()
}
#[cfg(feature = "hub")]
pub use loading::hub::{fetch_model, HubOptions};

// The README's examples compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
