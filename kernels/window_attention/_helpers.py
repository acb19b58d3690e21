"""@triton.jit helpers shared by the single-tile and the tiled window-attention kernels:
which windows a program walks, where the tokens of a window's slots are, the bias and
shift-mask start of a score tile, token loads / stores and the softmax weights."""
from typing import NamedTuple

import triton
import triton.language as tl

# Backward passes (a kernel's PASS). Single-tile: dq / dk / dv, pad-vector sums, dbias
# alone; tiled: dq, dk / dv, and dbias alone (_BIAS). constexpr so that kernels may read
# them; ``.value`` on the host side.
_QKV, _PAD, _BIAS, _DQ, _DKV = (tl.constexpr(i) for i in range(5))


class Grid(NamedTuple):
    """The windows of a launch: B images of H x W tokens (HEADS heads of D channels) in
    n_wh x n_ww windows of WH x WW slots, shifted by (SH, SW). With ``GRID_PARTITION``
    (MaxViT's grid attention) a window's slots are n_wh rows and n_ww columns apart and
    its index is the offset of its first slot; otherwise they are adjacent."""
    B: tl.tensor
    H: tl.tensor
    W: tl.tensor
    n_wh: tl.tensor
    n_ww: tl.tensor
    HEADS: tl.tensor
    D: tl.tensor
    WH: tl.tensor
    WW: tl.tensor
    SH: tl.tensor
    SW: tl.tensor
    GRID_PARTITION: tl.constexpr


class Program(NamedTuple):
    """A program's head ``h``, the kind of its windows (``last_row``, ``last_col``), the
    kind's sub-grid (ny, nx) of windows and the program's range [first, end) in it."""
    h: tl.tensor
    last_row: tl.tensor
    last_col: tl.tensor
    ny: tl.tensor
    nx: tl.tensor
    first: tl.tensor
    end: tl.tensor


class Slots(NamedTuple):
    """Slots of a tile: index ``t`` in the window, its row and column (ty, tx), and
    whether it is inside the window."""
    t: tl.tensor
    ty: tl.tensor
    tx: tl.tensor
    in_win: tl.tensor


class Tokens(NamedTuple):
    """What slots of window ``w`` (batch index ``b``) hold: a real token (``real``) at
    source position (oy, ox), or padding (``is_pad``, a column to select tile rows)."""
    w: tl.tensor
    b: tl.tensor
    real: tl.tensor
    oy: tl.tensor
    ox: tl.tensor
    is_pad: tl.tensor


class HeadRows(NamedTuple):
    """The head-dim range ``d`` (``d_ok``: inside D) and the head's pad rows."""
    d: tl.tensor
    d_ok: tl.tensor
    pad_k: tl.tensor
    pad_v: tl.tensor


@triton.jit
def _grid(sizes, window, GRID_PARTITION: tl.constexpr):
    """The ``Grid`` of a launch from its arguments ``sizes`` (B, H, W, n_wh, n_ww, heads,
    D) and ``window`` (WH, WW, SH, SW)."""
    return Grid(sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6],
                window[0], window[1], window[2], window[3], GRID_PARTITION)


@triton.jit
def _slots(grid, t0, BLOCK: tl.constexpr):
    """Slots t0 + [0, BLOCK). t // WW goes through an fp32 reciprocal, exact here
    ((t + 0.5) / WW stays 0.5 / WW away from integers), since integer division by a
    runtime value costs ~20 instructions a slot."""
    t = t0 + tl.arange(0, BLOCK)
    ty = ((t.to(tl.float32) + 0.5) * (1.0 / grid.WW)).to(tl.int32)
    return Slots(t, ty, t - ty * grid.WW, t < grid.WH * grid.WW)


