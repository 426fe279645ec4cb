//! Which CPU kernels run in this process: chosen once, from the CPU's features and vendor, or
//! forced by the environment variable `CANDLE_GLU_KERNELS`. The choice is deterministic: the
//! same machine and environment give the same kernels, and so the same bits, on every run.
//!
//! | `CANDLE_GLU_KERNELS` | kernels |
//! |---|---|
//! | unset, empty or `auto` | the best this CPU has, as below |
//! | `candle` (or `none`, `off`) | none of the crate's: candle's own ops everywhere |
//! | `avx512` | AVX-512 with f32 FMA micro-kernels, and AVX512-VNNI for q8_0/q4k (Q4_1 up to 20 tokens) where present |
//! | `avx512-bf16` | as `avx512`, with bf16 dot products (VDPBF16PS) for dense bf16 prefill |
//! | `amx` | as `avx512`, with AMX tiles for dense bf16 and GGUF (Q4_1, q8_0, q4k) prefill |
//!
//! `auto` takes `avx512` on a CPU with AVX-512 F/BW/VL, FMA and F16C; `avx512-bf16` when the
//! CPU also has AVX512-BF16 and is an AMD one (Zen 4/5), where VDPBF16PS does twice the
//! multiply-adds of an f32 FMA per cycle (on Intel's Sapphire and Emerald Rapids it does half:
//! measured 86 against 175 GFLOP/s per core, so f32 FMAs win there); and `amx` when the CPU has
//! AMX-TILE and AMX-BF16 (with AVX512-BF16 and VNNI, as every such CPU), the OS keeps the tile
//! state (XCR0) and grants this process its use (Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM)`,
//! asked once, the first time the kernels are chosen). A forced set that the CPU lacks gives
//! what `auto` takes where that is below it, else candle's ops; an unknown value counts as
//! `auto`.
//!
//! Asking for the tiles changes the process: Linux then saves 8 KiB more of register state in
//! every signal frame, so a later `sigaltstack` with a small stack (a C library's fixed 8 KiB
//! `SIGSTKSZ`) can fail. The request is made the first time the kernels are chosen (the first
//! forward on a CPU, or `cpu_kernels()`); `CANDLE_GLU_KERNELS=avx512` keeps a process off AMX.

use std::sync::OnceLock;

/// The environment variable that forces a kernel set.
pub(crate) const KERNELS_ENV: &str = "CANDLE_GLU_KERNELS";

/// The crate's CPU kernels that run in this process; see [`cpu_kernels`](crate::cpu_kernels).
///
/// `Display` writes the name that `CANDLE_GLU_KERNELS` takes to choose the set, then what the
/// int8 kernels (q8_0/q4k, Q4_1 for few tokens) run on: `avx512 (int8: vnni)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuKernels {
    set: Set,
    vnni: bool,
}

/// The kernel sets, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Set {
    Candle,
    Avx512,
    Avx512Bf16,
    Amx,
}

impl Set {
    fn parse(value: &str) -> Option<Set> {
        Some(match value.trim().to_ascii_lowercase().as_str() {
            "candle" | "none" | "off" => Set::Candle,
            "avx512" => Set::Avx512,
            "avx512-bf16" => Set::Avx512Bf16,
            "amx" => Set::Amx,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Set::Candle => "candle",
            Set::Avx512 => "avx512",
            Set::Avx512Bf16 => "avx512-bf16",
            Set::Amx => "amx",
        }
    }
}

impl CpuKernels {
    /// The set's name, as `CANDLE_GLU_KERNELS` takes it: `avx512`, `avx512-bf16` or `amx` (never
    /// `candle`: where candle's ops run, [`cpu_kernels`](crate::cpu_kernels) is `None`).
    pub fn name(&self) -> &'static str {
        self.set.name()
    }

    /// Whether dense bf16 prefill multiplies with bf16 dot products (VDPBF16PS) rather than
    /// f32 FMAs.
    pub fn bf16_dot(&self) -> bool {
        self.set == Set::Avx512Bf16
    }

    /// Whether prefill of dense bf16 and GGUF weights runs on the AMX tiles (from a token
    /// count that depends on the weights; see [`MicroKernel`]).
    pub fn amx(&self) -> bool {
        self.set == Set::Amx
    }

    /// Whether GGUF q8_0 and q4k weights are multiplied by the crate's kernels (AVX512-VNNI, and
    /// the AMX tiles at prefill where [`amx`](Self::amx)), else by candle's `QMatMul`; and
    /// whether Q4_1 takes its kernel over 8-bit activations for few tokens.
    pub fn int8(&self) -> bool {
        self.vnni
    }
}

impl std::fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let int8 = if self.vnni { "vnni" } else { "candle" };
        write!(f, "{} (int8: {int8})", self.name())
    }
}

