// out[i] = σ(gate[i]) · up[i] for f32, f16 and bf16, in f32 and rounded once; any layout.
//
// Compiled at run time by NVRTC (src/kernels/cuda.rs), so that it needs no CUDA compiler at
// build time and its PTX always suits the driver it runs on. No headers: f16 and bf16 are moved
// as their bits and converted here, so nothing of a CUDA toolkit is needed at run time either.

#define MAX_DIMS 6

// `GatedStrides` in src/kernels/strided.rs: ndim == 0 means both arguments are contiguous.
struct Strides {
    unsigned long long dims[MAX_DIMS];
    unsigned long long gate[MAX_DIMS];
    unsigned long long up[MAX_DIMS];
    unsigned int ndim;
    unsigned int pad;
};

// The activations, numbered as `activation_code` in src/kernels/mod.rs.
#define ACT_SIGMOID 0
#define ACT_IDENTITY 1
#define ACT_RELU 2
#define ACT_GELU 3
#define ACT_GELU_TANH 4
#define ACT_SWISH 5

__device__ __forceinline__ float activation(float x, int act, float beta) {
    switch (act) {
    case ACT_SIGMOID:
        return 1.0f / (1.0f + expf(-x));
    case ACT_IDENTITY:
        return x;
    case ACT_RELU:
        return x < 0.0f ? 0.0f : x;  // NaN stays NaN, as in PyTorch
    case ACT_GELU:
        // x·Φ(x) = ½x·erfc(-x/√2): no cancellation in the left tail.
        return 0.5f * x * erfcf(-0.70710678118654752f * x);
    case ACT_GELU_TANH: {
        // ½x(1 + tanh u) = x·sigmoid(2u), u = √(2/π)(x + 0.044715x³).
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return x / (1.0f + expf(-2.0f * u));
    }
    default:  // Swish-β: SiLU (β = 1) and quick_gelu (β = 1.702)
        return x / (1.0f + expf(-beta * x));
    }
}

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float store_f32(float v) { return v; }

__device__ __forceinline__ float load_f16(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short store_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float load_bf16(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}
// Round to nearest even, as candle's `half` and PyTorch do; NaN stays a quiet NaN.
__device__ __forceinline__ unsigned short store_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

#define GATED_KERNEL(NAME, T, LOAD, STORE)                                                     \
    extern "C" __global__ void NAME(const T *gate, const T *up, T *out, unsigned long long n,  \
                                    Strides s, int act, float beta) {                          \
        unsigned long long step = (unsigned long long)blockDim.x * gridDim.x;                  \
        for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
             i < n; i += step) {                                                               \
            unsigned long long ig = i, iu = i;                                                 \
            if (s.ndim != 0) {                                                                 \
                unsigned long long rest = i;                                                   \
                ig = 0;                                                                        \
                iu = 0;                                                                        \
                _Pragma("unroll") for (int k = MAX_DIMS - 1; k >= 0; --k) {                    \
                    if (k < (int)s.ndim) {                                                     \
                        unsigned long long c = rest % s.dims[k];                               \
                        rest /= s.dims[k];                                                     \
                        ig += c * s.gate[k];                                                   \
                        iu += c * s.up[k];                                                     \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            out[i] = STORE(activation(LOAD(gate[ig]), act, beta) * LOAD(up[iu]));              \
        }                                                                                      \
    }

GATED_KERNEL(glu_gated_f32, float, load, store_f32)
GATED_KERNEL(glu_gated_f16, unsigned short, load_f16, store_f16)
GATED_KERNEL(glu_gated_bf16, unsigned short, load_bf16, store_bf16)
