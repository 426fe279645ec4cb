//! AMX micro-kernels (Intel Xeon since Sapphire Rapids): the tile configuration, and tile
//! products of bf16 (TDPBF16PS) for the tiled schedule (`tiled.rs`).
//!
//! The matrix engine multiplies tiles of up to 16 rows × 64 bytes held in eight tile registers
//! (tmm0–tmm7). Every kernel here uses one configuration, [`CONFIG`]: all eight tiles are 16 rows
//! of 64 bytes (16 f32 or i32, 32 bf16, 64 int8 per row). Rust's `asm!` takes tile registers only
//! as clobbers, never as operands, so each kernel's loads, products and stores are one `asm!`
//! block, and no tile value lives across two blocks.
//!
//! In the tile products the weights are the first operand (rows are output columns, 32 bf16 of
//! the input dimension each: plain rows, so tiles load straight from the weight's `[out, in]`
//! rows or from a packed copy, as `tiled.rs` decides) and the tokens the second, packed in the
//! VNNI pair layout TDPBF16PS wants (a row per pair of input values, each token's two values
//! side by side); the product is the transpose of the output, `C[column][token]`.
//!
//! # Safety
//! Every function here is `unsafe` with one contract: the CPU has AMX and this process may use
//! it ([`amx_usable`](crate::kernels::detect::amx_usable): CPUID, the OS's tile state in XCR0,
//! the permission asked once), and the pointers are valid for the lengths the doc comments
//! give. The kernels take a [`Tiles`] to prove that this thread's tiles are configured.

use std::arch::asm;
use std::marker::PhantomData;

/// The tile configuration `LDTILECFG` reads: palette 1, and each tile's rows and bytes per row.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Tiles 0–7: 16 rows of 64 bytes each; 8–15 do not exist in palette 1.
static CONFIG: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Bytes of one tile (16 rows × 64 bytes).
pub(crate) const TILE_BYTES: usize = 1024;

/// This thread's tiles, configured as [`CONFIG`] while the guard lives. When it drops, the
/// thread's tiles go back to what they were before: released (`TILERELEASE`, the initial
/// state) if they were unconfigured, else the configuration found is loaded again. Other code
/// on the same threads keeps its own tile configuration across our calls: candle's own AMX
/// kernels (`QMatMul` on q4k weights, 0.11) configure a worker thread's tiles once and keep
/// using them; releasing them under it made its next tile instruction fault (SIGILL). A worker
/// thread holds our configuration only for the length of one task. Loading a configuration
/// zeroes the tiles' data, so code that kept values in tiles across calls would lose them;
/// candle's kernels load their tiles on every call.
pub(crate) struct Tiles {
    /// The configuration this thread had (`STTILECFG`; palette 0: none).
    saved: Config,
    // Tile state is per thread: the guard must stay on the thread that configured it.
    _thread: PhantomData<*const ()>,
}

