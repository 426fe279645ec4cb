//! Text generation with SmolLM2-135M-Instruct, every FFN a candle-glu `GluFeedForward`.
//!
//! ```text
//! cargo run --release --example generate -- --prompt "The capital of France is" --max-tokens 12
//! cargo run --release --example generate -- --prompt "Once upon a time" --max-tokens 64 \
//!     --temperature 0.8 --top-p 0.9 --repeat-penalty 1.1 --seed 7 --ffn bf16
//! ```
//!
//! Writes the prompt and then the continuation to stdout as it is generated; timings go to
//! stderr. Every bad flag or file prints one line starting with `error:` and exits non-zero.

#[path = "common/cli.rs"]
mod cli;
#[path = "smollm2/mod.rs"]
mod smollm2;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_transformers::utils::apply_repeat_penalty;
use clap::Parser;
use smollm2::profile::{self, Split};
use smollm2::sampler::Sampler;
use smollm2::tokenizer::Tokenizer;
use smollm2::{Decoder, FfnKind, LlamaConfig, Model};

/// `--seed`'s default (another value counts as given, for the warnings).
const DEFAULT_SEED: u64 = 299_792_458;
/// `--repeat-last-n`'s default (as `DEFAULT_SEED`).
const DEFAULT_REPEAT_LAST_N: usize = 64;

#[derive(Parser, Debug)]
#[command(
    name = "generate",
    about = "Generate text with SmolLM2-135M-Instruct, every FFN a candle-glu GluFeedForward",
    allow_negative_numbers = true
)]
struct Args {
    /// The text to continue.
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    /// The most tokens to generate (fewer if the model ends the text).
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = cli::at_least(1))]
    max_tokens: usize,
    /// The SmolLM2 GGUF. Default: where scripts/fetch_smollm2.sh puts it
    /// ($CANDLE_GLU_CACHE, else $XDG_CACHE_HOME/candle-glu, else ~/.cache/candle-glu).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Sample with this temperature (from the top-p 0.9 nucleus unless --top-k or --top-p say
    /// otherwise). Without it (or below 1e-7), decoding is greedy.
    #[arg(long, value_parser = cli::non_negative)]
    temperature: Option<f64>,
    /// Sample from the K most likely tokens (with --temperature).
    #[arg(long, value_name = "K", value_parser = cli::at_least(1))]
    top_k: Option<usize>,
    /// The probability mass sampled from (nucleus sampling), in (0, 1] (with --temperature).
    #[arg(long)]
    top_p: Option<f64>,
    /// Divide the logits of tokens seen in the last --repeat-last-n by this (multiply the
    /// negative ones), as candle's examples do; 1 is off.
    #[arg(long, default_value_t = 1.0, value_parser = cli::non_negative)]
    repeat_penalty: f64,
    /// How many of the last tokens (the prompt's included) --repeat-penalty looks at.
    #[arg(long, default_value_t = DEFAULT_REPEAT_LAST_N, value_name = "N", value_parser = cli::at_least(0))]
    repeat_last_n: usize,
    /// The sampler's seed.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Chat: the prompt is a user's message, put in the GGUF's own chat template (with
    /// --system), and only the assistant's answer is printed.
    #[arg(long)]
    chat: bool,
    /// The system message of --chat. Default: the template's own (SmolLM2's names itself).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// The FFN weights: quantized (Q4_1, read in place by the crate's kernels), or dequantized
    /// to f32 or bf16.
    #[arg(long, default_value = "quantized")]
    ffn: FfnKind,
    /// What runs the decoder around the FFNs (attention's projections and core, the output
    /// head): crate (candle-glu's Projection and a one-pass attention op at decode) or candle
    /// (candle's QMatMul, matmuls and softmax, as candle-transformers' quantized_llama).
    #[arg(long, default_value = "crate")]
    decoder: Decoder,
    /// Keep generating past the model's end token: always --max-tokens tokens (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print where the time went, in milliseconds per token: the FFNs, attention's
    /// projections, attention's core, the output head and the rest, for the prompt and for
    /// the decode steps.
    #[arg(long)]
    profile: bool,
}

fn main() {
    let args: Args = cli::parse();
    if let Err(e) = run(&args) {
        // candle appends a backtrace to some messages when RUST_BACKTRACE is set: one line only.
        let text = format!("{e:#}");
        eprintln!("error: {}", text.lines().next().unwrap_or(""));
        std::process::exit(1);
    }
}

fn weights_path(args: &Args) -> Result<PathBuf> {
    if let Some(path) = &args.weights {
        if path.is_dir() {
            bail!(
                "--weights {}: a directory; pass the .gguf file",
                path.display()
            );
        }
        if !path.is_file() {
            bail!("--weights {}: no such file", path.display());
        }
        return Ok(path.clone());
    }
    let path = smollm2::default_gguf_path()
        .context("no --weights, and neither CANDLE_GLU_CACHE, XDG_CACHE_HOME nor HOME is set")?;
    if !path.is_file() {
        bail!(
            "the SmolLM2 GGUF is not at {}: run scripts/fetch_smollm2.sh to download it, or pass \
             --weights <GGUF>",
            path.display()
        );
    }
    Ok(path)
}

fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn run(args: &Args) -> Result<()> {
    // Checked (as the f32 that candle's penalty divides by) before any warning.
    if args.repeat_penalty as f32 <= 0.0 {
        bail!("--repeat-penalty must be above 0 (1 is off)");
    }
    let mut sampler = Sampler::new(args.temperature, args.top_k, args.top_p, args.seed)
        .map_err(anyhow::Error::msg)?;
    // Sampling where the sampler samples (a temperature below 1e-7 is greedy).
    let sampling = matches!(sampler, Sampler::Sample { .. });
    for (given, flag) in [
        (args.top_k.is_some(), "--top-k"),
        (args.top_p.is_some(), "--top-p"),
        // Flags with defaults count as given where they differ from theirs.
        (args.seed != DEFAULT_SEED, "--seed"),
    ] {
        if given && !sampling {
            eprintln!(
                "warning: {flag} does nothing without a --temperature of at least 1e-7 (decoding is greedy)"
            );
        }
    }
    if args.repeat_last_n == 0 && args.repeat_penalty != 1.0 {
        eprintln!("warning: --repeat-penalty does nothing with --repeat-last-n 0");
    }
    if args.repeat_last_n != DEFAULT_REPEAT_LAST_N && args.repeat_penalty == 1.0 {
        eprintln!("warning: --repeat-last-n does nothing without a --repeat-penalty other than 1");
    }
    let path = weights_path(args)?;
    let device = Device::Cpu;

    let start = Instant::now();
    let gguf = smollm2::read_gguf(&path)?;
    let content = gguf.content();
    let tokenizer = Tokenizer::from_gguf(content)?;
    let cfg = LlamaConfig::from_gguf(content)?;
    if args.system.is_some() && !args.chat {
        eprintln!("warning: --system does nothing without --chat");
    }
    let text = if args.chat {
        smollm2::chat::ChatTemplate::from_gguf(content, &tokenizer)?
            .render(args.system.as_deref(), &args.prompt)?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&text)?;
    if prompt.is_empty() {
        bail!("the prompt is empty: SmolLM2 adds no BOS token, so there is nothing to continue");
    }
    // The last token written is never fed back, so the model sees at most
    // prompt + max_tokens - 1 positions (checked_add: `--max-tokens` can be any usize).
    let seen = prompt.len().checked_add(args.max_tokens - 1);
    if seen.is_none_or(|n| n > cfg.max_positions) {
        // (Generation may end sooner, at an end token; the bound is the longest it could run.)
        let room = match cfg.max_positions.checked_sub(prompt.len()) {
            Some(n) => format!("pass --max-tokens {} or less", n + 1),
            None => "the prompt alone is too long".into(),
        };
        bail!(
            "{} prompt tokens + --max-tokens {} exceed the context length {}: {room}",
            prompt.len(),
            args.max_tokens,
            cfg.max_positions
        );
    }
    let model = Model::load(&path, args.ffn, &device)?.with_decoder(args.decoder);
    eprintln!(
        "loaded      {} ({} layers, FFN {}) in {:.2} s",
        path.file_name().unwrap_or_default().to_string_lossy(),
        cfg.num_layers,
        args.ffn,
        start.elapsed().as_secs_f64()
    );

    // A continuation follows its prompt; a chat answer stands alone.
    let mut out = std::io::stdout().lock();
    if !args.chat {
        write!(out, "{}", args.prompt)?;
        out.flush()?;
    }

    let mut cache = model.new_cache();
    let mut stream = tokenizer.stream();
    profile::enable(args.profile);
    let start = Instant::now();
    let input = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
    let mut logits = model.forward_last(&input, &mut cache)?;
    let prefill = start.elapsed();
    let prefill_split = Split::take(prefill, prompt.len());

    // The first token comes from the prompt's logits; each further one costs a decode step.
    let (mut generated, mut steps) = (0, 0);
    // The decode steps' own time, for --profile (sampling and printing left out).
    let mut step_time = Duration::ZERO;
    let start = Instant::now();
    // The tokens so far, for the repeat penalty.
    let mut context = prompt.clone();
    while generated < args.max_tokens {
        let mut last = logits.squeeze(0)?;
        if args.repeat_penalty != 1.0 {
            let recent = &context[context.len().saturating_sub(args.repeat_last_n)..];
            last = apply_repeat_penalty(&last, args.repeat_penalty as f32, recent)?;
        }
        let next = sampler.sample(&last)?;
        context.push(next);
        if tokenizer.ends_generation(next) && !args.ignore_eos {
            break;
        }
        generated += 1;
        write!(out, "{}", stream.push(next))?;
        out.flush()?;
        if generated == args.max_tokens {
            break;
        }
        let input = Tensor::new(&[[next]], &device)?;
        let step = Instant::now();
        logits = model.forward_last(&input, &mut cache)?;
        step_time += step.elapsed();
        steps += 1;
    }
    let decode = start.elapsed();
    let decode_split = Split::take(step_time, steps);
    writeln!(out, "{}", stream.finish())?;
    out.flush()?;
    if generated == 0 && !args.chat {
        eprintln!(
            "note        the model ended the text at once (its end token came first): an \
             Instruct model expects its chat template; try --chat"
        );
    }

    eprintln!(
        "prompt      {} tokens in {:.1} ms ({:.1} tokens/s)",
        prompt.len(),
        prefill.as_secs_f64() * 1e3,
        per_second(prompt.len(), prefill)
    );
    eprintln!(
        "generated   {generated} tokens; {steps} decode steps in {:.1} ms ({:.1} tokens/s)",
        decode.as_secs_f64() * 1e3,
        per_second(steps, decode)
    );
    if args.profile {
        eprintln!(
            "profile     prompt ({} tokens, per token):\n{prefill_split}",
            prompt.len()
        );
        if steps > 0 {
            eprintln!("profile     decode ({steps} steps, per step):\n{decode_split}");
        }
    }
    Ok(())
}
