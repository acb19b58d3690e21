"""Property-based parity tests: hypothesis draws shapes, strides, dtypes and options of
every operator within its supported space (strategies: pyvit_ops.testing.fuzz) and
compares each kernel backend that runs here, "triton" (interpreter) and "cuda" (the
CUDA source under host emulation), with the reference evaluated in float64 on the
same values: the output and the gradient of every floating input (bias, table, pads,
ghost matrices included), under the tolerance rule of tests/tolerance.py.

Each test function takes the cases of one operator; the backends are a module-scoped
parameter, so both see the same derandomized draws. Fixed edge cases run first on
every backend (@example). A case a backend refuses (BackendUnavailableError) is
counted as not runnable, not as passed; any other failure fails the test. A case the
fuzz test found becomes a regression test at the end of this file (a defect not fixed
yet: ``pytest.mark.xfail(strict=True, reason=<its cause>)``). The conftest prints the
tally of cases per operator and backend at the end of the session
(PYVIT_OPS_FUZZ_REPORT=path: as JSON too); PYVIT_OPS_FUZZ_EXAMPLES raises the budget.

SDPA dropout is fuzzed through the public function: the oracle applies the kernels'
keep-mask, rebuilt from the seed the operator draws after ``torch.manual_seed``.

Outside the drawn space, by the operators' contracts: window_attention rejects a grid
smaller than the window (timm shrinks the window to the grid before calling it);
elsa_attention has stride 1 only; avg_pool2d has no ceil_mode; SDPA is fuzzed with
at least one key per query row (fully masked rows and Nk = 0 have their own tests).
"""
import dataclasses
from typing import Callable, Dict, Optional

import pytest
import torch
from hypothesis import example, given

import pyvit_ops
from pyvit_ops._backend import BackendUnavailableError
from pyvit_ops.kernels.scaled_dot_product_attention import dropout_keep_mask
from pyvit_ops.ops.scaled_dot_product_attention import dropout_seed
from pyvit_ops.reference.avg_pool2d import output_memory_format as pool_memory_format
from pyvit_ops.reference.elsa_attention import output_memory_format as elsa_memory_format
from pyvit_ops.reference.scaled_dot_product_attention import \
    scaled_dot_product_attention as sdpa_reference
from pyvit_ops.testing import fuzz
from pyvit_ops.testing.fuzz import ElsaCase, PoolCase, SdpaCase, WindowCase
from tolerance import assert_all_within, sdpa_torch_own

FUZZ = fuzz.fuzz_settings()
fp32, fp16, bf16 = fuzz.DTYPES


@pytest.fixture(scope="module", params=["triton", "cuda"])
def backend(request):
    if request.param == "cuda":
        try:
            from pyvit_ops.testing import host

            host.load()
        except Exception as exc:  # no compiler / build failure: say so, do not hide it
            pytest.skip(f"cuda backend: host-emulation build failed: {type(exc).__name__}: {exc}")
    return request.param


def _examples(cases):
    """Apply ``@example(case=c)`` for each edge case, in list order."""
    def decorate(test):
        for case in reversed(cases):
            test = example(case=case)(test)
        return test
    return decorate


# --------------------------------------------------------------------------- harness


@dataclasses.dataclass
class _Problem:
    """One drawn case made concrete: leaf tensors (gradients are taken with respect
    to them; views of them are what the operator sees), ``run(leaves, backend)`` and
    the upstream gradient."""
    leaves: Dict[str, torch.Tensor]
    run: Callable
    dout: torch.Tensor
    # Values the oracle sees instead of the leaves (default: the leaves in float64).
    oracle_leaves: Optional[Dict[str, torch.Tensor]] = None
    out_format: Optional[torch.memory_format] = None
    # The ``run`` backend of PyTorch's own computation at the input precision (the
    # tolerance rule's yardstick), on the leaves as given.
    torch_own: str = "reference"


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _dout(gen, shape, dtype, strided):
    """The upstream gradient in the output's dtype, so that the kernel and the oracle
    see the same values; ``strided``: a non-contiguous view (every dim reversed)."""
    if strided:
        return _randn(gen, *shape[::-1], dtype=dtype).permute(*range(len(shape) - 1, -1, -1))
    return _randn(gen, *shape, dtype=dtype)


