// scaled_dot_product_attention kernels (interface in scaled_dot_product_attention.cuh).
// The same source runs under host emulation (tensor cores through mma.cuh); automatic
// dispatch prefers the Triton kernels. Blocks of 128 threads stage tiles of q/k/v in
// shared memory; everything accumulates in fp32.
//
// Forward: a block per (batch, query tile: 16 rows in fp32, 64 on the tensor cores in
// fp16 / bf16) walks the keys 32 at a time with an online softmax and saves each row's max
// logit m and log2 of its sum l, apart (m + log(l) in one float would lose log(l) next to
// a large |m|, e.g. a -1e9 mask); m = +inf for a row with every key masked, which makes
// every recomputed probability 0, as torch gives zeros. Logits stay in natural units;
// only differences (logit - m <= 0) are scaled to log2 units for exp2, so finite logits
// near the float32 limit do not overflow.
// Backward, deterministic (no atomics; every output element has one owner that sums in
// a fixed order): a query-major kernel for delta = rowsum(P * dP) and dq, looping over the
// key tiles twice; a key-major kernel for dk/dv looping over the query tiles; and, for a
// float bias that needs a gradient, a kernel per (bias group, tile) that recomputes dS
// for each broadcast batch index in order (and every query tile when the bias is
// broadcast over the queries) and sums it, so no (*batch, Nq, Nk) gradient is formed.
// BEiT's relative-position table (rel_pos) is read through the same bias_value, its
// index computed; its gradient is the dbias kernel's (heads, Nq, Nk) fp32 sum over the
// batch, gathered per table row by the dtable kernel.
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"
#include "scaled_dot_product_attention.cuh"

