"""BEiT / BEiT v2 attention on pyvit_ops.scaled_dot_product_attention, its relative
position table gathered inside the kernels."""
from torch import nn

from pyvit_ops import _checks
from pyvit_ops.nn import _timm
from pyvit_ops.nn.eva import EvaAttention
from pyvit_ops.ops.scaled_dot_product_attention import scaled_dot_product_attention_qkvpacked
from pyvit_ops.reference.scaled_dot_product_attention import rel_pos_bias

# What from_timm reads of a timm beit.Attention (its k_bias and relative_position_index
# buffers are shared apart).
_TIMM_PARTS = ("num_heads", "scale", "qkv_bias_separate", "qkv", "q_bias", "v_bias",
               "window_size", "relative_position_bias_table", "attn_drop", "proj", "proj_drop")


class BeitAttention(nn.Module):
    """BEiT attention, a drop-in for timm's ``beit.Attention`` made by ``from_timm`` from
    one: one fused ``qkv`` with timm's ``q_bias`` / zero ``k_bias`` buffer / ``v_bias``
    (added inside the matmul or after it per ``qkv_bias_separate``), attention dropout,
    and the per-block relative position table ``relative_position_bias_table``
    ``((2gh - 1)(2gw - 1) + 3, heads)`` of the ``window_size`` (gh, gw) patch grid after
    the class token (None in models without it, e.g. BEiT v2 with absolute positions).

    ``forward(x: (B, N, dim), shared_rel_pos_bias=None) -> (B, N, dim)``: one
    ``pyvit_ops.scaled_dot_product_attention_qkvpacked`` call. The block's table is
    passed as ``rel_pos_table``: the kernels gather it by index arithmetic and return its
    gradient in the table's shape. ``shared_rel_pos_bias`` is the dense
    ``(heads, N, N)`` bias the model's shared ``RelativePositionBias`` forms once per
    forward for every block (``use_shared_rel_pos_bias``); it goes in as ``attn_bias``
    (broadcast over the batch, its gradient reduced over the batch in the kernels), with
    the block's own table gathered onto it where a model has both. Parameter and buffer
    names are timm's, so checkpoints load and ``set_window_size`` is timm's.
    """

    @classmethod
    def from_timm(cls, module, backend=None):
        """Wrap a timm ``beit.Attention``, sharing its submodules, parameters and
        ``k_bias`` / ``relative_position_index`` buffers (state_dict keys unchanged)."""
        new = _timm.share(cls, module, "timm beit Attention", _TIMM_PARTS, backend)
        new.register_buffer("k_bias", module.k_bias, persistent=False)
        new.register_buffer("relative_position_index", module.relative_position_index,
                            persistent=False)
        return new

    # timm's EVA attention derives from BEiT's: the same fused projection and biases.
    _qkv = EvaAttention._qkv

    def set_window_size(self, window_size):
        """timm's: resize the table to a new (gh, gw) grid (``Beit.set_input_size``)."""
        from timm.models.beit import Attention as TimmAttention

        TimmAttention.set_window_size(self, window_size)

    def _init_buffers(self):
        from timm.models.beit import Attention as TimmAttention

        TimmAttention._init_buffers(self)

    def forward(self, x, shared_rel_pos_bias=None):
        """``x``: ``(B, N, dim)``, the class token first -> ``(B, N, dim)``."""
        _checks.check_features("x", x, 3, self.qkv.in_features, "(B, N, C)")
        B, N, _ = x.shape
        qkv = self._qkv(x)
        kwargs = dict(dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale,
                      backend=self.backend)
        table, grid = self.relative_position_bias_table, self.window_size
        if table is not None and shared_rel_pos_bias is None:
            x = scaled_dot_product_attention_qkvpacked(qkv, rel_pos_table=table,
                                                       rel_pos_grid=tuple(grid), **kwargs)
        else:
            bias = shared_rel_pos_bias
            if table is not None:
                bias = rel_pos_bias(table, grid, N) + bias
            x = scaled_dot_product_attention_qkvpacked(qkv, bias, **kwargs)
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))
