//! `Projection`, the linear layer on the crate's kernels, against float64 and candle's own
//! `Linear` / `QMatMul`: every weight type (dense f32/bf16/f16, GGUF Q4_1/q8_0/q4k read in
//! place, and other GGUF types through candle), shapes that are not multiples of the vector
//! width, biases, 1 to 600 tokens; training through it; loading; one-line errors.

mod common;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_glu::loading::{Checkpoint, LoadOptions};
use candle_glu::{MicroKernel, Projection};
use common::{assert_close, randn, Tol};

/// The weights of one case: dense in a float dtype, or quantized to a GGUF type.
#[derive(Debug, Clone, Copy)]
enum Weight {
    Dense(DType),
    Gguf(GgmlDType),
}

/// The projection, and its weight and bias as the float64 reference sees them: the dense weight
/// as stored (rounded to its dtype), the GGUF one as candle dequantizes it.
fn projection(
    w: Weight,
    (out, inp): (usize, usize),
    bias: bool,
    seed: u64,
) -> (Projection, Vec<f64>, Option<Vec<f64>>) {
    let dev = Device::Cpu;
    let wf = randn(seed, (out, inp), 0.05, &dev);
    let b = bias.then(|| randn(seed + 1, out, 0.5, &dev));
    let f64s = common::f64_values;
    match w {
        Weight::Dense(dtype) => {
            let wd = wf.to_dtype(dtype).unwrap();
            let bd = b.map(|b| b.to_dtype(dtype).unwrap());
            let reference = (f64s(&wd), bd.as_ref().map(f64s));
            let p = Projection::new(wd, bd).unwrap();
            (p, reference.0, reference.1)
        }
        Weight::Gguf(ty) => {
            let q = Arc::new(QTensor::quantize(&wf, ty).unwrap());
            let wd = q.dequantize(&dev).unwrap();
            let p = Projection::from_qtensor(q, b.clone()).unwrap();
            (p, f64s(&wd), b.as_ref().map(f64s))
        }
    }
}

/// `x·Wᵀ + b` in float64: `x` is `[m, in]`.
fn reference(
    x: &[f64],
    m: usize,
    w: &[f64],
    b: Option<&[f64]>,
    (out, inp): (usize, usize),
) -> Tensor {
    let mut y = vec![0f64; m * out];
    for t in 0..m {
        let xt = &x[t * inp..(t + 1) * inp];
        for j in 0..out {
            let s: f64 = xt
                .iter()
                .zip(&w[j * inp..(j + 1) * inp])
                .map(|(a, b)| a * b)
                .sum();
            y[t * out + j] = s + b.map_or(0.0, |b| b[j]);
        }
    }
    Tensor::from_vec(y, (m, out), &Device::Cpu).unwrap()
}

/// The error a path may have against float64, relative to the largest output: what its
/// rounding of the activations (8 bits per 32 values; bf16; f16) and of the result allows.
fn tolerance(w: Weight, kernel: Option<MicroKernel>) -> f64 {
    match (w, kernel) {
        // 8-bit activations: candle's QMatMul (no kernel), the int8 kernels.
        (Weight::Gguf(_), None | Some(MicroKernel::VnniRows | MicroKernel::VnniPacked)) => 3e-2,
        // Weights and activations rounded to bf16 for the tiles.
        (Weight::Gguf(_), Some(MicroKernel::AmxBf16)) => 2e-2,
        // Exact Q4_1 decoding, f32 sums.
        (Weight::Gguf(_), Some(_)) => 2e-5,
        (Weight::Dense(DType::BF16), _) => 1e-2,
        (Weight::Dense(DType::F16), _) => 2e-3,
        (Weight::Dense(_), _) => 2e-5,
    }
}