namespace pyvit {
namespace sdpa {

constexpr int kThreads = 128;
// __launch_bounds__'s blocks per SM: the relative-position table's instances (a few more
// integer operations per logit) declare 1, else ptxas trades a spill for occupancy in
// some of them; 0 leaves the dense-bias instances to its default.
template <bool kTable>
constexpr int kMinBlocks = kTable ? 1 : 0;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;

// Tile sizes per padded head dim DP, sized so that each kernel's fp32 tiles fit in the
// 48 KB of static shared memory. K/V rows are padded by one float: the score loops read
// one key per lane, and the padding spreads those rows over the banks.
template <int DP>
struct Tiles {
  static constexpr int kFwdM = 16, kFwdN = 32;
  static constexpr int kKvM = DP == 128 ? 8 : 16, kKvN = 32;
  static constexpr int kQM = 16, kQN = DP == 128 ? 16 : 32;
};

// First output of Philox-4x32-10 for counter (c0, c1, c2, c3) and key (0, 0): the
// generator of Triton's tl.philox, so both backends drop the same elements. The key is
// constant so that its schedule folds into the instructions (the seed, a loaded value,
// goes in the counter).
PV_DEVICE std::uint32_t philox_first(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2,
                                     std::uint32_t c3) {
  std::uint32_t k0 = 0, k1 = 0;
  for (int round = 0; round < 10; ++round) {
    const std::uint32_t a0 = c0, a2 = c2;
    c0 = __umulhi(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = __umulhi(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

PV_DEVICE bool dropout_keep(const SdpaParams& p, std::int64_t z, int row, int col) {
  const auto offset = static_cast<std::uint32_t>(row * p.Nk + col);
  const auto seed = static_cast<std::uint64_t>(__ldg(p.seed));
  return philox_first(offset, static_cast<std::uint32_t>(z), static_cast<std::uint32_t>(seed),
                      static_cast<std::uint32_t>(seed >> 32)) >= p.dropout_threshold;
}

// The row of the relative-position table that logit (row, col) reads: patch pair (i, j)
// at (dy, dx) = pos(i) - pos(j) reads (dy + gh - 1)(2gw - 1) + dx + gw - 1; with a class
// token the last three rows are class -> patch, patch -> class and class -> class (timm's
// gen_relative_position_index). With f(t) = y (2gw - 1) + x = t + (t / gw)(gw - 1) for
// patch t at (y, x), the row is f(i) - f(j) + f(gh - 1, gw - 1); t / gw is a multiply
// (SdpaRelPos::div), and every grid constant comes precomputed: registers are what the
// backward kernels lack.
PV_DEVICE int rel_pos_index(const SdpaRelPos& g, int row, int col) {
  const unsigned r = row - g.lead, c = col - g.lead;  // >= tokens (wrapped): a class token
  const auto f = [&](unsigned t) { return t + __umulhi(t, g.div) * (g.gw - 1); };
  if (r < g.tokens && c < g.tokens) return static_cast<int>(f(r) - f(c) + g.center);
  return static_cast<int>(g.offsets + (r >= g.tokens ? (c >= g.tokens ? 2 : 0) : 1));
}

// The bias term of logit (row, col) in natural units: the float bias (or its table entry),
// or 0 / -inf for a bool mask.
template <typename T, bool kTable>
PV_DEVICE float bias_value(const SdpaParams& p, int z1, int z2, int row, int col) {
  std::int64_t off = z1 * p.b_stride[0] + z2 * p.b_stride[1];
  if constexpr (kTable) {
    off += rel_pos_index(p.rel_pos, row, col) * p.b_stride[3];
  } else {
    off += row * p.b_stride[2] + col * p.b_stride[3];
  }
  switch (p.bias_kind) {
    case SdpaBias::kBool:
      return static_cast<const std::uint8_t*>(p.bias)[off] != 0 ? 0.f : -INFINITY;
    case SdpaBias::kFloat32:
      return static_cast<const float*>(p.bias)[off];
    case SdpaBias::kSameAsQ:
      return to_float(static_cast<const T*>(p.bias)[off]);
    case SdpaBias::kNone:
    default:
      return 0.f;
  }
}

// rows [row0, row0 + ROWS) of a (N, D) matrix at `base` into dst (row pitch LD), zero
// outside the matrix. Consecutive threads read consecutive columns.
template <int ROWS, int DP, int LD, typename T, typename Dst>
PV_DEVICE void load_tile(Dst* dst, const T* __restrict__ base, std::int64_t row_stride,
                         std::int64_t col_stride, int row0, int n, int D) {
  for (int e = threadIdx.x; e < ROWS * DP; e += kThreads) {
    const int r = e / DP, d = e % DP;
    dst[r * LD + d] = from_float<Dst>(
        row0 + r < n && d < D ? to_float(base[(row0 + r) * row_stride + d * col_stride])
                              : 0.f);
  }
}

template <int DP>
PV_DEVICE float dot_row(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll 16
  for (int d = 0; d < DP; ++d) s += a[d] * b[d];
  return s;
}

PV_DEVICE float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
PV_DEVICE float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// This block's tile of a grid of (ceil(length / block) tiles) x (Z1 * Z2 batches), tiles
// fastest: the tile's first row / column and the batch z = z1 * Z2 + z2.
struct BlockTile {
  int start;
  std::int64_t z;
  int z1, z2;
};
PV_DEVICE BlockTile block_tile(const SdpaParams& p, int length, int block) {
  const unsigned tiles = static_cast<unsigned>(ceil_div(length, block));
  // (32-bit divisions: the grid is 32-bit; a 64-bit one is a call, whose register save
  // spills in the backward kernels)
  const unsigned z = blockIdx.x / tiles, Z2 = p.Z2;
  return {static_cast<int>(blockIdx.x % tiles) * block, z, static_cast<int>(z / Z2),
          static_cast<int>(z % Z2)};
}

template <typename T, int DP, bool kTable>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kTable>) fwd_kernel(const SdpaParams p) {
  constexpr int BM = Tiles<DP>::kFwdM, BN = Tiles<DP>::kFwdN, RPW = BM / kWarps;
  static_assert(BN == 32, "the softmax step gives one key per lane");
  __shared__ float qs[BM * DP], ks[BN * (DP + 1)], vs[BN * DP], ps[BM * (BN + 1)];
  __shared__ float alpha_s[BM], l_s[BM];
  const auto [row0, z, z1, z2] = block_tile(p, p.Nq, BM);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const T* q = static_cast<const T*>(p.q) + z1 * p.q_stride[0] + z2 * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + z1 * p.k_stride[0] + z2 * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + z1 * p.v_stride[0] + z2 * p.v_stride[1];
  load_tile<BM, DP, DP>(qs, q, p.q_stride[2], p.q_stride[3], row0, p.Nq, p.D);

  float m[RPW], l[RPW];
  for (int r = 0; r < RPW; ++r) m[r] = -INFINITY, l[r] = 0.f;
  const int oi = tid / 8, od = tid % 8;  // the output row and column phase of the thread
  float acc[DP / 8] = {};
  for (int col0 = 0; col0 < p.Nk; col0 += BN) {
    __syncthreads();  // the previous tile's readers are done
    load_tile<BN, DP, DP + 1>(ks, k, p.k_stride[2], p.k_stride[3], col0, p.Nk, p.D);
    load_tile<BN, DP, DP>(vs, v, p.v_stride[2], p.v_stride[3], col0, p.Nk, p.D);
    __syncthreads();
    for (int e = tid; e < BM * BN; e += kThreads) {  // logits
      const int i = e / BN, j = e % BN, row = row0 + i, col = col0 + j;
      float s = -INFINITY;
      if (row < p.Nq && col < p.Nk) {
        s = dot_row<DP>(qs + i * DP, ks + j * (DP + 1)) * p.scale;
        if (p.bias_kind != SdpaBias::kNone) s += bias_value<T, kTable>(p, z1, z2, row, col);
      }
      ps[i * (BN + 1) + j] = s;
    }
    __syncthreads();
    for (int r = 0; r < RPW; ++r) {  // online softmax: a warp per row, a key per lane
      const int i = warp * RPW + r;
      const float s = ps[i * (BN + 1) + lane];
      const float m_new = fmaxf(m[r], warp_max(s));
      // A row with every key masked so far keeps m = -inf: shift by 0, not inf - inf.
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f((m[r] - m_ref) * kLog2e);
      float prob = exp2f((s - m_ref) * kLog2e);
      l[r] = l[r] * alpha + warp_sum(prob);
      m[r] = m_new;
      if (p.dropout && !dropout_keep(p, z, row0 + i, col0 + lane)) prob = 0.f;
      ps[i * (BN + 1) + lane] = prob;
      if (lane == 0) alpha_s[i] = alpha;
    }
    __syncthreads();
    const float alpha = alpha_s[oi];
#pragma unroll
    for (int c = 0; c < DP / 8; ++c) {
      float a = acc[c] * alpha;
      for (int j = 0; j < BN; ++j) a += ps[oi * (BN + 1) + j] * vs[j * DP + od + 8 * c];
      acc[c] = a;
    }
  }
  if (lane == 0) {
    for (int r = 0; r < RPW; ++r) {
      const int i = warp * RPW + r;
      l_s[i] = l[r];
      if (row0 + i < p.Nq) {
        float* stats = p.lse + (z * p.Nq + row0 + i) * 2;
        stats[0] = l[r] == 0.f ? INFINITY : m[r];
        stats[1] = log2f(l[r] == 0.f ? 1.f : l[r]);
      }
    }
  }
  __syncthreads();
  const int row = row0 + oi;
  if (row >= p.Nq) return;
  const float li = l_s[oi];
  const float f = p.dropout_scale / (li == 0.f ? 1.f : li);
  T* out = static_cast<T*>(p.out_w) + (z * p.Nq + row) * p.D;
#pragma unroll
  for (int c = 0; c < DP / 8; ++c) {
    if (od + 8 * c < p.D) out[od + 8 * c] = from_float<T>(acc[c] * f);
  }
}

// The forward for fp16 / bf16 on the tensor cores: a block per (batch, 64-query tile),
// each warp owning 16 query rows, keys 32 at a time. S = Q K^T and O += P V are mma with
// fp32 accumulators; the online softmax runs on the score fragments in registers (a lane
// holds two rows, the four lanes of its group a row's 32 keys) and P, rounded to T as the
// operand of P V, stays in registers. Tiles are staged in shared memory as T with rows
// padded by 16 bytes, so that the 8 rows an ldmatrix reads fall in different banks.
template <typename T, int DP, bool kTable>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kTable>) fwd_mma_kernel(const SdpaParams p) {
  constexpr int BM = 16 * kWarps, BN = 32, LD = DP + 8;
  alignas(16) __shared__ T qs[BM * LD], ks[BN * LD], vs[BN * LD];
  const auto [row0, z, z1, z2] = block_tile(p, p.Nq, BM);
  const int warp = threadIdx.x / 32, lane = mma::lane_id();
  const T* q = static_cast<const T*>(p.q) + z1 * p.q_stride[0] + z2 * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + z1 * p.k_stride[0] + z2 * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + z1 * p.v_stride[0] + z2 * p.v_stride[1];
  load_tile<BM, DP, LD>(qs, q, p.q_stride[2], p.q_stride[3], row0, p.Nq, p.D);
  __syncthreads();
  mma::FragA<T> qf[DP / 16];
#pragma unroll
  for (int c = 0; c < DP / 16; ++c) mma::ldmatrix_a(qf[c], qs + warp * 16 * LD + 16 * c, LD);

  const int top = row0 + warp * 16 + mma::c_coord(lane, 0).row;  // rows top, top + 8
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  mma::FragC acc[DP / 8];
#pragma unroll
  for (int j = 0; j < DP / 8; ++j) mma::fill(acc[j], 0.f);
  const auto maximum = [](float a, float b) { return fmaxf(a, b); };
  const auto plus = [](float a, float b) { return a + b; };
  for (int col0 = 0; col0 < p.Nk; col0 += BN) {
    __syncthreads();  // the previous tile's readers are done
    load_tile<BN, DP, LD>(ks, k, p.k_stride[2], p.k_stride[3], col0, p.Nk, p.D);
    load_tile<BN, DP, LD>(vs, v, p.v_stride[2], p.v_stride[3], col0, p.Nk, p.D);
    __syncthreads();
    mma::FragC s[BN / 8];
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {  // logits, 8 keys at a time
      mma::fill(s[n], 0.f);
#pragma unroll
      for (int c = 0; c < DP / 16; ++c) {
        mma::FragB<T> kf;
        mma::ldmatrix_b_col(kf, ks + 8 * n * LD + 16 * c, LD);
        mma::mma(s[n], qf[c], kf, s[n]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = top + 8 * (e / 2), col = col0 + 8 * n + mma::c_coord(lane, e).col;
        float x = -INFINITY;
        if (row < p.Nq && col < p.Nk) {
          x = s[n].reg[e] * p.scale;
          if (p.bias_kind != SdpaBias::kNone) x += bias_value<T, kTable>(p, z1, z2, row, col);
        }
        s[n].reg[e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
    }
    float alpha[2], m_ref[2], prob_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // online softmax of rows top + 8h
      const float m_new = fmaxf(m[h], mma::group_reduce(tile_max[h], maximum));
      // A row with every key masked so far keeps m = -inf: shift by 0, not inf - inf.
      m_ref[h] = m_new == -INFINITY ? 0.f : m_new;
      alpha[h] = exp2f((m[h] - m_ref[h]) * kLog2e);
      m[h] = m_new;
    }
    // Bit 4n + e: element e of s[n] is kept. One Philox call site in a loop that is not
    // unrolled: sixteen inlined copies push the kernel into register spills.
    unsigned keep = ~0u;
    if (p.dropout) {
#pragma unroll 1
      for (int i = 0; i < BN / 2; ++i) {
        const int row = top + 8 * (i % 4 / 2);
        const int col = col0 + 8 * (i / 4) + mma::c_coord(lane, i % 4).col;
        if (row < p.Nq && col < p.Nk && !dropout_keep(p, z, row, col)) keep &= ~(1u << i);
      }
    }
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = exp2f((s[n].reg[e] - m_ref[e / 2]) * kLog2e);
        prob_sum[e / 2] += prob;
        s[n].reg[e] = keep >> (4 * n + e) & 1u ? prob : 0.f;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + mma::group_reduce(prob_sum[h], plus);
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j].reg[e] *= alpha[e / 2];
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {  // O += P V, 16 keys at a time
      const mma::FragA<T> pf = mma::a_from_c<T>(s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int j = 0; j < DP / 8; ++j) {
        mma::FragB<T> vf;
        mma::ldmatrix_b_row(vf, vs + 16 * kk * LD + 8 * j, LD);
        mma::mma(acc[j], pf, vf, acc[j]);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = top + 8 * h;
    if (row >= p.Nq) continue;
    if (mma::thread_in_group(lane) == 0) {
      float* stats = p.lse + (z * p.Nq + row) * 2;
      stats[0] = l[h] == 0.f ? INFINITY : m[h];
      stats[1] = log2f(l[h] == 0.f ? 1.f : l[h]);
    }
    const float f = p.dropout_scale / (l[h] == 0.f ? 1.f : l[h]);
    T* out = static_cast<T*>(p.out_w) + (z * p.Nq + row) * p.D;
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
#pragma unroll
      for (int e = 2 * h; e < 2 * h + 2; ++e) {
        const int col = 8 * j + mma::c_coord(lane, e).col;
        if (col < p.D) out[col] = from_float<T>(acc[j].reg[e] * f);
      }
    }
  }
}

// The backward's shared-memory tiles of one (query tile, key tile) pair.
template <int DP, int BM, int BN>
struct BwdTiles {
  float qs[BM * DP], dos[BM * DP], ks[BN * (DP + 1)], vs[BN * (DP + 1)];
  float ps[BM * (BN + 1)], dss[BM * (BN + 1)];
  float m[BM], log2_l[BM], delta[BM];  // the forward's row max and log2 of the row sum
};

// q, dout and the row statistics of the tile's rows; with_delta: also the dq kernel's
// delta (dkdv_kernel and dbias_kernel run after it).
template <int DP, int BM, int BN, typename T>
PV_DEVICE void load_queries(BwdTiles<DP, BM, BN>& t, const SdpaParams& p, std::int64_t z,
                            int z1, int z2, int row0, bool with_delta) {
  load_tile<BM, DP, DP>(t.qs, static_cast<const T*>(p.q) + z1 * p.q_stride[0] + z2 * p.q_stride[1],
                        p.q_stride[2], p.q_stride[3], row0, p.Nq, p.D);
  load_tile<BM, DP, DP>(t.dos,
                        static_cast<const T*>(p.dout) + z1 * p.do_stride[0] + z2 * p.do_stride[1],
                        p.do_stride[2], p.do_stride[3], row0, p.Nq, p.D);
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    const bool valid = row0 + i < p.Nq;
    t.m[i] = valid ? p.lse[(z * p.Nq + row0 + i) * 2] : INFINITY;
    t.log2_l[i] = valid ? p.lse[(z * p.Nq + row0 + i) * 2 + 1] : 0.f;
    if (with_delta) t.delta[i] = valid ? p.delta[z * p.Nq + row0 + i] : 0.f;
  }
}

template <int DP, int BM, int BN, typename T>
PV_DEVICE void load_keys(BwdTiles<DP, BM, BN>& t, const SdpaParams& p, int z1, int z2, int col0) {
  load_tile<BN, DP, DP + 1>(t.ks,
                            static_cast<const T*>(p.k) + z1 * p.k_stride[0] + z2 * p.k_stride[1],
                            p.k_stride[2], p.k_stride[3], col0, p.Nk, p.D);
  load_tile<BN, DP, DP + 1>(t.vs,
                            static_cast<const T*>(p.v) + z1 * p.v_stride[0] + z2 * p.v_stride[1],
                            p.v_stride[2], p.v_stride[3], col0, p.Nk, p.D);
}

// Element (i, j) of the tile, inside the matrix: its probability, the kept, rescaled
// probability (what multiplies v) and dP = dout . v_j through the dropout mask.
struct ProbTerms {
  float prob, kept, dp;
};
template <int DP, int BM, int BN, typename T, bool kTable>
PV_DEVICE ProbTerms prob_terms(const BwdTiles<DP, BM, BN>& t, const SdpaParams& p,
                               std::int64_t z, int z1, int z2, int i, int j, int row, int col) {
  float s = dot_row<DP>(t.qs + i * DP, t.ks + j * (DP + 1)) * p.scale;
  if (p.bias_kind != SdpaBias::kNone) s += bias_value<T, kTable>(p, z1, z2, row, col);
  const float prob = exp2f((s - t.m[i]) * kLog2e - t.log2_l[i]);
  const float dp = dot_row<DP>(t.dos + i * DP, t.vs + j * (DP + 1));
  if (!p.dropout) return {prob, prob, dp};
  const bool keep = dropout_keep(p, z, row, col);
  return {prob, keep ? prob * p.dropout_scale : 0.f, keep ? dp * p.dropout_scale : 0.f};
}

// ps = the kept, rescaled probabilities and dss = dS = P * (dP - delta) of the tile, 0
// outside the matrix. Element e = tid + kThreads * r is the thread's r-th.
template <int DP, int BM, int BN, typename T, bool kTable>
PV_DEVICE void probs_and_dscores(BwdTiles<DP, BM, BN>& t, const SdpaParams& p, std::int64_t z,
                                 int z1, int z2, int row0, int col0) {
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int i = e / BN, j = e % BN, row = row0 + i, col = col0 + j;
    float pv = 0.f, ds = 0.f;
    if (row < p.Nq && col < p.Nk) {
      const ProbTerms terms = prob_terms<DP, BM, BN, T, kTable>(t, p, z, z1, z2, i, j, row, col);
      pv = terms.kept;
      ds = terms.prob * (terms.dp - t.delta[i]);
    }
    t.ps[i * (BN + 1) + j] = pv;
    t.dss[i * (BN + 1) + j] = ds;
  }
}

template <typename T, int DP, bool kTable>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kTable>) dkdv_kernel(const SdpaParams p) {
  constexpr int BM = Tiles<DP>::kKvM, BN = Tiles<DP>::kKvN;
  static_assert(kThreads == 4 * BN, "four threads per key");
  __shared__ BwdTiles<DP, BM, BN> t;
  const auto [col0, z, z1, z2] = block_tile(p, p.Nk, BN);
  load_keys<DP, BM, BN, T>(t, p, z1, z2, col0);
  const int j = threadIdx.x / 4, dph = threadIdx.x % 4;
  float dk[DP / 4] = {}, dv[DP / 4] = {};
  for (int row0 = 0; row0 < p.Nq; row0 += BM) {
    __syncthreads();
    load_queries<DP, BM, BN, T>(t, p, z, z1, z2, row0, true);
    __syncthreads();
    probs_and_dscores<DP, BM, BN, T, kTable>(t, p, z, z1, z2, row0, col0);
    __syncthreads();
    for (int i = 0; i < BM; ++i) {
      const float pij = t.ps[i * (BN + 1) + j], dsij = t.dss[i * (BN + 1) + j];
#pragma unroll
      for (int c = 0; c < DP / 4; ++c) {
        dv[c] += pij * t.dos[i * DP + dph + 4 * c];
        dk[c] += dsij * t.qs[i * DP + dph + 4 * c];
      }
    }
  }
  const int col = col0 + j;
  if (col >= p.Nk) return;
  T* dk_out = static_cast<T*>(p.dk) + z1 * p.dk_stride[0] + z2 * p.dk_stride[1] +
              col * p.dk_stride[2];
  T* dv_out = static_cast<T*>(p.dv) + z1 * p.dv_stride[0] + z2 * p.dv_stride[1] +
              col * p.dv_stride[2];
#pragma unroll
  for (int c = 0; c < DP / 4; ++c) {
    const int d = dph + 4 * c;
    if (d < p.D) {
      dk_out[d * p.dk_stride[3]] = from_float<T>(dk[c] * p.scale);
      dv_out[d * p.dv_stride[3]] = from_float<T>(dv[c]);
    }
  }
}

template <typename T, int DP, bool kTable>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kTable>) dq_kernel(const SdpaParams p) {
  constexpr int BM = Tiles<DP>::kQM, BN = Tiles<DP>::kQN;
  static_assert(kThreads == 8 * BM, "eight threads per query");
  __shared__ BwdTiles<DP, BM, BN> t;
  const auto [row0, z, z1, z2] = block_tile(p, p.Nq, BM);
  load_queries<DP, BM, BN, T>(t, p, z, z1, z2, row0, false);
  // delta = rowsum(P * dP) / rowsum(P) (= dout . out, out unrounded) takes a first pass
  // over the keys: formed from the output rounded to T, it would dominate
  // dS = P * (dP - delta) where that cancels (near-one-hot rows). The division makes each
  // row of dS sum to 0 with the P rebuilt here, whose logits can differ from the
  // forward's in their last bits (fp16 / bf16: the forward multiplies on the tensor
  // cores). Thread r < BM sums row r in key order, in double: rounding the sum of Nk
  // terms would grow with Nk (BM threads, one addition per element: cheap).
  double delta = 0.0, p_sum = 0.0;
  for (int col0 = 0; col0 < p.Nk; col0 += BN) {
    __syncthreads();
    load_keys<DP, BM, BN, T>(t, p, z1, z2, col0);
    __syncthreads();
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int r = e / BN, c = e % BN, row = row0 + r, col = col0 + c;
      ProbTerms terms{0.f, 0.f, 0.f};
      if (row < p.Nq && col < p.Nk) {
        terms = prob_terms<DP, BM, BN, T, kTable>(t, p, z, z1, z2, r, c, row, col);
      }
      t.ps[r * (BN + 1) + c] = terms.prob;
      t.dss[r * (BN + 1) + c] = terms.prob * terms.dp;
    }
    __syncthreads();
    if (threadIdx.x < BM) {
      for (int c = 0; c < BN; ++c) {
        p_sum += t.ps[threadIdx.x * (BN + 1) + c];
        delta += t.dss[threadIdx.x * (BN + 1) + c];
      }
    }
  }
  if (threadIdx.x < BM) {
    // (a row with every key masked has P = 0: delta 0)
    const float d = p_sum > 0.0 ? static_cast<float>(delta / p_sum) : 0.f;
    t.delta[threadIdx.x] = d;
    if (row0 + threadIdx.x < p.Nq) p.delta[z * p.Nq + row0 + threadIdx.x] = d;
  }
  const int i = threadIdx.x / 8, dph = threadIdx.x % 8;
  float dq[DP / 8] = {};
  for (int col0 = 0; col0 < p.Nk; col0 += BN) {
    __syncthreads();
    load_keys<DP, BM, BN, T>(t, p, z1, z2, col0);
    __syncthreads();
    probs_and_dscores<DP, BM, BN, T, kTable>(t, p, z, z1, z2, row0, col0);
    __syncthreads();
    for (int j = 0; j < BN; ++j) {
      const float dsij = t.dss[i * (BN + 1) + j];
#pragma unroll
      for (int c = 0; c < DP / 8; ++c) dq[c] += dsij * t.ks[j * (DP + 1) + dph + 8 * c];
    }
  }
  const int row = row0 + i;
  if (row >= p.Nq) return;
  T* out = static_cast<T*>(p.dq) + z1 * p.dq_stride[0] + z2 * p.dq_stride[1] +
           row * p.dq_stride[2];
#pragma unroll
  for (int c = 0; c < DP / 8; ++c) {
    const int d = dph + 8 * c;
    if (d < p.D) out[d * p.dq_stride[3]] = from_float<T>(dq[c] * p.scale);
  }
}

// How the dbias kernel walks the batch: ng groups (the batch dims the bias has) times nb
// broadcast indices; row_bcast: the bias is broadcast over the queries too.
struct DbiasPlan {
  int ng = 1, nb = 1;
  bool bcast1 = false, bcast2 = false, row_bcast = false;

