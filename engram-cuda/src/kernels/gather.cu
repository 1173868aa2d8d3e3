// Row gathers: table rows (any storage format) to f32 embeddings, one warp per output row.
//
// Every output row i reads one stored row chosen by src[i]:
//   src[i] >= 0: row src[i] of table A (device-resident table, device cache, or registered
//                host memory seen through a device pointer: zero-copy);
//   src[i] <  0: row -src[i]-1 of table B (rows staged in order by the host);
//   src == 0:    row i of table B.
// `*_scales` are the E8M0 scales of FP8 rows (one byte per 32 columns, written `>> 5` and
// `/ 32` here: `engram_core::dtype::FP8_SCALE_BLOCK` on the Rust side), else 0.
//
// A lane converts 8 columns at a time (4 for f32) with one 8- or 16-byte load and 16-byte
// stores when the row and the output are aligned for it (every table this crate builds
// is); otherwise it falls back to one column per lane. The output rows are written once,
// whole, so the stores of a warp cover whole 32-byte sectors.
__device__ __forceinline__ f32x4 f32x4_of(float a, float b, float c, float d) {
    f32x4 v;
    v.x = a; v.y = b; v.z = c; v.w = d;
    return v;
}

__device__ __forceinline__ void gather_row_vec(
    const u8* values, const u8* scales, float* o, int width, int dtype, int lane)
{
    u8* ob = (u8*)o;
    if (dtype == DT_F32) {
        for (int c = lane * 4; c < width; c += 128) {
            store_vec(ob + 4 * c, load_vec<f32x4>(values + 4 * c));
        }
        return;
    }
    for (int c = lane * 8; c < width; c += 256) {
        float f[8];
        if (dtype == DT_F8E4M3) {
            const u32x2 q = load_vec<u32x2>(values + c);
            const float s = e8m0_to_f32(scales[c >> 5]);  // 8 columns share one scale
            for (int k = 0; k < 4; ++k) {
                f[k] = round_bf16(e4m3_to_f32((q.x >> (8 * k)) & 0xffu) * s);
                f[k + 4] = round_bf16(e4m3_to_f32((q.y >> (8 * k)) & 0xffu) * s);
            }
        } else {
            const u32x4 h = load_vec<u32x4>(values + 2 * c);
            const u32 w[4] = {h.x, h.y, h.z, h.w};
            for (int k = 0; k < 4; ++k) {
                if (dtype == DT_BF16) {
                    f[2 * k] = bf16_bits_to_f32(w[k] & 0xffffu);
                    f[2 * k + 1] = bf16_bits_to_f32(w[k] >> 16);
                } else {
                    f[2 * k] = f16_bits_to_f32((u16)(w[k] & 0xffffu));
                    f[2 * k + 1] = f16_bits_to_f32((u16)(w[k] >> 16));
                }
            }
        }
        store_vec(ob + 4 * c, f32x4_of(f[0], f[1], f[2], f[3]));
        store_vec(ob + 4 * c + 16, f32x4_of(f[4], f[5], f[6], f[7]));
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
    // Wide accesses need whole vectors per row and aligned rows (checked per row below).
    const int cols = dtype == DT_F32 ? 4 : 8;
    const u64 align = dtype == DT_F32 ? 16u : dtype == DT_F8E4M3 ? 8u : 16u;
    const bool shape_ok = width % cols == 0;
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