#[test]
fn projection_matches_float64_and_candle_on_every_type() {
    let kernels = common::kernels_or_skip("Projection on the crate's kernels");
    let int8 = kernels && common::int8_kernels_or_skip("Projection's int8 kernels");
    let cases = [
        (Weight::Dense(DType::F32), (37, 100)),
        (Weight::Dense(DType::F32), (192, 576)),
        (Weight::Dense(DType::BF16), (37, 100)),
        (Weight::Dense(DType::F16), (37, 100)),
        (Weight::Gguf(GgmlDType::Q4_1), (37, 64)),
        (Weight::Gguf(GgmlDType::Q4_1), (192, 576)),
        // An odd number of blocks a row: dequantized to f32 at load (candle's kernel for them
        // asserts an even number).
        (Weight::Gguf(GgmlDType::Q4_1), (37, 96)),
        (Weight::Gguf(GgmlDType::Q8_0), (37, 96)),
        (Weight::Gguf(GgmlDType::Q8_0), (576, 576)),
        (Weight::Gguf(GgmlDType::Q4K), (37, 512)),
        // Types the kernels do not take: candle's QMatMul.
        (Weight::Gguf(GgmlDType::Q4_0), (37, 96)),
        (Weight::Gguf(GgmlDType::Q6K), (37, 256)),
    ];
    for (c, &(w, shape)) in cases.iter().enumerate() {
        let (out, inp) = shape;
        for (i, m) in [1, 2, 5, 16, 17, 20, 21, 600].into_iter().enumerate() {
            let bias = (c + i) % 2 == 0;
            let (p, wr, br) = projection(w, shape, bias, 10 * c as u64 + i as u64);
            assert_eq!(p.weight_dims(), [out, inp]);
            assert_eq!((p.in_features(), p.out_features()), (inp, out));
            let x = randn(100 + m as u64, (1, m, inp), 1.0, &Device::Cpu);
            let kernel = p.micro_kernel(&x);
            let what = format!("{w:?} {out}x{inp}, {m} tokens, bias {bias} ({kernel:?})");
            // Where the kernels must run.
            let taken = match w {
                Weight::Dense(_) => kernels,
                Weight::Gguf(GgmlDType::Q4_1) => kernels,
                Weight::Gguf(GgmlDType::Q8_0 | GgmlDType::Q4K) => int8,
                Weight::Gguf(_) => false,
            };
            assert_eq!(kernel.is_some(), taken, "{what}");

            let y = p.forward(&x).unwrap();
            assert_eq!(y.dims(), [1, m, out], "{what}");
            assert_eq!(y.dtype(), DType::F32, "{what}");
            let theirs = p.forward_candle(&x).unwrap();
            // The activations as the weight's dtype computes them.
            let dtype = match w {
                Weight::Dense(dt) => dt,
                Weight::Gguf(_) => DType::F32,
            };
            let xr: Vec<f64> = x
                .to_dtype(dtype)
                .and_then(|x| x.to_dtype(DType::F64))
                .and_then(|x| x.flatten_all())
                .and_then(|x| x.to_vec1())
                .unwrap();
            let want = reference(&xr, m, &wr, br.as_deref(), shape);
            let tol = tolerance(w, kernel);
            let err = assert_close(
                &y.squeeze(0).unwrap(),
                &want,
                Tol::Rel(tol),
                format!("{what} vs float64"),
            );
            let candle_tol = tolerance(w, None);
            assert_close(
                &theirs.squeeze(0).unwrap(),
                &want,
                Tol::Rel(candle_tol),
                format!("{what}: candle vs float64"),
            );
            if kernel.is_none() {
                // candle's path: candle's numbers, to the bit.
                assert_close(&y, &theirs, Tol::Abs(0.0), format!("{what} vs candle"));
            }
            if m == 1 {
                eprintln!("{what}: {err:.1e} vs float64");
            }
        }
    }
}

#[test]
fn q4_1_takes_8_bit_activations_up_to_20_tokens_unless_asked_to_stay_exact() {
    let int8 = common::int8_kernels_or_skip("Q4_1 over 8-bit activations");
    let amx = candle_glu::cpu_kernels().is_some_and(|k| k.amx());
    let (p, wr, _) = projection(Weight::Gguf(GgmlDType::Q4_1), (40, 128), false, 7);
    let exact = p.clone().with_exact_q4_1(true);
    assert!(exact.exact_q4_1() && !p.exact_q4_1());
    for m in [1, 3, 20, 21] {
        let x = randn(m as u64, (m, 128), 1.0, &Device::Cpu);
        let kernel = p.micro_kernel(&x);
        if int8 && !amx {
            let want = if m <= 20 {
                MicroKernel::VnniRows
            } else {
                MicroKernel::FmaPacked
            };
            assert_eq!(kernel, Some(want), "{m} tokens");
        }
        // Exact: float64's sums over the exact activations, to f32 rounding.
        let ek = exact.micro_kernel(&x);
        assert!(
            !matches!(ek, Some(MicroKernel::VnniRows | MicroKernel::AmxBf16)),
            "{ek:?}"
        );
        let xr: Vec<f64> = x
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = reference(&xr, m, &wr, None, (40, 128));
        let tol = tolerance(Weight::Gguf(GgmlDType::Q4_1), ek);
        assert_close(
            &exact.forward(&x).unwrap(),
            &want,
            Tol::Rel(tol),
            format!("exact, {m} tokens"),
        );
    }
}

