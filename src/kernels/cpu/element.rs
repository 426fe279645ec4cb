//! The element types the CPU kernels read and write: f32, bf16 and f16, always computed in f32.

use candle_core::DType;
use half::{bf16, f16};

/// A weight or activation element: stored as `Self`, computed as f32, rounded once on the way
/// out (round to nearest even, as candle and PyTorch do).
pub(crate) trait Element: Copy + Default + Send + Sync + 'static {
    /// The matching candle dtype.
    const DTYPE: DType;
    /// Widens to f32; exact for every type here (the kernels do it with SIMD; the tests with
    /// this).
    #[cfg_attr(not(test), allow(dead_code))]
    fn to_f32(self) -> f32;
    /// Rounds from f32 to nearest even (the kernels do it with SIMD; the tests with this).
    #[cfg_attr(not(test), allow(dead_code))]
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}
