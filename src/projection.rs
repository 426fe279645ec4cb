//! [`Projection`], a linear layer `y = x·Wᵀ + b` on the crate's kernels: the projections of the
//! gated block, and a drop-in for candle's `Linear` and `QMatMul` anywhere in a model.

#![forbid(unsafe_code)]

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::config::MAX_ACTIVATION_BYTES;
use crate::kernels::{self, LinearOp, QMatMulOp, QuantLinearOp};
use crate::{Error, MicroKernel};

/// A linear layer, `y = x·Wᵀ + b`, with `W` stored as PyTorch's `[out, in]`: one projection of
/// the gated block, and a layer of its own wherever a model has one (attention's q/k/v/o, an
/// output head).
///
/// On a CPU with the crate's kernels ([`cpu_kernels`](crate::cpu_kernels)) it multiplies
/// through them, reading the weight in place, with the schedules the block uses (weight rows
/// streamed for a few tokens, packed panels for many):
/// - dense f32, bf16 and f16 weights, f32 sums;
/// - GGUF q8_0 and q4k in integer dot products over activations rounded to 8 bits per 32
///   values (AVX512-VNNI), Q4_1 too up to 20 tokens and decoded exactly to f32 past them
///   (AVX-512), all three on the AMX tiles at prefill where the CPU has them (see
///   `docs/performance.md`; [`with_exact_q4_1`](Projection::with_exact_q4_1) keeps Q4_1
///   exact).
///
/// Elsewhere (other GGUF types, GPUs, CPUs without AVX-512, strided weights) it is candle's
/// `Linear` or `QMatMul`, as [`forward_candle`](Self::forward_candle). Dense weights compute in
/// the weight's dtype, quantized ones in f32; the result comes back in the input's dtype.
/// Inputs of any rank whose last dimension is `in` work.
///
/// ```rust
/// use candle_core::{Device, Module, Tensor};
/// use candle_glu::Projection;
/// let dev = Device::Cpu;
/// let w = Tensor::new(&[[1f32, 0., 2.], [0., 1., -1.]], &dev)?; // [out 2, in 3]
/// let b = Tensor::new(&[0.5f32, 0.], &dev)?;
/// let proj = Projection::new(w, Some(b))?;
/// let x = Tensor::new(&[[[1f32, 2., 3.]]], &dev)?; // [1, 1, 3]
/// assert_eq!(proj.forward(&x)?.to_vec3::<f32>()?, [[[7.5, -1.]]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// Training works through dense weights: the kernels' backward pass gives the input's and the
/// weight's gradients, and a bias that is a variable is added by candle's ops. Quantized weights
/// are constants: the gradient reaches the input (as QLoRA-style training needs), over the
/// weight dequantized for each backward pass, but not the weight. (candle's own `QMatMul`
/// gives no gradient at all.)
///
/// Where a model holds candle's `Linear` (or `QMatMul`), a `Projection` takes its place; here
/// attention's projections, loaded as `candle_nn::linear_b` would load them:
///
/// ```rust
/// use candle_core::{DType, Device, Module, Result, Tensor};
/// use candle_glu::Projection;
/// use candle_nn::VarBuilder;
///
/// struct SelfAttention {
///     q_proj: Projection, // was candle_nn::Linear
///     k_proj: Projection,
///     v_proj: Projection,
///     o_proj: Projection,
/// }
///
/// impl SelfAttention {
///     fn new(hidden: usize, kv: usize, vb: VarBuilder) -> Result<Self> {
///         Ok(Self {
///             q_proj: Projection::load(hidden, hidden, false, vb.pp("q_proj"))?,
///             k_proj: Projection::load(hidden, kv, false, vb.pp("k_proj"))?,
///             v_proj: Projection::load(hidden, kv, false, vb.pp("v_proj"))?,
///             o_proj: Projection::load(hidden, hidden, false, vb.pp("o_proj"))?,
///         })
///     }
/// }
///
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let attn = SelfAttention::new(576, 192, vb.pp("model.layers.0.self_attn"))?;
/// let x = Tensor::zeros((1, 7, 576), DType::F32, &Device::Cpu)?;
/// let (q, k) = (attn.q_proj.forward(&x)?, attn.k_proj.forward(&x)?);
/// assert_eq!((q.dims(), k.dims()), (&[1, 7, 576][..], &[1, 7, 192][..]));
/// # let _ = (&attn.v_proj, &attn.o_proj);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// From a GGUF, `Checkpoint::load_projection("blk.0.attn_q", &opts)` keeps the blocks as they
/// are; `examples/smollm2/` runs every linear layer of SmolLM2 this way (`docs/end-to-end.md`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Projection {
    /// A dense weight in any float dtype, as a [`candle_nn::Linear`].
    Dense(Linear),
    /// A quantized weight (GGUF), held in candle's [`QMatMul`], with f32 activations. Built
    /// with [`from_qtensor`](Projection::from_qtensor) or [`quantized`](Projection::quantized).
    #[non_exhaustive]
    Quantized {
        /// The quantized weight, `[out, in]`.
        weight: QMatMul,
        /// The bias, if any, in f32.
        bias: Option<Tensor>,
        /// Q4_1 decoded exactly at every token count; see
        /// [`with_exact_q4_1`](Projection::with_exact_q4_1).
        exact_q4_1: bool,
    },
}