def _forward_backward(run, leaves, dout):
    leaves = {n: t.detach().requires_grad_() for n, t in leaves.items()}
    out = run(leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype),
                                allow_unused=True, materialize_grads=True)
    return out.detach(), dict(zip(leaves, grads))


def _check_fuzz(op, backend, case, make_problem):
    """Run ``case`` on ``backend``, on the float64 reference and as PyTorch's own
    computation at the input precision; their errors obey the tolerance rule
    (tests/tolerance.py). Counted in fuzz.TALLY."""
    with fuzz.TALLY.record(op, backend, case) as record:
        problem = make_problem(case)
        try:
            out, grads = _forward_backward(lambda t: problem.run(t, backend), problem.leaves,
                                           problem.dout)
        except BackendUnavailableError as exc:
            record.not_runnable(str(exc))
            return
        oracle = problem.oracle_leaves or {n: t.double() for n, t in problem.leaves.items()}
        want_out, want_grads = _forward_backward(lambda t: problem.run(t, "reference"), oracle,
                                                 problem.dout)
        assert out.dtype == case.dtype and out.shape == want_out.shape, (out.dtype, out.shape)
        if problem.out_format is not None:
            assert out.is_contiguous(memory_format=problem.out_format), out.stride()
        for name, g in grads.items():
            t = problem.leaves[name]
            assert g.dtype == t.dtype and g.shape == t.shape, (name, g.dtype, g.shape)
            assert torch.isfinite(g).all(), f"grad of {name}: non-finite values"
        assert torch.isfinite(out).all(), "out: non-finite values"
        own_out, own_grads = _forward_backward(lambda t: problem.run(t, problem.torch_own),
                                               problem.leaves, problem.dout)
        assert_all_within({"out": out, **grads}, {"out": want_out, **want_grads},
                          {"out": own_out, **own_grads}, case.dtype)


# --------------------------------------------------------------------------- SDPA


def _sdpa_dropout_seed(case):
    """The seed tensor the operator draws on the CPU (after manual_seed(case.seed))."""
    torch.manual_seed(case.seed)
    return dropout_seed(torch.device("cpu"))


def _sdpa_problem(case):
    gen = torch.Generator().manual_seed(case.seed)
    b, nq, nk, d, dt = case.batch, case.nq, case.nk, case.d, case.dtype
    if case.layout == "packed":  # one (N, 3, *batch, D) projection, tokens outermost
        leaves = {"qkv": _randn(gen, nq, 3, *b, d, dtype=dt)}
    elif case.layout == "batch_reversed":  # batch strides ascending: no zero-copy fold
        leaves = {n: _randn(gen, *b[::-1], m, d, dtype=dt) for n, m in zip("qkv", (nq, nk, nk))}
    elif case.layout == "strided_d":
        leaves = {n: _randn(gen, *b, m, 2 * d, dtype=dt) for n, m in zip("qkv", (nq, nk, nk))}
    elif case.layout == "kv_expanded":  # k, v shared over the first batch dim (stride 0)
        leaves = {"q": _randn(gen, *b, nq, d, dtype=dt)}
        leaves.update({n: _randn(gen, 1, *b[1:], nk, d, dtype=dt) for n in "kv"})
    else:
        leaves = {n: _randn(gen, *b, m, d, dtype=dt) for n, m in zip("qkv", (nq, nk, nk))}
    mask = None
    if case.bias == "bool":
        mask = torch.rand(case.bias_shape, generator=gen) > 0.3
        mask[..., 0] = True  # every query attends to something
    elif case.bias is not None:
        bias_dtype = torch.float32 if case.bias == "float32" else dt
        shape = (*(1,) * (len(case.bias_shape) - 1), case.bias_shape[-1]) \
            if case.bias_expanded else case.bias_shape
        leaves["bias"] = _randn(gen, *shape, dtype=bias_dtype)
    nb = len(b)

    def views(t):
        if case.layout == "packed":
            q, k, v = (x.movedim(0, -2) for x in t["qkv"].unbind(1))
        elif case.layout == "batch_reversed":
            order = (*range(nb - 1, -1, -1), nb, nb + 1)
            q, k, v = (t[n].permute(order) for n in "qkv")
        elif case.layout == "strided_d":
            q, k, v = (t[n][..., ::2] for n in "qkv")
        elif case.layout == "kv_expanded":
            q, k, v = t["q"], t["k"].expand(*b, nk, d), t["v"].expand(*b, nk, d)
        else:
            q, k, v = t["q"], t["k"], t["v"]
        bias = t["bias"].expand(case.bias_shape) if "bias" in t else mask
        return q, k, v, bias

    keep = None
    if case.dropout_p:
        keep = dropout_keep_mask(_sdpa_dropout_seed(case), (*b, nq, nk), case.dropout_p)
    scale = d ** -0.5 if case.scale is None else case.scale

    def run(t, backend):
        q, k, v, bias = views(t)
        if backend == "reference":
            return sdpa_reference(q, k, v, bias, scale=scale, dropout_p=case.dropout_p,
                                  dropout_mask=keep)
        if backend == "torch_own":
            return sdpa_torch_own(q, k, v, bias, scale, keep, case.dropout_p)
        torch.manual_seed(case.seed)  # the dropout seed that `keep` was made from
        return pyvit_ops.scaled_dot_product_attention(
            q, k, v, bias, scale=case.scale, dropout_p=case.dropout_p, backend=backend)

    return _Problem(leaves, run, _dout(gen, (*b, nq, d), dt, case.strided_dout),
                    torch_own="torch_own")


