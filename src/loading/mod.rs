//! From bytes on disk to a [`GluFeedForward`]: safetensors files, checkpoint directories,
//! sharded indexes, GGUF files and Hugging Face Hub repositories.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use candle_glu::loading::{Checkpoint, LoadOptions};
//! # fn main() -> candle_glu::Result<()> {
//! // A directory as transformers writes it: config.json + model.safetensors (or an index).
//! let ckpt = Checkpoint::open("weights")?;
//! let cfg = ckpt.config().cloned().expect("config.json");
//! let opts = LoadOptions::new(DType::BF16, Device::Cpu);
//! let ffn = ckpt.load_layer(&cfg, 15, &opts)?;
//! # Ok(()) }
//! ```

// Unsafe code lives in `host` alone (the views of a buffer as candle's blocks).
#![deny(unsafe_code)]

mod gguf;
mod host;
#[cfg(feature = "hub")]
pub mod hub;
mod safetensors;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

pub use self::gguf::GgufStore;
use self::safetensors::SafetensorsStore;
use crate::layout::{closest_names, join, GateUpNames};
use crate::{
    Error, GluConfig, GluExperts, GluFeedForward, MoeConfig, Projection, Result, WeightLayout,
};

/// The file formats a [`Checkpoint`] can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileFormat {
    /// One or more safetensors files.
    Safetensors,
    /// A llama.cpp GGUF file.
    Gguf,
}

/// How to materialise a block's weights.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoadOptions {
    /// The dtype weights are computed in (f32, f16, bf16 or f64: the loaders refuse others);
    /// they are converted from whatever is stored.
    pub dtype: DType,
    /// Where the weights go.
    pub device: Device,
    /// GGUF only: keep block-quantized weights quantized, in candle's `QMatMul` (f32
    /// activations), instead of dequantizing them to `dtype`; on the CPU, the block multiplies
    /// Q4_1, q8_0 and q4k itself, reading the blocks in place (see [`crate::Projection`]).
    /// Default `true`. Tensors stored as F32, F16 or BF16 are dense weights in `dtype` either
    /// way (candle's `QMatMul` would widen them to f32 and skip the crate's fused kernels). A Q4_1, Q5_0 or Q5_1
    /// weight whose rows hold an odd number of 32-value blocks is dequantized to f32 all the same:
    /// candle 0.11.1's kernels for them assert an even number (a panic in debug builds).
    /// Quantized weights are constants: a backward pass gives the input's gradient (over the
    /// weights dequantized for that pass), not theirs.
    pub quantized: bool,
}

impl LoadOptions {
    /// Weights in `dtype` on `device`; block-quantized GGUF weights stay quantized.
    pub fn new(dtype: DType, device: Device) -> Self {
        Self {
            dtype,
            device,
            quantized: true,
        }
    }

    /// Sets whether block-quantized GGUF weights stay quantized.
    pub fn with_quantized(mut self, quantized: bool) -> Self {
        self.quantized = quantized;
        self
    }

    /// Refuses a dtype the layers cannot compute in (integers, FP8).
    fn check(&self) -> Result<()> {
        if crate::activation::computes_in(self.dtype) {
            return Ok(());
        }
        Err(Error::InvalidConfig {
            path: None,
            message: format!(
                "the load dtype is {:?}, expected f32, f16, bf16 or f64",
                self.dtype
            ),
        })
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::new(DType::F32, Device::Cpu)
    }
}

#[derive(Debug, Clone)]
enum Store {
    Safetensors(Arc<SafetensorsStore>),
    Gguf(Arc<GgufStore>),
}

/// An opened checkpoint: its tensor table, and its config when it has one.
///
/// Headers are read when it is opened; tensor data only when a block is loaded.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    /// The directory of the weights, where a `config.json` would be.
    dir: PathBuf,
    store: Store,
    config: Option<GluConfig>,
    num_layers: Option<usize>,
}

