//! Where a checkpoint keeps the three projections of a gated feed-forward block.
//!
//! A checkpoint convention is a value, [`WeightLayout`], and its tensor names live in one table,
//! [`WeightLayout::names`]. Adding a convention means adding one variant and one row.
//!
//! | layout | gate W | up V | down W2 | one layer's prefix |
//! |---|---|---|---|---|
//! | `llama` (Mistral, Qwen, Gemma, SmolLM) | `gate_proj` | `up_proj` | `down_proj` | `model.layers.{i}.mlp` |
//! | `phi3` | first half of `gate_up_proj` | second half | `down_proj` | `model.layers.{i}.mlp` |
//! | `t5` (v1.1, gated) | `wi_0` | `wi_1` | `wo` | `encoder.block.{i}.layer.1.DenseReluDense` |
//! | `mixtral` (one expert) | `w1` | `w3` | `w2` | `model.layers.{i}.block_sparse_moe.experts.{e}` |
//! | `gguf` (llama.cpp) | `ffn_gate` | `ffn_up` | `ffn_down` | `blk.{i}` |
//!
//! Each projection is `<prefix>.<name>.weight`, shaped as PyTorch's `[out, in]`, with an optional
//! `<prefix>.<name>.bias`.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use crate::error::ParseError;

/// A checkpoint's naming convention for the gate, up and down projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum WeightLayout {
    /// Llama-style split projections: `gate_proj`, `up_proj`, `down_proj`.
    #[default]
    Llama,
    /// Phi-3's fused `gate_up_proj` of shape `[2·I, H]`, gate first, and `down_proj`.
    Phi3,
    /// T5 v1.1's gated `DenseReluDense`: `wi_0` (activated), `wi_1`, `wo`.
    ///
    /// Load these blocks in f32 or bf16, not f16: T5's activations overflow f16's range, which
    /// is why transformers keeps `wo` in f32 (`_keep_in_fp32_modules`) even in an f16 model;
    /// this crate loads a block's three weights in one dtype.
    T5,
    /// One Mixtral expert: `w1` (gate), `w3` (up), `w2` (down).
    Mixtral,
    /// llama.cpp's GGUF names: `ffn_gate`, `ffn_up`, `ffn_down`.
    Gguf,
}

/// The tensor names of one layout, relative to the block's prefix and without `.weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionNames {
    /// How the gate and up projections are stored.
    pub gate_up: GateUpNames,
    /// The down projection W2, `[H, I]`.
    pub down: &'static str,
}

/// How a layout stores the gate (W) and up (V) projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GateUpNames {
    /// Two tensors of shape `[I, H]`.
    #[non_exhaustive]
    Split {
        /// The gate projection W, the one that goes through σ.
        gate: &'static str,
        /// The up projection V.
        up: &'static str,
    },
    /// One tensor of shape `[2·I, H]`: rows `0..I` are the gate, rows `I..2·I` the up projection.
    #[non_exhaustive]
    Fused {
        /// The fused tensor.
        gate_up: &'static str,
    },
}

impl ProjectionNames {
    /// Every weight name of the layout, relative to the prefix and without `.weight`.
    pub fn all(&self) -> Vec<&'static str> {
        match self.gate_up {
            GateUpNames::Split { gate, up } => vec![gate, up, self.down],
            GateUpNames::Fused { gate_up } => vec![gate_up, self.down],
        }
    }
}

