"""Benchmark of ``pyvit_ops.scaled_dot_product_attention`` at ViT / BEiT / CaiT shapes.

Baseline (``naive``): timm's non-fused ``Attention`` path, ``softmax(q * scale @ kᵀ + bias) @ v``
on q, k, v sliced out of one packed qkv projection. Also timed: ``torch.nn.functional.
scaled_dot_product_attention`` and, on CUDA, FlexAttention (compiled) with the bias as a
``score_mod``.

    python -m benchmarks.scaled_dot_product_attention [options of python -m benchmarks]
"""
import sys

import torch

from benchmarks import harness
from benchmarks.harness import Flops, Inputs, Shape

OP = "scaled_dot_product_attention"

# (model, heads, head dim) of ViT-S/B/L (DeiT has the same shapes); 16x16 patches + cls token.
_VITS = (("vit_s", 6, 64), ("vit_b", 12, 64), ("vit_l", 16, 64))
_TOKENS = {224: 197, 384: 577}


# The model shapes the default CPU run times (their names start with these); --full: all.
QUICK = ("vit_s.224", "beit_b.224", "cait_s24.224")


def model_shapes():
    shapes = []
    for res, n in _TOKENS.items():
        for model, heads, dim in _VITS:
            shapes.append(Shape(model, f"{res}", dict(heads=heads, nq=n, nk=n, dim=dim,
                                                      bias=False)))
        # BEiT-B: ViT-B with a per-layer relative position bias (heads, N, N), shared by the batch.
        shapes.append(Shape("beit_b", f"{res}.relpos_bias", dict(heads=12, nq=n, nk=n, dim=64,
                                                                 bias=True)))
        # CaiT-S24 class attention: the class token (Nq = 1) attends to itself and the patches.
        shapes.append(Shape("cait_s24", f"{res}.class_attn", dict(heads=8, nq=1, nk=n, dim=48,
                                                                  bias=False)))
    return shapes


def tiny_shapes():
    return [Shape("tiny", "bias", dict(heads=2, nq=37, nk=37, dim=32, bias=True)),
            Shape("tiny", "class_attn", dict(heads=2, nq=1, nk=37, dim=48, bias=False))]


def reduce(params, max_heads):
    """The shape with at most ``max_heads`` heads and the factor back to the full shape:
    every head is an independent program, so traffic and FLOPs scale with the heads."""
    heads = min(params["heads"], max_heads)
    return dict(params, heads=heads), params["heads"] / heads


def describe(params, batch):
    p = params
    text = f"B={batch} heads={p['heads']} Nq={p['nq']} Nk={p['nk']} D={p['dim']}"
    return text + (f" bias=1x{p['heads']}x{p['nq']}x{p['nk']}" if p["bias"] else "")


def make_inputs(params, batch, device, dtype, requires_grad=True):
    """q, k, v as timm lays them out: (B, heads, N, D) strided views of one (B, N, 3, heads, D)
    projection for self-attention; separate q / k / v projections for class attention."""
    h, nq, nk, d = params["heads"], params["nq"], params["nk"], params["dim"]
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape, std=1.0):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std
        return t.to(dtype).requires_grad_(requires_grad)

    if nq == nk:
        qkv = leaf(batch, nq, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        leaves = {"qkv": qkv}
    else:
        leaves = {"q_proj": leaf(batch, nq, h, d), "k_proj": leaf(batch, nk, h, d),
                  "v_proj": leaf(batch, nk, h, d)}
        q, k, v = (leaves[f"{n}_proj"].transpose(1, 2) for n in "qkv")
    bias = None
    if params["bias"]:
        bias = leaves["bias"] = leaf(1, h, nq, nk, std=0.5)
    return Inputs(leaves=leaves, reads={"q": q, "k": k, "v": v, "bias": bias},
                  extra={"scale": d ** -0.5})


def naive(inp):
    """timm ``Attention.forward`` with ``fused_attn=False``."""
    attn = (inp.q * inp.scale) @ inp.k.transpose(-2, -1)
    if inp.bias is not None:
        attn = attn + inp.bias
    return attn.softmax(dim=-1) @ inp.v


def _pyvit(inp, backend):
    if "qkv" in inp.leaves:
        # Self-attention takes the packed entry point, as pyvit_ops.nn.Attention does: its
        # backward writes the projection's gradient in place, where the slices' would be
        # stacked.
        return harness.pyvit_function(f"{OP}_qkvpacked")(inp.qkv, inp.bias, scale=inp.scale,
                                                         backend=backend)
    return harness.pyvit_function(OP)(inp.q, inp.k, inp.v, inp.bias, scale=inp.scale,
                                      backend=backend)


def fused(inp):
    return _pyvit(inp, "triton")


def torch_sdpa(inp):
    return torch.nn.functional.scaled_dot_product_attention(inp.q, inp.k, inp.v,
                                                            attn_mask=inp.bias, scale=inp.scale)


def flex_attention_provider(compiled=True):
    """FlexAttention with the bias as a ``score_mod`` (compiled, as it is meant to run)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = harness.compiled_flex_attention() if compiled else flex_attention

    def run(inp):
        bias = inp.bias
        score_mod = None if bias is None else (lambda s, b, h, qi, ki: s + bias[0, h, qi, ki])
        return fn(inp.q, inp.k, inp.v, score_mod=score_mod, scale=inp.scale)

    return run



def providers(device):
    found = harness.pyvit_providers(_pyvit, device)
    found["torch_sdpa"] = torch_sdpa
    if torch.device(device).type == "cuda":
        found["flex_attention"] = harness.optional_provider(flex_attention_provider)
    return found


def flops(params, batch):
    """Matrix products: q kᵀ and p v forward (4 N_q N_k D), four products backward
    (8 N_q N_k D) plus the recomputed q kᵀ of a flash-style backward; the softmax and
    bias work (~5 operations per score forward, ~6 backward) runs on CUDA cores."""
    scores = batch * params["heads"] * params["nq"] * params["nk"]
    d = params["dim"]
    return {"fwd": Flops(matmul=4 * scores * d, other=5 * scores),
            "bwd": Flops(matmul=8 * scores * d, other=6 * scores, recompute=2 * scores * d)}


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["--ops", OP, *sys.argv[1:]]))
