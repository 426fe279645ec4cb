//! The gate non-linearity σ of `FFN(x) = W2 · (σ(x·W) ⊙ x·V)`.
//!
//! Each variant of [`Activation`] gives one member of the GLU family (Shazeer 2020, "GLU Variants
//! Improve Transformer"): sigmoid → GLU, identity → Bilinear, ReLU → ReGLU, GELU → GEGLU,
//! Swish/SiLU → SwiGLU. Names are Hugging Face's `hidden_act` strings.
//!
//! ```rust
//! use candle_glu::Activation;
//! let act: Activation = "gelu_pytorch_tanh".parse()?;
//! assert_eq!(act, Activation::GeluTanh);
//! assert_eq!(act.to_string(), "gelu_pytorch_tanh");
//! // `gelu_new` is an alias of the same tanh approximation.
//! assert_eq!("gelu_new".parse::<Activation>()?, Activation::GeluTanh);
//! # Ok::<(), candle_glu::Error>(())
//! ```

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Module, Result, Tensor};

use crate::error::{ConversionError, ParseError};

/// The gate activation σ, named as Hugging Face's `hidden_act`.
///
/// `Display` writes the canonical name and `FromStr` reads it back, so
/// `a.to_string().parse() == Ok(a)` for every variant (for `Swish`, every β finite in f32, the
/// ones a block accepts). Aliases parse to their canonical variant:
/// `swish` → [`Silu`](Self::Silu), `identity` → [`Identity`](Self::Identity) (`linear`),
/// `gelu_new` and `gelu_fast` → [`GeluTanh`](Self::GeluTanh) (`gelu_pytorch_tanh`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Activation {
    /// `σ(x) = 1 / (1 + e^-x)`: the original GLU. Name `sigmoid`.
    Sigmoid,
    /// `σ(x) = x`: the Bilinear variant. Name `linear` (alias `identity`).
    Identity,
    /// `σ(x) = max(0, x)`: ReGLU. Name `relu`.
    Relu,
    /// Exact GELU, `x · Φ(x)` with the erf: GEGLU. Name `gelu`, as in Hugging Face, where `gelu`
    /// is the exact form (candle's `Tensor::gelu_erf`).
    Gelu,
    /// GELU with the tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`: GEGLU as
    /// in Gemma and T5 v1.1. Name `gelu_pytorch_tanh` (aliases `gelu_new`, `gelu_fast`); candle's
    /// `Tensor::gelu`.
    GeluTanh,
    /// SiLU, Swish with β = 1, `x · sigmoid(x)`: SwiGLU as in Llama, Mistral, Qwen, Phi-3 and
    /// SmolLM. Name `silu` (alias `swish`).
    #[default]
    Silu,
    /// Swish with a chosen β, `x · sigmoid(β·x)`. Name `swish(<beta>)`, e.g. `swish(1.5)`.
    Swish {
        /// The slope β: finite in f32 (`|β| ≤ f32::MAX`), where every kernel applies it;
        /// [`GluConfig::validate`](crate::GluConfig::validate) refuses others.
        beta: f64,
    },
    /// `x · sigmoid(1.702·x)`, the GELU approximation of CLIP. Name `quick_gelu`.
    QuickGelu,
}

