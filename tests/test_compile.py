"""torch.library / torch.compile integration of every pyvit_ops custom op.

1. ``torch.library.opcheck`` on each ``pyvit_ops::*`` op (schema, fake tensor,
   autograd registration, AOT dispatch), backend "triton" (interpreter, conftest) and
   "cuda" (host emulation) where the host build has the op. The registered ops are
   enumerated, so a new op without a case fails the coverage test.
2. ``torch.compile(fullgraph=True)`` (no graph break) of each public operator and nn
   module on every backend, forward and backward against eager, with no recompile on
   a second call of the same shapes; also under ``torch.autocast``. Coverage tests
   tie the cases to ``pyvit_ops.__all__`` and ``pyvit_ops.nn.__all__``.
Shapes are tiny: the interpreter and host emulation are slow on CPU.
"""
import functools
import importlib
import inspect
import pkgutil

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import pyvit_ops
from pyvit_ops import _ext, capabilities
from pyvit_ops.testing import host

OPS = torch.ops.pyvit_ops


def _r(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float32, requires_grad=grad)


# ---------------------------------------------------------------- opcheck argument sets
# Each factory returns the positional args of one op call for `backend`. The backward
# ops get their saved tensors from a forward call of the same backend.


def _sdpa_fwd(backend):
    # Nq != Nk, head dim not a power of two, a float bias broadcast over the batch dim.
    return (_r(2, 3, 5), _r(2, 4, 5), _r(2, 4, 5), _r(1, 3, 4), 0.4, 0.0, None, backend)


def _sdpa_bwd(backend):
    q, k, v, bias, scale, p, seed, _ = _sdpa_fwd(backend)
    out, lse = OPS.scaled_dot_product_attention_fwd(q.detach(), k.detach(), v.detach(),
                                                    bias.detach(), scale, p, seed, backend)
    return (_r(*out.shape), q, k, v, lse, bias, scale, p, seed, True, backend)


def _sdpa_qkvpacked_fwd(backend):
    # (B, N, 3, heads, D) = (2, 4, 3, 3, 5), a float bias broadcast over the batch dim.
    return (_r(2, 4, 3, 3, 5), _r(1, 3, 4, 4), 0.4, 0.0, None, backend)


def _sdpa_qkvpacked_bwd(backend):
    qkv, bias, *params = _sdpa_qkvpacked_fwd(backend)
    out, lse = OPS.scaled_dot_product_attention_qkvpacked_fwd(qkv.detach(), bias.detach(),
                                                              *params)
    return (_r(*out.shape), qkv, lse, bias, *params[:-1], True, params[-1])


def _window_fwd(backend):
    # 5 x 3 grid, 2 x 2 windows: padding on both axes, a shift, 2 heads.
    heads, D, (wh, ww) = 2, 4, (2, 2)
    q, k, v = (_r(1, 5, 3, heads, D) for _ in range(3))
    table = _r((2 * wh - 1) * (2 * ww - 1), heads)
    # Swin V2's logit scale (cosine attention) where the backend runs it.
    cosine = "cosine" in capabilities.capability("window_attention", backend).features
    logit_scale = _r(heads, 1, 1) if cosine else None
    return (q, k, v, table, _r(heads, D), _r(heads, D), logit_scale, wh, ww, 1, 1,
            D ** -0.5, -100.0, False, backend)


def _window_bwd(backend):
    q, k, v, table, pad_k, pad_v, logit_scale, *params = _window_fwd(backend)
    leaves = (q, k, v, table, pad_k, pad_v, logit_scale)
    out, lse = OPS.window_attention_fwd(*(t if t is None else t.detach() for t in leaves),
                                        *params)
    return (_r(*out.shape), q, k, v, out, lse, table, pad_k, pad_v, logit_scale, *params[:-1],
            True, True, logit_scale is not None, params[-1])


def _window_qkvpacked_fwd(backend):
    q, k, v, *rest = _window_fwd(backend)
    return (torch.stack((q, k, v), 3).detach().requires_grad_(), *rest)


def _window_qkvpacked_bwd(backend):
    qkv, table, pad_k, pad_v, logit_scale, *params = _window_qkvpacked_fwd(backend)
    leaves = (qkv, table, pad_k, pad_v, logit_scale)
    out, lse = OPS.window_attention_qkvpacked_fwd(
        *(t if t is None else t.detach() for t in leaves), *params)
    return (_r(*out.shape), qkv, out, lse, table, pad_k, pad_v, logit_scale, *params[:-1],
            True, True, logit_scale is not None, params[-1])


def _elsa_fwd(backend):
    # 2 heads of 2 channels, 3 x 3 window on a 4 x 5 image (borders on every side).
    B, C, H, W, G, K = 1, 4, 4, 5, 2, 3
    return (_r(B, C, H, W), _r(B, G * K * K, H, W), _r(C, K, K), _r(C, K, K), K, 1, True,
            backend)


