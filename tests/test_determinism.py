"""Determinism of every operator and module, on every backend.

Each test runs forward and backward twice from the same inputs, the second time
under ``torch.use_deterministic_algorithms(True)``:

1. The two runs give bitwise equal outputs and gradients, including the bias /
   table / pad / ghost gradients that the kernels reduce over batch, windows and
   pixels (broadcast biases too). The host emulation
   runs a block's threads as real std::threads, so an order-dependent float atomic in
   the CUDA kernels would show up here; the interpreter runs Triton programs one after
   another, so for Triton this pins down that no run-to-run state (e.g. a random
   seed) leaks into the results.
2. ``torch.use_deterministic_algorithms(True)`` is respected: every call runs under it
   (nothing raises) and gives the same bits as without it. The mode also fills
   ``torch.empty`` outputs with NaN, so an output element that a kernel forgot to
   write would show up as a mismatch.
"""
import pytest
import torch

from op_cases import BACKENDS, MODULE_CASES, OP_CASES, run_backward, use_backend

DTYPES = [torch.float32, torch.float16]


def _run_op(case, backend, dtype):
    leaves = case.tensors(dtype)
    return run_backward(lambda *t: case.call(*t, backend=backend), leaves)


def _run_module(case, backend):
    module = case.build(backend)
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
    params = list(module.parameters())
    return run_backward(lambda x, *p: module(x), [x, *params])


def _assert_bitwise(first, second):
    (out1, grads1), (out2, grads2) = first, second
    assert torch.equal(out1, out2), "forward differs between runs"
    assert len(grads1) == len(grads2)
    for i, (g1, g2) in enumerate(zip(grads1, grads2)):
        assert g1 is not None and torch.equal(g1, g2), f"gradient {i} differs between runs"


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


# float16 too where the kernels differ by dtype (the reference computes in float32).
OP_PARAMS = [(b, d) for b in BACKENDS for d in DTYPES if b != "reference" or d == torch.float32]


@pytest.mark.parametrize("backend, dtype", OP_PARAMS, ids=lambda p: str(p).replace("torch.", ""))
@pytest.mark.parametrize("case", OP_CASES, ids=repr)
def test_op_backward_is_bitwise_reproducible(case, backend, dtype, request):
    """A free run and a run under ``use_deterministic_algorithms(True)``: bitwise equal."""
    use_backend(backend)
    free = _run_op(case, backend, dtype)
    request.getfixturevalue("deterministic_algorithms")
    assert torch.are_deterministic_algorithms_enabled()
    _assert_bitwise(free, _run_op(case, backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MODULE_CASES, ids=repr)
def test_module_backward_is_bitwise_reproducible(case, backend, request):
    use_backend(backend)
    free = _run_module(case, backend)
    request.getfixturevalue("deterministic_algorithms")
    _assert_bitwise(free, _run_module(case, backend))
