"""Twins locally-grouped attention on pyvit_ops.window_attention_qkvpacked."""
import torch.nn.functional as F
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.nn import _timm
from pyvit_ops.ops.window_attention import window_attention_qkvpacked

# What from_timm reads of a timm twins.LocallyGroupedAttn.
_TIMM_PARTS = ("ws", "num_heads", "scale", "qkv", "attn_drop", "proj", "proj_drop")


class LocallyGroupedAttention(nn.Module):
    """Twins-SVT's locally-grouped self attention (LSA): non-overlapping ``ws x ws``
    windows without position bias or shift, a drop-in for timm's
    ``twins.LocallyGroupedAttn``, made by ``from_timm`` from one.

    ``forward(x: (B, N, dim), size: (H, W)) -> (B, N, dim)``: the qkv projection, one
    fused ``pyvit_ops.window_attention_qkvpacked`` call on the ``(B, H, W)`` grid, then
    ``proj``. timm zero-pads the map bottom / right to window multiples *before* the
    projection and does not mask the padding: padded tokens are keys and values equal to
    the qkv bias, which is the operator's ``pad_kv``. A map smaller than the window is
    zero-padded up to one window here, as timm's padding makes it. Submodule names are
    timm's, so checkpoints load.
    """

    @classmethod
    def from_timm(cls, module, backend=None):
        """Wrap a timm ``twins.LocallyGroupedAttn``, sharing its submodules (and so its
        parameters). Raises ValueError if it has attention dropout (the fused window
        operator has none)."""
        _checks.check_module("module", module, "timm LocallyGroupedAttn", _TIMM_PARTS)
        if module.attn_drop.p:
            raise ValueError(f"module: attn_drop={module.attn_drop.p} is not supported")
        return _timm.share(cls, module, "timm LocallyGroupedAttn", _TIMM_PARTS, backend)

    def forward(self, x, size):
        """``x``: ``(B, N, dim)`` tokens of a ``size = (H, W)`` map, ``N = H * W``
        -> ``(B, N, dim)``."""
        _checks.check_features("x", x, 3, self.qkv.in_features, "(B, N, C)")
        B, N, C = x.shape
        H, W = size
        ws = self.ws
        x = x.view(B, H, W, C)
        if H < ws or W < ws:
            x = F.pad(x, (0, 0, 0, max(ws - W, 0), 0, max(ws - H, 0)))
        _, Hp, Wp, _ = x.shape
        heads = self.num_heads
        _, k_bias, v_bias = self.qkv.bias.view(3, heads, -1).unbind(0)
        x = window_attention_qkvpacked(
            self.qkv(x).view(B, Hp, Wp, 3, heads, -1), window_size=ws, scale=self.scale,
            pad_kv=(k_bias, v_bias), backend=self.backend)
        return self.proj_drop(self.proj(x[:, :H, :W].reshape(B, N, C)))
