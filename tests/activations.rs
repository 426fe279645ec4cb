//! Literal values of every activation, from the closed forms evaluated in float64 by Python's
//! `math` module. They tell exact GELU (`gelu`) and its tanh approximation apart.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::Activation;

const XS: [f64; 5] = [-3.0, -1.0, 0.0, 0.5, 2.0];

fn check(act: Activation, want: [f64; 5]) {
    // |y - want| ≤ rtol·|want| + atol. f32's atol covers the cancellation in 1 + tanh(..) near
    // -3; bf16's rtol is one rounding (2^-9) with room for the input's.
    for (dtype, rtol, atol) in [
        (DType::F64, 1e-12, 1e-15),
        (DType::F32, 1e-6, 1e-7),
        (DType::BF16, 4e-3, 1e-5),
    ] {
        let x = Tensor::new(&XS, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let y = act.forward(&x).unwrap();
        assert_eq!(y.dtype(), dtype);
        let y: Vec<f64> = y.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        for ((x, y), w) in XS.iter().zip(&y).zip(&want) {
            let ok = (y - w).abs() <= rtol * w.abs() + atol;
            assert!(ok, "{act} {dtype:?} at {x}: got {y}, want {w}");
        }
    }
}

#[test]
fn sigmoid() {
    let want = [
        0.04742587317756678,
        0.2689414213699951,
        0.5,
        0.6224593312018546,
        0.8807970779778823,
    ];
    check(Activation::Sigmoid, want);
}

#[test]
fn identity() {
    check(Activation::Identity, XS);
}

#[test]
fn relu() {
    check(Activation::Relu, [0.0, 0.0, 0.0, 0.5, 2.0]);
}

#[test]
fn gelu_is_exact_erf() {
    let want = [
        -0.00404969409489031,
        -0.15865525393145707,
        0.0,
        0.34573123063700656,
        1.9544997361036416,
    ];
    check(Activation::Gelu, want);
}

#[test]
fn gelu_pytorch_tanh_is_the_approximation() {
    let want = [
        -0.0036373920817729943,
        -0.15880800939172324,
        0.0,
        0.34571400982514394,
        1.954597694087775,
    ];
    check(Activation::GeluTanh, want);
}

#[test]
fn the_two_gelus_differ_at_minus_three() {
    let x = Tensor::new(&[-3f32], &Device::Cpu).unwrap();
    let exact = Activation::Gelu
        .forward(&x)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let tanh = Activation::GeluTanh
        .forward(&x)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!((exact - -0.00405).abs() < 1e-5, "{exact}");
    assert!((tanh - -0.00364).abs() < 1e-5, "{tanh}");
}

#[test]
fn silu() {
    let want = [
        -0.14227761953270035,
        -0.2689414213699951,
        0.0,
        0.3112296656009273,
        1.7615941559557646,
    ];
    check(Activation::Silu, want);
}

#[test]
fn swish_with_beta() {
    let want = [
        -0.03296082789177954,
        -0.18242552380635635,
        0.0,
        0.3395893495876965,
        1.9051482536448667,
    ];
    check(Activation::Swish { beta: 1.5 }, want);
}

#[test]
fn swish_with_beta_one_is_silu() {
    let x = Tensor::new(&XS, &Device::Cpu).unwrap();
    let a = Activation::Swish { beta: 1.0 }.forward(&x).unwrap();
    let b = Activation::Silu.forward(&x).unwrap();
    let (a, b): (Vec<f64>, Vec<f64>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
    for (a, b) in a.iter().zip(&b) {
        assert!((a - b).abs() < 1e-15);
    }
}

#[test]
fn quick_gelu() {
    let want = [
        -0.01807130970778597,
        -0.1542042340671787,
        0.0,
        0.35038843660638014,
        1.9356586231442083,
    ];
    check(Activation::QuickGelu, want);
}

/// Every candle activation that is a gate σ converts to the crate's one that computes the same
/// function (checked through candle's own `Module` impl), and back; the others are errors that
/// name them.
#[test]
fn conversions_with_candle_nn_compute_the_same_function() {
    use candle_nn::Activation as C;
    let x = Tensor::new(&[-6f32, -2.5, -0.3, 0.0, 0.7, 1.9, 5.0], &Device::Cpu).unwrap();
    let pairs = [
        (C::Gelu, Activation::Gelu),
        (C::NewGelu, Activation::GeluTanh),
        (C::GeluPytorchTanh, Activation::GeluTanh),
        (C::Relu, Activation::Relu),
        (C::Silu, Activation::Silu),
        (C::Swish, Activation::Silu),
        (C::Sigmoid, Activation::Sigmoid),
    ];
    // max |candle's σ(x) - ours(x)|
    let diff = |theirs: C, ours: Activation| -> f32 {
        let d = (theirs.forward(&x).unwrap() - ours.forward(&x).unwrap()).unwrap();
        let d: Vec<f32> = d.abs().unwrap().to_vec1().unwrap();
        // (A NaN is an infinite difference: a max reduction would pass over it.)
        d.iter()
            .map(|v| if v.is_nan() { f32::INFINITY } else { *v })
            .fold(0f32, f32::max)
    };
    for (theirs, ours) in pairs {
        assert_eq!(Activation::try_from(theirs).unwrap(), ours, "{theirs:?}");
        let d = diff(theirs, ours);
        assert!(d <= 1e-6, "{theirs:?} and {ours}: {d}");
        // Back: to a candle activation that computes the same.
        let back = C::try_from(ours).unwrap();
        let d = diff(back, ours);
        assert!(d <= 1e-6, "{ours} and {back:?}: {d}");
    }
    assert_eq!(
        C::try_from(Activation::Swish { beta: 1.0 }).unwrap(),
        C::Silu
    );
    for theirs in [
        C::Relu2,
        C::Relu6,
        C::HardSigmoid,
        C::HardSwish,
        C::Mish,
        C::Elu(1.0),
        C::LeakyRelu(0.1),
    ] {
        let err = Activation::try_from(theirs).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "candle_nn::Activation::{theirs:?} has no counterpart in candle_glu::Activation"
            )
        );
    }
    let err = Activation::try_from(C::Swiglu).unwrap_err();
    assert!(
        err.to_string().contains("its gate is Activation::Silu"),
        "{err}"
    );
    for ours in [
        Activation::Identity,
        Activation::QuickGelu,
        Activation::Swish { beta: 1.5 },
    ] {
        let err = C::try_from(ours).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("has no counterpart in candle_nn::Activation"),
            "{err}"
        );
        assert!(err.variant().contains(&ours.to_string()), "{err}");
    }
}