impl WeightLayout {
    /// Every layout, in the order [`detect`](Self::detect) tries them.
    pub const ALL: &'static [WeightLayout] = &[
        WeightLayout::Llama,
        WeightLayout::Phi3,
        WeightLayout::T5,
        WeightLayout::Mixtral,
        WeightLayout::Gguf,
    ];

    /// The names [`FromStr`] accepts.
    pub const NAMES: &'static [&'static str] = &["llama", "phi3", "t5", "mixtral", "gguf"];

    /// Each weight of the layout (relative to the prefix, without `.weight`) with the shape,
    /// PyTorch's `[out, in]`, that a block of hidden size `h` and intermediate size `i` gives it.
    ///
    /// ```rust
    /// use candle_glu::WeightLayout;
    /// let shapes = WeightLayout::Phi3.projection_shapes(576, 1536);
    /// assert_eq!(shapes, [("gate_up_proj", [3072, 576]), ("down_proj", [576, 1536])]);
    /// ```
    pub fn projection_shapes(&self, h: usize, i: usize) -> Vec<(&'static str, [usize; 2])> {
        let names = self.names();
        let mut shapes = match names.gate_up {
            GateUpNames::Split { gate, up } => vec![(gate, [i, h]), (up, [i, h])],
            // (Saturating: no real size comes near, and a shape of usize::MAX matches nothing.)
            GateUpNames::Fused { gate_up } => vec![(gate_up, [i.saturating_mul(2), h])],
        };
        shapes.push((names.down, [h, i]));
        shapes
    }

    /// The layout's tensor names.
    pub fn names(&self) -> ProjectionNames {
        use GateUpNames::{Fused, Split};
        let (gate_up, down) = match self {
            WeightLayout::Llama => (
                Split {
                    gate: "gate_proj",
                    up: "up_proj",
                },
                "down_proj",
            ),
            WeightLayout::Phi3 => (
                Fused {
                    gate_up: "gate_up_proj",
                },
                "down_proj",
            ),
            WeightLayout::T5 => (
                Split {
                    gate: "wi_0",
                    up: "wi_1",
                },
                "wo",
            ),
            WeightLayout::Mixtral => (
                Split {
                    gate: "w1",
                    up: "w3",
                },
                "w2",
            ),
            WeightLayout::Gguf => (
                Split {
                    gate: "ffn_gate",
                    up: "ffn_up",
                },
                "ffn_down",
            ),
        };
        ProjectionNames { gate_up, down }
    }

    /// The prefix of layer `layer`'s block in a whole-model checkpoint, e.g.
    /// `model.layers.3.mlp`. For [`Mixtral`](Self::Mixtral) this is expert 0; see
    /// [`expert_prefix`](Self::expert_prefix). For [`T5`](Self::T5) it is the encoder's block.
    pub fn layer_prefix(&self, layer: usize) -> String {
        match self {
            WeightLayout::Llama | WeightLayout::Phi3 => format!("model.layers.{layer}.mlp"),
            WeightLayout::T5 => format!("encoder.block.{layer}.layer.1.DenseReluDense"),
            WeightLayout::Mixtral => Self::mixtral_expert(layer, 0),
            WeightLayout::Gguf => format!("blk.{layer}"),
        }
    }

    /// The prefix of expert `expert` in layer `layer`, for mixture-of-experts layouts (Mixtral);
    /// `None` for dense layouts.
    pub fn expert_prefix(&self, layer: usize, expert: usize) -> Option<String> {
        match self {
            WeightLayout::Mixtral => Some(Self::mixtral_expert(layer, expert)),
            _ => None,
        }
    }

    fn mixtral_expert(layer: usize, expert: usize) -> String {
        format!("model.layers.{layer}.block_sparse_moe.experts.{expert}")
    }

    /// The layer a tensor name belongs to in this layout's naming: `Some(3)` for
    /// `model.layers.3.mlp.gate_proj.weight` in the Llama layout. For
    /// [`Mixtral`](Self::Mixtral), whose blocks are experts, the layer of expert 0's tensors
    /// (`None` for the other experts').
    pub fn layer_of(&self, name: &str) -> Option<usize> {
        // Split the template around a marker layer number.
        let template = self.layer_prefix(usize::MAX);
        let (before, after) = template.split_once(&usize::MAX.to_string())?;
        let rest = name.strip_prefix(before)?;
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let layer = rest[..digits].parse().ok()?;
        rest[digits..]
            .strip_prefix(after)?
            .starts_with('.')
            .then_some(layer)
    }

    /// The layout whose weights all exist under a `VarBuilder`'s prefix. Layouts are tried in
    /// the order of [`ALL`](Self::ALL); `None` when no layout is complete. (For an opened
    /// checkpoint, [`Checkpoint::detect_layout`](crate::loading::Checkpoint::detect_layout).)
    ///
    /// ```rust
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_glu::WeightLayout;
    /// let mut ws = std::collections::HashMap::new();
    /// for name in ["gate_up_proj", "down_proj"] {
    ///     ws.insert(format!("mlp.{name}.weight"), Tensor::zeros((4, 4), DType::F32, &Device::Cpu)?);
    /// }
    /// let vb = candle_nn::VarBuilder::from_tensors(ws, DType::F32, &Device::Cpu);
    /// assert_eq!(WeightLayout::detect(&vb.pp("mlp")), Some(WeightLayout::Phi3));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn detect(vb: &candle_nn::VarBuilder) -> Option<WeightLayout> {
        Self::detect_by(|name| vb.contains_tensor(name))
    }

    /// [`detect`](Self::detect) given a test for names relative to the block's prefix.
    pub(crate) fn detect_by(contains: impl Fn(&str) -> bool) -> Option<WeightLayout> {
        Self::ALL.iter().copied().find(|layout| {
            layout
                .names()
                .all()
                .iter()
                .all(|name| contains(&format!("{name}.weight")))
        })
    }
}

