// Host emulation of the CUDA execution model, for the test build only (VERIFY.md §4b).
//
// Compiled by g++ -std=c++20 without the CUDA toolkit, it lets the unmodified kernel
// source run on CPU tensors: a launch runs the grid's blocks one after another and the
// threads of a block as std::threads, so __syncthreads(), __shared__ memory and warp
// shuffles behave as on the GPU. Kernels must stay plain CUDA C++ (no inline PTX, no
// tensor-core intrinsics) and declare dynamic shared memory with PV_DYNAMIC_SHARED
// (common.cuh). Launches are serialised process-wide; it is a test harness, not a
// fast CPU backend.
#pragma once

#ifdef __CUDACC__
#error "host_emulation.h is for the g++ test build; nvcc builds use the CUDA headers"
#endif

#include <math.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <barrier>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- qualifiers ----------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One instance per kernel instantiation, seen by every thread of the running block.
// Blocks run one at a time, so it really is per-block storage; CUDA forbids
// initialisers on __shared__ variables, so no static-init guard is involved.
#define __shared__ static

// ---- built-in variables and runtime types --------------------------------------------
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchTimeout = 702,
};
using cudaError_t = cudaError;

namespace pyvit_host::detail {
inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}
}  // namespace pyvit_host::detail

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = pyvit_host::detail::last_error();
  pyvit_host::detail::last_error() = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (host emulation)";
    case cudaErrorLaunchTimeout:
      return "the launch timed out and was terminated (host emulation: no block finished "
             "within PYVIT_HOST_EMULATION_TIMEOUT seconds; details on stderr)";
  }
  return "unknown error (host emulation)";
}

// ---- fp16 / bf16 -----------------------------------------------------------------------
// Raw bit containers with the layout of the CUDA types; kernels only convert them to and
// from float, rounding to nearest even. A NaN becomes the quiet NaN of torch's scalar
// conversions (fp16: sign | 0x7E00, bf16: 0x7FC0); payloads differ between CPU paths and
// the GPU anyway, so tests compare NaN-ness only.
struct __half {
  std::uint16_t __x;
};
struct __nv_bfloat16 {
  std::uint16_t __x;
};

inline float __half2float(__half h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.__x & 0x8000u) << 16;
  const std::uint32_t exponent = (h.__x >> 10) & 0x1Fu;
  const std::uint32_t mantissa = h.__x & 0x3FFu;
  if (exponent == 0x1F) {  // inf / nan
    return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  }
  if (exponent == 0) {  // zero / subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

namespace pyvit_host::detail {
// Round-to-nearest-even of an integer significand shifted right by `shift` (1..31).
inline std::uint32_t round_shift_rne(std::uint32_t value, unsigned shift) {
  const std::uint32_t kept = value >> shift;
  const std::uint32_t rest = value & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}
}  // namespace pyvit_host::detail

inline __half __float2half_rn(float f) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  std::uint32_t out;
  if (magnitude > 0x7F800000u) {
    out = 0x7E00u;
  } else if (magnitude >= 0x477FF000u) {  // >= 65520 rounds past the largest half
    out = 0x7C00u;
  } else if (magnitude >= 0x38800000u) {  // normal half: rebias exponent, drop 13 bits
    out = pyvit_host::detail::round_shift_rne(magnitude - (112u << 23), 13);
  } else {  // subnormal half, in units of 2^-24
    const std::uint32_t exponent = magnitude >> 23;
    const unsigned shift = 126u - exponent;  // exponent < 113 here, so shift >= 14
    const std::uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
    out = shift > 24 ? 0u : pyvit_host::detail::round_shift_rne(significand, shift);
  }
  return __half{static_cast<std::uint16_t>(sign | out)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b.__x) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  if (std::isnan(f)) return __nv_bfloat16{0x7FC0};
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
  return __nv_bfloat16{static_cast<std::uint16_t>(rounded >> 16)};
}

// ---- math intrinsics -------------------------------------------------------------------
// CUDA's device min/max: same-type overloads only (mixed types are a compile error here,
// which catches signed/unsigned mix-ups that nvcc would silently promote).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<std::uint64_t>(a) * b) >> 32);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

// ---- block execution -------------------------------------------------------------------
namespace pyvit_host {
namespace detail {

struct Warp {
  std::optional<std::barrier<>> sync;
  std::array<std::uint64_t, 32> lanes{};  // shuffle exchange slots
};

// State shared by the threads of the block being run.
class Block {
 public:
  Block(dim3 grid, dim3 block, std::size_t dynamic_smem_bytes)
      : grid_(grid),
        block_(block),
        threads_(block.x * block.y * block.z),
        warps_(std::make_unique<Warp[]>((threads_ + 31) / 32)),
        smem_((dynamic_smem_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t)),
        block_end_(threads_, NextBlock{this}) {
    reset_barriers();
  }