def _elsa_bwd(backend):
    v, attn, mul, add, *params = _elsa_fwd(backend)
    return (_r(*v.shape), v, attn, mul, add, *params[:-1], [True, True, True, True],
            params[-1])


def _pool_fwd(backend):
    return (_r(1, 2, 5, 4), [3, 3], [1, 1], [1, 1], True, backend)


def _pool_bwd(backend):
    x, *params = _pool_fwd(backend)
    return (_r(*x.shape), x, *params)


def _talking_heads_fwd():
    # Triton only: the custom ops take no backend (there are no CUDA C++ kernels).
    heads, D = 2, 4
    return (*(_r(1, heads, 5, D) for _ in range(3)), _r(heads, heads), _r(heads),
            _r(heads, heads), _r(heads), 0.5)


def _talking_heads_bwd():
    q, k, v, wl, bl, ww, bw, scale = _talking_heads_fwd()
    out, stats = OPS.talking_heads_attention_fwd(q, k, v, wl, bl, ww, bw, scale)
    return (_r(*out.shape), q, k, v, wl, bl, ww, bw, stats, scale)


OPCHECK_CASES = {
    "scaled_dot_product_attention_fwd": _sdpa_fwd,
    "scaled_dot_product_attention_bwd": _sdpa_bwd,
    "scaled_dot_product_attention_qkvpacked_fwd": _sdpa_qkvpacked_fwd,
    "scaled_dot_product_attention_qkvpacked_bwd": _sdpa_qkvpacked_bwd,
    "window_attention_fwd": _window_fwd,
    "window_attention_bwd": _window_bwd,
    "window_attention_qkvpacked_fwd": _window_qkvpacked_fwd,
    "window_attention_qkvpacked_bwd": _window_qkvpacked_bwd,
    "elsa_attention_fwd": _elsa_fwd,
    "elsa_attention_bwd": _elsa_bwd,
    "avg_pool2d_fwd": _pool_fwd,
    "avg_pool2d_bwd": _pool_bwd,
    "talking_heads_attention_fwd": lambda backend: _talking_heads_fwd(),
    "talking_heads_attention_bwd": lambda backend: _talking_heads_bwd(),
}


# The C++ op a custom op calls on the cuda backend, where the names differ: the packed
# forwards run the unpacked kernels on qkv's slices; SDPA's packed backward writes into
# them.
CUDA_OPS = {"scaled_dot_product_attention_qkvpacked_fwd": "scaled_dot_product_attention_fwd",
            "scaled_dot_product_attention_qkvpacked_bwd":
                "scaled_dot_product_attention_bwd_into",
            "window_attention_qkvpacked_fwd": "window_attention_fwd"}


def _registered_ops():
    # Import every operator module (not only those pyvit_ops/__init__ imports): each
    # registers its custom ops on import.
    import pyvit_ops.ops

    for info in pkgutil.iter_modules(pyvit_ops.ops.__path__):
        importlib.import_module(f"pyvit_ops.ops.{info.name}")
    return {name for name in dir(OPS)
            if isinstance(getattr(OPS, name), torch._ops.OpOverloadPacket)}


def test_every_custom_op_is_covered():
    registered = _registered_ops()
    assert len(registered) >= 8
    assert registered == set(OPCHECK_CASES), registered ^ set(OPCHECK_CASES)


# The backward ops of the attention operators have no autograd formula (no double
# backward; the avg_pool2d pair is linear, so each is the other's gradient): their
# inputs do not require grad, which opcheck would otherwise backpropagate through.
NO_DOUBLE_BACKWARD = {"scaled_dot_product_attention_bwd",
                      "scaled_dot_product_attention_qkvpacked_bwd", "window_attention_bwd",
                      "window_attention_qkvpacked_bwd", "elsa_attention_bwd",
                      "talking_heads_attention_bwd"}

KERNEL_BACKENDS = ("triton", "cuda")
BACKENDS = ("reference",) + KERNEL_BACKENDS


def _opcheck_params():
    return [pytest.param(name, backend, id=f"{name}-{backend}")
            for name in sorted(OPCHECK_CASES) for backend in KERNEL_BACKENDS]


@pytest.fixture(scope="module")
def host_ops():
    return host.load()


def _use(backend, request):
    if backend == "cuda":
        request.getfixturevalue("host_ops")


@pytest.mark.parametrize("name, backend", _opcheck_params())
def test_opcheck(name, backend, request):
    if backend == "cuda":
        _use(backend, request)
        ok, reason = _ext.has_op(CUDA_OPS.get(name, name), "cpu")
        if not ok:
            pytest.skip(f"cuda backend: {reason}")
    torch.manual_seed(0)
    args = OPCHECK_CASES[name](backend)
    if name in NO_DOUBLE_BACKWARD:
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(OPS, name), args)


