"""Triton Swin window attention (W-MSA / SW-MSA), forward and backward.

Semantics: ``pyvit_ops.reference.window_attention`` (timm's roll, then pad, then
partition; relative position bias; shift-region mask on the padded grid).

Nothing is materialised: a program finds the tokens of its window by index
arithmetic. Slot ``t`` of window ``(b, wy, wx)`` sits at ``(py, px) = (wy*wh + t//ww,
wx*ww + t%ww)`` of the rolled, padded grid; if inside the ``H x W`` grid it is the
original token ``((py + sh) mod H, (px + sw) mod W)`` (read from q / k / v through their
strides, so q, k, v may be slices of one packed projection), otherwise a padded
token whose key / value is the ``pad_k`` / ``pad_v`` row of its head. The relative
position bias is gathered from the ``((2wh-1)(2ww-1), heads)`` table per (query, key)
pair; the shift mask comes from the slot positions: on the padded grid only the
last window row (column) is split into two regions, at ``wh - sh`` (``ww - sw``),
exactly where timm's ``get_attn_mask`` puts its boundaries.

Work split: a program owns one head and a run of consecutive windows of one
*kind* (interior, last row, last column, corner). All its windows share the bias
and the shift mask, so it gathers the bias and builds the mask once, as the
``(bias + mask) / scale`` start of the score accumulator, and then loops over its
windows doing only loads, two (forward) or five (backward) ``tl.dot`` and the
softmax; the loop is software-pipelined (the next window's q / k / v load while
this one computes). About 8 programs per SM; heads vary fastest over program ids,
so the programs of the same windows run together and share the L2 lines of their
tokens. Per window-head (7x7, D = 32) the forward loop body is ~650 instructions
per thread, comparable with the time its 12.5 KB of q / k / v / out take at HBM
bandwidth; a per-(window, head) program that redid the gather and index math ran
~2000.

Tiles: a window of N = wh*ww <= 64 tokens is one ``BLOCK_N x BLOCK_N`` score tile (N
padded to 32 or 64 for ``tl.dot``), so the softmax is exact in one pass. Packing
several windows into one 128-row tile was rejected: the attention is block-diagonal,
so it would only add masked work to a memory-bound operator. Larger windows (Swin at
384: 12x12 = 144, up to 16x16) go to the tiled kernels below (``_tiled``), which walk
a window in query / key blocks with an online softmax, as flash attention walks a
sequence.
Products use tensor cores in every dtype: fp16 / bf16 operands, and for fp32 inputs
3xTF32 (each operand split into two TF32 parts, three products: float32-grade, as
torch's default float32 matmuls), or plain TF32 (operands rounded to 10 mantissa
bits, about 1e-3 relative error on the scores) when torch allows TF32 matmuls; the
choice is read per call (``_dtype_name``) and is the kernels' ``PRECISION``. IEEE
fp32 dots would fall back to FMA loops that spill. 3xTF32 takes more registers:
its windows over 32 tokens go to the tiled kernels. Accumulation is fp32.

Saved for the backward: the output and the log-sum-exp of every score row, fp32,
``(num_windows, heads, N)`` with ``num_windows = B * ceil(H/wh) * ceil(W/ww)``, in
base 2 (``log2(sum_j 2^(s_ij log2 e))``); the CUDA backend uses the same layout.

Backward: the same programs recompute each window from q, k and the lse, with
(key, query) tiles so that dk and dv come out of their dots untransposed. dq, dk,
dv of a window's real tokens belong to that window alone, so they are written
directly. The two reductions are deterministic without atomics: a program sums
``dS`` (the gradient of the bias-added scores) over its windows in registers and
writes one ``N x N`` partial, and a small kernel sums each table row's pairs over
the partials in program order (each partial element is read once) into dtable. Passes of the
same kernel (``PASS``, see ``_bwd_passes``) keep the register load of each launch
spill-free: dq / dk / dv (with dbias where it fits); for 64-token windows beyond
half-precision head dim 32 and 3xTF32 32-token windows at head dim 64, dbias alone;
and, only when the grid is padded and a pad needs its gradient, the pad gradient (dk /
dv summed over padded keys) over the last-row / last-column programs. That sum is a
vector-matrix product (the key sums of dS and P times q and dout), written per window
and added by the launcher. The dbias and pad passes reduce the scores and dP over
head-dim chunks of 32, so only chunk-wide operand tiles are live; the pad pass then
re-reads the window's q and dout chunks (from L2) for its sums.

Element offsets inside one image are int32, the batch offset is int64; the ops layer
falls back from calls past that (``int32_reasons``).
"""
import functools
import itertools

import torch
import triton
import triton.language as tl

from pyvit_ops.kernels._common import on_tensor_device

MAX_WINDOW_AREA = 256  # 16 x 16; windows over 64 tokens take the tiled kernels
MAX_HEAD_DIM = 128
MAX_HEAD_DIM_FP32 = 64  # fp32 tiles are twice the size: D = 128 spills
MAX_HEAD_DIM_FP32_WIDE = 32  # ... and with windows over 32 tokens, D = 64 spills


def max_head_dim_fp32(window_area):
    """Largest float32 head dim the kernels take for windows of ``window_area`` tokens."""
    return MAX_HEAD_DIM_FP32 if window_area <= _BLOCK_NS[0] else MAX_HEAD_DIM_FP32_WIDE


_INT32_MAX = 2**31 - 1
# Backward passes (the kernel's PASS): dq / dk / dv, pad-vector sums, dbias alone
# (constexpr so that kernels may read them; ``.value`` on the host side).
_QKV, _PAD, _BIAS = (tl.constexpr(i) for i in range(3))


@triton.jit
def _slot_rows_cols(WW, t0, BLOCK_N: tl.constexpr):
    """Slots t0 + [0, BLOCK_N) -> (t, ty, tx) inside a window of width WW. t // WW goes
    through an fp32 reciprocal, exact here ((t + 0.5) / WW stays 0.5 / WW away from
    integers), since integer division by a runtime value costs ~20 instructions a slot."""
    t = t0 + tl.arange(0, BLOCK_N)
    ty = ((t.to(tl.float32) + 0.5) * (1.0 / WW)).to(tl.int32)
    return t, ty, t - ty * WW


@triton.jit
def _program_windows(pid, HEADS, B, n_wh, n_ww, WINDOWS_PER_PROGRAM):
    """The head and the windows of program ``pid``.

    Windows are split into four kinds, each walked by its own programs: interior,
    last row, last column, corner. A program's windows therefore share one shift
    mask, folded into its loop-invariant score accumulator. Returns h, the kind
    (last_row, last_col), the kind's sub-grid (ny, nx) of windows and the program's
    range [first, end) of indices into it."""
    h = pid % HEADS
    g = pid // HEADS
    n0 = B * (n_wh - 1) * (n_ww - 1)
    n1 = B * (n_ww - 1)
    n2 = B * (n_wh - 1)
    g0 = tl.cdiv(n0, WINDOWS_PER_PROGRAM)
    g1 = tl.cdiv(n1, WINDOWS_PER_PROGRAM)
    g2 = tl.cdiv(n2, WINDOWS_PER_PROGRAM)
    c1 = g >= g0
    c2 = g >= g0 + g1
    c3 = g >= g0 + g1 + g2
    last_row = (c1 & ~c2) | c3
    last_col = c2
    g -= tl.where(c1, g0, 0) + tl.where(c2, g1, 0) + tl.where(c3, g2, 0)
    count = tl.where(c3, B, tl.where(c2, n2, tl.where(c1, n1, n0)))
    ny = tl.where(last_row, 1, n_wh - 1)
    nx = tl.where(last_col, 1, n_ww - 1)
    first = g * WINDOWS_PER_PROGRAM
    return h, last_row, last_col, ny, nx, first, tl.minimum(first + WINDOWS_PER_PROGRAM, count)


