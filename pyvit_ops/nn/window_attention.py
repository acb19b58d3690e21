"""Swin (v1) window attention on pyvit_ops.window_attention_qkvpacked."""
import torch
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.ops.window_attention import window_attention_qkvpacked


# What from_timm reads of a timm WindowAttention (scalars first, then the submodules
# and the table it shares).
_TIMM_PARTS = ("window_size", "num_heads", "scale", "relative_position_bias_table", "qkv",
               "attn_drop", "proj", "proj_drop")


class WindowAttention(nn.Module):
    """W-MSA / SW-MSA with the relative position bias, a drop-in for timm's
    ``WindowAttention`` *and* the roll / pad / partition of ``SwinTransformerBlock._attn``.

    ``forward(x: (B, H, W, C), window_size=None, shift_size=None) -> (B, H, W, C)``
    does the whole shifted-window attention in one fused operator: no rolled,
    padded or partitioned copy and no mask buffer. Parameter names are timm's
    (``qkv``, ``proj``, ``relative_position_bias_table``), so checkpoints load.
    Padded tokens see the qkv bias as their key / value, as timm's zero padding
    before the projection makes them.

    Constructor: timm's ``WindowAttention`` arguments plus ``shift_size`` (int or
    ``(h, w)``, the default shift of ``forward``) and ``backend`` (passed to
    ``pyvit_ops.window_attention``). ``attn_drop`` must be 0: there is no attention
    dropout in the fused operator. Unlike timm's module, which takes partitioned
    windows ``(num_windows * B, N, C)`` and a mask, ``forward`` takes the grid.
    """

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, head_dim=None,
                 qkv_bias=True, attn_drop=0.0, proj_drop=0.0, backend=None):
        super().__init__()
        if attn_drop:
            raise ValueError(f"attn_drop: window attention has no dropout kernel, got {attn_drop}")
        self.window_size = _checks.pair("window_size", window_size)
        self.shift_size = _checks.pair("shift_size", shift_size)
        if head_dim is None and dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim} (or give head_dim), got "
                             f"{num_heads}")
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        self.scale = head_dim ** -0.5
        self.backend = backend
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, head_dim * num_heads * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(head_dim * num_heads, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module, backend=None):
        """Wrap a timm ``WindowAttention``, sharing its parameters (state_dict keys
        unchanged; timm's non-persistent ``relative_position_index`` is not needed). The
        shift defaults to 0: ``patch_timm`` passes each block's shift to ``forward``.
        Raises ValueError if the module has attention dropout."""
        _checks.check_module("module", module, "timm WindowAttention", _TIMM_PARTS)
        if module.attn_drop.p:
            raise ValueError(f"module: attn_drop={module.attn_drop.p} is not supported")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.window_size, new.shift_size = tuple(module.window_size), (0, 0)
        new.num_heads, new.scale, new.backend = module.num_heads, module.scale, backend
        for name in _TIMM_PARTS[3:]:
            setattr(new, name, getattr(module, name))
        return new

    def forward(self, x, window_size=None, shift_size=None):
        """``x``: ``(B, H, W, dim)`` token grid (any H, W at least the window) ->
        ``(B, H, W, dim)``: qkv projection, fused shifted-window attention, ``proj``.
        ``window_size`` / ``shift_size`` (int or ``(h, w)``) override the module's for
        this call; the relative position table must match the window."""
        _checks.check_features("x", x, 4, self.qkv.in_features, "(B, H, W, C)")
        B, H, W, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(B, H, W, 3, heads, -1)
        pad_kv = None
        if self.qkv.bias is not None:
            # timm zero-pads the normalised input, so padded tokens project to the bias.
            _, k_bias, v_bias = self.qkv.bias.view(3, heads, -1).unbind(0)
            pad_kv = (k_bias, v_bias)
        # Packed: the kernels write the projection's gradient in place (no stack).
        x = window_attention_qkvpacked(
            qkv, self.relative_position_bias_table,
            window_size=window_size or self.window_size,
            shift_size=self.shift_size if shift_size is None else shift_size,
            scale=self.scale, pad_kv=pad_kv, backend=self.backend)
        return self.proj_drop(self.proj(x.reshape(B, H, W, -1)))
