//! A small Llama decoder (SmolLM2-135M) built from candle-nn pieces, with a
//! [`candle_glu::GluFeedForward`] as the FFN of every layer.
//!
//! `h = x + Attn(RmsNorm(x));  y = h + FFN(RmsNorm(h))`, 30 times, then a tied output head.
//!
//! Shared by `examples/generate.rs` and `tests/e2e.rs` (both include it with `#[path]`). Every
//! linear layer runs on candle-glu: attention's projections and the output head (the Q8_0 token
//! embedding, tied) are [`Projection`]s over the GGUF's blocks, read in place, and the FFNs are
//! loaded by candle-glu's own loader (`Checkpoint::load_layer`), quantized or dequantized. The
//! embedding is dequantized to f32; the KV cache is candle-nn's `KvCache`, written in place; at
//! decode, attention's core is one op ([`attention::DecodeAttention`]). [`Decoder::Candle`] runs
//! the same model on candle's ops instead, as candle-transformers' `quantized_llama` does.
//!
//! The decoder block takes its FFN through candle's [`Module`] trait (`DecoderLayer<F: Module>`,
//! `Model<F = GluFeedForward>`), so any module can go in every layer:
//!
//! ```no_run
//! # #[path = "../examples/smollm2/mod.rs"]
//! # mod smollm2;
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_glu::loading::{Checkpoint, GgufStore, LoadOptions};
//! use candle_glu::GluFeedForward;
//! use smollm2::Model; // examples/smollm2/mod.rs
//!
//! /// Any `Module` can be a layer's FFN; this one counts its calls.
//! struct Counted(GluFeedForward, std::sync::atomic::AtomicUsize);
//!
//! impl Module for Counted {
//!     fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
//!         self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
//!         self.0.forward(xs)
//!     }
//! }
//!
//! fn main() -> anyhow::Result<()> {
//!     let gguf = "SmolLM2-135M-Instruct.Q4_1.gguf";
//!     let ckpt = Checkpoint::open(gguf)?;
//!     let cfg = ckpt.config().expect("a llama GGUF says its FFN sizes").clone();
//!     let opts = LoadOptions::new(DType::BF16, Device::Cpu).with_quantized(false);
//!     let model: Model<Counted> = Model::load_with(gguf, &Device::Cpu, |layer| {
//!         Ok(Counted(ckpt.load_layer(&cfg, layer, &opts)?, 0.into()))
//!     })?;
//!
//!     let mut cache = model.new_cache(); // the KV cache lives outside the model
//!     let ids = Tensor::new(&[[504u32, 3575, 282, 4649, 314]], &Device::Cpu)?; // "The capital of France is"
//!     let logits = model.forward_last(&ids, &mut cache)?; // [1, 49152]: " Paris" (7042) on top
//!     assert_eq!(logits.dims(), [1, 49152]);
//!     Ok(())
//! }
//! ```
#![allow(dead_code)]

pub mod attention;
pub mod chat;
pub mod profile;
pub mod sampler;
pub mod tokenizer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_glu::loading::{Checkpoint, GgufStore, LoadOptions};
use candle_glu::{GluFeedForward, Projection};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Embedding, RmsNorm};
use profile::Part;

