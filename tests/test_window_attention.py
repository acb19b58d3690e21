"""window_attention: reference vs timm; the kernel backends vs the reference: "triton"
(the Triton kernels in the interpreter) and "cuda" (the CUDA C++ kernels of
csrc/window_attention.cu on CPU tensors under host emulation, pyvit_ops.testing.host);
errors of the public function and of the CUDA bindings."""
import contextlib
import math
import os
import re
import types
from typing import NamedTuple, Optional, Tuple, Union

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (SwinTransformerBlock, get_relative_position_index,
                                          window_partition, window_reverse)

import pyvit_ops
import pyvit_ops.ops.window_attention as ops
from pyvit_ops import _backend
from pyvit_ops.kernels import window_attention as kernels
from pyvit_ops.kernels._common import DTYPE_NAMES
from pyvit_ops.reference.window_attention import window_attention as reference
from pyvit_ops.testing import host
from pyvit_ops.testing.specs import window_attention as static_specs
from op_cases import GridRecorder, VALID_CALLS, assert_rejects, bad_call, meta, randn
from tolerance import assert_within

Size = Union[int, Tuple[int, int]]


class Geometry(NamedTuple):
    """B images of an H x W token grid, ``heads`` heads of D channels, windows of
    ``window`` tokens shifted by ``shift`` (an int or an (h, w) pair each)."""
    B: int
    H: int
    W: int
    heads: int
    D: int
    window: Size
    shift: Size

    def __str__(self):
        def pair(v):
            return "x".join(map(str, _pair(v)))
        return (f"B{self.B}-{self.H}x{self.W}-h{self.heads}-D{self.D}-w{pair(self.window)}"
                f"-s{pair(self.shift)}")


# Borders, padding on one / both axes, non-square windows and shifts, a shift on one axis
# only, N not a multiple of the tile.
GEOMETRIES = [
    # Pad both axes, non-square window and shift.
    Geometry(B=1, H=9, W=10, heads=2, D=8, window=(4, 5), shift=(2, 1)),
    # Swin: 7x7 windows, shift 3, no padding.
    Geometry(B=2, H=14, W=14, heads=3, D=4, window=7, shift=3),
    # Shift on H only, pad W.
    Geometry(B=1, H=10, W=7, heads=2, D=6, window=(5, 3), shift=(2, 0)),
    # Shift on W only, pad H and W.
    Geometry(B=1, H=9, W=10, heads=1, D=5, window=(3, 4), shift=(0, 2)),
    # W-MSA: no shift, no padding.
    Geometry(B=1, H=8, W=8, heads=2, D=4, window=4, shift=0),
    # One window row covering the whole height.
    Geometry(B=1, H=7, W=9, heads=2, D=4, window=7, shift=(3, 4)),
]


def _packed_qkv(B, H, W, heads, D, dtype=torch.float64):
    """q, k, v as strided views of one (B, H, W, 3, heads, D) projection."""
    return torch.randn(B, H, W, 3, heads, D, dtype=dtype).unbind(3)


def _table(window, heads, dtype=torch.float64):
    wh, ww = (window, window) if isinstance(window, int) else window
    return torch.randn((2 * wh - 1) * (2 * ww - 1), heads, dtype=dtype)


def _timm_mask(padded, window, shift):
    """timm's own SW-MSA mask on the padded grid (None without shift)."""
    block = types.SimpleNamespace(window_size=window, shift_size=shift,
                                  window_area=window[0] * window[1])
    return SwinTransformerBlock.get_attn_mask(block, x=padded)


def _timm_transcription(q, k, v, table, window, shift, scale, pad_k, pad_v):
    """timm's SwinTransformerBlock._attn + WindowAttention math on q / k / v, written
    with timm's window_partition / window_reverse / relative index / get_attn_mask."""
    B, H, W, heads, D = q.shape
    C, (wh, ww), (sh, sw) = heads * D, window, shift
    N = wh * ww
    x = [t.reshape(B, H, W, C) for t in (q, k, v)]
    if sh or sw:
        x = [torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) for t in x]
    ph, pw = (wh - H % wh) % wh, (ww - W % ww) % ww
    x = [F.pad(t, (0, 0, 0, pw, 0, ph)) for t in x]
    Hp, Wp = H + ph, W + pw
    real = torch.zeros(Hp, Wp, 1, dtype=torch.bool)
    real[:H, :W] = True
    x[1] = torch.where(real, x[1], pad_k.reshape(C))
    x[2] = torch.where(real, x[2], pad_v.reshape(C))
    qw, kw, vw = (window_partition(t, (wh, ww)).view(-1, N, heads, D).transpose(1, 2) for t in x)
    attn = (qw * scale) @ kw.transpose(-2, -1)
    index = get_relative_position_index(wh, ww)
    attn = attn + table[index.view(-1)].view(N, N, heads).permute(2, 0, 1)
    mask = _timm_mask(x[0], (wh, ww), (sh, sw))
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(-1, nw, heads, N, N) + mask[None, :, None]).view(-1, heads, N, N)
    out = (attn.softmax(-1) @ vw).transpose(1, 2).reshape(-1, wh, ww, C)
    out = window_reverse(out, (wh, ww), Hp, Wp)[:, :H, :W]
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out.reshape(B, H, W, heads, D)


def _pair(v):
    return (v, v) if isinstance(v, int) else v


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_reference_matches_timm_transcription(geometry):
    B, H, W, heads, D, window, shift = geometry
    window, shift = _pair(window), _pair(shift)
    q, k, v = _packed_qkv(B, H, W, heads, D)
    table = _table(window, heads)
    pad_k, pad_v = torch.randn(2, heads, D, dtype=torch.float64)
    scale = 0.37
    expected = _timm_transcription(q, k, v, table, window, shift, scale, pad_k, pad_v)
    out = reference(q, k, v, table, window_size=window, shift_size=shift, scale=scale,
                    pad_kv=(pad_k, pad_v))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_reference_matches_timm_block(geometry):
    """Through a real timm SwinTransformerBlock._attn (qkv bias -> padded tokens)."""
    B, H, W, heads, D, window, shift = geometry
    torch.manual_seed(0)
    C = heads * D
    block = SwinTransformerBlock(C, (H, W), num_heads=heads, window_size=window,
                                 shift_size=shift, always_partition=True,
                                 dynamic_mask=True).double()
    attn = block.attn
    torch.nn.init.normal_(attn.relative_position_bias_table)
    torch.nn.init.normal_(attn.qkv.bias)
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(B, H, W, 3, heads, D).unbind(3)
    _, bias_k, bias_v = attn.qkv.bias.view(3, heads, D).unbind(0)
    out = reference(q, k, v, attn.relative_position_bias_table, window_size=window,
                    shift_size=shift, scale=attn.scale, pad_kv=(bias_k, bias_v))
    torch.testing.assert_close(attn.proj(out.reshape(B, H, W, C)), block._attn(x),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cosine", [False, True], ids=["v1", "cosine"])
def test_reference_gradcheck(cosine):
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(1, 4, 5, 2, 3))
    table = _table((3, 4), 2).requires_grad_()
    pad_k, pad_v = (t.requires_grad_() for t in torch.randn(2, 2, 3, dtype=torch.float64))
    # Swin V2: logit scales below the clamp, so that they get a gradient.
    extra = (torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True),) if cosine else ()

    def fn(q, k, v, table, pad_k, pad_v, *logit_scale):
        return reference(q, k, v, table, window_size=(3, 4), shift_size=(1, 2),
                         pad_kv=(pad_k, pad_v), logit_scale=(logit_scale or (None,))[0])

    # fast_mode: random projections of the Jacobian instead of all of its entries.
    assert torch.autograd.gradcheck(fn, (q, k, v, table, pad_k, pad_v, *extra), fast_mode=True)


# --------------------------------------------------------------------------- Swin V2


