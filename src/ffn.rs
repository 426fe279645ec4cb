//! [`GluFeedForward`], the gated feed-forward block `FFN(x) = W2 · (σ(x·W) ⊙ x·V)`.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::kernels::{self, GateUpOp, LinearOp, QuantGateUpOp, QuantLinearOp};
use crate::layout::GateUpNames;
use crate::{Activation, Error, GluConfig, WeightLayout};

/// One projection of the block, `y = x·Wᵀ + b`, with `W` stored as PyTorch's `[out, in]`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Projection {
    /// A dense weight in any float dtype, as a [`candle_nn::Linear`].
    Dense(Linear),
    /// A quantized weight (GGUF) in candle's [`QMatMul`], with f32 activations. On a CPU, the
    /// block multiplies Q4_1 (with AVX-512), q8_0 and q4k (with AVX512-VNNI) by its own kernels,
    /// which read the blocks in place; other types, and other devices, go through `QMatMul`.
    Quantized {
        /// The quantized weight, `[out, in]`.
        weight: QMatMul,
        /// The bias, if any, in f32.
        bias: Option<Tensor>,
    },
}

impl Projection {
    /// A quantized projection.
    pub fn quantized(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Projection::Quantized { weight, bias }
    }

    /// The dense layer, if this projection is dense.
    pub fn as_linear(&self) -> Option<&Linear> {
        match self {
            Projection::Dense(linear) => Some(linear),
            Projection::Quantized { .. } => None,
        }
    }

    /// The weight's shape `[out, in]`.
    pub fn weight_dims(&self) -> &[usize] {
        match self {
            Projection::Dense(linear) => linear.weight().dims(),
            Projection::Quantized { weight, .. } => match weight {
                QMatMul::QTensor(q) => q.shape().dims(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims(),
            },
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Projection::Dense(linear) => linear.bias(),
            Projection::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// The dtype inputs are computed in: the weight's for dense projections, f32 for quantized
    /// ones.
    pub fn dtype(&self) -> DType {
        match self {
            Projection::Dense(linear) => linear.weight().dtype(),
            Projection::Quantized { .. } => DType::F32,
        }
    }

    /// The device the weight lives on.
    pub fn device(&self) -> Device {
        match self {
            Projection::Dense(linear) => linear.weight().device().clone(),
            Projection::Quantized { weight, .. } => match weight {
                QMatMul::QTensor(q) => q.device(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.device().clone(),
            },
        }
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Projection::Quantized { .. })
    }
}

impl Module for Projection {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Projection::Dense(linear) => linear.forward(xs),
            Projection::Quantized { weight, bias } => {
                let ys = weight.forward(xs)?;
                match bias {
                    Some(b) => ys.broadcast_add(b),
                    None => Ok(ys),
                }
            }
        }
    }
}

/// The gated feed-forward block of modern transformers (Shazeer 2020):
///
/// `FFN(x) = W2 · (σ(x·W) ⊙ x·V)`, with W the gate, V the up and W2 the down projection.
///
/// It reads its weights under a `VarBuilder`'s prefix in the layout the config names, and
/// implements [`Module`], so `xs.apply(&ffn)` works for inputs of any rank whose last dimension
/// is the hidden size.
///
/// ```rust
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_glu::{Activation, GluConfig, GluFeedForward};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let (h, i) = (8, 12);
/// let mut ws = std::collections::HashMap::new();
/// for (name, shape) in [("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))] {
///     let w = Tensor::randn(0f32, 0.2, shape, &dev)?;
///     ws.insert(format!("model.layers.0.mlp.{name}.weight"), w);
/// }
/// let vb = candle_nn::VarBuilder::from_tensors(ws, DType::F32, &dev);
///
/// let cfg = GluConfig::new(h, i).with_activation("silu".parse()?);
/// let ffn = GluFeedForward::new(&cfg, vb.pp("model.layers.0.mlp"))?;
/// let x = Tensor::randn(0f32, 1., (2, 5, h), &dev)?;
/// let y = x.apply(&ffn)?;
/// assert_eq!(y.dims(), &[2, 5, h]);
/// # Ok(()) }
/// ```
///
/// # Shapes
/// - input `[..., H]`, any number of leading dimensions, any float dtype;
/// - output `[..., H]`, in the input's dtype;
/// - gate and up weights `[I, H]` (or fused `[2·I, H]`), down weight `[H, I]`.
#[derive(Debug, Clone)]
pub struct GluFeedForward {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
    config: GluConfig,
}

impl GluFeedForward {
    /// Reads the block's weights under `vb`'s prefix, in `cfg.layout`'s names and `vb`'s dtype.
    ///
    /// With a `VarBuilder` over a `VarMap`, missing weights are created (Kaiming-normal weights,
    /// uniform biases, as `candle_nn::linear`), so the block can be trained from scratch.
    ///
    /// # Errors
    /// An invalid config; a missing tensor (the message gives the full name and the names that
    /// do exist nearby); a tensor of the wrong shape (which one, expected and found); biases that
    /// exist for only some projections or disagree with `cfg.bias`.
    pub fn new(cfg: &GluConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let names = cfg.layout.names();
        let mut projections = names.all();
        check_biases(cfg, &vb, &projections)?;

        let down_name = projections.pop().unwrap_or(names.down);
        let (gate_proj, up_proj) = match names.gate_up {
            GateUpNames::Split { gate, up } => (
                load_linear(&vb, gate, (i, h), cfg.bias)?,
                load_linear(&vb, up, (i, h), cfg.bias)?,
            ),
            GateUpNames::Fused { gate_up } => {
                // Rows 0..I are the gate, I..2I the up projection; `narrow` shares the storage.
                let fused = load_linear(&vb, gate_up, (2 * i, h), cfg.bias)?;
                let half = |start| -> Result<Linear> {
                    let w = fused.weight().narrow(0, start, i)?;
                    let b = fused.bias().map(|b| b.narrow(0, start, i)).transpose()?;
                    Ok(Linear::new(w, b))
                };
                (half(0)?, half(i)?)
            }
        };
        let down_proj = load_linear(&vb, down_name, (h, i), cfg.bias)?;
        Ok(Self {
            gate_proj: Projection::Dense(gate_proj),
            up_proj: Projection::Dense(up_proj),
            down_proj: Projection::Dense(down_proj),
            config: cfg.clone(),
        })
    }

