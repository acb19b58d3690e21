// Swin window attention kernels (interface in window_attention.cuh).
//
// Nothing is materialised: a block finds the tokens of its window by index arithmetic.
// Slot t of window (b, wy, wx) sits at (py, px) = (wy*wh + t / ww, wx*ww + t % ww) of the
// rolled, padded grid; inside the H x W grid it is the original token
// ((py + sh) mod H, (px + sw) mod W), read from q / k / v through their strides (so they
// may be slices of one packed projection) and written back to the same position of the
// output, which undoes the roll and the crop. Outside it is a padded token whose key /
// value is the pad_k / pad_v row of its head. The relative position bias is gathered
// from the table with index pos(i) - pos(j) + const, pos(t) = ty * (2ww - 1) + tx. Shift
// regions: on the padded grid only the last window row (column) is split, at wh - sh
// (ww - sw), exactly where timm's get_attn_mask puts its boundaries.
//
// Plain CUDA C++ with FMA, no tensor-core instructions, so that the same source runs
// under the host emulation in tests; the Triton kernel (tensor cores) is dispatched
// first on GPUs. Scores, softmax and every product accumulate in fp32.
//
// Forward: one 128-thread block per (window, head); heads vary fastest over blocks so a
// window's blocks run together and share the L2 lines of its tokens. q, k (and v) are
// staged in shared memory as fp32, 32 head-dim columns at a time; a thread owns a
// 4-query x 8-key tile of the scores in registers, so the whole window's softmax is
// exact in one pass (row max / sum across the 8 threads of a row group, in a fixed
// order). Probabilities go to shared memory, and a thread then owns a 4-query x
// 4-column tile of the output. q, k, v are read once and the output is written once;
// each score row's max m and log2 of its sum l are written for the backward, apart: the
// backward recomputes the same scores bit for bit, so s - m is exact even where scores
// near 1e5 would round m + log2(l) by a visible fraction of a probability.
//
// Cosine attention (Swin V2; template flag kCosine) takes the row norms from the staged
// tiles while the products accumulate (each thread sums the squares of the q rows and
// k columns it reads anyway) and scales the products by gain / (|q_i| |k_j|) (norms
// clamped at eps) before the bias. Its backward stages q and k normalised for the
// gradient products, so dq_hat = gain dS k_hat and dk_hat = gain dS^T q_hat, and finishes
// them through the normalisation: dx = (dx_hat - x_hat (x_hat . dx_hat)) / |x|, where
// x_hat . dx_hat is the row (column) sum of dS * (gain cos) and the sum of all of them
// is the gradient of log(gain), written per block and added in block order.
//
// Backward: one block per (group of consecutive windows, head). Each window recomputes
// the scores from q, k and the row statistics, and dP = dO v^T in the same tile layout; the row
// term delta_i = sum_j P_ij dP_ij comes from these fp32 tiles, so the saved output is
// not read (nor its rounding to the input dtype felt). dq, dk, dv of a window's real
// tokens belong to that window alone and are written directly. The two reductions are
// deterministic without atomics: each block accumulates the table
// gradient (a thread owns table rows, summing dS over that row's pairs in a fixed
// order) and the pad gradients (fixed-order sums through shared memory, added by their
// owner thread) over its windows, writes one partial per block, and an ordered
// column-sum kernel adds the partials in block order.
//
// Element offsets inside one image are int32, the batch offset is int64.
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "window_attention.cuh"

