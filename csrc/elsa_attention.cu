// ELSA aggregation kernels (interface in elsa_attention.cuh).
//
// Notation: head g owns channels [g*Cg, (g+1)*Cg); KK = K*K taps, r = K/2; p = softmax of
// the logits over the taps (or attn itself); (M, D) the ghost filters, read through the
// read-only cache from the (C, KK, 2) float table the binding builds (C*KK*2 floats, never
// expanded per sample; every lane of a warp reads the same entry).
//
// Dilation. Pixels (sigma + u*d, rho + x*d) for fixed residues (sigma, rho) form a
// sub-grid on which the dilated window is an ordinary K x K window: every kernel works on
// tiles of one sub-grid, so dilation only enters the image coordinates and never the
// shared-memory footprint (d = 1 is the single sub-grid).
//
// Tile. A block owns TH x TW sub-grid pixels (128: 32 groups of kPix = 4 consecutive
// pixels of a row) of one (sample, head). Inputs go to shared memory as fp32, read once
// from global memory through their strides in the order that is coalesced for their
// layout (NCHW: columns fastest; channels_last: channels fastest):
// - the probabilities P[t][pixel] of the tile (the softmax computed once per pixel);
// - the head's channels with a halo of r rows and RL >= r columns (RL rounded to 4 so
//   that every thread's row window is a run of 16-byte aligned float4 loads), zeros
//   outside the image, in chunks of at most kMaxChunk channels.
// Threads then work from registers: a thread holds kPix pixels of a row, loads the
// kPix + 2*RL staged values of each window row once and reuses them for the K taps of
// the row (sliding window), and keeps the K taps' probabilities of its pixels for all
// of its channels. Outputs are staged back in shared memory and stored coalesced.
//
// Forward (elsa_aggregate_kernel<kTransposed = false>): y[c, o] += (M p[o, t] + D) v[c, o + delta_t];
// a thread owns kPix pixels x kChan channels (fp32 accumulators).
// Backward, no float atomics:
// - elsa_bwd_attn_kernel: per block one tile of one head for a chunk of samples.
//   dp[o, t] = sum_c M[c, t] dy[c, o] v[c, o + delta_t] with one thread per (pixel group,
//   tap row): the reduction over channels stays in registers. The softmax backward
//   dl = p (dp - sum_s p_s dp_s) reduces over the tap rows through shared memory in a
//   fixed order. dM[c, t] = sum p dy v and dD[c, t] = sum dy v with one thread per
//   (channel, tap row) looping over the tile's pixels; the sums accumulate over the
//   block's samples in shared memory (or, if that is too large, in the block's own
//   partial row), each element updated by one thread, and end as one partial row per
//   block. It also writes each pixel's log2 softmax normaliser for the dv kernel.
// - elsa_ghost_reduce_kernel sums the partial rows in a fixed order into dM / dD.
// - elsa_aggregate_kernel<kTransposed = true>: dv[c, i] = sum_t (M p[i - delta_t, t] + D)
//   dy[c, i - delta_t], the forward's code with the window mirrored, the staged
//   probabilities gathered from the shifted pixels (and the saved normalisers).
// Nothing is saved by the forward; the backward recomputes the softmax.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "elsa_attention.cuh"

#ifdef PYVIT_HOST_EMULATION
#include <cassert>
#define PV_ELSA_UNROLL
#define PV_ELSA_UNROLL_ONCE
#else
#define PV_ELSA_UNROLL _Pragma("unroll")
#define PV_ELSA_UNROLL_ONCE _Pragma("unroll 1")
#endif

namespace pyvit {
namespace elsa {

constexpr int kPix = 4;         // pixels per thread: consecutive columns of one sub-grid row
constexpr int kGroups = 32;     // pixel groups per tile (one warp)
constexpr int kTilePixels = kPix * kGroups;
constexpr int kChan = 8;        // channels per thread in the aggregation kernels
constexpr int kMaxChunk = 32;   // channels staged in shared memory at once
constexpr int kReduceThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
// The dM / dD sums of a block stay in shared memory up to this size, else in its
// partial row in global memory.
constexpr std::size_t kMaxSharedAccumulator = 16 * 1024;
// attn-gradient blocks launched when ghost gradients are needed (a few waves on an H100):
// more samples per block mean fewer partial rows to write and sum, but fewer blocks.
constexpr int kTargetAttnBlocks = 1024;

template <int K>
struct Window {
  static constexpr int kTaps = K * K;
  static constexpr int kR = K / 2;
  static constexpr int kRL = (kR + 3) / 4 * 4;   // staged halo columns per side
  static constexpr int kSpan = kPix + 2 * kRL;   // staged values a thread reads per row
};

// Shared-memory float4 access (16-byte aligned by construction); the host-emulation build
// copies element-wise and checks the alignment the GPU relies on.
PV_DEVICE void load4(float* dst, const float* src) {
#ifdef PYVIT_HOST_EMULATION
  assert(reinterpret_cast<std::uintptr_t>(src) % 16 == 0);
  for (int k = 0; k < kPix; ++k) dst[k] = src[k];
#else
  const float4 v = *reinterpret_cast<const float4*>(src);
  dst[0] = v.x;
  dst[1] = v.y;
  dst[2] = v.z;
  dst[3] = v.w;
#endif
}

PV_DEVICE void store4(float* dst, const float (&src)[kPix]) {
#ifdef PYVIT_HOST_EMULATION
  assert(reinterpret_cast<std::uintptr_t>(dst) % 16 == 0);
  for (int k = 0; k < kPix; ++k) dst[k] = src[k];
#else
  *reinterpret_cast<float4*>(dst) = make_float4(src[0], src[1], src[2], src[3]);
#endif
}

// (M, D) of one channel and tap from the ghost table: one read-only 8-byte load, the same
// address for every lane of a warp.
PV_DEVICE void load_ghost(const float* entry, float& m, float& d) {
#ifdef PYVIT_HOST_EMULATION
  m = entry[0];
  d = entry[1];
#else
  const float2 v = __ldg(reinterpret_cast<const float2*>(entry));
  m = v.x;
  d = v.y;
#endif
}

// A strided (B, ., H, W) tensor on the device: 64-bit sample offsets, 32-bit within one.
template <typename T>
struct View {
  T* data;
  std::int64_t sb;
  int sc, sh, sw;