  PV_HOST_DEVICE void coords(int g, int b, int Z2, int& z1, int& z2) const {
    if (bcast1 && bcast2) {
      z1 = b / Z2, z2 = b % Z2;
    } else if (bcast1) {
      z1 = b, z2 = g;
    } else if (bcast2) {
      z1 = g, z2 = b;
    } else {
      z1 = g / Z2, z2 = g % Z2;
    }
  }
};

template <typename T, int DP, bool kTable>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kTable>)
    dbias_kernel(const SdpaParams p, const DbiasPlan plan) {
  constexpr int BM = Tiles<DP>::kQM, BN = Tiles<DP>::kQN, PER = BM * BN / kThreads;
  __shared__ BwdTiles<DP, BM, BN> t;
  const int num_m = static_cast<int>(ceil_div(p.Nq, BM));
  const int num_n = static_cast<int>(ceil_div(p.Nk, BN));
  const int tiles_m = plan.row_bcast ? 1 : num_m;
  const int col0 = static_cast<int>(blockIdx.x % num_n) * BN;
  const int mt = static_cast<int>(blockIdx.x / num_n % tiles_m);
  const int g = static_cast<int>(blockIdx.x / num_n / tiles_m);
  const int m_begin = plan.row_bcast ? 0 : mt, m_end = plan.row_bcast ? num_m : mt + 1;
  float acc[PER] = {};
  for (int b = 0; b < plan.nb; ++b) {
    int z1, z2;
    plan.coords(g, b, p.Z2, z1, z2);
    const std::int64_t z = std::int64_t{z1} * p.Z2 + z2;
    for (int m = m_begin; m < m_end; ++m) {
      __syncthreads();
      load_queries<DP, BM, BN, T>(t, p, z, z1, z2, m * BM, true);
      load_keys<DP, BM, BN, T>(t, p, z1, z2, col0);
      __syncthreads();
      probs_and_dscores<DP, BM, BN, T, kTable>(t, p, z, z1, z2, m * BM, col0);
      // Each thread reads back the elements it wrote itself: no barrier needed.
      for (int r = 0; r < PER; ++r) {
        const int e = threadIdx.x + kThreads * r;
        acc[r] += t.dss[e / BN * (BN + 1) + e % BN];
      }
    }
  }
  int z1, z2;
  plan.coords(g, 0, p.Z2, z1, z2);
  const std::int64_t base = z1 * p.db_stride[0] + z2 * p.db_stride[1];
  const auto store = [&](int row, int col, float value) {
    const std::int64_t off = base + row * p.db_stride[2] + col * p.db_stride[3];
    if (p.dbias_f32) {
      static_cast<float*>(p.dbias)[off] = value;
    } else {
      static_cast<T*>(p.dbias)[off] = from_float<T>(value);
    }
  };
  if (!plan.row_bcast) {
    for (int r = 0; r < PER; ++r) {
      const int e = threadIdx.x + kThreads * r, row = mt * BM + e / BN, col = col0 + e % BN;
      if (row < p.Nq && col < p.Nk) store(row, col, acc[r]);
    }
    return;
  }
  __syncthreads();
  for (int r = 0; r < PER; ++r) {
    const int e = threadIdx.x + kThreads * r;
    t.dss[e / BN * (BN + 1) + e % BN] = acc[r];
  }
  __syncthreads();
  const int j = threadIdx.x;
  if (j < BN && col0 + j < p.Nk) {
    float s = 0.f;
    for (int i = 0; i < BM; ++i) s += t.dss[i * (BN + 1) + j];
    store(0, col0 + j, s);
  }
}