namespace pyvit {
namespace window_attention_detail {

constexpr int kThreads = 128;  // 16 row units x 8 column lanes
constexpr int kTile = kWindowAttentionMaxArea;  // tokens per (padded) window tile
constexpr int kChunk = 32;             // head-dim columns staged at a time
constexpr int kPStride = kTile + 4;    // probability rows: 17 16-byte units, odd
constexpr int kVStride = kChunk + 4;   // forward's row-major v chunk
constexpr int kMaxTableRows = 256;     // (2wh - 1)(2ww - 1) <= 225 when wh * ww <= 64
constexpr int kSlotInts = 3 * kTile;   // source row, source column, bias / region code
constexpr int kRowPartials = kThreads * 4;  // one per (thread, score row)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNormEps = 1e-12f;  // F.normalize's: x / max(|x|, eps)
// Backward blocks to aim at: enough waves for any GPU, while the per-block partials stay
// ~1% of the backward's traffic. The grouping depends on the shape only, so results are
// bitwise the same on every GPU. The host-emulation build aims at 4 blocks unless told
// to use the GPU's value, so that test-sized problems walk several windows per block,
// with a ragged last group.
constexpr int kBackwardBlocks = 4096;
#ifdef PYVIT_HOST_EMULATION
inline int backward_blocks() { return pyvit_host::test_constant(4, kBackwardBlocks); }
#else
constexpr int backward_blocks() { return kBackwardBlocks; }
#endif
constexpr int kSumColumns = 32, kSumRows = 8;  // ordered column-sum block

static_assert(kTile == 64 && kThreads == 128, "the tile layout below assumes 64 x 64");
static_assert(kRowPartials <= 2 * (kTile / 4) * kChunk, "row partials reuse the pad sums");

// ---- tile layout ---------------------------------------------------------------------
// The 64 token slots form 16 units of 4: unit u holds tokens token_of(u, c) =
// (u / 8) * 32 + u % 8 + 8c (c < 4), stored at columns 4u + c of the transposed (d-major)
// tiles. Thread (it, jt) = (tid / 8, tid % 8) owns the score rows of unit it and the
// keys of units jt and 8 + jt; the 8 threads of a row group then read 8 distinct 16-byte
// units per key load and store their probabilities to rows 8 apart of a 17-unit-stride
// tile, both without bank conflicts.
PV_HOST_DEVICE int token_of(int unit, int c) { return ((unit >> 3) << 5) + (unit & 7) + 8 * c; }
PV_HOST_DEVICE int column_of(int t) { return ((((t & 32) >> 2) | (t & 7)) << 2) | ((t >> 3) & 3); }
// Key c (< 8) of column lane jt.
PV_HOST_DEVICE int key_of(int jt, int c) { return token_of(jt + ((c >> 2) << 3), c & 3); }
// Row d of a transposed tile XORs the 16-byte unit with its quad index (d / 4) mod 8:
// staging warps (lanes over 8 quads x 4 tokens) store to 32 distinct banks, and reads of
// 4 consecutive rows at one column by 8 lanes hit 8 distinct banks.
PV_HOST_DEVICE int swizzled(int column, int d) { return column ^ (((d >> 2) & 7) << 2); }

struct alignas(16) Quad {
  float v[4];
};

PV_DEVICE Quad load_quad(const float* p) { return *reinterpret_cast<const Quad*>(p); }
PV_DEVICE void store_quad(float* p, const Quad& q) { *reinterpret_cast<Quad*>(p) = q; }

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// ---- kernel arguments ----------------------------------------------------------------
struct View {
  const void* data;
  std::int64_t batch;
  int y, x, head, d;
  bool vec4;  // d-stride 1, rows 4-element aligned: 4 elements per load
};

struct Geometry {
  int H, W, heads, D, wh, ww, sh, sw, n_wh, n_ww, N, R, num_windows;
  float scale, mask_value;
  int grad_token;  // elements between tokens of dq / dk / dv
  bool out_vec4;  // outputs take 4-element stores (D % 4 == 0, aligned outputs)
};

struct FwdArgs {
  Geometry g;
  View q, k, v;
  const float *table, *pad_k, *pad_v, *gain;
  void* out;
  float* lse;
};

struct BwdArgs {
  Geometry g;
  View q, k, v, dout;
  const float *table, *pad_k, *pad_v, *gain;
  const float* lse;
  void *dq, *dk, *dv;
  float* table_partial;  // (groups, R, heads) or null
  float* pad_partial;    // (groups, 2, heads, D) or null
  float* gain_partial;   // (groups, heads) or null
  int windows_per_block;
};

// ---- per-window setup ----------------------------------------------------------------
struct Window {
  int b;
  bool has_padding;  // some slots are padded tokens
};

// Slot tables of window w in shared memory: source row (-1: padded or past N), source
// column, and code = pos << 2 | shift region. Threads 0..63 write them.
PV_DEVICE Window setup_window(const Geometry& g, int w, int* sy, int* sx, int* code) {
  const int per_image = g.n_wh * g.n_ww;
  const int b = w / per_image;
  const int wy = (w - b * per_image) / g.n_ww;
  const int wx = w - b * per_image - wy * g.n_ww;
  const int t = threadIdx.x;
  if (t < kTile) {
    int y = -1, x = 0, c = 0;
    if (t < g.N) {
      const int ty = t / g.ww, tx = t - ty * g.ww;
      const int py = wy * g.wh + ty, px = wx * g.ww + tx;
      if (py < g.H && px < g.W) {
        // Rolling by -shift put original token (p + shift) mod size at p.
        y = py + g.sh >= g.H ? py + g.sh - g.H : py + g.sh;
        x = px + g.sw >= g.W ? px + g.sw - g.W : px + g.sw;
      }
      const int region = (wy == g.n_wh - 1 && ty >= g.wh - g.sh ? 2 : 0) +
                         (wx == g.n_ww - 1 && tx >= g.ww - g.sw ? 1 : 0);
      c = ((ty * (2 * g.ww - 1) + tx) << 2) | region;
    }
    sy[t] = y;
    sx[t] = x;
    code[t] = c;
  }
  return {b, (wy == g.n_wh - 1 && g.H % g.wh != 0) || (wx == g.n_ww - 1 && g.W % g.ww != 0)};
}

// The head's column of the table.
PV_DEVICE void stage_table(const Geometry& g, const float* table, int h, float* table_s) {
  for (int r = threadIdx.x; r < g.R; r += kThreads) table_s[r] = table[r * g.heads + h];
}

// The front of both kernels' shared memory: per token slot its source row, column and
// bias / region code (setup_window fills them), then the head's column of the table,
// staged here. The kernels carve their own buffers from `rest`.
struct SharedFront {
  int* sy;
  int* sx;
  int* code;
  float* table;
  float* rest;
};
PV_DEVICE SharedFront shared_front(float* smem, const Geometry& g, const float* table, int h) {
  int* slots = reinterpret_cast<int*>(smem);
  float* table_s = smem + kSlotInts;
  if (table != nullptr) stage_table(g, table, h, table_s);
  return {slots, slots + kTile, slots + 2 * kTile, table_s, table_s + kMaxTableRows};
}

// ---- global <-> shared ---------------------------------------------------------------
// Elements d0..d0+3 of token slot t as fp32: the token's row, the pad row for a padded
// slot (zeros without pads), zeros past N or past D.
template <typename T>
PV_DEVICE Quad load_token(const Geometry& g, const View& view, const float* pad, int b, int h,
                          int t, int d0, const int* sy, const int* sx) {
  Quad q = {{0.f, 0.f, 0.f, 0.f}};
  if (t >= g.N || d0 >= g.D) return q;
  const int y = sy[t];
  if (y < 0) {
    if (pad != nullptr) {
#pragma unroll
      for (int e = 0; e < 4; ++e) q.v[e] = d0 + e < g.D ? pad[h * g.D + d0 + e] : 0.f;
    }
    return q;
  }
  const T* __restrict__ p = static_cast<const T*>(view.data) + b * view.batch +
                            (y * view.y + sx[t] * view.x + h * view.head);
  if (view.vec4) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(p + d0);
#pragma unroll
    for (int e = 0; e < 4; ++e) q.v[e] = to_float(x.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) q.v[e] = d0 + e < g.D ? to_float(p[(d0 + e) * view.d]) : 0.f;
  }
  return q;
}

// Columns c0..c0+31 of all 64 slots into a transposed tile tile[d][swizzled column]; a
// warp handles one unit per step: 4 tokens x 8 quads, each token's 32 columns read by
// 8 adjacent lanes. With `norm` (one per slot), rows are divided by their norm.
template <typename T>
PV_DEVICE void stage_transposed(const Geometry& g, const View& view, const float* pad, int b,
                                int h, int c0, const int* sy, const int* sx, float* tile,
                                const float* norm = nullptr) {
  const int lane = threadIdx.x & 31, c = lane & 3, dq = lane >> 2;
  // A fixed trip count: unrolled, so a thread's loads are all in flight at once.
#pragma unroll
  for (int step = 0; step < (kTile / 4) / (kThreads / 32); ++step) {
    const int u = (threadIdx.x >> 5) + step * (kThreads / 32);
    const int t = token_of(u, c);
    Quad x = load_token<T>(g, view, pad, b, h, t, c0 + 4 * dq, sy, sx);
    if (norm != nullptr) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x.v[e] /= norm[t];
    }
    const int column = swizzled((u << 2) | c, 4 * dq);
#pragma unroll
    for (int e = 0; e < 4; ++e) tile[(4 * dq + e) * kTile + column] = x.v[e];
  }
}

