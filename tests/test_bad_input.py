"""Bad input for every public function and module: the error type, and a message that
names the argument. Plus NaN / inf inputs, which every backend propagates like the
reference, and empty tensors, which give empty results instead of crashing.

The table ``BAD_CALLS`` has one row per (callable, argument, bad value): the change
from a valid call, the exception type and the text the message must contain (the
argument's name first, as every pyvit_ops message starts). A device mix uses a "meta"
tensor beside CPU tensors: the device check runs before anything touches the data.
"""
import pytest
import torch
from torch import nn

import pyvit_ops
from pyvit_ops import BackendUnavailableError
from op_cases import OP_CASES, use_backend


def _r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def _sdpa(**change):
    args = dict(q=_r(2, 3, 4), k=_r(2, 5, 4), v=_r(2, 5, 4), attn_bias=_r(3, 5), scale=None,
                dropout_p=0.0, backend=None)
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return pyvit_ops.scaled_dot_product_attention(q, k, v, **args)


def _window(**change):
    heads, D = 2, 4
    args = dict(q=_r(1, 5, 3, heads, D), k=_r(1, 5, 3, heads, D), v=_r(1, 5, 3, heads, D),
                rel_pos_bias_table=_r(9, heads), window_size=2, shift_size=1, scale=None,
                pad_kv=(_r(heads, D), _r(heads, D)), mask_value=-100.0, backend=None)
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return pyvit_ops.window_attention(q, k, v, **args)


def _elsa(**change):
    args = dict(v=_r(1, 4, 4, 5), attn=_r(1, 18, 4, 5), ghost_mul=_r(4, 3, 3),
                ghost_add=_r(4, 3, 3), kernel_size=3, dilation=1, apply_softmax=True,
                backend=None)
    args.update(change)
    v, attn = args.pop("v"), args.pop("attn")
    return pyvit_ops.elsa_attention(v, attn, **args)


def _pool(**change):
    args = dict(x=_r(1, 2, 5, 4), kernel_size=3, stride=1, padding=None, subtract_input=False,
                backend=None)
    args.update(change)
    return pyvit_ops.avg_pool2d(args.pop("x"), **args)


def _poolformer(**change):
    args = dict(x=_r(1, 2, 5, 4), pool_size=3, backend=None)
    args.update(change)
    return pyvit_ops.poolformer_pool(args.pop("x"), args.pop("pool_size"), **args)


def _describe(value):
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        shape = "x".join(map(str, value.shape))
        return f"{dtype}[{shape}]" + ("@meta" if value.is_meta else "")
    if isinstance(value, tuple):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    return repr(value)


# Row ids start with the operator's name, so ``-k <operator>`` selects its rows.
_OPERATORS = {_sdpa: "scaled_dot_product_attention", _window: "window_attention",
              _elsa: "elsa_attention", _pool: "avg_pool2d", _poolformer: "poolformer_pool"}


def _row(fn, change, error, text):
    name = ",".join(f"{k}={_describe(v)}" for k, v in change.items())
    return pytest.param(fn, change, error, text, id=f"{_OPERATORS[fn]}-{name}"[:90])


