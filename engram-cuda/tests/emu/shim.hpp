// A CPU emulation of the little of CUDA the Engram kernels use, so that their logic can
// be tested with a C++ compiler on machines with no GPU (tests/emulated.rs).
//
// Blocks run one after another; the threads of a block are real threads, with a barrier
// for __syncthreads() and one per warp for __shfl_xor_sync(). __shared__ variables are
// statics, shared by the threads of the running block.
#include <barrier>
#include <cmath>
#include <math.h>  // sqrtf, expf, ... in the global namespace, as in CUDA
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define ENGRAM_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

static dim3 gridDim, blockDim, blockIdx;
static thread_local dim3 threadIdx;
static thread_local int emu_linear;
static std::unique_ptr<std::barrier<>> emu_block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
static std::vector<float> emu_shfl;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const int w = emu_linear / 32, lane = emu_linear % 32;
    emu_shfl[emu_linear] = v;
    emu_warp_barriers[w]->arrive_and_wait();
    const float r = emu_shfl[w * 32 + (lane ^ lane_mask)];
    emu_warp_barriers[w]->arrive_and_wait();
    return r;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// IEEE half to float (exact).
inline float engram_emu_f16_to_f32(unsigned short h) {
    const unsigned sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    float v;
    if (e == 0) v = std::ldexp((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp((float)(m | 0x400u), (int)e - 25);
    return __uint_as_float(__float_as_uint(v) | sign);
}


// Runs `kernel` over the grid, one block at a time.
template <class F>
void emu_launch(dim3 grid, dim3 block, F kernel) {
    gridDim = grid;
    blockDim = block;
    const int n = (int)(block.x * block.y);
    emu_shfl.assign(n, 0.0f);
    emu_warp_barriers.clear();
    for (int w = 0; w < (n + 31) / 32; ++w)
        emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32, n - 32 * w)));
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx.x = bx;
            blockIdx.y = by;
            emu_block_barrier = std::make_unique<std::barrier<>>(n);
            std::vector<std::thread> threads;
            threads.reserve(n);
            for (int t = 0; t < n; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx.x = t % block.x;
                    threadIdx.y = t / block.x;
                    emu_linear = t;
                    kernel();
                });
            }
            for (auto& th : threads) th.join();
        }
    }
}
