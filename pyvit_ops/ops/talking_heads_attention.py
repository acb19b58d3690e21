"""``pyvit_ops.talking_heads_attention``: public function, validation, backend choice and
the ``torch.library`` registration of the Triton kernels."""
import math
from typing import Tuple

import torch

from pyvit_ops import _backend, _checks, capabilities
from pyvit_ops.kernels._common import int32_reasons
from pyvit_ops.ops import _attention_autograd
from pyvit_ops.reference import talking_heads_attention as reference

_OP = "talking_heads_attention"
_PARAMS = ("proj_l_weight", "proj_l_bias", "proj_w_weight", "proj_w_bias")


# --------------------------------------------------------------------------- limits


def _reasons(backend, q, k, v, params):
    """Why ``backend`` cannot run this call ([] = it can)."""
    if backend not in capabilities.declared_backends(_OP):
        return [f"talking_heads_attention has no {backend} kernels (declared: "
                f"{', '.join(capabilities.declared_backends(_OP))})"]
    reasons = _backend.common_reasons(backend, _OP, tensors=[q, k, v, *params])
    H, D = q.shape[1], q.shape[3]
    reasons += capabilities.limit_reasons(_OP, backend, "heads", H, f"heads {H}")
    reasons += capabilities.limit_reasons(_OP, backend, "float32_heads", H,
                                          f"float32 heads {H}", dtype=q.dtype)
    reasons += capabilities.limit_reasons(_OP, backend, "head_dim", D, f"head dim {D}")
    if backend == "triton":
        reasons += int32_reasons(q=q, k=k, v=v)
    return reasons


# --------------------------------------------------------------------------- validation


def _check_args(q, k, v, params, scale):
    _checks.check_tensor("q", q, ndim=4)
    _checks.check_tensor("k", k, ndim=4)
    _checks.check_tensor("v", v, ndim=4)
    _checks.check_same_dtype(q=q, k=k, v=v)
    for name, t in zip(_PARAMS, params):
        _checks.check_tensor(name, t)
    _checks.check_same_device(q=q, k=k, v=v, **dict(zip(_PARAMS, params)))
    B, H, N, D = q.shape
    if D == 0 or H == 0:
        raise ValueError(f"q: expected (B, heads, N, D) with heads, D >= 1, got shape "
                         f"{tuple(q.shape)}")
    _checks.check_shape("k", k, q.shape)
    _checks.check_shape("v", v, q.shape)
    for name, t in zip(_PARAMS, params):
        _checks.check_shape(name, t, (H, H) if name.endswith("weight") else (H,))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")


# --------------------------------------------------------------------------- custom ops


def _kernels():
    from pyvit_ops.kernels import talking_heads_attention as kernels

    return kernels


@torch.library.custom_op("pyvit_ops::talking_heads_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l_weight: torch.Tensor,
            proj_l_bias: torch.Tensor, proj_w_weight: torch.Tensor, proj_w_bias: torch.Tensor,
            scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, stats): the Triton forward."""
    return _kernels().talking_heads_attention_fwd(q, k, v, proj_l_weight, proj_l_bias,
                                                  proj_w_weight, proj_w_bias, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, proj_l_weight, proj_l_bias, proj_w_weight, proj_w_bias, scale):
    return q.new_empty(q.shape), q.new_empty((*q.shape[:-1], 2), dtype=torch.float32)


@torch.library.custom_op("pyvit_ops::talking_heads_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            proj_l_weight: torch.Tensor, proj_l_bias: torch.Tensor, proj_w_weight: torch.Tensor,
            proj_w_bias: torch.Tensor, stats: torch.Tensor,
            scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d proj_l_weight, d proj_l_bias, d proj_w_weight, d proj_w_bias)."""
    return _kernels().talking_heads_attention_bwd(dout, q, k, v, proj_l_weight, proj_l_bias,
                                                  proj_w_weight, proj_w_bias, stats, scale)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, proj_l_weight, proj_l_bias, proj_w_weight, proj_w_bias, stats,
              scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, proj_l_weight, proj_l_bias,
                                                proj_w_weight, proj_w_bias))


# --------------------------------------------------------------------------- autograd


def _gradients(dout, inputs, out, stats, tokens, need):
    return torch.ops.pyvit_ops.talking_heads_attention_bwd(dout, *inputs[:7], stats,
                                                           inputs[7])


_attention_autograd.register(((_fwd_op, 3),), _gradients)


# --------------------------------------------------------------------------- public


def talking_heads_attention(q, k, v, proj_l_weight, proj_l_bias, proj_w_weight, proj_w_bias,
                            *, scale, backend=None):
    """Talking-heads attention (CaiT's ``TalkingHeadAttn`` between its qkv and output
    projections): heads mixed by ``proj_l`` before the softmax and by ``proj_w`` after it,

        S_g = sum_h L[g, h] scale q_h k_h^T + b_l[g],   P_g = softmax(S_g),
        out_f = (sum_g W[f, g] P_g + b_w[f]) v_f,

    ``L, b_l = proj_l_weight, proj_l_bias`` and ``W, b_w = proj_w_weight, proj_w_bias``
    (timm's ``proj_l`` / ``proj_w`` Linear(heads, heads) parameters).

    q, k, v: ``(B, heads, N, D)`` of one dtype (float32, float16, bfloat16, or float64 on
    the reference), any strides (timm's views of one qkv projection are read in place);
    the weights ``(heads, heads)`` and biases ``(heads,)`` of any float dtype (read in
    float32 by the kernels; their gradients come back in their own dtype, the one of
    ``proj_l_bias`` exactly zero as softmax is shift-invariant). Returns
    ``(B, heads, N, D)`` in q's dtype. The Triton kernels never store the
    ``(B, heads, N, N)`` attention; their gradients are deterministic (per-program partial
    sums added in a fixed order). backend: None (automatic), "reference" or "triton"
    (there are no CUDA C++ kernels for this operator).

    Under ``torch.autocast`` q, k, v are cast to the autocast dtype; float32 parameters
    are read as they are.
    """
    params = (proj_l_weight, proj_l_bias, proj_w_weight, proj_w_bias)
    low = _backend.autocast_dtype(q)
    if low is not None:
        with _backend.autocast_disabled(q):
            return talking_heads_attention(
                *(_backend.autocast_cast(t, low) for t in (q, k, v)),
                *(_backend.autocast_cast(t, low, keep_float32=True) for t in params),
                scale=scale, backend=backend)
    _check_args(q, k, v, params, scale)
    scale = float(scale)
    backend = _backend.choose(_OP, backend, lambda b: _reasons(b, q, k, v, params),
                              device=q.device)
    if backend == "reference":
        return reference.talking_heads_attention(q, k, v, *params, scale=scale)
    out, _ = torch.ops.pyvit_ops.talking_heads_attention_fwd(
        q, k, v, *(t.contiguous() for t in params), scale)
    return out
