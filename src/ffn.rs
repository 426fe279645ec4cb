//! [`GluFeedForward`], the gated feed-forward block `FFN(x) = W2 · (σ(x·W) ⊙ x·V)`.

#![forbid(unsafe_code)]

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::kernels::{self, GateUpOp, LinearOp, QuantGateUpOp, QuantLinearOp};
use crate::layout::{self, WeightLayout};
use crate::projection::{load_linear, shape_error};
use crate::{Activation, Error, GluConfig, MicroKernel, Projection};

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
/// - input `[..., H]`, any number of leading dimensions, f32, f16, bf16 or f64: converted to
///   the weights' dtype first (an f32 input to bf16 weights is rounded to bf16, where candle's
///   `Linear` would refuse the pair);
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
    /// An invalid config; a `vb` in a dtype other than f32, f16, bf16 or f64; a missing tensor
    /// (the message gives the full name and the names that do exist nearby); a tensor of the wrong shape (which one, expected and found); biases that
    /// exist for only some projections or disagree with `cfg.bias`.
    pub fn new(cfg: &GluConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self::build(cfg, vb)?)
    }

    /// [`new`](Self::new) with the crate's errors, whose variants the loaders keep.
    pub(crate) fn build(cfg: &GluConfig, vb: VarBuilder) -> crate::Result<Self> {
        cfg.validate()?;
        crate::projection::check_load_dtype(&vb)?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let shapes = cfg.layout.projection_shapes(h, i);
        let names: Vec<&str> = shapes.iter().map(|(name, _)| *name).collect();
        check_biases(cfg, &vb, &names)?;
        let loaded = shapes
            .iter()
            .map(|(name, shape)| load_linear(&vb.pp(*name), *shape, cfg.bias))
            .collect::<crate::Result<Vec<_>>>()?;
        let (gate_proj, up_proj, down_proj) = match loaded.as_slice() {
            [gate, up, down] => (gate.clone(), up.clone(), down.clone()),
            [gate_up, down] => {
                // Rows 0..I are the gate, I..2I the up projection; `narrow` shares the storage.
                let half = |start| -> Result<Linear> {
                    let w = gate_up.weight().narrow(0, start, i)?;
                    let b = gate_up.bias().map(|b| b.narrow(0, start, i)).transpose()?;
                    Ok(Linear::new(w, b))
                };
                (half(0)?, half(i)?, down.clone())
            }
            _ => {
                return Err(Error::InvalidConfig {
                    path: None,
                    message: format!("layout {} has no gated block", cfg.layout),
                })
            }
        };
        Ok(Self {
            gate_proj: Projection::Dense(gate_proj),
            up_proj: Projection::Dense(up_proj),
            down_proj: Projection::Dense(down_proj),
            config: cfg.clone(),
        })
    }

    /// Builds the block from projections made elsewhere (quantized weights, weights shared with
    /// another module), checking them against `cfg`. `cfg.layout` is kept as given: it names
    /// where the weights were read from, which these projections do not say.
    ///
    /// # Errors
    /// A projection whose weight is not `[I, H]` (gate, up) or `[H, I]` (down); biases on only
    /// some projections, or biases that disagree with `cfg.bias`.
    pub fn from_projections(
        cfg: &GluConfig,
        gate_proj: Projection,
        up_proj: Projection,
        down_proj: Projection,
    ) -> Result<Self> {
        cfg.validate()?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let projections = [&gate_proj, &up_proj, &down_proj];
        // The split layout's names and shapes are the block's own: gate, up, down.
        let shapes = WeightLayout::Llama.projection_shapes(h, i);
        for ((name, expected), proj) in shapes.iter().zip(projections) {
            if proj.weight_dims() != expected {
                return Err(shape_error(name, expected, proj.weight_dims()).into());
            }
        }
        let with_bias: Vec<&str> = shapes
            .iter()
            .zip(projections)
            .filter(|(_, p)| p.bias().is_some())
            .map(|((name, _), _)| *name)
            .collect();
        let message = match with_bias.len() {
            0 if cfg.bias => "the config has bias = true but no projection has a bias".into(),
            3 if !cfg.bias => "the projections have biases but the config has bias = false; \
                               use `with_bias(true)`"
                .into(),
            0 | 3 => String::new(),
            _ => format!(
                "biases exist for only some projections: {}",
                with_bias.join(", ")
            ),
        };
        if !message.is_empty() {
            return Err(Error::Bias { message }.into());
        }
        Ok(Self {
            gate_proj,
            up_proj,
            down_proj,
            config: cfg.clone(),
        })
    }

    /// Whether GGUF Q4_1 weights are multiplied as their exact f32 decoding at every token
    /// count: the block's result is then bit-identical to the same block with the weights
    /// dequantized to f32. By default (`false`), Q4_1 takes the fastest path the CPU has: up
    /// to 20 tokens on a CPU with AVX512-VNNI, integer dot products over activations rounded
    /// to 8 bits per 32 values (as llama.cpp and candle multiply Q4_1, 2.3× faster than the
    /// exact decoding at one token); on a CPU with AMX, from 4 tokens, the weights decoded to
    /// bf16 for the tiles, with the activations rounded to bf16 (f32 sums), as q8_0 and q4k
    /// weights are there; else the exact decoding. See `docs/performance.md` for the error of
    /// each path against float64.
    ///
    /// The flag lives on the projections ([`Projection::with_exact_q4_1`]): this sets all three,
    /// and a block built [`from_projections`](Self::from_projections) keeps theirs.
    pub fn with_exact_q4_1(mut self, exact: bool) -> Self {
        for p in [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj] {
            *p = p.clone().with_exact_q4_1(exact);
        }
        self
    }

    /// Whether gate and up (either) ask for Q4_1 decoded exactly.
    fn exact_gate_up(&self) -> bool {
        self.gate_proj.exact_q4_1() || self.up_proj.exact_q4_1()
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

    /// Which way [`forward`](Module::forward) takes `xs`: through the crate's fused CPU
    /// kernels, its quantized CPU kernels, or candle's own ops. For logs and tests: the result
    /// is the same either way, within the dtype's rounding.
    ///
    /// ```rust
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_glu::{ForwardPath, GluConfig, GluFeedForward};
    /// let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    /// let ffn = GluFeedForward::new(&GluConfig::new(8, 16), vb)?;
    /// let x = Tensor::zeros((3, 8), DType::F32, &Device::Cpu)?;
    /// let path = ffn.forward_path(&x);
    /// if candle_glu::cpu_kernels().is_some() {
    ///     assert_eq!(path, ForwardPath::Fused);
    /// } else {
    ///     assert_eq!(path, ForwardPath::Candle);
    /// }
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn forward_path(&self, xs: &Tensor) -> ForwardPath {
        if xs.elem_count() == 0 {
            ForwardPath::Candle
        } else if self.fused_weights(xs.track_op()).is_some() {
            ForwardPath::Fused
        } else if self.quantized_weights().is_some() {
            ForwardPath::Quantized
        } else {
            ForwardPath::Candle
        }
    }

    /// Whether a forward of `xs` runs on the crate's CPU kernels alone: no candle matmul or
    /// `QMatMul`, which use candle's worker pool (and would wait on it from inside one of its
    /// tasks on the calling thread).
    pub(crate) fn kernels_only(&self, xs: &Tensor) -> bool {
        match self.forward_path(xs) {
            ForwardPath::Fused => true,
            ForwardPath::Quantized => self
                .quantized_weights()
                .is_some_and(|q| q.gate_up && q.down),
            ForwardPath::Candle => false,
        }
    }

    /// The CPU micro-kernel that multiplies the gate and up projections for `xs` (for GGUF
    /// weights whose gate and up the crate's kernels do not take, the down projection's), or
    /// `None` where candle's ops run. It depends on the weights' type, the token count (`xs`'s
    /// elements over the hidden size) and the CPU ([`cpu_kernels`](crate::cpu_kernels)); the
    /// down projection's is chosen the same way for its own type and depth (the same kernel
    /// but for GGUF types that differ from gate and up's). For logs and benchmarks.
    ///
    /// ```rust
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_glu::{GluConfig, GluFeedForward, MicroKernel};
    /// let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    /// let ffn = GluFeedForward::new(&GluConfig::new(8, 16), vb)?;
    /// let one = Tensor::zeros((1, 8), DType::F32, &Device::Cpu)?;
    /// if candle_glu::cpu_kernels().is_some() {
    ///     // One token of f32 weights: f32 FMAs over the weight rows, whatever the CPU.
    ///     assert_eq!(ffn.micro_kernel(&one), Some(MicroKernel::FmaRows));
    /// }
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn micro_kernel(&self, xs: &Tensor) -> Option<MicroKernel> {
        let h = self.config.hidden_size;
        let m = xs.elem_count() / h.max(1);
        match self.forward_path(xs) {
            ForwardPath::Fused => kernels::dense_micro_kernel(self.dtype(), m, h),
            ForwardPath::Quantized => {
                let q = self.quantized_weights()?;
                let (w, exact) = if q.gate_up {
                    (&q.wg, self.exact_gate_up())
                } else {
                    (&q.wd, self.down_proj.exact_q4_1())
                };
                kernels::quant_micro_kernel(w, m, exact)
            }
            ForwardPath::Candle => None,
        }
    }

    /// The three dense weights, when the fused CPU kernels can take them: f32/bf16/f16,
    /// contiguous, on a CPU whose kernels run, and no biases while training (the kernels treat
    /// biases as constants).
    fn fused_weights(&self, input_tracked: bool) -> Option<[&Linear; 3]> {
        fn dense(p: &Projection) -> Option<&Linear> {
            match p {
                Projection::Dense(l) if l.weight().is_contiguous() => Some(l),
                _ => None,
            }
        }
        let ws = [
            dense(&self.gate_proj)?,
            dense(&self.up_proj)?,
            dense(&self.down_proj)?,
        ];
        let w = ws[0].weight();
        let supported = matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16);
        // The fused ops take one dtype for the three (a block built from projections of
        // several takes candle's ops, which convert).
        let one_dtype = ws.iter().all(|l| l.weight().dtype() == w.dtype());
        if !supported || !one_dtype || !w.device().is_cpu() || crate::cpu_kernels().is_none() {
            return None;
        }
        match ws.map(|l| l.bias()) {
            [None, None, None] => Some(ws),
            [Some(bg), Some(bu), Some(bd)] => {
                let training = input_tracked
                    || [bg, bu, bd].iter().any(|t| t.track_op())
                    || ws.iter().any(|l| l.weight().track_op());
                (!training).then_some(ws)
            }
            _ => None,
        }
    }

    /// The GGUF blocks of the three weights, and whether the quantized CPU kernels take gate/up
    /// and down: `None` when neither can be (other types, devices, biases, no kernels).
    fn quantized_weights(&self) -> Option<QuantizedWeights> {
        let blocks = |p: &Projection| match p {
            Projection::Quantized {
                weight: QMatMul::QTensor(q),
                bias: None,
                ..
            } => Some(q.clone()),
            _ => None,
        };
        let (wg, wu, wd) = (
            blocks(&self.gate_proj)?,
            blocks(&self.up_proj)?,
            blocks(&self.down_proj)?,
        );
        let gate_up = kernels::quantized_available(&[&wg, &wu]);
        let down = kernels::quantized_available(&[&wd]);
        (gate_up || down).then_some(QuantizedWeights {
            wg,
            wu,
            wd,
            gate_up,
            down,
        })
    }

    /// The block through the fused CPU kernels.
    fn forward_fused(&self, x: &Tensor, [g, u, d]: [&Linear; 3]) -> Result<Tensor> {
        let biases = match [g.bias(), u.bias(), d.bias()] {
            [Some(bg), Some(bu), Some(bd)] => {
                let v = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
                Some((v(bg)?, v(bu)?, v(bd)?))
            }
            _ => None,
        };
        let (gate_up_bias, down_bias) = match biases {
            Some((bg, bu, bd)) => (Some((bg, bu)), Some(bd)),
            None => (None, None),
        };
        let gate_up = GateUpOp {
            act: self.config.activation,
            bias: gate_up_bias,
        };
        let hidden = x.contiguous()?.apply_op3(g.weight(), u.weight(), gate_up)?;
        hidden.apply_op2(d.weight(), LinearOp { bias: down_bias })
    }

    /// The block through the quantized CPU kernels; a projection they cannot take goes through
    /// candle's `QMatMul`.
    fn forward_quantized(&self, x: &Tensor, q: QuantizedWeights) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let act = self.config.activation;
        let QuantizedWeights {
            wg,
            wu,
            wd,
            gate_up,
            down,
        } = q;
        let hidden = if gate_up {
            x.apply_op1(QuantGateUpOp {
                wg,
                wu,
                act,
                exact_q4_1: self.exact_gate_up(),
            })?
        } else {
            let gate = self.gate_proj.forward_candle(&x)?;
            kernels::gated(&gate, &self.up_proj.forward_candle(&x)?, act)?
        };
        if down {
            hidden.apply_op1(QuantLinearOp {
                w: wd,
                exact_q4_1: self.down_proj.exact_q4_1(),
            })
        } else {
            self.down_proj.forward_candle(&hidden)
        }
    }

    /// The block as three projections on candle's ops, and the gated product in one pass where
    /// a kernel exists: GPUs, CPUs without the kernels, training with biases, other types.
    fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward_candle(x)?;
        let up = self.up_proj.forward_candle(x)?;
        let hidden = kernels::gated(&gate, &up, self.config.activation)?;
        self.down_proj.forward_candle(&hidden)
    }

    /// Checks an input and returns it as `[tokens, H]` in the weights' dtype.
    fn flatten_input(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.config.hidden_size;
        if !crate::activation::computes_in(xs.dtype()) {
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

/// Which way a [`GluFeedForward`] computes a forward pass; see
/// [`GluFeedForward::forward_path`]. Which CPU kernels run is
/// [`cpu_kernels`](crate::cpu_kernels)'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardPath {
    /// Dense f32/bf16/f16 weights through the crate's CPU kernels: gate and up in one fused
    /// matmul with σ in its epilogue, then the down projection.
    Fused,
    /// GGUF blocks (Q4_1, q8_0, q4k) read in place by the crate's CPU kernels; a projection they
    /// cannot take goes through candle's `QMatMul`.
    Quantized,
    /// candle's own matmuls (or `QMatMul`), with the gated product in one pass where the crate
    /// has a kernel for the device (CPU with AVX-512, CUDA, Metal).
    Candle,
}

impl std::fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForwardPath::Fused => "fused",
            ForwardPath::Quantized => "quantized",
            ForwardPath::Candle => "candle",
        })
    }
}