  PV_DEVICE T* sample(std::uint32_t b, int channel) const {
    return data + static_cast<std::int64_t>(b) * sb + static_cast<std::int64_t>(channel) * sc;
  }
};

template <typename T>
View<T> make_view(const ElsaTensor& t) {
  return {static_cast<T*>(const_cast<void*>(t.data)), t.stride[0], static_cast<int>(t.stride[1]),
          static_cast<int>(t.stride[2]), static_cast<int>(t.stride[3])};
}

// A rows x cols block of staged values per channel: index c * chan_pitch + row * cols + col
// holds sub-grid pixel (u0 + row - row_off, x0 + col - col_off).
struct Stage {
  int rows, cols, chan_pitch, row_off, col_off;
};

// Tile decomposition and shared-memory layout, computed on the host (make_plan).
struct Geometry {
  int H, W, d, Cg, G;
  int TH, TW, GPR;  // tile in sub-grid pixels, GPR = TW / kPix pixel groups per row
  int CB, tiles;    // channels per staged chunk; tiles per (sample, head)
  Stage halo;       // a chunk of channels with the window's halo (CP = halo.chan_pitch)
  Stage tile;       // a chunk of channels of the tile only (the attn-gradient kernel's dy)
  // Sub-grids: residue classes (sigma, rho) with sigma < min(d, H), rho < min(d, W).
  FastDivmod tiles_div, tiles_w_div, tiles_h_div, rho_div, tw_div, cb_div;
};

// Image coordinates of the sub-grid pixel (u, x) of a tile's residue class.
struct Origin {
  int sigma, rho, u0, x0;
};

PV_DEVICE Origin tile_origin(const Geometry& geo, std::uint32_t tile) {
  std::uint32_t tw, th, rho;
  const std::uint32_t cls = geo.tiles_h_div.divmod(geo.tiles_w_div.divmod(tile, tw), th);
  const std::uint32_t sigma = geo.rho_div.divmod(cls, rho);
  return {static_cast<int>(sigma), static_cast<int>(rho), static_cast<int>(th) * geo.TH,
          static_cast<int>(tw) * geo.TW};
}

struct Pixel {
  int h, w;
  bool inside;
};

PV_DEVICE Pixel image_pixel(const Geometry& geo, const Origin& o, int u, int x) {
  const int h = o.sigma + u * geo.d;
  const int w = o.rho + x * geo.d;
  return {h, w, u >= 0 && x >= 0 && h < geo.H && w < geo.W};
}

// Tile-local pixel index (row-major, TW per row) to image coordinates.
PV_DEVICE Pixel tile_pixel(const Geometry& geo, const Origin& o, std::uint32_t pix) {
  std::uint32_t x;
  const std::uint32_t u = geo.tw_div.divmod(pix, x);
  return image_pixel(geo, o, o.u0 + static_cast<int>(u), o.x0 + static_cast<int>(x));
}

// dst[c * chan_pitch + row * cols + col] = src[channel c, staged pixel (row, col)] in fp32
// (0 outside the image) for c < nc. Consecutive threads read consecutive addresses: for
// channels-last tensors a thread keeps one channel and walks the pixels, otherwise it
// keeps one column and walks channels and rows; indices advance incrementally.
template <typename T, bool kChannelsLast>
PV_DEVICE void stage_channels(float* dst, const T* src, const View<const T>& view, int nc,
                              const Stage& s, const Geometry& geo, const Origin& o) {
  const int threads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  if constexpr (kChannelsLast) {
    const int lanes = min(threads, geo.CB), groups = threads / lanes;
    const int c = tid % lanes, first = tid / lanes;
    if (first >= groups || c >= nc) return;
    const T* src_c = src + c * view.sc;
    float* dst_c = dst + c * s.chan_pitch;
    const int step_row = groups / s.cols, step_col = groups % s.cols;
    int row = first / s.cols, col = first % s.cols;
    for (int pos = first; pos < s.rows * s.cols; pos += groups) {
      const Pixel px = image_pixel(geo, o, o.u0 + row - s.row_off, o.x0 + col - s.col_off);
      dst_c[pos] = px.inside ? to_float(src_c[px.h * view.sh + px.w * view.sw]) : 0.f;
      row += step_row;
      col += step_col;
      if (col >= s.cols) {
        col -= s.cols;
        ++row;
      }
    }
  } else {
    const int lanes = min(threads, s.cols), groups = threads / lanes;
    const int first = tid / lanes;
    if (first >= groups) return;
    for (int col = tid % lanes; col < s.cols; col += lanes) {
      const int x = o.x0 + col - s.col_off;
      const int w = o.rho + x * geo.d;
      const bool col_inside = x >= 0 && w < geo.W;
      for (int c = 0; c < nc; ++c) {
        const T* src_c = src + c * view.sc + w * view.sw;
        float* dst_c = dst + c * s.chan_pitch + col;
        for (int row = first; row < s.rows; row += groups) {
          const int u = o.u0 + row - s.row_off;
          const int h = o.sigma + u * geo.d;
          dst_c[row * s.cols] =
              col_inside && u >= 0 && h < geo.H ? to_float(src_c[h * view.sh]) : 0.f;
        }
      }
    }
  }
}

template <typename T>
PV_DEVICE void stage_channels(float* dst, const T* src, const View<const T>& view,
                              bool channels_last, int nc, const Stage& s, const Geometry& geo,
                              const Origin& o) {
  if (channels_last) {
    stage_channels<T, true>(dst, src, view, nc, s, geo, o);
  } else {
    stage_channels<T, false>(dst, src, view, nc, s, geo, o);
  }
}

// out[channel c, tile pixel] = src[c * P + pixel] for c < nc, in-image pixels only, with
// the access order of stage_channels (channels-last: `lanes` threads per pixel, one
// channel each; otherwise one pixel per thread, all channels).
template <typename T, bool kChannelsLast>
PV_DEVICE void store_channels(T* out, const View<T>& view, const float* src, int nc, int lanes,
                              const Geometry& geo, const Origin& o) {
  const int threads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  if constexpr (kChannelsLast) {
    lanes = min(threads, lanes);
    const int groups = threads / lanes, c = tid % lanes, first = tid / lanes;
    if (first >= groups || c >= nc) return;
    for (int pix = first; pix < kTilePixels; pix += groups) {
      const Pixel px = tile_pixel(geo, o, static_cast<std::uint32_t>(pix));
      if (px.inside) {
        out[c * view.sc + px.h * view.sh + px.w * view.sw] = from_float<T>(src[c * kTilePixels + pix]);
      }
    }
  } else {
    for (int pix = tid; pix < kTilePixels; pix += threads) {
      const Pixel px = tile_pixel(geo, o, static_cast<std::uint32_t>(pix));
      if (!px.inside) continue;
      T* out_px = out + px.h * view.sh + px.w * view.sw;
      for (int c = 0; c < nc; ++c) out_px[c * view.sc] = from_float<T>(src[c * kTilePixels + pix]);
    }
  }
}

template <typename T>
PV_DEVICE void store_channels(T* out, const View<T>& view, bool channels_last, const float* src,
                              int nc, int lanes, const Geometry& geo, const Origin& o) {
  if (channels_last) {
    store_channels<T, true>(out, view, src, nc, lanes, geo, o);
  } else {
    store_channels<T, false>(out, view, src, nc, lanes, geo, o);
  }
}

// probs[t * P + pixel] for the tile's pixels: the softmax over the taps of the head's
// logits `a` (channel t = tap), or `a` itself; 0 outside the image. With lse2, also the
// log2 normaliser of each in-image pixel as (max, log2 of the sum of exp(l - max)) at
// lse2[h * W + w] and lse2[H * W + h * W + w]. One thread per pixel: the max,
// the exponentials and the normalisation pass over the thread's own column of `probs`.
// Consecutive threads read consecutive pixels of a tap (NCHW); for channels-last logits
// each thread streams its pixel's K*K contiguous taps, whose sectors stay in L1.
template <typename T, int K>
PV_DEVICE void stage_probs(float* probs, float* lse2, const T* a, const View<const T>& view,
                           bool softmax, const Geometry& geo, const Origin& o) {
  constexpr int kTaps = Window<K>::kTaps;
  for (std::uint32_t pix = threadIdx.x; pix < kTilePixels; pix += blockDim.x) {
    float* col = probs + pix;
    const Pixel px = tile_pixel(geo, o, pix);
    if (!px.inside) {
      for (int t = 0; t < kTaps; ++t) col[t * kTilePixels] = 0.f;
      continue;
    }
    const T* logits = a + px.h * view.sh + px.w * view.sw;
    if (!softmax) {
      for (int t = 0; t < kTaps; ++t) col[t * kTilePixels] = to_float(logits[t * view.sc]);
      continue;
    }
    float top = -INFINITY;
    for (int t = 0; t < kTaps; ++t) {
      const float l = to_float(logits[t * view.sc]);
      col[t * kTilePixels] = l;
      top = max(top, l);
    }
    float sum = 0.f;
    for (int t = 0; t < kTaps; ++t) {
      // l - top first: l * log2(e) overflows for logits near +-FLT_MAX.
      const float e = exp2f((col[t * kTilePixels] - top) * kLog2e);
      col[t * kTilePixels] = e;
      sum += e;
    }
    const float inv = 1.f / sum;
    for (int t = 0; t < kTaps; ++t) col[t * kTilePixels] *= inv;
    if (lse2 != nullptr) {
      // The max and log2(sum) apart: top + log2(sum) rounds the sum away for |top| > 2**26.
      lse2[px.h * geo.W + px.w] = top;
      lse2[geo.H * geo.W + px.h * geo.W + px.w] = log2f(sum);
    }
  }
}

// probs[t * P + pixel] = p(pixel - delta_t, t): the probability with which the output
// pixel pixel - delta_t read this pixel through tap t (0 when that pixel is outside the
// image), from its logit and saved log2 normaliser (or the given probability). One
// thread per pixel; consecutive threads read consecutive source pixels.
template <typename T, int K>
PV_DEVICE void stage_shifted_probs(float* probs, const float* lse2, const T* a,
                                   const View<const T>& view, bool softmax, const Geometry& geo,
                                   const Origin& o) {
  constexpr int kR = Window<K>::kR;
  for (std::uint32_t pix = threadIdx.x; pix < kTilePixels; pix += blockDim.x) {
    std::uint32_t x;
    const int u = static_cast<int>(geo.tw_div.divmod(pix, x));
    float* col = probs + pix;
    // One tap row at a time: a fully unrolled window keeps its three loads per tap
    // (logit, max, log-sum) in flight at once and spills at K = 5.
    PV_ELSA_UNROLL_ONCE
    for (int ty = 0; ty < K; ++ty) {
      const int su = o.u0 + u + kR - ty;
      const int h = o.sigma + su * geo.d;
      const bool row_inside = su >= 0 && h < geo.H;
      PV_ELSA_UNROLL
      for (int tx = 0; tx < K; ++tx) {
        const int t = ty * K + tx;
        const int sx = o.x0 + static_cast<int>(x) + kR - tx;
        const int w = o.rho + sx * geo.d;
        float value = 0.f;
        if (row_inside && sx >= 0 && w < geo.W) {
          value = to_float(a[t * view.sc + h * view.sh + w * view.sw]);
          if (softmax) {
            value = exp2f((value - lse2[h * geo.W + w]) * kLog2e - lse2[geo.H * geo.W + h * geo.W + w]);
          }
        }
        col[t * kTilePixels] = value;
      }
    }
  }
}

// The thread's kPix x kChan outputs of one chunk: acc[i][k] += sum_t f_t * x[c_i, pixel_k +/- delta_t],
// f_t = M p_t + D (kGhost) or p_t. `rows` points at the thread's first staged column of
// halo row 0 of channel 0; kTransposed mirrors the window (dv).
template <int K, bool kTransposed, bool kGhost>
PV_DEVICE void aggregate_tile(float (&acc)[kChan][kPix], const float* probs, const float* rows,
                              const float* ghost, int pix0, int cbase, int nc, const Geometry& geo) {
  using Win = Window<K>;
  const int pitch = geo.halo.chan_pitch;
  PV_ELSA_UNROLL_ONCE
  for (int ty = 0; ty < K; ++ty) {
    float p[K][kPix];
    PV_ELSA_UNROLL
    for (int tx = 0; tx < K; ++tx) load4(p[tx], probs + (ty * K + tx) * kTilePixels + pix0);
    const float* row = rows + (kTransposed ? K - 1 - ty : ty) * geo.halo.cols;
    PV_ELSA_UNROLL
    for (int i = 0; i < kChan; ++i) {
      const int c = cbase + i;
      if (c >= nc) break;
      float x[Win::kSpan];
      PV_ELSA_UNROLL
      for (int s = 0; s < Win::kSpan; s += kPix) load4(x + s, row + c * pitch + s);
      PV_ELSA_UNROLL
      for (int tx = 0; tx < K; ++tx) {
        float m = 1.f, d = 0.f;
        if constexpr (kGhost) load_ghost(ghost + (c * Win::kTaps + ty * K + tx) * 2, m, d);
        // Staged column of tap tx for pixel k: k + off (mirrored for the transpose).
        constexpr int kBase = Win::kRL - Win::kR;
        const int off = kTransposed ? kBase + K - 1 - tx : kBase + tx;
        PV_ELSA_UNROLL
        for (int k = 0; k < kPix; ++k) {
          const float f = kGhost ? fmaf(m, p[tx][k], d) : p[tx][k];
          acc[i][k] = fmaf(f, x[k + off], acc[i][k]);
        }
      }
    }
  }
}

template <typename T>
struct AggregateArgs {
  View<const T> x;       // v (forward) or dout (dv)
  View<const T> attn;    // logits or probabilities
  View<T> out;           // out (forward) or dv
  const float* ghost;    // (C, KK, 2) or nullptr
  const float* lse2;     // (B, G, 2, H*W) log2 normalisers (dv with softmax), else nullptr
  bool x_channels_last, out_channels_last, softmax;
};

// Forward (y) and, with kTransposed, dv. Grid (tiles * B, G), kGroups * ceil(CB / kChan) threads.
template <typename T, int K, bool kTransposed>
__global__ void __launch_bounds__(kGroups* kMaxChunk / kChan)
    elsa_aggregate_kernel(const AggregateArgs<T> args, const Geometry geo) {
  using Win = Window<K>;
  std::uint32_t tile;
  const std::uint32_t b = geo.tiles_div.divmod(blockIdx.x, tile);
  const int g = static_cast<int>(blockIdx.y);
  const Origin o = tile_origin(geo, tile);
  PV_DYNAMIC_SHARED(float, smem);
  float* probs = smem;                                    // [KK][P]
  float* staged = smem + Win::kTaps * kTilePixels;        // [CB][CP]: halo, then outputs

  const T* attn = args.attn.sample(b, g * Win::kTaps);
  if constexpr (kTransposed) {
    const float* lse2 =
        args.softmax ? args.lse2 + (static_cast<std::int64_t>(b) * geo.G + g) * 2 * geo.H * geo.W
                     : nullptr;
    stage_shifted_probs<T, K>(probs, lse2, attn, args.attn, args.softmax, geo, o);
  } else {
    stage_probs<T, K>(probs, nullptr, attn, args.attn, args.softmax, geo, o);
  }

  const int pg = static_cast<int>(threadIdx.x) % kGroups;
  const int cbase = static_cast<int>(threadIdx.x) / kGroups * kChan;
  const int pix0 = pg * kPix;
  // Halo row 0, first staged column of the thread's window.
  const float* rows = staged + pg / geo.GPR * geo.halo.cols + pg % geo.GPR * kPix;
  for (int c0 = 0; c0 < geo.Cg; c0 += geo.CB) {
    const int nc = min(geo.CB, geo.Cg - c0);
    const int channel = g * geo.Cg + c0;
    __syncthreads();  // the previous chunk's outputs are stored
    stage_channels<T>(staged, args.x.sample(b, channel), args.x, args.x_channels_last, nc,
                      geo.halo, geo, o);
    __syncthreads();
    float acc[kChan][kPix] = {};
    if (cbase < nc) {
      if (args.ghost != nullptr) {
        aggregate_tile<K, kTransposed, true>(acc, probs, rows,
                                             args.ghost + channel * Win::kTaps * 2, pix0, cbase,
                                             nc, geo);
      } else {
        aggregate_tile<K, kTransposed, false>(acc, probs, rows, nullptr, pix0, cbase, nc, geo);
      }
    }
    __syncthreads();  // everyone is done reading the halo
    PV_ELSA_UNROLL
    for (int i = 0; i < kChan; ++i) {
      if (cbase + i < nc) store4(staged + (cbase + i) * kTilePixels + pix0, acc[i]);
    }
    __syncthreads();
    store_channels<T>(args.out.sample(b, channel), args.out, args.out_channels_last, staged, nc,
                      geo.CB, geo, o);
  }
}

// dp of the thread's pixel group and tap row ty over a chunk's channels:
// dp[tx][k] += M[c, t] * dy[c, k] * v[c, k + delta_t].
template <int K, bool kMul>
PV_DEVICE void dp_tile(float (&dp)[K][kPix], const float* halo, const float* dy,
                       const float* ghost, int ty, int nc, const Geometry& geo) {
  using Win = Window<K>;
  constexpr int kBase = Win::kRL - Win::kR;
  PV_ELSA_UNROLL_ONCE
  for (int c = 0; c < nc; ++c) {
    float y[kPix], x[Win::kSpan];
    load4(y, dy + c * geo.tile.chan_pitch);
    PV_ELSA_UNROLL
    for (int s = 0; s < Win::kSpan; s += kPix) load4(x + s, halo + c * geo.halo.chan_pitch + s);
    PV_ELSA_UNROLL
    for (int tx = 0; tx < K; ++tx) {
      float m = 1.f, unused;
      if constexpr (kMul) load_ghost(ghost + (c * Win::kTaps + ty * K + tx) * 2, m, unused);
      PV_ELSA_UNROLL
      for (int k = 0; k < kPix; ++k) {
        dp[tx][k] = kMul ? fmaf(m, y[k] * x[k + kBase + tx], dp[tx][k])
                         : fmaf(y[k], x[k + kBase + tx], dp[tx][k]);
      }
    }
  }
}

// dM / dD sums of the chunk's (channel, tap row) items over the tile's pixels, added to
// acc[c * KK + t] (dM) and acc[stride + c * KK + t] (dD). Items are spread channels
// fastest, so the lanes of a warp share the tap row and read the same probabilities.
template <int K, bool kMul, bool kAdd>
PV_DEVICE void ghost_tile(float* acc, int stride, const float* probs, const float* halo,
                          const float* dy, int c0, int nc, const Geometry& geo) {
  using Win = Window<K>;
  constexpr int kBase = Win::kRL - Win::kR;
  const std::uint32_t items = static_cast<std::uint32_t>(geo.CB * K);
  for (std::uint32_t item = threadIdx.x; item < items; item += blockDim.x) {
    std::uint32_t c;
    const int ty = static_cast<int>(geo.cb_div.divmod(item, c));
    if (static_cast<int>(c) >= nc) continue;
    float* sum_m = acc + (c0 + static_cast<int>(c)) * Win::kTaps + ty * K;
    float* sum_d = sum_m + stride;
    float am[K], ad[K];
    PV_ELSA_UNROLL
    for (int tx = 0; tx < K; ++tx) {
      am[tx] = kMul ? sum_m[tx] : 0.f;
      ad[tx] = kAdd ? sum_d[tx] : 0.f;
    }
    const float* x_c = halo + c * geo.halo.chan_pitch + ty * geo.halo.cols;
    const float* dy_c = dy + c * geo.tile.chan_pitch;
    const float* p_row = probs + ty * K * kTilePixels;
    int pix0 = 0;
    PV_ELSA_UNROLL_ONCE
    for (int row = 0; row < geo.TH; ++row) {
      PV_ELSA_UNROLL_ONCE
      for (int col = 0; col < geo.TW; col += kPix, pix0 += kPix) {
        float y[kPix], x[Win::kSpan];
        load4(y, dy_c + pix0);
        PV_ELSA_UNROLL
        for (int s = 0; s < Win::kSpan; s += kPix) {
          load4(x + s, x_c + row * geo.halo.cols + col + s);
        }
        PV_ELSA_UNROLL
        for (int tx = 0; tx < K; ++tx) {
          float p[kPix];
          if constexpr (kMul) load4(p, p_row + tx * kTilePixels + pix0);
          PV_ELSA_UNROLL
          for (int k = 0; k < kPix; ++k) {
            const float prod = y[k] * x[k + kBase + tx];
            if constexpr (kMul) am[tx] = fmaf(p[k], prod, am[tx]);
            if constexpr (kAdd) ad[tx] += prod;
          }
        }
      }
    }
    PV_ELSA_UNROLL
    for (int tx = 0; tx < K; ++tx) {
      if constexpr (kMul) sum_m[tx] = am[tx];
      if constexpr (kAdd) sum_d[tx] = ad[tx];
    }
  }
}

template <typename T>
struct AttnGradArgs {
  View<const T> v, attn, dout;
  View<T> dattn;
  const float* ghost;  // (C, KK, 2) or nullptr
  float* lse2;         // (B, G, 2, H*W), written when write_lse
  float* partials;     // (rows, 2, C, KK) when ghost gradients are needed
  int B, C, samples_per_block;
  bool v_channels_last, dout_channels_last, dattn_channels_last;
  bool softmax, has_mul, need_dattn, need_dmul, need_dadd, write_lse, shared_accumulator;
};

// dattn, dM / dD partial rows and the softmax normalisers. Grid (tiles * sample chunks,
// G), kGroups * K threads: thread (pixel group, tap row) in the dp phase.
template <typename T, int K>
__global__ void __launch_bounds__(kGroups* K, 1)
    elsa_bwd_attn_kernel(const AttnGradArgs<T> args, const Geometry geo) {
  using Win = Window<K>;
  constexpr int kTaps = Win::kTaps;
  std::uint32_t tile;
  const std::uint32_t chunk = geo.tiles_div.divmod(blockIdx.x, tile);
  const int g = static_cast<int>(blockIdx.y);
  const Origin o = tile_origin(geo, tile);
  const int b_begin = static_cast<int>(chunk) * args.samples_per_block;
  const int b_end = min(args.B, b_begin + args.samples_per_block);
  const bool need_ghost = args.need_dmul || args.need_dadd;
  const bool need_probs = args.write_lse || args.need_dmul || (args.need_dattn && args.softmax);

  PV_DYNAMIC_SHARED(float, smem);
  float* probs = smem;                                     // [KK][P]
  float* halo = probs + kTaps * kTilePixels;               // [CB][CP]
  float* dy = halo + geo.CB * geo.halo.chan_pitch;         // [CB][DP]
  float* partial = halo;                                   // [K][P], once halo / dy are dead
  const int work = max(geo.CB * (geo.halo.chan_pitch + geo.tile.chan_pitch), K * kTilePixels);

  // dM / dD sums of the head's channels: [2][Cg][KK] in shared memory, or the block's own
  // partial row [2][C][KK] in global memory.
  const std::int64_t row = static_cast<std::int64_t>(chunk) * geo.tiles + tile;
  float* acc = nullptr;
  int acc_stride = 0;
  if (need_ghost) {
    float* row_sums = args.partials + row * 2 * args.C * kTaps;
    acc = args.shared_accumulator ? halo + work : row_sums + g * geo.Cg * kTaps;
    acc_stride = (args.shared_accumulator ? geo.Cg : args.C) * kTaps;
    for (int i = static_cast<int>(threadIdx.x); i < geo.Cg * kTaps;
         i += static_cast<int>(blockDim.x)) {
      acc[i] = 0.f;
      acc[acc_stride + i] = 0.f;
    }
  }

  const int ty = static_cast<int>(threadIdx.x) / kGroups;
  const int pg = static_cast<int>(threadIdx.x) % kGroups;
  const int pix0 = pg * kPix;
  // Halo row ty, first staged column of the thread's window.
  const int window = (pg / geo.GPR + ty) * geo.halo.cols + pg % geo.GPR * kPix;

  for (int b = b_begin; b < b_end; ++b) {
    const std::uint32_t ub = static_cast<std::uint32_t>(b);
    __syncthreads();  // the previous sample is done with shared memory
    if (need_probs) {
      float* lse2 = args.write_lse
                        ? args.lse2 + (static_cast<std::int64_t>(b) * geo.G + g) * 2 * geo.H * geo.W
                        : nullptr;
      stage_probs<T, K>(probs, lse2, args.attn.sample(ub, g * kTaps), args.attn, args.softmax,
                        geo, o);
    }
    if (!args.need_dattn && !need_ghost) continue;

    // The dM / dD pass over the chunks, then the dp pass: their registers are never live
    // together. A head of one chunk is staged once for both.
    const bool one_chunk = geo.Cg <= geo.CB;
    const auto stage_chunk = [&](int c0) {
      const int channel = g * geo.Cg + c0;
      const int nc = min(geo.CB, geo.Cg - c0);
      __syncthreads();  // the previous chunk is consumed
      stage_channels<T>(halo, args.v.sample(ub, channel), args.v, args.v_channels_last, nc,
                        geo.halo, geo, o);
      stage_channels<T>(dy, args.dout.sample(ub, channel), args.dout, args.dout_channels_last,
                        nc, geo.tile, geo, o);
      __syncthreads();
    };
    if (need_ghost) {
      for (int c0 = 0; c0 < geo.Cg; c0 += geo.CB) {
        const int nc = min(geo.CB, geo.Cg - c0);
        stage_chunk(c0);
        if (args.need_dmul && args.need_dadd) {
          ghost_tile<K, true, true>(acc, acc_stride, probs, halo, dy, c0, nc, geo);
        } else if (args.need_dmul) {
          ghost_tile<K, true, false>(acc, acc_stride, probs, halo, dy, c0, nc, geo);
        } else {
          ghost_tile<K, false, true>(acc, acc_stride, probs, halo, dy, c0, nc, geo);
        }
      }
    }
    if (!args.need_dattn) continue;

    float dp[K][kPix] = {};
    for (int c0 = 0; c0 < geo.Cg; c0 += geo.CB) {
      const int nc = min(geo.CB, geo.Cg - c0);
      if (!(one_chunk && need_ghost)) stage_chunk(c0);
      const float* ghost = args.has_mul ? args.ghost + (g * geo.Cg + c0) * kTaps * 2 : nullptr;
      if (args.has_mul) {
        dp_tile<K, true>(dp, halo + window, dy + pix0, ghost, ty, nc, geo);
      } else {
        dp_tile<K, false>(dp, halo + window, dy + pix0, nullptr, ty, nc, geo);
      }
    }

    // Softmax backward: dl = p * (dp - sum_t p_t dp_t). The sum over a pixel's taps
    // crosses the K threads of its tap rows: partial sums per tap row, added in order.
    // Each thread then overwrites exactly the probabilities it reads with dl.
    __syncthreads();  // halo / dy (now `partial`) and probs are no longer read
    float* own = probs + ty * K * kTilePixels + pix0;
    if (args.softmax) {
      float part[kPix] = {};
      PV_ELSA_UNROLL
      for (int tx = 0; tx < K; ++tx) {
        float p[kPix];
        load4(p, own + tx * kTilePixels);
        PV_ELSA_UNROLL
        for (int k = 0; k < kPix; ++k) part[k] = fmaf(p[k], dp[tx][k], part[k]);
      }
      store4(partial + ty * kTilePixels + pix0, part);
      __syncthreads();
      float total[kPix] = {};
      for (int y = 0; y < K; ++y) {
        float s[kPix];
        load4(s, partial + y * kTilePixels + pix0);
        PV_ELSA_UNROLL
        for (int k = 0; k < kPix; ++k) total[k] += s[k];
      }
      PV_ELSA_UNROLL
      for (int tx = 0; tx < K; ++tx) {
        float p[kPix];
        load4(p, own + tx * kTilePixels);
        PV_ELSA_UNROLL
        for (int k = 0; k < kPix; ++k) dp[tx][k] = p[k] * (dp[tx][k] - total[k]);
      }
    }
    PV_ELSA_UNROLL
    for (int tx = 0; tx < K; ++tx) store4(own + tx * kTilePixels, dp[tx]);
    __syncthreads();
    store_channels<T>(args.dattn.sample(ub, g * kTaps), args.dattn, args.dattn_channels_last,
                      probs, kTaps, kTaps, geo, o);
  }

  if (need_ghost && args.shared_accumulator) {
    __syncthreads();
    float* out = args.partials + row * 2 * args.C * kTaps + g * geo.Cg * kTaps;
    for (int i = static_cast<int>(threadIdx.x); i < geo.Cg * kTaps;
         i += static_cast<int>(blockDim.x)) {
      out[i] = acc[i];
      out[args.C * kTaps + i] = acc[acc_stride + i];
    }
  }
}

PV_DEVICE void store_as(DType dtype, void* out, int i, float value) {
  switch (dtype) {
    case DType::kFloat16:
      static_cast<__half*>(out)[i] = from_float<__half>(value);
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(out)[i] = from_float<__nv_bfloat16>(value);
      break;
    case DType::kFloat32:
    default:
      static_cast<float*>(out)[i] = value;
  }
}

// dM / dD[i] = sum over the partial rows in row order (deterministic). One thread per
// element of the two (C, K, K) outputs; consecutive threads read consecutive addresses.
__global__ void __launch_bounds__(kReduceThreads)
    elsa_ghost_reduce_kernel(const float* partials, int rows, int n, void* dmul, DType mul_dtype,
                             void* dadd, DType add_dtype) {
  const int e = static_cast<int>(blockIdx.x * kReduceThreads + threadIdx.x);
  if (e >= 2 * n) return;
  const bool is_add = e >= n;
  void* out = is_add ? dadd : dmul;
  if (out == nullptr) return;
  float sum = 0.f;
  for (int r = 0; r < rows; ++r) sum += partials[static_cast<std::int64_t>(r) * 2 * n + e];
  store_as(is_add ? add_dtype : mul_dtype, out, is_add ? e - n : e, sum);
}

// ---------------------------------------------------------------------------- host side

struct Plan {
  Geometry geo;
  std::size_t aggregate_smem, attn_smem;
  int aggregate_threads, attn_threads;
  bool shared_accumulator;
};

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// A channel pitch (floats) >= n whose float4 index is odd: the lanes of a warp that read
// the same position of consecutive channels hit distinct shared-memory banks.
int odd_quad_pitch(int n) {
  const int pitch = round_up(n, kPix);
  return (pitch / kPix) % 2 == 1 ? pitch : pitch + kPix;
}

std::size_t smem_budget(const ElsaAttentionParams& p) {
  if (p.smem_budget != 0) return p.smem_budget;
#ifdef PYVIT_HOST_EMULATION
  return 163 * 1024;  // what an A100 grants one block
#else
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    return 48 * 1024;
  }
  return static_cast<std::size_t>(bytes);
#endif
}

bool supported_kernel_size(int K) { return K >= 1 && K <= kElsaMaxKernelSize && K % 2 == 1; }

// Tile and chunk sizes: the largest channel chunk (at most kMaxChunk) for which some
// tile fits in shared memory, and among its tiles (TW = 4, 8, ... 128 columns x 128 / TW
// rows) the one staging the fewest values per computed pixel. Tiles narrower than 8
// pixel groups put two rows in the 8 lanes of a 16-byte shared-memory phase, which
// costs bank conflicts: they count 25% more.
bool make_plan(const ElsaAttentionParams& p, Plan& plan) {
  // From max(H, W) on only the centre tap is in the image: a larger dilation computes the
  // same, and the clamp bounds the sub-grids (min(d, H) x min(d, W) residue classes, each
  // with at least one pixel) and the offsets (K/2) * d.
  const int d = std::min(p.dilation, std::max(p.H, p.W));
  const int K = p.K, taps = K * K, r = K / 2, rl = (r + 3) / 4 * 4;
  const int Cg = p.C / p.G;
  const int Hs = static_cast<int>(ceil_div(p.H, d)), Ws = static_cast<int>(ceil_div(p.W, d));
  const int classes_h = std::min(d, p.H), classes_w = std::min(d, p.W);
  const std::size_t budget = smem_budget(p);
  const std::size_t accumulator = std::size_t{2} * Cg * taps * sizeof(float);
  const bool shared_accumulator = accumulator <= kMaxSharedAccumulator;
  for (int cb = std::min(Cg, kMaxChunk); cb >= 1; cb = cb > 1 ? (cb + 1) / 2 : 0) {
    double best = 0;
    for (int gpr = 1; gpr <= kGroups; gpr *= 2) {
      const int TW = gpr * kPix, TH = kGroups / gpr;
      const int halo_rows = TH + 2 * r, halo_cols = TW + 2 * rl;
      const int CP = odd_quad_pitch(halo_rows * halo_cols), DP = odd_quad_pitch(kTilePixels);
      const std::size_t aggregate_smem = sizeof(float) * (taps * kTilePixels + cb * CP);
      const std::size_t work = std::max(cb * (CP + DP), K * kTilePixels);
      const std::size_t attn_smem = sizeof(float) * (taps * kTilePixels + work) +
                                    (shared_accumulator ? accumulator : 0);
      if (aggregate_smem > budget || attn_smem > budget) continue;
      const int tiles_h = static_cast<int>(ceil_div(Hs, TH));
      const int tiles_w = static_cast<int>(ceil_div(Ws, TW));
      const double cost = double(tiles_h) * tiles_w * (halo_rows * halo_cols + kTilePixels) *
                          (gpr < 8 ? 1.25 : 1.0);
      if (best != 0 && cost >= best) continue;
      best = cost;
      Geometry& geo = plan.geo;
      geo.H = p.H;
      geo.W = p.W;
      geo.d = d;
      geo.Cg = Cg;
      geo.G = p.G;
      geo.TH = TH;
      geo.TW = TW;
      geo.GPR = gpr;
      geo.CB = cb;
      // At most H * W (every tile holds an in-image pixel): fits in int.
      geo.tiles = classes_h * classes_w * tiles_h * tiles_w;
      geo.halo = {halo_rows, halo_cols, CP, r, rl};
      geo.tile = {TH, TW, DP, 0, 0};
      geo.tiles_div = FastDivmod(geo.tiles);
      geo.tiles_w_div = FastDivmod(tiles_w);
      geo.tiles_h_div = FastDivmod(tiles_h);
      geo.rho_div = FastDivmod(classes_w);
      geo.tw_div = FastDivmod(TW);
      geo.cb_div = FastDivmod(cb);
      plan.aggregate_smem = aggregate_smem;
      plan.attn_smem = attn_smem;
      plan.aggregate_threads = kGroups * static_cast<int>(ceil_div(cb, kChan));
      plan.attn_threads = kGroups * K;
      plan.shared_accumulator = shared_accumulator;
    }
    if (best != 0) return true;
  }
  return false;
}

// Samples per attn-gradient block: 1 unless ghost gradients are reduced, then enough to
// keep about kTargetAttnBlocks blocks (fewer partial rows to write and sum).
int samples_per_block(const ElsaAttentionParams& p, const Geometry& geo) {
  if (!p.need_dmul && !p.need_dadd) return 1;
  if (p.samples_per_block > 0) return std::min(p.B, p.samples_per_block);
  const std::int64_t per_chunk = std::int64_t{geo.tiles} * p.G;
  const std::int64_t chunks =
      std::clamp<std::int64_t>(ceil_div(kTargetAttnBlocks, per_chunk), 1, p.B);
  return static_cast<int>(ceil_div(p.B, chunks));
}

constexpr std::size_t kWorkspaceAlign = 256;

std::size_t lse_bytes(const ElsaAttentionParams& p) {
  if (!p.need_dv || !p.apply_softmax) return 0;
  const std::size_t bytes = sizeof(float) * 2 * p.B * p.G * p.H * p.W;
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

std::int64_t partial_rows(const ElsaAttentionParams& p, const Geometry& geo) {
  if (!p.need_dmul && !p.need_dadd) return 0;
  return ceil_div(p.B, samples_per_block(p, geo)) * geo.tiles;
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, std::size_t bytes) {
  const cudaError_t error = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  // The caller gets the error as the return value: consume it, so that the next
  // cudaGetLastError() does not report it again.
  if (error != cudaSuccess) static_cast<void>(cudaGetLastError());
  return error;
}

// fn(std::integral_constant<int, K>{}) for the runtime kernel size k (odd, 1..13).
template <typename Fn>
cudaError_t dispatch_kernel_size(int k, Fn&& fn) {
  switch (k) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    case 9: return fn(std::integral_constant<int, 9>{});
    case 11: return fn(std::integral_constant<int, 11>{});
    case 13: return fn(std::integral_constant<int, 13>{});
    default: return cudaErrorInvalidConfiguration;
  }
}

template <typename T, int K, bool kTransposed>
cudaError_t launch_aggregate(const ElsaAttentionParams& p, const Plan& plan,
                             const ElsaTensor& x, const ElsaTensor& out, cudaStream_t stream) {
  const auto kernel = elsa_aggregate_kernel<T, K, kTransposed>;
  cudaError_t error = allow_smem(kernel, plan.aggregate_smem);
  if (error != cudaSuccess) return error;
  AggregateArgs<T> args{make_view<const T>(x),
                        make_view<const T>(p.attn),
                        make_view<T>(out),
                        p.ghost,
                        kTransposed && p.apply_softmax ? static_cast<const float*>(p.workspace)
                                                       : nullptr,
                        x.channels_last,
                        out.channels_last,
                        p.apply_softmax};
  const dim3 grid(static_cast<unsigned>(plan.geo.tiles) * static_cast<unsigned>(p.B),
                  static_cast<unsigned>(p.G));
  PV_LAUNCH(kernel, grid, dim3(plan.aggregate_threads), plan.aggregate_smem, stream, args,
            plan.geo);
  return cudaGetLastError();
}

bool empty(const ElsaAttentionParams& p) { return p.B == 0 || p.C == 0 || p.H == 0 || p.W == 0; }

// Whether the grid of `tiles` blocks per sample and head fits a launch.
bool grid_fits(const ElsaAttentionParams& p, const Geometry& geo) {
  return std::int64_t{geo.tiles} * p.B <= 0x7FFFFFFF && p.G <= 65535;
}

}  // namespace elsa

