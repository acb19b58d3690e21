"""pyvit_ops.patch_timm and the pyvit_ops.nn modules against the timm models they
replace: outputs and gradients of small timm Swin / ViT / CaiT / PoolFormer models,
patched vs unpatched, on the reference backend (CPU) and the Triton kernels
(interpreter)."""
import contextlib
import copy
import io
import pickle
import re

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is the parity target of patch_timm")

import pyvit_ops  # noqa: E402
from pyvit_ops import nn as pnn  # noqa: E402


def _swin():
    # 9x11 token grid with 7x7 windows: padding on both axes, and a shifted block.
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(36, 44),
                             embed_dim=32, depths=(2,), num_heads=(2,), num_classes=10), (2, 3, 36, 44)


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


MODELS = {"swin": _swin, "vit": _vit, "cait": _cait, "poolformer": _poolformer}
# What each model's patch must have swapped in (so the test cannot pass unpatched).
EXPECTED = {"swin": pnn.WindowAttention, "vit": pnn.Attention, "cait": pnn.ClassAttn,
            "poolformer": pnn.Pooling}


def _run(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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


@pytest.mark.parametrize("backend,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("name", list(MODELS))
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


def _small_swin(**kwargs):
    # timm's Swin layout with tiny dims; a shifted block in each stage.
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(embed_dim=24, depths=(2, 2), num_heads=(1, 2), window_size=7,
                           num_classes=10, **kwargs)


@contextlib.contextmanager
def _window_calls(model):
    """Records ``(x.dim(), mask given)`` of every call of a patched WindowAttention:
    4-D is the fused grid path, 3-D timm's own roll / pad / partition path."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].dim(), kwargs.get("mask") is not None))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, pnn.WindowAttention)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# Windows larger than the feature map, where the block keeps timm's path and calls the
# swapped module on partitioned windows: (constructor arguments, input shape).
LARGE_WINDOW = {
    # Stage 1 (8x8) is fused; stage 2 (4x4 < 7x7, shifted by 3) pads to one window.
    "always_partition": (dict(img_size=32, always_partition=True), (2, 3, 32, 32)),
    # Built for 14x14 / 7x7 grids, run on 6x10 / 3x5 ones: timm's dynamic masks.
    "small_input": (dict(img_size=56, strict_img_size=False), (2, 3, 24, 40)),
}


@pytest.mark.parametrize("backend,dtype,atol,rtol", CASES)
@pytest.mark.parametrize("config", list(LARGE_WINDOW))
def test_patched_swin_window_larger_than_map(config, backend, dtype, atol, rtol):
    torch.manual_seed(0)
    kwargs, shape = LARGE_WINDOW[config]
    model = _small_swin(**kwargs).eval()
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
    if name == "swin":
        assert calls and all(call == (4, False) for call in calls)  # still fused


# timm's set_input_size: the same windows scaled with the grid, an explicit window (the
# relative position tables are interpolated), always_partition (window > 4x4 stage 2).
SET_INPUT_SIZE = [dict(img_size=(48, 40)), dict(img_size=(48, 40), window_size=5),
                  dict(window_size=(3, 5), always_partition=True)]


@pytest.mark.parametrize("kwargs", SET_INPUT_SIZE, ids=str)
def test_patched_swin_set_input_size(kwargs):
    torch.manual_seed(0)
    model = _small_swin(img_size=32).eval()
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
    results = []
    for module in (timm_mod, ours):
        xg = x.clone().requires_grad_()
        out = module(xg, mask=mask)
        out.square().sum().backward()
        results.append((out, {"x": xg.grad, **{n: p.grad for n, p in module.named_parameters()}}))
    _assert_same_results(*results, atol, rtol)


def test_window_attention_module_call_errors():
    module = pnn.WindowAttention(8, 2, window_size=2)
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
