"""pyvit_ops.patch_timm on the PVT v2, Twins, EVA02, MaxViT, BEiT and CaiT families: small timm
models patched against unpatched (outputs, input and parameter gradients) on the
reference backend in float64, the Triton kernels (interpreter) and the CUDA kernels
(host emulation) in float32; every attention module of the family swapped, state_dict
keys unchanged, a pickle round trip; the module variants each family's constructors
reach; docs/coverage.md against its generator."""
import copy
import pathlib
import pickle

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is the parity target of patch_timm")

import pyvit_ops  # noqa: E402
from pyvit_ops import nn as pnn  # noqa: E402
from pyvit_ops.testing import coverage  # noqa: E402
from op_cases import use_backend  # noqa: E402
from test_patch_timm import _assert_same_results  # noqa: E402

# (backend, dtype, atol, rtol): float64 on the reference is timm's math up to summation
# order; the kernels run float32, with test_patch_timm's whole-model tolerances.
CASES = [("reference", torch.float64, 1e-10, 1e-10), ("triton", torch.float32, 5e-4, 1e-3),
         ("cuda", torch.float32, 5e-4, 1e-3)]


def _pvt_v2(linear):
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    # An 8x8 map: sr_ratio 2 (Nk = 16 < Nq = 64); the linear variant pools it to 7x7.
    return PyramidVisionTransformerV2(depths=(1,), embed_dims=(8,), num_heads=(1,),
                                      sr_ratios=(2,), mlp_ratios=(2,), linear=linear,
                                      num_classes=10), (2, 3, 32, 32)


def _twins(wss, depths, shape):
    from timm.models.twins import Twins

    stages = len(depths)
    return Twins(img_size=64, depths=depths, embed_dims=(8, 16)[:stages],
                 num_heads=(1, 2)[:stages], mlp_ratios=(2, 2)[:stages],
                 sr_ratios=(2, 1)[:stages], wss=wss, num_classes=10), shape


def _eva02():
    # EVA02's rope over a 3x3 grid behind the class token, SwiGLU, scale-norm.
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=42,
                             embed_dim=16, depth=1, num_heads=2, ref_feat_shape=(3, 3),
                             num_classes=10), (2, 3, 42, 42)


def _maxvit():
    # maxvit_rmlp (MLP position bias) with 4x2 block and grid windows on a 4x4 map.
    return timm.create_model("maxvit_rmlp_pico_rw_256", pretrained=False, img_size=16,
                             embed_dim=(16,), depths=(1,), stem_width=(8, 8),
                             transformer_dim_head=8, transformer_rel_pos_dim=16,
                             transformer_window_size=(4, 2), num_classes=10), (2, 3, 16, 16)


def _beit(depth=1, **pos):
    from timm.models.beit import Beit

    # A 3x5 patch grid behind the class token (16 tokens, table rows 5 * 9 + 3).
    return Beit(img_size=(24, 40), patch_size=8, embed_dim=32, depth=depth, num_heads=2,
                init_values=0.1, num_classes=10, **pos), (2, 3, 24, 40)


def _cait():
    # A talking-heads block (25 tokens: two query / key tiles, 4 heads) and a class
    # attention block.
    return timm.create_model("cait_xxs24_224", pretrained=False, img_size=80, embed_dim=32,
                             depth=1, depth_token_only=1, num_heads=4,
                             num_classes=10), (2, 3, 80, 80)


# name: (maker, coverage family whose attention classes must all be swapped). One stage
# each, except the float64-only ones (the interpreter and the host emulation are slow).
MODELS = {
    "pvt_v2": (lambda: _pvt_v2(False), "PVT v2"),
    # twins_svt's 7x7 windows on a 6x9 map: padded to 7 rows in PyTorch (shorter than the
    # window), to 14 columns by the operator.
    "twins_svt": (lambda: _twins((7,), (2,), (2, 3, 24, 36)), "Twins-SVT"),
    "eva02": (_eva02, "EVA02"),
    "maxvit": (_maxvit, "MaxViT"),
    # The block's table gathered in the kernels.
    "beit": (lambda: _beit(use_abs_pos_emb=False, use_rel_pos_bias=True), "BEiT"),
    # One model-level table shared by two blocks: its dense bias as attn_bias.
    "beit_shared": (lambda: _beit(2, use_abs_pos_emb=False, use_shared_rel_pos_bias=True),
                    "BEiT"),
    "cait": (_cait, "CaiT"),
}
# Models holding an operator without CUDA kernels (talking_heads_attention): a forced
# "cuda" backend raises BackendUnavailableError there.
NO_CUDA = {"cait"}
FLOAT64_MODELS = {
    "pvt_v2_linear": (lambda: _pvt_v2(True), "PVT v2"),
    # sr_ratio 2 on an 8x8 map, then 1 (GlobalSubSampleAttn without reduction).
    "twins_pcpvt": (lambda: _twins(None, (1, 1), (2, 3, 32, 32)), "Twins-PCPVT"),
    # Absolute positions, no table: plain attention.
    "beit_abs_pos": (lambda: _beit(use_abs_pos_emb=True), "BEiT"),
    # A block table and the shared one: their sum as attn_bias.
    "beit_both": (lambda: _beit(use_rel_pos_bias=True, use_shared_rel_pos_bias=True), "BEiT"),
}
ALL_MODELS = {**MODELS, **FLOAT64_MODELS}
MIXERS = {family.name: family.mixers for family in coverage.FAMILIES}


