"""Drop-in modules with the parameter names of timm / the official implementations."""
from pyvit_ops.nn.attention import Attention, ClassAttn
from pyvit_ops.nn.beit import BeitAttention
from pyvit_ops.nn.cait import TalkingHeadsAttention
from pyvit_ops.nn.elsa import ELSA
from pyvit_ops.nn.eva import EvaAttention
from pyvit_ops.nn.maxvit import PartitionAttention
from pyvit_ops.nn.pooling import Pooling
from pyvit_ops.nn.spatial_reduction import SpatialReductionAttention
from pyvit_ops.nn.twins import LocallyGroupedAttention
from pyvit_ops.nn.window_attention import WindowAttention, WindowAttentionV2

__all__ = ["Attention", "BeitAttention", "PartitionAttention", "ClassAttn", "ELSA", "EvaAttention",
           "LocallyGroupedAttention", "Pooling", "SpatialReductionAttention", "TalkingHeadsAttention",
           "WindowAttention", "WindowAttentionV2"]