/// The file `scripts/fetch_smollm2.sh` downloads.
pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch_smollm2.sh` puts the GGUF: `$CANDLE_GLU_CACHE`, else
/// `$XDG_CACHE_HOME/candle-glu`, else `~/.cache/candle-glu`. `None` when none of these variables
/// is set.
pub fn default_gguf_path() -> Option<PathBuf> {
    let dir = match std::env::var_os("CANDLE_GLU_CACHE").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?
            .join("candle-glu"),
    };
    Some(dir.join(GGUF_NAME))
}

/// How the FFN weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FfnKind {
    /// Kept in the GGUF's Q4_1, read in place by the crate's kernels (candle's `QMatMul`,
    /// which rounds the activations to Q8_1 first, where they do not run: CPUs without
    /// AVX-512, GPUs).
    #[default]
    Quantized,
    /// Dequantized to f32.
    F32,
    /// Dequantized to bf16.
    Bf16,
}

impl FfnKind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [FfnKind; 3] = [FfnKind::Quantized, FfnKind::F32, FfnKind::Bf16];

    /// The load options for this kind on `device`.
    pub fn load_options(self, device: &Device) -> LoadOptions {
        match self {
            FfnKind::Quantized => LoadOptions::new(DType::F32, device.clone()),
            FfnKind::F32 => LoadOptions::new(DType::F32, device.clone()).with_quantized(false),
            FfnKind::Bf16 => LoadOptions::new(DType::BF16, device.clone()).with_quantized(false),
        }
    }
}

impl fmt::Display for FfnKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FfnKind::Quantized => "quantized",
            FfnKind::F32 => "f32",
            FfnKind::Bf16 => "bf16",
        })
    }
}

impl FromStr for FfnKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.to_string().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown FFN kind `{s}`: expected quantized, f32 or bf16"))
    }
}

/// The model's hyper-parameters, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama.embedding_length` (576).
    pub hidden_size: usize,
    /// `llama.feed_forward_length` (1536).
    pub intermediate_size: usize,
    /// `llama.block_count` (30).
    pub num_layers: usize,
    /// `llama.attention.head_count` (9).
    pub num_heads: usize,
    /// `llama.attention.head_count_kv` (3).
    pub num_kv_heads: usize,
    /// `hidden_size / num_heads` (64).
    pub head_dim: usize,
    /// `llama.rope.freq_base` (100000).
    pub rope_theta: f64,
    /// `llama.attention.layer_norm_rms_epsilon`, the stored f32 widened (≈ 1e-5).
    pub rms_norm_eps: f64,
    /// `llama.context_length` (8192): the positions RoPE is tabulated for.
    pub max_positions: usize,
    /// Rows of `token_embd.weight` (49152).
    pub vocab_size: usize,
    /// `tokenizer.ggml.eos_token_id` (2).
    pub eos_token_id: u32,
}

