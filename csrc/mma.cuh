// Warp-level tensor-core matrix multiply-accumulate for the CUDA kernels: mma.sync
// m16n8k16 with fp16 or bf16 operands and fp32 accumulators (sm_80 and later), the
// fragments it works on, loaders that fill them by the PTX ISA's lane mapping (plain
// loads, or ldmatrix from shared memory) and the coordinates a kernel needs to reason
// about what a lane holds. docs/design/tensor_cores.md has the layout tables.
//
// Every function here is a warp collective or runs per lane on a warp's fragment: all 32
// lanes of the warp call the collectives (mma, ldmatrix_*) together, with the same tile.
// On the GPU they are inline PTX; the host-emulation build runs them as warp
// collectives of host_emulation.h, which has its own copy of the layouts.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "mma.cuh needs sm_80 or later (mma.sync.m16n8k16 with bf16 operands)"
#endif

namespace pyvit::mma {

template <typename T>
inline constexpr bool kIsOperand = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// A: 16x16 (m x k), row-major; 8 elements per lane in 4 registers of two elements each.
template <typename T>
struct FragA {
  static_assert(kIsOperand<T>, "mma operands are __half or __nv_bfloat16");
  std::uint32_t reg[4];
};

// B: 16x8 (k x n), "col" (each register holds two consecutive k of one column n).
template <typename T>
struct FragB {
  static_assert(kIsOperand<T>, "mma operands are __half or __nv_bfloat16");
  std::uint32_t reg[2];
};

// C and D: 16x8 (m x n) fp32 accumulators, 4 per lane.
struct FragC {
  float reg[4];
};

// (row, column) of a fragment element in its tile.
struct Coord {
  int row, col;
};

// The warp lane of the calling thread.
PV_DEVICE int lane_id() {
#ifdef PYVIT_HOST_EMULATION
  return static_cast<int>(((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) %
                          32);
#else
  unsigned lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return static_cast<int>(lane);
#endif
}

// The lanes of a group (lane / 4) hold the same rows of A, C and D and the same column of B.
PV_HOST_DEVICE int group_of(int lane) { return lane >> 2; }
PV_HOST_DEVICE int thread_in_group(int lane) { return lane % 4; }

// Element e (0..7: register e / 2, low half for even e) of lane's A fragment.
PV_HOST_DEVICE Coord a_coord(int lane, int e) {
  return {group_of(lane) + 8 * ((e >> 1) & 1), 2 * thread_in_group(lane) + (e & 1) + 8 * (e >> 2)};
}
// Element e (0..3) of lane's B fragment, as (k, n).
PV_HOST_DEVICE Coord b_coord(int lane, int e) {
  return {2 * thread_in_group(lane) + (e & 1) + 8 * (e >> 1), group_of(lane)};
}
// Element e (0..3) of lane's C / D fragment: rows group and group + 8, two adjacent columns.
PV_HOST_DEVICE Coord c_coord(int lane, int e) {
  return {group_of(lane) + 8 * (e >> 1), 2 * thread_in_group(lane) + (e & 1)};
}

template <typename T>
PV_DEVICE std::uint16_t bits_of(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half_as_ushort(v);
  } else {
    return __bfloat16_as_ushort(v);
  }
}

// Two elements in one register, the first in the low half (as the PTX .f16x2 / .bf16x2).
template <typename T>
PV_DEVICE std::uint32_t pack(T first, T second) {
  return bits_of(first) | static_cast<std::uint32_t>(bits_of(second)) << 16;
}

// Two consecutive elements at p (4-byte aligned) in one 32-bit load.
template <typename T>
PV_DEVICE std::uint32_t load_pair(const T* p) {
#ifdef PYVIT_HOST_EMULATION
  return ::pyvit_host::load_b32(p);
#else
  return *reinterpret_cast<const std::uint32_t*>(p);
#endif
}

// ---- loads and stores by the lane mapping (global or shared memory) ----------------------
// `tile` points at element (0, 0); `ld` is the distance between rows of the stored matrix,
// in elements. Pair loads need `tile` 4-byte aligned and `ld` even.

// Register r of the calling lane's fragment: load(coordinates of its first element).
template <int N, typename Coords, typename Load>
PV_DEVICE void load_registers(std::uint32_t (&reg)[N], Coords coords, Load load) {
  const int lane = lane_id();
#pragma unroll
  for (int r = 0; r < N; ++r) reg[r] = load(coords(lane, 2 * r));
}

// A stored row-major: element (m, k) at tile[m * ld + k].
template <typename T>
PV_DEVICE void load_a(FragA<T>& a, const T* tile, int ld) {
  load_registers(a.reg, a_coord, [&](Coord p) { return load_pair(tile + p.row * ld + p.col); });
}

// B stored n-major (column-major k x n, e.g. keys for Q K^T): element (k, n) at
// tile[n * ld + k].
template <typename T>
PV_DEVICE void load_b_col(FragB<T>& b, const T* tile, int ld) {
  load_registers(b.reg, b_coord, [&](Coord p) { return load_pair(tile + p.col * ld + p.row); });
}

// B stored k-major (row-major k x n, e.g. values for P V): element (k, n) at
// tile[k * ld + n]; the two elements of a register are a row apart, loaded one by one.
template <typename T>
PV_DEVICE void load_b_row(FragB<T>& b, const T* tile, int ld) {
  load_registers(b.reg, b_coord, [&](Coord p) {
    return pack(tile[p.row * ld + p.col], tile[(p.row + 1) * ld + p.col]);
  });
}

// C from fp32 storage, row-major.
PV_DEVICE void load_c(FragC& c, const float* tile, int ld) {
  const int lane = lane_id();
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const Coord p = c_coord(lane, e);
    c.reg[e] = tile[p.row * ld + p.col];
  }
}