SDPA_EDGES = [
    SdpaCase(batch=(1,), nq=1, nk=1, d=16),  # one token
    # Class attention (Nq = 1) with the largest head dim and a per-key bias.
    SdpaCase(dtype=fp16, batch=(1, 2), nq=1, nk=33, d=128, bias="float", bias_shape=(1, 1, 1, 33)),
    SdpaCase(dtype=bf16, batch=(2, 1, 3), nq=17, nk=17, d=80, layout="packed", bias="float32",
             bias_shape=(1, 3, 17, 17), strided_dout=True, seed=1),
    SdpaCase(dtype=fp32, batch=(3, 2), nq=9, nk=20, d=96, layout="batch_reversed", bias="bool",
             bias_shape=(3, 1, 1, 20), dropout_p=0.3, seed=2),
    SdpaCase(dtype=fp16, batch=(2, 2), nq=5, nk=7, d=48, layout="kv_expanded", bias="float",
             bias_shape=(2, 1, 5, 7), bias_expanded=True, scale=0.37, seed=3),
    SdpaCase(dtype=fp32, batch=(1, 1, 2), nq=16, nk=32, d=64, layout="strided_d", bias="float",
             bias_shape=(16, 1), seed=4),  # bias constant along keys: zero gradient
]


@FUZZ
@given(case=fuzz.sdpa_cases())
@_examples(SDPA_EDGES)
def test_scaled_dot_product_attention(backend, case):
    _check_fuzz("scaled_dot_product_attention", backend, case, _sdpa_problem)


# --------------------------------------------------------------------------- window


