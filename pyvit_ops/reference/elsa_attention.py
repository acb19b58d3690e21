"""Reference ELSA local aggregation: plain, differentiable PyTorch.

``y[b, c, o] = sum_t (M[c, t] * A[b, g, t, o] + D[c, t]) * v[b, c, o + delta_t]``
with ``g = c // (C / G)``, ``A`` the softmax of the logits over the ``K*K`` taps
(or the given probabilities), ``delta_t = ((ty - K//2) * d, (tx - K//2) * d)`` and
zero padding: out-of-image taps add nothing and the softmax is *not*
renormalised over the in-image taps, exactly as the official ``elsa_op``
(``unfold`` with zero padding) computes it.

The sum runs tap by tap over shifted views of the zero-padded ``v`` instead of
``unfold``: same result, without the ``K*K``-times larger unfolded copy of ``v``
in the forward. The output has v's memory format. Half-precision inputs are computed in float32 and the result is
cast back; float64 stays float64 (for gradcheck).
"""
import torch
import torch.nn.functional as F

# Shared with the Triton launchers (torch only: importing them loads no Triton).
from pyvit_ops.kernels._common import effective_dilation
from pyvit_ops.kernels._common import elsa_memory_format as output_memory_format


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def elsa_attention(v, attn, ghost_mul=None, ghost_add=None, *, kernel_size=7, dilation=1,
                   apply_softmax=True):
    """ELSA aggregation of ``v`` (B, C, H, W) with ``attn`` (B, G*K*K, H, W).

    ghost_mul / ghost_add: (C, K, K) or None (M = 1 / D = 0). ``attn`` holds logits
    when ``apply_softmax`` (softmax over the K*K taps of each head), else probabilities.
    Inputs are assumed valid (``pyvit_ops.elsa_attention`` checks them).
    """
    B, C, H, W = v.shape
    K, d = kernel_size, effective_dilation(dilation, H, W)
    G = attn.shape[1] // (K * K)
    dtype = _compute_dtype(v.dtype)
    a = attn.to(dtype).view(B, G, K * K, H, W)
    if apply_softmax:
        a = a.softmax(dim=2)
    pad = (K // 2) * d
    vp = F.pad(v.to(dtype), (pad, pad, pad, pad)).view(B, G, C // G, H + 2 * pad, W + 2 * pad)
    mul = None if ghost_mul is None else ghost_mul.to(dtype).reshape(G, C // G, K * K, 1, 1)
    add = None if ghost_add is None else ghost_add.to(dtype).reshape(G, C // G, K * K, 1, 1)
    out = torch.zeros(B, G, C // G, H, W, dtype=dtype, device=v.device)
    for t in range(K * K):
        ty, tx = divmod(t, K)
        v_t = vp[..., ty * d:ty * d + H, tx * d:tx * d + W]
        f_t = a[:, :, t:t + 1]  # (B, G, 1, H, W): shared by the channels of a head
        if mul is not None:
            f_t = f_t * mul[:, :, t]
        if add is not None:
            f_t = f_t + add[:, :, t]
        out = out + f_t * v_t
    return out.view(B, C, H, W).to(v.dtype).contiguous(memory_format=output_memory_format(v))
