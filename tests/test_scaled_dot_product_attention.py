"""scaled_dot_product_attention: reference vs torch; the kernels of both backends vs an
fp64 oracle, forward and every gradient (q, k, v and the bias in its broadcast shape),
dropout, determinism and input errors. The ``backend`` parameter runs the Triton kernels
in the interpreter ("triton") and the CUDA C++ kernels under host emulation
(pyvit_ops.testing.host, "cuda"), both on CPU tensors.

Kernel results obey the tolerance rule of tests/tolerance.py, flash-attention's: the
error against the fp64 oracle at most 2x PyTorch's own at the same precision (the plain
``softmax(q @ k^T * scale + bias) @ v`` composition in that dtype) plus a floor.
"""
import itertools
from typing import NamedTuple, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from pyvit_ops import _backend
from pyvit_ops.kernels import scaled_dot_product_attention as kernels
from pyvit_ops.ops import scaled_dot_product_attention as sdpa_ops
from pyvit_ops.ops.scaled_dot_product_attention import scaled_dot_product_attention as sdpa
from pyvit_ops.ops.scaled_dot_product_attention import scaled_dot_product_attention_qkvpacked
from pyvit_ops.reference.scaled_dot_product_attention import rel_pos_bias as ref_rel_pos_bias
from pyvit_ops.reference.scaled_dot_product_attention import rel_pos_index as ref_rel_pos_index
from pyvit_ops.reference.scaled_dot_product_attention import rel_pos_rows as ref_rel_pos_rows
from pyvit_ops.reference.scaled_dot_product_attention import scaled_dot_product_attention as ref
from pyvit_ops.testing import host
from op_cases import VALID_CALLS, assert_rejects, bad_call, meta, randn
from tolerance import assert_within, sdpa_torch_own

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


@pytest.fixture(params=["triton", "triton-4sms", "triton-1sms", "cuda"])
def dbias_backend(request, monkeypatch):
    """``backend`` for the bias-gradient tests, the Triton one at several SM counts: its
    launcher splits the batch a bias is broadcast over by the GPU's SM count (the
    interpreter's default 108 mostly gives one batch index per program); with 4 or 1
    a program sums several (the dq kernel's tile read-add-write, the dk/dv kernel's
    per-key registers)."""
    if request.param == "cuda":
        request.getfixturevalue("host_ops")
        return "cuda"
    if request.param != "triton":
        monkeypatch.setattr(kernels, "_DEFAULT_SMS", int(request.param[7:-3]))
    return "triton"


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _bias(kind, shape, dtype):
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
        mask[..., 0] = True  # no fully masked row here (tested on its own)
        return mask
    return _randn(*shape, dtype=dtype)


def _grads(fn, inputs, dout):
    inputs = [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None
              for t in inputs]
    out = fn(*inputs)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out] + list(grads)


def _caller(fn, mask):
    """``fn(q, k, v, bias)``, the bool ``mask`` as the bias if given."""
    def f(q_, k_, v_, b_=None):
        return fn(q_, k_, v_, mask if b_ is None else b_)
    return f


def _assert_rule(got, inputs, dout, scale=None, mask=None, keep=None, p=0.0):
    """``got`` (the output and the gradients of ``inputs``: q, k, v and a float bias)
    under the tolerance rule: against the fp64 reference, PyTorch's own composition in
    the inputs' dtype as the yardstick; ``keep``: the dropout mask of rate ``p``."""
    scale = inputs[0].shape[-1] ** -0.5 if scale is None else scale
    oracle = _grads(_caller(lambda *a: ref(*a, scale=scale, dropout_p=p, dropout_mask=keep),
                            mask), [t.double() for t in inputs], dout)
    own = _grads(_caller(lambda *a: sdpa_torch_own(*a, scale, keep, p), mask), inputs, dout)
    for name, g, o, w in zip(["out", "dq", "dk", "dv", "dbias"], got, oracle, own):
        assert_within(name, g, o, w, inputs[0].dtype)


def _compare_kernel(q, k, v, bias, dtype, backend, scale=None):
    """Forward and all gradients (a float bias's included) of ``backend`` under the
    tolerance rule."""
    mask = bias if bias is not None and bias.dtype == torch.bool else None
    inputs = [q, k, v] if bias is None or mask is not None else [q, k, v, bias]
    dout = _randn(*q.shape, dtype=torch.float64)
    got = _grads(_caller(lambda *a: sdpa(*a, scale=scale, backend=backend), mask), inputs, dout)
    assert got[0].dtype == dtype
    _assert_rule(got, inputs, dout, scale, mask)


