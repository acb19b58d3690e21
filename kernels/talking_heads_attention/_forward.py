"""The forward kernel: one program per (batch, query block) holding every head. Pass 1
forms the row statistics of every mixed head, pass 2 the probabilities, their mix and
the products with V."""
import triton
import triton.language as tl

from ..scaled_dot_product_attention._tiles import _LOG2E
from ._tiles import (_head_vector, _load_tile, _logits, _mix, _probs, _program, _row_offsets,
                     _store_tile)


@triton.jit
def _talking_heads_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, l_ptr, bl_ptr, w_ptr, bw_ptr, out_ptr, stats_ptr, sm_scale,
        stride_q, stride_k, stride_v, stride_out, H, N, D,
        PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, rows = _program(N, BLOCK_M)
    bl = _head_vector(bl_ptr, H, BLOCK_H)

    m_i = tl.full([BLOCK_H, BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H, BLOCK_M], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        _, s = _logits(q_ptr, k_ptr, l_ptr, bl, b, rows, cols, sm_scale, stride_q, stride_k,
                       H, N, D, PRECISION, BLOCK_H, BLOCK_D)
        # Key 0 is in the first block: every row's max is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 2))
        p = tl.exp2((s - m_new[:, :, None]) * _LOG2E)
        l_i = l_i * tl.exp2((m_i - m_new) * _LOG2E) + tl.sum(p, 2)
        m_i = m_new
    log2_l = tl.log2(l_i)

    bw = _head_vector(bw_ptr, H, BLOCK_H)
    acc = tl.zeros([BLOCK_H, BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        _, s = _logits(q_ptr, k_ptr, l_ptr, bl, b, rows, cols, sm_scale, stride_q, stride_k,
                       H, N, D, PRECISION, BLOCK_H, BLOCK_D)
        # A = mix_W(P) + b_w; at the padding keys V is 0, so A's b_w there adds nothing.
        a = _mix(_probs(s, m_i, log2_l), w_ptr, H, False) + bw[:, None, None]
        v = _load_tile(v_ptr, b, cols, H, N, D, stride_v, BLOCK_H, BLOCK_D, False)
        acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)

    _store_tile(out_ptr, b, rows, H, N, D, stride_out, acc, BLOCK_H, BLOCK_D)
    offs, mask = _row_offsets(b, rows, H, N, BLOCK_H)
    tl.store(stats_ptr + offs * 2, m_i, mask=mask)
    tl.store(stats_ptr + offs * 2 + 1, log2_l, mask=mask)
