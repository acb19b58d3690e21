"""ViT / DeiT / CaiT attention modules on pyvit_ops.scaled_dot_product_attention.

Parameter and submodule names are timm's (``qkv``, ``q_norm``, ``k_norm``, ``norm``,
``proj``; CaiT's ``q``, ``k``, ``v``), so timm checkpoints load unchanged.
"""
import torch
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.nn import _timm
from pyvit_ops.ops.scaled_dot_product_attention import (
    scaled_dot_product_attention, scaled_dot_product_attention_qkvpacked)

# What from_timm reads of a timm Attention / CaiT ClassAttn.
_ATTENTION_PARTS = ("num_heads", "head_dim", "attn_dim", "scale", "qkv", "q_norm", "k_norm",
                    "attn_drop", "norm", "proj", "proj_drop")
_CLASS_ATTN_PARTS = ("num_heads", "scale", "q", "k", "v", "attn_drop", "proj", "proj_drop")


class Attention(nn.Module):
    """Multi-head self attention, a drop-in for ``timm.layers.Attention``.

    ``forward(x: (B, N, C), attn_mask=None, is_causal=False) -> (B, N, C)``. q, k and v
    stay strided views of the one qkv projection; the kernels read them in place and,
    without ``qk_norm``, write its gradient in place too.

    Constructor: ``dim`` channels, ``num_heads`` heads of ``attn_head_dim`` (default
    ``dim // num_heads``) channels; ``qkv_bias``, ``proj_bias``; ``qk_norm`` applies
    ``norm_layer(head_dim)`` to q and k; ``attn_drop`` is the attention dropout
    (``dropout_p`` of the operator, in training only); ``backend`` is passed to
    ``pyvit_ops.scaled_dot_product_attention``. Pass arguments by keyword: the
    positional order differs from timm's. ``from_timm`` wraps an existing timm module
    instead, keeping the options this constructor lacks (``scale_norm``, ``dim_out``).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, proj_bias=True,
                 attn_drop=0.0, proj_drop=0.0, norm_layer=nn.LayerNorm, attn_head_dim=None,
                 backend=None):
        super().__init__()
        head_dim = attn_head_dim or dim // num_heads
        if attn_head_dim is None and dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module, backend=None):
        """Wrap a timm ``Attention``, sharing its submodules (and so its parameters and
        state_dict keys). Raises ValueError for timm's gated attention (``gated=True``)."""
        if getattr(module, "gate", None) is not None:
            raise ValueError("module: gated timm Attention is not supported")
        return _timm.share(cls, module, "timm Attention", _ATTENTION_PARTS, backend)

    def forward(self, x, attn_mask=None, is_causal=False):
        """``x``: ``(B, N, dim)`` -> ``(B, N, dim)``. ``attn_mask``: bool (True = attend)
        or float (added to the logits), broadcastable to ``(B, num_heads, N, N)``, as in
        timm / torch. ``is_causal=True`` (with ``attn_mask=None``) masks keys after the
        query."""
        _checks.check_features("x", x, 3, self.qkv.in_features, "(B, N, C)")
        B, N, _ = x.shape
        if is_causal:
            if attn_mask is not None:
                raise ValueError("attn_mask: must be None when is_causal=True (as in torch SDPA)")
            attn_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        kwargs = dict(scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
                      backend=self.backend)
        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
            # Packed: the kernels write the projection's gradient in place (no stack).
            x = scaled_dot_product_attention_qkvpacked(qkv, attn_mask, **kwargs)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            x = scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask,
                                             **kwargs)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class _CaitAttention(nn.Module):
    """What CaiT's attention modules share with timm's: ``num_heads``, ``scale``,
    ``backend``, ``attn_drop``, ``proj`` and ``proj_drop``; ``from_timm`` wraps a timm
    module of the subclass's kind (``_TIMM``: its name in errors, the parts shared)."""

    _TIMM = ("", ())

    def __init__(self, dim, num_heads, attn_drop, proj_drop, backend):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.backend = backend
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module, backend=None):
        """Wrap the timm module, sharing its submodules (and so its parameters)."""
        return _timm.share(cls, module, *cls._TIMM, backend)


class ClassAttn(_CaitAttention):
    """CaiT class attention (the class token attends to all tokens: Nq = 1),
    a drop-in for ``timm.models.cait.ClassAttn`` with its parameter names (``q``,
    ``k``, ``v``, ``proj``).

    ``forward(x: (B, N, dim)) -> (B, 1, dim)``: the updated class token ``x[:, 0]``.
    Constructor arguments are timm's; ``backend`` is passed to
    ``pyvit_ops.scaled_dot_product_attention``.
    """

    _TIMM = ("timm ClassAttn", _CLASS_ATTN_PARTS)

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0,
                 backend=None):
        super().__init__(dim, num_heads, attn_drop, proj_drop, backend)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x):
        """``x``: ``(B, N, dim)``, class token first -> ``(B, 1, dim)``."""
        _checks.check_features("x", x, 3, self.q.in_features, "(B, N, C)")
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x[:, 0]).reshape(B, 1, h, C // h).transpose(1, 2)
        k = self.k(x).reshape(B, N, h, C // h).transpose(1, 2)
        v = self.v(x).reshape(B, N, h, C // h).transpose(1, 2)
        x_cls = scaled_dot_product_attention(
            q, k, v, scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
            backend=self.backend)
        x_cls = x_cls.transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(x_cls))
