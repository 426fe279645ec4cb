//! Runs one `GluFeedForward` from a checkpoint on an input and reports what came out.
//!
//! ```text
//! cargo run --release --example infer                      # the embedded SmolLM2 FFN, layer 0
//! cargo run --release --example infer -- --layer 15 --dtype bf16 --tokens 128 --bench 20
//! cargo run --release --example infer -- --weights model.gguf --layer 3 --json
//! cargo run --release --example infer -- --weights ./t5-dir \
//!     --prefix encoder.block.0.layer.1.DenseReluDense --input x.safetensors --output y.safetensors
//! ```
//!
//! Every bad flag, file or input prints one line starting with `error:` and exits non-zero.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_glu::device::{device_name, DeviceChoice};
use candle_glu::loading::{Checkpoint, FileFormat, LoadOptions};
use candle_glu::{Activation, GluConfig, GluExperts, GluFeedForward, WeightLayout};
use clap::Parser;

#[path = "common/cli.rs"]
mod cli;
#[path = "common/output.rs"]
mod output;
#[path = "common/rng.rs"]
mod rng;

/// The weights shipped in the repository: two SmolLM2-135M-Instruct FFN layers.
const EMBEDDED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/weights");

/// The most `--bench` runs: more is a typo, and its timings would not fit in memory.
const MAX_BENCH_RUNS: usize = 1_000_000;

/// The most values the random input may have, 2^31 (8 GiB of f32).
const MAX_RANDOM_VALUES: usize = 1 << 31;

/// `--tokens`' default (another value counts as given, for the warnings).
const DEFAULT_TOKENS: usize = 8;

#[derive(Parser, Debug)]
#[command(
    name = "infer",
    about = "Run one gated feed-forward block (GluFeedForward), or a mixture-of-experts layer (GluExperts), from a checkpoint",
    after_help = "With no arguments, runs the embedded SmolLM2-135M FFN (layer 0) on a seeded random input.",
    allow_negative_numbers = true
)]
struct Args {
    /// Safetensors file, checkpoint directory, model.safetensors.index.json, .gguf file, or
    /// Hugging Face Hub repo id. Default: the embedded weights/ model.
    #[arg(long, value_name = "PATH or REPO_ID")]
    weights: Option<String>,
    /// Hub revision: branch, tag or commit [default: main].
    #[arg(long)]
    revision: Option<String>,
    /// Resolve Hub repos from the local cache only (also when HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Which layer's FFN.
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = cli::at_least(0))]
    layer: usize,
    /// Explicit tensor-name prefix, e.g. `model.layers.3.mlp`. Overrides --layer.
    #[arg(long)]
    prefix: Option<String>,
    /// Weight layout: auto, llama, phi3, t5, mixtral or gguf.
    #[arg(long, default_value = "auto", value_parser = parse_layout)]
    layout: LayoutArg,
    /// Gate activation, a Hugging Face name. Default: from config.json, else silu.
    #[arg(long, value_parser = parse_activation)]
    activation: Option<Activation>,
    /// Device: cpu, cuda (or gpu), metal or auto.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceChoice,
    /// Compute dtype: f32, f16 or bf16 [default: f32]. A block-quantized GGUF computes in f32.
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// GGUF only: dequantize the weights to --dtype instead of keeping them quantized.
    #[arg(long)]
    dequantize: bool,
    /// Safetensors file holding a tensor `x` of shape [..., hidden], in f32, f16, bf16 or f64.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Tokens per sequence of the random input (when there is no --input).
    #[arg(long, default_value_t = DEFAULT_TOKENS, value_name = "N", value_parser = cli::at_least(1))]
    tokens: usize,
    /// Sequences in the random input.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = cli::at_least(1))]
    batch: usize,
    /// Seed of the random input.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write `y` as f32 safetensors, with the same leading shape as `x`.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Time N runs after a warm-up: median latency, tokens/s, GFLOP/s.
    #[arg(long, value_name = "N", value_parser = cli::at_least(1))]
    bench: Option<usize>,
    /// Print one JSON object on stdout instead of the human summary.
    #[arg(long)]
    json: bool,
}

/// `--layout`: a layout, or `None` for auto-detection.
#[derive(Debug, Clone, Copy)]
struct LayoutArg(Option<WeightLayout>);

