// Support kernels: a plain tiled GEMM used when cuBLAS cannot be loaded, and the
// benchmark's busy kernel.

// C[M, N] = A[M, K] @ B[N, K]^T (all row-major f32). Block (16, 16), grid (ceil(N/16), ceil(M/16)).
#define ENGRAM_TILE 16
extern "C" __global__ void engram_sgemm_nt(
    const float* A, const float* B, float* C, int M, int N, int K)
{
    __shared__ float As[ENGRAM_TILE][ENGRAM_TILE + 1];
    __shared__ float Bs[ENGRAM_TILE][ENGRAM_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * ENGRAM_TILE + ty;   // of A and C
    const int col = blockIdx.x * ENGRAM_TILE + tx;   // of B and C
    const int brow = blockIdx.x * ENGRAM_TILE + ty;  // row of B this thread loads
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += ENGRAM_TILE) {
        const int k = k0 + tx;
        As[ty][tx] = (row < M && k < K) ? A[(i64)row * K + k] : 0.0f;
        Bs[ty][tx] = (brow < N && k < K) ? B[(i64)brow * K + k] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < ENGRAM_TILE; ++kk) acc += As[ty][kk] * Bs[tx][kk];
        __syncthreads();
    }
    if (row < M && col < N) C[(i64)row * N + col] = acc;
}

// Keeps its block busy for `ns` nanoseconds of the GPU's global timer: the benchmark's
// stand-in for the host model's layers that run before the Engram layer.
extern "C" __global__ void engram_spin(u64 ns)
{
#ifndef ENGRAM_EMULATION
    u64 start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
#endif
}
