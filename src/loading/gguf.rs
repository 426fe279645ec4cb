//! GGUF files (llama.cpp): metadata, and tensors kept quantized or dequantized.
//!
//! The header (metadata and tensor table) is read here, not by candle's `Content::read`, because
//! a file from a stranger must give an error, never a panic or an unbounded allocation: candle
//! 0.11.1 divides by `general.alignment` unchecked (0 panics), multiplies tensor dimensions
//! unchecked, and refuses a whole file for one tensor of a type it cannot read. Every length here
//! is checked against the bytes left in the file before anything is allocated, every tensor's
//! data against the file's end, and the result is handed to candle as its own [`Content`], whose
//! tensor reader then only ever sees a checked table.
//!
//! candle's convention is kept: GGUF's `[in, out]` dimension order is reversed into PyTorch's
//! `[out, in]`, so FFN weights need no transpose.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Shape, Tensor};

use super::host::{self, HostBuffer};
use crate::{Activation, Error, GluConfig, Result, WeightLayout};

/// The most values all metadata arrays may hold together. Each costs about 32 bytes in memory
/// whatever its size on disk, so this bounds the metadata to about 512 MiB; real tokenizers hold
/// a few hundred thousand.
pub(crate) const MAX_METADATA_VALUES: u64 = 1 << 24;

/// The longest string accepted, as in llama.cpp (`GGUF_MAX_STRING_LENGTH`).
const MAX_STRING_BYTES: u64 = 1 << 30;
/// The most dimensions a tensor may have, as in ggml (`GGML_MAX_DIMS`).
const MAX_TENSOR_DIMS: u32 = 4;
/// How deeply arrays may nest.
const MAX_DEPTH: usize = 8;
/// The data alignment when `general.alignment` is absent, as in the GGUF spec.
const DEFAULT_ALIGNMENT: u64 = 32;

/// One entry of the tensor table.
#[derive(Debug, Clone)]
struct Entry {
    /// PyTorch order, `[out, in]`.
    shape: Vec<usize>,
    /// The GGML type id as stored.
    type_id: u32,
    /// `None` when candle cannot read the type.
    dtype: Option<GgmlDType>,
}

/// An opened GGUF file: its metadata and tensor table; tensor data is read on demand.
///
/// [`Checkpoint`](super::Checkpoint) opens GGUF files through it ([`Checkpoint::gguf`](super::Checkpoint::gguf));
/// it is public for what a model needs beyond the FFN: the metadata (hyperparameters, the
/// tokenizer) and the other tensors, quantized or dequantized.
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use candle_glu::loading::GgufStore;
/// let gguf = GgufStore::open("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
/// assert_eq!(gguf.architecture(), Some("llama"));
/// let layers = gguf.num_layers();
/// let embed = gguf.dequantized("token_embd.weight", DType::F32, &Device::Cpu)?;
/// let up = gguf.qtensor("blk.0.ffn_up.weight", &Device::Cpu)?; // kept quantized
/// # Ok::<(), candle_glu::Error>(())
/// ```
#[derive(Debug)]
pub struct GgufStore {
    path: PathBuf,
    content: Content,
    tensors: BTreeMap<String, Entry>,
    config: Option<GluConfig>,
}