    /// Builds the block from projections made elsewhere, checking their shapes against `cfg`.
    ///
    /// # Errors
    /// A projection whose weight is not `[I, H]` (gate, up) or `[H, I]` (down).
    pub fn from_projections(
        cfg: &GluConfig,
        gate_proj: Projection,
        up_proj: Projection,
        down_proj: Projection,
    ) -> Result<Self> {
        cfg.validate()?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        for (name, proj, expected) in [
            ("gate_proj", &gate_proj, [i, h]),
            ("up_proj", &up_proj, [i, h]),
            ("down_proj", &down_proj, [h, i]),
        ] {
            if proj.weight_dims() != expected {
                return Err(shape_error(name, &expected, proj.weight_dims()));
            }
        }
        Ok(Self {
            gate_proj,
            up_proj,
            down_proj,
            config: cfg.clone(),
        })
    }

    /// The gate projection W, `[I, H]`. For a fused checkpoint, a view of its first half.
    pub fn gate_proj(&self) -> &Projection {
        &self.gate_proj
    }

    /// The up projection V, `[I, H]`. For a fused checkpoint, a view of its second half.
    pub fn up_proj(&self) -> &Projection {
        &self.up_proj
    }

    /// The down projection W2, `[H, I]`.
    pub fn down_proj(&self) -> &Projection {
        &self.down_proj
    }

    /// The block's config.
    pub fn config(&self) -> &GluConfig {
        &self.config
    }

    /// The gate activation σ.
    pub fn activation(&self) -> Activation {
        self.config.activation
    }

    /// The dtype the weights are stored and computed in.
    pub fn dtype(&self) -> DType {
        self.down_proj.dtype()
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.down_proj.device()
    }