BAD_CALLS = [
    # ---- scaled_dot_product_attention
    _row(_sdpa, dict(q=[[1.0]]), TypeError, "q: expected a torch.Tensor"),
    _row(_sdpa, dict(q=_r(3, 4)), ValueError, "q: expected at least 3 dims"),
    _row(_sdpa, dict(q=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "q: expected dtype"),
    _row(_sdpa, dict(q=_r(2, 3, 0), k=_r(2, 5, 0), v=_r(2, 5, 0)), ValueError,
         "q: expected a head dim"),
    _row(_sdpa, dict(k=_r(2, 5, 4, dtype=torch.float16)), TypeError, "k: expected dtype"),
    _row(_sdpa, dict(k=_r(3, 5, 4)), ValueError, "k: expected shape"),
    _row(_sdpa, dict(k=_r(2, 5, 8), v=_r(2, 5, 8)), ValueError, "k: expected shape"),
    _row(_sdpa, dict(v=_r(2, 6, 4)), ValueError, "v: expected the shape of k"),
    _row(_sdpa, dict(v=_r(2, 5, 4, dtype=torch.float64)), TypeError, "v: expected dtype"),
    _row(_sdpa, dict(k=_meta(2, 5, 4)), ValueError, "k: expected device cpu"),
    _row(_sdpa, dict(attn_bias=_meta(3, 5)), ValueError, "attn_bias: expected device cpu"),
    _row(_sdpa, dict(attn_bias=[0.0]), TypeError, "attn_bias: expected a torch.Tensor"),
    _row(_sdpa, dict(attn_bias=_r(4, 5)), ValueError, "attn_bias: expected a shape broadcastable"),
    _row(_sdpa, dict(attn_bias=_r(3, 3, 5)), ValueError,
         "attn_bias: expected a shape broadcastable"),
    _row(_sdpa, dict(attn_bias=torch.ones(3, 5, dtype=torch.int32)), TypeError,
         "attn_bias: expected dtype bool, float32"),
    _row(_sdpa, dict(attn_bias=_r(3, 5, dtype=torch.float16)), TypeError,
         "attn_bias: expected dtype bool, float32"),
    _row(_sdpa, dict(scale="0.5"), TypeError, "scale: expected a float"),
    _row(_sdpa, dict(scale=float("nan")), ValueError, "scale: expected a finite float"),
    _row(_sdpa, dict(scale=float("inf")), ValueError, "scale: expected a finite float"),
    _row(_sdpa, dict(dropout_p=1.5), ValueError, "dropout_p: expected a float in [0, 1]"),
    _row(_sdpa, dict(dropout_p=-0.1), ValueError, "dropout_p: expected a float in [0, 1]"),
    _row(_sdpa, dict(dropout_p="0.1"), TypeError, "dropout_p: expected a float"),
    _row(_sdpa, dict(backend="cudnn"), ValueError, "backend: expected one of"),
    _row(_sdpa, dict(q=_r(2, 3, 4, dtype=torch.float64), k=_r(2, 5, 4, dtype=torch.float64),
                     v=_r(2, 5, 4, dtype=torch.float64), attn_bias=None, backend="triton"),
         BackendUnavailableError, "float64 runs only on the reference backend"),
    _row(_sdpa, dict(q=_r(2, 3, 160), k=_r(2, 5, 160), v=_r(2, 5, 160), backend="triton"),
         BackendUnavailableError, "head dim 160 > 128"),
    _row(_sdpa, dict(q=_meta(2, 3, 4), k=_meta(2, 5, 4), v=_meta(2, 5, 4), attn_bias=None,
                     backend="triton"), BackendUnavailableError, "tensors on ['meta']"),
    # ---- window_attention
    _row(_window, dict(q=_r(5, 3, 2, 4)), ValueError, "q: expected a 5-D tensor"),
    _row(_window, dict(q=torch.ones(1, 5, 3, 2, 4, dtype=torch.int32)), TypeError,
         "q: expected dtype"),
    _row(_window, dict(q=_r(1, 5, 3, 2, 0), k=_r(1, 5, 3, 2, 0), v=_r(1, 5, 3, 2, 0), pad_kv=None),
         ValueError, "q: expected a head dim"),
    _row(_window, dict(k=_r(1, 5, 4, 2, 4)), ValueError, "k: expected shape (1, 5, 3, 2, 4)"),
    _row(_window, dict(v=_r(1, 5, 3, 2, 4, dtype=torch.bfloat16)), TypeError, "v: expected dtype"),
    _row(_window, dict(v=_meta(1, 5, 3, 2, 4)), ValueError, "v: expected device cpu"),
    _row(_window, dict(window_size=0), ValueError, "window_size: expected positive sizes"),
    _row(_window, dict(window_size=(6, 2)), ValueError, "window_size: expected at most the grid"),
    _row(_window, dict(window_size=2.0), TypeError, "window_size: expected an int or a pair"),
    _row(_window, dict(window_size=(2, 2, 2)), TypeError, "window_size: expected an int or a pair"),
    _row(_window, dict(shift_size=2), ValueError, "shift_size: expected 0 <= shift < window_size"),
    _row(_window, dict(shift_size=(-1, 0)), ValueError, "shift_size: expected 0 <= shift"),
    _row(_window, dict(shift_size=True), TypeError, "shift_size: expected an int or a pair"),
    _row(_window, dict(rel_pos_bias_table=_r(9)), ValueError, "rel_pos_bias_table: expected a 2-D"),
    _row(_window, dict(rel_pos_bias_table=_r(9, 3)), ValueError,
         "rel_pos_bias_table: expected shape (9, 2)"),
    _row(_window, dict(rel_pos_bias_table=_r(9, 2, dtype=torch.float16)), TypeError,
         "rel_pos_bias_table: expected dtype"),
    _row(_window, dict(rel_pos_bias_table=_meta(9, 2)), ValueError,
         "rel_pos_bias_table: expected device cpu"),
    _row(_window, dict(pad_kv=_r(2, 4)), TypeError, "pad_kv: expected a pair"),
    _row(_window, dict(pad_kv=(_r(2, 4),)), TypeError, "pad_kv: expected a pair"),
    _row(_window, dict(pad_kv=(_r(2, 5), _r(2, 4))), ValueError,
         "pad_kv[0]: expected shape (2, 4)"),
    _row(_window, dict(pad_kv=(_r(2, 4), _r(2, 4, dtype=torch.float64))), TypeError,
         "pad_kv[1]: expected dtype"),
    _row(_window, dict(pad_kv=(_r(2, 4), _meta(2, 4))), ValueError, "pad_kv[1]: expected device"),
    _row(_window, dict(scale="x"), TypeError, "scale: expected a float"),
    _row(_window, dict(scale=float("nan")), ValueError, "scale: expected a nonzero finite"),
    _row(_window, dict(mask_value=None), TypeError, "mask_value: expected a float"),
    _row(_window, dict(mask_value=float("nan")), ValueError, "mask_value: expected a number below"),
    _row(_window, dict(backend=1), ValueError, "backend: expected one of"),
    _row(_window, dict(window_size=9, shift_size=0, rel_pos_bias_table=_r(289, 2),
                       q=_r(1, 9, 9, 2, 4), k=_r(1, 9, 9, 2, 4), v=_r(1, 9, 9, 2, 4),
                       pad_kv=None, backend="cuda"),
         BackendUnavailableError, "window area 9x9 = 81 > 64"),
    # ---- elsa_attention
    _row(_elsa, dict(v=_r(4, 4, 5)), ValueError, "v: expected a 4-D tensor"),
    _row(_elsa, dict(v=torch.ones(1, 4, 4, 5, dtype=torch.int64)), TypeError, "v: expected dtype"),
    _row(_elsa, dict(v=_r(1, 3, 4, 5), ghost_mul=None, ghost_add=None), ValueError,
         "v: expected a channel count divisible by the 2 heads"),
    _row(_elsa, dict(attn=_r(1, 18, 4)), ValueError, "attn: expected a 4-D tensor"),
    _row(_elsa, dict(attn=_r(1, 17, 4, 5)), ValueError, "attn: expected G * kernel_size**2"),
    _row(_elsa, dict(attn=_r(1, 18, 5, 5)), ValueError, "attn: expected shape (1, 18, 4, 5)"),
    _row(_elsa, dict(attn=_r(2, 18, 4, 5)), ValueError, "attn: expected shape (1, 18, 4, 5)"),
    _row(_elsa, dict(attn=_r(1, 18, 4, 5, dtype=torch.float16)), TypeError, "attn: expected dtype"),
    _row(_elsa, dict(attn=_meta(1, 18, 4, 5)), ValueError, "attn: expected device cpu"),
    _row(_elsa, dict(kernel_size=4), ValueError, "kernel_size: expected an odd"),
    _row(_elsa, dict(kernel_size=0), ValueError, "kernel_size: expected an int >= 1"),
    _row(_elsa, dict(kernel_size=3.0), TypeError, "kernel_size: expected an int"),
    _row(_elsa, dict(dilation=0), ValueError, "dilation: expected an int >= 1"),
    _row(_elsa, dict(dilation=(1, 1)), TypeError, "dilation: expected an int"),
    _row(_elsa, dict(apply_softmax=1), TypeError, "apply_softmax: expected a bool"),
    _row(_elsa, dict(ghost_mul=_r(4, 3)), ValueError, "ghost_mul: expected a 3-D"),
    _row(_elsa, dict(ghost_mul=_r(4, 5, 5)), ValueError, "ghost_mul: expected shape (4, 3, 3)"),
    _row(_elsa, dict(ghost_add=torch.ones(4, 3, 3, dtype=torch.int32)), TypeError,
         "ghost_add: expected dtype"),
    _row(_elsa, dict(ghost_add=_meta(4, 3, 3)), ValueError, "ghost_add: expected device cpu"),
    _row(_elsa, dict(ghost_add=[1.0]), TypeError, "ghost_add: expected a torch.Tensor"),
    _row(_elsa, dict(kernel_size=15, attn=_r(1, 450, 4, 5), ghost_mul=None, ghost_add=None,
                     backend="cuda"), BackendUnavailableError, "kernel_size 15 > 13"),
    # ---- avg_pool2d / poolformer_pool
    _row(_pool, dict(x=_r(2, 5, 4)), ValueError, "x: expected a 4-D tensor"),
    _row(_pool, dict(x=torch.ones(1, 2, 5, 4, dtype=torch.uint8)), TypeError, "x: expected dtype"),
    _row(_pool, dict(x=_r(1, 0, 5, 4)), ValueError, "x: expected at least one channel"),
    _row(_pool, dict(x=_r(1, 2, 2, 2), kernel_size=5, padding=1), ValueError,
         "x: spatial size (2, 2) is too small"),
    _row(_pool, dict(kernel_size=0), ValueError, "kernel_size: expected sizes >= 1"),
    _row(_pool, dict(kernel_size="3"), TypeError, "kernel_size: expected an int or a pair"),
    _row(_pool, dict(stride=0), ValueError, "stride: expected strides >= 1"),
    _row(_pool, dict(stride=(1, 2, 3)), TypeError, "stride: expected an int or a pair"),
    _row(_pool, dict(padding=2), ValueError, "padding: expected 0 <= padding <= kernel_size // 2"),
    _row(_pool, dict(padding=-1), ValueError, "padding: expected 0 <= padding"),
    _row(_pool, dict(subtract_input="yes"), TypeError, "subtract_input: expected a bool"),
    _row(_pool, dict(subtract_input=True, stride=2), ValueError, "subtract_input: needs stride"),
    _row(_pool, dict(subtract_input=True, kernel_size=4), ValueError,
         "subtract_input: needs an output the size of x"),
    _row(_pool, dict(backend="Triton"), ValueError, "backend: expected one of"),
    _row(_pool, dict(x=_meta(1, 2, 5, 4), backend="cuda"), BackendUnavailableError,
         "the cuda backend does not run on meta tensors"),
    _row(_poolformer, dict(pool_size=4), ValueError, "pool_size: expected an odd"),
    _row(_poolformer, dict(pool_size=0), ValueError, "pool_size: expected an int >= 1"),
    _row(_poolformer, dict(pool_size=(3, 2)), ValueError, "pool_size: expected an odd"),
    _row(_poolformer, dict(pool_size=3.0), TypeError, "pool_size: expected an int or a pair"),
    _row(_poolformer, dict(x=_r(1, 2, 5)), ValueError, "x: expected a 4-D tensor"),
]


@pytest.mark.parametrize("fn, change, error, text", BAD_CALLS)
def test_bad_argument(fn, change, error, text):
    with pytest.raises(error) as info:
        fn(**change)
    assert text in str(info.value)


# ------------------------------------------------------------------ modules and patch_timm


def _timm():
    return pytest.importorskip("timm", reason="from_timm / patch_timm wrap timm modules")


def _forward(make, shape, dtype=torch.float32):
    return lambda: make()(_r(*shape, dtype=dtype))


P = pyvit_ops.nn
BAD_MODULE_CALLS = [
    # (id, call, error, text)
    ("Attention-num_heads", lambda: P.Attention(10, num_heads=3), ValueError,
     "num_heads: must divide"),
    ("Attention-x-C", _forward(lambda: P.Attention(8, 2), (2, 5, 6)), ValueError,
     "x: expected shape (B, N, C) with C = 8"),
    ("Attention-x-rank", _forward(lambda: P.Attention(8, 2), (5, 8)), ValueError,
     "x: expected a 3-D"),
    ("Attention-x-dtype", _forward(lambda: P.Attention(8, 2), (2, 5, 8), torch.int64), TypeError,
     "x: expected dtype"),
    ("Attention-mask-causal",
     lambda: P.Attention(8, 2)(_r(2, 5, 8), attn_mask=torch.ones(5, 5, dtype=torch.bool),
                               is_causal=True), ValueError, "attn_mask: must be None"),
    ("Attention-mask-shape", lambda: P.Attention(8, 2)(_r(2, 5, 8), attn_mask=_r(4, 4)),
     ValueError, "attn_bias: expected a shape broadcastable"),
    ("Attention-from_timm-Linear", lambda: P.Attention.from_timm(nn.Linear(4, 4)), TypeError,
     "module: expected a timm Attention"),
    ("Attention-from_timm-tensor", lambda: P.Attention.from_timm(_r(3)), TypeError,
     "module: expected a timm Attention"),
    ("ClassAttn-num_heads", lambda: P.ClassAttn(10, num_heads=4), ValueError,
     "num_heads: must divide"),
    ("ClassAttn-x-C", _forward(lambda: P.ClassAttn(8, 2), (2, 5, 4)), ValueError,
     "x: expected shape (B, N, C) with C = 8"),
    ("ClassAttn-from_timm-Linear", lambda: P.ClassAttn.from_timm(nn.Linear(4, 4)), TypeError,
     "module: expected a timm ClassAttn"),
    ("WindowAttention-num_heads", lambda: P.WindowAttention(10, 3), ValueError,
     "num_heads: must divide"),
    ("WindowAttention-attn_drop", lambda: P.WindowAttention(8, 2, attn_drop=0.1), ValueError,
     "attn_drop: window attention has no dropout"),
    ("WindowAttention-window_size", lambda: P.WindowAttention(8, 2, window_size=(2, 2, 2)),
     TypeError, "window_size: expected an int or a pair"),
    ("WindowAttention-x-C", _forward(lambda: P.WindowAttention(8, 2, window_size=2), (1, 4, 4, 6)),
     ValueError, "x: expected shape (B, H, W, C) with C = 8"),
    ("WindowAttention-x-rank",
     _forward(lambda: P.WindowAttention(8, 2, window_size=2), (1, 4, 4, 1, 8)),
     ValueError, "x: expected a 4-D"),
    ("WindowAttention-grid-smaller-than-window",
     _forward(lambda: P.WindowAttention(8, 2, window_size=4), (1, 3, 5, 8)), ValueError,
     "window_size: expected at most the grid"),
    ("WindowAttention-shift", lambda: P.WindowAttention(8, 2, window_size=2)(
        _r(1, 4, 4, 8), shift_size=2), ValueError, "shift_size: expected 0 <= shift"),
    ("WindowAttention-window-vs-table", lambda: P.WindowAttention(8, 2, window_size=2)(
        _r(1, 4, 4, 8), window_size=3), ValueError, "rel_pos_bias_table: expected shape (25, 2)"),
    ("WindowAttention-from_timm-Linear", lambda: P.WindowAttention.from_timm(nn.Linear(4, 4)),
     TypeError, "module: expected a timm WindowAttention"),
    ("ELSA-stride", lambda: P.ELSA(8, 2, stride=2), ValueError, "stride: the fused ELSA operator"),
    ("ELSA-num_heads", lambda: P.ELSA(8, 3), ValueError, "num_heads: expected a divisor of dim_v"),
    ("ELSA-kernel_size", lambda: P.ELSA(8, 2, kernel_size=4), ValueError,
     "kernel_size: expected an odd"),
    ("ELSA-dilation", lambda: P.ELSA(8, 2, dilation=0), ValueError,
     "dilation: expected an int >= 1"),
    ("ELSA-x-C", _forward(lambda: P.ELSA(8, 2, kernel_size=3), (1, 4, 5, 6)), ValueError,
     "x: expected shape (B, H, W, C) with C = 8"),
    ("ELSA-x-rank", _forward(lambda: P.ELSA(8, 2, kernel_size=3), (4, 5, 8)), ValueError,
     "x: expected a 4-D"),
    ("Pooling-pool_size", lambda: P.Pooling(2), ValueError, "pool_size: expected an odd"),
    ("Pooling-pool_size-type", lambda: P.Pooling("3"), TypeError, "pool_size: expected an int"),
    ("Pooling-x-rank", _forward(lambda: P.Pooling(3), (2, 5, 4)), ValueError, "x: expected a 4-D"),
    ("patch_timm-not-a-module", lambda: pyvit_ops.patch_timm([nn.Linear(2, 2)]), TypeError,
     "model: expected a torch.nn.Module"),
    ("patch_timm-nothing-to-patch", lambda: pyvit_ops.patch_timm(nn.Sequential(nn.Linear(2, 2))),
     ValueError, "model: no timm module to patch in Sequential"),
    ("patch_timm-backend", lambda: pyvit_ops.patch_timm(P.Pooling(3), backend="gpu"), ValueError,
     "backend: expected one of"),
]


@pytest.mark.parametrize("name, call, error, text", [pytest.param(*row, id=row[0])
                                                     for row in BAD_MODULE_CALLS])
def test_bad_module_argument(name, call, error, text):
    if name.startswith("patch_timm"):
        _timm()
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value)


