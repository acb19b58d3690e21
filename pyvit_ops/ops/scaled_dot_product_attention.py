"""``pyvit_ops.scaled_dot_product_attention``: public function, validation, backend
choice and the ``torch.library`` registration of the kernels.

The kernels take 4-D ``(Z1, Z2, N, D)`` tensors; the user's batch dims are folded
into Z1, Z2 as strided views (no copy) wherever the strides of q, k, v and of the
broadcast bias allow it (see ``_Fold``).
"""
import math
from typing import List, Optional, Tuple

import torch

from pyvit_ops import _backend, _checks, _ext, capabilities
from pyvit_ops.ops import _attention_autograd
from pyvit_ops.reference import scaled_dot_product_attention as reference

_OP = "scaled_dot_product_attention"


# --------------------------------------------------------------------------- limits


def _reasons(backend, q, k, v, attn_bias, table=None):
    """Why ``backend`` cannot run this call ([] = it can); ``table``: a relative-position
    table (then ``attn_bias`` is None)."""
    reasons = _backend.common_reasons(backend, _OP, tensors=[q, k, v, attn_bias, table])
    reasons += capabilities.feature_reasons(_OP, backend, "rel_pos_table", table is not None)
    D = q.shape[-1]
    reasons += capabilities.limit_reasons(_OP, backend, "head_dim", D, f"head dim {D}")
    batch, tokens = math.prod(q.shape[:-2]), max(q.shape[-2], k.shape[-2])
    reasons += capabilities.limit_reasons(_OP, backend, "batch_tokens", batch * tokens,
                                          f"batch {batch} x tokens {tokens}")
    # (row and key offsets past 2**31 take the Triton kernels' 64-bit variant)
    if backend == "triton" and any((t.shape[-1] - 1) * abs(t.stride(-1)) >= 2 ** 31
                                   for t in (q, k, v)):
        reasons.append(f"head-dim strides {q.stride(-1)}, {k.stride(-1)}, {v.stride(-1)} "
                       "x (D - 1) reach 2**31 (the Triton kernels index the head dim in "
                       "32 bits)")
    return reasons


# --------------------------------------------------------------------------- validation