impl Projection {
    /// A dense layer: `weight` is `[out, in]` in a float dtype, `bias` (if any) `[out]` in the
    /// same dtype, on the same device.
    ///
    /// # Errors
    /// A weight that is not a matrix with rows and columns, or not in f32, f16, bf16 or f64; a
    /// bias of another length, dtype or device.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, _) = match *weight.dims() {
            [out, inp] if out > 0 && inp > 0 => (out, inp),
            _ => {
                return Err(invalid(format!(
                    "weight of shape {:?} is not [out, in] with both at least 1",
                    weight.dims()
                )))
            }
        };
        if !crate::activation::computes_in(weight.dtype()) {
            return Err(invalid(format!(
                "weight has dtype {:?}, expected f32, f16, bf16 or f64",
                weight.dtype()
            )));
        }
        if let Some(b) = &bias {
            check_bias(b, out, weight.device())?;
            if b.dtype() != weight.dtype() {
                return Err(invalid(format!(
                    "bias has dtype {:?} and weight {:?}: they must match",
                    b.dtype(),
                    weight.dtype()
                )));
            }
        }
        Ok(Projection::Dense(Linear::new(weight, bias)))
    }

    /// A quantized layer on a GGUF weight `[out, in]` (any type candle reads), read in place;
    /// `bias` (if any) `[out]`, widened to f32. Q4_1, Q5_0 and Q5_1 weights whose rows hold an
    /// odd number of 32-value blocks are dequantized to f32 (candle's own kernels for them assert
    /// an even number), and so are GGUF's float types.
    ///
    /// # Errors
    /// A weight that is not a matrix with rows and columns; a bias of another length or device.
    pub fn from_qtensor(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let out = match *weight.shape().dims() {
            [out, inp] if out > 0 && inp > 0 => out,
            ref dims => {
                return Err(invalid(format!(
                    "weight of shape {dims:?} is not [out, in] with both at least 1"
                )))
            }
        };
        let bias = match bias {
            Some(b) => {
                check_bias(&b, out, &weight.device())?;
                Some(b.to_dtype(DType::F32)?)
            }
            None => None,
        };
        Ok(Projection::Quantized {
            weight: qmatmul(weight)?,
            bias,
            exact_q4_1: false,
        })
    }

    /// A quantized projection from candle's `QMatMul`, as it is: unlike
    /// [`from_qtensor`](Self::from_qtensor), nothing is checked or converted, so the bias must
    /// be f32 `[out]` on the weight's device, and a Q4_1, Q5_0 or Q5_1 weight whose rows hold an
    /// odd number of blocks reaches candle's kernels, which assert an even number in debug
    /// builds.
    pub fn quantized(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Projection::Quantized {
            weight,
            bias,
            exact_q4_1: false,
        }
    }

    /// Whether a GGUF Q4_1 weight is multiplied as its exact f32 decoding at every token count
    /// (the result then equals the same layer dequantized to f32, bit for bit), rather than
    /// the fastest way the CPU has: by default over activations rounded to 8 bits per 32 values
    /// up to 20 tokens (AVX512-VNNI), as llama.cpp and candle multiply Q4_1, and on the AMX
    /// tiles from 4 tokens. Other weights ignore it.
    pub fn with_exact_q4_1(mut self, exact: bool) -> Self {
        if let Projection::Quantized { exact_q4_1, .. } = &mut self {
            *exact_q4_1 = exact;
        }
        self
    }

    /// Whether Q4_1 is decoded exactly ([`with_exact_q4_1`](Self::with_exact_q4_1)).
    pub fn exact_q4_1(&self) -> bool {
        matches!(
            self,
            Projection::Quantized {
                exact_q4_1: true,
                ..
            }
        )
    }

    /// Reads `weight` (`[out_dim, in_dim]`) and, if `bias`, `bias` (`[out_dim]`) under `vb`'s
    /// prefix, in `vb`'s dtype, as `candle_nn::linear_b(in_dim, out_dim, bias, vb)` does. Over a
    /// `VarMap`, missing tensors are created with `candle_nn::linear`'s initialisation.
    ///
    /// # Errors
    /// A size of 0, or a `vb` dtype other than f32, f16, bf16 or f64; a missing tensor (the
    /// message names what exists nearby), or one of another shape.
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        if in_dim == 0 || out_dim == 0 {
            return Err(invalid(format!(
                "{}a projection of {in_dim} inputs to {out_dim} outputs; both must be at least 1",
                at_prefix(&vb)
            )));
        }
        check_load_dtype(&vb)?;
        Ok(Projection::Dense(load_linear(
            &vb,
            [out_dim, in_dim],
            bias,
        )?))
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

    /// The input features, `in`.
    pub fn in_features(&self) -> usize {
        self.weight_dims().get(1).copied().unwrap_or(0)
    }

    /// The output features, `out`.
    pub fn out_features(&self) -> usize {
        self.weight_dims().first().copied().unwrap_or(0)
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Projection::Dense(linear) => linear.bias(),
            Projection::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// The dtype inputs are computed in: the weight's for dense projections, f32 for quantized
    /// ones (f16 for candle's `QMatMul::TensorF16`, which rounds its input to f16).
    pub fn dtype(&self) -> DType {
        match self {
            Projection::Dense(linear) => linear.weight().dtype(),
            Projection::Quantized {
                weight: QMatMul::TensorF16(_),
                ..
            } => DType::F16,
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

    /// The CPU micro-kernel that multiplies `xs` (`[.., in]`), or `None` where candle's ops do.
    /// For logs and tests: the result is the same either way, within the rounding of the path.
    ///
    /// ```rust
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_glu::{MicroKernel, Projection};
    /// let proj = Projection::new(Tensor::zeros((4, 8), DType::F32, &Device::Cpu)?, None)?;
    /// let one = Tensor::zeros((1, 8), DType::F32, &Device::Cpu)?;
    /// if candle_glu::cpu_kernels().is_some() {
    ///     assert_eq!(proj.micro_kernel(&one), Some(MicroKernel::FmaRows));
    /// }
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn micro_kernel(&self, xs: &Tensor) -> Option<MicroKernel> {
        let k = self.in_features();
        let m = xs.elem_count() / k.max(1);
        if !xs.device().is_cpu() {
            return None;
        }
        match self.kernel_weight()? {
            KernelWeight::Dense(w) => kernels::dense_micro_kernel(w.dtype(), m, k),
            KernelWeight::Quantized(q) => kernels::quant_micro_kernel(q, m, self.exact_q4_1()),
        }
    }

    /// The same product through candle's own ops: `Linear::forward`, or `QMatMul`'s forward plus
    /// the bias (for a `QTensor`, through an op of this crate that adds the input's gradient,
    /// which candle's lacks). The plain twin the kernels are tested against, and the path of every case the
    /// kernels do not take. Same dtypes in and out as [`forward`](Module::forward).
    ///
    /// # Errors
    /// As [`forward`](Module::forward).
    pub fn forward_candle(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.check_input(xs)?;
        // As `[tokens, in]`, in order: candle's `Linear` takes ranks 2 to 4 only, and
        // `QMatMul` contiguous inputs only; every rank and layout works here as on the kernels.
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.out_features();
        }
        let x = x.reshape(((), self.in_features()))?;
        let y = match self {
            Projection::Dense(linear) => linear.forward(&x)?,
            // candle's quantized product, with the input's gradient (candle's has none). It asks
            // the input's device only, and panics on weights elsewhere: an error here instead.
            Projection::Quantized {
                weight: QMatMul::QTensor(q),
                bias,
                ..
            } => {
                same_device(&x, &q.device(), "quantized projection")?;
                add_bias(x.apply_op1(QMatMulOp(Arc::clone(q)))?, bias.as_ref())?
            }
            Projection::Quantized { weight, bias, .. } => {
                add_bias(weight.forward(&x)?, bias.as_ref())?
            }
        };
        y.reshape(dims)?.to_dtype(xs.dtype())
    }

    /// The weight as the CPU kernels take it, where they do.
    fn kernel_weight(&self) -> Option<KernelWeight<'_>> {
        crate::cpu_kernels()?;
        match self {
            Projection::Dense(linear) => dense_kernel_weight(linear.weight()),
            Projection::Quantized { weight, .. } => match weight {
                QMatMul::QTensor(q) => kernels::quantized_available(&[q.as_ref()])
                    .then_some(KernelWeight::Quantized(q)),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => dense_kernel_weight(t),
            },
        }
    }

    /// Checks `xs` and returns it in the dtype the weight computes in ([`dtype`](Self::dtype)),
    /// leading dimensions kept.
    fn check_input(&self, xs: &Tensor) -> Result<Tensor> {
        let (out, k) = (self.out_features(), self.in_features());
        if !crate::activation::computes_in(xs.dtype()) {
            return Err(Error::InputDtype { dtype: xs.dtype() }.into());
        }
        let Some((&last, lead)) = xs.dims().split_last() else {
            return Err(input_shape(xs, k));
        };
        if last != k {
            return Err(input_shape(xs, k));
        }
        let tokens = lead.iter().product::<usize>();
        let elem_bytes = self.dtype().size_in_bytes().max(xs.dtype().size_in_bytes());
        let bytes = (tokens as u64)
            .saturating_mul(out as u64)
            .saturating_mul(elem_bytes as u64);
        if bytes > MAX_ACTIVATION_BYTES {
            return Err(Error::OutputTooLarge {
                shape: xs.dims().to_vec(),
                out_features: out,
                bytes,
                limit: MAX_ACTIVATION_BYTES,
            }
            .into());
        }
        xs.to_dtype(self.dtype())
    }
}