@triton.jit
def _bias_mask(table_ptr, h, HEADS, WH, WW, SH, SW, last_row, last_col, inv_scale, mask_value,
               ty_r, tx_r, in_r, ty_c, tx_c, in_c, HAS_TABLE: tl.constexpr,
               KEYS_AS_ROWS: tl.constexpr):
    """The score accumulator start ``(bias + shift mask) / scale`` of a tile of row slots
    (ty_r, tx_r) by column slots (ty_c, tx_c), -inf on key slots past N, the bias
    gathered from the table of head ``h``. Rows are queries, or keys with
    ``KEYS_AS_ROWS`` (bias transposed, mask symmetric).

    Shift regions only split the last window row (column), at slot row WH - SH
    (column WW - SW), where timm's get_attn_mask puts its boundaries."""
    region_r = ((ty_r >= WH - SH) & last_row).to(tl.int32) * 2 \
        + ((tx_r >= WW - SW) & last_col).to(tl.int32)
    region_c = ((ty_c >= WH - SH) & last_row).to(tl.int32) * 2 \
        + ((tx_c >= WW - SW) & last_col).to(tl.int32)
    acc0 = tl.where(region_r[:, None] != region_c[None, :], mask_value, 0.0)
    if HAS_TABLE:
        # rel(i, j) = (ty_i - ty_j + WH - 1)(2WW - 1) + tx_i - tx_j + WW - 1 = row_i - col_j.
        # The table is read in its own dtype (fp32 parameters under autocast, or the
        # model's half precision): no cast pass before the launch.
        # Slots past N take the centre row / column 0, so the gather stays inside the
        # table without a mask (their scores are discarded).
        centre = (WH - 1) * (2 * WW - 1) + WW - 1
        col_r = tl.where(in_r, ty_r * (2 * WW - 1) + tx_r, 0)
        col_c = tl.where(in_c, ty_c * (2 * WW - 1) + tx_c, 0)
        if KEYS_AS_ROWS:
            row_c = tl.where(in_c, centre + col_c, centre)
            rel = row_c[None, :] - col_r[:, None]
            acc0 += tl.load(table_ptr + rel * HEADS + h).to(tl.float32)
        else:
            row_r = tl.where(in_r, centre + col_r, centre)
            rel = row_r[:, None] - col_c[None, :]
            acc0 += tl.load(table_ptr + rel * HEADS + h).to(tl.float32)
    # -inf before the product by 1 / scale: the sign comes out right for any scale.
    if KEYS_AS_ROWS:
        acc0 = tl.where(in_r[:, None], acc0, float("-inf")) * inv_scale
    else:
        acc0 = tl.where(in_c[None, :], acc0, float("-inf")) * inv_scale
    return acc0


@triton.jit
def _window_invariants(table_ptr, h, HEADS, WH, WW, SH, SW, last_row, last_col, inv_scale,
                       mask_value, HAS_TABLE: tl.constexpr, BLOCK_N: tl.constexpr,
                       KEYS_AS_ROWS: tl.constexpr):
    """What the program's windows share when one tile holds a window: per slot (ty, tx)
    and whether it is inside the window, and the whole window's ``_bias_mask``."""
    t, ty, tx = _slot_rows_cols(WW, 0, BLOCK_N)
    in_win = t < WH * WW
    acc0 = _bias_mask(table_ptr, h, HEADS, WH, WW, SH, SW, last_row, last_col, inv_scale,
                      mask_value, ty, tx, in_win, ty, tx, in_win, HAS_TABLE, KEYS_AS_ROWS)
    return ty, tx, in_win, acc0


