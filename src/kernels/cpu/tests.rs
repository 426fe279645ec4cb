//! The fast kernels against their plain twins: float64 sums and closed-form activations, at
//! sizes that are not multiples of the vector width (16), the tile (12 × 32) or the block (512).

use half::{bf16, f16};

use super::avx512::{self, Dense, Encoding, Q4K, Q4_1, Q8_0};
use super::element::Element;
use super::{int8, matmul, quant_kernel, quant_matmul, quant_tiles, tiled, vnni};
use super::{Bias, Compute, Mat, QuantType, Weights};
use crate::kernels::detect::features;
use crate::kernels::detect::MicroKernel;
use crate::Activation;

/// `σ(x·Wgᵀ + bg) ⊙ (x·Wuᵀ + bu)` through the float schedules.
#[allow(clippy::too_many_arguments)]
unsafe fn gate_up<T: Element, E: Encoding>(
    x: &[T],
    m: usize,
    k: usize,
    (wg, wu): (Mat<'_>, Mat<'_>),
    n: usize,
    act: Activation,
    bias: Bias<'_>,
    compute: Compute,
) -> Vec<T> {
    // SAFETY: the caller's contract is `matmul`'s.
    unsafe { matmul::<T, E>(x, m, k, Weights::GateUp(wg, wu, act), n, bias, compute) }
}

/// `x·Wᵀ + b` through the float schedules.
unsafe fn linear<T: Element, E: Encoding>(
    x: &[T],
    m: usize,
    k: usize,
    w: Mat<'_>,
    n: usize,
    bias: Option<&[f32]>,
    compute: Compute,
) -> Vec<T> {
    let bias = Bias { a: bias, b: None };
    // SAFETY: the caller's contract is `matmul`'s.
    unsafe { matmul::<T, E>(x, m, k, Weights::Single(w), n, bias, compute) }
}

/// σ in float64, from the closed forms (written without cancellation in the far left tail:
/// 1 + erf(-8) and 1 + tanh(-8) are 0 in float64).
fn act64(act: Activation, x: f64) -> f64 {
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    match act {
        Activation::Sigmoid => sig(x),
        Activation::Identity => x,
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2),
        Activation::GeluTanh => {
            // ½x(1 + tanh u) = x·sigmoid(2u)
            let c = (2.0 / std::f64::consts::PI).sqrt();
            x * sig(2.0 * c * (x + 0.044715 * x * x * x))
        }
        // Swish-β: β in f32, as the kernels take it.
        Activation::Silu | Activation::Swish { .. } | Activation::QuickGelu => {
            let beta = act.swish_beta().unwrap_or(1.0) as f32;
            x * sig(beta as f64 * x)
        }
    }
}

fn all_acts() -> Vec<Activation> {
    Activation::ALL.to_vec()
}

