"""Triton scaled dot-product attention (flash-style), forward and backward: the launchers
and their tile configurations. The kernels are in ``_forward`` (forward), ``_backward``
(dq with delta, dk/dv), ``_dropout`` (the keep mask and its kernel) and ``_tiles`` (the
tile math they share); docs/design/scaled_dot_product_attention.md explains the design.

Layout contract of the launchers: q ``(Z1, Z2, Nq, D)``, k/v ``(Z1, Z2, Nk, D)``, any
strides; the bias is None or a ``(Z1, Z2, Nq, Nk)`` view whose broadcast dims have
stride 0, float (added to the logits) or bool (True = attend). With ``rel_pos_grid``
(gh, gw) the bias is instead timm's BEiT relative-position table as a ``(Z1, Z2, 1, T)``
view (the table's column of each batch element's head, stride 0 over the batch dims it
is shared by), gathered in the kernels by ``_rel_pos_index``."""
import math
from typing import NamedTuple

import torch
import triton

from pyvit_ops.capabilities import capability
from pyvit_ops.kernels._common import on_tensor_device, sample_span, sm_count
from pyvit_ops.reference.scaled_dot_product_attention import rel_pos_rows

from ._backward import (_scaled_dot_product_attention_bwd_dkdv_kernel,
                        _scaled_dot_product_attention_bwd_dq_kernel)
from ._dropout import _scaled_dot_product_attention_dropout_mask_kernel
from ._dtable import _scaled_dot_product_attention_dtable_kernel
from ._forward import _scaled_dot_product_attention_fwd_kernel

# Head dims padded to the next power of two (masked), at most this.
MAX_HEAD_DIM = capability("scaled_dot_product_attention", "triton").limit("head_dim").value
# SMs of the GPU used to size the dbias batch split when the device is not CUDA
# (interpreter); A100 has 108, H100 132.
_DEFAULT_SMS = 108
BIAS_NONE, BIAS_FLOAT, BIAS_BOOL, BIAS_TABLE = 0, 1, 2, 3
# Register cap passed to ptxas (.maxnreg) for the attention kernels: without it ptxas
# sometimes settles at 96-168 registers and spills a few values in these loops.
_MAXNREG = 255
# Offsets within one batch element from this on need the kernels' OFFS64 variant.
_INT32_OFFSETS = 2 ** 31
_MASK_BLOCK = 1024


class TileConfig(NamedTuple):
    """Tiles and launch shape of an attention kernel."""
    block_m: int          # queries per tile
    block_n: int          # keys per tile
    num_warps: int
    num_stages: int


def launch_options(cfg):
    """Launch options of an attention kernel with tile config ``cfg``."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, maxnreg=_MAXNREG)


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _precision(dtype):
    # fp32 inputs: 3xTF32 keeps ~fp32 accuracy while still using tensor cores.
    return "tf32x3" if dtype == torch.float32 else "tf32"


# Tile configs: measured points, spill-free on sm_80 / sm_90a in the light and the
# heaviest variant of every config (pyvit_ops.testing.specs.scaled_dot_product_attention).

def _fwd_config(Nq, block_d, dtype, offs64=False, table=False):
    """The forward kernel's tiles; ``offs64``: its 64-bit-offset variant; ``table``: its
    relative-position-table variant."""
    if dtype == torch.float32:
        return TileConfig(16, 32, 4, 2) if Nq <= 16 or block_d >= 64 else TileConfig(64, 32, 4, 2)
    if Nq <= 16:  # CaiT class attention (Nq = 1): the smallest tl.dot tile
        return TileConfig(16, 64, 4, 2)
    block_n = 32 if block_d == 128 else 64
    # (64-bit K / V tile offsets spill at 64 x 64 (d64), 64 x 32 (d128) on sm_80, and so
    # does the table's index tile at 128 x 64 (d64))
    if offs64 or table:
        block_n //= 2
    # ViT N = 197 / 577: 128 queries per program (8 warps).
    return TileConfig(64, block_n, 4, 2) if Nq <= 64 else TileConfig(128, block_n, 8, 2)


def _dq_config(Nq, block_d, dtype, direct=False):
    """The dq kernel's tiles (queries per program, keys per step); ``direct``: the
    variant storing dbias into the user-shaped (unaligned) rows."""
    if dtype == torch.float32:
        # (8 warps at head dim 128: 16 x 32 is the point measured without spills; 16 x 16
        # spills on sm_80 with delta's pass, 4 or 16 warps on sm_90a)
        return TileConfig(16, 32, 8, 1) if block_d == 128 else TileConfig(16, 32, 4, 1)
    if Nq <= 16 or block_d == 128:
        return TileConfig(16, 64, 4, 1)
    # (the unaligned dbias store spills at 64 x 32 on sm_80; 16 keys per step fit)
    return TileConfig(64, 16, 4, 1) if direct else TileConfig(64, 32, 4, 1)


def _dkdv_config(block_d, dtype):
    """The dk/dv kernel's tiles (queries per step, keys per program)."""
    if dtype == torch.float32:
        return TileConfig(16, 16, 8, 1) if block_d == 128 else TileConfig(16, 16, 4, 1)
    return TileConfig(16, 32, 4, 1) if block_d == 128 else TileConfig(16, 128, 8, 1)