#[test]
fn a_block_keeps_its_projections_exact_q4_1() {
    // The flag lives on the projections: a block built from exact ones is exact, bit for bit
    // the block asked for it.
    let gguf = Checkpoint::open(common::smollm2_gguf()).unwrap();
    let cfg = gguf.config().unwrap().clone();
    let ffn = gguf.load_layer(&cfg, 0, &LoadOptions::default()).unwrap();
    let exact = |p: &Projection| p.clone().with_exact_q4_1(true);
    let built = candle_glu::GluFeedForward::from_projections(
        &cfg,
        exact(ffn.gate_proj()),
        exact(ffn.up_proj()),
        exact(ffn.down_proj()),
    )
    .unwrap();
    let asked = ffn.clone().with_exact_q4_1(true);
    assert!([asked.gate_proj(), asked.up_proj(), asked.down_proj()]
        .iter()
        .all(|p| p.exact_q4_1()));
    let x = randn(9, (1, 576), 1.0, &Device::Cpu);
    let kernel = built.micro_kernel(&x);
    assert!(
        !matches!(kernel, Some(MicroKernel::VnniRows | MicroKernel::AmxBf16)),
        "{kernel:?}"
    );
    assert_eq!(kernel, asked.micro_kernel(&x));
    let (a, b) = (built.forward(&x).unwrap(), asked.forward(&x).unwrap());
    assert_close(
        &a,
        &b,
        Tol::Abs(0.0),
        "from exact projections vs with_exact_q4_1",
    );
    if common::int8_kernels_or_skip("the default's 8-bit Q4_1 kernel") {
        assert_eq!(ffn.micro_kernel(&x), Some(MicroKernel::VnniRows));
    }
}

#[test]
fn f16_weights_through_qmatmul_compute_in_f16() {
    // candle's `QMatMul::TensorF16` (dequantized GGUF weights kept in f16) rounds its input to
    // f16; the kernels take it as a dense f16 weight and do the same.
    let dev = Device::Cpu;
    let w = randn(1, (24, 40), 0.1, &dev).to_dtype(DType::F16).unwrap();
    let p = Projection::quantized(candle_core::quantized::QMatMul::TensorF16(w.clone()), None);
    let x = randn(2, (3, 40), 1.0, &dev);
    let y = p.forward(&x).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let want = x
        .to_dtype(DType::F16)
        .unwrap()
        .matmul(&w.t().unwrap())
        .unwrap();
    assert_close(&y, &want, Tol::Rel(2e-3), "TensorF16 vs an f16 matmul");
    assert_close(
        &p.forward_candle(&x).unwrap(),
        &want,
        Tol::Rel(2e-3),
        "candle's path",
    );
}