impl LlamaConfig {
    /// Reads the config of a `llama` GGUF.
    pub fn from_gguf(content: &Content) -> anyhow::Result<Self> {
        let get = |key: &str| -> anyhow::Result<&Value> {
            content
                .metadata
                .get(key)
                .with_context(|| format!("the GGUF has no `{key}` metadata"))
        };
        let uint = |key: &str| -> anyhow::Result<usize> {
            let v = get(key)?;
            let n = v
                .to_u32()
                .map(u64::from)
                .or_else(|_| v.to_u64())
                .with_context(|| format!("`{key}`"))?;
            Ok(usize::try_from(n)?)
        };
        // A default only where the key is absent: one of another type is an error, not the
        // default.
        let present = |key: &str| content.metadata.contains_key(key);
        let uint_or = |key: &str, default: usize| match present(key) {
            true => uint(key),
            false => Ok(default),
        };
        // RoPE as SmolLM2 has it: no scaling, no per-frequency factors, keys of the heads' size.
        if let Some(kind) = content.metadata.get("llama.rope.scaling.type") {
            let kind = kind.to_string().context("`llama.rope.scaling.type`")?;
            if kind != "none" {
                bail!("RoPE scaling (`{kind}`) is not supported by this example");
            }
        }
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            bail!("per-frequency RoPE factors (`rope_freqs.weight`) are not supported");
        }
        let arch = get("general.architecture")?.to_string()?;
        if arch != "llama" {
            bail!("expected a `llama` GGUF, found architecture `{arch}`");
        }
        let hidden_size = uint("llama.embedding_length")?;
        let num_heads = uint("llama.attention.head_count")?;
        let num_kv_heads = uint("llama.attention.head_count_kv")?;
        if num_heads == 0
            || num_kv_heads == 0
            || hidden_size % num_heads != 0
            || num_heads % num_kv_heads != 0
        {
            bail!(
                "bad head counts: {num_heads} heads, {num_kv_heads} KV heads, hidden {hidden_size}"
            );
        }
        let head_dim = hidden_size / num_heads;
        let rope_dim = uint_or("llama.rope.dimension_count", head_dim)?;
        if rope_dim != head_dim {
            bail!("partial RoPE ({rope_dim} of {head_dim} dims) is not supported");
        }
        let key_dim = uint_or("llama.attention.key_length", head_dim)?;
        if key_dim != head_dim {
            bail!("keys of {key_dim} values for heads of {head_dim} are not supported");
        }
        let vocab_size = content
            .tensor_infos
            .get("token_embd.weight")
            .context("the GGUF has no `token_embd.weight`")?
            .shape
            .dims()
            .first()
            .copied()
            .filter(|&n| n > 0)
            .context("`token_embd.weight` has no rows")?;
        // A token id past the embedding's rows would fail in the middle of a prompt.
        if let Some(Value::Array(tokens)) = content.metadata.get("tokenizer.ggml.tokens") {
            if tokens.len() > vocab_size {
                bail!(
                    "the tokenizer has {} tokens but `token_embd.weight` only {vocab_size} rows",
                    tokens.len()
                );
            }
        }
        // The RoPE tables hold every position up front (cos and sin, head_dim / 2 each): a
        // bound on their size before they are made.
        let max_positions = uint_or("llama.context_length", 4096)?;
        if max_positions.saturating_mul(head_dim) > MAX_ROPE_VALUES {
            bail!(
                "`llama.context_length` {max_positions} × a head size of {head_dim} \
                 (`llama.embedding_length` / `llama.attention.head_count`) is more than the \
                 {MAX_ROPE_VALUES} values this example's RoPE tables may hold"
            );
        }
        // Every layer's tensors must be in the file: a block count that lies is an error here,
        // not an allocation of its size.
        let num_layers = uint("llama.block_count")?;
        let last = format!("blk.{}.attn_q.weight", num_layers.saturating_sub(1));
        if num_layers == 0 || !content.tensor_infos.contains_key(&last) {
            bail!("`llama.block_count` is {num_layers}, but the GGUF has no `{last}`");
        }
        let rope_theta = match content.metadata.get("llama.rope.freq_base") {
            Some(v) => v.to_f32().context("`llama.rope.freq_base`")?,
            None => 10_000.,
        };
        Ok(Self {
            hidden_size,
            intermediate_size: uint("llama.feed_forward_length")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: f64::from(rope_theta),
            rms_norm_eps: f64::from(get("llama.attention.layer_norm_rms_epsilon")?.to_f32()?),
            max_positions,
            vocab_size,
            eos_token_id: get("tokenizer.ggml.eos_token_id")?.to_u32()?,
        })
    }
}

/// The most values the RoPE tables may hold, positions × head size (cos and sin, half the head
/// size each): 2^27 f32, 512 MiB; 2^20 positions at a head size of 128.
const MAX_ROPE_VALUES: usize = 1 << 27;

/// Opens a GGUF through the crate's checked reader: its lengths, `general.alignment` and tensor
/// table are checked before anything is read (candle's own `Content::read` panics on some
/// malformed files, and reads a 64-bit `general.alignment` as the default).
pub fn read_gguf(path: &Path) -> anyhow::Result<GgufStore> {
    Ok(GgufStore::open(path)?)
}

/// RoPE tables for interleaved pairs: `cos`/`sin` of `pos · θ^(-2i/d)`, `[max_positions, d/2]`.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, device: &Device) -> candle_core::Result<Self> {
        let half = cfg.head_dim / 2;
        // In f32, as Hugging Face transformers and candle-transformers compute them: the same
        // tables bit for bit (an f64 angle would differ in the last bit here and there, and
        // every bit that differs can flip a Q8_1 rounding downstream).
        let base = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1. / base.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in 0..cfg.max_positions {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (cfg.max_positions, half);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
        })
    }

    /// Rotates `x` (`[batch, heads, tokens, head_dim]`) for positions `pos..pos + tokens`.
    ///
    /// llama.cpp's converter permutes the rows of `attn_q`/`attn_k` so that, on GGUF weights,
    /// the rotated pairs are adjacent `(x[2i], x[2i+1])`: `rope_i`, not the half-split `rope`.
    fn apply(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
    }
}

