"""Benchmark of ``pyvit_ops.talking_heads_attention`` at CaiT shapes (its self-attention
blocks, whose heads are mixed before and after the softmax).

Baseline (``naive``): timm's ``TalkingHeadAttn`` between its qkv and output projections,
``proj_w(softmax(proj_l(q * scale @ kᵀ))) @ v`` with the mixes as ``Linear(heads, heads)``
over permuted (B, N, N, heads) views, on q, k, v sliced out of one packed qkv
projection. The fused path stores no (B, heads, N, N) tensor (its design and the traffic
figures: docs/design/talking_heads_attention.md). There are no CUDA C++ kernels.

    python -m benchmarks.talking_heads_attention [options of python -m benchmarks]
"""
import sys

import torch

from benchmarks import harness
from benchmarks.harness import Flops, Inputs, Shape

OP = "talking_heads_attention"

# (model, heads, head dim, tokens) of CaiT's self-attention blocks (16x16 patches, no
# class token: it joins in the class-attention blocks).
_CAITS = (("cait_xxs24", "224", 4, 48, 196), ("cait_s24", "384", 8, 48, 576),
          ("cait_m36", "384", 16, 48, 576))

# The model shapes the default CPU run times (their names start with these); --full: all.
QUICK = ("cait_xxs24.224",)


def model_shapes():
    return [Shape(model, res, dict(heads=h, n=n, dim=d)) for model, res, h, d, n in _CAITS]


def tiny_shapes():
    return [Shape("tiny", "tokens37", dict(heads=4, n=37, dim=16))]


def describe(params, batch):
    p = params
    return f"B={batch} heads={p['heads']} N={p['n']} D={p['dim']}"


def make_inputs(params, batch, device, dtype, requires_grad=True):
    """q, k, v as timm lays them out: (B, heads, N, D) strided views of one (B, N, 3, heads,
    D) projection; the head mixes as timm's fp32 Linear(heads, heads) parameters."""
    h, n, d = params["heads"], params["n"], params["dim"]
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape, dtype=dtype, std=1.0):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std
        return t.to(dtype).requires_grad_(requires_grad)

    qkv = leaf(batch, n, 3, h, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    eye = torch.eye(h, device=device)
    mixes = {"proj_l_weight": leaf(h, h, dtype=torch.float32, std=0.3),
             "proj_l_bias": leaf(h, dtype=torch.float32, std=0.1),
             "proj_w_weight": leaf(h, h, dtype=torch.float32, std=0.3),
             "proj_w_bias": leaf(h, dtype=torch.float32, std=0.1)}
    with torch.no_grad():
        mixes["proj_l_weight"] += eye
        mixes["proj_w_weight"] += eye
    return Inputs(leaves={"qkv": qkv, **mixes}, reads={"q": q, "k": k, "v": v, **mixes},
                  extra={"scale": d ** -0.5})


def _mixes(inp):
    return (inp.proj_l_weight, inp.proj_l_bias, inp.proj_w_weight, inp.proj_w_bias)


def naive(inp):
    """timm ``TalkingHeadAttn.forward`` between the projections (under autocast its
    Linear layers run in the inputs' dtype: the mixes are cast here likewise)."""
    lw, lb, ww, wb = (t.to(inp.q.dtype) for t in _mixes(inp))
    attn = (inp.q * inp.scale) @ inp.k.transpose(-2, -1)
    attn = torch.nn.functional.linear(attn.permute(0, 2, 3, 1), lw, lb).permute(0, 3, 1, 2)
    attn = attn.softmax(dim=-1)
    attn = torch.nn.functional.linear(attn.permute(0, 2, 3, 1), ww, wb).permute(0, 3, 1, 2)
    return attn @ inp.v


def _pyvit(inp, backend):
    return harness.pyvit_function(OP)(inp.q, inp.k, inp.v, *_mixes(inp), scale=inp.scale,
                                      backend=backend)


def fused(inp):
    return _pyvit(inp, "triton")


def providers(device):
    # Triton only on CUDA: the operator has no CUDA C++ kernels.
    backend = "triton" if torch.device(device).type == "cuda" else "reference"
    return {f"pyvit_ops[{backend}]": lambda inp: _pyvit(inp, backend)}


def flops(params, batch):
    """Per score (B heads N²): q kᵀ and A v forward (4 D), four products backward (8 D);
    the two head mixes (2 heads each, forward; four of them backward) and the softmax run
    on CUDA cores in the fused kernels (counted as ``other``, as they execute there). The
    fused kernels recompute q kᵀ once forward and four times backward, and dO vᵀ twice
    backward (``recompute``), and their mixes run more often than the naive Linear layers:
    ``other`` counts them as the fused kernels execute them (forward: L twice, W once;
    backward: L four times, W once, Wᵀ three times, Lᵀ twice, dW and dL once)."""
    scores = batch * params["heads"] * params["n"] ** 2
    d, h = params["dim"], params["heads"]
    return {"fwd": Flops(matmul=4 * scores * d, other=(3 * 2 * h + 8) * scores,
                         recompute=2 * scores * d),
            "bwd": Flops(matmul=8 * scores * d, other=(12 * 2 * h + 10) * scores,
                         recompute=12 * scores * d)}


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["--ops", OP, *sys.argv[1:]]))
