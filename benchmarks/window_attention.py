"""Benchmark of ``pyvit_ops.window_attention`` at Swin-T/S/B stage shapes (224 and 384),
Swin V2 stage shapes (swinv2_tiny_window8_256, swinv2_tiny_window16_256,
swinv2_base_window12to24_192to384: scaled cosine attention, ``logit_scale``) and MaxViT's
grid attention (maxvit_tiny_tf_224, ``partition="grid"``; timm's ``grid_partition`` /
``grid_reverse`` around the same attention on the naive side).

Baseline (``naive``): timm's ``SwinTransformerBlock._attn`` + ``WindowAttention`` math path
(timm's default: its fused path is experimental): roll, pad, partition, ``q * scale @ kᵀ``
+ gathered relative position bias + shift mask buffer, softmax, ``@ v``, merge, crop, roll
back. Swin V2 (timm's ``swin_transformer_v2``, math path only): the same layout work around
``normalize(q) @ normalize(k)ᵀ * exp(min(logit_scale, log 100))`` + ``16 * sigmoid`` of
the gathered continuous-position-bias table + mask. The linear projections (and V2's
``cpb_mlp``) are not part of the operator, so both sides start from the projected
(B, H, W, 3, heads, D) qkv (and the ``cpb_mlp`` output: a random table of its size) and
the roll / pad / partition act on it; padding it with zeros is what ``pad_kv=None`` means.
Also timed: timm's fused path (the same layout work around
``torch.nn.functional.scaled_dot_product_attention`` with bias + mask as ``attn_mask``;
for V2, which timm runs on its math path only, q normalised and scaled by the gain), and
on CUDA FlexAttention (compiled, bias and mask as a ``score_mod``) and NATTEN (blocked
neighbourhood attention, where it applies).

    python -m benchmarks.window_attention [options of python -m benchmarks]
"""
import importlib.util
import math
import sys

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Flops, Inputs, Shape, Unavailable

OP = "window_attention"
MASK_VALUE = -100.0  # timm's value between tokens of different shift regions
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # Swin V2's clamp of the logit scale, as timm writes it

# (model, embed dim, heads per stage); Swin-T and Swin-S differ only in depth.
_SWINS = (("swin_t+swin_s", 96, (3, 6, 12, 24)), ("swin_b", 128, (4, 8, 16, 32)))
# Image size -> window of the released checkpoints (window 12 for the 384 models).
_WINDOWS = {224: 7, 384: 12}
# Swin V2 checkpoints: (model, embed dim, heads per stage, image size, window).
_SWINV2S = (("swinv2_tiny_window8_256", 96, (3, 6, 12, 24), 256, 8),
            ("swinv2_tiny_window16_256", 96, (3, 6, 12, 24), 256, 16),
            ("swinv2_base_window12to24_192to384", 128, (4, 8, 16, 32), 384, 24))
# MaxViT-T at 224: stage 3 (14 x 14 map, 256 channels in heads of 32), 7 x 7 grid windows.
_MAXVIT_GRID = Shape("maxvit_tiny_tf_224", "s3.grid",
                     dict(heads=8, dim=32, grid=14, window=7, shift=0, partition="grid"))


# The model shapes the default CPU run times (their names start with these); --full: all.
QUICK = ("swin_t+swin_s.224", "swinv2_tiny_window8_256.s3.sw")


