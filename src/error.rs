//! The crate's error type.
//!
//! Tensor-level calls (`GluFeedForward::new`, `forward`, `Projection`'s) return
//! [`candle_core::Result`] so that `?` works inside a candle model; they wrap an [`Error`] from
//! this module, whose message is kept but whose variant is not: candle 0.11's error holds a
//! wrapped error only as something to display, so it cannot be matched on or downcast. Config
//! and loading calls (`GluConfig`, `MoeConfig`, `loading::Checkpoint`) return [`Result`]
//! directly, with the variant; load through them where your code must tell failures apart.

#![forbid(unsafe_code)]

use std::path::PathBuf;

/// Everything that can go wrong in this crate, one variant per failure.
///
/// Messages are lowercase, name the file, tensor, field or value at fault, and say what was
/// expected and what was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name that does not parse: an activation, a weight layout or a device.
    #[error(transparent)]
    Parse(#[from] ParseError),

    /// A tensor the layout needs is not in the checkpoint.
    #[error("missing tensor `{name}`{}", found_hint(.found))]
    MissingTensor {
        /// The full name that was looked for.
        name: String,
        /// Names that do exist nearby (same prefix, or the closest by spelling).
        found: Vec<String>,
    },

    /// A tensor whose shape does not match the config.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}{}", shape_hint(.expected, .found))]
    ShapeMismatch {
        /// The full tensor name.
        name: String,
        /// The shape the config implies, PyTorch's `[out, in]` for weights.
        expected: Vec<usize>,
        /// The shape stored in the checkpoint.
        found: Vec<usize>,
    },

    /// Bias tensors that disagree with the config: some projections have one and others not, or
    /// the checkpoint has biases that the config says are absent.
    #[error("{message}")]
    Bias {
        /// What is wrong, naming the tensors.
        message: String,
    },

    /// An input whose last dimension is not the hidden size, or which has no dimension at all.
    #[error("input of shape {shape:?} does not end in the hidden size {hidden_size}")]
    InputShape {
        /// The input's shape.
        shape: Vec<usize>,
        /// The hidden size the layer expects as the last dimension.
        hidden_size: usize,
    },

    /// An input to a [`Projection`](crate::Projection) whose last dimension is not the layer's
    /// input features, or which has no dimension at all.
    #[error(
        "input of shape {shape:?} does not end in the projection's {in_features} input features"
    )]
    ProjectionInput {
        /// The input's shape.
        shape: Vec<usize>,
        /// The input features of the weight `[out, in]`.
        in_features: usize,
    },

    /// A [`Projection`](crate::Projection) built from parts that do not fit: a weight that is
    /// not a float matrix, a bias of another length, dtype or device.
    #[error("invalid projection: {message}")]
    InvalidProjection {
        /// What is wrong.
        message: String,
    },

    /// An input to a [`Projection`](crate::Projection) whose result would exceed
    /// [`MAX_ACTIVATION_BYTES`](crate::config::MAX_ACTIVATION_BYTES): an error rather than an
    /// allocation that aborts the process.
    #[rustfmt::skip]
    #[error("input of shape {shape:?} is too large: its result of {out_features} features per token would take {bytes} bytes, more than the limit of {limit} bytes; split it into smaller batches")]
    OutputTooLarge {
        /// The input's shape.
        shape: Vec<usize>,
        /// The projection's output features.
        out_features: usize,
        /// The bytes the result would take (saturating).
        bytes: u64,
        /// The limit.
        limit: u64,
    },

    /// An input tensor that is not floating point.
    #[error("input has dtype {dtype:?}, expected a floating-point dtype (f32, f16, bf16 or f64)")]
    InputDtype {
        /// The input's dtype.
        dtype: candle_core::DType,
    },

    /// A config that cannot describe a gated feed-forward block.
    #[error("invalid config{}: {message}", origin(.path))]
    InvalidConfig {
        /// The `config.json` it came from, if any.
        path: Option<PathBuf>,
        /// What is wrong, naming the field.
        message: String,
    },

    /// A weights, index or GGUF file that is malformed: truncated, a corrupt header, offsets
    /// past the end, overlapping tensors, shards outside the index's directory.
    #[error("{}: {message}", .path.display())]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A tensor stored as integers where float weights are expected.
    #[error("tensor `{name}` is stored as {dtype:?}, expected a float dtype")]
    TensorDtype {
        /// The full tensor name.
        name: String,
        /// The stored dtype.
        dtype: candle_core::DType,
    },

    /// A GGUF tensor of a GGML type candle cannot read (an `IQ*` or `Q8_K` quantization, an
    /// integer type, ...).
    #[error("{}: tensor `{name}` is stored as {found}, which candle cannot load; supported: {}", .path.display(), .supported.join(", "))]
    UnsupportedTensorType {
        /// The GGUF file.
        path: PathBuf,
        /// The full tensor name.
        name: String,
        /// The stored type, by ggml's name and id.
        found: String,
        /// The types that can be read, by ggml's names.
        supported: &'static [&'static str],
    },

    /// An input so large that one intermediate activation, `tokens × intermediate size`, would
    /// exceed [`MAX_ACTIVATION_BYTES`](crate::config::MAX_ACTIVATION_BYTES): an error rather
    /// than an allocation that aborts the process.
    #[rustfmt::skip]
    #[error("input of shape {shape:?} is too large: {tokens} tokens × intermediate size {intermediate_size} × {elem_bytes} bytes = {bytes} bytes per activation, more than the limit of {limit} bytes; split it into smaller batches")]
    InputTooLarge {
        /// The input's shape.
        shape: Vec<usize>,
        /// The number of tokens, every dimension but the last multiplied.
        tokens: usize,
        /// The block's intermediate size.
        intermediate_size: usize,
        /// The bytes per value of the activation (f32 at least: half precision is widened).
        elem_bytes: usize,
        /// The bytes one activation would take (saturating).
        bytes: u64,
        /// The limit.
        limit: u64,
    },

    /// An expert the router names, none of whose weights the checkpoint stores.
    #[error("missing tensor `{name}`: expert {expert} of the router's {num_experts} is not stored; the checkpoint stores {}", stored_experts(.stored))]
    MissingExpert {
        /// The full name of the expert's first weight.
        name: String,
        /// The missing expert.
        expert: usize,
        /// The experts the router (and config) name.
        num_experts: usize,
        /// The experts with weights stored.
        stored: Vec<usize>,
    },

    /// A layer of a mixture-of-experts model whose FFN is dense (DeepSeek's first
    /// `first_k_dense_replace` layers, Qwen2-MoE's `mlp_only_layers`), asked for as experts.
    #[error("layer {layer} has a dense FFN, not a mixture of experts (load it as one layer); the layers with experts are {}", list_layers(.moe_layers))]
    DenseLayer {
        /// The layer asked for.
        layer: usize,
        /// The layers that have experts.
        moe_layers: Vec<usize>,
    },

    /// A layer whose FFN is a mixture of experts (it has a router), asked for as one block:
    /// its first expert alone is not the layer's FFN.
    #[error("layer {layer} is a mixture of experts (its router is `{router}`), not one FFN: load it with `Checkpoint::load_experts`, or one expert with `load_ffn` at its prefix")]
    MoeLayer {
        /// The layer asked for.
        layer: usize,
        /// The router's tensor.
        router: String,
    },

    /// A layer index the checkpoint has no FFN weights for.
    #[error("layer {layer} is not in this checkpoint{}: {}", model_layers(.num_layers), held_layers(.present, .looked_for))]
    LayerOutOfRange {
        /// The layer asked for.
        layer: usize,
        /// The model's layer count, when its config says.
        num_layers: Option<usize>,
        /// The layers whose FFN weights are present.
        present: Vec<usize>,
        /// The tensor that would hold the layer (its gate, or its router), as the layout names
        /// it: where no layer is present, the layout may not be the checkpoint's.
        looked_for: String,
    },

    /// A device that cannot be opened, or an unknown device name.
    #[error("{message}")]
    Device {
        /// What is missing: the cargo feature, the driver, or the device.
        message: String,
    },

    /// A file that could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON file that does not parse.
    #[error("{}: invalid JSON: {source}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error, with line and column.
        source: serde_json::Error,
    },

    /// The Hugging Face Hub, or its cache offline, could not provide a file; or a repo id,
    /// revision or shard name that cannot be fetched.
    ///
    /// The message says what failed and what to do; the client's own error, when there is one
    /// (a refused connection, an HTTP status), is the [`source`](std::error::Error::source).
    #[error("hub repo `{}`: {message}", .repo.escape_debug())]
    Hub {
        /// The repository id, as given.
        repo: String,
        /// What went wrong, naming the file, the revision and, offline, the cache directory.
        message: String,
        /// The hub client's error underneath, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// An activation with no counterpart on the other side of a conversion between
/// [`Activation`](crate::Activation) and `candle_nn::Activation`.
///
/// ```rust
/// use candle_glu::Activation;
/// let err = Activation::try_from(candle_nn::Activation::Relu6).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "candle_nn::Activation::Relu6 has no counterpart in candle_glu::Activation"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{from} has no counterpart in {to}{}", .hint.map(|h| format!(": {h}")).unwrap_or_default())]
pub struct ConversionError {
    from: String,
    to: &'static str,
    hint: Option<&'static str>,
}

impl ConversionError {
    pub(crate) fn new(from: String, to: &'static str, hint: Option<&'static str>) -> Self {
        Self { from, to, hint }
    }

    /// The variant that has no counterpart, as `candle_nn::Activation::Relu6`.
    pub fn variant(&self) -> &str {
        &self.from
    }
}

/// A name that is not one of those a [`FromStr`](std::str::FromStr) impl of this crate accepts
/// (an [`Activation`](crate::Activation), a [`WeightLayout`](crate::WeightLayout), a
/// [`DeviceChoice`](crate::device::DeviceChoice)); it converts into [`Error::Parse`].
///
/// ```rust
/// let err = "swiglu".parse::<candle_glu::Activation>().unwrap_err();
/// assert_eq!(err.name(), "swiglu");
/// assert!(err.to_string().starts_with("unknown activation `swiglu`, expected one of: silu"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{}`, expected one of: {}", shorten(&.name.escape_debug().to_string()), .expected.join(", "))]
pub struct ParseError {
    what: &'static str,
    name: String,
    expected: &'static [&'static str],
}

