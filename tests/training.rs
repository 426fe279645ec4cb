//! The block trains: built over a `VarMap` it creates its parameters, and its gradients match
//! central finite differences of the loss in float64 (candle's own in f64 blocks, the crate's
//! backward passes on the f32 kernels) or candle's autograd in float64 (quantized weights'
//! input gradient). Parameters and inputs are seeded.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_glu::{Activation, GluConfig, GluFeedForward, WeightLayout};
use candle_nn::{Optimizer, VarBuilder, VarMap};

#[test]
fn varmap_creates_parameters_and_sgd_lowers_the_loss() {
    let dev = Device::Cpu;
    for layout in [WeightLayout::Llama, WeightLayout::Phi3] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cfg = GluConfig::new(6, 10).with_bias(true).with_layout(layout);
        let ffn = GluFeedForward::new(&cfg, vb.pp("mlp")).unwrap();
        assert_eq!(
            map.all_vars().len(),
            if layout == WeightLayout::Phi3 { 4 } else { 6 }
        );
        common::seed_vars(&map, 1);
        let x = common::randn(2, (32, 6), 1.0, &dev);
        let target = x.sin().unwrap();
        let mut sgd = candle_nn::SGD::new(map.all_vars(), 0.05).unwrap();
        let loss = |ffn: &GluFeedForward| {
            (ffn.forward(&x).unwrap() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
        };
        let first = loss(&ffn).to_scalar::<f32>().unwrap();
        for _ in 0..200 {
            sgd.backward_step(&loss(&ffn)).unwrap();
        }
        let last = loss(&ffn).to_scalar::<f32>().unwrap();
        assert!(last < 0.5 * first, "{layout}: loss {first} -> {last}");
    }
}

/// Asserts each parameter's gradient in `grads` (three coordinates of each) against central
/// differences of `loss_with(j, value)`: the loss in float64 with parameter `j` set to `value`.
/// A wrong formula is off by O(1); `rtol` allows the arithmetic's own error. Returns how many
/// coordinates it checked.
fn assert_finite_differences(
    what: &str,
    grads: &candle_core::backprop::GradStore,
    params: &[(String, Var)],
    rtol: f64,
    loss_with: impl Fn(usize, &Tensor) -> f64,
) -> usize {
    let flat = |t: &Tensor| -> Vec<f64> {
        let t = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
        t.to_vec1().unwrap()
    };
    let mut checked = 0;
    for (j, (name, var)) in params.iter().enumerate() {
        let grad = flat(grads.get(var).unwrap());
        let orig = flat(var.as_tensor());
        for c in [0, orig.len() / 2, orig.len() - 1] {
            let eps = 1e-6;
            let at = |d: f64| {
                let mut v = orig.clone();
                v[c] += d;
                loss_with(
                    j,
                    &Tensor::new(v, &Device::Cpu)
                        .unwrap()
                        .reshape(var.shape())
                        .unwrap(),
                )
            };
            let numeric = (at(eps) - at(-eps)) / (2. * eps);
            assert!(
                (grad[c] - numeric).abs() <= rtol * numeric.abs().max(1.),
                "{what}: d/d{name}[{c}]: {} vs {numeric}",
                grad[c]
            );
            checked += 1;
        }
    }
    checked
}

/// The block's variables, by name, then the input's.
fn params_and_input(map: &VarMap, x: &Var) -> Vec<(String, Var)> {
    let mut params: Vec<(String, Var)> = map.data().lock().unwrap().clone().into_iter().collect();
    params.push(("x".into(), x.clone()));
    params
}

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let (h, i) = (5, 7);
    for (k, act) in Activation::ALL.iter().copied().enumerate() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F64, &dev);
        let cfg = GluConfig::new(h, i).with_activation(act).with_bias(true);
        let ffn = GluFeedForward::new(&cfg, vb).unwrap();
        let seed = 10 * k as u64;
        common::seed_vars(&map, seed);
        let x = common::randn(seed + 9, (3, h), 1.0, &dev);
        let x = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let loss = || {
            ffn.forward(x.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss().backward().unwrap();
        let params = params_and_input(&map, &x);
        // The block's own variables moved, and put back.
        let loss_with = |j: usize, value: &Tensor| {
            let var = &params[j].1;
            let orig = var.as_tensor().copy().unwrap();
            var.set(value).unwrap();
            let l = loss().to_scalar::<f64>().unwrap();
            var.set(&orig).unwrap();
            l
        };
        // 1e-5: candle's f64 GELU-erf gradient is good to about 1e-6.
        let checked = assert_finite_differences(&act.to_string(), &grads, &params, 1e-5, loss_with);
        assert_eq!(checked, 7 * 3);
    }
}

