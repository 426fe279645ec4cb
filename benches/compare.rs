//! Side-by-side timing of `GluFeedForward` against the naive candle MLP, in one process,
//! alternating the two so that the machine's drifts hit both alike; reports medians and ratios.
//!
//! ```text
//! cargo bench --bench compare -- --shape 7b --dtype bf16,f32,f16 --tokens 1,16,128,512
//! cargo bench --bench compare -- --shape small --rounds 30 --json results.json
//! cargo bench --bench compare --features cuda -- --device cuda --shape 7b --dtype bf16 --tokens 1,128,2048
//! ```
//!
//! "naive" is the Llama MLP as candle-transformers writes it: three `candle_nn::Linear`, then
//! `silu`, then `mul` (for the GGUF types `q8_0`, `q4k` and `q4_1`: three `QMatMul`, as its
//! quantized Llama does). "floor" is what one decode must take to read the weights once, at the
//! read bandwidth measured in the same run by streaming 1 GiB with every thread (CPU only). For
//! one token, a second phase alternates our forward with that bandwidth probe, and `/floor` is
//! the median of the per-round ratios, so a drift of the machine's speed hits both sides alike.
//!
//! On a CPU, the 7b shape's runs take turns over copies of the weights (1 GiB in all; see
//! `--copies`), for both sides: every run then reads its weights from memory, as each layer of a
//! 7B model does. With one copy, a 76 MB q4k layer partly stays in the 260 MiB L3 between runs,
//! even across the 1 GiB probe: one-token q4k decode measured 1.01× the floor that way,
//! against 1.20× with the copies, in the same sitting (an earlier build of the present kernel).
//!
//! On a GPU (`--device cuda`), both run on the device and every timed run ends with
//! `Device::synchronize`, so each time is the whole forward pass, kernels included.

use std::cell::Cell;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_glu::device::{device_name, DeviceChoice};
use candle_glu::{GluConfig, GluFeedForward, Projection};
use candle_nn::Linear;
use clap::Parser;

#[path = "common/stats.rs"]
mod stats;
use stats::median;
#[path = "common/bandwidth.rs"]
mod bandwidth;
use bandwidth::{read_bandwidth, read_once, ProbeBuffer};

