//! The fused CPU kernels (what `forward` runs by default) against their plain twin, the block
//! built from candle's own ops (`forward_reference`): outputs, and gradients through candle's
//! autograd. Sizes are not multiples of the vector width (16), the tile (12 × 32) or the block.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_glu::{Activation, GluConfig, GluFeedForward, Projection};
use candle_nn::{Linear, VarBuilder, VarMap};
use common::rel_err;

fn block(h: usize, i: usize, act: Activation, bias: bool, dtype: DType) -> GluFeedForward {
    let dev = Device::Cpu;
    let lin = |o: usize, n: usize| {
        let w = (Tensor::randn(0f32, 1.0, (o, n), &dev).unwrap() / (n as f64).sqrt()).unwrap();
        let b = bias.then(|| {
            Tensor::randn(0f32, 0.5, o, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        });
        Projection::Dense(Linear::new(w.to_dtype(dtype).unwrap(), b))
    };
    let cfg = GluConfig::new(h, i).with_activation(act).with_bias(bias);
    GluFeedForward::from_projections(&cfg, lin(i, h), lin(i, h), lin(h, i)).unwrap()
}

#[test]
fn fused_forward_matches_candle_ops() {
    // Tolerances against the reference path, relative to its largest output: f32 differs only
    // by summation order; half types by one rounding of the intermediate and of the output.
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2), (DType::F16, 4e-3)] {
        for (tokens, h, i) in [
            (1, 72, 184),
            (7, 33, 65),
            (16, 100, 50),
            (17, 72, 184),
            (130, 96, 200),
        ] {
            for act in Activation::ALL {
                let bias = tokens % 2 == 1;
                let ffn = block(h, i, act, bias, dtype);
                let x = Tensor::randn(0f32, 1.0, (tokens, h), &Device::Cpu).unwrap();
                let x = x.to_dtype(dtype).unwrap();
                let fused = ffn.forward(&x).unwrap();
                let plain = common::plain_forward(&ffn, &x).unwrap();
                assert_eq!(fused.dtype(), dtype);
                let err = rel_err(&fused, &plain);
                assert!(
                    err <= tol,
                    "{dtype:?} m{tokens} h{h} i{i} {act} bias {bias}: {err:e}"
                );
            }
        }
    }
}

/// Gradients of `sum(ffn(x)²)` with respect to x and every weight.
fn grads(ffn: &GluFeedForward, map: &VarMap, x: &Var, fused: bool) -> Vec<(String, Tensor)> {
    let y = if fused {
        ffn.forward(x.as_tensor()).unwrap()
    } else {
        common::plain_forward(ffn, x.as_tensor()).unwrap()
    };
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![("x".to_string(), g.get(x).unwrap().clone())];
    let mut vars: Vec<_> = map.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, v) in vars {
        out.push((name, g.get(&v).unwrap().clone()));
    }
    out
}

#[test]
fn fused_gradients_match_candle_autograd() {
    let dev = Device::Cpu;
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        for act in Activation::ALL {
            for (tokens, bias) in [(5, false), (20, false), (20, true)] {
                let map = VarMap::new();
                let vb = VarBuilder::from_varmap(&map, dtype, &dev);
                let cfg = GluConfig::new(40, 70).with_activation(act).with_bias(bias);
                let ffn = GluFeedForward::new(&cfg, vb).unwrap();
                let x = Tensor::randn(0f32, 1.0, (tokens, 40), &dev).unwrap();
                let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
                let a = grads(&ffn, &map, &x, true);
                let b = grads(&ffn, &map, &x, false);
                for ((name, ga), (_, gb)) in a.iter().zip(&b) {
                    let err = rel_err(ga, gb);
                    assert!(
                        err <= tol,
                        "{dtype:?} {act} m{tokens} bias {bias} d/d{name}: {err:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn phi3_halves_are_views_and_take_the_fused_path() {
    // A fused gate_up_proj: gate and up are narrow views of one tensor, still contiguous.
    let dev = Device::Cpu;
    let (h, i) = (24, 40);
    let fused = Tensor::randn(0f32, 0.3, (2 * i, h), &dev).unwrap();
    let mut ts = std::collections::HashMap::new();
    ts.insert("gate_up_proj.weight".to_string(), fused);
    ts.insert(
        "down_proj.weight".to_string(),
        Tensor::randn(0f32, 0.3, (h, i), &dev).unwrap(),
    );
    let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
    let cfg = GluConfig::new(h, i).with_layout(candle_glu::WeightLayout::Phi3);
    let ffn = GluFeedForward::new(&cfg, vb).unwrap();
    let x = Tensor::randn(0f32, 1.0, (33, h), &dev).unwrap();
    assert!(
        rel_err(
            &ffn.forward(&x).unwrap(),
            &common::plain_forward(&ffn, &x).unwrap()
        ) <= 1e-5
    );
}
