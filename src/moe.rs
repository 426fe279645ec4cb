//! The mixture-of-experts feed-forward ([`GluExperts`]): a router that picks `k` of `E` gated
//! blocks per token, the blocks themselves ([`GluFeedForward`]s, one per expert, reading their
//! weights in place), and the always-on shared experts of Qwen2-MoE and DeepSeek.
//!
//! Routing, as each family defines it. The router's logits and scores are computed in f32 (f64
//! for f64 inputs) whatever the weights' dtype: transformers computes the softmax (DeepSeek's
//! router throughout) in f32 too, Mixtral's and Qwen's logits in the module's dtype.
//!
//! | family (`model_type`) | scores | choice | weights |
//! |---|---|---|---|
//! | Mixtral (`mixtral`) | softmax | top-k | renormalised over the k |
//! | Qwen2-MoE (`qwen2_moe`) | softmax | top-k | renormalised if `norm_topk_prob`; + shared expert × sigmoid(`shared_expert_gate`) |
//! | Qwen3-MoE (`qwen3_moe`), OLMoE (`olmoe`) | softmax | top-k | renormalised if `norm_topk_prob` |
//! | DeepSeek-V3 (`deepseek_v3`) | sigmoid | top-k of score + `e_score_correction_bias`, among the `topk_group` best of `n_group` groups (a group's score: its two best) | the scores without the bias, renormalised if `norm_topk_prob`, × `routed_scaling_factor`; + shared experts |
//!
//! Ties in a top-k go to the lowest index, as PyTorch's `topk` breaks them. A NaN score is never
//! chosen while a number is left (`topk` would rank it highest; a NaN router row makes every
//! score NaN, and its token's output NaN, either way). DeepSeek's experts outside the chosen
//! groups are not candidates: transformers 5 and DeepSeek's own inference code mask them with
//! −∞, which chooses the same wherever no allowed score is NaN (transformers 4 filled 0.0, which
//! chooses differently where a biased score is below 0). The selection bias is read in f32, as
//! transformers keeps it, whatever the dtype the layer is loaded in.
//!
//! Execution is grouped: the tokens routed to each expert are gathered once, the expert runs
//! once over them, and its outputs are added back with their weights; an expert without tokens
//! costs nothing. The routing weights are computed with candle's ops from the router's logits,
//! so that training reaches the router as well as the experts.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, IndexOp, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde_json::Value;

use candle_core::Result;

use crate::config::{bool_field, kind_of, size_field, MAX_CONFIG_BYTES, MAX_DIM};
use crate::error;
use crate::projection::{load, load_as};
use crate::{Error, GluConfig, GluFeedForward, Projection, WeightLayout};

/// How the router turns its logits into scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scoring {
    /// Softmax over all experts (Mixtral, Qwen-MoE, OLMoE).
    Softmax,
    /// A sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

/// A mixture-of-experts layer's configuration: the experts' block, and the router.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MoeConfig {
    /// Each expert's block: hidden size, the expert's intermediate size, σ.
    pub expert: GluConfig,
    /// E, the routed experts.
    pub num_experts: usize,
    /// k, the experts each token is routed to.
    pub top_k: usize,
    /// The scores' function.
    pub scoring: Scoring,
    /// Whether the k chosen weights are divided by their sum.
    pub norm_topk_prob: bool,
    /// Groups of experts (DeepSeek's `n_group`); 1: no group limit.
    pub n_group: usize,
    /// The groups a token's experts may come from (`topk_group`).
    pub topk_group: usize,
    /// A factor on the routed experts' weights (DeepSeek's `routed_scaling_factor`).
    pub routed_scaling_factor: f64,
    /// Whether a per-expert bias (`gate.e_score_correction_bias`) is added to the scores to
    /// choose the experts, but not to weight them (DeepSeek-V3).
    pub selection_bias: bool,
    /// The intermediate size of the shared (always-on) expert, if any.
    pub shared_intermediate_size: Option<usize>,
    /// Whether the shared expert's output is scaled by `sigmoid(x·gᵀ)` (`shared_expert_gate`,
    /// Qwen2-MoE).
    pub shared_expert_gate: bool,
    /// Which of the model's layers have experts; see [`is_moe_layer`](Self::is_moe_layer).
    pub sparse_layers: SparseLayers,
}

/// Which layers of a mixture-of-experts model have experts, as transformers builds them: the
/// others have a dense FFN of the model's `intermediate_size`. Every layer by default (Mixtral,
/// OLMoE).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SparseLayers {
    /// The first layers, which are dense (DeepSeek-V3's `first_k_dense_replace`).
    pub first_dense: usize,
    /// Of the others, layer `l` has experts where `(l + 1) % step == 0` (Qwen-MoE's
    /// `decoder_sparse_step`); 1: every one.
    pub step: usize,
    /// Layers that are dense whatever the above (Qwen-MoE's `mlp_only_layers`).
    pub dense: Vec<usize>,
}

impl Default for SparseLayers {
    fn default() -> Self {
        Self {
            first_dense: 0,
            step: 1,
            dense: Vec::new(),
        }
    }
}

impl MoeConfig {
    /// The `model_type`s [`from_hf_json`](Self::from_hf_json) reads.
    pub const MODEL_TYPES: [&'static str; 5] =
        ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"];

    /// `num_experts` experts of block `expert`, `top_k` per token, routed as Mixtral routes:
    /// softmax, top-k, the k weights renormalised.
    pub fn new(expert: GluConfig, num_experts: usize, top_k: usize) -> Self {
        Self {
            expert,
            num_experts,
            top_k,
            scoring: Scoring::Softmax,
            norm_topk_prob: true,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            selection_bias: false,
            shared_intermediate_size: None,
            shared_expert_gate: false,
            sparse_layers: SparseLayers::default(),
        }
    }

    /// Whether layer `layer` of the model has experts (else a dense FFN), from
    /// [`sparse_layers`](Self::sparse_layers): for a model's own loop over its layers.
    /// [`Checkpoint::moe_layers`](crate::loading::Checkpoint::moe_layers) instead looks at the
    /// tensors a checkpoint holds.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        let s = &self.sparse_layers;
        layer >= s.first_dense
            && !s.dense.contains(&layer)
            && (layer + 1).is_multiple_of(s.step.max(1))
    }

