"""Reference Swin window attention: plain, vectorised, differentiable PyTorch.

Follows timm's ``SwinTransformerBlock._attn`` + ``WindowAttention`` (timm >= 1.0):

1. roll the grid by ``(-shift_h, -shift_w)``;
2. then pad bottom / right to multiples of the window (padded keys / values are
   ``pad_kv``, zeros when None: what the qkv projection makes of timm's zero padding);
3. partition into windows, attend inside each window with the gathered relative
   position bias, plus ``mask_value`` between tokens of different shift regions,
   the regions being labelled on the *padded* grid as timm's ``get_attn_mask``;
4. un-partition, crop, roll back by ``(+shift_h, +shift_w)``.

The official microsoft/Swin-Transformer pads *before* it rolls, so for grids that
are not multiples of the window its padded tokens sit at other positions and
its results differ from timm's; this operator matches timm.

With ``logit_scale`` it is Swin V2's scaled cosine attention (timm's
``swin_transformer_v2.WindowAttention``): the logits are
``cos(q_i, k_j) * exp(min(logit_scale, log 100))`` (``F.normalize``'s eps 1e-12, padded
keys normalised like any other) plus the table bias and the shift mask; the table then
holds the final bias (timm's ``16 * sigmoid(cpb_mlp(...))``).

Half-precision inputs are computed in float32 (scores, softmax, products) and the
result is cast back; float64 stays float64 (for gradcheck).
"""
import math

import torch
import torch.nn.functional as F

# Swin V2 clamps the logit scale at log(1 / 0.01): at most 100x the cosine.
LOGIT_SCALE_MAX = math.log(100.0)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def relative_position_index(window_size, device=None):
    """(N, N) row of ``rel_pos_bias_table`` for query i, key j of a window, N = wh * ww.

    Index ``(dy + wh - 1) * (2 ww - 1) + (dx + ww - 1)`` with ``(dy, dx)`` the position
    of i minus the position of j, tokens numbered row-major inside the window.
    """
    wh, ww = window_size
    t = torch.arange(wh * ww, device=device)
    ty, tx = t // ww, t % ww
    dy = ty[:, None] - ty[None, :]
    dx = tx[:, None] - tx[None, :]
    return (dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)


def _region_labels(padded, window, shift, device):
    """Shift region of each row (or column) of the padded, rolled grid along one axis.

    timm labels ``[0, P - window)``, ``[P - window, P - shift)`` and ``[P - shift, P)``
    differently; with shift 0 its third slice ``[-0:]`` covers the whole axis, so the
    axis has a single label.
    """
    p = torch.arange(padded, device=device)
    if shift == 0:
        return torch.zeros_like(p)
    return (p >= padded - window).long() + (p >= padded - shift).long()


