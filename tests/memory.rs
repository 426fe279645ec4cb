//! A forward's peak memory: the weights (already resident) plus activations; never a copy of the
//! weights. Measured with a counting global allocator, in its own test binary.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module};
use candle_glu::{ForwardPath, GluConfig, GluFeedForward, Projection};
use candle_nn::Linear;

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = NOW.fetch_add(l.size(), SeqCst) + l.size();
            PEAK.fetch_max(now, SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        NOW.fetch_sub(l.size(), SeqCst);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The counters are process-wide: one measurement at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// And one test at a time, so that no other test's allocations land in a measurement.
static ONE_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_test() -> std::sync::MutexGuard<'static, ()> {
    ONE_TEST.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes allocated at the peak of `f`, above what was live before it.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let base = NOW.load(SeqCst);
    PEAK.store(base, SeqCst);
    let r = f();
    (r, PEAK.load(SeqCst) - base)
}

/// Prints a measured peak, and asserts it is within `bound` and under `weights / share`.
fn assert_peak(what: &str, peak: usize, bound: usize, weights: usize, share: usize) {
    eprintln!(
        "{what}: peak {:.2} MB, weights {:.2} MB",
        peak as f64 / 1e6,
        weights as f64 / 1e6
    );
    assert!(peak <= bound, "{what}: {peak} > {bound}");
    assert!(
        peak < weights / share,
        "{what}: {peak} B of {weights} B weights"
    );
}

#[test]
fn forward_allocates_activations_not_weights() {
    let _one = one_test();
    // candle's own bf16 matmul widens the weights on every call (see below).
    if !common::kernels_or_skip("a fused forward's peak memory (candle's ops copy the weights)") {
        return;
    }
    let dev = Device::Cpu;
    let (h, i, m) = (1024, 2816, 64);
    for dtype in [DType::BF16, DType::F32, DType::F16] {
        let w = |o, n, seed| {
            common::randn(seed, (o, n), 0.02, &dev)
                .to_dtype(dtype)
                .unwrap()
        };
        let lin = |o, n, seed| Projection::Dense(Linear::new(w(o, n, seed), None));
        let ffn = GluFeedForward::from_projections(
            &GluConfig::new(h, i),
            lin(i, h, 1),
            lin(i, h, 2),
            lin(h, i, 3),
        )
        .unwrap();
        let x = common::randn(4, (m, h), 1.0, &dev).to_dtype(dtype).unwrap();
        assert_eq!(ffn.forward_path(&x), ForwardPath::Fused, "{dtype:?}");
        // The first call grows the per-thread scratch (kept between calls): it may hold packed
        // panels, never a weight; a weight-sized scratch would show here and nowhere after.
        let (y, first) = peak_of(|| ffn.forward(&x).unwrap());
        drop(y);
        let (y, peak) = peak_of(|| ffn.forward(&x).unwrap());
        drop(y);
        let size = dtype.size_in_bytes();
        let weights = 3 * h * i * size;
        eprintln!("{dtype:?}: first call's peak {:.2} MB", first as f64 / 1e6);
        assert!(
            first < weights / 4,
            "{dtype:?}: a first forward allocated {first} B of {weights} B weights"
        );
        // One intermediate activation [m, i], plus its f32 copy for the micro-kernel, the input's
        // f32 copy, the output, and the worker pool's bookkeeping.
        let activations = m * i * (size + 4) + m * h * (4 + size);
        eprintln!(
            "{dtype:?}: peak {:.2} MB = {:.2}x the activations bound, {:.3}x the weights",
            peak as f64 / 1e6,
            peak as f64 / activations as f64,
            peak as f64 / weights as f64
        );
        assert!(
            peak <= activations + (1 << 20),
            "{dtype:?}: {peak} > {activations}"
        );
        assert!(
            peak < weights / 4,
            "{dtype:?}: a forward allocated {peak} B of {weights} B weights"
        );
    }
}

#[test]
fn the_counter_sees_a_weight_copy() {
    let _one = one_test();
    // candle's own bf16 matmul widens the whole weight to f32 on every call: the measurement
    // above would catch a path that did the same.
    let dev = Device::Cpu;
    let (h, i, m) = (1024, 2816, 64);
    let w = common::randn(1, (i, h), 0.02, &dev)
        .to_dtype(DType::BF16)
        .unwrap();
    let x = common::randn(2, (m, h), 1.0, &dev)
        .to_dtype(DType::BF16)
        .unwrap();
    let lin = Linear::new(w, None);
    lin.forward(&x).unwrap();
    let (_, peak) = peak_of(|| lin.forward(&x).unwrap());
    eprintln!(
        "candle bf16 Linear: peak {:.2} MB for {:.2} MB of weights",
        peak as f64 / 1e6,
        (h * i * 2) as f64 / 1e6
    );
    assert!(peak >= h * i * 2, "{peak}");
}

