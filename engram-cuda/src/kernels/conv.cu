// The paper variant's short conv (docs/algorithm.md section 7) over a batch of segments,
// and the per-sequence window of z rows it remembers.
//
// Tokens of all segments are back to back. seg_of[t] / pos_of[t]: the segment of token t
// and its position inside it. hist[s]: device address of segment s's window ([H, C]
// floats, oldest row first, H = (K-1)*dil) or 0 for a segment that starts its sequence
// (zero padding). C = G*D channels, channel c = h*D + d.

// out[t, c] = val[t, c] + silu(sum_j w[c, j] * z[t - (K-1-j)*dil, c])
extern "C" __global__ void engram_short_conv(
    const float* val, const float* z, const float* conv_w,
    const int* seg_of, const int* pos_of, const u64* hist,
    float* out, int tokens, int C, int K, int dil, int H)
{
    for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
        const int p = pos_of[t];
        const float* hs = (const float*)hist[seg_of[t]];
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float y = 0.0f;
            for (int j = 0; j < K; ++j) {
                const int back = (K - 1 - j) * dil;
                float zv;
                if (back <= p) {
                    zv = z[(i64)(t - back) * C + c];
                } else {
                    const int b = back - p;  // 1..H rows before the segment
                    zv = hs ? hs[(i64)(H - b) * C + c] : 0.0f;
                }
                y += conv_w[(i64)c * K + j] * zv;
            }
            out[(i64)t * C + c] = val[(i64)t * C + c] + y * sigmoidf_(y);
        }
    }
}

// The new window of each remembering segment: the last H rows of (old window ++ the
// segment's z rows), written to scratch[s] ([H, C]); engram_store_windows copies it back.
extern "C" __global__ void engram_conv_window(
    const float* z, const u64* hist, const int* seg_start, const int* seg_len,
    float* scratch, int S, int C, int H)
{
    for (int item = blockIdx.x; item < S * H; item += gridDim.x) {
        const int s = item / H;
        const int r = item - s * H;
        const float* hs = (const float*)hist[s];
        if (hs == 0) continue;  // uniform across the block
        const int i = seg_len[s] + r;  // row of the concatenation
        const float* src = i < H ? hs + (i64)i * C : z + ((i64)seg_start[s] + (i - H)) * C;
        float* dst = scratch + ((i64)s * H + r) * C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) dst[c] = src[c];
    }
}

extern "C" __global__ void engram_store_windows(
    const float* scratch, const u64* hist, int S, int C, int H)
{
    for (int item = blockIdx.x; item < S * H; item += gridDim.x) {
        const int s = item / H;
        const int r = item - s * H;
        float* hs = (float*)hist[s];
        if (hs == 0) continue;
        const float* src = scratch + ((i64)s * H + r) * C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) hs[(i64)r * C + c] = src[c];
    }
}
