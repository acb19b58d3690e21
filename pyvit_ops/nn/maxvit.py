"""MaxViT block (window) and grid attention on pyvit_ops.window_attention."""
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.nn import _timm
from pyvit_ops.ops.window_attention import window_attention, window_attention_qkvpacked

# What from_timm reads of a timm maxxvit.AttentionCl.
_TIMM_PARTS = ("num_heads", "dim_head", "head_first", "scale", "qkv", "rel_pos", "attn_drop",
               "proj", "proj_drop")


def bias_table(rel_pos, num_heads):
    """timm's relative position module ``rel_pos`` (``RelPosBias``, ``RelPosBiasTf`` or
    ``RelPosMlp``, without prefix tokens) as the ``((2 wh - 1)(2 ww - 1), heads)`` table of
    ``pyvit_ops.window_attention`` (row ``(dy + wh - 1)(2 ww - 1) + dx + ww - 1`` for query
    minus key ``(dy, dx)``), differentiable; None for ``rel_pos=None``. Raises ValueError for
    another module."""
    from timm.layers import RelPosBias, RelPosBiasTf, RelPosMlp

    if rel_pos is None:
        return None
    if getattr(rel_pos, "prefix_tokens", 0):
        raise ValueError("rel_pos: expected no prefix tokens (a class token has no place in "
                         "a window)")
    if isinstance(rel_pos, RelPosBias):
        return rel_pos.relative_position_bias_table  # Swin's layout and index
    if isinstance(rel_pos, RelPosBiasTf):
        # (heads, 2 wh - 1, 2 ww - 1) indexed by key minus query: flipped, it is query minus key.
        return rel_pos.relative_position_bias_table.flip(1, 2).permute(1, 2, 0).reshape(
            -1, num_heads)
    if isinstance(rel_pos, RelPosMlp):
        # The MLP's output over the (2 wh - 1, 2 ww - 1) offsets, which timm gathers with
        # Swin's index; the activation and gain act per entry, so before the gather too.
        table = rel_pos.bias_act(rel_pos.mlp(rel_pos.rel_coords_log).view(-1, num_heads))
        return table if rel_pos.bias_gain is None else rel_pos.bias_gain * table
    raise ValueError(f"rel_pos: expected timm's RelPosBias, RelPosBiasTf or RelPosMlp, got "
                     f"{type(rel_pos).__name__}")


class PartitionAttention(nn.Module):
    """MaxViT / MaxxViT block or grid attention (windows with a relative position bias),
    a drop-in for the ``attn`` (timm ``maxxvit.AttentionCl``) of a channels-last
    ``PartitionAttentionCl`` block, made by ``from_timm``.

    ``forward(x: (B, H, W, dim), window_size, partition="block") -> (B, H, W, dim)``: the
    qkv projection, the partition into ``window_size`` windows (``"block"``: adjacent
    tokens; ``"grid"``: tokens strided across the map, timm's ``grid_partition``),
    attention with the bias and the reverse as one fused ``pyvit_ops.window_attention``
    call (no partitioned copy), then ``proj``. H and W must be multiples of the window,
    as timm asserts. The bias of ``rel_pos`` (any of
    timm's ``RelPosBias``, ``RelPosBiasTf``, ``RelPosMlp``) becomes the operator's table
    in PyTorch (``bias_table``), its gradient flowing back to timm's parameters. Both qkv
    channel orders (``head_first``) are read in place. Submodule names are timm's, so
    checkpoints load.
    """

    @classmethod
    def from_timm(cls, module, backend=None):
        """Wrap a timm ``maxxvit.AttentionCl``, sharing its submodules (and so its
        parameters). Raises ValueError for attention dropout (the fused window operator
        has none) or a relative position module ``bias_table`` cannot read."""
        _checks.check_module("module", module, "timm AttentionCl", _TIMM_PARTS)
        if module.attn_drop.p:
            raise ValueError(f"module: attn_drop={module.attn_drop.p} is not supported")
        bias_table(module.rel_pos, module.num_heads)
        return _timm.share(cls, module, "timm AttentionCl", _TIMM_PARTS, backend)

    def forward(self, x, window_size, partition="block"):
        """``x``: ``(B, H, W, dim)`` grid, H and W multiples of ``window_size`` (int or
        ``(h, w)``) -> ``(B, H, W, dim)``; ``partition``: "block" or "grid"."""
        _checks.check_features("x", x, 4, self.qkv.in_features, "(B, H, W, C)")
        B, H, W, _ = x.shape
        wh, ww = _checks.pair("window_size", window_size)
        if H % wh or W % ww:
            raise ValueError(f"x: expected H, W multiples of the window {(wh, ww)} (timm "
                             f"partitions without padding), got {(H, W)}")
        heads, D = self.num_heads, self.dim_head
        kwargs = dict(window_size=(wh, ww), scale=self.scale, partition=partition,
                      backend=self.backend)
        table = bias_table(self.rel_pos, heads)
        if self.head_first:  # channels (heads, 3, D): strided q, k, v views
            q, k, v = self.qkv(x).view(B, H, W, heads, 3, D).unbind(4)
            x = window_attention(q, k, v, table, **kwargs)
        else:
            x = window_attention_qkvpacked(self.qkv(x).view(B, H, W, 3, heads, D), table,
                                           **kwargs)
        return self.proj_drop(self.proj(x.reshape(B, H, W, heads * D)))