def _check_args(q, k, v, attn_bias, scale, dropout_p):
    _checks.check_tensor("q", q, min_ndim=3)
    _checks.check_tensor("k", k, min_ndim=3)
    _checks.check_tensor("v", v, min_ndim=3)
    _checks.check_same_dtype(q=q, k=k, v=v)
    if attn_bias is not None and not isinstance(attn_bias, torch.Tensor):
        raise TypeError(f"attn_bias: expected a torch.Tensor or None, got "
                        f"{type(attn_bias).__name__}")
    _checks.check_same_device(q=q, k=k, v=v, attn_bias=attn_bias)
    batch, nk, d = q.shape[:-2], k.shape[-2], q.shape[-1]
    if d == 0:
        raise ValueError(f"q: expected a head dim (last dim) >= 1, got shape {tuple(q.shape)}")
    if k.shape[:-2] != batch or k.shape[-1] != d:
        raise ValueError(f"k: expected shape {(*batch, 'Nk', d)} (q's batch dims and head dim), "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if attn_bias is not None:
        # torch's rule for attn_mask: bool, float32, or the dtype of q.
        if attn_bias.dtype not in (torch.bool, torch.float32, q.dtype):
            raise TypeError(f"attn_bias: expected dtype bool, float32 or {q.dtype} (as q), "
                            f"got {attn_bias.dtype}")
        full = (*batch, q.shape[-2], nk)
        try:
            broadcast = torch.broadcast_shapes(attn_bias.shape, full)
        except RuntimeError:
            broadcast = None
        if broadcast != torch.Size(full):
            raise ValueError(f"attn_bias: expected a shape broadcastable to {full} "
                             f"(*batch, Nq, Nk), got {tuple(attn_bias.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    # 0 is allowed, as torch allows it (uniform attention).
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float in [0, 1], got {dropout_p!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1], got {dropout_p!r}")


def _check_table(q, k, attn_bias, table, grid):
    """``rel_pos_table`` (T, heads) and ``rel_pos_grid`` (gh, gw) of a call: both or
    neither, no ``attn_bias`` beside them, T and the token count of the grid."""
    if (table is None) != (grid is None):
        raise ValueError("rel_pos_table, rel_pos_grid: expected both or neither, got "
                         f"{'a table' if table is not None else 'no table'} and grid {grid!r}")
    if table is None:
        return
    if attn_bias is not None:
        raise ValueError("attn_bias: must be None with rel_pos_table (one bias source per "
                         "call; add a dense bias to the gathered table in PyTorch instead)")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)):
        raise ValueError(f"rel_pos_grid: expected (gh, gw), two positive ints, got {grid!r}")
    _checks.check_tensor("rel_pos_table", table, ndim=2)
    _checks.check_same_device(q=q, rel_pos_table=table)
    if table.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"rel_pos_table: expected dtype float32 or {q.dtype} (as q), got "
                        f"{table.dtype}")
    gh, gw = grid
    n, heads = q.shape[-2], q.shape[-3]
    lead = n - gh * gw
    if k.shape[-2] != n or lead not in (0, 1):
        raise ValueError(f"rel_pos_grid: expected Nq = Nk = {gh} * {gw} tokens, or one class "
                         f"token more, got Nq {n}, Nk {k.shape[-2]}")
    rows = reference.rel_pos_rows(gh, gw, lead)
    if tuple(table.shape) != (rows, heads):
        raise ValueError(f"rel_pos_table: expected shape ({rows}, {heads}) ((2gh - 1)(2gw - 1)"
                         f"{' + 3' if lead else ''} rows, one column per head: q's dim -3), "
                         f"got {tuple(table.shape)}")


# --------------------------------------------------------------------------- folding


