//! The language model of the experiment: a small pre-norm decoder-only Transformer whose
//! feed-forward layer is the variant under test. Everything but the feed-forward layer is the
//! same for every variant.
// The fixture test (`tests/glu_variants.rs`) includes this file for the plain FFN alone.
#![allow(dead_code)]

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_glu::{Activation, ForwardPath, GluConfig, GluFeedForward, Projection};
use candle_nn::{Embedding, RmsNorm, VarBuilder, VarMap};

use crate::rng::Rng;

/// The feed-forward layers of Shazeer (2020), Table 1: three plain FFNs and five gated ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// `W2·ReLU(x·W1)`.
    Relu,
    /// `W2·GELU(x·W1)` (exact, erf-based GELU).
    Gelu,
    /// `W2·Swish(x·W1)` (Swish with β = 1, i.e. SiLU).
    Swish,
    /// `W2·(σ(x·W) ⊙ x·V)`, σ the logistic sigmoid.
    Glu,
    /// `W2·(x·W ⊙ x·V)`.
    Bilinear,
    /// `W2·(ReLU(x·W) ⊙ x·V)`.
    Reglu,
    /// `W2·(GELU(x·W) ⊙ x·V)`.
    Geglu,
    /// `W2·(Swish(x·W) ⊙ x·V)`.
    Swiglu,
}

impl Variant {
    /// The paper's order: the plain FFNs, then the gated ones.
    pub const ALL: [Variant; 8] = [
        Variant::Relu,
        Variant::Gelu,
        Variant::Swish,
        Variant::Glu,
        Variant::Bilinear,
        Variant::Reglu,
        Variant::Geglu,
        Variant::Swiglu,
    ];

    /// The name on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Relu => "relu",
            Variant::Gelu => "gelu",
            Variant::Swish => "swish",
            Variant::Glu => "glu",
            Variant::Bilinear => "bilinear",
            Variant::Reglu => "reglu",
            Variant::Geglu => "geglu",
            Variant::Swiglu => "swiglu",
        }
    }

    /// The paper's name for it (Table 1).
    pub fn paper_name(self) -> &'static str {
        match self {
            Variant::Relu => "FFN-ReLU",
            Variant::Gelu => "FFN-GELU",
            Variant::Swish => "FFN-Swish",
            Variant::Glu => "FFN-GLU",
            Variant::Bilinear => "FFN-Bilinear",
            Variant::Reglu => "FFN-ReGLU",
            Variant::Geglu => "FFN-GEGLU",
            Variant::Swiglu => "FFN-SwiGLU",
        }
    }

    /// Whether the layer is gated (three matrices) or plain (two).
    pub fn is_gated(self) -> bool {
        !matches!(self, Variant::Relu | Variant::Gelu | Variant::Swish)
    }

    /// The nonlinearity: of the hidden layer for the plain FFNs, of the gate for the gated ones.
    pub fn activation(self) -> Activation {
        match self {
            Variant::Relu | Variant::Reglu => Activation::Relu,
            Variant::Gelu | Variant::Geglu => Activation::Gelu,
            Variant::Swish | Variant::Swiglu => Activation::Silu,
            Variant::Glu => Activation::Sigmoid,
            Variant::Bilinear => Activation::Identity,
        }
    }

    /// The hidden width at equal parameters and compute: `4·d_model` for the plain FFNs, two
    /// thirds of it, rounded, for the gated ones (three matrices instead of two).
    pub fn d_ff(self, d_model: usize) -> usize {
        if self.is_gated() {
            (8.0 * d_model as f64 / 3.0).round() as usize
        } else {
            4 * d_model
        }
    }
}

/// The plain feed-forward layer `W2·act(x·W1)`, no biases (as in the paper), over the crate's
/// linear layer (`Projection`: its kernels and their backward pass on the CPU). Tensor names
/// `up_proj.weight [d_ff, d_model]` and `down_proj.weight [d_model, d_ff]`.
pub struct PlainFeedForward {
    up_proj: Projection,
    down_proj: Projection,
    act: Activation,
}

impl PlainFeedForward {
    /// The layer, its weights read from (or created in) `vb`.
    pub fn new(d_model: usize, d_ff: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            up_proj: Projection::load(d_model, d_ff, false, vb.pp("up_proj"))?,
            down_proj: Projection::load(d_ff, d_model, false, vb.pp("down_proj"))?,
            act,
        })
    }
}

impl Module for PlainFeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply(&self.up_proj)?
            .apply(&self.act)?
            .apply(&self.down_proj)
    }
}

/// The feed-forward layer under test.
pub enum FeedForward {
    Plain(PlainFeedForward),
    Gated(GluFeedForward),
}

