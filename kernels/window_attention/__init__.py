"""Triton Swin window attention (W-MSA / SW-MSA), forward and backward: the launchers
and their configurations; semantics: ``pyvit_ops.reference.window_attention``. The kernels
are in ``_single_tile`` (a window in one score tile), ``_tiled`` (larger windows, walked
in blocks), ``_dtable`` (the table gradient) and ``_helpers`` (the jit helpers they
share); docs/design/window_attention.md explains the design."""
import math
from typing import NamedTuple

import torch
import triton

from pyvit_ops.capabilities import capability
from pyvit_ops.kernels._common import (DTYPE_NAMES, check_int32, int32_reasons as _int32_reasons,
                                       on_tensor_device, sm_count)

from ._dtable import _window_attention_dtable_kernel
from ._helpers import _BIAS, _DKV, _DQ, _PAD, _QKV
from ._single_tile import _window_attention_bwd_kernel, _window_attention_fwd_kernel
from ._tiled import _window_attention_bwd_tiled_kernel, _window_attention_fwd_tiled_kernel

_LIMITS = capability("window_attention", "triton")
# Windows over 64 tokens take the tiled kernels.
MAX_WINDOW_AREA = _LIMITS.limit("window_area").value
MAX_HEAD_DIM = _LIMITS.limit("head_dim").value


def max_head_dim_fp32(window_area):
    """Largest float32 head dim the kernels take for windows of ``window_area`` tokens
    (fp32 tiles are twice the size: D = 128 spills, and past the first window-area
    bucket D = 64 does too)."""
    return _LIMITS.limit("float32_head_dim").bound(window_area)


_FP32 = ("fp32", "fp32x3")  # float32 config keys (see _dtype_name)
_SPEC_DTYPES = ("fp16", "bf16") + _FP32
_BLOCK_NS = (32, 64)          # window-area buckets (7x7 -> 64)
_BLOCK_DS = (32, 64, 128)     # head-dim buckets (masked loads: 48, 80, 96 cost no extra bytes)


