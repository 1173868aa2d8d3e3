// Shared helpers of the Engram kernels. Compiled by NVRTC at run time: no headers are
// included, only NVRTC's built-ins (math functions, warp intrinsics) are used.
//
// Conventions: every kernel uses a 1-D block whose size is a multiple of 32 (at most
// 1024) and loops over its work items with a grid-stride loop, so any grid size is
// correct. Block reductions call __syncthreads(): the work item of a block is uniform
// across its threads, so every thread reaches them.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// Vectors for 8- and 16-byte accesses (NVRTC emits one wide load or store for each when
// the address is aligned; callers check).
struct alignas(16) f32x4 { float x, y, z, w; };
struct alignas(16) u32x4 { u32 x, y, z, w; };
struct alignas(8) u32x2 { u32 x, y; };

template <class V>
__device__ __forceinline__ V load_vec(const u8* p) {
#ifdef ENGRAM_EMULATION
    V v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    return *reinterpret_cast<const V*>(p);
#endif
}

template <class V>
__device__ __forceinline__ void store_vec(u8* p, const V& v) {
#ifdef ENGRAM_EMULATION
    memcpy(p, &v, sizeof v);
#else
    *reinterpret_cast<V*>(p) = v;
#endif
}

// Row storage formats (engram_core::dtype::RowDtype).
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2
#define DT_F8E4M3 3

__device__ __forceinline__ float warp_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 16);
    v += __shfl_xor_sync(0xffffffffu, v, 8);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v;
}

// Sum of `v` over the block, returned to every thread. `smem` holds at least 33 floats.
__device__ float block_sum(float v, float* smem) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers of smem are done
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < nwarps ? smem[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) smem[32] = t;
    }
    __syncthreads();
    return smem[32];
}

// Round to the nearest bf16 (ties to even) and back, as half::bf16::from_f32 does.
__device__ __forceinline__ float round_bf16(float x) {
    u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return __uint_as_float((u | 0x00400000u) & 0xffff0000u);  // quiet NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return __uint_as_float(u & 0xffff0000u);
}

__device__ __forceinline__ float bf16_bits_to_f32(u32 bits) {
    return __uint_as_float(bits << 16);
}

__device__ __forceinline__ float f16_bits_to_f32(u16 bits) {
#ifdef ENGRAM_EMULATION  // the CPU emulation of the tests (tests/emu), never NVRTC
    return engram_emu_f16_to_f32(bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
#endif
}

// FP8 E4M3 ("fn": no infinities; S.1111.111 is NaN), exact.
__device__ __forceinline__ float e4m3_to_f32(u32 b) {
    const u32 sign = (b & 0x80u) << 24;
    const u32 e = (b >> 3) & 0xfu;
    const u32 m = b & 7u;
    if (e == 15u && m == 7u) return __uint_as_float(0x7fc00000u | sign);
    float v;
    if (e == 0u) {
        v = (float)m * 0.001953125f;  // subnormal: m * 2^-9, exact
    } else {
        v = __uint_as_float(((e + 120u) << 23) | (m << 20));  // 2^(e-7) * (1 + m/8)
    }
    return __uint_as_float(__float_as_uint(v) | sign);
}

// E8M0 scale: 2^(b - 127); 0 is the subnormal 2^-127; 0xff is NaN. An FP8 row carries one
// scale per 32 columns (`c >> 5` below and in gather.cu): the Rust side's one definition of
// that block is `engram_core::dtype::FP8_SCALE_BLOCK`, which these literals must match.
__device__ __forceinline__ float e8m0_to_f32(u32 b) {
    if (b == 0xffu) return __uint_as_float(0x7fc00000u);
    if (b == 0u) return __uint_as_float(0x00400000u);
    return __uint_as_float(b << 23);
}

// Column c of a stored row, as the model sees it (V4.1 rows: bf16(e4m3 * 2^(s-127))).
__device__ __forceinline__ float load_elem(const u8* row, const u8* scales, int dtype, int c) {
    switch (dtype) {
        case DT_F32:
            return ((const float*)row)[c];
        case DT_BF16:
            return bf16_bits_to_f32(((const u16*)row)[c]);
        case DT_F16:
            return f16_bits_to_f32(((const u16*)row)[c]);
        default:
            return round_bf16(e4m3_to_f32(row[c]) * e8m0_to_f32(scales[c >> 5]));
    }
}

__device__ __forceinline__ float sigmoidf_(float x) {
    return 1.0f / (1.0f + expf(-x));
}