def test_from_timm_rejects_unsupported_timm_modules():
    timm = _timm()
    from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

    gated = timm.layers.Attention(8, num_heads=2)
    gated.gate = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="module: gated timm Attention"):
        P.Attention.from_timm(gated)
    with pytest.raises(ValueError, match="module: attn_drop=0.1"):
        P.WindowAttention.from_timm(TimmWindowAttention(8, 2, window_size=2, attn_drop=0.1))
    # A timm module of another family: the attributes from_timm needs are not there.
    with pytest.raises(TypeError, match="module: expected a timm WindowAttention"):
        P.WindowAttention.from_timm(timm.layers.Attention(8, num_heads=2))


# ------------------------------------------------------------------ NaN / inf, empty tensors

NAN_CASES = [c for c in OP_CASES if c.name in
             ("scaled_dot_product_attention_bias_heads", "window_attention", "elsa_attention",
              "avg_pool2d", "poolformer_pool")]


def _poison_params():
    for case in NAN_CASES:
        for index in range(len(case.tensors(grad=False))):
            yield pytest.param(case, index, id=f"{case.name}-arg{index}")


def _poison(t, g):
    """NaN, +inf and -inf at three random positions of ``t``."""
    t = t.clone()
    flat = t.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[:3]
    for i, value in zip(where.tolist(), (float("nan"), float("inf"), float("-inf"))):
        flat[i] = value
    return t


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case, index", _poison_params())
def test_nan_and_inf_propagate_like_the_reference(case, index, backend):
    use_backend(backend)
    tensors = case.tensors(grad=False)
    tensors[index] = _poison(tensors[index], torch.Generator().manual_seed(index))
    expected = case.call(*tensors, backend="reference")
    out = case.call(*tensors, backend=backend)
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        wrong = test(out) != test(expected)
        assert not wrong.any(), f"{name} at other positions than the reference: " \
                                f"{wrong.nonzero()[:5].tolist()}"
    finite = torch.isfinite(expected)
    assert finite.any(), "the poison reached every output: the test checks nothing"
    torch.testing.assert_close(out[finite], expected[finite], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_scaled_dot_product_attention_nan_query_row_is_nan(backend):
    """A NaN in a query makes its whole row NaN on the kernels; torch's math SDPA (and
    so the reference, whose parity target it is) returns a zero row there instead.
    Every other row matches the reference."""
    use_backend(backend)
    q, k, v = _r(2, 3, 4), _r(2, 5, 4), _r(2, 5, 4)
    q[1, 2, 0] = float("nan")
    out = pyvit_ops.scaled_dot_product_attention(q, k, v, backend=backend)
    expected = pyvit_ops.scaled_dot_product_attention(q, k, v, backend="reference")
    assert torch.isnan(out[1, 2]).all()
    rest = torch.ones(2, 3, dtype=torch.bool)
    rest[1, 2] = False
    torch.testing.assert_close(out[rest], expected[rest], atol=2e-3, rtol=2e-3)


EMPTY_CALLS = [
    pytest.param(lambda b: _sdpa(q=_r(0, 3, 4), k=_r(0, 5, 4), v=_r(0, 5, 4), attn_bias=None,
                                 backend=b), (0, 3, 4),
                 id="scaled_dot_product_attention-batch0"),
    pytest.param(lambda b: _sdpa(q=_r(2, 0, 4), attn_bias=None, backend=b), (2, 0, 4),
                 id="scaled_dot_product_attention-Nq0"),
    pytest.param(lambda b: _sdpa(k=_r(2, 0, 4), v=_r(2, 0, 4), attn_bias=None, backend=b),
                 (2, 3, 4), id="scaled_dot_product_attention-Nk0"),
    pytest.param(lambda b: _window(q=_r(0, 5, 3, 2, 4), k=_r(0, 5, 3, 2, 4), v=_r(0, 5, 3, 2, 4),
                                   backend=b), (0, 5, 3, 2, 4), id="window_attention-batch0"),
    pytest.param(lambda b: _elsa(v=_r(0, 4, 4, 5), attn=_r(0, 18, 4, 5), backend=b),
                 (0, 4, 4, 5), id="elsa_attention-batch0"),
    pytest.param(lambda b: _pool(x=_r(0, 2, 5, 4), backend=b), (0, 2, 5, 4),
                 id="avg_pool2d-batch0"),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("call, shape", EMPTY_CALLS)
def test_empty_tensors_give_empty_results(call, shape, backend):
    """Nothing to attend to / pool gives what the reference gives (an empty result, or
    zeros when there are no keys, as torch's SDPA), on every backend."""
    use_backend(backend)
    torch.manual_seed(0)
    out = call(backend)
    torch.manual_seed(0)
    expected = call("reference")
    assert tuple(out.shape) == shape
    torch.testing.assert_close(out, expected)
