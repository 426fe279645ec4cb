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
//! Quantized (`q8_0`, `q4k`, `q4_1`): each expert's weights quantized once, written as a GGUF
//! file's stacked tensors and loaded by `Checkpoint::load_experts`, as a user loads them (one
//! buffer per stacked tensor, the experts in the file's order), then shared by both sides;
//! naive runs each expert through three `QMatMul` (f32 activations), ours the crate's kernels
//! over the same blocks, in place.
//! Each timed run takes the next of 16 random inputs, so that the experts chosen change from
//! run to run and their weights come from memory, as a model's layers would; naive's runs take
//! the inputs half a turn on from ours, so that the side timed second does not find the experts
//! the first just read in cache. The floor is the
//! bytes of the experts a run chooses (and the router) at the read bandwidth measured here, by
//! a probe on the pages the layer's weights lie on (huge pages for the GGUF-loaded layers, as
//! the loader asks for them; 4 KiB for dense ones, candle's); at
//! one token, a second phase alternates ours with one pass of the bandwidth probe, and
//! `÷floor` is the median of those rounds' ratios (the floor column their median floor), as
//! the memory bandwidth of a shared machine swings from minute to minute.
//! Shapes: `qwen3` is Qwen3-30B-A3B's layer (hidden 2048, expert intermediate 768, 128
//! experts, top-8), `mixtral` Mixtral-8x7B's (4096, 14336, 8, top-2), `small` a quick one
//! (576, 256, 16, top-4).
//!
//! On a GPU (`--features cuda`, `--device cuda`) both sides are candle's ops on the device and
//! every timed run ends when the device is done; the floor column is left out (it is a CPU
//! notion here).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Result};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_glu::device::{device_name, DeviceChoice};
use candle_glu::loading::{Checkpoint, LoadOptions};
use candle_glu::{GluConfig, GluExperts, MoeConfig, Projection};
use clap::Parser;

#[path = "common/stats.rs"]
mod stats;
use stats::median;
#[path = "common/bandwidth.rs"]
mod bandwidth;
use bandwidth::{read_bandwidth, read_once, ProbeBuffer};

/// Inputs each configuration cycles through.
const INPUTS: usize = 16;