const char* elsa_attention_unsupported(const ElsaAttentionParams& p) {
  if (!elsa::supported_kernel_size(p.K)) {
    return "the CUDA kernels are compiled for odd kernel sizes 1 to 13";
  }
  if (p.dilation < 1) return "dilation must be positive";
  if (elsa::empty(p)) return nullptr;
  elsa::Plan plan;
  if (!elsa::make_plan(p, plan)) {
    return "the window does not fit in the shared memory of this GPU";
  }
  if (!elsa::grid_fits(p, plan.geo)) return "too many tiles for one launch";
  return nullptr;
}

bool elsa_attention_plan(const ElsaAttentionParams& p, ElsaPlanInfo& info) {
  elsa::Plan plan;
  if (elsa::empty(p) || !elsa::make_plan(p, plan)) return false;
  info = {plan.geo.TH, plan.geo.TW, plan.geo.CB, plan.geo.tiles, plan.aggregate_smem,
          plan.attn_smem, elsa::samples_per_block(p, plan.geo)};
  return true;
}

std::size_t elsa_attention_bwd_workspace_bytes(const ElsaAttentionParams& p) {
  elsa::Plan plan;
  if (elsa::empty(p) || !elsa::make_plan(p, plan)) return 0;
  return elsa::lse_bytes(p) + sizeof(float) * elsa::partial_rows(p, plan.geo) * 2 * p.C *
                                  p.K * p.K;
}