// Columns c0..c0+31 of the N slots into a row-major tile rows[t][d] (the forward's v).
template <typename T>
PV_DEVICE void stage_rows(const Geometry& g, const View& view, const float* pad, int b, int h,
                          int c0, const int* sy, const int* sx, float* rows) {
  // Unrolled by 2 only: fully unrolled, ptxas spills on sm_90.
#pragma unroll 2
  for (int step = 0; step < kTile * (kChunk / 4) / kThreads; ++step) {
    const int i = threadIdx.x + step * kThreads;
    const int t = i / (kChunk / 4), dq = i % (kChunk / 4);
    if (t < g.N) {
      store_quad(rows + t * kVStride + 4 * dq,
                 load_token<T>(g, view, pad, b, h, t, c0 + 4 * dq, sy, sx));
    }
  }
}

template <typename T>
PV_DEVICE void store_token(T* p, const float (&v)[4], int count, bool vec4) {
  if (vec4 && count == 4) {
    Vec4<T> x;
#pragma unroll
    for (int e = 0; e < 4; ++e) x.v[e] = from_float<T>(v[e]);
    *reinterpret_cast<Vec4<T>*>(p) = x;
  } else {
    for (int e = 0; e < count; ++e) p[e] = from_float<T>(v[e]);
  }
}

// Element (y, x, h, d) of image b of a contiguous (B, H, W, heads, D) output.
template <typename T>
PV_DEVICE T* output_at(const Geometry& g, void* base, int token, int b, int y, int x, int h,
                       int d) {
  return static_cast<T*>(base) + b * (std::int64_t{g.H} * g.W * token) + (y * g.W + x) * token +
         h * g.D + d;
}

// ---- products ------------------------------------------------------------------------
// Sums of squares of a thread's 4 score rows (its a columns) and 8 keys (its b columns):
// cosine attention's norms, from the values the products read anyway.
struct SquareSums {
  float row[4] = {0.f, 0.f, 0.f, 0.f};
  float key[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
};

// acc[r][c] += sum_d at[d][row r of unit it] * bt[d][key c of lane jt] over dc columns
// of two transposed tiles (and, kSquares, sq += their squares). kHalves == 1 skips the
// keys past 32 (windows of <= 32 slots).
template <int kHalves, bool kSquares>
PV_DEVICE void accumulate_pairs(const float* at, const float* bt, int dc, int it, int jt,
                                float (&acc)[4][8], SquareSums& sq) {
  for (int dq = 0; dq < (dc + 3) / 4; ++dq) {
    const int x = dq & 7;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int d = 4 * dq + e;
      const Quad a = load_quad(at + d * kTile + ((it ^ x) << 2));
      if constexpr (kSquares) {
#pragma unroll
        for (int r = 0; r < 4; ++r) sq.row[r] += a.v[r] * a.v[r];
      }
#pragma unroll
      for (int half = 0; half < kHalves; ++half) {
        const Quad k = load_quad(bt + d * kTile + (((8 * half + jt) ^ x) << 2));
        if constexpr (kSquares) {
#pragma unroll
          for (int c = 0; c < 4; ++c) sq.key[4 * half + c] += k.v[c] * k.v[c];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][4 * half + c] += a.v[r] * k.v[c];
        }
      }
    }
  }
}

template <bool kSquares = false>
PV_DEVICE void accumulate_scores(const Geometry& g, const float* at, const float* bt, int dc,
                                 int it, int jt, float (&acc)[4][8], SquareSums& sq) {
  if (g.N > kTile / 2) {
    accumulate_pairs<2, kSquares>(at, bt, dc, it, jt, acc, sq);
  } else {
    accumulate_pairs<1, kSquares>(at, bt, dc, it, jt, acc, sq);
  }
}

// max(|x|, eps) from the sum of squares of x.
PV_DEVICE float clamped_norm(float sum_sq) { return fmaxf(sqrtf(sum_sq), kNormEps); }

// q k^T products -> scores without bias and mask, in place: times scale, or for cosine
// attention the cosine (q_i k_j / max(|q_i|, eps) / max(|k_j|, eps)) times the gain, last:
// one rounding at the scores' magnitude (gain up to 100), as the reference's.
template <bool kCosine>
PV_DEVICE void scale_scores(const Geometry& g, const float* gain, int h, const SquareSums& sq,
                            float (&s)[4][8]) {
  if constexpr (kCosine) {
    float key[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) key[c] = 1.f / clamped_norm(sq.key[c]);
    const float head_gain = gain[h];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float row = 1.f / clamped_norm(sq.row[r]);
#pragma unroll
      for (int c = 0; c < 8; ++c) s[r][c] = s[r][c] * row * key[c] * head_gain;
    }
  } else {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < 8; ++c) s[r][c] *= g.scale;
    }
  }
}

