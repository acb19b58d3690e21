"""CaiT's talking-heads self attention on pyvit_ops.talking_heads_attention.

Parameter and submodule names are timm's (``qkv``, ``proj_l``, ``proj_w``, ``proj``),
so timm checkpoints load unchanged.
"""
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.nn.attention import _CaitAttention
from pyvit_ops.ops.talking_heads_attention import talking_heads_attention
from pyvit_ops.reference import talking_heads_attention as reference

# What from_timm reads of a timm TalkingHeadAttn.
_PARTS = ("num_heads", "scale", "qkv", "attn_drop", "proj", "proj_l", "proj_w", "proj_drop")


class TalkingHeadsAttention(_CaitAttention):
    """Talking-heads attention, a drop-in for ``timm.models.cait.TalkingHeadAttn``
    (CaiT's self-attention blocks): heads mixed by ``proj_l`` before the softmax and by
    ``proj_w`` after it, in one fused operator that keeps no (B, heads, N, N) tensor.

    ``forward(x: (B, N, dim)) -> (B, N, dim)``; q, k and v stay strided views of the one
    qkv projection. Constructor arguments are timm's; ``backend`` is passed to
    ``pyvit_ops.talking_heads_attention``. In training with ``attn_drop`` > 0 the module
    runs timm's arithmetic (the reference) with that dropout on the mixed attention: the
    kernels have no attention dropout.
    """

    _TIMM = ("timm TalkingHeadAttn", _PARTS)

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0,
                 backend=None):
        super().__init__(dim, num_heads, attn_drop, proj_drop, backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)

    def forward(self, x):
        """``x``: ``(B, N, dim)`` -> ``(B, N, dim)``."""
        _checks.check_features("x", x, 3, self.qkv.in_features, "(B, N, C)")
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        mixes = (self.proj_l.weight, self.proj_l.bias, self.proj_w.weight, self.proj_w.bias)
        if self.training and self.attn_drop.p > 0.0:
            x = reference.talking_heads_attention(q, k, v, *mixes, scale=self.scale,
                                                  dropout_p=self.attn_drop.p)
        else:
            x = talking_heads_attention(q, k, v, *mixes, scale=self.scale, backend=self.backend)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