    /// The block through the fused CPU kernels, when they can take it: dense f32/bf16/f16
    /// contiguous weights on a CPU with AVX-512, and no biases while training (the kernels
    /// treat biases as constants). `None` otherwise.
    fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let dense = |p: &Projection| match p {
            Projection::Dense(l) if l.weight().is_contiguous() => Some(l.clone()),
            _ => None,
        };
        let (Some(g), Some(u), Some(d)) = (
            dense(&self.gate_proj),
            dense(&self.up_proj),
            dense(&self.down_proj),
        ) else {
            return Ok(None);
        };
        let w = g.weight();
        let supported = matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16);
        if !supported || !w.device().is_cpu() || !kernels::cpu_available() {
            return Ok(None);
        }
        let biases = [g.bias(), u.bias(), d.bias()];
        let (gate_up_bias, down_bias) = match biases {
            [None, None, None] => (None, None),
            [Some(bg), Some(bu), Some(bd)] => {
                let training = [x, bg, bu, bd, g.weight(), u.weight(), d.weight()]
                    .iter()
                    .any(|t| t.track_op());
                if training {
                    return Ok(None);
                }
                let v = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
                (Some((v(bg)?, v(bu)?)), Some(v(bd)?))
            }
            _ => return Ok(None),
        };
        let gate_up = GateUpOp {
            act: self.config.activation,
            bias: gate_up_bias,
        };
        let hidden = x.contiguous()?.apply_op3(g.weight(), u.weight(), gate_up)?;
        let y = hidden.apply_op2(d.weight(), LinearOp { bias: down_bias })?;
        Ok(Some(y))
    }

    /// The block through the quantized kernels, when the three weights are GGUF blocks that
    /// this CPU reads in place (Q4_1 with AVX-512; q8_0, q4k with AVX512-VNNI), gate and up in
    /// one format, and there are no biases. Any projection they cannot take goes through
    /// candle's `QMatMul`. `None` when neither gate/up nor down can.
    fn forward_quantized(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let blocks = |p: &Projection| match p {
            Projection::Quantized {
                weight: QMatMul::QTensor(q),
                bias: None,
            } => Some(q.clone()),
            _ => None,
        };
        let (Some(wg), Some(wu), Some(wd)) = (
            blocks(&self.gate_proj),
            blocks(&self.up_proj),
            blocks(&self.down_proj),
        ) else {
            return Ok(None);
        };
        let gate_up = kernels::quantized_available(&[&wg, &wu]);
        let down = kernels::quantized_available(&[&wd]);
        if !gate_up && !down {
            return Ok(None);
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let act = self.config.activation;
        let hidden = if gate_up {
            x.apply_op1_no_bwd(&QuantGateUpOp { wg, wu, act })?
        } else {
            let gate = self.gate_proj.forward(&x)?;
            kernels::gated(&gate, &self.up_proj.forward(&x)?, act)?
        };
        if down {
            Ok(Some(hidden.apply_op1_no_bwd(&QuantLinearOp { w: wd })?))
        } else {
            Ok(Some(self.down_proj.forward(&hidden)?))
        }
    }

    /// The block as three projections and the gated product: for quantized weights, GPUs and
    /// CPUs without AVX-512. The gated product is one fused pass where a kernel exists.
    fn forward_unfused(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        let hidden = kernels::gated(&gate, &up, self.config.activation)?;
        self.down_proj.forward(&hidden)
    }

    /// The block with candle's own ops only: three matmuls and the gated product. The plain twin
    /// the fused kernels are tested against.
    #[doc(hidden)]
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.flatten_input(xs)?;
        let gate = self.gate_proj.forward(&x)?;
        let up = self.up_proj.forward(&x)?;
        let hidden = gated_product(&gate, &up, self.config.activation)?;
        let y = self.down_proj.forward(&hidden)?;
        y.reshape(xs.shape())?.to_dtype(xs.dtype())
    }

    /// Checks an input and returns it as `[tokens, H]` in the weights' dtype.
    fn flatten_input(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.config.hidden_size;
        if !xs.dtype().is_float() {
            return Err(Error::InputDtype { dtype: xs.dtype() }.into());
        }
        if xs.dims().last() != Some(&h) {
            return Err(Error::InputShape {
                shape: xs.dims().to_vec(),
                hidden_size: h,
            }
            .into());
        }
        // Before any allocation: an input too large for memory is an error, not an abort.
        let tokens = xs.elem_count() / h;
        self.config.check_tokens(xs.dims(), tokens, self.dtype())?;
        xs.reshape(((), h))?.to_dtype(self.dtype())
    }
}

impl Module for GluFeedForward {
    /// `W2 · (σ(x·W) ⊙ x·V)` over the last dimension of `xs`; the result has `xs`'s shape and
    /// dtype.
    ///
    /// # Errors
    /// An input whose last dimension is not the hidden size, or whose dtype is not a float; an
    /// input whose intermediate activation would exceed
    /// [`MAX_ACTIVATION_BYTES`](crate::config::MAX_ACTIVATION_BYTES).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.flatten_input(xs)?;
        if x.dim(0)? == 0 {
            return Tensor::zeros(xs.shape(), xs.dtype(), xs.device());
        }
        let y = match self.forward_fused(&x)? {
            Some(y) => y,
            None => match self.forward_quantized(&x)? {
                Some(y) => y,
                None => self.forward_unfused(&x)?,
            },
        };
        y.reshape(xs.shape())?.to_dtype(xs.dtype())
    }
}

