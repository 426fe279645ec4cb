//! Literal values of every activation, from the closed forms evaluated in float64 by Python's
//! `math` module. They tell exact GELU (`gelu`) and its tanh approximation apart.

use candle_core::{DType, Device, Module, Tensor};
use candle_glu::Activation;

const XS: [f64; 5] = [-3.0, -1.0, 0.0, 0.5, 2.0];

fn check(act: Activation, want: [f64; 5]) {
    // |y - want| ≤ rtol·|want| + atol. f32's atol covers the cancellation in 1 + tanh(..) near
    // -3; bf16's rtol is one rounding (2^-9) with room for the input's.
    for (dtype, rtol, atol) in [
        (DType::F64, 1e-12, 1e-15),
        (DType::F32, 1e-6, 1e-7),
        (DType::BF16, 4e-3, 1e-5),
    ] {
        let x = Tensor::new(&XS, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let y = act.forward(&x).unwrap();
        assert_eq!(y.dtype(), dtype);
        let y: Vec<f64> = y.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        for ((x, y), w) in XS.iter().zip(&y).zip(&want) {
            let ok = (y - w).abs() <= rtol * w.abs() + atol;
            assert!(ok, "{act} {dtype:?} at {x}: got {y}, want {w}");
        }
    }
}

#[test]
fn sigmoid() {
    let want = [
        0.04742587317756678,
        0.2689414213699951,
        0.5,
        0.6224593312018546,
        0.8807970779778823,
    ];
    check(Activation::Sigmoid, want);
}

#[test]
fn identity() {
    check(Activation::Identity, XS);
}

#[test]
fn relu() {
    check(Activation::Relu, [0.0, 0.0, 0.0, 0.5, 2.0]);
}

#[test]
fn gelu_is_exact_erf() {
    let want = [
        -0.00404969409489031,
        -0.15865525393145707,
        0.0,
        0.34573123063700656,
        1.9544997361036416,
    ];
    check(Activation::Gelu, want);
}

#[test]
fn gelu_pytorch_tanh_is_the_approximation() {
    let want = [
        -0.0036373920817729943,
        -0.15880800939172324,
        0.0,
        0.34571400982514394,
        1.954597694087775,
    ];
    check(Activation::GeluTanh, want);
}

#[test]
fn the_two_gelus_differ_at_minus_three() {
    let x = Tensor::new(&[-3f32], &Device::Cpu).unwrap();
    let exact = Activation::Gelu
        .forward(&x)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let tanh = Activation::GeluTanh
        .forward(&x)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!((exact - -0.00405).abs() < 1e-5, "{exact}");
    assert!((tanh - -0.00364).abs() < 1e-5, "{tanh}");
}

#[test]
fn silu() {
    let want = [
        -0.14227761953270035,
        -0.2689414213699951,
        0.0,
        0.3112296656009273,
        1.7615941559557646,
    ];
    check(Activation::Silu, want);
}

#[test]
fn swish_with_beta() {
    let want = [
        -0.03296082789177954,
        -0.18242552380635635,
        0.0,
        0.3395893495876965,
        1.9051482536448667,
    ];
    check(Activation::Swish { beta: 1.5 }, want);
}

#[test]
fn swish_with_beta_one_is_silu() {
    let x = Tensor::new(&XS, &Device::Cpu).unwrap();
    let a = Activation::Swish { beta: 1.0 }.forward(&x).unwrap();
    let b = Activation::Silu.forward(&x).unwrap();
    let (a, b): (Vec<f64>, Vec<f64>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
    for (a, b) in a.iter().zip(&b) {
        assert!((a - b).abs() < 1e-15);
    }
}

#[test]
fn quick_gelu() {
    let want = [
        -0.01807130970778597,
        -0.1542042340671787,
        0.0,
        0.35038843660638014,
        1.9356586231442083,
    ];
    check(Activation::QuickGelu, want);
}
