"""The dtable kernel: the dq kernel's per-split dS sums, gathered into the gradient of
timm's BEiT relative-position table without atomics."""
import triton
import triton.language as tl


@triton.jit
def _scaled_dot_product_attention_dtable_kernel(
        dbias_ptr, dtable_ptr, stride_dbias, SPLITS, ROWS, GH, GW, LEAD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """dtable[g, r]: the sum over the splits of the dS partials of head group g over the
    logits that read table row r (``_rel_pos_index``). A patch row r is an offset
    (dy, dx) = query - key; its pairs are enumerated here in row-major query order (no
    index tensor to read). With a class token (LEAD) the last three rows are its row
    (0, 1 + p), its column (1 + p, 0) and (0, 0). Every row has at most gh * gw pairs and
    every partial element belongs to one row, so each is read once; the splits are summed
    in a fixed order (deterministic). ``stride_dbias``: the partials' (split, head group,
    query) strides. Head groups are grid axis 0: axis 1 stops at 65535."""
    g = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)[None, :]
    patch = (2 * GH - 1) * (2 * GW - 1)
    dy = r // (2 * GW - 1) - (GH - 1)
    dx = r % (2 * GW - 1) - (GW - 1)
    nx = GW - tl.abs(dx)  # >= 1 for every r
    count = (GH - tl.abs(dy)) * nx
    query = (p // nx[:, None] + tl.maximum(dy, 0)[:, None]) * GW \
        + p % nx[:, None] + tl.maximum(dx, 0)[:, None]
    row = LEAD + query
    col = row - (dy * GW + dx)[:, None]
    if LEAD:
        cls_row = (r == patch)[:, None]
        cls_col = (r == patch + 1)[:, None]
        cls_cls = (r == patch + 2)[:, None]
        row = tl.where(cls_row | cls_cls, 0, tl.where(cls_col, 1 + p, row))
        col = tl.where(cls_col | cls_cls, 0, tl.where(cls_row, 1 + p, col))
        count = tl.where(r < patch, count, tl.where(r == patch + 2, 1, GH * GW))
    real = (r < ROWS)[:, None] & (p < count[:, None])
    offs = row * stride_dbias[2] + col
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    base = dbias_ptr + g * stride_dbias[1]
    for _ in range(SPLITS):
        acc += tl.sum(tl.load(base + offs, mask=real, other=0.0), axis=1)
        base += stride_dbias[0]
    tl.store(dtable_ptr + g * ROWS + r, acc.to(dtable_ptr.dtype.element_ty), mask=r < ROWS)