fn parse_layout(s: &str) -> std::result::Result<LayoutArg, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("auto") {
        return Ok(LayoutArg(None));
    }
    s.parse()
        .map(|l| LayoutArg(Some(l)))
        .map_err(|e: candle_glu::ParseError| format!("{e}, or auto"))
}

// The crate's `FromStr` impls ignore ASCII case, as `--dtype` and `generate --ffn` do.
fn parse_activation(s: &str) -> std::result::Result<Activation, String> {
    s.parse().map_err(|e: candle_glu::ParseError| e.to_string())
}

fn parse_device(s: &str) -> std::result::Result<DeviceChoice, String> {
    s.parse().map_err(|e: candle_glu::ParseError| e.to_string())
}

fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.to_ascii_lowercase().parse() {
        Ok(dtype @ (DType::F32 | DType::F16 | DType::BF16)) => Ok(dtype),
        _ => Err(format!("unknown dtype `{s}`, expected f32, f16 or bf16")),
    }
}

fn main() {
    let args: Args = cli::parse();
    if args.output.is_some() {
        output::install_interrupt_handler();
    }
    if let Err(e) = run(&args) {
        // candle appends a backtrace to some messages when RUST_BACKTRACE is set: one line only.
        let text = format!("{e:#}");
        eprintln!("error: {}", text.lines().next().unwrap_or(""));
        std::process::exit(1);
    }
}

/// What the run did, for the summary and `--json`.
struct Report {
    model: String,
    format: &'static str,
    prefix: String,
    cfg: GluConfig,
    quantized: bool,
    path: candle_glu::ForwardPath,
    micro_kernel: Option<candle_glu::MicroKernel>,
    device: String,
    dtype: DType,
    input_shape: Vec<usize>,
    output_shape: Vec<usize>,
    stats: Stats,
    first_ms: f64,
    bench: Option<Bench>,
    output: Option<PathBuf>,
    /// The mixture-of-experts layer's routing, where the layer is one.
    moe: Option<MoeReport>,
    /// For a dense layer of a mixture-of-experts model, the layers with experts.
    moe_layers: Option<Vec<usize>>,
}

/// What the router did with the input.
struct MoeReport {
    num_experts: usize,
    top_k: usize,
    shared: Option<usize>,
    tokens_per_expert: Vec<usize>,
}

/// The block `infer` runs: one gated FFN, or a whole mixture-of-experts layer.
enum Block {
    Dense(GluFeedForward),
    Moe(Box<GluExperts>),
}

impl Block {
    /// Whether its weights are kept quantized (GGUF blocks): they compute in f32.
    fn quantized(&self) -> bool {
        let ffn = match self {
            Block::Dense(ffn) => ffn,
            Block::Moe(moe) => &moe.experts()[0],
        };
        [ffn.gate_proj(), ffn.up_proj(), ffn.down_proj()]
            .iter()
            .any(|p| p.is_quantized())
    }
}

impl Module for Block {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Block::Dense(ffn) => ffn.forward(xs),
            Block::Moe(moe) => moe.forward(xs),
        }
    }
}

struct Stats {
    mean: f64,
    std: f64,
    min: f64,
    max: f64,
    abs_sum: f64,
    /// Values that are NaN or ±inf (min and max skip NaN; mean and std are then not numbers).
    non_finite: usize,
}

struct Bench {
    runs: usize,
    median_ms: f64,
    tokens_per_s: f64,
    gflops: f64,
}

/// The flags' checks that need no weights, made before any loading.
fn check_flags(args: &Args) -> Result<()> {
    if let Some(n) = args.bench.filter(|&n| n > MAX_BENCH_RUNS) {
        bail!("--bench {n} is more than the {MAX_BENCH_RUNS} runs a benchmark may have");
    }
    if let Some(path) = &args.input {
        // Before the weights, which may be a download; and a FIFO would block the read.
        let meta =
            std::fs::metadata(path).with_context(|| format!("--input {}", path.display()))?;
        if !meta.is_file() {
            bail!("--input {}: not a regular file", path.display());
        }
    }
    if let Some(path) = &args.output {
        if path.file_name().is_none() {
            bail!("--output {}: not a file name", path.display());
        }
        let dir = output::output_dir(path);
        let meta =
            std::fs::metadata(dir).with_context(|| format!("--output {}", path.display()))?;
        if !meta.is_dir() {
            bail!(
                "--output {}: {} is not a directory",
                path.display(),
                dir.display()
            );
        }
        // An existing target is replaced by the rename: a file or a link, never a folder or a
        // device (`/dev/null` as root would be replaced by the output).
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            let kind = meta.file_type();
            if !(kind.is_file() || kind.is_symlink()) {
                bail!(
                    "--output {}: exists and is not a regular file, which the output would \
                     replace",
                    path.display()
                );
            }
        }
        // A local checkpoint's directory now; a Hub repo's snapshot once it is resolved.
        refuse_output_in(path, Path::new(args.weights.as_deref().unwrap_or(EMBEDDED)))?;
    }
    Ok(())
}