class _Bias(NamedTuple):
    """The bias as the kernels take it: a tensor (q for none), its strides, its kind."""
    tensor: torch.Tensor
    strides: tuple
    kind: int


def _bias_args(bias, like, rel_pos_grid=None):
    if bias is None:
        return _Bias(like, (0, 0, 0, 0), BIAS_NONE)
    if rel_pos_grid:
        return _Bias(bias, bias.stride(), BIAS_TABLE)
    if bias.dtype == torch.bool:  # read as bytes
        return _Bias(bias.view(torch.uint8), bias.stride(), BIAS_BOOL)
    return _Bias(bias, bias.stride(), BIAS_FLOAT)


def _offs64(*tensors):
    """Whether an offset within one batch element (all dims but the two batch dims, the
    4th and 3rd from last) of one of ``tensors`` reaches ``_INT32_OFFSETS``."""
    return any(sample_span(t, (t.dim() - 4, t.dim() - 3)) >= _INT32_OFFSETS
               for t in tensors if t is not None)


class _Sizes(NamedTuple):
    Z1: int
    Z2: int
    Nq: int
    Nk: int
    D: int


def _grid_arg(rel_pos_grid, Nq):
    """The kernels' ``rel_pos_grid`` (gh, gw, class tokens); (1, 1, 0) without a table."""
    if not rel_pos_grid:
        return (1, 1, 0)
    gh, gw = rel_pos_grid
    return (gh, gw, Nq - gh * gw)


def _check_inputs(q, k, v, bias, rel_pos_grid=None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-D (Z1, Z2, N, D) tensors, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    Z1, Z2, Nq, D = q.shape
    Nk = k.shape[2]
    if tuple(k.shape) != (Z1, Z2, Nk, D) or tuple(v.shape) != (Z1, Z2, Nk, D):
        raise ValueError(f"k, v: expected shape ({Z1}, {Z2}, Nk, {D}), got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be <= {MAX_HEAD_DIM}, got {D}")
    if rel_pos_grid:
        gh, gw = rel_pos_grid
        lead = Nq - gh * gw
        if Nk != Nq or lead not in (0, 1) or bias is None or \
                tuple(bias.shape) != (Z1, Z2, 1, rel_pos_rows(gh, gw, lead)):
            raise ValueError(f"bias: expected a relative-position table view "
                             f"({Z1}, {Z2}, 1, T) for Nq = Nk = {gh} * {gw} (+ 1 class "
                             f"token), got Nq {Nq}, Nk {Nk}, table "
                             f"{None if bias is None else tuple(bias.shape)}")
    elif bias is not None and tuple(bias.shape) != (Z1, Z2, Nq, Nk):
        raise ValueError(f"bias: expected a ({Z1}, {Z2}, {Nq}, {Nk}) view, got {tuple(bias.shape)}")
    return _Sizes(Z1, Z2, Nq, Nk, D)


def _check_seed(seed, device=None):
    """``seed``: a one-element int64 tensor, on ``device`` unless it is None."""
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64
            and seed.numel() == 1 and device in (None, seed.device)):
        got = (f"a {seed.dtype} tensor of shape {tuple(seed.shape)} on {seed.device}"
               if isinstance(seed, torch.Tensor) else type(seed).__name__)
        where = "" if device is None else f" on {device}"
        raise ValueError(f"seed: expected a one-element int64 tensor{where}, got {got}")


