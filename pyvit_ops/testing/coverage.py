"""How much of each timm family ``pyvit_ops.patch_timm`` covers: ``python -m
pyvit_ops.testing.coverage`` prints docs/coverage.md (tests/test_patch_timm_families.py
checks the committed file against it).

Per family, a representative model: the family's smallest timm configuration, built by
timm's own constructors without downloading anything, with its stage depths, block
types, window sizes and reduction ratios kept (so it holds as many attention / token
mixer modules of each kind as the real model) and its widths cut to 8 channels per head
and 1-4 heads, on a small image. Counted: the modules of the family's attention / token
mixer classes (``Family.mixers``) and how many of them ``patch_timm`` replaces with a
``pyvit_ops.nn`` module; parity: the largest output difference, patched against
unpatched, in float64 on the reference backend.
"""
import argparse
import collections
import copy
import importlib
import math

import torch

Family = collections.namedtuple("Family", "name model make shape mixers")
Family.__doc__ = """One timm family: ``name``; ``model``, the timm configuration its
representative follows; ``make()``, the representative model; ``shape``, its input;
``mixers``, its attention / token-mixer classes as "module.Class" under timm."""


def _timm_class(path):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"timm.{module}"), name)


def _create(name, **kwargs):
    def make():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return make


def _vit_like(name, model, mixer):
    """The ``Family`` of a plain ViT-shaped model: 16 channels in 2 heads, 48-pixel images."""
    return Family(name, model, _create(model, img_size=48, embed_dim=16, num_heads=2),
                  (2, 3, 48, 48), (mixer,))


def _poolformer():
    from timm.models.metaformer import GroupNorm1, MetaFormer, Pooling

    # poolformer_s12's layout (its constructor takes no dims override).
    return MetaFormer(depths=(2, 2, 6, 2), dims=(8, 16, 16, 24), token_mixers=Pooling,
                      norm_layers=GroupNorm1, num_classes=10)


def _mvitv2():
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 2, 5, 2), embed_dim=8, num_heads=1)  # mvitv2_tiny
    return MultiScaleVit(cfg, img_size=64, num_classes=10)


