"""Across operators: NaN / inf inputs, which every backend propagates like the
reference, and empty tensors, which give empty results instead of crashing. The
errors of each operator's and module's own arguments are tested in its file
(``BAD_CALLS``, with the helpers of op_cases)."""
import pytest
import torch

from op_cases import OP_CASES, VALID_CALLS, randn, use_backend


NAN_CASES = [c for c in OP_CASES if c.name in
             ("scaled_dot_product_attention_bias_heads", "window_attention", "elsa_attention",
              "avg_pool2d", "poolformer_pool")]


def _poison_params():
    for case in NAN_CASES:
        for index in range(len(case.tensors(grad=False))):
            yield pytest.param(case, index, id=f"{case.name}-arg{index}")


def _poison(t, g):
    """NaN, +inf and -inf at three random positions of ``t``."""
    t = t.clone()
    flat = t.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[:3]
    for i, value in zip(where.tolist(), (float("nan"), float("inf"), float("-inf"))):
        flat[i] = value
    return t


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case, index", _poison_params())
def test_nan_and_inf_propagate_like_the_reference(case, index, backend):
    use_backend(backend)
    tensors = case.tensors(grad=False)
    tensors[index] = _poison(tensors[index], torch.Generator().manual_seed(index))
    expected = case.call(*tensors, backend="reference")
    out = case.call(*tensors, backend=backend)
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        wrong = test(out) != test(expected)
        assert not wrong.any(), f"{name} at other positions than the reference: " \
                                f"{wrong.nonzero()[:5].tolist()}"
    finite = torch.isfinite(expected)
    assert finite.any(), "the poison reached every output: the test checks nothing"
    torch.testing.assert_close(out[finite], expected[finite], atol=2e-3, rtol=2e-3)


_sdpa, _window, _elsa, _pool = (VALID_CALLS[op] for op in (
    "scaled_dot_product_attention", "window_attention", "elsa_attention", "avg_pool2d"))
EMPTY_CALLS = [
    pytest.param(lambda b: _sdpa(q=randn(0, 3, 4), k=randn(0, 5, 4), v=randn(0, 5, 4), attn_bias=None,
                                 backend=b), (0, 3, 4),
                 id="scaled_dot_product_attention-batch0"),
    pytest.param(lambda b: _sdpa(q=randn(2, 0, 4), attn_bias=None, backend=b), (2, 0, 4),
                 id="scaled_dot_product_attention-Nq0"),
    pytest.param(lambda b: _sdpa(k=randn(2, 0, 4), v=randn(2, 0, 4), attn_bias=None, backend=b),
                 (2, 3, 4), id="scaled_dot_product_attention-Nk0"),
    pytest.param(lambda b: _window(q=randn(0, 5, 3, 2, 4), k=randn(0, 5, 3, 2, 4), v=randn(0, 5, 3, 2, 4),
                                   backend=b), (0, 5, 3, 2, 4), id="window_attention-batch0"),
    pytest.param(lambda b: _elsa(v=randn(0, 4, 4, 5), attn=randn(0, 18, 4, 5), backend=b),
                 (0, 4, 4, 5), id="elsa_attention-batch0"),
    pytest.param(lambda b: _pool(x=randn(0, 2, 5, 4), backend=b), (0, 2, 5, 4),
                 id="avg_pool2d-batch0"),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("call, shape", EMPTY_CALLS)
def test_empty_tensors_give_empty_results(call, shape, backend):
    """Nothing to attend to / pool gives what the reference gives (an empty result, or
    zeros when there are no keys, as torch's SDPA), on every backend."""
    use_backend(backend)
    torch.manual_seed(0)
    out = call(backend)
    torch.manual_seed(0)
    expected = call("reference")
    assert tuple(out.shape) == shape
    torch.testing.assert_close(out, expected)