/// The crate's own backward passes (the fused gate-up op and the down projection's, without
/// biases; the gated product's, with trained biases) on f32 blocks that take the kernels,
/// against central finite differences of the same loss in float64 through candle's ops: the
/// test above builds f64 blocks, which never take the crate's ops.
#[test]
fn the_kernels_backward_passes_match_finite_differences() {
    use candle_glu::ForwardPath;
    if !common::kernels_or_skip("the kernels' backward passes") {
        return;
    }
    let dev = Device::Cpu;
    let (h, i) = (6, 9);
    for (k, act) in Activation::ALL.iter().copied().enumerate() {
        for bias in [false, true] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let cfg = GluConfig::new(h, i).with_activation(act).with_bias(bias);
            let ffn = GluFeedForward::new(&cfg, vb).unwrap();
            let seed = 200 + 10 * k as u64;
            common::seed_vars(&map, seed);
            let x = Var::from_tensor(&common::randn(seed + 9, (4, h), 1.0, &dev)).unwrap();
            // Without biases the fused ops run; with trained biases candle's matmuls and the
            // crate's gated product.
            let want_path = if bias {
                ForwardPath::Candle
            } else {
                ForwardPath::Fused
            };
            assert_eq!(ffn.forward_path(x.as_tensor()), want_path, "{act}");
            let y = ffn.forward(x.as_tensor()).unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let params = params_and_input(&map, &x);
            // The same values in float64, parameter j moved, through candle's ops.
            let loss_with = |j: usize, value: &Tensor| {
                let f64_of = |i: usize| {
                    let t = if i == j {
                        value
                    } else {
                        params[i].1.as_tensor()
                    };
                    t.to_dtype(DType::F64).unwrap()
                };
                let ws = (0..params.len() - 1).map(|i| (params[i].0.clone(), f64_of(i)));
                let vb = VarBuilder::from_tensors(ws.collect(), DType::F64, &dev);
                let ffn64 = GluFeedForward::new(&cfg, vb).unwrap();
                let y = common::plain_forward(&ffn64, &f64_of(params.len() - 1)).unwrap();
                let l = y.sqr().unwrap().sum_all().unwrap();
                l.to_scalar::<f64>().unwrap()
            };
            // 1e-3: the kernels' f32 arithmetic.
            let what = format!("{act}, bias {bias}");
            let checked = assert_finite_differences(&what, &grads, &params, 1e-3, loss_with);
            assert_eq!(checked, 3 * if bias { 7 } else { 4 }, "{act}");
        }
    }
}

