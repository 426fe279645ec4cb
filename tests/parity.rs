//! Parity with PyTorch: transformers' own `LlamaMLP`, `GemmaMLP`, `Phi3MLP`,
//! `T5DenseGatedActDense` and Mixtral experts, with seeded weights at sizes that are not
//! multiples of 16 (`scripts/make_fixtures.py`).
//!
//! - f32: max |error| ≤ 1e-5 relative to the float64 truth.
//! - f16, bf16: max |error| no more than 2× torch's own in that dtype.
//!
//! Every forward asserts its path: the fused CPU kernels where they run (required by
//! `CANDLE_GLU_REQUIRE_KERNELS`), else candle's ops (`CANDLE_GLU_KERNELS=candle`), held to the
//! same bounds.

mod common;

use candle_core::{DType, Module, Tensor};
use candle_glu::{Activation, GluConfig, GluFeedForward, WeightLayout};
use common::{assert_close, manifest, max_abs_diff, Case, Tol};

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

/// The path every forward here must take.
fn path(ffn: &GluFeedForward, x: &Tensor, what: &str) {
    let want = common::dense_path("PyTorch parity through the fused CPU kernels");
    assert_eq!(ffn.forward_path(x), want, "{what}");
}

fn forward(case: &Case, dtype: DType) -> Tensor {
    let cfg = config(case);
    let vb = case.var_builder(dtype);
    let ffn = GluFeedForward::new(&cfg, vb.pp(&case.prefix)).unwrap();
    let x = case.io("x").to_dtype(dtype).unwrap();
    path(&ffn, &x, &format!("{} {dtype:?}", case.name));
    let y = x.apply(&ffn).unwrap();
    assert_eq!(y.dims(), x.dims());
    assert_eq!(y.dtype(), dtype);
    y
}

#[test]
fn every_case_is_covered() {
    let m = manifest();
    let names: Vec<&str> = m.cases.iter().map(|c| c.name.as_str()).collect();
    for &act in Activation::ALL {
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
        let what = format!("{} f32", case.name);
        let err = assert_close(&y, &case.io("y_f64"), Tol::Rel(1e-5), what);
        eprintln!("{:<26} f32 rel err {err:.2e}", case.name);
    }
}

#[test]
fn f16_and_bf16_within_twice_torch_error() {
    for case in manifest().cases {
        let truth = case.io("y_f64");
        for (dtype, torch_name) in [(DType::F16, "y_torch_f16"), (DType::BF16, "y_torch_bf16")] {
            let torch_err = max_abs_diff(&case.io(torch_name), &truth);
            let y = forward(&case, dtype);
            let what = format!("{} {dtype:?} (2 × torch's error {torch_err:e})", case.name);
            let ours = assert_close(&y, &truth, Tol::Abs(2.0 * torch_err), what);
            eprintln!(
                "{:<26} {dtype:?}: ours {ours:.2e}, torch {torch_err:.2e}, ratio {:.2}",
                case.name,
                ours / torch_err
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
    let one = x.get(1).unwrap().get(3).unwrap();
    path(&ffn, &one, "one row");
    let row = ffn.forward(&one).unwrap();
    let want = truth.get(1).unwrap().get(3).unwrap();
    assert_close(&row, &want, Tol::Rel(1e-5), "one row");
    let x5 = x.reshape((1, 1, 2, 5, 72)).unwrap();
    path(&ffn, &x5, "rank 5");
    let deep = ffn.forward(&x5).unwrap();
    assert_eq!(deep.dims(), &[1, 1, 2, 5, 72]);
    let deep = deep.reshape((2, 5, 72)).unwrap();
    assert_close(&deep, &truth, Tol::Rel(1e-5), "rank 5");
    // A non-contiguous input: the transpose of a [5, 2, 72] view.
    let t = x
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    assert!(!t.is_contiguous());
    path(&ffn, &t, "non-contiguous");
    let y = ffn.forward(&t).unwrap();
    assert_close(&y, &truth, Tol::Rel(1e-5), "non-contiguous");
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
    path(&ffn, &case.io("x"), "f32 input, bf16 weights");
    let y = ffn.forward(&case.io("x")).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let truth = case.io("y_f64");
    let torch_err = max_abs_diff(&case.io("y_torch_bf16"), &truth);
    let what = format!("f32 input on bf16 weights (2 × torch's bf16 error {torch_err:e})");
    assert_close(&y, &truth, Tol::Abs(2.0 * torch_err), what);
}
