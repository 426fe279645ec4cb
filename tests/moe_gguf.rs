//! `GluExperts` from GGUF files: one tiny one-layer model per llama.cpp architecture with
//! experts (Mixtral as `llama`, `qwen2moe` with its gated shared expert, `qwen3moe`, `olmoe`,
//! `deepseek2` with sigmoid scores, a selection bias, groups, a scale, a shared expert and the
//! fused `ffn_gate_up_exps`), written by llama.cpp's own Python writer (`gguf`), experts in
//! q4k, q8_0 and Q4_1 (`scripts/make_moe_gguf_fixtures.py`). The reference is the layer in
//! float64 over the weights as `gguf` dequantizes them (rounded once to f32), routed as llama.cpp routes each
//! architecture; the fixtures exclude near-ties.
//!
//! - Dequantized on load: within 1e-5 of the float64 layer (the metadata read as llama.cpp
//!   reads it: any routing difference would show far above that).
//! - Quantized, read in place by the crate's kernels: 1e-5 for Q4_1's exact kernel (where
//!   neither the VNNI kernels nor the AMX tiles take the experts); else, where activations are
//!   rounded (8 bits for q8_0, q4k and Q4_1, bf16 on the AMX tiles), no more than 1.25× the
//!   error of the same layer through candle's own `QMatMul` (an oracle independent of the
//!   kernels) and at most 3e-2, the bound of `tests/loading.rs` for `QMatMul`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Module, Tensor};
use candle_glu::loading::{Checkpoint, LoadOptions};
use candle_glu::{Error, GluExperts, GluFeedForward, MoeConfig, Scoring};

const CASES: [&str; 5] = ["mixtral", "qwen2moe", "qwen3moe", "olmoe", "deepseek2"];
const TOKENS: [usize; 3] = [1, 18, 160];

fn path(case: &str) -> PathBuf {
    common::fixtures()
        .join("moe_gguf")
        .join(format!("{case}.gguf"))
}

fn io(case: &str) -> HashMap<String, Tensor> {
    let file = common::fixtures()
        .join("moe_gguf")
        .join(format!("{case}.io.safetensors"));
    candle_core::safetensors::load(file, &Device::Cpu).unwrap()
}

fn open(case: &str) -> (Checkpoint, MoeConfig) {
    let ckpt = Checkpoint::open(path(case)).unwrap();
    let cfg = ckpt.moe_config().unwrap().expect("a mixture of experts");
    (ckpt, cfg)
}

/// NaN-aware ([`common::rel_err`]).
fn rel(y: &Tensor, truth: &Tensor) -> f64 {
    common::rel_err(y, truth)
}

fn opts() -> LoadOptions {
    LoadOptions::new(DType::F32, Device::Cpu)
}

#[test]
fn metadata_routes_as_llama_cpp() {
    let cfg = |case| open(case).1;
    let m = cfg("mixtral");
    assert_eq!((m.num_experts, m.top_k, m.norm_topk_prob), (8, 2, true));
    assert_eq!(
        (m.expert.hidden_size, m.expert.intermediate_size),
        (256, 256)
    );
    let q2 = cfg("qwen2moe");
    assert_eq!((q2.top_k, q2.norm_topk_prob), (3, false));
    assert_eq!(
        (q2.shared_intermediate_size, q2.shared_expert_gate),
        (Some(64), true)
    );
    let q3 = cfg("qwen3moe");
    assert_eq!((q3.top_k, q3.norm_topk_prob), (2, true));
    assert_eq!(q3.shared_intermediate_size, None);
    assert!(!cfg("olmoe").norm_topk_prob);
    let d = cfg("deepseek2");
    assert_eq!((d.scoring, d.selection_bias), (Scoring::Sigmoid, true));
    assert_eq!((d.n_group, d.topk_group, d.top_k), (4, 2, 3));
    assert_eq!(
        (d.routed_scaling_factor, d.shared_intermediate_size),
        (2.5, Some(64))
    );
    assert_eq!(d.layer_prefix(0), "blk.0");
    // Which layers have experts: the config (llama.cpp's `leading_dense_block_count` for
    // deepseek2) as the tensors say.
    for case in CASES {
        let (ckpt, cfg) = open(case);
        let moe = ckpt.moe_layers(&cfg);
        assert!(!moe.is_empty(), "{case}");
        for l in 0..ckpt.num_layers().unwrap_or(1) {
            assert_eq!(cfg.is_moe_layer(l), moe.contains(&l), "{case}: layer {l}");
        }
    }
    // A dense GGUF has no mixture.
    let dense = Checkpoint::open(common::embedded_weights()).unwrap();
    assert!(dense.moe_config().unwrap().is_none());
}

