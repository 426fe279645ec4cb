//! SmolLM2-135M-Instruct end to end, with candle-glu's `GluFeedForward` as the FFN of all 30
//! layers (`examples/smollm2/`), against implementations we did not write:
//!
//! - candle-transformers' `quantized_llama::ModelWeights` on the same GGUF;
//! - the float64 NumPy forward pass of `scripts/make_smollm2_reference.py`
//!   (`tests/fixtures/smollm2/reference.{json,safetensors}`);
//! - llama.cpp's logits (`scripts/make_llamacpp_reference.py`, `tests/fixtures/smollm2/llamacpp.json`).
//!
//! Tests that need the GGUF fail, saying how to fetch it, when it is absent.

#[path = "../examples/smollm2/mod.rs"]
mod smollm2;

mod common;

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_glu::loading::{Checkpoint, LoadOptions};
use candle_glu::{ForwardPath, GluFeedForward};
use common::{assert_close, Tol};
use serde::Deserialize;
use smollm2::tokenizer::Tokenizer;
use smollm2::{argmax, Decoder, FfnKind, LlamaConfig, Model};

// ---------------------------------------------------------------------------------------------
// Fixtures

#[derive(Debug, Deserialize)]
struct Fixture {
    prompts: Vec<Prompt>,
}

#[derive(Debug, Deserialize)]
struct Prompt {
    text: String,
    ids: Vec<u32>,
    positions: Vec<Position>,
    greedy: Greedy,
}

#[derive(Debug, Deserialize)]
struct Position {
    pos: usize,
    argmax: u32,
    top5_ids: Vec<u32>,
    top5_logits: Vec<f64>,
}

#[derive(Debug, Deserialize)]
struct Greedy {
    ids: Vec<u32>,
    text: String,
}

fn fixture(name: &str) -> Fixture {
    let path = common::fixtures().join("smollm2").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The float64 NumPy reference.
fn reference() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| fixture("reference.json"))
}

/// llama.cpp (llama-cpp-python).
fn llamacpp() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| fixture("llamacpp.json"))
}

fn gguf() -> PathBuf {
    common::smollm2_gguf()
}

/// One model per FFN kind, shared by the tests (the KV cache lives outside the model).
fn model(kind: FfnKind) -> &'static Model {
    static MODELS: [OnceLock<Model>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let i = FfnKind::ALL.iter().position(|&k| k == kind).unwrap();
    MODELS[i].get_or_init(|| Model::load(gguf(), kind, &Device::Cpu).unwrap())
}

/// The quantized model with every FFN asked for Q4_1 decoded exactly at every token count
/// (`with_exact_q4_1`): on an AMX machine the default takes the tiles from 4 tokens.
fn exact_q4_1_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let ckpt = Checkpoint::open(gguf()).unwrap();
        let cfg = ckpt.config().unwrap().clone();
        let opts = FfnKind::Quantized.load_options(&Device::Cpu);
        Model::load_with(gguf(), &Device::Cpu, |layer| {
            Ok(ckpt.load_layer(&cfg, layer, &opts)?.with_exact_q4_1(true))
        })
        .unwrap()
    })
}

/// Asserts the path every layer's FFN of `kind` takes where the crate's CPU kernels run: the
/// Q4_1 kernel (quantized) or the fused kernels (f32, bf16). Returns whether they run (else
/// every FFN runs on candle's ops; `CANDLE_GLU_REQUIRE_KERNELS` makes that an error).
fn kernels_take_the_ffns(what: &str) -> bool {
    if !common::kernels_or_skip(what) {
        return false;
    }
    for (kind, want) in [
        (FfnKind::Quantized, ForwardPath::Quantized),
        (FfnKind::F32, ForwardPath::Fused),
        (FfnKind::Bf16, ForwardPath::Fused),
    ] {
        for (l, layer) in model(kind).layers().iter().enumerate() {
            let ffn = layer.mlp();
            let x = Tensor::zeros((1, ffn.config().hidden_size), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(ffn.forward_path(&x), want, "{kind} FFN, layer {l}");
        }
    }
    true
}

/// The GGUF's header as candle's own reader gives it, and that reader: the references below read
/// the file with candle, not with the crate's checked reader that the example uses.
fn candle_gguf() -> (Content, BufReader<File>) {
    let mut reader = BufReader::new(File::open(gguf()).unwrap());
    let content = Content::read(&mut reader).unwrap();
    (content, reader)
}

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let (content, _) = candle_gguf();
        Tokenizer::from_gguf(&content).unwrap()
    })
}

