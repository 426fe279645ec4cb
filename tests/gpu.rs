//! The CUDA paths (feature `cuda`) against the CPU reference, built from candle's own ops:
//!
//! - `cuda_parity_fixtures`: the PyTorch parity fixtures through the block on the GPU, in f32,
//!   f16 and bf16, held to the same bounds as on the CPU (`tests/parity.rs`) and to the CPU;
//! - `cuda_gated_op_*`: `σ(gate) ⊙ up` through the crate's kernel, every activation and dtype,
//!   contiguous and strided layouts, forward and backward;
//! - `cuda_block_backward_matches_cpu_autograd`: the block's gradients on the GPU;
//! - `cuda_device_choice`: `DeviceChoice` with the `cuda` feature, with or without a GPU;
//! - `cuda_moe_*`: `GluExperts` on the GPU: every family's transformers fixture in f32 and
//!   bf16 (the bounds of `tests/moe.rs`, and the CPU's result), its gradients against the CPU's,
//!   and the GGUF fixtures of `tests/moe_gguf.rs`, quantized and dequantized.
//!
//! Without a CUDA device every test but `cuda_device_choice` prints `SKIPPED: no CUDA device (...)` to
//! stderr and returns having checked nothing (`cargo test --features cuda -- --nocapture` shows
//! it). With `CANDLE_GLU_REQUIRE_GPU=1` they fail instead (scripts/gpu_h200.sh sets it).
#![cfg(feature = "cuda")]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_glu::device::DeviceChoice;
use candle_glu::{Activation, GluConfig, GluExperts, GluFeedForward, MoeConfig, Projection};
use candle_nn::{Linear, VarBuilder, VarMap};
use common::{assert_close, manifest, max_abs_diff, moe, Case, Tol};

/// The first CUDA device, or `None` after saying on stderr that `test` checked nothing.
fn cuda(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or("");
            if std::env::var_os("CANDLE_GLU_REQUIRE_GPU").is_some_and(|v| v == "1") {
                panic!("{test}: CANDLE_GLU_REQUIRE_GPU=1 but no CUDA device: {reason}");
            }
            eprintln!("SKIPPED: no CUDA device ({reason}): {test} checked nothing");
            None
        }
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Tolerance of the gated product against the CPU reference, relative to its largest value:
/// f32 differs by the last bits of exp/erf; half types by one rounding of the result.
fn gated_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

fn forward_on(case: &Case, dtype: DType, dev: &Device) -> Tensor {
    let cfg = GluConfig::from_hf_config_file(case.dir().join("config.json")).unwrap();
    // transformers has no Swish-β; the fixture swapped `act_fn` on a `silu` module.
    let cfg = cfg.with_activation(case.activation.parse().unwrap());
    let bytes = std::fs::read(case.dir().join("model.safetensors")).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(bytes, dtype, dev).unwrap();
    let ffn = GluFeedForward::new(&cfg, vb.pp(&case.prefix)).unwrap();
    assert_eq!(ffn.device().location(), dev.location());
    let x = case
        .io("x")
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let y = ffn.forward(&x).unwrap();
    assert_eq!((y.dims(), y.dtype()), (x.dims(), dtype), "{}", case.name);
    assert_eq!(y.device().location(), dev.location());
    y.to_device(&Device::Cpu).unwrap()
}

#[test]
fn cuda_parity_fixtures() {
    let Some(dev) = cuda("cuda_parity_fixtures") else {
        return;
    };
    let mut checked = 0;
    for case in manifest().cases {
        let truth = case.io("y_f64");
        for dtype in DTYPES {
            let gpu = forward_on(&case, dtype, &dev);
            let cpu = forward_on(&case, dtype, &Device::Cpu);
            let (bound, what) = match dtype {
                DType::F32 => (Tol::Rel(1e-5), "1e-5 relative".to_string()),
                DType::F16 => {
                    let torch = max_abs_diff(&case.io("y_torch_f16"), &truth);
                    (Tol::Abs(2.0 * torch), format!("2 × torch's {torch:.2e}"))
                }
                _ => {
                    let torch = max_abs_diff(&case.io("y_torch_bf16"), &truth);
                    (Tol::Abs(2.0 * torch), format!("2 × torch's {torch:.2e}"))
                }
            };
            let ours = max_abs_diff(&gpu, &truth);
            let vs_cpu = common::rel_err(&gpu, &cpu);
            eprintln!(
                "{:<26} {dtype:?}: |gpu - f64| {ours:.2e} (bound {what}), gpu vs cpu {vs_cpu:.2e}",
                case.name
            );
            assert_close(
                &gpu,
                &truth,
                bound,
                format!("{} {dtype:?} vs float64", case.name),
            );
            // Both sides round the same f32 values once; cuBLAS sums in another order.
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            let what = format!("{} {dtype:?}: gpu vs cpu", case.name);
            assert_close(&gpu, &cpu, Tol::Rel(tol), what);
            checked += 1;
        }
    }
    assert!(checked >= 3 * 15, "only {checked} fixture runs");
}