class TiledConfig(NamedTuple):
    """Blocks and launch options of a tiled launch."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _config(block_n, block_d, dtype_name, backward, arch, cosine=False):
    """(num_warps, num_stages) of a single-tile launch: the most tile per thread and the
    deepest pipeline without spills on sm_80 / sm_90a (docs/design/window_attention.md,
    "Configurations"). The cosine backward (``cosine``) holds norms and normalised
    operands besides: 8 warps at head dim 128, for 3xTF32 and for float32 at 64, no
    pipeline."""
    if block_n == 32:
        warps = 8 if cosine and backward and (block_d == 128 or dtype_name == "fp32x3" or (
            dtype_name in _FP32 and block_d == 64)) else 4
    elif backward:
        warps = 4 if block_d == 32 and dtype_name not in _FP32 else 8
    else:
        warps = 8 if block_d == 128 else 4
    if not backward:
        return warps, 2
    if cosine:
        return warps, 1
    # 3xTF32 spills with the prefetch buffers too.
    pipelined = arch >= 90 and block_n == 32 and block_d <= 64 and dtype_name != "fp32x3"
    return warps, 2 if pipelined else 1


# (BLOCK_D, PASS; None: the forward) -> (BLOCK_M, BLOCK_N) of the tiled kernels: the
# largest blocks without spills on sm_80 and sm_90a with 4 warps.
_TILED_BLOCKS = {
    (32, None): (64, 32), (64, None): (64, 32), (128, None): (32, 32),
    (32, _DQ.value): (64, 32), (64, _DQ.value): (64, 32), (128, _DQ.value): (32, 32),
    (32, _DKV.value): (32, 64), (64, _DKV.value): (32, 32), (128, _DKV.value): (32, 32),
    (32, _BIAS.value): (64, 32), (64, _BIAS.value): (64, 32), (128, _BIAS.value): (64, 32),
}


def _tiled_config(block_d, dtype_name, pass_, cosine=False):
    """The ``TiledConfig`` of a tiled launch (``pass_`` None: the forward, whose key loop
    is pipelined), the same on both archs. Exceptions to ``_TILED_BLOCKS``, each to stay
    spill-free: half-precision dq at D = 32 takes 32-query blocks; 3xTF32 takes 16-key
    dk / dv blocks and 8 warps in the forward; dq and dk / dv take 8 warps in float32,
    at D = 64 and for 32 x 64 blocks. Cosine attention (``cosine``): every backward pass
    takes the same blocks (they divide by the probability sums of the ``_DQ`` pass's
    tiles), 32 x 32, or 32 x 16 (8 warps) in float32 and at D = 128, with 8 warps for
    32 x 32 dk / dv; the forward at D = 64 takes 32 x 32 and 8 warps."""
    if cosine and pass_ is not None:
        narrow = dtype_name in _FP32 or block_d == 128
        warps = 8 if pass_ == (_DQ.value if narrow else _DKV.value) or narrow else 4
        return TiledConfig(32, 16 if narrow else 32, warps, 1)
    if cosine and block_d == 64:
        return TiledConfig(32, 32, 8, 2)
    if dtype_name == "fp32x3" and pass_ == _DKV.value:
        return TiledConfig(32, 16, 8, 1)
    blocks = (32, 64) if dtype_name not in _FP32 and (block_d, pass_) == (32, _DQ.value) \
        else _TILED_BLOCKS[block_d, pass_]
    wide = pass_ in (_DQ.value, _DKV.value) and (dtype_name in _FP32 or blocks == (32, 64)
                                                 or block_d == 64)
    warps = 8 if dtype_name == "fp32x3" and pass_ is None or wide else 4
    return TiledConfig(*blocks, warps, 2 if pass_ is None else 1)


def _split_bias(block_n, block_d, dtype_name, cosine=False, grid_partition=False):
    """Whether dbias takes its own pass: its ``BLOCK_N x BLOCK_N`` fp32 accumulator, live
    across the window loop, fits beside the dq / dk / dv products of 64-token windows
    only at half-precision head dim 32 with block partitions (Swin), beside 32-token
    windows except with 3xTF32; never beside the cosine backward's."""
    if cosine:
        return True
    if block_n > _BLOCK_NS[0]:
        return block_d > 32 or dtype_name in _FP32 or grid_partition
    return dtype_name == "fp32x3"


def _bwd_passes(block_n, block_d, dtype_name, bias_grad, pad_grad, cosine=False,
                grid_partition=False):
    """(PASS, BIAS_GRAD) of every backward launch, in order."""
    split = bias_grad and _split_bias(block_n, block_d, dtype_name, cosine, grid_partition)
    passes = [(_QKV.value, bias_grad and not split)]
    if split:
        passes.append((_BIAS.value, True))
    if pad_grad:
        passes.append((_PAD.value, False))
    return passes


def _chunk(block_d, pass_):
    """BLOCK_K, the head-dim chunk of the ``_PAD`` / ``_BIAS`` passes (``_QKV`` takes
    the whole head dim); chunks of 64 spill at head dim 64 on sm_80."""
    return block_d if pass_ == _QKV.value else min(block_d, 32)


def _arch(device):
    """90 for H100 and newer, else 80 (A100, and the interpreter): the config row."""
    if device.type != "cuda":
        return 80
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _pairs_block(N):
    """BLOCK_P of the dtable kernel: the pairs of a table row (at most N)."""
    return max(_BLOCK_NS[0], triton.next_power_of_2(N))


