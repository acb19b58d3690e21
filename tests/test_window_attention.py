"""window_attention: reference vs timm; the kernel backends vs the reference: "triton"
(the Triton kernels in the interpreter) and "cuda" (the CUDA C++ kernels of
csrc/window_attention.cu on CPU tensors under host emulation, pyvit_ops.testing.host);
errors of the public function and of the CUDA bindings."""
import contextlib
import types

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (SwinTransformerBlock, get_relative_position_index,
                                          window_partition, window_reverse)

import pyvit_ops.ops.window_attention as ops
from pyvit_ops import _backend
from pyvit_ops.kernels import window_attention as kernels
from pyvit_ops.reference.window_attention import window_attention as reference
from pyvit_ops.testing import host
from op_cases import GridRecorder

# (B, H, W, heads, D, window, shift): borders, padding on one / both axes, non-square
# windows and shifts, a shift on one axis only, N not a multiple of the tile.
GEOMETRIES = [
    (1, 9, 10, 2, 8, (4, 5), (2, 1)),     # pad both axes, non-square window and shift
    (2, 14, 14, 3, 4, 7, 3),              # Swin: 7x7 windows, shift 3, no padding
    (1, 10, 7, 2, 6, (5, 3), (2, 0)),     # shift on H only, pad W
    (1, 9, 10, 1, 5, (3, 4), (0, 2)),     # shift on W only, pad H and W
    (1, 8, 8, 2, 4, 4, 0),                # W-MSA: no shift, no padding
    (1, 7, 9, 2, 4, 7, (3, 4)),           # one window row covering the whole height
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


@pytest.mark.parametrize("B,H,W,heads,D,window,shift", GEOMETRIES)
def test_reference_matches_timm_transcription(B, H, W, heads, D, window, shift):
    window, shift = _pair(window), _pair(shift)
    q, k, v = _packed_qkv(B, H, W, heads, D)
    table = _table(window, heads)
    pad_k, pad_v = torch.randn(2, heads, D, dtype=torch.float64)
    scale = 0.37
    expected = _timm_transcription(q, k, v, table, window, shift, scale, pad_k, pad_v)
    out = reference(q, k, v, table, window_size=window, shift_size=shift, scale=scale,
                    pad_kv=(pad_k, pad_v))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("B,H,W,heads,D,window,shift", GEOMETRIES)
def test_reference_matches_timm_block(B, H, W, heads, D, window, shift):
    """Through a real timm SwinTransformerBlock._attn (qkv bias -> padded tokens)."""
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


def test_reference_gradcheck():
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(1, 4, 5, 2, 2))
    table = _table((3, 4), 2).requires_grad_()
    pad_k, pad_v = (t.requires_grad_() for t in torch.randn(2, 2, 2, dtype=torch.float64))

    def fn(q, k, v, table, pad_k, pad_v):
        return reference(q, k, v, table, window_size=(3, 4), shift_size=(1, 2),
                         pad_kv=(pad_k, pad_v))

    # fast_mode: random projections of the Jacobian instead of all of its entries.
    assert torch.autograd.gradcheck(fn, (q, k, v, table, pad_k, pad_v), fast_mode=True)


# --------------------------------------------------------------------------- kernels

BACKENDS = ["triton", "cuda"]


def _use(backend):
    """The cuda backend runs on CPU tensors once the host-emulation build is loaded."""
    if backend == "cuda":
        host.load()


