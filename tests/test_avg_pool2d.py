"""avg_pool2d / poolformer_pool.

- the reference against ``nn.AvgPool2d(count_include_pad=False)`` and timm's Pooling,
  and gradcheck in float64;
- the Triton (interpreter) and CUDA (host emulation) kernels against the reference,
  forward and gradient, every dtype, NCHW and channels_last, views, every tile config;
- ``pyvit_ops.nn.Pooling`` against timm's ``Pooling``, alone and inside a MetaFormer;
- custom-op registration (opcheck, torch.compile, double backward) and input errors.
"""
import copy

import pytest
import torch
import torch.nn as nn
from timm.models.metaformer import MetaFormer
from timm.models.metaformer import Pooling as TimmPooling
from torch._prims_common import suggest_memory_format
from torch.testing import assert_close

import pyvit_ops.kernels.avg_pool2d as kernels
from pyvit_ops import _backend, _ext, avg_pool2d, poolformer_pool
from pyvit_ops.kernels import _common
from pyvit_ops.nn import Pooling
from pyvit_ops.reference import avg_pool2d as reference
from pyvit_ops.testing import traffic
from pyvit_ops.testing.specs import avg_pool2d as pool_specs
from op_cases import (GridRecorder, VALID_CALLS, assert_rejects, bad_call, bad_module_call, meta,
                      module_forward, randn)
from tolerance import assert_within

