"""What both pooling kernels use: the window geometry ``Pool`` and the ``@triton.jit``
helpers for the program's tile and the in-image tap count of a window."""
from typing import NamedTuple

import triton
import triton.language as tl


class Pool(NamedTuple):
    """The pooling window, a constexpr of the kernels: kernel (KH, KW), stride (SH, SW)
    and padding (PH, PW)."""
    KH: int
    KW: int
    SH: int
    SW: int
    PH: int
    PW: int


@triton.jit
def program_tile(C, H, W, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr):
    """(b, c, h, w, in-tensor mask) of this program's tile; c, h, w broadcast to a
    3-D tile whose last axis is the contiguous one of the layout."""
    pid = tl.program_id(0)
    n_wb = tl.cdiv(W, BLOCK_W)
    n_hb = tl.cdiv(H, BLOCK_H)
    n_cb = tl.cdiv(C, BLOCK_C)
    # W blocks vary fastest: neighbouring programs share their window halos in L2.
    wb = pid % n_wb
    hb = (pid // n_wb) % n_hb
    cb = (pid // (n_wb * n_hb)) % n_cb
    b = pid // (n_wb * n_hb * n_cb)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    if CHANNELS_LAST:  # tile (H, W, C)
        c, h, w = c[None, None, :], h[:, None, None], w[None, :, None]
    else:  # tile (C, H, W)
        c, h, w = c[:, None, None], h[None, :, None], w[None, None, :]
    return b, c, h, w, (c < C) & (h < H) & (w < W)


@triton.jit
def taps_in_image(start, K: tl.constexpr, size):
    """How many of the window's taps [start, start + K) lie in [0, size); >= 1."""
    return tl.maximum(tl.minimum(start + K, size) - tl.maximum(start, 0), 1)