@triton.jit
def _program_windows(pid, grid, WINDOWS_PER_PROGRAM):
    """The ``Program`` of ``pid``. Windows are split into four kinds, each walked by its
    own programs: interior, last row, last column, corner. A program's windows
    therefore share one shift mask."""
    B = grid.B
    h = pid % grid.HEADS
    g = pid // grid.HEADS
    n0 = B * (grid.n_wh - 1) * (grid.n_ww - 1)
    n1 = B * (grid.n_ww - 1)
    n2 = B * (grid.n_wh - 1)
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
    ny = tl.where(last_row, 1, grid.n_wh - 1)
    nx = tl.where(last_col, 1, grid.n_ww - 1)
    first = g * WINDOWS_PER_PROGRAM
    return Program(h, last_row, last_col, ny, nx, first,
                   tl.minimum(first + WINDOWS_PER_PROGRAM, count))


@triton.jit
def _bias_mask(table_ptr, prog, grid, inv_scale, mask_value, rows, cols,
               HAS_TABLE: tl.constexpr, KEYS_AS_ROWS: tl.constexpr):
    """The score accumulator start ``(bias + shift mask) / scale`` of a tile of ``rows``
    by ``cols`` (``Slots``), -inf on key slots past N, the bias gathered from the table
    of the program's head. Rows are queries, or keys with ``KEYS_AS_ROWS`` (bias
    transposed, mask symmetric).

    Shift regions only split the last window row (column), at slot row WH - SH
    (column WW - SW), where timm's get_attn_mask puts its boundaries."""
    WH, WW = grid.WH, grid.WW
    region_r = ((rows.ty >= WH - grid.SH) & prog.last_row).to(tl.int32) * 2 \
        + ((rows.tx >= WW - grid.SW) & prog.last_col).to(tl.int32)
    region_c = ((cols.ty >= WH - grid.SH) & prog.last_row).to(tl.int32) * 2 \
        + ((cols.tx >= WW - grid.SW) & prog.last_col).to(tl.int32)
    acc0 = tl.where(region_r[:, None] != region_c[None, :], mask_value, 0.0)
    if HAS_TABLE:
        # rel(i, j) = (ty_i - ty_j + WH - 1)(2WW - 1) + tx_i - tx_j + WW - 1 = row_i - col_j.
        # The table is read in its own dtype (fp32 parameters under autocast, or the
        # model's half precision): no cast pass before the launch.
        # Slots past N take the centre row / column 0, so the gather stays inside the
        # table without a mask (their scores are discarded).
        centre = (WH - 1) * (2 * WW - 1) + WW - 1
        col_r = tl.where(rows.in_win, rows.ty * (2 * WW - 1) + rows.tx, 0)
        col_c = tl.where(cols.in_win, cols.ty * (2 * WW - 1) + cols.tx, 0)
        if KEYS_AS_ROWS:
            row_c = tl.where(cols.in_win, centre + col_c, centre)
            rel = row_c[None, :] - col_r[:, None]
            acc0 += tl.load(table_ptr + rel * grid.HEADS + prog.h).to(tl.float32)
        else:
            row_r = tl.where(rows.in_win, centre + col_r, centre)
            rel = row_r[:, None] - col_c[None, :]
            acc0 += tl.load(table_ptr + rel * grid.HEADS + prog.h).to(tl.float32)
    # -inf before the product by 1 / scale: the sign comes out right for any scale.
    if KEYS_AS_ROWS:
        acc0 = tl.where(rows.in_win[:, None], acc0, float("-inf")) * inv_scale
    else:
        acc0 = tl.where(cols.in_win[None, :], acc0, float("-inf")) * inv_scale
    return acc0


