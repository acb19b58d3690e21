// Self-test kernels for csrc/host_emulation.h and csrc/common.cuh.
// tests/test_host_emulation.py compiles this file with g++ -DPYVIT_HOST_EMULATION into a
// shared library, calls the extern "C" wrappers through ctypes on host buffers and checks
// the results with numpy; it also compiles it with nvcc to show that the same source
// builds for the GPU. Each wrapper returns the launch's cudaError_t.
#include "common.cuh"
#include "mma.cuh"

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

// ---- tensor cores (mma.cuh) -------------------------------------------------------------

// One mma on raw registers: lane l's A registers at a[4l..4l+3], B at b[2l..2l+1], C at
// c[4l..4l+3], D to d[4l..4l+3]. Lane `absent` returns before the mma and lane `diverged`
// waits at __syncwarp instead (-1: none), so that they do not take part.
template <typename T>
__global__ void mma_registers_kernel(const std::uint32_t* a, const std::uint32_t* b,
                                     const float* c, float* d, int absent, int diverged) {
  const int lane = pyvit::mma::lane_id();
  if (lane == absent) return;
  pyvit::mma::FragA<T> fa;
  pyvit::mma::FragB<T> fb;
  pyvit::mma::FragC fc;
  for (int r = 0; r < 4; ++r) fa.reg[r] = a[4 * lane + r];
  for (int r = 0; r < 2; ++r) fb.reg[r] = b[2 * lane + r];
  for (int r = 0; r < 4; ++r) fc.reg[r] = c[4 * lane + r];
  if (lane == diverged) {
    __syncwarp();
  } else {
    pyvit::mma::mma(fc, fa, fb, fc);
  }
  for (int r = 0; r < 4; ++r) d[4 * lane + r] = fc.reg[r];
}

// (row, column) of every fragment element of every lane by mma.cuh's coordinates:
// coords[lane][0..7] for A, [8..11] for B (k, n), [12..15] for C, two ints each.
__global__ void mma_coords_kernel(int* coords) {
  const int lane = pyvit::mma::lane_id();
  int* out = coords + 32 * lane;
  for (int e = 0; e < 8; ++e) {
    const pyvit::mma::Coord p = pyvit::mma::a_coord(lane, e);
    out[2 * e] = p.row;
    out[2 * e + 1] = p.col;
  }
  for (int e = 0; e < 4; ++e) {
    const pyvit::mma::Coord pb = pyvit::mma::b_coord(lane, e);
    const pyvit::mma::Coord pc = pyvit::mma::c_coord(lane, e);
    out[16 + 2 * e] = pb.row;
    out[16 + 2 * e + 1] = pb.col;
    out[24 + 2 * e] = pc.row;
    out[24 + 2 * e + 1] = pc.col;
  }
}

// Layout bugs a test plants to show that the comparison catches them.
enum MmaBug { kNoBug = 0, kSwapA = 1, kSwapB = 2, kSwapD = 3 };

template <typename R>
__device__ void swap_registers(R& x, R& y) {
  const R t = x;
  x = y;
  y = t;
}

// D = A * B + C per warp: warp w multiplies A[w] (16x16, row-major) by B[w] (16x8; stored
// n-major, element (k, n) at b[n * 16 + k], or k-major at b[k * 8 + n]) and adds C[w]
// (16x8 fp32). `via_ldmatrix`: A and B go through shared memory (rows padded to 24
// elements) and ldmatrix; else they load from global memory by the lane mapping.
template <typename T>
__global__ void mma_tile_kernel(const T* a, const T* b, const float* c, float* d,
                                bool b_k_major, bool via_ldmatrix, int bug) {
  namespace mma = pyvit::mma;
  constexpr int kLd = 24;
  const int warp = threadIdx.x / 32, lane = mma::lane_id();
  a += warp * 16 * 16;
  b += warp * 16 * 8;
  mma::FragA<T> fa;
  mma::FragB<T> fb;
  mma::FragC fc;
  if (via_ldmatrix) {
    PV_DYNAMIC_SHARED(T, smem);
    T* sa = smem + warp * 32 * kLd;  // A: 16 rows; B: 8 (n-major) or 16 (k-major) rows
    T* sb = sa + 16 * kLd;
    for (int i = lane; i < 16 * 16; i += 32) sa[i / 16 * kLd + i % 16] = a[i];
    const int b_cols = b_k_major ? 8 : 16;
    for (int i = lane; i < 16 * 8; i += 32) sb[i / b_cols * kLd + i % b_cols] = b[i];
    __syncwarp();
    mma::ldmatrix_a(fa, sa, kLd);
    if (b_k_major) {
      mma::ldmatrix_b_row(fb, sb, kLd);
    } else {
      mma::ldmatrix_b_col(fb, sb, kLd);
    }
  } else {
    mma::load_a(fa, a, 16);
    if (b_k_major) {
      mma::load_b_row(fb, b, 8);
    } else {
      mma::load_b_col(fb, b, 16);
    }
  }
  mma::load_c(fc, c + warp * 16 * 8, 8);
  if (bug == kSwapA) swap_registers(fa.reg[1], fa.reg[2]);  // rows + 8 taken for columns + 8
  if (bug == kSwapB) swap_registers(fb.reg[0], fb.reg[1]);  // k 0-7 taken for k 8-15
  mma::mma(fc, fa, fb, fc);
  if (bug == kSwapD) swap_registers(fc.reg[1], fc.reg[2]);  // (row, column) pairs crossed
  mma::store_c(fc, d + warp * 16 * 8, 8);
}

