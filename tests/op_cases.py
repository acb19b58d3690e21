"""Tiny calls of every public operator and nn module, shared by the autocast,
determinism and bad-input tests, and the helpers of the bad-input tables in each
operator's test file.

An ``OpCase`` makes fresh leaf tensors (``inputs``: activations; ``params``: tensors
that are parameters in a model: bias tables, pads, ghost filters, a learned bias)
and calls its operator on them with a given backend. Shapes are small for the
interpreter and host emulation but still hit the edges: Nq != Nk, head dims that
are not powers of two, broadcast biases, windows padded on both axes with a shift,
image borders, strided pooling.
"""
import pytest
import torch

import pyvit_ops
from pyvit_ops.testing import host

BACKENDS = ("reference", "triton", "cuda")


class GridRecorder:
    """Stands in for a Triton kernel: records the grid of each launch into ``grids``
    (its own list by default) and runs nothing."""

    def __init__(self, grids=None):
        self.grids = [] if grids is None else grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def use_backend(backend):
    """The cuda backend runs the kernels' source on CPU tensors through the
    host-emulation build: load it (built once, cached)."""
    if backend == "cuda":
        host.load()


class OpCase:
    def __init__(self, name, call, inputs, params=()):
        self.name, self.call = name, call
        self._inputs, self._params = inputs, params

    def tensors(self, dtype=torch.float32, seed=0, grad=True, param_dtype=None):
        """Fresh leaves (inputs in ``dtype``, params in ``param_dtype`` or ``dtype``);
        same values for the same seed."""
        g = torch.Generator().manual_seed(seed)
        made = [torch.randn(s, generator=g).to(dtype) for s in self._inputs]
        made += [torch.randn(s, generator=g).to(param_dtype or dtype) for s in self._params]
        return [t.requires_grad_(grad) for t in made]

    @property
    def num_inputs(self):
        return len(self._inputs)

    def __repr__(self):
        return self.name


def _sdpa(q, k, v, *bias, backend):
    return pyvit_ops.scaled_dot_product_attention(q, k, v, *bias, scale=0.4, backend=backend)


def _window(window_size, shift_size):
    def call(q, k, v, table, pad_k, pad_v, backend):
        return pyvit_ops.window_attention(q, k, v, table, window_size=window_size,
                                          shift_size=shift_size, pad_kv=(pad_k, pad_v),
                                          backend=backend)
    return call


def _elsa(kernel_size, dilation):
    def call(v, attn, ghost_mul, ghost_add, backend):
        return pyvit_ops.elsa_attention(v, attn, ghost_mul, ghost_add, kernel_size=kernel_size,
                                        dilation=dilation, backend=backend)
    return call


def _avg_pool(x, backend):
    return pyvit_ops.avg_pool2d(x, 3, stride=2, padding=1, backend=backend)


def _poolformer(x, backend):
    return pyvit_ops.poolformer_pool(x, 3, backend=backend)


# (B=2, heads=2, Nq=5, Nk=7, D=12): Nq != Nk, D not a power of two.
_Q, _KV = (2, 2, 5, 12), (2, 2, 7, 12)
OP_CASES = [
    OpCase("scaled_dot_product_attention", _sdpa, [_Q, _KV, _KV]),
    # Broadcast biases: the gradient is reduced over the broadcast dims in the kernels.
    OpCase("scaled_dot_product_attention_bias_heads", _sdpa, [_Q, _KV, _KV], [(2, 5, 7)]),
    OpCase("scaled_dot_product_attention_bias_keys", _sdpa, [_Q, _KV, _KV], [(2, 1, 1, 7)]),
    OpCase("scaled_dot_product_attention_class_token", _sdpa, [(2, 2, 1, 12), _KV, _KV], [(1, 7)]),
    # 5 x 3 grid, 2 x 2 windows: padding on both axes, a shift, 6 windows, 2 heads.
    OpCase("window_attention", _window(2, 1), [(1, 5, 3, 2, 4)] * 3, [(9, 2), (2, 4), (2, 4)]),
    # 2 heads of 2 channels, 3 x 3 window with dilation 2 on a 5 x 4 image (every tap
    # leaves the image somewhere), 2 samples (the ghost gradients sum over them).
    OpCase("elsa_attention", _elsa(3, 2), [(2, 4, 5, 4), (2, 18, 5, 4)], [(4, 3, 3), (4, 3, 3)]),
    OpCase("avg_pool2d", _avg_pool, [(1, 2, 5, 4)]),
    OpCase("poolformer_pool", _poolformer, [(2, 3, 5, 4)]),
]