// The score of row r, key c of the thread's tile from its scaled product x: + bias,
// + mask between regions; -inf for keys past N (so they get probability 0).
PV_DEVICE float biased_score(const Geometry& g, const float* table_s, const int* code, int it,
                             int jt, int r, int c, float x) {
  const int row_code = code[token_of(it, r)], key_code = code[key_of(jt, c)];
  if (table_s != nullptr) {
    const int center = (g.wh - 1) * (2 * g.ww - 1) + g.ww - 1;
    x += table_s[(row_code >> 2) - (key_code >> 2) + center];
  }
  if ((row_code ^ key_code) & 3) x += g.mask_value;
  return key_of(jt, c) < g.N ? x : -INFINITY;
}

// acc[r][e] = sum_{n < N} a[n][4 it + r] * B(n)[e]: rows of unit it, 4 columns.
template <typename LoadB>
PV_DEVICE void accumulate_rows(const float* a, int N, int it, const LoadB& load_b,
                               float (&acc)[4][4]) {
#pragma unroll 2
  for (int n = 0; n < N; ++n) {
    const Quad x = load_quad(a + n * kPStride + 4 * it);
    const Quad y = load_b(n);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][e] += x.v[r] * y.v[e];
    }
  }
}

// Columns 4 dt..4 dt+3 of token n in a transposed tile (4 conflict-free scalar reads).
PV_DEVICE Quad transposed_column(const float* tile, int n, int dt) {
  const int column = swizzled(column_of(n), 4 * dt);
  return {{tile[(4 * dt) * kTile + column], tile[(4 * dt + 1) * kTile + column],
           tile[(4 * dt + 2) * kTile + column], tile[(4 * dt + 3) * kTile + column]}};
}

// Probability-like tile p (rows of unit it, keys of lane jt) to shared memory with the
// query index major (dst[i][column of j]) or the key index major (dst[j][column of i]).
PV_DEVICE void store_query_major(const Geometry& g, const float (&p)[4][8], int it, int jt,
                                 float* dst) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = token_of(it, r);
    if (i < g.N) {
      store_quad(dst + i * kPStride + 4 * jt, {{p[r][0], p[r][1], p[r][2], p[r][3]}});
      store_quad(dst + i * kPStride + 32 + 4 * jt, {{p[r][4], p[r][5], p[r][6], p[r][7]}});
    }
  }
}

PV_DEVICE void store_key_major(const Geometry& g, const float (&p)[4][8], int it, int jt,
                               float* dst) {
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int j = key_of(jt, c);
    if (j < g.N) store_quad(dst + j * kPStride + 4 * it, {{p[0][c], p[1][c], p[2][c], p[3][c]}});
  }
}

// Row reductions: a row's 64 keys are spread over the 8 threads of its row group. Each
// publishes its 4 row partials in `partials` (kRowPartials floats); after the barrier
// every thread of the group combines the group's 8 in lane order, so all get the same
// bits, run after run. Shared memory rather than shuffles: about the same cost here,
// and far cheaper under the host emulation (a shuffle is two warp barriers there).
template <typename Combine>
PV_DEVICE Quad reduce_rows(const Quad& part, float* partials, int it, const Combine& combine) {
  store_quad(partials + 4 * threadIdx.x, part);
  __syncthreads();
  Quad total = load_quad(partials + 4 * (8 * it));
  for (int lane = 1; lane < 8; ++lane) {
    const Quad other = load_quad(partials + 4 * (8 * it + lane));
#pragma unroll
    for (int r = 0; r < 4; ++r) total.v[r] = combine(total.v[r], other.v[r]);
  }
  return total;
}

PV_DEVICE float add(float a, float b) { return a + b; }

// Softmax of the score rows in place (probabilities), their max m and log2 of their sum
// of exp(s - m); `partials`: two kRowPartials buffers (one barrier each). Scores stay in
// natural units (a score near 1e5 is rounded as the reference rounds it); only the
// differences s - m <= 0 are scaled to base 2 for exp2.
PV_DEVICE void softmax_rows(float (&s)[4][8], float* partials, int it, Quad& m, Quad& log2_l) {
  Quad part;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    part.v[r] = -INFINITY;
#pragma unroll
    for (int c = 0; c < 8; ++c) part.v[r] = fmaxf(part.v[r], s[r][c]);
  }
  // Finite: every row has the key of its own slot.
  m = reduce_rows(part, partials, it, [](float a, float b) { return fmaxf(a, b); });
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    part.v[r] = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      s[r][c] = exp2f((s[r][c] - m.v[r]) * kLog2e);
      part.v[r] += s[r][c];
    }
  }
  const Quad l = reduce_rows(part, partials + kRowPartials, it, add);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float inv = 1.f / l.v[r];
#pragma unroll
    for (int c = 0; c < 8; ++c) s[r][c] *= inv;
    log2_l.v[r] = log2f(l.v[r]);
  }
}

// ---- shared-memory layouts -------------------------------------------------------------
constexpr PV_HOST_DEVICE int larger(int a, int b) { return a < b ? b : a; }
constexpr PV_HOST_DEVICE int probability_floats(int N) {
  return larger(2 * kChunk * kTile, N * kPStride);
}

// Forward: slots | table | q^T, k^T (then probabilities) | v rows | softmax partials.
constexpr PV_HOST_DEVICE int fwd_smem_floats(int N) {
  return kSlotInts + kMaxTableRows + probability_floats(N) + N * kVStride + 2 * kRowPartials;
}

// Backward: slots | table | cosine statistics | q^T | k^T | dout^T | v^T (then P / dS) |
// pad sums (before the products: row partials).
constexpr int kCosineStats = 4;  // per slot: |q| and |k| clamped at eps, x_hat . dx_hat of q, k
constexpr PV_HOST_DEVICE int bwd_x_floats(int N) { return larger(kChunk * kTile, N * kPStride); }
constexpr PV_HOST_DEVICE int bwd_smem_floats(int N) {
  return kSlotInts + kMaxTableRows + kCosineStats * kTile + 3 * kChunk * kTile + bwd_x_floats(N) +
         2 * (kTile / 4) * kChunk;
}
// Launches stay within the 48 KB every GPU grants without an opt-in attribute.
static_assert(4 * fwd_smem_floats(kTile) <= 48 * 1024 && 4 * bwd_smem_floats(kTile) <= 48 * 1024,
              "a block's shared memory must fit the default 48 KB");