def _dtable_rows(block_p):
    """BLOCK_R, table rows per dtable program (7x7: 169 rows -> 6 programs): at most
    2048 pairs, 16 per thread of 4 warps (their addresses are 64-bit: a 32 x 256 tile
    spills, 32 x 128 takes 208 registers)."""
    return min(32, 2048 // block_p)


def _tiled(N, dtype_name, cosine=False):
    """Whether windows of N tokens take the tiled kernels: past 64 tokens, and with
    3xTF32 or cosine attention past 32 (a 64-token tile spills there)."""
    narrow = dtype_name == "fp32x3" or cosine
    return N > (_BLOCK_NS[0] if narrow else _BLOCK_NS[-1])


def _blocks(N, D):
    """(BLOCK_N, BLOCK_D); BLOCK_N is the block of the tiled kernels past 64 tokens."""
    block_n = next((b for b in _BLOCK_NS if b >= N), _BLOCK_NS[-1])
    block_d = next(b for b in _BLOCK_DS if b >= D)
    return block_n, block_d


def tf32_allowed():
    """Whether torch lets float32 matmuls run on TF32 tensor cores. Read through
    ``torch.backends.cuda.matmul.fp32_precision``, which is "tf32" however it was allowed
    (that flag, ``torch.backends.fp32_precision``, the legacy ``allow_tf32`` or
    ``torch.set_float32_matmul_precision``); ``allow_tf32`` itself raises once both
    APIs were used."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _dtype_name(dtype):
    """The config key of a call, chosen per call: its dtype's name, or "fp32x3" for
    float32 inputs while torch does not allow TF32: their products run 3xTF32
    (float32-grade, as torch's default float32 matmuls), whose split operands take more
    registers than plain TF32's."""
    if dtype == torch.float32 and not tf32_allowed():
        return "fp32x3"
    return DTYPE_NAMES[dtype]


def _precision(dtype_name):
    """``input_precision`` of every ``tl.dot`` for a config key: 3xTF32 for "fp32x3",
    else TF32 (half-precision operands are exact in it)."""
    return "tf32x3" if dtype_name == "fp32x3" else "tf32"


class _Layout(NamedTuple):
    """Shape and strides of a tensor the launchers allocate, checked before allocating."""
    shape: tuple
    strides: tuple

    def stride(self):
        return self.strides


def int32_reasons(q, k, v, packed=False):
    """Why the kernels cannot index a call on q, k, v (of any device, meta included): in
    them or in what the launchers write, the contiguous output and gradients (``packed``:
    dq, dk, dv are the slices of one contiguous (B, H, W, 3, heads, D) gradient, whose
    span covers the output's)."""
    _, H, W, heads, D = q.shape
    token = (3 if packed else 1) * heads * D
    written = _Layout(q.shape, (H * W * token, W * token, token, D, 1))
    return _int32_reasons(q=q, k=k, v=v, **{"dq" if packed else "out": written})


class _Geometry(NamedTuple):
    """Sizes of a call: q's (B, H, W, heads, D), n_wh x n_ww windows per image of N
    tokens, and the kernels' size arguments (``grid_args``)."""
    B: int
    H: int
    W: int
    heads: int
    D: int
    n_wh: int
    n_ww: int
    N: int
    grid_args: tuple

    @property
    def num_windows(self):
        return self.B * self.n_wh * self.n_ww


def _geometry(q, window_size, shift_size):
    B, H, W, heads, D = q.shape
    (wh, ww), (sh, sw) = window_size, shift_size
    n_wh, n_ww = triton.cdiv(H, wh), triton.cdiv(W, ww)
    return _Geometry(B, H, W, heads, D, n_wh, n_ww, wh * ww,
                     (B, H, W, n_wh, n_ww, heads, D))


def _table_arg(table, device):
    """The contiguous table the kernels gather the bias from (a few KB); a dummy when None."""
    if table is None:
        return torch.empty(0, dtype=torch.float32, device=device)
    return table.contiguous()


def _pad_rows(pad, q):
    """Pad vector in q's dtype (timm's projection of the zero padding is in that dtype)."""
    heads, D = q.shape[3:]
    if pad is None:
        return torch.zeros(heads, D, dtype=q.dtype, device=q.device)
    return pad.to(q.dtype).contiguous()


class _Groups(NamedTuple):
    """How a launch splits the windows: ``per_program`` consecutive windows of one kind
    per program, ``programs`` per kind (interior, last row, last column, corner)."""
    per_program: int
    programs: list


def _window_groups(g, device, tiles=1):
    """The ``_Groups`` of a call of geometry ``g``: a program walks windows of one kind
    (see ``_program_windows``) for one head (and, in the tiled kernels, one of ``tiles``
    blocks of them: the launch has ``tiles`` times the programs listed). About 8
    programs per SM on a GPU (docs/design/window_attention.md, "Work split"); 4 in the
    interpreter, so tests walk several windows per program, some with a ragged last
    group."""
    target = 8 * sm_count(device) if device.type == "cuda" else 4
    # At least one window per program: an empty batch launches nothing but still sizes
    # the (empty) partial buffers.
    per_program = max(1, triton.cdiv(g.num_windows,
                                     max(1, min(g.num_windows, target // (g.heads * tiles)))))
    kinds = (g.B * (g.n_wh - 1) * (g.n_ww - 1), g.B * (g.n_ww - 1), g.B * (g.n_wh - 1), g.B)
    return _Groups(per_program, [triton.cdiv(n, per_program) * g.heads for n in kinds])


def _scalar_args(window_size, shift_size, scale, mask_value, gain):
    """The kernels' ``window`` tuple (wh, ww, sh, sw) and score arguments. Cosine
    attention (``gain`` given) scales the cosine by the gain instead; its bias and mask
    enter the score accumulator in log2 units (1 / scale = log2 e)."""
    scale = math.log(2.0) if gain is not None else float(scale)
    return (*window_size, *shift_size), scale, 1.0 / scale, float(mask_value)


def _gain_arg(gain, device):
    """The float32 per-head gain the cosine kernels read (a dummy when None)."""
    if gain is None:
        return torch.empty(0, dtype=torch.float32, device=device)
    return gain.to(torch.float32).contiguous()


@on_tensor_device
def window_attention_fwd(q, k, v, table, pad_k, pad_v, window_size, shift_size, scale, mask_value,
                         gain=None, grid_partition=False):
    """Forward; returns ``out`` (contiguous (B, H, W, heads, D)) and ``lse`` (fp32,
    ``(num_windows, heads, N, 2)``: each score row's max and log2 of its sum, base 2).
    ``grid_partition``: windows of slots strided across the image (MaxViT's grid
    attention; H, W multiples of the window, no shift). Arguments are validated by the
    caller:
    window_size / shift_size are (h, w) pairs with shift < window <= grid,
    N <= ``MAX_WINDOW_AREA``, D <= 128, scale nonzero, table ((2wh-1)(2ww-1), heads) or
    None, pad_k / pad_v (heads, D) or None (zeros). ``gain``: None, or ``(heads,)``
    (float32): Swin V2's cosine attention, scores ``cos(q_i, k_j) * gain`` plus bias
    and mask (``scale`` unused), rows normalised as ``F.normalize`` does."""
    g = _geometry(q, window_size, shift_size)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(g.num_windows, g.heads, g.N, 2, dtype=torch.float32, device=q.device)
    check_int32(q=q, k=k, v=v, out=out)
    if out.numel() == 0:
        return out, lse
    block_n, block_d = _blocks(g.N, g.D)
    dtype_name = _dtype_name(q.dtype)
    if _tiled(g.N, dtype_name, gain is not None):
        kernel = _window_attention_fwd_tiled_kernel
        block_m, block_n, num_warps, num_stages = _tiled_config(block_d, dtype_name, None,
                                                                gain is not None)
        tiles = triton.cdiv(g.N, block_m)
        blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        tiles, kernel = 1, _window_attention_fwd_kernel
        num_warps, num_stages = _config(block_n, block_d, dtype_name, False, _arch(q.device),
                                        gain is not None)
        blocks = dict(BLOCK_N=block_n)
    groups = _window_groups(g, q.device, tiles)
    kernel[(sum(groups.programs) * tiles,)](
        q, k, v, _table_arg(table, q.device), _pad_rows(pad_k, q), _pad_rows(pad_v, q),
        _gain_arg(gain, q.device), out, lse, g.grid_args, groups.per_program,
        *_scalar_args(window_size, shift_size, scale, mask_value, gain),
        q.stride(), k.stride(), v.stride(),
        HAS_TABLE=table is not None, COSINE=gain is not None, GRID_PARTITION=grid_partition,
        BLOCK_D=block_d,
        PRECISION=_precision(dtype_name),
        **blocks, num_warps=num_warps, num_stages=num_stages)
    return out, lse


class _Partials(NamedTuple):
    """What the backward launches leave for the host: the partial dbias buffer, its
    number of program groups, and the fp32 pad gradient partials ``(groups, heads,
    slots, 2, D)``."""
    dbias: torch.Tensor
    groups: int
    dpad: torch.Tensor


def _bwd_single_tile(dout, q, k, v, lse, table, pad_k, pad_v, gain, dq, dk, dv, dlog_gain,
                     window_size, shift_size, scale, mask_value, grid_partition, want_bias,
                     want_pad, dtype_name):
    """Backward launches of windows of one tile (``_bwd_passes``; ``dtype_name``: the
    call's config key, ``_dtype_name``), returning their ``_Partials`` (no pad groups
    unless ``want_pad``).

    The pad gradients take their own launch over the last-row / last-column windows
    (the only ones with padded keys); it writes one partial per window, summed here in a
    fixed order."""
    g = _geometry(q, window_size, shift_size)
    per_program, programs = _window_groups(g, q.device)
    dbias = torch.empty(sum(programs) * g.N * g.N if want_bias else 0, dtype=torch.float32,
                        device=q.device)
    # One (dk, dv) pad partial per window slot of the pad launch's programs; slots past
    # a program's last window stay zero.
    dpad = torch.zeros(sum(programs[1:]) * per_program if want_pad else 0, 2, g.D,
                       dtype=torch.float32, device=q.device)
    block_n, block_d = _blocks(g.N, g.D)
    num_warps, num_stages = _config(block_n, block_d, dtype_name, True, _arch(q.device),
                                    gain is not None)
    args = (q, k, v, dout, lse, _table_arg(table, q.device),
            _pad_rows(pad_k, q), _pad_rows(pad_v, q), _gain_arg(gain, q.device), dq, dk, dv,
            dbias, dpad, dlog_gain, g.grid_args, per_program)
    rest = (*_scalar_args(window_size, shift_size, scale, mask_value, gain),
            q.stride(), k.stride(), v.stride(), dout.stride(), dq.stride(2))
    config = dict(HAS_TABLE=table is not None, COSINE=gain is not None,
                  GRID_PARTITION=grid_partition, BLOCK_N=block_n,
                  BLOCK_D=block_d, PRECISION=_precision(dtype_name), num_warps=num_warps,
                  num_stages=num_stages)
    for pass_, bias_grad in _bwd_passes(block_n, block_d, dtype_name, want_bias, want_pad,
                                        gain is not None, grid_partition):
        # The pad pass walks the last-row / last-column programs only.
        grid, first = ((sum(programs[1:]), programs[0]) if pass_ == _PAD.value
                       else (sum(programs), 0))
        _window_attention_bwd_kernel[(grid,)](
            *args, first, *rest, PASS=pass_, BIAS_GRAD=bias_grad,
            BLOCK_K=_chunk(block_d, pass_), **config)
    # Slots are (program, window of the program); heads vary fastest over programs.
    return _Partials(dbias, sum(programs) // g.heads,
                     dpad.view(-1, g.heads, per_program, 2, g.D))


def _tiled_passes(want_bias):
    """The PASS of each tiled backward launch, in order: dq first, since it stores the
    delta the others read."""
    return [_DQ.value, _DKV.value] + [_BIAS.value] * want_bias


def _tiles(N, pass_, block_m, block_n):
    """Programs per window group of a tiled launch: its query blocks, key blocks or
    (query, key) block pairs."""
    n_qb, n_kb = triton.cdiv(N, block_m), triton.cdiv(N, block_n)
    return {_DKV.value: n_kb, _BIAS.value: n_qb * n_kb}.get(pass_, n_qb)


class _TiledLaunch(NamedTuple):
    config: TiledConfig
    tiles: int            # programs per window group
    groups: _Groups


def _bwd_tiled(dout, q, k, v, lse, table, pad_k, pad_v, gain, dq, dk, dv, dlog_gain,
               window_size, shift_size, scale, mask_value, grid_partition, want_bias, want_pad,
               dtype_name):
    """Backward launches of the tiled kernels (``_tiled_passes``), returning their
    ``_Partials``. Each launch groups windows for its own tile count; the ``_DKV``
    launch writes one pad partial per program when ``want_pad``."""
    g = _geometry(q, window_size, shift_size)
    block_d = _blocks(g.N, g.D)[1]
    launches = {}
    for pass_ in _tiled_passes(True):
        config = _tiled_config(block_d, dtype_name, pass_, gain is not None)
        tiles = _tiles(g.N, pass_, config.block_m, config.block_n)
        launches[pass_] = _TiledLaunch(config, tiles, _window_groups(g, q.device, tiles))
    bias_programs = sum(launches[_BIAS.value].groups.programs)
    dbias = torch.empty(bias_programs * g.N * g.N if want_bias else 0, dtype=torch.float32,
                        device=q.device)
    kv = launches[_DKV.value]
    dpad = torch.empty(sum(kv.groups.programs) * kv.tiles if want_pad else 0, 2, g.D,
                       dtype=torch.float32, device=q.device)
    delta = torch.empty(g.num_windows, g.heads, g.N, dtype=torch.float32, device=q.device)
    # The cosine kernels' probability sums per query (see the tiled backward kernel).
    psum = torch.empty(delta.shape if gain is not None else 0, dtype=torch.float32,
                       device=q.device)
    args = (q, k, v, dout, lse, delta, psum, _table_arg(table, q.device),
            _pad_rows(pad_k, q), _pad_rows(pad_v, q), _gain_arg(gain, q.device), dq, dk, dv,
            dbias, dpad, dlog_gain, g.grid_args)
    rest = (*_scalar_args(window_size, shift_size, scale, mask_value, gain),
            q.stride(), k.stride(), v.stride(), dout.stride(), dq.stride(2))
    for pass_ in _tiled_passes(want_bias):
        config, tiles, groups = launches[pass_]
        _window_attention_bwd_tiled_kernel[(sum(groups.programs) * tiles,)](
            *args, groups.per_program, *rest, HAS_TABLE=table is not None,
            COSINE=gain is not None, GRID_PARTITION=grid_partition, PASS=pass_,
            PAD_GRAD=want_pad and pass_ == _DKV.value, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_D=block_d, PRECISION=_precision(dtype_name),
            num_warps=config.num_warps, num_stages=config.num_stages)
    # Programs are (group, head, key block) with the key block fastest.
    return _Partials(dbias, bias_programs // g.heads, dpad.view(-1, g.heads, kv.tiles, 2, g.D))


@on_tensor_device
def window_attention_bwd(dout, q, k, v, lse, table, pad_k, pad_v, window_size, shift_size,
                         scale, mask_value, needs_input_grad, dqkv=None, gain=None,
                         grid_partition=False):
    """Gradients ``(dq, dk, dv, dtable, dpad_k, dpad_v, dlog_gain)``; an entry is None
    when the matching flag of ``needs_input_grad`` (same order) is False, dlog_gain also
    without ``gain`` (the forward's). dq / dk / dv are contiguous (B, H, W, heads, D) in
    q's dtype or, when ``dqkv`` (a contiguous (B, H, W, 3, heads, D) tensor) is given,
    its three slices, written in place: the gradient of a packed projection, with no
    stack. dtable has the table's shape and dtype, dpad_k / dpad_v are (heads, D) in the
    pads' dtypes, dlog_gain is the gradient of log(gain), float32 ``(heads,)``.
    Deterministic.

    The pad gradients are computed only when the grid is padded (otherwise they are
    zero)."""
    _, H, W, heads, D = q.shape
    wh, ww = window_size
    N = wh * ww
    need_q, need_k, need_v, need_table, need_pad_k, need_pad_v, need_gain = needs_input_grad
    need_gain = need_gain and gain is not None
    if dqkv is None:
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    else:
        dq, dk, dv = dqkv.unbind(3)
    check_int32(q=q, k=k, v=v, dout=dout, dq=dq)
    if dq.numel() == 0:
        # No token (an empty batch or grid, or no head): nothing to launch, and the
        # parameters get zero gradients.
        def zeros(t, need):
            return torch.zeros(t.shape, dtype=t.dtype, device=t.device) \
                if need and t is not None else None

        return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
                zeros(table, need_table), zeros(pad_k, need_pad_k), zeros(pad_v, need_pad_v),
                zeros(gain, need_gain))
    want_bias = table is not None and need_table
    want_pad = (((need_pad_k and pad_k is not None) or (need_pad_v and pad_v is not None))
                and (H % wh != 0 or W % ww != 0))
    dtype_name = _dtype_name(q.dtype)
    # The cosine kernels write each query's share of the gradient of log(gain).
    dlog_gain = torch.empty(lse.shape[:-1] if gain is not None else 0, dtype=torch.float32,
                            device=q.device)
    if _tiled(N, dtype_name, gain is not None):
        partials = _bwd_tiled(dout, q, k, v, lse, table, pad_k, pad_v, gain, dq, dk, dv,
                              dlog_gain, window_size, shift_size, scale, mask_value,
                              grid_partition, want_bias, want_pad, dtype_name)
    else:
        partials = _bwd_single_tile(dout, q, k, v, lse, table, pad_k, pad_v, gain, dq, dk, dv,
                                    dlog_gain, window_size, shift_size, scale, mask_value,
                                    grid_partition, want_bias, want_pad, dtype_name)
    dtable = None
    if want_bias:
        # One pass over the partials, straight into the table's (rows, heads) layout and dtype.
        rows = (2 * wh - 1) * (2 * ww - 1)
        dtable = torch.empty(rows, heads, dtype=table.dtype, device=q.device)
        block_p = _pairs_block(N)
        block_r = _dtable_rows(block_p)
        _window_attention_dtable_kernel[(heads, triton.cdiv(rows, block_r))](
            partials.dbias, dtable, partials.groups, heads, rows, wh, ww,
            BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4,
            num_stages=1)
    dpad_k = dpad_v = None
    if need_pad_k and pad_k is not None:
        dpad_k = partials.dpad[:, :, :, 0].sum((0, 2))
        if gain is not None:
            dpad_k = _through_normalize(_pad_rows(pad_k, q), dpad_k)
        dpad_k = dpad_k.to(pad_k.dtype)
    if need_pad_v and pad_v is not None:
        dpad_v = partials.dpad[:, :, :, 1].sum((0, 2)).to(pad_v.dtype)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None, dtable,
            dpad_k, dpad_v, dlog_gain.sum((0, 2)) if need_gain else None)


def _through_normalize(x, dx_hat):
    """The gradient of rows ``x`` from ``dx_hat``, the gradient of their
    ``F.normalize`` (eps 1e-12; at a norm below it the norm is the constant eps): the
    cosine kernels sum the pad key's gradient over its slots before its normalisation.
    The kernels' ``_normalize_bwd`` on the host (a custom op's body records no graph)."""
    x = x.to(torch.float32)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    r = 1.0 / norm.clamp_min(1e-12)
    x_hat = x * r
    radial = torch.where(norm >= 1e-12, (x_hat * dx_hat).sum(-1, keepdim=True), 0.0)
    return (dx_hat - radial * x_hat) * r
