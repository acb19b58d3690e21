"""scaled_dot_product_attention, backend="cuda": the CUDA C++ kernels
(csrc/scaled_dot_product_attention.cu) run on CPU tensors under host emulation
(pyvit_ops.testing.host), forward and every gradient (incl. a broadcast bias's)
against the reference evaluated in float64."""
import pytest
import torch

import pyvit_ops.ops.scaled_dot_product_attention as ops
from pyvit_ops import _ext
from pyvit_ops.kernels.scaled_dot_product_attention import dropout_keep_mask
from pyvit_ops.reference.scaled_dot_product_attention import scaled_dot_product_attention as reference
from pyvit_ops.testing import host


@pytest.fixture(scope="module", autouse=True)
def host_ops():
    return host.load()


# (dtype, atol, rtol): products and softmax run in fp32 (probabilities are not rounded to
# the input dtype), so the error is about the rounding of inputs and results.
DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
]

# (batch, Nq, Nk, D, bias shape or None): N not a multiple of the tiles (16 queries,
# 32 / 16 keys), Nq = 1, head dims of each bucket (32, 64, 128) incl. padded 80.
CASES = [
    pytest.param((1, 2), 37, 37, 32, (2, 37, 37), id="N37-D32-bias-per-head"),
    pytest.param((2, 1), 1, 33, 64, (2, 1, 1, 33), id="Nq1-D64-bias-per-batch"),
    pytest.param((1, 2), 20, 17, 80, (1, 1, 20, 17), id="D80-bias-broadcast-all"),
    pytest.param((2, 2), 9, 40, 32, (1, 2, 1, 40), id="bias-key-row-over-b-and-queries"),
    pytest.param((1, 1), 17, 5, 128, None, id="D128-no-bias"),
]


def _inputs(batch, nq, nk, d, bias_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, nq, d, generator=g).to(dtype)
    k = torch.randn(*batch, nk, d, generator=g).to(dtype)
    v = torch.randn(*batch, nk, d, generator=g).to(dtype)
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g).to(dtype)
    dout = torch.randn(*batch, nq, d, generator=g).to(dtype)
    return q, k, v, bias, dout


def _run(fn, q, k, v, bias, dout, **kw):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point())
              if t is not None else None for t in (q, k, v, bias)]
    out = fn(*leaves, **kw)
    want = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, want, dout.to(out.dtype))
    return out.detach(), grads


def _check(got, want, atol, rtol):
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def _check_all(q, k, v, bias, dout, dtype, atol, rtol, **kw):
    out, grads = _run(ops.scaled_dot_product_attention, q, k, v, bias, dout, backend="cuda", **kw)
    d64 = [None if t is None else (t.double() if t.is_floating_point() else t)
           for t in (q, k, v, bias, dout)]
    ref_out, ref_grads = _run(reference, *d64, **kw)
    assert out.dtype == dtype
    _check(out, ref_out, atol, rtol)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        # Gradients sum over up to Nq * Nk terms: a wider tolerance than the output.
        _check(got, want, 4 * atol, 4 * rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("batch, nq, nk, d, bias_shape", CASES)
def test_forward_backward(batch, nq, nk, d, bias_shape, dtype, atol, rtol):
    q, k, v, bias, dout = _inputs(batch, nq, nk, d, bias_shape, dtype)
    _check_all(q, k, v, bias, dout, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_float32_bias_and_scale(dtype, atol, rtol):
    q, k, v, _, dout = _inputs((1, 2), 19, 21, 32, None, dtype)
    bias = torch.randn(1, 2, 19, 21)  # float32 bias with a low-precision q
    _check_all(q, k, v, bias, dout, dtype, atol, rtol, scale=0.3)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_bool_mask_with_empty_rows(dtype, atol, rtol):
    q, k, v, _, dout = _inputs((1, 2), 18, 35, 32, None, dtype)
    mask = torch.rand(1, 18, 35, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[:, 3] = False  # a query that attends to nothing: zeros, as torch
    _check_all(q, k, v, mask, dout, dtype, atol, rtol)
    out = ops.scaled_dot_product_attention(q, k, v, mask, backend="cuda")
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))


def test_bias_constant_along_keys_has_zero_grad():
    q, k, v, _, dout = _inputs((1, 2), 7, 9, 32, None, torch.float32)
    bias = torch.randn(1, 2, 7, 1)
    _check_all(q, k, v, bias, dout, torch.float32, 2e-5, 2e-5)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_strided_qkv_from_packed_projection(dtype, atol, rtol):
    b, n, h, d = 2, 21, 2, 32
    qkv = torch.randn(b, n, 3, h, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (b, h, n, d) views, stride 3*h*d on n
    assert not q.is_contiguous()
    dout = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    bias = torch.randn(h, n, n, generator=torch.Generator().manual_seed(4)).to(dtype)
    _check_all(q, k, v, bias, dout, dtype, atol, rtol)


def test_dropout_matches_triton_mask():
    """The kernels drop the elements of the Triton kernels' Philox mask, in the forward
    and the backward."""
    q, k, v, bias, dout = _inputs((1, 2), 13, 35, 32, (2, 13, 35), torch.float32)
    p = 0.3
    torch.manual_seed(5)
    out, grads = _run(ops.scaled_dot_product_attention, q, k, v, bias, dout, dropout_p=p,
                      backend="cuda")
    torch.manual_seed(5)  # the same seed draw as the call above
    seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64))
    keep = dropout_keep_mask(seed, (1, 2, 13, 35), p, q.device)
    assert 0 < keep.sum() < keep.numel()

    def dropped(q, k, v, bias):
        attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, -1)
        return (attn * keep / (1 - p)) @ v

    ref_out, ref_grads = _run(dropped, *(t.double() for t in (q, k, v, bias)), dout.double())
    _check(out, ref_out, 2e-5, 2e-5)
    for got, want in zip(grads, ref_grads):
        _check(got, want, 1e-4, 1e-4)


def test_deterministic():
    q, k, v, bias, dout = _inputs((2, 2), 20, 37, 32, (1, 2, 20, 37), torch.float32)
    first = _run(ops.scaled_dot_product_attention, q, k, v, bias, dout, backend="cuda")
    second = _run(ops.scaled_dot_product_attention, q, k, v, bias, dout, backend="cuda")
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


def test_bad_input_names_argument(host_ops):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="head dim"):
        host_ops.scaled_dot_product_attention_fwd(torch.randn(1, 1, 4, 130), torch.randn(1, 1, 4, 130),
                                                  torch.randn(1, 1, 4, 130), None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="bias"):
        host_ops.scaled_dot_product_attention_fwd(q, q, q, torch.randn(1, 1, 4, 5), 1.0, 0.0, 0)
    with pytest.raises(TypeError, match="bias"):
        host_ops.scaled_dot_product_attention_fwd(q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.int32),
                                                  1.0, 0.0, 0)