/// A deterministic pseudo-random sequence in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `CANDLE_GLU_REQUIRE_KERNELS` (set by CI from `scripts/expected_kernels.sh`): the kernels
/// that must run, as [`crate::cpu_kernels`] prints them; `None` when unset or empty.
fn required() -> Option<String> {
    std::env::var("CANDLE_GLU_REQUIRE_KERNELS")
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether the kernels that `what` needs run here (`ok`). When they do not, the test skips,
/// saying so, unless `CANDLE_GLU_REQUIRE_KERNELS` names kernels (`needed` says whether the
/// named set includes these): then it panics, naming the kernels required and those that ran.
/// It panics too whenever the kernels that ran are not the ones required.
fn or_skip(ok: bool, needed: impl Fn(&str) -> bool, what: &str) -> bool {
    if let Some(required) = required() {
        let ran = crate::cpu_kernels().map_or("none (candle's ops)".into(), |k| k.to_string());
        assert_eq!(
            ran, required,
            "CANDLE_GLU_REQUIRE_KERNELS names other kernels than those that ran"
        );
        assert!(
            ok || !needed(&required),
            "CANDLE_GLU_REQUIRE_KERNELS=`{required}` but {what} cannot run here (kernels that \
             ran: {ran})"
        );
    }
    if !ok {
        eprintln!("SKIPPED: {what} cannot run on this CPU (or CANDLE_GLU_KERNELS turned it off)");
    }
    ok
}

/// The AVX-512 kernels (every float and Q4_1 micro-kernel and schedule).
fn avx512() -> bool {
    or_skip(features().avx512(), |_| true, "the AVX-512 kernels")
}

/// The AVX512-VNNI kernels (q8_0, q4k): required when the required set says `int8: vnni`.
fn vnni() -> bool {
    let needed = |r: &str| r.contains("int8: vnni");
    or_skip(
        features().vnni(),
        needed,
        "the AVX512-VNNI (q8_0/q4k) kernels",
    )
}

/// The bf16 dot-product micro-kernel (VDPBF16PS), tested wherever the CPU has it (on Intel
/// `auto` does not choose it): required when the required set is `avx512-bf16`.
fn bf16_dot() -> bool {
    let ok = features().avx512() && std::arch::is_x86_feature_detected!("avx512bf16");
    let needed = |r: &str| r.starts_with("avx512-bf16");
    or_skip(ok, needed, "the bf16 dot-product kernel (AVX512-BF16)")
}

/// The AMX tile kernels, tested wherever the CPU has AMX and this process may use it (also when
/// another set was forced): required when the required set is `amx`. Elsewhere: `SKIPPED (no
/// AMX)`.
fn amx() -> bool {
    let ok = features().avx512() && crate::kernels::detect::amx_usable();
    let ran = or_skip(ok, |r| r.starts_with("amx"), "the AMX tile kernels");
    if !ran {
        eprintln!("SKIPPED (no AMX)");
    }
    ran
}

#[test]
fn activations_match_float64() {
    if !avx512() {
        return;
    }
    let mut xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 100.0).collect();
    xs.extend([
        -88.0,
        -87.0,
        88.0,
        89.0,
        -1e-30,
        1e-30,
        f32::MIN_POSITIVE,
        1e6,
        -1e6,
    ]);
    for act in all_acts() {
        let mut out = vec![0f32; xs.len()];
        let ones = vec![1f32; xs.len()];
        // SAFETY: AVX-512 checked; all buffers hold xs.len() values.
        unsafe { avx512::gated(act, xs.as_ptr(), ones.as_ptr(), out.as_mut_ptr(), xs.len()) };
        for (x, y) in xs.iter().zip(&out) {
            let want = act64(act, *x as f64);
            let err = (*y as f64 - want).abs();
            // In the far left tail (below 1e-4 past |x| = 4, 1e-15 past 8) f32's rounding of x²
            // alone moves e^(-x²/2) by x²·2^-24 relative.
            let rtol = match x.abs() {
                a if a <= 4.0 => 2e-6,
                a if a <= 8.0 => 1e-5,
                _ => 1e-4,
            };
            assert!(
                err <= rtol * want.abs() + 1e-30,
                "{act:?}({x}) = {y}, want {want}"
            );
        }
        // NaN propagates, and ±inf gives what the float64 forms give, as PyTorch does
        // (SiLU(-inf) is NaN, -inf times a sigmoid of 0; ReLU(-inf) is 0).
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let mut out = [0f32; 3];
        // SAFETY: AVX-512 checked; three values each.
        unsafe {
            avx512::gated(
                act,
                special.as_ptr(),
                [1f32; 3].as_ptr(),
                out.as_mut_ptr(),
                3,
            )
        };
        assert!(out[0].is_nan(), "{act:?}(NaN) = {}", out[0]);
        for (i, x) in [(1, f64::INFINITY), (2, f64::NEG_INFINITY)] {
            let want = act64(act, x);
            let got = f64::from(out[i]);
            assert!(
                got == want || (got.is_nan() && want.is_nan()),
                "{act:?}({x}) = {got}, want {want}"
            );
        }
    }
}

fn check_gate_up<T: Element>(
    m: usize,
    k: usize,
    n: usize,
    act: Activation,
    compute: Compute,
    tol: f64,
) {
    let round = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(T::from_f32).collect() };
    let x = round(values(m * k, 1));
    let wg = round(values(n * k, 2));
    let wu = round(values(n * k, 3));
    // Biases on odd sizes only, so both kinds of call are covered.
    let with_bias = (m + n) % 2 == 1;
    let (bg, bu) = (values(n, 4), values(n, 5));
    let bias = if with_bias {
        Bias {
            a: Some(&bg),
            b: Some(&bu),
        }
    } else {
        Bias::default()
    };
    let (g, u) = (Mat::dense(&wg, k), Mat::dense(&wu, k));
    // SAFETY: AVX-512 checked by the callers; slices have the sizes given.
    let h = unsafe { gate_up::<T, Dense<T>>(&x, m, k, (g, u), n, act, bias, compute) };
    // SAFETY: as above.
    let y = unsafe { linear::<T, Dense<T>>(&x, m, k, g, n, bias.a, compute) };
    let (bg, bu): (Vec<f64>, Vec<f64>) = if with_bias {
        (
            bg.iter().map(|v| *v as f64).collect(),
            bu.iter().map(|v| *v as f64).collect(),
        )
    } else {
        (vec![0.0; n], vec![0.0; n])
    };
    let dot = |a: &[T], b: &[T]| {
        a.iter()
            .zip(b)
            .map(|(a, b)| a.to_f32() as f64 * b.to_f32() as f64)
            .sum::<f64>()
    };
    let (mut worst_h, mut max_h, mut worst_y, mut max_y) = (0f64, 0f64, 0f64, 0f64);
    for t in 0..m {
        let xr = &x[t * k..(t + 1) * k];
        for j in 0..n {
            let g = dot(xr, &wg[j * k..(j + 1) * k]) + bg[j];
            let u = dot(xr, &wu[j * k..(j + 1) * k]) + bu[j];
            let want = act64(act, g) * u;
            worst_h = worst_h.max(diff(h[t * n + j].to_f32() as f64, want));
            max_h = max_h.max(want.abs());
            worst_y = worst_y.max(diff(y[t * n + j].to_f32() as f64, g));
            max_y = max_y.max(g.abs());
        }
    }
    let (rh, ry) = (worst_h / max_h.max(1e-30), worst_y / max_y.max(1e-30));
    assert!(
        rh <= tol && ry <= tol,
        "{:?} m{m} k{k} n{n} {act:?} {compute:?}: gate_up {rh:e}, linear {ry:e}",
        T::DTYPE
    );
}

