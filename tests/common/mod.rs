//! Helpers shared by the integration tests: the PyTorch fixtures made by
//! `scripts/make_fixtures.py`, and error measures against a float64 truth.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

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

/// max |a - b| in float64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |t| in float64.
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a - truth| / max |truth|.
pub fn rel_err(a: &Tensor, truth: &Tensor) -> f64 {
    max_abs_diff(a, truth) / max_abs(truth)
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF that `scripts/fetch_smollm2.sh` caches. Panics, saying
/// how to get it, when it is absent: tests that need it never pass without it.
pub fn smollm2_gguf() -> PathBuf {
    let name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("CANDLE_GLU_GGUF") {
        tried.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("CANDLE_GLU_CACHE") {
        tried.push(PathBuf::from(dir).join(name));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
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
    use candle_core::Module;
    let h = ffn.config().hidden_size;
    let x = xs.reshape(((), h))?.to_dtype(ffn.dtype())?;
    let gate = ffn.gate_proj().forward(&x)?;
    let up = ffn.up_proj().forward(&x)?;
    let hidden = ffn.activation().gated(&gate, &up)?;
    let y = ffn.down_proj().forward(&hidden)?;
    y.reshape(xs.shape())?.to_dtype(xs.dtype())
}
