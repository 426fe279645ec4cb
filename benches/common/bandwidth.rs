//! The read-bandwidth probe the benches measure memory floors with.

use std::time::Instant;

/// The probe's buffer: 1 GiB of f32 ones, on 4 KiB pages or, with `huge`, aligned to 2 MiB and
/// advised for transparent huge pages (Linux), as the crate's GGUF loader puts weights, so that
/// a floor is measured on the pages the weights it is compared with lie on.
pub struct ProbeBuffer {
    ptr: std::ptr::NonNull<f32>,
    layout: std::alloc::Layout,
}

impl ProbeBuffer {
    pub fn new(huge: bool) -> Self {
        let len = 256usize << 20;
        let align = if huge { 2 << 20 } else { 64 };
        let layout = std::alloc::Layout::from_size_align(len * 4, align).expect("a layout");
        // SAFETY: the layout's size is not zero.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw.cast::<f32>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if huge {
            // SAFETY: the range is the allocation; advice changes only how it is backed.
            unsafe { libc::madvise(raw.cast(), len * 4, libc::MADV_HUGEPAGE) };
        }
        // SAFETY: `len` f32 fit in the allocation, written before they are read.
        unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len).fill(1.0) };
        Self { ptr, layout }
    }
}

impl std::ops::Deref for ProbeBuffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: initialised in `new`, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size() / 4) }
    }
}

impl Drop for ProbeBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) }
    }
}

/// Read bandwidth in GB/s: every thread sums its share of a 1 GiB buffer as 8 interleaved
/// streams (as the decode kernel reads 8 weight rows at once), with 64-byte loads where the CPU
/// has AVX-512; best of 3.
pub fn read_bandwidth(data: &[f32]) -> f64 {
    (0..3).map(|_| read_once(data)).fold(0f64, f64::max)
}

/// One pass of the probe over `data`, in GB/s.
pub fn read_once(data: &[f32]) -> f64 {
    let threads = candle_core::utils::get_num_threads().max(1);
    let t = Instant::now();
    let sum: f32 = std::thread::scope(|s| {
        let parts: Vec<_> = data
            .chunks(data.len().div_ceil(threads))
            .map(|c| s.spawn(move || sum_streams(c)))
            .collect();
        parts.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    });
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    std::mem::size_of_val(data) as f64 / secs / 1e9
}

fn sum_streams(c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was detected.
        return unsafe { sum_streams_avx512(c) };
    }
    let mut acc = [0f32; 16];
    for ch in c.chunks_exact(16) {
        for (a, v) in acc.iter_mut().zip(ch) {
            *a += v;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_streams_avx512(c: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    const STREAMS: usize = 8;
    let len = c.len() / STREAMS / 64 * 64;
    let mut acc = [_mm512_setzero_ps(); STREAMS];
    let mut i = 0;
    while i < len {
        for (s, a) in acc.iter_mut().enumerate() {
            let p = c.as_ptr().add(s * len + i);
            let v = _mm512_add_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let w = _mm512_add_ps(_mm512_loadu_ps(p.add(32)), _mm512_loadu_ps(p.add(48)));
            *a = _mm512_add_ps(*a, _mm512_add_ps(v, w));
        }
        i += 64;
    }
    acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
}
