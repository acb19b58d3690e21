"""``patch_timm(model)``: swap a timm model's attention / token mixers for
pyvit_ops operators in place.

What is swapped (and what is not):
- ``timm.layers.Attention`` (ViT, DeiT, CaiT's patch attention is TalkingHeadAttn and
  stays: its talking-head projections sit between the logits and the softmax, which
  no fused attention can absorb) → ``pyvit_ops.nn.Attention``;
- ``timm.models.cait.ClassAttn`` → ``pyvit_ops.nn.ClassAttn`` (Nq = 1);
- ``timm.models.swin_transformer.SwinTransformerBlock`` → its ``_attn`` (roll, pad,
  partition, masked window attention, reverse) becomes one call of
  ``pyvit_ops.nn.WindowAttention`` (fused); where the window is larger than the
  feature map (timm's ``always_partition``, or a smaller input than the model was
  built for) the block keeps timm's path, which calls the swapped module on the
  partitioned windows and timm's mask;
- ``timm.models.swin_transformer_v2.SwinTransformerV2Block`` → the same, with
  ``pyvit_ops.nn.WindowAttentionV2`` (cosine attention, continuous position bias);
- ``timm.models.metaformer.Pooling`` (PoolFormer) → ``pyvit_ops.nn.Pooling``.
Parameters are shared, not copied: the patched model trains the same tensors and
its state_dict keys are unchanged (state dicts load both ways). The patched model
pickles (``torch.save`` of the whole model), deep-copies, and takes timm's
``set_input_size`` as the unpatched one.
"""
import functools

from torch import nn

from pyvit_ops import _backend
from pyvit_ops.nn.attention import Attention, ClassAttn
from pyvit_ops.nn.pooling import Pooling
from pyvit_ops.nn.window_attention import WindowAttention, WindowAttentionV2


def _swin_attn(block, x):
    _, H, W, _ = x.shape
    if block.window_size[0] > H or block.window_size[1] > W:
        return type(block)._attn(block, x)
    return block.attn(x, window_size=tuple(block.window_size), shift_size=tuple(block.shift_size))


def patch_timm(model, backend=None):
    """Patch ``model`` in place and return it; ``backend`` is passed to every operator.

    ``model``: any ``nn.Module`` holding the timm modules listed in this module's
    docstring (a whole timm model, or a part of one); other modules are untouched and
    patching twice changes nothing. Works on any device and dtype, before or after
    ``.cuda()`` / ``.to(dtype)`` / loading weights, since parameters are shared.
    ``backend``: None (automatic per call), "reference", "triton" or "cuda"; the
    ``PYVIT_OPS_BACKEND`` environment variable applies when it is None.
    Raises ValueError for what the fused modules cannot express: a Swin
    ``WindowAttention`` with attention dropout, a gated timm ``Attention``; and when
    ``model`` holds none of those modules (nor already patched ones): a model that is
    not one of these timm families would otherwise run unchanged, silently.
    Needs timm >= 1.0.
    """
    from timm.layers import Attention as TimmAttention
    from timm.models.cait import ClassAttn as TimmClassAttn
    from timm.models.metaformer import Pooling as TimmPooling
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    swin_blocks = ((SwinTransformerBlock, WindowAttention),
                   (SwinTransformerV2Block, WindowAttentionV2))

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a timm model), got "
                        f"{type(model).__name__}")
    _backend.requested_backend(backend)
    replacements = []
    for parent in model.modules():
        fused = next((new for block, new in swin_blocks if isinstance(parent, block)), None)
        if fused is not None and not isinstance(parent.attn, fused):
            parent.attn = fused.from_timm(parent.attn, backend=backend)
            # A partial of a module-level function pickles; a bound method would pickle
            # as getattr(block, "_swin_attn"), which the block does not have.
            parent._attn = functools.partial(_swin_attn, parent)
            continue
        for name, child in parent.named_children():
            if type(child) is TimmAttention:
                replacements.append((parent, name, Attention.from_timm(child, backend=backend)))
            elif type(child) is TimmClassAttn:
                replacements.append((parent, name, ClassAttn.from_timm(child, backend=backend)))
            elif type(child) is TimmPooling:
                replacements.append((parent, name, Pooling(child.pool.kernel_size, backend=backend)))
    for parent, name, new in replacements:
        setattr(parent, name, new)
    patched = (Attention, ClassAttn, WindowAttention, WindowAttentionV2, Pooling)
    if not any(isinstance(m, patched) for m in model.modules()):
        raise ValueError(f"model: no timm module to patch in {type(model).__name__} (expected "
                         "Swin V1/V2 blocks, ViT/DeiT Attention, CaiT ClassAttn or MetaFormer "
                         "Pooling)")
    return model


__all__ = ["patch_timm"]