/// A weight the CPU kernels can take.
enum KernelWeight<'a> {
    /// Dense f32, bf16 or f16, contiguous.
    Dense(&'a Tensor),
    /// GGUF blocks the kernels read in place.
    Quantized(&'a Arc<QTensor>),
}

fn dense_kernel_weight(w: &Tensor) -> Option<KernelWeight<'_>> {
    let dtype_ok = matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16);
    (dtype_ok && w.device().is_cpu() && w.is_contiguous() && w.rank() == 2)
        .then_some(KernelWeight::Dense(w))
}

impl Module for Projection {
    /// `xs·Wᵀ + b` over the last dimension of `xs` (`[.., in]` → `[.., out]`), in `xs`'s dtype.
    ///
    /// # Errors
    /// An input that is not floating point, whose last dimension is not `in`, or whose result
    /// would exceed [`MAX_ACTIVATION_BYTES`].
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let Some(weight) = self.kernel_weight().filter(|_| xs.device().is_cpu()) else {
            return self.forward_candle(xs);
        };
        let x = self.check_input(xs)?;
        let (k, n) = (self.in_features(), self.out_features());
        let mut dims = xs.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let tokens = x.elem_count() / k.max(1);
        if tokens == 0 || k == 0 {
            // Sums of nothing are zeros, plus the bias.
            return self.forward_candle(xs);
        }
        let x = x.reshape((tokens, k))?.contiguous()?;
        let y = match (weight, self.bias()) {
            // The kernels take a constant bias into their epilogue; one that is being trained is
            // added by candle's ops, which differentiate it.
            (KernelWeight::Dense(w), Some(b)) if !b.track_op() => {
                let bias = Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?);
                x.apply_op2(w, LinearOp { bias })?
            }
            (KernelWeight::Dense(w), bias) => {
                let y = x.apply_op2(w, LinearOp { bias: None })?;
                add_bias(y, bias)?
            }
            (KernelWeight::Quantized(q), bias) => {
                let op = QuantLinearOp {
                    w: Arc::clone(q),
                    exact_q4_1: self.exact_q4_1(),
                };
                add_bias(x.apply_op1(op)?, bias)?
            }
        };
        y.reshape(dims)?.to_dtype(xs.dtype())
    }
}

