//! `docs/errors.md` is checked here: each row of its tables names a case by id, and the case is
//! triggered through the public API (or the CLI) and must give exactly the message the row shows,
//! with the temporary directory written as `<dir>`. Every case has a row and every row a case, so
//! the document cannot drift from the code.
//!
//! `CANDLE_GLU_PRINT_ERRORS=1 cargo test --release --test error_table -- --nocapture` prints
//! every case's actual row.

mod common;
#[path = "common/craft.rs"]
mod craft;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::loading::{Checkpoint, LoadOptions};
use candle_glu::{
    Activation, GluConfig, GluExperts, GluFeedForward, MoeConfig, Projection, WeightLayout,
};
use candle_nn::{VarBuilder, VarMap};
use craft::{write, Gguf, GgufValue};

type Trigger = fn(&Path) -> String;

fn err<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => "no error".into(),
        Err(e) => e.to_string(),
    }
}

fn open(path: &Path) -> String {
    err(Checkpoint::open(path))
}

fn f32_opts() -> LoadOptions {
    LoadOptions::new(DType::F32, Device::Cpu)
}

/// Opens `dir` and loads layer 0 with its own config, or `cfg`.
fn load(dir: &Path, cfg: Option<GluConfig>) -> String {
    let ckpt = match Checkpoint::open(dir) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let cfg = cfg.or_else(|| ckpt.config().cloned()).expect("a config");
    err(ckpt.load_layer(&cfg, 0, &f32_opts()))
}

fn llama_file(dir: &Path, tensors: &[(&str, &[u64])]) -> PathBuf {
    write(dir, "model.safetensors", &craft::safetensors_f32(tensors))
}

const G: &str = "model.layers.0.mlp.gate_proj.weight";
const U: &str = "model.layers.0.mlp.up_proj.weight";
const D: &str = "model.layers.0.mlp.down_proj.weight";

/// A `[4, 8]` f32 weight of zeros.
fn zeros_4_8() -> Tensor {
    Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap()
}

/// The repository's `weights/`.
fn embedded() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights")
}

fn gguf_file(dir: &Path, g: &Gguf) -> PathBuf {
    write(dir, "model.gguf", &g.bytes())
}

fn gguf_load(dir: &Path, g: &Gguf, quantized: bool) -> String {
    let path = gguf_file(dir, g);
    let ckpt = match Checkpoint::open(&path) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let cfg = ckpt.config().cloned().expect("a config");
    err(ckpt.load_layer(&cfg, 0, &f32_opts().with_quantized(quantized)))
}

fn config_dir(dir: &Path, config: &str) -> String {
    write(dir, "model.safetensors", &craft::llama_block(4, 8));
    write(dir, "config.json", config.as_bytes());
    open(dir)
}

fn index_dir(dir: &Path, index: &str) -> String {
    write(dir, "model.safetensors.index.json", index.as_bytes());
    open(dir)
}

fn ffn_4_8() -> GluFeedForward {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "model.safetensors", &craft::llama_block(4, 8));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    ckpt.load_layer(&GluConfig::new(4, 8), 0, &f32_opts())
        .unwrap()
}

/// `target/<profile>/examples/infer`, which `cargo test` builds.
fn infer(dir: &Path, args: &[&str]) -> String {
    example("infer", dir, args)
}

/// `examples/glu_variants.rs`, run in `dir` with a copy of the fixtures' slice of Shakespeare in
/// `dir/text` (`hamlet_gut.txt`, `lear_gut.txt`).
fn glu_variants(dir: &Path, args: &[&str]) -> String {
    let text = dir.join("text");
    std::fs::create_dir_all(&text).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/glu_variants/text");
    for name in ["hamlet_gut.txt", "lear_gut.txt"] {
        std::fs::copy(fixture.join(name), text.join(name)).unwrap();
    }
    example("glu_variants", dir, args)
}

/// The example `name` run in `dir`: it must fail with one line on stderr, returned.
fn example(name: &str, dir: &Path, args: &[&str]) -> String {
    let out = common::example_command(name)
        .current_dir(dir)
        .env_remove("CANDLE_GLU_CACHE")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    stderr.trim_end().to_string()
}

fn moe_fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/moe")
        .join(case)
}

