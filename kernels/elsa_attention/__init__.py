"""Triton ELSA local aggregation, forward and backward: the launchers and their tile
configurations. The kernels are in ``_aggregate`` (forward and dv: one gather),
``_attn_grad`` (dattn, dM / dD partial rows and their sum) and ``_softmax`` (the fused
softmax they share); docs/design/elsa_attention.md explains the design."""
from typing import NamedTuple

import torch
import triton

from pyvit_ops.capabilities import capability
from pyvit_ops.kernels._common import (check_int32, effective_dilation, elsa_memory_format,
                                       on_tensor_device)
# The ops layer asks the kernels module why it cannot index a call.
from pyvit_ops.kernels._common import int32_reasons  # noqa: F401
from pyvit_ops.kernels.elsa_attention._aggregate import _elsa_attention_aggregate_kernel
from pyvit_ops.kernels.elsa_attention._attn_grad import (_elsa_attention_bwd_attn_kernel,
                                                         _elsa_attention_bwd_ghost_kernel)

_NUM_STAGES = 1  # nothing to software-pipeline: no tl.dot, loads are gathers
_MAX_TILE_CL = 1024  # BLOCK_C * BLOCK_P of the channels_last aggregation kernel
_CL_PIXELS = (64, 32, 16, 8)  # their BLOCK_P candidates, largest first
_MAX_TILE_ATTN = 4096  # K_PAD * BLOCK_C * BLOCK_P of the attn-gradient kernel
# BLOCK_C = next_pow2(C / G) must hold one head.
MAX_HEAD_CHANNELS = capability("elsa_attention", "triton").limit("head_channels").value
_TARGET_PROGRAMS = 1024  # attn-gradient kernel: ~8 waves on 132 SMs, few partial rows
_MIN_ITEMS = 8  # attn-gradient kernel: (sample, pixel tile) pairs per partial row, at least
_GHOST_BLOCK = 1024  # C*K*K is 4.7K-25K at ELSA-Swin: a few programs, vector loads
_GHOST_WARPS = 4


class TileConfig(NamedTuple):
    block_c: int
    block_p: int          # aggregation kernel (forward and dv)
    num_warps: int
    block_p_attn: int     # attn-gradient kernel, whose tile also spans a row of taps
    num_warps_attn: int


def tile_config(CG, HW, K, channels_last):
    """Tiles of the programs: always the whole head (``BLOCK_C = next_pow2(CG)``, >= 8).

    Forward / dv, (channels, pixels) tiles: NCHW, 32 pixels (one warp's lanes along W,
    warps along channels, <= 2K elements); channels_last, <= 1K elements, head vectors
    per thread, the most pixels that pad the H*W plane by at most 1/8 (56²: 32, 28²:
    32, 14²: 16). Attn-gradient kernel: (row taps, pixels, channels) tiles of ~4K
    elements, 8 per thread at 16 warps (it keeps two accumulators per element), 8
    warps for heads of more than 32 channels. Every config is spill-free on sm_80 /
    sm_90a (``pyvit_ops.testing.specs.elsa_attention`` lists them)."""
    block_c = max(triton.next_power_of_2(CG), 8)
    block_p = 32
    if channels_last:
        fits = [p for p in _CL_PIXELS if block_c * p <= _MAX_TILE_CL]
        block_p = next((p for p in fits if triton.cdiv(HW, p) * p * 8 <= HW * 9), fits[-1])
    return _tile(block_c, block_p, K)


