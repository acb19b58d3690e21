"""Operators and modules inside ``torch.autocast`` (float16 and bfloat16), every backend.

The contract (``pyvit_ops._backend.autocast_dtype`` / ``autocast_cast``): when autocast
is on for the input's device type, the activations (q, k, v / v, attn / x) are cast to
the autocast dtype and the operator runs in it (float32 accumulation inside, output in
the low precision); float32 parameters (attention bias, bias table, pads, ghost
filters) are read as they are, so they stay fp32 masters with fp32 gradients. The
tests use CPU autocast (the kernels run on CPU tensors here); the mechanism only looks
at the tensor's device type, so CUDA autocast takes the same path.

Also: logits beyond the float16 range (|q . k| > 65504, Swin's fp16 NaN problem) give
finite outputs that match the float32 softmax.

Every backend's results obey the tolerance rule of tests/tolerance.py: the oracle is
the reference in float64 on the values the operator sees under autocast, the yardstick
the reference under the same autocast.
"""
import pytest
import torch

import pyvit_ops
from op_cases import BACKENDS, MODULE_CASES, OP_CASES, run_backward, use_backend
from tolerance import assert_within

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]

AUTOCAST_CASES = [c for c in OP_CASES if c.name != "scaled_dot_product_attention_bias_keys"]


def _float64_backward(out, leaves, dtype):
    """``out`` (float64) and its gradients for ``run_backward``'s cotangent, rounded to
    ``dtype`` as under autocast the low-precision output rounds it."""
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    return out.detach(), list(torch.autograd.grad(out, leaves, cot.double()))


def _oracle(call, activations, params, dtype):
    """``call`` on the reference in float64 on the values it sees under autocast: the
    activations rounded to ``dtype``, the float32 parameters as they are."""
    leaves = [t.detach().to(dtype).double().requires_grad_() for t in activations]
    leaves += [t.detach().double().requires_grad_() for t in params]
    return _float64_backward(call(*leaves, backend="reference"), leaves, dtype)


def _assert_rule(names, got, oracle, own, dtype):
    """The rule at the floor of the autocast ``dtype``, the precision the operator runs
    at (its float32 gradients are cast up from it)."""
    for name, g, o, w in zip(names, got, oracle, own):
        assert_within(name, g, o, w, dtype)


def _op_under_autocast(case, backend, dtype):
    leaves = case.tensors(torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        out, grads = run_backward(lambda *t: case.call(*t, backend=backend), leaves)
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=repr)
def test_op_runs_in_autocast_dtype(case, backend, dtype):
    use_backend(backend)
    out, grads = _op_under_autocast(case, backend, dtype)
    assert out.dtype == dtype
    # Every leaf is a float32 master: its gradient comes back in float32.
    assert [g.dtype for g in grads] == [torch.float32] * len(grads)
    leaves = case.tensors(torch.float32)
    n = case.num_inputs
    oracle, oracle_grads = _oracle(case.call, leaves[:n], leaves[n:], dtype)
    own, own_grads = _op_under_autocast(case, "reference", dtype)
    _assert_rule(["output", *(f"gradient {i}" for i in range(len(grads)))], [out, *grads],
                 [oracle, *oracle_grads], [own, *own_grads], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=repr)
def test_autocast_is_an_explicit_cast_of_the_activations(case, dtype):
    """Under autocast == the activations cast by hand, float32 params untouched, no
    autocast: the parameters are not rounded to the low precision."""
    under, _ = _op_under_autocast(case, "reference", dtype)
    leaves = case.tensors(torch.float32, grad=False)
    n = case.num_inputs
    explicit = case.call(*(t.to(dtype) for t in leaves[:n]), *leaves[n:], backend="reference")
    assert torch.equal(under, explicit)


def _module_input(case):
    return torch.randn(case.shape, generator=torch.Generator().manual_seed(2), requires_grad=True)


def _module_under_autocast(case, backend, dtype):
    module = case.build(backend)
    x = _module_input(case)
    with torch.autocast("cpu", dtype=dtype):
        out, grads = run_backward(lambda x, *p: module(x), [x, *module.parameters()])
    return out, grads, module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MODULE_CASES, ids=repr)
