//! The CPU side of the custom ops on architectures other than x86-64 (compiled as `cpu`), where this crate has no
//! CPU kernels: [`available`] and [`quantized_available`] say no, so the block runs on candle's
//! own ops there, and the ops, should they be called anyway, return an error.

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, DType, Layout, Result, Shape};

use super::detect::MicroKernel;
use super::ops::{GateUpOp, GatedOp, LinearOp, QuantGateUpOp, QuantLinearOp};

/// Whether the CPU ops can run on this machine: never here.
pub(super) fn available() -> bool {
    false
}

/// Whether the quantized ops can take these weights: never here.
pub(super) fn quantized_available(_: &[&QTensor]) -> bool {
    false
}

/// The micro-kernel the dense ops would run: none here.
pub(super) fn dense_micro_kernel(_: DType, _: usize, _: usize) -> Option<MicroKernel> {
    None
}

/// The micro-kernel the quantized ops would run: none here.
pub(super) fn quant_micro_kernel(_: &QTensor, _: usize, _: bool) -> Option<MicroKernel> {
    None
}

/// Runs `f(i)` for `i` in `0..n`, one after another (no kernels here to share threads with).
pub(super) fn tasks(n: usize, f: impl Fn(usize) + Sync) {
    (0..n).for_each(f)
}

/// One: [`tasks`] runs them one after another.
pub(super) fn threads() -> usize {
    1
}

fn unavailable<T>(op: &str) -> Result<T> {
    candle_core::bail!("{op}: this crate's CPU kernels need an x86-64 CPU with AVX-512")
}

/// [`GateUpOp`]'s forward pass.
pub(super) fn gate_up(
    _: &GateUpOp,
    _: &CpuStorage,
    _: &Layout,
    _: &CpuStorage,
    _: &Layout,
    _: &CpuStorage,
    _: &Layout,
) -> Result<(CpuStorage, Shape)> {
    unavailable("glu-gate-up")
}

/// [`LinearOp`]'s forward pass.
pub(super) fn linear(
    _: &LinearOp,
    _: &CpuStorage,
    _: &Layout,
    _: &CpuStorage,
    _: &Layout,
) -> Result<(CpuStorage, Shape)> {
    unavailable("glu-linear")
}

/// [`GatedOp`]'s forward pass.
pub(super) fn gated(
    _: &GatedOp,
    _: &CpuStorage,
    _: &Layout,
    _: &CpuStorage,
    _: &Layout,
) -> Result<(CpuStorage, Shape)> {
    unavailable("glu-gated")
}

/// [`QuantGateUpOp`]'s forward pass.
pub(super) fn quant_gate_up(
    _: &QuantGateUpOp,
    _: &CpuStorage,
    _: &Layout,
) -> Result<(CpuStorage, Shape)> {
    unavailable("glu-gate-up-quantized")
}

/// [`QuantLinearOp`]'s forward pass.
pub(super) fn quant_linear(
    _: &QuantLinearOp,
    _: &CpuStorage,
    _: &Layout,
) -> Result<(CpuStorage, Shape)> {
    unavailable("glu-linear-quantized")
}
