// Host emulation of the CUDA execution model, for the test build only.
//
// Compiled by g++ -std=c++20 without the CUDA toolkit, it lets the unmodified kernel
// source run on CPU tensors, and makes the kernel bugs that a GPU shows only sometimes
// show on every run:
// - the blocks of a grid run one after another, the threads of a block as fibers on one
//   worker thread, one thread at a time: a thread runs alone until it reaches
//   __syncthreads(), a warp collective (shuffle, __syncwarp, mma, ldmatrix) or its end,
//   then hands over. Each barrier phase of a block runs its threads in an order chosen from the
//   block and phase index (forward, reverse, random from PYVIT_HOST_EMULATION_SEED), so
//   a missing barrier makes a thread read data a later or an earlier thread has not yet
//   written (or already overwritten) in every launch of two or more blocks or phases.
//   A barrier or warp collective that the threads can never complete fails the launch;
// - shared memory, static and dynamic, is filled with 0xFF bytes (a NaN in any float
//   type) at the start of every block, and a shuffle from a lane that does not take part
//   returns the same garbage;
// - launches are checked as the GPU checks them: block and grid sizes, the block size
//   against the kernel's __launch_bounds__, the shared memory (static and dynamic)
//   against the kernel's limit: 48 KB unless cudaFuncSetAttribute raised it, at most
//   PYVIT_HOST_EMULATION_SMEM_KB (default 163: an A100).
// host.py compiles kernel files with statements added (PV_HOST_LAUNCH_BOUNDS,
// PV_HOST_SHARED) that make the kernel's launch bounds and static shared variables
// known to the emulation.
// - warp-level tensor-core instructions are warp collectives like the shuffles, modelled
//   from the PTX ISA's fragment layouts (csrc/mma.cuh is the kernels' interface):
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} gathers A, B and C from the
//   registers of the 32 lanes, computes D = A * B + C with exact products and one fp32
//   rounding per addition (C first, then k = 0..15), and scatters D back;
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16 reads the rows the lanes
//   point at when the last lane arrives, checking that every row address is in the
//   block's shared memory and 16-byte aligned. A lane that does not take part (exited,
//   or at another collective) contributes poison, as a shuffle from it returns;
// - 32-bit fragment loads from global or shared memory fail the launch when misaligned.
// Kernels use no other inline PTX or intrinsics than those csrc/mma.cuh wraps, and
// declare dynamic shared memory with PV_DYNAMIC_SHARED (common.cuh). Launches are
// serialised process-wide; it is a test harness, not a fast CPU backend.
#pragma once

#ifdef __CUDACC__
#error "host_emulation.h is for the g++ test build; nvcc builds use the CUDA headers"
#endif

#include <math.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers ----------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// The bound is checked by PV_HOST_LAUNCH_BOUNDS, which host.py inserts at the start of
// the body of every kernel declared with __launch_bounds__.
#define __launch_bounds__(...)
#define PV_HOST_LAUNCH_BOUNDS(...) ::pyvit_host::detail::check_launch_bounds(__VA_ARGS__)
// One instance per kernel instantiation, seen by every thread of the running block
// (blocks run one at a time, so it really is per-block storage); CUDA forbids
// initialisers on __shared__ variables, so no static-init guard is involved. host.py
// follows every declaration with PV_HOST_SHARED(names...), which poisons them once per
// block and counts their bytes.
#define __shared__ static
#define PV_HOST_SHARED(...) ::pyvit_host::detail::shared_variables(__VA_ARGS__)

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
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchTimeout = 702,
  cudaErrorMisalignedAddress = 716,
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
    case cudaErrorInvalidValue:
      return "invalid argument (host emulation: e.g. more dynamic shared memory than the "
             "kernel may use; details on stderr)";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (host emulation)";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered (host emulation: e.g. ldmatrix "
             "outside shared memory; details on stderr)";
    case cudaErrorMisalignedAddress:
      return "misaligned address (host emulation; details on stderr)";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch (host emulation: the block is "
             "larger than the kernel's __launch_bounds__; details on stderr)";
    case cudaErrorLaunchTimeout:
      return "the launch timed out and was terminated (host emulation: the block "
             "deadlocks, or makes no progress within PYVIT_HOST_EMULATION_TIMEOUT "
             "seconds; details on stderr)";
  }
  return "unknown error (host emulation)";
}