def _partition(x, window_size):
    """(B, Hp, Wp, heads, D) -> (B, nW, heads, N, D), windows in row-major order."""
    B, Hp, Wp, heads, D = x.shape
    wh, ww = window_size
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, heads, D).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(B, (Hp // wh) * (Wp // ww), heads, wh * ww, D)


def _unpartition(x, window_size, Hp, Wp):
    """Inverse of ``_partition``."""
    B, _, heads, _, D = x.shape
    wh, ww = window_size
    x = x.view(B, Hp // wh, Wp // ww, heads, wh, ww, D).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, Hp, Wp, heads, D)


def _pad(x, Hp, Wp, fill=None):
    """Pad (B, H, W, heads, D) bottom / right to (B, Hp, Wp, ...) with ``fill`` (heads, D)
    or zeros; concatenation keeps the gradient of ``fill``."""
    B, H, W, heads, D = x.shape
    if (Hp, Wp) == (H, W):
        return x
    if fill is None:
        fill = x.new_zeros(heads, D)
    if Wp > W:
        x = torch.cat([x, fill.expand(B, H, Wp - W, heads, D)], dim=2)
    if Hp > H:
        x = torch.cat([x, fill.expand(B, Hp - H, Wp, heads, D)], dim=1)
    return x


def shift_mask(H, W, window_size, shift_size, mask_value=-100.0, *, dtype=torch.float32,
               device=None):
    """(nW, N, N) additive mask of timm's SW-MSA on the padded grid, or None without shift."""
    (wh, ww), (sh, sw) = window_size, shift_size
    if sh == 0 and sw == 0:
        return None
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    label = (_region_labels(Hp, wh, sh, device)[:, None] * 3
             + _region_labels(Wp, ww, sw, device)[None, :])
    label = label.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    differ = label[:, :, None] != label[:, None, :]
    return torch.zeros(differ.shape, dtype=dtype, device=device).masked_fill(differ, mask_value)


def _grid_to_blocks(x, window_size):
    """(B, H, W, heads, D) with the tokens of each grid-partition window (slots n_wh rows
    and n_ww columns apart, timm's ``grid_partition``) moved into one block window:
    token (a * n_wh + i, c * n_ww + j) goes to (i * wh + a, j * ww + c)."""
    B, H, W, heads, D = x.shape
    wh, ww = window_size
    x = x.reshape(B, wh, H // wh, ww, W // ww, heads, D).permute(0, 2, 1, 4, 3, 5, 6)
    return x.reshape(B, H, W, heads, D)


def _blocks_to_grid(x, window_size):
    """Inverse of ``_grid_to_blocks``."""
    B, H, W, heads, D = x.shape
    wh, ww = window_size
    x = x.reshape(B, H // wh, wh, W // ww, ww, heads, D).permute(0, 2, 1, 4, 3, 5, 6)
    return x.reshape(B, H, W, heads, D)


def window_attention(q, k, v, rel_pos_bias_table=None, *, window_size, shift_size=0, scale=None,
                     pad_kv=None, mask_value=-100.0, logit_scale=None, partition="block"):
    """Swin W-MSA / SW-MSA of q, k, v (B, H, W, heads, D) -> (B, H, W, heads, D).

    window_size, shift_size: (h, w) pairs or ints. rel_pos_bias_table:
    ((2 wh - 1)(2 ww - 1), heads) or None. pad_kv: (k_pad, v_pad), each (heads, D), the
    key / value of padded tokens (zeros when None); they are rounded to q's dtype, as
    the projection that produces them in timm would. logit_scale: None, or ``heads``
    values (timm's ``(heads, 1, 1)`` parameter) for Swin V2's cosine attention, which
    takes no ``scale``. partition: "block", or "grid" (MaxViT's grid attention: no shift,
    H and W multiples of the window). Inputs are assumed valid
    (``pyvit_ops.window_attention`` checks them).
    """
    wh, ww = (window_size, window_size) if isinstance(window_size, int) else window_size
    if partition == "grid":
        out = window_attention(*(_grid_to_blocks(t, (wh, ww)) for t in (q, k, v)),
                               rel_pos_bias_table, window_size=(wh, ww), scale=scale,
                               pad_kv=pad_kv, logit_scale=logit_scale)
        return _blocks_to_grid(out, (wh, ww))
    sh, sw = (shift_size, shift_size) if isinstance(shift_size, int) else shift_size
    B, H, W, heads, D = q.shape
    N = wh * ww
    scale = D ** -0.5 if scale is None else scale
    in_dtype, dtype = q.dtype, _compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    pad_k = pad_v = None
    if pad_kv is not None:
        pad_k, pad_v = (p.to(in_dtype).to(dtype) for p in pad_kv)

    if sh or sw:
        q, k, v = (torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) for t in (q, k, v))
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    q, k, v = _pad(q, Hp, Wp), _pad(k, Hp, Wp, pad_k), _pad(v, Hp, Wp, pad_v)
    q, k, v = (_partition(t, (wh, ww)) for t in (q, k, v))  # (B, nW, heads, N, D)

    if logit_scale is None:
        attn = (q * scale) @ k.transpose(-2, -1)  # (B, nW, heads, N, N)
    else:
        gain = logit_scale.to(dtype).reshape(heads, 1, 1).clamp(max=LOGIT_SCALE_MAX).exp()
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * gain
    if rel_pos_bias_table is not None:
        index = relative_position_index((wh, ww), device=q.device)
        bias = rel_pos_bias_table.to(dtype)[index.reshape(-1)].view(N, N, heads).permute(2, 0, 1)
        attn = attn.add_(bias)  # in place: the product's backward does not need it
    mask = shift_mask(H, W, (wh, ww), (sh, sw), mask_value, dtype=dtype, device=q.device)
    if mask is not None:
        attn = attn.add_(mask[:, None])
    out = attn.softmax(dim=-1) @ v

    out = _unpartition(out, (wh, ww), Hp, Wp)[:, :H, :W]
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out.to(in_dtype)