class Shape(NamedTuple):
    """q (*batch, nq, d), k and v (*batch, nk, d); a ``bias_kind`` ("float", "bool" or
    None) bias of ``bias_shape``, broadcast to (*batch, nq, nk)."""
    batch: Tuple[int, ...]
    nq: int
    nk: int
    d: int = 16
    bias_kind: Optional[str] = None
    bias_shape: Optional[Tuple[int, ...]] = None

    def __str__(self):
        bias = f"-{self.bias_kind}{'x'.join(map(str, self.bias_shape))}" if self.bias_kind else ""
        return f"{'x'.join(map(str, self.batch))}-{self.nq}x{self.nk}-D{self.d}{bias}"


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    Shape(batch=(2, 3), nq=7, nk=7),
    # Nq != Nk, bias shared by every head.
    Shape(batch=(2, 3), nq=7, nk=9, bias_kind="float", bias_shape=(7, 9)),
    Shape(batch=(2, 3), nq=5, nk=11, bias_kind="float", bias_shape=(3, 1, 11)),  # per-head keys
    # Per-sample bias over heads.
    Shape(batch=(2, 3), nq=6, nk=6, bias_kind="float", bias_shape=(2, 1, 6, 6)),
    Shape(batch=(2, 3), nq=6, nk=8, bias_kind="bool", bias_shape=(6, 8)),
    Shape(batch=(2, 3), nq=6, nk=8, bias_kind="bool", bias_shape=(2, 1, 1, 8)),  # key padding
    # 5-D (B, windows, heads): Swin-like mask.
    Shape(batch=(2, 4, 3), nq=5, nk=5, bias_kind="float", bias_shape=(4, 1, 5, 5)),
], ids=str)
def test_reference_matches_torch(dtype, shape):
    """Under the tolerance rule, torch's F.scaled_dot_product_attention (math path) in
    float64 the oracle and in ``dtype`` the yardstick."""
    batch, nq, nk, d, bias_kind, bias_shape = shape
    torch.manual_seed(0)
    q, k, v = _randn(*batch, nq, d, dtype=dtype), _randn(*batch, nk, d, dtype=dtype), \
        _randn(*batch, nk, d, dtype=dtype)
    bias = None if bias_kind is None else _bias(bias_kind, bias_shape, dtype)
    torch_own = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    oracle = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(),
        attn_mask=bias if bias is None or bias.dtype == torch.bool else bias.double())
    assert_within("reference", ref(q, k, v, bias), oracle, torch_own, dtype)
    # The plain composition the reference uses when given a dropout mask (keep all).
    keep_all = torch.ones(nq, nk, dtype=torch.bool)
    assert_within("reference with a dropout mask", ref(q, k, v, bias, dropout_mask=keep_all),
                  oracle, torch_own, dtype)
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


# (name, backends, shape), each in every dtype, float biases: N not a multiple of any
# tile, Nq = 1, head dims of each bucket (32, 64, 128) incl. padded 48 and 80. The
# largest shape runs in the interpreter only: host emulation takes ~20 s per dtype.
SHAPES = [
    ("N37-D48-bias-2d", ["triton"],
     Shape(batch=(2, 3), nq=37, nk=37, d=48, bias_kind="float", bias_shape=(37, 37))),
    ("N37-D32-bias-per-head", BACKENDS,
     Shape(batch=(1, 2), nq=37, nk=37, d=32, bias_kind="float", bias_shape=(2, 37, 37))),
    ("Nq1-D64-bias-per-batch", BACKENDS,
     Shape(batch=(2, 1), nq=1, nk=33, d=64, bias_kind="float", bias_shape=(2, 1, 1, 33))),
    ("D80-bias-broadcast-all", BACKENDS,
     Shape(batch=(1, 2), nq=20, nk=17, d=80, bias_kind="float", bias_shape=(1, 1, 20, 17))),
    ("bias-key-row-over-b-and-queries", BACKENDS,
     Shape(batch=(2, 2), nq=9, nk=40, d=32, bias_kind="float", bias_shape=(1, 2, 1, 40))),
    ("D128-no-bias", BACKENDS, Shape(batch=(1, 1), nq=17, nk=5, d=128)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, shape", [
    pytest.param(b, shape, id=f"{b}-{name}")
    for name, backends, shape in SHAPES for b in backends], indirect=["backend"])
def test_kernel_matches_reference(backend, dtype, shape):
    batch, nq, nk, d, _, bias_shape = shape
    torch.manual_seed(0)
    q = _randn(*batch, nq, d, dtype=dtype)
    k, v = _randn(*batch, nk, d, dtype=dtype), _randn(*batch, nk, d, dtype=dtype)
    bias = None if bias_shape is None else _randn(*bias_shape, dtype=dtype)
    _compare_kernel(q, k, v, bias, dtype, backend)


def test_kernel_near_one_hot_row_gradients(backend):
    # The fuzz tests' shape of it: one query aligned with one key (probability 0.997),
    # where dS = P (dP - delta) cancels: delta must not come from the rounded output.
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 33, 64, generator=gen)
    q = (0.15 * k[:, :1] + 0.1 * torch.randn(1, 1, 64, generator=gen)).half()
    k, v = k.half(), torch.randn(1, 33, 64, generator=gen).half()
    dout = torch.randn(1, 1, 64, generator=gen, dtype=torch.float64)
    inputs = [q, k, v]
    got = _grads(_caller(lambda *a: sdpa(*a, scale=1.0, backend=backend), None), inputs, dout)
    _assert_rule(got, inputs, dout, scale=1.0)