/// Logits at every position of `ids`, in one prefill pass: `[tokens, vocab]`.
fn prefill<F: Module>(model: &Model<F>, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = model.new_cache();
    model
        .forward(&input, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// [`prefill`] of reference prompt `k`, computed once per FFN kind.
fn prompt_logits(kind: FfnKind, k: usize) -> &'static Tensor {
    static LOGITS: [[OnceLock<Tensor>; 4]; 3] = [const { [const { OnceLock::new() }; 4] }; 3];
    let i = FfnKind::ALL.iter().position(|&x| x == kind).unwrap();
    LOGITS[i][k].get_or_init(|| prefill(model(kind), &reference().prompts[k].ids))
}

/// Logits at every position of `ids`, one token per pass through the KV cache.
fn stepwise<F: Module>(model: &Model<F>, ids: &[u32]) -> Tensor {
    let mut cache = model.new_cache();
    let rows: Vec<Tensor> = ids
        .iter()
        .map(|&id| {
            let input = Tensor::new(&[[id]], &Device::Cpu).unwrap();
            model.forward_last(&input, &mut cache).unwrap()
        })
        .collect();
    Tensor::cat(&rows, 0).unwrap()
}

fn row(t: &Tensor, i: usize) -> Vec<f32> {
    t.i(i).unwrap().to_vec1::<f32>().unwrap()
}

/// Any change in the numbers (another FFN dtype, another RoPE table, another implementation)
/// re-rolls the Q8_1 roundings of every QMatMul downstream, which moves logits by up to ~1
/// (here ~0.5 at the top): two models may only disagree on the top token where its lead is
/// below this.
const NEAR_TIE: f32 = 0.5;

fn full_reference(k: usize) -> Tensor {
    static R: OnceLock<std::collections::HashMap<String, Tensor>> = OnceLock::new();
    let r = R.get_or_init(|| {
        let path = common::fixtures().join("smollm2/reference.safetensors");
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    });
    r[&format!("logits_last.p{k}")].clone()
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

#[test]
fn tokenizer_ids_match_both_references() {
    let tok = tokenizer();
    for (p, q) in reference().prompts.iter().zip(&llamacpp().prompts) {
        assert_eq!(p.text, q.text);
        let ids = tok.encode(&p.text).unwrap();
        assert_eq!(ids, p.ids, "{:?} vs the float64 reference", p.text);
        assert_eq!(ids, q.ids, "{:?} vs llama.cpp", p.text);
        assert_eq!(tok.decode(&ids).unwrap(), p.text);
        // Both references' greedy continuations decode to the text they recorded.
        assert_eq!(tok.decode(&p.greedy.ids).unwrap(), p.greedy.text);
        assert_eq!(tok.decode(&q.greedy.ids).unwrap(), q.greedy.text);
    }
}

#[test]
fn generation_ends_on_the_tokens_llama_cpp_ends_on() {
    // SmolLM2's eos is `<|im_end|>`; llama.cpp's vocabulary ends generations on
    // `<|endoftext|>` too (by its text), but not on `<|im_start|>` or on text.
    let tok = tokenizer();
    let id = |t: &str| match tok.encode(t).unwrap()[..] {
        [id] => id,
        ref ids => panic!("{t}: {ids:?}"),
    };
    assert_eq!(id("<|im_end|>"), tok.eos_token_id());
    assert!(tok.ends_generation(id("<|im_end|>")));
    assert!(tok.ends_generation(id("<|endoftext|>")));
    assert!(!tok.ends_generation(id("<|im_start|>")));
    assert!(!tok.ends_generation(id("Hello")));
}

/// A crafted header's sizes are errors before anything is made from them: no KV heads (a
/// division by zero), an embedding without rows (an index out of bounds), a context of 2^40
/// positions (RoPE tables that would abort on memory).
#[test]
fn crafted_llama_metadata_is_refused() {
    use candle_core::quantized::gguf_file::Value;
    let (content, _) = candle_gguf();
    assert_eq!(
        LlamaConfig::from_gguf(&content).unwrap().max_positions,
        8192
    );
    let edited = |edit: &dyn Fn(&mut candle_core::quantized::gguf_file::Content)| {
        let mut c = candle_gguf().0;
        edit(&mut c);
        LlamaConfig::from_gguf(&c).unwrap_err().to_string()
    };
    let msg = edited(&|c| {
        c.metadata
            .insert("llama.attention.head_count_kv".into(), Value::U32(0));
    });
    assert!(
        msg.contains("bad head counts: 9 heads, 0 KV heads"),
        "{msg}"
    );
    let msg = edited(&|c| {
        c.metadata
            .insert("llama.context_length".into(), Value::U64(1 << 40));
    });
    assert!(
        msg.contains("`llama.context_length` 1099511627776 × a head size of 64"),
        "{msg}"
    );
    // A small context with a huge head size: the tables' size is what is bounded.
    let msg = edited(&|c| {
        for (key, n) in [
            ("llama.embedding_length", 1 << 16),
            ("llama.attention.head_count", 1),
            ("llama.attention.head_count_kv", 1),
            ("llama.context_length", 1 << 12),
            ("llama.rope.dimension_count", 1 << 16),
        ] {
            c.metadata.insert(key.into(), Value::U32(n));
        }
    });
    assert!(msg.contains("× a head size of 65536"), "{msg}");
    let msg = edited(&|c| {
        let info = c.tensor_infos.get_mut("token_embd.weight").unwrap();
        info.shape = candle_core::Shape::from(());
    });
    assert!(msg.contains("`token_embd.weight` has no rows"), "{msg}");
    // A block count that lies: an error naming the missing layer, not an allocation of 2^32.
    let msg = edited(&|c| {
        c.metadata
            .insert("llama.block_count".into(), Value::U32(u32::MAX));
    });
    assert!(
        msg.contains(
            "`llama.block_count` is 4294967295, but the GGUF has no `blk.4294967294.attn_q.weight`"
        ),
        "{msg}"
    );
    // A key of another type is an error, not its default (it gave RoPE's base 10000).
    let msg = edited(&|c| {
        c.metadata
            .insert("llama.rope.freq_base".into(), Value::String("1e5".into()));
    });
    assert!(msg.contains("`llama.rope.freq_base`"), "{msg}");
    // What the example does not implement is refused, not ignored.
    let msg = edited(&|c| {
        c.metadata.insert(
            "llama.rope.scaling.type".into(),
            Value::String("linear".into()),
        );
    });
    assert!(msg.contains("RoPE scaling (`linear`)"), "{msg}");
    let msg = edited(&|c| {
        c.metadata
            .insert("llama.attention.key_length".into(), Value::U32(128));
    });
    assert!(msg.contains("keys of 128 values for heads of 64"), "{msg}");
    let msg = edited(&|c| {
        let Some(Value::Array(tokens)) = c.metadata.get_mut("tokenizer.ggml.tokens") else {
            panic!("tokens");
        };
        tokens.push(Value::String("<extra>".into()));
    });
    assert!(
        msg.contains("the tokenizer has 49153 tokens but `token_embd.weight` only 49152 rows"),
        "{msg}"
    );
}

/// Another model's tokenizer settings are refused: this example builds SmolLM2's.
#[test]
fn tokenizers_other_than_smollm2s_are_refused() {
    use candle_core::quantized::gguf_file::Value;
    let edited = |key: &str, value: Value| {
        let mut c = candle_gguf().0;
        c.metadata.insert(key.into(), value);
        match smollm2::tokenizer::Tokenizer::from_gguf(&c) {
            Ok(_) => "no error".to_string(),
            Err(e) => e.to_string(),
        }
    };
    let msg = edited("tokenizer.ggml.pre", Value::String("llama-bpe".into()));
    assert!(msg.contains("pre-tokenizer is `llama-bpe`"), "{msg}");
    let msg = edited("tokenizer.ggml.add_bos_token", Value::Bool(true));
    assert!(msg.contains("sets `tokenizer.ggml.add_bos_token`"), "{msg}");
    assert_eq!(
        edited("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        "no error"
    );
}

#[test]
fn tokenizer_splits_digits_one_by_one() {
    // llama.cpp's `smollm` pre-tokenizer: `\p{N}` on its own before GPT-2's regex.
    let tok = tokenizer();
    let digit = |d: &str| tok.encode(d).unwrap()[0];
    assert_eq!(
        tok.encode("2024").unwrap(),
        [digit("2"), digit("0"), digit("2"), digit("4")]
    );
    let ids = tok.encode("In 1995, 42 apples cost $3.50.").unwrap();
    for id in &ids {
        let text = tok.decode(&[*id]).unwrap();
        let digits = text.chars().filter(char::is_ascii_digit).count();
        assert!(digits <= 1, "token {id} {text:?} holds {digits} digits");
    }
    assert_eq!(tok.decode(&ids).unwrap(), "In 1995, 42 apples cost $3.50.");
}

#[test]
fn streaming_decoder_waits_for_whole_characters() {
    let tok = tokenizer();
    let text = "Crabs 🦀 and naïve cafés — 日本語 ✓";
    let ids = tok.encode(text).unwrap();
    // Some token ends inside a character, so the test means something.
    assert!(
        ids.iter()
            .any(|&id| std::str::from_utf8(tok.token_bytes(id)).is_err()),
        "no token splits a character: {ids:?}"
    );
    let mut stream = tok.stream();
    let mut chunks: Vec<String> = ids.iter().map(|&id| stream.push(id)).collect();
    chunks.push(stream.finish());
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    assert!(chunks.iter().any(String::is_empty), "{chunks:?}");
    assert_eq!(chunks.concat(), text);

    // The references' continuations stream to their decoded text.
    for p in &reference().prompts {
        let mut stream = tok.stream();
        let mut out: String = p.greedy.ids.iter().map(|&id| stream.push(id)).collect();
        out.push_str(&stream.finish());
        assert_eq!(out, p.greedy.text);
    }
    // An unfinished character at the very end becomes U+FFFD.
    let crab = tok.encode("🦀").unwrap();
    if crab.len() > 1 {
        let mut stream = tok.stream();
        assert_eq!(stream.push(crab[0]), "");
        assert_eq!(stream.finish(), "\u{FFFD}");
    }
}

// ---------------------------------------------------------------------------------------------
// The model against the oracles

#[test]
fn the_capital_of_france_is_paris() {
    let tok = tokenizer();
    let ids = tok.encode("The capital of France is").unwrap();
    assert_eq!(ids, reference().prompts[0].ids);
    for kind in FfnKind::ALL {
        let logits = prompt_logits(kind, 0);
        let next = argmax(&logits.i(ids.len() - 1).unwrap()).unwrap();
        assert_eq!(next, 7042, "{kind} FFN");
        assert_eq!(tok.decode(&[next]).unwrap(), " Paris");
    }
}

/// Top-1 at every position against a reference, and the largest |logit difference| over the
/// reference's top-5 ids. With `near_ties_allowed`, ours may pick another token at a near-tie:
/// one within [`NEAR_TIE`] of the top in both.
fn compare_top5(kind: FfnKind, fixture: &Fixture, name: &str, near_ties_allowed: bool) -> f64 {
    let mut worst: f64 = 0.;
    for (k, p) in fixture.prompts.iter().enumerate() {
        assert_eq!(p.ids, reference().prompts[k].ids);
        let logits = prompt_logits(kind, k);
        assert_eq!(logits.dims(), [p.ids.len(), 49152]);
        for want in &p.positions {
            let ours = row(logits, want.pos);
            let top1 = smollm2::sampler::argmax(&ours);
            if top1 != want.argmax {
                // A near-tie: each side's pick is within NEAR_TIE of the other's, in both.
                let ours_margin = ours[top1 as usize] - ours[want.argmax as usize];
                let theirs = want.top5_ids.iter().position(|&id| id == top1);
                let their_margin = theirs.map(|j| want.top5_logits[0] - want.top5_logits[j]);
                assert!(
                    ours_margin < NEAR_TIE && their_margin.is_some_and(|m| m < NEAR_TIE.into()),
                    "{kind} FFN, prompt {k} position {}: top-1 {top1} (by {ours_margin:.3}), \
                     {name} says {} (by {their_margin:?})",
                    want.pos,
                    want.argmax
                );
                assert!(
                    near_ties_allowed,
                    "{kind} FFN, prompt {k} position {}",
                    want.pos
                );
                eprintln!(
                    "{kind} FFN vs {name}: prompt {k} position {}: top-1 {top1} by \
                     {ours_margin:.3} over {}, which {name} ranks first by {:.3}",
                    want.pos,
                    want.argmax,
                    their_margin.unwrap_or(f64::NAN)
                );
            }
            for (&id, &logit) in want.top5_ids.iter().zip(&want.top5_logits) {
                // A NaN is an infinite difference (`max` would pass over it).
                let d = (f64::from(ours[id as usize]) - logit).abs();
                worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
            }
        }
    }
    worst
}

fn oracles(kind: FfnKind, near_ties_allowed: bool) {
    let vs_f64 = compare_top5(kind, reference(), "float64", near_ties_allowed);
    let vs_cpp = compare_top5(kind, llamacpp(), "llama.cpp", near_ties_allowed);
    let mut full: f64 = 0.;
    for (k, p) in reference().prompts.iter().enumerate() {
        let last = prompt_logits(kind, k).i(p.ids.len() - 1).unwrap();
        // Strictly below 2.0 (see below).
        let what = format!("{kind} FFN, prompt {k}, last position's logits vs float64");
        full = full.max(assert_close(
            &last,
            &full_reference(k),
            Tol::Abs(2f64.next_down()),
            what,
        ));
    }
    eprintln!(
        "{kind} FFN: max |logit diff| over the top-5 ids: {vs_f64:.3} vs float64, {vs_cpp:.3} vs \
         llama.cpp; over the whole vocabulary at the last position: {full:.3} vs float64"
    );
    // Quantized activations (Q8_1/Q8_0 before every QMatMul) leave ~0.5-1 logit of noise;
    // llama.cpp is itself up to 0.86 off the float64 logits on these top-5 ids. A wrong
    // RoPE convention costs 6.4 (reference.json, checks.rope).
    assert!(vs_f64 < 1.0, "{vs_f64}");
    assert!(vs_cpp < 1.5, "{vs_cpp}");
}

#[test]
fn quantized_ffn_top1_matches_float64_and_llamacpp_but_near_ties() {
    oracles(FfnKind::Quantized, true);
}

#[test]
fn f32_ffn_top1_matches_float64_and_llamacpp_but_near_ties() {
    oracles(FfnKind::F32, true);
}

#[test]
fn bf16_ffn_top1_matches_float64_and_llamacpp_but_near_ties() {
    oracles(FfnKind::Bf16, true);
}

/// candle-transformers' quantized Llama, one token per call (its `forward` returns only the
/// last position's logits): `[tokens, vocab]`.
fn candle_transformers_logits(ids: &[u32]) -> Tensor {
    use candle_transformers::models::quantized_llama::ModelWeights;
    static CT: OnceLock<std::sync::Mutex<ModelWeights>> = OnceLock::new();
    let ct = CT.get_or_init(|| {
        let (content, mut reader) = candle_gguf();
        let weights = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
        std::sync::Mutex::new(weights)
    });
    let mut ct = ct.lock().unwrap();
    let rows: Vec<Tensor> = ids
        .iter()
        .enumerate()
        .map(|(pos, &id)| {
            let input = Tensor::new(&[[id]], &Device::Cpu).unwrap();
            ct.forward(&input, pos).unwrap() // index_pos 0 resets its KV cache
        })
        .collect();
    Tensor::cat(&rows, 0).unwrap()
}

/// candle-transformers' own quantized MLP (`quantized_llama`'s): three `QMatMul`, `silu`, `mul`.
/// In our decoder's FFN slot, it makes the whole model candle-transformers' to the bit, which
/// checks everything but the FFN exactly.
struct CandleTransformersMlp {
    w1: QMatMul,
    w2: QMatMul,
    w3: QMatMul,
}

impl Module for CandleTransformersMlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let w1 = self.w1.forward(xs)?;
        let w3 = self.w3.forward(xs)?;
        self.w2.forward(&(candle_nn::ops::silu(&w1)? * w3)?)
    }
}

fn candle_transformers_mlp_model() -> &'static Model<CandleTransformersMlp> {
    static M: OnceLock<Model<CandleTransformersMlp>> = OnceLock::new();
    M.get_or_init(|| {
        let (content, mut reader) = candle_gguf();
        Model::load_with(gguf(), &Device::Cpu, |layer| {
            let mut q = |name: &str| -> anyhow::Result<QMatMul> {
                let t = content.tensor(
                    &mut reader,
                    &format!("blk.{layer}.{name}.weight"),
                    &Device::Cpu,
                )?;
                Ok(QMatMul::from_qtensor(t)?)
            };
            Ok(CandleTransformersMlp {
                w1: q("ffn_gate")?,
                w2: q("ffn_down")?,
                w3: q("ffn_up")?,
            })
        })
        .unwrap()
        .with_decoder(Decoder::Candle)
    })
}

