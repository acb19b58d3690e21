"""``patch_timm(model)``: swap a timm model's attention / token mixers for
pyvit_ops operators in place.

What is swapped (and what is not):
- ``timm.layers.Attention`` (ViT, DeiT) → ``pyvit_ops.nn.Attention``;
- ``timm.models.cait.TalkingHeadAttn`` (CaiT's self attention) →
  ``pyvit_ops.nn.TalkingHeadsAttention`` (both head mixes inside the fused operator);
- ``timm.models.cait.ClassAttn`` → ``pyvit_ops.nn.ClassAttn`` (Nq = 1);
- ``timm.models.swin_transformer.SwinTransformerBlock`` → its ``_attn`` (roll, pad,
  partition, masked window attention, reverse) becomes one call of
  ``pyvit_ops.nn.WindowAttention`` (fused); where the window is larger than the
  feature map (timm's ``always_partition``, or a smaller input than the model was
  built for) the block keeps timm's path, which calls the swapped module on the
  partitioned windows and timm's mask;
- ``timm.models.swin_transformer_v2.SwinTransformerV2Block`` → the same, with
  ``pyvit_ops.nn.WindowAttentionV2`` (cosine attention, continuous position bias);
- ``timm.models.metaformer.Pooling`` (PoolFormer) → ``pyvit_ops.nn.Pooling``;
- ``timm.models.pvt_v2.Attention`` (PVT v2, both ``linear_attn`` settings) and
  ``timm.models.twins.GlobalSubSampleAttn`` → ``pyvit_ops.nn.SpatialReductionAttention``
  (Nq ≠ Nk attention; the reduction convolution / pooling and LayerNorm stay in PyTorch);
- ``timm.models.twins.LocallyGroupedAttn`` → ``pyvit_ops.nn.LocallyGroupedAttention``
  (windows without bias, timm's zero padding as the operator's ``pad_kv``);
- ``timm.models.eva.EvaAttention`` (EVA, EVA02) → ``pyvit_ops.nn.EvaAttention`` (rotary
  embedding in PyTorch, then the fused attention);
- ``timm.models.beit.Attention`` (BEiT, BEiT v2) → ``pyvit_ops.nn.BeitAttention`` (the
  block's relative position table gathered in the kernels; a model's shared table goes
  in as its dense bias);
- ``timm.models.maxxvit.PartitionAttentionCl`` (MaxViT / MaxxViT block and grid
  attention) → its ``_partition_attn`` (block or grid partition, attention with the
  relative position bias, reverse) becomes one call of ``pyvit_ops.nn.PartitionAttention``.
  The NCHW ``PartitionAttention2d`` and CoAtNet's whole-map ``Attention2d`` keep timm's
  modules.
Parameters are shared, not copied: the patched model trains the same tensors and
its state_dict keys are unchanged (state dicts load both ways). The patched model
pickles (``torch.save`` of the whole model), deep-copies, and takes timm's
``set_input_size`` as the unpatched one.
"""
import functools

from torch import nn

from pyvit_ops import _backend
from pyvit_ops.nn.attention import Attention, ClassAttn
from pyvit_ops.nn.beit import BeitAttention
from pyvit_ops.nn.cait import TalkingHeadsAttention
from pyvit_ops.nn.eva import EvaAttention
from pyvit_ops.nn.maxvit import PartitionAttention
from pyvit_ops.nn.pooling import Pooling
from pyvit_ops.nn.spatial_reduction import SpatialReductionAttention
from pyvit_ops.nn.twins import LocallyGroupedAttention
from pyvit_ops.nn.window_attention import WindowAttention, WindowAttentionV2

# Every module patch_timm swaps in (a model holding one is patched).
PATCHED = (Attention, ClassAttn, WindowAttention, WindowAttentionV2, Pooling,
           SpatialReductionAttention, LocallyGroupedAttention, EvaAttention, PartitionAttention,
           BeitAttention, TalkingHeadsAttention)


def _swin_attn(block, x):
    _, H, W, _ = x.shape
    if block.window_size[0] > H or block.window_size[1] > W:
        return type(block)._attn(block, x)
    return block.attn(x, window_size=tuple(block.window_size), shift_size=tuple(block.shift_size))