@pytest.mark.parametrize("dtype, bias_kind, bias_shape", [
    (torch.float32, "float", (3, 1, 21)),       # broadcast over queries: per-key reduction
    (torch.float16, "float", (2, 1, 19, 21)),   # broadcast over heads
    (torch.bfloat16, "float", (2, 3, 19, 21)),  # no broadcast: written once
    (torch.float32, "float", (19, 1)),          # constant along keys: zero gradient
    (torch.float16, "fp32", (3, 19, 21)),       # float32 bias with half q (torch allows it)
    (torch.float32, "bool", (2, 1, 1, 21)),
])
def test_kernel_bias_broadcast_grads(dbias_backend, dtype, bias_kind, bias_shape):
    torch.manual_seed(0)
    q = _randn(2, 3, 19, 32, dtype=dtype)
    k, v = _randn(2, 3, 21, 32, dtype=dtype), _randn(2, 3, 21, 32, dtype=dtype)
    bias_dtype = torch.float32 if bias_kind == "fp32" else dtype
    _compare_kernel(q, k, v, _bias("bool" if bias_kind == "bool" else "float", bias_shape,
                                   bias_dtype), dtype, dbias_backend)


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
def test_kernel_shapes(dbias_backend, dtype, nq, nk, d, bias_rows):
    torch.manual_seed(0)
    q = _randn(2, 2, nq, d, dtype=dtype)
    k, v = _randn(2, 2, nk, d, dtype=dtype), _randn(2, 2, nk, d, dtype=dtype)
    _compare_kernel(q, k, v, _randn(2, 1, bias_rows, nk, dtype=dtype), dtype, dbias_backend)


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
def test_kernel_five_dim_batch(dbias_backend, bias_shape):
    """(B, windows, heads, N, D); a (nW, 1, N, N) mask needs three batch groups and takes
    the partial-materialisation path."""
    torch.manual_seed(0)
    q, k, v = (_randn(2, 4, 3, 9, 16) for _ in range(3))
    _compare_kernel(q, k, v, _randn(*bias_shape), torch.float32, dbias_backend)


