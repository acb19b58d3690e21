"""window_attention, backend="cuda": the CUDA C++ kernels (csrc/window_attention.cu) run
on CPU tensors under host emulation (pyvit_ops.testing.host), forward and every
gradient against the reference."""
import pytest
import torch

import pyvit_ops.ops.window_attention as ops
from pyvit_ops.reference.window_attention import window_attention as reference
from pyvit_ops.testing import host


@pytest.fixture(scope="module")
def host_ops():
    return host.load()


# (dtype, atol, rtol): every product and the softmax run in fp32 (probabilities are not
# rounded to the input dtype), so the error is about the rounding of the result.
DTYPES = [
    (torch.float32, 5e-6, 2e-5),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 8e-3, 8e-3),
]

# (B, H, W, heads, D, window, shift, table, pad, param_dtype, layout, scale, mask_value);
# param_dtype is the table's and pads' dtype ("input": q's). The host build aims at 4
# backward blocks, so most cases walk several windows per block, some with a ragged
# last group (9 windows of 2 heads: groups of 5 and 4).
CASES = [
    pytest.param(1, 9, 10, 2, 8, (4, 5), (2, 1), True, True, "float32", "packed", None, -100.0,
                 id="pad-hw-nonsquare"),
    pytest.param(1, 14, 14, 3, 32, 7, 3, True, True, "input", "mixed", None, -100.0,
                 id="swin7-shift3-D32"),
    pytest.param(1, 10, 13, 2, 48, (4, 6), (0, 3), True, True, "input", "packed", 0.37, -2.5,
                 id="shift-w-D48-soft-mask"),
    pytest.param(1, 12, 8, 1, 64, 8, 0, False, False, None, "mixed", None, -100.0,
                 id="w8-N64-unshifted-notable"),
    pytest.param(2, 5, 9, 2, 6, (3, 4), (1, 2), True, True, "float32", "mixed", None, -100.0,
                 id="N12-D6-unaligned"),
    pytest.param(1, 4, 7, 1, 130, (3, 5), (2, 0), True, True, "float32", "packed", None,
                 float("-inf"), id="D130-five-chunks-shift-h-inf-mask"),
]


def _packed_qkv(B, H, W, heads, D, dtype):
    """q, k, v as strided views of one (B, H, W, 3, heads, D) projection."""
    return torch.randn(B, H, W, 3, heads, D, dtype=dtype).unbind(3)


def _qkv(B, H, W, heads, D, dtype, layout):
    if layout == "packed":
        return _packed_qkv(B, H, W, heads, D, dtype)
    # q contiguous, k read through a (B, W, H, ...) transpose, v from a packed projection.
    q = torch.randn(B, H, W, heads, D, dtype=dtype)
    k = torch.randn(B, W, H, heads, D, dtype=dtype).transpose(1, 2)
    v = _packed_qkv(B, H, W, heads, D, dtype)[2]
    return q, k, v


def _table(window, heads, dtype):
    wh, ww = (window, window) if isinstance(window, int) else window
    return torch.randn((2 * wh - 1) * (2 * ww - 1), heads, dtype=dtype)


def _run(backend, tensors, with_table, with_pad, grad, **kwargs):
    q, k, v, *rest = tensors
    table = rest.pop(0) if with_table else None
    pad_kv = tuple(rest) if with_pad else None
    out = ops.window_attention(q, k, v, table, pad_kv=pad_kv, backend=backend, **kwargs)
    # Without padding the pads do not reach the reference's graph: zero gradient.
    grads = torch.autograd.grad(out, tensors, grad.to(out.dtype), allow_unused=True,
                                materialize_grads=True)
    return out, grads


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize(
    "B,H,W,heads,D,window,shift,with_table,with_pad,param_dtype,layout,scale,mask_value", CASES)