// ---- device properties -------------------------------------------------------------------
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace pyvit_host {

// Integer parameter of the emulation from the environment, read at every use so that
// tests can change it between launches.
inline long env_parameter(const char* name, long fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atol(value) : fallback;
}

// A constant that the test build shrinks so that small tests reach the code paths of big
// problems: `emulated`, or `gpu` when PYVIT_HOST_EMULATION_GPU_CONSTANTS=1.
template <typename T>
T test_constant(T emulated, T gpu) {
  return env_parameter("PYVIT_HOST_EMULATION_GPU_CONSTANTS", 0) != 0 ? gpu : emulated;
}

namespace detail {
constexpr std::size_t kDefaultSharedBytes = 48 * 1024;

// The opt-in shared memory per block of the emulated GPU (sm_86/89: 99 KB, sm_80: 163 KB,
// sm_90: 227 KB).
inline std::size_t optin_shared_bytes() {
  return static_cast<std::size_t>(env_parameter("PYVIT_HOST_EMULATION_SMEM_KB", 163)) * 1024;
}

// Per-kernel cudaFuncAttributeMaxDynamicSharedMemorySize, when set.
inline std::mutex& attribute_mutex() {
  static std::mutex mutex;
  return mutex;
}
inline std::map<const void*, std::size_t>& dynamic_shared_limits() {
  static std::map<const void*, std::size_t> limits;
  return limits;
}
// (dynamic, static + dynamic) shared memory bytes a block of `kernel` may use: the
// attribute bounds the dynamic part, which cudaFuncSetAttribute bounds by the opt-in
// size less the static part; by default both share 48 KB.
inline std::pair<std::size_t, std::size_t> shared_limits(const void* kernel) {
  const std::lock_guard<std::mutex> lock(attribute_mutex());
  const auto it = dynamic_shared_limits().find(kernel);
  if (it == dynamic_shared_limits().end()) return {kDefaultSharedBytes, kDefaultSharedBytes};
  return {it->second, optin_shared_bytes()};
}
}  // namespace detail
}  // namespace pyvit_host

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return pyvit_host::detail::last_error() = cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(pyvit_host::detail::kDefaultSharedBytes);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(pyvit_host::detail::optin_shared_bytes());
      return cudaSuccess;
  }
  return pyvit_host::detail::last_error() = cudaErrorInvalidValue;
}

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  using namespace pyvit_host::detail;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<std::size_t>(value) > optin_shared_bytes()) {
    std::fprintf(stderr,
                 "pyvit host emulation: cudaFuncSetAttribute: expected a dynamic shared "
                 "memory size of at most %zu bytes (PYVIT_HOST_EMULATION_SMEM_KB), got %d\n",
                 optin_shared_bytes(), value);
    return last_error() = cudaErrorInvalidValue;
  }
  const std::lock_guard<std::mutex> lock(attribute_mutex());
  dynamic_shared_limits()[reinterpret_cast<const void*>(kernel)] =
      static_cast<std::size_t>(value);
  return cudaSuccess;
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

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }

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

// Fibers: the threads of a block run on stacks of their own, switched in user space (a
// system call per switch, as swapcontext makes, would dominate the run time).
// pv_host_fiber_switch saves the callee-saved registers on the current stack, stores
// the stack pointer to *save and continues on the stack `load` (x86-64 System V).
#ifndef __x86_64__
#error "host_emulation.h switches fibers with x86-64 assembly"
#endif
extern "C" __attribute__((visibility("hidden"))) void pv_host_fiber_switch(void** save,
                                                                           void* load);
asm(R"(
  .text
  .p2align 4
  .weak pv_host_fiber_switch
  .hidden pv_host_fiber_switch
  .type pv_host_fiber_switch, @function
pv_host_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pv_host_fiber_switch, .-pv_host_fiber_switch
)");

// A fiber stack with a guard page below it: an overflow faults instead of corrupting.
class Stack {
 public:
  static constexpr std::size_t kBytes = 256 * 1024, kGuard = 4096;

  Stack() {
    void* base = mmap(nullptr, kBytes + kGuard, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED || mprotect(base, kGuard, PROT_NONE) != 0) {
      std::perror("pyvit host emulation: fiber stack");
      std::abort();
    }
    base_ = static_cast<char*>(base);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base_, kBytes + kGuard); }

  // Stack pointer that pv_host_fiber_switch "returns" from into entry(), which must not
  // return: zeroed registers, entry's address, then a null return address for entry,
  // which starts with the stack aligned as after a call.
  void* start(void (*entry)()) {
    auto* top = reinterpret_cast<std::uintptr_t*>(base_ + kGuard + kBytes);
    top[-1] = 0;
    top[-2] = reinterpret_cast<std::uintptr_t>(entry);
    for (int r = 3; r <= 8; ++r) top[-r] = 0;
    return top - 8;
  }

 private:
  char* base_;
};