impl FeedForward {
    fn new(variant: Variant, d_model: usize, vb: VarBuilder) -> Result<Self> {
        let d_ff = variant.d_ff(d_model);
        Ok(if variant.is_gated() {
            let cfg = GluConfig::new(d_model, d_ff).with_activation(variant.activation());
            FeedForward::Gated(GluFeedForward::new(&cfg, vb)?)
        } else {
            FeedForward::Plain(PlainFeedForward::new(
                d_model,
                d_ff,
                variant.activation(),
                vb,
            )?)
        })
    }
}

impl FeedForward {
    /// Whether the forward passes of training run on the crate's CPU kernels: the gated block's
    /// fused path, or both of the plain layer's projections on a kernel. Asked with tracked
    /// inputs of two tokens, as in training. (The backward passes are those of the crate's ops,
    /// partly on candle's matmuls.)
    fn on_crate_kernels(&self, device: &Device) -> Result<bool> {
        let probe = |width: usize| candle_core::Var::zeros((1, 2, width), DType::F32, device);
        Ok(match self {
            FeedForward::Plain(ffn) => {
                let up = probe(ffn.up_proj.in_features())?;
                let down = probe(ffn.down_proj.in_features())?;
                ffn.up_proj.micro_kernel(up.as_tensor()).is_some()
                    && ffn.down_proj.micro_kernel(down.as_tensor()).is_some()
            }
            FeedForward::Gated(ffn) => {
                let xs = probe(ffn.config().hidden_size)?;
                ffn.forward_path(xs.as_tensor()) == ForwardPath::Fused
            }
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Plain(ffn) => ffn.forward(xs),
            FeedForward::Gated(ffn) => ffn.forward(xs),
        }
    }
}

/// The model's shape.
#[derive(Debug, Clone, Copy)]
pub struct ModelConfig {
    /// Tokens are bytes.
    pub vocab: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    /// The longest sequence (learned positions).
    pub context: usize,
    pub variant: Variant,
}

/// Causal multi-head self-attention, q/k/v in one projection.
struct Attention {
    qkv: Projection,
    out: Projection,
    heads: usize,
}

impl Attention {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            qkv: Projection::load(d, 3 * d, false, vb.pp("qkv"))?,
            out: Projection::load(d, d, false, vb.pp("out"))?,
            heads: cfg.heads,
        })
    }

    /// `xs [b, t, d]`; `mask [t, t]`, 0 on and below the diagonal, -inf above.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let hd = d / self.heads;
        // [b, t, 3, heads, hd] -> [3, b, heads, t, hd]
        let qkv = xs
            .apply(&self.qkv)?
            .reshape((b, t, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (
            qkv.get(0)?.contiguous()?,
            qkv.get(1)?.contiguous()?,
            qkv.get(2)?.contiguous()?,
        );
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, d))?
            .apply(&self.out)
    }
}

struct Block {
    norm1: RmsNorm,
    attn: Attention,
    norm2: RmsNorm,
    ffn: FeedForward,
}

/// The language model: byte embeddings plus learned positions, `layers` pre-norm blocks
/// (RMSNorm, attention, RMSNorm, FFN, each with a residual), a final RMSNorm and an untied
/// output head.
pub struct Transformer {
    tokens: Embedding,
    positions: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Projection,
    mask: Tensor,
}

const NORM_EPS: f64 = 1e-5;