impl Activation {
    /// Every name [`FromStr`] accepts, canonical names first; `swish(<beta>)` stands for any
    /// finite β.
    pub const NAMES: &'static [&'static str] = &[
        "silu",
        "sigmoid",
        "linear",
        "relu",
        "gelu",
        "gelu_pytorch_tanh",
        "quick_gelu",
        "swish(<beta>)",
        "swish",
        "identity",
        "gelu_new",
        "gelu_fast",
    ];

    /// One value of every variant, with β = 1.5 for [`Swish`](Self::Swish).
    pub const ALL: &'static [Activation] = &[
        Activation::Sigmoid,
        Activation::Identity,
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
        Activation::Swish { beta: 1.5 },
        Activation::QuickGelu,
    ];

    /// The name of the GLU variant this activation gives: `GLU`, `Bilinear`, `ReGLU`, `GEGLU`,
    /// `SwiGLU`.
    pub fn glu_variant(&self) -> &'static str {
        match self {
            Activation::Sigmoid => "GLU",
            Activation::Identity => "Bilinear",
            Activation::Relu => "ReGLU",
            Activation::Gelu | Activation::GeluTanh | Activation::QuickGelu => "GEGLU",
            Activation::Silu | Activation::Swish { .. } => "SwiGLU",
        }
    }

    /// β when σ is Swish-β, `x · sigmoid(β·x)`: 1 for [`Silu`](Self::Silu), 1.702 for
    /// [`QuickGelu`](Self::QuickGelu), `beta` for [`Swish`](Self::Swish); `None` otherwise.
    pub fn swish_beta(&self) -> Option<f64> {
        match *self {
            Activation::Silu => Some(1.0),
            Activation::Swish { beta } => Some(beta),
            Activation::QuickGelu => Some(QUICK_GELU_BETA),
            _ => None,
        }
    }

    /// The gated product `σ(gate) ⊙ up` with candle's own ops: differentiable, on any device,
    /// with the inputs' dtype; computed in f32 and rounded once for f16 and bf16.
    ///
    /// This is the plain twin of [`gated_product`](crate::gated_product), which does the same
    /// in one pass where the crate has a kernel for the device.
    ///
    /// Rounding once is what keeps half-precision results within PyTorch's own error: Swish-β and
    /// quick_gelu are three ops each, and rounding after every one of them doubles the error in
    /// bf16.
    ///
    /// ```rust
    /// use candle_core::{Device, Tensor};
    /// use candle_glu::Activation;
    /// let gate = Tensor::new(&[-1f32, 0., 2.], &Device::Cpu)?;
    /// let up = Tensor::new(&[3f32, 5., 0.5], &Device::Cpu)?;
    /// let h = Activation::Relu.gated(&gate, &up)?;
    /// assert_eq!(h.to_vec1::<f32>()?, [0., 0., 1.]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// `gate` and `up` of different shapes or dtypes, or on different devices, or of a dtype
    /// other than f32, f16, bf16 and f64 ([`Error::InputDtype`](crate::Error::InputDtype)).
    pub fn gated(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let dtype = gate.dtype();
        if !computes_in(dtype) {
            return Err(crate::Error::InputDtype { dtype }.into());
        }
        if up.dtype() != dtype {
            return Err(candle_core::Error::Msg(format!(
                "gated: gate is {dtype:?} and up {:?}; they must share a dtype",
                up.dtype()
            )));
        }
        if matches!(dtype, DType::F32 | DType::F64) {
            return gate.apply(self)? * up;
        }
        let gate = gate.to_dtype(DType::F32)?.apply(self)?;
        (gate * up.to_dtype(DType::F32)?)?.to_dtype(dtype)
    }

    /// The gradients of `σ(gate) ⊙ up` with respect to `gate` and `up`, given the gradient
    /// `grad` of the product: computed in f32 for half dtypes, returned in the inputs' dtype.
    /// The backward pass of every fused op of the crate.
    pub(crate) fn gated_backward(
        &self,
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
        let sigma = g.apply(self)?;
        let d_sigma = self.derivative(&g)?;
        let d_gate = ((&dy * &u)? * d_sigma)?.to_dtype(dtype)?;
        let d_up = (dy * sigma)?.to_dtype(dtype)?;
        Ok((d_gate, d_up))
    }

    /// σ'(g), from the closed forms.
    fn derivative(&self, g: &Tensor) -> Result<Tensor> {
        let sigmoid = |t: &Tensor| candle_nn::ops::sigmoid(t);
        match self {
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
                // g³ as g²·g: a `powf` of a negative base is undefined under fast math (Metal).
                let t = ((g + ((g.sqr()? * g)? * a)?)? * c)?.tanh()?;
                let left = ((&t + 1.0)? * 0.5)?;
                let inner = ((g.sqr()? * (3.0 * a))? + 1.0)? * c;
                let right = ((g * 0.5)? * (1.0 - t.sqr()?)?)? * inner?;
                left + right?
            }
            Activation::Silu | Activation::Swish { .. } | Activation::QuickGelu => {
                let beta = self.swish_beta().unwrap_or(1.0);
                // σ = g·s(βg), σ' = s + βg·s(1 - s)
                let s = sigmoid(&(g * beta)?)?;
                let ds = ((&s * (1.0 - &s)?)? * g)? * beta;
                s + ds?
            }
        }
    }
}