#[derive(Parser, Debug)]
struct Args {
    /// qwen3, mixtral or small, comma-separated.
    #[arg(long, default_value = "small", value_delimiter = ',')]
    shape: Vec<String>,
    /// f32, bf16, q8_0, q4k or q4_1, comma-separated.
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
    /// cpu, cuda, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Time ours only (for profiling).
    #[arg(long)]
    no_naive: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// candle-transformers' loop over experts, each expert's weights its own contiguous tensors,
/// as it loads them (or its `QMatMul`s).
struct Naive {
    router: Tensor,
    experts: Vec<[Box<dyn Module>; 3]>,
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

/// The weights of one configuration: ours, naive, and one expert's bytes.
struct Layer {
    ours: GluExperts,
    naive: Naive,
    expert_bytes: usize,
    router_bytes: usize,
}

fn dense_layer(
    h: usize,
    i: usize,
    e: usize,
    k: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Layer> {
    // Expert by expert, so that the f32 draw never holds more than one expert.
    let stack = |rows: usize, cols: usize| -> Result<Tensor> {
        let std = 1.0 / (cols as f64).sqrt();
        let parts = (0..e)
            .map(|_| {
                let t = Tensor::randn(0f32, std as f32, (1, rows, cols), dev)?;
                Ok(t.to_dtype(dtype)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    };
    let router = router_weights(e, h, dev)?.to_dtype(dtype)?;
    let gate_up = stack(2 * i, h)?;
    let down = stack(h, i)?;
    let mut ws = HashMap::new();
    ws.insert("gate.weight".to_string(), router.clone());
    ws.insert("experts.gate_up_proj".to_string(), gate_up.clone());
    ws.insert("experts.down_proj".to_string(), down.clone());
    // Ours reads the stacked tensors (each expert a view), as transformers keeps them.
    let vb = candle_nn::VarBuilder::from_tensors(ws, dtype, dev);
    let cfg = MoeConfig::new(GluConfig::new(h, i), e, k);
    let ours = GluExperts::new(&cfg, vb)?;
    let linear = |w: Tensor| -> Result<Box<dyn Module>> {
        Ok(Box::new(candle_nn::Linear::new(
            w.force_contiguous()?,
            None,
        )))
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
    let size = dtype.size_in_bytes();
    Ok(Layer {
        ours,
        naive: Naive {
            router,
            experts,
            top_k: k,
        },
        expert_bytes: 3 * h * i * size,
        router_bytes: e * h * size,
    })
}

fn quantized_layer(
    h: usize,
    i: usize,
    e: usize,
    k: usize,
    dtype: GgmlDType,
    dev: &Device,
) -> Result<Layer> {
    // Stacked `[e, out, in]` as a GGUF file holds them, each expert quantized on its own (the
    // f32 values of one expert at a time).
    let stacked = |rows: usize, cols: usize| -> Result<QTensor> {
        let std = 1.0 / (cols as f64).sqrt();
        let mut bytes = Vec::new();
        for _ in 0..e {
            let w = Tensor::randn(0f32, std as f32, (rows, cols), &Device::Cpu)?;
            bytes.extend_from_slice(&QTensor::quantize(&w, dtype)?.data()?);
        }
        Ok(qtensor_from_ggml(
            dtype,
            &bytes,
            vec![e, rows, cols],
            &Device::Cpu,
        )?)
    };
    let router = router_weights(e, h, &Device::Cpu)?;
    // Loaded as a user loads them: written to a GGUF file and read back by the crate's loader,
    // so that the experts lie in memory as it puts them.
    // (A named temporary file: removed when dropped, on every path.)
    let mut file = tempfile::Builder::new()
        .prefix("candle-glu-bench-moe-")
        .suffix(".gguf")
        .tempfile()?;
    {
        let tensors = [
            (
                "blk.0.ffn_gate_inp.weight",
                QTensor::quantize(&router, GgmlDType::F32)?,
            ),
            ("blk.0.ffn_gate_exps.weight", stacked(i, h)?),
            ("blk.0.ffn_up_exps.weight", stacked(i, h)?),
            ("blk.0.ffn_down_exps.weight", stacked(h, i)?),
        ];
        let named: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let mut writer = std::io::BufWriter::new(file.as_file_mut());
        gguf_file::write(&mut writer, &[], &named)?;
        writer
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
    }
    let cfg = MoeConfig::new(GluConfig::new(h, i), e, k);
    let opts = LoadOptions::new(DType::F32, dev.clone()).with_quantized(true);
    let ours = Checkpoint::open(file.path())?.load_experts(&cfg, 0, &opts)?;
    let qmatmul = |p: &Projection| -> Result<Box<dyn Module>> {
        match p {
            Projection::Quantized { weight, .. } => Ok(Box::new(weight.clone())),
            _ => bail!("the loader gave a dense expert for {dtype:?}"),
        }
    };
    let naive = (0..e)
        .map(|x| {
            let ffn = ours
                .expert(x)
                .ok_or_else(|| anyhow::anyhow!("no expert {x}"))?;
            Ok([
                qmatmul(ffn.gate_proj())?,
                qmatmul(ffn.up_proj())?,
                qmatmul(ffn.down_proj())?,
            ])
        })
        .collect::<Result<Vec<_>>>()?;
    let router = router.to_device(dev)?;
    Ok(Layer {
        ours,
        naive: Naive {
            router,
            experts: naive,
            top_k: k,
        },
        // Three matrices of h × i values in `dtype`'s blocks.
        expert_bytes: 3 * h * i / dtype.block_size() * dtype.type_size(),
        router_bytes: e * h * 4,
    })
}

/// A router `[e, h]` of standard deviation 1/√h, as trained routers' logits are of order 1:
/// its scores spread over several experts, so that every one of the k counts in the check of
/// ours against naive (at 1.0 the softmax put nearly all the weight on one).
fn router_weights(e: usize, h: usize, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(
        0f32,
        (1.0 / (h as f64).sqrt()) as f32,
        (e, h),
        dev,
    )?)
}

/// The median of `runs` runs, each on the next input (from `start`), each ended when the
/// device is done with it.
fn time(m: &dyn Module, xs: &[Tensor], start: usize, runs: usize) -> Result<f64> {
    let mut t = Vec::with_capacity(runs);
    for r in 0..runs {
        let x = &xs[(start + r) % xs.len()];
        let begin = Instant::now();
        m.forward(x)?;
        x.device().synchronize()?;
        t.push(begin.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&t))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = args.device.device()?;
    // The read floor is measured on the CPU only; on a GPU its columns are left out.
    // Two probes, one for each kind of pages the layers' weights lie on: dense layers on
    // candle's (4 KiB), quantized ones, loaded from GGUF, on the loader's (huge where the
    // system has them).
    let probes = dev
        .is_cpu()
        .then(|| [ProbeBuffer::new(false), ProbeBuffer::new(true)]);
    let bw = if dev.is_cpu() {
        println!(
            "threads {}, kernels {}",
            candle_core::utils::get_num_threads(),
            candle_glu::cpu_kernels().map_or("candle".into(), |k| k.to_string())
        );
        let probes = probes.as_ref().map_or(&[][..], |p| &p[..]);
        let bw: Vec<f64> = probes.iter().map(|p| read_bandwidth(p)).collect();
        println!(
            "read bandwidth {:.1} GB/s (4 KiB pages), {:.1} (huge pages where granted)",
            bw[0], bw[1]
        );
        Some(bw)
    } else {
        println!("device {}", device_name(&dev));
        None
    };
    println!(
        "{:>7} {:>5} {:>6} | {:>10} {:>8} {:>10} | {:>8} {:>6} | max |ours - naive| / max |naive|",
        "shape", "dtype", "tokens", "naive ms", "speed-up", "ours ms", "floor ms", "÷floor"
    );
    for shape in &args.shape {
        let (h, i, e, k) = match shape.as_str() {
            "qwen3" => (2048, 768, 128, 8),
            "mixtral" => (4096, 14336, 8, 2),
            "small" => (576, 256, 16, 4),
            other => bail!("unknown shape {other}"),
        };
        for dtype in &args.dtype {
            // q4k's super-blocks are 256 values: the small shape's 576 is not a multiple.
            if dtype == "q4k" && (h % 256 != 0 || i % 256 != 0) {
                println!("{shape} {dtype}: skipped (hidden {h} or intermediate {i} is not a multiple of 256)");
                continue;
            }
            let layer = match dtype.as_str() {
                "f32" => dense_layer(h, i, e, k, DType::F32, &dev)?,
                "bf16" => dense_layer(h, i, e, k, DType::BF16, &dev)?,
                "q8_0" => quantized_layer(h, i, e, k, GgmlDType::Q8_0, &dev)?,
                "q4k" => quantized_layer(h, i, e, k, GgmlDType::Q4K, &dev)?,
                "q4_1" => quantized_layer(h, i, e, k, GgmlDType::Q4_1, &dev)?,
                other => bail!("unknown dtype {other}"),
            };
            let act = match dtype.as_str() {
                "bf16" => DType::BF16,
                _ => DType::F32,
            };
            let (ours, naive) = (&layer.ours, &layer.naive);
            // The probe on the pages this layer's weights lie on.
            let huge = dtype.starts_with('q');
            let probe = probes.as_ref().map(|p| &p[usize::from(huge)]);
            let bw = bw.as_ref().map(|b| b[usize::from(huge)]);
            for &tokens in &args.tokens {
                let xs = (0..INPUTS)
                    .map(|_| Ok(Tensor::randn(0f32, 1.0, (tokens, h), &dev)?.to_dtype(act)?))
                    .collect::<Result<Vec<_>>>()?;
                // Same routing on both sides (the first run of each also warms up).
                let a = ours.forward(&xs[0])?.to_dtype(DType::F32)?;
                let b = naive.forward(&xs[0])?.to_dtype(DType::F32)?;
                let (a, b): (Vec<f32>, Vec<f32>) =
                    (a.flatten_all()?.to_vec1()?, b.flatten_all()?.to_vec1()?);
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                // (A NaN on either side is an infinite difference, not one a max passes over.)
                let diff = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |m, (x, y)| match (x - y).abs() {
                        d if d.is_nan() => f32::INFINITY,
                        d => m.max(d),
                    });
                let rel = diff / scale.max(f32::MIN_POSITIVE);
                // In bf16 the naive router's bf16 logits may choose other experts for a
                // near-tie; in f32 both must agree: within f32's summation order for dense
                // weights, within the activations' 8-bit rounding (candle's and ours differ)
                // for quantized ones.
                let bound = if dtype.starts_with('q') { 3e-2 } else { 1e-4 };
                if act == DType::F32 && rel > bound {
                    bail!("{shape} {dtype} {tokens}: ours and naive differ by {rel:e}");
                }
                // candle's QMatMul repacks a q8_0/q4k weight at its first call and keeps the
                // copy: every input once on both sides first, so that no timed run pays it.
                if act == DType::F32 && dtype.starts_with('q') {
                    for x in &xs {
                        naive.forward(x)?;
                        ours.forward(x)?;
                    }
                }
                // The floor: the distinct experts each input chooses, and the router, in bytes.
                let floor_bytes = match bw {
                    Some(_) => {
                        xs.iter()
                            .map(|x| {
                                let used = ours.route(x)?.tokens_per_expert(e);
                                let experts = used.iter().filter(|&&c| c > 0).count();
                                Ok((experts * layer.expert_bytes + layer.router_bytes) as f64)
                            })
                            .collect::<Result<Vec<f64>>>()?
                            .iter()
                            .sum::<f64>()
                            / INPUTS as f64
                    }
                    None => f64::NAN,
                };
                let floor_ms = |bw: f64| floor_bytes / (bw * 1e9) * 1e3;
                let (mut tn, mut to, mut ratio) = (vec![], vec![], vec![]);
                for r in 0..args.rounds {
                    let start = r * args.runs;
                    if args.no_naive {
                        to.push(time(ours, &xs, start, args.runs)?);
                        continue;
                    }
                    // Naive takes the inputs half a turn on from ours: the side that runs
                    // second must not find the experts the first just read in cache (Q4_1's
                    // blocks, which both share, would be; 71 MB of Qwen3's fit a Xeon's L3).
                    let other = start + INPUTS / 2;
                    let (n, o) = if r % 2 == 0 {
                        let n = time(naive, &xs, other, args.runs)?;
                        (n, time(ours, &xs, start, args.runs)?)
                    } else {
                        let o = time(ours, &xs, start, args.runs)?;
                        (time(naive, &xs, other, args.runs)?, o)
                    };
                    tn.push(n);
                    to.push(o);
                    ratio.push(n / o);
                }
                let ours_ms = median(&to);
                let naive = if args.no_naive {
                    format!("{:>10} {:>8}", "-", "-")
                } else {
                    format!("{:>10.3} {:>7.2}x", median(&tn), median(&ratio))
                };
                let floor = match bw {
                    None => format!("{:>8} {:>6}", "-", "-"),
                    // Decode against the floor: alternate ours with the bandwidth probe, so
                    // that both see the machine as it is at the time (its bandwidth swings).
                    Some(_) if tokens == 1 => {
                        let (mut floors, mut ratios) = (vec![], vec![]);
                        for r in 0..args.rounds {
                            let floor = floor_ms(read_once(probe.expect("a CPU probe")));
                            let ms = time(ours, &xs, r * args.runs, args.runs)?;
                            floors.push(floor);
                            ratios.push(ms / floor);
                        }
                        format!("{:>8.3} {:>6.2}", median(&floors), median(&ratios))
                    }
                    Some(bw) => format!("{:>8.3} {:>6.2}", floor_ms(bw), ours_ms / floor_ms(bw)),
                };
                println!(
                    "{shape:>7} {dtype:>5} {tokens:>6} | {naive} {ours_ms:>10.3} | {floor} | {rel:.1e}"
                );
            }
        }
    }
    Ok(())
}