/// Refuses `--output` onto an existing file in the checkpoint's directory (`weights` itself, or
/// the one it is in). The output is resolved through its directory only: the rename that writes
/// it replaces a symlink (a Hub snapshot's file) rather than its target.
fn refuse_output_in(path: &Path, weights: &Path) -> Result<()> {
    let weights_dir = if weights.is_dir() {
        weights
    } else {
        output::output_dir(weights)
    };
    let out = std::fs::canonicalize(output::output_dir(path))
        .ok()
        .zip(path.file_name())
        .map(|(dir, name)| dir.join(name));
    if let (Some(out), Ok(weights_dir)) = (out, std::fs::canonicalize(weights_dir)) {
        if out.starts_with(&weights_dir) && std::fs::symlink_metadata(&out).is_ok() {
            bail!(
                "--output {}: an existing file in the checkpoint's directory {}; write y \
                 elsewhere",
                path.display(),
                weights_dir.display()
            );
        }
    }
    Ok(())
}

fn run(args: &Args) -> Result<()> {
    check_flags(args)?;
    let device = args.device.device()?;
    let (ckpt, model) = open_weights(args)?;
    let from_hub = args
        .weights
        .as_deref()
        .is_some_and(|w| !Path::new(w).exists());
    if let Some(path) = args.output.as_ref().filter(|_| from_hub) {
        // A Hub repo's snapshot directory is known only now (a local one was checked before).
        refuse_output_in(path, ckpt.path())?;
    }
    let gguf = ckpt.format() == FileFormat::Gguf;
    if args.dequantize && !gguf {
        eprintln!("warning: --dequantize does nothing: only GGUF weights are quantized");
    }
    if args.prefix.is_some() && args.layer != 0 {
        eprintln!("warning: --layer does nothing with --prefix (the prefix names the block)");
    }
    // The random input's flags, where the input is a file (counted as given where they differ
    // from their defaults).
    if args.input.is_some() {
        for (given, flag) in [
            (args.tokens != DEFAULT_TOKENS, "--tokens"),
            (args.batch != 1, "--batch"),
            (args.seed != 0, "--seed"),
        ] {
            if given {
                eprintln!("warning: {flag} does nothing with --input (it shapes the random input)");
            }
        }
    }
    let requested = args.dtype.unwrap_or(DType::F32);

    // A mixture-of-experts model (an MoE `model_type` in the config.json beside the weights)
    // runs its whole layer at `--layer`; `--prefix` still picks one expert's block.
    let moe = match &args.prefix {
        None => ckpt.moe_config()?,
        Some(_) => None,
    };
    // Its dense layers (DeepSeek's first `first_k_dense_replace`, Qwen2-MoE's
    // `mlp_only_layers`) run their FFN, in the experts' layout.
    let dense_of_moe = moe
        .as_ref()
        .filter(|m| ckpt.moe_dense_layers(m).contains(&args.layer))
        .map(|m| (m.expert.layout, ckpt.moe_layers(m)));
    let moe = if dense_of_moe.is_some() { None } else { moe };
    let layout = match (args.layout.0, &moe) {
        // A mixture's experts are in the layout of its config (or its GGUF).
        (Some(layout), Some(moe)) if layout != moe.expert.layout => bail!(
            "--layout {layout}: layer {} is a mixture of experts, whose experts are in the {} \
             layout ({})",
            args.layer,
            moe.expert.layout,
            // A GGUF's experts are stacked: no one expert has a prefix of its own.
            if gguf {
                "drop --layout"
            } else {
                "drop --layout, or pass --prefix for one expert's block"
            }
        ),
        (Some(layout), None) if args.prefix.is_none() && ckpt.layers(layout).is_empty() => {
            // Say what the tensors do look like, rather than that the layer is missing.
            match layout_with_layers(&ckpt) {
                Some(seen) => bail!(
                    "--layout {layout}: no {layout}-layout FFN is in this checkpoint; its \
                     tensors look like the {seen} layout (drop --layout, or pass --layout {seen})"
                ),
                None => bail!(
                    "--layout {layout}: no {layout}-layout FFN is in this checkpoint, nor one \
                     of any known layout ({}); pass --prefix",
                    WeightLayout::NAMES.join(", ")
                ),
            }
        }
        (Some(layout), _) => layout,
        (None, Some(moe)) => moe.expert.layout,
        (None, None) => match &dense_of_moe {
            Some((layout, _)) => *layout,
            None => detect_layout(&ckpt, args)?,
        },
    };
    if args.prefix.is_none() {
        match ckpt.num_layers() {
            Some(0) => bail!(
                "--layer {}: the model's config says it has 0 layers",
                args.layer
            ),
            Some(n) if args.layer >= n => bail!(
                "--layer {} is out of range: the model has {n} layers (0..={})",
                args.layer,
                n - 1
            ),
            _ => {}
        }
    }
    let activation = args
        .activation
        .or_else(|| ckpt.config().map(|c| c.activation))
        .unwrap_or(Activation::Silu);
    // Block-quantized GGUF weights stay so (F32, F16 and BF16 tensors load dense in --dtype).
    let opts = LoadOptions::new(requested, device.clone()).with_quantized(!args.dequantize);
    let (block, cfg, prefix) = match moe {
        Some(mut moe_cfg) => {
            moe_cfg.expert.activation = activation;
            let prefix = moe_cfg.layer_prefix(args.layer);
            let moe = ckpt.load_experts(&moe_cfg, args.layer, &opts)?;
            (Block::Moe(Box::new(moe)), moe_cfg.expert, prefix)
        }
        None => {
            let prefix = args
                .prefix
                .clone()
                .unwrap_or_else(|| layout.layer_prefix(args.layer));
            let cfg = match ckpt.config() {
                // One expert's (or a shared expert's) block of a mixture: its sizes from its
                // tensors, as the config's `intermediate_size` is the dense layers' in Qwen's
                // and DeepSeek's configs (`moe_intermediate_size` the experts').
                // (A mixture config this crate would refuse still has blocks to load by prefix.)
                Some(_) if args.prefix.is_some() && ckpt.moe_config().ok().flatten().is_some() => {
                    ckpt.infer_config(&prefix, layout, activation)?
                }
                // A block by prefix: the config's σ and bias, its own sizes (T5Gemma's decoder
                // blocks are not its encoder's, which `config.json` describes).
                Some(cfg) if args.prefix.is_some() => {
                    let own = ckpt.infer_config(&prefix, layout, activation)?;
                    let mut cfg = cfg.clone().with_layout(layout).with_activation(activation);
                    (cfg.hidden_size, cfg.intermediate_size) =
                        (own.hidden_size, own.intermediate_size);
                    cfg
                }
                Some(cfg) => cfg.clone().with_layout(layout).with_activation(activation),
                None => ckpt.infer_config(&prefix, layout, activation)?,
            };
            let ffn = match &args.prefix {
                Some(prefix) => ckpt.load_ffn(&cfg, prefix, &opts)?,
                None => ckpt.load_layer(&cfg, args.layer, &opts)?,
            };
            (Block::Dense(ffn), cfg, prefix)
        }
    };
    // A quantized block's kernels take and give f32.
    let quantized = block.quantized();
    let dtype = if quantized { DType::F32 } else { requested };
    if quantized && requested != DType::F32 {
        eprintln!(
            "warning: --dtype {} does nothing: quantized GGUF weights compute in f32 (add \
             --dequantize to run them in {})",
            requested.as_str(),
            requested.as_str()
        );
    }

    let x = match &args.input {
        Some(path) => read_input(path, &device)?,
        None => {
            // The forward's size checked before the input is made (gigabytes of samples), at
            // its widest block (a mixture's shared expert may be wider than its experts).
            let tokens = args.batch.saturating_mul(args.tokens);
            let mut widest = cfg.clone();
            if let Block::Moe(moe) = &block {
                let shared = moe.config().shared_intermediate_size.unwrap_or(0);
                widest.intermediate_size = widest.intermediate_size.max(shared);
            }
            widest.check_tokens(&[args.batch, args.tokens, cfg.hidden_size], tokens, dtype)?;
            random_input(args, cfg.hidden_size, &device)?
        }
    };
    let x = x.to_dtype(dtype)?;
    // The path and micro-kernel: the block's, or for a mixture the busiest expert's, on its
    // tokens.
    let (ffn, routed_x, moe_report) = match &block {
        Block::Dense(ffn) => (ffn, x.clone(), None),
        Block::Moe(moe) => {
            let c = moe.config();
            let counts = moe.route(&x)?.tokens_per_expert(c.num_experts);
            // The busiest expert (the first of equals).
            let (mut busiest, mut n) = (0, 0);
            for (e, &count) in counts.iter().enumerate() {
                if count > n {
                    (busiest, n) = (e, count);
                }
            }
            let flat = x.reshape(((), cfg.hidden_size))?;
            let report = MoeReport {
                num_experts: c.num_experts,
                top_k: c.top_k,
                shared: c.shared_intermediate_size,
                tokens_per_expert: counts,
            };
            let ffn = moe
                .expert(busiest)
                .ok_or_else(|| anyhow!("expert {busiest} is not in the layer"))?;
            (
                ffn,
                flat.narrow(0, 0, n.max(1).min(flat.dim(0)?))?,
                Some(report),
            )
        }
    };
    let path = ffn.forward_path(&routed_x);
    let micro_kernel = ffn.micro_kernel(&routed_x);
    let start = Instant::now();
    let y = block.forward(&x)?;
    device.synchronize()?;
    let first_ms = start.elapsed().as_secs_f64() * 1e3;

    let bench = match args.bench {
        Some(runs) => Some(bench(&block, &cfg, moe_report.as_ref(), &x, runs, &device)?),
        None => None,
    };
    if let Some(path) = &args.output {
        write_output(path, &y)?;
    }
    let report = Report {
        model,
        format: match ckpt.format() {
            FileFormat::Gguf => "gguf",
            _ => "safetensors",
        },
        prefix,
        cfg,
        quantized,
        path,
        micro_kernel,
        device: device_name(&device),
        dtype,
        input_shape: x.dims().to_vec(),
        output_shape: y.dims().to_vec(),
        stats: stats(&y)?,
        first_ms,
        bench,
        output: args.output.clone(),
        moe: moe_report,
        moe_layers: dense_of_moe.map(|(_, layers)| layers),
    };
    // Written with errors, not `println!`'s panic: stdout may be a full disk or a closed pipe.
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", to_json(&report))?;
    } else {
        print_summary(&report, &mut out)?;
    }
    out.flush()?;
    Ok(())
}

