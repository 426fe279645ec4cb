//! The example CLI (`examples/infer.rs`) run as a process, as a user runs it.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, manifest, Tol};

/// The `infer` example as a process.
fn infer() -> Command {
    common::example_command("infer")
}

fn run(args: &[&str]) -> Output {
    infer().args(args).output().unwrap()
}

/// The lines `infer` prints on stderr for `args`, which must succeed.
fn warnings(args: &[&str]) -> Vec<String> {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    err.lines().map(str::to_string).collect()
}

/// `infer`'s flags to run layer `layer` of `weights` on the input file `input` into `output`.
fn layer_io<'a>(
    weights: &'a Path,
    layer: &'a str,
    input: &'a Path,
    output: &'a Path,
) -> Vec<&'a str> {
    let path = |p: &'a Path| p.to_str().unwrap();
    vec![
        "--weights",
        path(weights),
        "--layer",
        layer,
        "--input",
        path(input),
        "--output",
        path(output),
    ]
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A failure: non-zero exit, one line on stderr that contains `want`, no panic.
fn fails(args: &[&str], want: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line:\n{err}"
    );
    assert!(err.contains(want), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // 2 for what clap rejects, 1 otherwise; a panic would be 101.
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "{args:?}: {:?}",
        out.status
    );
}

#[test]
fn no_arguments_runs_the_embedded_model() {
    let text = stdout(&run(&[]));
    for want in [
        "SmolLM2-135M-Instruct",
        "model.layers.0.mlp (llama layout, safetensors)",
        "hidden 576, intermediate 1536, activation silu (SwiGLU)",
        "cpu, f32",
        "input       [1, 8, 576]",
        "output      [1, 8, 576]",
        "y stats",
        "ms (first call)",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn json_output() {
    let args = [
        "--layer", "15", "--dtype", "bf16", "--tokens", "5", "--batch", "2", "--bench", "3",
        "--json",
    ];
    let json: serde_json::Value = serde_json::from_str(&stdout(&run(&args))).unwrap();
    assert_eq!(json["prefix"], "model.layers.15.mlp");
    assert_eq!(json["dtype"], "bf16");
    assert_eq!(json["activation"], "silu");
    assert_eq!(json["input_shape"], serde_json::json!([2, 5, 576]));
    assert_eq!(json["output_shape"], serde_json::json!([2, 5, 576]));
    assert_eq!(json["bench"]["runs"], 3);
    assert!(json["bench"]["median_ms"].as_f64().unwrap() > 0.0);
    assert!(json["stats"]["std"].as_f64().unwrap() > 0.0);
}

#[test]
fn seeded_input_is_reproducible() {
    let a = stdout(&run(&["--json", "--seed", "7"]));
    let b = stdout(&run(&["--json", "--seed", "7"]));
    let c = stdout(&run(&["--json", "--seed", "8"]));
    let stats = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["stats"].clone();
    assert_eq!(stats(&a), stats(&b));
    assert_ne!(stats(&a), stats(&c));
}

/// Runs a fixture through the CLI with `--input` and `--output` and checks `y` against
/// PyTorch's float64 output.
fn fixture_through_cli(name: &str, extra: &[&str]) {
    let case = manifest()
        .cases
        .into_iter()
        .find(|c| c.name == name)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.safetensors");
    let io = case.dir().join("io.safetensors");
    let weights = case.dir();
    let mut args = vec![
        "--weights",
        weights.to_str().unwrap(),
        "--prefix",
        &case.prefix,
        "--input",
        io.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let text = stdout(&run(&args));
    assert!(
        text.contains(&format!("wrote       {}", out.display())),
        "{text}"
    );
    let y = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["y"].clone();
    assert_eq!(y.dtype(), DType::F32);
    assert_eq!(y.dims(), &[2, 5, 72]);
    assert_close(&y, &case.io("y_f64"), Tol::Rel(1e-5), name);
    // Nothing but the output is left behind.
    let left: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, vec![out]);
}

#[test]
fn transformers_directories_by_prefix() {
    // config.json's activation and bias are enough, in every layout.
    for name in [
        "llama_silu",
        "llama_bias_silu",
        "gemma_legacy_gelu",
        "phi3_silu",
        "t5_gated_gelu",
        "mixtral_silu",
    ] {
        fixture_through_cli(name, &[]);
    }
}

#[test]
fn kernels_line_and_json_say_which_path_ran() {
    // As the test process runs (the child inherits CANDLE_GLU_KERNELS): the fused kernels where
    // they run, which CANDLE_GLU_REQUIRE_KERNELS makes sure of.
    // The default input is 8 tokens of f32 weights: f32 FMAs over the weight rows, whatever
    // the CPU's kernel set.
    let (line, path, cpu_kernels, micro) = match candle_glu::cpu_kernels() {
        Some(k) if common::kernels_or_skip("the CLI's fused path") => (
            format!("kernels     fused, {k}; ran avx512 f32 fma, rows\n"),
            "fused",
            serde_json::json!(k.name()),
            serde_json::json!("avx512 f32 fma, rows"),
        ),
        _ => (
            "kernels     candle\n".into(),
            "candle",
            serde_json::Value::Null,
            serde_json::Value::Null,
        ),
    };
    let text = stdout(&run(&[]));
    assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&run(&["--json"]))).unwrap();
    assert_eq!(
        (&json["path"], &json["cpu_kernels"], &json["micro_kernel"]),
        (&path.into(), &cpu_kernels, &micro)
    );
    // bf16 weights at 128 tokens: the AMX tiles where the set has them.
    if candle_glu::cpu_kernels().is_some_and(|k| k.amx()) {
        let text = stdout(&run(&["--dtype", "bf16", "--tokens", "128"]));
        assert!(text.contains("; ran amx-bf16 tiles\n"), "{text}");
    }
    // CANDLE_GLU_KERNELS=candle: none of the crate's kernels, candle's ops for the block.
    let forced = |args: &[&str]| {
        let out = infer()
            .args(args)
            .env("CANDLE_GLU_KERNELS", "candle")
            .output()
            .unwrap();
        stdout(&out)
    };
    let text = forced(&[]);
    assert!(text.contains("kernels     candle\n"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&forced(&["--json"])).unwrap();
    assert_eq!(json["path"], "candle", "{json}");
    assert_eq!(json["cpu_kernels"], serde_json::Value::Null, "{json}");
    assert_eq!(json["micro_kernel"], serde_json::Value::Null, "{json}");
    // The same numbers both ways, within f32's summation order.
    let dir = tempfile::tempdir().unwrap();
    let (fused, plain) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    stdout(&run(&["--output", fused.to_str().unwrap()]));
    forced(&["--output", plain.to_str().unwrap()]);
    let y = |p: &PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap()["y"].clone();
    assert_close(
        &y(&fused),
        &y(&plain),
        Tol::Rel(1e-5),
        "fused vs candle's ops",
    );
}

#[test]
fn explicit_layout_and_activation() {
    fixture_through_cli(
        "llama_swish_beta",
        &["--activation", "swish(1.5)", "--layout", "llama"],
    );
}

#[test]
fn gguf_file() {
    let gguf = common::smollm2_gguf();
    let text = stdout(&run(&[
        "--weights",
        gguf.to_str().unwrap(),
        "--layer",
        "29",
    ]));
    assert!(text.contains("blk.29 (gguf layout, gguf)"), "{text}");
    assert!(text.contains("weights quantized, GGUF blocks"), "{text}");
    // The crate's own kernels read Q4_1 in place where they run; candle's QMatMul elsewhere.
    let kernels = match candle_glu::cpu_kernels() {
        Some(k) if common::kernels_or_skip("the CLI's Q4_1 path") => {
            format!("kernels     quantized, {k}")
        }
        _ => "kernels     candle".into(),
    };
    assert!(text.contains(&kernels), "{text}");
    let text = stdout(&run(&[
        "--weights",
        gguf.to_str().unwrap(),
        "--dequantize",
        "--dtype",
        "bf16",
    ]));
    assert!(
        text.contains("cpu, bf16") && !text.contains("weights quantized"),
        "{text}"
    );
    // Quantized, --dtype does nothing: the kernels compute in f32, and the summary says so.
    let out = run(&["--weights", gguf.to_str().unwrap(), "--dtype", "bf16"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "warning: --dtype bf16 does nothing: quantized GGUF weights compute in f32 (add \
         --dequantize to run them in bf16)"
    );
    let text = stdout(&out);
    assert!(text.contains("cpu, f32 (weights quantized"), "{text}");
}

#[test]
fn bad_input_last_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    Tensor::zeros((3, 71), DType::F16, &Device::Cpu)
        .unwrap()
        .save_safetensors("x", &path)
        .unwrap();
    fails(
        &["--input", path.to_str().unwrap()],
        "input of shape [3, 71] does not end in the hidden size 576",
    );
    Tensor::zeros((3, 576), DType::U8, &Device::Cpu)
        .unwrap()
        .save_safetensors("x", &path)
        .unwrap();
    fails(
        &["--input", path.to_str().unwrap()],
        "`x` has dtype U8, expected F32, F16, BF16 or F64",
    );
    Tensor::zeros((3, 576), DType::F32, &Device::Cpu)
        .unwrap()
        .save_safetensors("h", &path)
        .unwrap();
    fails(&["--input", path.to_str().unwrap()], "no tensor named `x`");
    // Only `x` is read: a tensor beside it of a type candle cannot load (BOOL) is no matter,
    // while `x`'s own bytes must be there.
    let mut other = std::collections::HashMap::new();
    other.insert(
        "x",
        Tensor::ones((2, 576), DType::BF16, &Device::Cpu).unwrap(),
    );
    let bytes = safetensors::serialize(other, None).unwrap();
    let (n, rest) = bytes.split_at(8);
    let n = u64::from_le_bytes(n.try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&rest[..n]).unwrap();
    let data = rest[n..].to_vec();
    header["mask"] =
        serde_json::json!({"dtype": "BOOL", "shape": [3], "data_offsets": [2304, 2307]});
    let header = header.to_string();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend(&data);
    file.extend([1u8, 0, 1]);
    std::fs::write(&path, &file).unwrap();
    let out = infer().arg("--input").arg(&path).output().unwrap();
    assert!(stdout(&out).contains("input       [2, 576]"));
    std::fs::write(&path, &file[..file.len() - 1000]).unwrap();
    fails(
        &["--input", path.to_str().unwrap()],
        "`x`'s data runs past the end of the file",
    );
    // A header size of 2^64 - 1: refused, not an overflow.
    std::fs::write(&path, [[0xff; 8].as_slice(), b"{}"].concat()).unwrap();
    fails(
        &["--input", path.to_str().unwrap()],
        "not a safetensors file (a header of",
    );
}

#[test]
fn bad_flags_and_files() {
    fails(
        &["--weights", "/no/such/model.safetensors"],
        "/no/such/model.safetensors: no such file or directory",
    );
    fails(
        &["--activation", "swiglu"],
        "unknown activation `swiglu`, expected one of: silu",
    );
    fails(
        &["--dtype", "f8"],
        "unknown dtype `f8`, expected f32, f16 or bf16",
    );
    fails(&["--layout", "neox"], "unknown weight layout `neox`");
    fails(&["--device", "tpu"], "unknown device `tpu`");
    fails(
        &["--layer", "40"],
        "--layer 40 is out of range: the model has 30 layers (0..=29)",
    );
    fails(
        &["--layer", "3"],
        "layer 3 is not in this checkpoint (the model has 30 layers): it holds layers 0, 15",
    );
    fails(
        &["--prefix", "model.layers.0"],
        "no gated FFN weights under prefix `model.layers.0`",
    );
    fails(
        &["--tokens", "abc"],
        "invalid value 'abc' for --tokens <N>: not a whole number",
    );
    fails(
        &["--bench", "0"],
        "invalid value '0' for --bench <N>: must be at least 1",
    );
    fails(&["--frobnicate"], "error: unknown flag --frobnicate");
    // An empty value is a value, and the parser says what is wrong with it.
    fails(
        &["--dtype", ""],
        "invalid value '' for --dtype <DTYPE>: unknown dtype ``",
    );
    fails(
        &["--tokens", "99999999999999999999999"],
        "invalid value '99999999999999999999999' for --tokens <N>: too large",
    );
    fails(
        &["--weigths", "x"],
        "error: unknown flag --weigths (did you mean --weights?)",
    );
    fails(
        &["--weights"],
        "error: --weights <PATH or REPO_ID> needs a value",
    );
    // Negative numbers reach the range checks rather than being taken for flags.
    for layer in [&["--layer", "-1"][..], &["--layer=-1"]] {
        fails(
            layer,
            "invalid value '-1' for --layer <N>: must be at least 0",
        );
    }
    for flag in ["--tokens", "--batch"] {
        for n in ["0", "-2"] {
            fails(
                &[flag, n],
                &format!("invalid value '{n}' for {flag} <N>: must be at least 1"),
            );
        }
    }
    // A layout the checkpoint does not have: what its tensors look like instead.
    fails(
        &["--layout", "T5"],
        "--layout t5: no t5-layout FFN is in this checkpoint; its tensors look like the llama \
         layout (drop --layout, or pass --layout llama)",
    );
    if !cfg!(feature = "cuda") {
        for device in ["cuda", "GPU"] {
            fails(&["--device", device], "rebuild with `--features cuda`");
        }
    }
}

#[test]
fn output_is_checked_before_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("missing-dir").join("y.safetensors");
    // The weights do not exist either: the --output check comes first.
    fails(
        &[
            "--output",
            target.to_str().unwrap(),
            "--weights",
            "/no/such/model.safetensors",
        ],
        "--output",
    );
    let file = dir.path().join("f");
    std::fs::write(&file, b"").unwrap();
    let under_file = file.join("y.safetensors");
    fails(
        &["--output", under_file.to_str().unwrap()],
        "is not a directory",
    );
    // --input is checked before the weights too.
    let typo = dir.path().join("typo.safetensors");
    fails(
        &[
            "--input",
            typo.to_str().unwrap(),
            "--weights",
            "/no/such/model.safetensors",
        ],
        "--input",
    );
    // Never onto the checkpoint's own files: the file given as --weights, or any file of a
    // checkpoint directory; they are left as they were.
    let weights = dir.path().join("w");
    std::fs::create_dir(&weights).unwrap();
    for name in ["model.safetensors", "config.json"] {
        std::fs::copy(common::embedded_weights().join(name), weights.join(name)).unwrap();
    }
    let model = weights.join("model.safetensors");
    let before = std::fs::read(&model).unwrap();
    let mut cases = vec![
        (model.clone(), model.clone()),
        (model.clone(), weights.join("config.json")),
        (weights.clone(), model.clone()),
        (weights.clone(), weights.join("config.json")),
    ];
    // A Hub snapshot's files are symlinks into its blobs: the link is what --output would
    // replace, and it is refused as well.
    #[cfg(unix)]
    {
        let snapshot = dir.path().join("snapshot");
        std::fs::create_dir(&snapshot).unwrap();
        std::os::unix::fs::symlink(&model, snapshot.join("model.safetensors")).unwrap();
        std::fs::copy(weights.join("config.json"), snapshot.join("config.json")).unwrap();
        cases.push((snapshot.clone(), snapshot.join("model.safetensors")));
    }
    for (w, out) in &cases {
        fails(
            &[
                "--weights",
                w.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ],
            "an existing file in the checkpoint's directory",
        );
    }
    assert_eq!(std::fs::read(&model).unwrap(), before);
    // A new file beside them is fine.
    let beside = weights.join("y.safetensors");
    let args = ["--weights", weights.to_str().unwrap(), "--tokens", "2"];
    stdout(&run(
        &[&args[..], &["--output", beside.to_str().unwrap()]].concat()
    ));
    // A random input too large for the forward is refused before it is made.
    fails(
        &["--tokens", "30000000"],
        "input of shape [1, 30000000, 576] is too large",
    );
}