/// `GluConfig` and `WeightLayout` through serde: names, defaults, Llama's keys, and the errors.
#[test]
fn config_and_layout_round_trip_through_serde() {
    use candle_glu::{GluConfig, WeightLayout};
    for &layout in WeightLayout::ALL {
        let json = serde_json::to_string(&layout).unwrap();
        assert_eq!(json, format!("\"{layout}\""));
        assert_eq!(serde_json::from_str::<WeightLayout>(&json).unwrap(), layout);
    }
    let cfg = GluConfig::new(72, 40)
        .with_activation(Activation::Swish { beta: 1.5 })
        .with_bias(true)
        .with_layout(WeightLayout::Phi3);
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(
        json,
        r#"{"hidden_size":72,"intermediate_size":40,"activation":"swish(1.5)","bias":true,"layout":"phi3"}"#
    );
    assert_eq!(serde_json::from_str::<GluConfig>(&json).unwrap(), cfg);
    // A Llama config.json's keys, the rest ignored; defaults for what is absent.
    let llama = r#"{"hidden_size": 576, "intermediate_size": 1536, "hidden_act": "silu",
                    "mlp_bias": false, "num_hidden_layers": 30}"#;
    assert_eq!(
        serde_json::from_str::<GluConfig>(llama).unwrap(),
        GluConfig::new(576, 1536)
    );
    let bad = serde_json::from_str::<GluConfig>(
        r#"{"hidden_size": 4, "intermediate_size": 8, "layout": "neox"}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("unknown weight layout `neox`"), "{bad}");
    let missing = serde_json::from_str::<GluConfig>(r#"{"hidden_size": 4}"#)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("intermediate_size"), "{missing}");
}

#[test]
fn gated_refuses_mixed_dtypes_and_swish_needs_a_finite_beta() {
    let dev = Device::Cpu;
    let gate = Tensor::new(&[1f32, -2.], &dev).unwrap();
    let up = gate.to_dtype(DType::F16).unwrap();
    for (g, u) in [(&gate, &up), (&up, &gate)] {
        let e = Activation::Silu.gated(g, u).unwrap_err().to_string();
        assert!(e.contains("must share a dtype"), "{e}");
    }
    // Integers are refused (they were widened, activated and truncated back), through the
    // plain twin and the crate's entry point alike.
    let ints = Tensor::new(&[1u32, 2], &dev).unwrap();
    let e = Activation::Silu
        .gated(&ints, &ints)
        .unwrap_err()
        .to_string();
    assert!(e.contains("input has dtype U32"), "{e}");
    let e = candle_glu::gated_product(&ints, &ints, Activation::Relu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("input has dtype U32"), "{e}");
    let nan =
        candle_glu::GluConfig::new(8, 16).with_activation(Activation::Swish { beta: f64::NAN });
    let e = nan.validate().unwrap_err().to_string();
    assert!(e.contains("beta must be finite"), "{e}");
    // Finite in f64 but not in f32, where every kernel applies it (σ(0) was 0·∞ = NaN).
    let huge = candle_glu::GluConfig::new(8, 16).with_activation(Activation::Swish { beta: 1e39 });
    let e = huge.validate().unwrap_err().to_string();
    assert!(
        e.contains("beta must be finite in f32, found 1000000"),
        "{e}"
    );
    assert!("swish(1e39)".parse::<Activation>().is_err());
}

/// ReLU keeps NaN, as PyTorch's `relu` does and as the crate's kernels do, on candle's path too
/// (a CPU without AVX-512, f64, training with biases): candle's `relu`, a max with 0, made it 0
/// there, so the same input gave NaN on one machine and 0 on another.
#[test]
fn relu_keeps_nan_on_every_path() {
    let dev = Device::Cpu;
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        let x = Tensor::new(&[f64::NAN, -1.0, 2.0], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let y: Vec<f64> = Activation::Relu
            .forward(&x)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            y[0].is_nan() && y[1] == 0.0 && y[2] == 2.0,
            "{dtype:?}: {y:?}"
        );
        // And in the gated product: candle's ops (`Activation::gated`) and the crate's (its
        // CPU kernels where they run, `gated_product`).
        for (g, path) in [
            (Activation::Relu.gated(&x, &x), "candle's ops"),
            (
                candle_glu::gated_product(&x, &x, Activation::Relu),
                "gated_product",
            ),
        ] {
            let g: Vec<f64> = g.unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
            assert!(
                g[0].is_nan() && g[1] == 0.0 && g[2] == 4.0,
                "{dtype:?} gated, {path}: {g:?}"
            );
        }
    }
    // A whole ReLU block on its fused kernels (or candle's ops without them): the NaN of token
    // 0 reaches its output, and token 1's output stays finite.
    let cfg = candle_glu::GluConfig::new(8, 16).with_activation(Activation::Relu);
    let vb = candle_nn::VarBuilder::from_tensors(
        [
            ("gate_proj.weight", 0.1),
            ("up_proj.weight", 0.2),
            ("down_proj.weight", 0.3),
        ]
        .into_iter()
        .map(|(name, v)| {
            let (r, c) = if name.starts_with("down") {
                (8, 16)
            } else {
                (16, 8)
            };
            (
                name.to_string(),
                Tensor::full(v as f32, (r, c), &dev).unwrap(),
            )
        })
        .collect(),
        DType::F32,
        &dev,
    );
    let ffn = candle_glu::GluFeedForward::new(&cfg, vb).unwrap();
    let mut x = vec![1f32; 16];
    x[3] = f32::NAN;
    let x = Tensor::from_vec(x, (2, 8), &dev).unwrap();
    assert_eq!(
        ffn.forward_path(&x),
        common::dense_path("a ReLU block with a NaN")
    );
    let y = ffn.forward(&x).unwrap().to_vec2::<f32>().unwrap();
    assert!(y[0].iter().all(|v| v.is_nan()), "{y:?}");
    assert!(y[1].iter().all(|v| v.is_finite() && *v > 0.0), "{y:?}");
}

#[test]
fn unknown_names_stay_one_short_line() {
    // A hostile config.json's `hidden_act`: escaped and cut, so that the error stays one line.
    let name = format!("evil\n{}", "x".repeat(10_000));
    let e = name.parse::<Activation>().unwrap_err();
    assert_eq!(e.name(), name, "the name itself is kept");
    let m = e.to_string();
    assert!(!m.contains('\n') && m.len() < 400, "{m}");
    assert!(m.starts_with("unknown activation `evil\\nxxx"), "{m}");
}
