//! [`GluConfig`]: the sizes, activation, bias and weight layout of a gated feed-forward block.
//!
//! Built in code with [`GluConfig::new`] and `with_*` setters, or read from a Hugging Face
//! `config.json` with [`GluConfig::from_hf_json`] / [`GluConfig::from_hf_config_file`].

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Activation, Error, Result, WeightLayout};

/// The largest hidden or intermediate size accepted, 2^20. Real models stay far below it (Llama
/// 3.1 405B has an intermediate size of 53,248); anything larger is a corrupt or hostile config.
pub const MAX_DIM: usize = 1 << 20;

/// The largest number of elements accepted in one projection, `hidden · intermediate`: 2^33,
/// 16 GiB in bf16.
pub const MAX_PROJECTION_ELEMENTS: usize = 1 << 33;

/// The largest intermediate activation a forward pass will allocate, `tokens × intermediate size`
/// values of at least 4 bytes each (half precision is widened to f32 for σ): 2^34 bytes, 16 GiB.
/// A larger input is an [`Error::InputTooLarge`] naming the sizes, not an allocation that aborts
/// the process: split it into smaller batches. (Llama 3.1 405B fits 80,000 tokens per call.)
pub const MAX_ACTIVATION_BYTES: u64 = 1 << 34;

/// The largest `config.json` read, 16 MiB: real ones are a few kilobytes.
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 24;

/// Sizes, activation, bias and weight layout of a gated feed-forward block.
///
/// ```rust
/// use candle_glu::{Activation, GluConfig, WeightLayout};
/// let cfg = GluConfig::new(576, 1536)
///     .with_activation(Activation::Silu)
///     .with_bias(false)
///     .with_layout(WeightLayout::Llama);
/// assert_eq!(cfg.hidden_size, 576);
/// ```
///
/// It (de)serializes with serde by field name, so that it can sit in a model's own config struct
/// as candle-transformers' configs do; the activation and the layout as their names, the
/// activation, bias and layout optional (their defaults), and Llama's `hidden_act` and
/// `mlp_bias` read as `activation` and `bias`. (To read any family's `config.json`, with its own
/// keys and checks, use [`GluConfig::from_hf_json`]: serde knows no family, so Gemma's
/// `hidden_activation`, which wins over its `hidden_act` in transformers, is not read here.)
/// Sizes are not checked here, nor by [`GluConfig::new`]: [`GluConfig::validate`] and every
/// constructor of a block check them. Flattened as below, it takes its keys from the model's
/// config: serde gives each key to one field, so a model config that reads `hidden_size` (or
/// `intermediate_size`, `hidden_act`) for itself too should read the `GluConfig` from the same
/// JSON in a second pass, or through [`GluConfig::from_hf_json`].
///
/// ```rust
/// use candle_glu::{Activation, GluConfig, WeightLayout};
/// #[derive(serde::Deserialize)]
/// struct MyModelConfig {
///     num_hidden_layers: usize,
///     #[serde(flatten)]
///     ffn: GluConfig,
/// }
/// let json = r#"{"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
///                "hidden_act": "gelu_pytorch_tanh", "layout": "t5"}"#;
/// let cfg: MyModelConfig = serde_json::from_str(json).unwrap();
/// assert_eq!(cfg.ffn.activation, Activation::GeluTanh);
/// assert_eq!(cfg.ffn.layout, WeightLayout::T5);
/// assert!(!cfg.ffn.bias);
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct GluConfig {
    /// H: the model width, the input's and output's last dimension.
    pub hidden_size: usize,
    /// I: the width of the gated product `σ(x·W) ⊙ x·V`.
    pub intermediate_size: usize,
    /// σ, the gate activation. Default [`Activation::Silu`]. Read from `hidden_act` too.
    #[serde(default, alias = "hidden_act")]
    pub activation: Activation,
    /// Whether every projection has a bias. Default `false`, as in Llama (`mlp_bias`, which it
    /// is read from too).
    #[serde(default, alias = "mlp_bias")]
    pub bias: bool,
    /// Where the checkpoint keeps the projections. Default [`WeightLayout::Llama`].
    #[serde(default)]
    pub layout: WeightLayout,
}

