//! `Projection` (the crate's linear layer) against candle's own `Linear` / `QMatMul` on the same
//! weights, in one process, alternating the two (each first in every other round) so that the
//! machine's drifts hit both alike; reports each side's median and the median of the
//! per-round ratios.
//!
//! ```text
//! cargo bench --bench linear
//! cargo bench --bench linear -- --shape 576x576,576x192,576x49152 --dtype q4_1,q8_0 --tokens 1,16,128
//! ```
//!
//! The default shapes are SmolLM2-135M's: attention's q/o (576 → 576) and k/v (576 → 192), and
//! its output head (576 → 49152, tied to the embedding, Q8_0 in the Q4_1 GGUF). Inputs are
//! `[1, tokens, in]`, f32 (quantized weights) or the weight's dtype.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_glu::Projection;
use candle_nn::Linear;
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Weight shapes `in x out`, comma-separated.
    #[arg(
        long,
        default_value = "576x576,576x192,576x49152",
        value_delimiter = ','
    )]
    shape: Vec<String>,
    /// q4_1, q8_0, q4k, f32, bf16, f16, comma-separated.
    #[arg(long, default_value = "q4_1,q8_0,q4k,f32,bf16", value_delimiter = ',')]
    dtype: Vec<String>,
    /// Token counts, comma-separated.
    #[arg(long, default_value = "1,16,128", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Alternating rounds per configuration.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// cargo bench passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

#[path = "common/stats.rs"]
mod stats;
use stats::median;

/// Milliseconds per call of `f`, over enough calls to take about 20 ms.
fn time(calls: usize, f: &dyn Fn() -> candle_core::Result<Tensor>) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..calls {
        std::hint::black_box(f()?);
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / calls as f64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::Cpu;
    println!(
        "kernels: {}; {} rounds, alternating; ratio = candle ÷ ours (above 1: ours is faster)",
        candle_glu::cpu_kernels().map_or("candle's ops".into(), |k| k.to_string()),
        args.rounds
    );
    println!(
        "| shape (in → out) | dtype | tokens | candle, ms | ours, ms | candle ÷ ours | our kernel |"
    );
    println!("|---|---|---:|---:|---:|---:|---|");
    for shape in &args.shape {
        let Some((inp, out)) = shape.split_once('x') else {
            bail!("--shape {shape}: expected IN x OUT, as 576x192")
        };
        let (inp, out): (usize, usize) = (inp.parse()?, out.parse()?);
        for dtype in &args.dtype {
            let w = Tensor::randn(0f32, 0.02, (out, inp), &dev)?;
            let (theirs, ours, xdtype): (Box<dyn Module>, Projection, DType) = match dtype.as_str()
            {
                "f32" | "bf16" | "f16" => {
                    let dt = match dtype.as_str() {
                        "f32" => DType::F32,
                        "bf16" => DType::BF16,
                        _ => DType::F16,
                    };
                    let w = w.to_dtype(dt)?;
                    (
                        Box::new(Linear::new(w.clone(), None)),
                        Projection::new(w, None)?,
                        dt,
                    )
                }
                q => {
                    let ty = match q {
                        "q4_1" => GgmlDType::Q4_1,
                        "q8_0" => GgmlDType::Q8_0,
                        "q4k" => GgmlDType::Q4K,
                        _ => bail!("--dtype {q}: expected q4_1, q8_0, q4k, f32, bf16 or f16"),
                    };
                    if inp % ty.block_size() != 0 {
                        println!("| {inp} → {out} | {q} | | | | | rows not whole {q} blocks |");
                        continue;
                    }
                    let q = Arc::new(QTensor::quantize(&w, ty)?);
                    let theirs = QMatMul::from_arc(q.clone())?;
                    (
                        Box::new(theirs),
                        Projection::from_qtensor(q, None)?,
                        DType::F32,
                    )
                }
            };
            for &m in &args.tokens {
                let x = Tensor::randn(0f32, 1.0, (1, m, inp), &dev)?.to_dtype(xdtype)?;
                // Warm (first calls pack, repack or fault pages in), then about 20 ms a timing
                // from a warm call's time (at least one call).
                for _ in 0..3 {
                    theirs.forward(&x)?;
                    ours.forward(&x)?;
                }
                let warm = time(1, &|| theirs.forward(&x))?.max(time(1, &|| ours.forward(&x))?);
                let calls = ((20.0 / warm) as usize).clamp(1, 10_000);
                let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
                for round in 0..args.rounds {
                    // Each side goes first in every other round.
                    let (tc, to) = if round % 2 == 0 {
                        let tc = time(calls, &|| theirs.forward(&x))?;
                        (tc, time(calls, &|| ours.forward(&x))?)
                    } else {
                        let to = time(calls, &|| ours.forward(&x))?;
                        (time(calls, &|| theirs.forward(&x))?, to)
                    };
                    a.push(tc);
                    b.push(to);
                    r.push(tc / to);
                }
                println!(
                    "| {inp} → {out} | {dtype} | {m} | {:.4} | {:.4} | {:.2} | {} |",
                    median(&a),
                    median(&b),
                    median(&r),
                    ours.micro_kernel(&x)
                        .map_or("candle".to_string(), |k| format!("{k:?}"))
                );
            }
        }
    }
    Ok(())
}