def test_cuda_matches_reference(host_ops, B, H, W, heads, D, window, shift, with_table, with_pad,
                                param_dtype, layout, scale, mask_value, dtype, atol, rtol):
    torch.manual_seed(0)
    inputs = list(_qkv(B, H, W, heads, D, dtype, layout))
    param_dtype = dtype if param_dtype == "input" else torch.float32
    if with_table:
        inputs.append(_table(window, heads, param_dtype))
    if with_pad:
        inputs += list(torch.randn(2, heads, D, dtype=param_dtype).unbind(0))
    inputs = [t.detach().requires_grad_() for t in inputs]
    # Upstream gradient as a non-contiguous view, as after a permuting projection.
    grad = torch.randn(B, W, H, heads, D, dtype=dtype).transpose(1, 2)
    kwargs = dict(window_size=window, shift_size=shift, scale=scale, mask_value=mask_value)

    out, grads = _run("cuda", inputs, with_table, with_pad, grad, **kwargs)
    # Oracle: the reference in float64 on the same values, pads rounded to q's dtype as
    # the kernel's contract says (the rounding passes the gradient through unchanged).
    oracle = [t.detach().double() for t in inputs]
    if with_pad:
        oracle[-2:] = [t.detach().to(dtype).double() for t in inputs[-2:]]
    expected, expected_grads = _run("reference", [t.requires_grad_() for t in oracle],
                                    with_table, with_pad, grad, **kwargs)
    assert out.dtype == dtype and out.shape == (B, H, W, heads, D) and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    names = ["q", "k", "v"] + ["table"] * with_table + ["pad_k", "pad_v"] * with_pad
    for name, g, e, t in zip(names, grads, expected_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        # Summed gradients (table, pads) add up many terms: scale the tolerance.
        summed = name in ("table", "pad_k", "pad_v")
        scale_tol = max(1.0, e.abs().max().item() / 4) if summed else 1.0
        torch.testing.assert_close(g.double(), e, atol=atol * scale_tol, rtol=rtol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def test_cuda_backward_is_deterministic(host_ops):
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(1, 9, 10, 2, 32, torch.float16))
    table = _table((4, 5), 2, torch.float32).requires_grad_()
    pad_kv = tuple(t.requires_grad_() for t in torch.randn(2, 2, 32, dtype=torch.float16))
    tensors = (q, k, v, table, *pad_kv)
    grad = torch.randn(1, 9, 10, 2, 32, dtype=torch.float16)
    results = []
    for _ in range(2):
        out = ops.window_attention(q, k, v, table, window_size=(4, 5), shift_size=(2, 1),
                                   pad_kv=pad_kv, backend="cuda")
        results.append((out, *torch.autograd.grad(out, tensors, grad)))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_cuda_gradients_only_where_asked(host_ops):
    """Without table / pad gradients the backward skips their reductions."""
    torch.manual_seed(0)
    q, k, v = _packed_qkv(1, 8, 10, 2, 16, torch.float32)
    q = q.detach().requires_grad_()
    table = _table(4, 2, torch.float32)
    pad_kv = tuple(torch.randn(2, 2, 16).unbind(0))
    kwargs = dict(window_size=4, shift_size=2, pad_kv=pad_kv)
    out = ops.window_attention(q, k, v, table, backend="cuda", **kwargs)
    (dq,) = torch.autograd.grad(out, q, torch.ones_like(out))
    expected = reference(q, k, v, table, **kwargs)
    (expected_dq,) = torch.autograd.grad(expected, q, torch.ones_like(expected))
    torch.testing.assert_close(dq, expected_dq, atol=2e-6, rtol=1e-5)


def test_cuda_pad_gradient_is_zero_without_padding(host_ops):
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(1, 8, 8, 2, 8, torch.float32))
    pad_kv = tuple(t.requires_grad_() for t in torch.randn(2, 2, 8))
    out = ops.window_attention(q, k, v, window_size=4, shift_size=2, pad_kv=pad_kv, backend="cuda")
    dpad_k, dpad_v = torch.autograd.grad(out, pad_kv, torch.randn_like(out))
    assert torch.equal(dpad_k, torch.zeros(2, 8)) and torch.equal(dpad_v, torch.zeros(2, 8))


def test_cuda_empty_batch(host_ops):
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(0, 6, 6, 2, 8, torch.float32))
    table = _table(3, 2, torch.float32).requires_grad_()
    out = ops.window_attention(q, k, v, table, window_size=3, shift_size=1, backend="cuda")
    assert out.shape == (0, 6, 6, 2, 8)
    (dtable,) = torch.autograd.grad(out, table, torch.ones_like(out))
    assert torch.equal(dtable, torch.zeros_like(table))


def test_cuda_custom_op_opcheck(host_ops):
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in _packed_qkv(1, 4, 5, 1, 16, torch.float32))
    table = _table((4, 5), 1, torch.float32).requires_grad_()
    pad_k, pad_v = (t.requires_grad_() for t in torch.randn(2, 1, 16))
    args = (q, k, v, table, pad_k, pad_v, 4, 5, 1, 2, 0.25, -100.0, "cuda")
    torch.library.opcheck(torch.ops.pyvit_ops.window_attention_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


# The bindings validate what they are given, whoever calls them.
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
def test_binding_rejects_bad_input(host_ops, changes, error, match):
    with pytest.raises(error) as info:
        host_ops.window_attention_fwd(*_fwd_args(**changes))
    assert match in str(info.value)


def test_binding_rejects_bad_lse(host_ops):
    q, k, v, table, pad_k, pad_v, *geometry = _fwd_args()
    out, lse = host_ops.window_attention_fwd(q, k, v, table, pad_k, pad_v, *geometry)
    with pytest.raises(ValueError) as info:
        host_ops.window_attention_bwd(out, q, k, v, out, lse[:, :1], table, pad_k, pad_v,
                                      *geometry, True, True)
    assert "lse must have shape [6, 2, 20], got [6, 1, 20]" in str(info.value)
