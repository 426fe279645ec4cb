//! Robustness beyond the messages (which `tests/error_table.rs` pins): what still works beside a
//! bad tensor, that nothing blocks or balloons, that hand-written files are read exactly, and the
//! regression tests for what fuzzing found (`fuzz/`).

mod common;
#[path = "common/craft.rs"]
mod craft;

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::loading::{Checkpoint, FileFormat, LoadOptions};
use candle_glu::WeightLayout;
use common::{assert_close, Tol};
use craft::{write, Gguf, GgufValue};

fn opts(quantized: bool) -> LoadOptions {
    LoadOptions::new(DType::F32, Device::Cpu).with_quantized(quantized)
}

#[test]
fn hand_written_gguf_is_read_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gguf::llama(32, 64, craft::F32);
    let ckpt = Checkpoint::open(write(dir.path(), "m.gguf", &g.bytes())).unwrap();
    assert_eq!(ckpt.format(), FileFormat::Gguf);
    assert_eq!(ckpt.num_layers(), Some(1));
    assert_eq!(
        ckpt.tensor_shape("blk.0.ffn_down.weight"),
        Some(&[32, 64][..])
    );
    let cfg = ckpt.config().unwrap().clone();
    let ffn = ckpt.load_layer(&cfg, 0, &opts(false)).unwrap();
    assert_weights_are_the_files(&ffn, &g);
}

/// The block's gate, up and down weights are `g`'s f32 tensors, value for value.
fn assert_weights_are_the_files(ffn: &candle_glu::GluFeedForward, g: &Gguf) {
    for (proj, (_, dims, _, raw)) in [ffn.gate_proj(), ffn.up_proj(), ffn.down_proj()]
        .into_iter()
        .zip(&g.tensors)
    {
        let w = proj.as_linear().unwrap().weight();
        assert_eq!(w.dims(), [dims[0] as usize, dims[1] as usize]);
        let want: Vec<f32> = raw
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }
}

#[test]
fn an_unreadable_tensor_elsewhere_does_not_stop_the_ffn() {
    // llama.cpp files often quantize the embeddings in a type candle cannot read; candle's own
    // reader refuses the whole file for it, ours only that tensor.
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gguf::llama(32, 64, craft::Q4_0);
    g.tensors.push((
        "token_embd.weight".into(),
        vec![4, 256],
        craft::IQ2_XXS,
        vec![0; 264],
    ));
    let ckpt = Checkpoint::open(write(dir.path(), "m.gguf", &g.bytes())).unwrap();
    assert!(ckpt.tensor_names().contains(&"token_embd.weight"));
    let cfg = ckpt.config().unwrap().clone();
    let x = common::randn(1, (3, 32), 1.0, &Device::Cpu);
    let q = ckpt.load_layer(&cfg, 0, &opts(true)).unwrap();
    assert!(q.gate_proj().is_quantized());
    let d = ckpt.load_layer(&cfg, 0, &opts(false)).unwrap();
    let (yq, yd) = (q.forward(&x).unwrap(), d.forward(&x).unwrap());
    assert_close(&yq, &yd, Tol::Rel(0.05), "quantized vs dequantized");
}

#[test]
fn gguf_without_sizes_in_its_metadata_is_still_usable() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gguf::llama(32, 64, craft::F32);
    // (A size stored as anything but an integer is an error, not an absent size: the error
    // table's `gguf-size-wrong-type`.)
    g.metadata.retain(|(k, _)| k == "general.architecture");
    let ckpt = Checkpoint::open(write(dir.path(), "m.gguf", &g.bytes())).unwrap();
    assert_eq!(ckpt.config(), None);
    let cfg = ckpt
        .infer_config("blk.0", WeightLayout::Gguf, "silu".parse().unwrap())
        .unwrap();
    assert_eq!((cfg.hidden_size, cfg.intermediate_size), (32, 64));
    let dense = ckpt.load_layer(&cfg, 0, &opts(false)).unwrap();
    assert_weights_are_the_files(&dense, &g);
    // Kept "as stored": f32 GGUF tensors are not quantized, so the same dense block (on the
    // fused kernels where they run, not candle's `QMatMul`).
    let stored = ckpt.load_layer(&cfg, 0, &opts(true)).unwrap();
    assert!(!stored.gate_proj().is_quantized() && !stored.down_proj().is_quantized());
    let x = common::randn(2, (3, 32), 1.0, &Device::Cpu);
    assert_eq!(
        stored.forward_path(&x),
        common::dense_path("an f32 GGUF block")
    );
    let (ys, yd) = (stored.forward(&x).unwrap(), dense.forward(&x).unwrap());
    assert_close(&ys, &yd, Tol::Rel(1e-6), "as stored vs dense");
    let one = ckpt.load_projection("blk.0.ffn_up", &opts(true)).unwrap();
    assert!(!one.is_quantized());
}