# (kernel_size, stride, padding, subtract_input); padding None = kernel_size // 2.
GEOMETRIES = [
    (3, 1, None, True),                  # PoolFormer
    (3, 1, None, False),
    (5, 1, None, True),
    (7, 1, None, True),                  # 7-wide windows on 9-wide rows: all touch a border
    (3, 2, 1, False),                    # strided, overlapping windows
    (2, 2, 0, False),                    # even kernel, no padding, disjoint windows
    ((3, 5), (2, 1), (1, 2), False),     # non-square kernel, stride and padding
    (4, 1, 2, False),                    # even kernel with padding: output larger than x
]
GEOMETRY_IDS = ["k3-sub", "k3", "k5-sub", "k7-sub", "k3s2", "k2s2p0", "k3x5s2x1", "k4p2"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _reference(x, grad_out, kernel_size, stride, padding, subtract_input):
    """Reference output and x-gradient, in x's dtype."""
    x = x.detach().requires_grad_()
    out = reference.avg_pool2d(x, kernel_size, stride, padding, subtract_input=subtract_input)
    (grad,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    return out.detach(), grad


def _check(x, kernel_size, stride, padding, subtract_input, backend,
           grad_out_like=torch.randn_like):
    """``pyvit_ops.avg_pool2d`` on ``backend``: output, x-gradient and their memory
    format; the values under the tolerance rule (the reference in float64 and in x's
    dtype)."""
    x = x.detach().requires_grad_()
    out = avg_pool2d(x, kernel_size, stride, padding, subtract_input=subtract_input,
                     backend=backend)
    grad_out = grad_out_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    geometry = (kernel_size, stride, padding, subtract_input)
    ref_out, ref_grad = _reference(x.double(), grad_out, *geometry)
    own_out, own_grad = _reference(x, grad_out, *geometry)
    assert out.dtype == grad.dtype == x.dtype
    assert out.shape == ref_out.shape and grad.shape == x.shape
    fmt = suggest_memory_format(x)
    assert out.is_contiguous(memory_format=fmt), (out.stride(), fmt)
    assert grad.is_contiguous(memory_format=fmt), (grad.stride(), fmt)
    assert_within("out", out, ref_out, own_out, x.dtype)
    assert_within("grad", grad, ref_grad, own_grad, x.dtype)


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_reference_matches_torch_avg_pool(geometry):
    kernel_size, stride, padding, subtract_input = geometry
    x = torch.randn(2, 3, 13, 9, dtype=torch.float64)
    pad = kernel_size // 2 if padding is None else padding
    expected = nn.AvgPool2d(kernel_size, stride, pad, count_include_pad=False)(x)
    if subtract_input:
        expected = expected - x
    out = reference.avg_pool2d(x, kernel_size, stride, padding, subtract_input=subtract_input)
    assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("pool_size", [3, 5, 7])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_reference_poolformer_pool_matches_timm(pool_size, channels_last):
    x = torch.randn(2, 4, 13, 9, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = reference.poolformer_pool(x, pool_size)
    assert_close(out, TimmPooling(pool_size)(x), atol=0, rtol=0)
    assert out.is_contiguous(memory_format=suggest_memory_format(x))


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[4], GEOMETRIES[6]],
                         ids=["k3-sub", "k3s2", "k3x5s2x1"])
def test_reference_gradcheck(geometry):
    kernel_size, stride, padding, subtract_input = geometry
    x = torch.randn(1, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: reference.avg_pool2d(t, kernel_size, stride, padding,
                                       subtract_input=subtract_input), (x,))


# --------------------------------------------------------------------------- kernels


@pytest.fixture(scope="module")
def host_ops():
    """The CUDA kernels built for the CPU under host emulation."""
    try:
        from pyvit_ops.testing import host

        host.load()
    except Exception as exc:  # no compiler / build failure: report it, do not hide it
        pytest.skip(f"cuda backend: host-emulation build failed: {type(exc).__name__}: {exc}")
    ok, why = _ext.has_op("avg_pool2d_fwd", "cpu")
    if not ok:
        pytest.skip(f"cuda backend: {why}")


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    if request.param == "cuda":
        request.getfixturevalue("host_ops")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_kernel_matches_reference(backend, geometry, channels_last, dtype):
    # 13 x 9 with 3 channels: no size is a multiple of any tile; borders on every side.
    x = torch.randn(2, 3, 13, 9).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _check(x, *geometry, backend)


def _strided_like(t):
    """A gradient that is a non-contiguous view (every other element of a wider tensor)."""
    return torch.randn(*t.shape, 2, dtype=t.dtype)[..., 0]


VIEWS = {
    "channel_slice": lambda: torch.randn(2, 6, 13, 9)[:, 1:4],
    "spatial_crop": lambda: torch.randn(2, 3, 16, 12)[:, :, 2:15, 1:10],
    "w_step_2": lambda: torch.randn(2, 3, 13, 18)[..., ::2],
    "channels_last_channel_slice": lambda: torch.randn(2, 6, 13, 9).to(
        memory_format=torch.channels_last)[:, 1:4],
    "nhwc_crop": lambda: torch.randn(2, 15, 9, 3).permute(0, 3, 1, 2)[:, :, 1:14],
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[4]], ids=["k3-sub", "k3s2"])
def test_kernel_reads_views_in_place(backend, view, geometry):
    x = VIEWS[view]()
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    _check(x, *geometry, backend, grad_out_like=_strided_like)


# One shape per tile config the launchers pick (W for NCHW, C for channels_last).
TILE_SHAPES = [((1, 2, 5, 5), False), ((1, 2, 6, 14), False), ((1, 1, 5, 20), False),
               ((1, 1, 3, 70), False), ((1, 20, 3, 5), True), ((1, 70, 3, 3), True)]


@pytest.mark.parametrize("shape, channels_last", TILE_SHAPES)
def test_kernel_every_tile_config(backend, shape, channels_last):
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _check(x, 3, 1, None, True, backend)