/// The tiled schedule (AMX) and its edges: tokens around the tiles of 16 and their pairs, and
/// past the count from which weight tiles are packed (96); depths that are not a multiple of
/// the 32-value step (packed panels) or that outgrow one depth block (4096, or 256 once the
/// tokens' block reaches 2 MiB: 270 tokens of 4001); columns that end in a partial panel or
/// span several tasks.
const AMX_SIZES: [(usize, usize, usize); 13] = [
    (4, 32, 16),
    (5, 64, 7),
    (16, 72, 33),
    (17, 577, 65),
    (31, 1030, 17),
    (33, 128, 184),
    (61, 31, 129),
    (20, 4160, 33),
    (100, 4096, 48),
    (130, 4500, 20),
    (270, 4001, 40),
    // A single matrix over several tasks (256 columns a task), in place and packed.
    (20, 64, 300),
    (130, 96, 520),
];

#[test]
fn amx_kernels_match_float64() {
    if !amx() {
        return;
    }
    for (m, k, n) in AMX_SIZES {
        for act in all_acts() {
            // One rounding of the output to bf16.
            check_gate_up::<bf16>(m, k, n, act, Compute::Amx, 2f64.powi(-8));
        }
    }
}

/// The schedules (dot for ≤ 16 tokens, packed above) and their edges.
const SIZES: [(usize, usize, usize); 12] = [
    (1, 1, 1),
    (20, 0, 7),
    (1, 72, 184),
    (2, 15, 7),
    (3, 577, 33),
    (5, 1030, 17),
    (12, 2085, 9),
    (16, 129, 65),
    (17, 72, 184),
    (29, 513, 300),
    (36, 1100, 16),
    (61, 31, 129),
];

#[test]
fn f32_kernels_match_float64() {
    if !avx512() {
        return;
    }
    for (m, k, n) in SIZES {
        for act in all_acts() {
            check_gate_up::<f32>(m, k, n, act, Compute::Fma, 2e-6);
        }
    }
}

#[test]
fn half_kernels_match_float64() {
    if !avx512() {
        return;
    }
    let dp = bf16_dot();
    for (m, k, n) in SIZES {
        for act in [Activation::Silu, Activation::Gelu, Activation::Relu] {
            // One rounding of the output to 8 (bf16) or 11 (f16) significant bits.
            check_gate_up::<bf16>(m, k, n, act, Compute::Fma, 2f64.powi(-8));
            check_gate_up::<f16>(m, k, n, act, Compute::Fma, 2f64.powi(-11));
            if dp {
                check_gate_up::<bf16>(m, k, n, act, Compute::Bf16Dot, 2f64.powi(-8));
            }
        }
    }
}

#[test]
fn conversions_round_to_nearest_even() {
    if !avx512() {
        return;
    }
    let mut src = values(1000, 9);
    src.extend([
        f32::NAN,
        f32::INFINITY,
        -0.0,
        1e-40,
        65504.0,
        65520.0,
        3.0e38,
        1.0 + 1.0 / 256.0,
    ]);
    let mut b = vec![bf16::ZERO; src.len()];
    let mut h = vec![f16::ZERO; src.len()];
    let mut back = vec![0f32; src.len()];
    // SAFETY: AVX-512 checked; every buffer holds src.len() values.
    unsafe {
        avx512::narrow(src.as_ptr(), b.as_mut_ptr(), src.len());
        avx512::narrow(src.as_ptr(), h.as_mut_ptr(), src.len());
        avx512::widen(b.as_ptr(), back.as_mut_ptr(), src.len());
    }
    for (i, v) in src.iter().enumerate() {
        let (want_b, want_h) = (bf16::from_f32(*v), f16::from_f32(*v));
        assert!(
            b[i] == want_b || (v.is_nan() && b[i].is_nan()),
            "bf16({v}) = {}",
            b[i]
        );
        assert!(
            h[i] == want_h || (v.is_nan() && h[i].is_nan()),
            "f16({v}) = {}",
            h[i]
        );
        assert!(back[i] == b[i].to_f32() || v.is_nan());
    }
}

