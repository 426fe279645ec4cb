// out[i] = σ(gate[i]) · up[i] for f32, f16 and bf16, in f32 and rounded once; any layout. The
// Metal twin of gated.cu, compiled at run time (src/kernels/metal.rs). Untested: no Mac here.
#include <metal_stdlib>
using namespace metal;

#define MAX_DIMS 6

// `GatedStrides` in src/kernels/strided.rs: ndim == 0 means both arguments are contiguous.
struct Strides {
    ulong dims[MAX_DIMS];
    ulong gate[MAX_DIMS];
    ulong up[MAX_DIMS];
    uint ndim;
    uint pad;
};

// erfc(z) for z >= 0, Numerical Recipes' Chebyshev fit (relative error below 1.2e-7 in exact
// arithmetic; f32 rounding adds about z^2 * 2^-23); MSL has no erf. The same formula as the CPU
// kernels (src/kernels/avx512.rs).
static float erfc_nonneg(float z) {
    float t = 1.0f / (1.0f + 0.5f * z);
    float p = -1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f +
              t * (-0.18628806f + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f +
              t * (-0.82215223f + t * 0.17087277f))))))));
    return t * exp(-z * z + p);
}

// The activations, numbered as in gated.cu.
static float activation(float x, int act, float beta) {
    switch (act) {
    case 0: return 1.0f / (1.0f + exp(-x));
    case 1: return x;
    case 2: return x < 0.0f ? 0.0f : x;
    case 3: {
        // x·Φ(x), Φ(x) = ½erfc(-x/√2)
        float z = fabs(x) * 0.70710678118654752f;
        float half_erfc = 0.5f * erfc_nonneg(z);
        return x * (x < 0.0f ? half_erfc : 1.0f - half_erfc);
    }
    case 4: {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return x / (1.0f + exp(-2.0f * u));
    }
    default: return x / (1.0f + exp(-beta * x));
    }
}

static float load(float v) { return v; }
static float load(half v) { return float(v); }
static float load_bf16(ushort b) { return as_type<float>(uint(b) << 16); }

static float store(float v, float) { return v; }
static half store(float v, half) { return half(v); }
// Round to nearest even; NaN stays a quiet NaN.
static ushort store_bf16(float f) {
    uint u = as_type<uint>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return ushort((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return ushort(u >> 16);
}

static void offsets(constant Strides &s, ulong i, thread ulong &ig, thread ulong &iu) {
    ig = i;
    iu = i;
    if (s.ndim == 0) return;
    ulong rest = i;
    ig = 0;
    iu = 0;
    for (int k = int(s.ndim) - 1; k >= 0; --k) {
        ulong c = rest % s.dims[k];
        rest /= s.dims[k];
        ig += c * s.gate[k];
        iu += c * s.up[k];
    }
}

#define GATED_KERNEL(NAME, T, LOAD, STORE)                                                     \
    kernel void NAME(device const T *gate [[buffer(0)]], device const T *up [[buffer(1)]],    \
                     device T *out [[buffer(2)]], constant Strides &s [[buffer(3)]],           \
                     constant int &act [[buffer(4)]], constant float &beta [[buffer(5)]],      \
                     constant ulong &n [[buffer(6)]], uint gid [[thread_position_in_grid]]) { \
        if (ulong(gid) >= n) return;                                                           \
        ulong ig, iu;                                                                          \
        offsets(s, ulong(gid), ig, iu);                                                        \
        out[gid] = STORE(activation(LOAD(gate[ig]), act, beta) * LOAD(up[iu]));                \
    }

#define STORE_F32(v) store(v, 0.0f)
#define STORE_F16(v) store(v, half(0))
GATED_KERNEL(glu_gated_f32, float, load, STORE_F32)
GATED_KERNEL(glu_gated_f16, half, load, STORE_F16)
GATED_KERNEL(glu_gated_bf16, ushort, load_bf16, store_bf16)