class _Dropout(NamedTuple):
    """The kernels' dropout arguments: DROPOUT, the seed tensor, p and 1 / (1 - p)."""
    enabled: bool
    seed: torch.Tensor
    p: float
    scale: float


def _dropout_args(dropout_p, seed, q, Nk):
    """Without dropout no kernel reads the seed: q stands in for it (as for an absent bias)."""
    if dropout_p <= 0.0:
        return _Dropout(False, q, 0.0, 1.0)
    Nq = q.shape[2]
    if Nq * Nk >= 2 ** 31:
        raise ValueError(f"dropout: Nq * Nk must be < 2**31, got {Nq} * {Nk}")
    _check_seed(seed, q.device)
    scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return _Dropout(True, seed, float(dropout_p), scale)


@on_tensor_device
def scaled_dot_product_attention_fwd(q, k, v, bias, scale, dropout_p=0.0, seed=None,
                                     rel_pos_grid=None):
    """Forward launcher: returns ``(out (Z1, Z2, Nq, D) in q's dtype, lse (Z1, Z2, Nq, 2)
    fp32)``, lse holding each row's max logit and log2 of its sum of exponentials (kept
    apart: see docs/design/scaled_dot_product_attention.md). ``seed``: with dropout, a
    one-element int64 tensor on q's device; ``rel_pos_grid``: (gh, gw) when the bias is a
    relative-position table (module docstring)."""
    sz = _check_inputs(q, k, v, bias, rel_pos_grid)
    out = torch.empty((sz.Z1, sz.Z2, sz.Nq, sz.D), device=q.device, dtype=q.dtype)
    lse = torch.empty((sz.Z1, sz.Z2, sz.Nq, 2), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    block_d = _block_d(sz.D)
    offs64 = _offs64(q, k, v, bias, out)
    cfg = _fwd_config(sz.Nq, block_d, q.dtype, offs64, bool(rel_pos_grid))
    b = _bias_args(bias, q, rel_pos_grid)
    drop = _dropout_args(dropout_p, seed, q, sz.Nk)
    grid = (triton.cdiv(sz.Nq, cfg.block_m) * sz.Z1 * sz.Z2,)
    _scaled_dot_product_attention_fwd_kernel[grid](
        q, k, v, b.tensor, out, lse, drop.seed, float(scale), drop.p, drop.scale,
        q.stride(), k.stride(), v.stride(), b.strides, out.stride(), sz.Z2, sz.Nq, sz.Nk, sz.D,
        _grid_arg(rel_pos_grid, sz.Nq), BIAS=b.kind, DROPOUT=drop.enabled,
        PRECISION=_precision(q.dtype), OFFS64=offs64,
        BLOCK_D=block_d, **launch_options(cfg))
    return out, lse


def _num_sms(device):
    return sm_count(device) if device.type == "cuda" else _DEFAULT_SMS


class _BatchPlan:
    """How a backward kernel walks the batch: NG groups (the batch dims the bias is not
    broadcast over) x ``splits`` chunks of ``chunk`` broadcast indices (NB in all)."""

    def __init__(self, Z1, Z2, bcast1=False, bcast2=False, blocks=1, device=None):
        self.bcast1, self.bcast2 = bcast1, bcast2
        self.nb = (Z1 if bcast1 else 1) * (Z2 if bcast2 else 1)
        self.ng = Z1 * Z2 // self.nb
        # Split the broadcast batch over programs until the GPU holds 2 per SM; each
        # split is one partial dbias in the fp32 buffer, so its size stays bounded.
        splits = 1 if self.nb == 1 else min(
            self.nb, max(1, triton.cdiv(2 * _num_sms(device), blocks * self.ng)))
        self.chunk = triton.cdiv(self.nb, splits)
        self.splits = triton.cdiv(self.nb, self.chunk)
        self.grid = (blocks * self.ng * self.splits,)

    def args(self):
        return self.ng, self.nb, self.chunk

    def flags(self):
        return dict(BCAST1=self.bcast1, BCAST2=self.bcast2)


class _DBias(NamedTuple):
    """Where the backward reduces dbias: ``column`` (the dk/dv kernel, a bias broadcast
    over the queries), ``tile`` (the dq kernel), ``direct`` (the dq kernel stores the
    gradient itself); the DBias argument, its split stride and (z1, z2, m, n) strides."""
    column: bool
    tile: bool
    direct: bool
    buf: torch.Tensor
    split_stride: int
    strides: tuple


class _BackwardPlan(NamedTuple):
    dq: TileConfig
    dkdv: TileConfig
    dq_plan: _BatchPlan
    kv_plan: _BatchPlan
    db: _DBias


def _backward_plan(q, bias, bs, sz, block_d, red_shape, table=False):
    """Tiles, batch walks and the dbias reduction of a backward call (``red_shape``: the
    dbias shape, None when no reduction runs); a ``table`` gradient takes the dq kernel's
    fp32 tile partials, which the dtable kernel gathers."""
    dq_cfg, kv_cfg = _dq_config(sz.Nq, block_d, q.dtype), _dkdv_config(block_d, q.dtype)
    num_m, num_n = triton.cdiv(sz.Nq, dq_cfg.block_m), triton.cdiv(sz.Nk, kv_cfg.block_n)
    dq_plan = _BatchPlan(sz.Z1, sz.Z2, blocks=num_m)
    kv_plan = _BatchPlan(sz.Z1, sz.Z2, blocks=num_n)
    if red_shape is None:
        return _BackwardPlan(dq_cfg, kv_cfg, dq_plan, kv_plan,
                             _DBias(False, False, False, q, 0, (0, 0, 0, 0)))
    bcast = dict(bcast1=bs[0] == 0 and sz.Z1 > 1, bcast2=bs[1] == 0 and sz.Z2 > 1,
                 device=q.device)
    column = not table and bs[2] == 0 and sz.Nq > 1
    if column:
        kv_plan = plan = _BatchPlan(sz.Z1, sz.Z2, blocks=num_n, **bcast)
    else:
        dq_plan = plan = _BatchPlan(sz.Z1, sz.Z2, blocks=num_m, **bcast)
    # A half-precision bias tile summed over one batch index only: the dq kernel stores
    # the gradient itself, in the bias dtype and shape (an fp32 buffer is the gradient
    # already). Its tile config keeps the same query blocks, hence the same plan.
    if not (column or table) and plan.nb == 1 and torch.float32 not in (q.dtype, bias.dtype):
        buf = torch.empty(red_shape, device=q.device, dtype=bias.dtype)
        return _BackwardPlan(_dq_config(sz.Nq, block_d, q.dtype, direct=True), kv_cfg,
                             dq_plan, kv_plan,
                             _DBias(False, True, True, buf, 0, _reduced_strides(buf)))
    # fp32 partial sums, one per split, padded to whole dq tiles (unmasked read-add-write).
    rows = 1 if column else num_m * dq_cfg.block_m
    cols = sz.Nk if column else triton.cdiv(sz.Nk, dq_cfg.block_n) * dq_cfg.block_n
    buf = torch.empty((plan.splits,) + red_shape[:2] + (rows, cols), device=q.device,
                      dtype=torch.float32)
    return _BackwardPlan(dq_cfg, kv_cfg, dq_plan, kv_plan,
                         _DBias(column, not column, False, buf, buf.stride(0),
                                _reduced_strides(buf)))


def _check_backward(sz, dout, lse, bias, bias_requires_grad):
    shape = (sz.Z1, sz.Z2, sz.Nq, sz.D)
    if tuple(dout.shape) != shape:
        raise ValueError(f"dout: expected shape {shape}, got {tuple(dout.shape)}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != shape[:3] + (2,) or \
            not lse.is_contiguous():
        raise ValueError(f"lse: expected a contiguous float32 {shape[:3] + (2,)} tensor, "
                         f"got {lse.dtype} {tuple(lse.shape)} strides {lse.stride()}")
    if bias_requires_grad and (bias is None or bias.dtype == torch.bool):
        raise ValueError("bias_requires_grad: needs a float bias")


@on_tensor_device
def scaled_dot_product_attention_bwd(dout, q, k, v, lse, bias, scale, dropout_p=0.0,
                                     seed=None, bias_requires_grad=False, rel_pos_grid=None,
                                     grads=None):
    """Backward launcher: returns ``(dq, dk, dv, dbias)``: new contiguous tensors, or
    ``grads``, three tensors of the shapes of q, k, v (any strides, e.g. the slices of
    one packed qkv gradient), written in place.

    dbias is None unless ``bias_requires_grad``; then it has the bias view's
    non-broadcast shape (each dim with stride 0 and size > 1 reduced to 1), in the
    bias dtype (a table view's: ``(Z1 or 1, Z2 or 1, 1, T)``).
    """
    sz = _check_inputs(q, k, v, bias, rel_pos_grid)
    _check_backward(sz, dout, lse, bias, bias_requires_grad)
    dq, dk, dv = grads or (torch.empty_like(t, memory_format=torch.contiguous_format)
                           for t in (q, k, v))
    red_shape = None
    if bias_requires_grad:
        red_shape = tuple(1 if (st == 0 and n > 1) else n
                          for st, n in zip(bias.stride(), bias.shape))
    if dq.numel() == 0 or dk.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, _zero_dbias(red_shape, bias)

    block_d = _block_d(sz.D)
    b = _bias_args(bias, q, rel_pos_grid)
    drop = _dropout_args(dropout_p, seed, q, sz.Nk)
    # rowsum(P * dP): the dq kernel forms it, the dk/dv kernel reads it.
    delta = torch.empty(lse.shape[:-1], device=q.device, dtype=torch.float32)

    # A bias constant along the keys (stride 0 on Nk, or a single key) has an exactly
    # zero gradient (softmax is shift-invariant): zeros, without a kernel.
    # (a table's strides are not the logits': its gradient is zero with one key only)
    table = b.kind == BIAS_TABLE
    zero_dbias = bias_requires_grad and ((b.strides[3] == 0 and not table) or sz.Nk == 1)
    plan = _backward_plan(q, bias, b.strides, sz, block_d, None if zero_dbias else red_shape,
                          table)
    db = plan.db
    common = dict(BIAS=b.kind, DROPOUT=drop.enabled, PRECISION=_precision(q.dtype),
                  OFFS64=_offs64(q, k, v, bias, dout, dq, dk, dv,
                                 db.buf if db.column or db.tile else None),
                  BLOCK_D=block_d)
    inputs = (q, k, v, b.tensor, dout, lse, delta)
    strides = (q.stride(), k.stride(), v.stride(), b.strides, dout.stride())
    scalars = (drop.seed, float(scale), drop.p, drop.scale)
    grid_arg = _grid_arg(rel_pos_grid, sz.Nq)
    _scaled_dot_product_attention_bwd_dq_kernel[plan.dq_plan.grid](
        *inputs, dq, db.buf, *scalars, *strides, dq.stride(), db.split_stride, db.strides,
        sz.Z2, sz.Nq, sz.Nk, sz.D, *plan.dq_plan.args(), grid_arg, DBIAS=db.tile,
        DBIAS_DIRECT=db.direct, **plan.dq_plan.flags(), **common, **launch_options(plan.dq))
    _scaled_dot_product_attention_bwd_dkdv_kernel[plan.kv_plan.grid](
        *inputs, dk, dv, db.buf, *scalars, *strides, dk.stride(), dv.stride(),
        db.split_stride, db.strides, sz.Z2, sz.Nq, sz.Nk, sz.D, *plan.kv_plan.args(), grid_arg,
        DBIAS=db.column, **plan.kv_plan.flags(), **common, **launch_options(plan.dkdv))
    if sz.Nk == 1:
        # One key: softmax is the constant 1 (0 on a masked row), so the logits, q and k
        # get an exactly zero gradient; the kernels' dS is P (dP - P dP), exactly zero
        # only if they rebuild P = 1 bit for bit, which their logits (other tile shapes
        # and operand orders than the forward's) do not promise.
        dq.zero_(), dk.zero_()
    if table and db.tile:
        return dq, dk, dv, _dtable(db.buf, red_shape, bias.dtype, grid_arg)
    return dq, dk, dv, _dbias(db, red_shape, bias, sz)


def dtable_options(patches, lead):
    """The dtable kernel's constexprs and launch options for ``patches`` = gh * gw patch
    tokens (the most pairs of a table row) after ``lead`` class tokens: a row's pairs
    in one BLOCK_P tile, BLOCK_R rows per program, at most 2048 pairs (16 per thread of
    4 warps)."""
    block_p = max(16, triton.next_power_of_2(patches))
    return dict(LEAD=lead, BLOCK_R=max(1, min(32, 2048 // block_p)), BLOCK_P=block_p,
                num_warps=4, num_stages=1)


def _dtable(partials, red_shape, dtype, grid_arg):
    """The table view's gradient ``red_shape`` (G1, G2, 1, T) in ``dtype``, gathered from
    the dq kernel's fp32 partials, a contiguous (splits, G1, G2, rows, cols) buffer (head
    group g = g1 * G2 + g2 starts g x rows x cols in), in one pass."""
    gh, gw, lead = grid_arg
    rows = red_shape[-1]
    dtable = torch.empty(red_shape, device=partials.device, dtype=dtype)
    opts = dtable_options(gh * gw, lead)
    grid = (red_shape[0] * red_shape[1], triton.cdiv(rows, opts["BLOCK_R"]))
    _scaled_dot_product_attention_dtable_kernel[grid](
        partials, dtable, (partials.stride(0), partials.stride(2), partials.stride(3)),
        partials.shape[0], rows, gh, gw, **opts)
    return dtable


def _dbias(db, red_shape, bias, sz):
    """The bias gradient from the kernels' reduction (None without one)."""
    if db.direct:
        return db.buf
    if not (db.column or db.tile):
        return _zero_dbias(red_shape, bias)
    # Fixed-order sum of the split partials: deterministic.
    parts = db.buf[..., :sz.Nq, :sz.Nk]
    return (parts.sum(0) if parts.shape[0] > 1 else parts[0]).to(bias.dtype)


def _reduced_strides(t):
    # Reduced dims have size 1: stride 0 lets the kernels index them with any z.
    return tuple(0 if n == 1 else st for st, n in zip(t.stride()[-4:], t.shape[-4:]))


def _zero_dbias(red_shape, bias):
    # Allocated zero-filled only where it is the answer: elsewhere the kernels' reduced
    # partials are the gradient, and a memset first would be one more write of it.
    return None if red_shape is None else torch.zeros(red_shape, device=bias.device,
                                                      dtype=bias.dtype)


@on_tensor_device
def dropout_keep_mask(seed, shape, dropout_p):
    """The kernels' dropout keep-mask (bool, True = keep) for a ``(*batch, Nq, Nk)`` attention
    and ``seed``, a one-element int64 tensor (the launchers' seed); on the seed's device."""
    _check_seed(seed)
    numel = math.prod(shape)
    keep = torch.empty(numel, device=seed.device, dtype=torch.uint8)
    if numel:
        _scaled_dot_product_attention_dropout_mask_kernel[(triton.cdiv(numel, _MASK_BLOCK),)](
            keep, seed, float(dropout_p), numel, shape[-2] * shape[-1], BLOCK=_MASK_BLOCK)
    return keep.view(torch.bool).reshape(shape)