class ModuleCase:
    def __init__(self, name, make, shape):
        self.name, self.make, self.shape = name, make, shape

    def build(self, backend, seed=0):
        torch.manual_seed(seed)
        module = self.make()
        module.backend = backend
        return module

    def __repr__(self):
        return self.name


def _module_cases():
    nn = pyvit_ops.nn
    return [
        ModuleCase("Attention", lambda: nn.Attention(24, num_heads=2, qkv_bias=True), (2, 5, 24)),
        ModuleCase("ClassAttn", lambda: nn.ClassAttn(24, num_heads=2, qkv_bias=True), (2, 5, 24)),
        ModuleCase("WindowAttention", lambda: nn.WindowAttention(8, 2, window_size=2, shift_size=1),
                   (1, 5, 3, 8)),
        ModuleCase("ELSA", lambda: nn.ELSA(8, 2, kernel_size=3), (1, 4, 5, 8)),
        ModuleCase("Pooling", lambda: nn.Pooling(3), (1, 2, 5, 4)),
    ]


MODULE_CASES = _module_cases()


def run_backward(fn, leaves, seed=1):
    """``fn(*leaves)`` and the gradients of every leaf that requires grad, for a fixed
    random cotangent (a plain sum would hide errors that cancel)."""
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(cot)
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


# ------------------------------------------------------------------ bad input


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def meta(*shape):
    """A tensor on the "meta" device, for a device mix with CPU tensors: the device check
    runs before anything touches the data."""
    return torch.empty(*shape, device="meta")


class ValidCall:
    """``call(**change)``: the operator ``op`` on valid arguments (fresh tensors from
    ``make_args()``) with ``change`` replacing some of them; the arguments named in
    ``positional`` are passed by position."""

    def __init__(self, op, positional, make_args):
        self.op, self.positional, self.make_args = op, positional, make_args
        self.name = op.__name__

    def __call__(self, **change):
        args = {**self.make_args(), **change}
        positional = [args.pop(n) for n in self.positional]
        return self.op(*positional, **args)

    def __repr__(self):
        return self.name


VALID_CALLS = {call.name: call for call in [
    ValidCall(pyvit_ops.scaled_dot_product_attention, ("q", "k", "v"), lambda: dict(
        q=randn(2, 3, 4), k=randn(2, 5, 4), v=randn(2, 5, 4), attn_bias=randn(3, 5), scale=None,
        dropout_p=0.0, backend=None)),
    # heads = 2, D = 4.
    ValidCall(pyvit_ops.window_attention, ("q", "k", "v"), lambda: dict(
        q=randn(1, 5, 3, 2, 4), k=randn(1, 5, 3, 2, 4), v=randn(1, 5, 3, 2, 4),
        rel_pos_bias_table=randn(9, 2), window_size=2, shift_size=1, scale=None,
        pad_kv=(randn(2, 4), randn(2, 4)), mask_value=-100.0, backend=None)),
    ValidCall(pyvit_ops.elsa_attention, ("v", "attn"), lambda: dict(
        v=randn(1, 4, 4, 5), attn=randn(1, 18, 4, 5), ghost_mul=randn(4, 3, 3),
        ghost_add=randn(4, 3, 3), kernel_size=3, dilation=1, apply_softmax=True, backend=None)),
    ValidCall(pyvit_ops.avg_pool2d, ("x",), lambda: dict(
        x=randn(1, 2, 5, 4), kernel_size=3, stride=1, padding=None, subtract_input=False,
        backend=None)),
    ValidCall(pyvit_ops.poolformer_pool, ("x", "pool_size"), lambda: dict(
        x=randn(1, 2, 5, 4), pool_size=3, backend=None)),
]}


def _describe(value):
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        shape = "x".join(map(str, value.shape))
        return f"{dtype}[{shape}]" + ("@meta" if value.is_meta else "")
    if isinstance(value, tuple):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    return repr(value)


def bad_call(call, change, error, text):
    """A row of a bad-input table: ``call(**change)`` (``call`` a ValidCall) raises
    ``error`` with ``text`` in its message (the argument's name first, as every
    pyvit_ops message starts). The row id starts with the operator's name."""
    name = ",".join(f"{k}={_describe(v)}" for k, v in change.items())
    return pytest.param(call, change, error, text, id=f"{call.name}-{name}"[:90])


def bad_module_call(name, call, error, text):
    """A row of a module bad-input table: ``call()`` raises ``error`` with ``text`` in
    its message."""
    return pytest.param(call, error, text, id=name)


def module_forward(make, shape, dtype=torch.float32):
    """A call of a fresh module ``make()`` on an input of ``shape``."""
    return lambda: make()(randn(*shape, dtype=dtype))


def assert_rejects(call, error, text):
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value)
