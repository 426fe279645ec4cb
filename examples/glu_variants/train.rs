//! One training run: a model for one variant and seed, AdamW with warm-up and cosine decay, the
//! held-out loss measured along the way and at the end.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::ProgressBar;

use crate::data::Corpus;
use crate::model::{self, ModelConfig};
use crate::rng::Rng;

/// What every run shares: the optimiser, the schedule, the token budget and the evaluation.
#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    /// The peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps; then a cosine decay from the peak that would reach a tenth of it
    /// at step `steps` (the last step, `steps - 1`, is one step short of it).
    pub warmup: usize,
    pub weight_decay: f64,
    /// Held-out loss every this many steps (and at the last).
    pub eval_every: usize,
    /// Held-out windows for the curve's points.
    pub eval_windows: usize,
    /// Held-out windows for the final loss.
    pub final_windows: usize,
}

impl TrainConfig {
    /// The learning rate at `step` (from 0).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.steps - self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = 0.1 * self.lr;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// The outcome of one run, as `--json` writes it and `--replot` reads it back.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    pub variant: String,
    pub seed: u64,
    pub parameters: usize,
    pub ffn_parameters: usize,
    pub d_ff: usize,
    /// Whether the FFNs' forward passes ran on the crate's CPU kernels (else candle's ops: a CPU
    /// without AVX-512, or another device). Absent from runs recorded before it was.
    #[serde(default)]
    pub ffn_on_crate_kernels: Option<bool>,
    /// How far training moved the FFNs' weights: ‖W_end − W_start‖ / ‖W_start‖ over all of
    /// them (weight decay alone moves them by about steps × lr × decay). Absent from runs
    /// recorded before it was.
    #[serde(default)]
    pub ffn_update: Option<f64>,
    /// Mean cross-entropy on the final held-out windows, in nats per byte.
    pub held_out_loss: f64,
    /// The same in bits per byte.
    pub bits_per_byte: f64,
    /// The mean training loss over the last tenth of the steps, in nats per byte.
    pub train_loss: f64,
    /// `(step, held-out loss)` along the run, on the curve's windows.
    pub curve: Vec<(usize, f64)>,
    /// Seconds, evaluation included.
    pub wall_s: f64,
}

/// Trains `model_cfg` from seed `seed`: the parameters and the order of the training batches
/// both follow from the seed, and are the same for every variant at that seed.
pub fn run(
    model_cfg: &ModelConfig,
    cfg: &TrainConfig,
    corpus: &Corpus,
    seed: u64,
    device: &Device,
    bar: &ProgressBar,
) -> Result<RunResult> {
    let start = Instant::now();
    // A loss that is not a number means the parameters are not either: the run is lost (and
    // JSON would write it as null, which `--replot` cannot read back).
    let finite = |loss: f64, what: &str, step: usize| {
        if loss.is_finite() {
            Ok(loss)
        } else {
            anyhow::bail!(
                "{} seed {seed}: the {what} loss is {loss} after step {step}",
                model_cfg.variant.name()
            )
        }
    };
    let (map, model) = model::build(model_cfg, seed, device)?;
    let (parameters, ffn_parameters) = model::parameter_counts(&map);
    let ffn_on_crate_kernels = model.ffn_on_crate_kernels()?;
    let ffn_start = model::ffn_weights(&map)?;
    let mut opt = AdamW::new(
        map.all_vars(),
        ParamsAdamW {
            lr: cfg.lr_at(0),
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let context = model_cfg.context;
    let curve_set = corpus.held_out_windows(cfg.eval_windows, context, device)?;
    // The batches' own stream, apart from the parameters'.
    let mut rng = Rng::new(seed ^ 0x5eed_da7a);
    let mut curve = Vec::new();
    let mut recent = Vec::new();
    for step in 0..cfg.steps {
        let (ids, targets) = corpus.train_batch(&mut rng, cfg.batch, context, device)?;
        opt.set_learning_rate(cfg.lr_at(step));
        let loss = model.loss(&ids, &targets)?;
        opt.backward_step(&loss)?;
        let loss = f64::from(loss.to_scalar::<f32>()?);
        if !loss.is_finite() {
            anyhow::bail!(
                "{} seed {seed}: the training loss is {loss} at step {step}",
                model_cfg.variant.name()
            );
        }
        if step >= cfg.steps - cfg.steps.div_ceil(10) {
            recent.push(loss);
        }
        if (step + 1) % cfg.eval_every == 0 || step + 1 == cfg.steps {
            let held_out = finite(evaluate(&model, &curve_set, cfg.batch)?, "held-out", step)?;
            curve.push((step + 1, held_out));
            bar.set_message(format!("loss {loss:.3}, held-out {held_out:.3}"));
        } else if step % 10 == 0 {
            let last = curve
                .last()
                .map_or(String::new(), |(_, l)| format!(", held-out {l:.3}"));
            bar.set_message(format!("loss {loss:.3}{last}"));
        }
        bar.inc(1);
    }
    let final_set = corpus.held_out_windows(cfg.final_windows, context, device)?;
    let held_out_loss = finite(
        evaluate(&model, &final_set, cfg.batch)?,
        "final held-out",
        cfg.steps,
    )?;
    let ffn_end = model::ffn_weights(&map)?;
    // Σ in f64 over the tensors' squares.
    let sum_sq =
        |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar()?) };
    let (mut moved, mut norm) = (0.0, 0.0);
    for (start, end) in ffn_start.iter().zip(&ffn_end) {
        moved += sum_sq((end - start)?)?;
        norm += sum_sq(start.clone())?;
    }
    let ffn_update = (norm > 0.0).then(|| (moved / norm).sqrt());
    Ok(RunResult {
        variant: model_cfg.variant.name().to_string(),
        seed,
        parameters,
        ffn_parameters,
        d_ff: model_cfg.variant.d_ff(model_cfg.d_model),
        ffn_on_crate_kernels: Some(ffn_on_crate_kernels),
        ffn_update,
        held_out_loss,
        bits_per_byte: held_out_loss / std::f64::consts::LN_2,
        train_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
        curve,
        wall_s: start.elapsed().as_secs_f64(),
    })
}

/// The mean loss over the windows `(ids, targets)`, `batch` windows at a time.
fn evaluate(model: &model::Transformer, set: &(Tensor, Tensor), batch: usize) -> Result<f64> {
    let (ids, targets) = set;
    let n = ids.dim(0)?;
    let mut total = 0.0;
    for start in (0..n).step_by(batch) {
        let len = batch.min(n - start);
        let loss = model.loss(&ids.narrow(0, start, len)?, &targets.narrow(0, start, len)?)?;
        total += f64::from(loss.to_scalar::<f32>()?) * len as f64;
    }
    Ok(total / n as f64)
}