impl ParseError {
    /// `name` is not a valid `what` (`"activation"`, ...); `expected` lists the valid names.
    pub(crate) fn new(what: &'static str, name: &str, expected: &'static [&'static str]) -> Self {
        Self {
            what,
            name: name.to_string(),
            expected,
        }
    }

    /// The name that was given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The names that are accepted.
    pub fn expected(&self) -> &'static [&'static str] {
        self.expected
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            // Not `Error::wrap`, which appends a backtrace to the message when RUST_BACKTRACE is
            // set: our messages already say where the problem is.
            e => candle_core::Error::Wrapped(Box::new(e)),
        }
    }
}

/// So that `"silu".parse()?` works inside code returning candle's `Result`.
impl From<ParseError> for candle_core::Error {
    fn from(e: ParseError) -> Self {
        Error::Parse(e).into()
    }
}

fn found_hint(found: &[String]) -> String {
    if found.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = found.iter().map(|n| format!("`{}`", shorten(n))).collect();
        format!("; closest names that exist: {}", names.join(", "))
    }
}

/// A name cut to 120 characters: a hostile file's names can be megabytes long.
fn shorten(name: &str) -> String {
    match name.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &name[..i]),
        None => name.to_string(),
    }
}

fn shape_hint(expected: &[usize], found: &[usize]) -> &'static str {
    let mut reversed = found.to_vec();
    reversed.reverse();
    if expected.len() == 2 && reversed == expected && expected[0] != expected[1] {
        " (it looks transposed: weights are stored as PyTorch's [out, in])"
    } else {
        ""
    }
}