#[derive(Parser, Debug)]
struct Args {
    /// 7b (hidden 4096, intermediate 11008) or small (576 → 1536), comma-separated.
    #[arg(long, default_value = "7b,small", value_delimiter = ',')]
    shape: Vec<String>,
    /// f32, bf16, f16, q8_0, q4k, q4_1, comma-separated.
    #[arg(long, default_value = "bf16,f32,f16", value_delimiter = ',')]
    dtype: Vec<String>,
    /// Token counts, comma-separated.
    #[arg(long, default_value = "1,16,128,512", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Alternating rounds per configuration (fewer for slow ones).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Also write the rows as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Copies of each side's weights that the runs take in turn, so that every run reads its
    /// weights from memory, as a model's layers do; 0: enough for 1 GiB on a CPU for the 7b
    /// shape (whose one layer already outgrows L2), one for the small shape (which a small
    /// model's layers keep in L3) and on a GPU.
    #[arg(long, default_value_t = 0)]
    copies: usize,
    /// Skip the naive baseline (for quick tuning).
    #[arg(long)]
    no_naive: bool,
    /// cpu, cuda, metal or auto (GPUs need the matching cargo feature).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    // `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The weights' type: a float dtype (weights and activations alike) or a GGUF type (f32
/// activations).
#[derive(Clone, Copy)]
enum WeightType {
    Float(DType),
    Quantized(GgmlDType),
}

fn weight_type(name: &str) -> Result<WeightType> {
    Ok(match name {
        "f32" => WeightType::Float(DType::F32),
        "bf16" => WeightType::Float(DType::BF16),
        "f16" => WeightType::Float(DType::F16),
        "q8_0" => WeightType::Quantized(GgmlDType::Q8_0),
        "q4k" => WeightType::Quantized(GgmlDType::Q4K),
        "q4_1" => WeightType::Quantized(GgmlDType::Q4_1),
        _ => bail!("unknown dtype {name} (expected f32, bf16, f16, q8_0, q4k or q4_1)"),
    })
}

/// Bytes of weights that `--copies 0` spreads a 7b configuration's runs over: about 4× this
/// machine's L3, so that no run finds its weights there.
const COLD_BYTES: usize = 1 << 30;

/// The naive side: gate, up and down.
type Naive = [Box<dyn Module>; 3];

/// Both sides' three projections for one weight type, and the weights' size in bytes.
fn build(
    wt: WeightType,
    (h, i): (usize, usize),
    dev: &Device,
) -> Result<(Naive, GluFeedForward, usize)> {
    // One projection `[o, n]`: naive's layer, ours, and its bytes.
    let one = |o, n| -> Result<(Box<dyn Module>, Projection, usize)> {
        let w = Tensor::randn(0f32, 0.02, (o, n), dev)?;
        Ok(match wt {
            WeightType::Float(dt) => {
                let w = w.to_dtype(dt)?;
                let bytes = w.elem_count() * dt.size_in_bytes();
                let ours = Projection::Dense(Linear::new(w.clone(), None));
                (Box::new(Linear::new(w, None)), ours, bytes)
            }
            WeightType::Quantized(q) => {
                let qt = std::sync::Arc::new(QTensor::quantize(&w, q)?);
                let bytes = qt.storage_size_in_bytes();
                let ours = Projection::quantized(QMatMul::from_arc(qt.clone())?, None);
                (Box::new(QMatMul::from_arc(qt)?), ours, bytes)
            }
        })
    };
    let ((ng, g, bg), (nu, u, bu), (nd, d, bd)) = (one(i, h)?, one(i, h)?, one(h, i)?);
    let ffn = GluFeedForward::from_projections(&GluConfig::new(h, i), g, u, d)?;
    Ok(([ng, nu, nd], ffn, bg + bu + bd))
}

struct Row {
    shape: String,
    dtype: String,
    tokens: usize,
    naive_ms: Option<f64>,
    /// Naive ÷ ours, the median of the rounds' ratios.
    speedup: Option<f64>,
    ours_ms: f64,
    gflops: f64,
    floor_ms: Option<f64>,
    /// Ours over the floor; for one token, the median of side-by-side rounds.
    floor_ratio: Option<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = args.device.device()?;
    // The weights' read floor is a CPU notion here; on a GPU the table has no floor.
    // On 4 KiB pages, as candle's allocations of the weights here are.
    let probe = dev.is_cpu().then(|| ProbeBuffer::new(false));
    let bw = probe.as_ref().map(|p| read_bandwidth(p));
    match bw {
        Some(bw) => println!(
            "device cpu, threads {}, read bandwidth {bw:.1} GB/s",
            candle_core::utils::get_num_threads()
        ),
        None => println!("device {}", device_name(&dev)),
    }
    // On a GPU the last columns are both sides' TFLOP/s instead of ours and the CPU's floor.
    let last = if bw.is_some() {
        ["GFLOP/s", "floor ms", "/floor"]
    } else {
        ["-", "naive TF/s", "ours TF/s"]
    };
    println!(
        "{:>5} {:>4} {:>6} | {:>10} {:>10} {:>8} | {:>8} {:>10} {:>10}",
        "shape", "dtype", "tokens", "naive ms", "ours ms", "speedup", last[0], last[1], last[2]
    );
    let mut rows = Vec::new();
    for shape in &args.shape {
        let (h, i) = match shape.as_str() {
            "7b" => (4096, 11008),
            "small" => (576, 1536),
            _ => bail!("unknown shape {shape}"),
        };
        for dname in &args.dtype {
            let wt = weight_type(dname)?;
            if let WeightType::Quantized(q) = wt {
                if h % q.block_size() != 0 || i % q.block_size() != 0 {
                    println!("{shape:>5} {dname:>4}: skipped, {h} and {i} are not multiples of {dname}'s block of {}", q.block_size());
                    continue;
                }
            }
            let (naive, ffn, weight_bytes) = build(wt, (h, i), &dev)?;
            let copies = match args.copies {
                0 if dev.is_cpu() && shape == "7b" => COLD_BYTES.div_ceil(weight_bytes),
                0 => 1,
                n => n,
            };
            let mut layers = vec![(naive, ffn)];
            for _ in 1..copies {
                let (naive, ffn, _) = build(wt, (h, i), &dev)?;
                layers.push((naive, ffn));
            }
            // The copy the next run of each side takes. The sides share each copy's weights
            // (dense and Q4_1), so naive runs half a turn behind: with two copies or more, no run
            // takes the copy that the run just before it read.
            let (next_naive, next_ours) = (Cell::new(layers.len() / 2), Cell::new(0));
            let take = |next: &Cell<usize>| {
                let c = next.get();
                next.set((c + 1) % layers.len());
                &layers[c]
            };
            let dt = match wt {
                WeightType::Float(dt) => dt,
                WeightType::Quantized(_) => DType::F32,
            };
            for &tokens in &args.tokens {
                let x = Tensor::randn(0f32, 1.0, (1, tokens, h), &dev)?.to_dtype(dt)?;
                // Each run ends when the device is done with it.
                let run_naive = || -> Result<Tensor> {
                    let naive = &take(&next_naive).0;
                    let g = naive[0].forward(&x)?.silu()?;
                    let y = naive[2].forward(&(g * naive[1].forward(&x)?)?)?;
                    dev.synchronize()?;
                    Ok(y)
                };
                let run_ours = || -> Result<Tensor> {
                    let y = take(&next_ours).1.forward(&x)?;
                    dev.synchronize()?;
                    Ok(y)
                };
                // Warm up both, every copy (on a GPU: cuBLAS's choices, our kernel's compile), then
                // alternate.
                for _ in 0..layers.len() * if dev.is_cpu() { 1 } else { 3 } {
                    if !args.no_naive {
                        run_naive()?;
                    }
                    run_ours()?;
                }
                let flops = 6.0 * (tokens * h * i) as f64;
                let slow = dev.is_cpu()
                    && flops
                        * match wt {
                            WeightType::Float(DType::F32) => 1.0,
                            WeightType::Float(_) => 2.0,
                            WeightType::Quantized(_) => 8.0,
                        }
                        > 5e10;
                let rounds = if slow {
                    args.rounds.min(5)
                } else {
                    args.rounds
                };
                let (mut tn, mut to) = (Vec::new(), Vec::new());
                // Each side goes first in every other round: whatever the one before leaves in
                // the caches, or the threads' state, falls on both alike.
                for round in 0..rounds {
                    for side in [round % 2, 1 - round % 2] {
                        if side == 0 && !args.no_naive {
                            let t = Instant::now();
                            std::hint::black_box(run_naive()?);
                            tn.push(t.elapsed().as_secs_f64() * 1e3);
                        } else if side == 1 {
                            let t = Instant::now();
                            std::hint::black_box(run_ours()?);
                            to.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                }
                // The speed-up: the median of each round's naive ÷ ours (the two ran side by side
                // then), not a ratio of two medians from different rounds.
                let speedup = (!tn.is_empty()).then(|| {
                    let per_round: Vec<f64> = tn.iter().zip(&to).map(|(n, o)| n / o).collect();
                    median(&per_round)
                });
                let naive_ms = (!tn.is_empty()).then(|| median(&tn));
                let ours_ms = median(&to);
                let floor_ms = bw.map(|bw| weight_bytes as f64 / (bw * 1e9) * 1e3);
                // Decode against the floor: alternate our forward with the bandwidth probe.
                let floor_ratio = match (bw, tokens) {
                    (Some(_), 1) => {
                        let mut ratios = Vec::new();
                        for _ in 0..rounds {
                            let bw = read_once(probe.as_ref().expect("a CPU probe"));
                            let t = Instant::now();
                            std::hint::black_box(run_ours()?);
                            let ms = t.elapsed().as_secs_f64() * 1e3;
                            ratios.push(ms / (weight_bytes as f64 / (bw * 1e9) * 1e3));
                        }
                        Some(median(&ratios))
                    }
                    (Some(_), _) => floor_ms.map(|f| ours_ms / f),
                    (None, _) => None,
                };
                let row = Row {
                    shape: shape.clone(),
                    dtype: dname.clone(),
                    tokens,
                    naive_ms,
                    speedup,
                    ours_ms,
                    gflops: flops / (ours_ms / 1e3) / 1e9,
                    floor_ms,
                    floor_ratio,
                };
                let last = match row.floor_ms {
                    Some(floor) => [
                        format!("{:.1}", row.gflops),
                        format!("{floor:.2}"),
                        format!("{:.2}", row.floor_ratio.unwrap_or(row.ours_ms / floor)),
                    ],
                    None => [
                        "-".into(),
                        row.naive_ms
                            .map_or("-".into(), |ms| format!("{:.1}", flops / ms / 1e9)),
                        format!("{:.1}", row.gflops / 1e3),
                    ],
                };
                println!(
                    "{:>5} {:>4} {:>6} | {:>10} {:>10.3} {:>8} | {:>8} {:>10} {:>10}",
                    row.shape,
                    row.dtype,
                    row.tokens,
                    row.naive_ms.map_or("-".into(), |v| format!("{v:.3}")),
                    row.ours_ms,
                    row.speedup.map_or("-".into(), |v| format!("{v:.2}x")),
                    last[0],
                    last[1],
                    last[2],
                );
                rows.push(row);
            }
        }
    }
    if let Some(path) = &args.json {
        let json: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "shape": r.shape, "dtype": r.dtype, "tokens": r.tokens,
                    "naive_ms": r.naive_ms, "speedup": r.speedup, "ours_ms": r.ours_ms,
                    "gflops": r.gflops,
                    "floor_ms": r.floor_ms, "floor_ratio": r.floor_ratio, "read_gbps": bw,
                    "device": device_name(&dev),
                    "naive_tflops": r.naive_ms.map(|ms| r.gflops * r.ours_ms / ms / 1e3),
                    "tflops": r.gflops / 1e3,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