#[test]
fn any_leading_shape_and_dtype_in() {
    let (p, ..) = projection(Weight::Gguf(GgmlDType::Q4_1), (40, 64), true, 3);
    // 20 tokens: as many as the 8-bit decode kernel takes (`int8::Q4_1_DOT_MAX_TOKENS`), so that on
    // CPUs with VNNI and without AMX the whole and each row run the same kernel, and must agree
    // to the bit (30 tokens took the packed kernel: the exact branch below never ran there).
    let x = randn(4, (2, 2, 5, 64), 1.0, &Device::Cpu);
    let y = p.forward(&x).unwrap();
    assert_eq!(y.dims(), [2, 2, 5, 40]);
    // Row by row, the same numbers as the whole (one token at a time: the decode kernel).
    let rows = x.reshape((20, 1, 64)).unwrap();
    let mut same_kernel = false;
    for t in [0, 11, 19] {
        let one = p.forward(&rows.get(t).unwrap()).unwrap();
        let whole = y.reshape((20, 40)).unwrap().get(t).unwrap();
        let w = Weight::Gguf(GgmlDType::Q4_1);
        let (k1, kn) = (p.micro_kernel(&one), p.micro_kernel(&x));
        // One kernel: the same per-token arithmetic; two: each within its bound of float64.
        same_kernel |= k1 == kn;
        let tol = if k1 == kn {
            0.0
        } else {
            2.0 * tolerance(w, k1).max(tolerance(w, kn))
        };
        assert_close(
            &one.squeeze(0).unwrap(),
            &whole,
            Tol::Rel(tol),
            format!("token {t}"),
        );
    }
    // Where the 20 tokens take the 8-bit decode kernel, the bitwise comparison ran.
    if p.micro_kernel(&x) == Some(candle_glu::MicroKernel::VnniRows) {
        assert!(same_kernel, "the whole and its rows took different kernels");
    }
    // bf16 in, bf16 out (within bf16's rounding of the input and of the output); no tokens,
    // no work.
    let yb = p.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    assert_eq!(yb.dtype(), DType::BF16);
    let tol = 2e-2 + tolerance(Weight::Gguf(GgmlDType::Q4_1), p.micro_kernel(&x));
    assert_close(&yb, &y, Tol::Rel(tol), "bf16 input");
    let empty = p
        .forward(&Tensor::zeros((0, 64), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(empty.dims(), [0, 40]);
}

#[test]
fn training_through_a_dense_projection_matches_candle_linear() {
    if !common::kernels_or_skip("the dense kernel's backward pass") {
        return;
    }
    let dev = Device::Cpu;
    let (out, inp, m) = (24, 40, 7);
    let w = Var::from_tensor(&randn(1, (out, inp), 0.1, &dev)).unwrap();
    let b = Var::from_tensor(&randn(2, out, 0.1, &dev)).unwrap();
    let x = Var::from_tensor(&randn(3, (m, inp), 1.0, &dev)).unwrap();
    let r = randn(4, (m, out), 1.0, &dev);
    let grads = |y: Tensor| {
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        [x.as_tensor(), w.as_tensor(), b.as_tensor()].map(|t| g.get(t).unwrap().clone())
    };
    let p = Projection::new(w.as_tensor().clone(), Some(b.as_tensor().clone())).unwrap();
    assert!(p.micro_kernel(x.as_tensor()).is_some());
    let ours = grads(p.forward(x.as_tensor()).unwrap());
    let linear = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
    let theirs = grads(linear.forward(x.as_tensor()).unwrap());
    for (name, (a, e)) in ["x", "W", "b"].iter().zip(ours.iter().zip(&theirs)) {
        assert_close(a, e, Tol::Rel(1e-5), format!("d loss / d {name}"));
    }
}

#[test]
fn loads_from_a_var_builder_a_gguf_and_safetensors() {
    // Over a VarMap, as candle_nn::linear_b: created with the shapes asked for.
    let map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let p = Projection::load(48, 16, true, vb.pp("q_proj")).unwrap();
    assert_eq!(p.weight_dims(), [16, 48]);
    assert_eq!(p.bias().unwrap().dims(), [16]);
    assert_eq!(map.all_vars().len(), 2);

    // Safetensors, in the dtype asked for.
    let ckpt = Checkpoint::open(common::embedded_weights()).unwrap();
    let opts = LoadOptions::new(DType::BF16, Device::Cpu);
    let down = ckpt
        .load_projection("model.layers.0.mlp.down_proj", &opts)
        .unwrap();
    assert_eq!(
        (down.weight_dims(), down.dtype()),
        (&[576, 1536][..], DType::BF16)
    );
    assert!(down.bias().is_none() && !down.is_quantized());

    // GGUF: kept quantized, or dequantized.
    let gguf = Checkpoint::open(common::smollm2_gguf()).unwrap();
    let k = gguf
        .load_projection("blk.0.attn_k", &LoadOptions::default())
        .unwrap();
    assert!(k.is_quantized());
    assert_eq!(k.weight_dims(), [192, 576]);
    let opts = LoadOptions::default().with_quantized(false);
    let kd = gguf.load_projection("blk.0.attn_k", &opts).unwrap();
    assert!(!kd.is_quantized());
    let x = randn(5, (3, 576), 1.0, &Device::Cpu);
    let tol = tolerance(Weight::Gguf(GgmlDType::Q4_1), k.micro_kernel(&x));
    let (yq, yd) = (k.forward(&x).unwrap(), kd.forward(&x).unwrap());
    assert_close(
        &yq,
        &yd,
        Tol::Rel(tol),
        "blk.0.attn_k, quantized vs dequantized",
    );
}

/// The one-line message of an error.
fn message<T: std::fmt::Debug>(r: candle_core::Result<T>) -> String {
    let m = r.expect_err("an error").to_string();
    assert_eq!(m.lines().count(), 1, "{m}");
    m
}

#[test]
fn bad_weights_and_inputs_are_one_line_errors() {
    let dev = Device::Cpu;
    let w = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
    let m = message(Projection::new(
        Tensor::zeros((2, 4, 8), DType::F32, &dev).unwrap(),
        None,
    ));
    assert!(m.contains("[2, 4, 8] is not [out, in]"), "{m}");
    let m = message(Projection::new(
        Tensor::zeros((4, 8), DType::U32, &dev).unwrap(),
        None,
    ));
    assert!(m.contains("dtype U32"), "{m}");
    // candle's FP8 is a float dtype it only stores: refused, not left to fail in a matmul.
    let f8 = Tensor::zeros((4, 8), DType::F32, &dev)
        .unwrap()
        .to_dtype(DType::F8E4M3)
        .unwrap();
    let m = message(Projection::new(f8, None));
    assert!(
        m.contains("dtype F8E4M3, expected f32, f16, bf16 or f64"),
        "{m}"
    );
    // No input features: refused (its forward could not reshape).
    let m = message(Projection::new(
        Tensor::zeros((4, 0), DType::F32, &dev).unwrap(),
        None,
    ));
    assert!(
        m.contains("[4, 0] is not [out, in] with both at least 1"),
        "{m}"
    );
    let m = message(Projection::new(
        w.clone(),
        Some(Tensor::zeros(5, DType::F32, &dev).unwrap()),
    ));
    assert!(
        m.contains("bias of shape [5]") && m.contains("4 outputs"),
        "{m}"
    );
    let m = message(Projection::new(
        w.clone(),
        Some(Tensor::zeros(4, DType::BF16, &dev).unwrap()),
    ));
    assert!(m.contains("bias has dtype BF16 and weight F32"), "{m}");
    let q = Arc::new(
        QTensor::quantize(
            &Tensor::zeros((2, 4, 32), DType::F32, &dev).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap(),
    );
    let m = message(Projection::from_qtensor(q, None));
    assert!(m.contains("is not [out, in]"), "{m}");

    let p = Projection::new(w, None).unwrap();
    let m = message(p.forward(&Tensor::zeros((3, 7), DType::F32, &dev).unwrap()));
    assert_eq!(
        m,
        "input of shape [3, 7] does not end in the projection's 8 input features"
    );
    let m = message(p.forward(&Tensor::zeros((3, 8), DType::U8, &dev).unwrap()));
    assert!(m.contains("input has dtype U8"), "{m}");
    let m = message(p.forward(&Tensor::new(1f32, &dev).unwrap()));
    assert!(m.contains("input of shape []"), "{m}");

    let ckpt = Checkpoint::open(common::embedded_weights()).unwrap();
    let opts = LoadOptions::default();
    let m = ckpt
        .load_projection("model.layers.0.mlp.down", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        m.starts_with("missing tensor `model.layers.0.mlp.down.weight`"),
        "{m}"
    );
    assert!(m.contains("down_proj"), "{m}");
}

#[test]
fn every_rank_and_layout_on_candles_path_as_on_the_kernels() {
    // candle's `Linear` takes ranks 2 to 4 and `QMatMul` contiguous inputs only; a projection
    // takes any rank and layout on every path: f64 weights and Q6_K take candle's ops, f32 the
    // kernels where the CPU has them.
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    let dev = Device::Cpu;
    let w = randn(11, (40, 256), 0.1, &dev);
    let q6k = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q6K).unwrap()).unwrap();
    let projections = [
        (
            "f64",
            Projection::new(w.to_dtype(DType::F64).unwrap(), None).unwrap(),
        ),
        ("f32", Projection::new(w.clone(), None).unwrap()),
        ("q6k", Projection::quantized(q6k, None)),
    ];
    let x = randn(12, (30, 256), 1.0, &dev);
    for (name, p) in &projections {
        let x = x
            .to_dtype(if *name == "f64" {
                DType::F64
            } else {
                DType::F32
            })
            .unwrap();
        let rows = p.forward(&x).unwrap();
        let cases = [
            (x.get(7).unwrap(), vec![40], rows.get(7).unwrap()),
            (
                x.reshape((1, 1, 2, 15, 256)).unwrap(),
                vec![1, 1, 2, 15, 40],
                rows.reshape((1, 1, 2, 15, 40)).unwrap(),
            ),
            // [256, 30] transposed: the same tokens, not contiguous.
            (
                x.t().unwrap().contiguous().unwrap().t().unwrap(),
                vec![30, 40],
                rows.clone(),
            ),
        ];
        for (input, dims, want) in cases {
            let y = p.forward(&input).unwrap();
            assert_eq!(y.dims(), dims, "{name}");
            assert_close(&y, &want, Tol::Rel(1e-5), format!("{name} {dims:?}"));
        }
    }
}