/// What runs the decoder around the FFNs: attention's projections and core, and the output
/// head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decoder {
    /// candle-glu's [`Projection`] for the projections and the head (the crate's kernels,
    /// reading the GGUF blocks in place, over 8-bit activations), and one op for attention's
    /// core at decode ([`attention::DecodeAttention`]); candle's ops where these do not run.
    #[default]
    Crate,
    /// candle's own ops: `QMatMul` ([`Projection::forward_candle`]), batched matmuls and
    /// softmax, as candle-transformers' `quantized_llama` runs them.
    Candle,
}

impl fmt::Display for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decoder::Crate => "crate",
            Decoder::Candle => "candle",
        })
    }
}

impl FromStr for Decoder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Decoder::Crate, Decoder::Candle]
            .into_iter()
            .find(|l| l.to_string().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown decoder `{s}`: expected crate or candle"))
    }
}

impl Decoder {
    fn forward(self, proj: &Projection, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Decoder::Crate => proj.forward(xs),
            Decoder::Candle => proj.forward_candle(xs),
        }
    }
}

/// Grouped-query self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `softmax(q·kᵀ/√d + mask)·v` over the cached and new keys; appends the new keys and
    /// values to `cache`. `xs` is `[batch, tokens, hidden]`, the new tokens at positions
    /// `pos..pos + tokens`.
    fn forward(
        &self,
        xs: &Tensor,
        rope: &Rope,
        pos: usize,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        decoder: Decoder,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = profile::time(Part::AttnProj, || {
            let q = decoder.forward(&self.q_proj, xs)?;
            let k = decoder.forward(&self.k_proj, xs)?;
            let v = decoder.forward(&self.v_proj, xs)?;
            candle_core::Result::Ok((q, k, v))
        })?;
        let ys = profile::time(Part::AttnCore, || {
            let heads = |x: Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2);
            let q = rope.apply(&heads(q, h)?, pos)?;
            let k = rope.apply(&heads(k, kvh)?, pos)?;
            let v = heads(v, kvh)?.contiguous()?;
            // Written in place into the cache's buffer; `k` and `v` are views of its first
            // `pos + t` positions.
            let (k, v) = cache.append(&k, &v)?;
            let kv_len = k.dim(2)?;

            // Query head j reads KV head j / (h / kvh): fold each group's queries into one
            // `[group · t, d]` matrix per KV head, so the keys and values are never copied.
            let group = h / kvh;
            let q = q.reshape((b, kvh, group * t, d))?;
            if t == 1 && decoder == Decoder::Crate && q.device().is_cpu() {
                let op = attention::DecodeAttention {
                    scale: 1.0 / (d as f32).sqrt(),
                };
                let ys = q.contiguous()?.apply_op3_no_bwd(&k, &v, &op)?;
                return ys.reshape((b, t, h * d));
            }
            let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
            let scores = match mask {
                Some(mask) => scores
                    .reshape((b, kvh, group, t, kv_len))?
                    .broadcast_add(mask)?
                    .reshape((b, kvh, group * t, kv_len))?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ys = probs.matmul(&v)?; // [b, kvh, group · t, d]
            ys.reshape((b, h, t, d))?
                .transpose(1, 2)?
                .reshape((b, t, h * d))
        })?;
        profile::time(Part::AttnProj, || decoder.forward(&self.o_proj, &ys))
    }
}

/// One pre-norm decoder block: attention, then the FFN `F`, each around a residual.
#[derive(Debug, Clone)]
pub struct DecoderLayer<F> {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: F,
}

impl<F: Module> DecoderLayer<F> {
    /// The block's FFN.
    pub fn mlp(&self) -> &F {
        &self.mlp
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &Rope,
        pos: usize,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        decoder: Decoder,
    ) -> candle_core::Result<Tensor> {
        let attn =
            self.attn
                .forward(&xs.apply(&self.attn_norm)?, rope, pos, mask, cache, decoder)?;
        let h = (xs + attn)?;
        let normed = h.apply(&self.ffn_norm)?;
        profile::time(Part::Ffn, || normed.apply(&self.mlp))? + &h
    }
}

/// Positions each layer's KV buffer grows by: the cache is written in place, and copied only
/// when it grows past a multiple of this.
const KV_CHUNK: usize = 512;