impl Tiles {
    /// Configures this thread's tiles, keeping the configuration it had for the drop.
    ///
    /// # Safety
    /// [`amx_usable`](crate::kernels::detect::amx_usable)`()` must be true. Guards on one thread
    /// drop in the reverse order of their creation (one at a time today: a task's): dropping
    /// an older one first would release or replace the configuration a younger one relies on.
    pub(crate) unsafe fn configure() -> Self {
        let mut saved = Config {
            palette: 0,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        // SAFETY: the caller checked that the CPU has AMX and that this process may use its
        // state; STTILECFG writes 64 bytes into `saved` (zeros if the tiles are unconfigured);
        // `CONFIG` is a valid palette-1 configuration, 64 bytes, aligned.
        unsafe {
            asm!(
                "sttilecfg [{saved}]",
                "ldtilecfg [{cfg}]",
                saved = in(reg) &mut saved,
                cfg = in(reg) &CONFIG,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, preserves_flags),
            );
        }
        Self {
            saved,
            _thread: PhantomData,
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after `configure` succeeded on this thread, so the CPU
        // has AMX; TILERELEASE returns the tiles to their initial state, and LDTILECFG loads
        // the configuration STTILECFG found valid on this thread.
        unsafe {
            if self.saved.palette == 0 {
                asm!(
                    "tilerelease",
                    out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                    out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                    options(nostack, nomem, preserves_flags),
                );
            } else {
                asm!(
                    "ldtilecfg [{cfg}]",
                    cfg = in(reg) &self.saved,
                    out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                    out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                    options(nostack, readonly, preserves_flags),
                );
            }
        }
    }
}

/// `C (+)= A · B` for 32 weight rows and 32 tokens over `steps` steps of 32 input values, in
/// bf16 with f32 sums (TDPBF16PS), four tiles of sums:
///
/// - `a0`, `a1`: the tiles of weight rows 0–15 and 16–31 for the first step: 16 rows of 32
///   bf16 (64 bytes), rows `a_stride` bytes apart, consecutive steps `a_step` bytes apart (the
///   tiled schedule packs them: 64 and [`TILE_BYTES`]);
/// - `b0`, `b1`: the token tiles of tokens 0–15 and 16–31 for the first step, in the VNNI pair
///   layout (16 rows of 64 bytes: row `p` holds each token's values `2p` and `2p + 1`),
///   consecutive steps [`TILE_BYTES`] apart;
/// - `c`: f32 sums, `C[row][token]`, rows `c_stride` bytes apart (token 16 at byte 64 of a
///   row); read first when `accumulate`, else started from zero; always written.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bf16_2x2(
    _tiles: &Tiles,
    steps: usize,
    (a0, a1, a_stride, a_step): (*const u16, *const u16, usize, usize),
    (b0, b1): (*const u16, *const u16),
    c: *mut f32,
    c_stride: usize,
    accumulate: bool,
) {
    if steps == 0 {
        // (The callers never pass it: the loop below would count down from 2^64.)
        return;
    }
    let c2 = c.wrapping_byte_add(16 * c_stride);
    // SAFETY: the module's contract: AMX configured on this thread as `CONFIG`, and every
    // tile read or written lies in the caller's buffers.
    unsafe {
        asm!(
            "test {acc:e}, {acc:e}",
            "jz 2f",
            "tileloadd tmm0, [{c0} + {cs}*1]",
            "tileloadd tmm1, [{c0} + {cs}*1 + 64]",
            "tileloadd tmm2, [{c2} + {cs}*1]",
            "tileloadd tmm3, [{c2} + {cs}*1 + 64]",
            "jmp 3f",
            "2:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            // Each product as soon as its operands are loaded (interleaving ran 10% faster than
            // four loads then four products; loading the next step's tiles right after each
            // tile's last use, or prefetching them, gained nothing once buffers were aligned).
            "3:",
            "tileloadd tmm4, [{a0} + {as}*1]",
            "tileloadd tmm6, [{b0} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {s64}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {as}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, {ast}",
            "add {a1}, {ast}",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 3b",
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c0} + {cs}*1 + 64], tmm1",
            "tilestored [{c2} + {cs}*1], tmm2",
            "tilestored [{c2} + {cs}*1 + 64], tmm3",
            acc = in(reg) u32::from(accumulate),
            n = inout(reg) steps => _,
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            as = in(reg) a_stride,
            ast = in(reg) a_step,
            s64 = in(reg) 64usize,
            c0 = in(reg) c,
            c2 = in(reg) c2,
            cs = in(reg) c_stride,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        );
    }
}

/// [`bf16_2x2`] for 16 tokens: `b0` only, two tiles of sums (`C` rows 0–15 and 16–31).
pub(crate) unsafe fn bf16_2x1(
    _tiles: &Tiles,
    steps: usize,
    (a0, a1, a_stride, a_step): (*const u16, *const u16, usize, usize),
    b0: *const u16,
    c: *mut f32,
    c_stride: usize,
    accumulate: bool,
) {
    if steps == 0 {
        // (The callers never pass it: the loop below would count down from 2^64.)
        return;
    }
    let c2 = c.wrapping_byte_add(16 * c_stride);
    // SAFETY: as in `bf16_2x2`.
    unsafe {
        asm!(
            "test {acc:e}, {acc:e}",
            "jz 2f",
            "tileloadd tmm0, [{c0} + {cs}*1]",
            "tileloadd tmm2, [{c2} + {cs}*1]",
            "jmp 3f",
            "2:",
            "tilezero tmm0",
            "tilezero tmm2",
            "3:",
            "tileloadd tmm4, [{a0} + {as}*1]",
            "tileloadd tmm6, [{b0} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a1} + {as}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "add {a0}, {ast}",
            "add {a1}, {ast}",
            "add {b0}, 1024",
            "dec {n}",
            "jnz 3b",
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c2} + {cs}*1], tmm2",
            acc = in(reg) u32::from(accumulate),
            n = inout(reg) steps => _,
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            as = in(reg) a_stride,
            ast = in(reg) a_step,
            s64 = in(reg) 64usize,
            c0 = in(reg) c,
            c2 = in(reg) c2,
            cs = in(reg) c_stride,
            out("tmm0") _, out("tmm2") _, out("tmm4") _, out("tmm5") _, out("tmm6") _,
            options(nostack),
        );
    }
}