#[test]
fn decoder_is_bit_identical_to_candle_transformers() {
    let model = candle_transformers_mlp_model();
    for p in &reference().prompts {
        let theirs = candle_transformers_logits(&p.ids);
        let steps = stepwise(model, &p.ids);
        // Both run the same candle ops on the same numbers (RoPE tables in f32 as theirs): a
        // difference in one bit would show, since it re-rolls every Q8_1 rounding downstream
        // (an f64 RoPE table moved the logits by up to 0.92).
        assert_close(&steps, &theirs, Tol::Abs(0.0), format!("{:?}", p.text));
    }
}

#[test]
fn glu_ffn_and_decoder_top1_match_candle_transformers() {
    // candle-transformers' QMatMul rounds the activations of every product to 8 bits (Q8_1).
    // Our FFN rounds them its own way up to 20 tokens (8 bits per 32 values, its own rounding)
    // and decodes Q4_1 exactly past that; with the crate's decoder, so do attention's
    // projections and the head, and decode attention sums in another order. Same top-1 at
    // every position but near-ties, both ways; logits within (measured 1.52 with candle's
    // decoder, 2.05 with the crate's).
    kernels_take_the_ffns("our Q4_1 kernels against candle-transformers' QMatMul");
    for (decoder, bound) in [(Decoder::Candle, 2.0), (Decoder::Crate, 2.5)] {
        let model = model(FfnKind::Quantized).clone().with_decoder(decoder);
        let mut worst: f64 = 0.;
        for (k, p) in reference().prompts.iter().enumerate() {
            let theirs = candle_transformers_logits(&p.ids);
            for (name, ours) in [
                ("token by token", stepwise(&model, &p.ids)),
                ("in one pass", prefill(&model, &p.ids)),
            ] {
                let what = format!("{decoder} decoder, prompt {k} ({name}) vs candle-transformers");
                worst = worst.max(assert_close(&ours, &theirs, Tol::Abs(bound), &what));
                for pos in 0..p.ids.len() {
                    let (a, b) = (row(&ours, pos), row(&theirs, pos));
                    let (ta, tb) = (smollm2::sampler::argmax(&a), smollm2::sampler::argmax(&b));
                    if ta != tb {
                        let (ma, mb) = (
                            a[ta as usize] - a[tb as usize],
                            b[tb as usize] - b[ta as usize],
                        );
                        eprintln!(
                            "{what}, position {pos}: ours {ta} by {ma:.3}, theirs {tb} by {mb:.3}"
                        );
                        assert!(ma < NEAR_TIE && mb < NEAR_TIE, "{what}, position {pos}");
                    }
                }
            }
        }
        eprintln!("{decoder} decoder: max |logit diff| vs candle-transformers' quantized_llama: {worst:.3}");
    }
}