/// The keys and values of the tokens seen so far, per layer; the next token's position is
/// [`len`](Cache::len). Each layer's keys and values live in a buffer of whole
/// [`KV_CHUNK`]s of positions (candle-nn's `KvCache`), written in place.
///
/// Kept apart from [`Model`] so that one model can serve several sequences (and threads). Not
/// `Clone`: clones of a `KvCache` share its buffer, and each would write into the other's.
#[derive(Debug)]
pub struct Cache {
    kv: Vec<KvCache>,
    len: usize,
}

impl Cache {
    /// Tokens cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every token (and frees the buffers).
    pub fn clear(&mut self) {
        self.kv.iter_mut().for_each(KvCache::reset);
        self.len = 0;
    }
}

/// SmolLM2 (Llama) with the FFN `F` in every layer; by default candle-glu's `GluFeedForward`.
#[derive(Debug, Clone)]
pub struct Model<F = GluFeedForward> {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer<F>>,
    norm: RmsNorm,
    lm_head: Projection,
    rope: Rope,
    config: LlamaConfig,
    device: Device,
    decoder: Decoder,
}

impl Model<GluFeedForward> {
    /// Loads the GGUF at `path`, with every FFN a `GluFeedForward` loaded by candle-glu
    /// (`Checkpoint::load_layer`) as `ffn` says.
    pub fn load(path: impl AsRef<Path>, ffn: FfnKind, device: &Device) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let ckpt = Checkpoint::open(path)?;
        let cfg = ckpt
            .config()
            .with_context(|| format!("{}: no FFN config in the GGUF metadata", path.display()))?
            .clone();
        let opts = ffn.load_options(device);
        Self::load_with(path, device, |layer| {
            Ok(ckpt.load_layer(&cfg, layer, &opts)?)
        })
    }
}

