"""``@triton.jit`` helpers the talking-heads kernels share: (heads, tokens, head dim)
tiles of every head at once, the heads' logits and their mixes over the head axis."""
import triton
import triton.language as tl

from ..scaled_dot_product_attention._tiles import _LOG2E


@triton.jit
def _program(N, BLOCK: tl.constexpr):
    """(batch index, token indices) of a program: blocks of one batch are neighbours in
    launch order (they share K / V or Q / dO in L2)."""
    num = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    return (pid // num).to(tl.int64), (pid % num) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _tile_ptrs(base, b, idx, H, N, D, stride, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
               TRANSPOSED: tl.constexpr, D0: tl.constexpr = 0):
    """(pointers, mask) of the (heads, tokens ``idx``, head dims D0 to D0 + BLOCK_D) tile
    of batch ``b`` of a (B, H, N, D) tensor of strides ``stride``; ``TRANSPOSED``:
    (heads, head dims, tokens)."""
    heads = tl.arange(0, BLOCK_H)[:, None, None]
    base += b * stride[0] + heads * stride[1]
    h_ok = heads < H
    if TRANSPOSED:
        d = D0 + tl.arange(0, BLOCK_D)[None, :, None]
        n = idx[None, None, :]
    else:
        n = idx[None, :, None]
        d = D0 + tl.arange(0, BLOCK_D)[None, None, :]
    return base + n * stride[2] + d * stride[3], h_ok & (n < N) & (d < D)


@triton.jit
def _load_tile(base, b, idx, H, N, D, stride, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
               TRANSPOSED: tl.constexpr, D0: tl.constexpr = 0):
    """The tile of ``_tile_ptrs``, 0 where masked."""
    ptrs, mask = _tile_ptrs(base, b, idx, H, N, D, stride, BLOCK_H, BLOCK_D, TRANSPOSED, D0)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, b, idx, H, N, D, stride, value, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Store ``value`` (fp32) into the (heads, tokens ``idx``, head dim) tile."""
    ptrs, mask = _tile_ptrs(base, b, idx, H, N, D, stride, BLOCK_H, BLOCK_D, False)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _head_vector(ptr, H, BLOCK_H: tl.constexpr):
    """A per-head parameter vector (a Linear's bias) in fp32, 0 for the padding heads."""
    heads = tl.arange(0, BLOCK_H)
    return tl.load(ptr + heads, mask=heads < H, other=0.0).to(tl.float32)


@triton.jit
def _mix(x, c_ptr, H, TRANSPOSED: tl.constexpr):
    """``y[g] = sum_h C[g, h] x[h]`` over the head axis of an (heads, rows, cols) tile,
    C a row-major (H, H) matrix (a Linear's weight); ``TRANSPOSED``: ``sum_h C[h, g] x[h]``
    (its gradient). Padding heads give 0. One output head per step: the (H, H, rows, cols)
    product of a single broadcast would not fit in registers."""
    heads = tl.arange(0, x.shape[0])
    y = tl.zeros_like(x)
    for g in range(H):
        if TRANSPOSED:
            c = tl.load(c_ptr + heads * H + g, mask=heads < H, other=0.0)
        else:
            c = tl.load(c_ptr + g * H + heads, mask=heads < H, other=0.0)
        row = tl.sum(c.to(tl.float32)[:, None, None] * x, 0)
        y = tl.where((heads == g)[:, None, None], row[None, :, :], y)
    return y


@triton.jit
def _head(x, h):
    """Head ``h``'s (rows, cols) slice of a (heads, rows, cols) tile."""
    heads = tl.arange(0, x.shape[0])
    return tl.sum(tl.where((heads == h)[:, None, None], x, 0.0), 0)


# Head dims per step of the logits' product: q and k are read in slices of this width,
# so that no whole (heads, tokens, head dim) tile of them is live.
_DK = tl.constexpr(16)


@triton.jit
def _logits(q_ptr, k_ptr, l_ptr, bl, b, rows, cols, sm_scale, stride_q, stride_k, H, N, D,
            PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """(X, S) of the (query ``rows``, key ``cols``) tile of every head: the scaled
    products X_h = scale q_h k_h^T and the mixed logits S = mix_L(X) + b_l, -inf at the
    padding keys. q and k are read at every call (from L1 / L2 after the first), _DK
    head dims at a time: a (heads, tokens, head dim) tile of each, kept live, would
    hold as many registers as the caller's accumulator."""
    x = tl.zeros([BLOCK_H, rows.shape[0], cols.shape[0]], tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, _DK):
        q = _load_tile(q_ptr, b, rows, H, N, D, stride_q, BLOCK_H, _DK, False, d0)
        kt = _load_tile(k_ptr, b, cols, H, N, D, stride_k, BLOCK_H, _DK, True, d0)
        x = tl.dot(q, kt, x, input_precision=PRECISION)
    x *= sm_scale
    s = _mix(x, l_ptr, H, False) + bl[:, None, None]
    return x, tl.where((cols < N)[None, None, :], s, float("-inf"))


@triton.jit
def _dprobs(dout_ptr, v_ptr, w_ptr, b, rows, cols, stride_dout, stride_v, H, N, D,
            PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """(dA, dP) of the (query ``rows``, key ``cols``) tile of every head: dA_f = dO_f v_f^T
    (read as ``_logits`` reads q and k) and the probabilities' gradient
    dP = mix_W^T(dA)."""
    da = tl.zeros([BLOCK_H, rows.shape[0], cols.shape[0]], tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, _DK):
        do = _load_tile(dout_ptr, b, rows, H, N, D, stride_dout, BLOCK_H, _DK, False, d0)
        vt = _load_tile(v_ptr, b, cols, H, N, D, stride_v, BLOCK_H, _DK, True, d0)
        da = tl.dot(do, vt, da, input_precision=PRECISION)
    return da, _mix(da, w_ptr, H, True)


@triton.jit
def _probs(s, m, log2_l):
    """exp(s - m) / l from the row statistics (the difference first: no overflow)."""
    return tl.exp2((s - m[:, :, None]) * _LOG2E - log2_l[:, :, None])


@triton.jit
def _row_offsets(b, rows, H, N, BLOCK_H: tl.constexpr):
    """(flat offsets, mask) of the (heads, rows) entries of a contiguous (B, H, N) tensor
    of one value per row (delta; times 2: the statistics, two per row)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    return (b * H + heads) * N + rows[None, :], (heads < H) & (rows < N)[None, :]


@triton.jit
def _row_stats(stats_ptr, b, rows, H, N, BLOCK_H: tl.constexpr):
    """The forward's (row max, log2 of the row sum) per (head, row); +inf and 0 where
    masked, which give probability 0."""
    offs, mask = _row_offsets(b, rows, H, N, BLOCK_H)
    ptrs = stats_ptr + offs * 2
    return (tl.load(ptrs, mask=mask, other=float("inf")),
            tl.load(ptrs + 1, mask=mask, other=0.0))