/// An error where the input is not on the weights' device (candle's quantized product would
/// panic there: it asks the input's device only).
fn same_device(xs: &Tensor, weights: &Device, op: &'static str) -> Result<()> {
    if xs.device().same_device(weights) {
        Ok(())
    } else {
        Err(candle_core::Error::DeviceMismatchBinaryOp {
            lhs: xs.device().location(),
            rhs: weights.location(),
            op,
        })
    }
}

fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        None => Ok(y),
    }
}

/// Refuses a `VarBuilder` whose dtype the layers cannot compute in (an integer dtype would
/// load the weights rounded to integers, and the forward would then blame its input's dtype).
pub(crate) fn check_load_dtype(vb: &VarBuilder) -> crate::Result<()> {
    if crate::activation::computes_in(vb.dtype()) {
        return Ok(());
    }
    Err(Error::InvalidProjection {
        message: format!(
            "{}weights requested in {:?}, expected f32, f16, bf16 or f64",
            at_prefix(vb),
            vb.dtype()
        ),
    })
}

/// "`prefix`: " to begin a message about what `vb` loads, or nothing at the root.
fn at_prefix(vb: &VarBuilder) -> String {
    match vb.prefix() {
        p if p.is_empty() => String::new(),
        p => format!("`{p}`: "),
    }
}