#[test]
fn q4_1_kernels_match_dequantized_float64() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    if !avx512() {
        return;
    }
    for (m, k, n) in [
        (1, 32, 1),
        (3, 576, 37),
        (16, 64, 100),
        (7, 2080, 21),
        (17, 96, 33),
        (40, 1536, 70),
    ] {
        let q = |seed| {
            let v = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
            QTensor::quantize(&v, GgmlDType::Q4_1).unwrap()
        };
        let (qg, qu) = (q(7), q(8));
        let deq = |q: &QTensor| -> Vec<f32> {
            q.dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (dg, du) = (deq(&qg), deq(&qu));
        let (bg, bu) = (qg.data().unwrap(), qu.data().unwrap());
        let x = values(m * k, 9);
        let rb = Q4_1::row_bytes(k);
        let (g, u) = (Mat::blocks(&bg, rb), Mat::blocks(&bu, rb));
        let act = Activation::Silu;
        // SAFETY: AVX-512 checked; the blocks hold n rows of k values.
        let h = unsafe {
            gate_up::<f32, Q4_1>(&x, m, k, (g, u), n, act, Bias::default(), Compute::Fma)
        };
        // SAFETY: as above.
        let y = unsafe { linear::<f32, Q4_1>(&x, m, k, g, n, None, Compute::Fma) };
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        let (mut worst, mut max) = (0f64, 0f64);
        for t in 0..m {
            let xr = &x[t * k..(t + 1) * k];
            for j in 0..n {
                let gs = dot(xr, &dg[j * k..(j + 1) * k]);
                let us = dot(xr, &du[j * k..(j + 1) * k]);
                let want = act64(act, gs) * us;
                worst = worst
                    .max(diff(h[t * n + j] as f64, want))
                    .max(diff(y[t * n + j] as f64, gs));
                max = max.max(want.abs()).max(gs.abs());
            }
        }
        assert!(worst <= 2e-6 * max, "m{m} k{k} n{n}: {worst:e} of {max:e}");
    }
}

/// |got − want|, with a NaN on either side an infinite difference: `f64::max` drops a NaN, so
/// a kernel that wrote NaN would otherwise leave the worst error at 0.
fn diff(got: f64, want: f64) -> f64 {
    match (got - want).abs() {
        d if d.is_nan() => f64::INFINITY,
        d => d,
    }
}

/// Activations rounded as the VNNI kernels round them, in plain Rust: per block of `block`
/// values, `d = max|x| / 127`, `q = round(x / d)` to nearest even; returned as the values `d·q`
/// (f64).
fn rounded_activations(x: &[f32], block: usize) -> Vec<f64> {
    x.chunks(block)
        .flat_map(|b| {
            let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (d, id) = if amax == 0.0 {
                (0.0, 0.0)
            } else {
                (amax / 127.0, 127.0 / amax)
            };
            b.iter()
                .map(move |v| (v * id).round_ties_even() as f64 * d as f64)
        })
        .collect()
}

#[test]
fn int8_kernels_match_float64_over_rounded_activations() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use vnni::Kind;
    if !vnni() {
        return;
    }
    // Token counts in both schedules (dot up to 4, packed) and on both sides of the 6-token
    // tile (last tiles of 1 to 5 tokens); k past the 1024-deep weight block (which
    // the packed schedule uses past 1 MiB of tokens' codes), with an odd number of q8_0 blocks;
    // n not a multiple of 16 or 32.
    let q8_sizes = vec![
        (1, 32, 1),
        (1, 2080, 21),
        (1, 96, 37),
        (2, 96, 37),
        (4, 2080, 21),
        (5, 2080, 21),
        (9, 544, 9),
        (13, 96, 9),
        (15, 96, 33),
        (17, 96, 33),
        (40, 2080, 70),
        // Past 1 MiB of tokens' codes, blocks of 1024 values (81 blocks: an odd tail).
        (410, 2592, 40),
    ];
    let q4k_sizes = vec![
        (1, 256, 1),
        (1, 2304, 21),
        (1, 768, 37),
        (2, 512, 13),
        (3, 512, 37),
        (4, 768, 19),
        (6, 2304, 21),
        (7, 256, 9),
        (9, 512, 13),
        (17, 1280, 33),
        (40, 2560, 70),
        (410, 2560, 40),
    ];
    // Q4_1 over 8-bit activations: the dot schedule at any token count (the dispatch takes it
    // up to `int8::Q4_1_DOT_MAX_TOKENS`); odd numbers of blocks (1, 3, 65).
    let q4_1_sizes = vec![
        (1, 32, 1),
        (1, 96, 33),
        (2, 576, 13),
        (3, 1536, 37),
        (4, 64, 9),
        (5, 2080, 21),
        (17, 96, 33),
    ];
    for (dtype, sizes) in [
        (GgmlDType::Q8_0, q8_sizes),
        (GgmlDType::Q4K, q4k_sizes),
        (GgmlDType::Q4_1, q4_1_sizes),
    ] {
        for (m, k, n) in sizes {
            let q = |seed| {
                let v = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
                QTensor::quantize(&v, dtype).unwrap()
            };
            let (qg, qu) = (q(7), q(8));
            let deq = |q: &QTensor| -> Vec<f32> {
                let t = q.dequantize(&Device::Cpu).unwrap();
                t.flatten_all().unwrap().to_vec1().unwrap()
            };
            let (dg, du) = (deq(&qg), deq(&qu));
            let (bg, bu) = (qg.data().unwrap(), qu.data().unwrap());
            let mut x = values(m * k, 9);
            // A block of zeros and one of a single value: the rounding's edge cases.
            x[..32].fill(0.0);
            if k >= 64 {
                x[32..64].fill(0.0);
                x[40] = -0.5;
            }
            let (rb, kind) = match dtype {
                GgmlDType::Q4_1 => (QuantType::Q4_1.row_bytes(k), None),
                GgmlDType::Q8_0 => (Kind::Q8_0.row_bytes(k), Some(Kind::Q8_0)),
                _ => (Kind::Q4K.row_bytes(k), Some(Kind::Q4K)),
            };
            let (g, u) = (Mat::blocks(&bg, rb), Mat::blocks(&bu, rb));
            let act = Activation::Silu;
            let matmul = |w| match kind {
                // SAFETY: VNNI checked; the blocks hold n rows of k values.
                Some(kind) => unsafe { int8::matmul(&x, m, k, w, n, kind) },
                // SAFETY: as above.
                None => unsafe { int8::matmul_q4_1(&x, m, k, w, n) },
            };
            let h = matmul(Weights::GateUp(g, u, act));
            let y = matmul(Weights::Single(g));
            // One scale per 32 values; per 256 (a super-block) for q4k.
            let block = if kind == Some(Kind::Q4K) { 256 } else { 32 };
            let xr = rounded_activations(&x, block);
            let dot =
                |a: &[f64], b: &[f32]| a.iter().zip(b).map(|(a, b)| a * *b as f64).sum::<f64>();
            let exact: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let (mut worst, mut rounding, mut max) = (0f64, 0f64, 0f64);
            for t in 0..m {
                let (xt, et) = (&xr[t * k..(t + 1) * k], &exact[t * k..(t + 1) * k]);
                for j in 0..n {
                    let gs = dot(xt, &dg[j * k..(j + 1) * k]);
                    let us = dot(xt, &du[j * k..(j + 1) * k]);
                    let want = act64(act, gs) * us;
                    worst = worst
                        .max(diff(h[t * n + j] as f64, want))
                        .max(diff(y[t * n + j] as f64, gs));
                    // Against the unrounded activations: only the 8-bit rounding apart.
                    let ge = dot(et, &dg[j * k..(j + 1) * k]);
                    rounding = rounding.max(diff(y[t * n + j] as f64, ge));
                    max = max.max(want.abs()).max(gs.abs());
                }
            }
            let what = format!("{dtype:?} m{m} k{k} n{n}");
            assert!(worst <= 2e-6 * max, "{what}: {worst:e} of {max:e}");
            assert!(
                rounding <= 2e-2 * max,
                "{what}: rounding {rounding:e} of {max:e}"
            );
        }
    }
}

