"""scaled_dot_product_attention: reference vs torch; the kernels of both backends vs an
fp64 oracle, forward and every gradient (q, k, v and the bias in its broadcast shape),
dropout, determinism and input errors. The ``backend`` parameter runs the Triton kernels
in the interpreter ("triton") and the CUDA C++ kernels under host emulation
(pyvit_ops.testing.host, "cuda"), both on CPU tensors.

Kernel tolerances follow flash-attention's rule: the kernel's error against the fp64
oracle may be at most 2x PyTorch's own error at the same precision (the plain
``softmax(q @ k^T * scale + bias) @ v`` composition in that dtype) plus a small floor.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from pyvit_ops import _backend
from pyvit_ops.kernels import scaled_dot_product_attention as kernels
from pyvit_ops.ops.scaled_dot_product_attention import scaled_dot_product_attention as sdpa
from pyvit_ops.ops.scaled_dot_product_attention import scaled_dot_product_attention_qkvpacked
from pyvit_ops.reference.scaled_dot_product_attention import scaled_dot_product_attention as ref
from pyvit_ops.testing import host

# (dtype, floor added to the 2x-PyTorch bound): kernel vs fp64 oracle.
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# (dtype, atol, rtol): reference vs torch's F.scaled_dot_product_attention (math path).
REF_TOL = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3),
           (torch.bfloat16, 1.6e-2, 1.6e-2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def host_ops():
    """The CUDA C++ kernels compiled for the CPU (host emulation)."""
    return host.load()


BACKENDS = ["triton", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cuda":
        request.getfixturevalue("host_ops")
    return request.param


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _bias(kind, shape, dtype):
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
        mask[..., 0] = True  # no fully masked row here (tested on its own)
        return mask
    return _randn(*shape, dtype=dtype)


def _torch_lowp(q, k, v, bias, scale):
    """PyTorch's own arithmetic at the input precision (the rule's yardstick)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias
    # A row with every key masked is 0, as torch's SDPA returns (softmax gives NaN).
    return torch.matmul(torch.softmax(s, dim=-1).nan_to_num(0.0).to(v.dtype), v)


def _grads(fn, inputs, dout):
    inputs = [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None
              for t in inputs]
    out = fn(*inputs)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out] + list(grads)


def _check_rule(names, got, oracle, lowp, floor):
    for name, g, o, l in zip(names, got, oracle, lowp):
        assert g.shape == o.shape, f"{name}: shape {tuple(g.shape)} != {tuple(o.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double() - o).abs().max().item()
        own = (l.double() - o).abs().max().item()
        assert err <= 2 * own + floor, (
            f"{name}: max |kernel - fp64| = {err:.3e} > 2 x PyTorch's own {own:.3e} + {floor:g}")