/// Every weight dequantized and every op in f32: nothing quantizes the activations.
fn dense_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let model = Model::load(gguf(), FfnKind::F32, &Device::Cpu).unwrap();
        model.dequantized().unwrap()
    })
}

#[test]
fn dense_f32_model_matches_float64_closely() {
    // With nothing quantizing activations, the decoder (RoPE, GQA, mask, norms, tied head)
    // must reproduce the float64 forward pass to f32 accuracy, not to Q8 noise.
    let model = dense_model();
    let mut worst: f64 = 0.;
    let mut worst_full: f64 = 0.;
    for (k, p) in reference().prompts.iter().enumerate() {
        let logits = prefill(model, &p.ids);
        for want in &p.positions {
            let ours = row(&logits, want.pos);
            assert_eq!(smollm2::sampler::argmax(&ours), want.argmax, "prompt {k}");
            for (&id, &logit) in want.top5_ids.iter().zip(&want.top5_logits) {
                // A NaN is an infinite difference (`max` would pass over it).
                let d = (f64::from(ours[id as usize]) - logit).abs();
                worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
            }
        }
        let last = logits.i(p.ids.len() - 1).unwrap();
        // Strictly below 1e-3, as the top-5 ids below.
        let what = format!("prompt {k}, last position's logits vs float64");
        let full = assert_close(
            &last,
            &full_reference(k),
            Tol::Abs(1e-3f64.next_down()),
            what,
        );
        worst_full = worst_full.max(full);
    }
    eprintln!(
        "dense f32 model vs float64: max |logit diff| {worst:e} over the top-5 ids, \
         {worst_full:e} over the whole vocabulary at the last position"
    );
    assert!(worst < 1e-3, "{worst}");
}