#[test]
fn flags_that_do_nothing_are_warned_about() {
    // Case-insensitive values, and a warning per flag that does nothing for these weights.
    let lines = warnings(&[
        "--dtype",
        "F32",
        "--layout",
        "LLAMA",
        "--device",
        "CPU",
        "--activation",
        "SiLU",
        "--dequantize",
        "--revision",
        "v1",
        "--offline",
        "--tokens",
        "2",
    ]);
    assert_eq!(
        lines,
        [
            "warning: --revision does nothing: the weights are not a Hub repo id",
            "warning: --offline does nothing: the weights are not a Hub repo id",
            "warning: --dequantize does nothing: only GGUF weights are quantized",
        ]
    );
    // The random input's flags, with an input file.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.safetensors");
    let x = Tensor::zeros((1, 2, 576), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), x)]), &input).unwrap();
    let input = input.to_str().unwrap();
    assert_eq!(
        warnings(&["--input", input, "--tokens", "3", "--batch", "1", "--seed", "5",]),
        [
            "warning: --tokens does nothing with --input (it shapes the random input)",
            "warning: --seed does nothing with --input (it shapes the random input)",
        ]
    );
}

#[test]
fn layer_with_prefix_warns() {
    let args = [
        "--prefix",
        "model.layers.15.mlp",
        "--layer",
        "2",
        "--tokens",
        "2",
    ];
    assert_eq!(
        warnings(&args),
        ["warning: --layer does nothing with --prefix (the prefix names the block)"]
    );
}