def _window_problem(case):
    gen = torch.Generator().manual_seed(case.seed)
    B, (H, W), heads, d, dt = case.batch, case.grid, case.heads, case.d, case.dtype
    if case.layout == "packed":  # one (B, H, W, 3, heads, D) projection
        leaves = {"qkv": _randn(gen, B, H, W, 3, heads, d, dtype=dt)}
    elif case.layout == "mixed":  # q dense, k through a transpose, v from a projection
        leaves = {"q": _randn(gen, B, H, W, heads, d, dtype=dt),
                  "k": _randn(gen, B, W, H, heads, d, dtype=dt),
                  "v": _randn(gen, B, H, W, 3, heads, d, dtype=dt)}
    elif case.layout == "strided_d":
        leaves = {n: _randn(gen, B, H, W, heads, 2 * d, dtype=dt) for n in "qkv"}
    else:
        leaves = {n: _randn(gen, B, H, W, heads, d, dtype=dt) for n in "qkv"}
    param_dtype = {"input": dt, "float32": torch.float32}
    wh, ww = case.window
    if case.table:
        leaves["table"] = _randn(gen, (2 * wh - 1) * (2 * ww - 1), heads,
                                 dtype=param_dtype[case.table])
    if case.pad:
        for n in ("pad_k", "pad_v"):
            leaves[n] = _randn(gen, heads, d, dtype=param_dtype[case.pad])
    if case.cosine:
        # timm's (heads, 1, 1), around 3.5: gains of ~5 to 100, some held by the clamp.
        leaves["logit_scale"] = (_randn(gen, heads, 1, 1, dtype=torch.float64) * 1.5 + 3.5).to(
            param_dtype[case.cosine])

    def views(t):
        if case.layout == "packed":
            return t["qkv"].unbind(3)
        if case.layout == "mixed":
            return t["q"], t["k"].transpose(1, 2), t["v"][:, :, :, 2]
        if case.layout == "strided_d":
            return tuple(t[n][..., ::2] for n in "qkv")
        return t["q"], t["k"], t["v"]

    def run(t, backend):
        pad_kv = (t["pad_k"], t["pad_v"]) if case.pad else None
        return pyvit_ops.window_attention(
            *views(t), t.get("table"), window_size=case.window, shift_size=case.shift,
            scale=case.scale, pad_kv=pad_kv, mask_value=case.mask_value,
            logit_scale=t.get("logit_scale"), backend=backend)

    # The kernels round the pads to q's dtype (the contract); so does the oracle.
    oracle = {n: (x.to(dt) if n.startswith("pad") else x).double() for n, x in leaves.items()}
    return _Problem(leaves, run, _dout(gen, (B, H, W, heads, d), dt, case.strided_dout), oracle,
                    torch.contiguous_format)


WINDOW_EDGES = [
    WindowCase(grid=(1, 1), window=(1, 1), d=16),  # one token, one window
    # One window, shift = window - 1 on both axes, the largest head dim.
    WindowCase(dtype=fp16, grid=(4, 5), heads=2, d=128, window=(4, 5), shift=(3, 4),
               table="float32", pad="input", seed=1),
    # Swin's 7x7 window / shift 3 on a grid padded on both axes.
    WindowCase(dtype=bf16, batch=2, grid=(9, 10), heads=2, d=32, window=(7, 7), shift=(3, 3),
               table="input", pad="input", layout="mixed", strided_dout=True, seed=2),
    WindowCase(dtype=fp32, grid=(5, 9), heads=3, d=48, window=(2, 8), shift=(1, 7),
               table="float32", pad="float32", mask_value=float("-inf"), layout="strided_d",
               scale=0.37, seed=3),
    # Swin 384's 12x12 window (the tiled Triton kernels) on a grid padded on both axes.
    WindowCase(dtype=fp16, grid=(13, 14), heads=1, d=32, window=(12, 12), shift=(6, 5),
               table="input", pad="float32", seed=4),
    # Swin V2's 8x8 window, cosine attention, padded on one axis.
    WindowCase(dtype=bf16, grid=(8, 11), heads=2, d=32, window=(8, 8), shift=(4, 4),
               table="float32", pad="input", cosine="float32", seed=5),
]


@FUZZ
@given(case=fuzz.window_cases())
@_examples(WINDOW_EDGES)
def test_window_attention(backend, case):
    _check_fuzz("window_attention", backend, case, _window_problem)


# --------------------------------------------------------------------------- ELSA