impl<F: Module> Model<F> {
    /// Loads everything but the FFNs from the GGUF at `path`; `make_ffn(layer)` supplies layer
    /// `layer`'s FFN, any [`Module`] from `[batch, tokens, hidden]` to the same shape.
    pub fn load_with(
        path: impl AsRef<Path>,
        device: &Device,
        mut make_ffn: impl FnMut(usize) -> anyhow::Result<F>,
    ) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let gguf = read_gguf(path)?;
        let content = gguf.content();
        let config = LlamaConfig::from_gguf(content)?;
        // (The store's errors name the file and the tensor.)
        let qtensor = |name: &str| gguf.qtensor(name, device);
        let norm = |w: QTensor| -> anyhow::Result<RmsNorm> {
            Ok(RmsNorm::new(w.dequantize(device)?, config.rms_norm_eps))
        };
        let proj = |w: QTensor| -> anyhow::Result<Projection> {
            Ok(Projection::from_qtensor(std::sync::Arc::new(w), None)?)
        };
        let mut layers = Vec::new();
        for i in 0..config.num_layers {
            let weight = |name: &str| qtensor(&format!("blk.{i}.{name}.weight"));
            let attn = Attention {
                q_proj: proj(weight("attn_q")?)?,
                k_proj: proj(weight("attn_k")?)?,
                v_proj: proj(weight("attn_v")?)?,
                o_proj: proj(weight("attn_output")?)?,
                num_heads: config.num_heads,
                num_kv_heads: config.num_kv_heads,
                head_dim: config.head_dim,
            };
            layers.push(DecoderLayer {
                attn_norm: norm(weight("attn_norm")?)?,
                attn,
                ffn_norm: norm(weight("ffn_norm")?)?,
                mlp: make_ffn(i).with_context(|| format!("layer {i}'s FFN"))?,
            });
        }
        let norm = norm(qtensor("output_norm.weight")?)?;
        let embed = qtensor("token_embd.weight")?;
        let embed_tokens = Embedding::new(embed.dequantize(device)?, config.hidden_size);
        // SmolLM2 ties the output head to the embedding: no `output.weight` in the file.
        let lm_head = match content.tensor_infos.contains_key("output.weight") {
            true => qtensor("output.weight")?,
            false => embed,
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head: proj(lm_head)?,
            rope: Rope::new(&config, device)?,
            config,
            device: device.clone(),
            decoder: Decoder::default(),
        })
    }

    /// The same model with attention's projections and the output head multiplied by
    /// `decoder`.
    pub fn with_decoder(mut self, decoder: Decoder) -> Self {
        self.decoder = decoder;
        self
    }

    /// The same model with the attention projections and the output head dequantized to f32
    /// (the embedding already is): no more 8-bit rounding of their inputs. With f32 FFNs the
    /// whole model then computes in plain f32.
    pub fn dequantized(mut self) -> candle_core::Result<Self> {
        let dense = |p: &Projection| -> candle_core::Result<Projection> {
            Ok(match p {
                Projection::Quantized {
                    weight: QMatMul::QTensor(q),
                    bias,
                    ..
                } => Projection::new(q.dequantize(&q.device())?, bias.clone())?,
                other => other.clone(),
            })
        };
        for layer in &mut self.layers {
            let a = &mut layer.attn;
            a.q_proj = dense(&a.q_proj)?;
            a.k_proj = dense(&a.k_proj)?;
            a.v_proj = dense(&a.v_proj)?;
            a.o_proj = dense(&a.o_proj)?;
        }
        self.lm_head = dense(&self.lm_head)?;
        Ok(self)
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The decoder blocks.
    pub fn layers(&self) -> &[DecoderLayer<F>] {
        &self.layers
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> Cache {
        Cache {
            kv: (0..self.layers.len())
                .map(|_| KvCache::new(2, KV_CHUNK))
                .collect(),
            len: 0,
        }
    }

    /// The final hidden states (after the last RmsNorm) of `ids` (`[batch, tokens]`, u32),
    /// which follow the `cache.len()` tokens in `cache`; appends them to `cache`. On an error
    /// the cache is cleared.
    pub fn hidden_states(&self, ids: &Tensor, cache: &mut Cache) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos = cache.len;
        if t == 0 {
            candle_core::bail!("no tokens to run");
        }
        if pos + t > self.config.max_positions {
            candle_core::bail!(
                "{} tokens exceed the context length {}",
                pos + t,
                self.config.max_positions
            );
        }
        if cache.kv.len() != self.layers.len() {
            candle_core::bail!("the cache is not this model's");
        }
        let run = |cache: &mut Cache| -> candle_core::Result<Tensor> {
            let mask = causal_mask(t, pos, &self.device)?;
            let mut xs = self.embed_tokens.forward(ids)?;
            for (layer, kv) in self.layers.iter().zip(cache.kv.iter_mut()) {
                xs = layer.forward(&xs, &self.rope, pos, mask.as_ref(), kv, self.decoder)?;
            }
            xs.apply(&self.norm)
        };
        match run(cache) {
            Ok(xs) => {
                cache.len += t;
                Ok(xs)
            }
            Err(e) => {
                // Some layers may have cached these tokens already: start over.
                cache.clear();
                Err(e)
            }
        }
    }

    /// The output head: logits from final hidden states.
    fn head(&self, hs: &Tensor) -> candle_core::Result<Tensor> {
        profile::time(Part::Head, || self.decoder.forward(&self.lm_head, hs))
    }

    /// Next-token logits at every position: `[batch, tokens, vocab]`, f32.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache) -> candle_core::Result<Tensor> {
        self.head(&self.hidden_states(ids, cache)?)
    }

    /// Next-token logits after the last token only: `[batch, vocab]`, f32.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut Cache) -> candle_core::Result<Tensor> {
        let hs = self.hidden_states(ids, cache)?;
        let last = hs.dim(1)? - 1;
        self.head(&hs.i((.., last..))?)?.squeeze(1)
    }
}

/// `0` where query `i` (at position `pos + i`) may see key `j`, `-inf` where `j > pos + i`:
/// `[tokens, pos + tokens]`. `None` for one token, which sees everything cached.
fn causal_mask(t: usize, pos: usize, device: &Device) -> candle_core::Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..pos + t).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0. }))
        .collect();
    Tensor::from_vec(mask, (t, pos + t), device).map(Some)
}

/// The index of the largest logit (the first, on ties), as NumPy's `argmax`.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    let v = logits
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok(sampler::argmax(&v))
}