def _compare_kernel(q, k, v, bias, dtype, backend, scale=None):
    """Forward and all gradients (a float bias's included) of ``backend`` vs the fp64
    reference, under the 2x-PyTorch rule."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = bias if bias is not None and bias.dtype == torch.bool else None
    inputs = [q, k, v] if bias is None or mask is not None else [q, k, v, bias]
    names = ["out", "dq", "dk", "dv", "dbias"][:len(inputs) + 1]

    def call(fn, cast):
        def f(q_, k_, v_, b_=None):
            return fn(cast(q_), cast(k_), cast(v_), mask if b_ is None else cast(b_))
        return f

    dout = _randn(*q.shape, dtype=torch.float64)
    got = _grads(call(lambda *a: sdpa(*a, scale=scale, backend=backend), lambda t: t),
                 inputs, dout)
    oracle = _grads(call(lambda *a: ref(*a, scale=scale), lambda t: t.double()), inputs, dout)
    lowp = _grads(call(lambda *a: _torch_lowp(*a, scale), lambda t: t), inputs, dout)
    assert got[0].dtype == dtype
    _check_rule(names, got, oracle, lowp, KERNEL_TOL[dtype])


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype, atol, rtol", REF_TOL)
@pytest.mark.parametrize("batch, nq, nk, bias_kind, bias_shape", [
    ((2, 3), 7, 7, None, None),
    ((2, 3), 7, 9, "float", (7, 9)),          # Nq != Nk, bias shared by every head
    ((2, 3), 5, 11, "float", (3, 1, 11)),     # per-head key bias
    ((2, 3), 6, 6, "float", (2, 1, 6, 6)),    # per-sample bias over heads
    ((2, 3), 6, 8, "bool", (6, 8)),
    ((2, 3), 6, 8, "bool", (2, 1, 1, 8)),     # key padding mask
    ((2, 4, 3), 5, 5, "float", (4, 1, 5, 5)),  # 5-D (B, windows, heads): Swin-like mask
])
def test_reference_matches_torch(dtype, atol, rtol, batch, nq, nk, bias_kind, bias_shape):
    torch.manual_seed(0)
    q, k, v = _randn(*batch, nq, 16, dtype=dtype), _randn(*batch, nk, 16, dtype=dtype), \
        _randn(*batch, nk, 16, dtype=dtype)
    bias = None if bias_kind is None else _bias(bias_kind, bias_shape, dtype)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(ref(q, k, v, bias), expected, atol=atol, rtol=rtol)
    # The plain composition the reference uses when given a dropout mask (keep all).
    keep_all = torch.ones(nq, nk, dtype=torch.bool)
    torch.testing.assert_close(ref(q, k, v, bias, dropout_mask=keep_all), expected,
                               atol=atol, rtol=rtol)
    # The public function's reference backend is this reference.
    torch.testing.assert_close(sdpa(q, k, v, bias, backend="reference"), ref(q, k, v, bias))


def test_reference_fully_masked_rows_like_torch():
    """torch returns 0 (not NaN) for a row whose every key is masked, with 0 gradients."""
    torch.manual_seed(0)
    q, k, v = (_randn(2, 5, 8).requires_grad_() for _ in range(3))
    mask = torch.rand(5, 5) > 0.4
    mask[2] = False
    keep_all = torch.ones(5, 5, dtype=torch.bool)
    for m, keep in itertools.product(
            (mask, torch.zeros(5, 5).masked_fill(~mask, float("-inf"))), (None, keep_all)):
        out = ref(q, k, v, m, dropout_mask=keep)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(out, expected)
        assert (out[:, 2] == 0).all()
        (gq,) = torch.autograd.grad(out.sum(), [q])
        (eq,) = torch.autograd.grad(expected.sum(), [q])
        torch.testing.assert_close(gq, eq)


def test_reference_dropout_mask():
    torch.manual_seed(0)
    q, k, v = _randn(2, 6, 8), _randn(2, 7, 8), _randn(2, 7, 8)
    keep = torch.rand(2, 6, 7) > 0.25
    p = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1)
    expected = (p * keep / 0.75) @ v
    torch.testing.assert_close(ref(q, k, v, dropout_p=0.25, dropout_mask=keep), expected)
    assert (ref(q, k, v, dropout_p=1.0) == 0).all()


@pytest.mark.parametrize("bias_kind", [None, "float", "bool"])
def test_reference_gradcheck_float64(bias_kind):
    torch.manual_seed(0)
    q, k, v = (_randn(2, 2, n, 4, dtype=torch.float64).requires_grad_() for n in (3, 4, 4))
    inputs = [q, k, v]
    if bias_kind == "float":
        inputs.append(_randn(2, 1, 3, 4, dtype=torch.float64).requires_grad_())
        fn = lambda q_, k_, v_, b_: ref(q_, k_, v_, b_)  # noqa: E731
    elif bias_kind == "bool":
        mask = torch.rand(3, 4) > 0.3
        mask[:, 0] = True
        fn = lambda q_, k_, v_: ref(q_, k_, v_, mask)  # noqa: E731
    else:
        keep = torch.rand(2, 2, 3, 4) > 0.3
        fn = lambda q_, k_, v_: ref(q_, k_, v_, dropout_p=0.3, dropout_mask=keep)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------- kernels


# (backends, batch, Nq, Nk, D, bias shape or None), each in every dtype: N not a multiple
# of any tile, Nq = 1, head dims of each bucket (32, 64, 128) incl. padded 48 and 80.
# The largest shape runs in the interpreter only: host emulation takes ~20 s per dtype.
SHAPES = [
    ("N37-D48-bias-2d", ["triton"], (2, 3), 37, 37, 48, (37, 37)),
    ("N37-D32-bias-per-head", BACKENDS, (1, 2), 37, 37, 32, (2, 37, 37)),
    ("Nq1-D64-bias-per-batch", BACKENDS, (2, 1), 1, 33, 64, (2, 1, 1, 33)),
    ("D80-bias-broadcast-all", BACKENDS, (1, 2), 20, 17, 80, (1, 1, 20, 17)),
    ("bias-key-row-over-b-and-queries", BACKENDS, (2, 2), 9, 40, 32, (1, 2, 1, 40)),
    ("D128-no-bias", BACKENDS, (1, 1), 17, 5, 128, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, batch, nq, nk, d, bias_shape", [
    pytest.param(b, *case, id=f"{b}-{name}")
    for name, backends, *case in SHAPES for b in backends], indirect=["backend"])
def test_kernel_matches_reference(backend, dtype, batch, nq, nk, d, bias_shape):
    torch.manual_seed(0)
    q = _randn(*batch, nq, d, dtype=dtype)
    k, v = _randn(*batch, nk, d, dtype=dtype), _randn(*batch, nk, d, dtype=dtype)
    bias = None if bias_shape is None else _randn(*bias_shape, dtype=dtype)
    _compare_kernel(q, k, v, bias, dtype, backend)


@pytest.mark.parametrize("dtype, bias_kind, bias_shape", [
    (torch.float32, "float", (3, 1, 21)),       # broadcast over queries: per-key reduction
    (torch.float16, "float", (2, 1, 19, 21)),   # broadcast over heads
    (torch.bfloat16, "float", (2, 3, 19, 21)),  # no broadcast: written once
    (torch.float32, "float", (19, 1)),          # constant along keys: zero gradient
    (torch.float16, "fp32", (3, 19, 21)),       # float32 bias with half q (torch allows it)
    (torch.float32, "bool", (2, 1, 1, 21)),
])
def test_kernel_bias_broadcast_grads(backend, dtype, bias_kind, bias_shape):
    torch.manual_seed(0)
    q = _randn(2, 3, 19, 32, dtype=dtype)
    k, v = _randn(2, 3, 21, 32, dtype=dtype), _randn(2, 3, 21, 32, dtype=dtype)
    bias_dtype = torch.float32 if bias_kind == "fp32" else dtype
    _compare_kernel(q, k, v, _bias("bool" if bias_kind == "bool" else "float", bias_shape,
                                   bias_dtype), dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_float32_bias_and_scale(backend, dtype):
    """A float32 bias with a low-precision q, and a scale that is not D ** -0.5."""
    torch.manual_seed(0)
    q, k, v = (_randn(1, 2, n, 32, dtype=dtype) for n in (19, 21, 21))
    _compare_kernel(q, k, v, _randn(1, 2, 19, 21), dtype, backend, scale=0.3)


@pytest.mark.parametrize("dtype, nq, nk, d, bias_rows", [
    (torch.float16, 1, 45, 64, 1),      # CaiT class attention
    (torch.float32, 9, 70, 16, 9),      # Nq != Nk, several key blocks
    (torch.bfloat16, 20, 13, 128, 1),   # largest head dim
])
def test_kernel_shapes(backend, dtype, nq, nk, d, bias_rows):
    torch.manual_seed(0)
    q = _randn(2, 2, nq, d, dtype=dtype)
    k, v = _randn(2, 2, nk, d, dtype=dtype), _randn(2, 2, nk, d, dtype=dtype)
    _compare_kernel(q, k, v, _randn(2, 1, bias_rows, nk, dtype=dtype), dtype, backend)


def test_triton_vit_197_tokens():
    """ViT-B/16 at 224: 197 tokens, D = 64, several query and key blocks (interpreter
    only: host emulation takes minutes at this size)."""
    torch.manual_seed(0)
    q, k, v = (_randn(1, 2, 197, 64, dtype=torch.float16) for _ in range(3))
    _compare_kernel(q, k, v, None, torch.float16, "triton")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_packed_qkv_views(backend, dtype):
    """q, k, v sliced from one (B, N, 3, H, D) projection, as timm's Attention does: no copy."""
    torch.manual_seed(0)
    qkv = _randn(2, 23, 3, 3, 16, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    _compare_kernel(q, k, v, _randn(3, 23, 23, dtype=dtype), dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, N, heads, D, bias_shape", [
    (2, 23, 3, 16, (3, 23, 23)),      # (B, heads) fold into two batch dims
    (3, 9, 1, 32, None),              # one head: the fold's (1, B) view
    (1, 37, 2, 64, (1, 2, 37, 37)),   # one image: the fold's (1, heads) view
])
def test_kernel_qkvpacked_matches_unpacked(backend, dtype, B, N, heads, D, bias_shape):
    """``scaled_dot_product_attention_qkvpacked`` runs the same kernels as the three
    slices do, writing their gradients into one packed tensor: bit-identical output
    and gradients, the packed gradient equal to autograd's stack of the slices'."""
    torch.manual_seed(0)
    qkv = _randn(B, N, 3, heads, D, dtype=dtype)
    bias = None if bias_shape is None else _randn(*bias_shape, dtype=dtype)
    leaves = [qkv] + ([bias] if bias is not None else [])
    dout = _randn(B, heads, N, D, dtype=dtype)
    results = []
    for packed in (True, False):
        tensors = [t.detach().requires_grad_() for t in leaves]
        b = tensors[1] if bias is not None else None
        if packed:
            out = scaled_dot_product_attention_qkvpacked(tensors[0], b, backend=backend)
        else:
            out = sdpa(*tensors[0].permute(2, 0, 3, 1, 4).unbind(0), b, backend=backend)
        results.append((out, *torch.autograd.grad(out, tensors, dout)))
    for name, got, expected in zip(["out", "dqkv", "dbias"], *results):
        assert got.shape == expected.shape and torch.equal(got, expected), name
    assert results[0][1].is_contiguous()