    /// Checks the sizes against each other.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first inconsistency.
    pub fn validate(&self) -> error::Result<()> {
        self.check(&ConfigKeys::HF)
    }

    /// [`validate`](Self::validate), its messages naming the sizes by `keys`.
    pub(crate) fn check(&self, keys: &ConfigKeys<'_>) -> error::Result<()> {
        self.expert.validate()?;
        let fail = |message: String| {
            Err(Error::InvalidConfig {
                path: None,
                message,
            })
        };
        let (e, k) = (self.num_experts, self.top_k);
        if self.sparse_layers.step == 0 {
            return fail("`decoder_sparse_step` is 0, expected at least 1".into());
        }
        if e > MAX_DIM {
            return fail(format!(
                "{e} experts, more than the {MAX_DIM} any real model uses"
            ));
        }
        if e == 0 || k == 0 || k > e {
            return fail(format!(
                "{} = {k} must be between 1 and the number of experts, {e}",
                keys.top_k
            ));
        }
        if self.n_group == 0 || e % self.n_group != 0 {
            return fail(format!(
                "{} = {} must divide the number of experts, {e}",
                keys.n_group, self.n_group
            ));
        }
        if self.n_group > 1 {
            let per_group = e / self.n_group;
            if per_group < 2 {
                return fail(format!(
                    "groups of {per_group} expert: a group's score is its two best experts'"
                ));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return fail(format!(
                    "{} = {} must be between 1 and {} = {}",
                    keys.topk_group, self.topk_group, keys.n_group, self.n_group
                ));
            }
            if self.topk_group * per_group < k {
                return fail(format!(
                    "{} = {} groups of {per_group} experts hold fewer than {} = {k}",
                    keys.topk_group, self.topk_group, keys.top_k
                ));
            }
        }
        if !self.routed_scaling_factor.is_finite() {
            return fail(format!("{} must be finite", keys.scaling));
        }
        match self.shared_intermediate_size {
            Some(0) => return fail("the shared expert's intermediate size is 0".into()),
            Some(n) if n > MAX_DIM => {
                return fail(format!(
                    "the shared experts' intermediate size {n} is more than {MAX_DIM}"
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// Where layer `layer`'s mixture of experts lives: `blk.{layer}` in GGUF files (experts in
    /// [`WeightLayout::Gguf`]), Mixtral's `model.layers.{layer}.block_sparse_moe`, the other
    /// families' `model.layers.{layer}.mlp`.
    pub fn layer_prefix(&self, layer: usize) -> String {
        layer_prefix(self.expert.layout, layer)
    }

    /// Reads a Hugging Face `config.json` of a mixture-of-experts model (`model_type`
    /// `mixtral`, `qwen2_moe`, `qwen3_moe`, `olmoe`, `deepseek_v3`), as the module table says.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for invalid JSON, an unknown `model_type` or a dense model, a
    /// missing or malformed field, inconsistent sizes.
    pub fn from_hf_json(json: &str) -> error::Result<Self> {
        Self::parse(json, None)
    }

    /// Reads a `config.json` file; see [`from_hf_json`](Self::from_hf_json).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, else as [`from_hf_json`](Self::from_hf_json),
    /// with the path in the message.
    pub fn from_hf_config_file(path: impl AsRef<Path>) -> error::Result<Self> {
        let path = path.as_ref();
        let text = crate::files::read_json_text(path, MAX_CONFIG_BYTES)?;
        Self::parse(&text, Some(path))
    }

    pub(crate) fn parse(json: &str, path: Option<&Path>) -> error::Result<Self> {
        let fail = |message: String| Error::InvalidConfig {
            path: path.map(Path::to_path_buf),
            message,
        };
        // The dense fields (hidden size, σ) as the block reads them.
        let dense = GluConfig::from_hf_json(json).map_err(|e| match e {
            Error::InvalidConfig { message, .. } => fail(message),
            e => e,
        })?;
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(json) else {
            return Err(fail("expected a JSON object".into()));
        };
        let model_type = obj.get("model_type").and_then(Value::as_str).unwrap_or("");
        let size = |field: &str| size_field(&obj, field).map_err(&fail);
        // The experts' count: each family's own key, which transformers 5 may write under
        // another (Qwen3-MoE's `num_experts` as `num_local_experts`).
        let experts = |field: &str| {
            [
                field,
                "num_experts",
                "num_local_experts",
                "n_routed_experts",
            ]
            .into_iter()
            .find(|f| obj.get(*f).is_some_and(|v| !v.is_null()))
            .map_or_else(|| size(field), size)
        };
        let flag = |field: &str, default: bool| bool_field(&obj, field, default).map_err(&fail);
        let mut expert = dense.with_layout(WeightLayout::Llama);
        let mut cfg = match model_type {
            "mixtral" => {
                expert = expert.with_layout(WeightLayout::Mixtral);
                MoeConfig::new(
                    expert.clone(),
                    experts("num_local_experts")?,
                    size("num_experts_per_tok")?,
                )
            }
            "qwen2_moe" | "qwen3_moe" | "olmoe" => {
                if model_type != "olmoe" {
                    expert.intermediate_size = size("moe_intermediate_size")?;
                }
                let mut cfg = MoeConfig::new(
                    expert.clone(),
                    experts("num_experts")?,
                    size("num_experts_per_tok")?,
                );
                cfg.norm_topk_prob = flag("norm_topk_prob", false)?;
                if model_type != "olmoe" {
                    // transformers' defaults: every layer.
                    cfg.sparse_layers.step = match obj.get("decoder_sparse_step") {
                        None | Some(Value::Null) => 1,
                        Some(_) => size("decoder_sparse_step")?,
                    };
                    cfg.sparse_layers.dense = layer_list(&obj, "mlp_only_layers").map_err(&fail)?;
                }
                if model_type == "qwen2_moe" {
                    let shared = size("shared_expert_intermediate_size")?;
                    cfg.shared_intermediate_size = (shared > 0).then_some(shared);
                    cfg.shared_expert_gate = shared > 0;
                }
                cfg
            }
            "deepseek_v3" => {
                expert.intermediate_size = size("moe_intermediate_size")?;
                let mut cfg = MoeConfig::new(
                    expert.clone(),
                    experts("n_routed_experts")?,
                    size("num_experts_per_tok")?,
                );
                cfg.scoring = Scoring::Sigmoid;
                cfg.selection_bias = true;
                // transformers' default is 3 (DeepSeek-V3's own).
                cfg.sparse_layers.first_dense = match obj.get("first_k_dense_replace") {
                    None | Some(Value::Null) => 3,
                    Some(_) => size("first_k_dense_replace")?,
                };
                cfg.norm_topk_prob = flag("norm_topk_prob", true)?;
                cfg.n_group = size("n_group")?;
                cfg.topk_group = size("topk_group")?;
                cfg.routed_scaling_factor =
                    match obj.get("routed_scaling_factor") {
                        // Required, as the other routing fields are: transformers would take its
                        // default, 2.5, and a silent 1.0 here would weight every expert otherwise.
                        None | Some(Value::Null) => return Err(fail(
                            "missing `routed_scaling_factor` (DeepSeek-V3's factor on the routed \
                             experts' weights; transformers' default is 2.5)"
                                .into(),
                        )),
                        Some(v) => v.as_f64().ok_or_else(|| {
                            fail(format!(
                                "`routed_scaling_factor` must be a number, found {}",
                                kind_of(v)
                            ))
                        })?,
                    };
                let shared = size("n_shared_experts")?;
                let width = shared
                    .checked_mul(cfg.expert.intermediate_size)
                    .ok_or_else(|| {
                        fail(format!(
                            "n_shared_experts = {shared} × moe_intermediate_size overflows"
                        ))
                    })?;
                cfg.shared_intermediate_size = (shared > 0).then_some(width);
                cfg
            }
            "" => return Err(fail("missing `model_type`".into())),
            other => {
                return Err(fail(format!(
                    "`model_type` = `{other}` is not a mixture-of-experts model this crate \
                     reads ({})",
                    Self::MODEL_TYPES.join(", ")
                )))
            }
        };
        cfg.expert = expert;
        cfg.validate().map_err(|e| match e {
            Error::InvalidConfig { message, .. } => fail(message),
            e => e,
        })?;
        Ok(cfg)
    }
}

/// Where layer `layer`'s mixture lives for experts in `layout`; see [`MoeConfig::layer_prefix`].
pub(crate) fn layer_prefix(layout: WeightLayout, layer: usize) -> String {
    match layout {
        WeightLayout::Gguf => format!("blk.{layer}"),
        WeightLayout::Mixtral => format!("model.layers.{layer}.block_sparse_moe"),
        _ => format!("model.layers.{layer}.mlp"),
    }
}

/// A list of layer indices (`mlp_only_layers`): empty where absent or null.
fn layer_list(
    obj: &serde_json::Map<String, Value>,
    field: &str,
) -> std::result::Result<Vec<usize>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        format!("`{field}` must list layer indices, found {}", kind_of(v))
                    })
            })
            .collect(),
        Some(v) => Err(format!(
            "`{field}` must be a list of layer indices, found {}",
            kind_of(v)
        )),
    }
}

