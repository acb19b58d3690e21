"""Dropout: the keep mask every SDPA kernel draws (a counter-based hash of the element's
position, so the forward, both backward kernels and ``dropout_keep_mask`` agree without
storing it), and the kernel that materialises it for ``dropout_keep_mask``."""
import triton
import triton.language as tl


@triton.jit
def _dropout_keep(seed_ptr, z, offsets, dropout_p):
    """Keep mask of the elements ``offsets`` (= row * Nk + col) of batch ``z``: the first
    Philox-4x32 output for counter (offset, z, seed low, seed high) and key 0 against
    the threshold p * 2**32. 32-bit counters keep the hash's register state small."""
    c0 = offsets.to(tl.uint32, bitcast=True)
    zero = c0 * 0
    # The seed goes in the counter, not the key: a loaded seed is not a uniform value,
    # so a key derived from it would hold its whole schedule (~20 values) in vector
    # registers across the loops; a constant key folds into the instructions.
    seed = tl.load(seed_ptr)
    r, _, _, _ = tl.philox(0, c0, zero + z.to(tl.uint32), zero + seed.to(tl.uint32),
                           zero + (seed >> 32).to(tl.uint32))
    # (the largest fp32 below 2**32: p = 1 gets scale 0 anyway)
    threshold = tl.minimum(dropout_p * 4294967296.0, 4294967040.0).to(tl.uint32)
    return r >= threshold


@triton.jit
def _dropped(x, keep, dropout_scale):
    """``x`` through inverted dropout: scaled by 1 / (1 - p) where kept, else 0."""
    return tl.where(keep, x * dropout_scale, 0.0)


@triton.jit
def _keep_mask(seed_ptr, z, offsets, dropout_p, DROPOUT: tl.constexpr):
    """The dropout keep mask of a tile (None without dropout)."""
    keep = None
    if DROPOUT:
        keep = _dropout_keep(seed_ptr, z, offsets, dropout_p)
    return keep


@triton.jit
def _scaled_dot_product_attention_dropout_mask_kernel(keep_ptr, seed_ptr, dropout_p, numel, nq_nk,
                                                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(seed_ptr, offs // nq_nk, (offs % nq_nk).to(tl.int32), dropout_p)
    tl.store(keep_ptr + offs, keep.to(tl.uint8), mask=offs < numel)