  unsigned threads() const { return threads_; }
  std::uint64_t finished_blocks() const { return finished_.load(); }
  void* dynamic_smem() { return smem_.data(); }
  void syncthreads() { sync_->arrive_and_wait(); }
  Warp& warp(unsigned tid) { return warps_[tid / 32]; }
  unsigned warp_size(unsigned tid) const { return min(32u, threads_ - tid / 32 * 32); }

  template <typename Call>
  void run_thread(unsigned tid, const Call& call);

 private:
  struct NextBlock {
    Block* block;
    void operator()() noexcept {
      ++block->finished_;
      block->reset_barriers();
    }
  };

  // Threads that returned from the kernel drop out of the barriers (as exited GPU
  // threads stop counting), so every block starts with fresh ones.
  void reset_barriers() noexcept {
    sync_.emplace(threads_);
    for (unsigned w = 0; w * 32 < threads_; ++w) warps_[w].sync.emplace(warp_size(w * 32));
  }

  dim3 grid_, block_;
  unsigned threads_;
  std::unique_ptr<Warp[]> warps_;
  std::vector<std::max_align_t> smem_;
  std::optional<std::barrier<>> sync_;
  std::barrier<NextBlock> block_end_;
  std::atomic<std::uint64_t> finished_{0};
};

inline thread_local Block* current_block = nullptr;
inline thread_local unsigned current_tid = 0;

template <typename Call>
void Block::run_thread(unsigned tid, const Call& call) {
  current_block = this;
  current_tid = tid;
  threadIdx = uint3{tid % block_.x, tid / block_.x % block_.y, tid / (block_.x * block_.y)};
  blockDim = block_;
  gridDim = grid_;
  const std::uint64_t blocks = std::uint64_t{grid_.x} * grid_.y * grid_.z;
  for (std::uint64_t b = 0; b < blocks; ++b) {
    blockIdx = uint3{static_cast<unsigned>(b % grid_.x),
                     static_cast<unsigned>(b / grid_.x % grid_.y),
                     static_cast<unsigned>(b / (std::uint64_t{grid_.x} * grid_.y))};
    call();
    sync_->arrive_and_drop();
    warp(tid).sync->arrive_and_drop();
    block_end_.arrive_and_wait();
  }
  current_block = nullptr;
}

// Worker threads kept across launches: starting up to 1024 threads per launch would
// dominate the run time of small test launches. Workers 0..n-1 run job(worker) for one
// launch; launches are serialised by the caller.
class WorkerPool {
 public:
  // The process's pool. Leaked on purpose: idle workers block on a condition variable
  // and must not be joined during static destruction. A forked child, or the first
  // launch after a stalled one, gets a fresh pool.
  static WorkerPool& instance() {
    if (current() == nullptr || owner() != getpid()) {
      current() = new WorkerPool;
      owner() = getpid();
    }
    return *current();
  }

  // Runs job(0..n-1) on the workers, polling stalled() about once a second. If it says
  // so, the pool is abandoned with its stuck workers and run() returns false.
  template <typename Job, typename Stalled>
  bool run(unsigned n, const Job& job, Stalled stalled) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < n) {
      const unsigned id = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, id] { work(id); });
    }
    job_ = [&job](unsigned id) { job(id); };
    active_ = n;
    pending_ = n;
    ++generation_;
    wake_.notify_all();
    while (!done_.wait_for(lock, std::chrono::seconds(1), [this] { return pending_ == 0; })) {
      if (stalled()) {
        current() = nullptr;
        return false;
      }
    }
    job_ = nullptr;
    return true;
  }

 private:
  static WorkerPool*& current() {
    static WorkerPool* pool = nullptr;
    return pool;
  }
  static pid_t& owner() {
    static pid_t pid = 0;
    return pid;
  }

  void work(unsigned id) {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;
      lock.unlock();
      job_(id);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  std::function<void(unsigned)> job_;
  std::uint64_t generation_ = 0;
  unsigned active_ = 0, pending_ = 0;
};

inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

// A kernel bug such as a __syncthreads() that some live thread never reaches would hang
// the emulation (on the GPU it is undefined behaviour). The launch fails instead, with
// cudaErrorLaunchTimeout, once no block has finished for PYVIT_HOST_EMULATION_TIMEOUT
// seconds (default 120); operator() says whether that happened, explaining on stderr.
class StallWatchdog {
 public:
  StallWatchdog(const Block& block, dim3 grid, dim3 threads)
      : block_(block), grid_(grid), threads_(threads), last_change_(Clock::now()) {
    const char* env = std::getenv("PYVIT_HOST_EMULATION_TIMEOUT");
    timeout_ = std::chrono::seconds(env ? std::atoi(env) : 120);
  }