def test_fold_is_zero_copy_for_packed_qkv():
    from pyvit_ops.ops.scaled_dot_product_attention import _Fold

    qkv = torch.randn(2, 23, 3, 4, 16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    fold = _Fold(q, k, v, torch.randn(4, 23, 23), bias_grad=True)
    assert all(t.data_ptr() == s.data_ptr() for t, s in ((fold.q, q), (fold.k, k), (fold.v, v)))
    assert fold.bias.stride()[:2] == (0, 23 * 23)


@pytest.mark.parametrize("bias_shape", [(4, 3, 9, 9), (4, 1, 9, 9)])
def test_kernel_five_dim_batch(backend, bias_shape):
    """(B, windows, heads, N, D); a (nW, 1, N, N) mask needs three batch groups and takes
    the partial-materialisation path."""
    torch.manual_seed(0)
    q, k, v = (_randn(2, 4, 3, 9, 16) for _ in range(3))
    _compare_kernel(q, k, v, _randn(*bias_shape), torch.float32, backend)


def test_kernel_no_keys_gives_zeros_like_torch(backend):
    q = torch.randn(2, 3, 5, 16, requires_grad=True)
    k = v = torch.randn(2, 3, 0, 16)
    out = sdpa(q, k, v, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert (dq == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_bool_mask_with_empty_rows(backend, dtype):
    """A query that attends to nothing: zeros and zero gradients, as torch."""
    torch.manual_seed(0)
    q, k, v = _randn(1, 2, 18, 32, dtype=dtype), *(_randn(1, 2, 35, 32, dtype=dtype)
                                                    for _ in range(2))
    mask = torch.rand(1, 18, 35) > 0.5
    mask[:, 3] = False
    _compare_kernel(q, k, v, mask, dtype, backend)
    out = sdpa(q, k, v, mask, backend=backend)
    assert (out[:, :, 3] == 0).all()


def test_kernel_dropout_matches_keep_mask(backend):
    """Both backends drop the elements of ``dropout_keep_mask`` for the seed the public
    function draws from torch's generator, in the forward and the backward."""
    torch.manual_seed(0)
    q, k, v, dout = _randn(1, 2, 13, 32), _randn(1, 2, 35, 32), _randn(1, 2, 35, 32), \
        _randn(1, 2, 13, 32)
    bias, p = _randn(2, 13, 35), 0.3
    torch.manual_seed(5)
    got = _grads(lambda *a: sdpa(*a, dropout_p=p, backend=backend), [q, k, v, bias], dout)
    torch.manual_seed(5)  # the same seed draw as the call above
    seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64))
    keep = kernels.dropout_keep_mask(seed, (1, 2, 13, 35), p, q.device)
    assert 0 < keep.sum() < keep.numel()
    expected = _grads(lambda *a: ref(*a, dropout_p=p, dropout_mask=keep),
                      [t.double() for t in (q, k, v, bias)], dout.double())
    for name, g, e in zip(["out", "dq", "dk", "dv", "dbias"], got, expected):
        torch.testing.assert_close(g, e.float(), atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("bias_shape, bias_kind", [((2, 1, 19, 21), "float"), ((19, 21), "bool")])
def test_triton_dropout_matches_reference_with_kernel_mask(bias_shape, bias_kind):
    """Launchers with a given seed vs the reference applying dropout_keep_mask: the forward
    and both backward kernels must draw the same mask."""
    torch.manual_seed(0)
    p, seed = 0.3, 1234567
    q = _randn(2, 3, 19, 32)
    k, v = _randn(2, 3, 21, 32), _randn(2, 3, 21, 32)
    bias = _bias(bias_kind, bias_shape, torch.float32)
    keep = kernels.dropout_keep_mask(seed, (2, 3, 19, 21), p, q.device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    bias4 = bias.expand(2, 3, 19, 21)
    out, lse = kernels.scaled_dot_product_attention_fwd(q, k, v, bias4, 32 ** -0.5, p, seed)
    dout = _randn(*out.shape)
    float_bias = bias.dtype != torch.bool
    dq, dk, dv, dbias = kernels.scaled_dot_product_attention_bwd(
        dout, q, k, v, out, lse, bias4, 32 ** -0.5, p, seed, float_bias)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    b = bias.clone().requires_grad_() if float_bias else bias
    expected = ref(*inputs, b, dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    leaves = inputs + ([b] if float_bias else [])
    expected_grads = torch.autograd.grad(expected, leaves, dout)
    got = [dq, dk, dv] + ([dbias.reshape(bias.shape)] if float_bias else [])
    for name, g, e in zip(["dq", "dk", "dv", "dbias"], got, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=name)


def test_kernel_dropout_seed_from_torch_generator(backend):
    torch.manual_seed(0)
    q, k, v = (_randn(1, 2, 17, 16) for _ in range(3))
    torch.manual_seed(7)
    a = sdpa(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(7)
    b = sdpa(q, k, v, dropout_p=0.5, backend=backend)
    c = sdpa(q, k, v, dropout_p=0.5, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _assert_deterministic(backend, q, k, v, bias, dout):
    runs = [_grads(lambda *a: sdpa(*a, backend=backend), [q, k, v, bias], dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    expected = _grads(lambda *a: ref(*a), [q, k, v, bias], dout)
    for name, g, e in zip(["out", "dq", "dk", "dv", "dbias"], runs[0], expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=name)


def test_kernel_backward_is_deterministic(backend):
    torch.manual_seed(0)
    q, k, v, dout = _randn(2, 2, 20, 32), _randn(2, 2, 37, 32), _randn(2, 2, 37, 32), \
        _randn(2, 2, 20, 32)
    _assert_deterministic(backend, q, k, v, _randn(1, 2, 20, 37), dout)


@pytest.mark.parametrize("bias_shape", [(19, 21), (2, 19, 21), (2, 1, 21)])
def test_triton_backward_is_deterministic_with_chunked_dbias(monkeypatch, bias_shape):
    """A bias broadcast over the batch with so few SMs that each program reduces several
    batches (tile read-add-write / per-key registers): plus split partials (19, 21), or
    in a single split that is the gradient (2, 19, 21); two runs must be bitwise equal."""
    monkeypatch.setattr(kernels, "_DEFAULT_SMS", 1)
    torch.manual_seed(0)
    q = _randn(3, 2, 19, 16)
    k, v = _randn(3, 2, 21, 16), _randn(3, 2, 21, 16)
    _assert_deterministic("triton", q, k, v, _randn(*bias_shape), _randn(3, 2, 19, 16))


def test_custom_op_opcheck(backend):
    torch.manual_seed(0)
    q, k, v = (_randn(2, 2, 9, 16).requires_grad_() for _ in range(3))
    bias = _randn(2, 1, 9, 9).requires_grad_()
    torch.library.opcheck(torch.ops.pyvit_ops.scaled_dot_product_attention_fwd.default,
                          (q, k, v, bias, 0.25, 0.0, None, backend))


def test_torch_compile_fullgraph_with_dropout():
    """No graph break: validation, backend choice, the seed draw and the custom op trace."""
    torch.manual_seed(0)
    q, k, v = (_randn(2, 2, 9, 16).requires_grad_() for _ in range(3))
    bias = _randn(2, 1, 9, 9).requires_grad_()

    def fn(q_, k_, v_, b_):
        return sdpa(q_, k_, v_, b_, dropout_p=0.2, backend="triton")

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    torch.manual_seed(3)
    out = compiled(q, k, v, bias)
    grads = torch.autograd.grad(out.sum(), [q, k, v, bias])
    torch.manual_seed(3)
    expected = fn(q, k, v, bias)
    expected_grads = torch.autograd.grad(expected.sum(), [q, k, v, bias])
    assert torch.equal(out, expected)
    for g, e in zip(grads, expected_grads):
        assert torch.equal(g, e)


# ----------------------------------------------------------------------------- errors


def _qkv(*shape, dtype=torch.float32):
    return tuple(torch.randn(*shape, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("make, exc, match", [
    (lambda: (torch.randn(4, 8), *_qkv(2, 4, 8)[1:]), ValueError, "q: expected at least 3"),
    (lambda: (torch.randn(2, 3, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)),
     ValueError, "k: expected shape"),
    (lambda: (torch.randn(2, 4, 8), torch.randn(2, 5, 16), torch.randn(2, 5, 16)),
     ValueError, "k: expected shape"),
    (lambda: (torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 6, 8)),
     ValueError, "v: expected the shape of k"),
    (lambda: (torch.randn(2, 4, 8), torch.randn(2, 4, 8).half(), torch.randn(2, 4, 8)),
     TypeError, "k: expected dtype"),
    (lambda: (torch.randn(2, 4, 8).int(), *_qkv(2, 4, 8)[1:]), TypeError, "q: expected dtype"),
])
def test_bad_tensors(make, exc, match):
    with pytest.raises(exc, match=match):
        sdpa(*make())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(attn_bias=torch.randn(5, 4)), ValueError, "attn_bias: expected a shape broadcastable"),
    (dict(attn_bias=torch.ones(4, 4, dtype=torch.int32)), TypeError, "attn_bias: expected dtype"),
    (dict(attn_bias=torch.randn(4, 4, dtype=torch.float64)), TypeError,
     "attn_bias: expected dtype"),
    (dict(attn_bias=torch.randn(4, 4, device="meta")), ValueError, "attn_bias: expected device"),
    (dict(attn_bias=[[0.0]]), TypeError, "attn_bias: expected a torch.Tensor"),
    (dict(dropout_p=1.5), ValueError, "dropout_p"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sdpa(*_qkv(2, 4, 8), **kwargs)


@pytest.mark.parametrize("make, backend, match", [
    (lambda: _qkv(1, 4, 256), "triton", "head dim 256 > 128"),
    (lambda: _qkv(1, 4, 8, dtype=torch.float64), "triton", "float64"),
])
def test_forced_backend_reasons(make, backend, match):
    with pytest.raises(_backend.BackendUnavailableError, match=match):
        sdpa(*make(), backend=backend)


def test_float64_runs_on_reference_by_default():
    q, k, v = _qkv(1, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(sdpa(q, k, v), ref(q, k, v))


def test_cuda_binding_names_bad_argument(host_ops):
    q = torch.randn(1, 1, 4, 8)
    wide = torch.randn(1, 1, 4, 130)
    with pytest.raises(ValueError, match="head dim"):
        host_ops.scaled_dot_product_attention_fwd(wide, wide, wide, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="bias"):
        host_ops.scaled_dot_product_attention_fwd(q, q, q, torch.randn(1, 1, 4, 5), 1.0, 0.0, 0)
    int_bias = torch.ones(1, 1, 4, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="bias"):
        host_ops.scaled_dot_product_attention_fwd(q, q, q, int_bias, 1.0, 0.0, 0)