#[test]
fn dequantized_experts_match_float64() {
    for case in CASES {
        let (ckpt, cfg) = open(case);
        let moe = ckpt
            .load_experts(&cfg, 0, &opts().with_quantized(false))
            .unwrap();
        assert!(!moe.expert(0).unwrap().gate_proj().is_quantized());
        let io = io(case);
        for n in TOKENS {
            let y = moe.forward(&io[&format!("x_{n}")]).unwrap();
            let err = rel(&y, &io[&format!("y_{n}")]);
            assert!(err <= 1e-5, "{case}, {n} tokens: {err:e}");
        }
    }
}

#[test]
fn quantized_experts_read_in_place_match_float64() {
    let kernels =
        common::kernels_or_skip("GGUF experts on the crate's kernels (candle's QMatMul instead)");
    // Required where CI says the int8 kernels run; the bound below holds either way.
    let int8 = common::int8_kernels_or_skip("q8_0/q4k experts on the VNNI kernels");
    let amx = candle_glu::cpu_kernels().is_some_and(|k| k.amx());
    for case in CASES {
        let (ckpt, cfg) = open(case);
        let moe = ckpt.load_experts(&cfg, 0, &opts()).unwrap();
        for e in 0..cfg.num_experts {
            let f = moe.expert(e).unwrap();
            assert!(
                f.gate_proj().is_quantized() && f.down_proj().is_quantized(),
                "{case}: expert {e} was dequantized"
            );
        }
        let io = io(case);
        for n in TOKENS {
            let x = &io[&format!("x_{n}")];
            // Q4_1 weights only: the exact kernel, where neither the VNNI one (up to 20 tokens
            // an expert) nor the AMX tiles (from 4) take them. Else activations rounded to 8
            // bits (or bf16 on the tiles): no worse than candle's own QMatMul over the same
            // blocks and routing (plus a quarter), and within the bound of `tests/loading.rs`
            // for QMatMul.
            let exact = kernels && case == "olmoe" && !int8 && !amx;
            let candle = rel(&through_qmatmul(&moe, &ckpt, x), &io[&format!("y_{n}")]);
            let tol = if exact {
                1e-5
            } else {
                (1.25 * candle).min(3e-2)
            };
            let y = moe.forward(x).unwrap();
            let err = rel(&y, &io[&format!("y_{n}")]);
            eprintln!("{case}, {n} tokens: {err:.2e} (candle's QMatMul {candle:.2e})");
            assert!(err <= tol, "{case}, {n} tokens: {err:e} > {tol:e}");
            // Q4_1's exact kernel on every CPU with the kernels, whichever the layer took
            // (`with_exact_q4_1`: up to 60 tokens an expert at 160, the packed schedule too).
            if kernels && case == "olmoe" {
                let exact = moe.clone().with_exact_q4_1(true);
                let err = rel(&exact.forward(x).unwrap(), &io[&format!("y_{n}")]);
                assert!(err <= 1e-5, "{case}, {n} tokens, exact Q4_1: {err:e}");
            }
        }
    }
}

/// The layer with every projection through candle's own `QMatMul` (`Projection::forward_candle`) and
/// candle's ops, token by token, routed as `moe` routes: an oracle independent of the crate's
/// kernels for what 8-bit activations cost on these weights.
fn through_qmatmul(moe: &GluExperts, ckpt: &Checkpoint, x: &Tensor) -> Tensor {
    let ffn = |f: &GluFeedForward, x: &Tensor| {
        let g = candle_nn::ops::silu(&f.gate_proj().forward_candle(x).unwrap()).unwrap();
        let u = f.up_proj().forward_candle(x).unwrap();
        f.down_proj().forward_candle(&(g * u).unwrap()).unwrap()
    };
    let routing = moe.route(x).unwrap();
    let gate = ckpt
        .gguf()
        .unwrap()
        .dequantized("blk.0.ffn_gate_inp_shexp.weight", DType::F32, &Device::Cpu)
        .ok();
    let rows: Vec<Tensor> = (0..x.dim(0).unwrap())
        .map(|t| {
            let xt = x.narrow(0, t, 1).unwrap();
            let mut y = xt.zeros_like().unwrap();
            for (&e, &w) in routing.experts[t].iter().zip(&routing.weights[t]) {
                y = (y + (ffn(moe.expert(e).unwrap(), &xt) * w as f64).unwrap()).unwrap();
            }
            if let Some(shared) = moe.shared_expert() {
                let mut s = ffn(shared, &xt);
                if let Some(g) = &gate {
                    let g = xt.matmul(&g.unsqueeze(1).unwrap()).unwrap();
                    s = s
                        .broadcast_mul(&candle_nn::ops::sigmoid(&g).unwrap())
                        .unwrap();
                }
                y = (y + s).unwrap();
            }
            y
        })
        .collect();
    Tensor::cat(&rows, 0).unwrap()
}

