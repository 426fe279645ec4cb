//! Helpers shared by the integration tests: the PyTorch fixtures made by
//! `scripts/make_fixtures.py`, seeded random inputs, [`assert_close`] against a float64 truth,
//! and the kernels the tests must find ([`kernels_or_skip`], `CANDLE_GLU_REQUIRE_KERNELS`).
#![allow(dead_code)]

use std::fmt::Display;
use std::path::PathBuf;

use candle_core::{DType, Device, Shape, Tensor};
use serde::Deserialize;

// The examples' SplitMix64, so that there is one. (tests/e2e.rs loads it a second time, through
// examples/smollm2's sampler.)
#[allow(clippy::duplicate_mod)]
#[path = "../../examples/common/rng.rs"]
mod rng;

pub mod moe;

/// `tests/fixtures/parity/manifest.json`.
#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub torch: String,
    pub transformers: String,
    pub cases: Vec<Case>,
}

/// One transformers module, its weights and its outputs.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub module: String,
    pub prefix: String,
    pub layout: String,
    pub activation: String,
    pub bias: bool,
    pub hidden: usize,
    pub intermediate: usize,
    #[serde(default)]
    pub notes: Option<String>,
}

/// The repository: `CARGO_MANIFEST_DIR` as cargo sets it when it runs the tests, else as it was
/// at build time (a test binary run by hand elsewhere, as scripts/gpu_h200.sh does, sets it).
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

pub fn manifest() -> Manifest {
    let path = fixtures().join("parity/manifest.json");
    let text = std::fs::read_to_string(&path).expect("read manifest.json");
    serde_json::from_str(&text).expect("parse manifest.json")
}

impl Case {
    pub fn dir(&self) -> PathBuf {
        fixtures().join("parity").join(&self.name)
    }

    /// The checkpoint's tensors as a `VarBuilder` in `dtype`.
    pub fn var_builder(&self, dtype: DType) -> candle_nn::VarBuilder<'static> {
        let bytes = std::fs::read(self.dir().join("model.safetensors")).expect("read weights");
        candle_nn::VarBuilder::from_buffered_safetensors(bytes, dtype, &Device::Cpu)
            .expect("weights")
    }

    /// `x`, `y_f64`, `y_torch_f32`, `y_torch_f16`, `y_torch_bf16`.
    pub fn io(&self, name: &str) -> Tensor {
        let io = candle_core::safetensors::load(self.dir().join("io.safetensors"), &Device::Cpu)
            .expect("read io.safetensors");
        io.get(name)
            .unwrap_or_else(|| panic!("{}: no `{name}` in io.safetensors", self.name))
            .clone()
    }
}

/// A tolerance for [`assert_close`].
#[derive(Debug, Clone, Copy)]
pub enum Tol {
    /// max |actual − expected| ≤ this × max |expected|.
    Rel(f64),
    /// max |actual − expected| ≤ this.
    Abs(f64),
}

/// Asserts that `actual` is within `tol` of `expected` (any dtypes and devices, the same number
/// of elements), measured in float64; returns the measured error (relative or absolute, as
/// `tol`). On failure the message names `what`, the error, and the worst element: its index in
/// `actual`'s shape and both values. NaN matches only NaN, and an infinity only itself.
pub fn assert_close(actual: &Tensor, expected: &Tensor, tol: Tol, what: impl Display) -> f64 {
    let values = |t: &Tensor| -> Vec<f64> {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    let (a, e) = (values(actual), values(expected));
    assert_eq!(
        a.len(),
        e.len(),
        "{what}: {:?} against {:?}",
        actual.dims(),
        expected.dims()
    );
    let (mut worst, mut at) = (0f64, 0);
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let d = if x == y || (x.is_nan() && y.is_nan()) {
            0.0
        } else if x.is_finite() && y.is_finite() {
            (x - y).abs()
        } else {
            f64::INFINITY
        };
        if d > worst {
            (worst, at) = (d, i);
        }
    }
    let scale = e
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, v| m.max(v.abs()));
    let (err, bound) = match tol {
        Tol::Rel(r) if worst == 0.0 => (0.0, r),
        Tol::Rel(r) => (worst / scale, r),
        Tol::Abs(b) => (worst, b),
    };
    let within = err <= bound; // false for a NaN bound
    if !within {
        let i = at;
        let mut index = Vec::with_capacity(actual.rank());
        let mut rest = i;
        for &d in actual.dims().iter().rev() {
            index.push(rest % d.max(1));
            rest /= d.max(1);
        }
        index.reverse();
        panic!(
            "{what}: {tol:?} exceeded: max |actual - expected| {worst:e} (relative to max \
             |expected| {scale:e}: {:e}); worst at {index:?}: actual {}, expected {}",
            worst / scale,
            a[i],
            e[i]
        );
    }
    err
}