constexpr unsigned char kPoison = 0xFF;  // NaN in fp32 / fp16 / bf16, -1 as an integer

inline std::uint64_t mix(std::uint64_t x) {  // splitmix64 finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A warp collective other than a shuffle: called once the warp completes, with the data
// of each lane waiting at the same operation (nullptr for the other lanes).
using WarpOp = void (*)(const std::array<void*, 32>& lanes);

struct Warp {
  unsigned live = 0, arrived = 0;  // lanes not exited / waiting at a warp collective
  std::array<std::uint64_t, 32> in, out;
  std::array<unsigned, 32> src;  // lane each waiting lane reads from
  std::array<WarpOp, 32> op;     // nullptr: a shuffle or __syncwarp
  std::array<void*, 32> data;
};

// One launch: runs the grid's blocks, the block's threads as fibers (on the calling
// thread), and is what the kernel's __syncthreads / warp collectives talk to.
class Launch {
 public:
  Launch(dim3 grid, dim3 block, std::size_t dynamic_smem_bytes, std::size_t shared_limit,
         void (*invoke)(const void*), const void* kernel_call,
         std::vector<std::unique_ptr<Stack>>& stacks)
      : grid_(grid),
        block_(block),
        threads_(block.x * block.y * block.z),
        invoke_(invoke),
        kernel_call_(kernel_call),
        seed_(static_cast<std::uint64_t>(env_parameter("PYVIT_HOST_EMULATION_SEED", 0))),
        smem_bytes_(dynamic_smem_bytes),
        shared_limit_(shared_limit),
        smem_((dynamic_smem_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t)),
        state_(threads_),
        sp_(threads_),
        index_(threads_),
        order_(threads_),
        warps_((threads_ + 31) / 32),
        stacks_(stacks) {
    while (stacks_.size() < threads_) stacks_.push_back(std::make_unique<Stack>());
    for (unsigned t = 0; t < threads_; ++t) {
      index_[t] = uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
    }
  }

  // Runs every block; error() is then cudaSuccess or what stopped the launch.
  void run();
  cudaError_t error() const { return error_; }
  // Sync points passed so far: the watchdog's measure of progress.
  std::uint64_t progress() const { return progress_.load(std::memory_order_relaxed); }

  // Called by the running thread.
  void* dynamic_smem() { return smem_.data(); }
  void shared_variable(void* address, std::size_t bytes);
  void syncthreads();
  std::uint64_t warp_exchange(std::uint64_t value, unsigned src_lane);
  // Waits at a warp collective other than a shuffle, `data` this lane's part of it.
  void warp_collective(WarpOp op, void* data);
  bool in_shared(const void* address, std::size_t bytes) const;
  [[noreturn]] void fail(cudaError_t error);
  [[noreturn]] void thread_main();

 private:
  enum class State : unsigned char { kReady, kAtBarrier, kAtWarp, kExited };

  bool run_block(std::uint64_t b);
  void choose_order(std::uint64_t b, std::uint64_t phase);
  void complete_warp(unsigned w);
  void resume(unsigned t);
  void yield();
  void report_deadlock(std::uint64_t b) const;

  dim3 grid_, block_;
  unsigned threads_;
  void (*invoke_)(const void*);
  const void* kernel_call_;
  std::uint64_t seed_;
  std::size_t smem_bytes_, shared_limit_;
  std::vector<std::max_align_t> smem_;
  // (address, bytes) of the static shared variables seen in the running block
  std::vector<std::pair<const void*, std::size_t>> static_variables_;
  std::size_t static_bytes_ = 0;
  std::vector<State> state_;
  std::vector<void*> sp_;
  std::vector<uint3> index_;
  std::vector<unsigned> order_;
  std::vector<Warp> warps_;
  std::vector<std::unique_ptr<Stack>>& stacks_;
  void* scheduler_sp_ = nullptr;
  unsigned live_ = 0, at_barrier_ = 0;
  cudaError_t error_ = cudaSuccess;
  std::atomic<std::uint64_t> progress_{0};
};

inline thread_local Launch* current_launch = nullptr;
inline thread_local unsigned current_tid = 0;

extern "C" __attribute__((visibility("hidden"), used, noreturn)) inline void
pv_host_thread_main() {
  current_launch->thread_main();
}

inline void Launch::run() {
  current_launch = this;
  blockDim = block_;
  gridDim = grid_;
  const std::uint64_t blocks = std::uint64_t{grid_.x} * grid_.y * grid_.z;
  for (std::uint64_t b = 0; b < blocks && error_ == cudaSuccess; ++b) {
    if (!run_block(b) && error_ == cudaSuccess) {
      report_deadlock(b);
      error_ = cudaErrorLaunchTimeout;
    }
  }
  current_launch = nullptr;
}

// Runs one block to its end; false when it stops early (error_ set) or deadlocks.
inline bool Launch::run_block(std::uint64_t b) {
  blockIdx = uint3{static_cast<unsigned>(b % grid_.x),
                   static_cast<unsigned>(b / grid_.x % grid_.y),
                   static_cast<unsigned>(b / (std::uint64_t{grid_.x} * grid_.y))};
  std::memset(smem_.data(), kPoison, smem_bytes_);
  static_variables_.clear();
  static_bytes_ = 0;
  for (unsigned t = 0; t < threads_; ++t) {
    state_[t] = State::kReady;
    sp_[t] = stacks_[t]->start(pv_host_thread_main);
  }
  for (unsigned w = 0; w < warps_.size(); ++w) {
    warps_[w].live = std::min(32u, threads_ - 32 * w);
    warps_[w].arrived = 0;
  }
  live_ = threads_;
  for (std::uint64_t phase = 0;; ++phase) {
    choose_order(b, phase);
    // Sweeps until every thread waits: a warp collective that completes readies lanes
    // that earlier sweeps passed.
    for (bool ran = true; ran;) {
      ran = false;
      for (const unsigned t : order_) {
        if (state_[t] != State::kReady) continue;
        resume(t);
        if (error_ != cudaSuccess) return false;
        ran = true;
      }
    }
    if (live_ == 0) return true;
    if (at_barrier_ != live_) return false;  // some lanes wait at a warp collective
    for (State& s : state_) {
      if (s == State::kAtBarrier) s = State::kReady;
    }
    at_barrier_ = 0;
  }
}

// Thread order of one barrier phase: forward, reverse or random, by block and phase.
inline void Launch::choose_order(std::uint64_t b, std::uint64_t phase) {
  const std::uint64_t kind = (b + phase + seed_) % 3;
  for (unsigned i = 0; i < threads_; ++i) order_[i] = kind == 1 ? threads_ - 1 - i : i;
  if (kind == 2) {  // Fisher-Yates
    std::uint64_t r = mix(seed_ ^ mix(b ^ mix(phase)));
    for (unsigned i = threads_ - 1; i > 0; --i) {
      r = mix(r);
      std::swap(order_[i], order_[r % (i + 1)]);
    }
  }
}

inline void Launch::resume(unsigned t) {
  current_tid = t;
  threadIdx = index_[t];
  progress_.store(progress_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  pv_host_fiber_switch(&scheduler_sp_, sp_[t]);
}

// Hands over to the scheduler; the caller has set the thread's state.
inline void Launch::yield() {
  pv_host_fiber_switch(&sp_[current_tid], scheduler_sp_);
}

inline void Launch::thread_main() {
  invoke_(kernel_call_);
  // An exited thread no longer counts at barriers and warp collectives.
  const unsigned t = current_tid;
  state_[t] = State::kExited;
  --live_;
  Warp& warp = warps_[t / 32];
  --warp.live;
  if (warp.arrived != 0 && warp.arrived == warp.live) complete_warp(t / 32);
  yield();
  __builtin_unreachable();  // an exited thread is never resumed
}

inline void Launch::fail(cudaError_t error) {
  error_ = error;
  state_[current_tid] = State::kExited;
  yield();  // the launch stops: never resumed
  __builtin_unreachable();
}

// A static __shared__ variable declared by the running thread: the block's first thread
// to declare it poisons it, before any thread can use it.
inline void Launch::shared_variable(void* address, std::size_t bytes) {
  for (const auto& seen : static_variables_) {
    if (seen.first == address) return;
  }
  static_variables_.emplace_back(address, bytes);
  static_bytes_ += bytes;
  std::memset(address, kPoison, bytes);
  if (static_bytes_ + smem_bytes_ <= shared_limit_) return;
  std::fprintf(stderr,
               "pyvit host emulation: shared memory: expected at most %zu bytes per block "
               "(48 KB unless raised by cudaFuncSetAttribute), got %zu static + %zu "
               "dynamic\n",
               shared_limit_, static_bytes_, smem_bytes_);
  fail(cudaErrorInvalidValue);
}

inline void Launch::syncthreads() {
  state_[current_tid] = State::kAtBarrier;
  ++at_barrier_;
  yield();
}

// Whether [address, address + bytes) lies in the running block's shared memory.
inline bool Launch::in_shared(const void* address, std::size_t bytes) const {
  const auto inside = [&](const void* base, std::size_t size) {
    const auto p = reinterpret_cast<std::uintptr_t>(address);
    const auto b = reinterpret_cast<std::uintptr_t>(base);
    return p >= b && p - b <= size && bytes <= size - (p - b);
  };
  if (inside(smem_.data(), smem_bytes_)) return true;
  for (const auto& [base, size] : static_variables_) {
    if (inside(base, size)) return true;
  }
  return false;
}

inline void Launch::warp_collective(WarpOp op, void* data) {
  const unsigned t = current_tid, lane = t % 32;
  Warp& warp = warps_[t / 32];
  warp.op[lane] = op;
  warp.data[lane] = data;
  state_[t] = State::kAtWarp;
  if (++warp.arrived == warp.live) complete_warp(t / 32);
  yield();
}

inline std::uint64_t Launch::warp_exchange(std::uint64_t value, unsigned src_lane) {
  const unsigned lane = current_tid % 32;
  Warp& warp = warps_[current_tid / 32];
  warp.in[lane] = value;
  warp.src[lane] = src_lane;
  warp_collective(nullptr, nullptr);
  return warp.out[lane];
}

// Every live lane of warp w waits at a warp collective: hand out the values.
inline void Launch::complete_warp(unsigned w) {
  Warp& warp = warps_[w];
  const unsigned first = 32 * w, lanes = std::min(32u, threads_ - first);
  const auto waiting = [&](unsigned lane) { return state_[first + lane] == State::kAtWarp; };
  const auto at = [&](unsigned lane, WarpOp op) { return waiting(lane) && warp.op[lane] == op; };
  for (unsigned lane = 0; lane < lanes; ++lane) {  // shuffles (op nullptr)
    const unsigned src = warp.src[lane];
    std::memset(&warp.out[lane], kPoison, sizeof(std::uint64_t));
    if (at(lane, nullptr) && src < lanes && at(src, nullptr)) warp.out[lane] = warp.in[src];
  }
  // Each other operation once, with the lanes that wait at it.
  for (unsigned lane = 0; lane < lanes; ++lane) {
    const WarpOp op = warp.op[lane];
    if (op == nullptr || !waiting(lane)) continue;
    bool seen = false;
    for (unsigned other = 0; other < lane; ++other) seen |= at(other, op);
    if (seen) continue;
    std::array<void*, 32> data{};
    for (unsigned other = lane; other < lanes; ++other) {
      if (at(other, op)) data[other] = warp.data[other];
    }
    op(data);
  }
  for (unsigned lane = 0; lane < lanes; ++lane) {
    if (waiting(lane)) state_[first + lane] = State::kReady;
  }
  warp.arrived = 0;
}

inline void Launch::report_deadlock(std::uint64_t b) const {
  unsigned at_warp = 0;
  for (const State s : state_) at_warp += s == State::kAtWarp;
  std::fprintf(stderr,
               "pyvit host emulation: block %llu of grid (%u, %u, %u) x block (%u, %u, %u) "
               "deadlocks: of its %u live threads, %u wait at __syncthreads() and %u at a "
               "warp collective (shuffle, __syncwarp, mma, ldmatrix) that lanes of their warp "
               "never reach. The launch fails.\n",
               static_cast<unsigned long long>(b), grid_.x, grid_.y, grid_.z, block_.x,
               block_.y, block_.z, live_, at_barrier_, at_warp);
}

// The thread that runs the launches, kept across launches. A forked child, or the first
// launch after a stalled one, gets a fresh worker.
class Worker {
 public:
  // The process's worker. Leaked on purpose: it idles on a condition variable and must
  // not be joined during static destruction.
  static Worker& instance() {
    if (current() == nullptr || owner() != getpid()) {
      current() = new Worker;
      owner() = getpid();
    }
    return *current();
  }

  std::vector<std::unique_ptr<Stack>>& stacks() { return stacks_; }

  // Runs launch->run() on the worker, polling stalled() about once a second. If it says
  // so, the worker is abandoned with its stuck launch and run() returns false.
  template <typename Stalled>
  bool run(Launch* launch, Stalled stalled) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!thread_.joinable()) thread_ = std::thread([this] { work(); });
    launch_ = launch;
    pending_ = true;
    wake_.notify_one();
    while (!done_.wait_for(lock, std::chrono::seconds(1), [this] { return !pending_; })) {
      if (stalled()) {
        thread_.detach();
        current() = nullptr;
        return false;
      }
    }
    return true;
  }

 private:
  static Worker*& current() {
    static Worker* worker = nullptr;
    return worker;
  }
  static pid_t& owner() {
    static pid_t pid = 0;
    return pid;
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return pending_ && !running_; });
      running_ = true;
      lock.unlock();
      launch_->run();
      lock.lock();
      running_ = false;
      pending_ = false;
      done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::thread thread_;
  Launch* launch_ = nullptr;
  bool pending_ = false, running_ = false;
  std::vector<std::unique_ptr<Stack>> stacks_;
};

inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

// A kernel that loops forever would hang the emulation. The launch fails instead, with
// cudaErrorLaunchTimeout, once no thread has reached a sync point for
// PYVIT_HOST_EMULATION_TIMEOUT seconds (default 120); operator() says whether that
// happened, explaining on stderr.
class StallWatchdog {
 public:
  StallWatchdog(const Launch& launch, dim3 grid, dim3 threads)
      : launch_(launch),
        grid_(grid),
        threads_(threads),
        timeout_(std::chrono::seconds(env_parameter("PYVIT_HOST_EMULATION_TIMEOUT", 120))),
        last_change_(Clock::now()) {}

  bool operator()() {
    const std::uint64_t progress = launch_.progress();
    if (progress != seen_) {
      seen_ = progress;
      last_change_ = Clock::now();
      return false;
    }
    if (Clock::now() - last_change_ <= timeout_) return false;
    std::fprintf(stderr,
                 "pyvit host emulation: grid (%u, %u, %u) x block (%u, %u, %u) made no "
                 "progress for %lld s: a thread loops forever without reaching a sync "
                 "point. The launch is abandoned (its thread keeps running) and fails.\n",
                 grid_.x, grid_.y, grid_.z, threads_.x, threads_.y, threads_.z,
                 static_cast<long long>(timeout_.count()));
    return true;
  }