/// Random `(gate, up)` pairs of `shape` in every layout the kernel walks: contiguous; gate
/// transposed; the two halves of one fused product (`narrow`); up broadcast from one row; and
/// seven dimensions that do not merge (the contiguous fallback).
fn layouts(dev: &Device, dtype: DType) -> Vec<(&'static str, Tensor, Tensor)> {
    let seed = std::cell::Cell::new(0);
    let r = |shape: &[usize]| {
        seed.set(seed.get() + 1);
        common::randn(seed.get(), shape, 2.0, &Device::Cpu)
            .to_dtype(dtype)
            .unwrap()
            .to_device(dev)
            .unwrap()
    };
    let (m, n) = (37, 515);
    let mut out = vec![("contiguous", r(&[m, n]), r(&[m, n]))];
    let t = r(&[n, m]).t().unwrap();
    out.push(("gate transposed", t, r(&[m, n])));
    let fused = r(&[m, 2 * n]);
    out.push((
        "halves of a fused product",
        fused.narrow(1, 0, n).unwrap(),
        fused.narrow(1, n, n).unwrap(),
    ));
    let row = r(&[1, n]).broadcast_as((m, n)).unwrap();
    out.push(("up broadcast", r(&[m, n]), row));
    let seven = r(&[2, 3, 2, 3, 2, 3, 2]);
    let rev = r(&[2, 3, 2, 3, 2, 3, 2])
        .permute(vec![6, 5, 4, 3, 2, 1, 0])
        .unwrap()
        .contiguous()
        .unwrap()
        .permute(vec![6, 5, 4, 3, 2, 1, 0])
        .unwrap();
    out.push(("seven unmergeable dimensions", rev, seven));
    out
}

#[test]
fn cuda_gated_op_matches_cpu_reference() {
    let Some(dev) = cuda("cuda_gated_op_matches_cpu_reference") else {
        return;
    };
    for dtype in DTYPES {
        for (layout, gate, up) in layouts(&dev, dtype) {
            let (gate_cpu, up_cpu) = (
                gate.to_device(&Device::Cpu).unwrap(),
                up.to_device(&Device::Cpu).unwrap(),
            );
            for &act in Activation::ALL {
                let y = candle_glu::gated_product(&gate, &up, act).unwrap();
                assert_eq!(y.device().location(), dev.location());
                assert_eq!((y.dims(), y.dtype()), (gate.dims(), dtype));
                let want = act.gated(&gate_cpu, &up_cpu).unwrap();
                let what = format!("{dtype:?} {act} {layout} against the CPU reference");
                assert_close(&y, &want, Tol::Rel(gated_tol(dtype)), what);
            }
        }
    }
    // Special values: ReLU keeps NaN, every activation of 0 times up is 0 or NaN-free.
    let g = Tensor::new(&[f32::NAN, 0.0, -0.0, 1e30, -1e30, 3.0], &dev).unwrap();
    let u = Tensor::new(&[1f32, 1.0, 1.0, 1.0, 1.0, 0.5], &dev).unwrap();
    let relu: Vec<f32> = candle_glu::gated_product(&g, &u, Activation::Relu)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(relu[0].is_nan());
    assert_eq!(&relu[1..], &[0.0, 0.0, 1e30, 0.0, 1.5]);
    for &act in Activation::ALL {
        let y: Vec<f32> = candle_glu::gated_product(&g, &u, act)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(y[1..].iter().all(|v| !v.is_nan()), "{act}: {y:?}");
    }
}