/// The CPU micro-kernel, and the schedule around it, that multiplies a block's projections for
/// an input; see [`GluFeedForward::micro_kernel`](crate::GluFeedForward::micro_kernel).
/// `Display` gives a short name (`amx-bf16 tiles`, `avx512 f32 fma, packed`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MicroKernel {
    /// AMX tile products (TDPBF16PS), the tiled schedule: dense bf16 weights, or GGUF weights
    /// decoded to bf16 block by block as they are packed; activations in bf16, sums in f32.
    AmxBf16,
    /// AVX512-BF16 dot products (VDPBF16PS), the packed schedule: dense bf16 weights.
    Avx512Bf16,
    /// f32 FMAs (AVX-512) over weight rows streamed in place, the dot schedule (few tokens):
    /// dense weights widened to f32, Q4_1 decoded exactly.
    FmaRows,
    /// f32 FMAs (AVX-512) over packed weight panels, the packed schedule (prefill).
    FmaPacked,
    /// Integer dot products (AVX512-VNNI) over activations rounded to 8 bits, weight rows
    /// streamed in place: GGUF q8_0 and q4k, few tokens; Q4_1 up to 20 tokens.
    VnniRows,
    /// The same over packed panels (prefill).
    VnniPacked,
}

impl std::fmt::Display for MicroKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MicroKernel::AmxBf16 => "amx-bf16 tiles",
            MicroKernel::Avx512Bf16 => "avx512-bf16 dot products, packed",
            MicroKernel::FmaRows => "avx512 f32 fma, rows",
            MicroKernel::FmaPacked => "avx512 f32 fma, packed",
            MicroKernel::VnniRows => "avx512-vnni int8, rows",
            MicroKernel::VnniPacked => "avx512-vnni int8, packed",
        })
    }
}

/// What the kernels may use, as chosen for this process: the set, and whether the CPU has
/// AVX512-VNNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Features {
    set: Set,
    has_vnni: bool,
}

impl Features {
    /// AVX-512 F/BW/VL with FMA and F16C: every f32/bf16/f16 and Q4_1 kernel.
    pub(crate) fn avx512(&self) -> bool {
        self.set >= Set::Avx512
    }

    /// bf16 dot products (AVX512-BF16) for dense bf16 prefill.
    pub(crate) fn bf16_dot(&self) -> bool {
        self.set == Set::Avx512Bf16
    }

    /// AVX512-VNNI: the q8_0 and q4k kernels, and Q4_1's over 8-bit activations.
    pub(crate) fn vnni(&self) -> bool {
        self.avx512() && self.has_vnni
    }

    /// The AMX tiles (AMX-TILE and AMX-BF16, granted to this process) for dense bf16 and GGUF
    /// prefill.
    pub(crate) fn amx_bf16(&self) -> bool {
        self.set == Set::Amx
    }
}

/// What the CPU offers, before any choice.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    avx512: bool,
    avx512_bf16: bool,
    vnni: bool,
    amd: bool,
    /// AMX-TILE and AMX-BF16 in the CPU and enabled by the OS (XCR0); the process's permission
    /// is asked only when the AMX set is chosen.
    amx_bf16: bool,
}

impl Cpu {
    #[cfg(target_arch = "x86_64")]
    fn probe() -> Self {
        use std::arch::is_x86_feature_detected as has;
        let avx512 =
            has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("fma") && has!("f16c");
        // CPUID leaf 0: the vendor string in EBX, EDX, ECX.
        let leaf0 = std::arch::x86_64::__cpuid(0);
        let amd = [leaf0.ebx, leaf0.edx, leaf0.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163];
        Cpu {
            avx512,
            avx512_bf16: avx512 && has!("avx512bf16"),
            vnni: avx512 && has!("avx512vnni"),
            amd,
            // Every CPU with AMX has AVX512-BF16 and VNNI; the tiled schedule's packing uses
            // the first, the quantized kernels below the tiles the second.
            amx_bf16: avx512 && has!("avx512bf16") && has!("avx512vnni") && amx::present(),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn probe() -> Self {
        Cpu {
            avx512: false,
            avx512_bf16: false,
            vnni: false,
            amd: false,
            amx_bf16: false,
        }
    }

    /// The best set this CPU runs.
    fn auto(&self) -> Set {
        if self.amx_bf16 {
            Set::Amx
        } else if self.avx512_bf16 && self.amd {
            Set::Avx512Bf16
        } else if self.avx512 {
            Set::Avx512
        } else {
            Set::Candle
        }
    }

    /// Whether this CPU runs `set`.
    fn runs(&self, set: Set) -> bool {
        match set {
            Set::Candle => true,
            Set::Avx512 => self.avx512,
            Set::Avx512Bf16 => self.avx512_bf16,
            Set::Amx => self.amx_bf16,
        }
    }

    /// The set for a `CANDLE_GLU_KERNELS` value: the one named if this CPU runs it, else what
    /// `auto` takes if that is below it (so a forced set never runs kernels the CPU does not
    /// favour, as bf16 dot products on Intel), else candle's ops; `auto` for unset, empty,
    /// `auto` or unknown values.
    fn choose(&self, forced: Option<&str>) -> Set {
        match forced.and_then(Set::parse) {
            None => self.auto(),
            Some(wanted) if self.runs(wanted) => wanted,
            Some(wanted) => wanted.min(self.auto()),
        }
    }
}

/// The kernels' features for this process, chosen once.
pub(crate) fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        let mut cpu = Cpu::probe();
        let forced = std::env::var(KERNELS_ENV).ok();
        let mut set = cpu.choose(forced.as_deref());
        if set == Set::Amx && !amx_usable() {
            // An OS that keeps the tile state but refuses it to this process (a seccomp
            // filter, say): as on a CPU without AMX.
            cpu.amx_bf16 = false;
            set = cpu.choose(forced.as_deref());
        }
        Features {
            set,
            has_vnni: cpu.vnni,
        }
    })
}

