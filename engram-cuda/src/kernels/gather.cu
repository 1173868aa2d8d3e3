// Row gathers: table rows (any storage format) to f32 embeddings, one block per output row.
//
// Every output row i reads one stored row chosen by src[i]:
//   src[i] >= 0: row src[i] of table A (device-resident table, device cache, or registered
//                host memory seen through a device pointer: zero-copy);
//   src[i] <  0: row -src[i]-1 of table B (rows staged in order by the host);
//   src == 0:    row i of table B.
// `*_scales` are the E8M0 scales of FP8 rows (one byte per 32 columns), else 0.
extern "C" __global__ void engram_gather_rows(
    const u8* a_values, const u8* a_scales,
    const u8* b_values, const u8* b_scales,
    const i64* src, float* out,
    int n, int width, int dtype, i64 row_bytes, i64 scale_bytes)
{
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const i64 s = src ? src[i] : -(i64)i - 1;
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
        float* o = out + (i64)i * width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            o[c] = load_elem(values, scales, dtype, c);
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
    for (int j = blockIdx.x; j < m; j += gridDim.x) {
        const i64 slot = pairs[2 * j];
        const i64 r = pairs[2 * j + 1];
        u8* dv = cache_values + slot * row_bytes;
        const u8* sv = staged_values + r * row_bytes;
        for (i64 b = threadIdx.x; b < row_bytes; b += blockDim.x) dv[b] = sv[b];
        if (cache_scales) {
            u8* ds = cache_scales + slot * scale_bytes;
            const u8* ss = staged_scales + r * scale_bytes;
            for (i64 b = threadIdx.x; b < scale_bytes; b += blockDim.x) ds[b] = ss[b];
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
