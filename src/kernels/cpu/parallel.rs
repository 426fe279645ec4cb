//! Threads and memory shared by the schedules: candle's worker pool, disjoint output writes,
//! and per-thread scratch buffers kept between calls.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, PoisonError};

/// The threads that [`parallel_for`] runs on from here: the pool's, the calling one included,
/// or this one alone inside a task.
pub(crate) fn threads() -> usize {
    if IN_TASK.with(Cell::get) {
        1
    } else {
        candle_core::utils::barrier_pool().n_workers() + 1
    }
}

/// Runs `f(i)` for every `i` in `0..n` on candle's own CPU worker pool (the one its quantized
/// matmuls use), this thread included. Sharing candle's pool rather than keeping one of our own
/// means a model's other layers and this block never have two sets of threads spinning for the
/// same cores.
///
/// Inside a task (of this function, on any thread of the pool, the calling one included) it
/// runs `f` inline, on that thread alone: candle's pool runs nested calls inline on its
/// workers, but the calling thread, which takes part in every call, would wait on the pool's
/// lock that it holds. So work can be shared at an outer level (a mixture's experts, one a
/// task) with the kernels of each task on one thread.
///
/// A panic in a task is caught on its thread and raised again here once every task has ended:
/// candle 0.11.1's pool raises it while it holds its call lock, which poisons the lock, and
/// every later call of the pool (this crate's kernels, candle's quantized matmuls) would panic.
pub(crate) fn parallel_for(n: usize, f: impl Fn(usize) + Sync) {
    if IN_TASK.with(Cell::get) {
        (0..n).for_each(f);
        return;
    }
    let panicked: Mutex<Option<Box<dyn Any + Send>>> = Mutex::new(None);
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        let _inside = InTask::enter();
        if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(|| range.for_each(&f))) {
            let mut first = panicked.lock().unwrap_or_else(PoisonError::into_inner);
            first.get_or_insert(payload);
        }
    });
    if let Some(payload) = panicked
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        std::panic::resume_unwind(payload);
    }
}

thread_local! {
    /// Whether this thread runs a task of [`parallel_for`].
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a task until dropped (also when the task panics).
struct InTask(bool);

impl InTask {
    fn enter() -> Self {
        Self(IN_TASK.with(|c| c.replace(true)))
    }
}

impl Drop for InTask {
    fn drop(&mut self) {
        IN_TASK.with(|c| c.set(self.0));
    }
}

/// An output buffer that the tasks of one [`parallel_for`] write in disjoint parts: the
/// borrow keeps the buffer alive and unaliased for as long as the tasks can reach it.
#[derive(Clone, Copy)]
pub(crate) struct DisjointOut<'a, T> {
    ptr: *mut T,
    len: usize,
    _buffer: PhantomData<&'a mut [T]>,
}

// SAFETY: a `DisjointOut` hands out its buffer's address only through `unsafe` methods whose
// callers promise that no two tasks write the same element; the elements themselves must be
// `Send` to be written from other threads.
unsafe impl<T: Send> Send for DisjointOut<'_, T> {}
// SAFETY: as for `Send`: shared between tasks, each of which writes its own elements.
unsafe impl<T: Send> Sync for DisjointOut<'_, T> {}

impl<'a, T> DisjointOut<'a, T> {
    /// Borrows `buf` for the tasks.
    pub(crate) fn new(buf: &'a mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buffer: PhantomData,
        }
    }

    /// The address of element `i` (`i ≤ len`), for writing.
    ///
    /// # Safety
    /// Nothing else reads or writes the elements the caller writes through it while the tasks
    /// run, and the caller writes only inside the buffer.
    pub(crate) unsafe fn at(self, i: usize) -> *mut T {
        debug_assert!(i <= self.len);
        self.ptr.wrapping_add(i)
    }
}

thread_local! {
    /// Per-thread scratch, kept between calls: packed weights and the task's accumulators.
    static SCRATCH_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's packed tokens, for every task of a call.
    static TOKENS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Alignment of every scratch buffer, in bytes: a cache line. Measured on an Intel Xeon with
/// AMX: a tile load (16 rows of 64 bytes) from a buffer 16 bytes off a line ran about 5× slower
/// than from an aligned one (each row split over two lines), and the tiled kernels 1.5× slower.
pub(crate) const ALIGN: usize = 64;

/// The most f32 a scratch buffer keeps between calls, 64 MiB: a larger one (a long prefill's
/// packed tokens) is freed when its call ends, rather than held by its thread for good.
const MAX_KEPT: usize = 16 << 20;

/// Runs `f` on this thread's buffer in `key`, grown to at least `len` f32 and kept between
/// calls (fresh pages would cost a fault every 4 KiB) up to [`MAX_KEPT`]; on a fresh one should
/// it be in use, as when a forward runs inside another's task on the same thread. The slice
/// starts on an [`ALIGN`]-byte boundary.
pub(crate) fn with_buffer<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    const PAD: usize = ALIGN / std::mem::size_of::<f32>();
    key.with(|cell| {
        let (mut guard, mut own) = (cell.try_borrow_mut().ok(), Vec::new());
        let buf = guard.as_deref_mut().unwrap_or(&mut own);
        if buf.len() < len + PAD {
            buf.resize(len + PAD, 0.0);
        }
        // An f32 allocation is 4-byte aligned, so the offset is below PAD.
        let start = buf.as_ptr().align_offset(ALIGN).min(PAD);
        let r = f(&mut buf[start..start + len]);
        if buf.capacity() > MAX_KEPT {
            *buf = Vec::new();
        }
        r
    })
}

/// Runs `f` on this thread's buffer for a call's packed tokens, of `len` f32 (the packed and
/// tiled schedules pack them once per call, on the calling thread).
pub(crate) fn with_tokens<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buffer(&TOKENS, len, f)
}

/// Borrows this thread's two scratch buffers, of at least `a` and `b` f32.
pub(crate) fn with_scratch<R>(
    a: usize,
    b: usize,
    f: impl FnOnce(&mut [f32], &mut [f32]) -> R,
) -> R {
    with_buffer(&SCRATCH_A, a, |sa| {
        with_buffer(&SCRATCH_B, b, |sb| f(sa, sb))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_panicking_task_leaves_the_pool_usable() {
        // The panic reaches the caller, once every task has ended...
        let ran = AtomicUsize::new(0);
        let caught = std::panic::catch_unwind(|| {
            parallel_for(64, |i| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert_ne!(i, 7, "task 7");
            })
        });
        assert!(caught.is_err());
        // ...and the pool runs the next call (candle's own lock was poisoned before).
        let sum = AtomicUsize::new(0);
        parallel_for(64, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 64 * 63 / 2);
    }

    #[test]
    fn large_scratch_is_not_kept() {
        thread_local! {
            static KEY: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        with_buffer(&KEY, 1000, |b| b.fill(1.0));
        assert!(KEY.with(|k| k.borrow().capacity()) >= 1000);
        with_buffer(&KEY, MAX_KEPT + 1, |b| b[MAX_KEPT] = 2.0);
        assert_eq!(KEY.with(|k| k.borrow().capacity()), 0);
    }
}