 private:
  using Clock = std::chrono::steady_clock;
  const Launch& launch_;
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

// The kernel's __launch_bounds__(max_threads[, min_blocks]) against the running block:
// on the GPU an oversized block fails to launch, so the first thread fails the launch
// before any thread has done anything.
inline void check_launch_bounds(unsigned max_threads, unsigned /*min_blocks*/ = 0) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  if (threads <= max_threads) return;
  std::fprintf(stderr,
               "pyvit host emulation: blockDim: expected at most %u threads "
               "(__launch_bounds__), got %u\n",
               max_threads, threads);
  current_launch->fail(cudaErrorLaunchOutOfResources);
}

template <typename... Variables>
void shared_variables(Variables&... variables) {
  (current_launch->shared_variable(&variables, sizeof(Variables)), ...);
}

// Value of `value` from lane src_lane of the calling warp (poison when that lane does
// not take part).
template <typename T>
T warp_exchange(T value, unsigned src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "shuffles move trivially copyable values of at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = current_launch->warp_exchange(bits, src_lane);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace detail

inline void* dynamic_shared_memory() { return detail::current_launch->dynamic_smem(); }

// kernel<<<grid, block, smem>>>(args...) on the host; see PV_LAUNCH in common.cuh.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t dynamic_smem_bytes,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  if (!detail::valid_config(grid, block)) {
    detail::last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const auto [dynamic_limit, shared_limit] =
      detail::shared_limits(reinterpret_cast<const void*>(kernel));
  if (dynamic_smem_bytes > dynamic_limit) {
    std::fprintf(stderr,
                 "pyvit host emulation: dynamic shared memory: expected at most %zu bytes "
                 "(48 KB unless raised by cudaFuncSetAttribute), got %zu\n",
                 dynamic_limit, dynamic_smem_bytes);
    detail::last_error() = cudaErrorInvalidValue;
    return;
  }
  const std::lock_guard<std::mutex> lock(detail::launch_mutex());
  // Arguments are converted once, as a launch copies them into the parameter space.
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  const auto invoke = [](const void* c) {
    const Call& k = *static_cast<const Call*>(c);
    std::apply(k.kernel, k.params);
  };
  detail::Worker& worker = detail::Worker::instance();
  // On the heap: after a stall the stuck thread still uses them, so they are leaked then.
  auto call = std::make_unique<const Call>(
      Call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)});
  auto state = std::make_unique<detail::Launch>(grid, block, dynamic_smem_bytes, shared_limit,
                                                invoke, call.get(), worker.stacks());
  if (!worker.run(state.get(), detail::StallWatchdog(*state, grid, block))) {
    static_cast<void>(call.release());
    static_cast<void>(state.release());
    detail::last_error() = cudaErrorLaunchTimeout;
  } else if (state->error() != cudaSuccess) {
    detail::last_error() = state->error();
  }
}

}  // namespace pyvit_host