/// A warning on stderr for the Hub flags, where the weights are not a Hub repo.
fn warn_hub_flags(args: &Args) {
    for (given, flag) in [
        (args.revision.is_some(), "--revision"),
        (args.offline, "--offline"),
    ] {
        if given {
            eprintln!("warning: {flag} does nothing: the weights are not a Hub repo id");
        }
    }
}

/// Opens `--weights`: a path if it exists, else a Hub repo id.
fn open_weights(args: &Args) -> Result<(Checkpoint, String)> {
    let Some(weights) = &args.weights else {
        if !Path::new(EMBEDDED).is_dir() {
            bail!(
                "no --weights, and the embedded weights are not at {EMBEDDED} (a binary built \
                 from the repository looks there): pass --weights <checkpoint or Hub repo id>"
            );
        }
        let ckpt = Checkpoint::open(EMBEDDED)?;
        warn_hub_flags(args);
        return Ok((ckpt, "SmolLM2-135M-Instruct FFN (embedded weights/)".into()));
    };
    let path = Path::new(weights);
    if path.exists() {
        let ckpt = Checkpoint::open(path)?;
        warn_hub_flags(args);
        return Ok((ckpt, weights.clone()));
    }
    let looks_like_path = weights.starts_with(['.', '/', '~'])
        || [".safetensors", ".gguf", ".json"]
            .iter()
            .any(|e| weights.ends_with(e))
        || weights.matches('/').count() != 1;
    if looks_like_path {
        bail!("{weights}: no such file or directory");
    }
    open_hub(weights, args)
}