/// Seeded N(0, std²) values in f32 (SplitMix64 and Box–Muller, as `infer --seed` makes its
/// input): candle's CPU `Tensor::randn` cannot be seeded, and a tolerance checked against
/// random inputs must hold for the same inputs on every run.
pub fn randn(seed: u64, shape: impl Into<Shape>, std: f64, dev: &Device) -> Tensor {
    let shape: Shape = shape.into();
    let mut rng = rng::Rng::new(seed);
    let mut next = || rng.next_f64();
    let data: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            let (u, v) = (next().max(f64::MIN_POSITIVE), next());
            (std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect();
    Tensor::from_vec(data, shape, dev).unwrap()
}

/// Gives every variable of `map` seeded values (in name order, from `seed`), so that a test
/// over a `VarMap`'s random initialisation sees the same numbers on every run: weights
/// `[out, in]` with std √(2 / in) (candle's Kaiming-normal), biases with the variance of
/// candle's uniform ±1/√in.
pub fn seed_vars(map: &candle_nn::VarMap, seed: u64) {
    let data = map.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (k, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let fan_in = match var.dims() {
            [_, n] => *n,
            _ => name
                .strip_suffix("bias")
                .and_then(|stem| data.get(&format!("{stem}weight")))
                .and_then(|w| w.dims().get(1).copied())
                .unwrap_or(var.elem_count()),
        };
        let std = if var.rank() == 2 {
            (2.0 / fan_in as f64).sqrt()
        } else {
            (1.0 / (3.0 * fan_in as f64)).sqrt()
        };
        let values = randn(seed.wrapping_add(k as u64), var.shape(), std, var.device());
        var.set(&values.to_dtype(var.dtype()).unwrap()).unwrap();
    }
}

/// `CANDLE_GLU_REQUIRE_KERNELS`: the CPU kernels the tests must find, as
/// `candle_glu::cpu_kernels()` prints them (e.g. `avx512 (int8: vnni)`); `None` when unset or
/// empty. CI sets it from `scripts/expected_kernels.sh`.
pub fn required_kernels() -> Option<String> {
    std::env::var("CANDLE_GLU_REQUIRE_KERNELS")
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The kernels that run in this process, as `CANDLE_GLU_REQUIRE_KERNELS` names them.
pub fn kernels_that_ran() -> String {
    candle_glu::cpu_kernels().map_or_else(|| "none (candle's ops)".into(), |k| k.to_string())
}

/// Panics when `CANDLE_GLU_REQUIRE_KERNELS` names kernels other than those that run.
fn check_required(what: &str) {
    if let Some(required) = required_kernels() {
        let ran = kernels_that_ran();
        assert!(
            ran == required,
            "CANDLE_GLU_REQUIRE_KERNELS requires the kernels `{required}`, but `{ran}` ran, so \
             this would not check what it claims: {what}"
        );
    }
}

/// Whether the crate's CPU kernels run in this process. When they do not, a test that needs
/// them skips (or checks less), saying so on stderr, unless `CANDLE_GLU_REQUIRE_KERNELS` is set:
/// then it panics, naming the kernels required and those that ran, as it does whenever they
/// differ. `what` says what would go unchecked.
pub fn kernels_or_skip(what: &str) -> bool {
    check_required(what);
    let ran = candle_glu::cpu_kernels().is_some();
    if !ran {
        eprintln!("SKIPPED (no CPU kernels in this process): {what}");
    }
    ran
}

/// As [`kernels_or_skip`], for the int8 kernels (GGUF q8_0 and q4k on AVX512-VNNI): required
/// when `CANDLE_GLU_REQUIRE_KERNELS` says `int8: vnni`.
pub fn int8_kernels_or_skip(what: &str) -> bool {
    check_required(what);
    let ran = candle_glu::cpu_kernels().is_some_and(|k| k.int8());
    if !ran {
        eprintln!("SKIPPED (no int8 CPU kernels in this process): {what}");
    }
    ran
}

/// The path a dense f32/bf16/f16 block on the CPU must take outside training: the fused
/// kernels where they run (required as [`kernels_or_skip`] says), else candle's ops.
pub fn dense_path(what: &str) -> candle_glu::ForwardPath {
    if kernels_or_skip(what) {
        candle_glu::ForwardPath::Fused
    } else {
        candle_glu::ForwardPath::Candle
    }
}

/// max |a - b| in float64: a measurement (torch's own error, a bound's input); to assert a
/// bound, use [`assert_close`].
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (f64_values(a), f64_values(b));
    assert_eq!(a.len(), b.len(), "shapes differ");
    // NaN-aware, unlike a max reduction (which keeps its running value past a NaN): a NaN on
    // one side only is an infinite difference; on both, none.
    a.iter()
        .zip(&b)
        .map(|(x, y)| match (x.is_nan(), y.is_nan()) {
            (true, true) => 0.0,
            (false, false) if x == y => 0.0,
            (false, false) => (x - y).abs(),
            _ => f64::INFINITY,
        })
        .fold(0.0, f64::max)
}

/// Panics unless every value of `t` is finite: for comparisons of two of the crate's own
/// outputs, where a NaN in both at one place would count as agreement.
pub fn assert_finite(t: &Tensor, what: &str) {
    let bad = f64_values(t).iter().filter(|v| !v.is_finite()).count();
    assert_eq!(bad, 0, "{what}: {bad} values are NaN or infinite");
}

/// max |t| in float64.
pub fn max_abs(t: &Tensor) -> f64 {
    // NaN-aware: a NaN is infinite here (`f64::max` would pass over it).
    f64_values(t)
        .iter()
        .map(|x| if x.is_nan() { f64::INFINITY } else { x.abs() })
        .fold(0.0, f64::max)
}

/// A tensor's values, flattened, in float64 on the host.
pub fn f64_values(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .unwrap()
}

/// max |a - truth| / max |truth|: a measurement, as [`max_abs_diff`]. The scale is over the
/// finite values of `truth`, as in [`assert_close`]: a NaN in both at one place counts as no
/// error there and hides none elsewhere (over `max_abs`, an infinite scale, it made every error
/// 0); a NaN or infinity in one of them only is an infinite error.
pub fn rel_err(a: &Tensor, truth: &Tensor) -> f64 {
    let scale = f64_values(truth)
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, v| m.max(v.abs()));
    match max_abs_diff(a, truth) {
        0.0 => 0.0,
        d => d / scale,
    }
}