def _tile(block_c, block_p, K):
    k_pad = triton.next_power_of_2(K)
    block_p_attn = max(_MAX_TILE_ATTN // (k_pad * block_c), 4)
    warps_attn = min(max(k_pad * block_c * block_p_attn // 256, 1), 16 if block_c <= 32 else 8)
    return TileConfig(block_c, block_p, min(max(block_c * block_p // 256, 1), 8),
                      block_p_attn, warps_attn)


def launch_options(num_warps):
    """Launch options of a kernel run with ``num_warps`` warps. ``maxnreg`` is the
    hardware limit for that block size: without it ptxas trades a few spilled
    registers for occupancy on its own (seen on sm_80 / sm_90a at 40-128 registers)."""
    return {"num_warps": num_warps, "num_stages": _NUM_STAGES,
            "maxnreg": min(255, 65536 // (32 * num_warps))}


class _Problem(NamedTuple):
    """Sizes, layout and tiles of a call."""
    B: int
    C: int
    H: int
    W: int
    G: int                # heads
    channels_last: bool
    tile: TileConfig


def _problem(v, attn, kernel_size):
    B, C, H, W = v.shape
    G = attn.shape[1] // (kernel_size * kernel_size)
    channels_last = elsa_memory_format(v) == torch.channels_last
    return _Problem(B, C, H, W, G, channels_last,
                    tile_config(C // G, H * W, kernel_size, channels_last))


def _ghost_args(ghost, channels_last, placeholder):
    """(tensor, strides) of a ghost tensor for the kernels. For channels_last tiles a
    thread holds a vector of channels, so the (C, K, K) parameter is read through a
    (K, K, C)-contiguous copy (C*K*K elements, not data-sized) that makes the
    per-tap row M[:, ty, tx] one vector load instead of a load per channel."""
    if ghost is None:
        return placeholder, (0, 0, 0)
    if channels_last:
        ghost = ghost.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return ghost, ghost.stride()


def head_grid(B, G, HW, block_p):
    """Grid of the aggregation kernel (forward and dv): every (sample, head, pixel
    tile) on axis 0, whose limit is 2**31 - 1 programs (axes 1 and 2 stop at 65535)."""
    return (B * G * triton.cdiv(HW, block_p),)


def attn_grid(B, G, n_tiles, chunk, tile_chunk):
    """Grid of the attn-gradient kernel: (sample chunk, head, tile chunk) on axis 0."""
    return (triton.cdiv(B, chunk) * G * triton.cdiv(n_tiles, tile_chunk),)


def _empty_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device,
                       memory_format=elsa_memory_format(t))


@on_tensor_device
def elsa_attention_fwd(v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax):
    """ELSA aggregation; returns ``out`` (B, C, H, W) in v's dtype and memory format.
    Arguments are assumed validated (``pyvit_ops.ops.elsa_attention``)."""
    pb = _problem(v, attn, kernel_size)
    out = _empty_like(v)
    if out.numel() == 0:
        return out
    check_int32(v=v, attn=attn)
    mul, mul_strides = _ghost_args(ghost_mul, pb.channels_last, v)
    add, add_strides = _ghost_args(ghost_add, pb.channels_last, v)
    # No lse: the forward computes its normalisers (attn stands in for the pointer).
    _elsa_attention_aggregate_kernel[head_grid(pb.B, pb.G, pb.H * pb.W, pb.tile.block_p)](
        v, attn, mul, add, attn, out, pb.G, pb.C // pb.G, pb.H, pb.W,
        v.stride(), attn.stride(), mul_strides, add_strides, out.stride(),
        effective_dilation(dilation, pb.H, pb.W),
        K=kernel_size, HAS_MUL=ghost_mul is not None, HAS_ADD=ghost_add is not None,
        APPLY_SOFTMAX=apply_softmax, TRANSPOSED=False, CHANNELS_LAST=pb.channels_last,
        BLOCK_C=pb.tile.block_c, BLOCK_P=pb.tile.block_p, **launch_options(pb.tile.num_warps))
    return out


def work_chunks(B, n_tiles, G):
    """(samples, pixel tiles) per program of the attn-gradient kernel. Enough work items
    to keep about _TARGET_PROGRAMS programs, and at least _MIN_ITEMS: each program
    writes one fp32 (K*K, C) partial row of dM / dD, as many bytes as ~16 pixels'
    compulsory traffic, so a row must stand for many (sample, pixel) pairs. Samples
    first: a batch of at least that many items gets one tile per program; a smaller one
    all its samples and several tiles per program. Chunks are split evenly."""
    items = max(triton.cdiv(B * n_tiles * G, _TARGET_PROGRAMS), _MIN_ITEMS)
    if items <= B:
        return triton.cdiv(B, triton.cdiv(B, items)), 1
    tiles = min(n_tiles, triton.cdiv(items, B))
    return B, triton.cdiv(n_tiles, triton.cdiv(n_tiles, tiles))


def _ghost_grad(parts, ghost):
    out = torch.empty(ghost.shape, dtype=ghost.dtype, device=ghost.device)
    n = out.numel()
    _elsa_attention_bwd_ghost_kernel[(triton.cdiv(n, _GHOST_BLOCK),)](
        parts, out, parts.shape[0], n, BLOCK=_GHOST_BLOCK, **launch_options(_GHOST_WARPS))
    return out


def _launch_attn_grad(pb, dout, v, attn, mul, mul_strides, lse, dattn, need_dmul, need_dadd,
                      dilation, common):
    """The attn-gradient kernel: writes ``dattn`` (unless None) and, with the softmax,
    ``lse``; returns the fp32 partial rows of dM and dD (one element where not needed)."""
    scratch = lse.new_empty(1)  # for pointers a configuration does not read
    K = common["K"]
    n_tiles = triton.cdiv(pb.H * pb.W, pb.tile.block_p_attn)
    chunk, tile_chunk = work_chunks(pb.B, n_tiles, pb.G)
    parts = (triton.cdiv(n_tiles, tile_chunk) * triton.cdiv(pb.B, chunk), pb.C, K * K)
    part_mul = lse.new_empty(parts) if need_dmul else scratch
    part_add = lse.new_empty(parts) if need_dadd else scratch
    softmax_grad = dattn is not None and common["APPLY_SOFTMAX"]
    # sum_t p_t dp_t per pixel, for the softmax backward.
    dp_mean = lse.new_empty((pb.B, pb.G, pb.H * pb.W)) if softmax_grad else scratch
    da = attn if dattn is None else dattn
    _elsa_attention_bwd_attn_kernel[attn_grid(pb.B, pb.G, n_tiles, chunk, tile_chunk)](
        dout, v, attn, mul, da, lse, dp_mean, part_mul, part_add,
        pb.B, pb.G, pb.C, pb.C // pb.G, pb.H, pb.W, chunk, tile_chunk,
        dout.stride(), v.stride(), attn.stride(), mul_strides, da.stride(), dilation,
        NEED_DATTN=dattn is not None, NEED_DMUL=need_dmul, NEED_DADD=need_dadd,
        K_PAD=triton.next_power_of_2(K), BLOCK_P=pb.tile.block_p_attn,
        **launch_options(pb.tile.num_warps_attn), **common)
    return part_mul, part_add


@on_tensor_device
def elsa_attention_bwd(dout, v, attn, ghost_mul, ghost_add, kernel_size, dilation, apply_softmax,
                       needs_input_grad):
    """Gradients ``(dv, dattn, dmul, dadd)`` of ``elsa_attention_fwd``; an entry is
    None when ``needs_input_grad`` (4 bools, in that order) says it is not needed or
    its ghost tensor is None. Deterministic: no atomics, fixed-order reductions."""
    pb = _problem(v, attn, kernel_size)
    dilation = effective_dilation(dilation, pb.H, pb.W)
    need_dv, need_dattn, need_dmul, need_dadd = (bool(n) for n in needs_input_grad)
    need_dmul = need_dmul and ghost_mul is not None
    need_dadd = need_dadd and ghost_add is not None
    dv = _empty_like(v) if need_dv else None
    dattn = _empty_like(attn) if need_dattn else None
    if v.numel() == 0:
        # Nothing aggregated (B, C or H*W is 0): a gradient with elements is zero.
        return (dv, dattn.zero_() if need_dattn else None,
                torch.zeros_like(ghost_mul) if need_dmul else None,
                torch.zeros_like(ghost_add) if need_dadd else None)
    check_int32(dout=dout, v=v, attn=attn)
    mul, mul_strides = _ghost_args(ghost_mul, pb.channels_last, v)
    # Per-pixel softmax normaliser (m, log_s), written by the attn kernel, read by the dv
    # kernel.
    lse = torch.empty((pb.B, pb.G, 2, pb.H * pb.W) if apply_softmax else (1,),
                      dtype=torch.float32, device=v.device)
    common = dict(K=kernel_size, HAS_MUL=ghost_mul is not None, APPLY_SOFTMAX=apply_softmax,
                  CHANNELS_LAST=pb.channels_last, BLOCK_C=pb.tile.block_c)
    dmul = dadd = None
    if need_dattn or need_dmul or need_dadd or (need_dv and apply_softmax):
        part_mul, part_add = _launch_attn_grad(pb, dout, v, attn, mul, mul_strides, lse, dattn,
                                               need_dmul, need_dadd, dilation, common)
        dmul = _ghost_grad(part_mul, ghost_mul) if need_dmul else None
        dadd = _ghost_grad(part_add, ghost_add) if need_dadd else None
    if need_dv:
        add, add_strides = _ghost_args(ghost_add, pb.channels_last, v)
        _elsa_attention_aggregate_kernel[head_grid(pb.B, pb.G, pb.H * pb.W, pb.tile.block_p)](
            dout, attn, mul, add, lse, dv, pb.G, pb.C // pb.G, pb.H, pb.W,
            dout.stride(), attn.stride(), mul_strides, add_strides, dv.stride(), dilation,
            HAS_ADD=ghost_add is not None, TRANSPOSED=True, BLOCK_P=pb.tile.block_p,
            **launch_options(pb.tile.num_warps), **common)
    return dv, dattn, dmul, dadd