/// `y` (`m` tokens of `n` outputs) for inputs whose token 0 holds a NaN and token 1 (if any)
/// an infinity: token 0's outputs are NaN, token 1's not finite (NaN where `inf_gives_nan`),
/// every other token's finite.
fn assert_poisoned_only<T: Element>(y: &[T], m: usize, n: usize, inf_gives_nan: bool, what: &str) {
    for t in 0..m {
        let row = y[t * n..(t + 1) * n].iter().map(|v| v.to_f32());
        let ok = match t {
            0 => row.into_iter().all(f32::is_nan),
            1 if inf_gives_nan => row.into_iter().all(f32::is_nan),
            1 => row.into_iter().all(|v| !v.is_finite()),
            _ => row.into_iter().all(f32::is_finite),
        };
        assert!(ok, "{what} m{m}: token {t}'s outputs");
    }
}

#[test]
fn int8_kernels_keep_nan_to_its_token() {
    use candle_core::quantized::GgmlDType;

    use vnni::Kind;
    if !vnni() {
        return;
    }
    let (k, n) = (512, 40);
    for (kind, dtype) in [
        (Some(Kind::Q8_0), GgmlDType::Q8_0),
        (Some(Kind::Q4K), GgmlDType::Q4K),
        (None, GgmlDType::Q4_1),
    ] {
        let (data, _) = quantized(dtype, n, k, 3);
        let rb = kind.map_or(QuantType::Q4_1.row_bytes(k), |kind| kind.row_bytes(k));
        let w = Mat::blocks(&data, rb);
        // A token of each schedule gets a NaN (and one an infinity): only its outputs are NaN.
        for m in [1, 4, 20] {
            let mut x = values(m * k, 4);
            x[5] = f32::NAN;
            if m > 1 {
                x[k + 7] = f32::INFINITY;
            }
            let y = match kind {
                // SAFETY: VNNI checked; the blocks hold n rows of k values.
                Some(kind) => unsafe { int8::matmul(&x, m, k, Weights::Single(w), n, kind) },
                // SAFETY: as above.
                None => unsafe { int8::matmul_q4_1(&x, m, k, Weights::Single(w), n) },
            };
            // An infinity makes its block's 8-bit scale infinite: NaN too.
            assert_poisoned_only(&y, m, n, true, &format!("{dtype:?}"));
        }
    }
}

