//! Real-weights parity: SmolLM2-135M-Instruct's FFNs fed the hidden states the real model puts
//! into them, against an independent float64 NumPy forward pass of the raw GGUF
//! (`scripts/make_smollm2_reference.py`, fixture `tests/fixtures/smollm2/reference.safetensors`).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::loading::{Checkpoint, LoadOptions};
use common::{embedded_weights, fixtures, rel_err, smollm2_gguf};

fn reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("smollm2/reference.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// `(layer, prompt)` pairs in the fixture.
const CASES: [(usize, usize); 4] = [(0, 0), (0, 1), (15, 0), (15, 1)];

/// Runs the checkpoint's FFNs on the fixture's inputs; returns the worst relative error
/// against `want` (`ffn_out_bf16w` or `ffn_out_gguf`).
fn worst(ckpt: &Checkpoint, opts: &LoadOptions, want: &str) -> f64 {
    let r = reference();
    let cfg = ckpt.config().unwrap().clone();
    let mut worst: f64 = 0.0;
    for (layer, p) in CASES {
        let ffn = ckpt.load_layer(&cfg, layer, opts).unwrap();
        let x = r[&format!("ffn_in.L{layer}.p{p}")]
            .to_dtype(opts.dtype)
            .unwrap();
        let y = ffn.forward(&x).unwrap();
        assert_eq!(y.dtype(), opts.dtype);
        let err = rel_err(&y, &r[&format!("{want}.L{layer}.p{p}")]);
        eprintln!(
            "layer {layer:>2} prompt {p} {:?} vs {want}: {err:.2e}",
            opts.dtype
        );
        worst = worst.max(err);
    }
    worst
}

#[test]
fn embedded_bf16_weights_in_f32() {
    let ckpt = Checkpoint::open(embedded_weights()).unwrap();
    let err = worst(
        &ckpt,
        &LoadOptions::new(DType::F32, Device::Cpu),
        "ffn_out_bf16w",
    );
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn embedded_bf16_weights_in_bf16() {
    // bf16 keeps 8 significant bits: rounding the input, the gated product and the output to
    // bf16 each costs up to 2^-9 ≈ 2e-3 of the largest value; 1e-2 leaves room for their sum.
    let ckpt = Checkpoint::open(embedded_weights()).unwrap();
    let err = worst(
        &ckpt,
        &LoadOptions::new(DType::BF16, Device::Cpu),
        "ffn_out_bf16w",
    );
    assert!(err <= 1e-2, "{err}");
}

#[test]
fn gguf_dequantized_in_f32() {
    let ckpt = Checkpoint::open(smollm2_gguf()).unwrap();
    let opts = LoadOptions::new(DType::F32, Device::Cpu).with_quantized(false);
    let err = worst(&ckpt, &opts, "ffn_out_gguf");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn gguf_quantized() {
    // candle's Q4_1 matmul quantizes the activations to 8 bits (Q8_1) before the dot products.
    let ckpt = Checkpoint::open(smollm2_gguf()).unwrap();
    let err = worst(
        &ckpt,
        &LoadOptions::new(DType::F32, Device::Cpu),
        "ffn_out_gguf",
    );
    assert!(err <= 2e-2, "{err}");
}