/// Layer 0 of `case` with its experts quantized as stored, then dequantized to f32.
fn quantized_and_dequantized(case: &str) -> (GluExperts, GluExperts, MoeConfig) {
    let (ckpt, cfg) = open(case);
    let q = ckpt.load_experts(&cfg, 0, &opts()).unwrap();
    let d = ckpt
        .load_experts(&cfg, 0, &opts().with_quantized(false))
        .unwrap();
    (q, d, cfg)
}

#[test]
fn quantized_and_dequantized_route_alike() {
    for case in CASES {
        let (q, d, cfg) = quantized_and_dequantized(case);
        let x = &io(case)["x_160"];
        let (rq, rd) = (q.route(x).unwrap(), d.route(x).unwrap());
        assert_eq!(rq.experts, rd.experts, "{case}");
        let counts = rq.tokens_per_expert(cfg.num_experts);
        assert!(counts.iter().any(|&c| c >= 44), "{case}: {counts:?}");
    }
}

/// The gradient reaches the input through quantized experts (their weights are constants), as
/// through the same experts dequantized, whose backward pass on the kernels `tests/moe.rs`
/// checks against float64's (and that against central differences); the routing weights' part of it differs by the experts' outputs, which
/// the quantized kernels compute over 8-bit activations.
#[test]
fn quantized_experts_pass_the_gradient_to_the_input() {
    for case in CASES {
        let (q, d, _) = quantized_and_dequantized(case);
        let x = &io(case)["x_18"];
        let r = common::randn(3, x.shape(), 1.0, &Device::Cpu);
        let x_grad = |moe: &GluExperts| {
            let x = candle_core::Var::from_tensor(x).unwrap();
            let loss = (moe.forward(x.as_tensor()).unwrap() * &r).unwrap();
            let grads = loss.sum_all().unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).cloned();
            g.unwrap_or_else(|| panic!("{case}: no gradient reached x"))
        };
        let (gq, gd) = (x_grad(&q), x_grad(&d));
        common::assert_finite(&gd, case);
        let err = rel(&gq, &gd);
        println!("{case}: x's gradient, quantized against dequantized experts: {err:.1e}");
        assert!(err < 3e-2, "{case}: {err:e}");
    }
}

#[test]
fn bad_requests_are_one_line_errors() {
    let (ckpt, cfg) = open("qwen3moe");
    let one_line = |e: &Error| {
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
        s
    };
    // A layer without experts lists those with them.
    let e = ckpt.load_experts(&cfg, 3, &opts()).unwrap_err();
    assert!(matches!(e, Error::LayerOutOfRange { .. }), "{e}");
    assert!(one_line(&e).contains("it holds layers 0"), "{e}");
    // A config of more experts than stored: the router's shape, before any data is read.
    let mut more = cfg.clone();
    more.num_experts = 16;
    let e = ckpt.load_experts(&more, 0, &opts()).unwrap_err();
    assert!(
        one_line(&e).contains("blk.0.ffn_gate_inp.weight") && one_line(&e).contains("[16, 192]"),
        "{e}"
    );
    // A shared expert the file does not hold: the first missing tensor is named.
    let mut shared = cfg.clone();
    shared.shared_intermediate_size = Some(64);
    let e = ckpt.load_experts(&shared, 0, &opts()).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    assert!(one_line(&e).contains("blk.0.ffn_gate_shexp.weight"), "{e}");
    // Another expert size: the stacked tensors' shape.
    let mut wide = cfg.clone();
    wide.expert.intermediate_size = 128;
    let e = ckpt.load_experts(&wide, 0, &opts()).unwrap_err();
    assert!(one_line(&e).contains("blk.0.ffn_gate_exps.weight"), "{e}");
    // The layer as one block: a mixture, from its router (not "no such layer").
    let dense_cfg = candle_glu::GluConfig::new(cfg.expert.hidden_size, 64)
        .with_layout(candle_glu::WeightLayout::Gguf);
    let e = ckpt.load_layer(&dense_cfg, 0, &opts()).unwrap_err();
    assert!(matches!(e, Error::MoeLayer { layer: 0, .. }), "{e}");
}