def _botnet():
    import dataclasses

    from timm.models.byoanet import model_cfgs
    from timm.models.byobnet import ByobNet

    def narrow(block):  # a stage, or a tuple of interleaved ones
        if isinstance(block, tuple):
            return tuple(narrow(b) for b in block)
        return dataclasses.replace(block, c=block.c // 32)

    cfg = model_cfgs["botnet26t"]
    blocks = tuple(narrow(b) for b in cfg.blocks)
    cfg = dataclasses.replace(cfg, blocks=blocks, stem_chs=8,
                              self_attn_kwargs=dict(dim_head=8))
    return ByobNet(cfg, img_size=64, num_classes=10)


FAMILIES = [
    Family("Swin V1", "swin_tiny_patch4_window7_224",
           _create("swin_tiny_patch4_window7_224", img_size=(36, 44), embed_dim=8,
                   num_heads=(1, 2, 2, 4)), (2, 3, 36, 44),
           ("models.swin_transformer.WindowAttention",)),
    Family("Swin V2", "swinv2_tiny_window8_256",
           _create("swinv2_tiny_window8_256", img_size=(36, 44), embed_dim=8,
                   num_heads=(1, 2, 2, 4)), (2, 3, 36, 44),
           ("models.swin_transformer_v2.WindowAttention",)),
    _vit_like("ViT", "vit_tiny_patch16_224", "layers.Attention"),
    _vit_like("DeiT", "deit_tiny_patch16_224", "layers.Attention"),
    _vit_like("DeiT III", "deit3_small_patch16_224", "layers.Attention"),
    Family("CaiT", "cait_xxs24_224",
           _create("cait_xxs24_224", img_size=32, embed_dim=16, num_heads=2), (2, 3, 32, 32),
           ("models.cait.TalkingHeadAttn", "models.cait.ClassAttn")),
    Family("PoolFormer", "poolformer_s12", _poolformer, (2, 3, 64, 64),
           ("models.metaformer.Pooling",)),
    Family("PVT v2", "pvt_v2_b0",
           _create("pvt_v2_b0", embed_dims=(8, 16, 16, 32), num_heads=(1, 2, 2, 4)),
           (2, 3, 64, 64), ("models.pvt_v2.Attention",)),
    Family("Twins-PCPVT", "twins_pcpvt_small",
           _create("twins_pcpvt_small", img_size=64, embed_dims=(8, 16, 16, 32),
                   num_heads=(1, 2, 2, 4)), (2, 3, 64, 64),
           ("models.twins.GlobalSubSampleAttn",)),
    Family("Twins-SVT", "twins_svt_small",
           _create("twins_svt_small", img_size=96, embed_dims=(8, 16, 16, 32),
                   num_heads=(1, 2, 2, 4)), (2, 3, 96, 96),
           ("models.twins.LocallyGroupedAttn", "models.twins.GlobalSubSampleAttn")),
    Family("EVA02", "eva02_tiny_patch14_224",
           _create("eva02_tiny_patch14_224", img_size=42, embed_dim=16, num_heads=2,
                   ref_feat_shape=(3, 3)), (2, 3, 42, 42), ("models.eva.EvaAttention",)),
    _vit_like("BEiT", "beit_base_patch16_224", "models.beit.Attention"),
    _vit_like("BEiT v2", "beitv2_base_patch16_224", "models.beit.Attention"),
    Family("MaxViT", "maxvit_rmlp_pico_rw_256",
           _create("maxvit_rmlp_pico_rw_256", img_size=64, embed_dim=(8, 16, 16, 32),
                   stem_width=(8, 8), transformer_dim_head=8, transformer_rel_pos_dim=16),
           (2, 3, 64, 64), ("models.maxxvit.AttentionCl",)),
    Family("SAM ViT", "samvit_base_patch16",
           _create("samvit_base_patch16", img_size=64, embed_dim=16, num_heads=2,
                   window_size=2, neck_chans=8), (2, 3, 64, 64),
           ("models.vision_transformer_sam.Attention",)),
    Family("MViTv2", "mvitv2_tiny", _mvitv2, (2, 3, 64, 64),
           ("models.mvitv2.MultiScaleAttention", "models.mvitv2.MultiScaleAttentionPoolFirst")),
    Family("BoTNet", "botnet26t_256", _botnet, (2, 3, 64, 64),
           ("layers.bottleneck_attn.BottleneckAttn",)),
]


def mixer_names(model, mixers):
    """Names of the modules of ``model`` whose class is one of ``mixers`` ("module.Class"
    under timm)."""
    classes = tuple(_timm_class(path) for path in mixers)
    return [name for name, m in model.named_modules() if type(m) in classes]


def family_row(family, parity=True):
    """``(mixer modules, swapped, largest output difference)`` of ``family``'s
    representative model; the difference is None when ``patch_timm`` finds nothing to
    swap or ``parity`` is False (no forward passes)."""
    from pyvit_ops.patch import PATCHED, patch_timm

    torch.manual_seed(0)
    model = family.make().double().eval()
    names = mixer_names(model, family.mixers)
    try:
        patched = patch_timm(copy.deepcopy(model), backend="reference")
    except ValueError:
        return len(names), 0, None
    swapped = sum(isinstance(patched.get_submodule(n), PATCHED) for n in names)
    if not parity:
        return len(names), swapped, None
    x = torch.randn(family.shape, dtype=torch.float64)
    with torch.no_grad():
        diff = (patched(x) - model(x)).abs().max().item()
    return len(names), swapped, diff


def _bound(diff):
    """A difference as a power-of-ten bound (stable across machines' last bits)."""
    return "0" if diff == 0 else f"< 1e{math.floor(math.log10(diff)) + 1}"


HEADER = """# timm coverage of `patch_timm`

Generated by `python -m pyvit_ops.testing.coverage > docs/coverage.md`; the tests check
every cell but the parity ones against it (the parity of the patched families is
tested model by model in `tests/test_patch_timm*.py`).

For each timm family: a representative model (the timm configuration named, built by
timm's constructors with its stage depths, block types, window sizes and reduction
ratios, so it holds as many attention / token-mixer modules of each kind as the real
model, with widths cut to 8 channels per head and 1–4 heads, on a small image); how many
of its attention / token-mixer modules (the classes listed) `patch_timm` replaces with a
`pyvit_ops.nn` module; and the largest output difference, patched against unpatched,
in float64 on the reference backend. What each swap does and what stays in PyTorch:
[api.md](api.md#pyvit_opspatch_timmmodel-backendnone).

| family | representative | attention / mixer classes | swapped | parity (max \\|Δ\\|, fp64) |
|---|---|---|---|---|
"""


def markdown(parity=True):
    """docs/coverage.md: the header and one table row per family; ``parity=False``
    leaves the parity cells empty (no forward passes)."""
    rows = []
    for family in FAMILIES:
        total, swapped, diff = family_row(family, parity)
        classes = ", ".join(f"`{'.'.join(path.split('.')[-2:])}`" for path in family.mixers)
        share = f"{swapped} / {total} ({100 * swapped // total} %)"
        rows.append(f"| {family.name} | `{family.model}` | {classes} | {share} | "
                    f"{'' if not parity else '—' if diff is None else _bound(diff)} |")
    return HEADER + "\n".join(rows) + "\n"


def main(argv=None):
    """Print docs/coverage.md (``python -m pyvit_ops.testing.coverage``)."""
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(markdown(), end="")


if __name__ == "__main__":
    main()