@pytest.mark.parametrize("value, cols", [
    (-1e9, slice(None)),                             # a large finite mask value
    (torch.finfo(torch.float32).min, slice(None)),   # the float32 limit: x log2(e) overflows
    (3e38, slice(3, 4)),                             # one key near the limit: a one-hot row
], ids=["-1e9-row", "fp32-min-row", "3e38-entry"])
def test_kernel_extreme_finite_bias_matches_composition(backend, value, cols):
    """Finite logits of any size give the float32 composition's finite result. A row
    whose bias is -1e9 rounds every logit to one value (a uniform row: the mean of v)
    and its lse, 1e9 + log(Nk) in float32, has lost log(Nk): the backward must still
    recompute p = 1 / Nk. At the float32 limit the logits must not overflow when
    scaled to log2 units (zeros or NaN instead of the composition's values)."""
    torch.manual_seed(0)
    q, k, v, dout = _randn(2, 2, 5, 16), _randn(2, 2, 7, 16), _randn(2, 2, 7, 16), \
        _randn(2, 2, 5, 16)
    bias = _randn(2, 5, 7)
    bias[:, 1, cols] = value
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(sdpa(q, k, v, bias, backend=backend), expected)
    got = _grads(lambda *a: sdpa(*a, backend=backend), [q, k, v, bias], dout)
    expected = _grads(lambda *a: ref(*a), [q, k, v, bias], dout)
    for name, g, e in zip(["out", "dq", "dk", "dv", "dbias"], got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend_name", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("bias_shape", [(0, 4, 6), (4, 6)])
def test_empty_batch_dim_with_bias_grad(backend_name, bias_shape, request):
    """No heads: empty outputs, an empty q/k/v gradient and a zero (or empty) bias
    gradient in the bias's shape on every backend."""
    if backend_name == "cuda":
        request.getfixturevalue("host_ops")
    q, k, v = _randn(2, 0, 4, 16), _randn(2, 0, 6, 16), _randn(2, 0, 6, 16)
    got = _grads(lambda *a: sdpa(*a, backend=backend_name), [q, k, v, _randn(*bias_shape)],
                 _randn(2, 0, 4, 16))
    assert [tuple(t.shape) for t in got] == [(2, 0, 4, 16), (2, 0, 4, 16), (2, 0, 6, 16),
                                            (2, 0, 6, 16), bias_shape]
    assert (got[-1] == 0).all()


def test_kernel_no_keys_gives_zeros_like_torch(backend):
    q = torch.randn(2, 3, 5, 16, requires_grad=True)
    k = v = torch.randn(2, 3, 0, 16)
    out = sdpa(q, k, v, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert (dq == 0).all()


def test_kernel_nan_query_row_is_nan(backend):
    """A NaN in a query makes its whole row NaN on the kernels; torch's math SDPA (and
    so the reference, whose parity target it is) returns a zero row there instead.
    Every other row matches the reference."""
    q, k, v = randn(2, 3, 4), randn(2, 5, 4), randn(2, 5, 4)
    q[1, 2, 0] = float("nan")
    out = sdpa(q, k, v, backend=backend)
    expected = sdpa(q, k, v, backend="reference")
    assert torch.isnan(out[1, 2]).all()
    rest = torch.ones(2, 3, dtype=torch.bool)
    rest[1, 2] = False
    torch.testing.assert_close(out[rest], expected[rest], atol=2e-3, rtol=2e-3)


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


class _SeedSpy:
    """A backend's launchers recording (launcher, q's device, seed) of each launch."""

    # Positions of q and of the seed in the launchers' arguments.
    _ARGS = {"scaled_dot_product_attention_fwd": (0, 6),
             "scaled_dot_product_attention_bwd": (1, 8),
             "scaled_dot_product_attention_bwd_into": (1, 8)}

    def __init__(self, launchers, calls):
        self._launchers, self._calls = launchers, calls

    def __getattr__(self, name):
        fn = getattr(self._launchers, name)
        iq, iseed = self._ARGS[name]

        def launch(*args, **kwargs):
            self._calls.append((name, args[iq].device, args[iseed]))
            return fn(*args, **kwargs)

        return launch


@pytest.fixture
def kernel_seeds(monkeypatch):
    """The (launcher, q's device, seed) of every SDPA kernel launch, in order."""
    calls, launchers = [], sdpa_ops._launchers
    monkeypatch.setattr(sdpa_ops, "_launchers",
                        lambda backend, q: _SeedSpy(launchers(backend, q), calls))
    return calls


def _forbid_host_sync(monkeypatch):
    def sync(self, *args, **kwargs):
        raise AssertionError("host sync: a tensor read on the host inside the operator")

    for name in ("item", "tolist", "__int__", "__index__", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, sync)


@pytest.mark.parametrize("packed", [False, True])
def test_kernel_dropout_seed_stays_on_device(backend, packed, kernel_seeds, monkeypatch):
    """With dropout, the forward and the backward hand the kernels a seed tensor on q's
    device and never read a tensor on the host (a sync on a GPU; under CUDA graphs a
    host value would be replayed as a constant)."""
    torch.manual_seed(0)
    qkv = _randn(2, 9, 3, 2, 16).requires_grad_()  # (B, N, 3, heads, D)
    dout = _randn(2, 2, 9, 16)
    with monkeypatch.context() as m:
        _forbid_host_sync(m)
        if packed:
            out = scaled_dot_product_attention_qkvpacked(qkv, dropout_p=0.3, backend=backend)
        else:
            out = sdpa(*qkv.permute(2, 0, 3, 1, 4).unbind(0), dropout_p=0.3, backend=backend)
        torch.autograd.grad(out, qkv, dout)
    assert [name.split("_")[-1] for name, _, _ in kernel_seeds] == \
        ["fwd", "into" if packed and backend == "cuda" else "bwd"]
    for name, device, seed in kernel_seeds:
        assert isinstance(seed, torch.Tensor), f"{name}: seed {seed!r} is not a tensor"
        assert (seed.dtype, seed.numel(), seed.device) == (torch.int64, 1, device), name
    assert torch.equal(kernel_seeds[0][2], kernel_seeds[1][2])


@pytest.mark.parametrize("seed", [None, torch.tensor([5], dtype=torch.int32),
                                  torch.tensor([5, 6])], ids=["none", "int32", "two"])
def test_kernel_dropout_needs_a_seed_tensor(backend, seed):
    q = _randn(1, 1, 4, 16)
    launchers = sdpa_ops._launchers(backend, q)
    with pytest.raises(ValueError, match="seed: expected a one-element int64 tensor"):
        launchers.scaled_dot_product_attention_fwd(q, q, q, None, 0.25, 0.3, seed)


def test_kernel_dropout_matches_keep_mask(backend, kernel_seeds):
    """Both backends drop the elements of ``dropout_keep_mask`` for the seed tensor the
    forward hands to the kernels; the backward recomputes that mask from the saved seed."""
    torch.manual_seed(0)
    q, k, v, dout = _randn(1, 2, 13, 32), _randn(1, 2, 35, 32), _randn(1, 2, 35, 32), \
        _randn(1, 2, 13, 32)
    bias, p = _randn(2, 13, 35), 0.3
    got = _grads(lambda *a: sdpa(*a, dropout_p=p, backend=backend), [q, k, v, bias], dout)
    (_, _, seed), (_, _, bwd_seed) = kernel_seeds
    assert torch.equal(bwd_seed, seed)
    keep = kernels.dropout_keep_mask(seed, (1, 2, 13, 35), p)
    assert 0 < keep.sum() < keep.numel()
    _assert_rule(got, [q, k, v, bias], dout, keep=keep, p=p)


@pytest.mark.parametrize("bias_shape, bias_kind", [((2, 1, 19, 21), "float"), ((19, 21), "bool")])
def test_triton_dropout_matches_reference_with_kernel_mask(bias_shape, bias_kind):
    """Launchers with a given seed vs the reference applying dropout_keep_mask: the forward
    and both backward kernels must draw the same mask."""
    torch.manual_seed(0)
    p, seed = 0.3, torch.tensor([1234567])
    q = _randn(2, 3, 19, 32)
    k, v = _randn(2, 3, 21, 32), _randn(2, 3, 21, 32)
    bias = _bias(bias_kind, bias_shape, torch.float32)
    keep = kernels.dropout_keep_mask(seed, (2, 3, 19, 21), p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    bias4 = bias.expand(2, 3, 19, 21)
    out, lse = kernels.scaled_dot_product_attention_fwd(q, k, v, bias4, 32 ** -0.5, p, seed)
    dout = _randn(*out.shape)
    float_bias = bias.dtype != torch.bool
    dq, dk, dv, dbias = kernels.scaled_dot_product_attention_bwd(
        dout, q, k, v, lse, bias4, 32 ** -0.5, p, seed, float_bias)
    got = [out, dq, dk, dv] + ([dbias.reshape(bias.shape)] if float_bias else [])
    _assert_rule(got, [q, k, v] + ([bias] if float_bias else []), dout,
                 mask=None if float_bias else bias, keep=keep, p=p)


def test_kernel_dropout_seed_from_torch_generator(backend, kernel_seeds):
    """Each call draws a new seed from torch's generator, hence a new mask;
    ``torch.manual_seed`` reproduces it. The outputs apply exactly those masks."""
    torch.manual_seed(0)
    q, k, v = (_randn(1, 2, 17, 16) for _ in range(3))
    p = 0.5
    torch.manual_seed(7)
    outs = [sdpa(q, k, v, dropout_p=p, backend=backend) for _ in range(2)]
    torch.manual_seed(7)
    outs.append(sdpa(q, k, v, dropout_p=p, backend=backend))
    masks = [kernels.dropout_keep_mask(seed, (1, 2, 17, 17), p) for _, _, seed in kernel_seeds]
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], masks[2])
    assert torch.equal(outs[0], outs[2])
    for out, keep in zip(outs, masks):
        assert_within("out", out, ref(*(t.double() for t in (q, k, v)), dropout_p=p,
                                      dropout_mask=keep),
                      sdpa_torch_own(q, k, v, None, q.shape[-1] ** -0.5, keep, p), q.dtype)


def _assert_deterministic(backend, q, k, v, bias, dout):
    runs = [_grads(lambda *a: sdpa(*a, backend=backend), [q, k, v, bias], dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _assert_rule(runs[0], [q, k, v, bias], dout)


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


@pytest.fixture
def triton_launches(monkeypatch):
    """(kernel name, grid, keyword arguments) of every Triton launch, recorded instead of
    run: the launchers' arguments for inputs too big for the interpreter (meta tensors)."""
    from triton.runtime import interpreter

    recorded = []

    def record(self, *args, grid, warmup, **kwargs):
        recorded.append((self.__name__, tuple(grid(kwargs) if callable(grid) else grid), kwargs))

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", record)
    return recorded


def _launch_forward_backward(q, k, v, bias):
    out, lse = kernels.scaled_dot_product_attention_fwd(q, k, v, bias, 0.125)
    kernels.scaled_dot_product_attention_bwd(torch.empty_like(out), q, k, v, lse, bias, 0.125,
                                             bias_requires_grad=bias is not None)


def test_triton_offsets_past_int32_take_the_64_bit_variant(triton_launches):
    """q, k, v as the (B, heads, N, D) slices of a sequence-major (N, B, 3, heads, D)
    projection: the row stride B * 3 * heads * D times 2047 rows passes 2**31, so the
    kernels reading them take the OFFS64 variant; the same shapes contiguous keep int32."""
    qkv = torch.empty(2048, 512, 3, 16, 64, dtype=torch.float16, device="meta")
    q, k, v = qkv.permute(2, 1, 3, 0, 4).unbind(0)
    bias = torch.empty(2048, 2048, dtype=torch.float16, device="meta").expand(512, 16, -1, -1)
    _launch_forward_backward(q, k, v, bias)
    offs64 = {name.split("_")[-2]: kwargs["OFFS64"] for name, _, kwargs in triton_launches}
    assert offs64 == {"fwd": True, "dkdv": True, "dq": True}
    triton_launches.clear()
    dense = torch.empty(512, 16, 2048, 64, dtype=torch.float16, device="meta")
    _launch_forward_backward(dense, dense, dense, bias)
    assert not any(kwargs["OFFS64"] for _, _, kwargs in triton_launches)


def test_offsets_the_kernels_cannot_index_are_refused():
    """Head-dim offsets past 2**31 (Triton) and a grid of more than 2**31 - 1 tiles' worth
    of rows (CUDA) are reasons, so the automatic choice falls back instead of failing."""
    from pyvit_ops.ops.scaled_dot_product_attention import _reasons

    wide = torch.empty(64, 2 ** 26, device="meta").t().unsqueeze(0)  # (1, 2**26, 64), D outer
    assert any("head-dim strides" in r for r in _reasons("triton", wide, wide, wide, None))
    q = torch.empty(2 ** 20, 2 ** 11, 1, device="meta")
    assert any("index their grid in 32 bits" in r for r in _reasons("cuda", q, q, q, None))
    small = torch.empty(2, 9, 16, device="meta")
    assert not any("32 bits" in r for b in ("triton", "cuda")
                   for r in _reasons(b, small, small, small, None))


def test_triton_64_bit_offsets_variant(monkeypatch):
    """The OFFS64 variant computes what the 32-bit one does (forced on a small case)."""
    monkeypatch.setattr(kernels, "_INT32_OFFSETS", 0)
    assert kernels._offs64(torch.empty(1, 1, 1, 1))
    torch.manual_seed(0)
    qkv = _randn(2, 23, 3, 3, 16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    _compare_kernel(q, k, v, _randn(3, 23, 23), torch.float32, "triton")


@pytest.mark.parametrize("bias_shape", [None, (1, 2, 9, 9), (1, 2, 1, 9)])
def test_triton_grids_keep_the_batch_on_axis_0(triton_launches, bias_shape):
    """CUDA limits grid axes 1 and 2 to 65535: a batch of 100000 sits on axis 0 (limit
    2**31 - 1) in every launch, with or without a dbias reduction over it."""
    batch = 100000
    q = torch.empty(batch, 2, 9, 16, device="meta")
    bias = None if bias_shape is None else \
        torch.empty(bias_shape, device="meta").expand(batch, 2, 9, 9)
    _launch_forward_backward(q, q, q, bias)
    assert len(triton_launches) == 3
    for name, grid, _ in triton_launches:
        assert len(grid) == 1 and 0 < grid[0] < 2 ** 31, (name, grid)
    if bias_shape is None:
        assert all(grid[0] >= batch for _, grid, _ in triton_launches)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_custom_op_opcheck(backend, dropout_p):
    torch.manual_seed(0)
    q, k, v = (_randn(2, 2, 9, 16).requires_grad_() for _ in range(3))
    bias = _randn(2, 1, 9, 9).requires_grad_()
    seed = sdpa_ops.dropout_seed(q.device) if dropout_p else None
    torch.library.opcheck(torch.ops.pyvit_ops.scaled_dot_product_attention_fwd.default,
                          (q, k, v, bias, 0.25, dropout_p, seed, backend))


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


# ----------------------------------------------------------------------------- BEiT table


def _table_case(batch, grid, lead, d, dtype, table_dtype=None):
    """q, k, v (*batch, N, d) and a (T, heads) table for a gh x gw grid after ``lead``
    class tokens, heads = batch[-1]."""
    gh, gw = grid
    n = gh * gw + lead
    q, k, v = (_randn(*batch, n, d, dtype=dtype) for _ in range(3))
    table = _randn(ref_rel_pos_rows(gh, gw, lead), batch[-1], dtype=table_dtype or dtype)
    return q, k, v, table


def _compare_table(q, k, v, table, grid, backend):
    """Forward and the gradients of q, k, v and the table under the tolerance rule; the
    yardstick gathers the dense bias in the inputs' dtype."""
    dout = _randn(*q.shape, dtype=torch.float64)
    got = _grads(lambda q_, k_, v_, t_: sdpa(q_, k_, v_, rel_pos_table=t_, rel_pos_grid=grid,
                                             backend=backend), [q, k, v, table], dout)
    oracle = _grads(lambda q_, k_, v_, t_: ref(q_, k_, v_, rel_pos_table=t_, rel_pos_grid=grid),
                    [t.double() for t in (q, k, v, table)], dout)
    n = q.shape[-2]
    own = _grads(lambda q_, k_, v_, t_: sdpa_torch_own(
        q_, k_, v_, ref_rel_pos_bias(t_, grid, n).to(q.dtype), q.shape[-1] ** -0.5),
        [q, k, v, table], dout)
    assert got[4].shape == table.shape and got[4].dtype == table.dtype
    for name, g, o, w in zip(["out", "dq", "dk", "dv", "dtable"], got, oracle, own):
        assert_within(name, g, o, w, q.dtype)


def test_reference_rel_pos_index_matches_timm():
    beit = pytest.importorskip("timm.models.beit")
    for grid in [(3, 5), (2, 2), (1, 4), (14, 14)]:
        index = ref_rel_pos_index(grid, grid[0] * grid[1] + 1)
        assert torch.equal(index, beit.gen_relative_position_index(grid))
        assert index.max() == ref_rel_pos_rows(*grid, 1) - 1
    # Without a class token: the patch block alone.
    assert torch.equal(ref_rel_pos_index((2, 3), 6),
                       beit.gen_relative_position_index((2, 3))[1:, 1:])


def test_reference_rel_pos_table_gradcheck_float64():
    torch.manual_seed(0)
    q, k, v, table = (t.requires_grad_() for t in _table_case(
        (1, 2), (2, 3), 1, 4, torch.float64))
    assert torch.autograd.gradcheck(
        lambda *a: ref(*a[:3], rel_pos_table=a[3], rel_pos_grid=(2, 3)), (q, k, v, table))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, grid, lead, d", [
    ((2, 3), (3, 5), 1, 16),  # BEiT's layout at an awkward grid
    ((1, 2), (4, 3), 0, 32),  # no class token, one batch element
    ((3, 1), (4, 1), 1, 16),  # one head (the batch folds alone), a one-column grid
])
def test_kernel_rel_pos_table(backend, dtype, batch, grid, lead, d):
    torch.manual_seed(0)
    _compare_table(*_table_case(batch, grid, lead, d, dtype), grid, backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_rel_pos_table_float32_under_half_inputs(dbias_backend, dtype):
    """An fp32 table beside half inputs (a master parameter under autocast) keeps an fp32
    gradient; the split batch reduction (``dbias_backend``) sums partials before the
    gather."""
    torch.manual_seed(1)
    q, k, v, table = _table_case((3, 2), (3, 3), 1, 16, dtype, torch.float32)
    _compare_table(q, k, v, table, (3, 3), dbias_backend)


def test_kernel_rel_pos_table_qkvpacked(backend):
    """The packed projection of timm's BEiT attention, (B, N, 3, heads, D), against the
    unpacked call."""
    torch.manual_seed(2)
    B, heads, grid, D = 2, 3, (2, 4), 16
    N = grid[0] * grid[1] + 1
    qkv = _randn(B, N, 3, heads, D).requires_grad_()
    table = _randn(ref_rel_pos_rows(*grid, 1), heads).requires_grad_()
    out = scaled_dot_product_attention_qkvpacked(qkv, rel_pos_table=table, rel_pos_grid=grid,
                                                 backend=backend)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, [qkv, table], dout)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    expected = sdpa(q, k, v, rel_pos_table=table, rel_pos_grid=grid, backend=backend)
    want = torch.autograd.grad(expected, [qkv, table], dout)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_kernel_rel_pos_table_backward_is_deterministic(backend):
    torch.manual_seed(3)
    q, k, v, table = _table_case((4, 2), (3, 4), 1, 16, torch.float32)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in (q, k, v, table)]
        out = sdpa(*ins[:3], rel_pos_table=ins[3], rel_pos_grid=(3, 4), backend=backend)
        runs.append(torch.autograd.grad(out, ins, dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_custom_op_opcheck_rel_pos_table(backend):
    torch.manual_seed(0)
    q, k, v, table = (t.requires_grad_() for t in _table_case((2, 2), (2, 3), 1, 16,
                                                                torch.float32))
    torch.library.opcheck(torch.ops.pyvit_ops.scaled_dot_product_attention_fwd.default,
                          (q, k, v, table, 0.25, 0.0, None, backend, [2, 3]))


def test_kernel_rel_pos_table_is_not_gathered_in_pytorch(backend, monkeypatch):
    """The kernels take the (T, heads) table itself: the dense gather is never formed."""
    def no_gather(*args):
        raise AssertionError("the dense (heads, N, N) bias was gathered")

    monkeypatch.setattr(sdpa_ops.reference, "rel_pos_bias", no_gather)
    q, k, v, table = (t.requires_grad_() for t in _table_case((1, 2), (2, 3), 1, 16,
                                                                torch.float32))
    out = sdpa(q, k, v, rel_pos_table=table, rel_pos_grid=(2, 3), backend=backend)
    out.sum().backward()
    assert table.grad.shape == table.shape


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rel_pos_grid=(2, 3)), ValueError, "rel_pos_table, rel_pos_grid: expected both"),
    (dict(table=True, attn_bias=torch.zeros(7, 7)), ValueError, "attn_bias: must be None"),
    (dict(table=True, rel_pos_grid=(2,)), ValueError, "rel_pos_grid: expected \\(gh, gw\\)"),
    (dict(table=True, rel_pos_grid=(0, 7)), ValueError, "rel_pos_grid: expected"),
    (dict(table=True, rel_pos_grid=(2, 2)), ValueError, "rel_pos_grid: expected Nq = Nk"),
    (dict(rel_pos_table=torch.zeros(28, 2), rel_pos_grid=(3, 2)), ValueError,
     "rel_pos_table: expected shape \\(18, 2\\)"),
    (dict(rel_pos_table=torch.zeros(18, 3), rel_pos_grid=(2, 3)), ValueError,
     "rel_pos_table: expected shape \\(18, 2\\)"),
    (dict(rel_pos_table=torch.zeros(18, 2, dtype=torch.float64), rel_pos_grid=(2, 3)),
     TypeError, "rel_pos_table: expected dtype float32"),
    (dict(rel_pos_table=torch.zeros(18, 2, device="meta"), rel_pos_grid=(2, 3)), ValueError,
     "rel_pos_table: expected device"),
])
def test_bad_rel_pos_table(kwargs, exc, match):
    q, k, v = _qkv(3, 2, 7, 8)
    if kwargs.pop("table", False):
        kwargs.setdefault("rel_pos_table", torch.zeros(18, 2))
        kwargs.setdefault("rel_pos_grid", (2, 3))
    with pytest.raises(exc, match=match):
        sdpa(q, k, v, **kwargs)