def test_kernel_empty_batch(backend):
    x = torch.randn(0, 3, 5, 4, requires_grad=True)
    out = avg_pool2d(x, 3, 2, backend=backend)
    assert out.shape == (0, 3, 3, 2)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_moves_compulsory_bytes_only(channels_last):
    # With a perfect cache the fused kernels read each input element once and write
    # each output once; timm's unfused pool(x) - x goes through memory 5 times.
    x = torch.randn(2, 16, 13, 9, dtype=torch.float16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = ((3, 3), (1, 1), (1, 1), True)
    out, fwd = traffic.count_triton_traffic(kernels.avg_pool2d_fwd, x, *params)
    grad, bwd = traffic.count_triton_traffic(kernels.avg_pool2d_bwd, torch.randn_like(out), x,
                                             *params)
    for report, moved in ((fwd, (x, out)), (bwd, (out, grad))):
        need = traffic.compulsory_bytes(*moved)
        assert (report["unique_read_bytes"], report["write_bytes"]) == (
            need["read_bytes"], need["write_bytes"])
    _, unfused = traffic.count_aten_traffic(TimmPooling(3), x)
    assert unfused["total_bytes"] == 5 * traffic.tensor_bytes(x)
    assert fwd["unique_read_bytes"] + fwd["write_bytes"] == 2 * traffic.tensor_bytes(x)


def test_static_compile_specs_cover_every_tile_config():
    specs = pool_specs.static_compile_specs()
    tile_keys = ("CHANNELS_LAST", "BLOCK_C", "BLOCK_H", "BLOCK_W")
    assert len({s["name"] for s in specs}) == len(specs)
    compiled = {(s["fn"].__name__, *(s["constexprs"][k] for k in tile_keys),
                 s["signature"][s["fn"].arg_names[0]]) for s in specs}
    for channels_last in (False, True):
        for size in range(1, 600, 7):  # channels (channels_last) or row length (NCHW)
            tile = kernels._tile_config(size, size, channels_last)
            for name in ("_avg_pool2d_fwd_kernel", "_avg_pool2d_bwd_kernel"):
                for dtype in ("*fp32", "*fp16", "*bf16"):
                    assert (name, channels_last, *tile, dtype) in compiled


def test_triton_rejects_samples_beyond_int32_offsets():
    x = torch.empty(1, 2**12, 2**10, 2**10, device="meta")
    assert not _common.offsets_fit_int32(x)
    with pytest.raises(_backend.BackendUnavailableError, match="int32"):
        avg_pool2d(x, backend="triton")


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("module_backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("pool_size", [3, 5, 7])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pooling_module_matches_timm(request, module_backend, pool_size, channels_last):
    if module_backend == "cuda":
        request.getfixturevalue("host_ops")
    ours = Pooling(pool_size, backend=module_backend, dim=3, proj_drop=0.0)
    theirs = TimmPooling(pool_size=pool_size, dim=3, proj_drop=0.0)
    assert not ours.state_dict() and not theirs.state_dict()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 13, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    out, expected = ours(x), theirs(x)
    assert out.is_contiguous(memory_format=suggest_memory_format(x))
    x64 = x.detach().double().requires_grad_()
    oracle = theirs(x64)
    assert_within("out", out, oracle.detach(), expected, x.dtype)
    grad_out = torch.randn_like(out)
    assert_within("grad", torch.autograd.grad(out, x, grad_out)[0],
                  torch.autograd.grad(oracle, x64, grad_out.double())[0],
                  torch.autograd.grad(expected, x, grad_out)[0], x.dtype)


@pytest.mark.parametrize("module_backend", ["reference", "triton"])
def test_pooling_module_as_timm_metaformer_token_mixer(module_backend):
    # timm builds every token mixer as token_mixer(dim=..., proj_drop=..., device=...,
    # dtype=...): the drop-in must accept that and give the same model.
    class Mixer(Pooling):  # MetaFormer wants a class (it calls issubclass on it)
        def __init__(self, **kw):
            super().__init__(backend=module_backend, **kw)

    kwargs = dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=5)
    theirs = MetaFormer(token_mixers=TimmPooling, **kwargs).eval()
    ours = MetaFormer(token_mixers=Mixer, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 40, 40)
    oracle = copy.deepcopy(theirs).double()(x.double())
    assert_within("logits", ours(x), oracle, theirs(x), x.dtype)


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_opcheck(channels_last):
    x = torch.randn(1, 2, 5, 4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = ([3, 3], [1, 1], [1, 1], True, "triton")
    torch.library.opcheck(torch.ops.pyvit_ops.avg_pool2d_fwd.default,
                          (x.requires_grad_(), *params))
    torch.library.opcheck(torch.ops.pyvit_ops.avg_pool2d_bwd.default,
                          (torch.randn_like(x), x.detach(), *params))


def test_triton_torch_compile_fullgraph():
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    compiled = torch.compile(lambda t: poolformer_pool(t, 3, backend="triton"),
                             fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    oracle, own = reference.poolformer_pool(x64, 3), reference.poolformer_pool(x, 3)
    assert_within("out", out.detach(), oracle.detach(), own.detach(), x.dtype)
    assert_within("grad", x.grad, torch.autograd.grad(oracle.sum(), x64)[0],
                  torch.autograd.grad(own.sum(), x)[0], x.dtype)


def test_triton_double_backward():
    def double_backward(backend, x):
        x = x.detach().requires_grad_()
        grad_out = torch.ones(1, 2, 4, 3, dtype=x.dtype, requires_grad=True)
        out = avg_pool2d(x, 3, 2, 1, backend=backend)
        (grad_x,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
        (grad,) = torch.autograd.grad(grad_x, grad_out,
                                      torch.arange(84.0, dtype=x.dtype).view(x.shape))
        return grad

    x = torch.randn(1, 2, 7, 6)
    assert_within("double backward", double_backward("triton", x),
                  double_backward("reference", x.double()), double_backward("reference", x),
                  x.dtype)


# --------------------------------------------------------------------------- errors


# One row per bad argument of a valid call: the error type and the argument's name
# in the message.
_valid_pool = VALID_CALLS["avg_pool2d"]
_valid_poolformer = VALID_CALLS["poolformer_pool"]
BAD_CALLS = [
    bad_call(_valid_pool, dict(x=randn(2, 5, 4)), ValueError, "x: expected a 4-D tensor"),
    bad_call(_valid_pool, dict(x=torch.ones(1, 2, 5, 4, dtype=torch.uint8)),
             TypeError, "x: expected dtype"),
    bad_call(_valid_pool, dict(x=randn(1, 0, 5, 4)),
             ValueError, "x: expected at least one channel"),
    bad_call(_valid_pool, dict(x=randn(1, 2, 2, 2), kernel_size=5, padding=1),
             ValueError, "x: spatial size (2, 2) is too small"),
    bad_call(_valid_pool, dict(kernel_size=0), ValueError, "kernel_size: expected sizes >= 1"),
    bad_call(_valid_pool, dict(kernel_size="3"),
             TypeError, "kernel_size: expected an int or a pair"),
    bad_call(_valid_pool, dict(stride=0), ValueError, "stride: expected strides >= 1"),
    bad_call(_valid_pool, dict(stride=(1, 2, 3)), TypeError, "stride: expected an int or a pair"),
    bad_call(_valid_pool, dict(padding=2),
             ValueError, "padding: expected 0 <= padding <= kernel_size // 2"),
    bad_call(_valid_pool, dict(padding=-1), ValueError, "padding: expected 0 <= padding"),
    bad_call(_valid_pool, dict(subtract_input="yes"), TypeError, "subtract_input: expected a bool"),
    bad_call(_valid_pool, dict(subtract_input=True, stride=2),
             ValueError, "subtract_input: needs stride"),
    bad_call(_valid_pool, dict(subtract_input=True, kernel_size=4),
             ValueError, "subtract_input: needs an output the size of x"),
    bad_call(_valid_pool, dict(backend="Triton"), ValueError, "backend: expected one of"),
    bad_call(_valid_pool, dict(x=meta(1, 2, 5, 4), backend="cuda"),
             _backend.BackendUnavailableError, "the cuda backend does not run on meta tensors"),
    bad_call(_valid_poolformer, dict(pool_size=4), ValueError, "pool_size: expected an odd"),
    bad_call(_valid_poolformer, dict(pool_size=0), ValueError, "pool_size: expected an int >= 1"),
    bad_call(_valid_poolformer, dict(pool_size=(3, 2)), ValueError, "pool_size: expected an odd"),
    bad_call(_valid_poolformer, dict(pool_size=3.0),
             TypeError, "pool_size: expected an int or a pair"),
    bad_call(_valid_poolformer, dict(x=randn(1, 2, 5)), ValueError, "x: expected a 4-D tensor"),
]


@pytest.mark.parametrize("call, change, error, text", BAD_CALLS)
def test_bad_argument(call, change, error, text):
    assert_rejects(lambda: call(**change), error, text)


BAD_MODULE_CALLS = [
    bad_module_call("Pooling-pool_size", lambda: Pooling(2),
                    ValueError, "pool_size: expected an odd"),
    bad_module_call("Pooling-pool_size-type", lambda: Pooling("3"),
                    TypeError, "pool_size: expected an int"),
    bad_module_call("Pooling-x-rank", module_forward(lambda: Pooling(3), (2, 5, 4)),
                    ValueError, "x: expected a 4-D"),
]


@pytest.mark.parametrize("call, error, text", BAD_MODULE_CALLS)
def test_bad_module_argument(call, error, text):
    assert_rejects(call, error, text)


BAD_INPUTS = [
    (dict(x=torch.randn(3, 13, 9)), ValueError,
     r"x: expected a 4-D tensor, got shape \(3, 13, 9\)"),
    (dict(x=torch.ones(1, 1, 5, 5, dtype=torch.int32)), TypeError, r"x: expected dtype in .*int32"),
    (dict(kernel_size=0), ValueError, r"kernel_size: expected sizes >= 1, got \(0, 0\)"),
    (dict(kernel_size=(3, 3, 3)), TypeError, r"kernel_size: expected an int or a pair"),
    (dict(stride=(1, 0)), ValueError, r"stride: expected strides >= 1, got \(1, 0\)"),
    (dict(padding=2), ValueError,
     r"padding: expected 0 <= padding <= kernel_size // 2 = \(1, 1\) .*got \(2, 2\)"),
    (dict(padding=-1), ValueError, r"padding: expected 0 <= padding"),
    (dict(x=torch.randn(1, 1, 2, 9), kernel_size=5, padding=1), ValueError,
     r"x: spatial size \(2, 9\) is too small for kernel_size \(5, 5\)"),
    (dict(stride=2, subtract_input=True), ValueError,
     r"subtract_input: needs stride \(1, 1\).*got stride \(2, 2\)"),
    (dict(kernel_size=4, subtract_input=True), ValueError,
     r"subtract_input: needs an output the size of x.*got output \(1, 2, 14, 10\)"),
    (dict(subtract_input=1), TypeError, r"subtract_input: expected a bool, got 1"),
    (dict(backend="cudnn"), ValueError, r"backend: expected one of"),
    (dict(x=torch.randn(1, 2, 13, 9, dtype=torch.float64), backend="triton"),
     _backend.BackendUnavailableError, r"float64 runs only on the reference backend"),
]


@pytest.mark.parametrize("change, error, match", BAD_INPUTS)
def test_bad_input(change, error, match):
    args = dict(x=torch.randn(1, 2, 13, 9), kernel_size=3, stride=1, padding=None,
                subtract_input=False)
    args.update(change)
    x = args.pop("x")
    with pytest.raises(error, match=match):
        avg_pool2d(x, **args)


@pytest.mark.parametrize("backend_name", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("change, match", [
    (dict(kernel_size=2**32), r"kernel_size: expected values <= 2\*\*31 - 1, got \(4294967296, "),
    (dict(kernel_size=(3, 2**40)), r"kernel_size: expected values <= 2\*\*31 - 1, got \(3, "),
    (dict(stride=2**32), r"stride: expected values <= 2\*\*31 - 1, got \(4294967296, "),
])
def test_sizes_beyond_int32_name_the_argument(request, backend_name, change, match):
    """One message per argument, whichever backend would run (not the binding's or
    torch's int conversion)."""
    if backend_name == "cuda":
        request.getfixturevalue("host_ops")
    args = dict(kernel_size=3, stride=1, padding=0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        avg_pool2d(torch.randn(1, 2, 5, 5), **args, backend=backend_name)


# --------------------------------------------------------------------------- extreme geometry


@pytest.mark.parametrize("size", range(1, 7))
@pytest.mark.parametrize("k", range(1, 14))
@pytest.mark.parametrize("s", [1, 2, 3])
def test_clamped_window_pools_the_same_taps(size, k, s):
    """``clamp_window``: every output's window, clipped to the image, keeps its taps, and
    the output size is unchanged."""
    for p in range(k // 2 + 1):
        out = _common.pool_output_size(size, k, s, p)
        if out < 1:
            continue
        k2, p2 = kernels.clamp_window(size, out, k, s, p)
        assert _common.pool_output_size(size, k2, s, p2) == out
        assert k2 <= 2 * size
        for o in range(out):
            clip = (max(o * s - p, 0), min(o * s - p + k, size))
            assert (max(o * s - p2, 0), min(o * s - p2 + k2, size)) == clip, (o, k2, p2)


_HUGE_KERNEL_PROBE = """
import sys, torch
from pyvit_ops.testing import interpreter
interpreter.enable()
from pyvit_ops.testing import host
import pyvit_ops
backend, kh, kw, subtract = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if backend == "cuda":
    host.load()
x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(1, 2, 5, 5).requires_grad_()
out = pyvit_ops.avg_pool2d(x, (kh, kw), 1, None, subtract_input=subtract, backend=backend)
out.backward(torch.ones_like(out))
print(repr((out.tolist(), x.grad.tolist())))
"""


@pytest.mark.parametrize("kernel_size, subtract", [((2**31 - 1, 2**31 - 1), False),
                                                    ((2**31 - 1, 3), True)])
def test_huge_kernel_size_pools_the_image(backend, kernel_size, subtract):
    """A window larger than the image covers all of it (the in-image taps only count):
    the kernels return, with the reference's result (run in a child process, with a
    time limit, as unrolling 2**31 taps never ends)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _HUGE_KERNEL_PROBE, backend,
                             *map(str, kernel_size), str(int(subtract))],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out, grad = eval(result.stdout.strip().splitlines()[-1])
    # The same taps as the window clamped to the image (what torch's pooling accepts).
    kh, kw = (min(k, 9) for k in kernel_size)

    def clamped_reference(dtype):
        x = torch.arange(2 * 5 * 5, dtype=dtype).view(1, 2, 5, 5)
        return _reference(x, torch.ones(1, 2, 5, 5), (kh, kw), 1, (kh // 2, kw // 2), subtract)

    (oracle, oracle_grad), (own, own_grad) = (clamped_reference(t)
                                              for t in (torch.float64, torch.float32))
    assert_within("out", torch.tensor(out), oracle, own, torch.float32)
    assert_within("grad", torch.tensor(grad), oracle_grad, own_grad, torch.float32)


@pytest.mark.parametrize("kernel_size", [(3, 5), (5, 3)], ids=["k3x5", "k5x3"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_kernel_subtract_input_non_square(backend, kernel_size, channels_last):
    """pool(x) - x with a non-square window: the centre tap's row and column offsets
    differ, so swapping them is caught (forward and backward)."""
    x = torch.randn(2, 3, 13, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _check(x, kernel_size, 1, None, True, backend)


def test_cuda_int32_image_limit_is_a_backend_reason(host_ops):
    """An image of more than 2**31 - 1 elements is a reason to skip the CUDA kernels
    (the limit comes from the extension), not a launch failure."""
    x = torch.zeros(1, 1, 1, 1).expand(1, 2**12, 2**10, 2**10)
    with pytest.raises(_backend.BackendUnavailableError, match="elements per image"):
        avg_pool2d(x, backend="cuda")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_grid_keeps_the_batch_on_axis_0(monkeypatch, channels_last):
    """Grid axes 1 and 2 stop at 65535: a batch of 70000 stays on axis 0."""
    recorder = GridRecorder()
    monkeypatch.setitem(kernels._NUM_WARPS, recorder, 4)
    monkeypatch.setattr(kernels, "_avg_pool2d_fwd_kernel", recorder)
    x = torch.zeros(70000, 2, 3, 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kernels.avg_pool2d_fwd(x, (3, 3), (1, 1), (1, 1), True)
    (grid,) = recorder.grids
    assert len(grid) == 1 and grid[0] >= 70000, grid