inline void __syncthreads() { pyvit_host::detail::current_launch->syncthreads(); }

inline void __syncwarp(unsigned /*mask*/ = 0xFFFFFFFFu) {
  pyvit_host::detail::warp_exchange(0u, pyvit_host::detail::current_tid % 32);
}

// Shuffles: `mask` is not modelled (every live lane of the warp must take part, as the
// kernels' full-warp masks promise); `width` splits the warp into segments as on the GPU.
template <typename T>
T __shfl_sync(unsigned /*mask*/, T value, int src_lane, int width = warpSize) {
  const unsigned w = static_cast<unsigned>(width), lane = pyvit_host::detail::current_tid % 32;
  return pyvit_host::detail::warp_exchange(
      value, (lane & ~(w - 1)) + static_cast<unsigned>(src_lane) % w);
}

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, unsigned delta, int width = warpSize) {
  const unsigned w = static_cast<unsigned>(width), lane = pyvit_host::detail::current_tid % 32;
  return pyvit_host::detail::warp_exchange(value, lane % w + delta < w ? lane + delta : lane);
}

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask, int width = warpSize) {
  const unsigned w = static_cast<unsigned>(width), lane = pyvit_host::detail::current_tid % 32;
  // A lane may read from its own or an earlier segment, never a later one.
  const unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  return pyvit_host::detail::warp_exchange(value, src < (lane & ~(w - 1)) + w ? src : lane);
}