/// β of quick_gelu, CLIP's `x · sigmoid(1.702·x)`.
const QUICK_GELU_BETA: f64 = 1.702;

impl Module for Activation {
    /// Applies σ element-wise with candle's own ops; differentiable. The result has `xs`'s dtype.
    ///
    /// In f16 and bf16, σ is computed in f32 and rounded once, as PyTorch does: candle's own
    /// half-precision `gelu` works in bf16 throughout and is 60% off at x = -3.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let exact_in_any_dtype = matches!(self, Activation::Identity | Activation::Relu);
        if !exact_in_any_dtype && matches!(xs.dtype(), DType::F16 | DType::BF16) {
            return self
                .forward(&xs.to_dtype(DType::F32)?)?
                .to_dtype(xs.dtype());
        }
        match *self {
            Activation::Sigmoid => candle_nn::ops::sigmoid(xs),
            Activation::Identity => Ok(xs.clone()),
            // NaN kept, as the kernels and PyTorch keep it (candle's `relu` is a max with 0,
            // which gives 0 for NaN on the CPU and CUDA).
            Activation::Relu => {
                let zero = Tensor::zeros((), xs.dtype(), xs.device())?.broadcast_as(xs.shape())?;
                xs.lt(0.0)?.where_cond(&zero, xs)
            }
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
            Activation::Silu => xs.silu(),
            Activation::Swish { beta } => xs * candle_nn::ops::sigmoid(&(xs * beta)?)?,
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * QUICK_GELU_BETA)?)?,
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Activation::Sigmoid => f.write_str("sigmoid"),
            Activation::Identity => f.write_str("linear"),
            Activation::Relu => f.write_str("relu"),
            Activation::Gelu => f.write_str("gelu"),
            Activation::GeluTanh => f.write_str("gelu_pytorch_tanh"),
            Activation::Silu => f.write_str("silu"),
            // `{}` on f64 prints the shortest string that parses back to the same value.
            Activation::Swish { beta } => write!(f, "swish({beta})"),
            Activation::QuickGelu => f.write_str("quick_gelu"),
        }
    }
}

impl FromStr for Activation {
    type Err = ParseError;

    /// Parses a Hugging Face `hidden_act` name; surrounding whitespace and ASCII case are ignored.
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        let name = s.trim().to_ascii_lowercase();
        let act = match name.as_str() {
            "sigmoid" => Activation::Sigmoid,
            "linear" | "identity" => Activation::Identity,
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            "quick_gelu" => Activation::QuickGelu,
            _ => {
                return parse_swish_beta(&name)
                    .ok_or_else(|| ParseError::new("activation", s, Activation::NAMES))
            }
        };
        Ok(act)
    }
}