fn invalid(message: String) -> candle_core::Error {
    Error::InvalidProjection { message }.into()
}

fn input_shape(xs: &Tensor, in_features: usize) -> candle_core::Error {
    Error::ProjectionInput {
        shape: xs.dims().to_vec(),
        in_features,
    }
    .into()
}

fn check_bias(b: &Tensor, out: usize, device: &Device) -> Result<()> {
    if b.dims() != [out] {
        return Err(invalid(format!(
            "bias of shape {:?} does not match the weight's {out} outputs",
            b.dims()
        )));
    }
    if !b.device().same_device(device) {
        return Err(invalid("bias and weight are on different devices".into()));
    }
    Ok(())
}

/// Reads `weight` of shape `[out, in]` and, if `bias`, `bias` under `vb`'s prefix; over a
/// `VarMap`, creates them as `candle_nn::linear` does (Kaiming-normal weight, uniform bias).
pub(crate) fn load_linear(
    vb: &VarBuilder,
    [out, inp]: [usize; 2],
    bias: bool,
) -> crate::Result<Linear> {
    let weight = load(
        vb,
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
        Some(load(vb, "bias", &[out], init)?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// `vb.get_with_hints`, with errors that say what exists instead (the crate's own, so that the
/// loaders keep their variants).
pub(crate) fn load(
    vb: &VarBuilder,
    name: &str,
    shape: &[usize],
    init: Init,
) -> crate::Result<Tensor> {
    load_as(vb, name, shape, init, vb.dtype())
}

/// [`load`] in `dtype` rather than the `VarBuilder`'s.
pub(crate) fn load_as(
    vb: &VarBuilder,
    name: &str,
    shape: &[usize],
    init: Init,
    dtype: DType,
) -> crate::Result<Tensor> {
    let err = match vb.get_with_hints_dtype(shape, name, init, dtype) {
        Ok(t) => return Ok(t),
        Err(err) => err,
    };
    let full = crate::layout::join(&vb.prefix(), name);
    if !vb.contains_tensor(name) {
        let root = vb.root();
        return Err(Error::MissingTensor {
            found: crate::layout::nearby_names(&full, |n| root.contains_tensor(n)),
            name: full,
        });
    }
    match vb.get_unchecked(name) {
        Ok(t) if t.dims() != shape => Err(shape_error(&full, shape, t.dims())),
        _ => Err(err.into()),
    }
}

pub(crate) fn shape_error(name: &str, expected: &[usize], found: &[usize]) -> Error {
    Error::ShapeMismatch {
        name: name.to_string(),
        expected: expected.to_vec(),
        found: found.to_vec(),
    }
}

/// A quantized weight as candle's `QMatMul`, or dequantized to f32 where candle's quantized
/// kernel cannot take it: Q4_1, Q5_0 and Q5_1 dot products `debug_assert!` an even number of
/// blocks per row (found by fuzzing: rows of 32 values panic in debug builds; release builds
/// compute them correctly with the generic loop).
pub(crate) fn qmatmul(qt: Arc<QTensor>) -> Result<QMatMul> {
    let pairs_only = matches!(
        qt.dtype(),
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    );
    let blocks = qt.shape().dims().last().copied().unwrap_or(0) / qt.dtype().block_size();
    if pairs_only && blocks % 2 == 1 {
        return Ok(QMatMul::Tensor(qt.dequantize(&qt.device())?));
    }
    QMatMul::from_arc(qt)
}