/// `σ(gate) ⊙ up` with candle's ops, computed in f32 and rounded once to the inputs' dtype.
///
/// Rounding once is what keeps half-precision results within PyTorch's own error: Swish-β and
/// quick_gelu are three ops each, and rounding after every one of them doubles the error in bf16.
pub(crate) fn gated_product(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    let dtype = gate.dtype();
    if matches!(dtype, DType::F32 | DType::F64) {
        return gate.apply(&act)? * up;
    }
    let gate = gate.to_dtype(DType::F32)?.apply(&act)?;
    (gate * up.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// Reads `<name>.weight` of shape `(out, in)` and, if `bias`, `<name>.bias`.
fn load_linear(
    vb: &VarBuilder,
    name: &str,
    (out, inp): (usize, usize),
    bias: bool,
) -> Result<Linear> {
    let vb = vb.pp(name);
    let weight = load(
        &vb,
        "weight",
        &[out, inp],
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bias = if bias {
        let bound = 1. / (inp as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Some(load(&vb, "bias", &[out], init)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// `vb.get_with_hints`, with errors that say what exists instead.
fn load(vb: &VarBuilder, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
    let err = match vb.get_with_hints(shape, name, init) {
        Ok(t) => return Ok(t),
        Err(err) => err,
    };
    let full = full_name(vb, name);
    if !vb.contains_tensor(name) {
        return Err(Error::MissingTensor {
            found: nearby_names(vb, &full),
            name: full,
        }
        .into());
    }
    match vb.get_unchecked(name) {
        Ok(t) if t.dims() != shape => Err(shape_error(&full, shape, t.dims())),
        _ => Err(err),
    }
}

/// `name` under `vb`'s prefix, without a leading dot at the root.
fn full_name(vb: &VarBuilder, name: &str) -> String {
    match vb.prefix().as_str() {
        "" => name.to_string(),
        prefix => format!("{prefix}.{name}"),
    }
}

fn shape_error(name: &str, expected: &[usize], found: &[usize]) -> candle_core::Error {
    Error::ShapeMismatch {
        name: name.to_string(),
        expected: expected.to_vec(),
        found: found.to_vec(),
    }
    .into()
}

/// Known FFN tensor names that do exist near `missing`: under the same block prefix in another
/// layout, or under a prefix one common slip away (`.mlp` left out or doubled, `model.` left out).
fn nearby_names(vb: &VarBuilder, missing: &str) -> Vec<String> {
    let root = vb.root();
    let block = missing
        .rsplit_once('.')
        .and_then(|(rest, _)| rest.rsplit_once('.'))
        .map_or("", |(block, _)| block);
    let mut bases = vec![block.to_string()];
    for base in [format!("{block}.mlp"), format!("model.{block}")] {
        bases.push(base);
    }
    if let Some(parent) = block.strip_suffix(".mlp") {
        bases.push(parent.to_string());
    }
    let mut found = Vec::new();
    for base in bases {
        for layout in WeightLayout::ALL {
            for proj in layout.names().all() {
                for suffix in ["weight", "bias"] {
                    let name = format!("{base}.{proj}.{suffix}");
                    let name = name.trim_start_matches('.').to_string();
                    if name != missing && !found.contains(&name) && root.contains_tensor(&name) {
                        found.push(name);
                    }
                }
            }
        }
    }
    found.truncate(8);
    found
}

/// Biases must exist for every projection or for none, and agree with `cfg.bias`.
fn check_biases(cfg: &GluConfig, vb: &VarBuilder, projections: &[&str]) -> Result<()> {
    // A backend that has every name (`VarBuilder::zeros`) says nothing about biases.
    if vb.contains_tensor("\0") {
        return Ok(());
    }
    let (present, absent): (Vec<_>, Vec<_>) = projections
        .iter()
        .partition(|p| vb.contains_tensor(&format!("{p}.bias")));
    let full = |ps: Vec<&&str>| -> Vec<String> {
        ps.into_iter()
            .map(|p| full_name(vb, &format!("{p}.bias")))
            .collect()
    };
    let (present, absent) = (full(present), full(absent));
    let list = |names: &[String]| {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let message = if !present.is_empty() && !absent.is_empty() {
        format!(
            "biases exist for only some projections: found {}, missing {}",
            list(&present),
            list(&absent)
        )
    } else if !present.is_empty() && !cfg.bias {
        format!(
            "the checkpoint has biases ({}) but the config has bias = false; \
             use `with_bias(true)` (`mlp_bias: true` in config.json)",
            list(&present)
        )
    } else {
        return Ok(());
    };
    Err(Error::Bias { message }.into())
}