def _maxvit_partition_attn(block, x):
    return block.attn(x, window_size=block.partition_size,
                      partition="block" if block.partition_block else "grid")


def _module_swaps():
    """{timm class: maker of its replacement} of the modules swapped one for one."""
    from timm.layers import Attention as TimmAttention
    from timm.models import beit, eva, pvt_v2, twins
    from timm.models.cait import ClassAttn as TimmClassAttn
    from timm.models.cait import TalkingHeadAttn as TimmTalkingHeadAttn
    from timm.models.metaformer import Pooling as TimmPooling

    return {
        TimmAttention: Attention.from_timm,
        TimmClassAttn: ClassAttn.from_timm,
        TimmTalkingHeadAttn: TalkingHeadsAttention.from_timm,
        TimmPooling: lambda m, backend: Pooling(m.pool.kernel_size, backend=backend),
        pvt_v2.Attention: SpatialReductionAttention.from_timm,
        twins.GlobalSubSampleAttn: SpatialReductionAttention.from_timm,
        twins.LocallyGroupedAttn: LocallyGroupedAttention.from_timm,
        eva.EvaAttention: EvaAttention.from_timm,
        beit.Attention: BeitAttention.from_timm,
    }


def _block_swap(block):
    """The patch of a block whose attention call fuses partitioning with attention:
    ``(fused module, the block's method it replaces, its replacement)``, or None."""
    from timm.models.maxxvit import PartitionAttentionCl
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    if isinstance(block, SwinTransformerBlock):
        return WindowAttention, "_attn", _swin_attn
    if isinstance(block, SwinTransformerV2Block):
        return WindowAttentionV2, "_attn", _swin_attn
    if isinstance(block, PartitionAttentionCl):
        return PartitionAttention, "_partition_attn", _maxvit_partition_attn
    return None


def patch_timm(model, backend=None):
    """Patch ``model`` in place and return it; ``backend`` is passed to every operator.

    ``model``: any ``nn.Module`` holding the timm modules listed in this module's
    docstring (a whole timm model, or a part of one); other modules are untouched and
    patching twice changes nothing. Works on any device and dtype, before or after
    ``.cuda()`` / ``.to(dtype)`` / loading weights, since parameters are shared.
    ``backend``: None (automatic per call), "reference", "triton" or "cuda"; the
    ``PYVIT_OPS_BACKEND`` environment variable applies when it is None.
    Raises ValueError for what the fused modules cannot express: attention dropout in
    a window module (Swin, Twins' ``LocallyGroupedAttn``, MaxViT partition attention), a
    gated timm ``Attention``, a MaxViT relative position module other than timm's three;
    and when ``model`` holds none of those modules (nor already patched ones): a model
    that is not one of these timm families would otherwise run unchanged, silently.
    Needs timm >= 1.0.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a timm model), got "
                        f"{type(model).__name__}")
    _backend.requested_backend(backend)
    swaps = _module_swaps()
    replacements = []
    for parent in model.modules():
        block_swap = _block_swap(parent)
        if block_swap is not None:
            fused, method, call = block_swap
            if not isinstance(parent.attn, fused):
                parent.attn = fused.from_timm(parent.attn, backend=backend)
                # A partial of a module-level function pickles; a bound method would pickle
                # as getattr(block, name), which the block does not have.
                setattr(parent, method, functools.partial(call, parent))
            continue
        for name, child in parent.named_children():
            make = swaps.get(type(child))
            if make is not None:
                replacements.append((parent, name, make(child, backend=backend)))
    for parent, name, new in replacements:
        setattr(parent, name, new)
    if not any(isinstance(m, PATCHED) for m in model.modules()):
        raise ValueError(f"model: no timm module to patch in {type(model).__name__} (expected "
                         "Swin V1/V2 blocks, ViT/DeiT Attention, CaiT ClassAttn, MetaFormer "
                         "Pooling, PVT v2 / Twins / EVA / BEiT attention or MaxViT block "
                         "attention)")
    return model


__all__ = ["PATCHED", "patch_timm"]
