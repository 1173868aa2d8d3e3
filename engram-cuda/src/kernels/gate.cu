// The fused gates of both layer variants, one block per (token, branch).
//
// kv: [tokens, (G+1)*D], the projections E @ W^T: G keys (branch h at columns h*D..),
// then the shared value (columns G*D..).

// Paper variant (docs/algorithm.md section 7).
// bias: [(G+1)*D] (key biases, then the value bias).
//   k = kv_key + bk;  s = sum(rms(k; norm1) * rms(x; norm2)) / sqrt(D)  (eps = gate_eps)
//   s = sign(s) * sqrt(max(|s|, clamp)), sign(0) = 0;  a = sigmoid(s)
//   val = a * (kv_value + bv);  z = rms(val; conv_norm, conv_eps)  (the short conv's input)
extern "C" __global__ void engram_paper_gate(
    const float* hidden, const float* kv, const float* bias,
    const float* norm1, const float* norm2, const float* conv_norm,
    float* val, float* z,
    int tokens, int G, int D, float gate_eps, float conv_eps, float clamp)
{
    __shared__ float smem[33];
    const i64 stride = (i64)(G + 1) * D;
    const float inv_d = 1.0f / (float)D;
    const float inv_sqrt_d = 1.0f / sqrtf((float)D);
    for (int item = blockIdx.x; item < tokens * G; item += gridDim.x) {
        const int t = item / G;
        const int h = item - t * G;
        const float* x = hidden + ((i64)t * G + h) * D;
        const float* k = kv + (i64)t * stride + (i64)h * D;
        const float* v = kv + (i64)t * stride + (i64)G * D;
        const float* bk = bias + (i64)h * D;
        const float* bv = bias + (i64)G * D;
        const float* n1 = norm1 + (i64)h * D;
        const float* n2 = norm2 + (i64)h * D;
        float skk = 0.0f, sxx = 0.0f, skx = 0.0f, svv = 0.0f;
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            const float kd = k[d] + bk[d];
            const float xd = x[d];
            const float vd = v[d] + bv[d];
            skk += kd * kd;
            sxx += xd * xd;
            skx += (kd * n1[d]) * (xd * n2[d]);
            svv += vd * vd;
        }
        skk = block_sum(skk, smem);
        sxx = block_sum(sxx, smem);
        skx = block_sum(skx, smem);
        svv = block_sum(svv, smem);
        const float rk = 1.0f / sqrtf(skk * inv_d + gate_eps);
        const float rx = 1.0f / sqrtf(sxx * inv_d + gate_eps);
        float s = skx * rk * rx * inv_sqrt_d;
        s = (s == 0.0f) ? 0.0f : copysignf(sqrtf(fmaxf(fabsf(s), clamp)), s);
        const float a = sigmoidf_(s);
        const float rz = 1.0f / sqrtf(a * a * (svv * inv_d) + conv_eps);
        float* vo = val + ((i64)t * G + h) * D;
        float* zo = z + ((i64)t * G + h) * D;
        const float* cn = conv_norm + (i64)h * D;
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            const float vd = a * (v[d] + bv[d]);
            vo[d] = vd;
            zo[d] = vd * rz * cn[d];
        }
    }
}

// DeepSeek-V4.1 (docs/algorithm.md section 8).
// wqk: [G*D], the f32 product q_weight * k_weight.
//   key, value: kv rounded to bf16;  rstd = rsqrt(mean(x^2)+eps) * rsqrt(mean(key^2)+eps)
//   dot = sum(x * wqk * key) * rstd / sqrt(D);  g = sigmoid(copysign(sqrt(max(|dot|, clamp)), dot))
//   out = bf16(x + g * value); dead tokens (dead[t] != 0) pass through unchanged.
extern "C" __global__ void engram_v41_gate(
    const float* hidden, const float* kv, const float* wqk, const u8* dead, float* out,
    int tokens, int G, int D, float eps, float clamp)
{
    __shared__ float smem[33];
    const i64 stride = (i64)(G + 1) * D;
    const float inv_d = 1.0f / (float)D;
    const float inv_sqrt_d = 1.0f / sqrtf((float)D);
    for (int item = blockIdx.x; item < tokens * G; item += gridDim.x) {
        const int t = item / G;
        const int h = item - t * G;
        const float* x = hidden + ((i64)t * G + h) * D;
        float* o = out + ((i64)t * G + h) * D;
        if (dead != 0 && dead[t] != 0) {  // uniform across the block
            for (int d = threadIdx.x; d < D; d += blockDim.x) o[d] = x[d];
            continue;
        }
        const float* key = kv + (i64)t * stride + (i64)h * D;
        const float* value = kv + (i64)t * stride + (i64)G * D;
        const float* w = wqk + (i64)h * D;
        float sxx = 0.0f, skk = 0.0f, sdot = 0.0f;
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            const float xd = x[d];
            const float kd = round_bf16(key[d]);
            sxx += xd * xd;
            skk += kd * kd;
            sdot += xd * w[d] * kd;
        }
        sxx = block_sum(sxx, smem);
        skk = block_sum(skk, smem);
        sdot = block_sum(sdot, smem);
        const float rstd = (1.0f / sqrtf(sxx * inv_d + eps)) * (1.0f / sqrtf(skk * inv_d + eps));
        const float dot = sdot * rstd * inv_sqrt_d;
        const float g = sigmoidf_(copysignf(sqrtf(fmaxf(fabsf(dot), clamp)), dot));
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            o[d] = round_bf16(x[d] + g * round_bf16(value[d]));
        }
    }
}