/// Gradients of `Σ w ⊙ f(gate, up)` with respect to gate and up.
fn gated_grads(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    act: Activation,
    ours: bool,
) -> (Tensor, Tensor) {
    let (g, u) = (
        Var::from_tensor(gate).unwrap(),
        Var::from_tensor(up).unwrap(),
    );
    let y = if ours {
        candle_glu::gated_product(g.as_tensor(), u.as_tensor(), act).unwrap()
    } else {
        act.gated(g.as_tensor(), u.as_tensor()).unwrap()
    };
    let loss = (y.to_dtype(DType::F32).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let cpu = |v: &Var| {
        grads
            .get(v)
            .expect("a gradient")
            .to_device(&Device::Cpu)
            .unwrap()
    };
    (cpu(&g), cpu(&u))
}

#[test]
fn cuda_gated_op_backward_matches_cpu_autograd() {
    let Some(dev) = cuda("cuda_gated_op_backward_matches_cpu_autograd") else {
        return;
    };
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F16, 1e-2), (DType::BF16, 3e-2)] {
        let r = |seed| common::randn(seed, (19, 133), 1.5, &Device::Cpu);
        let (gate, up, w) = (r(1), r(2), r(3));
        let (gate, up) = (gate.to_dtype(dtype).unwrap(), up.to_dtype(dtype).unwrap());
        let on_gpu = |t: &Tensor| t.to_device(&dev).unwrap();
        for &act in Activation::ALL {
            // The crate's op on the GPU (its backward pass) against candle's autograd through
            // candle's ops on the CPU.
            let (dg, du) = gated_grads(&on_gpu(&gate), &on_gpu(&up), &on_gpu(&w), act, true);
            let (want_g, want_u) = gated_grads(&gate, &up, &w, act, false);
            for (name, got, want) in [("d gate", dg, want_g), ("d up", du, want_u)] {
                assert_close(
                    &got,
                    &want,
                    Tol::Rel(tol),
                    format!("{dtype:?} {act} {name}"),
                );
            }
        }
    }
}

/// Gradients of `Σ ffn(x)²` with respect to x and every weight, on `dev`.
fn block_grads(act: Activation, dev: &Device, gpu_forward: bool) -> Vec<(String, Tensor)> {
    let (h, i) = (40, 72);
    let map = VarMap::new();
    // The same weights on both devices: made on the CPU from one seed, then moved.
    let lin = |o: usize, n: usize, seed: u64| {
        let mut state = seed;
        let data: Vec<f32> = (0..o * n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) / (n as f32).sqrt() * 3.0
            })
            .collect();
        Tensor::from_vec(data, (o, n), &Device::Cpu)
            .unwrap()
            .to_device(dev)
            .unwrap()
    };
    let vars = [
        ("gate_proj", lin(i, h, 1)),
        ("up_proj", lin(i, h, 2)),
        ("down_proj", lin(h, i, 3)),
    ];
    let mut projections = Vec::new();
    {
        let mut data = map.data().lock().unwrap();
        for (name, w) in vars {
            let v = Var::from_tensor(&w).unwrap();
            projections.push(Projection::Dense(Linear::new(v.as_tensor().clone(), None)));
            data.insert(name.to_string(), v);
        }
    }
    let down = projections.pop().unwrap();
    let up = projections.pop().unwrap();
    let gate = projections.pop().unwrap();
    let cfg = GluConfig::new(h, i).with_activation(act);
    let ffn = GluFeedForward::from_projections(&cfg, gate, up, down).unwrap();
    let x = Var::from_tensor(&lin(6, h, 4)).unwrap();
    let y = if gpu_forward {
        ffn.forward(x.as_tensor()).unwrap()
    } else {
        common::plain_forward(&ffn, x.as_tensor()).unwrap()
    };
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![("x".to_string(), grads.get(&x).unwrap().clone())];
    let mut vars: Vec<_> = map.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, v) in vars {
        out.push((name, grads.get(&v).expect("a gradient").clone()));
    }
    out.into_iter()
        .map(|(n, t)| (n, t.to_device(&Device::Cpu).unwrap()))
        .collect()
}

#[test]
fn cuda_block_backward_matches_cpu_autograd() {
    let Some(dev) = cuda("cuda_block_backward_matches_cpu_autograd") else {
        return;
    };
    for &act in Activation::ALL {
        let gpu = block_grads(act, &dev, true);
        let cpu = block_grads(act, &Device::Cpu, false);
        for ((name, got), (_, want)) in gpu.iter().zip(&cpu) {
            assert_close(got, want, Tol::Rel(1e-4), format!("{act} d{name}"));
        }
    }
}