def _stages(model, embed, heads, res, window, prefix="", **extra):
    """The window-attention calls of every stage of one model (patch size 4)."""
    for stage, h in enumerate(heads):
        grid = res // 4 // 2 ** stage
        # timm clamps the window to the grid and turns the shift off where the grid is no
        # larger than the window.
        ws = min(window, grid)
        for shift in ((0, ws // 2) if grid > ws else (0,)):
            kind = "sw" if shift else "w"
            yield Shape(model, f"{prefix}s{stage + 1}.{kind}", dict(
                heads=h, dim=embed * 2 ** stage // h, grid=grid, window=ws, shift=shift,
                **extra))


def model_shapes():
    shapes = []
    for res, window in _WINDOWS.items():
        for model, embed, heads in _SWINS:
            shapes += _stages(model, embed, heads, res, window, prefix=f"{res}.")
    for model, embed, heads, res, window in _SWINV2S:
        shapes += _stages(model, embed, heads, res, window, cosine=True)
    return shapes + [_MAXVIT_GRID]


def tiny_shapes():
    # 13 x 13 grid: padded to 14, shifted, two heads, a window that is not a power of two;
    # V2: 9 x 9 grid padded to 12, shifted, cosine attention.
    return [Shape("tiny", "sw", dict(heads=2, dim=32, grid=13, window=7, shift=3)),
            Shape("tiny_v2", "sw", dict(heads=2, dim=16, grid=9, window=4, shift=2,
                                        cosine=True))]


def describe(params, batch):
    p = params
    return (f"B={batch} grid={p['grid']}x{p['grid']} heads={p['heads']} D={p['dim']} "
            f"window={p['window']} shift={p['shift']}" + (" cosine" if p.get("cosine") else "")
            + (" grid partition" if p.get("partition") == "grid" else ""))


def _relative_position_index(ws, device):
    """(N * N,) row of the bias table for query i, key j, as timm builds it."""
    yy, xx = torch.meshgrid(torch.arange(ws, device=device), torch.arange(ws, device=device),
                            indexing="ij")
    coords = torch.stack([yy.flatten(), xx.flatten()])
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)
    return (rel[0] * (2 * ws - 1) + rel[1]).flatten()


def _partition(x, ws):
    """(B, H, W, C) -> (B * nW, ws, ws, C), timm's ``window_partition``."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.contiguous().view(-1, ws, ws, C)


def _reverse(windows, ws, H, W):
    """Inverse of ``_partition``, timm's ``window_reverse``."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.contiguous().view(-1, H, W, C)


def _shift_mask(padded, ws, shift, device, dtype):
    """(nW, N, N) additive mask of timm's ``get_attn_mask`` (regions labelled on the
    padded grid), or None without shift."""
    if shift == 0:
        return None
    img = torch.zeros(1, padded, padded, 1, device=device)
    label = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = label
            label += 1
    windows = _partition(img, ws).view(-1, ws * ws)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, MASK_VALUE).masked_fill(diff == 0, 0.0).to(dtype)


