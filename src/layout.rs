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

use std::fmt;
use std::str::FromStr;

use crate::Error;

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
    T5,
    /// One Mixtral expert: `w1` (gate), `w3` (up), `w2` (down).
    Mixtral,
    /// llama.cpp's GGUF names: `ffn_gate`, `ffn_up`, `ffn_down`.
    Gguf,
}

/// The tensor names of one layout, relative to the block's prefix and without `.weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionNames {
    /// How the gate and up projections are stored.
    pub gate_up: GateUpNames,
    /// The down projection W2, `[H, I]`.
    pub down: &'static str,
}

/// How a layout stores the gate (W) and up (V) projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateUpNames {
    /// Two tensors of shape `[I, H]`.
    Split {
        /// The gate projection W, the one that goes through σ.
        gate: &'static str,
        /// The up projection V.
        up: &'static str,
    },
    /// One tensor of shape `[2·I, H]`: rows `0..I` are the gate, rows `I..2·I` the up projection.
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
    pub const ALL: [WeightLayout; 5] = [
        WeightLayout::Llama,
        WeightLayout::Phi3,
        WeightLayout::T5,
        WeightLayout::Mixtral,
        WeightLayout::Gguf,
    ];

    /// The names [`FromStr`] accepts.
    pub const NAMES: &'static [&'static str] = &["llama", "phi3", "t5", "mixtral", "gguf"];

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
    /// `model.layers.3.mlp.gate_proj.weight` in the Llama layout.
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

    /// Finds the layout whose weights all exist, given a test for names relative to the
    /// block's prefix (e.g. `|n| vb.contains_tensor(n)`). Layouts are tried in the order of
    /// [`ALL`](Self::ALL); `None` when no layout is complete.
    pub fn detect(contains: impl Fn(&str) -> bool) -> Option<WeightLayout> {
        Self::ALL.into_iter().find(|layout| {
            layout
                .names()
                .all()
                .iter()
                .all(|name| contains(&format!("{name}.weight")))
        })
    }

    /// [`detect`](Self::detect) on the tensors under a `VarBuilder`'s prefix.
    pub fn detect_in(vb: &candle_nn::VarBuilder) -> Option<WeightLayout> {
        Self::detect(|name| vb.contains_tensor(name))
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
    type Err = Error;

    fn from_str(s: &str) -> std::result::Result<Self, Error> {
        let name = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|layout| layout.to_string() == name)
            .ok_or_else(|| Error::UnknownLayout {
                name: s.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for layout in WeightLayout::ALL {
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
            WeightLayout::detect(|n| phi3.contains(&n)),
            Some(WeightLayout::Phi3)
        );
        let t5 = ["wi_0.weight", "wi_1.weight", "wo.weight", "wi_0.bias"];
        assert_eq!(
            WeightLayout::detect(|n| t5.contains(&n)),
            Some(WeightLayout::T5)
        );
        let incomplete = ["gate_proj.weight", "up_proj.weight"];
        assert_eq!(WeightLayout::detect(|n| incomplete.contains(&n)), None);
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