/// The router's decision for a batch of tokens: for each token, its experts (in the order
/// chosen: best first) and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Per token, the chosen experts, best first.
    pub experts: Vec<Vec<usize>>,
    /// Per token, the chosen experts' weights, in the same order.
    pub weights: Vec<Vec<f32>>,
}

impl Routing {
    /// How many tokens each of `num_experts` experts received.
    pub fn tokens_per_expert(&self, num_experts: usize) -> Vec<usize> {
        let mut counts = vec![0; num_experts];
        for e in self.experts.iter().flatten() {
            if let Some(c) = counts.get_mut(*e) {
                *c += 1;
            }
        }
        counts
    }
}

/// The mixture-of-experts feed-forward: `y = Σ_{e ∈ topk(x)} w_e(x)·FFN_e(x) (+ shared(x))`,
/// each `FFN_e` a [`GluFeedForward`].
///
/// ```rust
/// use candle_core::{DType, Device, Tensor};
/// use candle_glu::{GluConfig, GluExperts, MoeConfig};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let (h, i, e) = (64, 96, 4);
/// let mut ws = std::collections::HashMap::new();
/// ws.insert("gate.weight".to_string(), Tensor::randn(0f32, 0.1, (e, h), &dev)?);
/// for x in 0..e {
///     for (n, s) in [("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))] {
///         ws.insert(format!("experts.{x}.{n}.weight"), Tensor::randn(0f32, 0.1, s, &dev)?);
///     }
/// }
/// let vb = candle_nn::VarBuilder::from_tensors(ws, DType::F32, &dev);
/// let cfg = MoeConfig::new(GluConfig::new(h, i), e, 2);
/// let moe = GluExperts::new(&cfg, vb)?;
/// let x = Tensor::randn(0f32, 1., (1, 5, h), &dev)?;
/// assert_eq!(x.apply(&moe)?.dims(), &[1, 5, h]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct GluExperts {
    config: MoeConfig,
    /// The router, `[E, H]`, as stored.
    router: Tensor,
    /// The router in f32 as a [`Projection`], for f32 and narrower inputs: on a CPU with the
    /// crate's kernels, they compute the logits on every thread. Only where the router is not a
    /// variable (one being trained stays on candle's ops; a copy would miss its updates); a
    /// copy where it is stored in another dtype (converting it on every call cost 15% of a
    /// Qwen3-MoE layer's decode), the same storage where it is f32.
    router_projection: Option<Projection>,
    /// DeepSeek-V3's selection bias, `[E]`, as given (f32 from [`GluExperts::new`]): read on
    /// every call where it is a variable, so that updates to it are seen; else copied once.
    selection_bias: Option<SelectionBias>,
    experts: Vec<GluFeedForward>,
    shared: Option<GluFeedForward>,
    /// Qwen2-MoE's shared expert gate, `[1, H]`, as stored.
    shared_gate: Option<Tensor>,
}