  bool operator()() {
    const std::uint64_t finished = block_.finished_blocks();
    if (finished != seen_) {
      seen_ = finished;
      last_change_ = Clock::now();
      return false;
    }
    if (Clock::now() - last_change_ <= timeout_) return false;
    std::fprintf(stderr,
                 "pyvit host emulation: block %llu of grid (%u, %u, %u) x block (%u, %u, %u) "
                 "made no progress for %lld s: a thread never reaches a __syncthreads() or "
                 "shuffle that the others wait at, or the kernel loops forever. The launch "
                 "is abandoned (its threads stay blocked) and fails.\n",
                 static_cast<unsigned long long>(finished), grid_.x, grid_.y, grid_.z,
                 threads_.x, threads_.y, threads_.z, static_cast<long long>(timeout_.count()));
    return true;
  }

 private:
  using Clock = std::chrono::steady_clock;
  const Block& block_;
  dim3 grid_, threads_;
  std::chrono::seconds timeout_;
  std::uint64_t seen_ = 0;
  Clock::time_point last_change_;
};

inline bool valid_config(dim3 grid, dim3 block) {
  const std::uint64_t threads = std::uint64_t{block.x} * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 &&
         grid.x <= 0x7FFFFFFFu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
         grid.z <= 65535;
}

// Value of `value` from lane src_lane(lane) of the calling warp (own value when the
// source lane does not exist).
template <typename T, typename SrcLane>
T warp_exchange(T value, SrcLane src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "shuffles move trivially copyable values of at most 8 bytes");
  Block& block = *current_block;
  Warp& warp = block.warp(current_tid);
  const unsigned lane = current_tid % 32;
  std::memcpy(&warp.lanes[lane], &value, sizeof(T));
  warp.sync->arrive_and_wait();
  const unsigned src = src_lane(lane);
  T out = value;
  if (src < block.warp_size(current_tid)) std::memcpy(&out, &warp.lanes[src], sizeof(T));
  warp.sync->arrive_and_wait();  // no lane overwrites its slot before every lane has read
  return out;
}

}  // namespace detail

inline void* dynamic_shared_memory() { return detail::current_block->dynamic_smem(); }

// kernel<<<grid, block, smem>>>(args...) on the host; see PV_LAUNCH in common.cuh.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t dynamic_smem_bytes,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  if (!detail::valid_config(grid, block)) {
    detail::last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const std::lock_guard<std::mutex> lock(detail::launch_mutex());
  // Arguments are converted once, as a launch copies them into the parameter space.
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  // On the heap: after a stall the stuck threads still use it, so it is leaked then.
  auto state = std::make_unique<detail::Block>(grid, block, dynamic_smem_bytes);
  detail::Block* running = state.get();
  const auto call = [&] { std::apply(kernel, params); };
  const bool finished = detail::WorkerPool::instance().run(
      running->threads(), [&](unsigned tid) { running->run_thread(tid, call); },
      detail::StallWatchdog(*running, grid, block));
  if (!finished) {
    static_cast<void>(state.release());
    detail::last_error() = cudaErrorLaunchTimeout;
  }
}

}  // namespace pyvit_host

inline void __syncthreads() { pyvit_host::detail::current_block->syncthreads(); }

inline void __syncwarp(unsigned /*mask*/ = 0xFFFFFFFFu) {
  auto& warp = pyvit_host::detail::current_block->warp(pyvit_host::detail::current_tid);
  warp.sync->arrive_and_wait();
}

// Shuffles: `mask` is not modelled (every live lane of the warp must take part, as the
// kernels' full-warp masks promise); `width` splits the warp into segments as on the GPU.
template <typename T>
T __shfl_sync(unsigned /*mask*/, T value, int src_lane, int width = warpSize) {
  const unsigned w = static_cast<unsigned>(width);
  return pyvit_host::detail::warp_exchange(value, [&](unsigned lane) {
    return (lane & ~(w - 1)) + static_cast<unsigned>(src_lane) % w;
  });
}

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, unsigned delta, int width = warpSize) {
  const unsigned w = static_cast<unsigned>(width);
  return pyvit_host::detail::warp_exchange(
      value, [&](unsigned lane) { return lane % w + delta < w ? lane + delta : lane; });
}

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask, int width = warpSize) {
  const unsigned w = static_cast<unsigned>(width);
  return pyvit_host::detail::warp_exchange(value, [&](unsigned lane) {
    // A lane may read from its own or an earlier segment, never a later one.
    const unsigned src = lane ^ static_cast<unsigned>(lane_mask);
    return src < (lane & ~(w - 1)) + w ? src : lane;
  });
}
