//! Criterion benchmarks: `GluFeedForward` against the naive candle MLP (three `Linear`, `silu`,
//! `mul`, as candle-transformers writes it), in the same run.
//!
//! ```text
//! cargo bench --bench ffn                       # everything
//! cargo bench --bench ffn -- 'small/bf16'       # a filter
//! ```
//!
//! For the README's table and ratios on a noisy machine, prefer `benches/compare.rs`, which
//! alternates the two in one process.

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::{GluConfig, GluFeedForward, Projection};
use candle_nn::Linear;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn shapes(c: &mut Criterion) {
    let dev = Device::Cpu;
    let configs = [
        ("small", 576, 1536, &[1usize, 16, 128, 512][..]),
        ("7b", 4096, 11008, &[1usize, 16, 128][..]),
    ];
    for (shape, h, i, tokens) in configs {
        for (dname, dtype) in [
            ("f32", DType::F32),
            ("bf16", DType::BF16),
            ("f16", DType::F16),
        ] {
            let w = |o: usize, n: usize| {
                Tensor::randn(0f32, 0.02, (o, n), &dev)
                    .and_then(|t| t.to_dtype(dtype))
                    .expect("weights")
            };
            let (wg, wu, wd) = (w(i, h), w(i, h), w(h, i));
            let naive = [
                Linear::new(wg.clone(), None),
                Linear::new(wu.clone(), None),
                Linear::new(wd.clone(), None),
            ];
            let ours = GluFeedForward::from_projections(
                &GluConfig::new(h, i),
                Projection::Dense(Linear::new(wg, None)),
                Projection::Dense(Linear::new(wu, None)),
                Projection::Dense(Linear::new(wd, None)),
            )
            .expect("block");
            let mut group = c.benchmark_group(format!("{shape}/{dname}"));
            group.sample_size(10);
            for &t in tokens {
                let x = Tensor::randn(0f32, 1.0, (t, h), &dev)
                    .and_then(|x| x.to_dtype(dtype))
                    .expect("input");
                group.throughput(Throughput::Elements(t as u64));
                group.bench_with_input(BenchmarkId::new("naive", t), &x, |b, x| {
                    b.iter(|| {
                        let g = naive[0].forward(x).and_then(|g| g.silu()).expect("gate");
                        let u = naive[1].forward(x).expect("up");
                        naive[2].forward(&(g * u).expect("mul")).expect("down")
                    })
                });
                group.bench_with_input(BenchmarkId::new("glu", t), &x, |b, x| {
                    b.iter(|| ours.forward(x).expect("forward"))
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, shapes);
criterion_main!(benches);
