//! The AMX tile state, through the public API, where `auto` takes the tiles: the tiles are
//! configured on each worker thread per task and handed back as found after it (released if
//! they were unconfigured; candle's own AMX kernels keep theirs), and the process's
//! permission (asked once, on first use) covers threads started later. A bf16 block's forward
//! from eight threads started after that, again and again, must equal the same forward run
//! alone, bit for bit. (candle's worker pool runs one call at a time, so the eight threads'
//! forwards interleave rather than overlap; each still configures and hands back the tiles of
//! the threads it runs on.) Elsewhere: `SKIPPED (no AMX)` (or a failure, when
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
        // configured and handed back per task.
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..5 {
                        assert_eq!(bits(&ffn.forward(&x).unwrap()), alone);
                    }
                });
            }
        });
        // And on this thread again, after every task handed its tiles back.
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

#[test]
fn candles_own_tiles_survive_ours() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    if !amx_or_skip() {
        return;
    }
    // candle's QMatMul on q4k weights has AMX kernels of its own (candle 0.11), which
    // configure a worker thread's tiles once and keep them: our tasks on the same threads
    // must hand the tiles back as they found them (releasing them made candle's next tile
    // instruction fault: SIGILL). Our bf16 tiles and candle's, in turns, on candle's pool.
    let dev = Device::Cpu;
    let ffn = block(256, 700, Activation::Silu);
    let w = common::randn(4, (512, 1024), 0.05, &dev);
    let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K).unwrap()).unwrap();
    let xq = common::randn(5, (64, 1024), 1.0, &dev);
    let x = common::randn(6, (130, 256), 1.0, &dev)
        .to_dtype(DType::BF16)
        .unwrap();
    let (first_q, first) = (q.forward(&xq).unwrap(), ffn.forward(&x).unwrap());
    for _ in 0..3 {
        // Each result stays what it was the first time, bit for bit.
        assert_eq!(bits(&ffn.forward(&x).unwrap()), bits(&first));
        let yq = q.forward(&xq).unwrap();
        assert_eq!(common::max_abs_diff(&yq, &first_q), 0.0);
    }
}