#[test]
fn statistics_count_what_is_not_a_number() {
    // One token of NaN: its output row is NaN (576 values), the other's are numbers; min and
    // max are the numbers', mean and std not numbers (JSON null).
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.safetensors");
    let mut values = vec![0.5f32; 2 * 576];
    values[3] = f32::NAN;
    let x = Tensor::from_vec(values, (1, 2, 576), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), x)]), &input).unwrap();
    let input = input.to_str().unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["--input", input, "--json"]))).unwrap();
    let stats = &json["stats"];
    assert_eq!(stats["non_finite"], 576, "{json}");
    assert!(stats["min"].is_f64() && stats["max"].is_f64(), "{json}");
    assert!(stats["mean"].is_null(), "{json}");
    let text = stdout(&run(&["--input", input]));
    assert!(text.contains("576 values are NaN or ±inf"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&run(&["--json"]))).unwrap();
    assert_eq!(json["stats"]["non_finite"], 0, "{json}");
}

#[test]
fn unwritable_output_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("missing-dir").join("y.safetensors");
    fails(&["--output", target.to_str().unwrap()], "--output");
    assert!(!target.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A write that fails half-way (the file-size limit, 4 KiB, below the output's 37 KiB) leaves
/// neither the output nor its temporary file behind, and says so in one line.
#[cfg(unix)]
#[test]
fn output_failing_half_way_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("y.safetensors");
    let infer = infer();
    // `ulimit -f` counts 512-byte blocks; an ignored SIGXFSZ makes the write fail with EFBIG
    // rather than kill the process (ignored signals stay ignored across `exec`).
    let out = Command::new("sh")
        .args(["-c", r#"ulimit -f 8 && trap '' XFSZ && exec "$0" "$@""#])
        .arg(infer.get_program())
        .args(["--tokens", "16", "--output", target.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--output") && err.contains("large"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[path = "common/hub_cache.rs"]
mod hub_cache;

#[test]
fn hub_repo_from_the_local_cache() {
    // The embedded weights laid out in a Hugging Face cache, as a download would leave them.
    let cache = hub_cache::FakeCache::new();
    let weights = common::embedded_weights();
    cache.set_ref("main", hub_cache::HASH_MAIN);
    for file in ["config.json", "model.safetensors"] {
        cache.add_file(
            hub_cache::HASH_MAIN,
            file,
            &std::fs::read(weights.join(file)).unwrap(),
        );
    }
    let out = infer()
        .env("HF_HUB_CACHE", cache.root())
        .env("HF_HUB_OFFLINE", "1")
        .args(["--weights", hub_cache::REPO, "--layer", "15", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["model"], format!("{}@main", hub_cache::REPO));
    assert_eq!(json["prefix"], "model.layers.15.mlp");
    // The same numbers as from the repository's own copy.
    let local: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["--layer", "15", "--json"]))).unwrap();
    assert_eq!(json["stats"], local["stats"]);

    let out = infer()
        .env("HF_HUB_CACHE", cache.root())
        .args([
            "--weights",
            hub_cache::REPO,
            "--revision",
            "v9",
            "--offline",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("v9") && err.contains("offline"), "{err}");

    // --output onto a file of the repo's snapshot is refused as onto a local checkpoint's,
    // the snapshot being known only once the repo is resolved; the file is left as it was.
    let config = cache.snapshot(hub_cache::HASH_MAIN).join("config.json");
    let before = std::fs::read(&config).unwrap();
    let out = infer()
        .env("HF_HUB_CACHE", cache.root())
        .env("HF_HUB_OFFLINE", "1")
        .args(["--weights", hub_cache::REPO, "--layer", "15"])
        .args(["--output", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("an existing file in the checkpoint's directory"),
        "{err}"
    );
    assert_eq!(std::fs::read(&config).unwrap(), before);
}

#[test]
fn gguf_mixture_of_experts_layer() {
    // A GGUF whose layer holds experts (DeepSeek's routing, fused gate-up experts in q8_0,
    // down in Q4_1, a shared expert): `--layer` runs the whole layer, quantized as stored, or
    // dequantized with `--dequantize`.
    let dir = common::fixtures().join("moe_gguf");
    let weights = dir.join("deepseek2.gguf");
    let io =
        candle_core::safetensors::load(dir.join("deepseek2.io.safetensors"), &Device::Cpu).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let counts = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "deepseek2")
        .unwrap()["tokens_per_expert"]["18"]
        .clone();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("x.safetensors");
    let x = io["x_18"].clone();
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), x)]), &input).unwrap();
    for (flag, tol) in [(None, 3e-2), (Some("--dequantize"), 1e-5)] {
        let out = tmp.path().join("y.safetensors");
        let mut args = layer_io(&weights, "0", &input, &out);
        args.push("--json");
        args.extend(flag);
        let json: serde_json::Value = serde_json::from_str(&stdout(&run(&args))).unwrap();
        assert_eq!(json["moe"]["tokens_per_expert"], counts, "{flag:?}");
        assert_eq!(json["moe"]["top_k"], 3, "{flag:?}");
        let y = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["y"].clone();
        assert_close(&y, &io["y_18"], Tol::Rel(tol), format!("{flag:?}"));
    }
}