impl Transformer {
    /// The model, its parameters created in `vb` (a `VarMap`'s builder for training).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.heads == 0 || !cfg.d_model.is_multiple_of(cfg.heads) {
            candle_core::bail!(
                "--d-model {} is not a multiple of --heads {}",
                cfg.d_model,
                cfg.heads
            )
        }
        let d = cfg.d_model;
        let blocks = (0..cfg.layers)
            .map(|l| {
                let vb = vb.pp(format!("blocks.{l}"));
                Ok(Block {
                    norm1: candle_nn::rms_norm(d, NORM_EPS, vb.pp("norm1"))?,
                    attn: Attention::new(cfg, vb.pp("attn"))?,
                    norm2: candle_nn::rms_norm(d, NORM_EPS, vb.pp("norm2"))?,
                    ffn: FeedForward::new(cfg.variant, d, vb.pp("ffn"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let t = cfg.context;
        let mask: Vec<f32> = (0..t * t)
            .map(|k| {
                if k % t > k / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self {
            tokens: candle_nn::embedding(cfg.vocab, d, vb.pp("tokens"))?,
            positions: vb.get_with_hints((t, d), "positions", candle_nn::init::ZERO)?,
            blocks,
            norm: candle_nn::rms_norm(d, NORM_EPS, vb.pp("norm"))?,
            head: Projection::load(d, cfg.vocab, false, vb.pp("head"))?,
            mask: Tensor::from_vec(mask, (t, t), vb.device())?,
        })
    }

    /// Logits `[b, t, vocab]` for the byte ids `ids [b, t]`, `t` at most the context.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let mut xs = ids
            .apply(&self.tokens)?
            .broadcast_add(&self.positions.narrow(0, 0, t)?)?;
        for block in &self.blocks {
            // `forward_diff`: candle's fused RMSNorm has no backward pass.
            let h = block.norm1.forward_diff(&xs)?;
            xs = (&xs + block.attn.forward(&h, &mask)?)?;
            let h = block.norm2.forward_diff(&xs)?;
            xs = (&xs + h.apply(&block.ffn)?)?;
        }
        self.norm.forward_diff(&xs)?.apply(&self.head)
    }

    /// Whether the feed-forward layers train on the crate's CPU kernels (else candle's ops).
    pub fn ffn_on_crate_kernels(&self) -> Result<bool> {
        match self.blocks.first() {
            Some(block) => block.ffn.on_crate_kernels(self.positions.device()),
            None => Ok(false),
        }
    }

    /// Mean cross-entropy, in nats, of predicting `targets [b, t]` from `ids [b, t]`.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.forward(ids)?;
        let (b, t, v) = logits.dims3()?;
        candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &targets.flatten_all()?)
    }
}

/// Seeds every parameter of `map` (candle's own initialisers draw from an unseeded generator),
/// each from its own stream (the seed and the parameter's name), so that the parameters that all
/// variants share start equal for a seed: linear weights from N(0, 2/fan_in) (candle-nn's
/// default, Kaiming normal), token and position embeddings from N(0, 1) (candle-nn's default for
/// embeddings); norm gains stay 1.
pub fn seed_parameters(map: &VarMap, seed: u64) -> Result<()> {
    let data = map
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("poisoned VarMap"))?;
    for (name, var) in data.iter() {
        // FNV-1a of the name.
        let stream = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = Rng::new(seed ^ stream);
        let std = if name.ends_with("tokens.weight") || name.ends_with("positions") {
            1.0
        } else if name.contains("norm") {
            continue;
        } else {
            let (_, fan_in) = var.dims2()?;
            (2.0 / fan_in as f64).sqrt()
        };
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| (std * normal(&mut rng)) as f32)
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - rng.next_f64();
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl ModelConfig {
    /// The number of parameters the model has, counted from the shapes (the same as
    /// [`parameter_counts`] of the built model).
    pub fn parameters(&self) -> usize {
        let d = self.d_model;
        // q/k/v, out; two norms.
        let block = 4 * d * d + 2 * d + self.ffn_per_layer();
        // Tokens, positions, blocks, the final norm, the head.
        self.vocab * d + self.context * d + self.layers * block + d + d * self.vocab
    }

    /// The feed-forward layers' parameters, every layer's: what the variants are compared at.
    pub fn ffn_parameters(&self) -> usize {
        self.layers * self.ffn_per_layer()
    }

    fn ffn_per_layer(&self) -> usize {
        let d = self.d_model;
        let matrices = if self.variant.is_gated() { 3 } else { 2 };
        matrices * d * self.variant.d_ff(d)
    }
}

/// The number of parameters in `map`, and in its feed-forward layers (names containing `ffn`).
pub fn parameter_counts(map: &VarMap) -> (usize, usize) {
    let vars = map.data().lock().map(|d| d.clone()).unwrap_or_default();
    let total = vars.values().map(|v| v.elem_count()).sum();
    let ffn = vars
        .iter()
        .filter(|(name, _)| is_ffn(name))
        .map(|(_, v)| v.elem_count())
        .sum();
    (total, ffn)
}

/// Whether a parameter belongs to a feed-forward layer.
fn is_ffn(name: &str) -> bool {
    name.contains(".ffn.")
}

/// A copy of every FFN parameter (as stored, f32), in name order.
pub fn ffn_weights(map: &VarMap) -> Result<Vec<Tensor>> {
    let vars = map
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("the parameters' lock is poisoned".into()))?;
    let mut names: Vec<&String> = vars.keys().filter(|n| is_ffn(n)).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| vars[n].as_tensor().copy())
        .collect()
}

/// A model over a fresh `VarMap` with seeded parameters, in f32 on `device`.
pub fn build(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<(VarMap, Transformer)> {
    let map = VarMap::new();
    let model = Transformer::new(cfg, VarBuilder::from_varmap(&map, DType::F32, device))?;
    seed_parameters(&map, seed)?;
    Ok((map, model))
}