// The relative-position table's gradient: thread (g, r) sums head group g's dS (the fp32
// scratch dbias_kernel wrote) over the logits that read table row r, in a fixed order:
// a patch offset's pairs in row-major query order, then the class token's row or column.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dtable_kernel(const SdpaParams p, const DbiasPlan plan) {
  const std::int64_t e = std::int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (e >= std::int64_t{plan.ng} * p.dtable_rows) return;
  const int g = static_cast<int>(e / p.dtable_rows), r = static_cast<int>(e % p.dtable_rows);
  int z1, z2;
  plan.coords(g, 0, p.Z2, z1, z2);
  const float* ds = static_cast<const float*>(p.dbias) + z1 * p.db_stride[0] + z2 * p.db_stride[1];
  const auto at = [&](int row, int col) { return ds[row * p.db_stride[2] + col * p.db_stride[3]]; };
  const int gh = p.rel_pos.gh, gw = p.rel_pos.gw, lead = p.rel_pos.lead;
  const int patch = static_cast<int>(p.rel_pos.offsets);
  float sum = 0.f;
  if (r == patch + 2) {
    sum = at(0, 0);
  } else if (r >= patch) {
    for (int t = 1; t <= gh * gw; ++t) sum += r == patch ? at(0, t) : at(t, 0);
  } else {
    const int dy = r / (2 * gw - 1) - (gh - 1), dx = r % (2 * gw - 1) - (gw - 1);
    // Queries whose key at (dy, dx) is inside the grid.
    for (int y = dy > 0 ? dy : 0; y < (dy < 0 ? gh + dy : gh); ++y) {
      for (int x = dx > 0 ? dx : 0; x < (dx < 0 ? gw + dx : gw); ++x) {
        const int i = y * gw + x;
        sum += at(lead + i, lead + i - (dy * gw + dx));
      }
    }
  }
  const std::int64_t off = z1 * p.dt_stride[0] + z2 * p.dt_stride[1] + r;
  if (p.dtable_f32) {
    static_cast<float*>(p.dtable)[off] = sum;
  } else {
    static_cast<T*>(p.dtable)[off] = from_float<T>(sum);
  }
}