def _randomized(model):
    """``model`` with random biases and position tables (timm zero-initialises some,
    which would hide a wrong padding key / value or a transposed table)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "relative_position_bias_table")):
                p.normal_(0, 0.5)
    return model


def _run(module, x, **kwargs):
    """``(out, grads)``: ``module(x, **kwargs)`` and the gradients of x and the
    parameters."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = module(x, **kwargs)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out, {"input": x.grad, **grads}


def _unswapped(model, family):
    """The family's timm attention modules left in ``model``, by name."""
    return coverage.mixer_names(model, MIXERS[family])


@pytest.mark.parametrize("name,backend,dtype,atol,rtol", [
    pytest.param(name, *case, id=f"{name}-{case[0]}") for name in ALL_MODELS
    for case in (CASES[:1] if name in FLOAT64_MODELS else CASES)
    if not (name in NO_CUDA and case[0] == "cuda")])
def test_patched_family_matches_timm(name, backend, dtype, atol, rtol):
    use_backend(backend)
    torch.manual_seed(0)
    make, family = ALL_MODELS[name]
    model, shape = make()
    model = _randomized(model).to(dtype).eval()
    patched = pyvit_ops.patch_timm(copy.deepcopy(model), backend=backend)
    left = _unswapped(patched, family)
    assert not left, f"not swapped: {left}"
    assert patched.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(shape, dtype=dtype)
    _assert_same_results(_run(model, x), _run(patched, x), atol, rtol)


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_family_pickles(name):
    torch.manual_seed(0)
    model, shape = MODELS[name][0]()
    model = _randomized(model).double().eval()
    restored = pickle.loads(pickle.dumps(pyvit_ops.patch_timm(copy.deepcopy(model),
                                                              backend="reference")))
    assert any(isinstance(m, pyvit_ops.patch.PATCHED) for m in restored.modules())
    x = torch.randn(shape, dtype=torch.float64)
    _assert_same_results(_run(model, x), _run(restored, x), 1e-10, 1e-10)


# ------------------------------------------------------------ module variants (float64)

# timm EvaAttention options beyond EVA02's defaults: projections, biases, norms, gate,
# several prefix tokens and rotate-half rope.
EVA_CONFIGS = [dict(qkv_fused=False), dict(qkv_bias=False), dict(qkv_bias_separate=True),
               dict(qk_norm=True, scale_norm=False), dict(gated=True, num_prefix_tokens=2),
               dict(rotate_half=True)]


