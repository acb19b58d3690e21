"""Benchmark of ``pyvit_ops.elsa_attention`` at ELSA-Swin-T/S/B stage shapes (224).

Baseline (``naive``): the official ELSA module's aggregation as it runs without its CUDA
op: softmax of the logits over the K² taps, ghost tensors expanded per sample, then
``elsa_op``'s unfold formulation (unfold v to (B, C, K², HW), ``filters = mul * attn + add``,
multiply and sum over the taps). v is the channel slice of the packed 1x1-conv
projection, as in the module. The released ELSA-Swin models use λ = 0, γ = 1: the
multiplicative ghost is all ones (``ghost_mul=None`` here; the official code materialises
it, in v's dtype below so the baseline is not penalised by an fp32 promotion) and the
additive one is a (C, K, K) parameter. The tiny shape also exercises ``ghost_mul``.

    python -m benchmarks.elsa_attention [options of python -m benchmarks]
"""
import math
import sys

import torch

from benchmarks import harness
from benchmarks.harness import Flops, Inputs, Shape
from pyvit_ops.testing import elsa_official

OP = "elsa_attention"
KERNEL = 7
GROUP_WIDTH = 8  # the official module rounds dim_qk up to a multiple of this

# (model, channels per stage); 32 channels per head, ELSA replaces stages 1-3.
_ELSA_SWINS = (("elsa_swin_t+elsa_swin_s", (96, 192, 384)), ("elsa_swin_b", (128, 256, 512)))


def _dim_qk(channels):
    return math.ceil(channels // 3 * 2 / GROUP_WIDTH) * GROUP_WIDTH


# The model shapes the default CPU run times (their names start with these); --full: all.
QUICK = ("elsa_swin_t+elsa_swin_s.224",)


def model_shapes():
    shapes = []
    for model, channels in _ELSA_SWINS:
        for stage, c in enumerate(channels):
            shapes.append(Shape(model, f"224.s{stage + 1}", dict(
                channels=c, heads=c // 32, grid=224 // 4 // 2 ** stage, kernel=KERNEL, dilation=1,
                dim_qk=_dim_qk(c), ghost_mul=False)))
    return shapes


def tiny_shapes():
    # 11 x 11 grid: every 7x7 window reaches the border; two heads of 8 channels.
    return [Shape("tiny", "ghosts", dict(channels=16, heads=2, grid=11, kernel=KERNEL, dilation=1,
                                         dim_qk=16, ghost_mul=True))]


def reduce(params, max_heads):
    """The shape with at most ``max_heads`` heads (same channels per head) and the factor
    back to the full shape: every head is an independent set of programs. ``dim_qk``
    only sizes the projection v is sliced from (its gradient's slice_backward, glue
    outside the kernels): it shrinks with the heads too, rounded to whole channels
    (within 1% of the exact share at the ELSA-Swin shapes)."""
    heads = min(params["heads"], max_heads)
    per_head = params["channels"] // params["heads"]
    factor = params["heads"] / heads
    return dict(params, heads=heads, channels=heads * per_head,
                dim_qk=round(params["dim_qk"] / factor)), factor


def describe(params, batch):
    p = params
    return (f"B={batch} C={p['channels']} heads={p['heads']} grid={p['grid']}x{p['grid']} "
            f"K={p['kernel']} dilation={p['dilation']} ghost_mul={p['ghost_mul']}")


def make_inputs(params, batch, device, dtype, requires_grad=True):
    """v: channel slice of the (B, 2 dim_qk + C, H, W) projection; attn: (B, G K², H, W)
    logits; ghosts: (C, K, K) parameters."""
    c, g, grid, k = params["channels"], params["heads"], params["grid"], params["kernel"]
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape, std=1.0):
        t = torch.randn(shape, generator=gen, device=device) * std
        return t.to(dtype).requires_grad_(requires_grad)

    qkv = leaf(batch, 2 * params["dim_qk"] + c, grid, grid)
    attn = leaf(batch, g * k * k, grid, grid)
    ghost_add = leaf(c, k, k, std=0.02)
    ghost_mul = leaf(c, k, k) if params["ghost_mul"] else None
    leaves = {"qkv": qkv, "attn": attn, "ghost_add": ghost_add}
    if ghost_mul is not None:
        leaves["ghost_mul"] = ghost_mul
    v = qkv[:, 2 * params["dim_qk"]:]
    return Inputs(leaves=leaves,
                  reads={"v": v, "attn": attn, "ghost_mul": ghost_mul, "ghost_add": ghost_add},
                  extra={"kernel": k, "dilation": params["dilation"]})


def naive(inp):
    """The official ``ELSA.forward`` from the v slice on (heads folded into the batch)."""
    return elsa_official.elsa_attention(inp.v, inp.attn, inp.ghost_mul, inp.ghost_add,
                                        inp.kernel, inp.dilation)


def _pyvit(inp, backend):
    return harness.pyvit_function(OP)(inp.v, inp.attn, inp.ghost_mul, inp.ghost_add,
                                      kernel_size=inp.kernel, dilation=inp.dilation,
                                      backend=backend)


def fused(inp):
    return _pyvit(inp, "triton")


def providers(device):
    return harness.pyvit_providers(_pyvit, device)


def flops(params, batch):
    """Per output element and tap: the filter (2) and its product with v (2) forward; the
    backward recomputes the filter (2), accumulates dv (2) and forms dp, dM, dD (6). The
    softmax costs ~5 operations per logit forward, ~4 backward. No matrix products."""
    p = params
    pixels = batch * p["grid"] ** 2
    taps = p["kernel"] ** 2
    outputs = pixels * p["channels"]
    logits = pixels * p["heads"] * taps
    return {"fwd": Flops(other=4 * outputs * taps + 5 * logits),
            "bwd": Flops(other=10 * outputs * taps + 4 * logits)}


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["--ops", OP, *sys.argv[1:]]))