// f(T{}, padded head dim, whether the bias is a relative-position table) as compile-time
// constants: the table's index arithmetic is its own kernel variant, so the dense-bias
// kernels' registers stay as they are.
template <typename F>
cudaError_t dispatch(const SdpaParams& p, const F& f) {
  return PV_DTYPE_SWITCH(p.dtype, T, [&] {
    const auto with_dp = [&](auto dp) {
      if (p.rel_pos.gh > 0) return f(T{}, dp, std::true_type{});
      return f(T{}, dp, std::false_type{});
    };
    if (p.D <= 32) return with_dp(std::integral_constant<int, 32>{});
    if (p.D <= 64) return with_dp(std::integral_constant<int, 64>{});
    return with_dp(std::integral_constant<int, 128>{});
  });
}

}  // namespace sdpa

cudaError_t scaled_dot_product_attention_fwd(const SdpaParams& p, cudaStream_t stream) {
  const std::int64_t z = std::int64_t{p.Z1} * p.Z2;
  if (z == 0 || p.Nq == 0) return cudaSuccess;
  return sdpa::dispatch(p, [&](auto t, auto dp, auto table) {
    using T = decltype(t);
    constexpr int DP = decltype(dp)::value;
    constexpr bool kTable = decltype(table)::value;
    if constexpr (std::is_same_v<T, float>) {
      const auto grid = static_cast<unsigned>(ceil_div(p.Nq, sdpa::Tiles<DP>::kFwdM) * z);
      PV_LAUNCH((sdpa::fwd_kernel<T, DP, kTable>), dim3(grid), dim3(sdpa::kThreads), 0, stream, p);
    } else {
      const auto grid = static_cast<unsigned>(ceil_div(p.Nq, 16 * sdpa::kWarps) * z);
      PV_LAUNCH((sdpa::fwd_mma_kernel<T, DP, kTable>), dim3(grid), dim3(sdpa::kThreads), 0, stream,
                p);
    }
    return cudaGetLastError();
  });
}

