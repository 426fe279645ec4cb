//! The transformers sparse-MoE fixtures of `scripts/make_moe_fixtures.py`, shared by
//! `tests/moe.rs` (the CPU) and `tests/gpu.rs` (CUDA).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_glu::{GluExperts, MoeConfig};
use candle_nn::VarBuilder;

/// Every family's fixture.
pub const CASES: [&str; 5] = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"];

/// The fixture's folder.
pub fn dir(case: &str) -> PathBuf {
    super::fixtures().join("moe").join(case)
}

/// Its config.
pub fn config(case: &str) -> MoeConfig {
    MoeConfig::from_hf_config_file(dir(case).join("config.json")).unwrap()
}

/// Its `model.safetensors` tensors, on the CPU, as stored.
pub fn weights(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(case).join("model.safetensors"), &Device::Cpu).unwrap()
}

/// Its inputs and transformers' outputs (`x`, `y_f64`, `y_torch_bf16`, ...), on the CPU.
pub fn io(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(case).join("io.safetensors"), &Device::Cpu).unwrap()
}

/// Where the layer's tensors are in `model.safetensors`.
pub fn prefix(case: &str) -> &'static str {
    if case == "mixtral" {
        "model.layers.0.block_sparse_moe"
    } else {
        "model.layers.0.mlp"
    }
}

/// The files of the case's storages: per-expert tensors, and (Mixtral, DeepSeek-V3) the
/// stacked `[E, 2I, H]` tensors transformers keeps in memory.
pub fn files(case: &str) -> &'static [&'static str] {
    if matches!(case, "mixtral" | "deepseek_v3") {
        &["model.safetensors", "fused.safetensors"]
    } else {
        &["model.safetensors"]
    }
}

/// The layer from `file` of the case, in `dtype` on `dev`.
pub fn layer(case: &str, file: &str, dtype: DType, dev: &Device) -> GluExperts {
    let cfg = config(case);
    let bytes = std::fs::read(dir(case).join(file)).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(bytes, dtype, dev).unwrap();
    let prefix = if file == "fused.safetensors" {
        "model.layers.0.mlp"
    } else {
        prefix(case)
    };
    GluExperts::new(&cfg, vb.pp(prefix)).unwrap()
}
