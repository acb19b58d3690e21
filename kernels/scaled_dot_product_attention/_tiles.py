"""``@triton.jit`` helpers the SDPA kernels share: program and batch indexing, tile loads
and stores, logits, the forward's row statistics and the probabilities rebuilt from
them."""
import triton
import triton.language as tl

# exp2 is the native instruction: logit differences are scaled to log2 units for it.
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _wide(stride, OFFS64: tl.constexpr):
    """A row (or key) stride, as int64 in the OFFS64 variant so that index x stride
    cannot overflow."""
    if OFFS64:
        stride = tl.cast(stride, tl.int64)
    return stride


@triton.jit
def _batch_ptr(ptr, z1, z2, stride):
    """``ptr`` advanced to batch element (z1, z2) of a tensor of (z1, z2, ...) strides
    ``stride`` (int64 offsets)."""
    return ptr + z1 * stride[0] + z2 * stride[1]


@triton.jit
def _head_tile(idx, n, D, BLOCK_D: tl.constexpr):
    """(head dims, mask of the indices ``idx`` < n, mask of their (idx, head dim) tile)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = idx < n
    return offs_d, mask, mask[:, None] & (offs_d < D)[None, :]


@triton.jit
def _rows_ptrs(base, idx, offs_d, stride, OFFS64: tl.constexpr):
    """Pointers of the (rows ``idx``, head dims ``offs_d``) tile of a (N, D) matrix of
    (z1, z2, row, head dim) strides ``stride``; head-dim offsets stay 32-bit in every
    variant (the ops layer refuses larger ones)."""
    return base + idx[:, None] * _wide(stride[2], OFFS64) + offs_d[None, :] * stride[3]


@triton.jit
def _load_rows(base, idx, offs_d, stride, mask, OFFS64: tl.constexpr):
    """The (rows ``idx``, head dims ``offs_d``) tile of a (N, D) matrix, 0 where masked."""
    return tl.load(_rows_ptrs(base, idx, offs_d, stride, OFFS64), mask=mask, other=0.0)


@triton.jit
def _store_rows(base, idx, offs_d, stride, value, mask, OFFS64: tl.constexpr):
    """Store ``value`` (fp32) into the (rows ``idx``, head dims ``offs_d``) tile."""
    tl.store(_rows_ptrs(base, idx, offs_d, stride, OFFS64), value.to(base.dtype.element_ty),
             mask=mask)


@triton.jit
def _logit_ptrs(base, rows, cols, stride, OFFS64: tl.constexpr):
    """Pointers of a tile of an (Nq, Nk) matrix of (z1, z2, query, key) strides ``stride``
    (the bias, dbias) at query indices ``rows`` and key indices ``cols``, shaped to
    broadcast to the tile."""
    return base + rows * _wide(stride[2], OFFS64) + cols * _wide(stride[3], OFFS64)


@triton.jit
def _rel_pos_index(rows, cols, grid):
    """The row of timm's BEiT relative-position table that logit (``rows``, ``cols``)
    reads (shaped to broadcast to the tile), by arithmetic: ``grid`` = (gh, gw, lead),
    ``lead`` (0 or 1) class tokens before the gh x gw patch tokens. Patch pair (i, j)
    reads row (dy + gh - 1)(2gw - 1) + dx + gw - 1, (dy, dx) = pos(i) - pos(j), which is
    f(i) - f(j) + f(gh - 1, gw - 1) with f(y, x) = y (2gw - 1) + x: one division per
    row and per column, not per logit. The last three rows are class -> patch, patch ->
    class and class -> class."""
    GH = grid[0]
    GW = grid[1]
    LEAD = grid[2]
    i = rows - LEAD
    j = cols - LEAD
    idx = ((i // GW) * (2 * GW - 1) + i % GW) - ((j // GW) * (2 * GW - 1) + j % GW) \
        + (GH - 1) * (2 * GW - 1) + GW - 1
    patch = (2 * GH - 1) * (2 * GW - 1)
    return tl.where(rows < LEAD, tl.where(cols < LEAD, patch + 2, patch),
                    tl.where(cols < LEAD, patch + 1, idx))


@triton.jit
def _bias_ptrs(base, rows, cols, stride, grid, BIAS: tl.constexpr, OFFS64: tl.constexpr):
    """Pointers of the bias read by logits (``rows``, ``cols``): the (Nq, Nk) matrix's
    (``_logit_ptrs``), or with BIAS == 3 the table rows of ``_rel_pos_index`` (``stride``:
    (z1, z2, unused, table row) strides)."""
    if BIAS == 3:
        return base + _rel_pos_index(rows, cols, grid) * stride[3]
    return _logit_ptrs(base, rows, cols, stride, OFFS64)


@triton.jit
def _add_bias(s, ptrs, mask, BIAS: tl.constexpr):
    """Logits ``s`` plus a float bias (BIAS 1 or a gathered table, 3), or -inf where a
    bool mask (2) is False."""
    if BIAS == 1 or BIAS == 3:
        s += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    elif BIAS == 2:
        s = tl.where(tl.load(ptrs, mask=mask, other=1) != 0, s, float("-inf"))
    return s


@triton.jit
def _row_stats(lse_ptr, offs, mask):
    """The forward's (row max, log2 of the row sum) of rows ``offs`` (flat z * Nq + row);
    +inf and 0 where masked, which give probability 0."""
    ptrs = lse_ptr + offs * 2
    return tl.load(ptrs, mask=mask, other=float("inf")), tl.load(ptrs + 1, mask=mask, other=0.0)


@triton.jit
def _probs(s, m, log2_l):
    """exp(s - m) / l from the forward's row statistics (the difference first: no
    overflow near the float32 limit)."""
    return tl.exp2((s - m) * _LOG2E - log2_l)


@triton.jit
def _query_program(Nq, Z2, BLOCK_M: tl.constexpr):
    """(rows, flat batch z, z1, z2) of a forward program. Query blocks of one batch are
    neighbours in launch order: they share K/V in L2."""
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid = tl.program_id(0)
    z = (pid // num_m).to(tl.int64)
    rows = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, z, z // Z2, z % Z2