/// Random weights of `[o, n]` quantized to `dtype`, in a `QMatMul`, and their size in bytes.
fn quantized(
    o: usize,
    n: usize,
    dtype: candle_core::quantized::GgmlDType,
    seed: u64,
) -> (QMatMul, usize) {
    let w = common::randn(seed, (o, n), 0.02, &Device::Cpu);
    let q = candle_core::quantized::QTensor::quantize(&w, dtype).unwrap();
    let bytes = q.storage_size_in_bytes();
    (QMatMul::from_qtensor(q).unwrap(), bytes)
}

#[test]
fn quantized_forwards_read_the_blocks_in_place() {
    let _one = one_test();
    use candle_core::quantized::GgmlDType;
    // Without them, GGUF weights run through candle's QMatMul, which copies q8_0 and q4k.
    if !common::kernels_or_skip("the Q4_1 kernels' peak memory") {
        return;
    }
    let vnni = common::int8_kernels_or_skip("the q8_0 and q4k kernels' peak memory");
    let (h, i) = (2048, 5632);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
        if dtype != GgmlDType::Q4_1 && !vnni {
            continue;
        }
        let (g, bg) = quantized(i, h, dtype, 1);
        let (u, bu) = quantized(i, h, dtype, 2);
        let (d, bd) = quantized(h, i, dtype, 3);
        let weights = bg + bu + bd;
        let ffn = GluFeedForward::from_projections(
            &GluConfig::new(h, i),
            Projection::quantized(g, None),
            Projection::quantized(u, None),
            Projection::quantized(d, None),
        )
        .unwrap();
        // The first calls too: a copy made once and cached (as candle's QMatMul does for q8_0
        // and q4k on AVX512-VNNI CPUs) would show there. 1, 9 and 64 tokens: decode, and the
        // packed schedule with one and with many token tiles (on AMX, 64 tokens take the tiles,
        // whose per-thread buffers are scratch as well).
        for m in [1, 9, 64, 1, 9, 64] {
            let x = common::randn(m as u64, (m, h), 1.0, &Device::Cpu);
            assert_eq!(
                ffn.forward_path(&x),
                ForwardPath::Quantized,
                "{dtype:?}, {m} tokens"
            );
            let (y, peak) = peak_of(|| ffn.forward(&x).unwrap());
            drop(y);
            // Activations ([m, i] twice at most, input and output; their 8-bit copies with
            // scales, 2 bytes a value at most) and per-thread scratch.
            let bound = 2 * m * i * 4 + 2 * m * i + 2 * m * h * 4 + (4 << 20);
            assert_peak(&format!("{dtype:?}, {m} tokens"), peak, bound, weights, 2);
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn candle_keeps_a_repacked_copy_of_q8_0_and_q4k_weights() {
    let _one = one_test();
    // README, Performance: why this crate reads q8_0 and q4k weights itself rather than through
    // candle's QMatMul. Should candle stop keeping the copy, this fails, and the README must
    // change.
    use candle_core::quantized::GgmlDType;
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let vnni = is_x86_feature_detected!("avx512vnni") || is_x86_feature_detected!("avxvnni");
    for (dtype, repacks) in [(GgmlDType::Q4K, avx2), (GgmlDType::Q8_0, avx2 && vnni)] {
        let (mm, bytes) = quantized(5632, 2048, dtype, 1);
        let x = common::randn(2, (1, 2048), 1.0, &Device::Cpu);
        let (_, first) = peak_of(|| mm.forward(&x).unwrap());
        let (_, second) = peak_of(|| mm.forward(&x).unwrap());
        eprintln!(
            "candle QMatMul {dtype:?}: first call {:.2} MB, second {:.2} MB, for {:.2} MB of weights",
            first as f64 / 1e6,
            second as f64 / 1e6,
            bytes as f64 / 1e6
        );
        if repacks {
            assert!(first >= bytes, "{dtype:?}: {first} B < {bytes} B");
            assert!(second < bytes / 10, "{dtype:?}: {second} B");
        } else {
            // A CPU with the kernels CI requires has AVX2 (and AVX512-VNNI where it requires
            // the int8 kernels): there candle repacks, and this must not skip.
            let required = common::required_kernels();
            let implied = match dtype {
                GgmlDType::Q8_0 => required.is_some_and(|r| r.contains("int8: vnni")),
                _ => required.is_some(),
            };
            assert!(
                !implied,
                "{dtype:?}: CANDLE_GLU_REQUIRE_KERNELS is set, yet this CPU takes candle's \
                 unpacked path"
            );
            eprintln!("SKIPPED: this CPU takes candle's unpacked {dtype:?} path");
        }
    }
}

#[test]
fn experts_read_their_blocks_in_place() {
    let _one = one_test();
    use candle_core::quantized::GgmlDType;
    use candle_glu::{GluExperts, MoeConfig};
    if !common::kernels_or_skip("the experts' peak memory (candle's QMatMul copies q8_0/q4k)") {
        return;
    }
    let vnni = common::int8_kernels_or_skip("q8_0 and q4k experts' peak memory");
    let (h, i, e) = (1024, 1536, 8);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
        if dtype != GgmlDType::Q4_1 && !vnni {
            continue;
        }
        let mut weights = 0;
        let experts: Vec<GluFeedForward> = (0..e as u64)
            .map(|x| {
                let mut proj = |o, n, seed| {
                    let (q, bytes) = quantized(o, n, dtype, seed);
                    weights += bytes;
                    Projection::quantized(q, None)
                };
                let (g, u, d) = (
                    proj(i, h, 3 * x),
                    proj(i, h, 3 * x + 1),
                    proj(h, i, 3 * x + 2),
                );
                GluFeedForward::from_projections(&GluConfig::new(h, i), g, u, d).unwrap()
            })
            .collect();
        let cfg = MoeConfig::new(GluConfig::new(h, i), e, 2);
        let router = common::randn(99, (e, h), 0.5, &Device::Cpu);
        let moe = GluExperts::from_parts(&cfg, router, None, experts, None, None).unwrap();
        // The first calls too (a copy made once and cached would show there): 1 token (two
        // experts), 9, 64 (every expert, some on the tiles where the CPU has AMX).
        for m in [1, 9, 64, 1, 9, 64] {
            let x = common::randn(m as u64, (m, h), 1.0, &Device::Cpu);
            let (y, peak) = peak_of(|| moe.forward(&x).unwrap());
            drop(y);
            // Per token and expert chosen: its input, intermediate and output, with their
            // 8-bit copies; the f32 sums over the tokens and their host copy; the router's
            // scores; and per-thread scratch.
            let bound = 2 * m * 2 * (h + i) * 5 + 4 * m * h * 4 + (4 << 20);
            let what = format!("experts {dtype:?}, {m} tokens");
            assert_peak(&what, peak, bound, weights, 4);
        }
    }
}

#[test]
fn gguf_experts_load_without_a_stacked_or_dequantized_copy() {
    let _one = one_test();
    use candle_glu::loading::{Checkpoint, LoadOptions};
    // Mixtral-style q4k experts, stacked [8, 256, 256] per projection in the file.
    let path = common::fixtures().join("moe_gguf").join("mixtral.gguf");
    let ckpt = Checkpoint::open(&path).unwrap();
    let cfg = ckpt.moe_config().unwrap().unwrap();
    let opts = LoadOptions::new(DType::F32, Device::Cpu);
    let stored = 3 * 8 * 256 * 256 / 256 * 144;
    let (moe, peak) = peak_of(|| ckpt.load_experts(&cfg, 0, &opts).unwrap());
    let f32_copy = 3 * 8 * 256 * 256 * 4;
    eprintln!(
        "GGUF experts loaded: peak {:.2} MB for {:.2} MB stored ({:.2} MB in f32)",
        peak as f64 / 1e6,
        stored as f64 / 1e6,
        f32_copy as f64 / 1e6
    );
    // The experts as stored (each stacked tensor read once, in place), the f32 router and the
    // reader's buffer.
    assert!(peak <= stored + (64 << 10), "{peak} > {stored}");
    assert!(moe.expert(7).unwrap().down_proj().is_quantized());
    // One tensor read quantized: its bytes, once (candle's own reader holds them twice, read
    // and then copied into blocks).
    let gguf = ckpt.gguf().unwrap();
    let (down, peak) = peak_of(|| {
        gguf.qtensor("blk.0.ffn_down_exps.weight", &Device::Cpu)
            .unwrap()
    });
    let bytes = down.storage_size_in_bytes();
    assert_eq!(bytes, stored / 3);
    assert!(peak <= bytes + (16 << 10), "{peak} > {bytes}");
}

#[test]
fn dense_experts_stacked_as_transformers_keeps_them_are_not_copied() {
    let _one = one_test();
    use candle_glu::{GluExperts, MoeConfig};
    if !common::kernels_or_skip("dense experts' peak memory (candle's bf16 matmul copies)") {
        return;
    }
    let dev = Device::Cpu;
    let (h, i, e) = (1024, 1536, 8);
    for dtype in [DType::BF16, DType::F32] {
        let t = |seed, shape: (usize, usize, usize)| {
            common::randn(seed, shape, 0.02, &dev)
                .to_dtype(dtype)
                .unwrap()
        };
        let mut ws = std::collections::HashMap::new();
        ws.insert(
            "gate.weight".to_string(),
            t(1, (1, e, h)).squeeze(0).unwrap(),
        );
        ws.insert("experts.gate_up_proj".to_string(), t(2, (e, 2 * i, h)));
        ws.insert("experts.down_proj".to_string(), t(3, (e, h, i)));
        let vb = candle_nn::VarBuilder::from_tensors(ws, dtype, &dev);
        let moe = GluExperts::new(&MoeConfig::new(GluConfig::new(h, i), e, 2), vb).unwrap();
        let weights = 3 * e * h * i * dtype.size_in_bytes();
        for m in [1, 9, 64, 1, 9, 64] {
            let x = common::randn(m as u64, (m, h), 1.0, &dev)
                .to_dtype(dtype)
                .unwrap();
            let (y, peak) = peak_of(|| moe.forward(&x).unwrap());
            drop(y);
            let bound = 2 * m * 2 * (h + i) * 8 + 4 * m * h * 4 + (4 << 20);
            let what = format!("stacked {dtype:?} experts, {m} tokens");
            assert_peak(&what, peak, bound, weights, 4);
        }
    }
}