PV_DEVICE void fill(FragC& c, float value) {
#pragma unroll
  for (int e = 0; e < 4; ++e) c.reg[e] = value;
}

// D to row-major storage of float, __half or __nv_bfloat16 (rounded to nearest even).
template <typename Out>
PV_DEVICE void store_c(const FragC& d, Out* tile, int ld) {
  const int lane = lane_id();
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const Coord p = c_coord(lane, e);
    tile[p.row * ld + p.col] = from_float<Out>(d.reg[e]);
  }
}

// ---- loads through ldmatrix (shared memory only) -----------------------------------------
// Each lane passes the address of one 8-element row of an 8x8 matrix; every row address
// must be 16-byte aligned: `tile` 16-byte aligned and `ld` a multiple of 8.

template <int Matrices, bool kTrans>
PV_DEVICE void ldmatrix(std::uint32_t (&r)[Matrices], const void* row) {
#ifdef PYVIT_HOST_EMULATION
  ::pyvit_host::ldmatrix<Matrices, kTrans>(r, row);
#else
  static_assert(Matrices == 2 || Matrices == 4, "mma.cuh uses ldmatrix .x2 and .x4");
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  // The instruction's qualifiers are part of its name: one asm statement per variant.
#define PV_LDMATRIX_X4(QUALIFIERS)                                                                 \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4" QUALIFIERS ".shared.b16 {%0, %1, %2, %3}, [%4];"    \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                    \
               : "r"(address))
#define PV_LDMATRIX_X2(QUALIFIERS)                                                                 \
  asm volatile("ldmatrix.sync.aligned.m8n8.x2" QUALIFIERS ".shared.b16 {%0, %1}, [%2];"            \
               : "=r"(r[0]), "=r"(r[1])                                                            \
               : "r"(address))
  if constexpr (Matrices == 4 && kTrans) {
    PV_LDMATRIX_X4(".trans");
  } else if constexpr (Matrices == 4) {
    PV_LDMATRIX_X4("");
  } else if constexpr (kTrans) {
    PV_LDMATRIX_X2(".trans");
  } else {
    PV_LDMATRIX_X2("");
  }