@pytest.mark.parametrize("with_rope", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("config", EVA_CONFIGS, ids=str)
def test_eva_attention_variants_match_timm(config, with_rope):
    from timm.layers import LayerNorm
    from timm.models.eva import EvaAttention as TimmEvaAttention

    torch.manual_seed(0)
    timm_mod = _randomized(TimmEvaAttention(16, num_heads=2, norm_layer=LayerNorm,
                                            **config)).double()
    ours = pnn.EvaAttention.from_timm(copy.deepcopy(timm_mod), backend="reference")
    npt = config.get("num_prefix_tokens", 1)
    x = torch.randn(2, npt + 6, 16, dtype=torch.float64)
    # Any (N - prefix, 2 D) sin / cos table: timm's rotation does not check it.
    rope = torch.randn(6, 16, dtype=torch.float64) if with_rope else None
    _assert_same_results(*(_run(m, x, rope=rope) for m in (timm_mod, ours)),
                         1e-10, 1e-10)


def test_eva_attention_masks_match_timm():
    from timm.models.eva import EvaAttention as TimmEvaAttention

    torch.manual_seed(0)
    timm_mod = _randomized(TimmEvaAttention(16, num_heads=2, scale_norm=False)).double()
    ours = pnn.EvaAttention.from_timm(copy.deepcopy(timm_mod), backend="reference")
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    keep = torch.rand(5, 5) > 0.3
    keep[:, 0] = True  # every query attends somewhere
    for kwargs in (dict(attn_mask=keep), dict(is_causal=True),
                   dict(attn_mask=torch.randn(2, 1, 5, 5, dtype=torch.float64))):
        _assert_same_results(*(_run(m, x, **kwargs) for m in (timm_mod, ours)),
                             1e-10, 1e-10)


# (partition, rel_pos_type, head_first): each of timm's position modules, both qkv channel
# orders, block and grid partitions.
MAXVIT_BLOCKS = [("block", "bias", True), ("block", "bias", False), ("block", "bias_tf", False),
                 ("block", "mlp", True), ("block", "", True), ("grid", "bias", False),
                 ("grid", "mlp", True)]


@pytest.mark.parametrize("partition,rel_pos_type,head_first", MAXVIT_BLOCKS, ids=str)
def test_maxvit_partition_attention_matches_timm(partition, rel_pos_type, head_first):
    from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

    torch.manual_seed(0)
    cfg = MaxxVitTransformerCfg(dim_head=8, window_size=(2, 3), grid_size=(2, 3),
                                rel_pos_type=rel_pos_type, head_first=head_first,
                                rel_pos_dim=16)
    block = _randomized(PartitionAttentionCl(16, partition, cfg)).double().eval()
    patched = pyvit_ops.patch_timm(copy.deepcopy(block), backend="reference")
    assert isinstance(patched.attn, pnn.PartitionAttention)
    x = torch.randn(2, 4, 6, 16, dtype=torch.float64)
    _assert_same_results(_run(block, x), _run(patched, x), 1e-10, 1e-10)
    patched.set_partition_size((4, 3))  # timm's resize of the position module
    block.set_partition_size((4, 3))
    _assert_same_results(_run(block, x), _run(patched, x), 1e-10, 1e-10)


def test_beit_attention_set_input_size_matches_timm():
    """timm's resize of the patch grid (``set_input_size``: ``set_window_size`` of every
    block's table) on the patched model, whose kernels then gather the new grid."""
    torch.manual_seed(0)
    model, _ = _beit(use_abs_pos_emb=False, use_rel_pos_bias=True)
    model = _randomized(model).double().eval()
    patched = pyvit_ops.patch_timm(copy.deepcopy(model), backend="reference")
    for m in (model, patched):
        m.set_input_size(img_size=(32, 16))
    assert patched.blocks[0].attn.relative_position_bias_table.shape == (7 * 3 + 3, 2)
    x = torch.randn(2, 3, 32, 16, dtype=torch.float64)
    _assert_same_results(_run(model, x), _run(patched, x), 1e-10, 1e-10)


def test_twins_locally_grouped_attention_rejects_dropout():
    from timm.models.twins import LocallyGroupedAttn

    with pytest.raises(ValueError, match="module: attn_drop=0.1"):
        pnn.LocallyGroupedAttention.from_timm(LocallyGroupedAttn(8, 2, attn_drop=0.1, ws=2))


def test_maxvit_block_attention_rejects_undivided_map():
    from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

    block = PartitionAttentionCl(16, "block", MaxxVitTransformerCfg(dim_head=8, window_size=3))
    patched = pyvit_ops.patch_timm(block, backend="reference")
    with pytest.raises(ValueError, match=r"x: expected H, W multiples of the window \(3, 3\)"):
        patched(torch.randn(1, 4, 6, 16))


# ----------------------------------------------------------------------- coverage doc

COVERAGE_DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "coverage.md"


def _without_parity(text):
    """The lines of the coverage doc, table rows without their last (parity) cell."""
    return [line.rsplit("|", 2)[0] if line.startswith("| ") else line
            for line in text.splitlines()]


def test_coverage_doc_is_the_generated_table():
    # The parity cells need two forward passes of every model: the family tests check
    # parity; this checks the counts (models built and patched, not run).
    assert _without_parity(COVERAGE_DOC.read_text()) == \
        _without_parity(coverage.markdown(parity=False)), (
            "docs/coverage.md is out of date: regenerate it with "
            "`python -m pyvit_ops.testing.coverage > docs/coverage.md`")
