"""elsa_attention, CUDA C++ backend: the kernels of csrc/elsa_attention.cu built for the
CPU under host emulation (pyvit_ops.testing.host), run through the public op with
backend="cuda" against the PyTorch reference (forward and every gradient), plus
determinism, strided inputs, partial gradients, empty inputs and input validation."""
import pytest
import torch

import pyvit_ops.ops.elsa_attention as ops
from pyvit_ops.reference.elsa_attention import elsa_attention as reference
from pyvit_ops.testing import host


@pytest.fixture(scope="module")
def host_ops():
    return host.load()


def _inputs(B, C, G, H, W, K, ghost, dtype, probs=False, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(B, C, H, W, generator=gen)
    attn = torch.randn(B, G * K * K, H, W, generator=gen) * 2
    if probs:
        attn = attn.reshape(B, G, K * K, H, W).softmax(2).reshape(B, -1, H, W)
    if channels_last:
        v = v.contiguous(memory_format=torch.channels_last)
        attn = attn.contiguous(memory_format=torch.channels_last)
    mul = torch.randn(C, K, K, generator=gen) if ghost in ("mul", "both") else None
    add = torch.randn(C, K, K, generator=gen) if ghost in ("add", "both") else None
    dout = torch.randn(B, C, H, W, generator=gen)
    return tuple(t.to(dtype) if t is not None else None for t in (v, attn, mul, add, dout))


def _run(fn, v, attn, mul, add, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (v, attn, mul, add)]
    out = fn(*leaves, **kw)
    out.backward(dout)
    return out, [t.grad if t is not None else None for t in leaves]


def _cuda(*args, **kw):
    return ops.elsa_attention(*args, **kw, backend="cuda")


def _assert_close(actual, expected, atol, rtol, name):
    """atol is relative to the largest expected magnitude: one tolerance per dtype fits
    outputs and gradients of any scale."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def _check_against_reference(case, v, attn, mul, add, dout, atol, rtol, **kw):
    out, grads = _run(_cuda, v, attn, mul, add, dout, **kw)
    ref_out, ref_grads = _run(reference, v, attn, mul, add, dout, **kw)
    fmt = torch.channels_last if case.get("channels_last") else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    _assert_close(out, ref_out, atol, rtol, "out")
    for name, g, r in zip(("dv", "dattn", "dghost_mul", "dghost_add"), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            _assert_close(g, r, atol, rtol, name)


# (dtype, atol relative to max |expected|, rtol). Kernels and reference both compute in
# fp32 and round once, so fp32 differs by summation order only and fp16 / bf16 by at
# most about one rounding of the result.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3),
          (torch.bfloat16, 1.6e-2, 1.6e-2)]

# (B, C, G, H, W, K, dilation): odd sizes, grids smaller than the window, dilation,
# the ELSA-Swin head (32 channels), heads of 1 and 3 channels.
SHAPES = [
    (2, 6, 2, 13, 9, 3, 1),     # odd sizes, 3 channels per head
    (1, 4, 1, 3, 5, 7, 1),      # 3x5 grid inside a 7x7 window
    (1, 6, 3, 7, 6, 5, 2),      # dilation 2, 2 channels per head
    (2, 8, 2, 9, 5, 3, 2),      # dilation 2 over an odd grid
    (1, 64, 2, 6, 5, 7, 1),     # 32-channel heads (ELSA-Swin)
]
GHOSTS = ["none", "mul", "add", "both"]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=lambda x: str(x)[6:] if
                         isinstance(x, torch.dtype) else None)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}xG{}-{}x{}-k{}d{}".format(*s))
@pytest.mark.parametrize("ghost", GHOSTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
def test_matches_reference(host_ops, dtype, atol, rtol, shape, ghost, channels_last, probs):
    B, C, G, H, W, K, d = shape
    tensors = _inputs(B, C, G, H, W, K, ghost, dtype, probs=probs, channels_last=channels_last)
    _check_against_reference(dict(channels_last=channels_last), *tensors, atol, rtol,
                             kernel_size=K, dilation=d, apply_softmax=not probs)


# (B, C, G, H, W, K, dilation, why), float32, both ghost tensors.
EDGE_SHAPES = [
    (3, 48, 1, 5, 6, 7, 1, "48-channel head: two staged chunks, dM / dD summed in global memory"),
    (1, 40, 1, 4, 3, 9, 1, "K = 9 over a grid smaller than the window"),
    (1, 3, 1, 6, 7, 11, 1, "K = 11"),
    (1, 2, 2, 9, 11, 13, 1, "K = 13, 1 channel per head"),
    (2, 4, 2, 5, 4, 1, 1, "K = 1"),
    (1, 4, 1, 13, 9, 3, 3, "dilation 3: nine sub-grids of unequal sizes"),
    (1, 4, 2, 4, 4, 3, 5, "dilation larger than the grid: every tap outside but the centre"),
    (5, 4, 1, 37, 70, 3, 1, "several tiles per row and column, five samples"),
]


@pytest.mark.parametrize("case", EDGE_SHAPES, ids=lambda c: c[-1].split(":")[0])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_edge_shapes(host_ops, case, channels_last):
    B, C, G, H, W, K, d, _ = case
    tensors = _inputs(B, C, G, H, W, K, "both", torch.float32, channels_last=channels_last)
    _check_against_reference(dict(channels_last=channels_last), *tensors, 1e-5, 1e-5,
                             kernel_size=K, dilation=d)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_backward_is_deterministic(host_ops, channels_last):
    # Five samples, two per attn-gradient block in the test build: several partial rows
    # and the accumulation over a block's samples both take part.
    v, attn, mul, add, dout = _inputs(5, 8, 2, 11, 7, 5, "both", torch.float32,
                                      channels_last=channels_last)
    args = (dout, v, attn, mul, add, 5, 1, True, [True, True, True, True])
    first = host_ops.elsa_attention_bwd(*args)
    second = host_ops.elsa_attention_bwd(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True),
                                  (True, False, True, True), (False, True, False, True)],
                         ids=lambda n: "".join("1" if x else "0" for x in n))
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
def test_partial_gradients(host_ops, need, probs):
    """Only the requested gradients are computed; they match the full backward."""
    K = 3
    v, attn, mul, add, dout = _inputs(3, 6, 2, 7, 5, K, "both", torch.float32, probs=probs)
    args = (v, attn, mul, add, K, 2, not probs)
    full = host_ops.elsa_attention_bwd(dout, *args, [True] * 4)
    part = host_ops.elsa_attention_bwd(dout, *args, list(need))
    for name, p, f, wanted in zip(("dv", "dattn", "dmul", "dadd"), part, full, need):
        if wanted:
            torch.testing.assert_close(p, f, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
        else:
            assert p.numel() == 0, name


def test_strided_views_and_fp32_ghost(host_ops):
    """v and attn as strided slices of larger tensors (read in place), fp32 ghost
    tensors with fp16 data (AMP), dout in another layout than v."""
    B, C, G, H, W, K = 2, 8, 2, 5, 6, 3
    qkv = torch.randn(B, H, W, 3 * C).to(torch.float16).permute(0, 3, 1, 2)  # channels_last
    v = qkv[:, 2 * C:]
    attn = torch.randn(B, 2 * G * K * K, H, W).to(torch.float16)[:, 1::2]  # no unit stride
    mul, add = torch.randn(C, K, K), torch.randn(C, K, K)
    dout = torch.randn(B, C, H, W).to(torch.float16)
    out, grads = _run(_cuda, v, attn, mul, add, dout, kernel_size=K)
    ref_out, ref_grads = _run(reference, v, attn, mul, add, dout, kernel_size=K)
    _, atol, rtol = DTYPES[1]
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_close(out, ref_out, atol, rtol, "out")
    for name, g, r in zip(("dv", "dattn", "dghost_mul", "dghost_add"), grads, ref_grads):
        _assert_close(g, r, atol, rtol, name)
    assert grads[2].dtype == torch.float32 and grads[3].dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 4, 2, 5, 6), (2, 4, 2, 0, 6), (2, 0, 2, 5, 6)])
def test_empty_inputs(host_ops, shape):
    B, C, G, H, W = shape
    K = 3
    v, attn, mul, add, dout = _inputs(B, C, G, H, W, K, "both", torch.float32)
    assert host_ops.elsa_attention_fwd(v, attn, mul, add, K, 1, True).shape == v.shape
    dv, dattn, dmul, dadd = host_ops.elsa_attention_bwd(dout, v, attn, mul, add, K, 1, True,
                                                        [True] * 4)
    assert dv.shape == v.shape and dattn.shape == attn.shape
    for g in (dattn, dmul, dadd):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(host_ops, channels_last):
    """Schema, fake tensors and autograd registration agree with the kernels."""
    v, attn, mul, add, _ = _inputs(2, 4, 2, 5, 4, 3, "both", torch.float32,
                                   channels_last=channels_last)
    for t in (v, attn, mul, add):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.pyvit_ops.elsa_attention_fwd,
                          (v, attn, mul, add, 3, 1, True, "cuda"))


def _bad(**changes):
    v, attn, mul, add, dout = _inputs(2, 4, 2, 5, 6, 3, "both", torch.float32)
    args = dict(v=v, attn=attn, ghost_mul=mul, ghost_add=add, kernel_size=3, dilation=1,
                apply_softmax=True)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, error, match", [
    (_bad(v=torch.zeros(2, 4, 5, 6, dtype=torch.int32)), TypeError,
     "v must be float32, float16 or bfloat16"),
    (_bad(attn=torch.zeros(2, 18, 5, 6, dtype=torch.float16)), ValueError,
     "attn must have the dtype of v"),
    (_bad(kernel_size=4), ValueError, "kernel_size must be a positive odd int, got 4"),
    (_bad(kernel_size=15, attn=torch.zeros(2, 225, 5, 6), ghost_mul=None, ghost_add=None),
     ValueError, "compiled for odd kernel sizes 1 to 13"),
    (_bad(dilation=0), ValueError, "dilation must be a positive int"),
    (_bad(attn=torch.zeros(2, 10, 5, 6)), ValueError, "attn must have G \\* kernel_size\\*\\*2"),
    (_bad(attn=torch.zeros(2, 18, 5, 7)), ValueError,
     "attn must have the batch and spatial sizes of v"),
    (_bad(attn=torch.zeros(2, 27, 5, 6)), ValueError,
     "v must have a channel count divisible by the 3 heads"),
    (_bad(ghost_mul=torch.zeros(4, 3, 5)), ValueError,
     r"ghost_mul must have shape \[4, 3, 3\], got \[4, 3, 5\]"),
    (_bad(ghost_add=torch.zeros(4, 3, 3, dtype=torch.int64)), TypeError,
     "ghost_add must be float32, float16 or bfloat16"),
])
def test_bindings_reject_bad_input(host_ops, args, error, match):
    with pytest.raises(error, match=match):
        host_ops.elsa_attention_fwd(*args.values())


def test_backward_rejects_bad_gradient_arguments(host_ops):
    v, attn, mul, add, dout = _inputs(2, 4, 2, 5, 6, 3, "both", torch.float32)
    with pytest.raises(ValueError, match="dout must have the shape of v"):
        host_ops.elsa_attention_bwd(dout[:, :2], v, attn, mul, add, 3, 1, True, [True] * 4)
    with pytest.raises(ValueError, match="dout must have the dtype of v"):
        host_ops.elsa_attention_bwd(dout.half(), v, attn, mul, add, 3, 1, True, [True] * 4)
    with pytest.raises(ValueError, match="needs_input_grad must have 4 entries"):
        host_ops.elsa_attention_bwd(dout, v, attn, mul, add, 3, 1, True, [True] * 3)
