"""Benchmark of ``pyvit_ops.avg_pool2d`` (PoolFormer's fused ``pool(x) - x``) at
PoolFormer-S12/S24/M36 stage shapes (224).

Baseline (``naive``): timm's ``metaformer.Pooling``:
``nn.AvgPool2d(3, 1, 1, count_include_pad=False)(x) - x`` on an NCHW activation.

    python -m benchmarks.avg_pool2d [options of python -m benchmarks]
"""
import sys

import torch

from benchmarks import harness
from benchmarks.harness import Flops, Inputs, Shape

OP = "avg_pool2d"
POOL_SIZE = 3

# (model, channels per stage); PoolFormer-S12 and -S24 differ only in depth.
_POOLFORMERS = (("poolformer_s12+poolformer_s24", (64, 128, 320, 512)),
                ("poolformer_m36", (96, 192, 384, 768)))


# The model shapes the default CPU run times (their names start with these); --full: all.
QUICK = ("poolformer_s12+poolformer_s24.224",)


def model_shapes():
    return [Shape(model, f"224.s{stage + 1}", dict(channels=c, grid=224 // 4 // 2 ** stage,
                                                   kernel=POOL_SIZE))
            for model, channels in _POOLFORMERS for stage, c in enumerate(channels)]


def tiny_shapes():
    return [Shape("tiny", "odd", dict(channels=5, grid=13, kernel=POOL_SIZE))]


def reduce(params, max_units):
    """The shape with at most ``32 * max_units`` channels and the factor back to the full
    shape: channels are pooled independently (a partly masked channel tile moves no
    bytes for its masked lanes)."""
    channels = min(params["channels"], 32 * max_units)
    return dict(params, channels=channels), params["channels"] / channels


def describe(params, batch):
    p = params
    return f"B={batch} C={p['channels']} grid={p['grid']}x{p['grid']} pool={p['kernel']}"


def make_inputs(params, batch, device, dtype, requires_grad=True):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, params["channels"], params["grid"], params["grid"], generator=gen,
                    device=device).to(dtype).requires_grad_(requires_grad)
    k = params["kernel"]
    return Inputs(leaves={"x": x}, reads={"x": x},
                  extra={"pool": torch.nn.AvgPool2d(k, stride=1, padding=k // 2,
                                                    count_include_pad=False), "kernel": k})


def naive(inp):
    """timm ``metaformer.Pooling.forward``."""
    return inp.pool(inp.x) - inp.x


def backward_reads(inp):
    """The forward inputs the backward needs to read: none, pooling (and the subtraction)
    is linear, so its gradient depends on the upstream gradient only."""
    return []


def _pyvit(inp, backend):
    k = inp.kernel
    return harness.pyvit_function(OP)(inp.x, k, 1, k // 2, subtract_input=True, backend=backend)


def fused(inp):
    return _pyvit(inp, "triton")


def providers(device):
    return harness.pyvit_providers(_pyvit, device)


def flops(params, batch):
    """K² adds, one division, one subtraction per output; the backward gathers K² terms
    (a division and an add each) and subtracts the centre."""
    outputs = batch * params["channels"] * params["grid"] ** 2
    taps = params["kernel"] ** 2
    return {"fwd": Flops(other=(taps + 2) * outputs), "bwd": Flops(other=(2 * taps + 1) * outputs)}


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["--ops", OP, *sys.argv[1:]]))
