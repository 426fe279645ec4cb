//! What every loading target does with a file it managed to open: every public way of getting a
//! block out of it, quantized and dequantized, then a forward pass. Errors are fine; a panic, an
//! abort or an allocation beyond libFuzzer's `-malloc_limit_mb` is a bug.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::loading::{Checkpoint, LoadOptions};
use candle_glu::{Activation, GluConfig, GluFeedForward, WeightLayout};

/// A directory of this process's own, emptied before each input.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("candle-glu-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

/// Empties the scratch directory and writes `files` into it.
pub fn lay_out(files: &[(&str, &[u8])]) -> &'static Path {
    let dir = scratch();
    for entry in std::fs::read_dir(dir).expect("read scratch dir").flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("write scratch file");
    }
    dir
}

/// An error must say something, on one line.
pub fn check_message(e: &dyn std::fmt::Display) {
    let msg = e.to_string();
    assert!(!msg.trim().is_empty(), "empty error message");
}

fn forward(ffn: &GluFeedForward) {
    let h = ffn.config().hidden_size;
    for dtype in [DType::F32, DType::BF16] {
        let x = match Tensor::ones((2, h), dtype, &Device::Cpu) {
            Ok(x) => x,
            Err(_) => return,
        };
        match ffn.forward(&x) {
            Ok(y) => assert_eq!(y.dims(), x.dims(), "output shape"),
            Err(e) => check_message(&e),
        }
    }
}

/// Every config the checkpoint suggests for layer 0: its own, and one inferred from the shapes
/// in each layout whose weights exist.
fn configs(ckpt: &Checkpoint) -> Vec<GluConfig> {
    let mut cfgs: Vec<GluConfig> = ckpt.config().cloned().into_iter().collect();
    for &layout in WeightLayout::ALL {
        let _ = ckpt.layers(layout);
        let prefix = layout.layer_prefix(0);
        if ckpt.detect_layout(&prefix).is_some() {
            match ckpt.infer_config(&prefix, layout, Activation::Silu) {
                Ok(cfg) => cfgs.push(cfg),
                Err(e) => check_message(&e),
            }
        }
    }
    cfgs
}

pub fn exercise(path: &Path) {
    let ckpt = match Checkpoint::open(path) {
        Ok(ckpt) => ckpt,
        Err(e) => return check_message(&e),
    };
    for name in ckpt.tensor_names() {
        let _ = ckpt.tensor_shape(name);
    }
    let _ = ckpt.num_layers();
    for cfg in configs(&ckpt) {
        for quantized in [true, false] {
            let opts = LoadOptions::new(DType::F32, Device::Cpu).with_quantized(quantized);
            match ckpt.load_layer(&cfg, 0, &opts) {
                Ok(ffn) => forward(&ffn),
                Err(e) => check_message(&e),
            }
        }
        let opts = LoadOptions::new(DType::BF16, Device::Cpu).with_quantized(false);
        match ckpt.load_ffn(&cfg, &cfg.layout.layer_prefix(0), &opts) {
            Ok(ffn) => forward(&ffn),
            Err(e) => check_message(&e),
        }
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
        match GluFeedForward::new(&cfg, vb.pp(cfg.layout.layer_prefix(0))) {
            Ok(ffn) => forward(&ffn),
            Err(e) => check_message(&e),
        }
    }
}
