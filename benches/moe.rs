//! `GluExperts` against the mixture-of-experts loop as candle-transformers writes it, in one
//! process, alternating the two; reports medians and the median of per-round ratios.
//!
//! ```text
//! cargo bench --bench moe -- --shape qwen3,mixtral --dtype bf16 --tokens 1,16,128,512
//! ```
//!
//! "naive" is candle-transformers' sparse-MoE block (Mixtral's, Qwen3-MoE's): the router's
//! softmax and top-k on the host, then for every expert with tokens `index_select`, its MLP as
//! three `candle_nn::Linear` with `silu` and `mul`, the routing weights, `index_add`; each
//! expert's weights are its own contiguous tensors, as it loads them. Ours reads the same values
//! from stacked `[E, 2I, H]` and `[E, H, I]` tensors, each expert a view. Both route alike
//! (Mixtral's routing: softmax, top-k, renormalised).
//! Shapes: `qwen3` is Qwen3-30B-A3B's layer (hidden 2048, expert intermediate 768, 128
//! experts, top-8), `mixtral` Mixtral-8x7B's (4096, 14336, 8, top-2), `small` a quick one
//! (576, 256, 16, top-4).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_glu::{GluConfig, GluExperts, MoeConfig};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// qwen3, mixtral or small, comma-separated.
    #[arg(long, default_value = "small", value_delimiter = ',')]
    shape: Vec<String>,
    /// f32 or bf16, comma-separated.
    #[arg(long, default_value = "bf16", value_delimiter = ',')]
    dtype: Vec<String>,
    /// Token counts, comma-separated.
    #[arg(long, default_value = "1,16,128,512", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Alternating rounds per configuration.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Runs per round and side (the median is kept).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// candle-transformers' loop over experts, each expert's weights its own contiguous tensors,
/// as it loads them.
struct Naive {
    router: Tensor,
    experts: Vec<[candle_nn::Linear; 3]>,
    top_k: usize,
}

impl Module for Naive {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = xs.dim(1)?;
        let logits = xs.matmul(&self.router.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let probs: Vec<Vec<f32>> = probs.to_vec2()?;
        let num_experts = self.experts.len();
        let mut rows = vec![vec![]; num_experts];
        let mut weights = vec![vec![]; num_experts];
        for (t, p) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let sum: f32 = order[..self.top_k].iter().map(|&e| p[e]).sum();
            for &e in &order[..self.top_k] {
                rows[e].push(t as u32);
                weights[e].push(p[e] / sum);
            }
        }
        let mut ys = xs.zeros_like()?;
        for e in 0..num_experts {
            if rows[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(rows[e].as_slice(), xs.device())?;
            let w = Tensor::new(weights[e].as_slice(), xs.device())?
                .reshape(((), 1))?
                .to_dtype(xs.dtype())?;
            let x = xs.index_select(&idx, 0)?.reshape(((), h))?;
            let [w1, w3, w2] = &self.experts[e];
            let lhs = w1.forward(&x)?.silu()?;
            let rhs = w3.forward(&x)?;
            let y = w2.forward(&(lhs * rhs)?)?;
            ys = ys.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(ys)
    }
}

fn time(m: &dyn Module, x: &Tensor, runs: usize) -> Result<f64> {
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        m.forward(x)?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[runs / 2])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    println!(
        "threads {}, kernels {}",
        candle_core::utils::get_num_threads(),
        candle_glu::cpu_kernels().map_or("candle".into(), |k| k.to_string())
    );
    println!(
        "{:>7} {:>5} {:>6} | {:>10} {:>10} {:>8} | max |ours - naive| / max |naive|",
        "shape", "dtype", "tokens", "naive ms", "ours ms", "speed-up"
    );
    for shape in &args.shape {
        let (h, i, e, k) = match shape.as_str() {
            "qwen3" => (2048, 768, 128, 8),
            "mixtral" => (4096, 14336, 8, 2),
            "small" => (576, 256, 16, 4),
            other => bail!("unknown shape {other}"),
        };
        for dtype in &args.dtype {
            let dtype = match dtype.as_str() {
                "f32" => DType::F32,
                "bf16" => DType::BF16,
                other => bail!("unknown dtype {other}"),
            };
            // Expert by expert, so that the f32 draw never holds more than one expert.
            let stack = |rows: usize, cols: usize| -> Result<Tensor> {
                let std = 1.0 / (cols as f64).sqrt();
                let parts = (0..e)
                    .map(|_| {
                        let t = Tensor::randn(0f32, std as f32, (1, rows, cols), &dev)?;
                        Ok(t.to_dtype(dtype)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            };
            let router = Tensor::randn(0f32, 1.0, (e, h), &dev)?.to_dtype(dtype)?;
            let gate_up = stack(2 * i, h)?;
            let down = stack(h, i)?;
            let mut ws = HashMap::new();
            ws.insert("gate.weight".to_string(), router.clone());
            ws.insert("experts.gate_up_proj".to_string(), gate_up.clone());
            ws.insert("experts.down_proj".to_string(), down.clone());
            // Ours reads the stacked tensors (each expert a view), as transformers keeps them.
            let vb = candle_nn::VarBuilder::from_tensors(ws, dtype, &dev);
            let cfg = MoeConfig::new(GluConfig::new(h, i), e, k);
            let ours = GluExperts::new(&cfg, vb)?;
            let linear = |w: Tensor| -> Result<candle_nn::Linear> {
                Ok(candle_nn::Linear::new(w.force_contiguous()?, None))
            };
            let experts = (0..e)
                .map(|x| {
                    let gu = gate_up.i(x)?;
                    Ok([
                        linear(gu.narrow(0, 0, i)?)?,
                        linear(gu.narrow(0, i, i)?)?,
                        linear(down.i(x)?)?,
                    ])
                })
                .collect::<Result<Vec<_>>>()?;
            let naive = Naive {
                router,
                experts,
                top_k: k,
            };
            for &tokens in &args.tokens {
                let x = Tensor::randn(0f32, 1.0, (tokens, h), &dev)?.to_dtype(dtype)?;
                // Same routing on both sides (the first run of each also warms up).
                let a = ours.forward(&x)?.to_dtype(DType::F32)?;
                let b = naive.forward(&x)?.to_dtype(DType::F32)?;
                let diff = (a - &b)?.abs()?.max_all()?;
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
                let rel = diff.to_scalar::<f32>()? / scale.max(f32::MIN_POSITIVE);
                // In bf16 the naive router's bf16 logits may choose other experts for a
                // near-tie; in f32 both must agree.
                if dtype == DType::F32 && rel > 1e-3 {
                    bail!("{shape} {dtype:?} {tokens}: ours and naive differ by {rel:e}");
                }
                let (mut tn, mut to, mut ratio) = (vec![], vec![], vec![]);
                for r in 0..args.rounds {
                    let (n, o) = if r % 2 == 0 {
                        let n = time(&naive, &x, args.runs)?;
                        (n, time(&ours, &x, args.runs)?)
                    } else {
                        let o = time(&ours, &x, args.runs)?;
                        (time(&naive, &x, args.runs)?, o)
                    };
                    tn.push(n);
                    to.push(o);
                    ratio.push(n / o);
                }
                println!(
                    "{shape:>7} {:>5} {tokens:>6} | {:>10.3} {:>10.3} {:>7.2}x | {rel:.1e}",
                    dtype.as_str(),
                    median(tn),
                    median(to),
                    median(ratio)
                );
            }
        }
    }
    Ok(())
}
