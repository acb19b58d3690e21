"""Triton talking-heads attention (CaiT), forward and backward: the launchers and their
tile configurations. The kernels are in ``_forward``, ``_backward`` (dq with delta,
dk with the partial sums of the head mixes' gradients, dv) and ``_tiles`` (the tile math
they share); docs/design/talking_heads_attention.md explains the design.

Layout contract of the launchers: q, k, v ``(B, H, N, D)``, any strides; the head-mix
weights ``(H, H)`` and biases ``(H,)`` contiguous, any float dtype (read as fp32)."""
from typing import NamedTuple

import torch
import triton

from pyvit_ops.capabilities import capability
from pyvit_ops.kernels._common import on_tensor_device

from ..scaled_dot_product_attention import _precision
from ._backward import (_talking_heads_attention_bwd_dk_kernel,
                        _talking_heads_attention_bwd_dq_kernel,
                        _talking_heads_attention_bwd_dv_kernel)
from ._forward import _talking_heads_attention_fwd_kernel

_LIMITS = capability("talking_heads_attention", "triton")
MAX_HEADS = _LIMITS.limit("heads").value
MAX_HEADS_FP32 = _LIMITS.limit("float32_heads").value
MAX_HEAD_DIM = _LIMITS.limit("head_dim").value


class TileConfig(NamedTuple):
    """Tiles and launch shape of a talking-heads kernel (every program holds all heads)."""
    block_m: int          # queries per tile
    block_n: int          # keys per tile
    num_warps: int


# Register cap passed to ptxas (.maxnreg): without it ptxas may settle at ~168
# registers and spill.
_MAXNREG = 255


def launch_options(cfg):
    """Launch options of a kernel with tile config ``cfg``."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                num_stages=1, maxnreg=_MAXNREG)


def _blocks(H, D):
    """(BLOCK_H, BLOCK_D): heads and head dims padded to powers of two (masked)."""
    return triton.next_power_of_2(H), max(16, triton.next_power_of_2(D))


def tile_config(block_h):
    """The tiles of every kernel: the smallest tl.dot tiles (16 x 16), as every program
    holds a (heads, tokens, head dim) accumulator; 8 warps from 8 heads on."""
    return TileConfig(16, 16, 8 if block_h >= 8 else 4)


def _check_inputs(q, k, v, proj_l_weight, proj_l_bias, proj_w_weight, proj_w_bias):
    if q.dim() != 4 or tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        raise ValueError(f"q, k, v: expected three (B, H, N, D) tensors of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    max_heads = MAX_HEADS_FP32 if q.dtype == torch.float32 else MAX_HEADS
    if H > max_heads or D > MAX_HEAD_DIM:
        raise ValueError(f"q: heads must be <= {max_heads} ({q.dtype}) and head dim <= "
                         f"{MAX_HEAD_DIM}, got {H}, {D}")
    for name, t, shape in (("proj_l_weight", proj_l_weight, (H, H)),
                           ("proj_l_bias", proj_l_bias, (H,)),
                           ("proj_w_weight", proj_w_weight, (H, H)),
                           ("proj_w_bias", proj_w_bias, (H,))):
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {shape} tensor, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    return B, H, N, D


@on_tensor_device
def talking_heads_attention_fwd(q, k, v, proj_l_weight, proj_l_bias, proj_w_weight,
                                proj_w_bias, scale):
    """Forward launcher: returns ``(out (B, H, N, D) in q's dtype, stats (B, H, N, 2)
    fp32)``, stats holding each mixed head's row max logit and log2 of its row sum."""
    B, H, N, D = _check_inputs(q, k, v, proj_l_weight, proj_l_bias, proj_w_weight,
                               proj_w_bias)
    out = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    stats = torch.empty((B, H, N, 2), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, stats
    block_h, block_d = _blocks(H, D)
    cfg = tile_config(block_h)
    _talking_heads_attention_fwd_kernel[(B * triton.cdiv(N, cfg.block_m),)](
        q, k, v, proj_l_weight, proj_l_bias, proj_w_weight, proj_w_bias, out, stats,
        float(scale), q.stride(), k.stride(), v.stride(), out.stride(), H, N, D,
        PRECISION=_precision(q.dtype), BLOCK_H=block_h, BLOCK_D=block_d, **launch_options(cfg))
    return out, stats


@on_tensor_device
def talking_heads_attention_bwd(dout, q, k, v, proj_l_weight, proj_l_bias, proj_w_weight,
                                proj_w_bias, stats, scale):
    """Backward launcher: returns ``(dq, dk, dv, d proj_l_weight, d proj_l_bias,
    d proj_w_weight, d proj_w_bias)``, the parameter gradients in the parameters' dtypes
    (d proj_l_bias is exactly zero: softmax is shift-invariant)."""
    B, H, N, D = _check_inputs(q, k, v, proj_l_weight, proj_l_bias, proj_w_weight,
                               proj_w_bias)
    if tuple(dout.shape) != (B, H, N, D):
        raise ValueError(f"dout: expected shape {(B, H, N, D)}, got {tuple(dout.shape)}")
    if stats.dtype != torch.float32 or tuple(stats.shape) != (B, H, N, 2) or \
            not stats.is_contiguous():
        raise ValueError(f"stats: expected a contiguous float32 {(B, H, N, 2)} tensor, got "
                         f"{stats.dtype} {tuple(stats.shape)} strides {stats.stride()}")
    dq, dk, dv = (torch.empty((B, H, N, D), device=q.device, dtype=q.dtype) for _ in range(3))
    dbl = torch.zeros_like(proj_l_bias)
    if dq.numel() == 0:
        return (dq, dk, dv, torch.zeros_like(proj_l_weight), dbl,
                torch.zeros_like(proj_w_weight), torch.zeros_like(proj_w_bias))
    block_h, block_d = _blocks(H, D)
    cfg = tile_config(block_h)
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    programs = B * triton.cdiv(N, cfg.block_n)
    dmix = torch.empty((programs, 2 * H + 1, H), device=q.device, dtype=torch.float32)
    common = dict(PRECISION=_precision(q.dtype), BLOCK_H=block_h, BLOCK_D=block_d,
                  **launch_options(cfg))
    _talking_heads_attention_bwd_dq_kernel[(B * triton.cdiv(N, cfg.block_m),)](
        q, k, v, proj_l_weight, proj_l_bias, proj_w_weight, dout, stats, delta, dq,
        float(scale), q.stride(), k.stride(), v.stride(), dout.stride(), dq.stride(), H, N, D,
        **common)
    _talking_heads_attention_bwd_dk_kernel[(programs,)](
        q, k, v, proj_l_weight, proj_l_bias, proj_w_weight, dout, stats, delta, dk, dmix,
        float(scale), q.stride(), k.stride(), v.stride(), dout.stride(), dk.stride(), H, N, D,
        **common)
    _talking_heads_attention_bwd_dv_kernel[(programs,)](
        q, k, proj_l_weight, proj_l_bias, proj_w_weight, proj_w_bias, dout, stats, dv,
        float(scale), q.stride(), k.stride(), dout.stride(), dv.stride(), H, N, D, **common)
    # Fixed-order sum of the programs' partials: deterministic. (Copies: outputs of a
    # custom op must not be views of one another.)
    total = dmix.sum(0)
    return (dq, dk, dv, total[:H].to(proj_l_weight.dtype, copy=True), dbl,
            total[H:2 * H].to(proj_w_weight.dtype, copy=True),
            total[2 * H].to(proj_w_bias.dtype, copy=True))
