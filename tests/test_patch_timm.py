"""pyvit_ops.patch_timm and the pyvit_ops.nn modules against the timm models they
replace: outputs and gradients of small timm Swin / ViT / CaiT / PoolFormer models,
patched vs unpatched, on the reference backend (CPU) and the Triton kernels
(interpreter), timm Swin V2 at 4x4, 12x12 and 24x24 windows also on the CUDA kernels
(host emulation); the errors of their arguments."""
import contextlib
import copy
import io
import os
import pickle
import re

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is the parity target of patch_timm")

import pyvit_ops  # noqa: E402
from pyvit_ops import capabilities  # noqa: E402
from pyvit_ops import nn as pnn  # noqa: E402
from op_cases import assert_rejects, bad_module_call, module_forward, randn  # noqa: E402
from pyvit_ops.testing import host  # noqa: E402


def _swin():
    # 9x11 token grid with 7x7 windows: padding on both axes, and a shifted block.
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(36, 44),
                             embed_dim=32, depths=(2,), num_heads=(2,), num_classes=10), (2, 3, 36, 44)


def _swinv2():
    # Windows 4x4 on 9x11 and 4x5 grids (padding), shifted blocks, Swin V2's
    # post-norm, cosine attention and continuous position bias; random biases and
    # logit scales, some above the clamp at log(100).
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=(36, 44),
                              window_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2),
                              num_classes=10)
    _randomize_v2(model)
    return model, (2, 3, 36, 44)


def _randomize_v2(model):
    from timm.models.swin_transformer_v2 import WindowAttention as TimmWindowAttentionV2
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TimmWindowAttentionV2) and m.q_bias is not None:
                m.q_bias.normal_()
                m.v_bias.normal_()
                m.logit_scale.normal_(3.5, 1.5)


def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=2,
                             num_classes=10), (2, 3, 48, 48)


def _cait():
    return timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, depth=1,
                             depth_token_only=1, num_classes=10), (2, 3, 32, 32)


def _poolformer():
    from timm.models.metaformer import GroupNorm1, MetaFormer, Pooling
    return MetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 16, 24), token_mixers=Pooling,
                      norm_layers=GroupNorm1, num_classes=10), (2, 3, 60, 52)


MODELS = {"swin": _swin, "swinv2": _swinv2, "vit": _vit, "cait": _cait,
          "poolformer": _poolformer}
# What each model's patch must have swapped in (so the test cannot pass unpatched).
EXPECTED = {"swin": pnn.WindowAttention, "swinv2": pnn.WindowAttentionV2, "vit": pnn.Attention,
            "cait": pnn.ClassAttn, "poolformer": pnn.Pooling}
WINDOW_MODULES = (pnn.WindowAttention, pnn.WindowAttentionV2)