def _elsa_problem(case):
    gen = torch.Generator().manual_seed(case.seed)
    B, (H, W), K, dt = case.batch, case.grid, case.kernel_size, case.dtype
    G, C = case.heads, case.heads * case.head_channels
    taps = G * K * K

    def layout(x):
        return x.contiguous(memory_format=torch.channels_last) if case.channels_last else x

    v = _randn(gen, B, 3 * C if case.layout == "v_slice" else C, H, W, dtype=torch.float64)
    attn = _randn(gen, B, 2 * taps if case.layout == "attn_step" else taps, H, W,
                  dtype=torch.float64) * 2
    if case.probs:
        attn = attn.unflatten(1, (-1, K * K)).softmax(2).flatten(1, 2)
    leaves = {"v": layout(v.to(dt)), "attn": layout(attn.to(dt))}
    ghost_dtype = dt if case.ghost_dtype == "input" else torch.float32
    if case.ghost in ("mul", "both"):
        leaves["ghost_mul"] = _randn(gen, C, K, K, dtype=ghost_dtype)
    if case.ghost in ("add", "both"):
        leaves["ghost_add"] = _randn(gen, C, K, K, dtype=ghost_dtype)

    def views(t):
        v = t["v"][:, 2 * C:] if case.layout == "v_slice" else t["v"]
        attn = t["attn"][:, 1::2] if case.layout == "attn_step" else t["attn"]
        return v, attn

    def run(t, backend):
        return pyvit_ops.elsa_attention(
            *views(t), t.get("ghost_mul"), t.get("ghost_add"), kernel_size=K,
            dilation=case.dilation, apply_softmax=not case.probs, backend=backend)

    return _Problem(leaves, run, _dout(gen, (B, C, H, W), dt, case.strided_dout),
                    out_format=elsa_memory_format(views(leaves)[0]))


ELSA_EDGES = [
    ElsaCase(grid=(1, 1), kernel_size=3),  # one pixel
    # A 2x3 grid inside a dilated 7x7 window: every tap but the centre at the border.
    ElsaCase(grid=(2, 3), kernel_size=7, dilation=2, heads=2, head_channels=3, ghost="both",
             channels_last=True, seed=1),
    # ELSA-Swin's 32-channel heads, fp32 ghost with fp16 data, v sliced from qkv.
    ElsaCase(dtype=fp16, grid=(6, 5), kernel_size=7, heads=2, head_channels=32, ghost="add",
             ghost_dtype="float32", channels_last=True, layout="v_slice", seed=2),
    ElsaCase(dtype=bf16, batch=2, grid=(5, 4), kernel_size=5, heads=3, head_channels=2,
             ghost="mul", probs=True, layout="attn_step", strided_dout=True, seed=3),
]


@FUZZ
@given(case=fuzz.elsa_cases())
@_examples(ELSA_EDGES)
def test_elsa_attention(backend, case):
    _check_fuzz("elsa_attention", backend, case, _elsa_problem)


# --------------------------------------------------------------------------- avg_pool2d


