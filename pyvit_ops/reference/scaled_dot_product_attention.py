"""Reference scaled dot-product attention: plain, differentiable PyTorch.

Semantics are those of ``torch.nn.functional.scaled_dot_product_attention`` with
``attn_mask``: a float ``attn_bias`` is added to the scaled logits, a bool one
keeps the logits where it is True and sets the others to -inf. A query row whose
every logit is -inf (all keys masked) gives a zero output row and zero gradients,
as torch does (its math path uses a "safe" softmax), not NaN.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


def rel_pos_rows(gh, gw, lead):
    """Rows of the relative-position table of a gh x gw grid after ``lead`` (0 or 1) class
    tokens: one per offset, three more for the class token."""
    return (2 * gh - 1) * (2 * gw - 1) + 3 * lead


def rel_pos_index(grid, n, device=None):
    """The ``(n, n)`` rows of timm's BEiT relative-position table that the logits read,
    for a ``grid`` = (gh, gw) of patch tokens after ``n - gh * gw`` (0 or 1) class tokens
    (timm's ``gen_relative_position_index`` with a class token): patch pair (i, j) reads
    row (dy + gh - 1)(2gw - 1) + dx + gw - 1, (dy, dx) = pos(i) - pos(j); the last three
    rows are class -> patch, patch -> class and class -> class."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device),
                            indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    patch = (ys[:, None] - ys[None, :] + gh - 1) * (2 * gw - 1) + xs[:, None] - xs[None, :] \
        + gw - 1
    if n == gh * gw:
        return patch
    rows = rel_pos_rows(gh, gw, 0)
    index = torch.full((n, n), rows, dtype=patch.dtype, device=device)
    index[1:, 0] = rows + 1
    index[0, 0] = rows + 2
    index[1:, 1:] = patch
    return index


def rel_pos_bias(table, grid, n):
    """The dense ``(heads, n, n)`` bias of a ``(T, heads)`` relative-position table
    (``rel_pos_index``), differentiable in the table."""
    return table[rel_pos_index(grid, n, table.device)].permute(2, 0, 1)


def scaled_dot_product_attention(q, k, v, attn_bias=None, *, scale=None, dropout_p=0.0,
                                 dropout_mask=None, rel_pos_table=None, rel_pos_grid=None):
    """``softmax(q @ k^T * scale + attn_bias) @ v`` over any leading batch dims.

    q: ``(*batch, Nq, D)``, k and v: ``(*batch, Nk, D)``; ``scale`` defaults to
    ``D ** -0.5``. Half inputs are computed in float32 and the result is returned
    in the input dtype. ``dropout_mask`` (bool, True = keep, broadcastable to
    ``(*batch, Nq, Nk)``) applies a given dropout pattern (tests pass the kernel's)
    through the plain composition ``softmax(q k^T * scale + bias) @ v``; without it
    torch's ``scaled_dot_product_attention`` computes the same thing (drawing its own
    mask when ``dropout_p > 0``), and the tests check the two agree. Kept
    probabilities are scaled by ``1 / (1 - dropout_p)``. ``rel_pos_table`` (T, heads)
    with ``rel_pos_grid`` (gh, gw) is the bias ``rel_pos_bias`` instead of ``attn_bias``.
    """
    if rel_pos_table is not None:
        attn_bias = rel_pos_bias(rel_pos_table, rel_pos_grid, q.shape[-2])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute = torch.float32 if q.dtype in HALF_DTYPES else q.dtype
    if dropout_mask is None and dropout_p == 0.0 and attn_bias is not None \
            and attn_bias.dtype != torch.bool and attn_bias.requires_grad:
        # torch's CPU attention leaves its flash path for a bias that requires grad.
        return _biased_attention(q.to(compute), k.to(compute), v.to(compute),
                                attn_bias.to(compute), scale).to(q.dtype)
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


def _biased_attention(q, k, v, bias, scale):
    """``softmax(q @ k^T * scale + bias) @ v`` with a float ``bias`` broadcastable to the
    scores that may require grad (its gradient comes back in its own shape); a row whose
    logits are all -inf gives zeros.

    Holds two (Nq, Nk) tensors at most, forward and backward, where the autograd
    composition holds three in its backward (probabilities, their gradient and the
    scores' gradient). No double backward, as the kernels.
    """
    return _BiasedAttention.apply(q, k, v, bias, scale)


class _BiasedAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        q = q * scale  # (Nq, D) instead of (Nq, Nk) multiplications
        s = torch.matmul(q, k.transpose(-1, -2)).add_(bias)
        # A row of -inf would make softmax 0/0: it is clamped to a finite row (other rows
        # keep their exact zeros) whose probabilities are then zeroed, which zeroes its
        # output and gradients too.
        dead = torch.isneginf(s.amax(dim=-1, keepdim=True))
        p = torch.softmax(s.clamp_min_(torch.finfo(s.dtype).min), dim=-1).mul_(~dead)
        out = torch.matmul(p, v)
        ctx.save_for_backward(q, k, v, p, out)
        ctx.scale, ctx.bias_shape = scale, bias.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, p, out = ctx.saved_tensors
        need = ctx.needs_input_grad
        # Softmax backward in place in the buffer of dp: ds = p * (dp - rowsum(dout * out)).
        ds = torch.matmul(dout, v.transpose(-1, -2))
        ds.sub_((dout * out).sum(dim=-1, keepdim=True)).mul_(p)
        dq = torch.matmul(ds, k).mul_(ctx.scale) if need[0] else None
        dk = torch.matmul(ds.transpose(-1, -2), q) if need[1] else None
        dbias = ds.sum_to_size(ctx.bias_shape) if need[3] else None
        # Released before dv is made, unless it is the bias gradient.
        del ds
        dv = torch.matmul(p.transpose(-1, -2), dout) if need[2] else None
        return dq, dk, dv, dbias, None
