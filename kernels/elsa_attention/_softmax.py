"""The fused softmax over the K*K taps, shared by the ELSA kernels: a pixel's
normaliser from its logits, and a tap's probability from it."""
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x * log2(e))


@triton.jit
def _softmax_prob(l, m, log_s):
    """exp(l - m - log_s) in base 2, for the normaliser ``(m, log_s)`` of
    ``_log_normaliser``. The differences come first: l * log2(e) overflows fp32 for
    logits near +-finfo.max; l - m does not for finite logits of one softmax, and m +
    log_s would round log_s away."""
    return tl.exp2(((l - m) - log_s) * _LOG2E)


@triton.jit
def _log_normaliser(attn_base, attn_off, ok, stride_attn_c, K: tl.constexpr):
    """log(sum_t exp(l_t)) per pixel as (max m, log(sum_t exp(l_t - m))), kept apart:
    their fp32 sum loses the second for |m| > 2**26. A max pass, then a sum pass over
    the (cache-hot) logits, one exp2 per tap (an online max / sum needs two). Row by
    row, so that the compiler unrolls K loads at a time, not K*K (registers)."""
    m = tl.full(ok.shape, float("-inf"), tl.float32)
    for ty in range(K):
        for tx in range(K):
            # Lanes outside the image read 0, so that their statistics stay finite.
            l = tl.load(attn_base + (attn_off + (ty * K + tx) * stride_attn_c), mask=ok, other=0.0)
            m = tl.maximum(m, l.to(tl.float32))
    s = tl.zeros(ok.shape, tl.float32)
    for ty in range(K):
        for tx in range(K):
            l = tl.load(attn_base + (attn_off + (ty * K + tx) * stride_attn_c), mask=ok, other=0.0)
            s += _softmax_prob(l.to(tl.float32), m, 0.0)
    return m, tl.log(s)