#[test]
fn cuda_device_choice() {
    // Asked for by name: the GPU, or one line saying why not. Auto: the GPU, else the CPU.
    let auto = DeviceChoice::Auto.device().unwrap();
    match DeviceChoice::Cuda.device() {
        Ok(dev) => {
            assert!(dev.is_cuda());
            assert!(auto.is_cuda());
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("cuda was asked for but no CUDA GPU answered"),
                "{msg}"
            );
            assert_eq!(msg.lines().count(), 1, "{msg}");
            assert!(auto.is_cpu());
            eprintln!("no CUDA device here; DeviceChoice::Cuda says: {msg}");
        }
    }
}

/// Weights on the CPU and an input on the GPU (or the other way round): an error naming both
/// devices, from the projection, the block and the mixture alike. candle's quantized product
/// asks the input's device only, and panicked on a CPU `QTensor`.
#[test]
fn cuda_input_for_weights_elsewhere_is_an_error() {
    let Some(dev) = cuda("an input on another device than the weights") else {
        return;
    };
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    let (h, i) = (256, 512);
    let w = |seed: u64, r, c| common::randn(seed, (r, c), 0.05, &Device::Cpu);
    let q = |seed, r, c| {
        let qt = QTensor::quantize(&w(seed, r, c), GgmlDType::Q6K).unwrap();
        Projection::quantized(QMatMul::from_arc(std::sync::Arc::new(qt)).unwrap(), None)
    };
    let ffn =
        GluFeedForward::from_projections(&GluConfig::new(h, i), q(1, i, h), q(2, i, h), q(3, h, i))
            .unwrap();
    let x = common::randn(4, (3, h), 1.0, &Device::Cpu);
    let on_gpu = x.to_device(&dev).unwrap();
    for err in [
        ffn.gate_proj().forward(&on_gpu).unwrap_err(),
        ffn.gate_proj().forward_candle(&on_gpu).unwrap_err(),
        ffn.forward(&on_gpu).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(msg.contains("device mismatch"), "{msg}");
    }
    // And dense weights on the GPU with a CPU input.
    let dense = Projection::Dense(Linear::new(w(5, i, h).to_device(&dev).unwrap(), None));
    let msg = dense.forward(&x).unwrap_err().to_string();
    assert!(msg.contains("device mismatch"), "{msg}");
}

// --- GluExperts: candle's ops on the GPU (gather, matmuls, index_add), the CPU's results ---

/// max |y - truth| ÷ max |truth|, in f64 on the host.
fn rel_f64(y: &Tensor, truth: &Tensor) -> f64 {
    let to = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    common::rel_err(&to(y), &to(truth))
}