#[test]
fn mixture_of_experts_layer_at_layer() {
    // `--layer` on a mixture-of-experts checkpoint runs the whole layer (router, experts,
    // shared experts), not one expert; the JSON says how the tokens were routed.
    for case in ["mixtral", "deepseek_v3"] {
        let weights = common::fixtures().join("moe").join(case);
        let io = weights.join("io.safetensors");
        let fixture = candle_core::safetensors::load(&io, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("y.safetensors");
        let args = [layer_io(&weights, "0", &io, &out), vec!["--json"]].concat();
        let json: serde_json::Value = serde_json::from_str(&stdout(&run(&args))).unwrap();
        let counts: Vec<i64> = fixture["counts"].to_vec1().unwrap();
        let got: Vec<i64> = json["moe"]["tokens_per_expert"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(got, counts, "{case}: tokens per expert");
        assert_eq!(json["intermediate_size"], 40, "{case}");
        let y = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["y"].clone();
        assert_close(&y, &fixture["y_f64"], Tol::Rel(1e-5), case);
    }
    // A dense layer of a mixture-of-experts model (DeepSeek-V3's first
    // `first_k_dense_replace`) runs its dense FFN, and says so.
    let dir = tempfile::tempdir().unwrap();
    let [wg, wu, wd] = common::moe::deepseek_with_a_dense_layer(dir.path());
    let io = common::fixtures().join("moe/deepseek_v3/io.safetensors");
    // Not inside the checkpoint's directory, whose existing files --output refuses.
    let outside = tempfile::tempdir().unwrap();
    let out = outside.path().join("y.safetensors");
    let weights = dir.path().to_str().unwrap();
    let args = layer_io(dir.path(), "0", &io, &out);
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&run(&[&args[..], &["--json"]].concat()))).unwrap();
    assert_eq!(json["intermediate_size"], 56);
    assert_eq!(json["moe"], serde_json::Value::Null);
    assert_eq!(json["moe_layers"], serde_json::json!([1]));
    // The reference: the gated FFN in float64 with candle's ops.
    let x = candle_core::safetensors::load(&io, &Device::Cpu).unwrap()["x"]
        .to_dtype(DType::F64)
        .unwrap();
    let f64 = |w: &Tensor| w.to_dtype(DType::F64).unwrap().t().unwrap();
    let h = candle_nn::ops::silu(&x.broadcast_matmul(&f64(&wg)).unwrap()).unwrap()
        * x.broadcast_matmul(&f64(&wu)).unwrap();
    let want = h.unwrap().broadcast_matmul(&f64(&wd)).unwrap();
    let y = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["y"].clone();
    assert_close(&y, &want, Tol::Rel(1e-5), "dense layer 0");
    let text = stdout(&run(&args));
    assert!(
        text.contains("a dense layer of a mixture-of-experts model (layers with experts: [1])"),
        "{text}"
    );
    // --layout names the layout of the block it loads; a mixture's experts have their own.
    let mixtral = common::fixtures().join("moe/mixtral");
    fails(
        &["--weights", mixtral.to_str().unwrap(), "--layout", "llama"],
        "--layout llama: layer 0 is a mixture of experts, whose experts are in the mixtral layout",
    );
    // Its layer 1 is the mixture.
    let json: serde_json::Value = serde_json::from_str(&stdout(&run(&[
        "--weights",
        weights,
        "--layer",
        "1",
        "--json",
    ])))
    .unwrap();
    assert_eq!(json["moe"]["num_experts"], 16);
    let text = stdout(&run(&[
        "--weights",
        common::fixtures().join("moe/qwen2_moe").to_str().unwrap(),
    ]));
    assert!(
        text.contains("experts     16 routed, top-4, shared expert 56 wide"),
        "{text}"
    );
}

