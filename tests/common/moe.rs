//! The transformers sparse-MoE fixtures of `scripts/make_moe_fixtures.py`, shared by
//! `tests/moe.rs` (the CPU) and `tests/gpu.rs` (CUDA).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
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

/// A two-layer DeepSeek-V3 checkpoint in `dir` (`config.json`, `model.safetensors`): layer 0
/// a dense FFN (`first_k_dense_replace` = 1; hidden 72, intermediate 56, deterministic
/// weights), layer 1 the fixture's mixture of experts. Returns the dense weights `[gate, up,
/// down]`.
pub fn deepseek_with_a_dense_layer(dir: &std::path::Path) -> [Tensor; 3] {
    let text = std::fs::read_to_string(self::dir("deepseek_v3").join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["num_hidden_layers"] = 2.into();
    cfg["first_k_dense_replace"] = 1.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let (h, i) = (72, 56);
    let det = |rows: usize, cols: usize, seed: f64| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|j| ((j as f64 * 0.7 + seed).sin() * 0.2) as f32)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    };
    let dense = [det(i, h, 0.1), det(i, h, 1.3), det(h, i, 2.9)];
    let mut ws: HashMap<String, Tensor> = weights("deepseek_v3")
        .into_iter()
        .map(|(n, t)| (n.replace("model.layers.0.", "model.layers.1."), t))
        .collect();
    for (name, w) in ["gate_proj", "up_proj", "down_proj"].iter().zip(&dense) {
        ws.insert(format!("model.layers.0.mlp.{name}.weight"), w.clone());
    }
    candle_core::safetensors::save(&ws, dir.join("model.safetensors")).unwrap();
    dense
}

/// `ws`, each converted by `convert`, as variables, and the same tensors (for a `VarBuilder`
/// whose weights are then trained).
pub fn variables(
    ws: &HashMap<String, Tensor>,
    convert: impl Fn(&Tensor) -> Tensor,
) -> (HashMap<String, Var>, HashMap<String, Tensor>) {
    let vars: HashMap<String, Var> = ws
        .iter()
        .map(|(k, v)| (k.clone(), Var::from_tensor(&convert(v)).unwrap()))
        .collect();
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    (vars, tensors)
}