/// The public view of [`features`].
pub(crate) fn cpu_kernels() -> Option<CpuKernels> {
    let f = features();
    f.avx512().then_some(CpuKernels {
        set: f.set,
        vnni: f.vnni(),
    })
}

/// Whether this CPU has AMX-TILE and AMX-BF16 and this process may use them, whatever kernels
/// were chosen (the permission is asked once, here or in [`features`]).
pub(crate) fn amx_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| Cpu::probe().amx_bf16 && amx::request_permission())
}

/// AMX on x86-64 Linux: CPUID, XCR0, and the process's permission.
#[cfg(target_arch = "x86_64")]
mod amx {
    /// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22) and the OS
    /// has enabled the tile state (XCR0 bits 17 and 18).
    pub(super) fn present() -> bool {
        use std::arch::x86_64::__cpuid_count;
        if __cpuid_count(0, 0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        let (tile, bf16) = (edx & (1 << 24) != 0, edx & (1 << 22) != 0);
        // XGETBV needs OSXSAVE (CPUID leaf 1, ECX bit 27).
        if !(tile && bf16) || __cpuid_count(1, 0).ecx & (1 << 27) == 0 {
            return false;
        }
        let xcr0_low: u32;
        // SAFETY: OSXSAVE is set, so XGETBV with ECX = 0 reads XCR0 and touches nothing else.
        unsafe {
            std::arch::asm!(
                "xgetbv",
                in("ecx") 0u32,
                out("eax") xcr0_low,
                out("edx") _,
                options(nomem, nostack, preserves_flags),
            );
        }
        const TILECFG_AND_TILEDATA: u32 = (1 << 17) | (1 << 18);
        xcr0_low & TILECFG_AND_TILEDATA == TILECFG_AND_TILEDATA
    }

    /// Asks Linux for this process's permission to use the tile data (`arch_prctl(
    /// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16+): every thread of the process,
    /// present and future, may then use the tiles. Elsewhere than Linux: no.
    pub(super) fn request_permission() -> bool {
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_ulong = 18;
            // SAFETY: a plain system call with two integer arguments; it changes only which
            // register state the kernel lets this process use.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            ret == 0
        }
        #[cfg(not(target_os = "linux"))]
        false
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    pub(super) fn request_permission() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: Cpu = Cpu {
        avx512: true,
        avx512_bf16: true,
        vnni: true,
        amd: false,
        amx_bf16: false,
    };
    const INTEL_AMX: Cpu = Cpu {
        amx_bf16: true,
        ..INTEL
    };
    const ZEN5: Cpu = Cpu { amd: true, ..INTEL };
    const NONE: Cpu = Cpu {
        avx512: false,
        avx512_bf16: false,
        vnni: false,
        amd: false,
        amx_bf16: false,
    };

    #[test]
    fn auto_takes_bf16_dot_products_on_amd_only() {
        assert_eq!(INTEL.choose(None), Set::Avx512);
        assert_eq!(ZEN5.choose(Some("auto")), Set::Avx512Bf16);
        assert_eq!(NONE.choose(None), Set::Candle);
        assert_eq!(INTEL.choose(Some("avx-512")), Set::Avx512, "unknown: auto");
        assert_eq!(INTEL_AMX.choose(None), Set::Amx);
        assert_eq!(INTEL_AMX.choose(Some("avx512")), Set::Avx512);
        assert_eq!(INTEL.choose(Some("amx")), Set::Avx512, "auto's, below amx");
        assert_eq!(
            ZEN5.choose(Some("amx")),
            Set::Avx512Bf16,
            "auto's, below amx"
        );
        assert_eq!(NONE.choose(Some("amx")), Set::Candle);
    }

    #[test]
    fn a_forced_set_falls_back_to_what_the_cpu_runs() {
        assert_eq!(
            INTEL.choose(Some("AVX512-BF16")),
            Set::Avx512Bf16,
            "runs it: forced"
        );
        assert_eq!(ZEN5.choose(Some("avx512")), Set::Avx512);
        assert_eq!(ZEN5.choose(Some(" candle ")), Set::Candle);
        let no_bf16 = Cpu {
            avx512_bf16: false,
            ..INTEL
        };
        assert_eq!(no_bf16.choose(Some("avx512-bf16")), Set::Avx512);
        assert_eq!(NONE.choose(Some("avx512-bf16")), Set::Candle);
        let f = Features {
            set: Set::Candle,
            has_vnni: true,
        };
        assert!(!f.avx512() && !f.vnni() && !f.bf16_dot() && !f.amx_bf16());
    }
}
