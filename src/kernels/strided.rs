//! How the GPU kernels of [`super::GatedOp`] walk two arguments of any layout: the shape and
//! both stride vectors, simplified (size-1 dimensions dropped, dimensions that are contiguous in
//! both arguments merged) into at most [`MAX_DIMS`] dimensions, passed to the kernel by value.
//!
//! [`GatedStrides::offsets`] is the kernels' index arithmetic on the CPU, the twin the tests
//! hold to candle's own strided indexing.

use candle_core::Layout;

/// The most dimensions a kernel walks after simplification; more is refused (the caller then
/// makes the arguments contiguous).
pub(crate) const MAX_DIMS: usize = 6;

/// Element `i` of the output (row-major in the shape) reads `gate[Σ cₖ·gate[k]]` and
/// `up[Σ cₖ·up[k]]`, where `cₖ` are `i`'s coordinates in `dims`; both relative to the
/// arguments' start offsets. With `ndim == 0`, both are contiguous: element `i` reads `i`.
///
/// `#[repr(C)]`: the CUDA and Metal kernels take this struct by value (`struct Strides` in
/// `gated.cu` and `gated.metal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub(crate) struct GatedStrides {
    /// The simplified shape, outermost first; entries past `ndim` are unused.
    pub dims: [u64; MAX_DIMS],
    /// The gate's strides, in elements.
    pub gate: [u64; MAX_DIMS],
    /// The up projection's strides, in elements.
    pub up: [u64; MAX_DIMS],
    /// The number of dimensions, or 0 when both arguments are contiguous.
    pub ndim: u32,
    /// Keeps the size a multiple of 8 on every side of the FFI.
    pub _pad: u32,
}

impl GatedStrides {
    /// The walk for `gate` and `up` of the same shape, or `None` when the shapes differ or more
    /// than [`MAX_DIMS`] dimensions remain after simplification.
    pub(crate) fn new(gate: &Layout, up: &Layout) -> Option<Self> {
        let dims = gate.dims();
        if dims != up.dims() {
            return None;
        }
        // (size, gate stride, up stride), outermost first, without size-1 dimensions.
        let mut merged: Vec<(usize, usize, usize)> = Vec::with_capacity(dims.len());
        for ((&d, &sg), &su) in dims.iter().zip(gate.stride()).zip(up.stride()) {
            if d == 1 {
                continue;
            }
            match merged.last_mut() {
                // The outer dimension steps over exactly one inner run, in both arguments.
                Some(last) if last.1 == sg * d && last.2 == su * d => {
                    *last = (last.0 * d, sg, su);
                }
                _ => merged.push((d, sg, su)),
            }
        }
        let mut out = GatedStrides::default();
        if matches!(merged.as_slice(), [] | [(_, 1, 1)]) {
            return Some(out);
        }
        if merged.len() > MAX_DIMS {
            return None;
        }
        out.ndim = merged.len() as u32;
        for (k, (d, sg, su)) in merged.into_iter().enumerate() {
            out.dims[k] = d as u64;
            out.gate[k] = sg as u64;
            out.up[k] = su as u64;
        }
        Some(out)
    }

    /// Whether both arguments are contiguous.
    #[cfg_attr(not(any(test, feature = "metal")), allow(dead_code))]
    pub(crate) fn is_contiguous(&self) -> bool {
        self.ndim == 0
    }