#[test]
fn alignment_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    // The same f32 weights with their data where each alignment puts it: a reader that
    // assumed the default 32 bytes would read them from the wrong place in the files aligned
    // to 1 or 256 bytes (checked below: their data does not start where 32 would put it; the
    // header, unpadded, is as long as the 1-byte file's).
    let data_bytes = 3 * 32 * 64 * 4;
    let mut header = None;
    let x = Tensor::arange(0f32, 3.0 * 32.0, &Device::Cpu)
        .and_then(|x| (x.reshape((3, 32))? * 0.01)?.sin())
        .unwrap();
    let mut outputs = Vec::new();
    for align in [1u32, 8, 32, 256] {
        // A key whose length makes the header end away from a multiple of 32.
        let g = Gguf::llama(32, 64, craft::F32)
            .meta("general.alignment", GgufValue::U32(align))
            .meta("general.name", GgufValue::Str("a".into()));
        let bytes = g.bytes();
        let data_start = bytes.len() - data_bytes;
        let header = *header.get_or_insert(data_start);
        assert_eq!(data_start, header.next_multiple_of(align as usize));
        if align == 1 || align == 256 {
            assert_ne!(data_start, header.next_multiple_of(32), "{align}");
        }
        let ckpt = Checkpoint::open(write(dir.path(), "m.gguf", &bytes)).unwrap();
        let cfg = ckpt.config().unwrap().clone();
        let ffn = ckpt.load_layer(&cfg, 0, &opts(false)).unwrap();
        let y: Vec<Vec<f32>> = x.apply(&ffn).unwrap().to_vec2().unwrap();
        outputs.push((align, y));
    }
    for (align, y) in &outputs[1..] {
        assert_eq!(y, &outputs[0].1, "alignment {align} against 1");
    }
    let g = Gguf::llama(32, 64, craft::Q4_0).meta("general.alignment", GgufValue::I32(-32));
    let err = Checkpoint::open(write(dir.path(), "m.gguf", &g.bytes()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`general.alignment` is I32(-32), expected a power of two"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn a_fifo_shard_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("model-00001-of-00001.safetensors");
    assert!(std::process::Command::new("mkfifo")
        .arg(&shard)
        .status()
        .unwrap()
        .success());
    let index = r#"{"weight_map":{"w":"model-00001-of-00001.safetensors"}}"#;
    write(dir.path(), "model.safetensors.index.json", index.as_bytes());
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.ends_with("model-00001-of-00001.safetensors: not a regular file"),
        "{err}"
    );
    // And a FIFO named config.json is skipped, not read.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "model.safetensors", &craft::llama_block(4, 8));
    assert!(std::process::Command::new("mkfifo")
        .arg(dir.path().join("config.json"))
        .status()
        .unwrap()
        .success());
    assert_eq!(Checkpoint::open(dir.path()).unwrap().config(), None);
}