#[cfg(feature = "hub")]
fn open_hub(repo: &str, args: &Args) -> Result<(Checkpoint, String)> {
    use candle_glu::loading::hub::HubOptions;
    let revision = args.revision.as_deref().unwrap_or("main");
    let mut opts = HubOptions::new()
        .with_revision(revision)
        .with_offline(args.offline);
    if !args.json {
        opts = opts.with_progress(StderrProgress::default());
    }
    let ckpt = Checkpoint::from_hub(repo, &opts)?;
    Ok((ckpt, format!("{repo}@{revision}")))
}

/// Download progress on stderr: one line redrawn in place (at most 5 times a second) on a
/// terminal, and the final size of each file.
#[cfg(feature = "hub")]
#[derive(Default)]
struct StderrProgress {
    last_draw: Mutex<Option<Instant>>,
}

#[cfg(feature = "hub")]
impl candle_glu::DownloadProgress for StderrProgress {
    fn update(&self, file: &str, done: u64, total: u64) {
        use std::io::IsTerminal;
        let mut last = self.last_draw.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|t| t.elapsed().as_millis() >= 200);
        if std::io::stderr().is_terminal() && due {
            *last = Some(Instant::now());
            let pct = (100 * done).checked_div(total).unwrap_or(0);
            eprint!(
                "\r{file}: {:.1} / {:.1} MiB ({pct}%)\x1b[K",
                mib(done),
                mib(total)
            );
        }
    }

    fn finish(&self, file: &str) {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            eprintln!("\r{file}: downloaded\x1b[K");
        } else {
            eprintln!("{file}: downloaded");
        }
    }
}

