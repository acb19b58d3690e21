"""The official ELSA module's aggregation as it runs without its CUDA extension: the
test oracle of ``elsa_attention`` and the baseline of its benchmark.

The official ``ELSA.forward`` folds the heads into the batch, takes the softmax of the
logits over the K² taps, expands the (C, K, K) ghost tensors per sample, and hands them
to ``elsa_op``, whose CPU path is the unfold formulation: v unfolded to (N, C, K², HW),
``filters = mul * attn + add``, multiplied with the columns and summed over the taps.
"""
import torch
import torch.nn.functional as F


def elsa_op(features, channel_mul, channel_add, spatial_filter, kernel_size, dilation):
    """The official ``elsa_op`` CPU path: features (N, C, H, W), per-sample ghost tensors
    ``channel_mul`` / ``channel_add`` (N, C, K, K), tap weights ``spatial_filter``
    (N, K², H, W); returns (N, C, H, W)."""
    N, C, H, W = features.shape
    taps = kernel_size ** 2
    cols = F.unfold(features, kernel_size, dilation=dilation, padding=kernel_size // 2 * dilation)
    cols = cols.reshape(N, C, taps, H * W)
    filters = (channel_mul.reshape(N, C, taps, 1) * spatial_filter.reshape(N, 1, taps, H * W)
               + channel_add.reshape(N, C, taps, 1))
    return (cols * filters).sum(2).reshape(N, C, H, W)


def elsa_attention(v, attn, ghost_mul, ghost_add, kernel_size, dilation=1, apply_softmax=True):
    """``pyvit_ops.elsa_attention``'s arguments through the official module's steps:
    heads folded into the batch, softmax over the taps (``apply_softmax``), ghost tensors
    expanded per sample (ones / zeros in v's dtype when absent), then ``elsa_op``."""
    B, C, H, W = v.shape
    K = kernel_size
    G = attn.shape[1] // (K * K)
    a = attn.reshape(B * G, K * K, H, W)
    if apply_softmax:
        a = a.softmax(1)

    def per_sample(ghost, fill):
        if ghost is None:
            return torch.full((B * G, C // G, K, K), fill, dtype=v.dtype, device=v.device)
        return ghost.expand(B, C, K, K).reshape(B * G, C // G, K, K)

    out = elsa_op(v.reshape(B * G, C // G, H, W), per_sample(ghost_mul, 1.0),
                  per_sample(ghost_add, 0.0), a, K, dilation)
    return out.reshape(B, C, H, W)