# ----------------------------------------------------------------------------- errors


# One row per bad argument of a valid call: the error type and the argument's name
# in the message.
_valid = VALID_CALLS["scaled_dot_product_attention"]
BAD_CALLS = [
    bad_call(_valid, dict(q=[[1.0]]), TypeError, "q: expected a torch.Tensor"),
    bad_call(_valid, dict(q=randn(3, 4)), ValueError, "q: expected at least 3 dims"),
    bad_call(_valid, dict(q=torch.ones(2, 3, 4, dtype=torch.int64)),
             TypeError, "q: expected dtype"),
    bad_call(_valid, dict(q=randn(2, 3, 0), k=randn(2, 5, 0), v=randn(2, 5, 0)),
             ValueError, "q: expected a head dim"),
    bad_call(_valid, dict(k=randn(2, 5, 4, dtype=torch.float16)), TypeError, "k: expected dtype"),
    bad_call(_valid, dict(k=randn(3, 5, 4)), ValueError, "k: expected shape"),
    bad_call(_valid, dict(k=randn(2, 5, 8), v=randn(2, 5, 8)), ValueError, "k: expected shape"),
    bad_call(_valid, dict(v=randn(2, 6, 4)), ValueError, "v: expected the shape of k"),
    bad_call(_valid, dict(v=randn(2, 5, 4, dtype=torch.float64)), TypeError, "v: expected dtype"),
    bad_call(_valid, dict(k=meta(2, 5, 4)), ValueError, "k: expected device cpu"),
    bad_call(_valid, dict(attn_bias=meta(3, 5)), ValueError, "attn_bias: expected device cpu"),
    bad_call(_valid, dict(attn_bias=[0.0]), TypeError, "attn_bias: expected a torch.Tensor"),
    bad_call(_valid, dict(attn_bias=randn(4, 5)),
             ValueError, "attn_bias: expected a shape broadcastable"),
    bad_call(_valid, dict(attn_bias=randn(3, 3, 5)),
             ValueError, "attn_bias: expected a shape broadcastable"),
    bad_call(_valid, dict(attn_bias=torch.ones(3, 5, dtype=torch.int32)),
             TypeError, "attn_bias: expected dtype bool, float32"),
    bad_call(_valid, dict(attn_bias=randn(3, 5, dtype=torch.float16)),
             TypeError, "attn_bias: expected dtype bool, float32"),
    bad_call(_valid, dict(scale="0.5"), TypeError, "scale: expected a float"),
    bad_call(_valid, dict(scale=float("nan")), ValueError, "scale: expected a finite float"),
    bad_call(_valid, dict(scale=float("inf")), ValueError, "scale: expected a finite float"),
    bad_call(_valid, dict(dropout_p=1.5), ValueError, "dropout_p: expected a float in [0, 1]"),
    bad_call(_valid, dict(dropout_p=-0.1), ValueError, "dropout_p: expected a float in [0, 1]"),
    bad_call(_valid, dict(dropout_p="0.1"), TypeError, "dropout_p: expected a float"),
    bad_call(_valid, dict(backend="cudnn"), ValueError, "backend: expected one of"),
    bad_call(_valid, dict(q=randn(2, 3, 4, dtype=torch.float64),
                          k=randn(2, 5, 4, dtype=torch.float64),
                          v=randn(2, 5, 4, dtype=torch.float64), attn_bias=None, backend="triton"),
             _backend.BackendUnavailableError, "float64 runs only on the reference backend"),
    bad_call(_valid, dict(q=randn(2, 3, 160), k=randn(2, 5, 160), v=randn(2, 5, 160),
                          backend="triton"),
             _backend.BackendUnavailableError, "head dim 160 > 128"),
    bad_call(_valid, dict(q=meta(2, 3, 4), k=meta(2, 5, 4), v=meta(2, 5, 4), attn_bias=None,
                          backend="triton"),
             _backend.BackendUnavailableError, "tensors on ['meta']"),
]


