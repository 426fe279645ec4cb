//! [`super::GatedOp`] on CUDA: `gated.cu`, compiled at run time by NVRTC (through candle's
//! cudarc) into PTX once per process, loaded once per device as a candle custom module, and
//! launched on candle's stream.
//!
//! Run-time compilation keeps the default build free of any CUDA compiler, and makes PTX of the
//! machine's own NVRTC: the driver accepts it as long as that NVRTC is not newer than the
//! driver's CUDA (PTX from a newer toolkit is refused, minor versions included).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{
    compile_ptx_with_opts, CompileError, CompileOptions,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};
use half::{bf16, f16};

use super::strided::GatedStrides;
use crate::Activation;

/// The kernels' source: `σ(gate) ⊙ up` for f32, f16 and bf16.
pub(crate) const SOURCE: &str = include_str!("gated.cu");
/// The name of candle's cache entry for the loaded module, per device.
const MODULE: &str = "candle_glu_gated";
/// Threads per block, and the most blocks a launch asks for (the kernels loop over the rest).
const THREADS: u32 = 256;
const MAX_BLOCKS: u64 = 1 << 16;

// SAFETY: `#[repr(C)]`, plain integers, and the same layout as `struct Strides` in gated.cu.
unsafe impl DeviceRepr for GatedStrides {}

/// The PTX of [`SOURCE`], compiled by NVRTC on first use; the compile error, if any, is kept
/// (a process that lacks NVRTC will not get it later).
pub(crate) fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let ptx = PTX.get_or_init(|| {
        let opts = CompileOptions {
            name: Some("candle_glu_gated.cu".into()),
            // Exact expf/erfcf and IEEE division: the kernels are memory-bound anyway.
            use_fast_math: Some(false),
            ..Default::default()
        };
        compile_ptx_with_opts(SOURCE, opts)
            .map(|ptx| ptx.to_src())
            .map_err(|e| match e {
                CompileError::CompileError { nvrtc, log, .. } => {
                    format!("{nvrtc:?}: {}", log.to_string_lossy())
                }
                other => format!("{other:?}"),
            })
    });
    ptx.as_deref().map_err(|e| {
        candle_core::Error::Msg(format!("glu-gated: NVRTC could not compile gated.cu: {e}"))
    })
}

/// `σ(gate) ⊙ up` on the device of `gate`, for any layouts of equal shape.
pub(crate) fn gated(
    act: Activation,
    gate: &CudaStorage,
    l1: &Layout,
    up: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let Some(strides) = GatedStrides::new(l1, l2) else {
        candle_core::bail!(
            "glu-gated: gate {:?} and up {:?} differ in shape, or have too many dimensions",
            l1.dims(),
            l2.dims()
        )
    };
    let dev = gate.device();
    let n = l1.shape().elem_count();
    let run = Launch {
        act,
        strides,
        n,
        dev,
        offsets: (l1.start_offset(), l2.start_offset()),
    };
    let slice = match (&gate.slice, &up.slice) {
        (CudaStorageSlice::F32(g), CudaStorageSlice::F32(u)) => {
            CudaStorageSlice::F32(run.go::<f32>("glu_gated_f32", g, u)?)
        }
        (CudaStorageSlice::F16(g), CudaStorageSlice::F16(u)) => {
            CudaStorageSlice::F16(run.go::<f16>("glu_gated_f16", g, u)?)
        }
        (CudaStorageSlice::BF16(g), CudaStorageSlice::BF16(u)) => {
            CudaStorageSlice::BF16(run.go::<bf16>("glu_gated_bf16", g, u)?)
        }
        _ => candle_core::bail!("glu-gated: gate and up must share an f32/bf16/f16 dtype"),
    };
    let out = CudaStorage {
        slice,
        device: dev.clone(),
    };
    Ok((out, l1.shape().clone()))
}

struct Launch<'a> {
    act: Activation,
    strides: GatedStrides,
    n: usize,
    dev: &'a CudaDevice,
    offsets: (usize, usize),
}

impl Launch<'_> {
    fn go<T: DeviceRepr>(
        &self,
        name: &str,
        gate: &CudaSlice<T>,
        up: &CudaSlice<T>,
    ) -> Result<CudaSlice<T>> {
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { self.dev.alloc::<T>(self.n)? };
        if self.n == 0 {
            return Ok(out);
        }
        let gate: CudaView<'_, T> = gate.slice(self.offsets.0..);
        let up: CudaView<'_, T> = up.slice(self.offsets.1..);
        let func = self.dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let blocks = (self.n as u64).div_ceil(THREADS as u64).min(MAX_BLOCKS) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = self.n as u64;
        let (act, beta) = super::activation_code(self.act);
        let mut builder = func.builder();
        builder.arg(&gate);
        builder.arg(&up);
        builder.arg(&out);
        builder.arg(&n);
        builder.arg(&self.strides);
        builder.arg(&act);
        builder.arg(&beta);
        // SAFETY: the arguments match the kernel's signature in gated.cu; the strides keep
        // every read inside the layouts candle checked, and the output holds `n` elements.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::cuda_backend::cudarc::nvrtc::sys;

    /// NVRTC needs no GPU: where the real library is loaded (not the link-time stand-in of
    /// scripts/cuda_check.sh), the kernels compile and export their three entry points.
    #[test]
    fn nvrtc_compiles_the_gated_kernels() {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
        if status != sys::nvrtcResult::NVRTC_SUCCESS {
            // scripts/cuda_check.sh loads the real one and asks for it.
            let required = std::env::var_os("CANDLE_GLU_REQUIRE_NVRTC").is_some_and(|v| v == "1");
            assert!(
                !required,
                "CANDLE_GLU_REQUIRE_NVRTC=1, but the NVRTC loaded does not answer"
            );
            eprintln!("SKIPPED: no NVRTC (the link-time stand-in answers): nothing compiled");
            return;
        }
        let ptx = super::ptx().unwrap();
        for name in ["glu_gated_f32", "glu_gated_f16", "glu_gated_bf16"] {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} in:\n{ptx}"
            );
        }
        eprintln!(
            "NVRTC {major}.{minor} compiled gated.cu: {} bytes of PTX",
            ptx.len()
        );
    }
}