// ---- kernels -----------------------------------------------------------------------------
template <typename T, bool kCosine>
__global__ void __launch_bounds__(kThreads) window_attention_fwd_kernel(const FwdArgs a) {
  const Geometry& g = a.g;
  PV_DYNAMIC_SHARED(float, smem);
  const int tid = threadIdx.x, it = tid >> 3, jt = tid & 7;
  const int h = blockIdx.x % g.heads, w = blockIdx.x / g.heads;
  const auto [sy, sx, code, table_s, qt] = shared_front(smem, g, a.table, h);
  float* kt = qt + kChunk * kTile;
  float* pt = qt;  // probabilities replace q^T, k^T once the scores are done
  float* vs = qt + probability_floats(g.N);
  float* partials = vs + g.N * kVStride;
  const Window win = setup_window(g, w, sy, sx, code);
  __syncthreads();

  float s[4][8] = {};
  SquareSums sq;
  for (int c0 = 0; c0 < g.D; c0 += kChunk) {
    if (c0 > 0) __syncthreads();  // the previous chunk's products are done
    stage_transposed<T>(g, a.q, nullptr, win.b, h, c0, sy, sx, qt);
    stage_transposed<T>(g, a.k, a.pad_k, win.b, h, c0, sy, sx, kt);
    // The first v chunk is loaded together with q and k: one round trip for all three.
    if (c0 == 0) stage_rows<T>(g, a.v, a.pad_v, win.b, h, 0, sy, sx, vs);
    __syncthreads();
    accumulate_scores<kCosine>(g, qt, kt, min(kChunk, g.D - c0), it, jt, s, sq);
  }
  scale_scores<kCosine>(g, a.gain, h, sq, s);
  const float* bias = a.table != nullptr ? table_s : nullptr;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int c = 0; c < 8; ++c) s[r][c] = biased_score(g, bias, code, it, jt, r, c, s[r][c]);
  }

  Quad m, log2_l;
  softmax_rows(s, partials, it, m, log2_l);  // its barriers also end the reads of q^T, k^T
  store_key_major(g, s, it, jt, pt);
  if (jt == 0) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = token_of(it, r);
      if (i < g.N) {
        float* stats = a.lse + (static_cast<std::int64_t>(blockIdx.x) * g.N + i) * 2;
        stats[0] = m.v[r];
        stats[1] = log2_l.v[r];
      }
    }
  }
  __syncthreads();

  const int dt = jt;
  for (int c0 = 0; c0 < g.D; c0 += kChunk) {
    if (c0 > 0) {
      __syncthreads();  // the previous chunk's products are done
      stage_rows<T>(g, a.v, a.pad_v, win.b, h, c0, sy, sx, vs);
      __syncthreads();
    }
    const int count = min(4, g.D - c0 - 4 * dt);
    if (count <= 0) continue;
    float o[4][4] = {};
    accumulate_rows(pt, g.N, it, [&](int n) { return load_quad(vs + n * kVStride + 4 * dt); }, o);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = token_of(it, r);
      if (i < g.N && sy[i] >= 0) {
        T* dst = output_at<T>(g, a.out, g.heads * g.D, win.b, sy[i], sx[i], h, c0 + 4 * dt);
        store_token(dst, o[r], count, g.out_vec4);
      }
    }
  }
}

// A dq / dk chunk (rows of unit it, columns 4 dt..4 dt+3) from acc = dS times the other
// side's staged rows. V1: times the scale (`factor`). Cosine, the staged rows normalised:
// dx_hat = gain acc, and the gradient of x = n x_hat (n = max(|x|, eps), in `norm`) is
// (dx_hat - x_hat (x_hat . dx_hat)) / n with x_hat from this side's tile `hat` and
// x_hat . dx_hat from `proj`; where |x| <= eps, n is the constant eps: no projection.
// Padded slots (sy < 0) keep dx_hat: the pad row's gradient goes through the
// normalisation once, from the sum over every padded slot (window_attention_bwd).
template <bool kCosine>
PV_DEVICE void finish_gradient(float (&acc)[4][4], float factor, const float* hat,
                               const float* norm, const float* proj, const int* sy, int it,
                               int dt) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = token_of(it, r);
    if (kCosine && sy[i] >= 0) {
      const float n = norm[i], x_dot = n > kNormEps ? proj[i] : 0.f;
      const Quad x = transposed_column(hat, i, dt);
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][e] = (factor * acc[r][e] - x.v[e] * x_dot) / n;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][e] *= factor;
    }
  }
}

// Writes rows of unit it (real tokens only) of a dq / dk / dv chunk and, for padded
// slots, their column sums into pad_sum[it][...] (when pad_sum is not null).
template <typename T>
PV_DEVICE void store_gradient_rows(const Geometry& g, void* base, const float (&v)[4][4], int b,
                                   int h, int c0, int it, int dt, const int* sy, const int* sx,
                                   float* pad_sum) {
  const int count = min(4, g.D - c0 - 4 * dt);
  float pad[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = token_of(it, r);
    if (i >= g.N) continue;
    if (sy[i] >= 0) {
      if (count > 0) {
        T* dst = output_at<T>(g, base, g.grad_token, b, sy[i], sx[i], h, c0 + 4 * dt);
        store_token(dst, v[r], count, g.out_vec4);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) pad[e] += v[r][e];
    }
  }
  if (pad_sum != nullptr) {
    store_quad(pad_sum + it * kChunk + 4 * dt, {{pad[0], pad[1], pad[2], pad[3]}});
  }
}

