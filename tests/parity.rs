//! Parity with PyTorch: transformers' own `LlamaMLP`, `GemmaMLP`, `Phi3MLP`,
//! `T5DenseGatedActDense` and Mixtral experts, with seeded weights at sizes that are not
//! multiples of 16 (`scripts/make_fixtures.py`).
//!
//! - f32: max |error| ≤ 1e-5 relative to the float64 truth.
//! - f16, bf16: max |error| no more than 2× torch's own in that dtype.

mod common;

use candle_core::{DType, Module, Tensor};
use candle_glu::{Activation, GluConfig, GluFeedForward, WeightLayout};
use common::{manifest, max_abs_diff, rel_err, Case};

/// The config as read from the case's own `config.json`, checked against the manifest.
fn config(case: &Case) -> GluConfig {
    let cfg = GluConfig::from_hf_config_file(case.dir().join("config.json")).unwrap();
    let act: Activation = case.activation.parse().unwrap();
    assert_eq!(cfg.hidden_size, case.hidden, "{}", case.name);
    assert_eq!(cfg.intermediate_size, case.intermediate, "{}", case.name);
    assert_eq!(cfg.bias, case.bias, "{}", case.name);
    assert_eq!(
        cfg.layout,
        case.layout.parse::<WeightLayout>().unwrap(),
        "{}",
        case.name
    );
    if case.name == "llama_swish_beta" {
        // transformers has no Swish-β; the script swapped `act_fn` on a `silu` module.
        assert_eq!(cfg.activation, Activation::Silu);
        cfg.with_activation(act)
    } else {
        assert_eq!(
            cfg.activation, act,
            "{}: config.json's activation",
            case.name
        );
        cfg
    }
}

fn forward(case: &Case, dtype: DType) -> Tensor {
    let cfg = config(case);
    let vb = case.var_builder(dtype);
    let ffn = GluFeedForward::new(&cfg, vb.pp(&case.prefix)).unwrap();
    let x = case.io("x").to_dtype(dtype).unwrap();
    let y = x.apply(&ffn).unwrap();
    assert_eq!(y.dims(), x.dims());
    assert_eq!(y.dtype(), dtype);
    y
}

#[test]
fn every_case_is_covered() {
    let m = manifest();
    let names: Vec<&str> = m.cases.iter().map(|c| c.name.as_str()).collect();
    for act in Activation::ALL {
        assert!(
            m.cases
                .iter()
                .any(|c| c.activation.parse::<Activation>().unwrap() == act),
            "no fixture for {act}"
        );
    }
    for layout in ["llama", "phi3", "t5", "mixtral"] {
        assert!(
            m.cases.iter().any(|c| c.layout == layout),
            "no {layout} fixture"
        );
    }
    for module in ["LlamaMLP", "GemmaMLP", "Phi3MLP", "T5DenseGatedActDense"] {
        assert!(
            m.cases.iter().any(|c| c.module == module),
            "no {module}: {names:?}"
        );
    }
}

#[test]
fn f32_matches_float64_truth() {
    for case in manifest().cases {
        let y = forward(&case, DType::F32);
        let err = rel_err(&y, &case.io("y_f64"));
        eprintln!("{:<26} f32 rel err {err:.2e}", case.name);
        assert!(err <= 1e-5, "{}: f32 relative error {err:e}", case.name);
    }
}

#[test]
fn f16_and_bf16_within_twice_torch_error() {
    for case in manifest().cases {
        let truth = case.io("y_f64");
        for (dtype, torch_name) in [(DType::F16, "y_torch_f16"), (DType::BF16, "y_torch_bf16")] {
            let torch_err = max_abs_diff(&case.io(torch_name), &truth);
            let ours = max_abs_diff(&forward(&case, dtype), &truth);
            eprintln!(
                "{:<26} {dtype:?}: ours {ours:.2e}, torch {torch_err:.2e}, ratio {:.2}",
                case.name,
                ours / torch_err
            );
            assert!(
                ours <= 2.0 * torch_err,
                "{} {dtype:?}: error {ours:e} > 2 × torch's {torch_err:e}",
                case.name
            );
        }
    }
}

#[test]
fn layout_is_detected_from_tensor_names() {
    for case in manifest().cases {
        let vb = case.var_builder(DType::F32);
        let detected = WeightLayout::detect(&vb.pp(&case.prefix));
        assert_eq!(
            detected,
            Some(case.layout.parse().unwrap()),
            "{}",
            case.name
        );
    }
}

#[test]
fn any_rank_input() {
    let case = manifest()
        .cases
        .into_iter()
        .find(|c| c.name == "llama_silu")
        .unwrap();
    let cfg = config(&case);
    let ffn = GluFeedForward::new(&cfg, case.var_builder(DType::F32).pp(&case.prefix)).unwrap();
    let x = case.io("x"); // [2, 5, 72]
    let truth = case.io("y_f64");
    // [72] and [1, 1, 2, 5, 72] give the same rows as [2, 5, 72].
    let row = ffn.forward(&x.get(1).unwrap().get(3).unwrap()).unwrap();
    let want = truth.get(1).unwrap().get(3).unwrap();
    assert!(rel_err(&row, &want) <= 1e-5);
    let deep = ffn.forward(&x.reshape((1, 1, 2, 5, 72)).unwrap()).unwrap();
    assert_eq!(deep.dims(), &[1, 1, 2, 5, 72]);
    assert!(rel_err(&deep.reshape((2, 5, 72)).unwrap(), &truth) <= 1e-5);
    // A non-contiguous input: the transpose of a [5, 2, 72] view.
    let t = x
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    assert!(!t.is_contiguous());
    assert!(rel_err(&ffn.forward(&t).unwrap(), &truth) <= 1e-5);
}

#[test]
fn f32_input_on_bf16_weights() {
    let case = manifest()
        .cases
        .into_iter()
        .find(|c| c.name == "llama_silu")
        .unwrap();
    let cfg = config(&case);
    let ffn = GluFeedForward::new(&cfg, case.var_builder(DType::BF16).pp(&case.prefix)).unwrap();
    let y = ffn.forward(&case.io("x")).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let truth = case.io("y_f64");
    let torch_err = max_abs_diff(&case.io("y_torch_bf16"), &truth);
    assert!(max_abs_diff(&y, &truth) <= 2.0 * torch_err);
}
