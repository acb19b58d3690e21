"""EVA / EVA02 attention on pyvit_ops.scaled_dot_product_attention."""
import torch
import torch.nn.functional as F
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.nn import _timm
from pyvit_ops.ops.scaled_dot_product_attention import (
    scaled_dot_product_attention, scaled_dot_product_attention_qkvpacked)

# What from_timm reads of a timm eva.EvaAttention (its k_bias buffer is shared apart).
_TIMM_PARTS = ("num_heads", "scale", "num_prefix_tokens", "qkv_bias_separate", "qkv", "q_proj",
               "k_proj", "v_proj", "q_bias", "v_bias", "q_norm", "k_norm", "attn_drop", "norm",
               "gate", "proj", "proj_drop")


class EvaAttention(nn.Module):
    """EVA / EVA02 attention, a drop-in for timm's ``eva.EvaAttention`` made by
    ``from_timm`` from one: every variant of its projections (one fused ``qkv`` with
    timm's ``q_bias`` / zero ``k_bias`` buffer / ``v_bias``, added inside the matmul or
    after it per ``qkv_bias_separate``, or separate ``q_proj``, ``k_proj``, ``v_proj``),
    ``qk_norm``, ``scale_norm`` (``norm``), the gate and attention dropout.

    ``forward(x: (B, N, dim), rope=None, attn_mask=None, is_causal=False) -> (B, N, dim)``:
    the projections, ``q_norm`` / ``k_norm`` and the rotary embedding ``rope`` stay in
    PyTorch as timm computes them (the rotation skips the ``num_prefix_tokens`` class /
    register tokens); the attention is one ``pyvit_ops.scaled_dot_product_attention``
    call (the packed variant, gradient written in place, when neither rope nor qk-norm
    touch q and k). ``attn_mask`` is torch's ``attn_mask`` (bool: True attends; float:
    added), ``is_causal=True`` masks the keys after each query. Parameter and buffer
    names are timm's, so checkpoints load.
    """

    @classmethod
    def from_timm(cls, module, backend=None):
        """Wrap a timm ``eva.EvaAttention``, sharing its submodules, parameters and
        ``k_bias`` buffer (state_dict keys unchanged)."""
        new = _timm.share(cls, module, "timm EvaAttention", _TIMM_PARTS, backend,
                          rotate_half=getattr(module, "rotate_half", False))
        new.register_buffer("k_bias", module.k_bias, persistent=False)
        return new

    def _qkv(self, x):
        """The projections as one ``(B, N, 3, heads, head_dim)`` tensor (separate ones
        stacked)."""
        B, N, _ = x.shape
        if self.qkv is None:
            qkv = torch.stack([proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj)], 2)
        elif self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = self.qkv(x) + bias if self.qkv_bias_separate else \
                F.linear(x, self.qkv.weight, bias)
        return qkv.view(B, N, 3, self.num_heads, -1)

    def _rotated(self, t, rope):
        """timm's rotary embedding of ``t: (B, heads, N, D)``, prefix tokens unrotated."""
        from timm.layers import apply_rot_embed_cat

        npt = self.num_prefix_tokens
        rotated = apply_rot_embed_cat(t[:, :, npt:], rope, half=self.rotate_half)
        return torch.cat((t[:, :, :npt], rotated), dim=2)

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        """``x``: ``(B, N, dim)`` (prefix tokens first) -> ``(B, N, dim)``; ``rope``: timm's
        concatenated sin / cos embedding of the ``N - num_prefix_tokens`` patch tokens."""
        _checks.check_features("x", x, 3, self.proj.out_features, "(B, N, C)")
        B, N, _ = x.shape
        gate = None if self.gate is None else self.gate(x).sigmoid()
        if is_causal:
            if attn_mask is not None:
                raise ValueError("attn_mask: must be None when is_causal=True (as in torch SDPA)")
            attn_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        kwargs = dict(scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0,
                      backend=self.backend)
        qkv = self._qkv(x)
        if rope is None and isinstance(self.q_norm, nn.Identity) and \
                isinstance(self.k_norm, nn.Identity):
            # Packed: the kernels write the projection's gradient in place (no stack).
            x = scaled_dot_product_attention_qkvpacked(qkv, attn_mask, **kwargs)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = self._rotated(q, rope).type_as(v), self._rotated(k, rope).type_as(v)
            x = scaled_dot_product_attention(q, k, v, attn_mask, **kwargs)
        x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