cudaError_t scaled_dot_product_attention_bwd(const SdpaParams& p, cudaStream_t stream) {
  const std::int64_t z = std::int64_t{p.Z1} * p.Z2;
  if (z == 0 || p.Nq == 0 || p.Nk == 0) return cudaSuccess;
  sdpa::DbiasPlan plan;
  plan.bcast1 = p.b_stride[0] == 0 && p.Z1 > 1;
  plan.bcast2 = p.b_stride[1] == 0 && p.Z2 > 1;
  // (a table view has no query axis: its gradient is reduced per logit first)
  plan.row_bcast = p.rel_pos.gh == 0 && p.b_stride[2] == 0 && p.Nq > 1;
  plan.nb = (plan.bcast1 ? p.Z1 : 1) * (plan.bcast2 ? p.Z2 : 1);
  plan.ng = static_cast<int>(z / plan.nb);
  return sdpa::dispatch(p, [&](auto t, auto dp, auto table) {
    using T = decltype(t);
    constexpr int DP = decltype(dp)::value;
    constexpr bool kTable = decltype(table)::value;
    using Tiles = sdpa::Tiles<DP>;
    const dim3 block(sdpa::kThreads);
    const std::int64_t num_m = ceil_div(p.Nq, Tiles::kQM), num_n = ceil_div(p.Nk, Tiles::kQN);
    // dq first: it forms delta, which the other two read.
    PV_LAUNCH((sdpa::dq_kernel<T, DP, kTable>), dim3(static_cast<unsigned>(num_m * z)), block, 0,
              stream, p);
    cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
    const auto kv_grid = static_cast<unsigned>(ceil_div(p.Nk, Tiles::kKvN) * z);
    PV_LAUNCH((sdpa::dkdv_kernel<T, DP, kTable>), dim3(kv_grid), block, 0, stream, p);
    if ((error = cudaGetLastError()) != cudaSuccess || p.dbias == nullptr) return error;
    const std::int64_t blocks = plan.ng * (plan.row_bcast ? 1 : num_m) * num_n;
    PV_LAUNCH((sdpa::dbias_kernel<T, DP, kTable>), dim3(static_cast<unsigned>(blocks)), block, 0,
              stream, p, plan);
    if ((error = cudaGetLastError()) != cudaSuccess || p.dtable == nullptr) return error;
    const std::int64_t entries = std::int64_t{plan.ng} * p.dtable_rows;
    const auto table_grid = static_cast<unsigned>(ceil_div(entries, sdpa::kThreads));
    PV_LAUNCH((sdpa::dtable_kernel<T>), dim3(table_grid), block, 0, stream, p, plan);
    return cudaGetLastError();
  });
}

}  // namespace pyvit