// ---- tensor cores ------------------------------------------------------------------------
// The instructions csrc/mma.cuh wraps, as warp collectives. The fragment layouts are those
// of the PTX ISA, written out here apart from mma.cuh's so that a layout mistake there
// shows in the results (g = lane / 4, t = lane % 4; element i of a register pair list is
// register i / 2, low half for even i).
namespace pyvit_host {
namespace detail {

// Reports a bad address of the running thread and fails the launch.
[[noreturn]] inline void bad_address(cudaError_t error, const char* what, const void* address) {
  std::fprintf(stderr, "pyvit host emulation: thread %u of block (%u, %u, %u): %s at %p\n",
               current_tid, blockIdx.x, blockIdx.y, blockIdx.z, what, address);
  current_launch->fail(error);
}

struct MmaLane {
  std::uint32_t a[4], b[2];
  float c[4], d[4];
};

template <typename T>
float mma_element(std::uint32_t reg, unsigned high) {
  const std::uint16_t bits = static_cast<std::uint16_t>(reg >> (16 * high));
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__half{bits});
  } else {
    return __bfloat162float(__nv_bfloat16{bits});
  }
}

// mma.m16n8k16 with .f16 / .bf16 A (16x16) and B (16x8) and .f32 C / D (16x8). The
// registers of a lane that does not take part are poison (0xFF bytes: NaN).
template <typename T>
void complete_mma_m16n8k16(const std::array<void*, 32>& lanes) {
  MmaLane poison;
  std::memset(&poison, kPoison, sizeof(poison));
  float a[16][16], b[16][8], c[16][8];
  for (unsigned lane = 0; lane < 32; ++lane) {
    const MmaLane& l = lanes[lane] != nullptr ? *static_cast<const MmaLane*>(lanes[lane]) : poison;
    const unsigned g = lane >> 2, t = lane % 4;
    for (unsigned i = 0; i < 8; ++i) {  // a0..a7
      const unsigned row = i < 2 || (4 <= i && i < 6) ? g : g + 8;
      const unsigned col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      a[row][col] = mma_element<T>(l.a[i / 2], i % 2);
    }
    for (unsigned i = 0; i < 4; ++i) {  // b0..b3
      const unsigned row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      b[row][g] = mma_element<T>(l.b[i / 2], i % 2);
    }
    for (unsigned i = 0; i < 4; ++i) {  // c0..c3
      c[i < 2 ? g : g + 8][t * 2 + (i & 1)] = l.c[i];
    }
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (lanes[lane] == nullptr) continue;
    MmaLane& l = *static_cast<MmaLane*>(lanes[lane]);
    const unsigned g = lane >> 2, t = lane % 4;
    for (unsigned i = 0; i < 4; ++i) {  // d0..d3, laid out as c0..c3
      const unsigned row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
      // fp16 and bf16 products are exact in an fma; each addition rounds to fp32.
      float d = c[row][col];
      for (unsigned k = 0; k < 16; ++k) d = std::fma(a[row][k], b[k][col], d);
      l.d[i] = d;
    }
  }
}