#undef PV_LDMATRIX_X4
#undef PV_LDMATRIX_X2
#endif
}

// A stored row-major, one ldmatrix.x4: its matrices (rows 0-7 | 8-15) x (columns 0-7 | 8-15)
// land in registers 0..3 exactly as the A fragment orders them.
template <typename T>
PV_DEVICE void ldmatrix_a(FragA<T>& a, const T* tile, int ld) {
  const int lane = lane_id();
  ldmatrix<4, false>(a.reg, tile + (lane % 16) * ld + 8 * (lane / 16));
}

// B stored n-major (element (k, n) at tile[n * ld + k]), one ldmatrix.x2: matrix j holds
// k = 8j..8j+7 of the 8 columns.
template <typename T>
PV_DEVICE void ldmatrix_b_col(FragB<T>& b, const T* tile, int ld) {
  const int lane = lane_id() % 16;
  ldmatrix<2, false>(b.reg, tile + (lane % 8) * ld + 8 * (lane / 8));
}

// B stored k-major (element (k, n) at tile[k * ld + n]), one ldmatrix.x2.trans: row k of
// the storage is a row of matrix k / 8, transposed into the fragment's column order.
template <typename T>
PV_DEVICE void ldmatrix_b_row(FragB<T>& b, const T* tile, int ld) {
  const int lane = lane_id() % 16;
  ldmatrix<2, true>(b.reg, tile + lane * ld);
}

// ---- compute -------------------------------------------------------------------------------

// d = a * b + c (d may be c).
template <typename T>
PV_DEVICE void mma(FragC& d, const FragA<T>& a, const FragB<T>& b, const FragC& c) {
#ifdef PYVIT_HOST_EMULATION
  ::pyvit_host::mma_m16n8k16<T>(d.reg, a.reg, b.reg, c.reg);
#else
  // The operand type is part of the instruction's name: one asm statement per type.
#define PV_MMA_M16N8K16(TYPE)                                                                      \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 "                      \
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"               \
               : "=f"(d.reg[0]), "=f"(d.reg[1]), "=f"(d.reg[2]), "=f"(d.reg[3])                    \
               : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]),        \
                 "r"(b.reg[1]), "f"(c.reg[0]), "f"(c.reg[1]), "f"(c.reg[2]), "f"(c.reg[3]))
  if constexpr (std::is_same_v<T, __half>) {
    PV_MMA_M16N8K16("f16");
  } else {
    PV_MMA_M16N8K16("bf16");
  }
#undef PV_MMA_M16N8K16
#endif
}

// The A operand made of two accumulator tiles side by side (columns 0-7: lo, 8-15: hi),
// rounded to T: a product such as softmax(Q K^T) feeds the next mma (P V) in registers,
// because C's (row, column pairs) match A's registers 0-1 (lo) and 2-3 (hi).
template <typename T>
PV_DEVICE FragA<T> a_from_c(const FragC& lo, const FragC& hi) {
  FragA<T> a;
  a.reg[0] = pack(from_float<T>(lo.reg[0]), from_float<T>(lo.reg[1]));
  a.reg[1] = pack(from_float<T>(lo.reg[2]), from_float<T>(lo.reg[3]));
  a.reg[2] = pack(from_float<T>(hi.reg[0]), from_float<T>(hi.reg[1]));
  a.reg[3] = pack(from_float<T>(hi.reg[2]), from_float<T>(hi.reg[3]));
  return a;
}

// `value` combined by `op` over the 4 lanes of the caller's group, which hold the same
// rows of C / D (a row reduction of a tile after each lane reduced its own columns).
template <typename Op>
PV_DEVICE float group_reduce(float value, Op op) {
  value = op(value, __shfl_xor_sync(0xFFFFFFFFu, value, 1));
  return op(value, __shfl_xor_sync(0xFFFFFFFFu, value, 2));
}

}  // namespace pyvit::mma
