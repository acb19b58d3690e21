"""Swin V1 and V2 window attention on pyvit_ops.window_attention_qkvpacked."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.nn import _timm
from pyvit_ops.ops.scaled_dot_product_attention import scaled_dot_product_attention
from pyvit_ops.ops.window_attention import window_attention_qkvpacked
from pyvit_ops.reference.window_attention import LOGIT_SCALE_MAX, relative_position_index


# What from_timm reads of a timm WindowAttention (scalars first, then the submodules
# and the table it shares).
_TIMM_PARTS = ("window_size", "num_heads", "scale", "relative_position_bias_table", "qkv",
               "attn_drop", "proj", "proj_drop")


class _ShiftedWindowAttention(nn.Module):
    """What Swin V1 and V2 window attention share: the two ``forward`` paths (a grid through
    the fused operator, timm's partitioned windows through SDPA). A subclass gives its qkv
    projection (``_qkv``), the operator's arguments (``_attention_args``) and how the
    windows' q, k are scaled (``_scaled_qk``)."""

    def _qkv(self, x):
        return self.qkv(x)

    def forward(self, x, mask=None, window_size=None, shift_size=None):
        """``x``: ``(B, H, W, dim)`` token grid (any H, W at least the window) ->
        ``(B, H, W, dim)``: qkv projection, fused shifted-window attention, ``proj``.
        ``window_size`` / ``shift_size`` (int or ``(h, w)``) override the module's for
        this call; the position bias must match the window.

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
        qkv = self._qkv(x).view(B, H, W, 3, self.num_heads, -1)
        # Packed: the kernels write the projection's gradient in place (no stack).
        x = window_attention_qkvpacked(
            qkv, window_size=window_size or self.window_size,
            shift_size=self.shift_size if shift_size is None else shift_size,
            backend=self.backend, **self._attention_args())
        return self.proj_drop(self.proj(x.reshape(B, H, W, -1)))

    def _attend_windows(self, x, mask):
        """timm's ``WindowAttention.forward`` of ``(num_windows * B, N, C)`` windows."""
        _checks.check_features("x", x, 3, self.qkv.in_features, "(num_windows * B, N, C)")
        B_, N, _ = x.shape
        num_windows = _window_mask_count(x, mask, self.window_size)
        heads = self.num_heads
        # (B, num_windows, heads, N, D) views: the mask broadcasts over B, not copied.
        q, k, v = self._qkv(x).view(B_ // num_windows, num_windows, N, 3, heads, -1).permute(
            3, 0, 1, 4, 2, 5).unbind(0)
        args = self._attention_args()
        q, k, scale = self._scaled_qk(q, k, args)
        index = relative_position_index(self.window_size, device=x.device).view(-1)
        bias = args["rel_pos_bias_table"][index].view(N, N, heads).permute(2, 0, 1)
        if mask is not None:
            bias = bias + mask[:, None]
        x = scaled_dot_product_attention(q, k, v, bias, scale=scale, backend=self.backend)
        return self.proj_drop(self.proj(x.transpose(-3, -2).reshape(B_, N, -1)))


class WindowAttention(_ShiftedWindowAttention):
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

    def _attention_args(self):
        pad_kv = None
        if self.qkv.bias is not None:
            # timm zero-pads the normalised input, so padded tokens project to the bias.
            _, k_bias, v_bias = self.qkv.bias.view(3, self.num_heads, -1).unbind(0)
            pad_kv = (k_bias, v_bias)
        return dict(rel_pos_bias_table=self.relative_position_bias_table, scale=self.scale,
                    pad_kv=pad_kv)

    def _scaled_qk(self, q, k, args):
        return q, k, args["scale"]


def _window_mask_count(x, mask, window_size):
    """How many windows timm's ``mask`` (None or ``(num_windows, N, N)``) covers, after
    checking it and ``x``'s ``(num_windows * B, N, C)`` windows against ``window_size``."""
    B_, N, _ = x.shape
    wh, ww = window_size
    if N != wh * ww:
        raise ValueError(f"x: expected N = {wh * ww} tokens per {wh}x{ww} window, got "
                         f"shape {tuple(x.shape)}")
    if mask is None:
        return 1
    _checks.check_tensor("mask", mask, ndim=3)
    if mask.shape[1:] != (N, N) or B_ % mask.shape[0]:
        raise ValueError(f"mask: expected shape (num_windows, {N}, {N}) with "
                         f"num_windows dividing {B_}, got {tuple(mask.shape)}")
    return mask.shape[0]


def relative_coords_table(window_size, pretrained_window_size=(0, 0), *, device=None,
                          dtype=None):
    """Swin V2's log-spaced relative coordinates, ``(1, 2 wh - 1, 2 ww - 1, 2)``: the
    input of ``cpb_mlp``. Offsets are divided by ``window - 1`` (of the pretrained window
    when given), scaled to [-8, 8], then mapped to ``sign(x) log2(|x| + 1) / 3``."""
    (wh, ww), (ph, pw) = window_size, pretrained_window_size
    norm = ((ph, pw) if ph > 0 else (wh, ww))
    axes = [torch.arange(1 - n, n, device=device, dtype=torch.float32) * 8 / max(m - 1, 1)
            for n, m in zip((wh, ww), norm)]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(0)
    return (torch.sign(coords) * torch.log2(coords.abs() + 1.0) / 3.0).to(dtype)


# What WindowAttentionV2.from_timm reads of a timm swin_transformer_v2.WindowAttention.
_TIMM_V2_PARTS = ("window_size", "pretrained_window_size", "num_heads", "qkv_bias_separate",
                  "logit_scale", "cpb_mlp", "qkv", "q_bias", "v_bias", "attn_drop", "proj",
                  "proj_drop")


class WindowAttentionV2(_ShiftedWindowAttention):
    """Swin V2 window attention (scaled cosine attention, continuous position bias),
    a drop-in for timm's ``swin_transformer_v2.WindowAttention`` *and* the roll / pad /
    partition of ``SwinTransformerV2Block._attn``.

    ``forward(x: (B, H, W, C), window_size=None, shift_size=None) -> (B, H, W, C)``: the
    qkv projection, then the whole shifted-window attention in one
    ``pyvit_ops.window_attention_qkvpacked`` call with ``logit_scale`` (no rolled,
    padded or partitioned copy, no mask buffer), then ``proj``. The bias table is
    ``16 * sigmoid(cpb_mlp(relative_coords_table))``, at most ``(2 * 24 - 1) ** 2`` rows,
    computed in PyTorch. Padded tokens are the projection of timm's zero padding: key
    ``k_bias`` (zeros, so its cosine is 0) and value ``v_bias``.
    ``forward(x: (num_windows * B, N, C), mask=None)`` is timm's own call on windows
    already partitioned (the block's path when the window is larger than the map).
    Parameter and buffer names are timm's (``logit_scale``, ``cpb_mlp``, ``qkv``,
    ``q_bias``, ``k_bias``, ``v_bias``, ``proj``), so checkpoints load.

    Constructor: timm's arguments plus ``shift_size`` (the default shift of
    ``forward``) and ``backend``. ``attn_drop`` must be 0.
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qkv_bias_separate=False,
                 attn_drop=0.0, proj_drop=0.0, pretrained_window_size=(0, 0), shift_size=0,
                 backend=None):
        super().__init__()
        if attn_drop:
            raise ValueError(f"attn_drop: window attention has no dropout kernel, got {attn_drop}")
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
        self.window_size = _checks.pair("window_size", window_size)
        self.pretrained_window_size = _checks.pair("pretrained_window_size",
                                                   pretrained_window_size)
        self.shift_size = _checks.pair("shift_size", shift_size)
        self.num_heads = num_heads
        self.qkv_bias_separate = qkv_bias_separate
        self.backend = backend
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._set_coords()

    def _set_coords(self):
        weight = self.proj.weight
        self.register_buffer("relative_coords_table", relative_coords_table(
            self.window_size, self.pretrained_window_size, device=weight.device,
            dtype=weight.dtype), persistent=False)

    @classmethod
    def from_timm(cls, module, backend=None):
        """Wrap a timm ``swin_transformer_v2.WindowAttention``, sharing its parameters and
        ``k_bias`` (state_dict keys unchanged). The shift defaults to 0: ``patch_timm``
        passes each block's shift to ``forward``. Raises ValueError if the module has
        attention dropout."""
        _checks.check_module("module", module, "timm WindowAttention (Swin V2)", _TIMM_V2_PARTS)
        if module.attn_drop.p:
            raise ValueError(f"module: attn_drop={module.attn_drop.p} is not supported")
        new = _timm.share(cls, module, "timm WindowAttention (Swin V2)", _TIMM_V2_PARTS[4:],
                          backend, window_size=tuple(module.window_size),
                          pretrained_window_size=tuple(module.pretrained_window_size),
                          num_heads=module.num_heads,
                          qkv_bias_separate=module.qkv_bias_separate, shift_size=(0, 0))
        new.register_buffer("k_bias", module.k_bias, persistent=False)
        new.register_buffer("relative_coords_table", module.relative_coords_table,
                            persistent=False)
        return new

    def set_window_size(self, window_size):
        """timm's ``set_window_size``: a new window (int or ``(h, w)``); the continuous
        position bias needs no resizing, only new coordinates."""
        window_size = _checks.pair("window_size", window_size)
        if window_size != self.window_size:
            self.window_size = window_size
            self._set_coords()

    def _qkv(self, x):
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            return self.qkv(x) + bias
        return F.linear(x, self.qkv.weight, bias)

    def _bias_table(self):
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return 16 * torch.sigmoid(table)

    def _attention_args(self):
        pad_kv = None
        if self.q_bias is not None:
            pad_kv = (self.k_bias.view(self.num_heads, -1), self.v_bias.view(self.num_heads, -1))
        return dict(rel_pos_bias_table=self._bias_table(), pad_kv=pad_kv,
                    logit_scale=self.logit_scale)

    def _scaled_qk(self, q, k, args):
        # Cosine attention on SDPA: the normalised q carries the clamped logit scale.
        gain = torch.clamp(args["logit_scale"], max=LOGIT_SCALE_MAX).exp()
        return F.normalize(q, dim=-1) * gain.to(q.dtype), F.normalize(k, dim=-1), 1.0