def _unpack(qkv):
    """q, k, v ``(B, heads, N, D)``: views of a ``(B, N, 3, heads, D)`` projection."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _merge_groups(batch, strides):
    """Runs of consecutive batch dims (size-1 dims dropped) that every stride list can
    view as one dim: the outer stride is the inner stride times the inner size."""
    groups = []
    for i, n in enumerate(batch):
        if n == 1:
            continue
        if groups and all(st[groups[-1][-1]] == st[i] * n for st in strides):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _Fold:
    """The (Z1, Z2) views of q, k, v (and bias, dout, out) for the kernels.

    Zero-copy unless the batch strides cannot be grouped into two dims. Then, in order:
    q, k, v are made contiguous (a copy of inputs the size of the attention's own
    inputs, only for such unusual layouts); if the bias's broadcast pattern alone still
    needs three groups (e.g. a ``(nW, 1, N, N)`` mask over ``(B, nW, H)``), the bias is
    materialised over the batch dims after its leading broadcast ones, and its gradient
    is summed back to the bias's shape afterwards.

    A relative-position table (``table``) is viewed as ``(*batch, 1, T)``: its column of
    each batch element's head (q's dim -3), stride 0 over the other batch dims, which
    then fold with q, k, v into at most two groups.
    """

    def __init__(self, q, k, v, bias, bias_grad, table=False):
        self.batch = tuple(q.shape[:-2])
        self.nq, self.nk = q.shape[-2], k.shape[-2]
        self.bias_shape = None if bias is None else tuple(bias.shape)
        full = (*self.batch, self.nq, self.nk)
        bias_full = None
        if bias is not None:
            if bias_grad and any(st == 0 and n > 1 for st, n in zip(bias.stride(), bias.shape)):
                # A bias that is itself an expanded view has a gradient per position.
                bias = bias.contiguous()
            bias_full = (bias.t().unsqueeze(-2).expand(*self.batch, 1, bias.shape[0]) if table
                         else bias.expand(full))
        self.table = table
        nb = len(self.batch)
        groups = self._groups([q, k, v, bias_full])
        if len(groups) > 2:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            groups = self._groups([q, k, v, bias_full])
        if len(groups) > 2:
            lead = 0
            while lead < nb and (bias_full.stride(lead) == 0 or self.batch[lead] == 1):
                lead += 1
            inner = bias_full[(0,) * lead]
            rows = self.nq if inner.stride(-2) != 0 else 1
            cols = self.nk if inner.stride(-1) != 0 else 1
            bias_full = inner[..., :rows, :cols].contiguous().expand(full)
            groups = self._groups([q, k, v, bias_full])
        self.groups = groups
        self.q, self.k, self.v = (self.view(t) for t in (q, k, v))
        self.bias = None if bias_full is None else self.view(bias_full)
        self.bias_full = bias_full

    def _groups(self, tensors):
        nb = len(self.batch)
        return _merge_groups(self.batch, [t.stride()[:nb] for t in tensors if t is not None])

    def view(self, t):
        """``t`` (``(*batch, R, C)``) as ``(Z1, Z2, R, C)``; a copy only if its own
        strides do not fit the groups (dout from autograd may be any view)."""
        if any(t.stride(g[j]) != t.stride(g[j + 1]) * t.shape[g[j + 1]]
               for g in self.groups for j in range(len(g) - 1)):
            t = t.contiguous()
        sizes = [math.prod(self.batch[i] for i in g) for g in self.groups]
        strides = [t.stride(g[-1]) for g in self.groups]
        sizes, strides = [1] * (2 - len(sizes)) + sizes, [0] * (2 - len(strides)) + strides
        return t.as_strided((*sizes, t.shape[-2], t.shape[-1]),
                            (*strides, t.stride(-2), t.stride(-1)))

    def view_in_place(self, t):
        """``view`` of an output buffer, which must not be a copy."""
        t4 = self.view(t)
        if t4.data_ptr() != t.data_ptr():
            raise RuntimeError("internal: the packed gradient does not fold without a copy")
        return t4

    def unfold(self, t4, tail):
        return t4.reshape(*self.batch, *tail)

    def unfold_dbias(self, dbias4):
        """The launcher's reduced dbias back in the bias's own shape."""
        if self.table:  # (heads or 1, T): the only batch dim with a stride is the head's
            return dbias4.reshape(-1, self.bias_shape[0]).t().contiguous()
        full = self.bias_full
        reduced = [n if (st != 0 and n > 1) else 1 for st, n in zip(full.stride(), full.shape)]
        lead = (1,) * (full.dim() - len(self.bias_shape))
        dbias = dbias4.reshape(reduced).sum_to_size(lead + self.bias_shape)
        return dbias.reshape(self.bias_shape).contiguous()


# --------------------------------------------------------------------------- custom ops


def _launchers(backend, q):
    """The launchers of ``backend``: the Triton module, or the CUDA ops, which take the
    same folded 4-D tensors and the seed tensor (None without dropout)."""
    if backend == "triton":
        from pyvit_ops.kernels import scaled_dot_product_attention as kernels

        return kernels
    if backend == "cuda":
        return _ext.lib(q)
    raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")


def _fwd(q, k, v, bias, scale, dropout_p, seed, backend, rel_pos_grid):
    fold = _Fold(q, k, v, bias, bias_grad=False, table=rel_pos_grid is not None)
    out, lse = _launchers(backend, q).scaled_dot_product_attention_fwd(
        fold.q, fold.k, fold.v, fold.bias, scale, dropout_p, seed, rel_pos_grid=rel_pos_grid)
    return fold.unfold(out, out.shape[-2:]), fold.unfold(lse, lse.shape[-2:])


@torch.library.custom_op("pyvit_ops::scaled_dot_product_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
            scale: float, dropout_p: float, seed: Optional[torch.Tensor], backend: str,
            rel_pos_grid: Optional[List[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward; with ``rel_pos_grid`` (gh, gw) ``bias`` is a relative-position table."""
    return _fwd(q, k, v, bias, scale, dropout_p, seed, backend, rel_pos_grid)


