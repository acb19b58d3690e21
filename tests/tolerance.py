"""The one tolerance rule of every kernel-vs-reference comparison in the tests,
flash-attention's: for each output and gradient,

    max |kernel - oracle| <= K * max |torch_own - oracle| + FLOORS[dtype] * max |oracle|

``oracle`` is the reference evaluated in float64 on the very values the kernel saw;
``torch_own`` is PyTorch's own computation of the same thing at the kernel's input
precision: the reference run on the inputs as given (float32 math for float32; for
half inputs the references compute in float32 and round the result), or for SDPA the
plain ``softmax(q @ k^T * scale + bias) @ v`` composition in the input dtype
(``sdpa_torch_own``), the yardstick flash-attention uses. ``dtype`` is the precision
the operator runs at: its input dtype (also for a float32 bias-table gradient of a
float16 call, reduced from float16 terms), the autocast dtype under autocast, float16
for float32 products in TF32 (the same 10 explicit mantissa bits).

FLOORS is relative to the largest |oracle|, so one value per dtype fits an output of
magnitude ~1 and a bias-table gradient summed over every window and token alike:

- float32, 2**-18 (16 units of 2**-22): the Triton kernels multiply float32 as 3xTF32,
  each operand keeps 22 of float32's 24 significand bits (unit roundoff 2**-22, 4x
  float32's), an error PyTorch's float32 matmuls do not make. Through the logits it
  grows with their magnitude: a probability recomputed from 3xTF32 logits is off by
  their absolute error, which at scale 1 and a head dim of 32 reaches ~10 units of
  2**-22 of the largest gradient, beyond K times PyTorch's own.
- float16, 2**-11 and bfloat16, 2**-8 (one unit roundoff of the dtype): the fused
  kernels round the probabilities and dS to the input dtype before the second
  products, as every fused attention does, where the references keep them in float32
  (their error is the rounding of the result alone): one more rounding of the terms
  of each result, about one unit roundoff of the largest.
"""
import torch

K = 2
FLOORS = {torch.float32: 2.0 ** -18, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def assert_within(name, got, oracle, torch_own, dtype):
    """``got`` (a kernel's result) against the float64 ``oracle`` under the rule, with
    ``torch_own`` as the yardstick and the floor of ``dtype``."""
    assert oracle.dtype == torch.float64, f"{name}: the oracle must be float64"
    assert got.shape == oracle.shape == torch_own.shape, (
        f"{name}: shapes {tuple(got.shape)}, oracle {tuple(oracle.shape)}, "
        f"PyTorch's own {tuple(torch_own.shape)}")
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = _max_abs(got.double() - oracle)
    own = _max_abs(torch_own.double() - oracle)
    floor = FLOORS[dtype] * _max_abs(oracle)
    assert err <= K * own + floor, (
        f"{name}: max |kernel - fp64| = {err:.3e} > {K} x PyTorch's own {own:.3e} "
        f"+ floor {floor:.3e}")


def assert_all_within(got, oracle, torch_own, dtype):
    """``assert_within`` for each name of the dict ``got`` (outputs and gradients)."""
    for name in got:
        assert_within(name, got[name], oracle[name], torch_own[name], dtype)


def sdpa_torch_own(q, k, v, bias, scale, keep=None, dropout_p=0.0):
    """PyTorch's own SDPA arithmetic at the input precision: the plain composition,
    a bool ``bias`` masking, ``keep`` the dropout mask. A row with every key masked
    is 0, as torch's SDPA returns (softmax gives NaN)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return torch.matmul(p.to(v.dtype), v)
