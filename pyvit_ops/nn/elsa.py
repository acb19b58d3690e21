"""ELSA (enhanced local self-attention) on pyvit_ops.elsa_attention."""
import math

import torch
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.ops.elsa_attention import elsa_attention


class ELSA(nn.Module):
    """ELSA token mixer (Zhou et al. 2021), a drop-in for the official
    ``damo-cv/ELSA`` module: same constructor options and parameter names
    (``pre_proj``, ``attn.0``, ``attn.2``, ``ghost_head``, ``post_proj``), so its
    checkpoints load with ``load_state_dict``.

    ``forward(x: (B, H, W, dim)) -> (B, H, W, dim)``:
    1. ``q, k, v = split(pre_proj(x))`` (1x1 conv; q, k: ``dim_qk``, v: ``dim_v`` channels);
    2. ``P = q * k * scale`` (Hadamard product);
    3. logits ``attn(P)``: grouped KxK conv, GELU, 1x1 conv to ``num_heads * K * K``;
    4-6. ``pyvit_ops.elsa_attention(v, logits, M, D)`` with the softmax over the taps
       fused, M = ghost_mul ** lam and D = gamma * ghost_add taken from
       ``ghost_head`` as (dim_v, K, K) views (never expanded per sample);
    7. ``post_proj`` (Linear) and ``proj_drop``.
    With ``attn_drop > 0`` in training the softmax and dropout run before the fused
    operator, which then receives probabilities. ``dim_qk`` defaults to
    ``dim // 3 * 2``, rounded up to a multiple of ``group_width``; ``scale`` to
    ``qk_scale or (dim_v // num_heads) ** -0.5`` (ELSA-Swin blocks pass qk_scale=1).
    Only ``stride=1`` exists in the fused operator.
    ``ghost_head`` is ``(2, 1, dim_v, K, K)`` [mul; add] when lam and gamma are both
    non-zero, ``(1, dim_v, K, K)`` holding the add (lam == 0) or the mul
    (gamma == 0) part alone, and None when both are 0.
    ``backend`` is passed to ``pyvit_ops.elsa_attention``; ``stride != 1`` and a
    ``dim_v`` not divisible by ``num_heads`` raise ValueError.
    """

    def __init__(self, dim, num_heads, dim_qk=None, dim_v=None, kernel_size=5, stride=1,
                 dilation=1, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 group_width=8, groups=1, lam=1, gamma=1, backend=None):
        super().__init__()
        if stride != 1:
            raise ValueError(f"stride: the fused ELSA operator supports stride 1 only, got {stride}")
        _checks.check_int("kernel_size", kernel_size, 1, odd=True)
        _checks.check_int("dilation", dilation, 1)
        self.dim = dim
        self.num_heads = num_heads
        dim_qk = dim_qk or dim // 3 * 2
        self.dim_qk = math.ceil(dim_qk / group_width) * group_width
        self.dim_v = dim_v or dim
        if self.dim_v % num_heads:
            raise ValueError(f"num_heads: expected a divisor of dim_v = {self.dim_v}, got {num_heads}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.scale = qk_scale or (self.dim_v // num_heads) ** -0.5
        self.group_width = group_width
        self.groups = groups
        self.lam = lam
        self.gamma = gamma
        self.backend = backend

        self.pre_proj = nn.Conv2d(dim, self.dim_qk * 2 + self.dim_v, 1, bias=qkv_bias)
        self.attn = nn.Sequential(
            nn.Conv2d(self.dim_qk, self.dim_qk, kernel_size, padding=(kernel_size // 2) * dilation,
                      dilation=dilation, groups=self.dim_qk // group_width),
            nn.GELU(),
            nn.Conv2d(self.dim_qk, kernel_size ** 2 * num_heads, 1, groups=groups))
        shape = (self.dim_v, kernel_size, kernel_size)
        if lam != 0 and gamma != 0:
            ghost_mul = torch.randn(1, 1, *shape)
            ghost_add = nn.init.trunc_normal_(torch.zeros(1, 1, *shape), std=0.02)
            self.ghost_head = nn.Parameter(torch.cat((ghost_mul, ghost_add), dim=0))
        elif lam == 0 and gamma != 0:
            self.ghost_head = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, *shape), std=0.02))
        elif lam != 0:
            self.ghost_head = nn.Parameter(torch.randn(1, *shape))
        else:
            self.ghost_head = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.post_proj = nn.Linear(self.dim_v, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def ghost_filters(self):
        """``(M, D)``: (dim_v, K, K) tensors or None, derived from ``ghost_head``."""
        if self.ghost_head is None:
            return None, None
        lam, gamma = self.lam, self.gamma
        if lam != 0 and gamma != 0:
            mul, add = self.ghost_head[0, 0], self.ghost_head[1, 0]
        elif lam == 0:
            mul, add = None, self.ghost_head[0]
        else:
            mul, add = self.ghost_head[0], None
        # x ** 1 and x * 1 are exact: skip them.
        if mul is not None and lam != 1:
            mul = mul ** lam
        if add is not None and gamma != 1:
            add = add * gamma
        return mul, add

    def forward(self, x):
        """``x``: ``(B, H, W, dim)`` (channels last, as the official module) ->
        ``(B, H, W, dim)``; steps 1-7 of the class docstring."""
        _checks.check_features("x", x, 4, self.dim, "(B, H, W, C)")
        B, H, W, _ = x.shape
        K = self.kernel_size
        qkv = self.pre_proj(x.permute(0, 3, 1, 2))  # channels_last strides: no copy
        q, k, v = torch.split(qkv, (self.dim_qk, self.dim_qk, self.dim_v), dim=1)
        logits = self.attn(q * k * self.scale)
        apply_softmax = not (self.training and self.attn_drop.p > 0)
        if not apply_softmax:
            probs = logits.reshape(B, self.num_heads, K * K, H, W).softmax(dim=2)
            logits = self.attn_drop(probs).reshape(B, -1, H, W)
        mul, add = self.ghost_filters()
        y = elsa_attention(v, logits, mul, add, kernel_size=K, dilation=self.dilation,
                           apply_softmax=apply_softmax, backend=self.backend)
        return self.proj_drop(self.post_proj(y.permute(0, 2, 3, 1)))

    def extra_repr(self):
        """The hyper-parameters shown by ``print(module)``."""
        return (f"dim={self.dim}, num_heads={self.num_heads}, dim_qk={self.dim_qk}, "
                f"dim_v={self.dim_v}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"lam={self.lam}, gamma={self.gamma}, scale={self.scale}")
