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
// A window's slots form tiles of 64 (ceil(wh * ww / 64) <= 9 of them); every product is
// between one query tile and one key tile. q, k (and v, dout) tiles are staged in shared
// memory as fp32, 32 head-dim columns at a time; a thread owns a 4-query x 8-key tile of
// the scores in registers, and then a 4-row x 4-column tile of an output chunk.
//
// Forward: one 128-thread block per (window, head, query tile); heads vary fastest over
// blocks so a window's blocks run together and share the L2 lines of its tokens. Per
// 32-column output chunk the block sweeps the key tiles with an online softmax (row max
// / sum across the 8 threads of a row group, in a fixed order; the accumulated output
// rescaled when the max grows), probabilities going through shared memory into the
// output tile. A window of one tile computes its scores once: its probabilities stay in
// shared memory across the chunks. Wider windows recompute the scores per chunk (once
// at Swin's head dim 32) rather than hold a D-wide accumulator. Each score row's max m
// and log2 of its sum l are written for the backward, apart: the backward recomputes the
// same scores bit for bit, so s - m is exact even where scores near 1e5 would round
// m + log2(l) by a visible fraction of a probability.
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
// Backward: one block per (group of consecutive windows, head). It recomputes the
// scores from q, k and the row statistics, and dP = dO v^T in the same tile layout; the
// row term delta_i = sum_j P_ij dP_ij comes from these fp32 tiles, so the saved output
// is not read (nor its rounding to the input dtype felt). A window of one tile does
// everything in one sweep. Wider windows take three sweeps over the tile pairs: delta
// per query tile (and the cosine norms); dq per query tile and chunk over the key
// tiles; dk, dv per key tile and chunk over the query tiles. dq, dk, dv of a window's
// real tokens belong to that window alone and are written directly. The two reductions
// are deterministic without atomics: each block accumulates the table gradient (a
// thread owns table rows, summing dS over that row's pairs in a fixed order) and the pad
// gradients (fixed-order sums through shared memory, added by their owner thread) over
// its windows, writes one partial per block, and an ordered column-sum kernel adds the
// partials in block order.
//
// Element offsets inside one image are int32, the batch offset is int64.
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "window_attention.cuh"