def test_module_under_autocast(case, backend, dtype):
    """The oracle: the reference module in float64 without autocast (its layers round
    nothing); the yardstick: the reference module under the same autocast."""
    use_backend(backend)
    out, grads, module = _module_under_autocast(case, backend, dtype)
    assert out.dtype == dtype
    for (name, p), g in zip(module.named_parameters(), grads[1:]):
        assert p.dtype == torch.float32 and g.dtype == torch.float32, name
    own, own_grads, _ = _module_under_autocast(case, "reference", dtype)
    module64 = case.build("reference").double()
    x64 = _module_input(case).detach().double().requires_grad_()
    oracle, oracle_grads = _float64_backward(module64(x64), [x64, *module64.parameters()],
                                             dtype)
    names = ["x", *(n for n, _ in module.named_parameters())]
    _assert_rule(["output", *(f"grad of {name}" for name in names)], [out, *grads],
                 [oracle, *oracle_grads], [own, *own_grads], dtype)


# ------------------------------------------------------------------ beyond the fp16 range

FP16_MAX = torch.finfo(torch.float16).max


def _large_scaled_dot_product_attention(g):
    # |q . k| reaches ~1e5: beyond float16 before the scale is applied.
    q, k, v = (torch.randn(s, generator=g) for s in [(2, 2, 5, 12), (2, 2, 7, 12), (2, 2, 7, 12)])
    q, k = 120 * q, 120 * k

    def call(q, k, v, backend):
        return pyvit_ops.scaled_dot_product_attention(q, k, v, backend=backend)
    return call, [q, k, v], (q, k)


def _large_window_attention(g):
    q, k, v = (torch.randn(1, 5, 3, 2, 8, generator=g) for _ in range(3))
    q, k = 150 * q, 150 * k
    table = torch.randn(9, 2, generator=g)

    def call(q, k, v, backend):
        return pyvit_ops.window_attention(q, k, v, table, window_size=2, shift_size=1,
                                          backend=backend)
    # Per window the logits are q . k over the head dim: check that in the image layout.
    return call, [q, k, v], (q.transpose(1, 3).flatten(2, 3), k.transpose(1, 3).flatten(2, 3))


def _large_elsa_attention(g):
    # Logits near the float16 limit whose differences (up to ~1.3e5) are beyond it.
    v = torch.randn(2, 4, 5, 4, generator=g)
    attn = (3e4 * torch.randn(2, 18, 5, 4, generator=g)).clamp(-6e4, 6e4)

    def call(v, attn, backend):
        return pyvit_ops.elsa_attention(v, attn, kernel_size=3, backend=backend)
    return call, [v, attn], None


def _large_avg_pool2d(g):
    # Window sums of values near the float16 limit overflow unless accumulated in fp32.
    x = 6e4 * (0.9 + 0.1 * torch.rand(1, 2, 5, 4, generator=g))

    def call(x, backend):
        return pyvit_ops.avg_pool2d(x, 3, backend=backend)
    return call, [x], None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [_large_scaled_dot_product_attention, _large_window_attention,
                                  _large_elsa_attention, _large_avg_pool2d],
                         ids=lambda f: f.__name__.removeprefix("_large_"))
def test_fp16_autocast_beyond_fp16_range(make, backend):
    use_backend(backend)
    call, inputs, qk = make(torch.Generator().manual_seed(0))
    if qk is not None:
        q, k = (t.half() for t in qk)
        # The naive fp16 product overflows: the case really is beyond the range.
        assert torch.isinf(q @ k.transpose(-1, -2)).any()
    results = {}
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.float16):
            results[name] = run_backward(lambda *t: call(*t, backend=name), leaves)
    (out, grads), (own, own_grads) = results[backend], results["reference"]
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    for i, g in enumerate(grads):
        assert torch.isfinite(g).all(), f"gradient {i} is not finite"
    # The oracle: the inputs as autocast rounds them, in float64.
    oracle, oracle_grads = _oracle(call, inputs, [], torch.float16)
    _assert_rule(["output", *(f"gradient {i}" for i in range(len(grads)))], [out, *grads],
                 [oracle, *oracle_grads], [own, *own_grads], torch.float16)