# ---------------------------------------------------------------- torch.compile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles the same public functions again (other backends, dtypes):
    # without a reset they would count against dynamo's per-function recompile limit.
    torch._dynamo.reset()


def _compiled_matches_eager(fn, inputs, atol=1e-5, rtol=1e-5, autocast=None, dynamic=None):
    """Compile ``fn`` (fullgraph, ``dynamic`` as torch.compile takes it), call it twice
    with the same shapes (one compile allowed), and compare outputs and input gradients
    with eager; inside ``torch.autocast("cpu", dtype=autocast)`` when given."""
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic)

    def run(f):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
            out = f(*leaves)
        if autocast:
            assert out.dtype == autocast
        # A fixed random cotangent: a plain sum would hide errors that cancel.
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(cot)
        return out.detach(), [t.grad for t in leaves if t.requires_grad]

    expected, expected_grads = run(fn)
    for _ in range(2):
        out, grads = run(compiled)
        torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, atol=atol, rtol=rtol)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compiles"


def _sdpa_call(backend):
    def fn(q, k, v, bias):
        return pyvit_ops.scaled_dot_product_attention(q, k, v, bias, backend=backend)
    return fn, [_r(2, 3, 5), _r(2, 4, 5), _r(2, 4, 5), _r(1, 3, 4)]


def _sdpa_qkvpacked_call(backend):
    def fn(qkv, bias):
        return pyvit_ops.scaled_dot_product_attention_qkvpacked(qkv, bias, backend=backend)
    return fn, [_r(2, 4, 3, 3, 5), _r(1, 3, 4, 4)]


def _window_call(backend):
    def fn(q, k, v, table, pad_k, pad_v):
        return pyvit_ops.window_attention(q, k, v, table, window_size=2, shift_size=1,
                                          pad_kv=(pad_k, pad_v), backend=backend)
    return fn, [_r(1, 5, 3, 2, 4), _r(1, 5, 3, 2, 4), _r(1, 5, 3, 2, 4), _r(9, 2), _r(2, 4),
                _r(2, 4)]


def _window_qkvpacked_call(backend):
    def fn(qkv, table, pad_k, pad_v):
        return pyvit_ops.window_attention_qkvpacked(qkv, table, window_size=2, shift_size=1,
                                                    pad_kv=(pad_k, pad_v), backend=backend)
    return fn, [_r(1, 5, 3, 3, 2, 4), _r(9, 2), _r(2, 4), _r(2, 4)]


def _elsa_call(backend):
    def fn(v, attn, mul, add):
        return pyvit_ops.elsa_attention(v, attn, mul, add, kernel_size=3, backend=backend)
    return fn, [_r(1, 4, 4, 5), _r(1, 18, 4, 5), _r(4, 3, 3), _r(4, 3, 3)]


def _talking_heads_call(backend):
    def fn(q, k, v, wl, bl, ww, bw):
        return pyvit_ops.talking_heads_attention(q, k, v, wl, bl, ww, bw, scale=0.5,
                                                 backend=backend)
    return fn, [_r(1, 2, 5, 4), _r(1, 2, 5, 4), _r(1, 2, 5, 4), _r(2, 2), _r(2), _r(2, 2),
                _r(2)]


def _avg_pool_call(backend):
    def fn(x):
        return pyvit_ops.avg_pool2d(x, 3, stride=2, padding=1, backend=backend)
    return fn, [_r(1, 2, 5, 4)]


def _poolformer_call(backend):
    def fn(x):
        return pyvit_ops.poolformer_pool(x, 3, backend=backend)
    return fn, [_r(1, 2, 5, 4)]


OPERATOR_CASES = {
    "scaled_dot_product_attention": _sdpa_call,
    "scaled_dot_product_attention_qkvpacked": _sdpa_qkvpacked_call,
    "window_attention": _window_call,
    "window_attention_qkvpacked": _window_qkvpacked_call,
    "elsa_attention": _elsa_call,
    "avg_pool2d": _avg_pool_call,
    "poolformer_pool": _poolformer_call,
    "talking_heads_attention": _talking_heads_call,
}


def test_every_public_operator_is_covered():
    functions = {name for name in pyvit_ops.__all__
                 if inspect.isfunction(getattr(pyvit_ops, name)) and name != "patch_timm"}
    assert functions == set(OPERATOR_CASES), functions ^ set(OPERATOR_CASES)