def _v2_block(geometry, qkv_bias=True):
    """A timm SwinTransformerV2Block with random q / v biases and per-head logit scales,
    one above the clamp at log(100)."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block
    B, H, W, heads, D, window, shift = geometry
    block = SwinTransformerV2Block(heads * D, (H, W), num_heads=heads, window_size=window,
                                   shift_size=shift, always_partition=True, dynamic_mask=True,
                                   qkv_bias=qkv_bias).double()
    attn = block.attn
    with torch.no_grad():
        attn.logit_scale.copy_(torch.linspace(1.0, 5.0, heads).view(heads, 1, 1))
        if qkv_bias:
            attn.q_bias.normal_()
            attn.v_bias.normal_()
    return block


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_reference_cosine_matches_timm_v2_block(geometry, qkv_bias):
    """Through a real timm SwinTransformerV2Block._attn: padded tokens are the projection
    of zeros (key k_bias = 0, whose cosine is 0; value v_bias)."""
    torch.manual_seed(0)
    B, H, W, heads, D, window, shift = geometry
    block = _v2_block(geometry, qkv_bias)
    attn, C = block.attn, heads * D
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if qkv_bias else None
    q, k, v = F.linear(x, attn.qkv.weight, bias).view(B, H, W, 3, heads, D).unbind(3)
    pad_kv = tuple(b.view(heads, D) for b in (attn.k_bias, attn.v_bias)) if qkv_bias else None
    table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, heads))
    out = reference(q, k, v, table, window_size=window, shift_size=shift, pad_kv=pad_kv,
                    logit_scale=attn.logit_scale)
    torch.testing.assert_close(attn.proj(out.reshape(B, H, W, C)), block._attn(x),
                               atol=1e-12, rtol=1e-12)


def test_cosine_logit_scale_gradient_is_zero_above_the_clamp():
    q, k, v = (t.detach() for t in _packed_qkv(1, 4, 4, 2, 4))
    logit_scale = torch.tensor([[[1.0]], [[5.0]]], dtype=torch.float64, requires_grad=True)
    out = pyvit_ops.window_attention(q, k, v, window_size=2, logit_scale=logit_scale)
    out.square().sum().backward()
    assert logit_scale.grad.shape == (2, 1, 1)
    assert logit_scale.grad[0].item() != 0 and logit_scale.grad[1].item() == 0


COSINE_ERRORS = [
    (dict(logit_scale=torch.zeros(3)), ValueError, "logit_scale: expected shape (2,) or (2, 1, 1)"),
    (dict(logit_scale=torch.zeros(2, 2)), ValueError, "logit_scale: expected shape"),
    (dict(logit_scale=torch.zeros(2), scale=0.5), ValueError, "scale: expected None with logit_scale"),
    (dict(logit_scale=torch.zeros(2, dtype=torch.int64)), TypeError, "logit_scale"),
]


@pytest.mark.parametrize("change, exc, message", COSINE_ERRORS)
def test_cosine_bad_inputs(change, exc, message):
    q, k, v = _packed_qkv(1, 4, 4, 2, 4, dtype=torch.float32)
    with pytest.raises(exc, match=re.escape(message)):
        pyvit_ops.window_attention(q, k, v, window_size=2, **change)


# --------------------------------------------------------------------------- kernels

BACKENDS = ["triton", "cuda"]


def _use(backend):
    """The cuda backend runs on CPU tensors once the host-emulation build is loaded."""
    if backend == "cuda":
        host.load()


DTYPES = [torch.float32, torch.float16, torch.bfloat16]

class KernelCase(NamedTuple):
    """``table`` / ``pad``: the call passes a bias table / pads, in ``param_dtype``
    ("input": q's dtype); ``layout`` "packed": q, k, v are slices of one projection,
    "qkvpacked": that projection goes to window_attention_qkvpacked, "mixed": three
    differently strided tensors; ``partition``: the operator's. Runs on ``backends``;
    ``name`` is its test id."""
    name: str
    backends: Tuple[str, ...]
    geometry: Geometry
    table: bool = True
    pad: bool = True
    param_dtype: Optional[str] = "input"
    layout: str = "packed"
    scale: Optional[float] = None
    mask_value: float = -100.0
    partition: str = "block"


# Windows per backward program: the interpreter and the host build aim at 4 programs /
# blocks, so most cases walk several windows in one program, some with a ragged last
# group (10x13 / (4, 6): 9 windows, 2 groups of 5 and 4).
CASES = [
    KernelCase("pad-hw-nonsquare-D32", ("triton",),
               Geometry(B=1, H=9, W=10, heads=2, D=32, window=(4, 5), shift=(2, 1)),
               param_dtype="float32", layout="qkvpacked"),
    KernelCase("pad-hw-nonsquare-D8", ("cuda",),
               Geometry(B=1, H=9, W=10, heads=2, D=8, window=(4, 5), shift=(2, 1)),
               param_dtype="float32", layout="qkvpacked"),
    KernelCase("swin7-shift3-D16", ("triton",),
               Geometry(B=2, H=7, W=7, heads=3, D=16, window=7, shift=3), layout="mixed"),
    KernelCase("swin7-shift3-D32", ("cuda",),
               Geometry(B=1, H=14, W=14, heads=3, D=32, window=7, shift=3), layout="mixed"),
    KernelCase("shift-w-D48", ("triton",),
               Geometry(B=1, H=10, W=13, heads=2, D=48, window=(4, 6), shift=(0, 3))),
    KernelCase("shift-w-D48-soft-mask", ("cuda",),
               Geometry(B=1, H=10, W=13, heads=2, D=48, window=(4, 6), shift=(0, 3)),
               scale=0.37, mask_value=-2.5),
    KernelCase("w8-N64-unshifted-notable", ("triton", "cuda"),
               Geometry(B=1, H=12, W=8, heads=1, D=64, window=8, shift=0),
               table=False, pad=False, param_dtype=None, layout="mixed"),
    # 64-token tiles with wide head dims: the chunked pad and dbias passes (two and
    # four head-dim chunks); float32 must be refused.
    KernelCase("N35-D64-pad", ("triton",),
               Geometry(B=1, H=7, W=9, heads=1, D=64, window=(5, 7), shift=(2, 3)),
               layout="qkvpacked"),
    KernelCase("N35-D128-pad", ("triton",),
               Geometry(B=1, H=7, W=9, heads=1, D=128, window=(5, 7), shift=(2, 3)),
               param_dtype="float32", layout="mixed"),
    # Head dim 80: the 128 bucket, taken for half types; float32 must be refused.
    KernelCase("D80", ("triton",),
               Geometry(B=1, H=5, W=6, heads=1, D=80, window=(3, 4), shift=(1, 2))),
    KernelCase("N12-D6-unaligned", ("cuda",),
               Geometry(B=2, H=5, W=9, heads=2, D=6, window=(3, 4), shift=(1, 2)),
               param_dtype="float32", layout="mixed"),
    KernelCase("D130-five-chunks-shift-h-inf-mask", ("cuda",),
               Geometry(B=1, H=4, W=7, heads=1, D=130, window=(3, 5), shift=(2, 0)),
               param_dtype="float32", mask_value=float("-inf")),
    # Windows over 64 tokens: the tiled kernels. Swin at 384 (12x12) on a padded
    # 2x2 window grid (all four window kinds, pad gradients); 9x10 with a -inf mask, where
    # a whole key block of a row can be masked; a 72-token window with head dim 64
    # (float32 must be refused by Triton; two head-dim chunks on CUDA); Swin V2's 24x24 on
    # CUDA (nine 64-slot tiles, the second window padded).
    KernelCase("tiled-N144-pad-shift-D32", ("triton", "cuda"),
               Geometry(B=1, H=14, W=17, heads=2, D=32, window=12, shift=(6, 5)),
               param_dtype="float32", layout="qkvpacked"),
    KernelCase("tiled-N90-inf-mask-D16", ("triton", "cuda"),
               Geometry(B=1, H=10, W=11, heads=1, D=16, window=(9, 10), shift=(4, 3)),
               layout="mixed", scale=0.37, mask_value=float("-inf")),
    KernelCase("tiled-N72-D64-notable", ("triton", "cuda"),
               Geometry(B=1, H=8, W=9, heads=1, D=64, window=(8, 9), shift=(3, 0)),
               table=False, pad=False, param_dtype=None),
    KernelCase("tiled-w24-N576-D8", ("cuda",),
               Geometry(B=1, H=24, W=26, heads=1, D=8, window=24, shift=(12, 5)),
               param_dtype="float32"),
    # MaxViT's grid attention: one tile (a 2x3 grid of 3x4 windows) and tiled (81 slots).
    KernelCase("grid-N12-D16", ("triton", "cuda"),
               Geometry(B=2, H=6, W=12, heads=2, D=16, window=(3, 4), shift=0), pad=False,
               param_dtype="float32", partition="grid"),
    KernelCase("grid-tiled-N81-D16", ("triton", "cuda"),
               Geometry(B=1, H=18, W=9, heads=1, D=16, window=9, shift=0), pad=False,
               layout="mixed", partition="grid"),
]
KERNEL_CASES = [pytest.param(backend, case, id=f"{backend}-{case.name}")
                for case in CASES for backend in case.backends]


def _qkv_views(B, H, W, heads, D, dtype, layout):
    if layout == "qkvpacked":
        return [torch.randn(B, H, W, 3, heads, D, dtype=dtype)]
    if layout == "packed":
        return _packed_qkv(B, H, W, heads, D, dtype=dtype)
    # q contiguous, k read through a (B, W, H, ...) transpose, v from a packed projection.
    q = torch.randn(B, H, W, heads, D, dtype=dtype)
    k = torch.randn(B, W, H, heads, D, dtype=dtype).transpose(1, 2)
    v = _packed_qkv(B, H, W, heads, D, dtype=dtype)[2]
    return q, k, v


def _run(backend, tensors, with_table, with_pad, grad, cosine=False, **kwargs):
    """``tensors``: q, k, v (or one packed qkv), then the table, the logit scale
    (``cosine``) and the pads asked for."""
    packed = tensors[0].dim() == 6
    tokens, rest = (tensors[:1], list(tensors[1:])) if packed else (tensors[:3], list(tensors[3:]))
    table = rest.pop(0) if with_table else None
    logit_scale = rest.pop(0) if cosine else None
    pad_kv = tuple(rest) if with_pad else None
    fn = ops.window_attention_qkvpacked if packed else ops.window_attention
    out = fn(*tokens, table, pad_kv=pad_kv, logit_scale=logit_scale, backend=backend, **kwargs)
    # Without padding the pads do not reach the reference's graph: zero gradient.
    return out, torch.autograd.grad(out, tensors, grad.to(out.dtype), allow_unused=True,
                                    materialize_grads=True)


def _assert_rule(names, got, tensors, with_table, with_pad, grad, precision=None, **kwargs):
    """``got`` (the output, then the gradients of ``tensors`` as ``_run`` takes them) under
    the tolerance rule: the reference in float64 on the same values, pads rounded to q's
    dtype as the kernel's contract says (the rounding passes the gradient through
    unchanged), and on ``tensors`` as given or, if given, rounded to ``precision``: the
    precision the products run at (default: q's dtype), also the floor's dtype."""
    oracle = [t.detach().double() for t in tensors]
    if with_pad:
        oracle[-2:] = [t.detach().to(tensors[0].dtype).double() for t in tensors[-2:]]
    expected, expected_grads = _run("reference", [t.requires_grad_() for t in oracle],
                                    with_table, with_pad, grad, **kwargs)
    own, own_grads = _run("reference", [t.detach().to(precision or t.dtype).requires_grad_()
                                        for t in tensors], with_table, with_pad, grad, **kwargs)
    for name, g, e, o in zip(names, got, (expected, *expected_grads), (own, *own_grads)):
        assert_within(name, g, e, o, precision or tensors[0].dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("backend, case", KERNEL_CASES)
def test_kernel_matches_reference(backend, case, dtype):
    B, H, W, heads, D, window, shift = case.geometry
    with_table, with_pad, layout = case.table, case.pad, case.layout
    param_dtype = case.param_dtype
    kwargs = dict(window_size=window, shift_size=shift, scale=case.scale,
                  mask_value=case.mask_value, partition=case.partition)
    area = _pair(window)[0] * _pair(window)[1]
    if backend == "triton" and dtype == torch.float32 and D > kernels.max_head_dim_fp32(area):
        # Not a skip: the Triton backend must refuse this call, with its reason.
        with pytest.raises(_backend.BackendUnavailableError, match="float32 with head dim"):
            ops.window_attention(*_packed_qkv(B, H, W, heads, D, dtype), backend="triton",
                                 **kwargs)
        return
    _use(backend)
    torch.manual_seed(0)
    inputs = list(_qkv_views(B, H, W, heads, D, dtype, layout))
    param_dtype = dtype if param_dtype == "input" else torch.float32
    if with_table:
        inputs.append(_table(window, heads, param_dtype))
    if with_pad:
        inputs += list(torch.randn(2, heads, D, dtype=param_dtype).unbind(0))
    inputs = [t.detach().requires_grad_() for t in inputs]
    # Upstream gradient as a non-contiguous view, as after a permuting projection.
    grad = torch.randn(B, W, H, heads, D, dtype=dtype).transpose(1, 2)

    out, grads = _run(backend, inputs, with_table, with_pad, grad, **kwargs)
    assert out.dtype == dtype and out.shape == (B, H, W, heads, D) and out.is_contiguous()
    names = (["qkv"] if layout == "qkvpacked" else ["q", "k", "v"]) + ["table"] * with_table \
        + ["pad_k", "pad_v"] * with_pad
    for name, g, t in zip(names, grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
    _assert_rule(["out", *(f"grad of {name}" for name in names)], (out, *grads), inputs,
                 with_table, with_pad, grad, **kwargs)


def test_tiled_near_one_hot_row_gradients():
    # Every query aligned with its own key (probability ~0.997) in an 81-slot window, the
    # tiled kernels' case: dS = P (dP - delta) cancels, so delta must come from the fp32
    # tiles, not from the output rounded to float16.
    _use("triton")
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 9, 9, 1, 64, generator=gen)
    q = (0.15 * k + 0.1 * torch.randn(k.shape, generator=gen)).half().requires_grad_()
    v = torch.randn(k.shape, generator=gen).half().requires_grad_()
    k = k.half().requires_grad_()
    grad = torch.randn(k.shape, generator=gen, dtype=torch.float64)
    kwargs = dict(window_size=9, scale=1.0)
    out, grads = _run("triton", [q, k, v], False, False, grad, **kwargs)
    _assert_rule(["out", "q", "k", "v"], (out, *grads), [q, k, v], False, False, grad, **kwargs)


class CosineCase(NamedTuple):
    """A Swin V2 (cosine attention) case: per-head logit scales (some above the clamp at
    log 100 = 4.605), table and pads in ``param_dtype`` ("input": q's dtype) or float32;
    runs on ``backends``."""
    name: str
    geometry: Geometry
    logit_scale: Tuple[float, ...]
    param_dtype: str = "float32"
    layout: str = "packed"
    pad: bool = True
    mask_value: float = -100.0
    backends: Tuple[str, ...] = ("triton",)


# Single tile (up to 32 tokens): 20 tokens at head dim 64 (dbias and pads in their
# chunked passes); tiled: Swin V2's 8x8 padded on one axis, 90 tokens (float32 too at
# D = 32) with a -inf mask, Swin V2's 12x12 on a padded 2x2 window grid. Logit scales
# below, at and above the clamp, timm's shape (heads, 1, 1) and (heads,). The CUDA
# kernels (one 64-slot tile): 4x4 shifted and padded on both axes with a head dim in one
# chunk, 20 tokens in two chunks, 8x8 in one.
COSINE_CASES = [
    CosineCase("w4-pad-shift-D8", Geometry(B=1, H=6, W=7, heads=2, D=8, window=4, shift=2),
               (0.5, 5.0), layout="mixed", backends=("cuda",)),
    CosineCase("N20-D64-pad", Geometry(B=1, H=9, W=10, heads=2, D=64, window=(4, 5),
                                       shift=(2, 1)), (1.0, 5.0), layout="qkvpacked",
               backends=("triton", "cuda")),
    CosineCase("w8-N64-D16", Geometry(B=1, H=8, W=11, heads=2, D=16, window=8, shift=(0, 4)),
               (math.log(100.0), -1.0), param_dtype="input", layout="mixed",
               backends=("triton", "cuda")),
    CosineCase("tiled-N90-D32-inf-mask", Geometry(B=1, H=10, W=11, heads=1, D=32,
                                                  window=(9, 10), shift=(4, 3)),
               (3.0,), layout="mixed", mask_value=float("-inf"), backends=("triton", "cuda")),
    CosineCase("tiled-w12-N144-D16-pad", Geometry(B=1, H=14, W=17, heads=2, D=16, window=12,
                                                  shift=(6, 5)), (2.3, 6.0),
               param_dtype="input", backends=("triton", "cuda")),
]


def _cosine_inputs(case, dtype, pad_values=None):
    """q, k, v (or qkv), table, logit scale and pads of ``case`` as leaves, and the
    upstream gradient."""
    B, H, W, heads, D, window, shift = case.geometry
    torch.manual_seed(0)
    param_dtype = dtype if case.param_dtype == "input" else torch.float32
    inputs = list(_qkv_views(B, H, W, heads, D, dtype, case.layout))
    inputs.append(_table(window, heads, param_dtype))
    shape = (heads,) if heads == 1 else (heads, 1, 1)
    inputs.append(torch.tensor(case.logit_scale, dtype=param_dtype).view(shape))
    if case.pad:
        inputs += list(torch.randn(2, heads, D, dtype=param_dtype).unbind(0)
                       if pad_values is None else pad_values.to(param_dtype).unbind(0))
    grad = torch.randn(B, W, H, heads, D, dtype=dtype).transpose(1, 2)
    return [t.detach().requires_grad_() for t in inputs], grad


def _cosine_names(case):
    return ((["qkv"] if case.layout == "qkvpacked" else ["q", "k", "v"]) + ["table", "logit_scale"]
            + ["pad_k", "pad_v"] * case.pad)


COSINE_KERNEL_CASES = [pytest.param(backend, case, id=f"{backend}-{case.name}")
                       for case in COSINE_CASES for backend in case.backends]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("backend, case", COSINE_KERNEL_CASES)
def test_cosine_kernel_matches_reference(backend, case, dtype):
    """Swin V2's cosine attention on the kernels: the output and the gradients of q, k, v,
    table, logit scale and pads under the tolerance rule."""
    B, H, W, heads, D, window, shift = case.geometry
    kwargs = dict(window_size=window, shift_size=shift, mask_value=case.mask_value,
                  cosine=True)
    area = _pair(window)[0] * _pair(window)[1]
    if backend == "triton" and dtype == torch.float32 and D > kernels.max_head_dim_fp32(area):
        with pytest.raises(_backend.BackendUnavailableError, match="float32 with head dim"):
            ops.window_attention(*_packed_qkv(B, H, W, heads, D, dtype), backend="triton",
                                 window_size=window, logit_scale=torch.zeros(heads))
        return
    _use(backend)
    inputs, grad = _cosine_inputs(case, dtype)
    out, grads = _run(backend, inputs, True, case.pad, grad, **kwargs)
    assert out.dtype == dtype and out.shape == (B, H, W, heads, D)
    names = _cosine_names(case)
    for name, g, t in zip(names, grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
    # The clamp holds a logit scale above log 100: no gradient.
    dlogit_scale = grads[names.index("logit_scale")].flatten()
    above = torch.tensor(case.logit_scale) > math.log(100.0)
    assert torch.equal(dlogit_scale[above], torch.zeros_like(dlogit_scale[above]))
    _assert_rule(["out", *(f"grad of {name}" for name in names)], (out, *grads), inputs, True,
                 case.pad, grad, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend, window", [("triton", (4, 5)), ("triton", (9, 8)),
                                             ("cuda", (4, 5)), ("cuda", (9, 8))],
                         ids=["triton", "triton-tiled", "cuda", "cuda-tiled"])
def test_cosine_rows_below_eps(backend, window, dtype):
    """A query row, a key row and the pad key (timm's k_bias = 0) of norm zero, below
    F.normalize's eps: their cosines are 0 and their gradients dx_hat / eps (~1e12 times
    the others; float16 cannot hold them: inf on every backend). The tolerance rule holds
    on those rows and on the others separately."""
    H, W = window[0] + 3, window[1] + 2
    case = CosineCase("zero-rows", Geometry(B=1, H=H, W=W, heads=2, D=16, window=window,
                                            shift=(1, 2)), (1.0, 4.0))
    inputs, grad = _cosine_inputs(case, dtype, pad_values=torch.stack(
        (torch.zeros(2, 16), torch.randn(2, 16))))
    qkv = inputs[0].detach().clone()
    qkv[0, 1, 2, 0] = 0.0   # a query row
    qkv[0, 3, 1, 1, 1] = 0.0  # a key row of head 1
    inputs[0] = qkv.requires_grad_()
    kwargs = dict(window_size=window, shift_size=(1, 2), cosine=True)
    _use(backend)
    out, grads = _run(backend, inputs, True, True, grad, **kwargs)
    zero = torch.zeros_like(qkv, dtype=torch.bool)
    zero[0, 1, 2, 0] = zero[0, 3, 1, 1, 1] = True
    oracle = [t.detach().double() for t in inputs]
    oracle[-2:] = [t.detach().to(dtype).double() for t in inputs[-2:]]
    expected, expected_grads = _run("reference", [t.requires_grad_() for t in oracle], True,
                                    True, grad, **kwargs)
    own, own_grads = _run("reference", [t.detach().requires_grad_() for t in inputs], True, True,
                          grad, **kwargs)
    assert_within("out", out, expected, own, dtype)
    assert expected_grads[0][zero].abs().max() > 1e9  # dx_hat / eps
    for rows in (zero, ~zero):
        assert_within("grad of qkv", grads[0][rows], expected_grads[0][rows], own_grads[0][rows],
                      dtype)
    for name, g, e, o in zip(("table", "logit_scale", "pad_k", "pad_v"), grads[1:],
                             expected_grads[1:], own_grads[1:]):
        assert_within(f"grad of {name}", g, e, o, dtype)


def test_cosine_logit_scale_clamp_edge():
    """The logit scale's gradient is torch.clamp's, which compares with log 100 in
    float64: float32 log 100 lies above it (no gradient, as the next float32 up), the
    float32 below passes; on the kernels as in the reference."""
    bound = torch.tensor(math.log(100.0), dtype=torch.float32)
    assert bound.double() > math.log(100.0)
    logit_scale = torch.stack((bound, torch.nextafter(bound, torch.tensor(10.0)),
                               torch.nextafter(bound, torch.tensor(0.0)))).requires_grad_()
    torch.manual_seed(0)
    q, k, v = _packed_qkv(1, 5, 6, 3, 8, torch.float32)
    grads = {}
    _use("cuda")
    for backend in ("triton", "cuda", "reference"):
        out = ops.window_attention(q, k, v, window_size=(5, 3), logit_scale=logit_scale,
                                   backend=backend)
        (grads[backend],) = torch.autograd.grad(out, logit_scale, torch.ones_like(out))
    for g in grads.values():
        assert g[0] == 0 and g[1] == 0 and g[2] != 0
    for backend in ("triton", "cuda"):
        torch.testing.assert_close(grads[backend], grads["reference"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_24x24_window(backend):
    """Swin V2's largest window (swinv2_base_window12to24_192to384): 576 tokens in the
    tiled kernels, two windows (the second padded), shifted, with table and pads. The
    Triton case takes two minutes in the interpreter (its tiled kernels run at 12x12 in
    every CI run); PYVIT_OPS_SLOW_TESTS=1 runs it."""
    if backend == "triton" and not os.environ.get("PYVIT_OPS_SLOW_TESTS"):
        pytest.skip("two minutes in the interpreter on 2 cores; PYVIT_OPS_SLOW_TESTS=1 runs it")
    case = CosineCase("w24", Geometry(B=1, H=24, W=26, heads=1, D=16, window=24,
                                      shift=(12, 12)), (3.5,))
    _use(backend)
    inputs, grad = _cosine_inputs(case, torch.float16)
    kwargs = dict(window_size=24, shift_size=12, cosine=True)
    out, grads = _run(backend, inputs, True, True, grad, **kwargs)
    _assert_rule(["out", *(f"grad of {name}" for name in _cosine_names(case))], (out, *grads),
                 inputs, True, True, grad, **kwargs)


@pytest.mark.parametrize("backend, window", [("triton", (4, 5)), ("triton", (9, 8)),
                                             ("cuda", (4, 5)), ("cuda", (9, 8))],
                         ids=["triton", "triton-tiled", "cuda", "cuda-tiled"])
def test_cosine_backward_is_deterministic(backend, window):
    case = CosineCase("det", Geometry(B=1, H=window[0] + 2, W=window[1] + 3, heads=2, D=32,
                                      window=window, shift=(2, 1)), (2.0, 5.0),
                      param_dtype="input")
    _use(backend)
    results = []
    for _ in range(2):
        inputs, grad = _cosine_inputs(case, torch.float16)
        out, grads = _run(backend, inputs, True, True, grad, window_size=window,
                          shift_size=(2, 1), cosine=True)
        results.append((out, *grads))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    _use(backend)
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(1, 9, 10, 2, 32, torch.float16))
    table = _table((4, 5), 2, torch.float32).requires_grad_()
    pad_kv = tuple(t.requires_grad_() for t in torch.randn(2, 2, 32, dtype=torch.float16))
    tensors = (q, k, v, table, *pad_kv)
    grad = torch.randn(1, 9, 10, 2, 32, dtype=torch.float16)
    results = []
    for _ in range(2):
        out = ops.window_attention(q, k, v, table, window_size=(4, 5), shift_size=(2, 1),
                                   pad_kv=pad_kv, backend=backend)
        results.append((out, *torch.autograd.grad(out, tensors, grad)))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_where_asked(backend):
    """Without table / pad gradients the backward skips their reductions."""
    _use(backend)
    torch.manual_seed(0)
    q, k, v = _packed_qkv(1, 8, 10, 2, 16, torch.float32)
    q = q.detach().requires_grad_()
    table = _table(4, 2, torch.float32)
    pad_kv = tuple(torch.randn(2, 2, 16).unbind(0))
    kwargs = dict(window_size=4, shift_size=2, pad_kv=pad_kv)
    out = ops.window_attention(q, k, v, table, backend=backend, **kwargs)
    out.sum().backward()
    assert q.grad is not None and table.grad is None and pad_kv[0].grad is None

    def reference_dq(q, k, v, table, pad_kv):
        q = q.detach().requires_grad_()
        out = reference(q, k, v, table, window_size=4, shift_size=2, pad_kv=pad_kv)
        return torch.autograd.grad(out, q, torch.ones_like(out))[0]

    oracle = reference_dq(*(t.double() for t in (q, k, v, table)),
                          tuple(t.double() for t in pad_kv))
    assert_within("dq", q.grad, oracle, reference_dq(q, k, v, table, pad_kv), q.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_gradient_is_zero_without_padding(backend):
    _use(backend)
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(1, 8, 8, 2, 8, torch.float32))
    pad_kv = tuple(t.requires_grad_() for t in torch.randn(2, 2, 8))
    out = ops.window_attention(q, k, v, window_size=4, shift_size=2, pad_kv=pad_kv,
                               backend=backend)
    dpad_k, dpad_v = torch.autograd.grad(out, pad_kv, torch.randn_like(out))
    assert torch.equal(dpad_k, torch.zeros(2, 8)) and torch.equal(dpad_v, torch.zeros(2, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    _use(backend)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(0, 6, 6, 2, 8, torch.float32))
    table = _table(3, 2, torch.float32).requires_grad_()
    out = ops.window_attention(q, k, v, table, window_size=3, shift_size=1, backend=backend)
    assert out.shape == (0, 6, 6, 2, 8)
    (dtable,) = torch.autograd.grad(out, table, torch.ones_like(out))
    assert torch.equal(dtable, torch.zeros_like(table))


@pytest.mark.parametrize("backend, window", [("triton", (3, 5)), ("triton", (9, 8)),
                                             ("cuda", (3, 5)), ("cuda", (9, 8))],
                         ids=["triton", "triton-tiled", "cuda", "cuda-tiled"])
def test_negative_scale(backend, window):
    """A negative scale flips the scores' sign: key slots past N (15 of a 32-slot tile;
    72 tokens in 32-key blocks) must stay -inf after it, not turn into +inf (NaN)."""
    _use(backend)
    torch.manual_seed(0)
    H, W = window[0] + 2, window[1] + 1
    inputs = [t.detach().requires_grad_() for t in
              (*_packed_qkv(1, H, W, 2, 16, torch.float32), _table(window, 2, torch.float32))]
    grad = torch.randn(1, H, W, 2, 16)
    kwargs = dict(window_size=window, shift_size=(1, 2), scale=-0.4)
    out, grads = _run(backend, inputs, True, False, grad, **kwargs)
    _assert_rule(("out", "q", "k", "v", "table"), (out, *grads), inputs, True, False, grad,
                 **kwargs)


@pytest.mark.parametrize("backend, window", [("triton", 3), ("triton", 9), ("cuda", 3)],
                         ids=["triton", "triton-tiled", "cuda"])
def test_zero_heads(backend, window):
    """Empty inputs give empty outputs and gradients: no division by the head count."""
    _use(backend)
    tensors = [t.detach().requires_grad_() for t in
               (*_packed_qkv(1, 10, 10, 0, 8, torch.float32), _table(window, 0, torch.float32),
                *torch.randn(2, 0, 8))]
    out, grads = _run(backend, tensors, True, True, torch.randn(1, 10, 10, 0, 8),
                      window_size=window, shift_size=1)
    assert out.shape == (1, 10, 10, 0, 8)
    for g, t in zip(grads, tensors):
        assert g.shape == t.shape


_TABLE_ARGS = ("table_ptr", "dtable_ptr")
_KERNEL_NAMES = ("_window_attention_fwd_kernel", "_window_attention_bwd_kernel",
                 "_window_attention_fwd_tiled_kernel", "_window_attention_bwd_tiled_kernel",
                 "_window_attention_dtable_kernel")


class _LaunchRecorder:
    """Stands in for a Triton kernel: records each launch's constexprs, warps, stages
    and table (or dtable) dtype, then launches the kernel."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **constexprs):
            named = dict(zip(self.kernel.arg_names, args))
            table = next(named[a] for a in _TABLE_ARGS if a in named)
            # The config key: float32 inputs are "fp32x3" unless TF32 is allowed; the
            # dtable kernel's is its table's dtype.
            key = (kernels._dtype_name(named["q_ptr"].dtype) if "q_ptr" in named
                   else DTYPE_NAMES[table.dtype])
            self.launches.append((self.kernel.__name__, tuple(sorted(constexprs.items())),
                                  num_warps, num_stages, key,
                                  "*" + DTYPE_NAMES[table.dtype]))
            return self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages,
                                     **constexprs)
        return launch


