"""Reference scaled dot-product attention: plain, differentiable PyTorch.

Semantics are those of ``torch.nn.functional.scaled_dot_product_attention`` with
``attn_mask``: a float ``attn_bias`` is added to the scaled logits, a bool one
keeps the logits where it is True and sets the others to -inf. A query row whose
every logit is -inf (all keys masked) gives a zero output row and zero gradients,
as torch does (its math path uses a "safe" softmax), not NaN.
"""
import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


def dropout_scale(dropout_p):
    """Factor applied to kept probabilities: 1 / (1 - p); 0 when p == 1 (all dropped)."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _safe_softmax(s):
    # Shift by the row max (detached: softmax is shift-invariant, so no gradient is
    # lost); a row of -inf has max -inf, shifted by 0 instead, and its zero sum is
    # divided by 1 so the row is 0 instead of 0/0.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom == 0, torch.ones_like(denom), denom)


def scaled_dot_product_attention(q, k, v, attn_bias=None, *, scale=None, dropout_p=0.0,
                                 dropout_mask=None):
    """``softmax(q @ k^T * scale + attn_bias) @ v`` over any leading batch dims.

    q: ``(*batch, Nq, D)``, k and v: ``(*batch, Nk, D)``; ``scale`` defaults to
    ``D ** -0.5``. Half inputs are computed in float32 and the result is returned
    in the input dtype. ``dropout_mask`` (bool, True = keep, broadcastable to
    ``(*batch, Nq, Nk)``) applies a given dropout pattern (tests pass the kernel's)
    through the plain composition ``softmax(q k^T * scale + bias) @ v``; without it
    torch's ``scaled_dot_product_attention`` computes the same thing (drawing its own
    mask when ``dropout_p > 0``), and the tests check the two agree. Kept
    probabilities are scaled by ``1 / (1 - dropout_p)``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute = torch.float32 if q.dtype in HALF_DTYPES else q.dtype
    if dropout_mask is None:
        # torch's own implementation of these semantics: on CPU its flash path keeps
        # no (Nq, Nk) tensor for the backward, so the CPU path is faster and smaller
        # than the plain composition below (benchmarks/results).
        if attn_bias is not None and attn_bias.dtype != torch.bool:
            attn_bias = attn_bias.to(compute)
        out = F.scaled_dot_product_attention(q.to(compute), k.to(compute), v.to(compute),
                                             attn_mask=attn_bias, dropout_p=dropout_p,
                                             scale=scale)
        return out.to(q.dtype)
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            s = s.masked_fill(~attn_bias, float("-inf"))
        else:
            s = s + attn_bias.to(compute)
    p = _safe_softmax(s) * dropout_mask.to(compute) * dropout_scale(dropout_p)
    return torch.matmul(p, v.to(compute)).to(q.dtype)