def make_inputs(params, batch, device, dtype, requires_grad=True):
    """qkv (B, H, W, 3, heads, D) as the projection writes it; q, k, v are its slices; the
    bias table is the checkpoint parameter (V2: the ``cpb_mlp`` output, random values of
    its size); index and mask are the block's buffers. V2's logit scales (heads, 1, 1)
    sit around timm's initial log(10), the last head above the clamp at log(100). Table
    and logit scale are in ``dtype``, as in a model converted to it."""
    h, d, grid, ws = params["heads"], params["dim"], params["grid"], params["window"]
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(batch, grid, grid, 3, h, d, generator=gen, device=device).to(dtype)
    table = torch.randn((2 * ws - 1) ** 2, h, generator=gen, device=device) * 0.02
    qkv.requires_grad_(requires_grad)
    table = table.to(dtype).requires_grad_(requires_grad)
    leaves, logit_scale, scale = {"qkv": qkv, "table": table}, None, d ** -0.5
    if params.get("cosine"):
        logit_scale = math.log(10.0) + 0.5 * torch.randn(h, 1, 1, generator=gen, device=device)
        logit_scale[-1] = LOGIT_SCALE_MAX + 0.5
        logit_scale = logit_scale.to(dtype).requires_grad_(requires_grad)
        leaves["logit_scale"], scale = logit_scale, None
    q, k, v = qkv.unbind(3)
    padded = -(-grid // ws) * ws
    return Inputs(
        leaves=leaves,
        reads={"q": q, "k": k, "v": v, "table": table, "logit_scale": logit_scale},
        extra={"qkv": qkv, "window": ws, "shift": params["shift"], "scale": scale,
               "grid_partition": params.get("partition") == "grid",
               "index": _relative_position_index(ws, device),
               "mask": _shift_mask(padded, ws, params["shift"], device, dtype)})


def _grid_partition(x, ws):
    """(B, H, W, C) -> (B * nW, ws, ws, C), timm's (MaxViT) ``grid_partition``: window
    (i, j) holds the tokens (a * H / ws + i, c * W / ws + j)."""
    B, H, W, C = x.shape
    x = x.view(B, ws, H // ws, ws, W // ws, C).permute(0, 2, 4, 1, 3, 5)
    return x.contiguous().view(-1, ws, ws, C)


def _grid_reverse(windows, ws, H, W):
    """Inverse of ``_grid_partition``, timm's ``grid_reverse``."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C).permute(0, 3, 1, 4, 2, 5)
    return x.contiguous().view(-1, H, W, C)


def _windows(inp):
    """timm's layout work before attention: roll, pad, partition (or MaxViT's grid
    partition); returns q, k, v of shape (B * nW, heads, N, D) and the padded grid size."""
    qkv, ws, shift = inp.qkv, inp.window, inp.shift
    B, H, W, _, heads, D = qkv.shape
    x = qkv.reshape(B, H, W, 3 * heads * D)
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    x = F.pad(x, (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
    Hp, Wp = x.shape[1:3]
    x = (_grid_partition if inp.grid_partition else _partition)(x, ws)
    x = x.view(-1, ws * ws, 3 * heads * D)
    q, k, v = x.reshape(x.shape[0], ws * ws, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v, Hp, Wp


def _merge(x, inp, Hp, Wp):
    """timm's layout work after attention: (B * nW, heads, N, D) -> (B, H, W, heads, D)."""
    B, H, W, _, heads, D = inp.qkv.shape
    ws, shift = inp.window, inp.shift
    x = x.transpose(1, 2).reshape(-1, ws, ws, heads * D)
    x = (_grid_reverse if inp.grid_partition else _reverse)(x, ws, Hp, Wp)
    x = x[:, :H, :W, :].contiguous()
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x.view(B, H, W, heads, D)


def _rel_bias(inp):
    """(heads, N, N) bias gathered from the table, timm's ``_get_rel_pos_bias`` (V2:
    ``16 * sigmoid`` of the gathered ``cpb_mlp`` output)."""
    n = inp.window ** 2
    bias = inp.table[inp.index].view(n, n, -1).permute(2, 0, 1).contiguous()
    return bias if inp.logit_scale is None else 16 * torch.sigmoid(bias)


def _gain(inp):
    """Swin V2's per-head gain of the cosine, (heads, 1, 1)."""
    return torch.clamp(inp.logit_scale, max=LOGIT_SCALE_MAX).exp()


def _sdpa_qk(inp, q, k):
    """q, k and the scale for SDPA-style kernels; V2 folds the gain into the normalised q."""
    if inp.logit_scale is None:
        return q, k, inp.scale
    return F.normalize(q, dim=-1) * _gain(inp), F.normalize(k, dim=-1), 1.0


def naive(inp):
    """timm ``SwinTransformerBlock._attn`` with ``WindowAttention.fused_attn=False``; V2:
    timm ``SwinTransformerV2Block._attn`` (cosine attention)."""
    q, k, v, Hp, Wp = _windows(inp)
    heads, n = q.shape[1], q.shape[2]
    if inp.logit_scale is None:
        attn = (q * inp.scale) @ k.transpose(-2, -1)
    else:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * _gain(inp)
    attn = attn + _rel_bias(inp).unsqueeze(0)
    if inp.mask is not None:
        nw = inp.mask.shape[0]
        attn = attn.view(-1, nw, heads, n, n) + inp.mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    return _merge(attn.softmax(dim=-1) @ v, inp, Hp, Wp)


def timm_sdpa(inp):
    """timm's fused path: the same layout work around torch's SDPA, bias + mask expanded
    per window as ``attn_mask`` (V2: q, k normalised, the gain folded into q)."""
    q, k, v, Hp, Wp = _windows(inp)
    heads, n = q.shape[1], q.shape[2]
    attn_mask = _rel_bias(inp).unsqueeze(0)
    if inp.mask is not None:
        nw = inp.mask.shape[0]
        mask = inp.mask.view(1, nw, 1, n, n).expand(q.shape[0] // nw, -1, heads, -1, -1)
        attn_mask = attn_mask + mask.reshape(-1, heads, n, n)
    q, k, scale = _sdpa_qk(inp, q, k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return _merge(out, inp, Hp, Wp)


def flex_attention_provider(compiled=True):
    """FlexAttention over the partitioned windows, bias and shift mask as a ``score_mod``."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = harness.compiled_flex_attention() if compiled else flex_attention

    def run(inp):
        q, k, v, Hp, Wp = _windows(inp)
        bias, mask = _rel_bias(inp), inp.mask
        if mask is None:
            def score_mod(s, b, h, qi, ki):
                return s + bias[h, qi, ki]
        else:
            nw = mask.shape[0]

            def score_mod(s, b, h, qi, ki):
                return s + bias[h, qi, ki] + mask[b % nw, qi, ki]
        q, k, scale = _sdpa_qk(inp, q, k)
        return _merge(fn(q, k, v, score_mod=score_mod, scale=scale), inp, Hp, Wp)

    return run



def natten_provider():
    """NATTEN's blocked neighbourhood attention (kernel = stride = window) on the image
    layout: Swin's W-MSA without the relative position bias, which NATTEN does not have;
    it cannot express the shifted windows' region mask."""
    import natten

    def run(inp):
        if inp.shift:
            raise Unavailable("NATTEN has no shifted-window region mask")
        if inp.grid_partition:
            raise Unavailable("NATTEN has no grid partition")
        if inp.logit_scale is not None:
            raise Unavailable("NATTEN has no cosine attention")
        H = inp.qkv.shape[1]
        if H % inp.window:
            raise Unavailable("grid not a multiple of the window")
        na2d = getattr(getattr(natten, "functional", None), "na2d", None)
        if na2d is None:
            raise Unavailable(f"natten {getattr(natten, '__version__', '?')} has no "
                              "functional.na2d with stride (needs natten >= 0.20)")
        ws = inp.window
        return na2d(inp.q, inp.k, inp.v, kernel_size=(ws, ws), stride=(ws, ws))

    run.approximate = "no relative position bias"
    return run


def _pyvit(inp, backend):
    # The packed entry point, as pyvit_ops.nn.WindowAttention calls it: its backward writes
    # the projection's gradient in place, where the three slices' would be stacked.
    # V2: the table is the cpb_mlp output; pyvit_ops.nn.WindowAttentionV2 applies
    # 16 * sigmoid to the table, before the gather.
    table = inp.table if inp.logit_scale is None else 16 * torch.sigmoid(inp.table)
    return harness.pyvit_function(f"{OP}_qkvpacked")(
        inp.qkv, table, window_size=inp.window, shift_size=inp.shift, scale=inp.scale,
        mask_value=MASK_VALUE, logit_scale=inp.logit_scale,
        partition="grid" if inp.grid_partition else "block", backend=backend)


def fused(inp):
    return _pyvit(inp, "triton")


def providers(device):
    found = harness.pyvit_providers(_pyvit, device)
    found["timm_sdpa"] = timm_sdpa
    if torch.device(device).type == "cuda":
        found["flex_attention"] = harness.optional_provider(flex_attention_provider)
        if importlib.util.find_spec("natten") is not None:  # timed only where installed
            found["natten"] = harness.optional_provider(natten_provider)
    return found


# No ``reduce``: traffic.py measures the full head count, because the backward groups
# windows per program by the number of (window, head) programs, so its partial-sum
# buffers (and bytes) do not scale linearly with the heads.


def flops(params, batch):
    """Per window and head, as attention with N = window² (see the SDPA script); the
    bias and mask add two operations per score. V2 adds the gain (one operation per
    score each way) and the norms of q and k (about three operations per element each
    way)."""
    p = params
    windows = batch * (-(-p["grid"] // p["window"])) ** 2
    scores = windows * p["heads"] * p["window"] ** 4
    cosine = (scores + 6 * windows * p["heads"] * p["window"] ** 2 * p["dim"]
              if p.get("cosine") else 0)
    return {"fwd": Flops(matmul=4 * scores * p["dim"], other=7 * scores + cosine),
            "bwd": Flops(matmul=8 * scores * p["dim"], other=6 * scores + cosine,
                         recompute=2 * scores * p["dim"])}


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["--ops", OP, *sys.argv[1:]]))