impl GluConfig {
    /// A SwiGLU block without biases in the Llama layout, of the given sizes.
    pub fn new(hidden_size: usize, intermediate_size: usize) -> Self {
        Self {
            hidden_size,
            intermediate_size,
            activation: Activation::default(),
            bias: false,
            layout: WeightLayout::default(),
        }
    }

    /// Sets the gate activation σ.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Sets whether the projections have biases.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Sets the checkpoint's weight layout.
    pub fn with_layout(mut self, layout: WeightLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Checks that the sizes are non-zero and plausible (at most [`MAX_DIM`] each, and at most
    /// [`MAX_PROJECTION_ELEMENTS`] per projection), so that nothing absurd is ever allocated, and
    /// that a Swish β is finite (a NaN would not survive a serde round-trip).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the size at fault.
    pub fn validate(&self) -> Result<()> {
        validate_sizes(self.hidden_size, self.intermediate_size, None, None)?;
        if let Activation::Swish { beta } = self.activation {
            if !crate::activation::valid_swish_beta(beta) {
                return Err(Error::InvalidConfig {
                    path: None,
                    message: format!("swish's beta must be finite in f32, found {beta}"),
                });
            }
        }
        Ok(())
    }

    /// Checks that a forward pass over `tokens` tokens (of an input of `shape`, for the
    /// message) in `dtype` stays within [`MAX_ACTIVATION_BYTES`] per intermediate activation,
    /// as `forward` checks it: so that a caller can refuse an input before making it.
    ///
    /// # Errors
    /// [`Error::InputTooLarge`].
    pub fn check_tokens(
        &self,
        shape: &[usize],
        tokens: usize,
        dtype: candle_core::DType,
    ) -> Result<()> {
        let elem_bytes = dtype.size_in_bytes().max(4);
        let bytes = (tokens as u64)
            .saturating_mul(self.intermediate_size as u64)
            .saturating_mul(elem_bytes as u64);
        if bytes > MAX_ACTIVATION_BYTES {
            return Err(Error::InputTooLarge {
                shape: shape.to_vec(),
                tokens,
                intermediate_size: self.intermediate_size,
                elem_bytes,
                bytes,
                limit: MAX_ACTIVATION_BYTES,
            });
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json` from its text.
    ///
    /// Understood: `hidden_size` / `intermediate_size` / `hidden_act` / `mlp_bias` (Llama,
    /// Mistral, Qwen2, SmolLM, Phi-3, Mixtral), Gemma's `hidden_activation` (Gemma 2 and 3 read
    /// nothing else; Gemma's legacy `hidden_act = "gelu"` is taken as the tanh GELU it was
    /// trained with), T5's `d_model` / `d_ff` / `feed_forward_proj = "gated-<act>"` (where
    /// `gated-gelu` means `gelu_new`; absent: `relu`, not gated, for T5 and `gated-gelu` for mT5
    /// and UMT5, as transformers' defaults) with `dense_act_fn` and `is_gated_act` taking
    /// precedence where given (transformers sets them after deriving its own), a nested
    /// `text_config` for multimodal models and T5Gemma's
    /// `encoder`. The layout follows `model_type`: `phi3` → Phi-3, `mixtral` → Mixtral, T5
    /// family → T5, otherwise Llama (T5Gemma's blocks have Llama's names under
    /// `encoder.layers.N.mlp`: load them with that prefix). A missing
    /// activation is the tanh GELU for the Gemma families and `silu` otherwise, as transformers'
    /// `GemmaConfig`s and `LlamaConfig` default.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for invalid JSON, a missing or malformed size, an unknown or
    /// non-gated activation, or implausible sizes.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        Self::parse(json, None)
    }

    /// Reads a Hugging Face `config.json` file; see [`from_hf_json`](Self::from_hf_json).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::InvalidFile`] if it is not a regular
    /// file or is over 16 MiB, else as [`from_hf_json`](Self::from_hf_json), with the path in
    /// the message.
    pub fn from_hf_config_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::files::read_json_text(path, MAX_CONFIG_BYTES)?;
        Self::parse(&text, Some(path))
    }

    fn parse(json: &str, path: Option<&Path>) -> Result<Self> {
        let fail = |message: String| Error::InvalidConfig {
            path: path.map(Path::to_path_buf),
            message,
        };
        let value: Value =
            serde_json::from_str(json).map_err(|e| fail(format!("invalid JSON: {e}")))?;
        let Value::Object(root) = value else {
            return Err(fail(format!(
                "expected a JSON object, found {}",
                kind_of(&value)
            )));
        };
        // Multimodal configs (Gemma 3, Llava, ...) nest the language model's settings; T5Gemma
        // its encoder's and decoder's (the encoder's are read).
        let root_type = root.get("model_type").and_then(Value::as_str);
        let obj = match (root.get("encoder"), root.get("text_config")) {
            (Some(Value::Object(encoder)), _) if root_type == Some("t5gemma") => encoder,
            (_, Some(Value::Object(text))) if !root.contains_key("hidden_size") => text,
            _ => &root,
        };
        let model_type = obj
            .get("model_type")
            .or_else(|| root.get("model_type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let is_t5 = matches!(model_type, "t5" | "mt5" | "umt5")
            || (!obj.contains_key("hidden_size") && obj.contains_key("d_model"));
        // Gemma's families, whose σ defaults to the tanh GELU; all but the first read only
        // `hidden_activation`, as transformers does.
        let gemma = matches!(
            model_type,
            "gemma" | "gemma2" | "gemma3" | "gemma3_text" | "t5gemma" | "t5gemma_module"
        ) || root_type == Some("t5gemma");
        let later_gemma = gemma && model_type != "gemma";

        let cfg = if is_t5 {
            let hidden = size_field(obj, "d_model").map_err(&fail)?;
            let intermediate = size_field(obj, "d_ff").map_err(&fail)?;
            // transformers' defaults: `relu` (not gated) for T5, `gated-gelu` for mT5 and UMT5.
            let given = str_field(obj, "feed_forward_proj").map_err(&fail)?;
            let default = if matches!(model_type, "mt5" | "umt5") {
                "gated-gelu"
            } else {
                "relu"
            };
            let proj = given.unwrap_or(default);
            // transformers' T5Config derives `is_gated_act` and `dense_act_fn` from
            // `feed_forward_proj`; where config.json gives them, its values are the ones used.
            let gated =
                bool_field(obj, "is_gated_act", proj.starts_with("gated-")).map_err(&fail)?;
            if !gated {
                let whence = match (obj.contains_key("is_gated_act"), given) {
                    (true, _) => "`is_gated_act` is false".to_string(),
                    (false, Some(_)) => format!("`feed_forward_proj` is `{proj}`"),
                    (false, None) if matches!(model_type, "t5" | "") => format!(
                        "`feed_forward_proj` is `{proj}` (transformers' default for T5, where the \
                         config does not say)"
                    ),
                    // A `d_model` config of another family (BART, Whisper): no FFN kind at all.
                    (false, None) => format!(
                        "`model_type` `{model_type}` has no `hidden_size` and no \
                         `feed_forward_proj`: not a gated feed-forward this crate reads"
                    ),
                };
                return Err(fail(format!(
                    "{whence}, which is not gated: expected `gated-<act>` such as `gated-gelu`"
                )));
            }
            let activation = match str_field(obj, "dense_act_fn").map_err(&fail)? {
                Some(name) => parse_act(name, "dense_act_fn").map_err(&fail)?,
                None => {
                    let act = proj.strip_prefix("gated-").unwrap_or(proj);
                    // T5Config turns `gated-gelu` into `gelu_new`, the tanh form.
                    let act = if act == "gelu" { "gelu_new" } else { act };
                    parse_act(act, "feed_forward_proj").map_err(&fail)?
                }
            };
            GluConfig::new(hidden, intermediate)
                .with_activation(activation)
                .with_layout(WeightLayout::T5)
        } else {
            let hidden = size_field(obj, "hidden_size").map_err(&fail)?;
            let intermediate = size_field(obj, "intermediate_size").map_err(&fail)?;
            let activation = match str_field(obj, "hidden_activation").map_err(&fail)? {
                Some(name) => parse_act(name, "hidden_activation").map_err(&fail)?,
                // Gemma 2 and 3 (and T5Gemma) never read `hidden_act`.
                None if later_gemma => Activation::GeluTanh,
                None => match str_field(obj, "hidden_act").map_err(&fail)? {
                    // Gemma's first checkpoints say `gelu` but were trained with the tanh form
                    // (transformers 4.38–4.47 ignored `hidden_act` and used it).
                    Some("gelu") if model_type == "gemma" => Activation::GeluTanh,
                    Some(name) => parse_act(name, "hidden_act").map_err(&fail)?,
                    None if gemma => Activation::GeluTanh,
                    None => Activation::Silu,
                },
            };
            let bias = bool_field(obj, "mlp_bias", false).map_err(&fail)?;
            let layout = match model_type {
                "phi3" => WeightLayout::Phi3,
                "mixtral" => WeightLayout::Mixtral,
                _ => WeightLayout::Llama,
            };
            GluConfig::new(hidden, intermediate)
                .with_activation(activation)
                .with_bias(bias)
                .with_layout(layout)
        };
        let fields = if is_t5 {
            ("d_model", "d_ff")
        } else {
            ("hidden_size", "intermediate_size")
        };
        validate_sizes(cfg.hidden_size, cfg.intermediate_size, path, Some(fields))?;
        Ok(cfg)
    }
}

/// `num_hidden_layers` (or T5's `num_layers`, GPT-2's `n_layer`) from a `config.json`: `None`
/// where it has none (or null), an error naming the key where it is not a non-negative integer.
pub(crate) fn num_layers_in_file(path: &Path) -> Result<Option<usize>> {
    let text = crate::files::read_json_text(path, MAX_CONFIG_BYTES)?;
    let root: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let obj = match root.get("text_config") {
        Some(text) if root.get("num_hidden_layers").is_none() => text,
        _ => &root,
    };
    let Some(obj) = obj.as_object() else {
        return Ok(None);
    };
    for key in ["num_hidden_layers", "num_layers", "n_layer"] {
        if matches!(obj.get(key), None | Some(Value::Null)) {
            continue;
        }
        return size_field(obj, key)
            .map(Some)
            .map_err(|message| Error::InvalidConfig {
                path: Some(path.to_path_buf()),
                message,
            });
    }
    Ok(None)
}

/// Checks the sizes; `fields` names where they came from (`hidden_size`, `d_ff`, a GGUF key).
pub(crate) fn validate_sizes(
    hidden: usize,
    intermediate: usize,
    path: Option<&Path>,
    fields: Option<(&str, &str)>,
) -> Result<()> {
    let fail = |message: String| {
        Err(Error::InvalidConfig {
            path: path.map(PathBuf::from),
            message,
        })
    };
    let (hidden_name, intermediate_name) = match fields {
        Some((h, i)) => (format!("`{h}`"), format!("`{i}`")),
        None => ("the hidden size".into(), "the intermediate size".into()),
    };
    for (name, value) in [(hidden_name, hidden), (intermediate_name, intermediate)] {
        if value == 0 {
            return fail(format!("{name} is 0, expected at least 1"));
        }
        if value > MAX_DIM {
            return fail(format!(
                "{name} is {value}, larger than the {MAX_DIM} any real model uses"
            ));
        }
    }
    if hidden.saturating_mul(intermediate) > MAX_PROJECTION_ELEMENTS {
        return fail(format!(
            "hidden size {hidden} × intermediate size {intermediate} is more than \
             {MAX_PROJECTION_ELEMENTS} weights per projection"
        ));
    }
    Ok(())
}

fn parse_act(name: &str, field: &str) -> std::result::Result<Activation, String> {
    name.parse::<Activation>()
        .map_err(|e| format!("`{field}`: {e}"))
}

pub(crate) fn size_field(
    obj: &Map<String, Value>,
    field: &str,
) -> std::result::Result<usize, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(format!("missing `{field}`")),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                format!(
                    "`{field}` must be a non-negative integer, found {}",
                    kind_of(v)
                )
            }),
    }
}

