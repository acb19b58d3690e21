"""ViT / DeiT / CaiT attention modules on pyvit_ops.scaled_dot_product_attention.

Parameter and submodule names are timm's (``qkv``, ``q_norm``, ``k_norm``, ``norm``,
``proj``; CaiT's ``q``, ``k``, ``v``), so timm checkpoints load unchanged.
"""
import torch
from torch import nn

from pyvit_ops.ops.scaled_dot_product_attention import scaled_dot_product_attention


class Attention(nn.Module):
    """Multi-head self attention, a drop-in for ``timm.layers.Attention``.

    ``forward(x: (B, N, C), attn_mask=None, is_causal=False) -> (B, N, C)``. q, k and v stay strided
    views of the one qkv projection; the kernels read them in place.
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
        """Wrap a timm ``Attention``, sharing its submodules (and so its parameters)."""
        if getattr(module, "gate", None) is not None:
            raise ValueError("module: gated timm Attention is not supported")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("num_heads", "head_dim", "attn_dim", "scale"):
            setattr(new, name, getattr(module, name))
        new.backend = backend
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(new, name, getattr(module, name))
        return new

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        if is_causal:
            if attn_mask is not None:
                raise ValueError("attn_mask: must be None when is_causal=True (as in torch SDPA)")
            attn_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = scaled_dot_product_attention(
            q, k, v, attn_mask, scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0, backend=self.backend)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class ClassAttn(nn.Module):
    """CaiT class attention (the class token attends to all tokens: Nq = 1),
    a drop-in for ``timm.models.cait.ClassAttn``."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0,
                 backend=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module, backend=None):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.scale, new.backend = module.num_heads, module.scale, backend
        for name in ("q", "k", "v", "attn_drop", "proj", "proj_drop"):
            setattr(new, name, getattr(module, name))
        return new

    def forward(self, x):
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
