"""pyvit_ops: fused GPU kernels (Triton and CUDA C++) for vision-transformer operators.

Functional API: scaled_dot_product_attention, window_attention (each also as a
``*_qkvpacked`` function of one packed projection), elsa_attention, avg_pool2d,
poolformer_pool, talking_heads_attention (CaiT).
Modules: pyvit_ops.nn. timm integration: patch_timm.
Each operator takes ``backend=None | "reference" | "triton" | "cuda"`` (or the
``PYVIT_OPS_BACKEND`` environment variable): automatic choice runs the reference on
CPU tensors and the kernels on CUDA tensors where they can; a forced backend that
cannot run raises ``BackendUnavailableError`` with every reason.
``HAS_CUDA_EXT``: True when the CUDA C++ extension (``pyvit_ops._C``) imported.
``python -m pyvit_ops.info`` says which backends can run here and why.
"""
__version__ = "0.1.0"

import torch  # noqa: F401  (loads libc10 before the CUDA extension is imported)

from pyvit_ops._backend import BackendUnavailableError
from pyvit_ops._ext import HAS_CUDA_EXT
from pyvit_ops.ops.avg_pool2d import avg_pool2d, poolformer_pool
from pyvit_ops.ops.elsa_attention import elsa_attention
from pyvit_ops.ops.scaled_dot_product_attention import (
    scaled_dot_product_attention, scaled_dot_product_attention_qkvpacked)
from pyvit_ops.ops.talking_heads_attention import talking_heads_attention
from pyvit_ops.ops.window_attention import window_attention, window_attention_qkvpacked
from pyvit_ops import nn
from pyvit_ops.patch import patch_timm

__all__ = [
    "scaled_dot_product_attention", "scaled_dot_product_attention_qkvpacked",
    "window_attention", "window_attention_qkvpacked", "elsa_attention", "avg_pool2d",
    "poolformer_pool", "talking_heads_attention", "patch_timm", "nn", "HAS_CUDA_EXT", "BackendUnavailableError",
]
