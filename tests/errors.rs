//! Bad inputs give one clear error that names the tensor, shape or field; never a panic.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::{Activation, GluConfig, GluFeedForward, Projection, WeightLayout};
use candle_nn::{Linear, VarBuilder};
use common::manifest;

const H: usize = 72;
const I: usize = 184;

/// The `llama_silu` fixture's tensors, editable.
fn llama_tensors() -> HashMap<String, Tensor> {
    let case = manifest()
        .cases
        .into_iter()
        .find(|c| c.name == "llama_silu")
        .unwrap();
    candle_core::safetensors::load(case.dir().join("model.safetensors"), &Device::Cpu).unwrap()
}

fn vb(ts: HashMap<String, Tensor>) -> VarBuilder<'static> {
    VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu)
}

fn new_err(cfg: &GluConfig, vb: VarBuilder, prefix: &str) -> String {
    GluFeedForward::new(cfg, vb.pp(prefix))
        .unwrap_err()
        .to_string()
}

#[test]
fn missing_tensor_names_it_and_what_exists() {
    let cfg = GluConfig::new(H, I).with_layout(WeightLayout::Phi3);
    let err = new_err(&cfg, vb(llama_tensors()), "model.layers.0.mlp");
    assert!(
        err.contains("missing tensor `model.layers.0.mlp.gate_up_proj.weight`"),
        "{err}"
    );
    assert!(
        err.contains("`model.layers.0.mlp.gate_proj.weight`"),
        "{err}"
    );
}

#[test]
fn missing_tensor_suggests_the_prefix_that_was_meant() {
    let cfg = GluConfig::new(H, I);
    let err = new_err(&cfg, vb(llama_tensors()), "model.layers.0");
    assert!(
        err.contains("missing tensor `model.layers.0.gate_proj.weight`"),
        "{err}"
    );
    assert!(
        err.contains("`model.layers.0.mlp.gate_proj.weight`"),
        "{err}"
    );
    let err = new_err(&cfg, vb(llama_tensors()), "layers.0.mlp");
    assert!(
        err.contains("`model.layers.0.mlp.gate_proj.weight`"),
        "{err}"
    );
}

#[test]
fn missing_tensor_with_nothing_nearby() {
    let err = new_err(
        &GluConfig::new(H, I),
        vb(llama_tensors()),
        "model.layers.7.mlp",
    );
    assert_eq!(err, "missing tensor `model.layers.7.mlp.gate_proj.weight`");
}

#[test]
fn wrong_shape_says_which_expected_and_found() {
    let cfg = GluConfig::new(H, 100);
    let err = new_err(&cfg, vb(llama_tensors()), "model.layers.0.mlp");
    assert_eq!(
        err,
        "tensor `model.layers.0.mlp.gate_proj.weight` has shape [184, 72], expected [100, 72]"
    );
}

#[test]
fn transposed_weight_is_called_out() {
    let mut ts = llama_tensors();
    let name = "model.layers.0.mlp.up_proj.weight";
    let t = ts[name].t().unwrap().contiguous().unwrap();
    ts.insert(name.into(), t);
    let err = new_err(&GluConfig::new(H, I), vb(ts), "model.layers.0.mlp");
    assert!(
        err.contains("`model.layers.0.mlp.up_proj.weight` has shape [72, 184], expected [184, 72]"),
        "{err}"
    );
    assert!(err.contains("looks transposed"), "{err}");
}

#[test]
fn fused_gate_up_with_odd_rows() {
    let mut ts = HashMap::new();
    let dev = Device::Cpu;
    ts.insert(
        "mlp.gate_up_proj.weight".into(),
        Tensor::zeros((2 * I - 1, H), DType::F32, &dev).unwrap(),
    );
    ts.insert(
        "mlp.down_proj.weight".into(),
        Tensor::zeros((H, I), DType::F32, &dev).unwrap(),
    );
    let cfg = GluConfig::new(H, I).with_layout(WeightLayout::Phi3);
    let err = new_err(&cfg, vb(ts), "mlp");
    assert_eq!(
        err,
        "tensor `mlp.gate_up_proj.weight` has shape [367, 72], expected [368, 72]"
    );
}