impl GgufStore {
    /// Reads and checks the header, metadata and tensor table: lengths and counts against the
    /// file's size, `general.alignment`, tensor ranks and dimensions, and that every tensor of a
    /// readable type lies inside the file. The FFN sizes in the metadata, if any, must be valid.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read; [`Error::InvalidFile`] naming what is malformed
    /// (truncated, a bad magic or version, a corrupt table); [`Error::InvalidConfig`] for
    /// implausible `<arch>.embedding_length` / `<arch>.feed_forward_length`, or for those or
    /// `<arch>.block_count` stored as anything but a non-negative integer.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut header = Header {
            reader: BufReader::new(file),
            pos: 0,
            len,
            path,
            values: 0,
        };
        let (content, tensors) = header.read()?;
        let mut store = Self {
            path: path.to_path_buf(),
            content,
            tensors,
            config: None,
        };
        store.config = store.read_config()?;
        // Checked here, so that `num_layers` never takes a malformed count for an absent one.
        store.arch_count("block_count")?;
        Ok(store)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name, sorted, including those of types candle cannot read.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Whether the file has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor's shape, PyTorch order.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Whether the tensor is stored as F32, F16 or BF16: values, not quantized blocks.
    pub(crate) fn is_float(&self, name: &str) -> bool {
        (self.content.tensor_infos.get(name)).is_some_and(|t| is_float_type(t.ggml_dtype))
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// The checked header as candle's [`Content`], for code written against candle's GGUF API:
    /// all the metadata, and the table of the tensors candle can read, every offset checked
    /// against the file and `general.alignment` applied (read them with
    /// [`qtensor`](Self::qtensor), or with [`Content::tensor`] on this file).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata("general.architecture")?
            .to_string()
            .ok()
            .map(String::as_str)
    }

    fn arch_key(&self, key: &str) -> Option<String> {
        Some(format!("{}.{key}", self.architecture()?))
    }

    /// `<arch>.key` as a count: `None` where absent, an error naming the key where it is there
    /// but not a non-negative integer (of any width) that fits in `usize`.
    fn arch_count(&self, key: &str) -> Result<Option<usize>> {
        let Some(full) = self.arch_key(key) else {
            return Ok(None);
        };
        let Some(v) = self.metadata(&full) else {
            return Ok(None);
        };
        integer(v)
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| Error::InvalidConfig {
                path: Some(self.path.clone()),
                message: format!(
                    "`{full}` must be a non-negative integer, found {}",
                    value_kind(v)
                ),
            })
    }

    /// The shape (PyTorch's order) of the first tensor whose name ends in `suffix`, in name
    /// order.
    fn shape_of_any(&self, suffix: &str) -> Option<&[usize]> {
        let mut names: Vec<&String> = self
            .tensors
            .keys()
            .filter(|n| n.ends_with(suffix))
            .collect();
        names.sort();
        names
            .first()
            .and_then(|n| self.tensors.get(*n))
            .map(|e| e.shape.as_slice())
    }

    /// The number of transformer blocks, `<arch>.block_count`.
    pub fn num_layers(&self) -> Option<usize> {
        // (A malformed count was refused when the file was opened.)
        self.arch_count("block_count").ok().flatten()
    }

    /// The FFN's config from the metadata: `<arch>.embedding_length`,
    /// `<arch>.feed_forward_length`, and the activation its architecture uses. `None` when the
    /// architecture is not one whose FFN is a known GLU, or the sizes are absent. Sizes were
    /// validated when the file was opened.
    pub fn config(&self) -> Option<GluConfig> {
        self.config.clone()
    }

    fn read_config(&self) -> Result<Option<GluConfig>> {
        let activation = match self.architecture() {
            Some(
                "llama" | "mistral" | "qwen2" | "qwen3" | "smollm3" | "granite" | "olmo2"
                | "cohere",
            ) => Activation::Silu,
            Some("gemma" | "gemma2" | "gemma3") => Activation::GeluTanh,
            _ => return Ok(None),
        };
        // llama.cpp takes `feed_forward_length` as one size or one per layer (a pruned model):
        // per layer, there is no one block to describe unless they agree.
        let intermediate = match self
            .arch_key("feed_forward_length")
            .and_then(|k| self.metadata(&k))
        {
            Some(Value::Array(sizes)) => {
                let sizes: Vec<Option<u64>> = sizes.iter().map(integer).collect();
                match sizes.first() {
                    Some(Some(first)) if sizes.iter().all(|s| *s == Some(*first)) => {
                        usize::try_from(*first).ok()
                    }
                    _ => None,
                }
            }
            _ => self.arch_count("feed_forward_length")?,
        };
        let (Some(hidden), Some(intermediate)) =
            (self.arch_count("embedding_length")?, intermediate)
        else {
            return Ok(None);
        };
        let (Some(hidden_key), Some(intermediate_key)) = (
            self.arch_key("embedding_length"),
            self.arch_key("feed_forward_length"),
        ) else {
            return Ok(None);
        };
        crate::config::validate_sizes(
            hidden,
            intermediate,
            Some(&self.path),
            Some((&hidden_key, &intermediate_key)),
        )?;
        Ok(Some(
            GluConfig::new(hidden, intermediate)
                .with_activation(activation)
                .with_layout(WeightLayout::Gguf),
        ))
    }

    /// The architectures whose mixture-of-experts layers [`moe_config`](Self::moe_config)
    /// reads, as llama.cpp names them (`llama` for Mixtral, `deepseek2` for DeepSeek-V2 and V3).
    pub const MOE_ARCHITECTURES: [&'static str; 5] =
        ["llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2"];

    /// The mixture-of-experts layers' config from the metadata, routed as llama.cpp routes
    /// each architecture; `None` for a model without experts (no `<arch>.expert_count`, or 0).
    ///
    /// Keys read: `<arch>.embedding_length`, `<arch>.expert_count`, `<arch>.expert_used_count`,
    /// `<arch>.expert_feed_forward_length` (else the experts' own shape, `ffn_gate_exps`,
    /// `ffn_up_exps` or `ffn_gate_up_exps`; else `<arch>.feed_forward_length`),
    /// `<arch>.expert_group_count` and `<arch>.expert_group_used_count` (as llama.cpp, for every
    /// architecture), for Qwen2-MoE `<arch>.expert_shared_feed_forward_length` (absent or 0:
    /// the shape of an `ffn_up_shexp`), and for DeepSeek `<arch>.expert_shared_count` (absent:
    /// the shape of an `ffn_up_shexp`), `<arch>.expert_weights_norm`,
    /// `<arch>.expert_weights_scale` and `<arch>.expert_gating_func` (1 softmax, 2 sigmoid;
    /// absent or 0 softmax, as llama.cpp reads DeepSeek-V2's files).
    /// The k weights are renormalised for `llama` and `qwen3moe`, not for `qwen2moe` and
    /// `olmoe`, and as `expert_weights_norm` says for `deepseek2`; a selection bias is read where
    /// the file has `exp_probs_b` tensors; Qwen2-MoE's shared expert is gated where it has
    /// `ffn_gate_inp_shexp`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an architecture with experts that is not in
    /// [`MOE_ARCHITECTURES`](Self::MOE_ARCHITECTURES); a missing key, or one that is there but
    /// malformed (a count that is not a non-negative integer), named; a group count above 1
    /// without the groups used; shared-expert tensors that the metadata gives no size (or that
    /// the architecture does not have); inconsistent sizes.
    pub fn moe_config(&self) -> Result<Option<crate::MoeConfig>> {
        use crate::moe::{MoeConfig, Scoring};
        let experts = self.arch_count("expert_count")?.unwrap_or(0);
        if experts == 0 {
            return Ok(None);
        }
        let arch = self.architecture().unwrap_or_default().to_string();
        let fail = |message: String| Error::InvalidConfig {
            path: Some(self.path.clone()),
            message,
        };
        if !Self::MOE_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(fail(format!(
                "architecture `{arch}` has experts, but is not one whose mixture of experts this \
                 crate reads ({})",
                Self::MOE_ARCHITECTURES.join(", ")
            )));
        }
        let size = |key: &str| {
            self.arch_count(key)?
                .ok_or_else(|| fail(format!("missing `{arch}.{key}`")))
        };
        let hidden = size("embedding_length")?;
        // The experts' size: the key, else the experts' own rows, else the FFN's size (which is
        // the experts' for Mixtral and OLMoE; llama.cpp takes `n_ff / k` for Qwen's).
        let from_experts = || {
            let rows = |suffix: &str| self.shape_of_any(suffix).and_then(|s| s.get(1).copied());
            rows(".ffn_gate_exps.weight")
                .or_else(|| rows(".ffn_up_exps.weight"))
                .or_else(|| rows(".ffn_gate_up_exps.weight").map(|n| n / 2))
        };
        let intermediate = match self.arch_count("expert_feed_forward_length")? {
            Some(n) => n,
            None => match from_experts() {
                Some(n) => n,
                None => size("feed_forward_length")?,
            },
        };
        let expert = GluConfig::new(hidden, intermediate)
            .with_activation(Activation::Silu)
            .with_layout(WeightLayout::Gguf);
        let mut cfg = MoeConfig::new(expert, experts, size("expert_used_count")?);
        let metadata = |key: &str| self.arch_key(key).and_then(|k| self.metadata(&k));
        let has_tensor = |suffix: &str| self.tensors.keys().any(|n| n.ends_with(suffix));
        // The shared experts' width as their tensors have it.
        let shared_from_shape = || {
            self.shape_of_any(".ffn_up_shexp.weight")
                .and_then(|s| s.first().copied())
                .filter(|&n| n > 0)
        };
        // Group-limited routing, read for every architecture as llama.cpp reads it (0: none).
        cfg.n_group = self.arch_count("expert_group_count")?.unwrap_or(1).max(1);
        cfg.topk_group = match self.arch_count("expert_group_used_count")? {
            Some(n) => n,
            None if cfg.n_group > 1 => {
                return Err(fail(format!(
                    "`{arch}.expert_group_count` = {} needs `{arch}.expert_group_used_count`",
                    cfg.n_group
                )))
            }
            None => 1,
        };
        cfg.norm_topk_prob = match arch.as_str() {
            "llama" | "qwen3moe" => true,
            "deepseek2" => match metadata("expert_weights_norm") {
                None => false,
                Some(v) => v
                    .to_bool()
                    .map_err(|_| fail(format!("`{arch}.expert_weights_norm` must be a bool")))?,
            },
            _ => false,
        };
        if arch == "deepseek2" {
            // llama.cpp's `n_layer_dense_lead`: 0 where absent.
            cfg.sparse_layers.first_dense =
                self.arch_count("leading_dense_block_count")?.unwrap_or(0);
            if let Some(v) = metadata("expert_weights_scale") {
                let scale = v
                    .to_f32()
                    .map_err(|_| fail(format!("`{arch}.expert_weights_scale` must be an f32")))?;
                // llama.cpp scales the weights unless the factor is 0 (absent) or 1.
                if scale != 0.0 {
                    cfg.routed_scaling_factor = f64::from(scale);
                }
            }
            cfg.scoring = match self.arch_count("expert_gating_func")? {
                None | Some(0 | 1) => Scoring::Softmax,
                Some(2) => Scoring::Sigmoid,
                Some(other) => {
                    return Err(fail(format!(
                        "`{arch}.expert_gating_func` = {other}: only 1 (softmax) and 2 (sigmoid) \
                         are read"
                    )))
                }
            };
            cfg.shared_intermediate_size = match self.arch_count("expert_shared_count")? {
                Some(shared) => {
                    let width = shared.checked_mul(intermediate).ok_or_else(|| {
                        fail(format!(
                            "`{arch}.expert_shared_count` = {shared} × the experts' size overflows"
                        ))
                    })?;
                    (shared > 0).then_some(width)
                }
                None => shared_from_shape(),
            };
        }
        if arch == "qwen2moe" {
            // 0 is llama.cpp's "not set", as absent is.
            cfg.shared_intermediate_size = self
                .arch_count("expert_shared_feed_forward_length")?
                .filter(|&n| n > 0)
                .or_else(shared_from_shape);
            cfg.shared_expert_gate = has_tensor(".ffn_gate_inp_shexp.weight");
        }
        // Shared-expert tensors the layer would not read: an error, not a layer without them.
        if cfg.shared_intermediate_size.is_none() && has_tensor(".ffn_up_shexp.weight") {
            return Err(fail(match arch.as_str() {
                "qwen2moe" | "deepseek2" => format!(
                    "the file has shared-expert tensors (`ffn_up_shexp`), but its metadata gives \
                     them no size (`{arch}.{}` is 0)",
                    if arch == "deepseek2" {
                        "expert_shared_count"
                    } else {
                        "expert_shared_feed_forward_length"
                    }
                ),
                _ => format!(
                    "the file has shared-expert tensors (`ffn_up_shexp`), which `{arch}` does \
                     not have"
                ),
            }));
        }
        cfg.selection_bias = has_tensor(".exp_probs_b.bias");
        let key = |name: &str| format!("`{arch}.{name}`");
        let (top_k, n_group) = (key("expert_used_count"), key("expert_group_count"));
        let (topk_group, scaling) = (key("expert_group_used_count"), key("expert_weights_scale"));
        let keys = crate::moe::ConfigKeys {
            top_k: &top_k,
            n_group: &n_group,
            topk_group: &topk_group,
            scaling: &scaling,
        };
        cfg.check(&keys).map_err(|e| match e {
            Error::InvalidConfig { message, .. } => fail(message),
            e => e,
        })?;
        Ok(Some(cfg))
    }

    /// Reads one tensor as stored (quantized) onto `device`.
    ///
    /// # Errors
    /// A missing tensor (with the closest names that exist), a type candle cannot read
    /// ([`Error::UnsupportedTensorType`]), or an I/O error.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let (entry, dtype) = self.readable(name)?;
        if device.is_cpu() {
            let buffer = self.read_host(name, dtype)?;
            let len = buffer.len();
            let mut tensors =
                host::views(buffer, dtype, &[(0..len, Shape::from(&entry.shape[..]))])
                    .map_err(|e| self.tensor_error(name, e))?;
            return tensors
                .pop()
                .ok_or_else(|| self.invalid(format!("tensor `{name}` has no view")));
        }
        let file = self.open_data()?;
        self.content
            .tensor(&mut BufReader::new(file), name, device)
            .map_err(|e| self.tensor_error(name, e))
    }

    /// Reads a stacked tensor `[n, out, in]`, such as a mixture of experts' `ffn_up_exps`
    /// (`[experts, intermediate, hidden]`), with each slice's rows split into `parts` equal
    /// runs: one result per run, each `n` tensors `[out / parts, in]`. A fused
    /// `ffn_gate_up_exps` is read with `parts = 2` (gate rows, then up), once. No value is
    /// decoded or moved within its blocks: each tensor holds the stored bytes of its rows.
    ///
    /// On the CPU the whole tensor is read once into one buffer (huge pages where the system
    /// has them), and the slices view it in place: the experts lie one after the other, as in
    /// the file, and nothing is copied. On a GPU each slice is read and sent on its own, so
    /// that the host never holds the whole stack.
    ///
    /// # Errors
    /// As [`qtensor`](Self::qtensor); [`Error::InvalidFile`] for a tensor that is not of rank
    /// 3, or whose `out` rows do not split into `parts`.
    pub fn stacked_qtensors(
        &self,
        name: &str,
        parts: usize,
        device: &Device,
    ) -> Result<Vec<Vec<QTensor>>> {
        let (entry, dtype) = self.readable(name)?;
        let &[n, out, k] = entry.shape.as_slice() else {
            return Err(self.invalid(format!(
                "tensor `{name}` has shape {:?}; a stack of matrices [n, out, in] was expected",
                entry.shape
            )));
        };
        if parts == 0 || out % parts != 0 {
            return Err(self.invalid(format!(
                "tensor `{name}` [{n}, {out}, {k}]: its slices' {out} rows do not split into \
                 {parts} equal parts"
            )));
        }
        let run = out / parts;
        let rows: Vec<Range<usize>> = (0..parts).map(|p| p * run..(p + 1) * run).collect();
        // Rows hold whole blocks: the shape was checked when the table was read.
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        let slice = |i: usize, r: &Range<usize>| {
            let start = (i * out + r.start) * row_bytes;
            (
                start..start + r.len() * row_bytes,
                Shape::from((r.len(), k)),
            )
        };
        if device.is_cpu() {
            let slices: Vec<_> = rows
                .iter()
                .flat_map(|r| (0..n).map(move |i| slice(i, r)))
                .collect();
            let mut tensors = host::views(self.read_host(name, dtype)?, dtype, &slices)
                .map_err(|e| self.tensor_error(name, e))?
                .into_iter();
            return Ok(rows
                .iter()
                .map(|_| tensors.by_ref().take(n).collect())
                .collect());
        }
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(self.invalid(format!("tensor `{name}` is not in the table")));
        };
        let mut reader = BufReader::new(self.open_data()?);
        rows.iter()
            .map(|r| {
                (0..n)
                    .map(|i| {
                        let (bytes, shape) = slice(i, r);
                        TensorInfo {
                            ggml_dtype: dtype,
                            shape,
                            offset: info.offset + bytes.start as u64,
                        }
                        .read(&mut reader, self.content.tensor_data_offset, device)
                        .map_err(|e| self.tensor_error(name, e))
                    })
                    .collect()
            })
            .collect()
    }

    /// Reads tensor `name`'s bytes, as stored, into one host buffer.
    fn read_host(&self, name: &str, dtype: GgmlDType) -> Result<HostBuffer> {
        let (Some(entry), Some(info)) =
            (self.tensors.get(name), self.content.tensor_infos.get(name))
        else {
            return Err(self.invalid(format!("tensor `{name}` is not in the table")));
        };
        let len = data_size(&entry.shape, dtype)
            .map_err(|m| self.invalid(format!("tensor `{name}` {m}")))?;
        let io = |source: std::io::Error| Error::Io {
            path: self.path.clone(),
            source: std::io::Error::new(source.kind(), format!("tensor `{name}`: {source}")),
        };
        let len = usize::try_from(len).map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("{len} bytes do not fit this machine's address space"),
            ))
        })?;
        let mut buffer = HostBuffer::zeroed(len).map_err(io)?;
        let mut file = self.open_data()?;
        file.seek(SeekFrom::Start(
            self.content.tensor_data_offset + info.offset,
        ))
        .map_err(io)?;
        file.read_exact(buffer.as_mut_slice()).map_err(io)?;
        Ok(buffer)
    }

    /// The entry of a tensor candle can read and that holds values.
    fn readable(&self, name: &str) -> Result<(&Entry, GgmlDType)> {
        let Some(entry) = self.tensors.get(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                found: crate::layout::closest_names(name, self.names()),
            });
        };
        let Some(dtype) = entry.dtype else {
            return Err(Error::UnsupportedTensorType {
                path: self.path.clone(),
                name: name.to_string(),
                found: ggml_type_name(entry.type_id),
                supported: READABLE_TYPES,
            });
        };
        // candle 0.11.1 views the bytes it read as blocks with `slice::from_raw_parts`; for an
        // empty tensor that pointer is a dangling, misaligned one: undefined behaviour (found by
        // fuzzing, where debug assertions catch it). No weight is empty, so refuse it.
        if entry.shape.contains(&0) {
            return Err(self.invalid(format!(
                "tensor `{name}` has shape {:?}, with no values",
                entry.shape
            )));
        }
        Ok((entry, dtype))
    }

    fn open_data(&self) -> Result<File> {
        File::open(&self.path).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn invalid(&self, message: String) -> Error {
        Error::InvalidFile {
            path: self.path.clone(),
            message,
        }
    }

    fn tensor_error(&self, name: &str, e: candle_core::Error) -> Error {
        self.invalid(format!("tensor `{name}`: {e}"))
    }

    /// Reads one tensor dequantized to `dtype`.
    ///
    /// # Errors
    /// As [`qtensor`](Self::qtensor).
    pub fn dequantized(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(self
            .qtensor(name, device)?
            .dequantize(device)?
            .to_dtype(dtype)?)
    }
}

