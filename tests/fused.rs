//! The fused CPU kernels (what `forward` runs by default) against their plain twin, the block
//! built from its public projections and `Activation::gated` (candle's own ops): outputs, and
//! gradients through candle's autograd. Sizes are not multiples of the vector width (16), the
//! tile (12 × 32) or the block. Every test asserts the path `forward` took: the fused kernels
//! where they run (`CANDLE_GLU_REQUIRE_KERNELS` makes their absence an error), else candle's
//! ops (`CANDLE_GLU_KERNELS=candle`). In that run both sides are candle's ops, and what the
//! tests check is the path (and the mixed-dtype block's float64 oracle): `tests/parity.rs`
//! holds candle's path to PyTorch there.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_glu::{Activation, ForwardPath, GluConfig, GluFeedForward, Projection};
use candle_nn::{Linear, VarBuilder, VarMap};
use common::{assert_close, Tol};

fn block(
    h: usize,
    i: usize,
    act: Activation,
    bias: bool,
    dtype: DType,
    seed: u64,
) -> GluFeedForward {
    let dev = Device::Cpu;
    let lin = |o: usize, n: usize, seed: u64| {
        let w = common::randn(seed, (o, n), 1.0 / (n as f64).sqrt(), &dev);
        let b = bias.then(|| {
            common::randn(seed + 1, o, 0.5, &dev)
                .to_dtype(dtype)
                .unwrap()
        });
        Projection::Dense(Linear::new(w.to_dtype(dtype).unwrap(), b))
    };
    let cfg = GluConfig::new(h, i).with_activation(act).with_bias(bias);
    let (gate, up, down) = (lin(i, h, seed), lin(i, h, seed + 2), lin(h, i, seed + 4));
    GluFeedForward::from_projections(&cfg, gate, up, down).unwrap()
}

#[test]
fn fused_forward_matches_candle_ops() {
    let path = common::dense_path("the fused forward against candle's ops");
    // Tolerances against the reference path, relative to its largest output: f32 differs only
    // by summation order; half types by one rounding of the intermediate and of the output.
    let mut seed = 0;
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2), (DType::F16, 4e-3)] {
        for (tokens, h, i) in [
            (1, 72, 184),
            (7, 33, 65),
            (16, 100, 50),
            (17, 72, 184),
            (130, 96, 200),
        ] {
            for &act in Activation::ALL {
                seed += 10;
                let bias = tokens % 2 == 1;
                let ffn = block(h, i, act, bias, dtype, seed);
                let x = common::randn(seed + 9, (tokens, h), 1.0, &Device::Cpu);
                let x = x.to_dtype(dtype).unwrap();
                let what = format!("{dtype:?} m{tokens} h{h} i{i} {act} bias {bias}");
                assert_eq!(ffn.forward_path(&x), path, "{what}");
                let fused = ffn.forward(&x).unwrap();
                let plain = common::plain_forward(&ffn, &x).unwrap();
                assert_eq!(fused.dtype(), dtype);
                assert_close(&fused, &plain, Tol::Rel(tol), what);
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
    let fused = common::dense_path("the fused kernels' backward passes against candle's autograd");
    let mut seed = 1000;
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        for &act in Activation::ALL {
            for (tokens, bias) in [(5, false), (20, false), (20, true)] {
                seed += 10;
                let map = VarMap::new();
                let vb = VarBuilder::from_varmap(&map, dtype, &dev);
                let cfg = GluConfig::new(40, 70).with_activation(act).with_bias(bias);
                let ffn = GluFeedForward::new(&cfg, vb).unwrap();
                common::seed_vars(&map, seed);
                let x = common::randn(seed + 9, (tokens, 40), 1.0, &dev);
                let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
                // The kernels treat biases as constants: with biases, training takes candle's
                // matmuls and the crate's gated product, whose backward pass is held here to
                // candle's autograd through `Activation::gated`.
                let path = if bias { ForwardPath::Candle } else { fused };
                assert_eq!(
                    ffn.forward_path(x.as_tensor()),
                    path,
                    "{dtype:?} {act} m{tokens} bias {bias}"
                );
                let a = grads(&ffn, &map, &x, true);
                let b = grads(&ffn, &map, &x, false);
                for ((name, ga), (_, gb)) in a.iter().zip(&b) {
                    let what = format!("{dtype:?} {act} m{tokens} bias {bias} d/d{name}");
                    assert_close(ga, gb, Tol::Rel(tol), what);
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
    let fused = common::randn(1, (2 * i, h), 0.3, &dev);
    let mut ts = std::collections::HashMap::new();
    ts.insert("gate_up_proj.weight".to_string(), fused);
    ts.insert(
        "down_proj.weight".to_string(),
        common::randn(2, (h, i), 0.3, &dev),
    );
    let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
    let cfg = GluConfig::new(h, i).with_layout(candle_glu::WeightLayout::Phi3);
    let ffn = GluFeedForward::new(&cfg, vb).unwrap();
    let x = common::randn(3, (33, h), 1.0, &dev);
    assert_eq!(
        ffn.forward_path(&x),
        common::dense_path("a Phi-3 block's halves through the fused kernels")
    );
    assert_close(
        &ffn.forward(&x).unwrap(),
        &common::plain_forward(&ffn, &x).unwrap(),
        Tol::Rel(1e-5),
        "phi3",
    );
}

#[test]
fn a_block_of_mixed_dtypes_takes_candles_ops() {
    // bf16 gate and up, an f32 down: the fused ops take one dtype for all three, so such a
    // block goes through candle's ops (each projection in its own dtype) rather than failing
    // in them.
    let dev = Device::Cpu;
    let (h, i) = (24, 40);
    let w = |seed: u64, shape: (usize, usize)| common::randn(seed, shape, 0.2, &dev);
    let (wg, wu, wd) = (w(1, (i, h)), w(2, (i, h)), w(3, (h, i)));
    let dense =
        |t: &Tensor, dtype| Projection::Dense(Linear::new(t.to_dtype(dtype).unwrap(), None));
    let cfg = GluConfig::new(h, i);
    let mixed = GluFeedForward::from_projections(
        &cfg,
        dense(&wg, DType::BF16),
        dense(&wu, DType::BF16),
        dense(&wd, DType::F32),
    )
    .unwrap();
    let x = common::randn(4, (5, h), 1.0, &dev);
    assert_eq!(mixed.forward_path(&x), ForwardPath::Candle);
    let y = mixed.forward(&x).unwrap();
    // The oracle: candle's ops in f64 on the same weights, the gate and up rounded to bf16 as
    // stored.
    let f64 = |t: &Tensor, dtype| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
    let x64 = x.to_dtype(DType::F64).unwrap();
    let proj = |w: &Tensor| x64.matmul(&w.t().unwrap()).unwrap();
    let h = (candle_nn::ops::silu(&proj(&f64(&wg, DType::BF16))).unwrap()
        * proj(&f64(&wu, DType::BF16)))
    .unwrap();
    let want = h.matmul(&f64(&wd, DType::F32).t().unwrap()).unwrap();
    // bf16 gate and up products round once more: within bf16's rounding.
    assert_close(&y, &want, Tol::Rel(2e-2), "mixed");
}