/// Whether candle computes in `dtype`: f32, f16, bf16 and f64 (its FP8, FP6 and FP4 types are
/// floats too, but storage only). The dtypes σ, the projections and the blocks take.
pub(crate) fn computes_in(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

/// Whether `beta` can be a Swish β: finite in f32, where every kernel applies it (1e39, finite in
/// f64, made σ(0) = 0·∞ = NaN).
pub(crate) fn valid_swish_beta(beta: f64) -> bool {
    (beta as f32).is_finite()
}

/// `swish(<beta>)` with a β [`valid_swish_beta`] accepts.
fn parse_swish_beta(name: &str) -> Option<Activation> {
    let beta: f64 = name
        .strip_prefix("swish(")?
        .strip_suffix(')')?
        .trim()
        .parse()
        .ok()?;
    valid_swish_beta(beta).then_some(Activation::Swish { beta })
}

impl serde::Serialize for Activation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Activation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// From candle's activations, where one is a gate σ of this crate: `Gelu` (exact), `NewGelu`
/// and `GeluPytorchTanh` (tanh), `Relu`, `Silu` and `Swish` (both `x·sigmoid(x)`), `Sigmoid`.
/// The others (`Relu2`, `Relu6`, `HardSigmoid`, `HardSwish`, `Mish`, `Elu`, `LeakyRelu`, and
/// `Swiglu`, a whole gated product rather than a gate) are a [`ConversionError`] naming them.
impl TryFrom<candle_nn::Activation> for Activation {
    type Error = ConversionError;

    fn try_from(act: candle_nn::Activation) -> std::result::Result<Self, ConversionError> {
        use candle_nn::Activation as C;
        Ok(match act {
            C::Gelu => Activation::Gelu,
            C::NewGelu | C::GeluPytorchTanh => Activation::GeluTanh,
            C::Relu => Activation::Relu,
            C::Silu | C::Swish => Activation::Silu,
            C::Sigmoid => Activation::Sigmoid,
            C::Swiglu => {
                return Err(ConversionError::new(
                    "candle_nn::Activation::Swiglu".into(),
                    "candle_glu::Activation",
                    Some("it is a whole gated product, silu(a)·b; its gate is Activation::Silu"),
                ))
            }
            other => {
                return Err(ConversionError::new(
                    format!("candle_nn::Activation::{other:?}"),
                    "candle_glu::Activation",
                    None,
                ))
            }
        })
    }
}

/// To candle's activations, where candle has the same function: `Identity`, `QuickGelu` and
/// `Swish` with β ≠ 1 are a [`ConversionError`] naming them (`Swish { beta: 1.0 }` is `Silu`).
impl TryFrom<Activation> for candle_nn::Activation {
    type Error = ConversionError;

    fn try_from(act: Activation) -> std::result::Result<Self, ConversionError> {
        use candle_nn::Activation as C;
        Ok(match act {
            Activation::Sigmoid => C::Sigmoid,
            Activation::Relu => C::Relu,
            Activation::Gelu => C::Gelu,
            Activation::GeluTanh => C::GeluPytorchTanh,
            Activation::Silu | Activation::Swish { beta: 1.0 } => C::Silu,
            other => {
                return Err(ConversionError::new(
                    format!("candle_glu::Activation::{other:?} (`{other}`)"),
                    "candle_nn::Activation",
                    None,
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_round_trips_through_its_name() {
        for &act in Activation::ALL {
            let name = act.to_string();
            assert_eq!(name.parse::<Activation>().unwrap(), act, "{name}");
        }
        for beta in [0.5, 1.0, 1.702, 2.0, 1e-3, 1.0 / 3.0] {
            let act = Activation::Swish { beta };
            assert_eq!(act.to_string().parse::<Activation>().unwrap(), act);
        }
    }

    #[test]
    fn aliases_parse_to_the_canonical_variant() {
        let cases = [
            ("swish", Activation::Silu),
            ("identity", Activation::Identity),
            ("gelu_new", Activation::GeluTanh),
            ("gelu_fast", Activation::GeluTanh),
            (" SiLU ", Activation::Silu),
            ("swish( 2 )", Activation::Swish { beta: 2.0 }),
        ];
        for (name, act) in cases {
            assert_eq!(name.parse::<Activation>().unwrap(), act, "{name}");
        }
    }

    #[test]
    fn every_listed_name_parses() {
        for name in Activation::NAMES {
            let name = name.replace("<beta>", "1.25");
            assert!(name.parse::<Activation>().is_ok(), "{name}");
        }
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        for bad in [
            "gelu_tanh",
            "swiglu",
            "",
            "swish(nan)",
            "swish(inf)",
            "swish()",
            "swish(1",
        ] {
            let err = bad.parse::<Activation>().unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
            assert!(
                err.contains("silu") && err.contains("gelu_pytorch_tanh"),
                "{err}"
            );
        }
    }

    #[test]
    fn serde_uses_the_hugging_face_names() {
        let json = serde_json::to_string(&Activation::GeluTanh).unwrap();
        assert_eq!(json, "\"gelu_pytorch_tanh\"");
        let act: Activation = serde_json::from_str("\"gelu_new\"").unwrap();
        assert_eq!(act, Activation::GeluTanh);
        assert!(serde_json::from_str::<Activation>("\"gelupytorchtanh\"").is_err());
    }
}
