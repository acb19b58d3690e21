"""pyvit_ops.patch_timm and the pyvit_ops.nn modules against the timm models they
replace: outputs and gradients of small timm Swin / ViT / CaiT / PoolFormer models,
patched vs unpatched, on the reference backend (CPU) and the Triton kernels
(interpreter)."""
import copy

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
    x = torch.randn(shape, dtype=dtype)
    out_ref, grads_ref = _run(model, x)
    out, grads = _run(patched, x)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    assert grads.keys() == grads_ref.keys()
    for key in grads_ref:
        torch.testing.assert_close(grads[key], grads_ref[key], atol=atol * 10, rtol=rtol * 10,
                                   msg=lambda m, key=key: f"grad of {key}: {m}")


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