@triton.jit
def _window_tokens(e, prog, grid, slots):
    """The ``Tokens`` of ``slots`` in window ``e`` of the program's sub-grid; its index w
    among all windows is row-major over (B, n_wh, n_ww)."""
    b = e // (prog.ny * prog.nx)
    wy = (e // prog.nx) % prog.ny + tl.where(prog.last_row, grid.n_wh - 1, 0)
    wx = e % prog.nx + tl.where(prog.last_col, grid.n_ww - 1, 0)
    if grid.GRID_PARTITION:
        py = slots.ty * grid.n_wh + wy
        px = slots.tx * grid.n_ww + wx
    else:
        py = wy * grid.WH + slots.ty
        px = wx * grid.WW + slots.tx
    real = slots.in_win & (py < grid.H) & (px < grid.W)
    # Rolling by -shift puts original token (p + shift) mod size at p.
    oy = py + grid.SH
    oy = tl.where(oy >= grid.H, oy - grid.H, oy)
    ox = px + grid.SW
    ox = tl.where(ox >= grid.W, ox - grid.W, ox)
    return Tokens((b * grid.n_wh + wy) * grid.n_ww + wx, b, real, oy, ox,
                  (slots.in_win & ~real)[:, None])


@triton.jit
def _head_rows(pad_k_ptr, pad_v_ptr, h, D, BLOCK_D: tl.constexpr):
    """The ``HeadRows`` of head ``h`` (of ``D`` channels)."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    pad_k = tl.load(pad_k_ptr + h * D + d, mask=d_ok, other=0.0)
    pad_v = tl.load(pad_v_ptr + h * D + d, mask=d_ok, other=0.0)
    return HeadRows(d, d_ok, pad_k, pad_v)


@triton.jit
def _score_gain(gain_ptr, h, scale, COSINE: tl.constexpr):
    """What multiplies the scores of head ``h``: the cosine attention's gain
    exp(min(logit_scale, log 100)) (computed by the launcher: a float32 per head), else
    ``scale``."""
    if COSINE:
        gain = tl.load(gain_ptr + h)
    else:
        gain = scale
    return gain


@triton.jit
def _inv_norm_of(sq):
    """From rows' fp32 sums of squares: F.normalize's ``1 / max(||x_i||, eps)`` and
    whether ``||x_i|| >= eps``, where the norm's gradient passes the clamp (as torch's
    clamp_min at equality)."""
    n = tl.sqrt_rn(sq)
    return 1.0 / tl.maximum(n, 1e-12), n >= 1e-12


@triton.jit
def _inv_norm(x, COSINE: tl.constexpr):
    """``_inv_norm_of`` the rows of ``x`` with ``COSINE`` (masked head-dim columns load
    as 0); without: (1.0, True), no normalisation."""
    if COSINE:
        xf = x.to(tl.float32)
        r, ok = _inv_norm_of(tl.sum(xf * xf, 1))
    else:
        r, ok = 1.0, True
    return r, ok


@triton.jit
def _hat(x, r, COSINE: tl.constexpr):
    """The normalised rows ``x_i * r_i`` in x's dtype (norm <= 1: safe in float16), the
    operand of the gradient products; ``x`` without ``COSINE``."""
    if COSINE:
        x = (x.to(tl.float32) * r[:, None]).to(x.dtype)
    return x


@triton.jit
def _normalize_bwd(x, r, ok, dx_hat):
    """Gradient of rows ``x`` from the gradient ``dx_hat`` of their normalised rows
    (``r``, ``ok``: ``_inv_norm``). Past the clamp the norm is the constant eps:
    dx = dx_hat * r."""
    x_hat = x.to(tl.float32) * r[:, None]
    radial = tl.where(ok, tl.sum(x_hat * dx_hat, 1), 0.0)
    return (dx_hat - radial[:, None] * x_hat) * r[:, None]


@triton.jit
def _scale_scores(s, acc0, rq, rk, gain, KEYS_AS_ROWS: tl.constexpr, COSINE: tl.constexpr):
    """Log2 scores from the product ``s`` of the rows: (s * gain + bias + shift mask) *
    log2(e), ``acc0`` already in ``s`` (its start). With ``COSINE`` the queries' and
    keys' inverse norms ``rq``, ``rk`` (``_inv_norm``) scale the raw product here
    (normalised half-precision operands would round), then ``acc0``, already in log2
    units, is added. The factor of a pair is the same product in either orientation:
    at scores up to 144 (gain 100), where a rounding costs ~1e-5 of a probability, the
    backward's (key, query) tiles recompute the forward's scores. Returns the scores
    and, with ``COSINE``, cos * gain * log2(e) (the gradient of log gain is the sum of
    dS times it), else the scores again."""
    if COSINE:
        cq = rq * (gain * 1.4426950408889634)
        if KEYS_AS_ROWS:
            f = rk[:, None] * cq[None, :]
        else:
            f = cq[:, None] * rk[None, :]
        c = s * f
        s = c + acc0
    else:
        s = s * (gain * 1.4426950408889634)
        c = s
    return s, c


@triton.jit
def _scores_log2(a, b, acc0, rq, rk, gain, PRECISION: tl.constexpr, KEYS_AS_ROWS: tl.constexpr,
                 COSINE: tl.constexpr):
    """``_scale_scores`` of a b^T, (a, b) = (q, k), or (k, q) for the transposed scores
    (``KEYS_AS_ROWS``); gain = scale without ``COSINE``. Bias and mask enter as the
    dot's accumulator: loop-invariant, it is converted once to the dot's layout, and the
    softmax stays in that layout."""
    if COSINE:
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    else:
        s = tl.dot(a, tl.trans(b), acc0, input_precision=PRECISION)
    return _scale_scores(s, acc0, rq, rk, gain, KEYS_AS_ROWS, COSINE)


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
def _store_row_stats(lse_ptr, row, m, l, mask):
    """Score rows' max ``m`` and log2 of their sum ``l`` (log2 units), apart: the
    backward recomputes the scores, and s - m is exact where one float m + log2(l)
    would round log2(l) by a visible part of a probability (scores near 1e5 have an
    ulp of 2^-7). The buffer is (windows, heads, N, 2) float32; ``row`` indexes (windows,
    heads, N)."""
    tl.store(lse_ptr + 2 * row, m, mask=mask)
    tl.store(lse_ptr + 2 * row + 1, tl.log2(l), mask=mask)


@triton.jit
def _load_row_stats(lse_ptr, row, mask):
    """``_store_row_stats``' (m, log2 l) of ``row``; rows outside ``mask`` get m = +inf,
    so that their probabilities 2^(s - m - log2 l) are 0."""
    m = tl.load(lse_ptr + 2 * row, mask=mask, other=float("inf"))
    return m, tl.load(lse_ptr + 2 * row + 1, mask=mask, other=0.0)


@triton.jit
def _load_tokens(ptr, strides, tok, h, d, d_ok):
    """Rows of a (B, H, W, heads, D) tensor of ``strides`` at the ``Tokens`` ``tok``
    (zero where not real), head ``h``, head-dim range ``d``."""
    ptrs = ptr + tok.b.to(tl.int64) * strides[0] + h * strides[3] \
        + (tok.oy * strides[1] + tok.ox * strides[2])[:, None] + d[None, :] * strides[4]
    return tl.load(ptrs, mask=tok.real[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _store_tokens(ptr, value, tok, grid, h, d, d_ok, TOKEN, D):
    """Store rows of a (B, H, W, heads, D) tensor whose tokens are ``TOKEN`` elements
    apart, rows dense: contiguous (``TOKEN = heads * D``) or one slice of a packed
    (B, H, W, 3, heads, D) gradient (``3 * heads * D``)."""
    ptrs = ptr + tok.b.to(tl.int64) * grid.H * grid.W * TOKEN + h * D \
        + ((tok.oy * grid.W + tok.ox) * TOKEN)[:, None] + d[None, :]
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=tok.real[:, None] & d_ok[None, :])


@triton.jit
def _load_padded(ptr, strides, pad, tok, h, d, d_ok):
    """Key or value rows of a window: padded slots take the head's pad row."""
    return tl.where(tok.is_pad, pad[None, :], _load_tokens(ptr, strides, tok, h, d, d_ok))


@triton.jit
def _load_qk(q_ptr, k_ptr, strides_q, strides_k, pad_k, tok, h, d, d_ok):
    """A window's q rows and k rows (padded slots: the pad row), head-dim range ``d``."""
    q = _load_tokens(q_ptr, strides_q, tok, h, d, d_ok)
    k = _load_padded(k_ptr, strides_k, pad_k, tok, h, d, d_ok)
    return q, k
