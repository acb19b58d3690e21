"""The interpreter's model of the GPU's float32 arithmetic (``pyvit_ops.testing.interpreter``):
``tl.dot``'s input precision and the flush-to-zero exponentials, what every float32 Triton
test runs on."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from pyvit_ops.testing import interpreter

S = 16  # the smallest tl.dot tile


@triton.jit
def _dot_kernel(A, B, C, OUT, PRECISION: tl.constexpr, DEFAULT: tl.constexpr):
    r = tl.arange(0, 16)
    tile = r[:, None] * 16 + r[None, :]
    a = tl.load(A + tile)
    b = tl.load(B + tile)
    c = tl.load(C + tile)
    if DEFAULT:
        out = tl.dot(a, b, c)
    else:
        out = tl.dot(a, b, c, input_precision=PRECISION)
    tl.store(OUT + tile, out)


def _dot(a, b, c, precision):
    out = torch.empty(S, S)
    _dot_kernel[(1,)](a, b, c, out, PRECISION=precision or "ieee", DEFAULT=precision is None)
    return out


def _operands(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, S, generator=g), torch.randn(S, S, generator=g),
            torch.randn(S, S, generator=g))


def _relative_error(out, a, b, c):
    exact = a.double() @ b.double() + c.double()
    return ((out.double() - exact).abs().max() / exact.abs().max()).item()


def test_tf32_rounds_to_nearest_ties_away():
    ulp = 2.0 ** -10  # TF32's mantissa step at 1
    x = np.array([1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 4, 1 + 3 * ulp / 4, 1 + ulp,
                  np.finfo(np.float32).max, 0.0, -0.0], dtype=np.float32)
    want = np.array([1 + ulp, -(1 + ulp), 1, 1 + ulp, 1 + ulp, np.inf, 0.0, -0.0],
                    dtype=np.float32)
    got = interpreter.tf32(x)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[-1])


def test_tf32_passes_non_finite_values():
    # A NaN whose payload sits in the low 13 bits would round to inf.
    nan_low = np.array([0x7F800001], dtype=np.uint32).view(np.float32)
    x = np.concatenate([nan_low, np.array([np.inf, -np.inf, np.nan], dtype=np.float32)])
    got = interpreter.tf32(x)
    assert np.isnan(got[0]) and np.isnan(got[3])
    np.testing.assert_array_equal(got[1:3], x[1:3])


def test_tf32_dot_rounds_the_operands():
    a, b, c = _operands()
    out = _dot(a, b, c, "tf32")
    expected = (torch.from_numpy(interpreter.tf32(a.numpy())).double()
                @ torch.from_numpy(interpreter.tf32(b.numpy())).double() + c.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # TF32's error on a 16-term product: well above float32's, about 2^-11 relative.
    assert 1e-4 < _relative_error(out, a, b, c) < 3e-3


def test_default_precision_is_tf32():
    a, b, c = _operands(1)
    torch.testing.assert_close(_dot(a, b, c, None), _dot(a, b, c, "tf32"), atol=0, rtol=0)


@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_float32_grade_dots(precision):
    a, b, c = _operands(2)
    assert _relative_error(_dot(a, b, c, precision), a, b, c) < 2e-6


@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "ieee"])
def test_non_finite_operands_propagate_like_the_exact_product(precision):
    a, b, c = _operands(3)
    # 1.0 and 0.5 are exact in TF32 (lo = 0, so inf * lo = NaN inside the split sum).
    b[:, 0] = 1.0
    b[:, 1] = 0.5
    a[0, 3] = float("inf")
    a[1, 5] = float("-inf")
    a[2, 7] = float("nan")
    b[9, 4] = float("inf")
    b[2, 6] = 0.0  # a[1, 5] hits no zero: row 2 is the nan row
    b[3, 8] = 0.0  # inf * 0 = NaN
    out = _dot(a, b, c, precision)
    exact = a.double() @ b.double() + c.double()
    assert torch.equal(out.isnan(), exact.isnan())
    assert torch.equal(out.isinf(), exact.isinf())
    inf = exact.isinf()
    assert inf.any() and exact.isnan().any()
    assert torch.equal(out[inf].double(), exact[inf])
    finite = exact.isfinite()
    torch.testing.assert_close(out[finite].double(), exact[finite], atol=1e-2, rtol=1e-2)


@triton.jit
def _exp_kernel(X, OUT2, OUT):
    r = tl.arange(0, 4)
    x = tl.load(X + r)
    tl.store(OUT2 + r, tl.exp2(x))
    tl.store(OUT + r, tl.exp(x))


def test_exponentials_flush_subnormal_results_to_zero():
    """ex2.approx.ftz.f32: 2**-130 is subnormal, so 0 on the GPU; 2**-126 is normal."""
    x = torch.tensor([-130.0, -126.0, 0.0, float("-inf")])
    out2, out = torch.empty(4), torch.empty(4)
    _exp_kernel[(1,)](x, out2, out)
    assert out2.tolist() == [0.0, 2.0 ** -126, 1.0, 0.0]
    assert out[0] == 0.0 and out[1] == 0.0 and out[2] == 1.0  # e**-126 and e**-130: subnormal
