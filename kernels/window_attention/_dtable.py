"""The dtable kernel: the sum of the backward's per-program partial dbias into the
relative-position table's gradient, without atomics."""
import triton
import triton.language as tl


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