#[test]
fn kv_cache_gives_the_logits_of_one_pass() {
    // A prompt and its continuation (21 tokens) in three chunks through the cache, against
    // the whole sequence in one pass, in the dense f32 model (with quantized activations the
    // two differ by ~0.4: the matmuls see other shapes, and a last-bit difference re-rolls
    // the Q8 roundings downstream).
    let model = dense_model();
    let p = &reference().prompts[3];
    let ids: Vec<u32> = p.ids.iter().chain(&p.greedy.ids).copied().collect();
    let whole = prefill(model, &ids);
    let mut cache = model.new_cache();
    let mut parts = Vec::new();
    for chunk in [&ids[..4], &ids[4..5], &ids[5..]] {
        let input = Tensor::new(chunk, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        parts.push(
            model
                .forward(&input, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap(),
        );
        assert_eq!(
            cache.len(),
            parts.iter().map(|t| t.dim(0).unwrap()).sum::<usize>()
        );
    }
    let chunked = Tensor::cat(&parts, 0).unwrap();
    let what = "KV cache, 4 + 1 + 16 tokens vs 21 in one pass";
    let d = assert_close(&chunked, &whole, Tol::Abs(1e-3f64.next_down()), what);
    eprintln!("{what}: max |logit diff| {d:e}");
}

#[test]
fn kv_cache_grows_past_its_first_chunk() {
    // The cache's buffers hold 512 positions, then grow by 512 (a copy): 510 tokens in one
    // pass, then 6 one at a time across the boundary, against all 516 in one pass.
    let model = dense_model();
    let ids: Vec<u32> = reference()
        .prompts
        .iter()
        .flat_map(|p| p.ids.iter().copied())
        .cycle()
        .take(516)
        .collect();
    let whole = prefill(model, &ids);
    let mut cache = model.new_cache();
    let input = Tensor::new(&ids[..510], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward(&input, &mut cache).unwrap();
    for (i, &id) in ids.iter().enumerate().skip(510) {
        let logits = model
            .forward_last(&Tensor::new(&[[id]], &Device::Cpu).unwrap(), &mut cache)
            .unwrap();
        let what = format!("position {i}, one token at a time vs one pass");
        assert_close(
            &logits.squeeze(0).unwrap(),
            &whole.i(i).unwrap(),
            Tol::Abs(1e-3),
            what,
        );
    }
    assert_eq!(cache.len(), 516);
}

// ---------------------------------------------------------------------------------------------
// Quantized FFN against dequantized FFNs

/// Greedy tokens compared.
const GREEDY_STEPS: usize = 12;

/// Greedy decoding through the KV cache: each step's logits, `[vocab]`.
fn greedy_logits(model: &Model, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut out: Vec<Vec<f32>> = Vec::with_capacity(steps);
    let mut input = prompt.to_vec();
    while out.len() < steps {
        let ids = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward_last(&ids, &mut cache).unwrap();
        let logits = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        input = vec![smollm2::sampler::argmax(&logits)];
        out.push(logits);
    }
    out
}

fn tokens(steps: &[Vec<f32>]) -> Vec<u32> {
    steps.iter().map(|l| smollm2::sampler::argmax(l)).collect()
}

/// The lead of the top logit over the runner-up.
fn margin(logits: &[f32]) -> f32 {
    let top = smollm2::sampler::argmax(logits) as usize;
    let second = logits
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != top)
        .map(|(_, &l)| l)
        .fold(f32::NEG_INFINITY, f32::max);
    logits[top] - second
}

#[test]
fn quantized_and_dequantized_ffns_part_only_at_near_ties() {
    let tok = tokenizer();
    let text = |steps: &[Vec<f32>]| tok.decode(&tokens(steps)).unwrap();
    let kernels = kernels_take_the_ffns("the Q4_1 kernel's logits equal the f32 FFN's bit for bit");
    for (k, p) in reference().prompts.iter().enumerate() {
        eprintln!("prompt {k}: float64   {:?}", p.greedy.text);
        // Without quantized activations, the float64 greedy path exactly.
        let dense = greedy_logits(dense_model(), &p.ids, GREEDY_STEPS);
        let smallest = dense
            .iter()
            .map(|l| margin(l))
            .fold(f32::INFINITY, f32::min);
        eprintln!(
            "prompt {k}: dense f32 {:?} (smallest lead {smallest:.3})",
            text(&dense)
        );
        assert_eq!(
            tokens(&dense),
            p.greedy.ids,
            "prompt {k}: dense f32 vs float64"
        );

        let gq = greedy_logits(model(FfnKind::Quantized), &p.ids, GREEDY_STEPS);
        let q_ids = tokens(&gq);
        eprintln!("prompt {k}: quantized {:?}", text(&gq));
        for kind in [FfnKind::F32, FfnKind::Bf16] {
            let gd = greedy_logits(model(kind), &p.ids, GREEDY_STEPS);
            let d_ids = tokens(&gd);
            eprintln!("prompt {k}: {kind:<9} {:?}", text(&gd));
            if kind == FfnKind::F32 && kernels {
                // The exact Q4_1 kernel decodes d·q + m exactly, as the f32 dequantization does,
                // and keeps the activations in f32: the same numbers, so the same text.
                let exact = greedy_logits(exact_q4_1_model(), &p.ids, GREEDY_STEPS);
                assert_eq!(exact, gd, "prompt {k}: exact Q4_1 vs f32 FFN logits");
            }
            let Some(s) = q_ids.iter().zip(&d_ids).position(|(a, b)| a != b) else {
                continue;
            };
            // Up to step s both saw the same tokens, so these logits answer the same question:
            // each model's pick must lead the other's by less than NEAR_TIE.
            let (q, d) = (q_ids[s] as usize, d_ids[s] as usize);
            let q_lead = gq[s][q] - gq[s][d];
            let d_lead = gd[s][d] - gd[s][q];
            eprintln!(
                "prompt {k}: quantized and {kind} part at step {s}: quantized takes {q} by \
                 {q_lead:.3} over {d}, {kind} takes {d} by {d_lead:.3} over {q}; float64 took {}",
                p.greedy.ids[s]
            );
            assert!(
                q_lead < NEAR_TIE && d_lead < NEAR_TIE,
                "prompt {k} step {s}: leads {q_lead} and {d_lead} are no near-tie"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Any Module in the block

/// A `GluFeedForward` that counts its calls: any `Module` can be a layer's FFN.
struct Counted(GluFeedForward, std::sync::atomic::AtomicUsize);

impl Module for Counted {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.forward(xs)
    }
}

#[test]
fn any_module_can_be_the_ffn() {
    let gguf = gguf();
    let ckpt = Checkpoint::open(&gguf).unwrap();
    let cfg = ckpt.config().unwrap().clone();
    let opts = LoadOptions::new(DType::F32, Device::Cpu).with_quantized(false);
    let model: Model<Counted> = Model::load_with(&gguf, &Device::Cpu, |layer| {
        Ok(Counted(ckpt.load_layer(&cfg, layer, &opts)?, 0.into()))
    })
    .unwrap();
    let ids = &reference().prompts[0].ids;
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = model.new_cache();
    let logits = model.forward_last(&input, &mut cache).unwrap();
    assert_eq!(logits.dims(), [1, 49152]);
    for layer in model.layers() {
        assert_eq!(layer.mlp().1.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
    // The same numbers as `Model::load` with the f32 FFN, through the same path (the head's
    // kernel for one token sums in another order than for a prompt's).
    let f32_model = crate::model(FfnKind::F32);
    let want = f32_model
        .forward_last(&input, &mut f32_model.new_cache())
        .unwrap();
    let (ours, want) = (logits.squeeze(0).unwrap(), want.squeeze(0).unwrap());
    assert_close(
        &ours,
        &want,
        Tol::Abs(0.0),
        "Counted against Model::load's f32 FFN",
    );
}

// ---------------------------------------------------------------------------------------------
// The generate example, run as a process

/// The `generate` example as a process, with `args`.
fn generate_cmd(args: &[&str]) -> Command {
    let mut cmd = common::example_command("generate");
    cmd.args(args);
    cmd
}

fn generate(args: &[&str]) -> Output {
    generate_cmd(args).output().unwrap()
}

/// `generate` on the GGUF with `args`, which must succeed: (stdout, stderr).
fn generate_ok(args: &[&str]) -> (String, String) {
    let gguf = gguf();
    let out = generate(&[args, &["--weights", gguf.to_str().unwrap()]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

#[test]
fn generate_greedy_paris() {
    let (stdout, stderr) =
        generate_ok(&["--prompt", "The capital of France is", "--max-tokens", "5"]);
    assert!(
        stdout.starts_with("The capital of France is Paris"),
        "{stdout:?}"
    );
    // The float64 reference's first five tokens: " Paris.\n\nThe".
    assert_eq!(stdout, "The capital of France is Paris.\n\nThe\n");
    assert!(stderr.contains("prompt      5 tokens in "), "{stderr}");
    assert!(
        stderr.contains("generated   5 tokens; 4 decode steps in "),
        "{stderr}"
    );
    assert_eq!(stderr.matches("tokens/s)").count(), 2, "{stderr}");
}

#[test]
fn generate_sampling_is_seeded() {
    let run = |seed: &str| {
        let sampled = [
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--ffn",
            "f32",
        ];
        let prompt = ["--prompt", "Once upon a time", "--max-tokens", "6"];
        generate_ok(&[&prompt[..], &sampled].concat()).0
    };
    let a = run("7");
    assert!(a.starts_with("Once upon a time"), "{a:?}");
    assert_eq!(a, run("7"));
    // The seed and the temperature do something: other seeds give other text, and not all of
    // it greedy's (six tokens at temperature 1: all four alike would be a ~1e-6 chance).
    let texts: std::collections::HashSet<String> = ["1", "2", "3", "4"].map(run).into();
    assert!(texts.len() >= 2, "four seeds, one text: {texts:?}");
    let greedy = |extra: &[&str]| {
        let args = [
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "6",
            "--ffn",
            "f32",
        ];
        generate_ok(&[&args[..], extra].concat()).0
    };
    let g = greedy(&[]);
    assert!(
        texts.iter().any(|t| *t != g),
        "sampled as greedy: {texts:?}"
    );
    // A temperature too small to scale the logits by (they would overflow to inf) is greedy,
    // as candle's LogitsProcessor takes it, not an error from the sampler's weights.
    assert_eq!(greedy(&["--temperature", "1e-38"]), g);
}

/// candle's repeat penalty, as candle's examples apply it: greedy text changes with it, and
/// sampling with top-k and the penalty is seeded.
#[test]
fn generate_repeat_penalty_and_top_k() {
    let run = |extra: &[&str]| {
        let prompt = ["--prompt", "Once upon a time", "--max-tokens", "40"];
        generate_ok(&[&prompt[..], extra].concat()).0
    };
    let plain = run(&[]);
    let penalised = run(&["--repeat-penalty", "1.3"]);
    assert_ne!(plain, penalised);
    // A penalty of 1 is off.
    assert_eq!(plain, run(&["--repeat-penalty", "1"]));
    let sampled = [
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--repeat-penalty",
        "1.3",
    ];
    assert_eq!(run(&sampled), run(&sampled));
    // Top-k does something: sampling among the single most likely token is greedy decoding.
    let top1 = ["--temperature", "1", "--top-k", "1", "--seed", "3"];
    assert_eq!(run(&top1), plain);
    let wide = ["--temperature", "1", "--top-k", "50", "--seed", "3"];
    assert_ne!(run(&wide), plain);
}

#[test]
fn generate_flags_ignore_case_and_say_what_does_nothing() {
    let (stdout, stderr) = generate_ok(&[
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "2",
        "--ffn",
        "F32",
        "--top-p",
        "0.5",
    ]);
    assert!(stderr.contains("FFN f32"), "{stderr}");
    assert!(
        stderr.starts_with(
            "warning: --top-p does nothing without a --temperature of at least 1e-7 (decoding is greedy)\n"
        ),
        "{stderr}"
    );
    // Greedy, as without --top-p.
    assert_eq!(stdout, "The capital of France is Paris.\n");
    // A seed while greedy, a window without a penalty.
    let (_, stderr) = generate_ok(&[
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "1",
        "--seed",
        "7",
        "--repeat-last-n",
        "10",
    ]);
    assert_eq!(
        stderr.lines().take(2).collect::<Vec<_>>(),
        [
            "warning: --seed does nothing without a --temperature of at least 1e-7 (decoding is greedy)",
            "warning: --repeat-last-n does nothing without a --repeat-penalty other than 1",
        ],
        "{stderr}"
    );
    // A penalty over a window of no tokens.
    let (_, stderr) = generate_ok(&[
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "1",
        "--repeat-penalty",
        "1.2",
        "--repeat-last-n",
        "0",
    ]);
    assert_eq!(
        stderr.lines().next(),
        Some("warning: --repeat-penalty does nothing with --repeat-last-n 0"),
        "{stderr}"
    );
}

#[test]
fn generate_profiles_either_decoder() {
    for decoder in ["crate", "CANDLE"] {
        let (stdout, stderr) = generate_ok(&[
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "3",
            "--decoder",
            decoder,
            "--profile",
            "--ignore-eos",
        ]);
        assert!(
            stdout.starts_with("The capital of France is Paris."),
            "{stdout}"
        );
        assert!(
            stderr.contains("generated   3 tokens; 2 decode steps"),
            "{stderr}"
        );
        for part in [
            "FFN",
            "attention projections",
            "attention core",
            "output head",
            "the rest",
        ] {
            // Once for the prompt, once for the decode steps.
            let rows = stderr
                .lines()
                .filter(|l| l.starts_with(&format!("  {part} ")));
            assert_eq!(rows.count(), 2, "{part}: {stderr}");
        }
        assert!(
            stderr.contains("profile     decode (2 steps, per step):"),
            "{stderr}"
        );
    }
}

#[test]
fn generate_errors_are_one_line() {
    let fails = |args: &[&str], want: &str| {
        let out = generate(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line:\n{err}"
        );
        assert!(err.starts_with("error:"), "{err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        // 2 for what clap rejects, 1 otherwise; a panic would be 101.
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{args:?}: {:?}",
            out.status
        );
    };
    let missing = "/nonexistent/SmolLM2.gguf";
    let base = ["--prompt", "Hi", "--max-tokens", "2", "--weights"];
    fails(
        &[&base[..], &[missing]].concat(),
        "--weights /nonexistent/SmolLM2.gguf: no such file",
    );
    let dir = env!("CARGO_MANIFEST_DIR");
    fails(
        &[&base[..], &[dir]].concat(),
        "a directory; pass the .gguf file",
    );
    // A hostile GGUF, read by the crate's checked reader: candle's own divides by its
    // `general.alignment` of 0, a panic.
    let tmp = tempfile::tempdir().unwrap();
    let hostile = tmp.path().join("alignment0.gguf");
    {
        use candle_core::quantized::gguf_file::{self, Value};
        let t = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        let t =
            candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32)
                .unwrap();
        let (arch, align) = (Value::String("llama".into()), Value::U32(0));
        let meta = [
            ("general.architecture", &arch),
            ("general.alignment", &align),
        ];
        let mut f = File::create(&hostile).unwrap();
        gguf_file::write(&mut f, &meta, &[("token_embd.weight", &t)]).unwrap();
    }
    fails(
        &[&base[..], &[hostile.to_str().unwrap()]].concat(),
        "`general.alignment` is 0, expected a power of two",
    );
    let gguf = gguf();
    let gguf = gguf.to_str().unwrap();
    fails(&[&base[..], &[gguf, "--ffn", "f16"]].concat(), "f16");
    fails(
        &[&base[..], &[gguf, "--decoder", "gpu"]].concat(),
        "unknown decoder `gpu`: expected crate or candle",
    );
    // clap's errors, one line that keeps what clap knew; negative numbers reach the checks.
    fails(&["--weights", gguf], "error: missing --prompt <TEXT>");
    fails(
        &["--promt", "Hi"],
        "error: unknown flag --promt (did you mean --prompt?)",
    );
    fails(&["--prompt"], "error: --prompt <TEXT> needs a value");
    for temperature in [&["--temperature=-1"][..], &["--temperature", "-1"]] {
        fails(
            &[&base[..], &[gguf], temperature].concat(),
            "invalid value '-1' for --temperature <TEMPERATURE>: must be a finite number of at \
             least 0",
        );
    }
    fails(
        &["--prompt", "Hi", "--max-tokens", "0"],
        "invalid value '0' for --max-tokens <N>: must be at least 1",
    );
    fails(
        &["--prompt", "Hi", "--top-k", "0"],
        "invalid value '0' for --top-k <K>: must be at least 1",
    );
    // 1e-300 is 0 as the f32 that the penalty divides by.
    for penalty in ["0", "1e-300"] {
        fails(
            &[&base[..], &[gguf, "--repeat-penalty", penalty]].concat(),
            "--repeat-penalty must be above 0 (1 is off)",
        );
    }
    // A bad --top-p is an error even where it would do nothing (and no warning comes first).
    fails(
        &[&base[..], &[gguf, "--top-p", "5"]].concat(),
        "--top-p must be in (0, 1], found 5",
    );
    fails(
        &[&base[..], &[gguf, "--temperature", "1", "--top-p", "0"]].concat(),
        "--top-p",
    );
    fails(&["--prompt", "", "--weights", gguf], "the prompt is empty");
    // A --max-tokens past the context, however large (the check used to overflow).
    for max in ["8193", "18446744073709551615"] {
        fails(
            &["--prompt", "Hi", "--weights", gguf, "--max-tokens", max],
            &format!(
                "1 prompt tokens + --max-tokens {max} exceed the context length 8192: pass \
                 --max-tokens 8192 or less"
            ),
        );
    }
    // No --weights, and nothing where scripts/fetch_smollm2.sh would have put it.
    let empty = tempfile::tempdir().unwrap();
    let out = generate_cmd(&["--prompt", "Hi"])
        .env("CANDLE_GLU_CACHE", empty.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let want = empty.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(err.contains(&*want.to_string_lossy()), "{err}");
    assert!(err.contains("run scripts/fetch_smollm2.sh"), "{err}");
    // A file that is not a GGUF.
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    fails(&[&base[..], &[readme]].concat(), "README.md");
}

// ---------------------------------------------------------------------------------------------
// Chat: the GGUF's template, rendered as transformers renders it

#[derive(Deserialize)]
struct ChatFixture {
    template: String,
    cases: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct ChatCase {
    system: Option<String>,
    user: String,
    rendered: String,
}

/// The chat template minijinja renders gives jinja2's text, in transformers' environment
/// (`scripts/make_chat_reference.py`), byte for byte.
#[test]
fn chat_template_renders_as_jinja2_does() {
    let path = common::fixtures().join("smollm2/chat.json");
    let fixture: ChatFixture =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (content, _) = candle_gguf();
    let tokenizer = Tokenizer::from_gguf(&content).unwrap();
    let template = smollm2::chat::ChatTemplate::from_gguf(&content, &tokenizer).unwrap();
    let source = content.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap();
    assert_eq!(source, &fixture.template);
    for case in &fixture.cases {
        let ours = template.render(case.system.as_deref(), &case.user).unwrap();
        assert_eq!(ours, case.rendered, "{:?}", case.user);
    }
    // The special tokens of the rendered text are single tokens: <|im_start|> and <|im_end|>.
    let ids = tokenizer.encode(&fixture.cases[0].rendered).unwrap();
    let id = |t: &str| tokenizer.inner().token_to_id(t).unwrap();
    assert_eq!(ids[0], id("<|im_start|>"));
    assert_eq!(ids.iter().filter(|&&i| i == id("<|im_end|>")).count(), 2);
    // A template that raises says so on one line.
    let raising = smollm2::chat::ChatTemplate::new(
        "{{ raise_exception('only user and assistant roles') }}",
        "",
        "",
    );
    let err = raising.render(None, "hi").unwrap_err().to_string();
    assert!(err.contains("only user and assistant roles"), "{err}");
}

#[test]
fn generate_chat_answers_and_a_bare_question_gets_a_hint() {
    // With its chat template the Instruct model answers; only the answer is printed.
    let (stdout, _) = generate_ok(&[
        "--chat",
        "--system",
        "You answer in one word.",
        "--prompt",
        "What is the capital of Germany?",
        "--max-tokens",
        "10",
    ]);
    assert!(stdout.contains("Berlin"), "{stdout:?}");
    assert!(!stdout.contains("capital of Germany?"), "{stdout:?}");
    // Without it, the model ends the text at once: say why, and what to do.
    let (_, stderr) = generate_ok(&[
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "10",
    ]);
    assert!(stderr.contains("generated   0 tokens"), "{stderr}");
    assert!(stderr.contains("try --chat"), "{stderr}");
    // --system alone does nothing, and says so.
    let (_, stderr) = generate_ok(&["--prompt", "Hi", "--max-tokens", "1", "--system", "x"]);
    assert!(
        stderr.starts_with("warning: --system does nothing without --chat\n"),
        "{stderr}"
    );
}