impl Checkpoint {
    /// Opens a checkpoint: a safetensors file, a `model.safetensors.index.json`, a `.gguf` file,
    /// or a directory holding `model.safetensors` (taken before an index beside it, as
    /// transformers takes it), `model.safetensors.index.json`, or else exactly one `.safetensors`
    /// or `.gguf` file of any name. A `config.json` beside the weights is read too.
    ///
    /// # Errors
    /// A path that does not exist, a directory without weights, a file that is not a valid
    /// safetensors, index or GGUF file, or an invalid `config.json`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (weights, dir) = if meta.is_dir() {
            (find_weights(path)?, path.to_path_buf())
        } else if !meta.is_file() {
            // A FIFO or a device would block or never end.
            return Err(Error::InvalidFile {
                path: path.to_path_buf(),
                message: "not a regular file or a directory".into(),
            });
        } else {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            (path.to_path_buf(), dir)
        };
        let name = weights.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "config.json" {
            return Err(Error::InvalidFile {
                path: weights,
                message: "this is a config, not weights: pass the directory that holds it".into(),
            });
        }
        let store = if name.ends_with(".json") {
            Store::Safetensors(Arc::new(SafetensorsStore::open_index(&weights)?))
        } else if name.ends_with(".gguf") || has_gguf_magic(&weights) {
            Store::Gguf(Arc::new(GgufStore::open(&weights)?))
        } else {
            Store::Safetensors(Arc::new(SafetensorsStore::open_file(&weights)?))
        };
        let (config, num_layers) = match &store {
            Store::Gguf(g) => (g.config(), g.num_layers()),
            Store::Safetensors(_) => {
                let config_path = dir.join("config.json");
                if config_path.is_file() {
                    let cfg = GluConfig::from_hf_config_file(&config_path)?;
                    (Some(cfg), crate::config::num_layers_in_file(&config_path)?)
                } else {
                    (None, None)
                }
            }
        };
        Ok(Self {
            path: weights,
            dir,
            store,
            config,
            num_layers,
        })
    }

    /// Downloads a model repository from the Hugging Face Hub (or finds it in the local cache)
    /// and opens it; see [`hub::fetch_model`].
    ///
    /// # Errors
    /// As [`hub::fetch_model`] and [`open`](Self::open).
    #[cfg(feature = "hub")]
    pub fn from_hub(repo_id: &str, opts: &hub::HubOptions) -> Result<Self> {
        Self::open(hub::fetch_model(repo_id, opts)?)
    }

    /// The weights file (or index) that was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file format.
    pub fn format(&self) -> FileFormat {
        match self.store {
            Store::Safetensors(_) => FileFormat::Safetensors,
            Store::Gguf(_) => FileFormat::Gguf,
        }
    }

    /// The GGUF file, for its metadata (tokenizer, hyperparameters) and quantized tensors; `None`
    /// for safetensors checkpoints.
    pub fn gguf(&self) -> Option<&GgufStore> {
        match &self.store {
            Store::Gguf(g) => Some(g),
            Store::Safetensors(_) => None,
        }
    }

    /// The block config from `config.json`, or from a GGUF file's metadata.
    pub fn config(&self) -> Option<&GluConfig> {
        self.config.as_ref()
    }

    /// The model's number of layers, from `config.json` or GGUF metadata, when it says.
    pub fn num_layers(&self) -> Option<usize> {
        self.num_layers
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        match &self.store {
            Store::Safetensors(s) => s.names().collect(),
            Store::Gguf(g) => g.names(),
        }
    }

    /// A tensor's stored shape, PyTorch order.
    pub fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        match &self.store {
            Store::Safetensors(s) => s.shape(name),
            Store::Gguf(g) => g.shape(name),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.tensor_shape(name).is_some()
    }

    /// The layout whose weights all exist under `prefix` (layouts tried in the order of
    /// [`WeightLayout::ALL`]).
    pub fn detect_layout(&self, prefix: &str) -> Option<WeightLayout> {
        WeightLayout::detect_by(|name| self.contains(&join(prefix, name)))
    }

    /// The layers whose FFN weights exist in `layout`'s naming, sorted.
    pub fn layers(&self, layout: WeightLayout) -> Vec<usize> {
        let mut layers: Vec<usize> = self
            .tensor_names()
            .iter()
            .filter_map(|n| layout.layer_of(n))
            .filter(|&l| self.contains(&gate_name(layout, l)))
            .collect();
        layers.sort_unstable();
        layers.dedup();
        layers
    }

    /// The sizes of the block under `prefix`, read off its weights' shapes, and whether it has
    /// biases; σ is `activation`. For checkpoints without a `config.json`.
    ///
    /// # Errors
    /// A missing gate (or fused gate-up) weight, or one that is not a matrix, has an odd row
    /// count where fused, or gives a size of 0 (the other weights' shapes are checked when the
    /// block is loaded).
    pub fn infer_config(
        &self,
        prefix: &str,
        layout: WeightLayout,
        activation: crate::Activation,
    ) -> Result<GluConfig> {
        // The first weight (the gate, or the fused gate-up) has `rows_per_i` rows per unit of
        // the intermediate size and the hidden size as columns.
        let (gate, [rows_per_i, _]) = layout.projection_shapes(1, 1)[0];
        let gate = join(prefix, &format!("{gate}.weight"));
        let shape = self.require(&gate)?;
        let [rows, hidden] = shape[..] else {
            return Err(Error::InvalidFile {
                path: self.path.clone(),
                message: format!(
                    "tensor `{gate}` has shape {shape:?}, expected a matrix [rows, hidden size]"
                ),
            });
        };
        if rows % rows_per_i != 0 {
            return Err(Error::InvalidFile {
                path: self.path.clone(),
                message: format!(
                    "tensor `{gate}` has {rows} rows, an odd number: a fused gate-up projection \
                     stacks the gate and up weights, 2 × intermediate size rows"
                ),
            });
        }
        crate::config::validate_sizes(hidden, rows / rows_per_i, Some(&self.path), None)?;
        let bias = self.contains(&join(prefix, &format!("{}.bias", layout.names().down)));
        Ok(GluConfig::new(hidden, rows / rows_per_i)
            .with_activation(activation)
            .with_bias(bias)
            .with_layout(layout))
    }

    fn require(&self, name: &str) -> Result<&[usize]> {
        self.tensor_shape(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            found: closest_names(name, self.tensor_names()),
        })
    }

    /// A `VarBuilder` over every tensor, converted to `dtype` on `device` (GGUF tensors are
    /// dequantized). Tensors are read when the builder is asked for them.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = match &self.store {
            Store::Safetensors(s) => Box::new(Lazy(s.clone())),
            Store::Gguf(g) => Box::new(Lazy(g.clone())),
        };
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// Loads the linear layer `name` (e.g. `model.layers.0.self_attn.q_proj`, or
    /// `blk.0.attn_q` in a GGUF): `{name}.weight` (`[out, in]`) and `{name}.bias` where the
    /// checkpoint has one. Block-quantized GGUF weights stay quantized, read in place by
    /// [`Projection`]'s kernels, unless `opts.quantized` is false (F32, F16 and BF16 ones are
    /// dense in `opts.dtype`); every other weight (and every
    /// bias of a dense one) is read in `opts.dtype`; the bias of a quantized one in f32.
    ///
    /// ```no_run
    /// use candle_core::{Device, Module, Tensor};
    /// use candle_glu::loading::{Checkpoint, LoadOptions};
    /// # fn main() -> anyhow::Result<()> {
    /// let ckpt = Checkpoint::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
    /// let q_proj = ckpt.load_projection("blk.0.attn_q", &LoadOptions::default())?; // Q4_1, in place
    /// let y = q_proj.forward(&Tensor::zeros((1, 576), candle_core::DType::F32, &Device::Cpu)?)?;
    /// assert_eq!(y.dims(), [1, 576]);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// A missing weight (with the closest names that exist), one that is not a matrix, or a bias
    /// whose length is not its rows.
    pub fn load_projection(&self, name: &str, opts: &LoadOptions) -> Result<Projection> {
        opts.check()?;
        let (weight, bias) = (join(name, "weight"), join(name, "bias"));
        let Some(shape) = self.tensor_shape(&weight) else {
            return Err(Error::MissingTensor {
                found: crate::layout::nearby_names(&weight, |n| self.contains(n)),
                name: weight,
            });
        };
        let [out, inp] = *shape else {
            return Err(Error::InvalidProjection {
                message: format!("tensor `{weight}` has shape {shape:?}, expected [out, in]"),
            });
        };
        if out == 0 || inp == 0 {
            return Err(Error::InvalidProjection {
                message: format!(
                    "tensor `{weight}` has shape {shape:?}: a projection needs rows and columns"
                ),
            });
        }
        if let Some(found) = self.tensor_shape(&bias) {
            if found != [out] {
                return Err(Error::ShapeMismatch {
                    name: bias,
                    expected: vec![out],
                    found: found.to_vec(),
                });
            }
        }
        let has_bias = self.contains(&bias);
        match &self.store {
            Store::Gguf(g) if opts.quantized && !g.is_float(&weight) => {
                let b = match has_bias {
                    true => Some(g.dequantized(&bias, DType::F32, &opts.device)?),
                    false => None,
                };
                let q = Arc::new(g.qtensor(&weight, &opts.device)?);
                Ok(Projection::from_qtensor(q, b)?)
            }
            _ => {
                let vb = self.var_builder(opts.dtype, &opts.device).pp(name);
                Ok(Projection::load(inp, out, has_bias, vb)?)
            }
        }
    }

    /// Loads the block whose weights are under `prefix` (e.g. `model.layers.3.mlp`).
    ///
    /// # Errors
    /// A missing tensor (with the closest names that exist), a wrong shape, biases that do not
    /// agree with `cfg`, a quantized GGUF block with biases.
    pub fn load_ffn(
        &self,
        cfg: &GluConfig,
        prefix: &str,
        opts: &LoadOptions,
    ) -> Result<GluFeedForward> {
        cfg.validate()?;
        opts.check()?;
        self.check_shapes(cfg, prefix)?;
        // A block stored as F32/F16/BF16 is not quantized: dense weights in `opts.dtype`.
        let float = |g: &GgufStore| {
            let names = cfg.layout.names().all();
            names
                .iter()
                .all(|n| g.is_float(&join(prefix, &format!("{n}.weight"))))
        };
        match &self.store {
            Store::Gguf(g) if opts.quantized && !float(g) => {
                let load = |name: &str| {
                    let qt = g.qtensor(&join(prefix, &format!("{name}.weight")), &opts.device)?;
                    gguf_projection(qt, opts)
                };
                let GateUpNames::Split { gate, up } = cfg.layout.names().gate_up else {
                    return Err(Error::InvalidConfig {
                        path: None,
                        message: "a quantized GGUF block needs split gate and up tensors".into(),
                    });
                };
                let down = cfg.layout.names().down;
                // Biases in the file would be left out: refused, rather than dropped (and before
                // `cfg.bias`, whose advice would otherwise lead here).
                let biases = self.present(prefix, &[gate, up, down].map(|n| format!("{n}.bias")));
                if !biases.is_empty() {
                    return Err(Error::Bias {
                        message: format!(
                            "the file has biases ({biases}), which quantized GGUF blocks do not \
                             load; load the block dequantized (`with_quantized(false)`) with \
                             bias = true"
                        ),
                    });
                }
                if cfg.bias {
                    return Err(Error::Bias {
                        message: "quantized GGUF blocks have no biases; use bias = false".into(),
                    });
                }
                Ok(GluFeedForward::from_projections(
                    cfg,
                    load(gate)?,
                    load(up)?,
                    load(down)?,
                )?)
            }
            _ => {
                let vb = self.var_builder(opts.dtype, &opts.device);
                GluFeedForward::build(cfg, vb.pp(prefix))
            }
        }
    }

    /// Those of `names` under `prefix` that the checkpoint holds, each quoted, comma-separated
    /// (empty if none).
    fn present(&self, prefix: &str, names: &[String]) -> String {
        names
            .iter()
            .map(|n| join(prefix, n))
            .filter(|n| self.contains(n))
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every weight of the block exists with the shape `cfg` implies: checked on the tensor table
    /// before any data is read, so a wrong shape never costs a read or an allocation.
    fn check_shapes(&self, cfg: &GluConfig, prefix: &str) -> Result<()> {
        let expected = cfg
            .layout
            .projection_shapes(cfg.hidden_size, cfg.intermediate_size);
        for (name, shape) in expected {
            self.require_shape(&join(prefix, &format!("{name}.weight")), &shape)?;
        }
        Ok(())
    }

    /// That `name` exists with shape `expected`: a missing tensor (with the closest names that
    /// exist) or a shape mismatch otherwise.
    fn require_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let found = self.require(name)?;
        if found != expected {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    /// The config of the model's mixture-of-experts layers, or `None` for a dense model: from a
    /// `config.json` beside safetensors weights whose `model_type` is one of
    /// [`MoeConfig::MODEL_TYPES`], or from a GGUF file's metadata
    /// ([`GgufStore::moe_config`]).
    ///
    /// # Errors
    /// A `config.json` of a mixture-of-experts `model_type` with a missing or malformed field,
    /// or GGUF metadata with experts that [`GgufStore::moe_config`] refuses.
    pub fn moe_config(&self) -> Result<Option<MoeConfig>> {
        match &self.store {
            Store::Gguf(g) => g.moe_config(),
            Store::Safetensors(_) => {
                let path = self.dir.join("config.json");
                if !path.is_file() {
                    return Ok(None);
                }
                let text = crate::files::read_json_text(&path, crate::config::MAX_CONFIG_BYTES)?;
                let model_type = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("model_type")?.as_str().map(str::to_string));
                match model_type {
                    Some(t) if MoeConfig::MODEL_TYPES.contains(&t.as_str()) => {
                        MoeConfig::parse(&text, Some(&path)).map(Some)
                    }
                    _ => Ok(None),
                }
            }
        }
    }

    /// The layers that hold a mixture of experts, sorted: a router at
    /// [`MoeConfig::layer_prefix`] (`blk.N.ffn_gate_inp` in GGUF files).
    pub fn moe_layers(&self, cfg: &MoeConfig) -> Vec<usize> {
        let mut layers: Vec<usize> = self
            .tensor_names()
            .iter()
            .filter_map(|n| n.split('.').find_map(|p| p.parse::<usize>().ok()))
            .filter(|&l| self.contains(&self.router_name(cfg.expert.layout, l)))
            .collect();
        layers.sort_unstable();
        layers.dedup();
        layers
    }

    /// Layer `layer`'s router where experts in `layout` keep it: GGUF names are llama.cpp's
    /// whatever the layout says.
    fn router_name(&self, layout: WeightLayout, layer: usize) -> String {
        match &self.store {
            Store::Gguf(_) => format!("blk.{layer}.ffn_gate_inp.weight"),
            Store::Safetensors(_) => join(&crate::moe::layer_prefix(layout, layer), "gate.weight"),
        }
    }

    /// The layers of a mixture-of-experts model whose FFN is dense, sorted: DeepSeek's first
    /// `first_k_dense_replace` (llama.cpp's `leading_dense_block_count`), Qwen2-MoE's
    /// `mlp_only_layers`. A layer is dense where it has no router and a gated FFN at the dense
    /// prefix of the experts' layout ([`WeightLayout::Llama`]'s `model.layers.N.mlp`, GGUF's
    /// `blk.N.ffn_*`; [`load_layer`](Self::load_layer) loads it). Mixtral has none.
    pub fn moe_dense_layers(&self, cfg: &MoeConfig) -> Vec<usize> {
        self.dense_layers_besides(cfg, &self.moe_layers(cfg))
    }

    /// [`moe_dense_layers`](Self::moe_dense_layers) given the layers with experts, `moe`.
    fn dense_layers_besides(&self, cfg: &MoeConfig, moe: &[usize]) -> Vec<usize> {
        let layout = match (&self.store, cfg.expert.layout) {
            (Store::Gguf(_), _) => WeightLayout::Gguf,
            (Store::Safetensors(_), WeightLayout::Mixtral) => return Vec::new(),
            (Store::Safetensors(_), _) => WeightLayout::Llama,
        };
        self.layers(layout)
            .into_iter()
            .filter(|l| !moe.contains(l))
            .collect()
    }

    /// Loads layer `layer`'s mixture of experts ([`GluExperts`]). Safetensors: as
    /// [`GluExperts::new`] at [`MoeConfig::layer_prefix`], in `opts.dtype`. GGUF: the router
    /// (`blk.N.ffn_gate_inp`, and `exp_probs_b`), the experts stacked in `ffn_gate_exps`,
    /// `ffn_up_exps` and `ffn_down_exps` (or `ffn_gate_up_exps`), the shared expert
    /// (`ffn_*_shexp`, and `ffn_gate_inp_shexp`); on the CPU each stacked tensor is read once
    /// into one buffer and its experts are views of it (on a GPU each expert is read and sent
    /// on its own), kept quantized as stored (so the crate's kernels read its blocks in place),
    /// or dequantized to `opts.dtype` when `opts.quantized` is false or they are stored as
    /// F32, F16 or BF16. The router is read as
    /// f32. Expert biases in the file (`ffn_*_exps.bias`, `ffn_*_shexp.bias`) are refused: the
    /// experts have none.
    ///
    /// # Errors
    /// A layer without experts (the message lists those that have them, and says where the
    /// layer is dense: [`Error::DenseLayer`]), a missing tensor (with the closest names that
    /// exist), a wrong shape (checked before any data is read).
    pub fn load_experts(
        &self,
        cfg: &MoeConfig,
        layer: usize,
        opts: &LoadOptions,
    ) -> Result<GluExperts> {
        cfg.validate()?;
        opts.check()?;
        let present = self.moe_layers(cfg);
        if !present.contains(&layer) && self.dense_layers_besides(cfg, &present).contains(&layer) {
            return Err(Error::DenseLayer {
                layer,
                moe_layers: present,
            });
        }
        if !present.contains(&layer) {
            return Err(Error::LayerOutOfRange {
                layer,
                num_layers: self.num_layers,
                present,
                looked_for: self.router_name(cfg.expert.layout, layer),
            });
        }
        match &self.store {
            Store::Gguf(g) => self.gguf_experts(g, cfg, layer, opts),
            Store::Safetensors(_) => {
                let vb = self.var_builder(opts.dtype, &opts.device);
                GluExperts::build(cfg, vb.pp(cfg.layer_prefix(layer)))
            }
        }
    }

    /// [`load_experts`](Self::load_experts) from a GGUF file: every shape checked on the table
    /// before any data is read.
    fn gguf_experts(
        &self,
        g: &GgufStore,
        cfg: &MoeConfig,
        layer: usize,
        opts: &LoadOptions,
    ) -> Result<GluExperts> {
        let (h, i, e) = (
            cfg.expert.hidden_size,
            cfg.expert.intermediate_size,
            cfg.num_experts,
        );
        let name = |n: &str| format!("blk.{layer}.{n}.weight");
        let checked = |n: &str, shape: &[usize]| -> Result<String> {
            let n = name(n);
            self.require_shape(&n, shape)?;
            Ok(n)
        };
        let router = checked("ffn_gate_inp", &[e, h])?;
        let fused = self.contains(&name("ffn_gate_up_exps"));
        // Gate and up: each its own stack, or the rows of the fused one (gate rows first).
        let gate_up = if fused {
            Err(checked("ffn_gate_up_exps", &[e, 2 * i, h])?)
        } else {
            Ok([
                checked("ffn_gate_exps", &[e, i, h])?,
                checked("ffn_up_exps", &[e, i, h])?,
            ])
        };
        let down = checked("ffn_down_exps", &[e, h, i])?;
        // The experts have no biases: any in the file would be dropped, so they are refused.
        let bias_names = ["gate_exps", "up_exps", "gate_up_exps", "down_exps"]
            .into_iter()
            .chain(["gate_shexp", "up_shexp", "down_shexp"])
            .map(|n| format!("ffn_{n}.bias"));
        let biases = self.present(&format!("blk.{layer}"), &bias_names.collect::<Vec<_>>());
        if !biases.is_empty() {
            return Err(Error::Bias {
                message: format!(
                    "the file has expert biases ({biases}), which this crate's experts do not have"
                ),
            });
        }
        let bias = format!("blk.{layer}.exp_probs_b.bias");
        if cfg.selection_bias {
            self.require_shape(&bias, &[e])?;
        }
        let shared = match cfg.shared_intermediate_size {
            Some(si) => Some((
                si,
                [
                    checked("ffn_gate_shexp", &[si, h])?,
                    checked("ffn_up_shexp", &[si, h])?,
                    checked("ffn_down_shexp", &[h, si])?,
                ],
            )),
            None => None,
        };
        let shared_gate = if cfg.shared_expert_gate {
            Some(checked("ffn_gate_inp_shexp", &[h])?)
        } else {
            None
        };

        let dev = &opts.device;
        // One stack per part asked (`stacked_qtensors` gives exactly that many).
        let stacks =
            |n: &str, parts| -> Result<_> { Ok(g.stacked_qtensors(n, parts, dev)?.into_iter()) };
        let (gates, ups) = match &gate_up {
            Ok([gate, up]) => (stacks(gate, 1)?.next(), stacks(up, 1)?.next()),
            Err(fused) => {
                let mut halves = stacks(fused, 2)?;
                (halves.next(), halves.next())
            }
        };
        let (gates, ups) = (gates.unwrap_or_default(), ups.unwrap_or_default());
        let downs = stacks(&down, 1)?.next().unwrap_or_default();
        let expert_cfg = cfg.expert.clone().with_bias(false);
        let experts = gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .map(|((wg, wu), wd)| {
                let [wg, wu, wd] = [wg, wu, wd].map(|q| gguf_projection(q, opts));
                Ok(GluFeedForward::from_projections(
                    &expert_cfg,
                    wg?,
                    wu?,
                    wd?,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = match shared {
            Some((si, names)) => {
                let shared_cfg = GluConfig::new(h, si)
                    .with_activation(cfg.expert.activation)
                    .with_layout(WeightLayout::Gguf);
                let [wg, wu, wd] = names.map(|n| gguf_projection(g.qtensor(&n, dev)?, opts));
                Some(GluFeedForward::from_projections(
                    &shared_cfg,
                    wg?,
                    wu?,
                    wd?,
                )?)
            }
            None => None,
        };
        let f32 = |n: &str| g.dequantized(n, DType::F32, dev);
        let shared_gate = match shared_gate {
            Some(n) => Some(f32(&n)?.reshape((1, h))?),
            None => None,
        };
        let bias = if cfg.selection_bias {
            Some(f32(&bias)?)
        } else {
            None
        };
        let router = f32(&router)?;
        GluExperts::assemble(cfg, router, bias, experts, shared, shared_gate)
    }

    /// Loads layer `layer`'s block, at `cfg.layout`'s prefix for it.
    ///
    /// # Errors
    /// A layer that is not in the checkpoint (the message lists those that are); a layer whose
    /// FFN is a mixture of experts, with a router ([`Error::MoeLayer`]: in the Mixtral layout
    /// the layer's prefix is its expert 0, which alone is not the layer); else as
    /// [`load_ffn`](Self::load_ffn).
    pub fn load_layer(
        &self,
        cfg: &GluConfig,
        layer: usize,
        opts: &LoadOptions,
    ) -> Result<GluFeedForward> {
        // From the tensors, whatever the config says (or whether there is one).
        let router = self.router_name(cfg.layout, layer);
        if self.contains(&router) {
            return Err(Error::MoeLayer { layer, router });
        }
        let present = self.layers(cfg.layout);
        if !present.contains(&layer) {
            return Err(Error::LayerOutOfRange {
                layer,
                num_layers: self.num_layers,
                present,
                looked_for: gate_name(cfg.layout, layer),
            });
        }
        self.load_ffn(cfg, &cfg.layout.layer_prefix(layer), opts)
    }
}

/// Layer `layer`'s gate weight (or fused gate-up) as `layout` names it: the tensor that marks a
/// layer as present.
fn gate_name(layout: WeightLayout, layer: usize) -> String {
    format!(
        "{}.{}.weight",
        layout.layer_prefix(layer),
        layout.names().all()[0]
    )
}

/// A GGUF weight as a projection: kept quantized, or dequantized to `opts.dtype` where
/// `opts.quantized` is false.
fn gguf_projection(q: candle_core::quantized::QTensor, opts: &LoadOptions) -> Result<Projection> {
    // A float tensor (llama.cpp's F16/BF16/F32 conversions) is not quantized: as dense weights
    // it runs on the crate's fused kernels, where candle's `QMatMul` would widen it to f32.
    Ok(if opts.quantized && !gguf::is_float_type(q.dtype()) {
        Projection::quantized(crate::projection::qmatmul(Arc::new(q))?, None)
    } else {
        let w = q.dequantize(&opts.device)?.to_dtype(opts.dtype)?;
        Projection::Dense(candle_nn::Linear::new(w, None))
    })
}

/// The weights file inside a checkpoint directory: the single file before the index, as
/// transformers (and `hub::fetch_model`) take them where both are there.
fn find_weights(dir: &Path) -> Result<PathBuf> {
    for name in ["model.safetensors", "model.safetensors.index.json"] {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut candidates: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "safetensors" || e == "gguf")
        })
        .collect();
    candidates.sort();
    match candidates.len() {
        1 => Ok(candidates.remove(0)),
        0 => Err(Error::InvalidFile {
            path: dir.to_path_buf(),
            message: "the directory holds no model.safetensors, model.safetensors.index.json, \
                      other .safetensors or .gguf file"
                .into(),
        }),
        _ => Err(Error::InvalidFile {
            path: dir.to_path_buf(),
            message: format!(
                "the directory holds several weight files and no index: {}; pass one of them",
                candidates
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

fn has_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// A name that stays inside the snapshot directory: one normal path component, no separators
/// of any platform, not `.` or `..`, not absolute, no control character (NUL included).
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    !name.is_empty()
        && !name.contains(['/', '\\', ':'])
        // Control characters (a newline would split an error message in two; NUL a path).
        && !name.chars().any(char::is_control)
        && matches!(components.next(), Some(Component::Normal(_)))
        && components.next().is_none()
        && name != "."
        && name != ".."
}

/// A store whose tensors are read on demand: the safetensors shards and the GGUF file.
trait LazyStore: Send + Sync + 'static {
    /// A tensor's stored shape, PyTorch order.
    fn stored_shape(&self, name: &str) -> Option<&[usize]>;
    /// Reads a tensor as a float tensor of `dtype` on `device`.
    fn read(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor>;
}

/// A [`LazyStore`] as a `VarBuilder` backend: every tensor read when asked for, its stored shape
/// checked first.
struct Lazy<S>(Arc<S>);

impl<S: LazyStore> candle_nn::var_builder::SimpleBackend for Lazy<S> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.0.stored_shape(name) {
            Some(found) if found != shape.dims() => Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.dims().to_vec(),
                found: found.to_vec(),
            }
            .into()),
            _ => Ok(self.0.read(name, dtype, dev)?),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Ok(self.0.read(name, dtype, dev)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.stored_shape(name).is_some()
    }
}