#[test]
fn biases_must_agree_with_the_config() {
    let mut ts = llama_tensors();
    // bias = true but the checkpoint has none.
    let err = new_err(
        &GluConfig::new(H, I).with_bias(true),
        vb(ts.clone()),
        "model.layers.0.mlp",
    );
    assert!(
        err.contains("missing tensor `model.layers.0.mlp.gate_proj.bias`"),
        "{err}"
    );
    // Some projections have a bias, others not.
    ts.insert(
        "model.layers.0.mlp.gate_proj.bias".into(),
        Tensor::zeros(I, DType::F32, &Device::Cpu).unwrap(),
    );
    for bias in [false, true] {
        let err = new_err(
            &GluConfig::new(H, I).with_bias(bias),
            vb(ts.clone()),
            "model.layers.0.mlp",
        );
        assert!(err.contains("biases exist for only some projections: found `model.layers.0.mlp.gate_proj.bias`, missing `model.layers.0.mlp.up_proj.bias`, `model.layers.0.mlp.down_proj.bias`"), "{err}");
    }
    // Every projection has one but the config says none: refusing beats ignoring them.
    for p in ["up_proj", "down_proj"] {
        let n = if p == "down_proj" { H } else { I };
        ts.insert(
            format!("model.layers.0.mlp.{p}.bias"),
            Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let err = new_err(&GluConfig::new(H, I), vb(ts.clone()), "model.layers.0.mlp");
    assert!(err.contains("but the config has bias = false"), "{err}");
    assert!(GluFeedForward::new(
        &GluConfig::new(H, I).with_bias(true),
        vb(ts).pp("model.layers.0.mlp")
    )
    .is_ok());
}

#[test]
fn invalid_configs() {
    for (cfg, want) in [
        (GluConfig::new(0, I), "the hidden size is 0"),
        (GluConfig::new(H, 0), "the intermediate size is 0"),
        (
            GluConfig::new(H, 1_000_000_000_000),
            "intermediate size is 1000000000000",
        ),
    ] {
        let err = new_err(&cfg, vb(llama_tensors()), "model.layers.0.mlp");
        assert!(
            err.starts_with("invalid config: ") && err.contains(want),
            "{err}"
        );
    }
}

fn llama_ffn() -> GluFeedForward {
    GluFeedForward::new(
        &GluConfig::new(H, I),
        vb(llama_tensors()).pp("model.layers.0.mlp"),
    )
    .unwrap()
}

#[test]
fn input_with_the_wrong_last_dimension() {
    let ffn = llama_ffn();
    let x = Tensor::zeros((2, 5, 71), DType::F32, &Device::Cpu).unwrap();
    let err = ffn.forward(&x).unwrap_err().to_string();
    assert_eq!(
        err,
        "input of shape [2, 5, 71] does not end in the hidden size 72"
    );
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    let err = ffn.forward(&scalar).unwrap_err().to_string();
    assert_eq!(err, "input of shape [] does not end in the hidden size 72");
}

#[test]
fn integer_input() {
    let x = Tensor::zeros((2, H), DType::U32, &Device::Cpu).unwrap();
    let err = llama_ffn().forward(&x).unwrap_err().to_string();
    assert!(
        err.contains("input has dtype U32, expected a floating-point dtype"),
        "{err}"
    );
}

#[test]
fn zero_tokens_give_an_empty_output() {
    let ffn = llama_ffn();
    for shape in [vec![0, H], vec![2, 0, H]] {
        let x = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
        let y = ffn.forward(&x).unwrap();
        assert_eq!(y.dims(), shape.as_slice());
    }
}

#[test]
fn nan_and_inf_propagate() {
    let ffn = llama_ffn();
    let mut row = vec![0.5f32; H];
    row[3] = f32::NAN;
    let y = ffn
        .forward(&Tensor::new(row.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    assert!(y.to_vec1::<f32>().unwrap().iter().all(|v| v.is_nan()));
    row[3] = f32::INFINITY;
    let y = ffn
        .forward(&Tensor::new(row.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    assert!(y.to_vec1::<f32>().unwrap().iter().any(|v| !v.is_finite()));
}

/// A projection `[o, n]` of zeros, with a bias of zeros if asked.
fn zeros_projection(o: usize, n: usize, bias: bool) -> Projection {
    let dev = Device::Cpu;
    let w = Tensor::zeros((o, n), DType::F32, &dev).unwrap();
    let b = bias.then(|| Tensor::zeros(o, DType::F32, &dev).unwrap());
    Projection::Dense(Linear::new(w, b))
}

fn from_projections(cfg: &GluConfig, biases: [bool; 3]) -> candle_core::Result<GluFeedForward> {
    let [g, u, d] = biases;
    GluFeedForward::from_projections(
        cfg,
        zeros_projection(I, H, g),
        zeros_projection(I, H, u),
        zeros_projection(H, I, d),
    )
}

#[test]
fn from_projections_checks_biases_against_the_config() {
    let cfg = GluConfig::new(H, I);
    // Biases everywhere, but the config says none: refused, not ignored.
    let err = from_projections(&cfg, [true; 3]).unwrap_err().to_string();
    assert_eq!(
        err,
        "the projections have biases but the config has bias = false; use `with_bias(true)`"
    );
    // The config says biases, the projections have none.
    let err = from_projections(&cfg.clone().with_bias(true), [false; 3])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "the config has bias = true but no projection has a bias"
    );
    // Biases on only some projections, whatever the config says.
    for bias in [false, true] {
        let cfg = cfg.clone().with_bias(bias);
        for (biases, found) in [
            ([true, false, false], "gate_proj"),
            ([false, true, true], "up_proj, down_proj"),
            ([true, true, false], "gate_proj, up_proj"),
        ] {
            let err = from_projections(&cfg, biases).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("biases exist for only some projections: {found}"),
                "bias = {bias}, {biases:?}"
            );
        }
    }
    // Agreeing either way: built, and the config says what the block holds.
    for bias in [false, true] {
        let ffn = from_projections(&cfg.clone().with_bias(bias), [bias; 3]).unwrap();
        assert_eq!(ffn.config().bias, bias);
        assert_eq!(ffn.down_proj().bias().is_some(), bias);
    }
}

#[test]
fn from_projections_checks_shapes() {
    let cfg = GluConfig::new(H, I);
    let err = GluFeedForward::from_projections(
        &cfg,
        zeros_projection(I, H, false),
        zeros_projection(I, H, false),
        zeros_projection(I, H, false),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        format!(
            "tensor `down_proj` has shape [{I}, {H}], expected [{H}, {I}] (it looks transposed: \
             weights are stored as PyTorch's [out, in])"
        )
    );
}

#[test]
fn parse_errors_convert_into_both_error_types() {
    fn ours(name: &str) -> candle_glu::Result<Activation> {
        Ok(name.parse::<Activation>()?)
    }
    fn candles(name: &str) -> candle_core::Result<Activation> {
        Ok(name.parse::<Activation>()?)
    }
    let parse = "swiglu".parse::<Activation>().unwrap_err();
    assert_eq!(parse.name(), "swiglu");
    assert_eq!(parse.expected(), Activation::NAMES);
    let want = format!(
        "unknown activation `swiglu`, expected one of: {}",
        Activation::NAMES.join(", ")
    );
    assert!(want.contains(": silu, "), "{want}");
    assert_eq!(parse.to_string(), want);
    let err = ours("swiglu").unwrap_err();
    assert!(
        matches!(&err, candle_glu::Error::Parse(p) if *p == parse),
        "{err:?}"
    );
    assert_eq!(err.to_string(), want);
    assert_eq!(candles("swiglu").unwrap_err().to_string(), want);
    assert_eq!(ours("silu").unwrap(), Activation::Silu);
    assert_eq!(candles("silu").unwrap(), Activation::Silu);
    // The other names that parse.
    let err = "neox".parse::<WeightLayout>().unwrap_err();
    assert_eq!(
        candle_glu::Error::from(err).to_string(),
        "unknown weight layout `neox`, expected one of: llama, phi3, t5, mixtral, gguf"
    );
    let err = "tpu"
        .parse::<candle_glu::device::DeviceChoice>()
        .unwrap_err();
    assert!(candle_core::Error::from(err)
        .to_string()
        .starts_with("unknown device `tpu`, expected one of: "),);
}
