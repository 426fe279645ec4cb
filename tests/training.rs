//! The block trains: built over a `VarMap` it creates its parameters, and its gradients match
//! central finite differences of the loss in float64. Parameters and inputs are seeded.

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

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let (h, i) = (5, 7);
    for (k, act) in Activation::ALL.into_iter().enumerate() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F64, &dev);
        let cfg = GluConfig::new(h, i).with_activation(act).with_bias(true);
        let ffn = GluFeedForward::new(&cfg, vb).unwrap();
        let seed = 10 * k as u64;
        common::seed_vars(&map, seed);
        let x = common::randn(seed + 9, (3, h), 1.0, &dev);
        let x = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let loss = |ffn: &GluFeedForward, x: &Tensor| {
            ffn.forward(x).unwrap().sqr().unwrap().sum_all().unwrap()
        };
        let grads = loss(&ffn, x.as_tensor()).backward().unwrap();
        let mut checked = 0;
        let mut params: Vec<(String, Var)> =
            map.data().lock().unwrap().clone().into_iter().collect();
        params.push(("x".into(), x.clone()));
        for (name, var) in params {
            let grad: Vec<f64> = grads
                .get(&var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let orig = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            // A few coordinates of each parameter.
            for k in [0, orig.len() / 2, orig.len() - 1] {
                let eps = 1e-6;
                let at = |d: f64| {
                    let mut v = orig.clone();
                    v[k] += d;
                    var.set(&Tensor::new(v, &dev).unwrap().reshape(var.shape()).unwrap())
                        .unwrap();
                    loss(&ffn, x.as_tensor()).to_scalar::<f64>().unwrap()
                };
                let numeric = (at(eps) - at(-eps)) / (2. * eps);
                at(0.);
                // 1e-5: candle's f64 GELU-erf gradient is good to about 1e-6; a wrong formula is off by O(1).
                let tol = 1e-5 * numeric.abs().max(1.);
                assert!(
                    (grad[k] - numeric).abs() <= tol,
                    "{act} d/d{name}[{k}]: {} vs {numeric}",
                    grad[k]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 7 * 3);
    }
}