/// DeepSeek-V3's selection bias: a copy, or the variable being trained.
#[derive(Debug, Clone)]
enum SelectionBias {
    Fixed(Vec<f32>),
    Variable(Tensor),
}

impl GluExperts {
    /// Loads the layer from `vb` at the mixture-of-experts block's prefix (e.g.
    /// `model.layers.0.mlp`, or Mixtral's `model.layers.0.block_sparse_moe`): the router
    /// `gate.weight` (and `gate.e_score_correction_bias`), the experts either as per-expert
    /// tensors (`experts.{e}.gate_proj/up_proj/down_proj`, Mixtral's `experts.{e}.w1/w3/w2`) or
    /// stacked as transformers keeps them in memory (`experts.gate_up_proj` `[E, 2I, H]`,
    /// `experts.down_proj` `[E, H, I]`, each expert a view into them), and the shared expert
    /// (`shared_expert.*` with `shared_expert_gate`, or `shared_experts.*`).
    ///
    /// # Errors
    /// An invalid config, or one whose experts are in another layout than transformers' or
    /// Mixtral's names (a GGUF's: [`Checkpoint::load_experts`](crate::loading::Checkpoint::load_experts))
    /// or have biases; a `vb` in a dtype other than f32, f16, bf16 or f64; a missing tensor
    /// (the message names it, in the checkpoint's own layout, and what is present nearby), an expert none of whose weights is stored
    /// ([`Error::MissingExpert`], with the experts that are), or a tensor of the wrong shape.
    pub fn new(cfg: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self::build(cfg, vb)?)
    }

    /// [`new`](Self::new) with the crate's errors, whose variants the loaders keep.
    pub(crate) fn build(cfg: &MoeConfig, vb: VarBuilder) -> error::Result<Self> {
        cfg.validate()?;
        crate::projection::check_load_dtype(&vb)?;
        let refuse = |message: String| {
            Err(Error::InvalidConfig {
                path: None,
                message,
            })
        };
        match cfg.expert.layout {
            WeightLayout::Llama | WeightLayout::Mixtral => {}
            WeightLayout::Gguf => return refuse(
                "a GGUF's experts (`blk.N.ffn_*_exps`) are read by `Checkpoint::load_experts`, \
                     not through a VarBuilder"
                    .into(),
            ),
            other => {
                return refuse(format!(
                    "experts in the {other} layout: GluExperts reads transformers' (`gate_proj`, \
                     `up_proj`, `down_proj`) and Mixtral's (`w1`, `w3`, `w2`) names"
                ))
            }
        }
        if cfg.expert.bias {
            return refuse(
                "experts with biases: no family GluExperts reads has them, and it loads none"
                    .into(),
            );
        }
        let (h, i, e) = (
            cfg.expert.hidden_size,
            cfg.expert.intermediate_size,
            cfg.num_experts,
        );
        let kaiming = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let router = load(&vb, "gate.weight", &[e, h], kaiming)?;
        let selection_bias = if cfg.selection_bias {
            // In f32 whatever the load dtype, as transformers keeps it: bf16's spacing near 1
            // (2^-7) is wider than the gaps between the scores it separates.
            let zero = candle_nn::Init::Const(0.0);
            let name = "gate.e_score_correction_bias";
            Some(load_as(&vb, name, &[e], zero, DType::F32)?)
        } else {
            None
        };
        let expert_cfg = cfg.expert.clone().with_bias(false);
        // Stacked if either stacked tensor is there (a missing one is then named as such).
        let stacked = ["experts.gate_up_proj", "experts.down_proj"];
        let experts = if stacked.iter().any(|n| vb.contains_tensor(n)) {
            let gate_up = load(&vb, "experts.gate_up_proj", &[e, 2 * i, h], kaiming)?;
            let down = load(&vb, "experts.down_proj", &[e, h, i], kaiming)?;
            (0..e)
                .map(|x| {
                    let gu = gate_up.i(x)?;
                    let dense = |w: Tensor| Projection::Dense(Linear::new(w, None));
                    GluFeedForward::from_projections(
                        &expert_cfg,
                        dense(gu.narrow(0, 0, i)?),
                        dense(gu.narrow(0, i, i)?),
                        dense(down.i(x)?),
                    )
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            // Mixtral's names where the config says so or any expert has them (a config made
            // with `MoeConfig::new` says Llama), so that a missing tensor is named in the
            // checkpoint's own layout.
            let mixtral = cfg.expert.layout == WeightLayout::Mixtral
                || (0..e).any(|x| {
                    ["w1", "w2", "w3"]
                        .iter()
                        .any(|w| vb.contains_tensor(&format!("experts.{x}.{w}.weight")))
                });
            let layout = if mixtral {
                WeightLayout::Mixtral
            } else {
                WeightLayout::Llama
            };
            let expert_cfg = expert_cfg.with_layout(layout);
            (0..e)
                .map(|x| {
                    GluFeedForward::build(&expert_cfg, vb.pp(format!("experts.{x}")))
                        .map_err(|err| missing_expert(&vb, layout, e, x).unwrap_or(err))
                })
                .collect::<error::Result<Vec<_>>>()?
        };
        let (shared, shared_gate) = match cfg.shared_intermediate_size {
            None => (None, None),
            Some(si) => {
                let shared_cfg = GluConfig::new(h, si)
                    .with_activation(cfg.expert.activation)
                    .with_layout(WeightLayout::Llama);
                // Qwen2-MoE's one gated `shared_expert`, or DeepSeek's `shared_experts`.
                let exists = |p: &str| vb.contains_tensor(&format!("{p}.gate_proj.weight"));
                let prefix = match (exists("shared_expert"), exists("shared_experts")) {
                    (true, _) => "shared_expert",
                    (false, true) => "shared_experts",
                    _ if cfg.shared_expert_gate => "shared_expert",
                    _ => "shared_experts",
                };
                let shared = GluFeedForward::build(&shared_cfg, vb.pp(prefix))?;
                let gate = if cfg.shared_expert_gate {
                    Some(load(&vb, "shared_expert_gate.weight", &[1, h], kaiming)?)
                } else {
                    None
                };
                (Some(shared), gate)
            }
        };
        Self::assemble(cfg, router, selection_bias, experts, shared, shared_gate)
    }

    /// The layer from its parts, for weights that come from elsewhere (another file format, a
    /// model's own loader): the router `[E, H]`; the selection bias `[E]` where
    /// `cfg.selection_bias`; the `E` experts, each of `cfg.expert`'s sizes; the shared expert
    /// where `cfg.shared_intermediate_size` says so, and its gate `[1, H]` where
    /// `cfg.shared_expert_gate`. The experts are not copied; the router is kept in f32 as well
    /// where it is stored in another dtype and is not a variable.
    ///
    /// # Errors
    /// An invalid config, a part of the wrong shape, or one that is missing or not expected; an
    /// expert (or shared expert) of another σ than the config's.
    pub fn from_parts(
        cfg: &MoeConfig,
        router: Tensor,
        selection_bias: Option<Tensor>,
        experts: Vec<GluFeedForward>,
        shared: Option<GluFeedForward>,
        shared_gate: Option<Tensor>,
    ) -> Result<Self> {
        Ok(Self::assemble(
            cfg,
            router,
            selection_bias,
            experts,
            shared,
            shared_gate,
        )?)
    }

    /// [`from_parts`](Self::from_parts) with the crate's errors, whose variants the loaders keep.
    pub(crate) fn assemble(
        cfg: &MoeConfig,
        router: Tensor,
        selection_bias: Option<Tensor>,
        experts: Vec<GluFeedForward>,
        shared: Option<GluFeedForward>,
        shared_gate: Option<Tensor>,
    ) -> error::Result<Self> {
        cfg.validate()?;
        let (h, i, e) = (
            cfg.expert.hidden_size,
            cfg.expert.intermediate_size,
            cfg.num_experts,
        );
        let shape = |name: &str, t: &Tensor, expected: &[usize]| -> error::Result<()> {
            if t.dims() == expected {
                return Ok(());
            }
            Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            })
        };
        let fail = |message: String| -> error::Result<Self> {
            Err(Error::InvalidConfig {
                path: None,
                message,
            })
        };
        shape("the router", &router, &[e, h])?;
        if let Some(bias) = &selection_bias {
            shape("the selection bias", bias, &[e])?;
        }
        if selection_bias.is_some() != cfg.selection_bias {
            return fail(format!(
                "the config {} a selection bias, and {} was given",
                if cfg.selection_bias { "has" } else { "has no" },
                if selection_bias.is_some() {
                    "one"
                } else {
                    "none"
                }
            ));
        }
        if experts.len() != e {
            return fail(format!(
                "{} experts given for a config of {e}",
                experts.len()
            ));
        }
        let sizes = |f: &GluFeedForward| (f.config().hidden_size, f.config().intermediate_size);
        if let Some(x) = experts.iter().position(|f| sizes(f) != (h, i)) {
            let (fh, fi) = sizes(&experts[x]);
            return fail(format!(
                "expert {x} is {fh} → {fi}, the config's experts {h} → {i}"
            ));
        }
        match (&shared, cfg.shared_intermediate_size) {
            (None, None) => {}
            (Some(f), Some(si)) if sizes(f) == (h, si) => {}
            (Some(f), Some(si)) => {
                let (fh, fi) = sizes(f);
                return fail(format!(
                    "the shared expert is {fh} → {fi}, the config's {h} → {si}"
                ));
            }
            (Some(_), None) => return fail("a shared expert given for a config without".into()),
            (None, Some(_)) => return fail("the config has a shared expert; none given".into()),
        }
        // Every block computes the config's σ (which `config()` reports for the layer).
        let act = cfg.expert.activation;
        let other =
            |f: &GluFeedForward| (f.config().activation != act).then(|| f.config().activation);
        let differs = (experts.iter().enumerate())
            .find_map(|(x, f)| Some((format!("expert {x}"), other(f)?)))
            .or_else(|| Some(("the shared expert".to_string(), other(shared.as_ref()?)?)));
        if let Some((which, found)) = differs {
            return fail(format!(
                "{which} computes σ = {found}, the config's experts {act}"
            ));
        }
        if let Some(gate) = &shared_gate {
            shape("the shared expert's gate", gate, &[1, h])?;
        }
        if shared_gate.is_some() != (cfg.shared_expert_gate && shared.is_some()) {
            return fail(format!(
                "the config {} a shared expert gate, and {} was given",
                if cfg.shared_expert_gate {
                    "has"
                } else {
                    "has no"
                },
                if shared_gate.is_some() { "one" } else { "none" }
            ));
        }
        let selection_bias = match selection_bias {
            Some(b) if b.is_variable() => Some(SelectionBias::Variable(b)),
            Some(b) => Some(SelectionBias::Fixed(b.to_dtype(DType::F32)?.to_vec1()?)),
            None => None,
        };
        let router_projection = if router.is_variable() {
            None
        } else {
            Some(Projection::new(router.to_dtype(DType::F32)?, None)?)
        };
        Ok(Self {
            config: cfg.clone(),
            router,
            router_projection,
            selection_bias,
            experts,
            shared,
            shared_gate,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// Expert `e`'s block.
    pub fn expert(&self, e: usize) -> Option<&GluFeedForward> {
        self.experts.get(e)
    }

    /// The shared expert, if the layer has one.
    pub fn shared_expert(&self) -> Option<&GluFeedForward> {
        self.shared.as_ref()
    }

    /// Every expert, in the router's order.
    pub fn experts(&self) -> &[GluFeedForward] {
        &self.experts
    }

    /// The router, `[E, H]`, as stored (or as given to [`from_parts`](Self::from_parts)).
    pub fn router(&self) -> &Tensor {
        &self.router
    }

    /// Qwen2-MoE's shared expert gate, `[1, H]`, if the layer has one.
    pub fn shared_expert_gate(&self) -> Option<&Tensor> {
        self.shared_gate.as_ref()
    }

    /// DeepSeek-V3's selection bias, `[E]`, in f32 on the router's device, if the layer has
    /// one (the variable itself where it is one).
    ///
    /// # Errors
    /// candle's, copying it to the device.
    pub fn selection_bias(&self) -> Result<Option<Tensor>> {
        match &self.selection_bias {
            None => Ok(None),
            Some(SelectionBias::Variable(t)) => Ok(Some(t.clone())),
            Some(SelectionBias::Fixed(v)) => {
                Ok(Some(Tensor::new(v.as_slice(), self.router.device())?))
            }
        }
    }

    /// The layer with every expert's (and the shared expert's) Q4_1 weights decoded exactly at
    /// every token count, or not: [`GluFeedForward::with_exact_q4_1`] on each. No effect on
    /// other weights.
    pub fn with_exact_q4_1(mut self, exact: bool) -> Self {
        let set = |f: GluFeedForward| f.with_exact_q4_1(exact);
        self.experts = self.experts.into_iter().map(set).collect();
        self.shared = self.shared.map(set);
        self
    }

    /// The router's logits for `xs` (`[.., H]`), `[tokens, E]` over its leading dimensions
    /// flattened, in the scores' dtype (f32, or f64 for f64 inputs): the product
    /// [`forward`](Module::forward) and [`route`](Self::route) take their scores from,
    /// computed again. Gradients reach the input, and the router where it is a variable: for
    /// an auxiliary load-balancing loss (transformers' `router_aux_loss_coef`).
    ///
    /// # Errors
    /// An input whose last dimension is not the hidden size; candle's errors.
    pub fn router_logits(&self, xs: &Tensor) -> Result<Tensor> {
        self.logits(&self.tokens(xs)?.1)
    }

    /// `xs` (`[.., H]`) as `[tokens, H]`, in its dtype and in the scores' (f32, or f64).
    fn tokens(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.config.expert.hidden_size;
        if xs.dims().last() != Some(&h) {
            return Err(Error::InputShape {
                shape: xs.dims().to_vec(),
                hidden_size: h,
            }
            .into());
        }
        let x = xs.reshape(((), h))?;
        let scored = x.to_dtype(score_dtype(xs.dtype()))?;
        Ok((x, scored))
    }

    /// The router's logits for the tokens `x` (in the scores' dtype).
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        match &self.router_projection {
            Some(w) if x.dtype() == DType::F32 => x.apply(w),
            _ => Self::project(x, &self.router),
        }
    }

    /// `x·Wᵀ` for a router-side weight (`[n, H]`, as stored) in the dtype of `x`.
    fn project(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        x.matmul(&w.to_dtype(x.dtype())?.t()?)
    }

    /// Which experts each token of `xs` (`[.., H]`) goes to, and with what weights.
    ///
    /// # Errors
    /// An input whose last dimension is not the hidden size; candle's errors.
    pub fn route(&self, xs: &Tensor) -> Result<Routing> {
        let logits = self.logits(&self.tokens(xs)?.1)?;
        let (experts, weights) = self.choose(&logits)?;
        // f64 for f64 inputs.
        let weights = weights.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(Routing { experts, weights })
    }

    /// The experts chosen for each token, and their weights `[tokens, k]` (in the scores' dtype,
    /// f32 or f64, computed with candle's ops from `logits`, so that gradients reach the
    /// router).
    fn choose(&self, logits: &Tensor) -> Result<(Vec<Vec<usize>>, Tensor)> {
        let cfg = &self.config;
        let scores = match cfg.scoring {
            Scoring::Softmax => candle_nn::ops::softmax(logits, D::Minus1)?,
            Scoring::Sigmoid => candle_nn::ops::sigmoid(logits)?,
        };
        let host = scores.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let bias = match &self.selection_bias {
            Some(SelectionBias::Fixed(b)) => Some(std::borrow::Cow::Borrowed(b.as_slice())),
            Some(SelectionBias::Variable(b)) => {
                Some(std::borrow::Cow::Owned(b.to_dtype(DType::F32)?.to_vec1()?))
            }
            None => None,
        };
        let chosen: Vec<Vec<usize>> = host
            .iter()
            .map(|s| self.top_k(s, bias.as_deref()))
            .collect();
        // (Expert indices are below `E`, which `validate` bounds.)
        let index: Vec<u32> = chosen.iter().flatten().map(|&e| e as u32).collect();
        let index = Tensor::from_vec(index, (chosen.len(), cfg.top_k), logits.device())?;
        let mut weights = scores.gather(&index, D::Minus1)?;
        if cfg.norm_topk_prob {
            let mut sum = weights.sum_keepdim(D::Minus1)?;
            if cfg.scoring == Scoring::Sigmoid {
                // DeepSeek's guard against a zero sum.
                sum = (sum + 1e-20)?;
            }
            weights = weights.broadcast_div(&sum)?;
        }
        if cfg.routed_scaling_factor != 1.0 {
            weights = (weights * cfg.routed_scaling_factor)?;
        }
        Ok((chosen, weights))
    }

    /// One token's experts from its scores (plus `bias` to choose them), best first (ties: the
    /// lower index).
    fn top_k(&self, scores: &[f32], bias: Option<&[f32]>) -> Vec<usize> {
        let cfg = &self.config;
        let choice: Vec<f32> = match bias {
            Some(bias) => scores.iter().zip(bias).map(|(s, b)| s + b).collect(),
            None => scores.to_vec(),
        };
        if cfg.n_group <= 1 {
            return best(&choice, cfg.top_k);
        }
        let per = choice.len() / cfg.n_group;
        let group_scores: Vec<f32> = choice
            .chunks(per)
            .map(|g| best(g, 2).iter().map(|&j| g[j]).sum())
            .collect();
        let groups = best(&group_scores, cfg.topk_group);
        // Only the chosen groups' experts are candidates (a −∞ mask would let a masked expert
        // win over an allowed one whose score is NaN).
        let candidates: Vec<usize> = (0..choice.len())
            .filter(|&j| groups.contains(&(j / per)))
            .collect();
        let values: Vec<f32> = candidates.iter().map(|&j| choice[j]).collect();
        best(&values, cfg.top_k)
            .into_iter()
            .map(|j| candidates[j])
            .collect()
    }

    /// Each job's expert over its tokens, then the shared expert over all tokens `x` (its
    /// output last). Where the experts are many and their tokens few, the threads are shared
    /// across experts (each expert's kernels on one thread); else each expert in turn uses
    /// them all.
    fn run_experts(&self, jobs: &[(usize, Tensor)], x: &Tensor) -> Result<Vec<Tensor>> {
        let mut work: Vec<(&GluFeedForward, &Tensor)> =
            jobs.iter().map(|(e, xe)| (&self.experts[*e], xe)).collect();
        if let Some(shared) = &self.shared {
            work.push((shared, x));
        }
        if !self.across_experts(&work) {
            return work.iter().map(|(f, xe)| xe.apply(*f)).collect();
        }
        // Most tokens first (the shared expert, which has them all, among the first), so that
        // the last tasks are short; the outputs stay in `work`'s order.
        let mut order: Vec<usize> = (0..work.len()).collect();
        order.sort_by_key(|&j| std::cmp::Reverse(work[j].1.dim(0).unwrap_or(0)));
        let slots: Vec<OnceLock<Result<Tensor>>> = work.iter().map(|_| OnceLock::new()).collect();
        crate::kernels::tasks(work.len(), |task| {
            let (f, xe) = work[order[task]];
            slots[order[task]].get_or_init(|| xe.apply(f));
        });
        slots
            .into_iter()
            .map(|slot| {
                let y = slot.into_inner();
                y.unwrap_or_else(|| Err(candle_core::Error::Msg("an expert did not run".into())))
            })
            .collect()
    }

    /// Whether to share the threads across experts: at least two experts a thread, and either
    /// many (so that they balance) or few tokens each (where one expert's call leaves threads
    /// idle); and every expert on the crate's CPU kernels (candle's ops inside a task could
    /// wait on the pool).
    fn across_experts(&self, work: &[(&GluFeedForward, &Tensor)]) -> bool {
        let threads = crate::kernels::threads();
        let tokens: usize = work.iter().map(|(_, xe)| xe.dim(0).unwrap_or(0)).sum();
        let jobs = work.len();
        threads > 1
            && jobs >= 2 * threads
            && (jobs >= ACROSS_MIN_JOBS_PER_THREAD * threads
                || tokens <= ACROSS_MAX_TOKENS_PER_EXPERT * jobs)
            && work.iter().all(|(f, xe)| f.kernels_only(xe))
    }

    fn forward_impl(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.config.expert.hidden_size;
        let (x, scored) = self.tokens(xs)?;
        let (chosen, weights) = self.choose(&self.logits(&scored)?)?;
        let tokens = x.dim(0)?;
        let dev = x.device();
        if u32::try_from(tokens.saturating_mul(self.config.top_k)).is_err() {
            candle_core::bail!(
                "{tokens} tokens × {} experts each: more routing slots than 2^32",
                self.config.top_k
            )
        }
        // Per expert: its tokens, and the positions of their weights in `weights` (flattened).
        let mut per_expert: Vec<(Vec<u32>, Vec<u32>)> =
            vec![Default::default(); self.experts.len()];
        for (t, experts) in chosen.iter().enumerate() {
            for (slot, &e) in experts.iter().enumerate() {
                per_expert[e].0.push(t as u32);
                per_expert[e].1.push((t * self.config.top_k + slot) as u32);
            }
        }
        let flat_weights = weights.flatten_all()?;
        // Sums in the scores' dtype (f32, or f64 for f64 inputs), rounded once at the end.
        let acc = score_dtype(xs.dtype());
        // The experts with tokens, each with its tokens gathered once (every token, in order, as
        // in decode: no gather), in the experts' order, which is the order their outputs are
        // added in (as transformers adds them) whatever order they run in.
        let mut jobs = Vec::new();
        for (e, (toks, _)) in per_expert.iter().enumerate() {
            if toks.len() == tokens && tokens > 0 {
                jobs.push((e, x.clone()));
            } else if !toks.is_empty() {
                jobs.push((e, x.index_select(&Tensor::new(toks.as_slice(), dev)?, 0)?));
            }
        }
        let outputs = self.run_experts(&jobs, &x)?;
        let tracked = weights.track_op() || outputs.iter().any(Tensor::track_op);
        let mut outputs = outputs.into_iter();
        let mut y = if dev.is_cpu() && acc == DType::F32 && !tracked {
            // On the host, each output row added once into its token's sums: candle's
            // `index_add` would copy all the sums for every expert.
            let w: Vec<f32> = flat_weights.to_vec1()?;
            let mut y = vec![0f32; tokens * h];
            for ((e, _), ye) in jobs.iter().zip(outputs.by_ref()) {
                let ye: Vec<f32> = ye.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let (toks, slots) = &per_expert[*e];
                for ((&t, &slot), row) in toks.iter().zip(slots).zip(ye.chunks_exact(h)) {
                    let (t, w) = (t as usize, w[slot as usize]);
                    for (sum, v) in y[t * h..(t + 1) * h].iter_mut().zip(row) {
                        *sum += w * v;
                    }
                }
            }
            Tensor::from_vec(y, (tokens, h), dev)?
        } else {
            let mut y = Tensor::zeros((tokens, h), acc, dev)?;
            for ((e, _), ye) in jobs.iter().zip(outputs.by_ref()) {
                let (toks, slots) = &per_expert[*e];
                let w = flat_weights.index_select(&Tensor::new(slots.as_slice(), dev)?, 0)?;
                let ye = ye.to_dtype(acc)?.broadcast_mul(&w.unsqueeze(1)?)?;
                y = y.index_add(&Tensor::new(toks.as_slice(), dev)?, &ye, 0)?;
            }
            y
        };
        if let Some(s) = outputs.next() {
            let mut s = s.to_dtype(acc)?;
            if let Some(gate) = &self.shared_gate {
                let g = Self::project(&scored, gate)?;
                s = s.broadcast_mul(&candle_nn::ops::sigmoid(&g)?)?;
            }
            y = (y + s)?;
        }
        y.to_dtype(xs.dtype())?.reshape(xs.shape())
    }
}

/// What a configuration's source calls the routing fields [`MoeConfig::check`] names in its
/// messages: transformers' `config.json` keys, or a GGUF file's metadata keys.
pub(crate) struct ConfigKeys<'a> {
    pub(crate) top_k: &'a str,
    pub(crate) n_group: &'a str,
    pub(crate) topk_group: &'a str,
    pub(crate) scaling: &'a str,
}