#[cfg(feature = "hub")]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(not(feature = "hub"))]
fn open_hub(repo: &str, _: &Args) -> Result<(Checkpoint, String)> {
    bail!("{repo}: no such file or directory (and this build has no Hub support: feature `hub`)")
}

/// The layout of the block at `--prefix`, or of layer `--layer` in any layout's naming.
fn detect_layout(ckpt: &Checkpoint, args: &Args) -> Result<WeightLayout> {
    if let Some(prefix) = &args.prefix {
        return ckpt.detect_layout(prefix).ok_or_else(|| {
            anyhow!(
                "no gated FFN weights under prefix `{prefix}` in any known layout ({}); \
                 check the prefix, or pass --layout",
                WeightLayout::NAMES.join(", ")
            )
        });
    }
    if ckpt.format() == FileFormat::Gguf {
        return Ok(WeightLayout::Gguf);
    }
    if let Some(layout) = ckpt.config().map(|c| c.layout) {
        if !ckpt.layers(layout).is_empty() {
            return Ok(layout);
        }
    }
    layout_with_layers(ckpt).ok_or_else(|| {
        anyhow!(
            "found no layer's FFN weights in any known layout ({}); pass --prefix",
            WeightLayout::NAMES.join(", ")
        )
    })
}

/// The first layout in which the checkpoint holds some layer's FFN.
fn layout_with_layers(ckpt: &Checkpoint) -> Option<WeightLayout> {
    WeightLayout::ALL
        .iter()
        .copied()
        .find(|l| !ckpt.layers(*l).is_empty())
}

/// The most bytes `--input`'s header may take (safetensors' own limit).
const MAX_INPUT_HEADER_BYTES: u64 = 100_000_000;