    /// The offsets element `i` reads in gate and up: the kernels' arithmetic, on the CPU.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn offsets(&self, i: u64) -> (u64, u64) {
        if self.ndim == 0 {
            return (i, i);
        }
        let (mut rest, mut g, mut u) = (i, 0, 0);
        for k in (0..self.ndim as usize).rev() {
            let c = rest % self.dims[k];
            rest /= self.dims[k];
            g += c * self.gate[k];
            u += c * self.up[k];
        }
        (g, u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// A view of fresh storage whose values are their own offsets: reading the view in logical
    /// order (candle's own strided indexing) gives the offset of every element.
    fn offsets_view(storage_shape: &[usize]) -> Tensor {
        let n = storage_shape.iter().product::<usize>();
        Tensor::arange(0u32, n as u32, &Device::Cpu)
            .and_then(|t| t.reshape(storage_shape))
            .expect("arange")
    }

    fn check(gate: &Tensor, up: &Tensor) -> GatedStrides {
        let s = GatedStrides::new(gate.layout(), up.layout()).expect("a plan");
        let read =
            |t: &Tensor| -> Vec<u32> { t.flatten_all().and_then(|t| t.to_vec1()).expect("read") };
        let (og, ou) = (read(gate), read(up));
        let (g0, u0) = (gate.layout().start_offset(), up.layout().start_offset());
        for i in 0..gate.elem_count() {
            let (g, u) = s.offsets(i as u64);
            assert_eq!(g as usize + g0, og[i] as usize, "gate, element {i}, {s:?}");
            assert_eq!(u as usize + u0, ou[i] as usize, "up, element {i}, {s:?}");
        }
        s
    }

    #[test]
    fn walks_every_layout_as_candle_does() -> candle_core::Result<()> {
        let shape = [2, 3, 4, 5];
        let (a, b) = (offsets_view(&shape), offsets_view(&shape));
        // Both contiguous, any rank: a flat walk.
        assert!(check(&a, &b).is_contiguous());
        assert!(check(&a.flatten_all()?, &b.flatten_all()?).is_contiguous());
        // One transposed: strided, with what is contiguous in both merged.
        let t = offsets_view(&[2, 4, 3, 5]).transpose(1, 2)?;
        let s = check(&t, &b);
        assert!(!s.is_contiguous() && s.ndim <= 4, "{s:?}");
        // Both transposed alike.
        let s = check(&a.transpose(0, 3)?, &b.transpose(0, 3)?);
        assert!(!s.is_contiguous());
        // A narrow (an offset and gaps) against a contiguous argument.
        let n = offsets_view(&[2, 3, 4, 7]).narrow(3, 1, 5)?;
        check(&n, &b);
        // A broadcast (stride 0) against a full tensor.
        let row = offsets_view(&[1, 1, 1, 5]).broadcast_as((2, 3, 4, 5))?;
        assert!(!check(&row, &a).is_contiguous());
        // Size-1 dimensions are dropped; a single element is contiguous.
        let one = a
            .narrow(0, 1, 1)?
            .narrow(1, 2, 1)?
            .narrow(2, 3, 1)?
            .narrow(3, 4, 1)?;
        assert!(check(&one, &offsets_view(&[1, 1, 1, 1])).is_contiguous());
        // The block's own case: the halves of a fused [m, 2I] product.
        let fused = offsets_view(&[7, 10]);
        let (g, u) = (fused.narrow(1, 0, 5)?, fused.narrow(1, 5, 5)?);
        assert_eq!(check(&g, &u).ndim, 2);
        Ok(())
    }

    #[test]
    fn refuses_different_shapes_and_too_many_dimensions() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let b = Tensor::zeros((3, 2), DType::F32, &dev)?;
        assert!(GatedStrides::new(a.layout(), b.layout()).is_none());
        // Seven dimensions, all reversed against the other argument: nothing merges.
        let x = offsets_view(&[2, 3, 2, 3, 2, 3, 2]);
        let rev = offsets_view(&[2, 3, 2, 3, 2, 3, 2]).permute(vec![6, 5, 4, 3, 2, 1, 0])?;
        assert!(GatedStrides::new(rev.layout(), x.layout()).is_none());
        // Six dimensions that do not merge: accepted, and walked right.
        let x6 = offsets_view(&[2, 3, 2, 3, 2, 3]);
        let rev6 = offsets_view(&[3, 2, 3, 2, 3, 2]).permute(vec![5, 4, 3, 2, 1, 0])?;
        assert_eq!(check(&rev6, &x6).ndim, 6);
        Ok(())
    }

    #[test]
    fn matches_the_kernels_struct() {
        // dims, gate, up: 3 × 6 × 8 bytes; ndim and padding: 8.
        assert_eq!(std::mem::size_of::<GatedStrides>(), 3 * MAX_DIMS * 8 + 8);
        assert_eq!(std::mem::align_of::<GatedStrides>(), 8);
    }
}