#[test]
fn inputs_up_to_the_activation_limit_run() {
    // The limit counts tokens × intermediate; ordinary batches are far below it.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "model.safetensors", &craft::llama_block(4, 8));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let cfg = ckpt
        .infer_config(
            "model.layers.0.mlp",
            WeightLayout::Llama,
            "silu".parse().unwrap(),
        )
        .unwrap();
    let ffn = ckpt.load_layer(&cfg, 0, &opts(false)).unwrap();
    for shape in [vec![4096, 4], vec![0, 4], vec![3, 0, 4]] {
        let x = Tensor::zeros(shape.as_slice(), DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(ffn.forward(&x).unwrap().dims(), shape.as_slice());
    }
    // At the limit itself (2^34 bytes: 2^29 tokens × 8 × 4 bytes) an input passes the check,
    // one token more does not; half-precision activations count as f32. (Checked without
    // making the input: `forward` runs the same check first.)
    let limit = candle_glu::config::MAX_ACTIVATION_BYTES as usize / (8 * 4);
    for dtype in [DType::F32, DType::BF16] {
        assert!(cfg.check_tokens(&[limit, 4], limit, dtype).is_ok());
        let e = cfg
            .check_tokens(&[limit + 1, 4], limit + 1, dtype)
            .unwrap_err();
        assert!(matches!(e, candle_glu::Error::InputTooLarge { .. }), "{e}");
    }
    // f64 activations are 8 bytes: half the tokens.
    assert!(cfg
        .check_tokens(&[limit / 2, 4], limit / 2, DType::F64)
        .is_ok());
    assert!(cfg
        .check_tokens(&[limit / 2 + 1, 4], limit / 2 + 1, DType::F64)
        .is_err());
}

#[test]
fn megabyte_tensor_names_give_a_short_error_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let long = "model.layers.0.mlp.".to_string() + &"x".repeat(4 << 20);
    let header = format!(r#"{{"{long}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#);
    write(
        dir.path(),
        "model.safetensors",
        &craft::safetensors_raw(&header, &[0; 4]),
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let start = std::time::Instant::now();
    let cfg = candle_glu::GluConfig::new(4, 8);
    let err = ckpt
        .load_ffn(&cfg, "model.layers.0.mlp", &opts(false))
        .unwrap_err()
        .to_string();
    assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
    assert!(err.len() < 400, "{} bytes: {}", err.len(), &err[..400]);
    assert!(
        err.starts_with("missing tensor `model.layers.0.mlp.gate_proj.weight`; closest"),
        "{err}"
    );
    assert!(err.ends_with("xxx…`"), "{err}");
}

/// Fuzzing found (crash-31bfe866…): a GGUF weight with a zero dimension, loaded through
/// `Checkpoint::var_builder`, reached candle's `from_raw_data`, which made a slice from the empty
/// read buffer's dangling, misaligned pointer (undefined behaviour; a panic with debug
/// assertions).
#[test]
fn an_empty_gguf_tensor_is_never_handed_to_candle() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gguf::llama(32, 64, craft::F32).redim("blk.0.ffn_gate.weight", &[0, 32]);
    let path = write(dir.path(), "m.gguf", &g.bytes());
    let ckpt = Checkpoint::open(&path).unwrap();
    let cfg = ckpt.config().unwrap().clone();
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
    let err = candle_glu::GluFeedForward::new(&cfg, vb.pp("blk.0"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "tensor `blk.0.ffn_gate.weight` has shape [0, 32], expected [64, 32]"
    );
    for quantized in [true, false] {
        let err = ckpt
            .load_layer(&cfg, 0, &opts(quantized))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has shape [0, 32], expected [64, 32]"),
            "{err}"
        );
    }
    let store = candle_glu::loading::GgufStore::open(&path).unwrap();
    let err = store
        .dequantized("blk.0.ffn_gate.weight", DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("tensor `blk.0.ffn_gate.weight` has shape [0, 32], with no values"),
        "{err}"
    );
}

/// Fuzzing found (config target, crash-887440b0…): `GluFeedForward::new` over
/// `VarBuilder::zeros` always failed with bias = false, since that backend claims every name,
/// biases included ("the checkpoint has biases (`.gate_up_proj.bias`, ...)", with a stray dot
/// at the root prefix).
#[test]
fn a_zeros_var_builder_builds_every_layout_with_and_without_bias() {
    for &layout in WeightLayout::ALL {
        for bias in [false, true] {
            let cfg = candle_glu::GluConfig::new(4, 8)
                .with_layout(layout)
                .with_bias(bias);
            let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
            let ffn = candle_glu::GluFeedForward::new(&cfg, vb).unwrap();
            assert_eq!(ffn.up_proj().as_linear().unwrap().bias().is_some(), bias);
            let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
            let y = ffn.forward(&x).unwrap();
            assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }
}

#[test]
fn names_at_the_root_prefix_have_no_leading_dot() {
    let dir = tempfile::tempdir().unwrap();
    let t: [(&str, &[u64]); 4] = [
        ("gate_proj.weight", &[8, 4]),
        ("up_proj.weight", &[8, 4]),
        ("down_proj.weight", &[4, 8]),
        ("gate_proj.bias", &[8]),
    ];
    write(dir.path(), "model.safetensors", &craft::safetensors_f32(&t));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
    let err = candle_glu::GluFeedForward::new(&candle_glu::GluConfig::new(4, 8), vb)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "biases exist for only some projections: found `gate_proj.bias`, missing \
         `up_proj.bias`, `down_proj.bias`"
    );
}

/// Fuzzing found (gguf target, crash-5aeafbba…): candle 0.11.1's Q4_1, Q5_0 and Q5_1 dot
/// products `debug_assert!` an even number of 32-value blocks per row, so a quantized weight
/// with rows of 32 (or 96, ...) values panicked in debug builds. Such weights now multiply
/// dequantized; the others stay quantized.
#[test]
fn quantized_rows_of_an_odd_number_of_blocks_run() {
    use candle_core::quantized::QMatMul;
    use candle_glu::Projection;
    let dir = tempfile::tempdir().unwrap();
    let g = Gguf::llama(32, 64, craft::Q5_0); // gate and up rows: 1 block; down rows: 2
    let ckpt = Checkpoint::open(write(dir.path(), "m.gguf", &g.bytes())).unwrap();
    let cfg = ckpt.config().unwrap().clone();
    let q = ckpt.load_layer(&cfg, 0, &opts(true)).unwrap();
    let kind = |p: &Projection| match p {
        Projection::Quantized {
            weight: QMatMul::QTensor(_),
            ..
        } => "quantized",
        Projection::Quantized {
            weight: QMatMul::Tensor(_),
            ..
        } => "dequantized",
        _ => "other",
    };
    assert_eq!(kind(q.gate_proj()), "dequantized");
    assert_eq!(kind(q.up_proj()), "dequantized");
    assert_eq!(kind(q.down_proj()), "quantized");
    let d = ckpt.load_layer(&cfg, 0, &opts(false)).unwrap();
    let x = common::randn(2, (3, 32), 1.0, &Device::Cpu);
    let (yq, yd) = (q.forward(&x).unwrap(), d.forward(&x).unwrap());
    assert!(common::max_abs(&yd) > 0.0);
    assert_close(&yq, &yd, Tol::Rel(0.05), "quantized vs dequantized");
}

/// A DeepSeek GGUF whose first layer is dense (llama.cpp's `leading_dense_block_count`): the
/// config says so as the tensors do.
#[test]
fn gguf_leading_dense_layers_have_no_experts() {
    let dir = tempfile::tempdir().unwrap();
    let (h, i, e) = (32u64, 64u64, 4u64);
    let arch = "deepseek2";
    let key = |k: &str| format!("{arch}.{k}");
    let mut g = Gguf::llama(h, i, craft::F32);
    g.metadata = vec![("general.architecture".into(), GgufValue::Str(arch.into()))];
    for (k, v) in [
        ("embedding_length", h),
        ("feed_forward_length", i),
        ("expert_feed_forward_length", i),
        ("block_count", 2),
        ("leading_dense_block_count", 1),
        ("expert_count", e),
        ("expert_used_count", 2),
    ] {
        g = g.meta(&key(k), GgufValue::U32(v as u32));
    }
    for (name, dims) in [
        ("blk.1.ffn_gate_inp.weight", vec![e, h]),
        ("blk.1.ffn_gate_exps.weight", vec![e, i, h]),
        ("blk.1.ffn_up_exps.weight", vec![e, i, h]),
        ("blk.1.ffn_down_exps.weight", vec![e, h, i]),
    ] {
        let n = dims.iter().product();
        g.tensors.push((
            name.into(),
            dims,
            craft::F32,
            craft::tensor_bytes(craft::F32, n),
        ));
    }
    let ckpt = Checkpoint::open(write(dir.path(), "m.gguf", &g.bytes())).unwrap();
    let cfg = ckpt.moe_config().unwrap().expect("a mixture of experts");
    assert_eq!(ckpt.moe_layers(&cfg), [1]);
    assert!(!cfg.is_moe_layer(0) && cfg.is_moe_layer(1));
}

/// `feed_forward_length` per layer, as llama.cpp allows it (a pruned model): the file opens;
/// its block is described where the layers agree, and not where they differ.
#[test]
fn gguf_feed_forward_length_per_layer() {
    let dir = tempfile::tempdir().unwrap();
    let per_layer = |sizes: &[u32]| {
        let bytes = sizes.iter().flat_map(|s| s.to_le_bytes()).collect();
        let g = Gguf::llama(32, 64, craft::F32).meta(
            "llama.feed_forward_length",
            GgufValue::Array(4, sizes.len() as u64, bytes),
        );
        Checkpoint::open(write(dir.path(), "m.gguf", &g.bytes())).unwrap()
    };
    let same = per_layer(&[64, 64]);
    assert_eq!(same.config().map(|c| c.intermediate_size), Some(64));
    assert!(per_layer(&[64, 48]).config().is_none());
}