#[test]
fn stacked_slices_hold_the_stored_blocks() {
    use candle_glu::loading::GgufStore;
    // Each expert's slice is the stored tensor's rows, byte for byte, as candle's own reader
    // reads the whole tensor.
    let file = path("deepseek2");
    let mut reader = std::fs::File::open(&file).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
    let name = "blk.0.ffn_gate_up_exps.weight";
    let whole = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
    let bytes = whole.data().unwrap();
    let store = GgufStore::open(&file).unwrap();
    let halves = store.stacked_qtensors(name, 2, &Device::Cpu).unwrap();
    assert_eq!(halves.len(), 2);
    let per_row = bytes.len() / (8 * 128);
    for (half, tensors) in halves.iter().enumerate() {
        assert_eq!(tensors.len(), 8);
        for (e, q) in tensors.iter().enumerate() {
            assert_eq!(q.shape().dims(), &[64, 192]);
            let start = (e * 128 + 64 * half) * per_row;
            assert_eq!(
                &*q.data().unwrap(),
                &bytes[start..start + 64 * per_row],
                "expert {e}, half {half}"
            );
        }
    }
    // On the CPU the slices view one buffer, in the file's order: an expert's up rows follow
    // its gate rows, and the next expert follows.
    let at = |q: &candle_core::quantized::QTensor| q.data().unwrap().as_ptr() as usize;
    for (e, (gate, up)) in halves[0].iter().zip(&halves[1]).enumerate() {
        assert_eq!(at(up), at(gate) + 64 * per_row, "expert {e}");
    }
    assert_eq!(at(&halves[0][1]), at(&halves[0][0]) + 128 * per_row);
    for parts in [0, 3] {
        let e = store
            .stacked_qtensors(name, parts, &Device::Cpu)
            .unwrap_err();
        let want = format!("rows do not split into {parts} equal parts");
        assert!(e.to_string().contains(&want), "{e}");
    }
    let e = store
        .stacked_qtensors("blk.0.ffn_gate_inp.weight", 1, &Device::Cpu)
        .unwrap_err();
    assert!(e.to_string().contains("a stack of matrices"), "{e}");
}

/// The fixture `case` written again (by candle's GGUF writer) into `dir` with its metadata
/// changed by `edit`: the same tensors, bytes for bytes.
fn rewritten(
    case: &str,
    dir: &std::path::Path,
    edit: impl FnOnce(&mut HashMap<String, gguf_file::Value>),
) -> PathBuf {
    rewritten_with(case, dir, edit, Vec::new())
}

/// [`rewritten`], with `extra` tensors added.
fn rewritten_with(
    case: &str,
    dir: &std::path::Path,
    edit: impl FnOnce(&mut HashMap<String, gguf_file::Value>),
    extra: Vec<(String, candle_core::quantized::QTensor)>,
) -> PathBuf {
    let mut file = std::fs::File::open(path(case)).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut metadata = content.metadata.clone();
    edit(&mut metadata);
    let mut tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                content.tensor(&mut file, n, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    tensors.extend(extra);
    let out = dir.join(format!("{case}.gguf"));
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(
        &mut std::fs::File::create(&out).unwrap(),
        &metadata,
        &tensors,
    )
    .unwrap();
    out
}

#[test]
fn expert_biases_in_the_file_are_refused_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cfg) = open("mixtral");
    let i = cfg.expert.intermediate_size;
    let bias = candle_core::quantized::QTensor::quantize(
        &Tensor::zeros((8, i), DType::F32, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let name = "blk.0.ffn_up_exps.bias".to_string();
    let path = rewritten_with("mixtral", dir.path(), |_| {}, vec![(name, bias)]);
    let e = Checkpoint::open(path)
        .unwrap()
        .load_experts(&cfg, 0, &opts())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the file has expert biases (`blk.0.ffn_up_exps.bias`)"),
        "{e}"
    );
}

