"""``pyvit_ops.window_attention``: Swin W-MSA / SW-MSA, fused.

Backends: "reference" (``pyvit_ops.reference.window_attention``, differentiable
PyTorch), "triton" (``pyvit_ops.kernels.window_attention``) and "cuda" (the C++
extension's ``window_attention_fwd`` / ``_bwd``). The kernel backends go through the
custom ops ``pyvit_ops::window_attention_fwd`` / ``_bwd``, which return / take the
output and its fp32 row statistics: the base-2 row max and log2 of the row sum apart,
``(num_windows, heads, N, 2)``, ``num_windows = B * ceil(H / wh) * ceil(W / ww)``,
``N = wh * ww``; their
``_qkvpacked`` twins take one ``(B, H, W, 3, heads, D)`` qkv and return its gradient.
They take the logit scale as given (``(heads,)`` or ``(heads, 1, 1)``, None: no cosine
attention) and return its gradient in its shape and dtype.
"""
import math
from typing import Optional, Tuple

import torch

from pyvit_ops import _backend, _checks, _ext, capabilities
from pyvit_ops.ops import _attention_autograd
from pyvit_ops.reference import window_attention as reference

_OP = "window_attention"


def _triton_module():
    from pyvit_ops.kernels import window_attention as kernels

    return kernels


def _reasons(backend, q, k, v, table, pad_kv, window_size, packed=False):
    """Why ``backend`` cannot run the call; ``packed``: q, k, v are slices of one qkv,
    whose gradient the kernels write as one packed tensor."""
    tensors = [q, k, v, table, *(pad_kv or ())]
    reasons = _backend.common_reasons(backend, _OP, tensors=tensors)
    D = q.shape[-1]
    area = window_size[0] * window_size[1]
    reasons += capabilities.limit_reasons(_OP, backend, "head_dim", D, f"head dim {D}")
    reasons += capabilities.limit_reasons(_OP, backend, "float32_head_dim", D,
                                          f"float32 with head dim {D}", dtype=q.dtype,
                                          window_area=area)
    reasons += capabilities.limit_reasons(
        _OP, backend, "window_area", area,
        f"window area {window_size[0]}x{window_size[1]} = {area}")
    if backend == "triton":
        reasons += _triton_module().int32_reasons(q, k, v, packed)
    return reasons


# --------------------------------------------------------------------------- custom ops


def _gain(logit_scale):
    """Swin V2's gain of the cosine, ``exp(min(logit_scale, log 100))`` per head, float32
    (None without a logit scale)."""
    if logit_scale is None:
        return None
    return logit_scale.to(torch.float32).reshape(-1).clamp(max=reference.LOGIT_SCALE_MAX).exp()


def _fwd(q, k, v, table, pad_k, pad_v, logit_scale, window_h, window_w, shift_h, shift_w, scale,
         mask_value, grid_partition, backend):
    if backend == "triton":
        return _triton_module().window_attention_fwd(
            q, k, v, table, pad_k, pad_v, (window_h, window_w), (shift_h, shift_w), scale,
            mask_value, gain=_gain(logit_scale), grid_partition=grid_partition)
    if backend == "cuda":
        return tuple(_ext.lib(q).window_attention_fwd(
            q, k, v, table, pad_k, pad_v, _gain(logit_scale), window_h, window_w, shift_h,
            shift_w, scale, mask_value, grid_partition))
    raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")


@torch.library.custom_op("pyvit_ops::window_attention_fwd", mutates_args=())
def _window_attention_fwd(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: Optional[torch.Tensor],
        pad_k: Optional[torch.Tensor], pad_v: Optional[torch.Tensor],
        logit_scale: Optional[torch.Tensor], window_h: int, window_w: int, shift_h: int,
        shift_w: int, scale: float, mask_value: float, grid_partition: bool,
        backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, table, pad_k, pad_v, logit_scale, window_h, window_w, shift_h, shift_w,
                scale, mask_value, grid_partition, backend)