@triton.jit
def _window_tokens(e, ny, nx, last_row, last_col, H, W, n_wh, n_ww, WH, WW, SH, SW,
                   ty, tx, in_win):
    """Window ``e`` of the program's sub-grid: its index w among all windows (row-major
    over (B, n_wh, n_ww)), batch index and, per slot, the real-token flag, source
    position (oy, ox) and padded-slot flag (a column, to select rows of a tile)."""
    b = e // (ny * nx)
    wy = (e // nx) % ny + tl.where(last_row, n_wh - 1, 0)
    wx = e % nx + tl.where(last_col, n_ww - 1, 0)
    py = wy * WH + ty
    px = wx * WW + tx
    real = in_win & (py < H) & (px < W)
    # Rolling by -shift puts original token (p + shift) mod size at p.
    oy = py + SH
    oy = tl.where(oy >= H, oy - H, oy)
    ox = px + SW
    ox = tl.where(ox >= W, ox - W, ox)
    return (b * n_wh + wy) * n_ww + wx, b, real, oy, ox, (in_win & ~real)[:, None]


@triton.jit
def _scores_log2(a, b, acc0, scale, PRECISION: tl.constexpr):
    """(a b^T * scale + bias + shift mask) * log2(e), (a, b) = (q, k), or (k, q) for the
    transposed scores. Bias and mask enter as the dot's accumulator: loop-invariant,
    it is converted once to the dot's layout, and the softmax stays in that layout."""
    s = tl.dot(a, tl.trans(b), acc0, input_precision=PRECISION)
    return s * (scale * 1.4426950408889634)


@triton.jit
def _value_weights(p, s, lse):
    """The weights ``p = 2^(s - m)`` as the product with v takes them, ``lse`` (log2) the
    row's ``m + log2(l)``. The reference's float32 softmax keeps a weight ``p / l`` above
    2^-150 as a subnormal (a -100 shift mask gives ~2^-144), and such a weight times an
    infinite value is inf. Here it would be 0: exp2 flushes subnormal results on the GPU
    (ex2.approx.ftz.f32), and the TF32 parts of the product round them to 0; 0 * inf is
    NaN. Such weights therefore take the smallest normal float32 (exact in TF32 and
    bf16): against a finite value the output moves by < 2^-126 |v| / l. Weights the
    reference rounds to 0 are 0 (NaN against inf, as there)."""
    return tl.where(s - lse[:, None] > -150.0, tl.maximum(p, 1.1754943508222875e-38), 0.0)


@triton.jit
def _load_tokens(ptr, b, oy, ox, h, d, real, d_ok, s_b, s_h, s_w, s_head, s_d):
    ptrs = ptr + b.to(tl.int64) * s_b + h * s_head \
        + (oy * s_h + ox * s_w)[:, None] + d[None, :] * s_d
    return tl.load(ptrs, mask=real[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _store_tokens(ptr, value, b, oy, ox, h, d, real, d_ok, H, W, TOKEN, D):
    """Store rows of a (B, H, W, heads, D) tensor whose tokens are ``TOKEN`` elements
    apart, rows dense: contiguous (``TOKEN = heads * D``) or one slice of a packed
    (B, H, W, 3, heads, D) gradient (``3 * heads * D``)."""
    ptrs = ptr + b.to(tl.int64) * H * W * TOKEN + h * D \
        + ((oy * W + ox) * TOKEN)[:, None] + d[None, :]
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=real[:, None] & d_ok[None, :])


@triton.jit
def _program_setup(pid, table_ptr, pad_k_ptr, pad_v_ptr, B, n_wh, n_ww, HEADS, D,
                   WINDOWS_PER_PROGRAM, WH, WW, SH, SW, inv_scale, mask_value,
                   HAS_TABLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   KEYS_AS_ROWS: tl.constexpr):
    """Everything loop-invariant of program ``pid`` (see ``_program_windows`` and
    ``_window_invariants``), plus the head-dim range and the head's pad rows."""
    h, last_row, last_col, ny, nx, first, end = _program_windows(
        pid, HEADS, B, n_wh, n_ww, WINDOWS_PER_PROGRAM)
    ty, tx, in_win, acc0 = _window_invariants(table_ptr, h, HEADS, WH, WW, SH, SW, last_row,
                                              last_col, inv_scale, mask_value, HAS_TABLE,
                                              BLOCK_N, KEYS_AS_ROWS)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    pad_k = tl.load(pad_k_ptr + h * D + d, mask=d_ok, other=0.0)
    pad_v = tl.load(pad_v_ptr + h * D + d, mask=d_ok, other=0.0)
    return h, last_row, last_col, ny, nx, first, end, ty, tx, in_win, acc0, d, d_ok, pad_k, pad_v


@triton.jit
def _load_padded(ptr, pad, is_pad, b, oy, ox, h, d, real, d_ok, s_b, s_h, s_w, s_head, s_d):
    """Key or value rows of a window: padded slots take the head's pad row."""
    return tl.where(is_pad, pad[None, :],
                    _load_tokens(ptr, b, oy, ox, h, d, real, d_ok, s_b, s_h, s_w, s_head, s_d))


@triton.jit
def _load_qk(q_ptr, k_ptr, pad_k, is_pad, b, oy, ox, h, d, real, d_ok,
             stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
             stride_kb, stride_kh, stride_kw, stride_khead, stride_kd):
    """A window's q rows and k rows (padded slots: the pad row), head-dim range ``d``."""
    q = _load_tokens(q_ptr, b, oy, ox, h, d, real, d_ok,
                     stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd)
    k = _load_padded(k_ptr, pad_k, is_pad, b, oy, ox, h, d, real, d_ok,
                     stride_kb, stride_kh, stride_kw, stride_khead, stride_kd)
    return q, k


@triton.jit
def _window_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, pad_k_ptr, pad_v_ptr, out_ptr, lse_ptr,
        B, H, W, n_wh, n_ww, HEADS, D, WINDOWS_PER_PROGRAM,
        WH, WW, SH, SW, scale, inv_scale, mask_value,
        stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
        stride_kb, stride_kh, stride_kw, stride_khead, stride_kd,
        stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd,
        HAS_TABLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr):
    h, last_row, last_col, ny, nx, first, end, ty, tx, in_win, acc0, d, d_ok, pad_k, pad_v = \
        _program_setup(tl.program_id(0), table_ptr, pad_k_ptr, pad_v_ptr, B, n_wh, n_ww, HEADS,
                       D, WINDOWS_PER_PROGRAM, WH, WW, SH, SW, inv_scale, mask_value,
                       HAS_TABLE, BLOCK_N, BLOCK_D, False)
    t = tl.arange(0, BLOCK_N)
    for e in range(first, end):
        w, b, real, oy, ox, is_pad = _window_tokens(e, ny, nx, last_row, last_col, H, W, n_wh,
                                                    n_ww, WH, WW, SH, SW, ty, tx, in_win)
        q, k = _load_qk(q_ptr, k_ptr, pad_k, is_pad, b, oy, ox, h, d, real, d_ok,
                        stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
                        stride_kb, stride_kh, stride_kw, stride_khead, stride_kd)
        s = _scores_log2(q, k, acc0, scale, PRECISION)
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        lse = m + tl.log2(l)
        p = _value_weights(p, s, lse)
        v = _load_padded(v_ptr, pad_v, is_pad, b, oy, ox, h, d, real, d_ok,
                         stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd)
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / l[:, None]
        _store_tokens(out_ptr, out, b, oy, ox, h, d, real, d_ok, H, W, HEADS * D, D)
        tl.store(lse_ptr + (w * HEADS + h) * (WH * WW) + t, lse, mask=in_win)


@triton.jit
def _scores_dp_chunked(q_ptr, k_ptr, v_ptr, dout_ptr, pad_k_ptr, pad_v_ptr, acc0, b, oy, ox, h,
                       real, is_pad, D, scale,
                       stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
                       stride_kb, stride_kh, stride_kw, stride_khead, stride_kd,
                       stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd,
                       stride_gb, stride_gh, stride_gw, stride_ghead, stride_gd,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Transposed log2 scores (``_scores_log2(k, q)``) and dP^T = v dout^T of one window,
    reduced over head-dim chunks of ``BLOCK_K``: only chunk-wide q / k / v / dout tiles
    are live, which keeps wide head dims out of register spills. One loop per product:
    dots that share a loop body count as chained for Triton, which then stacks all
    warps along the 64 tile rows (half of 8 warps redundant) instead of splitting the
    tile over rows and columns."""
    s = acc0
    for c in range(0, BLOCK_D, BLOCK_K):
        d = c + tl.arange(0, BLOCK_K)
        d_ok = d < D
        pad_k = tl.load(pad_k_ptr + h * D + d, mask=d_ok, other=0.0)
        q, k = _load_qk(q_ptr, k_ptr, pad_k, is_pad, b, oy, ox, h, d, real, d_ok,
                        stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
                        stride_kb, stride_kh, stride_kw, stride_khead, stride_kd)
        s = tl.dot(k, tl.trans(q), s, input_precision=PRECISION)
    dp = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for c in range(0, BLOCK_D, BLOCK_K):
        d = c + tl.arange(0, BLOCK_K)
        d_ok = d < D
        pad_v = tl.load(pad_v_ptr + h * D + d, mask=d_ok, other=0.0)
        do = _load_tokens(dout_ptr, b, oy, ox, h, d, real, d_ok,
                          stride_gb, stride_gh, stride_gw, stride_ghead, stride_gd)
        v = _load_padded(v_ptr, pad_v, is_pad, b, oy, ox, h, d, real, d_ok,
                         stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd)
        dp = tl.dot(v, tl.trans(do), dp, input_precision=PRECISION)
    return s * (scale * 1.4426950408889634), dp


@triton.jit
def _window_attention_bwd_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, table_ptr, pad_k_ptr, pad_v_ptr,
        dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dpad_ptr,
        B, H, W, n_wh, n_ww, HEADS, D, WINDOWS_PER_PROGRAM, FIRST_PROGRAM,
        WH, WW, SH, SW, scale, inv_scale, mask_value,
        stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
        stride_kb, stride_kh, stride_kw, stride_khead, stride_kd,
        stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd,
        stride_gb, stride_gh, stride_gw, stride_ghead, stride_gd, stride_dqkv_token,
        HAS_TABLE: tl.constexpr, PASS: tl.constexpr, BIAS_GRAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr):
    """One backward pass over this program's windows (``PASS``): ``_QKV`` writes dq, dk,
    dv; ``_PAD`` only the gradient of the pad vectors (dk, dv summed over padded keys),
    one ``2 x D`` partial per window, launched over the last-row / last-column programs
    alone; ``_BIAS`` only the partial dbias. ``BIAS_GRAD``: this pass sums dS into the
    partial dbias. ``_PAD`` and ``_BIAS`` walk the head dim in chunks of ``BLOCK_K``."""
    pid = tl.program_id(0)
    # Tiles are (key, query): dv and dk come out of the dots without transposes.
    h, last_row, last_col, ny, nx, first, end, ty, tx, in_win, acc0, d, d_ok, pad_k, pad_v = \
        _program_setup(pid + FIRST_PROGRAM, table_ptr, pad_k_ptr, pad_v_ptr, B, n_wh, n_ww,
                       HEADS, D, WINDOWS_PER_PROGRAM, WH, WW, SH, SW, inv_scale, mask_value,
                       HAS_TABLE, BLOCK_N, BLOCK_D, True)
    N = WH * WW
    t = tl.arange(0, BLOCK_N)
    dbias = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for e in range(first, end):
        w, b, real, oy, ox, is_pad = _window_tokens(e, ny, nx, last_row, last_col, H, W, n_wh,
                                                    n_ww, WH, WW, SH, SW, ty, tx, in_win)
        # Queries past N get lse = +inf, hence p = 0; padded queries have dout = 0.
        lse = tl.load(lse_ptr + (w * HEADS + h) * N + t, mask=in_win, other=float("inf"))
        if PASS == _QKV:
            q, k = _load_qk(q_ptr, k_ptr, pad_k, is_pad, b, oy, ox, h, d, real, d_ok,
                            stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
                            stride_kb, stride_kh, stride_kw, stride_khead, stride_kd)
            p = tl.exp2(_scores_log2(k, q, acc0, scale, PRECISION) - lse[None, :])
            do = _load_tokens(dout_ptr, b, oy, ox, h, d, real, d_ok,
                              stride_gb, stride_gh, stride_gw, stride_ghead, stride_gd)
            dv = tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
            _store_tokens(dv_ptr, dv, b, oy, ox, h, d, real, d_ok, H, W, stride_dqkv_token, D)
            v = _load_padded(v_ptr, pad_v, is_pad, b, oy, ox, h, d, real, d_ok,
                             stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd)
            dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        else:
            s, dp = _scores_dp_chunked(
                q_ptr, k_ptr, v_ptr, dout_ptr, pad_k_ptr, pad_v_ptr, acc0, b, oy, ox, h, real,
                is_pad, D, scale,
                stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
                stride_kb, stride_kh, stride_kw, stride_khead, stride_kd,
                stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd,
                stride_gb, stride_gh, stride_gw, stride_ghead, stride_gd,
                BLOCK_N, BLOCK_D, BLOCK_K, PRECISION)
            p = tl.exp2(s - lse[None, :])
        # delta_i = sum_j p_ij dp_ij (= dout_i . out_i): the whole row is in the tile, so
        # the output need not be read.
        ds = p * (dp - tl.sum(p * dp, 0)[None, :])
        if BIAS_GRAD:
            dbias += ds
        if PASS == _QKV:
            ds = ds.to(q.dtype)
            dk = tl.dot(ds, q, input_precision=PRECISION) * scale
            _store_tokens(dk_ptr, dk, b, oy, ox, h, d, real, d_ok, H, W, stride_dqkv_token, D)
            dq = tl.dot(tl.trans(ds), k, input_precision=PRECISION) * scale
            _store_tokens(dq_ptr, dq, b, oy, ox, h, d, real, d_ok, H, W, stride_dqkv_token, D)
        elif PASS == _PAD:
            # Summed over padded keys, dk = dS q and dv = P dout are vector-matrix
            # products: the key sums of dS and P (per query) times q and dout.
            wk = tl.sum(tl.where(is_pad, ds, 0.0), 0) * scale
            wv = tl.sum(tl.where(is_pad, p, 0.0), 0)
            slot = dpad_ptr + (pid * WINDOWS_PER_PROGRAM + e - first) * 2 * D
            for c in range(0, BLOCK_D, BLOCK_K):
                dc = c + tl.arange(0, BLOCK_K)
                dc_ok = dc < D
                q = _load_tokens(q_ptr, b, oy, ox, h, dc, real, dc_ok,
                                 stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd)
                tl.store(slot + dc, tl.sum(wk[:, None] * q.to(tl.float32), 0), mask=dc_ok)
                do = _load_tokens(dout_ptr, b, oy, ox, h, dc, real, dc_ok,
                                  stride_gb, stride_gh, stride_gw, stride_ghead, stride_gd)
                tl.store(slot + D + dc, tl.sum(wv[:, None] * do.to(tl.float32), 0), mask=dc_ok)
    if BIAS_GRAD:
        # dbias is (key, query); the buffer is (query, key).
        pair = (t < N)[:, None] & (t < N)[None, :]
        tl.store(dbias_ptr + (pid * N + t[None, :]) * N + t[:, None], dbias, mask=pair)


@triton.jit
def _window_attention_dtable_kernel(dbias_ptr, dtable_ptr, GROUPS, HEADS, ROWS, WH, WW,
                                    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """dtable[r, h]: the sum of the backward's per-program dbias partials of head h over
    the pairs that read table row r. Row r is the offset (dy, dx) = query - key; its
    pairs, enumerated here in row-major query order (no index tensor to read), are the
    queries whose key at that offset is inside the window. Each partial element belongs
    to one row, so every one is read once; programs are walked in a fixed order
    (deterministic). Heads are grid axis 0: axis 1 stops at 65535."""
    h = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    N = WH * WW
    dy = r // (2 * WW - 1) - (WH - 1)
    dx = r % (2 * WW - 1) - (WW - 1)
    nx = WW - tl.abs(dx)  # >= 1 for every r
    count = (WH - tl.abs(dy)) * nx
    yq = (p[None, :] // nx[:, None]) + tl.maximum(dy, 0)[:, None]
    xq = (p[None, :] % nx[:, None]) + tl.maximum(dx, 0)[:, None]
    query = yq * WW + xq
    pair = query * N + query - (dy * WW + dx)[:, None]
    real = (r < ROWS)[:, None] & (p[None, :] < count[:, None])
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for g in range(GROUPS):
        # Partials are (program group, head, N*N) with the heads fastest.
        base = dbias_ptr + (g * HEADS + h).to(tl.int64) * N * N
        acc += tl.sum(tl.load(base + pair, mask=real, other=0.0), axis=1)
    tl.store(dtable_ptr + r * HEADS + h, acc.to(dtable_ptr.dtype.element_ty), mask=r < ROWS)


# --------------------------------------------------------------------------- tiled (N > 64)
# Windows over 64 tokens (Swin at 384: 12x12 = 144) do not fit one score tile. These
# kernels walk a window in (query block, key block) tiles (64 x 32 slots or smaller,
# ``_TILED_BLOCKS``), as flash attention walks a sequence: the forward with an online
# softmax over key blocks, the backward in FlashAttention-2's split (one launch per
# gradient, so that no output is shared between programs and nothing needs atomics).
# The bias gather and shift mask are redone per tile and window: the accumulator start
# of all tiles of a window is 4 N^2 bytes, too much to keep in registers across the
# window loop.
_DQ, _DKV = (tl.constexpr(i) for i in (3, 4))  # PASSes of the tiled backward (and _BIAS)


@triton.jit
def _tile_slots(e, t0, ny, nx, last_row, last_col, H, W, n_wh, n_ww, WH, WW, SH, SW,
                BLOCK: tl.constexpr):
    """Slots t0 + [0, BLOCK) of the program's window ``e``: (t, ty, tx, in_win) and
    ``_window_tokens``'s (w, b, real, oy, ox, is_pad)."""
    t, ty, tx = _slot_rows_cols(WW, t0, BLOCK)
    in_win = t < WH * WW
    w, b, real, oy, ox, is_pad = _window_tokens(e, ny, nx, last_row, last_col, H, W, n_wh,
                                                n_ww, WH, WW, SH, SW, ty, tx, in_win)
    return t, ty, tx, in_win, w, b, real, oy, ox, is_pad


@triton.jit
def _window_attention_fwd_tiled_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, pad_k_ptr, pad_v_ptr, out_ptr, lse_ptr,
        B, H, W, n_wh, n_ww, HEADS, D, WINDOWS_PER_PROGRAM,
        WH, WW, SH, SW, scale, inv_scale, mask_value,
        stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
        stride_kb, stride_kh, stride_kw, stride_khead, stride_kd,
        stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd,
        HAS_TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Forward of one query block of the program's windows; query blocks vary fastest
    over program ids, so the programs of a window run together (its k / v from L2)."""
    N = WH * WW
    n_qb = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    h, last_row, last_col, ny, nx, first, end = _program_windows(
        pid // n_qb, HEADS, B, n_wh, n_ww, WINDOWS_PER_PROGRAM)
    q0 = (pid % n_qb) * BLOCK_M
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    pad_k = tl.load(pad_k_ptr + h * D + d, mask=d_ok, other=0.0)
    pad_v = tl.load(pad_v_ptr + h * D + d, mask=d_ok, other=0.0)
    for e in range(first, end):
        tq, tyq, txq, in_q, w, b, real_q, oyq, oxq, pad_q = _tile_slots(
            e, q0, ny, nx, last_row, last_col, H, W, n_wh, n_ww, WH, WW, SH, SW, BLOCK_M)
        q = _load_tokens(q_ptr, b, oyq, oxq, h, d, real_q, d_ok,
                         stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd)
        m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_N):
            tk, tyk, txk, in_k, wk, bk, real_k, oyk, oxk, is_pad = _tile_slots(
                e, k0, ny, nx, last_row, last_col, H, W, n_wh, n_ww, WH, WW, SH, SW, BLOCK_N)
            k = _load_padded(k_ptr, pad_k, is_pad, b, oyk, oxk, h, d, real_k, d_ok,
                             stride_kb, stride_kh, stride_kw, stride_khead, stride_kd)
            acc0 = _bias_mask(table_ptr, h, HEADS, WH, WW, SH, SW, last_row, last_col,
                              inv_scale, mask_value, tyq, txq, in_q, tyk, txk, in_k,
                              HAS_TABLE, False)
            s = _scores_log2(q, k, acc0, scale, PRECISION)
            m_new = tl.maximum(m, tl.max(s, 1))
            # A -inf mask_value can hide a whole key block from a row: keep exp2 finite.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_ref[:, None])
            alpha = tl.exp2(m - m_ref)
            l = l * alpha + tl.sum(p, 1)
            # The row's log-sum-exp so far: a lower bound of the final one, so a weight
            # that later blocks push below 2^-150 keeps its floor here.
            p = _value_weights(p, s, m_ref + tl.log2(l))
            v = _load_padded(v_ptr, pad_v, is_pad, b, oyk, oxk, h, d, real_k, d_ok,
                             stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        _store_tokens(out_ptr, acc / l[:, None], b, oyq, oxq, h, d, real_q, d_ok, H, W,
                      HEADS * D, D)
        tl.store(lse_ptr + (w * HEADS + h) * N + tq, m + tl.log2(l), mask=in_q)


@triton.jit
def _probs_dscores(a, b, a2, b2, acc0, lse, delta, scale, KEYS_AS_ROWS: tl.constexpr,
                   PRECISION: tl.constexpr):
    """P and dS of one tile from its operands: (a, b, a2, b2) = (q, k, dout, v) for a
    (query, key) tile, (k, q, v, dout) for (key, query)."""
    s = _scores_log2(a, b, acc0, scale, PRECISION)
    dp = tl.dot(a2, tl.trans(b2), input_precision=PRECISION)
    if KEYS_AS_ROWS:
        p = tl.exp2(s - lse[None, :])
        ds = p * (dp - delta[None, :])
    else:
        p = tl.exp2(s - lse[:, None])
        ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _window_attention_bwd_tiled_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, out_ptr, lse_ptr, delta_ptr, table_ptr, pad_k_ptr,
        pad_v_ptr, dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dpad_ptr,
        B, H, W, n_wh, n_ww, HEADS, D, WINDOWS_PER_PROGRAM,
        WH, WW, SH, SW, scale, inv_scale, mask_value,
        stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd,
        stride_kb, stride_kh, stride_kw, stride_khead, stride_kd,
        stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd,
        stride_gb, stride_gh, stride_gw, stride_ghead, stride_gd, stride_dqkv_token,
        HAS_TABLE: tl.constexpr, PASS: tl.constexpr, PAD_GRAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr):
    """One backward launch (``PASS``), each program owning one block of its windows:
    ``_DQ`` a query block: delta = rowsum(dout * out), stored for the other passes, and
    dq over the key blocks; ``_DKV`` a key block: dk, dv over the query blocks, and with
    ``PAD_GRAD`` one ``2 x D`` partial per program of dk, dv summed over padded keys;
    ``_BIAS`` one (query block, key block) tile: dS summed over the windows into the
    program's slice of its group's ``N x N`` partial dbias."""
    N = WH * WW
    n_qb = tl.cdiv(N, BLOCK_M)
    n_kb = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    n_tiles = n_qb if PASS == _DQ else (n_kb if PASS == _DKV else n_qb * n_kb)
    rest = pid // n_tiles
    tile = pid % n_tiles
    h, last_row, last_col, ny, nx, first, end = _program_windows(
        rest, HEADS, B, n_wh, n_ww, WINDOWS_PER_PROGRAM)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    pad_k = tl.load(pad_k_ptr + h * D + d, mask=d_ok, other=0.0)
    pad_v = tl.load(pad_v_ptr + h * D + d, mask=d_ok, other=0.0)
    if PASS == _DKV:
        # (key, query) tiles: dk and dv come out of their dots untransposed.
        k0 = tile * BLOCK_N
        dpad_k = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dpad_v = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for e in range(first, end):
            tk, tyk, txk, in_k, w, b, real_k, oyk, oxk, is_pad = _tile_slots(
                e, k0, ny, nx, last_row, last_col, H, W, n_wh, n_ww, WH, WW, SH, SW, BLOCK_N)
            k = _load_padded(k_ptr, pad_k, is_pad, b, oyk, oxk, h, d, real_k, d_ok,
                             stride_kb, stride_kh, stride_kw, stride_khead, stride_kd)
            v = _load_padded(v_ptr, pad_v, is_pad, b, oyk, oxk, h, d, real_k, d_ok,
                             stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd)
            dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            for q0 in range(0, N, BLOCK_M):
                tq, tyq, txq, in_q, wq, bq, real_q, oyq, oxq, pad_q = _tile_slots(
                    e, q0, ny, nx, last_row, last_col, H, W, n_wh, n_ww, WH, WW, SH, SW,
                    BLOCK_M)
                q = _load_tokens(q_ptr, b, oyq, oxq, h, d, real_q, d_ok,
                                 stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd)
                do = _load_tokens(dout_ptr, b, oyq, oxq, h, d, real_q, d_ok,
                                  stride_gb, stride_gh, stride_gw, stride_ghead, stride_gd)
                # Queries past N: lse = +inf, hence p = 0; padded queries have dout = 0.
                row = (w * HEADS + h) * N + tq
                lse = tl.load(lse_ptr + row, mask=in_q, other=float("inf"))
                delta = tl.load(delta_ptr + row, mask=in_q, other=0.0)
                acc0 = _bias_mask(table_ptr, h, HEADS, WH, WW, SH, SW, last_row, last_col,
                                  inv_scale, mask_value, tyk, txk, in_k, tyq, txq, in_q,
                                  HAS_TABLE, True)
                p, ds = _probs_dscores(k, q, v, do, acc0, lse, delta, scale, True,
                                       PRECISION)
                dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
                dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
            dk *= scale
            _store_tokens(dk_ptr, dk, b, oyk, oxk, h, d, real_k, d_ok, H, W, stride_dqkv_token, D)
            _store_tokens(dv_ptr, dv, b, oyk, oxk, h, d, real_k, d_ok, H, W, stride_dqkv_token, D)
            if PAD_GRAD:
                dpad_k += tl.sum(tl.where(is_pad, dk, 0.0), 0)
                dpad_v += tl.sum(tl.where(is_pad, dv, 0.0), 0)
        if PAD_GRAD:
            tl.store(dpad_ptr + pid * 2 * D + d, dpad_k, mask=d_ok)
            tl.store(dpad_ptr + (pid * 2 + 1) * D + d, dpad_v, mask=d_ok)
    else:
        q0 = (tile if PASS == _DQ else tile // n_kb) * BLOCK_M
        dbias = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e in range(first, end):
            tq, tyq, txq, in_q, w, b, real_q, oyq, oxq, pad_q = _tile_slots(
                e, q0, ny, nx, last_row, last_col, H, W, n_wh, n_ww, WH, WW, SH, SW, BLOCK_M)
            q = _load_tokens(q_ptr, b, oyq, oxq, h, d, real_q, d_ok,
                             stride_qb, stride_qh, stride_qw, stride_qhead, stride_qd)
            do = _load_tokens(dout_ptr, b, oyq, oxq, h, d, real_q, d_ok,
                              stride_gb, stride_gh, stride_gw, stride_ghead, stride_gd)
            row = (w * HEADS + h) * N + tq
            lse = tl.load(lse_ptr + row, mask=in_q, other=float("inf"))
            if PASS == _DQ:
                # out is the forward's contiguous output.
                o = _load_tokens(out_ptr, b, oyq, oxq, h, d, real_q, d_ok,
                                 H * W * HEADS * D, W * HEADS * D, HEADS * D, D, 1)
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                tl.store(delta_ptr + row, delta, mask=in_q)
                key_blocks = tl.cdiv(N, BLOCK_N)
                kb0 = 0
            else:
                delta = tl.load(delta_ptr + row, mask=in_q, other=0.0)
                key_blocks = 1
                kb0 = tile % n_kb
            dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for kb in range(kb0, kb0 + key_blocks):
                tk, tyk, txk, in_k, wk, bk, real_k, oyk, oxk, is_pad = _tile_slots(
                    e, kb * BLOCK_N, ny, nx, last_row, last_col, H, W, n_wh, n_ww, WH, WW,
                    SH, SW, BLOCK_N)
                k = _load_padded(k_ptr, pad_k, is_pad, b, oyk, oxk, h, d, real_k, d_ok,
                                 stride_kb, stride_kh, stride_kw, stride_khead, stride_kd)
                v = _load_padded(v_ptr, pad_v, is_pad, b, oyk, oxk, h, d, real_k, d_ok,
                                 stride_vb, stride_vh, stride_vw, stride_vhead, stride_vd)
                acc0 = _bias_mask(table_ptr, h, HEADS, WH, WW, SH, SW, last_row, last_col,
                                  inv_scale, mask_value, tyq, txq, in_q, tyk, txk, in_k,
                                  HAS_TABLE, False)
                p, ds = _probs_dscores(q, k, do, v, acc0, lse, delta, scale, False,
                                       PRECISION)
                if PASS == _DQ:
                    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                else:
                    dbias += ds
            if PASS == _DQ:
                _store_tokens(dq_ptr, dq * scale, b, oyq, oxq, h, d, real_q, d_ok, H, W,
                              stride_dqkv_token, D)
        if PASS == _BIAS:
            i = q0 + tl.arange(0, BLOCK_M)
            j = (tile % n_kb) * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(dbias_ptr + (rest * N + i[:, None]) * N + j[None, :], dbias,
                     mask=(i < N)[:, None] & (j < N)[None, :])


# --------------------------------------------------------------------------- configs

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FP32 = ("fp32", "fp32x3")  # float32 config keys (see _dtype_name)
_SPEC_DTYPES = ("fp16", "bf16") + _FP32
_BLOCK_NS = (32, 64)          # window-area buckets (7x7 -> 64)
_BLOCK_DS = (32, 64, 128)     # head-dim buckets (masked loads: 48, 80, 96 cost no extra bytes)




def _config(block_n, block_d, dtype_name, backward, arch):
    """(num_warps, num_stages), chosen from a static compile sweep (registers and
    spills on sm_80 / sm_90a; see static_compile_specs).

    4 warps (16 score rows each) for 64-token windows, 8 where bigger tiles (head
    dim 128; in the backward, whose products hold more tiles live, anything beyond
    half precision with head dim 32) need the registers of twice the threads; 4
    warps split over rows and columns for 32-token windows. The forward's window
    loop is pipelined (2 stages); the backward's only for 32-token windows with head
    dim <= 64 on sm_90a: elsewhere the prefetch buffers push it into spills.
    """
    if block_n == 32:
        warps = 4
    elif backward:
        warps = 4 if block_d == 32 and dtype_name not in _FP32 else 8
    else:
        warps = 8 if block_d == 128 else 4
    if not backward:
        return warps, 2
    # 3xTF32 spills with the prefetch buffers too.
    pipelined = arch >= 90 and block_n == 32 and block_d <= 64 and dtype_name != "fp32x3"
    return warps, 2 if pipelined else 1


# (BLOCK_D, PASS; None: the forward) -> (BLOCK_M, BLOCK_N) of the tiled kernels: the
# largest blocks without spills on sm_80 and sm_90a in a static compile sweep, with 4
# warps. The tiles are 64 x 32 where they fit (a 144-token window: 3 x 5 tiles, 1.3x
# the real pairs); the dk / dv pass keeps four (key block, D) tiles live, so it takes
# 32 keys (with 64 queries only at D = 32); head dim 128 needs 32 x 32 throughout
# but for dbias, which keeps no (block, D) accumulator.
_TILED_BLOCKS = {
    (32, None): (64, 32), (64, None): (64, 32), (128, None): (32, 32),
    (32, 3): (64, 32), (64, 3): (64, 32), (128, 3): (32, 32),
    (32, 4): (32, 64), (64, 4): (32, 32), (128, 4): (32, 32),
    (32, 2): (64, 32), (64, 2): (64, 32), (128, 2): (64, 32),
}


def _tiled_config(block_d, dtype_name, pass_):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a tiled launch (``pass_`` None: the
    forward, whose key loop is pipelined). The same on both archs; half-precision dq at
    D = 32 takes 32-query blocks (64 x 32 spills on sm_80 with a table)."""
    if dtype_name == "fp32x3" and pass_ == _DKV.value:
        # 3xTF32 keeps hi / lo parts of the loop-invariant k and v beside the dk / dv
        # accumulators: 16-key blocks (168 registers); 32 or 64 keys spill on sm_80
        # with 4 or 8 warps.
        return 32, 16, 4, 1
    blocks = (32, 64) if dtype_name not in _FP32 and (block_d, pass_) == (32, _DQ.value) \
        else _TILED_BLOCKS[block_d, pass_]
    # 3xTF32's split operands: the forward spills with 4 warps.
    warps = 8 if dtype_name == "fp32x3" and pass_ is None else 4
    return (*blocks, warps, 2 if pass_ is None else 1)


def _split_bias(block_n, block_d, dtype_name):
    """Whether dbias takes its own pass. Its ``BLOCK_N x BLOCK_N`` fp32 accumulator stays
    live across the window loop; beside the five products of 64-token windows it fits
    only with half-precision head dim 32 (Swin), and beside the 3xTF32 products of
    32-token windows only up to head dim 32 (at 64 it spills on sm_90a). The separate
    pass re-reads q, k, v, dout and recomputes the scores, but needs two products only."""
    if block_n > _BLOCK_NS[0]:
        return block_d > 32 or dtype_name in _FP32
    return block_d > 32 and dtype_name == "fp32x3"


def _bwd_passes(block_n, block_d, dtype_name, bias_grad, pad_grad):
    """(PASS, BIAS_GRAD) of every backward launch, in order."""
    split = bias_grad and _split_bias(block_n, block_d, dtype_name)
    passes = [(_QKV.value, bias_grad and not split)]
    if split:
        passes.append((_BIAS.value, True))
    if pad_grad:
        passes.append((_PAD.value, False))
    return passes


def _chunk(block_d, pass_):
    """BLOCK_K, the head-dim chunk of the ``_PAD`` / ``_BIAS`` passes (``_QKV`` takes
    the whole head dim). 32 from the static sweep: chunks of 64 spill at head dim 64
    on sm_80, where the single-chunk loops fold into one body and their two dots count
    as chained (see ``_scores_dp_chunked``)."""
    return block_d if pass_ == _QKV.value else min(block_d, 32)


def _arch(device):
    """90 for H100 and newer, else 80 (A100, and the interpreter): the config row."""
    if device.type != "cuda":
        return 80
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _pairs_block(N):
    """BLOCK_P of the dtable kernel: the pairs of a table row (at most N)."""
    return max(_BLOCK_NS[0], triton.next_power_of_2(N))


def _dtable_rows(block_p):
    """BLOCK_R, table rows per dtable program (7x7: 169 rows -> 6 programs): at most
    2048 pairs, 16 per thread of 4 warps (their addresses are 64-bit: a 32 x 256 tile
    spills, 32 x 128 takes 208 registers)."""
    return min(32, 2048 // block_p)


def _tiled(N, dtype_name):
    """Whether windows of N tokens take the tiled kernels: past 64 tokens, and with
    3xTF32 past 32 (a 64-token tile spills there)."""
    return N > (_BLOCK_NS[0] if dtype_name == "fp32x3" else _BLOCK_NS[-1])


def _blocks(N, D):
    """(BLOCK_N, BLOCK_D); BLOCK_N is the block of the tiled kernels past 64 tokens."""
    block_n = next((b for b in _BLOCK_NS if b >= N), _BLOCK_NS[-1])
    block_d = next(b for b in _BLOCK_DS if b >= D)
    return block_n, block_d


def tf32_allowed():
    """Whether torch lets float32 matmuls run on TF32 tensor cores. Read through
    ``torch.backends.cuda.matmul.fp32_precision``, which is "tf32" however it was allowed
    (that flag, ``torch.backends.fp32_precision``, the legacy ``allow_tf32`` or
    ``torch.set_float32_matmul_precision``); ``allow_tf32`` itself raises once both
    APIs were used."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _dtype_name(dtype):
    """The config key of a call, chosen per call: its dtype's name, or "fp32x3" for
    float32 inputs while torch does not allow TF32: their products run 3xTF32
    (float32-grade, as torch's default float32 matmuls), whose split operands take more
    registers than plain TF32's."""
    if dtype == torch.float32 and not tf32_allowed():
        return "fp32x3"
    return _DTYPE_NAMES[dtype]


def _precision(dtype_name):
    """``input_precision`` of every ``tl.dot`` for a config key: 3xTF32 for "fp32x3",
    else TF32 (half-precision operands are exact in it)."""
    return "tf32x3" if dtype_name == "fp32x3" else "tf32"


def _int32_reason(name, shape, strides):
    """Why the kernels cannot index a tensor of this layout (element offsets within one
    image are int32), or None."""
    if sum((n - 1) * s for n, s in zip(shape[1:], strides[1:])) > _INT32_MAX:
        return (f"{name}: offsets within one image must fit in int32, got shape "
                f"{tuple(shape)} with strides {tuple(strides)}")
    return None


def int32_reasons(q, k, v, packed=False):
    """Why the kernels cannot index a call on q, k, v (of any device, meta included): in
    them or in what the launchers write, the contiguous output and gradients (``packed``:
    dq, dk, dv are the slices of one contiguous (B, H, W, 3, heads, D) gradient, whose
    span covers the output's)."""
    _, H, W, heads, D = q.shape
    token = (3 if packed else 1) * heads * D
    layouts = [(name, t.shape, t.stride()) for name, t in (("q", q), ("k", k), ("v", v))]
    layouts.append(("dq" if packed else "out", q.shape, (H * W * token, W * token, token, D, 1)))
    return [reason for reason in itertools.starmap(_int32_reason, layouts) if reason]


def _check_int32(**tensors):
    for name, t in tensors.items():
        reason = _int32_reason(name, t.shape, t.stride())
        if reason:
            raise ValueError(reason)


def _geometry(q, window_size):
    B, H, W, heads, D = q.shape
    wh, ww = window_size
    n_wh, n_ww = triton.cdiv(H, wh), triton.cdiv(W, ww)
    return B, H, W, heads, D, n_wh, n_ww, B * n_wh * n_ww


def _table_arg(table, device):
    """The contiguous table the kernels gather the bias from (a few KB); a dummy when None."""
    if table is None:
        return torch.empty(0, dtype=torch.float32, device=device)
    return table.contiguous()


def _pad_rows(pad, q):
    """Pad vector in q's dtype (timm's projection of the zero padding is in that dtype)."""
    heads, D = q.shape[3:]
    if pad is None:
        return torch.zeros(heads, D, dtype=q.dtype, device=q.device)
    return pad.to(q.dtype).contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _window_groups(B, n_wh, n_ww, heads, device, tiles=1):
    """(windows per program, programs per window kind): a program walks consecutive
    windows of one kind (interior, last row, last column, corner; see
    ``_program_windows``) for one head (and, in the tiled kernels, one of ``tiles``
    blocks of them: the launch has ``tiles`` times the programs listed).

    On a GPU about 8 programs per SM: a few waves of resident programs, each
    pipelining its window loop and building its accumulator start (bias gather,
    mask) once; the backward's partial dbias buffer stays ``8 * SMs * N^2`` floats
    (~10 MB at N = 49 on H100). In the interpreter 4 programs, so tests walk several
    windows per program, some with a ragged last group.
    """
    num_windows = B * n_wh * n_ww
    target = 8 * _sm_count(device) if device.type == "cuda" else 4
    # At least one window per program: an empty batch launches nothing but still sizes
    # the (empty) partial buffers.
    per_program = max(1, triton.cdiv(num_windows,
                                     max(1, min(num_windows, target // (heads * tiles)))))
    kinds = (B * (n_wh - 1) * (n_ww - 1), B * (n_ww - 1), B * (n_wh - 1), B)
    return per_program, [triton.cdiv(n, per_program) * heads for n in kinds]


@on_tensor_device
def window_attention_fwd(q, k, v, table, pad_k, pad_v, window_size, shift_size, scale, mask_value):
    """Forward; returns ``out`` (contiguous (B, H, W, heads, D)) and ``lse`` (fp32,
    ``(num_windows, heads, N)``, base 2). Arguments are validated by the caller:
    window_size / shift_size are (h, w) pairs with shift < window <= grid, N <= 64,
    D <= 128, scale nonzero, table ((2wh-1)(2ww-1), heads) or None, pad_k / pad_v
    (heads, D) or None (zeros)."""
    B, H, W, heads, D, n_wh, n_ww, num_windows = _geometry(q, window_size)
    (wh, ww), (sh, sw) = window_size, shift_size
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_windows, heads, wh * ww, dtype=torch.float32, device=q.device)
    _check_int32(q=q, k=k, v=v, out=out)
    if out.numel() == 0:
        return out, lse
    N = wh * ww
    block_n, block_d = _blocks(N, D)
    dtype_name, arch = _dtype_name(q.dtype), _arch(q.device)
    if _tiled(N, dtype_name):
        kernel = _window_attention_fwd_tiled_kernel
        block_m, block_n, num_warps, num_stages = _tiled_config(block_d, dtype_name, None)
        tiles = triton.cdiv(N, block_m)
        blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        tiles, kernel = 1, _window_attention_fwd_kernel
        num_warps, num_stages = _config(block_n, block_d, dtype_name, False, arch)
        blocks = dict(BLOCK_N=block_n)
    per_program, programs = _window_groups(B, n_wh, n_ww, heads, q.device, tiles)
    kernel[(sum(programs) * tiles,)](
        q, k, v, _table_arg(table, q.device), _pad_rows(pad_k, q), _pad_rows(pad_v, q),
        out, lse, B, H, W, n_wh, n_ww, heads, D, per_program, wh, ww, sh, sw,
        float(scale), 1.0 / scale, float(mask_value),
        *q.stride(), *k.stride(), *v.stride(),
        HAS_TABLE=table is not None, BLOCK_D=block_d, PRECISION=_precision(dtype_name),
        **blocks, num_warps=num_warps, num_stages=num_stages)
    return out, lse


def _bwd_single_tile(dout, q, k, v, lse, table, pad_k, pad_v, dq, dk, dv, window_size,
                     shift_size, scale, mask_value, want_bias, want_pad, dtype_name):
    """Backward launches of windows of one tile (``_bwd_passes``; ``dtype_name``: the
    call's config key, ``_dtype_name``): returns the
    partial dbias buffer, its number of program groups and the fp32 pad gradient
    partials, ``(groups, heads, slots, 2, D)`` (no groups unless ``want_pad``).

    The pad gradients take their own launch over the last-row / last-column windows
    (the only ones with padded keys); it writes one partial per window, summed here in a
    fixed order."""
    B, H, W, heads, D, n_wh, n_ww, _ = _geometry(q, window_size)
    (wh, ww), (sh, sw) = window_size, shift_size
    N = wh * ww
    per_program, programs = _window_groups(B, n_wh, n_ww, heads, q.device)
    dbias = torch.empty(sum(programs) * N * N if want_bias else 0, dtype=torch.float32,
                        device=q.device)
    # One (dk, dv) pad partial per window slot of the pad launch's programs; slots past
    # a program's last window stay zero.
    dpad = torch.zeros(sum(programs[1:]) * per_program if want_pad else 0, 2, D,
                       dtype=torch.float32, device=q.device)
    block_n, block_d = _blocks(N, D)
    num_warps, num_stages = _config(block_n, block_d, dtype_name, True, _arch(q.device))
    args = (q, k, v, dout, lse, _table_arg(table, q.device),
            _pad_rows(pad_k, q), _pad_rows(pad_v, q), dq, dk, dv, dbias, dpad,
            B, H, W, n_wh, n_ww, heads, D, per_program)
    rest = (wh, ww, sh, sw, float(scale), 1.0 / scale, float(mask_value),
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), dq.stride(2))
    config = dict(HAS_TABLE=table is not None, BLOCK_N=block_n, BLOCK_D=block_d,
                  PRECISION=_precision(dtype_name), num_warps=num_warps,
                  num_stages=num_stages)
    for pass_, bias_grad in _bwd_passes(block_n, block_d, dtype_name, want_bias,
                                        want_pad):
        # The pad pass walks the last-row / last-column programs only.
        grid, first = ((sum(programs[1:]), programs[0]) if pass_ == _PAD.value
                       else (sum(programs), 0))
        _window_attention_bwd_kernel[(grid,)](
            *args, first, *rest, PASS=pass_, BIAS_GRAD=bias_grad,
            BLOCK_K=_chunk(block_d, pass_), **config)
    # Slots are (program, window of the program); heads vary fastest over programs.
    return dbias, sum(programs) // heads, dpad.view(-1, heads, per_program, 2, D)


def _tiled_passes(want_bias):
    """The PASS of each tiled backward launch, in order: dq first, since it stores the
    delta the others read."""
    return [_DQ.value, _DKV.value] + [_BIAS.value] * want_bias


def _tiles(N, pass_, block_m, block_n):
    """Programs per window group of a tiled launch: its query blocks, key blocks or
    (query, key) block pairs."""
    n_qb, n_kb = triton.cdiv(N, block_m), triton.cdiv(N, block_n)
    return {_DKV.value: n_kb, _BIAS.value: n_qb * n_kb}.get(pass_, n_qb)


def _bwd_tiled(dout, q, k, v, out, lse, table, pad_k, pad_v, dq, dk, dv, window_size,
               shift_size, scale, mask_value, want_bias, want_pad, dtype_name):
    """Backward launches of the tiled kernels (``_tiled_passes``), returning what
    ``_bwd_single_tile`` returns. Each launch groups windows for its own tile count; the
    ``_DKV`` launch writes one pad partial per program when ``want_pad``."""
    B, H, W, heads, D, n_wh, n_ww, num_windows = _geometry(q, window_size)
    (wh, ww), (sh, sw) = window_size, shift_size
    N = wh * ww
    block_d = _blocks(N, D)[1]
    launches = {}  # PASS -> (config, tiles, windows per program, programs per kind)
    for pass_ in _tiled_passes(True):
        config = _tiled_config(block_d, dtype_name, pass_)
        tiles = _tiles(N, pass_, *config[:2])
        launches[pass_] = (config, tiles,
                           *_window_groups(B, n_wh, n_ww, heads, q.device, tiles))
    bias_programs = sum(launches[_BIAS.value][3])
    dbias = torch.empty(bias_programs * N * N if want_bias else 0, dtype=torch.float32,
                        device=q.device)
    _, kv_tiles, _, kv_programs = launches[_DKV.value]
    dpad = torch.empty(sum(kv_programs) * kv_tiles if want_pad else 0, 2, D,
                       dtype=torch.float32, device=q.device)
    delta = torch.empty(num_windows, heads, N, dtype=torch.float32, device=q.device)
    args = (q, k, v, dout, out.contiguous(), lse, delta, _table_arg(table, q.device),
            _pad_rows(pad_k, q), _pad_rows(pad_v, q), dq, dk, dv, dbias, dpad,
            B, H, W, n_wh, n_ww, heads, D)
    rest = (wh, ww, sh, sw, float(scale), 1.0 / scale, float(mask_value),
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), dq.stride(2))
    for pass_ in _tiled_passes(want_bias):
        (block_m, block_n, num_warps, num_stages), tiles, per_program, programs = \
            launches[pass_]
        _window_attention_bwd_tiled_kernel[(sum(programs) * tiles,)](
            *args, per_program, *rest, HAS_TABLE=table is not None, PASS=pass_,
            PAD_GRAD=want_pad and pass_ == _DKV.value, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d, PRECISION=_precision(dtype_name), num_warps=num_warps,
            num_stages=num_stages)
    # Programs are (group, head, key block) with the key block fastest.
    return dbias, bias_programs // heads, dpad.view(-1, heads, kv_tiles, 2, D)


@on_tensor_device
def window_attention_bwd(dout, q, k, v, out, lse, table, pad_k, pad_v, window_size, shift_size,
                         scale, mask_value, needs_input_grad, dqkv=None):
    """Gradients ``(dq, dk, dv, dtable, dpad_k, dpad_v)``; an entry is None when the
    matching flag of ``needs_input_grad`` (same order) is False. dq / dk / dv are
    contiguous (B, H, W, heads, D) in q's dtype or, when ``dqkv`` (a contiguous
    (B, H, W, 3, heads, D) tensor) is given, its three slices, written in place: the
    gradient of a packed projection, with no stack. dtable has the table's shape and
    dtype, dpad_k / dpad_v are (heads, D) in the pads' dtypes. Deterministic.

    The pad gradients are computed only when the grid is padded (otherwise they are
    zero)."""
    _, H, W, heads, D = q.shape
    wh, ww = window_size
    N = wh * ww
    need_q, need_k, need_v, need_table, need_pad_k, need_pad_v = needs_input_grad
    if dqkv is None:
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    else:
        dq, dk, dv = dqkv.unbind(3)
    _check_int32(q=q, k=k, v=v, out=out, dout=dout, dq=dq)
    if dq.numel() == 0:
        # No token (an empty batch or grid, or no head): nothing to launch, and the
        # parameters get zero gradients.
        def zeros(t, need):
            return torch.zeros(t.shape, dtype=t.dtype, device=t.device) \
                if need and t is not None else None

        return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
                zeros(table, need_table), zeros(pad_k, need_pad_k), zeros(pad_v, need_pad_v))
    want_bias = table is not None and need_table
    want_pad = (((need_pad_k and pad_k is not None) or (need_pad_v and pad_v is not None))
                and (H % wh != 0 or W % ww != 0))
    dtype_name = _dtype_name(q.dtype)
    if _tiled(N, dtype_name):
        dbias, groups, dpad = _bwd_tiled(dout, q, k, v, out, lse, table, pad_k, pad_v, dq, dk,
                                         dv, window_size, shift_size, scale, mask_value,
                                         want_bias, want_pad, dtype_name)
    else:
        dbias, groups, dpad = _bwd_single_tile(dout, q, k, v, lse, table, pad_k, pad_v, dq,
                                               dk, dv, window_size, shift_size, scale,
                                               mask_value, want_bias, want_pad, dtype_name)
    dtable = None
    if want_bias:
        # One pass over the partials, straight into the table's (rows, heads) layout and dtype.
        rows = (2 * wh - 1) * (2 * ww - 1)
        dtable = torch.empty(rows, heads, dtype=table.dtype, device=q.device)
        block_p = _pairs_block(N)
        block_r = _dtable_rows(block_p)
        _window_attention_dtable_kernel[(heads, triton.cdiv(rows, block_r))](
            dbias, dtable, groups, heads, rows, wh, ww,
            BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4,
            num_stages=1)
    dpad_k = dpad_v = None
    if need_pad_k and pad_k is not None:
        dpad_k = dpad[:, :, :, 0].sum((0, 2)).to(pad_k.dtype)
    if need_pad_v and pad_v is not None:
        dpad_v = dpad[:, :, :, 1].sum((0, 2)).to(pad_v.dtype)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None, dtable,
            dpad_k, dpad_v)


# --------------------------------------------------------------------------- static specs


def static_compile_specs():
    """Every (kernel, BLOCK_N, BLOCK_D, HAS_TABLE, PASS, BIAS_GRAD, dtype, warps, stages)
    the launchers can pick; float32 both with TF32 products ("fp32") and with 3xTF32
    ("fp32x3", see ``_dtype_name``). A spec the launchers pick on one of sm_80 / sm_90a only
    names that arch (``archs``, and an ``_sm80`` / ``_sm90`` suffix). The head-dim
    strides are the constexpr 1 (Triton specialises them for dense rows); D and the
    other strides are multiples of 16 (for the head dims listed, so are heads * D)."""
    picks = {}   # (name, kernel, dtype, constexprs, warps, stages) -> archs

    def pick(key, arch):
        archs = picks.setdefault(key, [])
        if arch not in archs:
            archs.append(arch)

    for arch, dtype, block_n, block_d in itertools.product(
            (80, 90), _SPEC_DTYPES, _BLOCK_NS, _BLOCK_DS):
        if dtype in _FP32 and block_d > max_head_dim_fp32(block_n) or _tiled(block_n, dtype):
            continue
        for kernel, backward in ((_window_attention_fwd_kernel, False),
                                 (_window_attention_bwd_kernel, True)):
            variants = [((("HAS_TABLE", t),), f"{'_table' if t else ''}") for t in (True, False)]
            if backward:
                # (HAS_TABLE, dbias wanted, pad launch) as window_attention_bwd sees them.
                variants = []
                for t, bias, pad in itertools.product((True, False), repeat=3):
                    if bias and not t:
                        continue
                    for p, g in _bwd_passes(block_n, block_d, dtype, bias, pad):
                        variants.append(((("HAS_TABLE", t), ("PASS", p), ("BIAS_GRAD", g),
                                          ("BLOCK_K", _chunk(block_d, p))),
                                         f"{'_table' if t else ''}"
                                         f"{('', '_pad', '_bias')[p]}{'_dbias' if g else ''}"))
            for constexprs, suffix in variants:
                constexprs += (("BLOCK_N", block_n), ("BLOCK_D", block_d))
                pick((f"{kernel.__name__}_n{block_n}_d{block_d}{suffix}_{dtype}", kernel,
                      dtype, constexprs, *_config(block_n, block_d, dtype, backward, arch)), arch)
    tiled_names = {None: "", _DQ.value: "_dq", _DKV.value: "_dkv", _BIAS.value: "_bias"}
    for arch, dtype, block_d in itertools.product((80, 90), _SPEC_DTYPES, _BLOCK_DS):
        if dtype in _FP32 and block_d > max_head_dim_fp32(_BLOCK_NS[-1] + 1):
            continue
        # (pass or None for the forward, HAS_TABLE, PAD_GRAD) as the tiled launchers see them.
        variants = [(None, t, False) for t in (True, False)]
        for t, bias in itertools.product((True, False), repeat=2):
            if bias and not t:
                continue
            for pass_ in _tiled_passes(bias):
                variants += [(pass_, t, pad) for pad in ((False, True) if pass_ == _DKV.value
                                                         else (False,))]
        for pass_, t, pad in dict.fromkeys(variants):
            kernel = _window_attention_fwd_tiled_kernel if pass_ is None \
                else _window_attention_bwd_tiled_kernel
            constexprs = (("HAS_TABLE", t),)
            if pass_ is not None:
                constexprs += (("PASS", pass_), ("PAD_GRAD", pad))
            block_m, block_n, num_warps, num_stages = _tiled_config(block_d, dtype, pass_)
            constexprs += (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_D", block_d))
            suffix = f"{'_table' if t else ''}{tiled_names[pass_]}{'_pad' if pad else ''}"
            pick((f"{kernel.__name__}_m{block_m}_n{block_n}_d{block_d}{suffix}_{dtype}", kernel,
                  dtype, constexprs, num_warps, num_stages), arch)
    specs = []
    for (name, kernel, dtype, constexprs, num_warps, num_stages), archs in picks.items():
        unit = [a for a in kernel.arg_names if a.startswith("stride_") and a.endswith("d")
                and not a.endswith("head")]
        strided = [a for a in kernel.arg_names if a.startswith("stride_") and a not in unit]
        constexprs = dict(constexprs, **{a: 1 for a in unit})
        constexprs["PRECISION"] = _precision(dtype)
        ptr = "fp32" if dtype in _FP32 else dtype
        # The table comes in fp32 (a parameter under autocast) or in the model's dtype.
        tables = ["fp32"] + ([dtype] if constexprs["HAS_TABLE"] and dtype not in _FP32 else [])
        for table in tables:
            signature = {}
            for a in kernel.arg_names:
                if a in constexprs:
                    signature[a] = "constexpr"
                elif a == "table_ptr":
                    signature[a] = f"*{table}"
                elif a in ("lse_ptr", "delta_ptr", "dbias_ptr", "dpad_ptr"):
                    signature[a] = "*fp32"
                elif a.endswith("_ptr"):
                    signature[a] = f"*{ptr}"
                elif a in ("scale", "inv_scale", "mask_value"):
                    signature[a] = "fp32"
                else:
                    signature[a] = "i32"
            spec = {"name": name + ("" if table == "fp32" else f"_table_{table}"), "fn": kernel,
                    "signature": signature, "constexprs": constexprs,
                    "num_warps": num_warps, "num_stages": num_stages, "uses_dot": True,
                    "dtype": dtype, "divisible_by_16": strided + ["D"]}
            if len(archs) == 1:
                spec["name"] += f"_sm{archs[0]}"
                spec["archs"] = tuple(archs)
            specs.append(spec)
    block_ps = sorted({_pairs_block(n) for n in range(1, MAX_WINDOW_AREA + 1)})
    for block_p, table in itertools.product(block_ps, _DTYPE_NAMES.values()):
        specs.append({
            "name": f"_window_attention_dtable_kernel_p{block_p}_{table}",
            "fn": _window_attention_dtable_kernel,
            "signature": {"dbias_ptr": "*fp32", "dtable_ptr": f"*{table}",
                          "GROUPS": "i32", "HEADS": "i32", "ROWS": "i32", "WH": "i32",
                          "WW": "i32", "BLOCK_R": "constexpr", "BLOCK_P": "constexpr"},
            "constexprs": {"BLOCK_R": _dtable_rows(block_p), "BLOCK_P": block_p},
            "num_warps": 4, "num_stages": 1, "uses_dot": False, "dtype": table})
    return specs