/// `--prefix` loads one expert's (or the shared expert's) block of a mixture at its own size,
/// read off its tensors: Qwen's and DeepSeek's `intermediate_size` is the dense layers' (56
/// here), `moe_intermediate_size` the experts' (40), and the block failed to load at 56.
#[test]
fn one_experts_block_by_prefix() {
    for (case, prefix, width) in [
        ("qwen3_moe", "model.layers.0.mlp.experts.3", 40),
        ("qwen2_moe", "model.layers.0.mlp.shared_expert", 56),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.1", 40),
    ] {
        let weights = common::fixtures().join("moe").join(case);
        let io = weights.join("io.safetensors");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("y.safetensors");
        let mut args = layer_io(&weights, "0", &io, &out);
        args.extend(["--prefix", prefix, "--json"]);
        let json: serde_json::Value = serde_json::from_str(&stdout(&run(&args))).unwrap();
        assert_eq!(json["intermediate_size"], width, "{case}");
        assert_eq!(json["moe"], serde_json::Value::Null, "{case}");
        // The reference: the expert's gated FFN in float64 with candle's ops.
        let ws = candle_core::safetensors::load(weights.join("model.safetensors"), &Device::Cpu)
            .unwrap();
        let names = if case == "mixtral" {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        };
        let w = |n: &str| {
            let t = &ws[&format!("{prefix}.{n}.weight")];
            t.to_dtype(DType::F64).unwrap().t().unwrap()
        };
        let x = candle_core::safetensors::load(&io, &Device::Cpu).unwrap()["x"]
            .to_dtype(DType::F64)
            .unwrap();
        let h = candle_nn::ops::silu(&x.broadcast_matmul(&w(names[0])).unwrap()).unwrap()
            * x.broadcast_matmul(&w(names[1])).unwrap();
        let want = h.unwrap().broadcast_matmul(&w(names[2])).unwrap();
        let y = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["y"].clone();
        assert_close(&y, &want, Tol::Rel(1e-5), case);
    }
}

