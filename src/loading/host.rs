//! Host memory for the GGUF tensors read onto the CPU: each tensor of the file (a stacked
//! tensor with all its experts included) is read into one buffer, and candle `QTensor`s view
//! slices of it in place.
//!
//! candle reads a tensor into a byte vector and then copies it into a vector of blocks; a
//! stacked tensor read slice by slice puts every expert in its own allocation. Here the bytes
//! go from the file straight into their final place, once, and a buffer of 2 MiB or more is
//! aligned to 2 MiB and advised for transparent huge pages (Linux), so that a mixture's experts
//! lie one after the other in few TLB entries: on a Zen 4, a Qwen3-MoE layer's decode took
//! 0.98–1.0× the time from one such buffer as from one allocation per expert, and about 2% less
//! than from the same buffer on 4 KiB pages (`docs/performance.md`). The advice is only advice:
//! where the kernel has no transparent huge pages, or allows them never, the buffer is ordinary
//! memory.
//!
//! The buffer comes from the global allocator, so that allocation counters (`tests/memory.rs`)
//! see it.

#![allow(unsafe_code)]

use std::alloc::Layout;
use std::marker::PhantomData;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::Arc;

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Shape};
use half::{bf16, f16};

/// The size and alignment of a huge page on x86-64 and of most on aarch64.
const HUGE_PAGE: usize = 2 << 20;

/// The alignment of a buffer below [`HUGE_PAGE`]: a cache line.
const SMALL_ALIGN: usize = 64;

/// Zeroed host memory for one tensor's bytes, filled by the reader before it is viewed.
pub(crate) struct HostBuffer {
    ptr: NonNull<u8>,
    /// The bytes asked for (the layout holds at least one).
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer is plain bytes. It is written only through `&mut self` while its owner
// fills it, and, once shared by views (`views`), only through a view's `&mut self` within that
// view's own range, which no other view overlaps.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// `len` zero bytes, aligned to 2 MiB and advised for huge pages from 2 MiB on.
    ///
    /// # Errors
    /// An error of kind `OutOfMemory` when the allocator refuses, where a `Vec` would abort.
    pub(crate) fn zeroed(len: usize) -> std::io::Result<Self> {
        let align = if len >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            SMALL_ALIGN
        };
        let oom = || {
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("no memory for {len} bytes"),
            )
        };
        let layout = Layout::from_size_align(len.max(1), align).map_err(|_| oom())?;
        // SAFETY: the layout's size is not zero.
        let ptr = NonNull::new(unsafe { std::alloc::alloc(layout) }).ok_or_else(oom)?;
        // The advice comes before the first write, so that the pages are huge when first
        // touched rather than collapsed later, if ever.
        advise_huge_pages(ptr.as_ptr(), len);
        // SAFETY: `ptr` holds `layout.size()` writable bytes.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, layout.size()) };
        Ok(Self { ptr, len, layout })
    }

    /// The bytes, to be filled.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the bytes are initialised (zeroed) and owned by `self`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is aligned for huge pages (2 MiB or more).
    #[cfg(test)]
    fn huge(&self) -> bool {
        self.layout.align() == HUGE_PAGE
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBuffer({} bytes)", self.len)
    }
}

/// `madvise(MADV_HUGEPAGE)` over the whole huge pages of `[ptr, ptr + len)`; `ptr` is aligned
/// to [`HUGE_PAGE`] whenever `len` reaches it. A refusal (no transparent huge pages in this
/// kernel) leaves ordinary pages, which work the same.
#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    let whole = len / HUGE_PAGE * HUGE_PAGE;
    if whole > 0 {
        // SAFETY: the range lies within one live allocation; the advice changes how its pages
        // are backed, never their contents.
        unsafe { libc::madvise(ptr.cast(), whole, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _len: usize) {}

/// One tensor's blocks of type `T`: `len` of them from byte `offset` of a shared buffer.
struct BlockView<T> {
    buffer: Arc<HostBuffer>,
    offset: usize,
    len: usize,
    blocks: PhantomData<T>,
}

impl<T: GgmlType> BlockView<T> {
    fn blocks(&self) -> &[T] {
        // SAFETY: `views` checked that `[offset, offset + len * size_of::<T>())` lies in the
        // buffer, is aligned for `T` and overlaps no other view; every bit pattern is a valid
        // block (integers and floats only), and the bytes are initialised.
        unsafe {
            std::slice::from_raw_parts(self.buffer.ptr.as_ptr().add(self.offset).cast(), self.len)
        }
    }

    fn blocks_mut(&mut self) -> &mut [T] {
        // SAFETY: as `blocks`; the range is this view's alone, borrowed mutably through it.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.buffer.ptr.as_ptr().add(self.offset).cast(),
                self.len,
            )
        }
    }
}

