//! The AMX tile state, through the public API, where `auto` takes the tiles: the tiles are
//! configured on each worker thread per task and released after it, and the process's
//! permission (asked once, on first use) covers threads started later. A bf16 block's forward
//! from eight threads started after that, again and again, must equal the same forward run
//! alone, bit for bit. (candle's worker pool runs one call at a time, so the eight threads'
//! forwards interleave rather than overlap; each still configures and releases the tiles of the
//! threads it runs on.) Elsewhere: `SKIPPED (no AMX)` (or a failure, when
//! `CANDLE_GLU_REQUIRE_KERNELS` says `amx`).

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::{Activation, ForwardPath, GluConfig, GluFeedForward, Projection};
use candle_nn::Linear;

/// Whether the tiles run in this process; required when CANDLE_GLU_REQUIRE_KERNELS says `amx`.
fn amx_or_skip() -> bool {
    let ran = candle_glu::cpu_kernels().is_some_and(|k| k.amx());
    if let Some(required) = common::required_kernels() {
        assert_eq!(required.starts_with("amx"), ran, "required `{required}`");
    }
    if !ran {
        eprintln!("SKIPPED (no AMX)");
    }
    ran
}

fn block(h: usize, i: usize, act: Activation) -> GluFeedForward {
    let dev = Device::Cpu;
    let w = |seed, o, n| {
        let t = common::randn(seed, (o, n), 0.05, &dev)
            .to_dtype(DType::BF16)
            .unwrap();
        Projection::Dense(Linear::new(t, None))
    };
    let cfg = GluConfig::new(h, i).with_activation(act);
    GluFeedForward::from_projections(&cfg, w(1, i, h), w(2, i, h), w(3, h, i)).unwrap()
}

#[test]
fn new_threads_give_the_same_bits() {
    if !amx_or_skip() {
        return;
    }
    // In place (40 tokens) and packed weight tiles (130), on a layer of several tasks.
    let ffn = block(256, 700, Activation::GeluTanh);
    for tokens in [40, 130] {
        let x = common::randn(7, (tokens, 256), 1.0, &Device::Cpu)
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(ffn.forward_path(&x), ForwardPath::Fused);
        let alone: Vec<u16> = bits(&ffn.forward(&x).unwrap());
        // Threads that did not exist when the permission was asked, each forward on tiles
        // configured and released per task.
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..5 {
                        assert_eq!(bits(&ffn.forward(&x).unwrap()), alone);
                    }
                });
            }
        });
        // And on this thread again, after every task released its tiles.
        assert_eq!(bits(&ffn.forward(&x).unwrap()), alone);
    }
}

fn bits(t: &Tensor) -> Vec<u16> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<half::bf16>()
        .unwrap()
        .into_iter()
        .map(|v| v.to_bits())
        .collect()
}