@pytest.mark.parametrize("call, change, error, text", BAD_CALLS)
def test_bad_argument(call, change, error, text):
    assert_rejects(lambda: call(**change), error, text)


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
    (dict(scale=float("nan")), ValueError, "scale: expected a finite float, got nan"),
    (dict(scale=float("inf"), backend="triton"), ValueError, "scale: expected a finite float"),
    (dict(scale=-float("inf"), backend="reference"), ValueError, "scale: expected a finite"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sdpa(*_qkv(2, 4, 8), **kwargs)


def test_zero_scale_like_torch(backend):
    """scale = 0 is finite, as torch's SDPA accepts it: uniform attention."""
    q, k, v = _qkv(2, 4, 8)
    torch.testing.assert_close(sdpa(q, k, v, scale=0.0, backend=backend),
                               F.scaled_dot_product_attention(q, k, v, scale=0.0))


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
        host_ops.scaled_dot_product_attention_fwd(wide, wide, wide, None, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="bias"):
        host_ops.scaled_dot_product_attention_fwd(q, q, q, torch.randn(1, 1, 4, 5), 1.0, 0.0, None)
    int_bias = torch.ones(1, 1, 4, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="bias"):
        host_ops.scaled_dot_product_attention_fwd(q, q, q, int_bias, 1.0, 0.0, None)
