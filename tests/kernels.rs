//! Which kernels run, and which way `forward` goes: `CANDLE_GLU_REQUIRE_KERNELS` (set by CI
//! from `scripts/expected_kernels.sh`) must name the kernels that ran, `CANDLE_GLU_KERNELS`
//! forces a set, and `GluFeedForward::forward_path` says Fused, Quantized or Candle as the
//! weights, the input and training decide.

mod common;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_glu::{ForwardPath, GluConfig, GluFeedForward, Projection};
use candle_nn::{Linear, VarBuilder, VarMap};

#[test]
fn required_kernels_ran() {
    let ran = candle_glu::cpu_kernels().map(|k| k.to_string());
    match common::required_kernels() {
        Some(required) => assert_eq!(
            ran.as_deref(),
            Some(required.as_str()),
            "CANDLE_GLU_REQUIRE_KERNELS names the kernels this machine must run"
        ),
        None => eprintln!("no kernels required; these ran: {ran:?}"),
    }
}

#[test]
fn forced_kernels_are_the_ones_that_run() {
    let forced = std::env::var("CANDLE_GLU_KERNELS").unwrap_or_default();
    let kernels = candle_glu::cpu_kernels();
    let name = kernels.map(|k| k.name());
    // A forced set runs, or the best below it that the CPU has; never one above it.
    match forced.trim().to_ascii_lowercase().as_str() {
        "candle" | "none" | "off" => assert_eq!(name, None),
        "avx512" => assert!(matches!(name, None | Some("avx512")), "{name:?}"),
        "avx512-bf16" => assert!(matches!(name, None | Some("avx512" | "avx512-bf16"))),
        "amx" => assert!(matches!(
            name,
            None | Some("avx512" | "avx512-bf16" | "amx")
        )),
        _ => {}
    }
    if let Some(k) = kernels {
        assert_eq!(k.bf16_dot(), k.name() == "avx512-bf16");
        assert_eq!(k.amx(), k.name() == "amx");
        let int8 = if k.int8() { "vnni" } else { "candle" };
        assert_eq!(k.to_string(), format!("{} (int8: {int8})", k.name()));
    }
}

fn lin(o: usize, n: usize, bias: bool, seed: u64) -> Projection {
    let dev = Device::Cpu;
    let w = common::randn(seed, (o, n), 0.1, &dev);
    let b = bias.then(|| common::randn(seed + 1, o, 0.1, &dev));
    Projection::Dense(Linear::new(w, b))
}

fn dense(h: usize, i: usize, bias: bool, dtype: DType) -> GluFeedForward {
    let cast = |p: Projection| {
        let l = p.as_linear().unwrap();
        let b = l.bias().map(|b| b.to_dtype(dtype).unwrap());
        Projection::Dense(Linear::new(l.weight().to_dtype(dtype).unwrap(), b))
    };
    let cfg = GluConfig::new(h, i).with_bias(bias);
    let [g, u, d] = [(i, h, 1), (i, h, 3), (h, i, 5)].map(|(o, n, s)| cast(lin(o, n, bias, s)));
    GluFeedForward::from_projections(&cfg, g, u, d).unwrap()
}

#[test]
fn forward_path_follows_weights_input_and_training() {
    let dev = Device::Cpu;
    let (h, i) = (64, 96);
    let fused = common::dense_path("forward_path of dense blocks");
    let x = common::randn(7, (3, h), 1.0, &dev);
    let var = Var::from_tensor(&x).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = x.to_dtype(dtype).unwrap();
        let var = Var::from_tensor(&x).unwrap();
        for bias in [false, true] {
            let ffn = dense(h, i, bias, dtype);
            assert_eq!(ffn.forward_path(&x), fused, "{dtype:?} bias {bias}");
            // A Var input: training. The kernels differentiate the block without biases; with
            // biases (which they treat as constants) it takes candle's ops.
            let training = if bias { ForwardPath::Candle } else { fused };
            assert_eq!(
                ffn.forward_path(var.as_tensor()),
                training,
                "{dtype:?} bias {bias}, training"
            );
            // No tokens: nothing to compute.
            let empty = Tensor::zeros((0, h), dtype, &dev).unwrap();
            assert_eq!(ffn.forward_path(&empty), ForwardPath::Candle);
        }
    }
    // Dtypes without kernels.
    let f64_block = dense(h, i, false, DType::F64);
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert_eq!(f64_block.forward_path(&x64), ForwardPath::Candle);
    // Weights that are Vars (a VarMap): with biases, candle's ops even for a plain input.
    for bias in [false, true] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cfg = GluConfig::new(h, i).with_bias(bias);
        let ffn = GluFeedForward::new(&cfg, vb).unwrap();
        let want = if bias { ForwardPath::Candle } else { fused };
        assert_eq!(ffn.forward_path(&x), want, "VarMap, bias {bias}");
        assert_eq!(
            ffn.forward_path(var.as_tensor()),
            want,
            "VarMap, bias {bias}"
        );
        // Whatever the path, the block computes its plain twin.
        common::seed_vars(&map, 11);
        let y = ffn.forward(var.as_tensor()).unwrap();
        let plain = common::plain_forward(&ffn, var.as_tensor()).unwrap();
        common::assert_close(&y, &plain, common::Tol::Rel(1e-5), "VarMap block");
    }
}

#[test]
fn forward_path_of_quantized_blocks() {
    let dev = Device::Cpu;
    let (h, i) = (64, 96);
    let x = common::randn(9, (2, h), 1.0, &dev);
    let q4_1 = common::kernels_or_skip("the Q4_1 kernels' forward_path");
    let int8 = common::int8_kernels_or_skip("the q8_0 kernels' forward_path");
    for (dtype, runs) in [(GgmlDType::Q4_1, q4_1), (GgmlDType::Q8_0, int8)] {
        for bias in [false, true] {
            let q = |o: usize, n: usize, seed: u64| {
                let w = common::randn(seed, (o, n), 0.1, &dev);
                let w = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
                let b = bias.then(|| common::randn(seed + 1, o, 0.1, &dev));
                Projection::quantized(w, b)
            };
            let cfg = GluConfig::new(h, i).with_bias(bias);
            let ffn =
                GluFeedForward::from_projections(&cfg, q(i, h, 1), q(i, h, 3), q(h, i, 5)).unwrap();
            // The quantized kernels take no biases.
            let want = if runs && !bias {
                ForwardPath::Quantized
            } else {
                ForwardPath::Candle
            };
            assert_eq!(ffn.forward_path(&x), want, "{dtype:?} bias {bias}");
            let y = ffn.forward(&x).unwrap();
            assert_eq!(y.dims(), x.dims());
        }
    }
}