#[test]
fn cuda_moe_matches_transformers() {
    let Some(dev) = cuda("cuda_moe_matches_transformers") else {
        return;
    };
    let mut checked = 0;
    for case in moe::CASES {
        let io = moe::io(case);
        for &file in moe::files(case) {
            for dtype in [DType::F32, DType::BF16] {
                let moe = moe::layer(case, file, dtype, &dev);
                let x = io["x"].to_dtype(dtype).unwrap().to_device(&dev).unwrap();
                let y = moe.forward(&x).unwrap();
                assert_eq!((y.dims(), y.dtype()), (x.dims(), dtype), "{case}");
                assert_eq!(y.device().location(), dev.location(), "{case}");
                let cpu_moe = moe::layer(case, file, dtype, &Device::Cpu);
                let cpu = cpu_moe
                    .forward(&x.to_device(&Device::Cpu).unwrap())
                    .unwrap();
                let ours = rel_f64(&y, &io["y_f64"]);
                let vs_cpu = rel_f64(&y, &cpu);
                let torch = rel_f64(&io["y_torch_bf16"], &io["y_f64"]);
                eprintln!(
                    "{case:<12} {file:<18} {dtype:?}: gpu vs f64 {ours:.2e}, gpu vs cpu {vs_cpu:.2e} (torch bf16 {torch:.2e})"
                );
                if dtype == DType::F32 {
                    // The routing is transformers' (the fixtures exclude near-ties).
                    let routing = moe.route(&x).unwrap();
                    let want: Vec<Vec<i64>> = io["top_k"].to_vec2().unwrap();
                    for (t, (got, want)) in routing.experts.iter().zip(&want).enumerate() {
                        let mut got: Vec<i64> = got.iter().map(|&e| e as i64).collect();
                        got.sort();
                        assert_eq!(&got, want, "{case}: token {t}'s experts on the GPU");
                    }
                    assert!(
                        ours <= 1e-5,
                        "{case} ({file}) f32: {ours:e} against float64"
                    );
                    assert!(
                        vs_cpu <= 1e-5,
                        "{case} ({file}) f32: {vs_cpu:e} against the CPU"
                    );
                } else {
                    assert!(
                        ours <= 2.0 * torch,
                        "{case} ({file}) bf16: {ours:e} against torch's {torch:e}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 14);
}

#[test]
fn cuda_moe_backward_matches_cpu_autograd() {
    let Some(dev) = cuda("cuda_moe_backward_matches_cpu_autograd") else {
        return;
    };
    // Qwen3-MoE's fixture as variables in f32; the loss Σ y·c for a fixed c; every weight's
    // gradient (the router's, the used experts') on the GPU against the CPU's.
    let case = "qwen3_moe";
    let io = moe::io(case);
    let cfg = MoeConfig::from_hf_config_file(moe::dir(case).join("config.json")).unwrap();
    let ws = candle_core::safetensors::load(moe::dir(case).join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let grads_on = |dev: &Device| -> HashMap<String, Option<Tensor>> {
        let (vars, tensors) = moe::variables(&ws, |v| v.to_device(dev).unwrap());
        let vb = VarBuilder::from_tensors(tensors, DType::F32, dev);
        let moe = GluExperts::new(&cfg, vb.pp("model.layers.0.mlp")).unwrap();
        let x = io["x"].to_device(dev).unwrap();
        let c = io["y_f64"]
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(dev)
            .unwrap();
        let loss = (moe.forward(&x).unwrap() * c).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        vars.iter()
            .map(|(k, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .map(|g| g.to_device(&Device::Cpu).unwrap());
                (k.clone(), g)
            })
            .collect()
    };
    let (gpu, cpu) = (grads_on(&dev), grads_on(&Device::Cpu));
    let mut compared = 0;
    for (name, want) in &cpu {
        match (&gpu[name], want) {
            (Some(got), Some(want)) => {
                assert_close(got, want, Tol::Rel(1e-4), format!("d{name}"));
                compared += 1;
            }
            (None, None) => {}
            _ => panic!("{name}: a gradient on one device only"),
        }
    }
    // The router and the used experts' three projections each.
    assert!(compared > 3 * 8, "only {compared} gradients");
    assert!(gpu["model.layers.0.mlp.gate.weight"].is_some());
}

#[test]
fn cuda_moe_gguf_matches_float64() {
    use candle_glu::loading::{Checkpoint, LoadOptions};
    let Some(dev) = cuda("cuda_moe_gguf_matches_float64") else {
        return;
    };
    // The GGUF fixtures of `tests/moe_gguf.rs`: experts quantized (q4k, q8_0, Q4_1) through
    // candle's QMatMul on the GPU, and dequantized at load.
    for case in ["mixtral", "qwen2moe", "qwen3moe", "olmoe", "deepseek2"] {
        let dir = common::fixtures().join("moe_gguf");
        let ckpt = Checkpoint::open(dir.join(format!("{case}.gguf"))).unwrap();
        let cfg = ckpt.moe_config().unwrap().unwrap();
        let io = candle_core::safetensors::load(
            dir.join(format!("{case}.io.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let opts = LoadOptions::new(DType::F32, dev.clone());
        let quantized = ckpt.load_experts(&cfg, 0, &opts).unwrap();
        assert!(quantized.expert(0).unwrap().gate_proj().is_quantized());
        let dequantized = ckpt
            .load_experts(&cfg, 0, &opts.with_quantized(false))
            .unwrap();
        for n in [1, 18, 160] {
            let x = io[&format!("x_{n}")].to_device(&dev).unwrap();
            let truth = &io[&format!("y_{n}")];
            let q = quantized.forward(&x).unwrap();
            let d = dequantized.forward(&x).unwrap();
            assert_eq!(q.device().location(), dev.location());
            let (eq, ed) = (rel_f64(&q, truth), rel_f64(&d, truth));
            eprintln!("{case:<9} {n:>3} tokens: quantized {eq:.2e}, dequantized {ed:.2e}");
            // tests/loading.rs's bound for candle's QMatMul; the dequantized layer as on the CPU.
            assert!(eq <= 3e-2, "{case}, {n} tokens, quantized: {eq:e}");
            assert!(ed <= 1e-5, "{case}, {n} tokens, dequantized: {ed:e}");
        }
    }
}