struct LdmatrixLane {
  const unsigned char* row;  // this lane's row address (lanes 0..8 * matrices - 1)
  std::uint32_t r[4];
};

// ldmatrix.m8n8.x{Matrices}[.trans].b16: row i of matrix j is 8 16-bit elements at the
// address of lane 8 * j + i. Register j of lane l holds, without .trans, elements 2 * t
// and 2 * t + 1 of row g; with .trans, element g of rows 2 * t and 2 * t + 1. Rows of a
// lane that does not take part are poison.
template <int Matrices, bool kTrans>
void complete_ldmatrix(const std::array<void*, 32>& lanes) {
  const auto element = [&](unsigned matrix, unsigned row, unsigned col) -> std::uint32_t {
    const void* source = lanes[8 * matrix + row];
    if (source == nullptr) return 0xFFFFu;
    std::uint16_t bits;
    std::memcpy(&bits, static_cast<const LdmatrixLane*>(source)->row + 2 * col, 2);
    return bits;
  };
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (lanes[lane] == nullptr) continue;
    LdmatrixLane& l = *static_cast<LdmatrixLane*>(lanes[lane]);
    const unsigned g = lane >> 2, t = lane % 4;
    for (unsigned j = 0; j < Matrices; ++j) {
      l.r[j] = kTrans ? element(j, 2 * t, g) | element(j, 2 * t + 1, g) << 16
                      : element(j, g, 2 * t) | element(j, g, 2 * t + 1) << 16;
    }
  }
}

}  // namespace detail

// mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32 d, a, b, c (T: __half or __nv_bfloat16).
template <typename T>
void mma_m16n8k16(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2],
                  const float (&c)[4]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "mma.m16n8k16 takes fp16 or bf16 operands");
  detail::MmaLane lane;
  std::memcpy(lane.a, a, sizeof(lane.a));
  std::memcpy(lane.b, b, sizeof(lane.b));
  std::memcpy(lane.c, c, sizeof(lane.c));
  detail::current_launch->warp_collective(detail::complete_mma_m16n8k16<T>, &lane);
  std::memcpy(d, lane.d, sizeof(lane.d));
}

// ldmatrix.sync.aligned.m8n8.x{Matrices}[.trans].shared.b16 r, [row]: lanes past the
// first 8 * Matrices pass an address that is not used.
template <int Matrices, bool kTrans>
void ldmatrix(std::uint32_t (&r)[Matrices], const void* row) {
  static_assert(Matrices == 1 || Matrices == 2 || Matrices == 4, "ldmatrix loads .x1, .x2, .x4");
  const unsigned lane = detail::current_tid % 32;
  if (lane < 8 * Matrices) {
    if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0) {
      detail::bad_address(cudaErrorMisalignedAddress,
                          "ldmatrix row address not 16-byte aligned", row);
    }
    if (!detail::current_launch->in_shared(row, 16)) {
      detail::bad_address(cudaErrorIllegalAddress,
                          "ldmatrix row address outside the block's shared memory", row);
    }
  }
  detail::LdmatrixLane data{static_cast<const unsigned char*>(row), {}};
  detail::current_launch->warp_collective(detail::complete_ldmatrix<Matrices, kTrans>, &data);
  std::memcpy(r, data.r, sizeof(r));
}

// A 32-bit load (a pair of 16-bit elements), which faults on the GPU unless aligned.
inline std::uint32_t load_b32(const void* address) {
  if (reinterpret_cast<std::uintptr_t>(address) % 4 != 0) {
    detail::bad_address(cudaErrorMisalignedAddress, "32-bit load not 4-byte aligned", address);
  }
  std::uint32_t value;
  std::memcpy(&value, address, 4);
  return value;
}

}  // namespace pyvit_host
