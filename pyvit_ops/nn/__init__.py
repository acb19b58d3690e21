"""Drop-in modules with the parameter names of timm / the official implementations."""
from pyvit_ops.nn.attention import Attention, ClassAttn
from pyvit_ops.nn.elsa import ELSA
from pyvit_ops.nn.eva import EvaAttention
from pyvit_ops.nn.maxvit import BlockAttention
from pyvit_ops.nn.pooling import Pooling
from pyvit_ops.nn.spatial_reduction import SpatialReductionAttention
from pyvit_ops.nn.twins import LocallyGroupedAttention
from pyvit_ops.nn.window_attention import WindowAttention, WindowAttentionV2

__all__ = ["Attention", "BlockAttention", "ClassAttn", "ELSA", "EvaAttention",
           "LocallyGroupedAttention", "Pooling", "SpatialReductionAttention", "WindowAttention",
           "WindowAttentionV2"]