// Row maxima of a 16x8 fp32 tile held as a C fragment: each lane reduces its own two
// columns of its two rows, then its group's four lanes, which hold the same rows, combine.
__global__ void mma_row_max_kernel(const float* c, float* row_max) {
  namespace mma = pyvit::mma;
  const int lane = mma::lane_id();
  mma::FragC fc;
  mma::load_c(fc, c, 8);
  const auto maximum = [](float x, float y) { return max(x, y); };
  const float top = mma::group_reduce(max(fc.reg[0], fc.reg[1]), maximum);
  const float bottom = mma::group_reduce(max(fc.reg[2], fc.reg[3]), maximum);
  if (mma::thread_in_group(lane) == 0) {
    row_max[mma::c_coord(lane, 0).row] = top;
    row_max[mma::c_coord(lane, 2).row] = bottom;
  }
}

// D = round_T(A * B1) * B2 with the 16x16 product kept in registers: two mma give its
// column halves as C fragments, a_from_c turns them into the next mma's A. B1 (16x16) and
// B2 (16x8) are stored n-major.
template <typename T>
__global__ void mma_chain_kernel(const T* a, const T* b1, const T* b2, float* d) {
  namespace mma = pyvit::mma;
  mma::FragA<T> fa;
  mma::FragB<T> lo_b, hi_b, fb2;
  mma::load_a(fa, a, 16);
  mma::load_b_col(lo_b, b1, 16);
  mma::load_b_col(hi_b, b1 + 8 * 16, 16);
  mma::load_b_col(fb2, b2, 16);
  mma::FragC lo, hi, out;
  mma::fill(lo, 0.f);
  mma::fill(hi, 0.f);
  mma::fill(out, 0.f);
  mma::mma(lo, fa, lo_b, lo);
  mma::mma(hi, fa, hi_b, hi);
  mma::mma(out, mma::a_from_c<T>(lo, hi), fb2, out);
  mma::store_c(out, d, 8);
}

// ldmatrix with a row address that is misaligned (`fault` 1) or in global memory (2).
__global__ void ldmatrix_fault_kernel(const __half* global, float* out, int fault) {
  PV_DYNAMIC_SHARED(__half, smem);
  const int lane = pyvit::mma::lane_id();
  for (int i = lane; i < 16 * 16; i += 32) smem[i] = global[i];
  __syncwarp();
  const __half* tile = fault == 1 ? smem + 1 : fault == 2 ? global : smem;
  pyvit::mma::FragA<__half> fa;
  pyvit::mma::ldmatrix_a(fa, tile, 16);
  out[lane] = pyvit::to_float(__ushort_as_half(static_cast<unsigned short>(fa.reg[0])));
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

// dtype: 0 = float16, 1 = bfloat16 below; the matrices hold 16-bit patterns.
int pv_mma_registers(const std::uint32_t* a, const std::uint32_t* b, const float* c, float* d,
                     int dtype, int absent, int diverged) {
  if (dtype == 0) {
    PV_LAUNCH(mma_registers_kernel<__half>, dim3(1), dim3(32), 0, nullptr, a, b, c, d, absent,
              diverged);
  } else {
    PV_LAUNCH(mma_registers_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, nullptr, a, b, c, d,
              absent, diverged);
  }
  return cudaGetLastError();
}

int pv_mma_coords(int* coords) {
  PV_LAUNCH(mma_coords_kernel, dim3(1), dim3(32), 0, nullptr, coords);
  return cudaGetLastError();
}

int pv_mma_tile(const void* a, const void* b, const float* c, float* d, int warps, int dtype,
                int b_k_major, int via_ldmatrix, int bug) {
  const std::size_t smem = via_ldmatrix ? warps * 32 * 24 * sizeof(__half) : 0;
  if (dtype == 0) {
    PV_LAUNCH(mma_tile_kernel<__half>, dim3(1), dim3(32 * warps), smem, nullptr,
              static_cast<const __half*>(a), static_cast<const __half*>(b), c, d,
              b_k_major != 0, via_ldmatrix != 0, bug);
  } else {
    PV_LAUNCH(mma_tile_kernel<__nv_bfloat16>, dim3(1), dim3(32 * warps), smem, nullptr,
              static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b), c, d,
              b_k_major != 0, via_ldmatrix != 0, bug);
  }
  return cudaGetLastError();
}

int pv_mma_row_max(const float* c, float* row_max) {
  PV_LAUNCH(mma_row_max_kernel, dim3(1), dim3(32), 0, nullptr, c, row_max);
  return cudaGetLastError();
}

int pv_mma_chain(const void* a, const void* b1, const void* b2, float* d, int dtype) {
  if (dtype == 0) {
    PV_LAUNCH(mma_chain_kernel<__half>, dim3(1), dim3(32), 0, nullptr,
              static_cast<const __half*>(a), static_cast<const __half*>(b1),
              static_cast<const __half*>(b2), d);
  } else {
    PV_LAUNCH(mma_chain_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, nullptr,
              static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b1),
              static_cast<const __nv_bfloat16*>(b2), d);
  }
  return cudaGetLastError();
}

int pv_ldmatrix_fault(const void* global, float* out, int fault) {
  PV_LAUNCH(ldmatrix_fault_kernel, dim3(1), dim3(32), 16 * 16 * sizeof(__half), nullptr,
            static_cast<const __half*>(global), out, fault);
  return cudaGetLastError();
}

}  // extern "C"
