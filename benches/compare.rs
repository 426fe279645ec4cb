//! Side-by-side timing of `GluFeedForward` against the naive candle MLP, in one process,
//! alternating the two so that the machine's drifts hit both alike; reports medians and ratios.
//!
//! ```text
//! cargo bench --bench compare -- --shape 7b --dtype bf16,f32,f16 --tokens 1,16,128,512
//! cargo bench --bench compare -- --shape small --rounds 30 --json results.json
//! ```
//!
//! "naive" is the Llama MLP as candle-transformers writes it: three `candle_nn::Linear`, then
//! `silu`, then `mul`. "floor" is what one decode must take to read the weights once, at the read
//! bandwidth measured in the same run by streaming 1 GiB with every thread.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_glu::{GluConfig, GluFeedForward, Projection};
use candle_nn::Linear;
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// 7b (hidden 4096, intermediate 11008) or small (576 → 1536), comma-separated.
    #[arg(long, default_value = "7b,small", value_delimiter = ',')]
    shape: Vec<String>,
    /// f32, bf16, f16, comma-separated.
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
    /// Skip the naive baseline (for quick tuning).
    #[arg(long)]
    no_naive: bool,
    // `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => bail!("unknown dtype {name}"),
    })
}

/// Read bandwidth in GB/s: every thread sums its share of a 1 GiB buffer as 8 interleaved
/// streams (as the decode kernel reads 8 weight rows at once), with 64-byte loads where the CPU
/// has AVX-512; best of 3.
fn read_bandwidth() -> f64 {
    let data = vec![1f32; 256 << 20];
    let threads = candle_core::utils::get_num_threads().max(1);
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let sum: f32 = std::thread::scope(|s| {
            let parts: Vec<_> = data
                .chunks(data.len().div_ceil(threads))
                .map(|c| s.spawn(move || sum_streams(c)))
                .collect();
            parts.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((data.len() * 4) as f64 / secs / 1e9);
    }
    best
}

fn sum_streams(c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was detected.
        return unsafe { sum_streams_avx512(c) };
    }
    let mut acc = [0f32; 16];
    for ch in c.chunks_exact(16) {
        for (a, v) in acc.iter_mut().zip(ch) {
            *a += v;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_streams_avx512(c: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    const STREAMS: usize = 8;
    let len = c.len() / STREAMS / 64 * 64;
    let mut acc = [_mm512_setzero_ps(); STREAMS];
    let mut i = 0;
    while i < len {
        for (s, a) in acc.iter_mut().enumerate() {
            let p = c.as_ptr().add(s * len + i);
            let v = _mm512_add_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let w = _mm512_add_ps(_mm512_loadu_ps(p.add(32)), _mm512_loadu_ps(p.add(48)));
            *a = _mm512_add_ps(*a, _mm512_add_ps(v, w));
        }
        i += 64;
    }
    acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
}

struct Row {
    shape: String,
    dtype: String,
    tokens: usize,
    naive_ms: Option<f64>,
    ours_ms: f64,
    gflops: f64,
    floor_ms: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    let bw = read_bandwidth();
    println!(
        "threads {}, read bandwidth {bw:.1} GB/s",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:>5} {:>4} {:>6} | {:>10} {:>10} {:>8} | {:>8} {:>9} {:>8}",
        "shape",
        "dtype",
        "tokens",
        "naive ms",
        "ours ms",
        "speedup",
        "GFLOP/s",
        "floor ms",
        "/floor"
    );
    let mut rows = Vec::new();
    for shape in &args.shape {
        let (h, i) = match shape.as_str() {
            "7b" => (4096, 11008),
            "small" => (576, 1536),
            _ => bail!("unknown shape {shape}"),
        };
        for dname in &args.dtype {
            let dt = dtype(dname)?;
            let w = |o, n| -> Result<Tensor> {
                Ok(Tensor::randn(0f32, 0.02, (o, n), &dev)?.to_dtype(dt)?)
            };
            let (wg, wu, wd) = (w(i, h)?, w(i, h)?, w(h, i)?);
            let naive = [
                Linear::new(wg.clone(), None),
                Linear::new(wu.clone(), None),
                Linear::new(wd.clone(), None),
            ];
            let ffn = GluFeedForward::from_projections(
                &GluConfig::new(h, i),
                Projection::Dense(Linear::new(wg, None)),
                Projection::Dense(Linear::new(wu, None)),
                Projection::Dense(Linear::new(wd, None)),
            )?;
            let weight_bytes = 3 * h * i * dt.size_in_bytes();
            for &tokens in &args.tokens {
                let x = Tensor::randn(0f32, 1.0, (1, tokens, h), &dev)?.to_dtype(dt)?;
                let run_naive = || -> Result<Tensor> {
                    let g = naive[0].forward(&x)?.silu()?;
                    Ok(naive[2].forward(&(g * naive[1].forward(&x)?)?)?)
                };
                let run_ours = || -> Result<Tensor> { Ok(ffn.forward(&x)?) };
                // Warm up both, then alternate.
                if !args.no_naive {
                    run_naive()?;
                }
                run_ours()?;
                let flops = 6.0 * (tokens * h * i) as f64;
                let slow = flops * if dt == DType::F32 { 1.0 } else { 2.0 } > 5e10;
                let rounds = if slow {
                    args.rounds.min(5)
                } else {
                    args.rounds
                };
                let (mut tn, mut to) = (Vec::new(), Vec::new());
                for _ in 0..rounds {
                    if !args.no_naive {
                        let t = Instant::now();
                        std::hint::black_box(run_naive()?);
                        tn.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    let t = Instant::now();
                    std::hint::black_box(run_ours()?);
                    to.push(t.elapsed().as_secs_f64() * 1e3);
                }
                let naive_ms = (!tn.is_empty()).then(|| median(&mut tn));
                let ours_ms = median(&mut to);
                let floor_ms = weight_bytes as f64 / (bw * 1e9) * 1e3;
                let row = Row {
                    shape: shape.clone(),
                    dtype: dname.clone(),
                    tokens,
                    naive_ms,
                    ours_ms,
                    gflops: flops / (ours_ms / 1e3) / 1e9,
                    floor_ms,
                };
                println!(
                    "{:>5} {:>4} {:>6} | {:>10} {:>10.3} {:>8} | {:>8.1} {:>9.2} {:>8.2}",
                    row.shape,
                    row.dtype,
                    row.tokens,
                    row.naive_ms.map_or("-".into(), |v| format!("{v:.3}")),
                    row.ours_ms,
                    row.naive_ms
                        .map_or("-".into(), |v| format!("{:.2}x", v / row.ours_ms)),
                    row.gflops,
                    row.floor_ms,
                    row.ours_ms / row.floor_ms,
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
                    "naive_ms": r.naive_ms, "ours_ms": r.ours_ms, "gflops": r.gflops,
                    "floor_ms": r.floor_ms, "read_gbps": bw,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