/// `x` from the safetensors file `path`, reading its header and `x`'s bytes only (the file may
/// hold other tensors, of any size and type).
fn read_input(path: &Path, device: &Device) -> Result<Tensor> {
    use std::io::{Read, Seek, SeekFrom};
    // Checked first: opening a FIFO would block.
    let meta = std::fs::metadata(path).with_context(|| format!("--input {}", path.display()))?;
    if !meta.is_file() {
        bail!("--input {}: not a regular file", path.display());
    }
    let fail = |m: String| anyhow!("{}: {m}", path.display());
    let mut file =
        std::fs::File::open(path).with_context(|| format!("--input {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| fail("not a safetensors file (too short for its header's size)".into()))?;
    let header_len = u64::from_le_bytes(len);
    let data_start = 8u64.saturating_add(header_len);
    if header_len > MAX_INPUT_HEADER_BYTES || data_start > meta.len() {
        return Err(fail(format!(
            "not a safetensors file (a header of {header_len} bytes in a file of {})",
            meta.len()
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)?;
    // safetensors' own header type: its offsets checked, contiguous and of their tensors' sizes.
    let header: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| fail(format!("not a safetensors file (its header: {e})")))?;
    let x = header
        .info("x")
        .ok_or_else(|| fail("no tensor named `x`".into()))?;
    let dtype = DType::try_from(x.dtype)
        .ok()
        .filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::F64))
        .ok_or_else(|| {
            fail(format!(
                "`x` has dtype {:?}, expected F32, F16, BF16 or F64",
                x.dtype
            ))
        })?;
    let (start, end) = x.data_offsets;
    if data_start
        .checked_add(end as u64)
        .is_none_or(|e| e > meta.len())
    {
        return Err(fail(
            "`x`'s data runs past the end of the file: truncated?".into(),
        ));
    }
    file.seek(SeekFrom::Start(data_start + start as u64))?;
    let mut data = vec![0u8; end - start];
    file.read_exact(&mut data)?;
    Ok(Tensor::from_raw_buffer(&data, dtype, &x.shape, device)?)
}

/// A reproducible standard-normal input, the same on every device (SplitMix64 + Box-Muller).
fn random_input(args: &Args, hidden: usize, device: &Device) -> Result<Tensor> {
    let n = args
        .batch
        .checked_mul(args.tokens)
        .and_then(|n| n.checked_mul(hidden))
        .filter(|&n| n <= MAX_RANDOM_VALUES)
        .ok_or_else(|| {
            anyhow!(
                "--batch {} × --tokens {} × hidden size {hidden} is more than the \
                 {MAX_RANDOM_VALUES} values a random input may have",
                args.batch,
                args.tokens
            )
        })?;
    let mut rng = rng::Rng::new(args.seed);
    let mut next = || rng.next_f64();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let (u, v) = (next().max(f64::MIN_POSITIVE), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(
        data,
        (args.batch, args.tokens, hidden),
        device,
    )?)
}

fn bench(
    block: &Block,
    cfg: &GluConfig,
    moe: Option<&MoeReport>,
    x: &Tensor,
    runs: usize,
    device: &Device,
) -> Result<Bench> {
    block.forward(x)?; // warm-up
    device.synchronize()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        block.forward(x)?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = (times[(runs - 1) / 2] + times[runs / 2]) / 2.0;
    let tokens = x.elem_count() / cfg.hidden_size;
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    // Three [H, I] matmuls per token and expert, two flops per multiply-add; for a mixture,
    // the routed tokens', the shared expert's and the router's.
    let flops = match moe {
        None => 6.0 * tokens as f64 * h * i,
        Some(m) => {
            let routed: usize = m.tokens_per_expert.iter().sum();
            let shared = m.shared.map_or(0.0, |s| 6.0 * tokens as f64 * h * s as f64);
            6.0 * routed as f64 * h * i + shared + 2.0 * tokens as f64 * h * m.num_experts as f64
        }
    };
    Ok(Bench {
        runs,
        median_ms: median * 1e3,
        tokens_per_s: tokens as f64 / median,
        gflops: flops / median / 1e9,
    })
}

/// Writes `y` as f32 through a temporary file renamed into place, so that a failure or an
/// interruption never leaves a partial output ([`output::write_atomically`]).
fn write_output(path: &Path, y: &Tensor) -> Result<()> {
    let y = y.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    // Serialized here rather than with `save_safetensors`, whose own temporary file has a random
    // name the interrupt handler could not know.
    let bytes = safetensors::serialize([("y", &y)], None)
        .with_context(|| format!("--output {}", path.display()))?;
    output::write_atomically(path, "--output", &bytes)
}

/// The output's statistics, summed in f64 over one f32 copy of it (every dtype `y` may have is
/// exact in f32; an f64 copy, and a second one as a `Vec`, came near the input limit's memory).
fn stats(y: &Tensor) -> Result<Stats> {
    let v: Vec<f32> = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    Ok(Stats {
        mean,
        std: var.sqrt(),
        min: v
            .iter()
            .map(|&x| f64::from(x))
            .fold(f64::INFINITY, f64::min),
        max: v
            .iter()
            .map(|&x| f64::from(x))
            .fold(f64::NEG_INFINITY, f64::max),
        abs_sum: v.iter().map(|&x| f64::from(x).abs()).sum(),
        non_finite: v.iter().filter(|x| !x.is_finite()).count(),
    })
}

/// What runs the block: the path of `forward`, the crate's CPU kernels if they run, and the
/// micro-kernel the input's token count takes.
fn kernels(r: &Report) -> String {
    match (r.path, candle_glu::cpu_kernels(), r.micro_kernel) {
        (candle_glu::ForwardPath::Candle, ..) | (_, None, _) => format!("{}", r.path),
        (path, Some(k), Some(micro)) => format!("{path}, {k}; ran {micro}"),
        (path, Some(k), None) => format!("{path}, {k}"),
    }
}

fn print_summary(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let c = &r.cfg;
    writeln!(out, "model       {}", r.model)?;
    writeln!(
        out,
        "block       {} ({} layout, {})",
        r.prefix, c.layout, r.format
    )?;
    writeln!(
        out,
        "config      hidden {}, intermediate {}, activation {} ({}), bias {}",
        c.hidden_size,
        c.intermediate_size,
        c.activation,
        c.activation.glu_variant(),
        c.bias
    )?;
    let weights = if r.quantized {
        " (weights quantized, GGUF blocks)"
    } else {
        ""
    };
    writeln!(
        out,
        "device      {}, {}{weights}",
        r.device,
        r.dtype.as_str()
    )?;
    if let Some(m) = &r.moe {
        let used = m.tokens_per_expert.iter().filter(|&&n| n > 0).count();
        let shared = m
            .shared
            .map_or(String::new(), |s| format!(", shared expert {s} wide"));
        writeln!(
            out,
            "experts     {} routed, top-{}{shared}; {used} used, tokens per expert {:?}",
            m.num_experts, m.top_k, m.tokens_per_expert
        )?;
    }
    if let Some(layers) = &r.moe_layers {
        writeln!(
            out,
            "experts     none: a dense layer of a mixture-of-experts model (layers with experts: \
             {layers:?})"
        )?;
    }
    let busiest = if r.moe.is_some() {
        " (the busiest expert)"
    } else {
        ""
    };
    writeln!(out, "kernels     {}{busiest}", kernels(r))?;
    writeln!(out, "input       {:?}", r.input_shape)?;
    writeln!(out, "output      {:?}", r.output_shape)?;
    let s = &r.stats;
    writeln!(
        out,
        "y stats     mean {:+.6}, std {:.6}, min {:+.6}, max {:+.6}, sum|y| {:.4}",
        s.mean, s.std, s.min, s.max, s.abs_sum
    )?;
    if s.non_finite > 0 {
        writeln!(out, "            {} values are NaN or ±inf", s.non_finite)?;
    }
    writeln!(out, "time        {:.3} ms (first call)", r.first_ms)?;
    if let Some(b) = &r.bench {
        writeln!(
            out,
            "bench       {} runs: median {:.3} ms, {:.0} tokens/s, {:.1} GFLOP/s",
            b.runs, b.median_ms, b.tokens_per_s, b.gflops
        )?;
    }
    if let Some(path) = &r.output {
        writeln!(out, "wrote       {} (y, f32)", path.display())?;
    }
    Ok(())
}

fn to_json(r: &Report) -> serde_json::Value {
    let c = &r.cfg;
    serde_json::json!({
        "model": r.model,
        "format": r.format,
        "prefix": r.prefix,
        "layout": c.layout.to_string(),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "activation": c.activation.to_string(),
        "bias": c.bias,
        "quantized": r.quantized,
        "device": r.device,
        "dtype": r.dtype.as_str(),
        "path": r.path.to_string(),
        // The crate's kernels where they run (as the summary's `kernels` line says).
        "cpu_kernels": match r.path {
            candle_glu::ForwardPath::Candle => None,
            _ => candle_glu::cpu_kernels().map(|k| k.name()),
        },
        "micro_kernel": r.micro_kernel.map(|k| k.to_string()),
        "input_shape": r.input_shape,
        "output_shape": r.output_shape,
        "stats": {
            "mean": r.stats.mean, "std": r.stats.std, "min": r.stats.min,
            "max": r.stats.max, "abs_sum": r.stats.abs_sum, "non_finite": r.stats.non_finite,
        },
        "first_ms": r.first_ms,
        "bench": r.bench.as_ref().map(|b| serde_json::json!({
            "runs": b.runs, "median_ms": b.median_ms,
            "tokens_per_s": b.tokens_per_s, "gflops": b.gflops,
        })),
        "output": r.output.as_ref().map(|p| p.display().to_string()),
        "moe": r.moe.as_ref().map(|m| serde_json::json!({
            "num_experts": m.num_experts, "top_k": m.top_k,
            "shared_intermediate_size": m.shared,
            "tokens_per_expert": m.tokens_per_expert,
        })),
        "moe_layers": r.moe_layers,
    })
}