impl ConfigKeys<'static> {
    /// transformers' names.
    pub(crate) const HF: Self = Self {
        top_k: "num_experts_per_tok",
        n_group: "n_group",
        topk_group: "topk_group",
        scaling: "routed_scaling_factor",
    };
}

/// Up to this many tokens per expert on average, the threads are shared across experts
/// (measured, Xeon with AMX, 2 threads: Qwen3-MoE's layer in bf16 1.05-1.15× faster from 1 to
/// 512 tokens; Mixtral's at 128 tokens, 8 experts of 32 tokens, 1.05× slower).
const ACROSS_MAX_TOKENS_PER_EXPERT: usize = 16;
/// From this many experts with tokens per thread, they are shared whatever their tokens.
const ACROSS_MIN_JOBS_PER_THREAD: usize = 8;

/// The dtype the router's scores are computed in: f32, as transformers computes them, or f64
/// for f64 inputs.
fn score_dtype(input: DType) -> DType {
    if input == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Where expert `x` of `e` failed to load and none of its weights is stored: an error that names
/// its gate weight and the experts the checkpoint does store (a router of more experts than
/// stored, or a checkpoint cut short). `None` where some of its weights are there (their own
/// error says which is missing).
fn missing_expert(vb: &VarBuilder, layout: WeightLayout, e: usize, x: usize) -> Option<Error> {
    let names = layout.names().all();
    let weight = |j: usize, n: &str| format!("experts.{j}.{n}.weight");
    let stored = |j: usize| names.iter().any(|n| vb.contains_tensor(&weight(j, n)));
    if stored(x) {
        return None;
    }
    Some(Error::MissingExpert {
        name: crate::layout::join(&vb.prefix(), &weight(x, names[0])),
        expert: x,
        num_experts: e,
        stored: (0..e).filter(|&j| stored(j)).collect(),
    })
}

/// The indices of the `k` largest values, largest first; ties to the lower index; NaN last.
fn best(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (values[a], values[b]);
        y.partial_cmp(&x)
            .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
            .then(a.cmp(&b))
    });
    order.truncate(k);
    order
}

impl Module for GluExperts {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_impl(xs)
    }
}

#[cfg(test)]
mod tests {
    use super::best;

    #[test]
    fn top_k_ties_go_to_the_lower_index_and_nan_is_never_chosen() {
        // torch.topk([0.2, 0.5, 0.5, 0.1, 0.5], 2) gives indices [1, 2]: equals in index order.
        assert_eq!(best(&[0.2, 0.5, 0.5, 0.1, 0.5], 2), [1, 2]);
        assert_eq!(best(&[0.2, 0.5, 0.5, 0.1, 0.5], 4), [1, 2, 4, 0]);
        assert_eq!(best(&[1.0; 4], 3), [0, 1, 2]);
        // −0.0 and 0.0 compare equal, so index order decides.
        assert_eq!(best(&[-0.0, 0.0], 1), [0]);
        // A NaN is ranked below every number (torch ranks it above), and NaNs among
        // themselves by index.
        assert_eq!(best(&[f32::NAN, 0.1, f32::NAN, -1.0], 3), [1, 3, 0]);
        assert_eq!(best(&[f32::NEG_INFINITY, f32::NAN], 1), [0]);
    }
}