/// The example `name` as a process: `target/<profile>/examples/<name>`, which `cargo test` builds
/// beside the test binaries, with `RUST_BACKTRACE=1` (its errors must still be one line).
pub fn example_command(name: &str) -> std::process::Command {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: `cargo test` builds it; or run `cargo build --examples`",
        bin.display()
    );
    let mut cmd = std::process::Command::new(bin);
    cmd.env("RUST_BACKTRACE", "1");
    cmd
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF that `scripts/fetch_smollm2.sh` caches. Panics, saying
/// how to get it, when it is absent: tests that need it never pass without it.
pub fn smollm2_gguf() -> PathBuf {
    let name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let mut tried = Vec::new();
    // An empty variable is unset, as the fetch script and the example take it.
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("CANDLE_GLU_GGUF") {
        tried.push(PathBuf::from(p));
    }
    if let Some(dir) = var("CANDLE_GLU_CACHE") {
        tried.push(PathBuf::from(dir).join(name));
    }
    let cache = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(cache) = cache {
        tried.push(cache.join("candle-glu").join(name));
    }
    for path in &tried {
        if path.is_file() {
            return path.clone();
        }
    }
    panic!(
        "the SmolLM2 GGUF is not there (looked at {tried:?}): run scripts/fetch_smollm2.sh, \
         or set CANDLE_GLU_GGUF to its path"
    );
}

/// The repository's embedded weights directory.
pub fn embedded_weights() -> PathBuf {
    repo().join("weights")
}

/// The block's forward pass with candle's own ops only, from its public parts: the three
/// projections (candle's `Linear` / `QMatMul`) and [`candle_glu::Activation::gated`]. The plain
/// twin the fused kernels are held to.
pub fn plain_forward(ffn: &candle_glu::GluFeedForward, xs: &Tensor) -> candle_core::Result<Tensor> {
    let h = ffn.config().hidden_size;
    let x = xs.reshape(((), h))?.to_dtype(ffn.dtype())?;
    let gate = ffn.gate_proj().forward_candle(&x)?;
    let up = ffn.up_proj().forward_candle(&x)?;
    let hidden = ffn.activation().gated(&gate, &up)?;
    let y = ffn.down_proj().forward_candle(&hidden)?;
    y.reshape(xs.shape())?.to_dtype(xs.dtype())
}
