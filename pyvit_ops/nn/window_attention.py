"""Swin (v1) window attention on pyvit_ops.window_attention_qkvpacked."""
import torch
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.nn import _timm
from pyvit_ops.ops.scaled_dot_product_attention import scaled_dot_product_attention
from pyvit_ops.ops.window_attention import window_attention_qkvpacked
from pyvit_ops.reference.window_attention import relative_position_index


# What from_timm reads of a timm WindowAttention (scalars first, then the submodules
# and the table it shares).
_TIMM_PARTS = ("window_size", "num_heads", "scale", "relative_position_bias_table", "qkv",
               "attn_drop", "proj", "proj_drop")


class WindowAttention(nn.Module):
    """W-MSA / SW-MSA with the relative position bias, a drop-in for timm's
    ``WindowAttention`` *and* the roll / pad / partition of ``SwinTransformerBlock._attn``.

    ``forward(x: (B, H, W, C), window_size=None, shift_size=None) -> (B, H, W, C)``
    does the whole shifted-window attention in one fused operator: no rolled,
    padded or partitioned copy and no mask buffer. ``forward(x: (num_windows * B, N,
    C), mask=None)`` is timm's own call on windows already partitioned (what timm's
    block does when the window is larger than the feature map). Parameter names are timm's
    (``qkv``, ``proj``, ``relative_position_bias_table``), so checkpoints load.
    Padded tokens see the qkv bias as their key / value, as timm's zero padding
    before the projection makes them.

    Constructor: timm's ``WindowAttention`` arguments plus ``shift_size`` (int or
    ``(h, w)``, the default shift of ``forward``) and ``backend`` (passed to
    ``pyvit_ops.window_attention``). ``attn_drop`` must be 0: there is no attention
    dropout in the fused operator. ``set_window_size`` is timm's too (a timm Swin's
    ``set_input_size`` calls it).
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
        return _timm.share(cls, module, "timm WindowAttention", _TIMM_PARTS[1:], backend,
                           window_size=tuple(module.window_size), shift_size=(0, 0))

    def set_window_size(self, window_size):
        """timm's ``WindowAttention.set_window_size``: a new window (int or ``(h, w)``),
        the relative position table interpolated to it by timm's
        ``resize_rel_pos_bias_table`` into a new parameter. Needs timm."""
        from timm.layers import resize_rel_pos_bias_table

        window_size = _checks.pair("window_size", window_size)
        if window_size == self.window_size:
            return
        wh, ww = window_size
        table = self.relative_position_bias_table
        with torch.no_grad():
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(
                    table, new_window_size=window_size,
                    new_bias_shape=((2 * wh - 1) * (2 * ww - 1), self.num_heads),
                    old_window_size=self.window_size),
                requires_grad=table.requires_grad)
        self.window_size = window_size

    def forward(self, x, mask=None, window_size=None, shift_size=None):
        """``x``: ``(B, H, W, dim)`` token grid (any H, W at least the window) ->
        ``(B, H, W, dim)``: qkv projection, fused shifted-window attention, ``proj``.
        ``window_size`` / ``shift_size`` (int or ``(h, w)``) override the module's for
        this call; the relative position table must match the window.

        ``x``: ``(num_windows * B, N, dim)`` windows (rolled, padded and partitioned by
        the caller, N the module's window area) -> ``(num_windows * B, N, dim)``: timm's
        ``WindowAttention.forward(x, mask)``, ``mask`` None or ``(num_windows, N, N)``
        added to the logits of each window, on ``pyvit_ops.scaled_dot_product_attention``.
        """
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            if window_size is not None or shift_size is not None:
                raise ValueError("window_size, shift_size: expected None for partitioned "
                                 "windows (num_windows * B, N, C), got "
                                 f"{window_size!r}, {shift_size!r}")
            return self._attend_windows(x, mask)
        if mask is not None:
            raise ValueError("mask: expected None for a (B, H, W, C) grid (the shift mask "
                             f"follows from shift_size), got {type(mask).__name__}")
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

    def _attend_windows(self, x, mask):
        """timm's ``WindowAttention.forward`` of ``(num_windows * B, N, C)`` windows."""
        _checks.check_features("x", x, 3, self.qkv.in_features, "(num_windows * B, N, C)")
        B_, N, _ = x.shape
        wh, ww = self.window_size
        if N != wh * ww:
            raise ValueError(f"x: expected N = {wh * ww} tokens per {wh}x{ww} window, got "
                             f"shape {tuple(x.shape)}")
        num_windows = 1
        if mask is not None:
            _checks.check_tensor("mask", mask, ndim=3)
            num_windows = mask.shape[0]
            if mask.shape[1:] != (N, N) or B_ % num_windows:
                raise ValueError(f"mask: expected shape (num_windows, {N}, {N}) with "
                                 f"num_windows dividing {B_}, got {tuple(mask.shape)}")
        heads = self.num_heads
        # (B, num_windows, heads, N, D) views: the mask broadcasts over B, not copied.
        q, k, v = self.qkv(x).view(B_ // num_windows, num_windows, N, 3, heads, -1).permute(
            3, 0, 1, 4, 2, 5).unbind(0)
        index = relative_position_index(self.window_size, device=x.device).view(-1)
        bias = self.relative_position_bias_table[index].view(N, N, heads).permute(2, 0, 1)
        if mask is not None:
            bias = bias + mask[:, None]
        x = scaled_dot_product_attention(q, k, v, bias, scale=self.scale, backend=self.backend)
        return self.proj_drop(self.proj(x.transpose(-3, -2).reshape(B_, N, -1)))