@torch.library.custom_op("pyvit_ops::scaled_dot_product_attention_qkvpacked_fwd",
                         mutates_args=())
def _qkvpacked_fwd_op(qkv: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
                      dropout_p: float, seed: Optional[torch.Tensor], backend: str,
                      rel_pos_grid: Optional[List[int]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scaled_dot_product_attention_fwd`` of the slices of qkv ``(B, N, 3, heads, D)``."""
    return _fwd(*_unpack(qkv), bias, scale, dropout_p, seed, backend, rel_pos_grid)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, bias, scale, dropout_p, seed, backend, rel_pos_grid=None):
    return q.new_empty(q.shape), q.new_empty((*q.shape[:-1], 2), dtype=torch.float32)


@_qkvpacked_fwd_op.register_fake
def _qkvpacked_fwd_fake(qkv, bias, scale, dropout_p, seed, backend, rel_pos_grid=None):
    return _fwd_fake(*_unpack(qkv), bias, scale, dropout_p, seed, backend)


def _bwd(dout, q, k, v, lse, bias, scale, dropout_p, seed, bias_requires_grad, backend,
         rel_pos_grid, qkv=None):
    """(dq, dk, dv, dbias), or (dqkv, dbias) written in place of a stack when q, k, v are
    the slices of the packed ``qkv``; dbias is an empty tensor unless
    ``bias_requires_grad``."""
    if math.prod(q.shape[:-2]) == 0:
        # No batch element: nothing to launch (and nothing to fold back into the bias).
        tokens = (q, k, v) if qkv is None else (qkv,)
        dbias = torch.zeros_like(bias) if bias_requires_grad else q.new_empty(0)
        return (*(torch.zeros_like(t) for t in tokens), dbias)
    fold = _Fold(q, k, v, bias, bias_grad=bias_requires_grad, table=rel_pos_grid is not None)
    lse4 = fold.view(lse).contiguous()
    args = (fold.view(dout), fold.q, fold.k, fold.v, lse4, fold.bias, scale, dropout_p, seed,
            bias_requires_grad)
    launchers = _launchers(backend, q)
    if qkv is None:
        dq, dk, dv, dbias = launchers.scaled_dot_product_attention_bwd(
            *args, rel_pos_grid=rel_pos_grid)
        tokens = (fold.unfold(dq, q.shape[-2:]), fold.unfold(dk, k.shape[-2:]),
                  fold.unfold(dv, v.shape[-2:]))
    else:
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        grads = [fold.view_in_place(g) for g in _unpack(dqkv)]
        if backend == "cuda":
            dbias = launchers.scaled_dot_product_attention_bwd_into(
                *args, *grads, rel_pos_grid=rel_pos_grid)
        else:
            dbias = launchers.scaled_dot_product_attention_bwd(
                *args, rel_pos_grid=rel_pos_grid, grads=grads)[3]
        tokens = (dqkv,)
    dbias = fold.unfold_dbias(dbias) if bias_requires_grad else q.new_empty(0)
    return (*tokens, dbias)


@torch.library.custom_op("pyvit_ops::scaled_dot_product_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            lse: torch.Tensor, bias: Optional[torch.Tensor], scale: float, dropout_p: float,
            seed: Optional[torch.Tensor], bias_requires_grad: bool, backend: str,
            rel_pos_grid: Optional[List[int]] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dbias), see ``_bwd``."""
    return _bwd(dout, q, k, v, lse, bias, scale, dropout_p, seed, bias_requires_grad, backend,
                rel_pos_grid)


@torch.library.custom_op("pyvit_ops::scaled_dot_product_attention_qkvpacked_bwd",
                         mutates_args=())
def _qkvpacked_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor,
                      bias: Optional[torch.Tensor], scale: float, dropout_p: float,
                      seed: Optional[torch.Tensor], bias_requires_grad: bool, backend: str,
                      rel_pos_grid: Optional[List[int]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (dqkv, dbias), see ``_bwd``."""
    return _bwd(dout, *_unpack(qkv), lse, bias, scale, dropout_p, seed, bias_requires_grad,
                backend, rel_pos_grid, qkv=qkv)


def _dbias_fake(q, bias, bias_requires_grad):
    return bias.new_empty(bias.shape) if bias_requires_grad else q.new_empty(0)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, lse, bias, scale, dropout_p, seed, bias_requires_grad, backend,
              rel_pos_grid=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            _dbias_fake(q, bias, bias_requires_grad))


@_qkvpacked_bwd_op.register_fake
def _qkvpacked_bwd_fake(dout, qkv, lse, bias, scale, dropout_p, seed, bias_requires_grad,
                        backend, rel_pos_grid=None):
    return qkv.new_empty(qkv.shape), _dbias_fake(qkv, bias, bias_requires_grad)


# --------------------------------------------------------------------------- autograd


def _gradients(dout, inputs, out, lse, tokens, need):
    bias, scale, dropout_p, seed, backend, rel_pos_grid = inputs[tokens:]
    bias_grad = bias is not None and bias.dtype != torch.bool and need[tokens]
    bwd = (torch.ops.pyvit_ops.scaled_dot_product_attention_bwd if tokens == 3 else
           torch.ops.pyvit_ops.scaled_dot_product_attention_qkvpacked_bwd)
    return bwd(dout, *inputs[:tokens], lse, bias, scale, dropout_p, seed, bias_grad, backend,
               rel_pos_grid)


_attention_autograd.register(((_fwd_op, 3), (_qkvpacked_fwd_op, 1)), _gradients)


# --------------------------------------------------------------------------- public


def scaled_dot_product_attention(q, k, v, attn_bias=None, *, scale=None, dropout_p=0.0,
                                 rel_pos_table=None, rel_pos_grid=None, backend=None):
    """``softmax(q @ k^T * scale + attn_bias) @ v`` over any leading batch dims.

    q: ``(*batch, Nq, D)``; k, v: ``(*batch, Nk, D)``; ``scale`` defaults to
    ``D ** -0.5``. ``attn_bias`` follows ``torch.nn.functional.scaled_dot_product_attention``'s
    ``attn_mask``: a float tensor (float32 or q's dtype) broadcastable to
    ``(*batch, Nq, Nk)`` is added to the logits, a bool one keeps the logits where it is
    True. A query row with every key masked gives zeros (and zero gradients), as torch.
    The gradient of a float bias comes back in the bias's own shape, reduced over its
    broadcast dims inside the kernels. A bias constant along the keys gets an exactly
    zero gradient (softmax is shift-invariant).

    ``rel_pos_table`` ``(T, heads)`` with ``rel_pos_grid`` ``(gh, gw)``: BEiT's relative
    position bias (timm's ``relative_position_bias_table`` layout) instead of
    ``attn_bias``, for q ``(*batch, heads, N, D)`` and N = gh * gw patch tokens, or one
    class token first and then them. Logit (i, j) adds ``rel_pos_table[index[i, j], h]``:
    patch tokens at offset (dy, dx) = pos(i) - pos(j) read row
    (dy + gh - 1)(2gw - 1) + dx + gw - 1, and with a class token the last three of
    T = (2gh - 1)(2gw - 1) + 3 rows are class -> patch, patch -> class, class -> class
    (timm's ``gen_relative_position_index``). The kernels gather it by index arithmetic
    (no ``(heads, N, N)`` bias is formed); its gradient comes back in the table's shape.

    ``dropout_p`` drops attention probabilities (kept ones scaled by 1 / (1 - p)). On
    the Triton / CUDA backends the mask is a hash of a seed that each call draws from
    the generator of q's device (``torch.manual_seed`` controls it) into a tensor the
    kernels read on the device: no host sync, and a CUDA graph draws a new seed on
    every replay. The backward recomputes the mask from the saved seed. The reference
    backend uses torch's own attention dropout; the two draw different masks for the
    same seed.

    Returns ``(*batch, Nq, D)`` in q's dtype (q, k, v share one dtype: float32,
    float16, bfloat16, or float64 on the reference). Gradients are deterministic on
    every backend (no float atomics). backend: None (automatic), "reference",
    "triton" or "cuda"; the kernels take head dims up to 128.

    Under ``torch.autocast`` (any device type) q, k, v are cast to the autocast dtype
    and the operator runs in it (float32 accumulation, output in that dtype); a
    float32 ``attn_bias`` is read as is (an fp32 parameter keeps fp32 gradients).
    """
    return _attention((q, k, v), attn_bias, scale, dropout_p, backend, rel_pos_table,
                      rel_pos_grid)


def scaled_dot_product_attention_qkvpacked(qkv, attn_bias=None, *, scale=None, dropout_p=0.0,
                                           rel_pos_table=None, rel_pos_grid=None, backend=None):
    """``scaled_dot_product_attention(q, k, v, ...)`` of one packed projection
    ``qkv: (B, N, 3, heads, D)`` (timm's ``qkv(x).reshape(B, N, 3, heads, D)``), q, k, v
    being its ``(B, heads, N, D)`` slices; same keywords, returns ``(B, heads, N, D)``.
    Its gradient comes back as one ``(B, N, 3, heads, D)`` tensor that the Triton and
    CUDA kernels write in place; through the three slices autograd would stack their
    gradients into it, a copy of the whole projection gradient (the reference backend
    unbinds)."""
    _checks.check_tensor("qkv", qkv, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape (B, N, 3, heads, D), got {tuple(qkv.shape)}")
    return _attention((qkv,), attn_bias, scale, dropout_p, backend, rel_pos_table,
                      rel_pos_grid)


def _attention(tokens, attn_bias, scale, dropout_p, backend, table=None, grid=None):
    """``tokens``: (q, k, v) or (qkv,)."""
    low = _backend.autocast_dtype(tokens[0])
    if low is not None:
        with _backend.autocast_disabled(tokens[0]):
            return _attention(tuple(_backend.autocast_cast(t, low) for t in tokens),
                              _backend.autocast_cast(attn_bias, low, keep_float32=True),
                              scale, dropout_p, backend,
                              _backend.autocast_cast(table, low, keep_float32=True), grid)
    q, k, v = tokens if len(tokens) == 3 else _unpack(tokens[0])
    _check_args(q, k, v, attn_bias, scale, dropout_p)
    _check_table(q, k, attn_bias, table, grid)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    backend = _backend.choose(_OP, backend, lambda b: _reasons(b, q, k, v, attn_bias, table),
                              device=q.device)
    if backend == "reference":
        return reference.scaled_dot_product_attention(q, k, v, attn_bias, scale=scale,
                                                      dropout_p=dropout_p, rel_pos_table=table,
                                                      rel_pos_grid=grid)
    seed = dropout_seed(q.device) if dropout_p > 0.0 else None
    fwd = (torch.ops.pyvit_ops.scaled_dot_product_attention_fwd if len(tokens) == 3 else
           torch.ops.pyvit_ops.scaled_dot_product_attention_qkvpacked_fwd)
    out, _ = fwd(*tokens, attn_bias if table is None else table, scale, dropout_p, seed, backend,
                 None if grid is None else list(grid))
    return out


def dropout_seed(device):
    """The dropout seed of one call: a one-element int64 tensor drawn on ``device`` by its
    default generator, which the kernels read in device memory. On CUDA the draw is
    graph-safe: each replay of a captured graph advances the generator's Philox offset,
    so each replay draws a new seed."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)