@torch.library.custom_op("pyvit_ops::window_attention_qkvpacked_fwd", mutates_args=())
def _window_attention_qkvpacked_fwd(
        qkv: torch.Tensor, table: Optional[torch.Tensor], pad_k: Optional[torch.Tensor],
        pad_v: Optional[torch.Tensor], logit_scale: Optional[torch.Tensor], window_h: int,
        window_w: int, shift_h: int, shift_w: int, scale: float, mask_value: float,
        grid_partition: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``window_attention_fwd`` of the three slices of qkv ``(B, H, W, 3, heads, D)``
    (the kernels read strided slices)."""
    return _fwd(*qkv.unbind(3), table, pad_k, pad_v, logit_scale, window_h, window_w, shift_h,
                shift_w, scale, mask_value, grid_partition, backend)


def _lse_shape(q, window_h, window_w):
    B, H, W, heads, _ = q.shape
    return (B * math.ceil(H / window_h) * math.ceil(W / window_w), heads, window_h * window_w, 2)


@_window_attention_fwd.register_fake
def _(q, k, v, table, pad_k, pad_v, logit_scale, window_h, window_w, shift_h, shift_w, scale,
      mask_value, grid_partition, backend):
    return (q.new_empty(q.shape),
            q.new_empty(_lse_shape(q, window_h, window_w), dtype=torch.float32))


@_window_attention_qkvpacked_fwd.register_fake
def _(qkv, table, pad_k, pad_v, logit_scale, window_h, window_w, shift_h, shift_w, scale,
      mask_value, grid_partition, backend):
    q = qkv.select(3, 0)
    return (q.new_empty(q.shape),
            q.new_empty(_lse_shape(q, window_h, window_w), dtype=torch.float32))


def _bwd(dout, q, k, v, out, lse, table, pad_k, pad_v, logit_scale, window_h, window_w, shift_h,
         shift_w, scale, mask_value, grid_partition, table_grad, pad_grad, logit_scale_grad,
         backend, qkv=None):
    """(dq, dk, dv, dtable, dpad_k, dpad_v, dlogit_scale), or (dqkv, dtable, dpad_k, dpad_v,
    dlogit_scale) written in place of a stack when q, k, v are the slices of the packed
    ``qkv``; dtable / dpads / dlogit_scale are empty tensors unless ``table_grad`` /
    ``pad_grad`` / ``logit_scale_grad`` (custom ops cannot return None)."""
    geometry = (window_h, window_w, shift_h, shift_w, scale, mask_value, grid_partition)
    gain = _gain(logit_scale)
    if backend == "triton":
        dqkv = None if qkv is None else torch.empty(qkv.shape, dtype=qkv.dtype,
                                                   device=qkv.device)
        *grads, dlog_gain = _triton_module().window_attention_bwd(
            dout, q, k, v, lse, table, pad_k, pad_v, (window_h, window_w),
            (shift_h, shift_w), scale, mask_value,
            (True, True, True, table_grad, pad_grad, pad_grad, logit_scale_grad), dqkv=dqkv,
            gain=gain, grid_partition=grid_partition)
        if dqkv is not None:
            grads = (dqkv, *grads[3:])
    elif backend == "cuda":
        flags = (table_grad, pad_grad, logit_scale_grad)
        if qkv is None:
            *grads, dlog_gain = _ext.lib(q).window_attention_bwd(
                dout, q, k, v, out, lse, table, pad_k, pad_v, gain, *geometry, *flags)
        else:
            *grads, dlog_gain = _ext.lib(q).window_attention_qkvpacked_bwd(
                dout, qkv, out, lse, table, pad_k, pad_v, gain, *geometry, *flags)
        dlog_gain = dlog_gain if logit_scale_grad and gain is not None else None
    else:
        raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")
    dlogit_scale = None
    if dlog_gain is not None:
        # gain = exp(min(logit_scale, log 100)): torch.clamp's gradient, which passes
        # at the bound, compared in float64 as torch does (float32 log 100 is above).
        passes = logit_scale.to(torch.float64).reshape(-1) <= reference.LOGIT_SCALE_MAX
        dlogit_scale = (dlog_gain * passes).reshape(logit_scale.shape).to(logit_scale.dtype)
    grads = (*grads, dlogit_scale)
    tokens = 3 if qkv is None else 1
    # The parameter gradients are tiny; contiguous is what register_fake promises.
    grads = [g if i < tokens or g is None else g.contiguous() for i, g in enumerate(grads)]
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@torch.library.custom_op("pyvit_ops::window_attention_bwd", mutates_args=())
def _window_attention_bwd(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, table: Optional[torch.Tensor],
        pad_k: Optional[torch.Tensor], pad_v: Optional[torch.Tensor],
        logit_scale: Optional[torch.Tensor], window_h: int, window_w: int, shift_h: int,
        shift_w: int, scale: float, mask_value: float, grid_partition: bool, table_grad: bool,
        pad_grad: bool, logit_scale_grad: bool, backend: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(dq, dk, dv, dtable, dpad_k, dpad_v, dlogit_scale), see ``_bwd``."""
    return _bwd(dout, q, k, v, out, lse, table, pad_k, pad_v, logit_scale, window_h, window_w,
                shift_h, shift_w, scale, mask_value, grid_partition, table_grad, pad_grad,
                logit_scale_grad, backend)


@torch.library.custom_op("pyvit_ops::window_attention_qkvpacked_bwd", mutates_args=())
def _window_attention_qkvpacked_bwd(
        dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        table: Optional[torch.Tensor], pad_k: Optional[torch.Tensor],
        pad_v: Optional[torch.Tensor], logit_scale: Optional[torch.Tensor], window_h: int,
        window_w: int, shift_h: int, shift_w: int, scale: float, mask_value: float,
        grid_partition: bool, table_grad: bool, pad_grad: bool, logit_scale_grad: bool,
        backend: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dqkv, dtable, dpad_k, dpad_v, dlogit_scale), see ``_bwd``."""
    return _bwd(dout, *qkv.unbind(3), out, lse, table, pad_k, pad_v, logit_scale, window_h,
                window_w, shift_h, shift_w, scale, mask_value, grid_partition, table_grad,
                pad_grad, logit_scale_grad, backend, qkv=qkv)


def _param_grads_fake(q, table, pad_k, pad_v, logit_scale, table_grad, pad_grad,
                      logit_scale_grad):
    def like(t, wanted):
        return t.new_empty(t.shape) if wanted and t is not None else q.new_empty(0)

    return (like(table, table_grad), like(pad_k, pad_grad), like(pad_v, pad_grad),
            like(logit_scale, logit_scale_grad))


@_window_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, table, pad_k, pad_v, logit_scale, window_h, window_w, shift_h,
      shift_w, scale, mask_value, grid_partition, table_grad, pad_grad, logit_scale_grad,
      backend):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            *_param_grads_fake(q, table, pad_k, pad_v, logit_scale, table_grad, pad_grad,
                               logit_scale_grad))


@_window_attention_qkvpacked_bwd.register_fake
def _(dout, qkv, out, lse, table, pad_k, pad_v, logit_scale, window_h, window_w, shift_h,
      shift_w, scale, mask_value, grid_partition, table_grad, pad_grad, logit_scale_grad,
      backend):
    return (qkv.new_empty(qkv.shape),
            *_param_grads_fake(qkv, table, pad_k, pad_v, logit_scale, table_grad, pad_grad,
                               logit_scale_grad))


def _gradients(dout, inputs, out, lse, tokens, need):
    # After the tokens: table, pad_k, pad_v, logit_scale, the geometry and scalars, backend.
    bwd = (torch.ops.pyvit_ops.window_attention_bwd if tokens == 3 else
           torch.ops.pyvit_ops.window_attention_qkvpacked_bwd)
    return bwd(dout, *inputs[:tokens], out, lse, *inputs[tokens:-1],
               table_grad=need[tokens], pad_grad=need[tokens + 1] or need[tokens + 2],
               logit_scale_grad=need[tokens + 3], backend=inputs[-1])


_attention_autograd.register(((_window_attention_fwd, 3), (_window_attention_qkvpacked_fwd, 1)),
                             _gradients)


# --------------------------------------------------------------------------- public


def _check_args(q, k, v, table, pad_kv, window_size, shift_size, scale, mask_value,
                logit_scale, partition):
    _checks.check_tensor("q", q, ndim=5)
    _checks.check_tensor("k", k, ndim=5)
    _checks.check_tensor("v", v, ndim=5)
    _checks.check_shape("k", k, q.shape)
    _checks.check_shape("v", v, q.shape)
    _checks.check_same_dtype(q=q, k=k, v=v)
    B, H, W, heads, D = q.shape
    if D == 0:
        raise ValueError(f"q: expected a head dim (last dim) >= 1, got shape {tuple(q.shape)}")
    wh, ww = _checks.pair("window_size", window_size)
    sh, sw = _checks.pair("shift_size", shift_size)
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size: expected positive sizes, got {(wh, ww)}")
    if wh > H or ww > W:
        raise ValueError(f"window_size: expected at most the grid (H, W) = {(H, W)} of q, "
                         f"got {(wh, ww)}")
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift_size: expected 0 <= shift < window_size {(wh, ww)} per axis, "
                         f"got {(sh, sw)}")
    if partition not in ("block", "grid"):
        raise ValueError(f"partition: expected 'block' or 'grid', got {partition!r}")
    if partition == "grid" and (H % wh or W % ww or sh or sw):
        raise ValueError(f"partition='grid': expected H, W multiples of the window {(wh, ww)} "
                         f"and no shift (as timm's grid_partition), got (H, W) = {(H, W)}, "
                         f"shift {(sh, sw)}")
    allowed = tuple(dict.fromkeys((q.dtype, torch.float32)))
    pad_k = pad_v = None
    if table is not None:
        _checks.check_tensor("rel_pos_bias_table", table, ndim=2, dtypes=allowed)
        _checks.check_shape("rel_pos_bias_table", table, ((2 * wh - 1) * (2 * ww - 1), heads))
    if pad_kv is not None:
        if not isinstance(pad_kv, (tuple, list)) or len(pad_kv) != 2:
            got = f"length {len(pad_kv)}" if isinstance(pad_kv, (tuple, list)) else \
                type(pad_kv).__name__
            raise TypeError("pad_kv: expected a pair (k_pad, v_pad) of (heads, D) tensors, "
                            f"got {got}")
        pad_k, pad_v = pad_kv
        for name, pad in (("pad_kv[0]", pad_k), ("pad_kv[1]", pad_v)):
            _checks.check_tensor(name, pad, ndim=2, dtypes=allowed)
            _checks.check_shape(name, pad, (heads, D))
    if logit_scale is not None:
        _checks.check_tensor("logit_scale", logit_scale, dtypes=allowed)
        if logit_scale.numel() != heads or logit_scale.dim() == 0 or \
                any(n != 1 for n in logit_scale.shape[1:]):
            raise ValueError(f"logit_scale: expected shape ({heads},) or ({heads}, 1, 1) (one "
                             f"value per head), got {tuple(logit_scale.shape)}")
        if scale is not None:
            raise ValueError(f"scale: expected None with logit_scale (cosine attention scales "
                             f"the cosine by exp(logit_scale)), got {scale!r}")
    _checks.check_same_device(q=q, k=k, v=v, rel_pos_bias_table=table, logit_scale=logit_scale,
                              **{"pad_kv[0]": pad_k, "pad_kv[1]": pad_v})
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {scale!r}")
    # Comparisons, not math.isfinite / isnan: torch.compile(dynamic=True) traces the
    # float arguments as symbolic floats, which math's functions cannot take. NaN fails
    # every comparison.
    elif scale == 0 or not -math.inf < scale < math.inf:
        raise ValueError(f"scale: expected a nonzero finite float, got {scale}")
    if isinstance(mask_value, bool) or not isinstance(mask_value, (int, float)):
        raise TypeError(f"mask_value: expected a float (timm: -100.0), got {mask_value!r}")
    if not mask_value < math.inf:
        raise ValueError("mask_value: expected a number below +inf (timm: -100.0), "
                         f"got {mask_value}")
    return (wh, ww), (sh, sw), pad_k, pad_v, float(scale), float(mask_value)


def window_attention(q, k, v, rel_pos_bias_table=None, *, window_size, shift_size=0, scale=None,
                     pad_kv=None, mask_value=-100.0, logit_scale=None, partition="block",
                     backend=None):
    """Swin window attention of image-layout token grids, fused.

    q, k, v: ``(B, H, W, heads, D)``, not rolled, padded or partitioned (typically
    strided views of one ``(B, H, W, 3, heads, D)`` projection). Returns
    ``(B, H, W, heads, D)`` in q's dtype.

    Exactly timm's ``SwinTransformerBlock._attn`` + ``WindowAttention`` (timm >= 1.0):
    roll by ``-shift_size``, then pad bottom / right to window multiples, attend
    inside each window (``softmax(q k^T * scale + bias + mask) v``), un-partition,
    crop, roll back. The official microsoft/Swin-Transformer pads *before* it
    rolls, which differs when H or W is not a multiple of the window.

    window_size, shift_size: int or ``(h, w)``; ``window_size <= (H, W)`` and
    ``0 <= shift_size < window_size`` per axis. rel_pos_bias_table:
    ``((2 wh - 1)(2 ww - 1), heads)`` (timm's parameter) or None; it is gathered per
    (query, key) pair and its gradient comes back in its shape. scale: default
    ``D ** -0.5``. pad_kv: ``(k_pad, v_pad)``, each ``(heads, D)``, the key / value of
    padded tokens, which attention sees as real tokens (in timm the projection of
    the zero padding, i.e. the qkv bias); zeros when None; rounded to q's dtype.
    mask_value: added between tokens of different shift regions (timm: -100.0).
    logit_scale: None, or one value per head (``(heads,)`` or timm's ``(heads, 1, 1)``):
    Swin V2's scaled cosine attention (timm ``swin_transformer_v2.WindowAttention``),
    logits ``cos(q_i, k_j) * exp(min(logit_scale, log 100)) + bias + mask`` with
    ``F.normalize``'s eps; ``scale`` must then be None, the table holds the final bias
    (timm's ``16 * sigmoid(cpb_mlp(...))``) and the logit scale's gradient is 0 where
    the clamp holds it. partition: "block" (Swin's windows of adjacent tokens) or "grid"
    (MaxViT's grid attention, timm's ``grid_partition``: window (i, j) holds the tokens
    ``(a * H / wh + i, c * W / ww + j)``; H, W multiples of the window, no shift), read by
    index arithmetic, not a copy.
    Table, pads and logit scale may be in q's dtype or float32. Gradients flow to q, k, v, the
    table and the pads, deterministically (no atomics) on every backend.
    backend: None (automatic: Triton first on CUDA tensors of every dtype), "reference",
    "triton" or "cuda". Float32 inputs get float32-grade products on every backend:
    the Triton kernels run them as 3xTF32 on tensor cores, the CUDA kernel as float32
    FMAs; only when torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, or the legacy
    ``allow_tf32``) do the Triton kernels run plain TF32 (~1e-3 relative error on the
    scores), as torch's own matmuls then do. The flag is read at every call.
    Under ``torch.autocast`` (any device type) q, k, v are cast to the autocast dtype
    and the operator runs in it (float32 scores and softmax, output in that dtype);
    a float32 table and pads are read as is: fp32 masters with fp32 gradients.
    """
    return _window_attention((q, k, v), rel_pos_bias_table, window_size, shift_size, scale,
                             pad_kv, mask_value, logit_scale, partition, backend)


def window_attention_qkvpacked(qkv, rel_pos_bias_table=None, *, window_size, shift_size=0,
                               scale=None, pad_kv=None, mask_value=-100.0, logit_scale=None,
                               partition="block", backend=None):
    """``window_attention(*qkv.unbind(3), ...)`` of one packed projection
    ``qkv: (B, H, W, 3, heads, D)`` (timm's ``qkv(x).view(B, H, W, 3, heads, D)``), with
    the same arguments and result. Its gradient comes back as one
    ``(B, H, W, 3, heads, D)`` tensor that the kernels write in place; through
    ``window_attention`` of the three slices, autograd would stack three gradients into
    it, a copy of the whole projection (on the Triton and CUDA backends; the reference
    backend unbinds)."""
    _checks.check_tensor("qkv", qkv, ndim=6)
    if qkv.shape[3] != 3:
        raise ValueError(f"qkv: expected shape (B, H, W, 3, heads, D), got {tuple(qkv.shape)}")
    return _window_attention((qkv,), rel_pos_bias_table, window_size, shift_size, scale,
                             pad_kv, mask_value, logit_scale, partition, backend)


def _window_attention(tokens, table, window_size, shift_size, scale, pad_kv, mask_value,
                      logit_scale, partition, backend):
    """``tokens``: (q, k, v) or (qkv,)."""
    low = _backend.autocast_dtype(tokens[0])
    if low is not None:
        if isinstance(pad_kv, (tuple, list)):
            pad_kv = tuple(_backend.autocast_cast(p, low, keep_float32=True) for p in pad_kv)
        with _backend.autocast_disabled(tokens[0]):
            return _window_attention(
                tuple(_backend.autocast_cast(t, low) for t in tokens),
                _backend.autocast_cast(table, low, keep_float32=True), window_size, shift_size,
                scale, pad_kv, mask_value,
                _backend.autocast_cast(logit_scale, low, keep_float32=True), partition, backend)
    q, k, v = tokens if len(tokens) == 3 else tokens[0].unbind(3)
    window_size, shift_size, pad_k, pad_v, scale, mask_value = _check_args(
        q, k, v, table, pad_kv, window_size, shift_size, scale, mask_value, logit_scale,
        partition)
    backend = _backend.choose(
        _OP, backend,
        lambda b: (_reasons(b, q, k, v, table, pad_kv, window_size, packed=len(tokens) == 1)
                   + capabilities.feature_reasons(_OP, b, "cosine", logit_scale is not None)
                   + capabilities.feature_reasons(_OP, b, "grid_partition",
                                                  partition == "grid")),
        device=q.device)
    if backend == "reference":
        return reference.window_attention(
            q, k, v, table, window_size=window_size, shift_size=shift_size, scale=scale,
            pad_kv=pad_kv, mask_value=mask_value, logit_scale=logit_scale, partition=partition)
    fwd = (torch.ops.pyvit_ops.window_attention_fwd if len(tokens) == 3 else
           torch.ops.pyvit_ops.window_attention_qkvpacked_fwd)
    out, _ = fwd(*tokens, table, pad_k, pad_v, logit_scale, *window_size, *shift_size, scale,
                 mask_value, partition == "grid", backend)
    return out