/// The header reader: every read is checked against the file's length first, so a length or
/// count read from the file can never make it allocate more than the file holds.
struct Header<'a> {
    reader: BufReader<File>,
    pos: u64,
    len: u64,
    path: &'a Path,
    /// Metadata array values read so far.
    values: u64,
}

impl Header<'_> {
    fn fail(&self, message: String) -> Error {
        Error::InvalidFile {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.remaining() {
            return Err(self.fail(format!(
                "truncated: {what} needs {n} bytes at byte {} but the file ends at byte {}",
                self.pos, self.len
            )));
        }
        // `n` is at most the file's length, which was just checked.
        let mut buf = vec![0u8; n as usize];
        self.reader
            .read_exact(&mut buf)
            .map_err(|source| Error::Io {
                path: self.path.to_path_buf(),
                source,
            })?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let bytes = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length or count: u32 in GGUF v1, u64 after.
    fn length(&mut self, magic: VersionedMagic, what: &str) -> Result<u64> {
        match magic {
            VersionedMagic::GgufV1 => self.u32(what).map(u64::from),
            _ => self.u64(what),
        }
    }

    fn string(&mut self, magic: VersionedMagic, what: &str) -> Result<String> {
        let n = self.length(magic, what)?;
        if n > MAX_STRING_BYTES {
            return Err(self.fail(format!(
                "{what} is {n} bytes long, more than the {MAX_STRING_BYTES} GGUF allows"
            )));
        }
        let mut bytes = self.bytes(n, what)?;
        // Strings should not be NUL-terminated but some writers do it; candle strips them too.
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn read(&mut self) -> Result<(Content, BTreeMap<String, Entry>)> {
        let magic: [u8; 4] = self.array("the magic number")?;
        if &magic != b"GGUF" {
            return Err(self.fail(format!(
                "not a GGUF file: it starts with `{}`, not the magic `GGUF`",
                magic.escape_ascii()
            )));
        }
        let magic = match self.u32("the version")? {
            1 => VersionedMagic::GgufV1,
            2 => VersionedMagic::GgufV2,
            3 => VersionedMagic::GgufV3,
            v => {
                return Err(self.fail(format!(
                    "GGUF version {v} is not supported, expected 1, 2 or 3"
                )))
            }
        };
        let tensor_count = self.length(magic, "the tensor count")?;
        let kv_count = self.length(magic, "the metadata count")?;
        // The smallest metadata entry is a length, a type and one byte; the smallest tensor
        // entry a length, a rank, a type and an offset.
        let prefix = if magic == VersionedMagic::GgufV1 {
            4
        } else {
            8
        };
        let needed = kv_count
            .saturating_mul(prefix + 4 + 1)
            .saturating_add(tensor_count.saturating_mul(prefix + 4 + 4 + 8));
        if needed > self.remaining() {
            return Err(self.fail(format!(
                "the header declares {tensor_count} tensors and {kv_count} metadata entries, \
                 which need at least {needed} bytes, but only {} are left: truncated or corrupt",
                self.remaining()
            )));
        }

        let mut metadata = HashMap::new();
        for _ in 0..kv_count {
            let key = self.string(magic, "a metadata key")?;
            let what = format!("metadata `{key}`");
            let type_id = self.u32(&what)?;
            let value = self.value(magic, type_id, &what, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(self.fail(format!("metadata key `{key}` appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => integer(v).filter(|a| a.is_power_of_two()).ok_or_else(|| {
                let found = integer(v).map_or_else(|| format!("{v:?}"), |a| a.to_string());
                self.fail(format!(
                    "`general.alignment` is {found}, expected a power of two"
                ))
            })?,
        };

        let mut tensors = BTreeMap::new();
        let mut tensor_infos = HashMap::new();
        let mut infos = Vec::new();
        for _ in 0..tensor_count {
            let name = self.string(magic, "a tensor name")?;
            let what = format!("tensor `{name}`");
            let rank = self.u32(&what)?;
            if rank > MAX_TENSOR_DIMS {
                return Err(self.fail(format!(
                    "{what} has {rank} dimensions, at most {MAX_TENSOR_DIMS} are allowed"
                )));
            }
            let mut shape = Vec::with_capacity(rank as usize);
            for _ in 0..rank {
                let d = self.length(magic, &what)?;
                let d = usize::try_from(d)
                    .map_err(|_| self.fail(format!("{what} has a dimension of {d}")))?;
                shape.push(d);
            }
            shape.reverse(); // GGUF is [in, out]; PyTorch [out, in]
            let type_id = self.u32(&what)?;
            let offset = self.u64(&what)?;
            let dtype = readable_type(type_id);
            if let Some(dtype) = dtype {
                let size =
                    data_size(&shape, dtype).map_err(|m| self.fail(format!("{what} {m}")))?;
                infos.push((name.clone(), offset, size));
                let info = TensorInfo {
                    ggml_dtype: dtype,
                    shape: Shape::from(shape.clone()),
                    offset,
                };
                tensor_infos.insert(name.clone(), info);
            }
            let entry = Entry {
                shape,
                type_id,
                dtype,
            };
            if tensors.insert(name.clone(), entry).is_some() {
                return Err(self.fail(format!("{what} appears twice in the tensor table")));
            }
        }

        let data_start = self
            .pos
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| self.fail("the tensor data offset overflows".into()))?;
        for (name, offset, size) in &infos {
            let end = data_start
                .checked_add(*offset)
                .and_then(|start| start.checked_add(*size));
            match end {
                Some(end) if end <= self.len => {}
                _ => {
                    return Err(self.fail(format!(
                        "tensor `{name}` needs {size} bytes at offset {offset} of the data, which \
                         starts at byte {data_start}, but the file has {} bytes: truncated?",
                        self.len
                    )))
                }
            }
        }
        Ok((
            Content {
                magic,
                metadata,
                tensor_infos,
                tensor_data_offset: data_start,
            },
            tensors,
        ))
    }

    fn value(
        &mut self,
        magic: VersionedMagic,
        type_id: u32,
        what: &str,
        depth: usize,
    ) -> Result<Value> {
        let v = match type_id {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.fail(format!("{what}: a bool of value {b}, expected 0 or 1"))),
            },
            8 => Value::String(self.string(magic, what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(
                        self.fail(format!("{what}: arrays nested more than {MAX_DEPTH} deep"))
                    );
                }
                let elem_type = self.u32(what)?;
                let n = self.length(magic, what)?;
                let min_size = match elem_type {
                    0 | 1 | 7 => 1, // u8, i8, bool
                    2 | 3 => 2,     // u16, i16
                    4..=6 => 4,     // u32, i32, f32
                    10..=12 => 8,   // u64, i64, f64
                    8 => {
                        if magic == VersionedMagic::GgufV1 {
                            4
                        } else {
                            8
                        }
                    }
                    9 => {
                        if magic == VersionedMagic::GgufV1 {
                            8
                        } else {
                            12
                        }
                    }
                    t => return Err(self.fail(format!("{what}: unknown value type {t}"))),
                };
                if n.saturating_mul(min_size) > self.remaining() {
                    return Err(self.fail(format!(
                        "{what}: an array of {n} values needs at least {} bytes, but only {} \
                         are left: truncated or corrupt",
                        n.saturating_mul(min_size),
                        self.remaining()
                    )));
                }
                self.values = self.values.saturating_add(n);
                if self.values > MAX_METADATA_VALUES {
                    return Err(self.fail(format!(
                        "{what}: the metadata arrays hold more than {MAX_METADATA_VALUES} values \
                         in all"
                    )));
                }
                // `n` is bounded by the bytes left in the file and by MAX_METADATA_VALUES.
                let mut values = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    values.push(self.value(magic, elem_type, what, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(self.fail(format!("{what}: unknown value type {t}"))),
        };
        Ok(v)
    }
}

/// What a metadata value is, for messages: its type, or that it is a negative integer.
fn value_kind(v: &Value) -> String {
    match v {
        Value::I8(n) => n.to_string(),
        Value::I16(n) => n.to_string(),
        Value::I32(n) => n.to_string(),
        Value::I64(n) => n.to_string(),
        Value::F32(_) | Value::F64(_) => "a float".into(),
        Value::Bool(_) => "a bool".into(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        _ => "an unsigned integer".into(),
    }
}

/// A metadata integer of any width, if non-negative.
/// Whether GGUF's `dtype` holds values (F32, F16, BF16), not quantized blocks.
pub(crate) fn is_float_type(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

fn integer(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(n) => Some(n.into()),
        Value::U16(n) => Some(n.into()),
        Value::U32(n) => Some(n.into()),
        Value::U64(n) => Some(n),
        Value::I8(n) => u64::try_from(n).ok(),
        Value::I16(n) => u64::try_from(n).ok(),
        Value::I32(n) => u64::try_from(n).ok(),
        Value::I64(n) => u64::try_from(n).ok(),
        _ => None,
    }
}

/// The bytes of a tensor of this shape and type, or what is wrong with its shape.
fn data_size(shape: &[usize], dtype: GgmlDType) -> std::result::Result<u64, String> {
    let elems = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("has dimensions {shape:?}, whose product overflows"))?;
    let block = dtype.block_size();
    if shape.last().is_some_and(|d| d % block != 0) {
        return Err(format!(
            "of type {dtype:?} has shape {shape:?}: its rows of {} values are not a multiple of \
             the block size {block}",
            shape.last().copied().unwrap_or_default()
        ));
    }
    (elems / block)
        .checked_mul(dtype.type_size())
        .map(|b| b as u64)
        .ok_or_else(|| format!("has dimensions {shape:?}, whose size overflows"))
}

/// The GGML types candle 0.11 can read into a `QTensor`, by id (ggml.h's `ggml_type`).
fn readable_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The names of the types [`readable_type`] accepts, for error messages.
const READABLE_TYPES: &[&str] = &[
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K",
];

/// ggml's name of a type id, e.g. `IQ2_XXS (16)`.
fn ggml_type_name(id: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    match NAMES.get(id as usize) {
        Some(name) => format!("{name} (type {id})"),
        None => format!("unknown type {id}"),
    }
}

impl super::LazyStore for GgufStore {
    fn stored_shape(&self, name: &str) -> Option<&[usize]> {
        self.shape(name)
    }

    /// Dequantizes the tensor.
    fn read(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.dequantized(name, dtype, device)
    }
}