impl<T: GgmlType + 'static> QuantizedType for BlockView<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn matmul_t(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> candle_core::Result<()> {
        k_quants::matmul(mkn, lhs, self.blocks(), dst)
    }

    fn matmul_t_f16(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f16],
        dst: &mut [f16],
    ) -> candle_core::Result<()> {
        k_quants::matmul_f16(mkn, lhs, self.blocks(), dst)
    }

    fn embedding(
        &self,
        ids: &[u32],
        rows: usize,
        hidden: usize,
    ) -> candle_core::Result<CpuStorage> {
        if hidden == 0
            || !hidden.is_multiple_of(T::BLCK_SIZE)
            || rows * hidden / T::BLCK_SIZE != self.len
        {
            candle_core::bail!(
                "quantized embedding of {rows} rows of {hidden} values does not fit {} blocks of {}",
                self.len,
                T::BLCK_SIZE
            )
        }
        let row_blocks = hidden / T::BLCK_SIZE;
        let mut out = vec![0f32; ids.len() * hidden];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
            let row = id as usize;
            if row >= rows {
                candle_core::bail!("embedding id {row} is out of range for {rows} rows")
            }
            T::to_float(
                &self.blocks()[row * row_blocks..(row + 1) * row_blocks],
                dst,
            );
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> candle_core::Result<CpuStorage> {
        if elem_count != self.len * T::BLCK_SIZE {
            candle_core::bail!(
                "{elem_count} values asked of {} blocks of {}",
                self.len,
                T::BLCK_SIZE
            )
        }
        let mut ys = vec![0f32; elem_count];
        T::to_float(self.blocks(), &mut ys);
        Ok(CpuStorage::F32(ys))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.len * size_of::<T>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.blocks().as_ptr().cast()
    }

    fn block_size(&self) -> usize {
        T::BLCK_SIZE
    }

    fn from_float(&mut self, xs: &[f32]) {
        T::from_float(xs, self.blocks_mut())
    }

    fn from_float_imatrix(&mut self, xs: &[f32], imatrix_weights: &[f32], n_per_row: usize) {
        T::from_float_imatrix(xs, self.blocks_mut(), imatrix_weights, n_per_row)
    }

    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

/// Tensors of type `dtype` over `buffer`, one per `(byte range, shape)`, in place.
///
/// # Errors
/// A range that is out of the buffer, overlaps another, does not start on a block or does not
/// hold the shape's blocks.
pub(crate) fn views(
    buffer: HostBuffer,
    dtype: GgmlDType,
    slices: &[(Range<usize>, Shape)],
) -> candle_core::Result<Vec<QTensor>> {
    match dtype {
        GgmlDType::F32 => typed::<f32>(buffer, slices),
        GgmlDType::F16 => typed::<f16>(buffer, slices),
        GgmlDType::BF16 => typed::<bf16>(buffer, slices),
        GgmlDType::Q4_0 => typed::<k_quants::BlockQ4_0>(buffer, slices),
        GgmlDType::Q4_1 => typed::<k_quants::BlockQ4_1>(buffer, slices),
        GgmlDType::Q5_0 => typed::<k_quants::BlockQ5_0>(buffer, slices),
        GgmlDType::Q5_1 => typed::<k_quants::BlockQ5_1>(buffer, slices),
        GgmlDType::Q8_0 => typed::<k_quants::BlockQ8_0>(buffer, slices),
        GgmlDType::Q8_1 => typed::<k_quants::BlockQ8_1>(buffer, slices),
        GgmlDType::Q2K => typed::<k_quants::BlockQ2K>(buffer, slices),
        GgmlDType::Q3K => typed::<k_quants::BlockQ3K>(buffer, slices),
        GgmlDType::Q4K => typed::<k_quants::BlockQ4K>(buffer, slices),
        GgmlDType::Q5K => typed::<k_quants::BlockQ5K>(buffer, slices),
        GgmlDType::Q6K => typed::<k_quants::BlockQ6K>(buffer, slices),
        GgmlDType::Q8K => typed::<k_quants::BlockQ8K>(buffer, slices),
    }
}

fn typed<T: GgmlType + 'static>(
    buffer: HostBuffer,
    slices: &[(Range<usize>, Shape)],
) -> candle_core::Result<Vec<QTensor>> {
    let size = size_of::<T>();
    let len = buffer.len();
    let bad = |message: String| {
        candle_core::Error::Msg(format!("{len} bytes of {:?} blocks: {message}", T::DTYPE))
    };
    let mut sorted: Vec<&Range<usize>> = slices.iter().map(|(r, _)| r).collect();
    sorted.sort_by_key(|r| r.start);
    if let Some(pair) = sorted.windows(2).find(|p| p[0].end > p[1].start) {
        return Err(bad(format!(
            "ranges {:?} and {:?} overlap",
            pair[0], pair[1]
        )));
    }
    // A size is a multiple of the alignment, and the buffer is aligned to at least 64.
    debug_assert!(align_of::<T>() <= SMALL_ALIGN);
    let buffer = Arc::new(buffer);
    slices
        .iter()
        .map(|(range, shape)| {
            // (A checked product: `elem_count` wraps, and a wrapped count could match the range.)
            let values = shape
                .dims()
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d));
            let Some(values) = values else {
                return Err(bad(format!("{shape:?} has more values than a usize holds")));
            };
            let blocks = values / T::BLCK_SIZE;
            if range.start > range.end
                || range.end > len
                || range.start % size != 0
                || Some(range.len()) != blocks.checked_mul(size)
                || !values.is_multiple_of(T::BLCK_SIZE)
            {
                return Err(bad(format!("range {range:?} does not hold {shape:?}")));
            }
            let view = BlockView::<T> {
                buffer: buffer.clone(),
                offset: range.start,
                len: blocks,
                blocks: PhantomData,
            };
            QTensor::new(QStorage::Cpu(Box::new(view)), shape.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Blocks quantized by candle, copied into a buffer at an offset, read back as they were.
    #[test]
    fn views_hold_the_blocks_in_place() -> anyhow::Result<()> {
        let w = Tensor::randn(0f32, 1.0, (3, 512), &Device::Cpu)?;
        let q = QTensor::quantize(&w, GgmlDType::Q4K)?;
        let bytes = q.data()?.to_vec();
        let row = bytes.len() / 3;
        let mut buffer = HostBuffer::zeroed(bytes.len() + row)?;
        buffer.as_mut_slice()[row..].copy_from_slice(&bytes);
        let start = buffer.as_mut_slice().as_ptr() as usize;
        let slices = [
            (row..3 * row, Shape::from((2, 512))),
            (3 * row..4 * row, Shape::from((1, 512))),
        ];
        let v = views(buffer, GgmlDType::Q4K, &slices)?;
        assert_eq!(v[0].data()?.as_ptr() as usize, start + row, "not in place");
        assert_eq!(v[0].data()?, &bytes[..2 * row]);
        let want = q.dequantize(&Device::Cpu)?;
        let got = Tensor::cat(
            &[
                v[0].dequantize(&Device::Cpu)?,
                v[1].dequantize(&Device::Cpu)?,
            ],
            0,
        )?;
        assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        // candle's product over a view, against its product over its own blocks.
        let x = Tensor::randn(0f32, 1.0, (2, 512), &Device::Cpu)?;
        let mine = candle_core::quantized::QMatMul::from_qtensor(v.into_iter().next().unwrap())?;
        // (candle's product over all three rows: `quantize` reads a narrowed tensor's whole
        // storage.)
        let theirs = candle_core::quantized::QMatMul::from_qtensor(q)?;
        let d = (x.apply(&mine)? - x.apply(&theirs)?.narrow(1, 0, 2)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn views_refuse_bad_ranges() -> anyhow::Result<()> {
        let shape = || Shape::from((1, 32));
        let cases = [
            (vec![(0..34, shape()), (0..34, shape())], "overlap"),
            (vec![(0..34, shape()), (34..102, shape())], "does not hold"),
            (vec![(1..35, shape())], "does not hold"),
            (vec![(68..102, shape())], "does not hold"),
            (
                vec![(Range { start: 34, end: 0 }, Shape::from((0, 32)))],
                "does not hold",
            ),
        ];
        for (slices, want) in cases {
            let err = views(HostBuffer::zeroed(68)?, GgmlDType::Q8_0, &slices).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
        Ok(())
    }

    /// A buffer of 2 MiB or more is aligned for huge pages and, on Linux, advised for them: its
    /// mapping in `/proc/self/smaps` carries the `hg` flag.
    #[test]
    fn large_buffers_are_advised_for_huge_pages() -> anyhow::Result<()> {
        let mut buffer = HostBuffer::zeroed(3 * HUGE_PAGE)?;
        assert!(buffer.huge());
        let start = buffer.as_mut_slice().as_ptr() as usize;
        assert_eq!(start % HUGE_PAGE, 0);
        assert!(!HostBuffer::zeroed(1000)?.huge());
        // (A kernel built without transparent huge pages refuses the advice: ordinary pages.)
        #[cfg(target_os = "linux")]
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            let smaps = std::fs::read_to_string("/proc/self/smaps")?;
            let mut inside = false;
            let mut flags = None;
            for line in smaps.lines() {
                if let Some((range, _)) = line.split_once(' ') {
                    if let Some((a, b)) = range.split_once('-') {
                        if let (Ok(a), Ok(b)) =
                            (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                        {
                            inside = a <= start && start < b;
                            continue;
                        }
                    }
                }
                if inside && line.starts_with("VmFlags:") {
                    flags = Some(line.to_string());
                }
            }
            let flags = flags.expect("the buffer's mapping in /proc/self/smaps");
            assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        }
        Ok(())
    }
}
