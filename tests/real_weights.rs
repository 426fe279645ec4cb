//! Real-weights parity: SmolLM2-135M-Instruct's FFNs fed the hidden states the real model puts
//! into them, against an independent float64 NumPy forward pass of the raw GGUF
//! (`scripts/make_smollm2_reference.py`, fixture `tests/fixtures/smollm2/reference.safetensors`).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::loading::{Checkpoint, LoadOptions};
use common::{assert_close, embedded_weights, fixtures, smollm2_gguf, Tol};

fn reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("smollm2/reference.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// `(layer, prompt)` pairs in the fixture.
const CASES: [(usize, usize); 4] = [(0, 0), (0, 1), (15, 0), (15, 1)];

/// Runs the checkpoint's FFNs on the fixture's inputs and asserts each within `tol`, relative,
/// of `want` (`ffn_out_bf16w` or `ffn_out_gguf`).
fn check(ckpt: &Checkpoint, opts: &LoadOptions, want: &str, tol: f64) {
    let r = reference();
    let cfg = ckpt.config().unwrap().clone();
    for (layer, p) in CASES {
        let ffn = ckpt.load_layer(&cfg, layer, opts).unwrap();
        let x = r[&format!("ffn_in.L{layer}.p{p}")]
            .to_dtype(opts.dtype)
            .unwrap();
        let y = ffn.forward(&x).unwrap();
        assert_eq!(y.dtype(), opts.dtype);
        let what = format!("layer {layer:>2} prompt {p} {:?} vs {want}", opts.dtype);
        let err = assert_close(
            &y,
            &r[&format!("{want}.L{layer}.p{p}")],
            Tol::Rel(tol),
            &what,
        );
        eprintln!("{what}: {err:.2e}");
    }
}

#[test]
fn embedded_bf16_weights_in_f32() {
    let ckpt = Checkpoint::open(embedded_weights()).unwrap();
    let opts = LoadOptions::new(DType::F32, Device::Cpu);
    // As the parity tests' f32 bound (measured 0.8e-7 to 6.5e-7 on the kernels and on candle's
    // ops, AMD Zen 4, 2026-12-07).
    check(&ckpt, &opts, "ffn_out_bf16w", 1e-5);
}

#[test]
fn embedded_bf16_weights_in_bf16() {
    // bf16 keeps 8 significant bits: rounding the input, the gated product and the output to
    // bf16 each costs up to 2^-9 ≈ 2e-3 of the largest value; 1e-2 leaves room for their sum.
    let ckpt = Checkpoint::open(embedded_weights()).unwrap();
    let opts = LoadOptions::new(DType::BF16, Device::Cpu);
    check(&ckpt, &opts, "ffn_out_bf16w", 1e-2);
}

#[test]
fn gguf_dequantized_in_f32() {
    let ckpt = Checkpoint::open(smollm2_gguf()).unwrap();
    let opts = LoadOptions::new(DType::F32, Device::Cpu).with_quantized(false);
    check(&ckpt, &opts, "ffn_out_gguf", 1e-5);
}

#[test]
fn gguf_quantized() {
    // The crate's Q4_1 kernels round the activations to 8 bits per 32 values for these few
    // tokens (5 and 9) where the CPU has AVX512-VNNI (measured 4.0e-3 to 1.2e-2), and read them
    // exactly where it has only AVX-512; candle's QMatMul, without the kernels, rounds them to
    // 8 bits (Q8_1) too.
    let ckpt = Checkpoint::open(smollm2_gguf()).unwrap();
    let opts = LoadOptions::new(DType::F32, Device::Cpu);
    check(&ckpt, &opts, "ffn_out_gguf", 2e-2);
}
