"""PVT v2 and Twins spatial-reduction attention on pyvit_ops.scaled_dot_product_attention."""
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.nn import _timm
from pyvit_ops.ops.scaled_dot_product_attention import scaled_dot_product_attention

# What from_timm reads of a timm pvt_v2.Attention / twins.GlobalSubSampleAttn (``pool``
# and ``act`` are PVT's only: None on Twins and on PVT without linear attention).
_TIMM_PARTS = ("num_heads", "scale", "q", "kv", "sr", "norm", "attn_drop", "proj", "proj_drop")


class SpatialReductionAttention(nn.Module):
    """Spatial-reduction attention: every token attends to a reduced map, a drop-in for
    timm's ``pvt_v2.Attention`` (both ``linear_attn`` settings) and
    ``twins.GlobalSubSampleAttn``, made by ``from_timm`` from one of them.

    ``forward(x: (B, N, dim), feat_size: (H, W)) -> (B, N, dim)``: q is ``q(x)``; k, v are
    ``kv`` of the reduced tokens, which stay in PyTorch as in timm: ``sr`` (a strided
    convolution, sr_ratio > 1) then ``norm``; PVT's linear variant first pools the map to
    7x7 (``pool``), then ``sr`` (1x1), ``norm`` and ``act``; with sr_ratio 1 the tokens
    themselves. The attention (``N`` queries, ``Nk`` keys) is one
    ``pyvit_ops.scaled_dot_product_attention`` call on strided views of the projections,
    with ``attn_drop``'s dropout in training. Submodule names are timm's, so checkpoints
    load.
    """

    @classmethod
    def from_timm(cls, module, backend=None):
        """Wrap a timm ``pvt_v2.Attention`` or ``twins.GlobalSubSampleAttn``, sharing its
        submodules (and so its parameters and state_dict keys)."""
        return _timm.share(cls, module, "timm pvt_v2.Attention or twins.GlobalSubSampleAttn",
                           _TIMM_PARTS, backend, pool=getattr(module, "pool", None),
                           act=getattr(module, "act", None))

    def _reduced(self, x, feat_size):
        """The tokens k and v are projected from: ``(B, Nk, dim)``."""
        if self.sr is None:
            return x
        B, _, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *feat_size)
        if self.pool is not None:
            x = self.pool(x)
        x = self.norm(self.sr(x).flatten(2).transpose(1, 2))
        return x if self.act is None else self.act(x)

    def forward(self, x, feat_size):
        """``x``: ``(B, N, dim)`` tokens of an ``feat_size = (H, W)`` map, ``N = H * W``
        -> ``(B, N, dim)``."""
        _checks.check_features("x", x, 3, self.q.in_features, "(B, N, C)")
        B, N, C = x.shape
        heads = self.num_heads
        q = self.q(x).view(B, N, heads, -1).transpose(1, 2)
        k, v = self.kv(self._reduced(x, feat_size)).view(B, -1, 2, heads, C // heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        x = scaled_dot_product_attention(
            q, k, v, scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
            backend=self.backend)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