// Two blocks per SM: ptxas may use up to 255 registers; with the thread count alone its
// occupancy heuristic holds the cosine backward at 168 and spills.
template <typename T, bool kCosine>
__global__ void __launch_bounds__(kThreads, 2) window_attention_bwd_kernel(const BwdArgs a) {
  const Geometry& g = a.g;
  PV_DYNAMIC_SHARED(float, smem);
  const int tid = threadIdx.x, it = tid >> 3, jt = tid & 7, dt = jt;
  const int h = blockIdx.x % g.heads, group = blockIdx.x / g.heads;
  const auto [sy, sx, code, table_s, stats] = shared_front(smem, g, a.table, h);
  // Cosine attention, per slot: |q| and |k| clamped at eps, and x_hat . dx_hat of q and k.
  float* q_norm = stats;
  float* k_norm = q_norm + kTile;
  float* q_proj = k_norm + kTile;
  float* k_proj = q_proj + kTile;
  float* qt = stats + kCosineStats * kTile;
  float* kt = qt + kChunk * kTile;
  float* dot = kt + kChunk * kTile;
  float* x = dot + kChunk * kTile;  // v^T, then P / dS in the layout each product needs
  float* pad_sum = x + bwd_x_floats(g.N);  // [k / v][unit][column]
  const int w_begin = group * a.windows_per_block;
  const int w_end = min(w_begin + a.windows_per_block, g.num_windows);
  const float* bias = a.table != nullptr ? table_s : nullptr;
  // dq and dk are dS times the other side's rows, times this (V1: the scale).
  const float factor = kCosine ? a.gain[h] : g.scale;

  // Table rows tid and tid + 128 of this head: this thread sums their gradient.
  float dtable[2] = {0.f, 0.f};
  int rel_y[2], rel_x[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int r = tid + k * kThreads;
    rel_y[k] = r / (2 * g.ww - 1) - (g.wh - 1);
    rel_x[k] = r % (2 * g.ww - 1) - (g.ww - 1);
  }
  // This block's pad-gradient partial; column d is owned (zeroed, then accumulated) by
  // thread d % 32.
  float* pad_partial = a.pad_partial;
  if (pad_partial != nullptr) {
    pad_partial += static_cast<std::int64_t>(group) * 2 * g.heads * g.D;
    if (tid < 32) {
      for (int d = tid; d < g.D; d += 32) {
        pad_partial[h * g.D + d] = 0.f;
        pad_partial[(g.heads + h) * g.D + d] = 0.f;
      }
    }
  }
  float dlog_gain = 0.f;  // thread 0's sum over the block's windows, in window order

  const int chunks = (g.D + kChunk - 1) / kChunk;
  for (int w = w_begin; w < w_end; ++w) {
    __syncthreads();  // the previous window's shared-memory reads are done
    const Window win = setup_window(g, w, sy, sx, code);
    // The forward's row statistics; m = +inf on rows past N: p = 0 there.
    float row_m[4], row_log2_l[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = token_of(it, r);
      const float* row = a.lse + ((static_cast<std::int64_t>(w) * g.heads + h) * g.N + i) * 2;
      row_m[r] = i < g.N ? row[0] : INFINITY;
      row_log2_l[r] = i < g.N ? row[1] : 0.f;
    }
    __syncthreads();

    float p[4][8] = {}, ds[4][8] = {};
    SquareSums sq;
    for (int c0 = 0; c0 < g.D; c0 += kChunk) {
      if (c0 > 0) __syncthreads();
      stage_transposed<T>(g, a.q, nullptr, win.b, h, c0, sy, sx, qt);
      stage_transposed<T>(g, a.k, a.pad_k, win.b, h, c0, sy, sx, kt);
      stage_transposed<T>(g, a.dout, nullptr, win.b, h, c0, sy, sx, dot);
      stage_transposed<T>(g, a.v, a.pad_v, win.b, h, c0, sy, sx, x);
      __syncthreads();
      const int dc = min(kChunk, g.D - c0);
      accumulate_scores<kCosine>(g, qt, kt, dc, it, jt, p, sq);
      accumulate_scores(g, dot, x, dc, it, jt, ds, sq);  // dP = dout v^T
    }
    // p: the scores without bias and mask, as in the forward (bit for bit, so s - m is
    // exact); P = exp2((s - m) log2(e) - log2(l)) is computed twice, for delta and then
    // for dS.
    scale_scores<kCosine>(g, a.gain, h, sq, p);
    if constexpr (kCosine) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if (jt == 0) q_norm[token_of(it, r)] = clamped_norm(sq.row[r]);
      }
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        if (it == 0) k_norm[key_of(jt, c)] = clamped_norm(sq.key[c]);
      }
    }
    Quad part;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      part.v[r] = 0.f;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const float s = biased_score(g, bias, code, it, jt, r, c, p[r][c]);
        part.v[r] += exp2f((s - row_m[r]) * kLog2e - row_log2_l[r]) * ds[r][c];
      }
    }
    // delta_i = sum_j P_ij dP_ij: equal to the usual rowsum(dout * out) since out = P v,
    // but from the fp32 P and dP of this block instead of the output rounded to the
    // input dtype, and without reading out.
    const Quad delta = reduce_rows(part, pad_sum, it, add);
    // Cosine: x_hat . dx_hat, the row and column sums of dS * gain cos (p before the bias).
    Quad row_proj = {{0.f, 0.f, 0.f, 0.f}};
    float col_proj[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const float s = biased_score(g, bias, code, it, jt, r, c, p[r][c]);
        const float prob = exp2f((s - row_m[r]) * kLog2e - row_log2_l[r]);
        const float d = prob * (ds[r][c] - delta.v[r]);
        if constexpr (kCosine) {
          row_proj.v[r] += d * p[r][c];
          col_proj[c] += d * p[r][c];
        }
        p[r][c] = prob;
        ds[r][c] = d;
      }
    }
    if constexpr (kCosine) {
      row_proj = reduce_rows(row_proj, pad_sum + kRowPartials, it, add);
      if (jt == 0) {
#pragma unroll
        for (int r = 0; r < 4; ++r) q_proj[token_of(it, r)] = row_proj.v[r];
      }
      // Column partials of the 16 row units: x is free until the products below.
#pragma unroll
      for (int c = 0; c < 8; ++c) x[8 * tid + c] = col_proj[c];
      __syncthreads();
      if (tid < kTile) {
        // Key tid is key c of lane jt: column_of(tid) = 4 unit + c % 4, unit = jt + 8 (c / 4).
        const int column = column_of(tid), unit = column >> 2;
        const int c = ((unit >> 3) << 2) | (column & 3), lane = unit & 7;
        float sum = 0.f;
        for (int u = 0; u < kTile / 4; ++u) sum += x[8 * (8 * u + lane) + c];
        k_proj[tid] = sum;
      }
      if (tid == 0) {
        for (int i = 0; i < g.N; ++i) dlog_gain += q_proj[i];
      }
    }

    const bool pad_grad = pad_partial != nullptr && win.has_padding;
    for (int c0 = 0; c0 < g.D; c0 += kChunk) {
      if (chunks > 1 || kCosine) {
        // The score loop left the last chunk staged, as read: stage this one again (for
        // cosine attention q and k normalised).
        __syncthreads();
        stage_transposed<T>(g, a.q, nullptr, win.b, h, c0, sy, sx, qt, kCosine ? q_norm : nullptr);
        stage_transposed<T>(g, a.k, a.pad_k, win.b, h, c0, sy, sx, kt, kCosine ? k_norm : nullptr);
        if (chunks > 1) stage_transposed<T>(g, a.dout, nullptr, win.b, h, c0, sy, sx, dot);
      }
      __syncthreads();  // x (v^T or the previous chunk's dS^T) is no longer read
      store_query_major(g, p, it, jt, x);
      __syncthreads();
      float acc[4][4] = {};
      // dv = P^T dout
      accumulate_rows(x, g.N, it, [&](int n) { return transposed_column(dot, n, dt); }, acc);
      store_gradient_rows<T>(g, a.dv, acc, win.b, h, c0, it, dt, sy, sx,
                             pad_grad ? pad_sum + (kTile / 4) * kChunk : nullptr);
      __syncthreads();
      store_query_major(g, ds, it, jt, x);
      __syncthreads();
      if (c0 == 0 && bias != nullptr && a.table_partial != nullptr) {
        // Table row (dy, dx) collects dS of the pairs i - j = (dy, dx), in row-major i order.
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          if (tid + k * kThreads >= g.R) continue;
          const int dy = rel_y[k], dx = rel_x[k];
          for (int ty = max(dy, 0); ty < g.wh + min(dy, 0); ++ty) {
            for (int tx = max(dx, 0); tx < g.ww + min(dx, 0); ++tx) {
              const int i = ty * g.ww + tx;
              dtable[k] += x[i * kPStride + column_of(i - dy * g.ww - dx)];
            }
          }
        }
      }
      // dk = dS^T q (times the scale, or through the normalisation)
      for (auto& row : acc) row[0] = row[1] = row[2] = row[3] = 0.f;
      accumulate_rows(x, g.N, it, [&](int n) { return transposed_column(qt, n, dt); }, acc);
      finish_gradient<kCosine>(acc, factor, kt, k_norm, k_proj, sy, it, dt);
      store_gradient_rows<T>(g, a.dk, acc, win.b, h, c0, it, dt, sy, sx,
                             pad_grad ? pad_sum : nullptr);
      __syncthreads();
      store_key_major(g, ds, it, jt, x);
      __syncthreads();
      // dq = dS k (times the scale, or through the normalisation)
      for (auto& row : acc) row[0] = row[1] = row[2] = row[3] = 0.f;
      accumulate_rows(x, g.N, it, [&](int n) { return transposed_column(kt, n, dt); }, acc);
      finish_gradient<kCosine>(acc, factor, qt, q_norm, q_proj, sy, it, dt);
      store_gradient_rows<T>(g, a.dq, acc, win.b, h, c0, it, dt, sy, sx, nullptr);
      if (pad_grad && tid < 32 && c0 + tid < g.D) {
#pragma unroll
        for (int kv = 0; kv < 2; ++kv) {
          float sum = 0.f;
          for (int u = 0; u < kTile / 4; ++u) sum += pad_sum[(kv * (kTile / 4) + u) * kChunk + tid];
          pad_partial[(kv * g.heads + h) * g.D + c0 + tid] += sum;
        }
      }
    }
  }
  if (a.table_partial != nullptr) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int r = tid + k * kThreads;
      if (r < g.R) {
        a.table_partial[(static_cast<std::int64_t>(group) * g.R + r) * g.heads + h] = dtable[k];
      }
    }
  }
  if (a.gain_partial != nullptr && tid == 0) {
    a.gain_partial[static_cast<std::int64_t>(group) * g.heads + h] = dlog_gain;
  }
}