/// One token alone (rows taken one or two at a time, start to end) gives the bits it gets
/// inside a batch of the dot schedule (rows taken in lockstep): the two orders do the same
/// arithmetic per row.
#[test]
fn int8_one_token_matches_its_batch_bit_for_bit() {
    use candle_core::quantized::GgmlDType;

    use vnni::Kind;
    if !vnni() {
        return;
    }
    // n not a multiple of the 8 rows a call (its last rows repeat) nor of the row pairs; odd
    // numbers of q8_0 blocks (65, 3) and of q4k super-blocks (9, 1).
    for (kind, dtype, k) in [
        (Some(Kind::Q8_0), GgmlDType::Q8_0, 2080),
        (Some(Kind::Q8_0), GgmlDType::Q8_0, 96),
        (Some(Kind::Q4K), GgmlDType::Q4K, 2304),
        (Some(Kind::Q4K), GgmlDType::Q4K, 256),
        (None, GgmlDType::Q4_1, 2080),
    ] {
        for n in [21, 37] {
            let (gate, _) = quantized(dtype, n, k, 5);
            let (up, _) = quantized(dtype, n, k, 6);
            let rb = kind.map_or(QuantType::Q4_1.row_bytes(k), |kind| kind.row_bytes(k));
            let (g, u) = (Mat::blocks(&gate, rb), Mat::blocks(&up, rb));
            let run = |x: &[f32], m: usize, w: Weights<'_>| match kind {
                // SAFETY: VNNI checked; the blocks hold n rows of k values.
                Some(kind) => unsafe { int8::matmul(x, m, k, w, n, kind) },
                // SAFETY: as above.
                None => unsafe { int8::matmul_q4_1(x, m, k, w, n) },
            };
            let x = values(5 * k, 8);
            for w in [Weights::Single(g), Weights::GateUp(g, u, Activation::Silu)] {
                let alone: Vec<Vec<f32>> =
                    (0..5).map(|t| run(&x[t * k..(t + 1) * k], 1, w)).collect();
                // Batches of every width the dot schedule's kernels take (2, 3, 4; Q4_1's, which
                // keeps that schedule past 4 tokens, 2 + 2 + 1 too).
                let widest = if kind.is_some() {
                    int8::DOT_MAX_TOKENS
                } else {
                    5
                };
                for m in 2..=widest {
                    let batch = run(&x[..m * k], m, w);
                    for (t, alone) in alone[..m].iter().enumerate() {
                        let same = alone
                            .iter()
                            .zip(&batch[t * n..(t + 1) * n])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{dtype:?} k{k} n{n} m{m}, token {t}: {alone:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn amx_keeps_nan_to_its_token() {
    if !amx() {
        return;
    }
    let (k, n) = (96, 40);
    let w: Vec<bf16> = values(n * k, 3).into_iter().map(bf16::from_f32).collect();
    let mat = Mat::dense(&w, k);
    // Tokens in place (20) and with packed weight tiles (130).
    for m in [4, 20, 130] {
        let mut x: Vec<bf16> = values(m * k, 4).into_iter().map(bf16::from_f32).collect();
        x[5] = bf16::NAN;
        x[k + 7] = bf16::INFINITY;
        for weights in [
            Weights::Single(mat),
            Weights::GateUp(mat, mat, Activation::Silu),
        ] {
            // SAFETY: AMX usable; the slices hold their shapes.
            let y = unsafe {
                matmul::<bf16, Dense<bf16>>(&x, m, k, weights, n, Bias::default(), Compute::Amx)
            };
            assert_poisoned_only(&y, m, n, false, "bf16");
        }
    }
}

/// Random weights `[n, k]` quantized to `dtype`: the blocks, and their dequantization by candle.
fn quantized(
    dtype: candle_core::quantized::GgmlDType,
    n: usize,
    k: usize,
    seed: u64,
) -> (Vec<u8>, Vec<f32>) {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    let v = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&v, dtype).unwrap();
    let deq = q.dequantize(&Device::Cpu).unwrap();
    (
        q.data().unwrap().into_owned(),
        deq.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

/// The GGUF types the AMX tiles take: candle's, and the kernels'.
fn tile_types() -> [(candle_core::quantized::GgmlDType, QuantType); 3] {
    use candle_core::quantized::GgmlDType;
    [
        (GgmlDType::Q4_1, QuantType::Q4_1),
        (GgmlDType::Q8_0, QuantType::Int8(vnni::Kind::Q8_0)),
        (GgmlDType::Q4K, QuantType::Int8(vnni::Kind::Q4K)),
    ]
}

/// Decodes a row's values `[0, k)` four ways: `E::load16`, `E::load32` and `E::load256` (f32;
/// `k` a multiple of 256), and, where the CPU has AVX512-BF16, the tiled schedule's bf16
/// packing (`tiled::load32`).
unsafe fn decode_row<E: Encoding>(row: &[u8], k: usize) -> ([Vec<f32>; 3], Option<Vec<u16>>) {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c,avx512bf16")]
    unsafe fn packed<E: Encoding>(row: &[u8], k: usize) -> Vec<u16> {
        let mut b = vec![0u16; k];
        for i in (0..k).step_by(32) {
            // SAFETY: the caller's contract; the row holds k values.
            unsafe {
                let v = tiled::load32::<E>(row.as_ptr(), i, 32);
                _mm512_storeu_si512(b[i..].as_mut_ptr() as *mut _, v);
            }
        }
        b
    }
    let (mut by16, mut by32, mut by256) = (vec![0f32; k], vec![0f32; k], vec![0f32; k]);
    // SAFETY: the caller's contract: AVX-512, and `row` holds k values of `E`; AVX512-BF16 is
    // checked before `packed`.
    unsafe {
        for i in (0..k).step_by(16) {
            _mm512_storeu_ps(by16[i..].as_mut_ptr(), E::load16(row.as_ptr(), i));
        }
        for i in (0..k).step_by(32) {
            let [lo, hi] = E::load32(row.as_ptr(), i);
            _mm512_storeu_ps(by32[i..].as_mut_ptr(), lo);
            _mm512_storeu_ps(by32[i + 16..].as_mut_ptr(), hi);
        }
        for i in (0..k).step_by(256) {
            for (s, [lo, hi]) in E::load256(row.as_ptr(), i).iter().enumerate() {
                _mm512_storeu_ps(by256[i + 32 * s..].as_mut_ptr(), *lo);
                _mm512_storeu_ps(by256[i + 32 * s + 16..].as_mut_ptr(), *hi);
            }
        }
        let bf16 = std::arch::is_x86_feature_detected!("avx512bf16").then(|| packed::<E>(row, k));
        ([by16, by32, by256], bf16)
    }
}

#[test]
fn block_decoders_match_candles_dequantization() {
    if !avx512() {
        return;
    }
    let (n, k) = (5, 512);
    for (dtype, qtype) in tile_types() {
        let (blocks, deq) = quantized(dtype, n, k, 11);
        let rb = qtype.row_bytes(k);
        for j in 0..n {
            let row = &blocks[j * rb..(j + 1) * rb];
            // SAFETY: AVX-512 checked; the row holds k values.
            let ([by16, by32, by256], b) = unsafe {
                match qtype {
                    QuantType::Q4_1 => decode_row::<Q4_1>(row, k),
                    QuantType::Int8(vnni::Kind::Q8_0) => decode_row::<Q8_0>(row, k),
                    QuantType::Int8(vnni::Kind::Q4K) => decode_row::<Q4K>(row, k),
                }
            };
            let want = &deq[j * k..(j + 1) * k];
            assert_eq!(by16, want, "{dtype:?} row {j}: load16");
            assert_eq!(by32, want, "{dtype:?} row {j}: load32");
            assert_eq!(by256, want, "{dtype:?} row {j}: load256");
            // As the tiles' packing rounds them (no denormals here: GGUF's f16 scales keep
            // every decoded value far above f32's).
            let rounded: Vec<u16> = want.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
            if let Some(b) = b {
                assert_eq!(b, rounded, "{dtype:?} row {j}: bf16 packing");
            }
        }
    }
}

#[test]
fn amx_quantized_kernels_match_float64_over_bf16() {
    if !amx() {
        return;
    }
    let round = |v: f32| bf16::from_f32(v).to_f32() as f64;
    for (dtype, qtype) in tile_types() {
        // On the tiles whatever the kernel set: odd token counts, past a tile pair (32) and
        // past the packed-tokens threshold (96); n not a multiple of 16 or 32; k in 256-value
        // units (q4k's super-blocks), over several depth blocks of 4096 for one size, of 256
        // for the last (tokens' block of 2 MiB).
        let sizes = [
            (4, 1, 1),
            (5, 3, 37),
            (17, 2, 70),
            (65, 20, 33),
            (130, 17, 40),
            (270, 16, 20),
        ];
        for (m, units, n) in sizes {
            let k = units * 256;
            let (bg, dg) = quantized(dtype, n, k, 7);
            let (bu, du) = quantized(dtype, n, k, 8);
            let x = values(m * k, 9);
            let rb = qtype.row_bytes(k);
            let (g, u) = (Mat::blocks(&bg, rb), Mat::blocks(&bu, rb));
            let act = Activation::Silu;
            // SAFETY: AMX checked; the blocks hold n rows of k values.
            let (h, y) = unsafe {
                (
                    quant_tiles(&x, m, k, Weights::GateUp(g, u, act), n, qtype),
                    quant_tiles(&x, m, k, Weights::Single(g), n, qtype),
                )
            };
            // Where the chosen set has the tiles, the op's dispatch takes them from the type's
            // threshold (the same bits).
            if features().amx_bf16() && m >= qtype.tile_min_tokens() {
                assert_eq!(quant_kernel(qtype, m, false), MicroKernel::AmxBf16);
                // SAFETY: as above.
                let yd = unsafe { quant_matmul(&x, m, k, Weights::Single(g), n, qtype, false) };
                assert_eq!(yd, y, "{dtype:?} m{m}: the dispatch's tiles");
            }
            let dot = |a: &[f32], b: &[f32], r: &dyn Fn(f32) -> f64| {
                a.iter().zip(b).map(|(a, b)| r(*a) * r(*b)).sum::<f64>()
            };
            let (mut worst, mut rounding, mut max) = (0f64, 0f64, 0f64);
            for t in 0..m {
                let xt = &x[t * k..(t + 1) * k];
                for j in 0..n {
                    let (wg, wu) = (&dg[j * k..(j + 1) * k], &du[j * k..(j + 1) * k]);
                    // Over the bf16 roundings of both operands: only f32 summation apart.
                    let gs = dot(xt, wg, &round);
                    let want = act64(act, gs) * dot(xt, wu, &round);
                    worst = worst
                        .max(diff(h[t * n + j] as f64, want))
                        .max(diff(y[t * n + j] as f64, gs));
                    // Against the unrounded values: the bf16 roundings apart.
                    let ge = dot(xt, wg, &|v| v as f64);
                    rounding = rounding.max(diff(y[t * n + j] as f64, ge));
                    max = max.max(want.abs()).max(gs.abs());
                }
            }
            let what = format!("{dtype:?} m{m} k{k} n{n}");
            assert!(worst <= 1e-5 * max, "{what}: {worst:e} of {max:e}");
            assert!(
                rounding <= 1e-2 * max,
                "{what}: rounding {rounding:e} of {max:e}"
            );
        }
    }
}

#[test]
fn amx_quantized_keeps_nan_to_its_token() {
    if !amx() {
        return;
    }
    let (k, n) = (512, 40);
    for (dtype, qtype) in tile_types() {
        let (blocks, _) = quantized(dtype, n, k, 3);
        let w = Mat::blocks(&blocks, qtype.row_bytes(k));
        for m in [4, 20, 130] {
            let mut x = values(m * k, 4);
            x[5] = f32::NAN;
            x[k + 7] = f32::INFINITY;
            for weights in [Weights::Single(w), Weights::GateUp(w, w, Activation::Silu)] {
                // SAFETY: AMX checked; the blocks hold n rows of k values.
                let y = unsafe { quant_tiles(&x, m, k, weights, n, qtype) };
                assert_poisoned_only(&y, m, n, false, &format!("{dtype:?}"));
            }
        }
    }
}

#[test]
fn tasks_balance_the_threads() {
    // The busiest thread's panels when tasks of `per` panels (the last one short) go, in order,
    // each to the thread that is free first, as candle's pool hands them out.
    let busiest = |total: usize, per: usize, threads: usize| {
        let mut load = vec![0; threads];
        for t in 0..total.div_ceil(per) {
            let free = (0..threads).min_by_key(|&i| load[i]).unwrap();
            load[free] += per.min(total - t * per);
        }
        load.into_iter().max().unwrap()
    };
    assert_eq!(super::task_panels(128, 8, 2), 8);
    assert_eq!(super::task_panels(18, 8, 2), 3);
    assert_eq!(super::task_panels(18, 8, 1), 8);
    assert_eq!(super::task_panels(1, 8, 2), 8);
    assert_eq!(super::task_panels(0, 8, 2), 8);
    for total in 1..300 {
        for threads in 1..5 {
            let per = super::task_panels(total, 8, threads);
            assert!((1..=8).contains(&per), "{total} {threads}: {per}");
            // The threads finish together (the busiest has its even share, rounded up), with
            // tasks as large as that allows.
            assert_eq!(busiest(total, per, threads), total.div_ceil(threads));
            for larger in per + 1..=8 {
                assert!(busiest(total, larger, threads) > total.div_ceil(threads));
            }
        }
    }
}

#[test]
fn tiny_activation_blocks_round_as_larger_ones() {
    // A block whose largest value is below 127 / f32::MAX: its scale 127 / amax overflows f32.
    // The codes must be those of the same block scaled up (round(127 · x / amax)), with its
    // sign, and the block's d = amax / 127 (they were all −128: x · inf).
    if !vnni() {
        return;
    }
    for amax in [1e-37f32, 3e-38, 1e-40, 3.7e-37, 1.0] {
        let x: Vec<f32> = (0..32).map(|i| amax * ((i as f32 - 15.5) / 15.5)).collect();
        let mut q = [0i8; 32];
        // SAFETY: VNNI (and with it AVX-512 BW/VL) detected; 32 values and 32 codes.
        let (d, sum) = unsafe { vnni::quantize_block(x.as_ptr(), q.as_mut_ptr()) };
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert_eq!(d, amax / 127.0, "amax {amax:e}");
        let want: Vec<i8> = x
            .iter()
            .map(|&v| (127.0 * v as f64 / amax as f64).round_ties_even() as i8)
            .collect();
        assert_eq!(q.to_vec(), want, "amax {amax:e}");
        assert_eq!(sum, want.iter().map(|&v| i32::from(v)).sum::<i32>());
    }
}

#[test]
fn outputs_too_large_to_size_are_errors() {
    // k = 0: the inputs hold no values whatever m and n are, so only the output's own size
    // bounds them (its `m · n` wrapped in release builds).
    use candle_core::{CpuStorage, Layout, Shape};
    if !avx512() {
        return;
    }
    let big = 1usize << 40;
    let (s, l) = (
        CpuStorage::F32(Vec::new()),
        Layout::contiguous(Shape::from((big, 0))),
    );
    let op = crate::kernels::ops::LinearOp { bias: None };
    let e = super::linear(&op, &s, &l, &s, &l).unwrap_err().to_string();
    assert!(e.contains("too large"), "{e}");
}