impl fmt::Display for WeightLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            WeightLayout::Llama => "llama",
            WeightLayout::Phi3 => "phi3",
            WeightLayout::T5 => "t5",
            WeightLayout::Mixtral => "mixtral",
            WeightLayout::Gguf => "gguf",
        };
        f.write_str(name)
    }
}

impl FromStr for WeightLayout {
    type Err = ParseError;

    /// Parses a layout name (see [`NAMES`](Self::NAMES)); surrounding whitespace and ASCII case
    /// are ignored.
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        let name = s.trim().to_ascii_lowercase();
        Self::ALL
            .iter()
            .copied()
            .find(|layout| layout.to_string() == name)
            .ok_or_else(|| ParseError::new("weight layout", s, Self::NAMES))
    }
}

/// As its name (`"llama"`, `"t5"`, ...), so that a layout can sit in a model's config.
impl serde::Serialize for WeightLayout {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// From its name, as [`FromStr`] reads it.
impl<'de> serde::Deserialize<'de> for WeightLayout {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// `name` under `prefix`, without a leading dot at the root: `model.layers.0.mlp` + `up_proj`.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Up to three names from `names` closest to `wanted`, for a missing tensor's "did you mean":
/// those sharing its longest prefix first, then by edit distance.
pub(crate) fn closest_names<'a>(
    wanted: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut scored: Vec<(usize, usize, &str)> = names
        .into_iter()
        .filter(|n| *n != wanted)
        .map(|n| {
            let common = wanted
                .bytes()
                .zip(n.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            (usize::MAX - common, edit_distance(wanted, n), n)
        })
        .collect();
    scored.sort_unstable();
    scored.dedup_by_key(|s| s.2);
    scored
        .into_iter()
        .take(3)
        .map(|(_, _, n)| n.to_string())
        .collect()
}

/// Levenshtein distance over the first 256 characters of each name: real tensor names are far
/// shorter, and a hostile file's megabyte-long names must not make an error message slow.
fn edit_distance(a: &str, b: &str) -> usize {
    const MAX_CHARS: usize = 256;
    let a = &a[..a.char_indices().nth(MAX_CHARS).map_or(a.len(), |(i, _)| i)];
    let b: Vec<char> = b.chars().take(MAX_CHARS).collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Tensor names of known layouts that exist (by `contains`, on full names) near `missing`: under
/// the same block prefix in another layout, or under a prefix one common slip away (`.mlp` left
/// out or doubled, `model.` left out). For stores that can say whether a name exists but not
/// list their names, as a `VarBuilder`; ranked by [`closest_names`].
pub(crate) fn nearby_names(missing: &str, contains: impl Fn(&str) -> bool) -> Vec<String> {
    let block = missing
        .rsplit_once('.')
        .and_then(|(rest, _)| rest.rsplit_once('.'))
        .map_or("", |(block, _)| block);
    let mut bases = vec![
        block.to_string(),
        format!("{block}.mlp"),
        format!("model.{block}"),
    ];
    if let Some(parent) = block.strip_suffix(".mlp") {
        bases.push(parent.to_string());
    }
    let mut found = Vec::new();
    for base in bases {
        for &layout in WeightLayout::ALL {
            for proj in layout.names().all() {
                for suffix in ["weight", "bias"] {
                    let name = join(&base, &format!("{proj}.{suffix}"));
                    let name = name.trim_start_matches('.').to_string();
                    if contains(&name) {
                        found.push(name);
                    }
                }
            }
        }
    }
    closest_names(missing, found.iter().map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &layout in WeightLayout::ALL {
            assert_eq!(layout.to_string().parse::<WeightLayout>().unwrap(), layout);
            assert!(WeightLayout::NAMES.contains(&layout.to_string().as_str()));
        }
        let err = "neox".parse::<WeightLayout>().unwrap_err().to_string();
        assert!(err.contains("`neox`") && err.contains("phi3"), "{err}");
    }

    #[test]
    fn detection_needs_every_weight() {
        let phi3 = ["gate_up_proj.weight", "down_proj.weight"];
        assert_eq!(
            WeightLayout::detect_by(|n| phi3.contains(&n)),
            Some(WeightLayout::Phi3)
        );
        let t5 = ["wi_0.weight", "wi_1.weight", "wo.weight", "wi_0.bias"];
        assert_eq!(
            WeightLayout::detect_by(|n| t5.contains(&n)),
            Some(WeightLayout::T5)
        );
        let incomplete = ["gate_proj.weight", "up_proj.weight"];
        assert_eq!(WeightLayout::detect_by(|n| incomplete.contains(&n)), None);
    }

    #[test]
    fn closest_names_prefer_the_longest_shared_prefix() {
        let names = [
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.10.mlp.gate_proj.weight",
            "lm_head.weight",
        ];
        let got = closest_names("model.layers.1.mlp.gate_proj.weight", names);
        assert_eq!(got[0], "model.layers.10.mlp.gate_proj.weight");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn nearby_names_find_a_slipped_prefix_or_another_layout() {
        let exists = [
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ];
        let contains = |n: &str| exists.contains(&n);
        let got = nearby_names("model.layers.0.gate_proj.weight", contains);
        assert_eq!(got[0], "model.layers.0.mlp.gate_proj.weight");
        let got = nearby_names("model.layers.0.mlp.gate_up_proj.weight", contains);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(nearby_names("model.layers.7.mlp.gate_proj.weight", contains).is_empty());
    }

    #[test]
    fn layer_prefixes() {
        assert_eq!(WeightLayout::Llama.layer_prefix(3), "model.layers.3.mlp");
        assert_eq!(WeightLayout::Gguf.layer_prefix(0), "blk.0");
        assert_eq!(
            WeightLayout::Mixtral.expert_prefix(1, 7).unwrap(),
            "model.layers.1.block_sparse_moe.experts.7"
        );
        assert_eq!(WeightLayout::Llama.expert_prefix(1, 7), None);
        let llama = WeightLayout::Llama;
        assert_eq!(
            llama.layer_of("model.layers.12.mlp.up_proj.weight"),
            Some(12)
        );
        assert_eq!(
            llama.layer_of("model.layers.12.self_attn.q_proj.weight"),
            None
        );
        assert_eq!(llama.layer_of("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(
            WeightLayout::Gguf.layer_of("blk.29.ffn_down.weight"),
            Some(29)
        );
        assert_eq!(
            WeightLayout::T5.layer_of("encoder.block.5.layer.1.DenseReluDense.wo.weight"),
            Some(5)
        );
    }
}