def _pool_problem(case):
    gen = torch.Generator().manual_seed(case.seed)
    B, C, H, W = case.shape
    dt = case.dtype
    leaf_shape = {"channel_slice": (B, C + 2, H, W), "spatial_crop": (B, C, H + 3, W + 2),
                  "w_step_2": (B, C, H, 2 * W), "nhwc_crop": (B, H + 1, W, C)}
    x = _randn(gen, *leaf_shape.get(case.layout, case.shape), dtype=dt)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def view(x):
        if case.layout == "channel_slice":
            return x[:, 1:C + 1]
        if case.layout == "spatial_crop":
            return x[:, :, 2:H + 2, 1:W + 1]
        if case.layout == "w_step_2":
            return x[..., ::2]
        if case.layout == "nhwc_crop":
            return x.permute(0, 3, 1, 2)[:, :, 1:]
        return x

    def run(t, backend):
        return pyvit_ops.avg_pool2d(view(t["x"]), case.kernel_size, case.stride, case.padding,
                                    subtract_input=case.subtract_input, backend=backend)

    kh, kw = case.kernel_size
    ph, pw = case.padding or (kh // 2, kw // 2)
    out_hw = ((H + 2 * ph - kh) // case.stride[0] + 1, (W + 2 * pw - kw) // case.stride[1] + 1)
    return _Problem({"x": x}, run, _dout(gen, (B, C, *out_hw), dt, case.strided_dout),
                    out_format=pool_memory_format(view(x)))


POOL_EDGES = [
    PoolCase(shape=(1, 1, 1, 1), kernel_size=(3, 3), subtract_input=True),  # one pixel
    # A 2x3 grid smaller than PoolFormer's 5x5 window, channels_last.
    PoolCase(dtype=fp16, shape=(2, 3, 2, 3), kernel_size=(5, 5), subtract_input=True,
             layout="channels_last", seed=1),
    # Stride larger than the kernel (pixels no window covers), permuted crop.
    PoolCase(dtype=bf16, shape=(1, 17, 9, 8), kernel_size=(2, 3), stride=(3, 2), padding=(1, 0),
             layout="nhwc_crop", strided_dout=True, seed=2),
    PoolCase(shape=(2, 70, 5, 5), kernel_size=(7, 7), padding=(3, 3), layout="channel_slice",
             seed=3),
]


@FUZZ
@given(case=fuzz.pool_cases())
@_examples(POOL_EDGES)
def test_avg_pool2d(backend, case):
    _check_fuzz("avg_pool2d", backend, case, _pool_problem)


# --------------------------------------------------------------------------- regressions


def test_regression_elsa_triton_fp32_dattn_at_border():
    """Found by the fuzz test: one pixel, K = 7, logits, no ghost. Every tap but the centre
    is outside the image and the centre's probability is small; dattn must not cancel two
    O(dp_centre) terms (the softmax backward's mean comes from its own fp32 pass)."""
    _check_fuzz("elsa_attention", "triton", ElsaCase(grid=(1, 1), kernel_size=7), _elsa_problem)


def test_regression_elsa_triton_fp32_dattn_single_tap():
    """Found by the fuzz test: K = 1, logits, both ghosts. With one tap the softmax is
    constant 1 and dattn = p * (dp - sum_t p_t dp_t) is exactly 0 (PyTorch's own error is
    0): the pre-pass's dp must be bitwise the tap loop's, not an fp32 sum of the same
    products in another order."""
    case = ElsaCase(dtype=fp32, batch=2, heads=1, head_channels=32, grid=(3, 12), kernel_size=1,
                    dilation=1, ghost="both", ghost_dtype="input", channels_last=False,
                    probs=False, layout="plain", strided_dout=False, seed=17027)
    _check_fuzz("elsa_attention", "triton", case, _elsa_problem)


def test_regression_sdpa_dropout_single_key(backend):
    """With one key softmax is constant: dq, dk and dbias are exactly zero (PyTorch's own
    error is 0), not the rounding noise of the kernels' dS = p * (dp - p dp), whose
    rebuilt p need not be exactly 1."""
    case = SdpaCase(dtype=fp16, batch=(4,), nq=16, nk=1, d=16, bias="float", bias_shape=(1, 1),
                    dropout_p=0.3)
    _check_fuzz("scaled_dot_product_attention", backend, case, _sdpa_problem)


def test_regression_sdpa_fp32_near_one_hot_delta(backend):
    """Near-one-hot float32 rows (scale 1, head dim 48): the backward's logits differ from
    the forward's in their last bits, so its rebuilt p sums to 1 + rho; delta =
    rowsum(p dp) / rowsum(p) keeps each row of dS summing to 0 (undivided, dq is off by
    |dp| rho)."""
    case = SdpaCase(dtype=fp32, batch=(3,), nq=1, nk=33, d=48, layout="kv_expanded", scale=1.0)
    _check_fuzz("scaled_dot_product_attention", backend, case, _sdpa_problem)


def test_regression_sdpa_triton_bf16_dv_single_key():
    """One key: p = exp(s - m) / l recomputes exactly 1, and its bf16 cast (round to
    nearest, as on the GPU and in the interpreter's model) keeps it 1: dv = sum of dO."""
    _check_fuzz("scaled_dot_product_attention", "triton", SdpaCase(dtype=bf16, nq=16, nk=1, d=16),
                _sdpa_problem)


def test_regression_window_triton_fp32_dq_under_3xtf32():
    """Found by a 200-example run: float32 dq at the precision the GPU computes (3xTF32),
    a -inf shift mask and a strided head dim."""
    case = WindowCase(dtype=fp32, grid=(5, 9), heads=3, d=48, window=(2, 8), shift=(1, 7),
                      table="float32", pad="float32", scale=0.37, mask_value=float("-inf"),
                      layout="strided_d", seed=3)
    _check_fuzz("window_attention", "triton", case, _window_problem)