namespace pyvit {
namespace window_attention_detail {

constexpr int kThreads = 128;  // 16 row units x 8 column lanes
constexpr int kTile = 64;      // token slots per tile
constexpr int kMaxTiles = (kWindowAttentionMaxArea + kTile - 1) / kTile;
constexpr int kChunk = 32;             // head-dim columns staged at a time
constexpr int kPStride = kTile + 4;    // probability rows: 17 16-byte units, odd
constexpr int kVStride = kChunk + 4;   // forward's row-major v chunk
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
// The 64 token slots of a tile form 16 units of 4: unit u holds tokens token_of(u, c) =
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
  int tiles;  // 64-slot tiles of a window
  bool grid_partition;  // slots strided across the image (WindowAttentionParams)
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

// Slot tables of window w in shared memory, one entry per slot of its tiles: source row
// (-1: padded or past N), source column, and code = pos << 2 | shift region.
PV_DEVICE Window setup_window(const Geometry& g, int w, int* sy, int* sx, int* code) {
  const int per_image = g.n_wh * g.n_ww;
  const int b = w / per_image;
  const int wy = (w - b * per_image) / g.n_ww;
  const int wx = w - b * per_image - wy * g.n_ww;
  for (int t = threadIdx.x; t < g.tiles * kTile; t += kThreads) {
    int y = -1, x = 0, c = 0;
    if (t < g.N) {
      const int ty = t / g.ww, tx = t - ty * g.ww;
      const int py = g.grid_partition ? ty * g.n_wh + wy : wy * g.wh + ty;
      const int px = g.grid_partition ? tx * g.n_ww + wx : wx * g.ww + tx;
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

// The front of the kernels' shared memory: per token slot its source row, column and
// bias / region code (setup_window fills them), then the head's column of the table
// (R = (2wh - 1)(2ww - 1) < 4 wh ww rows), staged here. The kernels carve their own
// buffers from `rest`.
constexpr PV_HOST_DEVICE int front_floats(int tiles) { return 7 * tiles * kTile; }

struct SharedFront {
  int* sy;
  int* sx;
  int* code;
  float* table;
  float* rest;
};
PV_DEVICE SharedFront shared_front(float* smem, const Geometry& g, const float* table, int h) {
  const int slots = g.tiles * kTile;
  int* slot_ints = reinterpret_cast<int*>(smem);
  float* table_s = smem + 3 * slots;
  if (table != nullptr) stage_table(g, table, h, table_s);
  return {slot_ints, slot_ints + slots, slot_ints + 2 * slots, table_s,
          smem + front_floats(g.tiles)};
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

// Columns c0..c0+31 of the 64 slots of the tile starting at slot t0 into a transposed
// tile tile[d][swizzled column]; a warp handles one unit per step: 4 tokens x 8 quads,
// each token's 32 columns read by 8 adjacent lanes. With `norm` (one per slot of the
// window), rows are divided by their norm.
template <typename T>
PV_DEVICE void stage_transposed(const Geometry& g, const View& view, const float* pad, int b,
                                int h, int t0, int c0, const int* sy, const int* sx,
                                float* tile, const float* norm = nullptr) {
  const int lane = threadIdx.x & 31, c = lane & 3, dq = lane >> 2;
  // A fixed trip count: unrolled, so a thread's loads are all in flight at once.
#pragma unroll
  for (int step = 0; step < (kTile / 4) / (kThreads / 32); ++step) {
    const int u = (threadIdx.x >> 5) + step * (kThreads / 32);
    const int t = t0 + token_of(u, c);
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

// Columns c0..c0+31 of the tile's slots (from t0, those below N) into a row-major tile
// rows[t - t0][d] (the forward's v).
template <typename T>
PV_DEVICE void stage_rows(const Geometry& g, const View& view, const float* pad, int b, int h,
                          int t0, int c0, const int* sy, const int* sx, float* rows) {
  // Unrolled by 2 only: fully unrolled, ptxas spills on sm_90.
#pragma unroll 2
  for (int step = 0; step < kTile * (kChunk / 4) / kThreads; ++step) {
    const int i = threadIdx.x + step * kThreads;
    const int t = i / (kChunk / 4), dq = i % (kChunk / 4);
    if (t0 + t < g.N) {
      store_quad(rows + t * kVStride + 4 * dq,
                 load_token<T>(g, view, pad, b, h, t0 + t, c0 + 4 * dq, sy, sx));
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
// keys past 32 (key tiles of <= 32 slots).
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

// The same over a key tile of `keys` slots.
template <bool kSquares = false>
PV_DEVICE void accumulate_scores(int keys, const float* at, const float* bt, int dc, int it,
                                 int jt, float (&acc)[4][8], SquareSums& sq) {
  if (keys > kTile / 2) {
    accumulate_pairs<2, kSquares>(at, bt, dc, it, jt, acc, sq);
  } else {
    accumulate_pairs<1, kSquares>(at, bt, dc, it, jt, acc, sq);
  }
}

// max(|x|, eps) from the sum of squares of x.
// max(|x|, eps) from the sum of squares of x.
PV_DEVICE float clamped_norm(float sum_sq) { return fmaxf(sqrtf(sum_sq), kNormEps); }

// q k^T products -> scores without bias and mask, in place: times scale, or for cosine
// attention the cosine (q_i k_j / max(|q_i|, eps) / max(|k_j|, eps)) times the gain, last:
// one rounding at the scores' magnitude (gain up to 100), as the reference's.
// row_norm / key_norm: max(|x|, eps) of the thread's rows and keys (cosine only).
template <bool kCosine>
PV_DEVICE void scale_scores(const Geometry& g, const float* gain, int h,
                            const float (&row_norm)[4], const float (&key_norm)[8],
                            float (&s)[4][8]) {
  if constexpr (kCosine) {
    float key[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) key[c] = 1.f / key_norm[c];
    const float head_gain = gain[h];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float row = 1.f / row_norm[r];
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

// The clamped norms of the thread's rows and keys from their sums of squares.
struct Norms {
  float row[4], key[8];
};
PV_DEVICE Norms clamped_norms(const SquareSums& sq) {
  Norms n;
#pragma unroll
  for (int r = 0; r < 4; ++r) n.row[r] = clamped_norm(sq.row[r]);
#pragma unroll
  for (int c = 0; c < 8; ++c) n.key[c] = clamped_norm(sq.key[c]);
  return n;
}

// The score of row r, key c of the thread's tile (query tile at slot i0, key tile at
// j0) from its scaled product x: + bias, + mask between regions; -inf for keys past N (so
// they get probability 0).
PV_DEVICE float biased_score(const Geometry& g, const float* table_s, const int* code, int i0,
                             int j0, int it, int jt, int r, int c, float x) {
  const int j = j0 + key_of(jt, c);
  const int row_code = code[i0 + token_of(it, r)], key_code = code[j];
  if (table_s != nullptr) {
    const int center = (g.wh - 1) * (2 * g.ww - 1) + g.ww - 1;
    x += table_s[(row_code >> 2) - (key_code >> 2) + center];
  }
  if ((row_code ^ key_code) & 3) x += g.mask_value;
  return j < g.N ? x : -INFINITY;
}

// acc[r][e] += sum_{n < N} a[n][4 it + r] * B(n)[e]: rows of unit it, 4 columns.
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
// query index major (dst[i][column of j]) or the key index major (dst[j][column of i]),
// tile-local indices; only the first `count` queries (keys) of the tile are stored.
PV_DEVICE void store_query_major(int count, const float (&p)[4][8], int it, int jt, float* dst) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = token_of(it, r);
    if (i < count) {
      store_quad(dst + i * kPStride + 4 * jt, {{p[r][0], p[r][1], p[r][2], p[r][3]}});
      store_quad(dst + i * kPStride + 32 + 4 * jt, {{p[r][4], p[r][5], p[r][6], p[r][7]}});
    }
  }
}

PV_DEVICE void store_key_major(int count, const float (&p)[4][8], int it, int jt, float* dst) {
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int j = key_of(jt, c);
    if (j < count) store_quad(dst + j * kPStride + 4 * it, {{p[0][c], p[1][c], p[2][c], p[3][c]}});
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

// One key tile of the online softmax: the scores s become exp(s - m) with m the running
// row max, taken over this tile too; l, the running row sum of exp(s - m), is rescaled
// and extended. Returns per row the factor exp(m_old - m_new) that rescales what was
// accumulated before. `partials`: two kRowPartials buffers (one barrier each). Scores
// stay in natural units (a score near 1e5 is rounded as the reference rounds it); only
// the differences s - m <= 0 are scaled to base 2 for exp2.
PV_DEVICE Quad online_softmax(float (&s)[4][8], float* partials, int it, Quad& m, Quad& l) {
  Quad part;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    part.v[r] = -INFINITY;
#pragma unroll
    for (int c = 0; c < 8; ++c) part.v[r] = fmaxf(part.v[r], s[r][c]);
  }
  const Quad tile_max = reduce_rows(part, partials, it, [](float a, float b) {
    return fmaxf(a, b);
  });
  Quad alpha;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float m_new = fmaxf(m.v[r], tile_max.v[r]);
    // With a -inf mask every key so far may be masked (m = -inf): subtracting 0 keeps
    // their exp at 0 instead of NaN. The row's own slot makes the final m finite.
    const float base = m_new == -INFINITY ? 0.f : m_new;
    alpha.v[r] = exp2f((m.v[r] - base) * kLog2e);
    m.v[r] = m_new;
    part.v[r] = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      s[r][c] = exp2f((s[r][c] - base) * kLog2e);
      part.v[r] += s[r][c];
    }
  }
  const Quad tile_l = reduce_rows(part, partials + kRowPartials, it, add);
#pragma unroll
  for (int r = 0; r < 4; ++r) l.v[r] = l.v[r] * alpha.v[r] + tile_l.v[r];
  return alpha;
}

// ---- shared-memory layouts -------------------------------------------------------------
constexpr PV_HOST_DEVICE int larger(int a, int b) { return a < b ? b : a; }
constexpr int kProbabilityFloats = larger(2 * kChunk * kTile, kTile * kPStride);

// Forward: slots | table | q^T, k^T (then probabilities) | v rows | softmax partials.
constexpr PV_HOST_DEVICE int fwd_smem_floats(int tiles) {
  return front_floats(tiles) + kProbabilityFloats + kTile * kVStride + 2 * kRowPartials;
}

// Backward: slots | table | per slot |q|, |k| clamped at eps (cosine) | per slot delta
// (tiled) | per tile slot x_hat . dx_hat of q and k (cosine) | table-gradient sums
// (tiled) | q^T | k^T | dout^T | v^T (then P / dS) | pad sums (before the products: row
// partials). Float offsets; a window of one tile keeps delta and the table gradient in
// registers.
struct BwdLayout {
  int q_norm, k_norm, delta, q_proj, k_proj, dtable, qt, kt, dot, x, pad_sum, end;
};
constexpr PV_HOST_DEVICE BwdLayout bwd_layout(int tiles) {
  const int slots = tiles * kTile, tiled = tiles > 1 ? 1 : 0;
  BwdLayout s{};
  s.q_norm = front_floats(tiles);
  s.k_norm = s.q_norm + slots;
  s.delta = s.k_norm + slots;
  s.q_proj = s.delta + tiled * slots;
  s.k_proj = s.q_proj + kTile;
  s.dtable = s.k_proj + kTile;
  s.qt = s.dtable + tiled * 4 * slots;
  s.kt = s.qt + kChunk * kTile;
  s.dot = s.kt + kChunk * kTile;
  s.x = s.dot + kChunk * kTile;
  s.pad_sum = s.x + larger(kChunk * kTile, kTile * kPStride);
  s.end = s.pad_sum + 2 * (kTile / 4) * kChunk;
  return s;
}
// One-tile launches stay within the 48 KB every GPU grants without an opt-in attribute;
// the tiled backward opts in to its 77 KB, under the 99 KB of the smallest (sm_86/89).
static_assert(4 * fwd_smem_floats(kMaxTiles) <= 48 * 1024 &&
                  4 * bwd_layout(1).end <= 48 * 1024 && 4 * bwd_layout(kMaxTiles).end <= 99 * 1024,
              "shared memory per block over budget");

// ---- forward -------------------------------------------------------------------------------
template <typename T, bool kCosine>
__global__ void __launch_bounds__(kThreads) window_attention_fwd_kernel(const FwdArgs a) {
  const Geometry& g = a.g;
  PV_DYNAMIC_SHARED(float, smem);
  const int tid = threadIdx.x, it = tid >> 3, jt = tid & 7, dt = jt;
  const int h = blockIdx.x % g.heads, w = blockIdx.x / g.heads;
  const int i0 = blockIdx.y * kTile;  // the block's query tile
  const auto [sy, sx, code, table_s, qt] = shared_front(smem, g, a.table, h);
  float* kt = qt + kChunk * kTile;
  float* pt = qt;  // a key tile's probabilities replace q^T, k^T once its scores are done
  float* vs = qt + kProbabilityFloats;
  float* partials = vs + kTile * kVStride;
  const Window win = setup_window(g, w, sy, sx, code);
  const float* bias = a.table != nullptr ? table_s : nullptr;

  Quad m = {{-INFINITY, -INFINITY, -INFINITY, -INFINITY}}, l = {{0.f, 0.f, 0.f, 0.f}};
  for (int c0 = 0; c0 < g.D; c0 += kChunk) {
    float o[4][4] = {};
    for (int j0 = 0; j0 < g.N; j0 += kTile) {
      const int keys = min(kTile, g.N - j0);
      Quad alpha = {{1.f, 1.f, 1.f, 1.f}};
      if (c0 == 0 || g.tiles > 1) {
        if (j0 == 0 && c0 > 0) {  // each chunk's sweep restarts the softmax
          m = {{-INFINITY, -INFINITY, -INFINITY, -INFINITY}};
          l = {{0.f, 0.f, 0.f, 0.f}};
        }
        float s[4][8] = {};
        SquareSums sq;
        for (int cc = 0; cc < g.D; cc += kChunk) {
          __syncthreads();  // the slot tables are written, the previous products done
          stage_transposed<T>(g, a.q, nullptr, win.b, h, i0, cc, sy, sx, qt);
          stage_transposed<T>(g, a.k, a.pad_k, win.b, h, j0, cc, sy, sx, kt);
          // The v chunk comes with the first q and k chunks: one round trip for all three.
          if (cc == 0) stage_rows<T>(g, a.v, a.pad_v, win.b, h, j0, c0, sy, sx, vs);
          __syncthreads();
          accumulate_scores<kCosine>(keys, qt, kt, min(kChunk, g.D - cc), it, jt, s, sq);
        }
        const Norms norms = clamped_norms(sq);
        scale_scores<kCosine>(g, a.gain, h, norms.row, norms.key, s);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            s[r][c] = biased_score(g, bias, code, i0, j0, it, jt, r, c, s[r][c]);
          }
        }
        alpha = online_softmax(s, partials, it, m, l);  // its barriers end the reads of q^T, k^T
        store_key_major(keys, s, it, jt, pt);
      } else {
        // One key tile: its probabilities stay in pt across the head-dim chunks.
        __syncthreads();  // the previous chunk's products are done
        stage_rows<T>(g, a.v, a.pad_v, win.b, h, 0, c0, sy, sx, vs);
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[r][e] *= alpha.v[r];
      }
      accumulate_rows(pt, keys, it, [&](int n) { return load_quad(vs + n * kVStride + 4 * dt); },
                      o);
    }
    const int count = min(4, g.D - c0 - 4 * dt);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = i0 + token_of(it, r);
      if (i >= g.N) continue;
      if (c0 == 0 && jt == 0) {
        float* stats = a.lse + (static_cast<std::int64_t>(blockIdx.x) * g.N + i) * 2;
        stats[0] = m.v[r];
        stats[1] = log2f(l.v[r]);
      }
      if (count > 0 && sy[i] >= 0) {
        const float inv = 1.f / l.v[r];
        float out[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) out[e] = o[r][e] * inv;
        T* dst = output_at<T>(g, a.out, g.heads * g.D, win.b, sy[i], sx[i], h, c0 + 4 * dt);
        store_token(dst, out, count, g.out_vec4);
      }
    }
  }
}

// ---- backward ------------------------------------------------------------------------------

// A dq / dk chunk (rows of unit it, columns 4 dt..4 dt+3) from acc = dS times the other
// side's staged rows. V1: times the scale (`factor`). Cosine, the staged rows normalised:
// dx_hat = gain acc, and the gradient of x = n x_hat (n = max(|x|, eps), in `norm`) is
// (dx_hat - x_hat (x_hat . dx_hat)) / n with x_hat from this side's tile `hat` and
// x_hat . dx_hat from `proj`; where |x| <= eps, n is the constant eps: no projection.
// Padded slots (sy < 0) keep dx_hat: the pad row's gradient goes through the
// normalisation once, from the sum over every padded slot (window_attention_bwd).
// norm, proj and sy are indexed by the tile's slot (pointers at its first slot).
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

// Writes rows of unit it (real tokens among the tile's first `rows` slots; sy, sx at its
// first slot) of a dq / dk / dv chunk and, for padded slots, their column sums into
// pad_sum[it][...] (when pad_sum is not null).
template <typename T>
PV_DEVICE void store_gradient_rows(const Geometry& g, void* base, const float (&v)[4][4], int b,
                                   int h, int c0, int it, int dt, const int* sy, const int* sx,
                                   int rows, float* pad_sum) {
  const int count = min(4, g.D - c0 - 4 * dt);
  float pad[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = token_of(it, r);
    if (i >= rows) continue;
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

// The backward's shared buffers (bwd_layout).
struct BwdShared {
  int *sy, *sx, *code;
  const float* bias;  // the head's table column, or null
  float *q_norm, *k_norm, *delta, *q_proj, *k_proj, *dtable, *qt, *kt, *dot, *x, *pad_sum;
};
PV_DEVICE BwdShared bwd_shared(float* smem, const BwdArgs& a, int h) {
  const SharedFront f = shared_front(smem, a.g, a.table, h);
  const BwdLayout o = bwd_layout(a.g.tiles);
  return {f.sy,           f.sx,           f.code,         a.table != nullptr ? f.table : nullptr,
          smem + o.q_norm, smem + o.k_norm, smem + o.delta, smem + o.q_proj,
          smem + o.k_proj, smem + o.dtable, smem + o.qt,    smem + o.kt,
          smem + o.dot,    smem + o.x,      smem + o.pad_sum};
}

// A backward block's head, group and windows [w_begin, w_end), and the factor of dq and
// dk: dS times the other side's rows, times it (V1: the scale; cosine: the gain).
struct BwdBlock {
  int h, group, w_begin, w_end;
  float factor;
};
template <bool kCosine>
PV_DEVICE BwdBlock bwd_block(const BwdArgs& a) {
  const int h = blockIdx.x % a.g.heads, group = blockIdx.x / a.g.heads;
  const int w_begin = group * a.windows_per_block;
  return {h, group, w_begin, min(w_begin + a.windows_per_block, a.g.num_windows),
          kCosine ? a.gain[h] : a.g.scale};
}

// The forward's statistics of the thread's score rows in the query tile at slot i0;
// m = +inf on rows past N: P = 0 there.
PV_DEVICE void load_row_stats(const BwdArgs& a, int w, int h, int i0, int it, float (&m)[4],
                              float (&log2_l)[4]) {
  const Geometry& g = a.g;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = i0 + token_of(it, r);
    const float* row = a.lse + ((static_cast<std::int64_t>(w) * g.heads + h) * g.N + i) * 2;
    m[r] = i < g.N ? row[0] : INFINITY;
    log2_l[r] = i < g.N ? row[1] : 0.f;
  }
}

// delta of the thread's score rows in the query tile at slot i0 (tiled backward).
PV_DEVICE Quad row_deltas(const BwdShared& s, int i0, int it) {
  Quad delta;
#pragma unroll
  for (int r = 0; r < 4; ++r) delta.v[r] = s.delta[i0 + token_of(it, r)];
  return delta;
}

// Products of the query tile at slot i0 and the key tile at j0 over every head-dim
// chunk: p = the scaled q k^T (the forward's scores before bias and mask, bit for bit, so
// s - m is exact), ds = dP = dout v^T. The last chunk of q^T, k^T, dout^T and v^T (in x)
// stays staged. Cosine norms: kFresh, from the products' sums of squares, and stored per
// slot for the thread's rows (store_rows) and keys (store_keys); otherwise read from
// those stored norms, the same bits, without the registers of the sums.
template <typename T, bool kCosine, bool kFresh>
PV_DEVICE void tile_products(const BwdArgs& a, const BwdShared& s, int b, int h, int i0, int j0,
                             int it, int jt, float (&p)[4][8], float (&ds)[4][8],
                             bool store_rows = false, bool store_keys = false) {
  const Geometry& g = a.g;
  const int keys = min(kTile, g.N - j0);
  SquareSums sq;
  for (int c0 = 0; c0 < g.D; c0 += kChunk) {
    __syncthreads();  // the slot tables are written, the previous reads of the tiles done
    stage_transposed<T>(g, a.q, nullptr, b, h, i0, c0, s.sy, s.sx, s.qt);
    stage_transposed<T>(g, a.k, a.pad_k, b, h, j0, c0, s.sy, s.sx, s.kt);
    stage_transposed<T>(g, a.dout, nullptr, b, h, i0, c0, s.sy, s.sx, s.dot);
    stage_transposed<T>(g, a.v, a.pad_v, b, h, j0, c0, s.sy, s.sx, s.x);
    __syncthreads();
    const int dc = min(kChunk, g.D - c0);
    accumulate_scores<kCosine && kFresh>(keys, s.qt, s.kt, dc, it, jt, p, sq);
    accumulate_scores(keys, s.dot, s.x, dc, it, jt, ds, sq);
  }
  Norms norms{};
  if constexpr (kCosine && kFresh) {
    norms = clamped_norms(sq);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (store_rows && jt == 0) s.q_norm[i0 + token_of(it, r)] = norms.row[r];
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      if (store_keys && it == 0) s.k_norm[j0 + key_of(jt, c)] = norms.key[c];
    }
  } else if constexpr (kCosine) {
#pragma unroll
    for (int r = 0; r < 4; ++r) norms.row[r] = s.q_norm[i0 + token_of(it, r)];
#pragma unroll
    for (int c = 0; c < 8; ++c) norms.key[c] = s.k_norm[j0 + key_of(jt, c)];
  }
  scale_scores<kCosine>(g, a.gain, h, norms.row, norms.key, p);
}

// P of the thread's pair (r, c) from its scaled product x and its row's statistics.
PV_DEVICE float probability(const Geometry& g, const BwdShared& s, int i0, int j0, int it,
                            int jt, int r, int c, float x, float m, float log2_l) {
  return exp2f((biased_score(g, s.bias, s.code, i0, j0, it, jt, r, c, x) - m) * kLog2e - log2_l);
}

// part[r] += sum over the thread's keys of P dP: its share of delta_i = sum_j P_ij dP_ij,
// equal to the usual rowsum(dout * out) since out = P v, but from the fp32 P and dP of
// the tiles instead of the output rounded to the input dtype, and without reading out.
PV_DEVICE void add_delta_part(const Geometry& g, const BwdShared& s, int i0, int j0, int it,
                              int jt, const float (&m)[4], const float (&log2_l)[4],
                              const float (&p)[4][8], const float (&ds)[4][8], Quad& part) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      part.v[r] += probability(g, s, i0, j0, it, jt, r, c, p[r][c], m[r], log2_l[r]) * ds[r][c];
    }
  }
}

// P and dS = P (dP - delta) of the thread's tile in place (p: the scaled products, then
// P; ds: dP, then dS). Cosine: the row / column sums of dS * gain cos (p before the bias),
// x_hat . dx_hat of q / k, added to row_proj / col_proj.
template <bool kCosine>
PV_DEVICE void gradient_tile(const Geometry& g, const BwdShared& s, int i0, int j0, int it,
                             int jt, const float (&m)[4], const float (&log2_l)[4],
                             const Quad& delta, float (&p)[4][8], float (&ds)[4][8],
                             Quad& row_proj, float (&col_proj)[8]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float prob = probability(g, s, i0, j0, it, jt, r, c, p[r][c], m[r], log2_l[r]);
      const float d = prob * (ds[r][c] - delta.v[r]);
      if constexpr (kCosine) {
        row_proj.v[r] += d * p[r][c];
        col_proj[c] += d * p[r][c];
      }
      p[r][c] = prob;
      ds[r][c] = d;
    }
  }
}

// k_proj[j] = the sum of the 16 row units' column partials of key j, in unit order,
// from `partials` (thread t's 8 at 8 t, written before the last barrier).
PV_DEVICE void column_sums(const float* partials, float* k_proj) {
  const int tid = threadIdx.x;
  if (tid < kTile) {
    // Key tid is key c of lane jt: column_of(tid) = 4 unit + c % 4, unit = jt + 8 (c / 4).
    const int column = column_of(tid), unit = column >> 2;
    const int c = ((unit >> 3) << 2) | (column & 3), lane = unit & 7;
    float sum = 0.f;
    for (int u = 0; u < kTile / 4; ++u) sum += partials[8 * (8 * u + lane) + c];
    k_proj[tid] = sum;
  }
}

// Sum of the query-major dS tile `ds` of the query tile at slot i0 and the key tile at
// j0 over the pairs i - j = (dy, dx) of table row r, in row-major i order.
PV_DEVICE float table_gradient(const Geometry& g, const float* ds, int r, int i0, int j0) {
  const int dy = r / (2 * g.ww - 1) - (g.wh - 1), dx = r % (2 * g.ww - 1) - (g.ww - 1);
  // Window rows ty of a query in the query tile whose key, in row ty - dy, can be in the
  // key tile.
  const int ty_begin = max(max(dy, 0), max(i0 / g.ww, j0 / g.ww + dy));
  const int ty_end = min(g.wh + min(dy, 0),
                         min((i0 + kTile - 1) / g.ww, (j0 + kTile - 1) / g.ww + dy) + 1);
  float sum = 0.f;
  for (int ty = ty_begin; ty < ty_end; ++ty) {
    for (int tx = max(dx, 0); tx < g.ww + min(dx, 0); ++tx) {
      const int i = ty * g.ww + tx - i0, j = i + i0 - dy * g.ww - dx - j0;
      if (i >= 0 && i < kTile && j >= 0 && j < kTile) sum += ds[i * kPStride + column_of(j)];
    }
  }
  return sum;
}

// The block's pad-gradient partial (null without pad gradients); column d is owned
// (zeroed here, then accumulated by add_pad_sums) by thread d % 32.
PV_DEVICE float* block_pad_partial(const BwdArgs& a, int group, int h) {
  const Geometry& g = a.g;
  float* pad_partial = a.pad_partial;
  if (pad_partial != nullptr) {
    pad_partial += static_cast<std::int64_t>(group) * 2 * g.heads * g.D;
    if (threadIdx.x < 32) {
      for (int d = threadIdx.x; d < g.D; d += 32) {
        pad_partial[h * g.D + d] = 0.f;
        pad_partial[(g.heads + h) * g.D + d] = 0.f;
      }
    }
  }
  return pad_partial;
}

// Adds the chunk's column sums over the padded slots of dk and dv (the units' sums in
// pad_sum, from store_gradient_rows) to the block's pad-gradient partial.
PV_DEVICE void add_pad_sums(const Geometry& g, const float* pad_sum, float* pad_partial, int h,
                            int c0) {
  const int tid = threadIdx.x;
  if (tid < 32 && c0 + tid < g.D) {
#pragma unroll
    for (int kv = 0; kv < 2; ++kv) {
      float sum = 0.f;
      for (int u = 0; u < kTile / 4; ++u) sum += pad_sum[(kv * (kTile / 4) + u) * kChunk + tid];
      pad_partial[(kv * g.heads + h) * g.D + c0 + tid] += sum;
    }
  }
}

// A window of one tile: everything in one sweep. Two blocks per SM: ptxas may use up to
// 255 registers; with the thread count alone its occupancy heuristic holds the cosine
// backward at 168 and spills.
template <typename T, bool kCosine>
__global__ void __launch_bounds__(kThreads, 2) window_attention_bwd_kernel(const BwdArgs a) {
  const Geometry& g = a.g;
  PV_DYNAMIC_SHARED(float, smem);
  const int tid = threadIdx.x, it = tid >> 3, jt = tid & 7, dt = jt;
  const auto [h, group, w_begin, w_end, factor] = bwd_block<kCosine>(a);
  const BwdShared s = bwd_shared(smem, a, h);
  // Table rows tid and tid + 128 of this head: this thread sums their gradient.
  float dtable[2] = {0.f, 0.f};
  float* pad_partial = block_pad_partial(a, group, h);
  float dlog_gain = 0.f;  // thread 0's sum over the block's windows, in window order

  const int chunks = (g.D + kChunk - 1) / kChunk;
  for (int w = w_begin; w < w_end; ++w) {
    __syncthreads();  // the previous window's shared-memory reads are done
    const Window win = setup_window(g, w, s.sy, s.sx, s.code);
    float p[4][8] = {}, ds[4][8] = {};
    tile_products<T, kCosine, true>(a, s, win.b, h, 0, 0, it, jt, p, ds, true, true);
    float row_m[4], row_log2_l[4];
    load_row_stats(a, w, h, 0, it, row_m, row_log2_l);
    Quad part = {{0.f, 0.f, 0.f, 0.f}};
    add_delta_part(g, s, 0, 0, it, jt, row_m, row_log2_l, p, ds, part);
    const Quad delta = reduce_rows(part, s.pad_sum, it, add);
    Quad row_proj = {{0.f, 0.f, 0.f, 0.f}};
    float col_proj[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    gradient_tile<kCosine>(g, s, 0, 0, it, jt, row_m, row_log2_l, delta, p, ds, row_proj,
                           col_proj);
    if constexpr (kCosine) {
      row_proj = reduce_rows(row_proj, s.pad_sum + kRowPartials, it, add);
      if (jt == 0) {
#pragma unroll
        for (int r = 0; r < 4; ++r) s.q_proj[token_of(it, r)] = row_proj.v[r];
      }
      // x (v^T) is free until the products below: the reductions' barriers end the reads.
#pragma unroll
      for (int c = 0; c < 8; ++c) s.x[8 * tid + c] = col_proj[c];
      __syncthreads();
      column_sums(s.x, s.k_proj);
      if (tid == 0) {
        for (int i = 0; i < g.N; ++i) dlog_gain += s.q_proj[i];
      }
    }

    const bool pad_grad = pad_partial != nullptr && win.has_padding;
    for (int c0 = 0; c0 < g.D; c0 += kChunk) {
      if (chunks > 1 || kCosine) {
        // The products left the last chunk staged, as read: stage this one again (for
        // cosine attention q and k normalised).
        __syncthreads();
        stage_transposed<T>(g, a.q, nullptr, win.b, h, 0, c0, s.sy, s.sx, s.qt,
                            kCosine ? s.q_norm : nullptr);
        stage_transposed<T>(g, a.k, a.pad_k, win.b, h, 0, c0, s.sy, s.sx, s.kt,
                            kCosine ? s.k_norm : nullptr);
        if (chunks > 1) stage_transposed<T>(g, a.dout, nullptr, win.b, h, 0, c0, s.sy, s.sx, s.dot);
      }
      __syncthreads();  // x (v^T or the previous chunk's dS^T) is no longer read
      store_query_major(g.N, p, it, jt, s.x);
      __syncthreads();
      float acc[4][4] = {};
      // dv = P^T dout
      accumulate_rows(s.x, g.N, it, [&](int n) { return transposed_column(s.dot, n, dt); }, acc);
      store_gradient_rows<T>(g, a.dv, acc, win.b, h, c0, it, dt, s.sy, s.sx, g.N,
                             pad_grad ? s.pad_sum + (kTile / 4) * kChunk : nullptr);
      __syncthreads();
      store_query_major(g.N, ds, it, jt, s.x);
      __syncthreads();
      if (c0 == 0 && s.bias != nullptr && a.table_partial != nullptr) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int r = tid + k * kThreads;
          if (r < g.R) dtable[k] += table_gradient(g, s.x, r, 0, 0);
        }
      }
      // dk = dS^T q (times the scale, or through the normalisation)
      for (auto& row : acc) row[0] = row[1] = row[2] = row[3] = 0.f;
      accumulate_rows(s.x, g.N, it, [&](int n) { return transposed_column(s.qt, n, dt); }, acc);
      finish_gradient<kCosine>(acc, factor, s.kt, s.k_norm, s.k_proj, s.sy, it, dt);
      store_gradient_rows<T>(g, a.dk, acc, win.b, h, c0, it, dt, s.sy, s.sx, g.N,
                             pad_grad ? s.pad_sum : nullptr);
      __syncthreads();
      store_key_major(g.N, ds, it, jt, s.x);
      __syncthreads();
      // dq = dS k (times the scale, or through the normalisation)
      for (auto& row : acc) row[0] = row[1] = row[2] = row[3] = 0.f;
      accumulate_rows(s.x, g.N, it, [&](int n) { return transposed_column(s.kt, n, dt); }, acc);
      finish_gradient<kCosine>(acc, factor, s.qt, s.q_norm, s.q_proj, s.sy, it, dt);
      store_gradient_rows<T>(g, a.dq, acc, win.b, h, c0, it, dt, s.sy, s.sx, g.N, nullptr);
      if (pad_grad) add_pad_sums(g, s.pad_sum, pad_partial, h, c0);
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

// A window of several tiles, in three sweeps over the tile pairs (see the top). Query
// tiles at slot i0 have `rows` slots below N, key tiles at j0 `keys`.
template <typename T, bool kCosine>
__global__ void __launch_bounds__(kThreads, 2) window_attention_tiled_bwd_kernel(const BwdArgs a) {
  const Geometry& g = a.g;
  PV_DYNAMIC_SHARED(float, smem);
  const int tid = threadIdx.x, it = tid >> 3, jt = tid & 7, dt = jt;
  const auto [h, group, w_begin, w_end, factor] = bwd_block<kCosine>(a);
  const BwdShared s = bwd_shared(smem, a, h);
  const bool table_grad = s.bias != nullptr && a.table_partial != nullptr;
  // Table row r of this head: thread r % 128 sums its gradient in s.dtable[r].
  if (a.table_partial != nullptr) {
    for (int r = tid; r < g.R; r += kThreads) s.dtable[r] = 0.f;
  }
  float* pad_partial = block_pad_partial(a, group, h);
  float dlog_gain = 0.f;  // thread 0's sum over the block's windows and rows, in order

  const int chunks = (g.D + kChunk - 1) / kChunk;
  for (int w = w_begin; w < w_end; ++w) {
    __syncthreads();  // the previous window's shared-memory reads are done
    const Window win = setup_window(g, w, s.sy, s.sx, s.code);
    float row_m[4], row_log2_l[4];

    // 1. delta per query tile over the key tiles (cosine: and the norms of q and k).
    for (int i0 = 0; i0 < g.N; i0 += kTile) {
      Quad part = {{0.f, 0.f, 0.f, 0.f}};
      for (int j0 = 0; j0 < g.N; j0 += kTile) {
        float p[4][8] = {}, ds[4][8] = {};
        tile_products<T, kCosine, true>(a, s, win.b, h, i0, j0, it, jt, p, ds, j0 == 0, i0 == 0);
        // Loaded after the products, which need the registers.
        load_row_stats(a, w, h, i0, it, row_m, row_log2_l);
        add_delta_part(g, s, i0, j0, it, jt, row_m, row_log2_l, p, ds, part);
      }
      const Quad delta = reduce_rows(part, s.pad_sum, it, add);
      if (jt == 0) {
#pragma unroll
        for (int r = 0; r < 4; ++r) s.delta[i0 + token_of(it, r)] = delta.v[r];
      }
    }

    // 2. dq per query tile and head-dim chunk, over the key tiles.
    for (int i0 = 0; i0 < g.N; i0 += kTile) {
      const int rows = min(kTile, g.N - i0);
      for (int c0 = 0; c0 < g.D; c0 += kChunk) {
        float acc[4][4] = {};
        Quad row_proj = {{0.f, 0.f, 0.f, 0.f}};
        for (int j0 = 0; j0 < g.N; j0 += kTile) {
          float p[4][8] = {}, ds[4][8] = {}, col_proj[8] = {};
          tile_products<T, kCosine, false>(a, s, win.b, h, i0, j0, it, jt, p, ds);
          load_row_stats(a, w, h, i0, it, row_m, row_log2_l);
          const Quad delta = row_deltas(s, i0, it);
          gradient_tile<kCosine>(g, s, i0, j0, it, jt, row_m, row_log2_l, delta, p, ds,
                                 row_proj, col_proj);
          if (chunks > 1 || kCosine) {
            __syncthreads();
            stage_transposed<T>(g, a.k, a.pad_k, win.b, h, j0, c0, s.sy, s.sx, s.kt,
                                kCosine ? s.k_norm : nullptr);
          }
          __syncthreads();  // x (v^T) is no longer read
          store_key_major(min(kTile, g.N - j0), ds, it, jt, s.x);
          __syncthreads();
          // dq = dS k (times the scale, or through the normalisation)
          accumulate_rows(s.x, min(kTile, g.N - j0), it,
                          [&](int n) { return transposed_column(s.kt, n, dt); }, acc);
        }
        if constexpr (kCosine) {
          row_proj = reduce_rows(row_proj, s.pad_sum, it, add);
          if (jt == 0) {
#pragma unroll
            for (int r = 0; r < 4; ++r) s.q_proj[token_of(it, r)] = row_proj.v[r];
          }
          __syncthreads();  // the products' reads of q^T are done
          stage_transposed<T>(g, a.q, nullptr, win.b, h, i0, c0, s.sy, s.sx, s.qt, s.q_norm);
          __syncthreads();
          if (c0 == 0 && tid == 0) {
            for (int i = 0; i < rows; ++i) dlog_gain += s.q_proj[i];
          }
        }
        finish_gradient<kCosine>(acc, factor, s.qt, s.q_norm + i0, s.q_proj, s.sy + i0, it, dt);
        store_gradient_rows<T>(g, a.dq, acc, win.b, h, c0, it, dt, s.sy + i0, s.sx + i0, rows,
                               nullptr);
      }
    }

    // 3. dk, dv per key tile and head-dim chunk, over the query tiles.
    const bool pad_grad = pad_partial != nullptr && win.has_padding;
    for (int j0 = 0; j0 < g.N; j0 += kTile) {
      const int keys = min(kTile, g.N - j0);
      for (int c0 = 0; c0 < g.D; c0 += kChunk) {
        float acc_v[4][4] = {}, acc_k[4][4] = {};
        for (int i0 = 0; i0 < g.N; i0 += kTile) {
          const int rows = min(kTile, g.N - i0);
          float p[4][8] = {}, ds[4][8] = {};
          tile_products<T, kCosine, false>(a, s, win.b, h, i0, j0, it, jt, p, ds);
          load_row_stats(a, w, h, i0, it, row_m, row_log2_l);
          const Quad delta = row_deltas(s, i0, it);
          Quad row_proj = {{0.f, 0.f, 0.f, 0.f}};
          float col_proj[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          gradient_tile<kCosine>(g, s, i0, j0, it, jt, row_m, row_log2_l, delta, p, ds,
                                 row_proj, col_proj);
          if constexpr (kCosine) {
            // The column partials wait in the pad-sum buffer, free until the chunk's end
            // (its last reads were before the products' barriers): no registers held
            // across the sweep.
#pragma unroll
            for (int c = 0; c < 8; ++c) {
              s.pad_sum[8 * tid + c] = (i0 > 0 ? s.pad_sum[8 * tid + c] : 0.f) + col_proj[c];
            }
          }
          if (chunks > 1 || kCosine) {
            __syncthreads();
            stage_transposed<T>(g, a.q, nullptr, win.b, h, i0, c0, s.sy, s.sx, s.qt,
                                kCosine ? s.q_norm : nullptr);
            if (chunks > 1) {
              stage_transposed<T>(g, a.dout, nullptr, win.b, h, i0, c0, s.sy, s.sx, s.dot);
            }
          }
          __syncthreads();  // x (v^T) is no longer read
          store_query_major(rows, p, it, jt, s.x);
          __syncthreads();
          // dv = P^T dout
          accumulate_rows(s.x, rows, it, [&](int n) { return transposed_column(s.dot, n, dt); },
                          acc_v);
          __syncthreads();
          store_query_major(rows, ds, it, jt, s.x);
          __syncthreads();
          if (c0 == 0 && table_grad) {
            for (int r = tid; r < g.R; r += kThreads) s.dtable[r] += table_gradient(g, s.x, r, i0, j0);
          }
          // dk = dS^T q (times the scale, or through the normalisation)
          accumulate_rows(s.x, rows, it, [&](int n) { return transposed_column(s.qt, n, dt); },
                          acc_k);
        }
        if constexpr (kCosine) {
          __syncthreads();  // the column partials are written
          column_sums(s.pad_sum, s.k_proj);
          stage_transposed<T>(g, a.k, a.pad_k, win.b, h, j0, c0, s.sy, s.sx, s.kt, s.k_norm);
          __syncthreads();
        }
        finish_gradient<kCosine>(acc_k, factor, s.kt, s.k_norm + j0, s.k_proj, s.sy + j0, it, dt);
        // (column_sums' reads of pad_sum end before the barrier above.)
        store_gradient_rows<T>(g, a.dv, acc_v, win.b, h, c0, it, dt, s.sy + j0, s.sx + j0, keys,
                               pad_grad ? s.pad_sum + (kTile / 4) * kChunk : nullptr);
        store_gradient_rows<T>(g, a.dk, acc_k, win.b, h, c0, it, dt, s.sy + j0, s.sx + j0, keys,
                               pad_grad ? s.pad_sum : nullptr);
        if (pad_grad) {
          __syncthreads();
          add_pad_sums(g, s.pad_sum, pad_partial, h, c0);
        }
      }
    }
  }
  if (a.table_partial != nullptr) {
    for (int r = tid; r < g.R; r += kThreads) {
      a.table_partial[(static_cast<std::int64_t>(group) * g.R + r) * g.heads + h] = s.dtable[r];
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
  g.grid_partition = p.grid_partition;
  g.n_wh = static_cast<int>(ceil_div(p.H, p.wh));
  g.n_ww = static_cast<int>(ceil_div(p.W, p.ww));
  g.N = p.wh * p.ww;
  g.tiles = static_cast<int>(ceil_div(g.N, kTile));
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
  const int tiles = static_cast<int>(ceil_div(window_area, kTile));
  return 4 * (backward ? bwd_layout(tiles).end : fwd_smem_floats(tiles));
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
      // Query tiles on grid y: num_windows * heads < 2^31 fills x.
      PV_LAUNCH((window_attention_fwd_kernel<T, kCosine>),
                dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(g.tiles)),
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
    const int smem = window_attention_shared_bytes(g.N, true);
    const cudaError_t error = PV_DTYPE_SWITCH(p.dtype, T, [&] {
      return PV_BOOL_SWITCH(p.gain != nullptr, kCosine, [&] {
        if (g.tiles == 1) {
          PV_LAUNCH((window_attention_bwd_kernel<T, kCosine>),
                    dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream, args);
          return cudaGetLastError();
        }
        const auto kernel = window_attention_tiled_bwd_kernel<T, kCosine>;
        // Over the default 48 KB: opt in (every sm_80+ GPU grants at least 99 KB).
        const cudaError_t error =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (error != cudaSuccess) {
          static_cast<void>(cudaGetLastError());  // returned here: not reported again
          return error;
        }
        PV_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream,
                  args);
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