fn model_layers(n: &Option<usize>) -> String {
    n.map(|n| format!(" (the model has {n} layers)"))
        .unwrap_or_default()
}

/// Indices, runs of three or more as ranges: `0, 1`, `3–60`, `0–5, 7`.
pub(crate) fn list_layers(present: &[usize]) -> String {
    if present.is_empty() {
        return "none".into();
    }
    let mut parts = Vec::new();
    let mut start = 0;
    for i in 1..=present.len() {
        if i < present.len() && present[i - 1].checked_add(1) == Some(present[i]) {
            continue;
        }
        let run = &present[start..i];
        match run {
            [a, .., b] if run.len() >= 3 => parts.push(format!("{a}–{b}")),
            _ => parts.extend(run.iter().map(usize::to_string)),
        }
        start = i;
    }
    parts.join(", ")
}

fn held_layers(present: &[usize], looked_for: &str) -> String {
    if present.is_empty() {
        format!(
            "none of its tensors is a layer's FFN as the layout names them (`{}`): another \
             layout, or pass the block's prefix",
            shorten(looked_for)
        )
    } else {
        format!("it holds layers {}", list_layers(present))
    }
}

fn stored_experts(stored: &[usize]) -> String {
    if stored.is_empty() {
        "none of them".into()
    } else {
        format!("{} ({} experts)", list_layers(stored), stored.len())
    }
}

fn origin(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}