// out[m] = sum over g < G of in[g * M + m], always in the same order: 8 strided partial
// sums per column, then added in row order.
__global__ void __launch_bounds__(kSumColumns* kSumRows)
    ordered_column_sum_kernel(const float* in, float* out, int G, int M) {
  __shared__ float part[kSumRows][kSumColumns];
  const int cx = threadIdx.x % kSumColumns, ry = threadIdx.x / kSumColumns;
  const int m = blockIdx.x * kSumColumns + cx;
  float sum = 0.f;
  if (m < M) {
    for (int g = ry; g < G; g += kSumRows) sum += in[static_cast<std::int64_t>(g) * M + m];
  }
  part[ry][cx] = sum;
  __syncthreads();
  if (ry == 0 && m < M) {
    float total = part[0][cx];
    for (int r = 1; r < kSumRows; ++r) total += part[r][cx];
    out[m] = total;
  }
}

// ---- launchers ---------------------------------------------------------------------------
inline int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Whether 4 elements at ptr can move as one access (null: nothing to move).
inline bool quad_aligned(const void* ptr, const WindowAttentionParams& p) {
  return reinterpret_cast<std::uintptr_t>(ptr) % (4 * element_size(p.dtype)) == 0;
}

inline View make_view(const WindowAttentionTokens& t, const WindowAttentionParams& p) {
  bool vec4 = t.stride[4] == 1 && p.D % 4 == 0 && quad_aligned(t.data, p);
  for (int d = 0; d < 4; ++d) vec4 = vec4 && t.stride[d] % 4 == 0;
  return {t.data,
          t.stride[0],
          static_cast<int>(t.stride[1]),
          static_cast<int>(t.stride[2]),
          static_cast<int>(t.stride[3]),
          static_cast<int>(t.stride[4]),
          vec4};
}