cudaError_t elsa_attention_fwd(const ElsaAttentionParams& p, cudaStream_t stream) {
  if (elsa::empty(p)) return cudaSuccess;
  elsa::Plan plan;
  if (!elsa::make_plan(p, plan)) return cudaErrorInvalidConfiguration;
  return PV_DTYPE_SWITCH(p.dtype, T, [&] {
    return elsa::dispatch_kernel_size(p.K, [&](auto k) {
      return elsa::launch_aggregate<T, decltype(k)::value, false>(p, plan, p.v, p.out, stream);
    });
  });
}

cudaError_t elsa_attention_bwd(const ElsaAttentionParams& p, cudaStream_t stream) {
  using namespace elsa;
  if (empty(p)) return cudaSuccess;
  Plan plan;
  if (!make_plan(p, plan)) return cudaErrorInvalidConfiguration;
  const Geometry& geo = plan.geo;
  const int taps = p.K * p.K;
  const bool need_ghost = p.need_dmul || p.need_dadd;
  const bool write_lse = p.need_dv && p.apply_softmax;
  float* lse2 = static_cast<float*>(p.workspace);
  float* partials = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + lse_bytes(p));
  const int per_block = samples_per_block(p, geo);
  const std::int64_t rows = partial_rows(p, geo);
  return PV_DTYPE_SWITCH(p.dtype, T, [&] {
    return dispatch_kernel_size(p.K, [&](auto k) {
      constexpr int K = decltype(k)::value;
      if (p.need_dattn || need_ghost || write_lse) {
        const auto kernel = elsa_bwd_attn_kernel<T, K>;
        cudaError_t error = allow_smem(kernel, plan.attn_smem);
        if (error != cudaSuccess) return error;
        AttnGradArgs<T> args{make_view<const T>(p.v),
                             make_view<const T>(p.attn),
                             make_view<const T>(p.dout),
                             make_view<T>(p.dattn),
                             p.ghost,
                             lse2,
                             partials,
                             p.B,
                             p.C,
                             per_block,
                             p.v.channels_last,
                             p.dout.channels_last,
                             p.dattn.channels_last,
                             p.apply_softmax,
                             p.has_mul,
                             p.need_dattn,
                             p.need_dmul,
                             p.need_dadd,
                             write_lse,
                             plan.shared_accumulator};
        const dim3 grid(static_cast<unsigned>(geo.tiles * ceil_div(p.B, per_block)),
                        static_cast<unsigned>(p.G));
        PV_LAUNCH(kernel, grid, dim3(plan.attn_threads), plan.attn_smem, stream, args, geo);
        error = cudaGetLastError();
        if (error != cudaSuccess) return error;
      }
      if (need_ghost) {
        const int n = p.C * taps;
        PV_LAUNCH(elsa_ghost_reduce_kernel,
                  dim3(static_cast<unsigned>(ceil_div(2 * n, kReduceThreads))),
                  dim3(kReduceThreads), 0, stream, partials, static_cast<int>(rows), n,
                  p.need_dmul ? p.dghost_mul : nullptr, p.dmul_dtype,
                  p.need_dadd ? p.dghost_add : nullptr, p.dadd_dtype);
        const cudaError_t error = cudaGetLastError();
        if (error != cudaSuccess) return error;
      }
      if (p.need_dv) return launch_aggregate<T, K, true>(p, plan, p.dout, p.dv, stream);
      return cudaSuccess;
    });
  });
}

}  // namespace pyvit
