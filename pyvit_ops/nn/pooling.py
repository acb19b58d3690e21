"""PoolFormer's token mixer on pyvit_ops.poolformer_pool."""
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.ops.avg_pool2d import poolformer_pool


class Pooling(nn.Module):
    """``pool(x) - x`` with ``AvgPool2d(pool_size, 1, pool_size // 2,
    count_include_pad=False)``, fused into one pass: a drop-in for timm's
    ``timm.models.metaformer.Pooling`` and the official PoolFormer ``Pooling``.

    ``forward(x: (B, C, H, W)) -> (B, C, H, W)``, NCHW or channels_last (kept).
    No parameters or buffers, so state dicts are trivially compatible. Extra keyword
    arguments (timm's MetaFormer passes ``dim``, ``proj_drop``, ``device``, ``dtype``
    to every token mixer) are accepted and ignored, as timm's module does.
    """

    def __init__(self, pool_size=3, backend=None, **kwargs):
        super().__init__()
        _checks.odd_pair("pool_size", pool_size)
        self.pool_size = pool_size
        self.backend = backend

    def forward(self, x):
        """``x``: ``(B, C, H, W)`` -> ``pool(x) - x``, same shape, dtype and memory format."""
        return poolformer_pool(x, self.pool_size, backend=self.backend)

    def extra_repr(self):
        """The options shown by ``print(module)``."""
        return f"pool_size={self.pool_size}, backend={self.backend!r}"