inline Geometry make_geometry(const WindowAttentionParams& p) {
  Geometry g;
  g.H = p.H, g.W = p.W, g.heads = p.heads, g.D = p.D;
  g.wh = p.wh, g.ww = p.ww, g.sh = p.sh, g.sw = p.sw;
  g.n_wh = static_cast<int>(ceil_div(p.H, p.wh));
  g.n_ww = static_cast<int>(ceil_div(p.W, p.ww));
  g.N = p.wh * p.ww;
  g.R = (2 * p.wh - 1) * (2 * p.ww - 1);
  g.num_windows = p.B * g.n_wh * g.n_ww;
  g.scale = p.scale;
  g.mask_value = p.mask_value;
  g.grad_token = p.grad_token_stride;
  g.out_vec4 = p.D % 4 == 0 && quad_aligned(p.out, p) && quad_aligned(p.dq, p) &&
               quad_aligned(p.dk, p) && quad_aligned(p.dv, p);
  return g;
}

inline int windows_per_block(const Geometry& g) {
  const int groups = std::max(1, std::min(g.num_windows, backward_blocks() / g.heads));
  return static_cast<int>(ceil_div(g.num_windows, groups));
}

inline int backward_groups(const Geometry& g) {
  if (g.num_windows == 0 || g.heads == 0) return 0;
  return static_cast<int>(ceil_div(g.num_windows, windows_per_block(g)));
}

inline cudaError_t ordered_column_sum(const float* in, float* out, int G, int M,
                                      cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  PV_LAUNCH(ordered_column_sum_kernel, dim3(static_cast<unsigned>(ceil_div(M, kSumColumns))),
            dim3(kSumColumns * kSumRows), 0, stream, in, out, G, M);
  return cudaGetLastError();
}

}  // namespace window_attention_detail

int window_attention_shared_bytes(int window_area, bool backward) {
  using namespace window_attention_detail;
  return 4 * (backward ? bwd_smem_floats(window_area) : fwd_smem_floats(window_area));
}

cudaError_t window_attention_fwd(const WindowAttentionParams& p, cudaStream_t stream) {
  using namespace window_attention_detail;
  const Geometry g = make_geometry(p);
  const std::int64_t blocks = std::int64_t{g.num_windows} * g.heads;
  if (blocks == 0) return cudaSuccess;
  const FwdArgs args{g, make_view(p.q, p), make_view(p.k, p), make_view(p.v, p), p.table,
                     p.pad_k, p.pad_v, p.gain, p.out, p.lse};
  return PV_DTYPE_SWITCH(p.dtype, T, [&] {
    return PV_BOOL_SWITCH(p.gain != nullptr, kCosine, [&] {
      PV_LAUNCH((window_attention_fwd_kernel<T, kCosine>), dim3(static_cast<unsigned>(blocks)),
                dim3(kThreads), window_attention_shared_bytes(g.N, false), stream, args);
      return cudaGetLastError();
    });
  });
}

// The backward's workspace: per-block partials of the table, pad and log-gain gradients,
// in that order, each present when wanted.
struct BwdWorkspace {
  std::int64_t table, pad, gain;  // floats of each part
};

inline BwdWorkspace bwd_workspace(const WindowAttentionParams& p) {
  using namespace window_attention_detail;
  const Geometry g = make_geometry(p);
  const std::int64_t groups = backward_groups(g);
  return {p.table_grad ? groups * g.R * g.heads : 0, p.pad_grad ? groups * 2 * g.heads * g.D : 0,
          p.gain_grad && p.gain != nullptr ? groups * g.heads : 0};
}

std::int64_t window_attention_bwd_workspace_floats(const WindowAttentionParams& p) {
  const BwdWorkspace parts = bwd_workspace(p);
  return parts.table + parts.pad + parts.gain;
}

cudaError_t window_attention_bwd(const WindowAttentionParams& p, cudaStream_t stream) {
  using namespace window_attention_detail;
  const Geometry g = make_geometry(p);
  const int groups = backward_groups(g);
  const BwdWorkspace parts = bwd_workspace(p);
  float* table_partial = parts.table > 0 ? p.workspace : nullptr;
  float* pad_partial = parts.pad > 0 ? p.workspace + parts.table : nullptr;
  float* gain_partial = parts.gain > 0 ? p.workspace + parts.table + parts.pad : nullptr;
  const std::int64_t blocks = std::int64_t{groups} * g.heads;
  if (blocks > 0) {
    const BwdArgs args{g, make_view(p.q, p), make_view(p.k, p), make_view(p.v, p),
                       make_view(p.dout, p), p.table, p.pad_k, p.pad_v, p.gain,
                       p.lse_in, p.dq, p.dk, p.dv, table_partial, pad_partial, gain_partial,
                       windows_per_block(g)};
    const cudaError_t error = PV_DTYPE_SWITCH(p.dtype, T, [&] {
      return PV_BOOL_SWITCH(p.gain != nullptr, kCosine, [&] {
        PV_LAUNCH((window_attention_bwd_kernel<T, kCosine>), dim3(static_cast<unsigned>(blocks)),
                  dim3(kThreads), window_attention_shared_bytes(g.N, true), stream, args);
        return cudaGetLastError();
      });
    });
    if (error != cudaSuccess) return error;
  }
  // With no block (empty input) the sums are over zero partials: zeros.
  if (p.table_grad) {
    const cudaError_t error =
        ordered_column_sum(table_partial, p.dtable, groups, g.R * g.heads, stream);
    if (error != cudaSuccess) return error;
  }
  if (p.pad_grad) {
    const cudaError_t error =
        ordered_column_sum(pad_partial, p.dpad, groups, 2 * g.heads * g.D, stream);
    if (error != cudaSuccess) return error;
  }
  if (p.gain_grad && p.gain != nullptr) {
    return ordered_column_sum(gain_partial, p.dlog_gain, groups, g.heads, stream);
  }
  return cudaSuccess;
}

}  // namespace pyvit