# (backend, autocast dtype or None, tolerance): under autocast, compiled and eager may
# round the low-precision results differently.
COMPILE_MODES = [pytest.param(b, None, 1e-5, id=b) for b in BACKENDS] + [
    pytest.param(b, torch.bfloat16, 1e-2, id=f"{b}-autocast-bf16") for b in KERNEL_BACKENDS]


@pytest.mark.parametrize("backend, autocast, tol", COMPILE_MODES)
@pytest.mark.parametrize("name", list(OPERATOR_CASES))
def test_compile_operator(name, backend, autocast, tol, request):
    op = name.removesuffix("_qkvpacked").replace("poolformer_pool", "avg_pool2d")
    if backend not in capabilities.declared_backends(op):
        pytest.skip(f"{op} has no {backend} kernels")
    _use(backend, request)
    torch.manual_seed(0)
    fn, inputs = OPERATOR_CASES[name](backend)
    _compiled_matches_eager(fn, inputs, atol=tol, rtol=tol, autocast=autocast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["window_attention", "window_attention_qkvpacked"])
def test_compile_window_attention_dynamic(name, backend, request):
    # dynamic=True traces the float arguments (scale, mask_value) symbolically too:
    # their validation must not need concrete Python floats.
    _use(backend, request)
    torch.manual_seed(0)
    fn, inputs = OPERATOR_CASES[name](backend)
    _compiled_matches_eager(fn, inputs, dynamic=True)


def _module_cases():
    """name -> (module maker, input shape, the forward's other arguments)."""
    from timm.models import beit, eva, maxxvit, pvt_v2, twins
    nn = pyvit_ops.nn
    rel_mlp = functools.partial(maxxvit.RelPosMlp, window_size=(2, 2))
    return {
        "Attention": (lambda: nn.Attention(8, num_heads=2, qkv_bias=True), (2, 5, 8), {}),
        "ClassAttn": (lambda: nn.ClassAttn(8, num_heads=2, qkv_bias=True), (2, 5, 8), {}),
        "WindowAttention": (lambda: nn.WindowAttention(8, 2, window_size=2, shift_size=1),
                            (1, 5, 3, 8), {}),
        "WindowAttentionV2": (lambda: nn.WindowAttentionV2(8, 2, 2, shift_size=1),
                              (1, 5, 3, 8), {}),
        "ELSA": (lambda: nn.ELSA(8, 2, kernel_size=3), (1, 4, 5, 8), {}),
        "Pooling": (lambda: nn.Pooling(3), (1, 2, 5, 4), {}),
        "SpatialReductionAttention": (lambda: nn.SpatialReductionAttention.from_timm(
            pvt_v2.Attention(8, 2, sr_ratio=2)), (1, 20, 8), dict(feat_size=(4, 5))),
        "LocallyGroupedAttention": (lambda: nn.LocallyGroupedAttention.from_timm(
            twins.LocallyGroupedAttn(8, 2, ws=2)), (1, 15, 8), dict(size=(5, 3))),
        "EvaAttention": (lambda: nn.EvaAttention.from_timm(
            eva.EvaAttention(8, 2, norm_layer=torch.nn.LayerNorm)), (2, 5, 8), {}),
        # eval(): RelPosMlp's dropout.
        "PartitionAttention": (lambda: nn.PartitionAttention.from_timm(maxxvit.AttentionCl(
            8, 8, dim_head=4, rel_pos_cls=rel_mlp)).eval(), (1, 4, 2, 8),
            dict(window_size=2)),
        "BeitAttention": (lambda: nn.BeitAttention.from_timm(beit.Attention(
            8, 2, qkv_bias=True, window_size=(2, 2))), (2, 5, 8), {}),
        "TalkingHeadsAttention": (lambda: nn.TalkingHeadsAttention(8, num_heads=2,
                                                                   qkv_bias=True),
                                  (2, 5, 8), {}),
    }


def test_every_module_is_covered():
    assert set(pyvit_ops.nn.__all__) == set(_module_cases())


# WindowAttentionV2's cosine attention and talking heads run where the capability data
# says they do.
@pytest.mark.parametrize("name,backend", [
    (name, backend) for name in pyvit_ops.nn.__all__ for backend in BACKENDS
    if (name != "WindowAttentionV2" or
        "cosine" in capabilities.capability("window_attention", backend).features)
    and (name != "TalkingHeadsAttention" or
         backend in capabilities.declared_backends("talking_heads_attention"))])
def test_compile_module(name, backend, request):
    _use(backend, request)
    torch.manual_seed(0)
    make, shape, kwargs = _module_cases()[name]
    module = make()
    module.backend = backend
    params = dict(module.named_parameters())

    def fn(x, *values):
        return torch.func.functional_call(module, dict(zip(params, values)), (x,), kwargs)

    # Parameters are inputs so their gradients are compared too.
    _compiled_matches_eager(fn, [_r(*shape), *params.values()])