/// The GGUF weights of a block, and which of gate/up and down the quantized kernels take.
struct QuantizedWeights {
    wg: std::sync::Arc<candle_core::quantized::QTensor>,
    wu: std::sync::Arc<candle_core::quantized::QTensor>,
    wd: std::sync::Arc<candle_core::quantized::QTensor>,
    gate_up: bool,
    down: bool,
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
        let y = if let Some(ws) = self.fused_weights(x.track_op()) {
            self.forward_fused(&x, ws)?
        } else if let Some(q) = self.quantized_weights() {
            self.forward_quantized(&x, q)?
        } else {
            self.forward_candle(&x)?
        };
        y.reshape(xs.shape())?.to_dtype(xs.dtype())
    }
}

/// Biases must exist for every projection or for none, and agree with `cfg.bias`.
fn check_biases(cfg: &GluConfig, vb: &VarBuilder, projections: &[&str]) -> crate::Result<()> {
    // A backend that has every name (`VarBuilder::zeros`) says nothing about biases.
    if vb.contains_tensor("\0") {
        return Ok(());
    }
    let (present, absent): (Vec<_>, Vec<_>) = projections
        .iter()
        .partition(|p| vb.contains_tensor(&format!("{p}.bias")));
    let full = |ps: Vec<&&str>| -> Vec<String> {
        ps.into_iter()
            .map(|p| layout::join(&vb.prefix(), &format!("{p}.bias")))
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
    Err(Error::Bias { message })
}