/// GGUF weights are constants, but the gradient reaches the input through them (as QLoRA-style
/// training needs), on the crate's kernels (Q4_1, q8_0, q4k) and through candle's own quantized
/// product (Q6K, which the kernels do not take), at decode and at prefill token counts: the
/// same as candle's autograd through the dequantized weights in float64.
#[test]
fn quantized_weights_pass_the_gradient_to_the_input() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_glu::Projection;
    use std::sync::Arc;

    let dev = Device::Cpu;
    let (h, i) = (256, 512);
    for (k, dtype) in [
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q4_1,
        GgmlDType::Q6K,
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 100 + 10 * k as u64;
        let q = |s: u64, rows: usize, cols: usize| {
            let w = common::randn(seed + s, (rows, cols), 0.05, &dev);
            Arc::new(QTensor::quantize(&w, dtype).unwrap())
        };
        let (wg, wu, wd) = (q(1, i, h), q(2, i, h), q(3, h, i));
        let proj =
            |w: &Arc<QTensor>| Projection::quantized(QMatMul::from_arc(w.clone()).unwrap(), None);
        let cfg = GluConfig::new(h, i).with_activation(Activation::Gelu);
        let ffn = GluFeedForward::from_projections(&cfg, proj(&wg), proj(&wu), proj(&wd)).unwrap();
        // The reference: the dequantized weights in float64, through candle's autograd.
        let f64_of = |w: &Arc<QTensor>| w.dequantize(&dev).unwrap().to_dtype(DType::F64).unwrap();
        let (g64, u64_, d64) = (f64_of(&wg), f64_of(&wu), f64_of(&wd));
        for tokens in [1, 40] {
            let x = common::randn(seed + 4, (tokens, h), 1.0, &dev);
            let r = common::randn(seed + 5, (tokens, h), 1.0, &dev);
            let xv = Var::from_tensor(&x).unwrap();
            let y = ffn.forward(xv.as_tensor()).unwrap();
            let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let what = format!("{dtype:?}, {tokens} tokens");
            let got = grads
                .get(xv.as_tensor())
                .unwrap_or_else(|| panic!("{what}: no gradient reached x"));

            let x64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
            let gate = x64.matmul(&g64.t().unwrap()).unwrap().gelu_erf().unwrap();
            let up = x64.matmul(&u64_.t().unwrap()).unwrap();
            let y64 = (gate * up).unwrap().matmul(&d64.t().unwrap()).unwrap();
            let r64 = r.to_dtype(DType::F64).unwrap();
            let grads64 = (y64 * r64).unwrap().sum_all().unwrap().backward().unwrap();
            let want = grads64.get(x64.as_tensor()).unwrap();
            // The kernels' backward pass recomputes gate and up in f32 from the dequantized
            // weights; candle's quantized product (Q6K's, or every type's on a CPU without the
            // kernels) rounds the activations to 8 bits, and the gated product's backward pass
            // uses the gate and up it computed: their rounding (about 0.6% here), where a
            // missing or wrong gradient is off by O(1).
            let on_kernels = ffn.forward_path(&x) == candle_glu::ForwardPath::Quantized;
            if dtype != GgmlDType::Q6K && candle_glu::cpu_kernels().is_some_and(|k| k.int8()) {
                assert!(on_kernels, "{what}: not on the crate's kernels");
            }
            let tol = if on_kernels { 1e-4 } else { 2e-2 };
            common::assert_close(got, want, common::Tol::Rel(tol), &what);
        }
    }
}

/// A projection of quantized weights, alone: the input's gradient over the dequantized weight.
#[test]
fn a_quantized_projection_passes_the_gradient_to_the_input() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_glu::Projection;
    use std::sync::Arc;

    let dev = Device::Cpu;
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q6K] {
        let w = common::randn(7, (48, 256), 0.05, &dev);
        let qt = Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let b = common::randn(8, 48, 0.1, &dev);
        let proj = Projection::quantized(QMatMul::from_arc(qt.clone()).unwrap(), Some(b));
        let x = Var::from_tensor(&common::randn(9, (2, 3, 256), 1.0, &dev)).unwrap();
        let r = common::randn(10, (2, 3, 48), 1.0, &dev);
        let grads = (proj.forward(x.as_tensor()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = grads.get(x.as_tensor()).expect("a gradient for x");
        // d/dx Σ r·(x·Wᵀ + b) = r·W, W dequantized, in float64.
        let w64 = qt.dequantize(&dev).unwrap().to_dtype(DType::F64).unwrap();
        let want = r
            .to_dtype(DType::F64)
            .unwrap()
            .broadcast_matmul(&w64)
            .unwrap();
        common::assert_close(got, &want, common::Tol::Rel(1e-5), format!("{dtype:?}"));
    }
}
