// Self-test kernels for csrc/host_emulation.h and csrc/common.cuh.
// tests/test_host_emulation.py compiles this file with g++ -DPYVIT_HOST_EMULATION into a
// shared library, calls the extern "C" wrappers through ctypes on host buffers and checks
// the results with numpy; it also compiles it with nvcc to show that the same source
// builds for the GPU. Each wrapper returns the launch's cudaError_t.
#include "common.cuh"

namespace {

// Block sum: shuffle-xor reduction inside each warp, partials through static shared
// memory and __syncthreads, then shuffle-down in the first warp.
__global__ void block_sum_kernel(const float* in, int n, float* out) {
  __shared__ float partial[32];
  float v = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    v += in[i];
  }
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// Reverses rows of length n through dynamic shared memory, blockDim.y rows per block.
// Threads past the row end return before the barrier: exited threads must not block it.
__global__ void reverse_rows_kernel(const float* in, int n, float* out) {
  PV_DYNAMIC_SHARED(float, rows);
  if (static_cast<int>(threadIdx.x) >= n) return;
  float* row = rows + threadIdx.y * n;
  const int r = blockIdx.x * blockDim.y + threadIdx.y;
  row[threadIdx.x] = in[r * n + threadIdx.x];
  __syncthreads();
  out[r * n + threadIdx.x] = row[n - 1 - threadIdx.x];
}

// Each thread records what four shuffle flavours hand it (value = 1000 + thread index).
__global__ void shuffle_kernel(int* out) {
  const int t = threadIdx.x;
  const int v = 1000 + t;
  out[4 * t + 0] = __shfl_sync(0xFFFFFFFFu, v, 3);
  out[4 * t + 1] = __shfl_sync(0xFFFFFFFFu, v, 5, 8);
  out[4 * t + 2] = __shfl_down_sync(0xFFFFFFFFu, v, 3, 8);
  __syncwarp();
  out[4 * t + 3] = __shfl_xor_sync(0xFFFFFFFFu, v, 6, 8);
}

// Deliberately broken: half of the warp waits at __syncthreads, the other half at
// __syncwarp, so neither barrier completes. The emulation must fail the launch, not hang.
__global__ void deadlock_kernel() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

// Deliberately broken unless *flag is set before the launch: spins without a sync point.
__global__ void spin_kernel(volatile int* flag) {
  while (*flag == 0) {
  }
}

// out[i] = in[i + 1] within each block-sized tile, through static shared memory, for
// `tiles` tiles per block. `barriers` bit 0: __syncthreads between the stores and the
// loads (read after write), bit 1: between the loads and the next tile's stores (write
// after read). Without either, threads read a neighbour's slot before it is written or
// after it is overwritten.
__global__ void __launch_bounds__(64) neighbour_kernel(const float* in, float* out, int tiles,
                                                       int barriers) {
  __shared__ float tile[64];
  const int t = threadIdx.x, n = blockDim.x;
  for (int k = 0; k < tiles; ++k) {
    const int base = (blockIdx.x * tiles + k) * n;
    tile[t] = in[base + t];
    if (barriers & 1) __syncthreads();
    out[base + t] = tile[(t + 1) % n];
    if (barriers & 2) __syncthreads();
  }
}

// Only block 0 writes the shared slots (static and dynamic) that every block reads: the
// other blocks see whatever the block's shared memory held before.
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float fixed[32];
  PV_DYNAMIC_SHARED(float, dynamic);
  const int t = threadIdx.x;
  if (blockIdx.x == 0) {
    fixed[t] = 1.f;
    dynamic[t] = 2.f;
  }
  __syncthreads();
  out[2 * (blockIdx.x * blockDim.x + t)] = fixed[t];
  out[2 * (blockIdx.x * blockDim.x + t) + 1] = dynamic[t];
}

// Records the order in which the threads pass each of `phases` barrier phases.
__global__ void order_kernel(int* order, int* next, int phases) {
  const int threads = blockDim.x;
  for (int phase = 0; phase < phases; ++phase) {
    const int slot = blockIdx.x * phases + phase;
    order[slot * threads + atomicAdd(&next[slot], 1)] = threadIdx.x;
    __syncthreads();
  }
}

// Uses `extra` floats of static shared memory (none or 40 KB) and the launch's dynamic
// shared memory; the instance (Attribute) says whether the launcher raises its limit.
template <int Static, int Attribute>
__global__ void shared_budget_kernel(float* out) {
  __shared__ float fixed[Static];
  PV_DYNAMIC_SHARED(float, dynamic);
  fixed[threadIdx.x] = 1.f;
  dynamic[threadIdx.x] = 2.f;
  __syncthreads();
  out[threadIdx.x] = fixed[threadIdx.x] + dynamic[threadIdx.x];
}

__global__ void count_blocks_kernel(int* count) { atomicAdd(count, 1); }

__global__ void atomic_kernel(int* count, float* sum) {
  atomicAdd(count, 1);
  atomicAdd(sum, static_cast<float>(threadIdx.x));
}

__global__ void divmod_kernel(const unsigned* n, int count, pyvit::FastDivmod d, unsigned* q,
                              unsigned* r) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) q[i] = d.divmod(n[i], r[i]);
}

template <typename T>
__global__ void round_kernel(const float* in, int n, T* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = pyvit::from_float<T>(in[i]);
}