class LaunchCase(NamedTuple):
    """One head on an H x W grid; ``tf32``: torch allows TF32; ``passes``: the backward
    PASSes the launchers run; ``cosine``: Swin V2's cosine attention (a logit scale,
    with its gradient); ``partition``: the operator's (block windows are shifted)."""
    name: str
    H: int
    W: int
    window: Size
    D: int
    dtype: torch.dtype
    table_dtype: torch.dtype
    tf32: bool
    passes: set
    cosine: bool = False
    partition: str = "block"


# The dtable reduction reads the fp32 partials whatever the inputs' dtype. Padded grids,
# table and pads needing gradients. 64-token tiles at D = 64: dq / dk / dv, dbias alone,
# pads (two head-dim chunks); half precision D = 32 (Swin): dbias fused, one-chunk pad
# pass; float32 as TF32 and as 3xTF32 (dbias alone, tiled past 32 tokens); windows over
# 64 tokens: the tiled kernels' dq, dk / dv (with the pads) and dbias; MaxViT's grid
# partition (no padding: no pad pass; dbias alone).
LAUNCH_CASES = [
    LaunchCase("N35-D64-fp16", H=7, W=9, window=(5, 7), D=64, dtype=torch.float16,
               table_dtype=torch.float16, tf32=False, passes={0, 1, 2}),
    LaunchCase("N49-D16-bf16-fp32table", H=9, W=8, window=7, D=16, dtype=torch.bfloat16,
               table_dtype=torch.float32, tf32=False, passes={0, 1}),
    LaunchCase("N20-D32-tf32", H=9, W=10, window=(4, 5), D=32, dtype=torch.float32,
               table_dtype=torch.float32, tf32=True, passes={0, 1}),
    LaunchCase("N20-D32-fp32x3", H=9, W=10, window=(4, 5), D=32, dtype=torch.float32,
               table_dtype=torch.float32, tf32=False, passes={0, 1, 2}),
    LaunchCase("N20-D64-fp32x3", H=9, W=10, window=(4, 5), D=64, dtype=torch.float32,
               table_dtype=torch.float32, tf32=False, passes={0, 1, 2}),
    LaunchCase("tiled-N49-D32-fp32x3", H=9, W=8, window=7, D=32, dtype=torch.float32,
               table_dtype=torch.float32, tf32=False, passes={2, 3, 4}),
    LaunchCase("tiled-N132-D32-bf16", H=13, W=12, window=(12, 11), D=32, dtype=torch.bfloat16,
               table_dtype=torch.bfloat16, tf32=False, passes={2, 3, 4}),
    # Cosine attention: dbias always alone; past 32 tokens the tiled kernels, with the
    # blocks of the cosine backward.
    LaunchCase("cos-N20-D32-fp16", H=9, W=10, window=(4, 5), D=32, dtype=torch.float16,
               table_dtype=torch.float32, tf32=False, passes={0, 1, 2}, cosine=True),
    LaunchCase("cos-N20-D64-fp32x3", H=9, W=10, window=(4, 5), D=64, dtype=torch.float32,
               table_dtype=torch.float32, tf32=False, passes={0, 1, 2}, cosine=True),
    LaunchCase("cos-tiled-N35-D64-bf16", H=7, W=9, window=(5, 7), D=64, dtype=torch.bfloat16,
               table_dtype=torch.bfloat16, tf32=False, passes={2, 3, 4}, cosine=True),
    LaunchCase("grid-N49-D32-fp16", H=14, W=7, window=7, D=32, dtype=torch.float16,
               table_dtype=torch.float32, tf32=False, passes={0, 2}, partition="grid"),
    LaunchCase("grid-tiled-N81-D32-bf16", H=9, W=18, window=9, D=32, dtype=torch.bfloat16,
               table_dtype=torch.bfloat16, tf32=False, passes={3, 4, 2}, partition="grid"),
]


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=lambda case: case.name)
def test_launches_are_static_compile_specs(monkeypatch, case):
    """The static compile check (tests/test_static_compile.py) covers what the launchers
    pick: every launch is a spec of the sm_80 row (the interpreter's), table dtype
    included (fp32 parameters under autocast, or the model's dtype)."""
    _, H, W, window, D, dtype, table_dtype, tf32, passes, cosine, partition = case
    specs = {(s["fn"].__name__, tuple(sorted((k, v) for k, v in s["constexprs"].items()
                                             if not k.startswith("stride_"))),
              s["num_warps"], s["num_stages"], s["dtype"],
              next(s["signature"][a] for a in _TABLE_ARGS if a in s["signature"]))
             for s in static_specs.static_compile_specs() if 80 in s.get("archs", (80, 90))}
    launches = []
    for name in _KERNEL_NAMES:
        monkeypatch.setattr(kernels, name, _LaunchRecorder(getattr(kernels, name), launches))
    torch.manual_seed(0)
    tensors = [t.detach().requires_grad_() for t in (
        *_packed_qkv(1, H, W, 1, D, dtype), _table(window, 1, table_dtype),
        *torch.randn(2, 1, D), *[torch.full((1,), 2.0)] * cosine)]
    with _tf32(tf32):
        out = ops.window_attention(*tensors[:4], window_size=window,
                                   shift_size=0 if partition == "grid" else 2,
                                   pad_kv=tensors[4:6], logit_scale=(tensors[6:] or [None])[0],
                                   partition=partition, backend="triton")
        torch.autograd.grad(out, tensors, torch.randn_like(out))
    assert {dict(c)["PASS"] for _, c, *_ in launches if "PASS" in dict(c)} == passes
    assert any(name == "_window_attention_dtable_kernel" for name, *_ in launches)
    assert set(launches) <= specs, set(launches) - specs