/// `extract_weights` made `weights/model.safetensors` from the SmolLM2 GGUF: run again, it gives
/// the same tensors, bit for bit; a write that fails half-way leaves nothing behind.
#[test]
fn extract_weights_remakes_the_embedded_weights() {
    let gguf = common::smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    let run = |out: &Path| {
        common::example_command("extract_weights")
            .args([
                "--gguf",
                gguf.to_str().unwrap(),
                "--layers",
                "0,15",
                "--dtype",
                "bf16",
            ])
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    stdout(&run(&out));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(
        common::embedded_weights().join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    assert_eq!(got.len(), want.len());
    for name in names {
        assert_eq!(got[name].dtype(), want[name].dtype(), "{name}");
        let (g, w) = (
            got[name]
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap(),
            want[name]
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap(),
        );
        assert_eq!(
            g.to_vec1::<f32>().unwrap(),
            w.to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
    #[cfg(unix)]
    {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.safetensors");
        let cmd = common::example_command("extract_weights");
        let failed = Command::new("sh")
            .args(["-c", r#"ulimit -f 64 && trap '' XFSZ && exec "$0" "$@""#])
            .arg(cmd.get_program())
            .args([
                "--gguf",
                gguf.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert_eq!(failed.status.code(), Some(1));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }
    // `--out` onto the GGUF being read is refused, before anything is read or written.
    let same = dir.path().join("same.gguf");
    std::fs::write(&same, b"not written over").unwrap();
    let refused = common::example_command("extract_weights")
        .arg("--gguf")
        .arg(&same)
        .arg("--out")
        .arg(dir.path().join(".").join("same.gguf"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("is the GGUF being read"), "{err}");
    assert_eq!(std::fs::read(&same).unwrap(), b"not written over");
}

#[test]
#[cfg(target_os = "linux")]
fn a_full_stdout_is_an_error_not_a_panic() {
    // `println!` panics (exit 101) where stdout cannot be written; the summary is written with
    // its errors handled instead.
    let Ok(full) = std::fs::File::create("/dev/full") else {
        eprintln!("SKIPPED (no /dev/full)");
        return;
    };
    for json in [false, true] {
        let mut cmd = infer();
        cmd.args(["--tokens", "2"])
            .stdout(full.try_clone().unwrap());
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.starts_with("error: ") && !err.contains("panicked"),
            "{err}"
        );
    }
}

/// llama.cpp's float conversions (F16 here) are not quantized: `--dtype` applies, without the
/// quantized files' warning, and the block runs dense.
#[test]
fn float_gguf_weights_run_dense_in_the_dtype_asked() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f16.gguf");
    let (h, i) = (64, 128);
    let w = |r: usize, c: usize, seed: u64| {
        let t = common::randn(seed, (r, c), 0.1, &Device::Cpu);
        QTensor::quantize(&t, GgmlDType::F16).unwrap()
    };
    let tensors = [
        ("blk.0.ffn_gate.weight", w(i, h, 1)),
        ("blk.0.ffn_up.weight", w(i, h, 2)),
        ("blk.0.ffn_down.weight", w(h, i, 3)),
    ];
    let meta = [
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.embedding_length", gguf_file::Value::U32(h as u32)),
        ("llama.feed_forward_length", gguf_file::Value::U32(i as u32)),
        ("llama.block_count", gguf_file::Value::U32(1)),
    ];
    let meta: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (*k, t)).collect();
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut file, &meta, &refs).unwrap();
    let out = run(&["--weights", path.to_str().unwrap(), "--dtype", "bf16"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let text = stdout(&out);
    assert!(!err.contains("does nothing"), "{err}");
    assert!(text.contains("cpu, bf16"), "{text}");
    assert!(!text.contains("quantized"), "{text}");
}

/// A block named by `--prefix` has its own sizes, whatever `config.json` says of the model's
/// (T5Gemma's decoder blocks are not its encoder's).
#[test]
fn a_prefix_block_takes_its_own_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let mut ws = std::collections::HashMap::new();
    for (prefix, i) in [("model.layers.0.mlp", 8), ("decoder.layers.0.mlp", 16)] {
        for (name, shape) in [
            ("gate_proj", (i, 4)),
            ("up_proj", (i, 4)),
            ("down_proj", (4, i)),
        ] {
            let t = common::randn(i as u64, shape, 0.3, &Device::Cpu);
            ws.insert(format!("{prefix}.{name}.weight"), t);
        }
    }
    candle_core::safetensors::save(&ws, dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"hidden_size": 4, "intermediate_size": 8, "hidden_act": "gelu"}"#,
    )
    .unwrap();
    let weights = dir.path().to_str().unwrap();
    let text = stdout(&run(&[
        "--weights",
        weights,
        "--prefix",
        "decoder.layers.0.mlp",
    ]));
    assert!(
        text.contains("hidden 4, intermediate 16, activation gelu"),
        "{text}"
    );
}