# (backend, dtype) -> (atol, rtol). Triton: float32 products are 3xTF32, float32-grade
# (the interpreter models tl.dot's input precision, pyvit_ops.testing.interpreter); half
# kernels round P and dS to the input dtype before the second products, as every fused
# attention does. CUDA: every product and the softmax run in fp32 (probabilities are
# not rounded), so the error is about the rounding of the result.
TOLERANCES = {
    ("triton", torch.float32): (5e-6, 2e-5),
    ("triton", torch.float16): (3e-3, 3e-3),
    ("triton", torch.bfloat16): (4e-2, 2e-2),
    ("cuda", torch.float32): (5e-6, 2e-5),
    ("cuda", torch.float16): (1e-3, 1e-3),
    ("cuda", torch.bfloat16): (8e-3, 8e-3),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tol(backend, dtype, expected, summed=False):
    """(atol, rtol) for one tensor: summed gradients (table, pads) add up many terms, so
    their atol scales with max |expected|. The row is that of the products' operand
    precision: Triton's float32 products round their operands to TF32 when torch allows
    it, 10 mantissa bits as float16's."""
    if backend == "triton" and kernels._precision(kernels._dtype_name(dtype)) == "tf32":
        dtype = torch.float16 if dtype == torch.float32 else dtype
    atol, rtol = TOLERANCES[backend, dtype]
    peak = expected.abs().max().item() if expected.numel() else 0.0
    return atol * (max(1.0, peak / 4) if summed else 1.0), rtol

# (B, H, W, heads, D, window, shift, table, pad, param_dtype, layout, scale, mask_value,
# backends); param_dtype is the table's and pads' dtype ("input": q's); layout "packed":
# q, k, v are slices of one projection, "qkvpacked": that projection goes to
# window_attention_qkvpacked, "mixed": three differently strided tensors. Windows per
# backward program: the interpreter and the host build aim at 4 programs / blocks, so
# most cases walk several windows in one program, some with a ragged last group
# (10x13 / (4, 6): 9 windows, 2 groups of 5 and 4).
CASES = [
    (1, 9, 10, 2, 32, (4, 5), (2, 1), True, True, "float32", "qkvpacked", None, -100.0,
     ("triton",), "pad-hw-nonsquare-D32"),
    (1, 9, 10, 2, 8, (4, 5), (2, 1), True, True, "float32", "qkvpacked", None, -100.0,
     ("cuda",), "pad-hw-nonsquare-D8"),
    (2, 7, 7, 3, 16, 7, 3, True, True, "input", "mixed", None, -100.0,
     ("triton",), "swin7-shift3-D16"),
    (1, 14, 14, 3, 32, 7, 3, True, True, "input", "mixed", None, -100.0,
     ("cuda",), "swin7-shift3-D32"),
    (1, 10, 13, 2, 48, (4, 6), (0, 3), True, True, "input", "packed", None, -100.0,
     ("triton",), "shift-w-D48"),
    (1, 10, 13, 2, 48, (4, 6), (0, 3), True, True, "input", "packed", 0.37, -2.5,
     ("cuda",), "shift-w-D48-soft-mask"),
    (1, 12, 8, 1, 64, 8, 0, False, False, None, "mixed", None, -100.0,
     ("triton", "cuda"), "w8-N64-unshifted-notable"),
    # 64-token tiles with wide head dims: the chunked pad and dbias passes (two and
    # four head-dim chunks); float32 must be refused.
    (1, 7, 9, 1, 64, (5, 7), (2, 3), True, True, "input", "qkvpacked", None, -100.0,
     ("triton",), "N35-D64-pad"),
    (1, 7, 9, 1, 128, (5, 7), (2, 3), True, True, "float32", "mixed", None, -100.0,
     ("triton",), "N35-D128-pad"),
    # Head dim 80: the 128 bucket, taken for half types; float32 must be refused.
    (1, 5, 6, 1, 80, (3, 4), (1, 2), True, True, "input", "packed", None, -100.0,
     ("triton",), "D80"),
    (2, 5, 9, 2, 6, (3, 4), (1, 2), True, True, "float32", "mixed", None, -100.0,
     ("cuda",), "N12-D6-unaligned"),
    (1, 4, 7, 1, 130, (3, 5), (2, 0), True, True, "float32", "packed", None, float("-inf"),
     ("cuda",), "D130-five-chunks-shift-h-inf-mask"),
    # Windows over 64 tokens: the tiled Triton kernels. Swin at 384 (12x12) on a padded
    # 2x2 window grid (all four window kinds, pad gradients); 9x10 with a -inf mask, where
    # a whole key block of a row can be masked; a 72-token window with head dim 64
    # (float32 must be refused).
    (1, 14, 17, 2, 32, 12, (6, 5), True, True, "float32", "qkvpacked", None, -100.0,
     ("triton",), "tiled-N144-pad-shift-D32"),
    (1, 10, 11, 1, 16, (9, 10), (4, 3), True, True, "input", "mixed", 0.37, float("-inf"),
     ("triton",), "tiled-N90-inf-mask-D16"),
    (1, 8, 9, 1, 64, (8, 9), (3, 0), False, False, None, "packed", None, -100.0,
     ("triton",), "tiled-N72-D64-notable"),
]
KERNEL_CASES = [pytest.param(backend, *case[:-2], id=f"{backend}-{case[-1]}")
                for case in CASES for backend in case[-2]]


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


def _run(backend, tensors, with_table, with_pad, grad, **kwargs):
    """``tensors``: q, k, v (or one packed qkv), then the table and pads asked for."""
    packed = tensors[0].dim() == 6
    tokens, rest = (tensors[:1], list(tensors[1:])) if packed else (tensors[:3], list(tensors[3:]))
    table = rest.pop(0) if with_table else None
    pad_kv = tuple(rest) if with_pad else None
    fn = ops.window_attention_qkvpacked if packed else ops.window_attention
    out = fn(*tokens, table, pad_kv=pad_kv, backend=backend, **kwargs)
    # Without padding the pads do not reach the reference's graph: zero gradient.
    return out, torch.autograd.grad(out, tensors, grad.to(out.dtype), allow_unused=True,
                                    materialize_grads=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("backend,B,H,W,heads,D,window,shift,with_table,with_pad,param_dtype,"
                         "layout,scale,mask_value", KERNEL_CASES)
def test_kernel_matches_reference(backend, B, H, W, heads, D, window, shift, with_table,
                                  with_pad, param_dtype, layout, scale, mask_value, dtype):
    kwargs = dict(window_size=window, shift_size=shift, scale=scale, mask_value=mask_value)
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
    # Oracle: the reference in float64 on the same values, pads rounded to q's dtype as
    # the kernel's contract says (the rounding passes the gradient through unchanged).
    oracle = [t.detach().double() for t in inputs]
    if with_pad:
        oracle[-2:] = [t.detach().to(dtype).double() for t in inputs[-2:]]
    expected, expected_grads = _run("reference", [t.requires_grad_() for t in oracle],
                                    with_table, with_pad, grad, **kwargs)
    assert out.dtype == dtype and out.shape == (B, H, W, heads, D) and out.is_contiguous()
    atol, rtol = _tol(backend, dtype, expected)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    names = (["qkv"] if layout == "qkvpacked" else ["q", "k", "v"]) + ["table"] * with_table \
        + ["pad_k", "pad_v"] * with_pad
    for name, g, e, t in zip(names, grads, expected_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        atol, rtol = _tol(backend, dtype, e, summed=name in ("table", "pad_k", "pad_v"))
        torch.testing.assert_close(g.double(), e, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


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
    expected = reference(q, k, v, table, **kwargs)
    (expected_dq,) = torch.autograd.grad(expected, q, torch.ones_like(expected))
    atol, rtol = _tol(backend, torch.float32, expected_dq)
    torch.testing.assert_close(q.grad, expected_dq, atol=atol, rtol=rtol)


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
                                             ("cuda", (3, 5))],
                         ids=["triton", "triton-tiled", "cuda"])
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
    expected, expected_grads = _run("reference", [t.detach().double().requires_grad_()
                                                  for t in inputs], True, False, grad, **kwargs)
    for name, g, e in zip(("out", "q", "k", "v", "table"), (out, *grads),
                          (expected, *expected_grads)):
        atol, rtol = _tol(backend, torch.float32, e, summed=name == "table")
        torch.testing.assert_close(g.double(), e, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


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
                   else kernels._DTYPE_NAMES[table.dtype])
            self.launches.append((self.kernel.__name__, tuple(sorted(constexprs.items())),
                                  num_warps, num_stages, key,
                                  "*" + kernels._DTYPE_NAMES[table.dtype]))
            return self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages,
                                     **constexprs)
        return launch


# The dtable reduction reads the fp32 partials whatever the inputs' dtype.
# (H, W, window, D, dtype, TF32 allowed, backward PASSes): padded grids, table and pads
# needing gradients. 64-token tiles at D = 64: dq / dk / dv, dbias alone, pads (two
# head-dim chunks); half precision D = 32 (Swin): dbias fused, one-chunk pad pass;
# float32 as TF32 and as 3xTF32 (dbias alone at D = 64, tiled past 32 tokens); windows
# over 64 tokens: the tiled kernels' dq, dk / dv (with the pads) and dbias.
@pytest.mark.parametrize("H,W,window,D,dtype,table_dtype,tf32,passes", [
    (7, 9, (5, 7), 64, torch.float16, torch.float16, False, {0, 1, 2}),
    (9, 8, 7, 16, torch.bfloat16, torch.float32, False, {0, 1}),
    (9, 10, (4, 5), 32, torch.float32, torch.float32, True, {0, 1}),
    (9, 10, (4, 5), 32, torch.float32, torch.float32, False, {0, 1}),
    (9, 10, (4, 5), 64, torch.float32, torch.float32, False, {0, 1, 2}),
    (9, 8, 7, 32, torch.float32, torch.float32, False, {2, 3, 4}),
    (13, 12, (12, 11), 32, torch.bfloat16, torch.bfloat16, False, {2, 3, 4}),
], ids=["N35-D64-fp16", "N49-D16-bf16-fp32table", "N20-D32-tf32", "N20-D32-fp32x3",
        "N20-D64-fp32x3", "tiled-N49-D32-fp32x3", "tiled-N132-D32-bf16"])
def test_launches_are_static_compile_specs(monkeypatch, H, W, window, D, dtype, table_dtype,
                                           tf32, passes):
    """The static compile check (tests/test_static_compile.py) covers what the launchers
    pick: every launch is a spec of the sm_80 row (the interpreter's), table dtype
    included (fp32 parameters under autocast, or the model's dtype)."""
    specs = {(s["fn"].__name__, tuple(sorted((k, v) for k, v in s["constexprs"].items()
                                             if not k.startswith("stride_"))),
              s["num_warps"], s["num_stages"], s["dtype"],
              next(s["signature"][a] for a in _TABLE_ARGS if a in s["signature"]))
             for s in kernels.static_compile_specs() if 80 in s.get("archs", (80, 90))}
    launches = []
    for name in _KERNEL_NAMES:
        monkeypatch.setattr(kernels, name, _LaunchRecorder(getattr(kernels, name), launches))
    torch.manual_seed(0)
    tensors = [t.detach().requires_grad_() for t in (
        *_packed_qkv(1, H, W, 1, D, dtype), _table(window, 1, table_dtype),
        *torch.randn(2, 1, D))]
    with _tf32(tf32):
        out = ops.window_attention(*tensors[:4], window_size=window, shift_size=2,
                                   pad_kv=tensors[4:], backend="triton")
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
    kernels.window_attention_bwd(out, q, k, v, out, lse, table, None, None, *geometry,
                                 (True,) * 6)
    assert len(grids) > 2 and all(n <= 65535 for g in grids for n in g[1:]), grids


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_opcheck(backend):
    _use(backend)
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(1, 4, 5, 1, 16, torch.float32))
    table = _table((4, 5), 1, torch.float32).requires_grad_()
    pad_k, pad_v = (t.requires_grad_() for t in torch.randn(2, 1, 16))
    args = (q, k, v, table, pad_k, pad_v, 4, 5, 1, 2, 0.25, -100.0, backend)
    torch.library.opcheck(torch.ops.pyvit_ops.window_attention_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


# --------------------------------------------------------------------------- errors


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
    ("triton", dict(window=(17, 16), grid=(17, 16)), "window area 17x16 = 272 > 256"),
    ("triton", dict(dtype=torch.float64), "float64 runs only on the reference backend"),
    ("cuda", dict(window=(9, 8)), "window area 9x8 = 72 > 64"),
])
def test_forced_backend_reasons(backend, change, reason):
    D, window = change.get("D", 8), change.get("window", (4, 5))
    q, k, v = _packed_qkv(1, *change.get("grid", (9, 10)), 2, D,
                          change.get("dtype", torch.float32))
    with pytest.raises(_backend.BackendUnavailableError, match="window_attention") as info:
        ops.window_attention(q, k, v, window_size=window, backend=backend)
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
    assert any(r.startswith(reason + "offsets within one image must fit in int32")
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
FWD_ARG_NAMES = ("q", "k", "v", "table", "pad_k", "pad_v", "window_h", "window_w", "shift_h",
                 "shift_w", "scale", "mask_value")


def _fwd_args(**changes):
    q, k, v = _packed_qkv(1, 9, 10, 2, 8, torch.float32)
    args = dict(q=q, k=k, v=v, table=_table((4, 5), 2, torch.float32), pad_k=torch.zeros(2, 8),
                pad_v=torch.zeros(2, 8), window_h=4, window_w=5, shift_h=2, shift_w=1, scale=0.35,
                mask_value=-100.0)
    args.update({name: change(args) if callable(change) else change
                 for name, change in changes.items()})
    return [args[name] for name in FWD_ARG_NAMES]


BAD_BINDING_INPUTS = [
    (dict(window_h=9, window_w=8), ValueError, "windows of at most 64 tokens, got 9x8 = 72"),
    (dict(window_h=10), ValueError, "window_size must be positive and at most the grid"),
    (dict(shift_h=4), ValueError, "shift_size must satisfy 0 <= shift < window_size"),
    (dict(k=lambda a: a["k"].half()), TypeError, "k must have the dtype of q"),
    (dict(v=lambda a: a["v"][:, :8]), ValueError, "v must have the shape of q"),
    (dict(table=torch.zeros(49, 2)), ValueError, "table must have shape [63, 2]"),
    (dict(pad_v=None), ValueError, "pad_k and pad_v must both be given"),
    (dict(q=lambda a: a["q"].double()), TypeError, "q must be float32, float16 or bfloat16"),
]


@pytest.mark.parametrize("changes,error,match", BAD_BINDING_INPUTS)
def test_binding_rejects_bad_input(changes, error, match):
    host_ops = host.load()
    with pytest.raises(error) as info:
        host_ops.window_attention_fwd(*_fwd_args(**changes))
    assert match in str(info.value)


def test_binding_rejects_bad_lse():
    host_ops = host.load()
    q, k, v, table, pad_k, pad_v, *geometry = _fwd_args()
    out, lse = host_ops.window_attention_fwd(q, k, v, table, pad_k, pad_v, *geometry)
    with pytest.raises(ValueError) as info:
        host_ops.window_attention_bwd(out, q, k, v, out, lse[:, :1], table, pad_k, pad_v,
                                      *geometry, True, True)
    assert "lse must have shape [6, 2, 20], got [6, 1, 20]" in str(info.value)


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
    (visible, and within float16's tolerance: both keep 10 mantissa bits)."""
    torch.manual_seed(0)
    H, W = 2 * window[0] - 1, window[1] + 2  # padded and shifted: every window kind
    inputs = [t.detach().requires_grad_() for t in
              (*_packed_qkv(1, H, W, 1, 16, torch.float32), _table(window, 1, torch.float32))]
    grad = torch.randn(1, H, W, 1, 16)
    kwargs = dict(window_size=window, shift_size=(1, 2))
    expected, expected_grads = _run("reference", [t.detach().double().requires_grad_()
                                                  for t in inputs], True, False, grad, **kwargs)
    errors = []
    with _tf32(tf32):
        out, grads = _run("triton", inputs, True, False, grad, **kwargs)
        for name, g, e in zip(("out", "q", "k", "v", "table"), (out, *grads),
                              (expected, *expected_grads)):
            atol, rtol = _tol("triton", torch.float32, e, summed=name == "table")
            torch.testing.assert_close(g.double(), e, atol=atol, rtol=rtol,
                                       msg=lambda m, name=name: f"{name}: {m}")
            errors.append(((g.double() - e).abs().max() / e.abs().max()).item())
    if tf32:
        assert max(errors) > 1e-5, errors
    else:
        assert max(errors) < 2e-6, errors