def _run(model, x):
    """``(out, grads)``: the gradients of the input and of every parameter."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return out, {"input": x.grad, **{n: p.grad.clone() for n, p in model.named_parameters()
                                     if p.grad is not None}}


def _assert_matches(model, patched, x, atol=2e-5, rtol=1e-4):
    _assert_same_results(_run(model, x), _run(patched, x), atol, rtol)


def _assert_same_results(expected, actual, atol, rtol):
    """``(out, grads)`` pairs; gradients get 10x the tolerances."""
    (out_ref, grads_ref), (out, grads) = expected, actual
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    assert grads.keys() == grads_ref.keys()
    for key in grads_ref:
        torch.testing.assert_close(grads[key], grads_ref[key], atol=atol * 10, rtol=rtol * 10,
                                   msg=lambda m, key=key: f"grad of {key}: {m}")


# (backend, dtype, atol, rtol): the reference backend is the same math as timm up to
# summation order; the Triton kernels run in the interpreter in float32.
CASES = [("reference", torch.float32, 2e-5, 1e-4), ("triton", torch.float32, 5e-4, 1e-3)]


def _cases(version):
    """CASES of the backends that run the Swin ``version``'s attention: both run Swin V1
    and V2 (cosine attention)."""
    return CASES


@pytest.mark.parametrize("name,backend,dtype,atol,rtol", [
    (name, *case) for name in MODELS for case in _cases(2 if name == "swinv2" else 1)])
def test_patched_model_matches_timm(name, backend, dtype, atol, rtol):
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    model.eval()
    patched = pyvit_ops.patch_timm(copy.deepcopy(model), backend=backend)
    assert any(isinstance(m, EXPECTED[name]) for m in patched.modules())
    assert patched.state_dict().keys() == model.state_dict().keys()
    _assert_matches(model, patched, torch.randn(shape, dtype=dtype), atol, rtol)


def test_patch_shares_parameters():
    model, _ = _swin()
    params = {id(p) for p in model.parameters()}
    pyvit_ops.patch_timm(model)
    assert {id(p) for p in model.parameters()} == params


def test_window_attention_module_loads_timm_state_dict():
    from timm.models.swin_transformer import WindowAttention as TimmWindowAttention
    timm_mod = TimmWindowAttention(dim=32, num_heads=2, window_size=(3, 5))
    ours = pnn.WindowAttention(dim=32, num_heads=2, window_size=(3, 5))
    missing, unexpected = ours.load_state_dict(timm_mod.state_dict(), strict=False)
    assert not missing and set(unexpected) <= {"relative_position_index"}


def _small_swin(version=1, **kwargs):
    # timm's Swin (V1 or V2) layout with tiny dims; a shifted block in each stage.
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    cls = SwinTransformer if version == 1 else SwinTransformerV2
    model = cls(**dict(dict(embed_dim=24, depths=(2, 2), num_heads=(1, 2), window_size=7,
                            num_classes=10), **kwargs))
    if version == 2:
        _randomize_v2(model)
    return model


@contextlib.contextmanager
def _window_calls(model):
    """Records ``(x.dim(), mask given)`` of every call of a patched WindowAttention:
    4-D is the fused grid path, 3-D timm's own roll / pad / partition path."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].dim(), kwargs.get("mask") is not None))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, WINDOW_MODULES)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _fused_ops():
    """Records ``(op, backend)`` of every pyvit_ops custom op that runs: the Triton and
    CUDA backends' forward and backward kernels run inside them (the reference backend
    is plain PyTorch and runs none)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "pyvit_ops":
                named = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
                calls.append((func.overloadpacket.__name__, named.get("backend")))
            return func(*args, **kwargs)

    with Recorder():
        yield calls


# timm Swin V2 at window sizes of its checkpoints, one stage of an unshifted and a shifted
# block, D = 16: (constructor arguments, input shape, window, shift).
V2_WINDOWS = {
    # 9x11 grid, 4x4 windows: padded to 12x12, shifted by 2; two heads.
    "4x4": (dict(img_size=(36, 44), window_size=4, embed_dim=32, depths=(2,), num_heads=(2,)),
            (1, 3, 36, 44), (4, 4), (2, 2)),
    # 12x12 and 24x24 windows (the tiled kernels) on grids of one window, shifted by half a
    # window with timm's always_partition: on 2 cores each further window costs the
    # interpreter about 30 s (12x12) or 3 minutes (24x24, the float32 cosine backward).
    "12x12": (dict(img_size=48, window_size=12, embed_dim=16, depths=(2,), num_heads=(1,),
                   always_partition=True), (1, 3, 48, 48), (12, 12), (6, 6)),
    "24x24": (dict(img_size=48, patch_size=2, window_size=24, embed_dim=16, depths=(2,),
                   num_heads=(1,), always_partition=True), (1, 3, 48, 48), (24, 24), (12, 12)),
}
# Runs the Triton cases of windows above 64 tokens (the tiled kernels, minutes in the
# interpreter; tests/test_window_attention.py also runs them at 24x24 on one small window).
SLOW = "PYVIT_OPS_SLOW_TESTS"
# float64 on the reference (the same math as timm); float32 on the Triton kernels
# (interpreter) and the CUDA kernels (host emulation), with CASES' float32 tolerances.
V2_WINDOW_CASES = [("reference", torch.float64, 1e-10, 1e-10),
                   *[case for case in CASES if case[0] == "triton"],
                   ("cuda", *next(case[1:] for case in CASES if case[0] == "triton"))]


@pytest.mark.parametrize("backend,dtype,atol,rtol", V2_WINDOW_CASES,
                         ids=[case[0] for case in V2_WINDOW_CASES])
@pytest.mark.parametrize("window", list(V2_WINDOWS))
def test_patched_swinv2_windows_match_timm(window, backend, dtype, atol, rtol):
    kwargs, shape, size, shift = V2_WINDOWS[window]
    unsupported = capabilities.limit_reasons("window_attention", backend, "window_area",
                                             size[0] * size[1], f"window {window}")
    if unsupported:
        pytest.skip(f"backend {backend}: {unsupported[0]}")
    if backend == "triton" and size[0] * size[1] > 64 and not os.environ.get(SLOW):
        pytest.skip(f"minutes in the interpreter on 2 cores; {SLOW}=1 runs it")
    if backend == "cuda":
        host.load()
    torch.manual_seed(0)
    model = _small_swin(2, **kwargs).to(dtype).eval()
    assert [(blk.window_size, blk.shift_size) for blk in model.layers[0].blocks] == [
        (size, (0, 0)), (size, shift)]
    patched = pyvit_ops.patch_timm(copy.deepcopy(model), backend=backend)
    with _window_calls(patched) as calls, _fused_ops() as ops:
        _assert_matches(model, patched, torch.randn(shape, dtype=dtype), atol, rtol)
    assert calls == [(4, False), (4, False)]  # both blocks on the fused grid path
    if backend == "reference":
        assert not ops
    else:  # the backend's own forward and backward kernels, no fallback
        assert sorted(ops) == [("window_attention_qkvpacked_bwd", backend)] * 2 + [
            ("window_attention_qkvpacked_fwd", backend)] * 2


# Windows larger than the feature map, where the block keeps timm's path and calls the
# swapped module on partitioned windows: (constructor arguments, input shape).
LARGE_WINDOW = {
    # Stage 1 (8x8) is fused; stage 2 (4x4 < 7x7, shifted by 3) pads to one window.
    "always_partition": (dict(img_size=32, always_partition=True), (2, 3, 32, 32)),
    # Built for 14x14 / 7x7 grids, run on 6x10 / 3x5 ones: timm's dynamic masks.
    "small_input": (dict(img_size=56, strict_img_size=False), (2, 3, 24, 40)),
}


@pytest.mark.parametrize("version,backend,dtype,atol,rtol", [
    (version, *case) for version in (1, 2) for case in _cases(version)])
@pytest.mark.parametrize("config", list(LARGE_WINDOW))
def test_patched_swin_window_larger_than_map(config, version, backend, dtype, atol, rtol):
    torch.manual_seed(0)
    kwargs, shape = LARGE_WINDOW[config]
    model = _small_swin(version, **kwargs).eval()
    patched = pyvit_ops.patch_timm(copy.deepcopy(model), backend=backend)
    x = torch.randn(shape, dtype=dtype)
    with _window_calls(patched) as calls:
        _assert_matches(model, patched, x, atol, rtol)
    # timm's path ran, with a shift mask and without.
    assert {(3, True), (3, False)} <= set(calls)


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"torch.save": _torch_save_load, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
               "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_round_trip(name, how):
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    model.eval()
    patched = pyvit_ops.patch_timm(copy.deepcopy(model), backend="reference")
    restored = ROUND_TRIPS[how](patched)
    # The copy must not lean on the original (e.g. a Swin block calling the original's
    # attention): zeroing the original's parameters must not change it.
    with torch.no_grad():
        for p in patched.parameters():
            p.zero_()
    assert any(isinstance(m, EXPECTED[name]) for m in restored.modules())
    assert restored.state_dict().keys() == model.state_dict().keys()
    with _window_calls(restored) as calls:
        _assert_matches(model, restored, torch.randn(shape))
    if name in ("swin", "swinv2"):
        assert calls and all(call == (4, False) for call in calls)  # still fused


# timm's set_input_size: the same windows scaled with the grid, an explicit window (the
# relative position tables are interpolated), always_partition (window > 4x4 stage 2).
SET_INPUT_SIZE = [dict(img_size=(48, 40)), dict(img_size=(48, 40), window_size=5),
                  dict(window_size=(3, 5), always_partition=True)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("kwargs", SET_INPUT_SIZE, ids=str)
def test_patched_swin_set_input_size(kwargs, version):
    torch.manual_seed(0)
    model = _small_swin(version, img_size=32).eval()
    patched = pyvit_ops.patch_timm(copy.deepcopy(model), backend="reference")
    model.set_input_size(**kwargs)
    patched.set_input_size(**kwargs)
    assert patched.state_dict().keys() == model.state_dict().keys()
    with _window_calls(patched) as calls:
        _assert_matches(model, patched, torch.randn(2, 3, *model.patch_embed.img_size))
    assert (4, False) in calls


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_loads_both_ways(name):
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    patched = pyvit_ops.patch_timm(MODELS[name]()[0], backend="reference")
    other = MODELS[name]()[0]  # differently initialised
    patched.load_state_dict(model.state_dict())
    other.load_state_dict(patched.state_dict())
    x = torch.randn(shape)
    for m in (model, patched, other):
        m.eval()
    _assert_matches(model, patched, x)
    _assert_matches(model, other, x)


@pytest.mark.parametrize("backend,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_window_attention_module_on_windows_matches_timm(with_mask, backend, dtype, atol, rtol):
    from timm.models.swin_transformer import WindowAttention as TimmWindowAttention
    torch.manual_seed(0)
    timm_mod = TimmWindowAttention(dim=16, num_heads=2, window_size=(3, 2))
    ours = pnn.WindowAttention.from_timm(copy.deepcopy(timm_mod), backend=backend)
    x = torch.randn(8, 6, 16, dtype=dtype)  # 2 images of 4 windows
    mask = torch.randn(4, 6, 6) * 3 if with_mask else None
    _assert_same_results(*(_windows_call(m, x, mask) for m in (timm_mod, ours)), atol, rtol)


def _windows_call(module, x, mask):
    """``(out, grads)`` of ``module`` on partitioned windows ``x`` with timm's ``mask``,
    the input's gradient included."""
    xg = x.clone().requires_grad_()
    out = module(xg, mask=mask)
    out.square().sum().backward()
    return out, {"x": xg.grad, **{n: p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("make", [lambda: pnn.WindowAttention(8, 2, window_size=2),
                                  lambda: pnn.WindowAttentionV2(8, 2, num_heads=2)],
                         ids=["v1", "v2"])
def test_window_attention_module_call_errors(make):
    module = make()
    windows = torch.randn(4, 4, 8)
    cases = [
        (lambda: module(torch.randn(4, 5, 8)), "x: expected N = 4 tokens per 2x2 window"),
        (lambda: module(windows, mask=torch.zeros(3, 4, 4)), "mask: expected shape"),
        (lambda: module(windows, mask=torch.zeros(2, 4, 5)), "mask: expected shape"),
        (lambda: module(windows, window_size=2), "window_size, shift_size: expected None"),
        (lambda: module(torch.randn(1, 4, 4, 8), torch.zeros(1, 4, 4)), "mask: expected None"),
    ]
    for call, text in cases:
        with pytest.raises(ValueError, match=re.escape(text)):
            call()


# ------------------------------------------------------------------ bad arguments

# One row per bad argument of a module or of patch_timm: the error type and the
# argument's name in the message.
BAD_MODULE_CALLS = [
    bad_module_call("Attention-num_heads", lambda: pnn.Attention(10, num_heads=3),
                    ValueError, "num_heads: must divide"),
    bad_module_call("Attention-x-C", module_forward(lambda: pnn.Attention(8, 2), (2, 5, 6)),
                    ValueError, "x: expected shape (B, N, C) with C = 8"),
    bad_module_call("Attention-x-rank", module_forward(lambda: pnn.Attention(8, 2), (5, 8)),
                    ValueError, "x: expected a 3-D"),
    bad_module_call("Attention-x-dtype",
                    module_forward(lambda: pnn.Attention(8, 2), (2, 5, 8), torch.int64),
                    TypeError, "x: expected dtype"),
    bad_module_call("Attention-mask-causal",
                    lambda: pnn.Attention(8, 2)(randn(2, 5, 8),
                                                attn_mask=torch.ones(5, 5, dtype=torch.bool),
                                                is_causal=True),
                    ValueError, "attn_mask: must be None"),
    bad_module_call("Attention-mask-shape",
                    lambda: pnn.Attention(8, 2)(randn(2, 5, 8), attn_mask=randn(4, 4)),
                    ValueError, "attn_bias: expected a shape broadcastable"),
    bad_module_call("Attention-from_timm-Linear",
                    lambda: pnn.Attention.from_timm(torch.nn.Linear(4, 4)),
                    TypeError, "module: expected a timm Attention"),
    bad_module_call("Attention-from_timm-tensor", lambda: pnn.Attention.from_timm(randn(3)),
                    TypeError, "module: expected a timm Attention"),
    bad_module_call("ClassAttn-num_heads", lambda: pnn.ClassAttn(10, num_heads=4),
                    ValueError, "num_heads: must divide"),
    bad_module_call("ClassAttn-x-C", module_forward(lambda: pnn.ClassAttn(8, 2), (2, 5, 4)),
                    ValueError, "x: expected shape (B, N, C) with C = 8"),
    bad_module_call("ClassAttn-from_timm-Linear",
                    lambda: pnn.ClassAttn.from_timm(torch.nn.Linear(4, 4)),
                    TypeError, "module: expected a timm ClassAttn"),
    bad_module_call("WindowAttention-num_heads", lambda: pnn.WindowAttention(10, 3),
                    ValueError, "num_heads: must divide"),
    bad_module_call("WindowAttention-attn_drop", lambda: pnn.WindowAttention(8, 2, attn_drop=0.1),
                    ValueError, "attn_drop: window attention has no dropout"),
    bad_module_call("WindowAttention-window_size",
                    lambda: pnn.WindowAttention(8, 2, window_size=(2, 2, 2)),
                    TypeError, "window_size: expected an int or a pair"),
    bad_module_call("WindowAttention-x-C",
                    module_forward(lambda: pnn.WindowAttention(8, 2, window_size=2), (1, 4, 4, 6)),
                    ValueError, "x: expected shape (B, H, W, C) with C = 8"),
    bad_module_call("WindowAttention-x-rank",
                    module_forward(lambda: pnn.WindowAttention(8, 2, window_size=2),
                                   (1, 4, 4, 1, 8)),
                    ValueError, "x: expected a 4-D"),
    bad_module_call("WindowAttention-grid-smaller-than-window",
                    module_forward(lambda: pnn.WindowAttention(8, 2, window_size=4), (1, 3, 5, 8)),
                    ValueError, "window_size: expected at most the grid"),
    bad_module_call("WindowAttention-shift",
                    lambda: pnn.WindowAttention(8, 2, window_size=2)(randn(1, 4, 4, 8),
                                                                     shift_size=2),
                    ValueError, "shift_size: expected 0 <= shift"),
    bad_module_call("WindowAttention-window-vs-table",
                    lambda: pnn.WindowAttention(8, 2, window_size=2)(randn(1, 4, 4, 8),
                                                                     window_size=3),
                    ValueError, "rel_pos_bias_table: expected shape (25, 2)"),
    bad_module_call("WindowAttention-from_timm-Linear",
                    lambda: pnn.WindowAttention.from_timm(torch.nn.Linear(4, 4)),
                    TypeError, "module: expected a timm WindowAttention"),
    bad_module_call("patch_timm-not-a-module",
                    lambda: pyvit_ops.patch_timm([torch.nn.Linear(2, 2)]),
                    TypeError, "model: expected a torch.nn.Module"),
    bad_module_call("patch_timm-nothing-to-patch",
                    lambda: pyvit_ops.patch_timm(torch.nn.Sequential(torch.nn.Linear(2, 2))),
                    ValueError, "model: no timm module to patch in Sequential"),
    bad_module_call("patch_timm-backend",
                    lambda: pyvit_ops.patch_timm(pnn.Pooling(3), backend="gpu"),
                    ValueError, "backend: expected one of"),
]


@pytest.mark.parametrize("call, error, text", BAD_MODULE_CALLS)
def test_bad_module_argument(call, error, text):
    assert_rejects(call, error, text)


def test_from_timm_rejects_unsupported_timm_modules():
    from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

    gated = timm.layers.Attention(8, num_heads=2)
    gated.gate = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="module: gated timm Attention"):
        pnn.Attention.from_timm(gated)
    with pytest.raises(ValueError, match="module: attn_drop=0.1"):
        pnn.WindowAttention.from_timm(TimmWindowAttention(8, 2, window_size=2, attn_drop=0.1))
    # A timm module of another family: the attributes from_timm needs are not there.
    with pytest.raises(TypeError, match="module: expected a timm WindowAttention"):
        pnn.WindowAttention.from_timm(timm.layers.Attention(8, num_heads=2))


V2_MODULE_CONFIGS = [dict(), dict(qkv_bias=False), dict(qkv_bias_separate=True),
                     dict(pretrained_window_size=(2, 3))]


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("config", V2_MODULE_CONFIGS, ids=str)
def test_window_attention_v2_module_on_windows_matches_timm(config, with_mask):
    from timm.models.swin_transformer_v2 import WindowAttention as TimmWindowAttentionV2
    torch.manual_seed(0)
    timm_mod = TimmWindowAttentionV2(dim=16, window_size=(3, 2), num_heads=2, **config).double()
    with torch.no_grad():
        # One head above the clamp at log(100): its logit scale gets no gradient.
        timm_mod.logit_scale.copy_(torch.tensor([1.0, 5.0]).view(2, 1, 1))
    ours = pnn.WindowAttentionV2.from_timm(copy.deepcopy(timm_mod), backend="reference")
    x = torch.randn(8, 6, 16, dtype=torch.float64)  # 2 images of 4 windows
    mask = torch.randn(4, 6, 6, dtype=torch.float64) * 3 if with_mask else None
    results = [_windows_call(m, x, mask) for m in (timm_mod, ours)]
    _assert_same_results(*results, 1e-10, 1e-10)
    assert results[1][1]["logit_scale"][1].item() == 0.0


@pytest.mark.parametrize("config", V2_MODULE_CONFIGS, ids=str)
def test_window_attention_v2_module_grid_matches_timm_block(config):
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block
    torch.manual_seed(0)
    config = dict(config)
    separate = config.pop("qkv_bias_separate", False)  # an attention argument only
    block = SwinTransformerV2Block(dim=16, input_resolution=(7, 9), num_heads=2, window_size=(3, 4),
                                   shift_size=(1, 2), **config).double().eval()
    block.attn.qkv_bias_separate = separate
    if config.get("qkv_bias", True):
        _randomize_v2(block)
    patched = pyvit_ops.patch_timm(copy.deepcopy(block), backend="reference")
    assert isinstance(patched.attn, pnn.WindowAttentionV2)
    assert patched.attn.qkv_bias_separate == separate
    x = torch.randn(2, 7, 9, 16, dtype=torch.float64)
    with _window_calls(patched) as calls:
        _assert_matches(block, patched, x, 1e-10, 1e-10)
    assert calls and all(call == (4, False) for call in calls)


def test_window_attention_v2_module_loads_timm_state_dict():
    from timm.models.swin_transformer_v2 import WindowAttention as TimmWindowAttentionV2
    timm_mod = TimmWindowAttentionV2(dim=32, window_size=(3, 5), num_heads=2,
                                     pretrained_window_size=(2, 2))
    ours = pnn.WindowAttentionV2(dim=32, window_size=(3, 5), num_heads=2,
                                 pretrained_window_size=(2, 2))
    assert ours.state_dict().keys() == timm_mod.state_dict().keys()
    ours.load_state_dict(timm_mod.state_dict())
    torch.testing.assert_close(ours.relative_coords_table, timm_mod.relative_coords_table,
                               atol=0, rtol=0)
    timm_mod.set_window_size((4, 4))
    ours.set_window_size((4, 4))
    torch.testing.assert_close(ours.relative_coords_table, timm_mod.relative_coords_table,
                               atol=0, rtol=0)


def test_window_attention_v2_module_constructor_errors():
    for kwargs, text in ((dict(attn_drop=0.1), "attn_drop"), (dict(num_heads=3), "num_heads: must divide")):
        with pytest.raises(ValueError, match=re.escape(text)):
            pnn.WindowAttentionV2(8, 2, **{"num_heads": 2, **kwargs})