/// A fixture's `config.json` with `key` set to `value`, written to `d` and read back.
fn moe_config(d: &Path, case: &str, key: &str, value: serde_json::Value) -> String {
    let text = std::fs::read_to_string(moe_fixture(case).join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[key] = value;
    std::fs::write(d.join("config.json"), json.to_string()).unwrap();
    err(MoeConfig::from_hf_config_file(d.join("config.json")))
}

/// A fixture's layer loaded without the tensors whose names contain `drop`, its config changed
/// by `edit`.
fn moe_layer(case: &str, drop: &str, edit: fn(&mut MoeConfig)) -> String {
    let dir = moe_fixture(case);
    let mut cfg = MoeConfig::from_hf_config_file(dir.join("config.json")).unwrap();
    edit(&mut cfg);
    let mut ws =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    ws.retain(|name, _| !name.contains(drop));
    let vb = VarBuilder::from_tensors(ws, DType::F32, &Device::Cpu);
    let prefix = if case == "mixtral" {
        "model.layers.0.block_sparse_moe"
    } else {
        "model.layers.0.mlp"
    };
    err(GluExperts::new(&cfg, vb.pp(prefix)))
}

fn cases() -> BTreeMap<&'static str, Trigger> {
    let mut c: BTreeMap<&'static str, Trigger> = BTreeMap::new();
    // --- paths
    c.insert("no-such-path", |d| open(&d.join("missing")));
    c.insert("dir-without-weights", open);
    c.insert("config-not-weights", |d| {
        open(&write(
            d,
            "config.json",
            br#"{"hidden_size":4,"intermediate_size":8}"#,
        ))
    });
    c.insert("several-weight-files", |d| {
        write(d, "a.safetensors", &craft::llama_block(4, 8));
        write(d, "b.safetensors", &craft::llama_block(4, 8));
        open(d)
    });
    c.insert("fifo", |d| {
        let path = d.join("model.safetensors");
        let ok = Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(ok.success());
        open(&path)
    });
    // --- safetensors
    c.insert("st-too-short", |d| {
        open(&write(d, "model.safetensors", b"abc"))
    });
    c.insert("st-truncated", |d| {
        let bytes = craft::llama_block(4, 8);
        open(&write(d, "model.safetensors", &bytes[..bytes.len() - 10]))
    });
    c.insert("st-huge-header", |d| {
        let mut bytes = craft::llama_block(4, 8);
        bytes[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        open(&write(d, "model.safetensors", &bytes))
    });
    c.insert("st-invalid-json", |d| {
        open(&write(
            d,
            "model.safetensors",
            &craft::safetensors_raw("{not json}", b""),
        ))
    });
    c.insert("st-not-an-object", |d| {
        open(&write(
            d,
            "model.safetensors",
            &craft::safetensors_raw("[1, 2]", b""),
        ))
    });
    c.insert("st-offsets-past-end", |d| {
        let h = r#"{"w":{"dtype":"F32","shape":[16,16],"data_offsets":[0,1024]}}"#;
        open(&write(
            d,
            "model.safetensors",
            &craft::safetensors_raw(h, &[0; 64]),
        ))
    });
    c.insert("st-offsets-wrong-size", |d| {
        let h = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
        open(&write(
            d,
            "model.safetensors",
            &craft::safetensors_raw(h, &[0; 16]),
        ))
    });
    c.insert("st-overlap", |d| {
        let h = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},
                    "b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}"#;
        open(&write(
            d,
            "model.safetensors",
            &craft::safetensors_raw(h, &[0; 24]),
        ))
    });
    c.insert("st-shape-overflow", |d| {
        let h = r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
        open(&write(
            d,
            "model.safetensors",
            &craft::safetensors_raw(h, b""),
        ))
    });
    c.insert("st-unsupported-dtype", |d| {
        // The file opens, and its other tensors load; `w` is an error when it is read.
        let h = r#"{"w":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]},
                    "v":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let path = write(d, "model.safetensors", &craft::safetensors_raw(h, &[0; 8]));
        let ckpt = Checkpoint::open(path).unwrap();
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
        assert!(vb.get(1, "v").is_ok());
        err(vb.get(4, "w"))
    });
    c.insert("st-fp8-scaled", |d| {
        let scale = format!("{G}_scale_inv");
        let t: [(&str, &str, &[u64]); 4] = [
            (G, "F8_E4M3", &[8, 4]),
            (&scale, "F32", &[1, 1]),
            (U, "F8_E4M3", &[8, 4]),
            (D, "F8_E4M3", &[4, 8]),
        ];
        write(d, "model.safetensors", &craft::safetensors_typed(&t));
        load(d, Some(GluConfig::new(4, 8)))
    });
    c.insert("st-int-load-ffn", |d| {
        let t: [(&str, &str, &[u64]); 3] = [
            (G, "I32", &[8, 4]),
            (U, "I32", &[8, 4]),
            (D, "I32", &[4, 8]),
        ];
        write(d, "model.safetensors", &craft::safetensors_typed(&t));
        load(d, Some(GluConfig::new(4, 8)))
    });
    c.insert("st-int-var-builder", |d| {
        let t: [(&str, &str, &[u64]); 3] = [
            (G, "F32", &[8, 4]),
            (U, "I64", &[8, 4]),
            (D, "F32", &[4, 8]),
        ];
        write(d, "model.safetensors", &craft::safetensors_typed(&t));
        let ckpt = Checkpoint::open(d).unwrap();
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
        err(GluFeedForward::new(
            &GluConfig::new(4, 8),
            vb.pp("model.layers.0.mlp"),
        ))
    });
    // --- shapes and names
    c.insert("transposed", |d| {
        llama_file(d, &[(G, &[8, 4]), (U, &[4, 8]), (D, &[4, 8])]);
        load(d, Some(GluConfig::new(4, 8)))
    });
    c.insert("gate-up-disagree", |d| {
        llama_file(d, &[(G, &[8, 4]), (U, &[6, 4]), (D, &[4, 8])]);
        let ckpt = Checkpoint::open(d).unwrap();
        let prefix = "model.layers.0.mlp";
        let cfg = ckpt
            .infer_config(prefix, WeightLayout::Llama, Activation::Silu)
            .unwrap();
        err(ckpt.load_ffn(&cfg, prefix, &f32_opts()))
    });
    c.insert("fused-odd-rows", |d| {
        let gu = "model.layers.0.mlp.gate_up_proj.weight";
        llama_file(d, &[(gu, &[15, 4]), (D, &[4, 8])]);
        let ckpt = Checkpoint::open(d).unwrap();
        let cfg = ckpt.infer_config("model.layers.0.mlp", WeightLayout::Phi3, Activation::Silu);
        err(cfg)
    });
    c.insert("infer-gate-not-matrix", |d| {
        llama_file(d, &[(G, &[8, 4, 2]), (U, &[8, 4]), (D, &[4, 8])]);
        let ckpt = Checkpoint::open(d).unwrap();
        err(ckpt.infer_config("model.layers.0.mlp", WeightLayout::Llama, Activation::Silu))
    });
    c.insert("infer-gate-no-rows", |d| {
        llama_file(d, &[(G, &[0, 4]), (U, &[0, 4]), (D, &[4, 0])]);
        let ckpt = Checkpoint::open(d).unwrap();
        err(ckpt.infer_config("model.layers.0.mlp", WeightLayout::Llama, Activation::Silu))
    });
    c.insert("fused-wrong-rows", |d| {
        let gu = "model.layers.0.mlp.gate_up_proj.weight";
        llama_file(d, &[(gu, &[15, 4]), (D, &[4, 8])]);
        load(
            d,
            Some(GluConfig::new(4, 8).with_layout(WeightLayout::Phi3)),
        )
    });
    c.insert("missing-tensor", |d| {
        llama_file(d, &[(G, &[8, 4]), (U, &[8, 4])]);
        load(d, Some(GluConfig::new(4, 8)))
    });
    c.insert("wrong-layer", |d| {
        llama_file(d, &[(G, &[8, 4]), (U, &[8, 4]), (D, &[4, 8])]);
        let ckpt = Checkpoint::open(d).unwrap();
        err(ckpt.load_layer(&GluConfig::new(4, 8), 3, &f32_opts()))
    });
    c.insert("wrong-layer-no-layers", |d| {
        // A multimodal model's language model, one prefix deeper than the Llama layout's.
        let n = |t: &str| format!("language_model.{t}");
        let (g, u, dn) = (n(G), n(U), n(D));
        llama_file(d, &[(&g, &[8, 4]), (&u, &[8, 4]), (&dn, &[4, 8])]);
        let ckpt = Checkpoint::open(d).unwrap();
        err(ckpt.load_layer(&GluConfig::new(4, 8), 0, &f32_opts()))
    });
    c.insert("some-biases", |d| {
        let b = "model.layers.0.mlp.gate_proj.bias";
        llama_file(d, &[(G, &[8, 4]), (U, &[8, 4]), (D, &[4, 8]), (b, &[8])]);
        load(d, Some(GluConfig::new(4, 8)))
    });
    c.insert("biases-not-in-config", |d| {
        let bs =
            ["gate_proj", "up_proj", "down_proj"].map(|p| format!("model.layers.0.mlp.{p}.bias"));
        let t: [(&str, &[u64]); 6] = [
            (G, &[8, 4]),
            (U, &[8, 4]),
            (D, &[4, 8]),
            (&bs[0], &[8]),
            (&bs[1], &[8]),
            (&bs[2], &[4]),
        ];
        llama_file(d, &t);
        load(d, Some(GluConfig::new(4, 8)))
    });
    // --- sharded index
    c.insert("index-missing-shard", |d| {
        index_dir(
            d,
            r#"{"weight_map":{"w":"model-00001-of-00002.safetensors"}}"#,
        )
    });
    c.insert("index-parent-dir", |d| {
        index_dir(d, r#"{"weight_map":{"w":"../model.safetensors"}}"#)
    });
    c.insert("index-control-char", |d| {
        index_dir(d, r#"{"weight_map":{"w":"model\n.safetensors"}}"#)
    });
    c.insert("index-absolute", |d| {
        index_dir(d, r#"{"weight_map":{"w":"/etc/passwd"}}"#)
    });
    c.insert("index-invalid-json", |d| index_dir(d, r#"{"weight_map":"#));
    c.insert("index-no-weight-map", |d| {
        index_dir(d, r#"{"metadata":{}}"#)
    });
    c.insert("index-wrong-shard", |d| {
        write(d, "a.safetensors", &craft::llama_block(4, 8));
        index_dir(
            d,
            &format!(r#"{{"weight_map":{{"{G}":"a.safetensors","x":"a.safetensors"}}}}"#),
        )
    });
    c.insert("index-duplicate-tensor", |d| {
        write(d, "a.safetensors", &craft::llama_block(4, 8));
        write(d, "b.safetensors", &craft::llama_block(4, 8));
        index_dir(
            d,
            &format!(r#"{{"weight_map":{{"{G}":"a.safetensors","{U}":"b.safetensors"}}}}"#),
        )
    });
    // --- config.json
    c.insert("config-invalid-json", |d| config_dir(d, "{"));
    c.insert("config-no-sizes", |d| {
        config_dir(d, r#"{"model_type":"llama"}"#)
    });
    c.insert("config-unknown-activation", |d| {
        config_dir(
            d,
            r#"{"hidden_size":4,"intermediate_size":8,"hidden_act":"swiglu"}"#,
        )
    });
    c.insert("config-not-gated", |d| {
        config_dir(
            d,
            r#"{"model_type":"t5","d_model":4,"d_ff":8,"feed_forward_proj":"relu"}"#,
        )
    });
    c.insert("config-zero", |d| {
        config_dir(d, r#"{"hidden_size":0,"intermediate_size":8}"#)
    });
    c.insert("config-absurd", |d| {
        config_dir(d, r#"{"hidden_size":4,"intermediate_size":1000000000000}"#)
    });
    c.insert("config-too-many-weights", |d| {
        config_dir(d, r#"{"hidden_size":1048576,"intermediate_size":1048576}"#)
    });
    c.insert("config-wrong-type", |d| {
        config_dir(d, r#"{"hidden_size":"4","intermediate_size":8}"#)
    });
    c.insert("config-layers-wrong-type", |d| {
        config_dir(
            d,
            r#"{"hidden_size":4,"intermediate_size":8,"num_hidden_layers":-2}"#,
        )
    });
    c.insert("new-zeros-absurd", |_| {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        err(GluFeedForward::new(
            &GluConfig::new(8, 1_000_000_000_000),
            vb,
        ))
    });
    c.insert("new-varmap-absurd", |_| {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        err(GluFeedForward::new(
            &GluConfig::new(8, 1_000_000_000_000),
            vb,
        ))
    });
    // --- GGUF
    c.insert("gguf-garbage", |d| {
        open(&write(d, "model.gguf", b"this is not a gguf file"))
    });
    c.insert("gguf-version", |d| {
        let g = Gguf {
            version: 9,
            ..Gguf::llama(32, 64, craft::Q4_0)
        };
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-truncated-header", |d| {
        let bytes = Gguf::llama(32, 64, craft::Q4_0).bytes();
        open(&write(d, "model.gguf", &bytes[..60]))
    });
    c.insert("gguf-truncated-data", |d| {
        let bytes = Gguf::llama(32, 64, craft::Q4_0).bytes();
        open(&write(d, "model.gguf", &bytes[..bytes.len() - 100]))
    });
    c.insert("gguf-counts", |d| {
        let mut bytes = Gguf::llama(32, 64, craft::Q4_0).bytes();
        bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        open(&write(d, "model.gguf", &bytes))
    });
    c.insert("gguf-array-length", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).meta(
            "tokenizer.ggml.tokens",
            GgufValue::Array(8, 1 << 40, vec![]),
        );
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-alignment-0", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).meta("general.alignment", GgufValue::U32(0));
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-terabyte-dims", |d| {
        let g =
            Gguf::llama(32, 64, craft::Q4_0).redim("blk.0.ffn_gate.weight", &[1 << 20, 1 << 20]);
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-dims-overflow", |d| {
        let g =
            Gguf::llama(32, 64, craft::Q4_0).redim("blk.0.ffn_gate.weight", &[1 << 40, 1 << 40]);
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-too-many-dims", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).redim("blk.0.ffn_gate.weight", &[1, 1, 1, 64, 32]);
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-block-size", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).redim("blk.0.ffn_gate.weight", &[32, 33]);
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-unknown-quantization", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).retype("blk.0.ffn_gate.weight", craft::IQ2_XXS);
        gguf_load(d, &g, true)
    });
    c.insert("gguf-unloadable-quantization", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).retype("blk.0.ffn_up.weight", craft::Q8_K);
        gguf_load(d, &g, false)
    });
    c.insert("gguf-unknown-type", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).retype("blk.0.ffn_down.weight", 99);
        gguf_load(d, &g, true)
    });
    c.insert("gguf-empty-tensor", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).redim("blk.0.ffn_gate.weight", &[0, 32]);
        let store = candle_glu::loading::GgufStore::open(&gguf_file(d, &g)).unwrap();
        err(store.qtensor("blk.0.ffn_gate.weight", &Device::Cpu))
    });
    c.insert("gguf-zero-size", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).meta("llama.embedding_length", GgufValue::U32(0));
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-size-wrong-type", |d| {
        let g = Gguf::llama(32, 64, craft::Q4_0).meta("llama.embedding_length", GgufValue::I32(-1));
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-layers-wrong-type", |d| {
        let g =
            Gguf::llama(32, 64, craft::Q4_0).meta("llama.block_count", GgufValue::Str("30".into()));
        open(&gguf_file(d, &g))
    });
    c.insert("gguf-wrong-shape", |d| {
        let g =
            Gguf::llama(32, 64, craft::Q4_0).meta("llama.feed_forward_length", GgufValue::U64(96));
        gguf_load(d, &g, true)
    });
    c.insert("gguf-quantized-bias", |d| {
        let path = gguf_file(d, &Gguf::llama(32, 64, craft::Q4_0));
        let ckpt = Checkpoint::open(path).unwrap();
        let cfg = ckpt.config().unwrap().clone().with_bias(true);
        err(ckpt.load_layer(&cfg, 0, &f32_opts()))
    });
    c.insert("gguf-file-bias", |d| {
        let mut g = Gguf::llama(32, 64, craft::Q4_0);
        let bias = craft::tensor_bytes(craft::F32, 64);
        g.tensors
            .push(("blk.0.ffn_up.bias".into(), vec![64], craft::F32, bias));
        gguf_load(d, &g, true)
    });
    // --- forward
    c.insert("input-last-dim", |_| {
        err(ffn_4_8().forward(&Tensor::zeros((2, 3, 5), DType::F32, &Device::Cpu).unwrap()))
    });
    c.insert("input-scalar", |_| {
        err(ffn_4_8().forward(&Tensor::new(1f32, &Device::Cpu).unwrap()))
    });
    c.insert("input-int", |_| {
        err(ffn_4_8().forward(&Tensor::zeros((2, 4), DType::I64, &Device::Cpu).unwrap()))
    });
    c.insert("input-too-large", |_| {
        // A broadcast view: a billion tokens without a billion tokens' memory.
        let x = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
        let x = x.broadcast_as((1 << 20, 1 << 10, 4)).unwrap();
        err(ffn_4_8().forward(&x))
    });
    // --- Projection
    c.insert("projection-weight-rank", |_| {
        let w = Tensor::zeros((2, 4, 8), DType::F32, &Device::Cpu).unwrap();
        err(Projection::new(w, None))
    });
    c.insert("projection-weight-int", |_| {
        err(Projection::new(
            Tensor::zeros((4, 8), DType::U32, &Device::Cpu).unwrap(),
            None,
        ))
    });
    c.insert("projection-bias-len", |_| {
        let b = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        err(Projection::new(zeros_4_8(), Some(b)))
    });
    c.insert("projection-bias-dtype", |_| {
        let b = Tensor::zeros(4, DType::BF16, &Device::Cpu).unwrap();
        err(Projection::new(zeros_4_8(), Some(b)))
    });
    c.insert("projection-input-width", |_| {
        let p = Projection::new(zeros_4_8(), None).unwrap();
        err(p.forward(&Tensor::zeros((3, 7), DType::F32, &Device::Cpu).unwrap()))
    });
    c.insert("projection-output-too-large", |_| {
        // A broadcast view: 2^31 tokens without their memory.
        let x = Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap();
        let x = x.broadcast_as((1 << 21, 1 << 10, 8)).unwrap();
        let p = Projection::new(zeros_4_8(), None).unwrap();
        err(p.forward(&x))
    });
    c.insert("projection-missing", |_| {
        let ckpt = Checkpoint::open(embedded()).unwrap();
        err(ckpt.load_projection("model.layers.0.mlp.down", &f32_opts()))
    });
    c.insert("projection-not-matrix", |d| {
        let path = llama_file(d, &[("model.norm.weight", &[8])]);
        let ckpt = Checkpoint::open(path).unwrap();
        err(ckpt.load_projection("model.norm", &f32_opts()))
    });
    c.insert("projection-empty", |d| {
        let path = llama_file(d, &[("model.out.weight", &[0, 8])]);
        let ckpt = Checkpoint::open(path).unwrap();
        err(ckpt.load_projection("model.out", &f32_opts()))
    });
    c.insert("projection-load-empty", |_| {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        err(Projection::load(8, 0, false, vb.pp("out")))
    });
    c.insert("projection-load-int", |_| {
        let vb = VarBuilder::zeros(DType::U8, &Device::Cpu);
        err(Projection::load(8, 4, false, vb.pp("out")))
    });
    c.insert("new-load-int", |_| {
        let vb = VarBuilder::zeros(DType::U8, &Device::Cpu);
        err(GluFeedForward::new(&GluConfig::new(8, 16), vb))
    });
    c.insert("load-options-int", |_| {
        let ckpt = Checkpoint::open(embedded()).unwrap();
        let cfg = ckpt.config().unwrap().clone();
        err(ckpt.load_layer(&cfg, 0, &LoadOptions::new(DType::U8, Device::Cpu)))
    });
    // --- the CLI
    c.insert("cli-output-folder", |d| {
        std::fs::create_dir(d.join("y.safetensors")).unwrap();
        infer(d, &["--output", "y.safetensors"])
    });
    c.insert("cli-unknown-flag", |d| infer(d, &["--frobnicate"]));
    c.insert("cli-bad-dtype", |d| infer(d, &["--dtype", "f8"]));
    c.insert("convert-from-candle", |_| {
        err(Activation::try_from(candle_nn::Activation::Relu6))
    });
    c.insert("convert-swiglu", |_| {
        err(Activation::try_from(candle_nn::Activation::Swiglu))
    });
    c.insert("convert-to-candle", |_| {
        err(candle_nn::Activation::try_from(Activation::Identity))
    });
    c.insert("serde-layout", |_| {
        let json = r#"{"hidden_size": 4, "intermediate_size": 8, "layout": "neox"}"#;
        err(serde_json::from_str::<GluConfig>(json))
    });
    c.insert("serde-no-size", |_| {
        err(serde_json::from_str::<GluConfig>(r#"{"hidden_size": 4}"#))
    });
    c.insert("cli-bad-number", |d| infer(d, &["--tokens=-3"]));
    c.insert("cli-negative-layer", |d| infer(d, &["--layer", "-1"]));
    c.insert("cli-typo-flag", |d| infer(d, &["--weigths", "x"]));
    c.insert("cli-missing-value", |d| infer(d, &["--weights"]));
    c.insert("cli-layout-mismatch", |d| infer(d, &["--layout", "t5"]));
    c.insert("cli-missing-weights", |d| {
        infer(d, &["--weights", "./none.safetensors"])
    });
    c.insert("cli-layer-out-of-range", |d| infer(d, &["--layer", "40"]));
    c.insert("cli-moe-gguf-arch", |d| {
        let g = Gguf::llama(32, 64, craft::F32)
            .meta("general.architecture", GgufValue::Str("grok".into()))
            .meta("grok.embedding_length", GgufValue::U32(32))
            .meta("grok.expert_count", GgufValue::U32(4));
        let path = gguf_file(d, &g);
        infer(d, &["--weights", path.to_str().unwrap()])
    });
    c.insert("cli-no-layers", |d| {
        write(d, "model.safetensors", &craft::llama_block(4, 8));
        write(
            d,
            "config.json",
            br#"{"hidden_size":4,"intermediate_size":8,"num_hidden_layers":0}"#,
        );
        infer(d, &["--weights", "."])
    });
    c.insert("cli-bench-zero", |d| infer(d, &["--bench", "0"]));
    c.insert("cli-bench-huge", |d| {
        infer(d, &["--bench", "1000000000000"])
    });
    c.insert("cli-too-many-tokens", |d| {
        infer(d, &["--tokens", "100000000", "--batch", "100"])
    });
    c.insert("cli-output-unwritable", |d| {
        infer(d, &["--output", "no-such-dir/y.safetensors"])
    });
    c.insert("cli-input-missing", |d| {
        infer(d, &["--input", "x.safetensors"])
    });
    c.insert("cli-input-fifo", |d| {
        let ok = Command::new("mkfifo")
            .arg(d.join("x.safetensors"))
            .status()
            .unwrap();
        assert!(ok.success());
        infer(d, &["--input", "x.safetensors"])
    });
    c.insert("cli-input-no-x", |d| {
        Tensor::zeros((2, 576), DType::F32, &Device::Cpu)
            .unwrap()
            .save_safetensors("h", d.join("x.safetensors"))
            .unwrap();
        infer(d, &["--input", "x.safetensors"])
    });
    // --- examples/glu_variants.rs
    c.insert("gv-no-text", |d| glu_variants(d, &["--data", "none"]));
    c.insert("gv-no-txt-files", |d| {
        std::fs::create_dir(d.join("empty")).unwrap();
        glu_variants(d, &["--data", "empty"])
    });
    c.insert("gv-held-out-unknown", |d| {
        glu_variants(d, &["--data", "text", "--held-out", "othello_gut"])
    });
    c.insert("gv-held-out-default", |d| {
        glu_variants(d, &["--data", "text"])
    });
    c.insert("gv-all-held-out", |d| {
        glu_variants(d, &["--data", "text", "--held-out", "hamlet_gut,lear_gut"])
    });
    c.insert("gv-heads", |d| {
        glu_variants(d, &["--data", "text", "--d-model", "30", "--heads", "4"])
    });
    c.insert("gv-limit", |d| {
        glu_variants(d, &["--d-model", "10000", "--heads", "1"])
    });
    c.insert("gv-scores", |d| {
        let args = ["--batch", "4096", "--heads", "4", "--context", "8192"];
        glu_variants(d, &args)
    });
    c.insert("gv-repeat", |d| {
        glu_variants(d, &["--variants", "relu,swiglu,relu"])
    });
    c.insert("gv-held-out-empty", |d| {
        glu_variants(d, &["--held-out", ""])
    });
    c.insert("gv-plot-folder", |d| {
        std::fs::create_dir(d.join("dir.png")).unwrap();
        glu_variants(d, &["--plot", "dir.png"])
    });
    c.insert("gv-replot-missing", |d| {
        glu_variants(d, &["--replot", "none.json"])
    });
    c.insert("gv-replot-not-a-file", |d| {
        std::fs::create_dir(d.join("r.json")).unwrap();
        glu_variants(d, &["--replot", "r.json"])
    });
    c.insert("gv-replot-not-results", |d| {
        std::fs::write(d.join("r.json"), r#"{"runs": [{"variant": "relu"}]}"#).unwrap();
        glu_variants(d, &["--replot", "r.json"])
    });
    c.insert("gv-eval-windows", |d| {
        glu_variants(d, &["--eval-windows", "2000000"])
    });
    c.insert("gv-state", |d| {
        let args = ["--d-model", "8192", "--layers", "256", "--heads", "1"];
        glu_variants(d, &args)
    });
    c.insert("gv-activations", |d| {
        let args = ["--batch", "100000000", "--context", "1", "--heads", "1"];
        glu_variants(d, &args)
    });
    c.insert("gv-replot-loss", |d| {
        let run = r#"{"variant": "relu", "seed": 0, "parameters": 1, "ffn_parameters": 1,
            "d_ff": 1, "held_out_loss": 1e308, "bits_per_byte": 1, "train_loss": 1,
            "curve": [[1, 1.0]], "wall_s": 1}"#;
        std::fs::write(d.join("r.json"), format!(r#"{{"runs": [{run}]}}"#)).unwrap();
        glu_variants(d, &["--replot", "r.json", "--plot", "r.png"])
    });
    c.insert("gv-fifo", |d| {
        std::fs::create_dir(d.join("text")).unwrap();
        let fifo = d.join("text/zz.txt");
        let ok = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(ok.success());
        glu_variants(d, &["--data", "text", "--held-out", "hamlet_gut"])
    });
    c.insert("gv-unequal", |d| {
        let args = ["--data", "text", "--d-model", "1", "--heads", "1"];
        glu_variants(d, &args)
    });
    c.insert("gv-context", |d| {
        std::fs::create_dir(d.join("small")).unwrap();
        std::fs::write(d.join("small/a.txt"), [b'a'; 100]).unwrap();
        std::fs::write(d.join("small/b.txt"), [b'b'; 300]).unwrap();
        glu_variants(
            d,
            &["--data", "small", "--held-out", "b", "--context", "200"],
        )
    });
    c.insert("gv-plot-png", |d| {
        glu_variants(d, &["--data", "text", "--plot", "curves.svg"])
    });
    c.insert("gv-plot-dir", |d| {
        glu_variants(d, &["--data", "text", "--plot", "none/curves.png"])
    });
    c.insert("gv-variant", |d| {
        glu_variants(d, &["--variants", "swiglu,relu2"])
    });
    c.insert("gv-lr", |d| glu_variants(d, &["--lr", "-1"]));
    c.insert("gv-steps", |d| glu_variants(d, &["--steps", "0"]));
    c.insert("gv-windows", |d| {
        glu_variants(
            d,
            &[
                "--eval-windows",
                "1048576",
                "--context",
                "8192",
                "--batch",
                "1",
                "--heads",
                "1",
            ],
        )
    });
    c.insert("gv-decay", |d| {
        glu_variants(d, &["--lr", "0.5", "--weight-decay", "4"])
    });
    // --- mixtures of experts
    c.insert("moe-top-k", |d| {
        moe_config(d, "mixtral", "num_experts_per_tok", 9.into())
    });
    c.insert("moe-dense-model", |d| {
        moe_config(d, "mixtral", "model_type", "llama".into())
    });
    c.insert("moe-groups", |d| {
        moe_config(d, "deepseek_v3", "n_group", 5.into())
    });
    c.insert("moe-missing-expert", |_| {
        moe_layer("mixtral", "experts.5.w3", |_| {})
    });
    c.insert("moe-expert-not-stored", |_| {
        moe_layer("mixtral", "experts.6.", |_| {})
    });
    c.insert("moe-scaling-missing", |d| {
        moe_config(
            d,
            "deepseek_v3",
            "routed_scaling_factor",
            serde_json::Value::Null,
        )
    });
    c.insert("moe-dense-layer", |d| {
        common::moe::deepseek_with_a_dense_layer(d);
        let ckpt = Checkpoint::open(d).unwrap();
        let cfg = ckpt.moe_config().unwrap().unwrap();
        err(ckpt.load_experts(&cfg, 0, &LoadOptions::new(DType::F32, Device::Cpu)))
    });
    c.insert("moe-layer-as-block", |_| {
        // Mixtral's config gives the layout whose layer prefix is expert 0: that expert alone
        // was returned as the layer's FFN.
        let ckpt = Checkpoint::open(moe_fixture("mixtral")).unwrap();
        let cfg = ckpt.config().unwrap().clone();
        err(ckpt.load_layer(&cfg, 0, &f32_opts()))
    });
    c.insert("moe-gguf-malformed-count", |d| {
        let g = Gguf::llama(32, 64, craft::F32).meta("llama.expert_count", GgufValue::I32(-8));
        err(Checkpoint::open(gguf_file(d, &g)).unwrap().moe_config())
    });
    c.insert("moe-gguf-top-k", |d| {
        let g = Gguf::llama(32, 64, craft::F32)
            .meta("llama.expert_count", GgufValue::U32(8))
            .meta("llama.expert_used_count", GgufValue::U32(9));
        err(Checkpoint::open(gguf_file(d, &g)).unwrap().moe_config())
    });
    c.insert("moe-router-rows", |_| {
        moe_layer("mixtral", "nothing", |cfg| cfg.num_experts = 10)
    });
    c.insert("moe-shared-missing", |_| {
        moe_layer("qwen2_moe", "shared_expert.", |_| {})
    });
    c.insert("moe-gguf-layout", |_| {
        moe_layer("mixtral", "nothing", |cfg| {
            cfg.expert.layout = WeightLayout::Gguf
        })
    });
    c.insert("moe-other-layout", |_| {
        moe_layer("mixtral", "nothing", |cfg| {
            cfg.expert.layout = WeightLayout::T5
        })
    });
    c.insert("moe-expert-bias", |_| {
        moe_layer("mixtral", "nothing", |cfg| cfg.expert.bias = true)
    });
    c.insert("moe-parts-activation", |_| {
        let (h, i) = (8, 16);
        let expert = |act: Activation| {
            let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
            GluFeedForward::new(&GluConfig::new(h, i).with_activation(act), vb).unwrap()
        };
        let cfg = MoeConfig::new(GluConfig::new(h, i), 2, 1);
        let experts = vec![expert(Activation::Silu), expert(Activation::Relu)];
        let router = Tensor::zeros((2, h), DType::F32, &Device::Cpu).unwrap();
        err(GluExperts::from_parts(
            &cfg, router, None, experts, None, None,
        ))
    });
    c.insert("moe-input-width", |_| {
        let dir = moe_fixture("qwen3_moe");
        let cfg = MoeConfig::from_hf_config_file(dir.join("config.json")).unwrap();
        let path = dir.join("model.safetensors");
        // SAFETY: the fixture is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) };
        let moe = GluExperts::new(&cfg, vb.unwrap().pp("model.layers.0.mlp")).unwrap();
        err(moe.forward(&Tensor::zeros((3, 71), DType::F32, &Device::Cpu).unwrap()))
    });
    c
}

/// The rows of `docs/errors.md`'s tables: id → message, `\|` unescaped.
fn documented() -> BTreeMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/errors.md");
    let text = std::fs::read_to_string(&path).expect("docs/errors.md");
    let mut rows = BTreeMap::new();
    // Only the tables headed `| case | bad input | error (first line) |`.
    let mut in_table = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("| case |") {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
        }
        let Some(inner) = line.strip_prefix("| `").filter(|_| in_table) else {
            continue;
        };
        let cells: Vec<String> = split_cells(inner.trim_end_matches('|'));
        assert_eq!(cells.len(), 3, "a row of three cells: {line}");
        let id = cells[0].trim().trim_end_matches('`').to_string();
        let msg = cells[2].trim();
        let msg = msg
            .strip_prefix("`` ")
            .and_then(|m| m.strip_suffix(" ``"))
            .or_else(|| msg.strip_prefix('`').and_then(|m| m.strip_suffix('`')))
            .unwrap_or_else(|| panic!("{id}: the message is not in backticks: {msg}"));
        assert!(
            rows.insert(id.clone(), msg.to_string()).is_none(),
            "{id} twice"
        );
    }
    rows
}

fn split_cells(row: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let mut chars = row.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells
}

/// The message's first line, with the temporary directory written as `<dir>`.
fn normalize(msg: &str, dir: &Path) -> String {
    let first = msg.lines().next().unwrap_or("");
    let dir = dir.display().to_string();
    first.replace(&dir, "<dir>")
}

#[test]
fn every_documented_error_is_the_one_we_give() {
    let docs = documented();
    let print = std::env::var_os("CANDLE_GLU_PRINT_ERRORS").is_some();
    let mut failures = Vec::new();
    for (id, trigger) in cases() {
        let dir = tempfile::tempdir().unwrap();
        let got = normalize(&trigger(dir.path()), dir.path());
        assert!(!got.contains("panicked"), "{id}: {got}");
        if print {
            println!("| `{id}` | | `` {} `` |", got.replace('|', "\\|"));
        }
        match docs.get(id) {
            None => failures.push(format!(
                "{id}: no row in docs/errors.md; it gives:\n    {got}"
            )),
            Some(want) if *want != got => {
                failures.push(format!("{id}:\n    doc: {want}\n    got: {got}"))
            }
            Some(_) => {}
        }
    }
    let ids = cases();
    for id in docs.keys() {
        if !ids.contains_key(id.as_str()) {
            failures.push(format!(
                "{id}: a row in docs/errors.md but no case in this test"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
