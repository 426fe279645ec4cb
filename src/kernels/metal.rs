//! [`super::GatedOp`] on Metal: `gated.metal`, compiled at run time (without fast math) into one
//! pipeline per device and dtype, and encoded on candle's command buffer.
//!
//! Untested: written against candle 0.11.1's Metal API, never compiled or run on a Mac here.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalError, MetalStorage, Result, Shape};
use candle_metal_kernels::metal::{ComputeCommandEncoder, ComputePipeline, Device};
use objc2_metal::{MTLCompileOptions, MTLSize};

use super::strided::GatedStrides;
use crate::Activation;

/// The kernels' source: `σ(gate) ⊙ up` for f32, f16 and bf16.
const SOURCE: &str = include_str!("gated.metal");

/// The pipeline of `name` on `device`, compiled on first use.
fn pipeline(device: &Device, name: &'static str) -> Result<ComputePipeline> {
    static CACHE: Mutex<Option<HashMap<(u64, &'static str), ComputePipeline>>> = Mutex::new(None);
    let key = (device.registry_id(), name);
    let mut cache = CACHE
        .lock()
        .map_err(|_| candle_core::Error::Msg("glu-gated: a Metal compile panicked".into()))?;
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(p) = cache.get(&key) {
        return Ok(p.clone());
    }
    let options = MTLCompileOptions::new();
    // Exact exp: the kernels are memory-bound, and the f32 parity tests are tight.
    #[allow(deprecated)]
    options.setFastMathEnabled(false);
    let library = device
        .new_library_with_source(SOURCE, Some(&*options))
        .map_err(MetalError::from)?;
    let function = library.get_function(name, None).map_err(MetalError::from)?;
    let p = device
        .new_compute_pipeline_state_with_function(&function)
        .map_err(MetalError::from)?;
    cache.insert(key, p.clone());
    Ok(p)
}

/// `σ(gate) ⊙ up` on the device of `gate`, for any layouts of equal shape.
pub(crate) fn gated(
    act: Activation,
    gate: &MetalStorage,
    l1: &Layout,
    up: &MetalStorage,
    l2: &Layout,
) -> Result<(MetalStorage, Shape)> {
    let Some(strides) = GatedStrides::new(l1, l2) else {
        candle_core::bail!(
            "glu-gated: gate {:?} and up {:?} differ in shape, or have too many dimensions",
            l1.dims(),
            l2.dims()
        )
    };
    let dtype = gate.dtype();
    if up.dtype() != dtype {
        candle_core::bail!("glu-gated: gate and up must share an f32/bf16/f16 dtype")
    }
    let name = match dtype {
        DType::F32 => "glu_gated_f32",
        DType::F16 => "glu_gated_f16",
        DType::BF16 => "glu_gated_bf16",
        _ => candle_core::bail!("glu-gated: gate and up must share an f32/bf16/f16 dtype"),
    };
    let n = l1.shape().elem_count();
    // The kernel's thread index is 32 bits (the block's own size limit stays below this; a
    // direct `gated_product` call need not).
    if n > u32::MAX as usize {
        candle_core::bail!(
            "glu-gated: {n} elements, more than the {} one Metal dispatch indexes",
            u32::MAX
        )
    }
    let device = gate.device();
    let output = device
        .new_buffer_builder()
        .with_size_for(n, dtype)
        .with_label("glu-gated")
        .build()?;
    if n > 0 {
        let pipeline = pipeline(device.device(), name)?;
        let (act, beta) = super::activation_code(act);
        let size = dtype.size_in_bytes();
        let guard = device.command_encoder()?;
        let encoder: &ComputeCommandEncoder = guard.as_ref();
        encoder.set_compute_pipeline_state(&pipeline);
        encoder.set_input_buffer(0, Some(gate.buffer()), l1.start_offset() * size);
        encoder.set_input_buffer(1, Some(up.buffer()), l2.start_offset() * size);
        encoder.set_output_buffer(2, Some(&*output), 0);
        encoder.set_bytes(3, &strides);
        encoder.set_bytes(4, &act);
        encoder.set_bytes(5, &beta);
        encoder.set_bytes(6, &(n as u64));
        let width = pipeline.max_total_threads_per_threadgroup().clamp(1, 256);
        let grid = MTLSize {
            width: n,
            height: 1,
            depth: 1,
        };
        let group = MTLSize {
            width,
            height: 1,
            depth: 1,
        };
        encoder.dispatch_threads(grid, group);
    }
    let out = MetalStorage::new(output, device.clone(), n, dtype);
    Ok((out, l1.shape().clone()))
}