#[test]
fn metadata_that_llama_cpp_would_default_or_refuse() {
    use gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let config = |case: &str, edit: &dyn Fn(&mut HashMap<String, Value>)| {
        let path = rewritten(case, dir.path(), |m| edit(m));
        Checkpoint::open(path).unwrap().moe_config()
    };
    // Sizes the metadata leaves out come from the tensors' shapes: the same layer. (The
    // dense FFN's size, which the experts' used to fall back to, made other than theirs, as
    // Qwen1.5-MoE's is.)
    for (case, key) in [
        ("qwen3moe", "qwen3moe.expert_feed_forward_length"),
        ("qwen2moe", "qwen2moe.expert_feed_forward_length"),
        ("deepseek2", "deepseek2.expert_shared_count"),
        ("qwen2moe", "qwen2moe.expert_shared_feed_forward_length"),
    ] {
        let without = config(case, &|m| {
            assert!(m.remove(key).is_some(), "{key} is in the fixture");
            m.insert(format!("{case}.feed_forward_length"), Value::U32(5632));
        });
        assert_eq!(without.unwrap(), Some(open(case).1), "{case} without {key}");
    }
    // Qwen2-MoE's shared size 0 is llama.cpp's "not set" too.
    let zero = config("qwen2moe", &|m| {
        m.insert(
            "qwen2moe.expert_shared_feed_forward_length".into(),
            Value::U32(0),
        );
    });
    assert_eq!(zero.unwrap(), Some(open("qwen2moe").1));
    // Group-limited routing is read for every architecture, as llama.cpp reads it.
    let grouped = config("qwen3moe", &|m| {
        m.insert("qwen3moe.expert_group_count".into(), Value::U32(4));
        m.insert("qwen3moe.expert_group_used_count".into(), Value::U32(2));
    })
    .unwrap()
    .unwrap();
    assert_eq!((grouped.n_group, grouped.topk_group), (4, 2));
    // Refused, one line each, naming the key: a malformed count, a group count without the
    // groups used, shared-expert tensors the metadata sizes at 0.
    for (case, edit, want) in [
        (
            "deepseek2",
            &(|m: &mut HashMap<String, Value>| {
                m.insert(
                    "deepseek2.expert_gating_func".into(),
                    Value::String("sigmoid".into()),
                );
            }) as &dyn Fn(&mut HashMap<String, Value>),
            "`deepseek2.expert_gating_func` must be a non-negative integer, found a string",
        ),
        (
            "mixtral",
            &|m: &mut HashMap<String, Value>| {
                m.insert("llama.expert_count".into(), Value::I32(-8));
            },
            "`llama.expert_count` must be a non-negative integer, found -8",
        ),
        (
            "qwen3moe",
            &|m: &mut HashMap<String, Value>| {
                m.insert("qwen3moe.expert_group_count".into(), Value::U32(4));
            },
            "`qwen3moe.expert_group_count` = 4 needs `qwen3moe.expert_group_used_count`",
        ),
        (
            "deepseek2",
            &|m: &mut HashMap<String, Value>| {
                m.insert("deepseek2.expert_shared_count".into(), Value::U32(0));
            },
            "shared-expert tensors (`ffn_up_shexp`), but its metadata gives them no size \
             (`deepseek2.expert_shared_count` is 0)",
        ),
        // The sizes' checks, naming the file's own keys (not transformers').
        (
            "qwen3moe",
            &|m: &mut HashMap<String, Value>| {
                m.insert("qwen3moe.expert_used_count".into(), Value::U32(1000));
            },
            "`qwen3moe.expert_used_count` = 1000 must be between 1 and the number of experts",
        ),
        (
            "qwen3moe",
            &|m: &mut HashMap<String, Value>| {
                m.insert("qwen3moe.expert_group_count".into(), Value::U32(7));
                m.insert("qwen3moe.expert_group_used_count".into(), Value::U32(1));
            },
            "`qwen3moe.expert_group_count` = 7 must divide the number of experts",
        ),
        (
            "deepseek2",
            &|m: &mut HashMap<String, Value>| {
                m.insert("deepseek2.expert_group_used_count".into(), Value::U32(0));
            },
            "`deepseek2.expert_group_used_count` = 0 must be between 1 and \
             `deepseek2.expert_group_count` = 4",
        ),
        (
            "deepseek2",
            &|m: &mut HashMap<String, Value>| {
                m.insert(
                    "deepseek2.expert_weights_scale".into(),
                    Value::F32(f32::INFINITY),
                );
            },
            "`deepseek2.expert_weights_scale` must be finite",
        ),
    ] {
        let e = config(case, edit).unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains(want), "{case}: {e}");
        assert!(
            !e.contains("num_experts_per_tok") && !e.contains("n_group ="),
            "{e}"
        );
    }
}
