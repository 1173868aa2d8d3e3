// Row gathers: table rows (any storage format) to f32 embeddings, one warp per output row.
//
// Every output row i reads one stored row chosen by src[i]:
//   src[i] >= 0: row src[i] of table A (device-resident table, device cache, or registered
//                host memory seen through a device pointer: zero-copy);
//   src[i] <  0: row -src[i]-1 of table B (rows staged in order by the host);
//   src == 0:    row i of table B.
// `*_scales` are the E8M0 scales of FP8 rows (one byte per 32 columns), else 0.
//
// Lane l converts columns [4l, 4l+4) of each 128-column stretch of a row, so that every
// load and store of the warp covers one contiguous span (128 B of FP8, 256 B of bf16,
// 512 B of f32 and of the f32 output), with 4-, 8- or 16-byte accesses when the row and
// the output are aligned for them (every table this crate builds is); otherwise one
// column per lane.
__device__ __forceinline__ f32x4 f32x4_of(float a, float b, float c, float d) {
    f32x4 v;
    v.x = a; v.y = b; v.z = c; v.w = d;
    return v;
}

// Columns c..c+3 of a stored row as f32 (c a multiple of 4).
__device__ __forceinline__ f32x4 load_cols4(const u8* values, const u8* scales, int dtype, int c) {
    if (dtype == DT_F32) return load_vec<f32x4>(values + 4 * c);
    if (dtype == DT_F8E4M3) {
        const u32 q = load_vec<u32>(values + c);
        const float s = e8m0_to_f32(scales[c >> 5]);  // the 4 columns share one scale
        return f32x4_of(round_bf16(e4m3_to_f32(q & 0xffu) * s),
                        round_bf16(e4m3_to_f32((q >> 8) & 0xffu) * s),
                        round_bf16(e4m3_to_f32((q >> 16) & 0xffu) * s),
                        round_bf16(e4m3_to_f32(q >> 24) * s));
    }
    const u32x2 h = load_vec<u32x2>(values + 2 * c);
    if (dtype == DT_BF16) {
        return f32x4_of(bf16_bits_to_f32(h.x & 0xffffu), bf16_bits_to_f32(h.x >> 16),
                        bf16_bits_to_f32(h.y & 0xffffu), bf16_bits_to_f32(h.y >> 16));
    }
    return f32x4_of(f16_bits_to_f32((u16)(h.x & 0xffffu)), f16_bits_to_f32((u16)(h.x >> 16)),
                    f16_bits_to_f32((u16)(h.y & 0xffffu)), f16_bits_to_f32((u16)(h.y >> 16)));
}

__device__ __forceinline__ void gather_row_vec(
    const u8* values, const u8* scales, float* o, int width, int dtype, int lane)
{
    u8* ob = (u8*)o;
    // Two stretches per step, both loads in flight before either store.
    for (int c0 = lane * 4; c0 < width; c0 += 256) {
        const int c1 = c0 + 128;
        const f32x4 r0 = load_cols4(values, scales, dtype, c0);
        if (c1 < width) {
            const f32x4 r1 = load_cols4(values, scales, dtype, c1);
            store_vec(ob + 4 * c0, r0);
            store_vec(ob + 4 * c1, r1);
        } else {
            store_vec(ob + 4 * c0, r0);
        }
    }
}

extern "C" __global__ void engram_gather_rows(
    const u8* a_values, const u8* a_scales,
    const u8* b_values, const u8* b_scales,
    const i64* src, float* out,
    int n, int width, int dtype, i64 row_bytes, i64 scale_bytes)
{
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    // Wide accesses need whole 4-column groups and aligned rows (checked per row below).
    const u64 align = dtype == DT_F32 ? 16u : dtype == DT_F8E4M3 ? 4u : 8u;
    const bool shape_ok = width % 4 == 0;
    for (i64 i = (i64)blockIdx.x * warps + (threadIdx.x >> 5); i < n;
         i += (i64)gridDim.x * warps) {
        const i64 s = src ? src[i] : -i - 1;
        const u8* values;
        const u8* scales;
        if (s >= 0) {
            values = a_values + s * row_bytes;
            scales = a_scales ? a_scales + s * scale_bytes : 0;
        } else {
            const i64 r = -s - 1;
            values = b_values + r * row_bytes;
            scales = b_scales ? b_scales + r * scale_bytes : 0;
        }
        float* o = out + i * width;
        if (shape_ok && ((u64)values % align) == 0 && ((u64)o % 16u) == 0) {
            gather_row_vec(values, scales, o, width, dtype, lane);
        } else {
            for (int c = lane; c < width; c += 32) {
                o[c] = load_elem(values, scales, dtype, c);
            }
        }
    }
}

// Copies staged rows into device-cache slots: pairs[2j] = slot, pairs[2j+1] = staged row.
// Runs after the gather of the same batch (stream order), so hits read the old contents.
extern "C" __global__ void engram_cache_insert(
    u8* cache_values, u8* cache_scales,
    const u8* staged_values, const u8* staged_scales,
    const i64* pairs, int m, i64 row_bytes, i64 scale_bytes)
{
    // One warp per pair, 16 bytes per lane where both rows are aligned for it.
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    for (int j = blockIdx.x * warps + (threadIdx.x >> 5); j < m; j += gridDim.x * warps) {
        const i64 slot = pairs[2 * j];
        const i64 r = pairs[2 * j + 1];
        u8* dv = cache_values + slot * row_bytes;
        const u8* sv = staged_values + r * row_bytes;
        if (row_bytes % 16 == 0 && ((u64)dv % 16u) == 0 && ((u64)sv % 16u) == 0) {
            for (i64 b = 16 * lane; b < row_bytes; b += 512) {
                store_vec(dv + b, load_vec<u32x4>(sv + b));
            }
        } else {
            for (i64 b = lane; b < row_bytes; b += 32) dv[b] = sv[b];
        }
        if (cache_scales) {
            u8* ds = cache_scales + slot * scale_bytes;
            const u8* ss = staged_scales + r * scale_bytes;
            for (i64 b = lane; b < scale_bytes; b += 32) ds[b] = ss[b];
        }
    }
}

// FP8 E4M3 values with E8M0 scales per 32 columns to f32 (bf16-rounded), elementwise over
// a [rows, width] block: the dequantization on its own (tests, weights).
extern "C" __global__ void engram_dequant_f8(
    const u8* values, const u8* scales, float* out, i64 rows, int width)
{
    const int sw = (width + 31) / 32;
    const i64 total = rows * (i64)width;
    for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (i64)gridDim.x * blockDim.x) {
        const i64 r = k / width;
        const int c = (int)(k - r * width);
        out[k] = round_bf16(e4m3_to_f32(values[k]) * e8m0_to_f32(scales[r * sw + (c >> 5)]));
    }
}