fn str_field<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
) -> std::result::Result<Option<&'a str>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(format!("`{field}` must be a string, found {}", kind_of(v))),
    }
}

/// A boolean field, `default` when absent or null.
pub(crate) fn bool_field(
    obj: &Map<String, Value>,
    field: &str,
    default: bool,
) -> std::result::Result<bool, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!(
            "`{field}` must be true or false, found {}",
            kind_of(v)
        )),
    }
}

/// A short description of a JSON value for error messages: its type and, for scalars, the value.
pub(crate) fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("`{n}`"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<GluConfig> {
        GluConfig::from_hf_json(json)
    }

    #[test]
    fn llama_style() {
        let cfg = parse(
            r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,
                "hidden_act":"silu","mlp_bias":false}"#,
        )
        .unwrap();
        assert_eq!(cfg, GluConfig::new(576, 1536));
        let cfg = parse(r#"{"hidden_size":8,"intermediate_size":16,"mlp_bias":true}"#).unwrap();
        assert!(cfg.bias);
        assert_eq!(cfg.activation, Activation::Silu);
    }

    #[test]
    fn gemma_prefers_hidden_activation_and_reads_legacy_gelu_as_tanh() {
        let cfg = parse(
            r#"{"model_type":"gemma2","hidden_size":8,"intermediate_size":16,
                "hidden_act":"gelu","hidden_activation":"gelu_pytorch_tanh"}"#,
        )
        .unwrap();
        assert_eq!(cfg.activation, Activation::GeluTanh);
        let legacy = r#"{"model_type":"gemma","hidden_size":8,"intermediate_size":16,
                         "hidden_act":"gelu"}"#;
        assert_eq!(parse(legacy).unwrap().activation, Activation::GeluTanh);
        let llama_gelu = r#"{"model_type":"llama","hidden_size":8,"intermediate_size":16,
                             "hidden_act":"gelu"}"#;
        assert_eq!(parse(llama_gelu).unwrap().activation, Activation::Gelu);
    }

    #[test]
    fn gemma_defaults_to_the_tanh_gelu_and_later_gemmas_read_only_hidden_activation() {
        let tanh = |json: &str| assert_eq!(parse(json).unwrap().activation, Activation::GeluTanh);
        // google/gemma-3-4b-it's nesting, no activation named: transformers' default.
        tanh(
            r#"{"model_type":"gemma3","text_config":{"model_type":"gemma3_text",
                "hidden_size":8,"intermediate_size":16}}"#,
        );
        tanh(r#"{"model_type":"gemma","hidden_size":8,"intermediate_size":16}"#);
        // Gemma 2 ignores `hidden_act` (exact `gelu` would be read for a Llama).
        tanh(
            r#"{"model_type":"gemma2","hidden_size":8,"intermediate_size":16,"hidden_act":"gelu"}"#,
        );
        // T5Gemma: the encoder's settings.
        let cfg = parse(
            r#"{"model_type":"t5gemma","encoder":{"hidden_size":8,"intermediate_size":16},
                "decoder":{"hidden_size":4,"intermediate_size":12}}"#,
        )
        .unwrap();
        assert_eq!((cfg.hidden_size, cfg.intermediate_size), (8, 16));
        assert_eq!(
            (cfg.activation, cfg.layout),
            (Activation::GeluTanh, WeightLayout::Llama)
        );
    }

    #[test]
    fn t5_defaults_as_transformers() {
        // T5Config's default `relu` is not gated; mT5's and UMT5's `gated-gelu` is.
        let err = parse(r#"{"model_type":"t5","d_model":8,"d_ff":16}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`relu` (transformers' default for T5"),
            "{err}"
        );
        let err = parse(r#"{"d_model":8,"d_ff":16}"#).unwrap_err().to_string();
        assert!(err.contains("not gated"), "{err}");
        // Another family with a `d_model` (BART): not called T5.
        let bart = r#"{"model_type":"bart","d_model":8,"d_ff":16}"#;
        let err = parse(bart).unwrap_err().to_string();
        assert!(
            err.contains("`model_type` `bart` has no `hidden_size`"),
            "{err}"
        );
        assert!(!err.contains("T5"), "{err}");
        for t in ["mt5", "umt5"] {
            let cfg = parse(&format!(r#"{{"model_type":"{t}","d_model":8,"d_ff":16}}"#)).unwrap();
            assert_eq!(cfg.activation, Activation::GeluTanh, "{t}");
        }
    }

    #[test]
    fn t5_gated_acts() {
        let cfg =
            parse(r#"{"model_type":"t5","d_model":8,"d_ff":16,"feed_forward_proj":"gated-gelu"}"#)
                .unwrap();
        assert_eq!(cfg.activation, Activation::GeluTanh);
        assert_eq!(cfg.layout, WeightLayout::T5);
        let cfg = parse(r#"{"d_model":8,"d_ff":16,"feed_forward_proj":"gated-silu"}"#).unwrap();
        assert_eq!(cfg.activation, Activation::Silu);
        let err = parse(r#"{"model_type":"t5","d_model":8,"d_ff":16,"feed_forward_proj":"relu"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not gated"), "{err}");
    }

    #[test]
    fn t5_explicit_act_fields_win_as_in_transformers() {
        // flan-T5's config.json repeats what `feed_forward_proj` implies.
        let flan = r#"{"model_type":"t5","d_model":8,"d_ff":16,"feed_forward_proj":"gated-gelu",
                       "dense_act_fn":"gelu_new","is_gated_act":true}"#;
        assert_eq!(parse(flan).unwrap().activation, Activation::GeluTanh);
        // Where they differ, transformers sets the config's own values after deriving its own.
        let exact = r#"{"model_type":"t5","d_model":8,"d_ff":16,"feed_forward_proj":"gated-gelu",
                        "dense_act_fn":"gelu"}"#;
        assert_eq!(parse(exact).unwrap().activation, Activation::Gelu);
        let ungated = r#"{"model_type":"t5","d_model":8,"d_ff":16,"feed_forward_proj":"gated-gelu",
                          "is_gated_act":false}"#;
        let err = parse(ungated).unwrap_err().to_string();
        assert!(err.contains("`is_gated_act` is false"), "{err}");
        let gated_relu = r#"{"model_type":"t5","d_model":8,"d_ff":16,"feed_forward_proj":"relu",
                             "is_gated_act":true}"#;
        assert_eq!(parse(gated_relu).unwrap().activation, Activation::Relu);
    }

    #[test]
    fn layouts_follow_model_type() {
        let phi3 = r#"{"model_type":"phi3","hidden_size":8,"intermediate_size":16}"#;
        assert_eq!(parse(phi3).unwrap().layout, WeightLayout::Phi3);
        let mixtral = r#"{"model_type":"mixtral","hidden_size":8,"intermediate_size":16}"#;
        assert_eq!(parse(mixtral).unwrap().layout, WeightLayout::Mixtral);
    }

    #[test]
    fn nested_text_config() {
        let cfg = parse(
            r#"{"model_type":"gemma3","text_config":{"model_type":"gemma3_text",
                "hidden_size":8,"intermediate_size":16,"hidden_activation":"gelu_pytorch_tanh"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.hidden_size, 8);
        assert_eq!(cfg.activation, Activation::GeluTanh);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            ("{", "invalid JSON"),
            ("[1]", "expected a JSON object, found an array"),
            (r#"{"intermediate_size":16}"#, "missing `hidden_size`"),
            (r#"{"hidden_size":8}"#, "missing `intermediate_size`"),
            (
                r#"{"hidden_size":-8,"intermediate_size":16}"#,
                "`hidden_size` must be a non-negative integer, found `-8`",
            ),
            (
                r#"{"hidden_size":"8","intermediate_size":16}"#,
                "found the string \"8\"",
            ),
            (
                r#"{"hidden_size":8.5,"intermediate_size":16}"#,
                "found `8.5`",
            ),
            (
                r#"{"hidden_size":0,"intermediate_size":16}"#,
                "`hidden_size` is 0, expected at least 1",
            ),
            (
                r#"{"hidden_size":8,"intermediate_size":1000000000000}"#,
                "`intermediate_size` is 1000000000000, larger than the 1048576",
            ),
            (
                r#"{"hidden_size":8,"intermediate_size":16,"hidden_act":"swiglu"}"#,
                "`hidden_act`: unknown activation `swiglu`",
            ),
            (
                r#"{"hidden_size":8,"intermediate_size":16,"hidden_act":3}"#,
                "`hidden_act` must be a string",
            ),
            (
                r#"{"hidden_size":8,"intermediate_size":16,"mlp_bias":"no"}"#,
                "`mlp_bias` must be true or false",
            ),
            (
                r#"{"hidden_size":1048576,"intermediate_size":1048576}"#,
                "weights per projection",
            ),
        ];
        for (json, want) in cases {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
