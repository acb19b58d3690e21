"""Drop-in modules with the parameter names of timm / the official implementations."""
from pyvit_ops.nn.attention import Attention, ClassAttn
from pyvit_ops.nn.elsa import ELSA
from pyvit_ops.nn.pooling import Pooling
from pyvit_ops.nn.window_attention import WindowAttention, WindowAttentionV2

__all__ = ["Attention", "ClassAttn", "ELSA", "Pooling", "WindowAttention", "WindowAttentionV2"]