def test_triton_grids_keep_heads_off_axis_1(monkeypatch):
    """Grid axes 1 and 2 stop at 65535: 70000 heads (the dtable kernel has programs per
    head) stay on axis 0."""
    grids = []
    for name in _KERNEL_NAMES:
        monkeypatch.setattr(kernels, name, GridRecorder(grids))
    heads = 70000
    q, k, v = _packed_qkv(1, 2, 2, heads, 1, torch.float32)
    table = _table(2, heads, torch.float32)
    geometry = ((2, 2), (0, 0), 1.0, -100.0)
    out, lse = kernels.window_attention_fwd(q, k, v, table, None, None, *geometry)
    kernels.window_attention_bwd(out, q, k, v, lse, table, None, None, *geometry,
                                 (True,) * 7)
    assert len(grids) > 2 and all(n <= 65535 for g in grids for n in g[1:]), grids


@pytest.mark.parametrize("backend, cosine", [("triton", False), ("triton", True),
                                             ("cuda", False), ("cuda", True)],
                         ids=["triton", "triton-cosine", "cuda", "cuda-cosine"])
def test_custom_op_opcheck(backend, cosine):
    _use(backend)
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(1, 4, 5, 2, 16, torch.float32))
    table = _table((4, 5), 2, torch.float32).requires_grad_()
    pad_k, pad_v = (t.requires_grad_() for t in torch.randn(2, 2, 16))
    logit_scale = torch.tensor([[[1.0]], [[5.0]]], requires_grad=True) if cosine else None
    args = (q, k, v, table, pad_k, pad_v, logit_scale, 4, 5, 1, 2, 0.25, -100.0, False, backend)
    torch.library.opcheck(torch.ops.pyvit_ops.window_attention_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    out, lse = torch.ops.pyvit_ops.window_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, table, pad_k, pad_v, logit_scale, 4, 5,
                1, 2, 0.25, -100.0, False, True, True, cosine, backend)
    torch.library.opcheck(torch.ops.pyvit_ops.window_attention_bwd, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- errors


# One row per bad argument of a valid call: the error type and the argument's name
# in the message.
_valid = VALID_CALLS["window_attention"]
BAD_CALLS = [
    bad_call(_valid, dict(q=randn(5, 3, 2, 4)), ValueError, "q: expected a 5-D tensor"),
    bad_call(_valid, dict(q=torch.ones(1, 5, 3, 2, 4, dtype=torch.int32)),
             TypeError, "q: expected dtype"),
    bad_call(_valid, dict(q=randn(1, 5, 3, 2, 0), k=randn(1, 5, 3, 2, 0), v=randn(1, 5, 3, 2, 0),
                          pad_kv=None),
             ValueError, "q: expected a head dim"),
    bad_call(_valid, dict(k=randn(1, 5, 4, 2, 4)), ValueError, "k: expected shape (1, 5, 3, 2, 4)"),
    bad_call(_valid, dict(v=randn(1, 5, 3, 2, 4, dtype=torch.bfloat16)),
             TypeError, "v: expected dtype"),
    bad_call(_valid, dict(v=meta(1, 5, 3, 2, 4)), ValueError, "v: expected device cpu"),
    bad_call(_valid, dict(window_size=0), ValueError, "window_size: expected positive sizes"),
    bad_call(_valid, dict(window_size=(6, 2)),
             ValueError, "window_size: expected at most the grid"),
    bad_call(_valid, dict(window_size=2.0), TypeError, "window_size: expected an int or a pair"),
    bad_call(_valid, dict(window_size=(2, 2, 2)),
             TypeError, "window_size: expected an int or a pair"),
    bad_call(_valid, dict(shift_size=2),
             ValueError, "shift_size: expected 0 <= shift < window_size"),
    bad_call(_valid, dict(shift_size=(-1, 0)), ValueError, "shift_size: expected 0 <= shift"),
    bad_call(_valid, dict(shift_size=True), TypeError, "shift_size: expected an int or a pair"),
    bad_call(_valid, dict(rel_pos_bias_table=randn(9)),
             ValueError, "rel_pos_bias_table: expected a 2-D"),
    bad_call(_valid, dict(rel_pos_bias_table=randn(9, 3)),
             ValueError, "rel_pos_bias_table: expected shape (9, 2)"),
    bad_call(_valid, dict(rel_pos_bias_table=randn(9, 2, dtype=torch.float16)),
             TypeError, "rel_pos_bias_table: expected dtype"),
    bad_call(_valid, dict(rel_pos_bias_table=meta(9, 2)),
             ValueError, "rel_pos_bias_table: expected device cpu"),
    bad_call(_valid, dict(pad_kv=randn(2, 4)), TypeError, "pad_kv: expected a pair"),
    bad_call(_valid, dict(pad_kv=(randn(2, 4),)), TypeError, "pad_kv: expected a pair"),
    bad_call(_valid, dict(pad_kv=(randn(2, 5), randn(2, 4))),
             ValueError, "pad_kv[0]: expected shape (2, 4)"),
    bad_call(_valid, dict(pad_kv=(randn(2, 4), randn(2, 4, dtype=torch.float64))),
             TypeError, "pad_kv[1]: expected dtype"),
    bad_call(_valid, dict(pad_kv=(randn(2, 4), meta(2, 4))),
             ValueError, "pad_kv[1]: expected device"),
    bad_call(_valid, dict(scale="x"), TypeError, "scale: expected a float"),
    bad_call(_valid, dict(scale=float("nan")), ValueError, "scale: expected a nonzero finite"),
    bad_call(_valid, dict(mask_value=None), TypeError, "mask_value: expected a float"),
    bad_call(_valid, dict(mask_value=float("nan")),
             ValueError, "mask_value: expected a number below"),
    bad_call(_valid, dict(backend=1), ValueError, "backend: expected one of"),
    bad_call(_valid, dict(window_size=(25, 24), shift_size=0,
                          rel_pos_bias_table=randn(49 * 47, 2), q=randn(1, 25, 24, 2, 4),
                          k=randn(1, 25, 24, 2, 4), v=randn(1, 25, 24, 2, 4), pad_kv=None,
                          backend="cuda"),
             _backend.BackendUnavailableError, "window area 25x24 = 600 > 576"),
]


@pytest.mark.parametrize("call, change, error, text", BAD_CALLS)
def test_bad_argument(call, change, error, text):
    assert_rejects(lambda: call(**change), error, text)


def _valid_args():
    q, k, v = _packed_qkv(1, 9, 10, 2, 8, torch.float32)
    return dict(q=q, k=k, v=v, rel_pos_bias_table=_table((4, 5), 2, torch.float32),
                window_size=(4, 5), shift_size=(2, 1),
                pad_kv=tuple(torch.zeros(2, 2, 8).unbind(0)))


BAD_INPUTS = [
    ("q", lambda a: a["q"][..., 0], ValueError, "q: expected a 5-D tensor"),
    ("q", lambda a: a["q"].tolist(), TypeError, "q: expected a torch.Tensor"),
    ("k", lambda a: a["k"][:, :8], ValueError, "k: expected shape (1, 9, 10, 2, 8)"),
    ("v", lambda a: a["v"].half(), TypeError, "v: expected dtype torch.float32"),
    ("q", lambda a: a["q"].int(), TypeError, "q: expected dtype in"),
    ("rel_pos_bias_table", lambda a: torch.zeros(49, 2), ValueError,
     "rel_pos_bias_table: expected shape (63, 2), got (49, 2)"),
    ("rel_pos_bias_table", lambda a: a["rel_pos_bias_table"].half(), TypeError,
     "rel_pos_bias_table: expected dtype in (float32)"),
    ("pad_kv", lambda a: a["pad_kv"][0], TypeError, "pad_kv: expected a pair"),
    ("pad_kv", lambda a: (torch.zeros(2, 7), torch.zeros(2, 8)), ValueError,
     "pad_kv[0]: expected shape (2, 8), got (2, 7)"),
    ("pad_kv", lambda a: (torch.zeros(2, 8), torch.zeros(2, 8, device="meta")), ValueError,
     "pad_kv[1]: expected device cpu"),
    ("window_size", lambda a: (10, 5), ValueError,
     "window_size: expected at most the grid (H, W) = (9, 10)"),
    ("window_size", lambda a: (0, 5), ValueError, "window_size: expected positive sizes"),
    ("window_size", lambda a: 4.0, TypeError, "window_size: expected an int or a pair"),
    ("shift_size", lambda a: (4, 1), ValueError,
     "shift_size: expected 0 <= shift < window_size (4, 5)"),
    ("shift_size", lambda a: (-1, 1), ValueError, "shift_size: expected 0 <= shift"),
    ("scale", lambda a: "x", TypeError, "scale: expected a float or None"),
    ("scale", lambda a: 0.0, ValueError, "scale: expected a nonzero finite float"),
    ("mask_value", lambda a: float("nan"), ValueError, "mask_value: expected a number below +inf"),
    ("mask_value", lambda a: None, TypeError, "mask_value: expected a float"),
    ("backend", lambda a: "cudnn", ValueError, "backend: expected one of"),
    ("partition", lambda a: "strided", ValueError, "partition: expected 'block' or 'grid'"),
    ("partition", lambda a: "grid", ValueError,
     "partition='grid': expected H, W multiples of the window (4, 5)"),
]


@pytest.mark.parametrize("name,make,exc,message", BAD_INPUTS)
def test_bad_inputs(name, make, exc, message):
    args = _valid_args()
    args[name] = make(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc) as info:
        ops.window_attention(q, k, v, **args)
    assert message in str(info.value)


@pytest.mark.parametrize("backend,change,reason", [
    ("triton", dict(D=160), "head dim 160 > 128"),
    ("triton", dict(D=96), "float32 with head dim 96 > 64 (window area 20)"),
    ("triton", dict(D=48, window=(8, 5)), "float32 with head dim 48 > 32 (window area 40)"),
    ("triton", dict(window=(25, 24), grid=(25, 24)), "window area 25x24 = 600 > 576"),
    ("triton", dict(dtype=torch.float64), "float64 runs only on the reference backend"),
    ("cuda", dict(window=(25, 24), grid=(25, 24)), "window area 25x24 = 600 > 576"),
])
def test_forced_backend_reasons(backend, change, reason):
    D, window = change.get("D", 8), change.get("window", (4, 5))
    q, k, v = _packed_qkv(1, *change.get("grid", (9, 10)), 2, D,
                          change.get("dtype", torch.float32))
    with pytest.raises(_backend.BackendUnavailableError, match="window_attention") as info:
        ops.window_attention(q, k, v, window_size=window, backend=backend,
                             partition=change.get("partition", "block"))
    assert reason in str(info.value)


# Element offsets within one image are int32 in the Triton kernels: in q, k, v as given
# (meta: a 2**31 stride) and in the contiguous output and gradients they write
# (expanded inputs hold no memory). Packed, the output of 2**31 elements fits, but the
# gradient's tokens are 3 * heads * D apart.
@pytest.mark.parametrize("shape,strides,packed,reason", [
    ((1, 2, 2, 1, 8), (2**32, 2**31, 8, 8, 1), False, "q: "),
    ((1, 2**12, 2**12, 16, 16), None, False, "out: "),
    ((1, 2**12, 2**11, 16, 16), None, True, "dq: "),
], ids=["q-meta", "out-expanded", "packed-grad-expanded"])
def test_int32_offset_limits_are_backend_reasons(shape, strides, packed, reason):
    """An image spanning 2**31 elements is a reason to skip Triton, not a launch failure."""
    if strides is None:
        q = torch.zeros(()).expand(shape)
    else:
        q = torch.empty_strided(shape, strides, device="meta")
    why = ops._reasons("triton", q, q, q, None, None, (2, 2), packed=packed)
    assert any(r.startswith(reason + "offsets within one sample must fit in int32")
               for r in why), why
    row = q[:, :1]  # one grid row fits
    assert not [r for r in ops._reasons("triton", row, row, row, None, None, (1, 2),
                                        packed=packed) if "int32" in r]
    if strides is None:  # the forced backend refuses before allocating anything
        with pytest.raises(_backend.BackendUnavailableError, match="fit in int32"):
            if packed:
                qkv = torch.zeros(()).expand(*shape[:3], 3, *shape[3:])
                ops.window_attention_qkvpacked(qkv, window_size=2, backend="triton")
            else:
                ops.window_attention(q, q, q, window_size=2, backend="triton")


def test_cpu_default_is_reference():
    q, k, v = _packed_qkv(1, 9, 10, 2, 8, torch.float32)
    out = ops.window_attention(q, k, v, window_size=(4, 5), shift_size=(2, 1))
    torch.testing.assert_close(out, reference(q, k, v, window_size=(4, 5), shift_size=(2, 1)))


# The CUDA bindings validate what they are given, whoever calls them.
FWD_ARG_NAMES = ("q", "k", "v", "table", "pad_k", "pad_v", "gain", "window_h", "window_w",
                 "shift_h", "shift_w", "scale", "mask_value", "grid_partition")


def _fwd_args(**changes):
    q, k, v = _packed_qkv(1, 9, 10, 2, 8, torch.float32)
    args = dict(q=q, k=k, v=v, table=_table((4, 5), 2, torch.float32), pad_k=torch.zeros(2, 8),
                pad_v=torch.zeros(2, 8), gain=None, window_h=4, window_w=5, shift_h=2, shift_w=1, scale=0.35,
                mask_value=-100.0, grid_partition=False)
    args.update({name: change(args) if callable(change) else change
                 for name, change in changes.items()})
    return [args[name] for name in FWD_ARG_NAMES]


BAD_BINDING_INPUTS = [
    (dict({name: lambda a: torch.zeros(1, 25, 24, 2, 8) for name in "qkv"}, window_h=25,
          window_w=24), ValueError, "windows of at most 576 tokens, got 25x24 = 600"),
    (dict(window_h=10), ValueError, "window_size must be positive and at most the grid"),
    (dict(shift_h=4), ValueError, "shift_size must satisfy 0 <= shift < window_size"),
    (dict(k=lambda a: a["k"].half()), TypeError, "k must have the dtype of q"),
    (dict(v=lambda a: a["v"][:, :8]), ValueError, "v must have the shape of q"),
    (dict(table=torch.zeros(49, 2)), ValueError, "table must have shape [63, 2]"),
    (dict(pad_v=None), ValueError, "pad_k and pad_v must both be given"),
    (dict(gain=torch.ones(3)), ValueError, "gain must have shape [2], got [3]"),
    (dict(q=lambda a: a["q"].double()), TypeError, "q must be float32, float16 or bfloat16"),
    (dict(grid_partition=True), ValueError, "grid_partition needs H, W multiples of the window"),
]


@pytest.mark.parametrize("changes,error,match", BAD_BINDING_INPUTS)
def test_binding_rejects_bad_input(changes, error, match):
    host_ops = host.load()
    with pytest.raises(error) as info:
        host_ops.window_attention_fwd(*_fwd_args(**changes))
    assert match in str(info.value)


def test_binding_rejects_bad_lse():
    host_ops = host.load()
    q, k, v, table, pad_k, pad_v, gain, *geometry = _fwd_args()
    out, lse = host_ops.window_attention_fwd(q, k, v, table, pad_k, pad_v, gain, *geometry)
    with pytest.raises(ValueError) as info:
        host_ops.window_attention_bwd(out, q, k, v, out, lse[:, :1], table, pad_k, pad_v, gain,
                                      *geometry, True, True, False)
    assert "lse must have shape [6, 2, 20, 2], got [6, 1, 20, 2]" in str(info.value)


@contextlib.contextmanager
def _tf32(allowed):
    """torch's TF32 permission for float32 matmuls, set and restored through its property
    (monkeypatch cannot restore it)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if allowed else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("tf32", [False, True], ids=["no-tf32", "tf32"])
def test_automatic_order(dtype, tf32, monkeypatch):
    """Automatic choice on CUDA tensors: Triton first for every dtype, TF32 allowed or
    not (its float32 products are float32-grade 3xTF32 unless TF32 is allowed)."""
    chosen = []
    choose = _backend.choose

    def on_gpu(op, backend, reasons, device, **kwargs):
        # As on a GPU where every backend can run the call; the CPU run uses the reference.
        chosen.append(choose(op, backend, lambda b: [], device="cuda", **kwargs))
        return "reference"

    monkeypatch.setattr(_backend, "choose", on_gpu)
    with _tf32(tf32):
        ops.window_attention(*_packed_qkv(1, 7, 7, 1, 32, dtype), window_size=7)
    assert chosen == ["triton"]


# (window, what the Triton launchers run for float32): 3xTF32 takes the tiled kernels
# past 32 tokens, TF32 past 64.
PRECISION_WINDOWS = [((4, 5), "single tile"), ((6, 7), "3xTF32 tiled, TF32 single tile"),
                     ((9, 8), "tiled")]


@pytest.mark.parametrize("window", [w for w, _ in PRECISION_WINDOWS],
                         ids=[why for _, why in PRECISION_WINDOWS])
@pytest.mark.parametrize("tf32", [False, True], ids=["no-tf32", "tf32"])
def test_float32_precision_follows_torch(window, tf32):
    """Float32 inputs: float32-grade results unless torch allows TF32, then TF32's error
    (visible, and within the tolerance rule at float16's floor: both keep 10 mantissa
    bits)."""
    torch.manual_seed(0)
    H, W = 2 * window[0] - 1, window[1] + 2  # padded and shifted: every window kind
    inputs = [t.detach().requires_grad_() for t in
              (*_packed_qkv(1, H, W, 1, 16, torch.float32), _table(window, 1, torch.float32))]
    grad = torch.randn(1, H, W, 1, 16)
    kwargs = dict(window_size=window, shift_size=(1, 2))
    expected, expected_grads = _run("reference", [t.detach().double().requires_grad_()
                                                  for t in inputs], True, False, grad, **kwargs)
    with _tf32(tf32):
        out, grads = _run("triton", inputs, True, False, grad, **kwargs)
    # TF32 keeps float16's 10 explicit mantissa bits: PyTorch's own at float16 precision.
    _assert_rule(("out", "q", "k", "v", "table"), (out, *grads), inputs, True, False, grad,
                 precision=torch.float16 if tf32 else None, **kwargs)
    errors = [((g.double() - e).abs().max() / e.abs().max()).item()
              for g, e in zip((out, *grads), (expected, *expected_grads))]
    if tf32:
        assert max(errors) > 1e-5, errors
    else:
        assert max(errors) < 2e-6, errors