template <typename T>
__global__ void widen_kernel(const T* in, int n, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = pyvit::to_float(in[i]);
}

constexpr int kThreads = 256;

unsigned blocks_for(int n) { return static_cast<unsigned>(pyvit::ceil_div(n, kThreads)); }

}  // namespace

extern "C" {

int pv_block_sum(const float* in, int n, float* out, int blocks, int threads) {
  PV_LAUNCH(block_sum_kernel, dim3(blocks), dim3(threads), 0, nullptr, in, n, out);
  return cudaGetLastError();
}

int pv_reverse_rows(const float* in, int rows, int n, float* out) {
  constexpr unsigned kRowsPerBlock = 4;
  PV_LAUNCH(reverse_rows_kernel, dim3(rows / kRowsPerBlock), dim3(32, kRowsPerBlock),
            kRowsPerBlock * n * sizeof(float), nullptr, in, n, out);
  return cudaGetLastError();
}

int pv_shuffle(int* out, int threads) {
  PV_LAUNCH(shuffle_kernel, dim3(1), dim3(threads), 0, nullptr, out);
  return cudaGetLastError();
}

int pv_deadlock() {
  PV_LAUNCH(deadlock_kernel, dim3(1), dim3(32), 0, nullptr);
  return cudaGetLastError();
}

int pv_spin(volatile int* flag) {
  PV_LAUNCH(spin_kernel, dim3(1), dim3(1), 0, nullptr, flag);
  return cudaGetLastError();
}

int pv_neighbour(const float* in, float* out, int blocks, int threads, int tiles,
                 int barriers) {
  PV_LAUNCH(neighbour_kernel, dim3(blocks), dim3(threads), 0, nullptr, in, out, tiles,
            barriers);
  return cudaGetLastError();
}

int pv_unwritten_shared(float* out, int blocks) {
  PV_LAUNCH(unwritten_shared_kernel, dim3(blocks), dim3(32), 32 * sizeof(float), nullptr, out);
  return cudaGetLastError();
}

int pv_order(int* order, int* next, int blocks, int threads, int phases) {
  PV_LAUNCH(order_kernel, dim3(blocks), dim3(threads), 0, nullptr, order, next, phases);
  return cudaGetLastError();
}

// static_kb: 0 (32 floats) or 40; attribute < 0: the kernel's default limit, else the
// dynamic shared memory limit the launcher asks for first (its cudaError on failure).
int pv_shared_budget(float* out, int static_kb, int dynamic_bytes, int attribute) {
  const auto launch = [&](auto kernel) {
    if (attribute >= 0) {
      const cudaError_t error =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, attribute);
      if (error != cudaSuccess) return static_cast<int>(cudaGetLastError());
    }
    PV_LAUNCH(kernel, dim3(1), dim3(32), static_cast<std::size_t>(dynamic_bytes), nullptr, out);
    return static_cast<int>(cudaGetLastError());
  };
  if (static_kb == 40) {
    return attribute < 0 ? launch(shared_budget_kernel<10240, 0>)
                         : launch(shared_budget_kernel<10240, 1>);
  }
  return attribute < 0 ? launch(shared_budget_kernel<32, 0>) : launch(shared_budget_kernel<32, 1>);
}

int pv_count_blocks(int* count, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                    unsigned bz) {
  PV_LAUNCH(count_blocks_kernel, dim3(gx, gy, gz), dim3(bx, 1, bz), 0, nullptr, count);
  return cudaGetLastError();
}

int pv_atomic(int* count, float* sum, int blocks, int threads) {
  PV_LAUNCH(atomic_kernel, dim3(blocks), dim3(threads), 0, nullptr, count, sum);
  return cudaGetLastError();
}

int pv_divmod(const unsigned* n, int count, unsigned d, unsigned* q, unsigned* r) {
  PV_LAUNCH(divmod_kernel, dim3(blocks_for(count)), dim3(kThreads), 0, nullptr, n, count,
            pyvit::FastDivmod(d), q, r);
  return cudaGetLastError();
}

// dtype: 0 = float16, 1 = bfloat16; `rounded` / `bits` hold the 16-bit patterns.
int pv_round(const float* in, int n, void* rounded, int dtype) {
  if (dtype == 0) {
    PV_LAUNCH((round_kernel<__half>), dim3(blocks_for(n)), dim3(kThreads), 0, nullptr, in, n,
              static_cast<__half*>(rounded));
  } else {
    PV_LAUNCH((round_kernel<__nv_bfloat16>), dim3(blocks_for(n)), dim3(kThreads), 0, nullptr,
              in, n, static_cast<__nv_bfloat16*>(rounded));
  }
  return cudaGetLastError();
}

int pv_widen(const void* bits, int n, float* out, int dtype) {
  if (dtype == 0) {
    PV_LAUNCH((widen_kernel<__half>), dim3(blocks_for(n)), dim3(kThreads), 0, nullptr,
              static_cast<const __half*>(bits), n, out);
  } else {
    PV_LAUNCH((widen_kernel<__nv_bfloat16>), dim3(blocks_for(n)), dim3(kThreads), 0, nullptr,
              static_cast<const __nv_bfloat16*>(bits), n, out);
  }
  return cudaGetLastError();
}

}  // extern "C"
