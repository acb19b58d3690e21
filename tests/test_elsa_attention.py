"""elsa_attention: reference vs the official unfold formulation; the kernels of both
backends vs the reference (forward and every gradient): "triton" in the interpreter,
"cuda" = csrc/elsa_attention.cu built for the CPU under host emulation
(pyvit_ops.testing.host); determinism, strided inputs, partial gradients, empty inputs,
opcheck; nn.ELSA vs the official module math and checkpoints; bad input, in the public
op and in the CUDA bindings."""
import copy
import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
import triton
from torch import nn

import pyvit_ops.ops.elsa_attention as ops
from pyvit_ops import _backend, capabilities
from pyvit_ops.kernels import elsa_attention as kernels
from pyvit_ops.nn.elsa import ELSA
from pyvit_ops.reference.elsa_attention import elsa_attention as reference
from pyvit_ops.reference.elsa_attention import output_memory_format
from pyvit_ops.testing import elsa_official
from pyvit_ops.testing.specs import elsa_attention as static_specs
from op_cases import (GridRecorder, VALID_CALLS, assert_rejects, bad_call, bad_module_call, meta,
                      module_forward, randn)
from tolerance import assert_within

GHOSTS = ["none", "mul", "add", "both"]


# --------------------------------------------------------------------------- inputs


class Geometry(NamedTuple):
    """B samples of C channels in G heads on an H x W grid; a K x K window, dilated."""
    B: int
    C: int
    G: int
    H: int
    W: int
    K: int
    dilation: int = 1

    def __str__(self):
        return f"B{self.B}C{self.C}G{self.G}-{self.H}x{self.W}-k{self.K}d{self.dilation}"

    def inputs(self, ghost, dtype=torch.float64, **kwargs):
        """``_inputs`` of this geometry."""
        return _inputs(self.B, self.C, self.G, self.H, self.W, self.K, ghost, dtype, **kwargs)


def _inputs(B, C, G, H, W, K, ghost, dtype=torch.float64, probs=False, channels_last=False,
            seed=0):
    """(v, attn, ghost_mul, ghost_add, dout) in ``dtype``, drawn in float64 from ``seed``:
    attn logits (or, ``probs``, their softmax over the taps), ghost tensors per ``ghost``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    v = randn(B, C, H, W)
    attn = randn(B, G * K * K, H, W) * 2
    if probs:
        attn = attn.reshape(B, G, K * K, H, W).softmax(2).reshape(B, -1, H, W)
    if channels_last:
        v = v.contiguous(memory_format=torch.channels_last)
        attn = attn.contiguous(memory_format=torch.channels_last)
    mul = randn(C, K, K) if ghost in ("mul", "both") else None
    add = randn(C, K, K) if ghost in ("add", "both") else None
    dout = randn(B, C, H, W)
    return tuple(t.to(dtype) if t is not None else None for t in (v, attn, mul, add, dout))


# --------------------------------------------------------------------------- reference


# Grids smaller than the window, odd sizes, dilation.
REF_SHAPES = [
    Geometry(B=2, C=6, G=2, H=13, W=9, K=3),
    # 3x5 grid inside a 7x7 window: every tap set at the border.
    Geometry(B=1, C=4, G=1, H=3, W=5, K=7),
    Geometry(B=2, C=6, G=3, H=7, W=6, K=5, dilation=2),
    Geometry(B=1, C=8, G=2, H=4, W=9, K=3, dilation=2),
]


@pytest.mark.parametrize("shape", REF_SHAPES, ids=str)
@pytest.mark.parametrize("ghost", GHOSTS)
@pytest.mark.parametrize("probs", [False, True])
def test_reference_matches_official_unfold(shape, ghost, probs):
    K, d = shape.K, shape.dilation
    v, attn, mul, add, _ = shape.inputs(ghost, probs=probs)
    out = reference(v, attn, mul, add, kernel_size=K, dilation=d, apply_softmax=not probs)
    expected = elsa_official.elsa_attention(v, attn, mul, add, K, d, apply_softmax=not probs)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_inputs_computed_in_fp32(dtype):
    v, attn, mul, add, _ = _inputs(1, 6, 2, 5, 6, 3, "both", dtype=dtype)
    out = reference(v, attn, mul, add, kernel_size=3)
    assert out.dtype == dtype
    exact = elsa_official.elsa_attention(*(t.double() for t in (v, attn, mul, add)), 3)
    # One rounding of the result only: within an ulp of the output dtype.
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=torch.finfo(dtype).eps)


def test_reference_keeps_channels_last():
    v, attn, mul, add, _ = _inputs(1, 4, 2, 5, 6, 3, "both", channels_last=True)
    assert reference(v, attn, mul, add, kernel_size=3).is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("probs", [False, True])
def test_reference_gradcheck(dilation, probs):
    v, attn, mul, add, _ = _inputs(1, 4, 2, 3, 4, 3, "both", probs=probs)
    args = [t.requires_grad_() for t in (v, attn, mul, add)]
    assert torch.autograd.gradcheck(
        lambda *a: reference(*a, kernel_size=3, dilation=dilation, apply_softmax=not probs), args,
        fast_mode=True)


# --------------------------------------------------------------------------- kernels


@pytest.fixture(scope="module")
def host_ops():
    """The CUDA kernels built for the CPU under host emulation (``backend="cuda"`` on
    CPU tensors runs them)."""
    from pyvit_ops.testing import host

    return host.load()


@pytest.fixture
def backend(request):
    """The backend named by the test's parameters; "cuda" needs the host build."""
    if request.param == "cuda":
        request.getfixturevalue("host_ops")
    return request.param


def _on_each_backend(cases):
    """(backend, case) pairs of ``cases`` = {backend: [case, ...]}."""
    return [(name, case) for name, backend_cases in cases.items() for case in backend_cases]


def _run(fn, v, attn, mul, add, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (v, attn, mul, add)]
    out = fn(*leaves, **kw)
    out.backward(dout)
    return out, [t.grad if t is not None else None for t in leaves]


def _op(backend):
    return lambda *a, **k: ops.elsa_attention(*a, **k, backend=backend)


def _bwd(backend, dout, v, attn, mul, add, K, dilation, apply_softmax, need):
    """The backward custom op alone: (dv, dattn, dmul, dadd), empty where not needed."""
    return torch.ops.pyvit_ops.elsa_attention_bwd(dout, v, attn, mul, add, K, dilation,
                                                  apply_softmax, list(need), backend)


RESULTS = ("out", "dv", "dattn", "dghost_mul", "dghost_add")


def _assert_rule(got, v, attn, mul, add, dout, **kw):
    """``got``: {name in RESULTS: tensor or None} under the tolerance rule, the reference
    on the same values in float64 the oracle and as given (dtype included) the yardstick."""
    def reference_results(*tensors):
        out, grads = _run(reference, *tensors, **kw)
        return dict(zip(RESULTS, (out.detach(), *grads)))

    oracle = reference_results(*(t if t is None else t.double()
                                 for t in (v, attn, mul, add, dout)))
    own = reference_results(v, attn, mul, add, dout)
    for name, g in got.items():
        assert (g is None) == (own[name] is None), name
        if g is not None:
            assert g.dtype == own[name].dtype, (name, g.dtype, own[name].dtype)
            assert_within(name, g, oracle[name], own[name], v.dtype)


def _check_against_reference(backend, v, attn, mul, add, dout, **kw):
    """Output (dtype, memory format, values) and every gradient of the public op on
    ``backend`` under the tolerance rule."""
    out, grads = _run(_op(backend), v, attn, mul, add, dout, **kw)
    assert out.is_contiguous(memory_format=output_memory_format(v))
    _assert_rule(dict(zip(RESULTS, (out.detach(), *grads))), v, attn, mul, add, dout, **kw)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]

class KernelCase(NamedTuple):
    """``ghost``: which ghost tensors (GHOSTS); ``probs``: attn holds probabilities."""
    dtype: torch.dtype
    geometry: Geometry
    ghost: str
    channels_last: bool = False
    probs: bool = False

    def __str__(self):
        return (f"{str(self.dtype)[6:]}-{self.geometry}-{self.ghost}"
                f"-{'cl' if self.channels_last else 'nchw'}{'-probs' if self.probs else ''}")


fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16
# The interpreter is slow: a hand-picked list that still meets every edge once.
TRITON_CASES = [
    KernelCase(fp32, Geometry(B=1, C=6, G=2, H=13, W=9, K=3), "both"),  # odd, 3 channels / head
    KernelCase(fp32, Geometry(B=1, C=8, G=2, H=3, W=5, K=7), "mul",
               channels_last=True),  # 3x5 grid, 7x7 window
    KernelCase(fp32, Geometry(B=1, C=6, G=3, H=7, W=6, K=5, dilation=2), "add"),  # dilation 2
    KernelCase(fp32, Geometry(B=2, C=4, G=2, H=5, W=4, K=3), "both", channels_last=True,
               probs=True),  # probabilities
    KernelCase(fp16, Geometry(B=1, C=8, G=2, H=6, W=5, K=7), "both"),
    KernelCase(fp16, Geometry(B=1, C=6, G=2, H=9, W=5, K=3, dilation=2), "none",
               channels_last=True),
    KernelCase(bf16, Geometry(B=1, C=6, G=2, H=13, W=9, K=5), "both", channels_last=True),
    KernelCase(bf16, Geometry(B=1, C=4, G=1, H=4, W=6, K=3, dilation=2), "add", probs=True),
    KernelCase(fp32, Geometry(B=1, C=64, G=2, H=4, W=5, K=3), "both"),  # 32-channel heads
    KernelCase(fp16, Geometry(B=1, C=64, G=2, H=5, W=4, K=3), "add", channels_last=True),
    KernelCase(fp32, Geometry(B=1, C=6, G=2, H=3, W=5, K=7, dilation=2),
               "both"),  # dilated window >> grid
    KernelCase(fp16, Geometry(B=2, C=6, G=2, H=7, W=9, K=5, dilation=2), "mul",
               channels_last=True),
    KernelCase(bf16, Geometry(B=1, C=8, G=2, H=9, W=6, K=7, dilation=2), "add"),
    KernelCase(fp32, Geometry(B=1, C=10, G=2, H=11, W=7, K=7), "both",
               channels_last=True),  # 5 channels / head, channels_last masks
    KernelCase(fp16, Geometry(B=1, C=4, G=2, H=5, W=6, K=5), "none", probs=True),
]

# The host build runs fast enough for the full grid: every dtype x shape x ghost x layout
# x logits / probabilities.
CUDA_SHAPES = [
    Geometry(B=2, C=6, G=2, H=13, W=9, K=3),  # odd sizes, 3 channels per head
    Geometry(B=1, C=4, G=1, H=3, W=5, K=7),  # 3x5 grid inside a 7x7 window
    Geometry(B=1, C=6, G=3, H=7, W=6, K=5, dilation=2),  # dilation 2, 2 channels per head
    Geometry(B=2, C=8, G=2, H=9, W=5, K=3, dilation=2),  # dilation 2 over an odd grid
    Geometry(B=1, C=64, G=2, H=6, W=5, K=7),  # 32-channel heads (ELSA-Swin)
]
CUDA_CASES = [KernelCase(dtype, shape, ghost, channels_last, probs)
              for dtype in DTYPES for shape in CUDA_SHAPES for ghost in GHOSTS
              for channels_last in (False, True) for probs in (False, True)]


@pytest.mark.parametrize("backend, case",
                         _on_each_backend({"triton": TRITON_CASES, "cuda": CUDA_CASES}),
                         indirect=["backend"], ids=str)
def test_kernel_matches_reference(backend, case):
    g = case.geometry
    tensors = g.inputs(case.ghost, case.dtype, probs=case.probs,
                       channels_last=case.channels_last)
    _check_against_reference(backend, *tensors, kernel_size=g.K,
                             dilation=g.dilation, apply_softmax=not case.probs)


# (geometry, why), float32, both ghost tensors: the CUDA kernels' staging and their
# compiled range of K.
EDGE_SHAPES = [
    (Geometry(B=3, C=48, G=1, H=5, W=6, K=7),
     "48-channel head: two staged chunks, dM / dD summed in global memory"),
    (Geometry(B=1, C=40, G=1, H=4, W=3, K=9), "K = 9 over a grid smaller than the window"),
    (Geometry(B=1, C=3, G=1, H=6, W=7, K=11), "K = 11"),
    (Geometry(B=1, C=2, G=2, H=9, W=11, K=13), "K = 13, 1 channel per head"),
    (Geometry(B=2, C=4, G=2, H=5, W=4, K=1), "K = 1"),
    (Geometry(B=1, C=4, G=1, H=13, W=9, K=3, dilation=3),
     "dilation 3: nine sub-grids of unequal sizes"),
    (Geometry(B=1, C=4, G=2, H=4, W=4, K=3, dilation=5),
     "dilation larger than the grid: every tap outside but the centre"),
    (Geometry(B=5, C=4, G=1, H=37, W=70, K=3), "several tiles per row and column, five samples"),
]


@pytest.mark.parametrize("backend, case", _on_each_backend({"cuda": EDGE_SHAPES}),
                         indirect=["backend"], ids=lambda c: c if isinstance(c, str) else
                         c[-1].split(":")[0])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_kernel_edge_shapes(backend, case, channels_last):
    g, _ = case
    tensors = g.inputs("both", torch.float32, channels_last=channels_last)
    _check_against_reference(backend, *tensors, kernel_size=g.K,
                             dilation=g.dilation)


# Per backend: samples spread over several attn-gradient programs. Triton with one
# program per (tile, head), so that it loops over every sample (dM / dD accumulated over
# the chunk); the CUDA test build puts two samples in a block.
DETERMINISM_SHAPES = {"triton": Geometry(B=3, C=4, G=2, H=5, W=6, K=3),
                      "cuda": Geometry(B=5, C=8, G=2, H=11, W=7, K=5)}


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_backward_deterministic(monkeypatch, backend, channels_last):
    """Two backward runs are bitwise equal, and match the reference."""
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 1)
    shape = DETERMINISM_SHAPES[backend]
    K = shape.K
    v, attn, mul, add, dout = shape.inputs("both", torch.float32, channels_last=channels_last)
    args = (backend, dout, v, attn, mul, add, K, 1, True, [True] * 4)
    first, second = _bwd(*args), _bwd(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _assert_rule(dict(zip(RESULTS[1:], first)), v, attn, mul, add, dout, kernel_size=K)


@pytest.mark.parametrize("target_programs, min_items", [(1, 8), (64, 1), (64, 3)],
                         ids=["one-program-per-head", "one-item-per-program", "uneven-tiles"])
def test_triton_attn_gradient_work_chunks(monkeypatch, target_programs, min_items):
    """The attn-gradient programs' (samples x pixel tiles) chunks: 32-channel heads at
    K = 5 make 16-pixel tiles, three per sample here; every split matches the reference."""
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", target_programs)
    monkeypatch.setattr(kernels, "_MIN_ITEMS", min_items)
    B, C, G, H, W, K = 2, 64, 2, 7, 6, 5
    assert kernels.tile_config(C // G, H * W, K, False).block_p_attn == 16
    v, attn, mul, add, dout = _inputs(B, C, G, H, W, K, "both", torch.float32)
    grads = _bwd("triton", dout, v, attn, mul, add, K, 1, True, [True] * 4)
    _assert_rule(dict(zip(RESULTS[1:], grads)), v, attn, mul, add, dout, kernel_size=K)


def test_work_chunks_amortise_partial_rows():
    """ELSA-Swin-T, 224: stage 1 (196 tiles of 16 pixels, 3 heads) and stage 3 (13 tiles,
    12 heads). Batch 1: one sample, >= 8 tiles (or all) per partial row; batch 128: 64
    samples per program, one tile."""
    assert kernels.work_chunks(1, 196, 3) == (1, 8)
    assert kernels.work_chunks(1, 13, 12) == (1, 7)
    assert kernels.work_chunks(2, 196, 3) == (2, 4)
    assert kernels.work_chunks(128, 196, 3) == (64, 1)


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True),
                                  (True, False, True, True), (False, True, False, True)],
                         ids=lambda n: "".join("1" if x else "0" for x in n))
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
def test_partial_gradients(backend, need, probs):
    """Only the requested gradients are computed; they equal the full backward's."""
    K = 3
    v, attn, mul, add, dout = _inputs(3, 6, 2, 7, 5, K, "both", torch.float32, probs=probs)
    args = (backend, dout, v, attn, mul, add, K, 2, not probs)
    full = _bwd(*args, [True] * 4)
    part = _bwd(*args, need)
    for name, p, f, wanted in zip(("dv", "dattn", "dmul", "dadd"), part, full, need):
        if wanted:
            torch.testing.assert_close(p, f, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
        else:
            assert p.numel() == 0, name


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
def test_kernel_reads_views_fp32_ghost(backend):
    """v and attn as strided slices of larger tensors (read in place), fp32 ghost
    tensors with fp16 data (AMP), dout in another layout than v."""
    B, C, G, H, W, K = 2, 8, 2, 5, 6, 3
    qkv = torch.randn(B, H, W, 3 * C).to(torch.float16).permute(0, 3, 1, 2)  # channels_last
    v = qkv[:, 2 * C:]
    attn = torch.randn(B, 2 * G * K * K, H, W).to(torch.float16)[:, 1::2]  # no unit stride
    mul, add = torch.randn(C, K, K), torch.randn(C, K, K)
    dout = torch.randn(B, C, H, W).to(torch.float16)
    _check_against_reference(backend, v, attn, mul, add, dout, kernel_size=K)


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
def test_kernel_dattn_precise_when_taps_agree(backend):
    """Nearly constant v makes every tap's dp almost equal, so dl = p * (dp - mean)
    is a small difference of large numbers; a kernel that stored plain fp16 dp
    would be off by ~15% of max |dl| inside the border."""
    B, C, H, W, K = 1, 8, 5, 6, 3
    v = (1 + 1e-3 * torch.randn(B, C, H, W)).half()
    attn = torch.randn(B, K * K, H, W).half()
    dout = torch.randn(B, C, H, W).half()
    _, (dv, dattn, _, _) = _run(_op(backend), v, attn, None, None, dout, kernel_size=K)
    _, (_, exact, _, _) = _run(reference, v.double(), attn.double(), None, None, dout.double(),
                               kernel_size=K)
    _, (_, own, _, _) = _run(reference, v, attn, None, None, dout, kernel_size=K)
    # Inside the border every tap is in the image and dl ~ 1e-3 |dp|.
    inner = (..., slice(K // 2, -(K // 2)), slice(K // 2, -(K // 2)))
    assert_within("dattn", dattn[inner], exact[inner], own[inner], v.dtype)


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("shape", [(0, 4, 2, 5, 6), (2, 4, 2, 0, 6), (2, 0, 2, 5, 6)])
def test_kernel_empty_inputs(backend, shape):
    B, C, G, H, W = shape
    K = 3
    v, attn, mul, add, dout = _inputs(B, C, G, H, W, K, "both", torch.float32)
    out = torch.ops.pyvit_ops.elsa_attention_fwd(v, attn, mul, add, K, 1, True, backend)
    assert out.shape == v.shape
    dv, dattn, dmul, dadd = _bwd(backend, dout, v, attn, mul, add, K, 1, True, [True] * 4)
    assert dv.shape == v.shape and dattn.shape == attn.shape
    assert dmul.shape == mul.shape and dadd.shape == add.shape
    for g in (dattn, dmul, dadd):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_opcheck(backend, channels_last):
    """Schema, fake tensors and autograd registration agree with the kernels."""
    v, attn, mul, add, dout = _inputs(1, 4, 2, 3, 4, 3, "both", torch.float32,
                                      channels_last=channels_last)
    torch.library.opcheck(torch.ops.pyvit_ops.elsa_attention_fwd.default,
                          (v, attn, mul, add, 3, 1, True, backend))
    torch.library.opcheck(torch.ops.pyvit_ops.elsa_attention_bwd.default,
                          (dout, v, attn, mul, add, 3, 1, True, [True] * 4, backend))


def test_tile_config_fits_elsa_swin():
    # channels_last: the most pixels (<= 1K elements) padding H*W by at most 1/8.
    assert kernels.tile_config(32, 56 * 56, 7, True).block_p == 32   # 98 tiles, no padding
    assert kernels.tile_config(32, 28 * 28, 7, True).block_p == 32   # 784 -> 800
    assert kernels.tile_config(32, 14 * 14, 7, True).block_p == 16   # 196 -> 208
    assert kernels.tile_config(32, 56 * 56, 7, False) == kernels.TileConfig(32, 32, 4, 16, 16)


def test_static_compile_specs_cover_every_tile():
    specs = static_specs.static_compile_specs()
    names = {s["name"] for s in specs}
    assert len(names) == len(specs)
    for channels_last, cfg in static_specs._spec_tiles():
        for key, kernel in static_specs._KERNELS.items():
            direction = {None: "", False: "_fwd", True: "_dv"}[kernel.transposed]
            block_p = cfg.block_p_attn if key == "bwd_attn" else cfg.block_p
            stem = (f"{kernel.fn.__name__}{direction}_{'cl' if channels_last else 'nchw'}"
                    f"_c{cfg.block_c}p{block_p}_k7_")
            assert {f"{stem}{dt}" for dt in ("fp16", "bf16", "fp32")} <= names
    ghost = kernels._elsa_attention_bwd_ghost_kernel.__name__
    assert {f"{ghost}_{dt}" for dt in ("fp16", "bf16", "fp32")} <= names


# Compiles named specs for sm_80 / sm_90a in a process without TRITON_INTERPRET (the
# static compile needs the real jit functions); prints their records as JSON.
_STATIC_PROBE = """
import json, sys
from pyvit_ops.testing import static
specs = {s["name"]: s for s in static.specs_of("elsa_attention")}
print(json.dumps([static.compile_triton(specs[n], a) for n in sys.argv[1:] for a in static.ARCHS]))
"""


@pytest.mark.slow
def test_attn_grad_kernel_at_k5_compiles_without_spills():
    """Found by the static report's full sweep: the attn-gradient kernel at K = 5 (K_PAD
    = 8, 32-channel heads, 16 warps: 128 registers) spilled on sm_90a. The suite's
    representative config (most BLOCK_* elements per thread) does not weigh K, so this
    one is compiled here."""
    import json
    import os
    import subprocess
    import sys

    name = "_elsa_attention_bwd_attn_kernel_nchw_c32p16_k5_fp16"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _STATIC_PROBE, name], env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    records = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(records) == 2, records
    for r in records:
        assert r["spill_stores"] == r["spill_loads"] == 0, (r["target"], r["registers"], r)


class _ArgRecorder:
    """Stands in for a kernel: records the arguments of each launch, runs nothing."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append({**dict(zip(self.kernel.arg_names, args)), **kwargs,
                               "kernel": self.kernel})
        return launch


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_static_specs_assume_the_divisibility_of_elsa_swin(monkeypatch, channels_last):
    """The "_div16" specs mark as multiples of 16 exactly the integer arguments the JIT
    finds to be at ELSA-Swin's shapes (C = 96, 3 heads, 56², K = 7, fp32 ghost tensors):
    the launches themselves are recorded, not run."""
    recorders = {}
    for kernel in static_specs._KERNELS.values():
        if kernel.fn not in recorders:
            recorders[kernel.fn] = _ArgRecorder(kernel.fn)
            monkeypatch.setattr(kernels, kernel.fn.__name__, recorders[kernel.fn])
    monkeypatch.setattr(kernels, "_ghost_grad", lambda parts, ghost: torch.zeros_like(ghost))
    B, C, G, K, H = 2, 96, 3, 7, 56
    layout = torch.channels_last if channels_last else torch.contiguous_format
    v = torch.zeros(B, C, H, H, dtype=torch.float16).to(memory_format=layout)
    attn = torch.zeros(B, G * K * K, H, H, dtype=torch.float16).to(memory_format=layout)
    ghost = torch.zeros(C, K, K)
    kernels.elsa_attention_fwd(v, attn, ghost, ghost, K, 1, True)
    kernels.elsa_attention_bwd(v, v, attn, ghost, ghost, K, 1, True, [True] * 4)
    specs = {s["name"]: s for s in static_specs.static_compile_specs()}
    # The aggregation kernel runs twice (forward, then dv), told apart by TRANSPOSED.
    calls = [call for recorder in recorders.values() for call in recorder.calls]
    assert len(calls) == len(static_specs._KERNELS)
    for call in calls:
        direction = {None: "", False: "_fwd", True: "_dv"}[call.get("TRANSPOSED")]
        name = (f"{call['kernel'].__name__}{direction}_{'cl' if channels_last else 'nchw'}"
                f"_c32p{call['BLOCK_P']}_k7_div16_ghostfp32_fp16")
        spec = specs[name]
        # Runtime integers (not specialised to 1), by path: (arg,) or (stride tuple, axis).
        ints = {}
        for arg, t in spec["signature"].items():
            if t == "i32":
                ints[(arg,)] = call[arg]
            elif isinstance(t, tuple):
                ints.update({(arg, i): call[arg][i] for i, e in enumerate(t) if e == "i32"})
        divisible = {(a,) if isinstance(a, str) else a for a in spec["divisible_by_16"]}
        assert divisible == {a for a, value in ints.items() if value != 1 and value % 16 == 0}


# --------------------------------------------------------------------------- nn.ELSA


def _official_forward(m, x, attn_dropout=None):
    """The official ELSA.forward math on the module's parameters (stride 1)."""
    B, H, W, _ = x.shape
    C, K, G = m.dim_v, m.kernel_size, m.num_heads
    qkv = F.conv2d(x.permute(0, 3, 1, 2), m.pre_proj.weight, m.pre_proj.bias)
    q, k, v = torch.split(qkv, (m.dim_qk, m.dim_qk, C), dim=1)
    quadratic = q * k * m.scale
    conv0, conv2 = m.attn[0], m.attn[2]
    attn = F.conv2d(quadratic, conv0.weight, conv0.bias, padding=K // 2 * m.dilation,
                    dilation=m.dilation, groups=conv0.groups)
    attn = F.conv2d(F.gelu(attn), conv2.weight, conv2.bias, groups=conv2.groups)
    attn = attn.reshape(B * G, -1, H, W).softmax(1)
    if attn_dropout is not None:
        attn = attn_dropout(attn)
    if m.lam != 0 and m.gamma != 0:
        gh = m.ghost_head.expand(2, B, C, K, K).reshape(2, B * G, C // G, K, K)
        mul, add = gh[0] ** m.lam, gh[1] * m.gamma
    elif m.lam == 0 and m.gamma != 0:
        mul = torch.ones(B * G, C // G, K, K, dtype=x.dtype)
        add = m.ghost_head.expand(B, C, K, K).reshape(B * G, C // G, K, K) * m.gamma
    elif m.lam != 0 and m.gamma == 0:
        mul = m.ghost_head.expand(B, C, K, K).reshape(B * G, C // G, K, K) ** m.lam
        add = torch.zeros(B * G, C // G, K, K, dtype=x.dtype)
    else:
        mul = torch.ones(B * G, C // G, K, K, dtype=x.dtype)
        add = torch.zeros(B * G, C // G, K, K, dtype=x.dtype)
    y = elsa_official.elsa_op(v.reshape(B * G, C // G, H, W), mul, add, attn, K, m.dilation)
    y = y.reshape(B, C, H, W).permute(0, 2, 3, 1)
    return F.linear(y, m.post_proj.weight, m.post_proj.bias)


def _official_state_dict(dim, heads, dim_qk, K, lam, gamma, qkv_bias, groups=1):
    """A checkpoint with the official parameter names and shapes."""
    sd = {"pre_proj.weight": torch.randn(2 * dim_qk + dim, dim, 1, 1, dtype=torch.float64),
          "attn.0.weight": torch.randn(dim_qk, 8, K, K, dtype=torch.float64) * 0.2,
          "attn.0.bias": torch.randn(dim_qk, dtype=torch.float64),
          "attn.2.weight": torch.randn(K * K * heads, dim_qk // groups, 1, 1, dtype=torch.float64),
          "attn.2.bias": torch.randn(K * K * heads, dtype=torch.float64),
          "post_proj.weight": torch.randn(dim, dim, dtype=torch.float64),
          "post_proj.bias": torch.randn(dim, dtype=torch.float64)}
    if qkv_bias:
        sd["pre_proj.bias"] = torch.randn(2 * dim_qk + dim, dtype=torch.float64)
    if lam != 0 and gamma != 0:
        sd["ghost_head"] = torch.randn(2, 1, dim, K, K, dtype=torch.float64)
    elif lam != 0 or gamma != 0:
        sd["ghost_head"] = torch.randn(1, dim, K, K, dtype=torch.float64)
    return sd


# (lam, gamma): both ghost parts, add only (ELSA-Swin), mul only, none, non-unit values.
LAM_GAMMA = [(1, 1), (0, 1), (1, 0), (0, 0), (2, 0.5)]


@pytest.mark.parametrize("lam,gamma", LAM_GAMMA)
def test_module_loads_official_checkpoint_and_matches_official_math(lam, gamma):
    dim, heads, K = 12, 3, 5   # dim_qk = 8 (12 // 3 * 2), 4 channels per head
    m = ELSA(dim, heads, kernel_size=K, lam=lam, gamma=gamma, qkv_bias=lam == 1).double()
    assert m.dim_qk == 8
    sd = _official_state_dict(dim, heads, 8, K, lam, gamma, qkv_bias=lam == 1)
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, 6, 7, dim, dtype=torch.float64)
    torch.testing.assert_close(m(x), _official_forward(m, x), atol=1e-10, rtol=1e-10)


def test_module_dim_qk_rounding_scale_and_stride():
    m = ELSA(20, 2, group_width=8)
    assert m.dim_qk == 16 and m.scale == 10 ** -0.5          # 20 // 3 * 2 = 12 -> 16
    assert ELSA(16, 2, qk_scale=1).scale == 1
    with pytest.raises(ValueError, match="stride"):
        ELSA(16, 2, stride=2)


def test_module_attention_dropout_in_training():
    class FixedDrop(nn.Module):
        """Dropout with a fixed mask, so both paths drop the same taps."""
        p = 0.5

        def __init__(self, mask):
            super().__init__()
            self.mask = mask

        def forward(self, a):
            return a * self.mask.reshape(a.shape) / (1 - self.p)

    dim, heads, K, B, H, W = 8, 2, 3, 2, 4, 5
    m = ELSA(dim, heads, kernel_size=K, attn_drop=0.5, lam=1, gamma=1).double()
    x = torch.randn(B, H, W, dim, dtype=torch.float64)
    m.attn_drop = FixedDrop(torch.rand(B * heads, K * K, H, W) > 0.5)
    m.train()
    torch.testing.assert_close(m(x), _official_forward(m, x, m.attn_drop), atol=1e-10, rtol=1e-10)
    m.eval()   # no dropout: the fused softmax path
    torch.testing.assert_close(m(x), _official_forward(m, x), atol=1e-10, rtol=1e-10)


def test_module_triton_matches_reference_module():
    """Through the real module: v is a channels_last slice of pre_proj's output and
    the logits are channels_last; ELSA-Swin's lambda = 0."""
    dim, heads, K = 16, 2, 3
    ref = ELSA(dim, heads, kernel_size=K, lam=0, gamma=1, qk_scale=1)
    tri = ELSA(dim, heads, kernel_size=K, lam=0, gamma=1, qk_scale=1, backend="triton")
    tri.load_state_dict(ref.state_dict())
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(1, 5, 4, dim)
    out_ref, out_tri, out_64 = ref(x), tri(x), ref64(x.double())
    assert_within("out", out_tri.detach(), out_64.detach(), out_ref.detach(), x.dtype)
    dout = torch.randn_like(out_ref)
    out_ref.backward(dout)
    out_tri.backward(dout)
    out_64.backward(dout.double())
    for (name, p_ref), p_tri, p_64 in zip(ref.named_parameters(), tri.parameters(),
                                          ref64.parameters()):
        assert_within(name, p_tri.grad, p_64.grad, p_ref.grad, x.dtype)


# --------------------------------------------------------------------------- errors


# One row per bad argument of a valid call: the error type and the argument's name
# in the message.
_valid = VALID_CALLS["elsa_attention"]
BAD_CALLS = [
    bad_call(_valid, dict(v=randn(4, 4, 5)), ValueError, "v: expected a 4-D tensor"),
    bad_call(_valid, dict(v=torch.ones(1, 4, 4, 5, dtype=torch.int64)),
             TypeError, "v: expected dtype"),
    bad_call(_valid, dict(v=randn(1, 3, 4, 5), ghost_mul=None, ghost_add=None),
             ValueError, "v: expected a channel count divisible by the 2 heads"),
    bad_call(_valid, dict(attn=randn(1, 18, 4)), ValueError, "attn: expected a 4-D tensor"),
    bad_call(_valid, dict(attn=randn(1, 17, 4, 5)),
             ValueError, "attn: expected G * kernel_size**2"),
    bad_call(_valid, dict(attn=randn(1, 18, 5, 5)),
             ValueError, "attn: expected shape (1, 18, 4, 5)"),
    bad_call(_valid, dict(attn=randn(2, 18, 4, 5)),
             ValueError, "attn: expected shape (1, 18, 4, 5)"),
    bad_call(_valid, dict(attn=randn(1, 18, 4, 5, dtype=torch.float16)),
             TypeError, "attn: expected dtype"),
    bad_call(_valid, dict(attn=meta(1, 18, 4, 5)), ValueError, "attn: expected device cpu"),
    bad_call(_valid, dict(kernel_size=4), ValueError, "kernel_size: expected an odd"),
    bad_call(_valid, dict(kernel_size=0), ValueError, "kernel_size: expected an int >= 1"),
    bad_call(_valid, dict(kernel_size=3.0), TypeError, "kernel_size: expected an int"),
    bad_call(_valid, dict(dilation=0), ValueError, "dilation: expected an int >= 1"),
    bad_call(_valid, dict(dilation=(1, 1)), TypeError, "dilation: expected an int"),
    bad_call(_valid, dict(apply_softmax=1), TypeError, "apply_softmax: expected a bool"),
    bad_call(_valid, dict(ghost_mul=randn(4, 3)), ValueError, "ghost_mul: expected a 3-D"),
    bad_call(_valid, dict(ghost_mul=randn(4, 5, 5)),
             ValueError, "ghost_mul: expected shape (4, 3, 3)"),
    bad_call(_valid, dict(ghost_add=torch.ones(4, 3, 3, dtype=torch.int32)),
             TypeError, "ghost_add: expected dtype"),
    bad_call(_valid, dict(ghost_add=meta(4, 3, 3)), ValueError, "ghost_add: expected device cpu"),
    bad_call(_valid, dict(ghost_add=[1.0]), TypeError, "ghost_add: expected a torch.Tensor"),
    bad_call(_valid, dict(kernel_size=15, attn=randn(1, 450, 4, 5), ghost_mul=None, ghost_add=None,
                          backend="cuda"),
             _backend.BackendUnavailableError, "kernel_size 15 > 13"),
]


@pytest.mark.parametrize("call, change, error, text", BAD_CALLS)
def test_bad_argument(call, change, error, text):
    assert_rejects(lambda: call(**change), error, text)


BAD_MODULE_CALLS = [
    bad_module_call("ELSA-stride", lambda: ELSA(8, 2, stride=2),
                    ValueError, "stride: the fused ELSA operator"),
    bad_module_call("ELSA-num_heads", lambda: ELSA(8, 3),
                    ValueError, "num_heads: expected a divisor of dim_v"),
    bad_module_call("ELSA-kernel_size", lambda: ELSA(8, 2, kernel_size=4),
                    ValueError, "kernel_size: expected an odd"),
    bad_module_call("ELSA-dilation", lambda: ELSA(8, 2, dilation=0),
                    ValueError, "dilation: expected an int >= 1"),
    bad_module_call("ELSA-x-C", module_forward(lambda: ELSA(8, 2, kernel_size=3), (1, 4, 5, 6)),
                    ValueError, "x: expected shape (B, H, W, C) with C = 8"),
    bad_module_call("ELSA-x-rank", module_forward(lambda: ELSA(8, 2, kernel_size=3), (4, 5, 8)),
                    ValueError, "x: expected a 4-D"),
]


@pytest.mark.parametrize("call, error, text", BAD_MODULE_CALLS)
def test_bad_module_argument(call, error, text):
    assert_rejects(call, error, text)


def _good():
    v, attn, mul, add, _ = _inputs(1, 6, 2, 4, 5, 3, "both", dtype=torch.float32)
    return dict(v=v, attn=attn, ghost_mul=mul, ghost_add=add)


@pytest.mark.parametrize("change,error,match", [
    (dict(kernel_size=4), ValueError, "kernel_size: expected an odd"),
    (dict(kernel_size=3.0), TypeError, "kernel_size: expected an int"),
    (dict(dilation=0), ValueError, "dilation: expected an int >= 1"),
    (dict(attn=torch.randn(1, 17, 4, 5)), ValueError, "attn: expected G \\* kernel_size"),
    (dict(attn=torch.randn(1, 36, 4, 5)), ValueError, "v: expected a channel count divisible"),
    (dict(attn=torch.randn(1, 18, 4, 6)), ValueError, "attn: expected shape \\(1, 18, 4, 5\\)"),
    (dict(attn=torch.randn(2, 18, 4, 5)), ValueError, "attn: expected shape"),
    (dict(ghost_mul=torch.randn(6, 3, 4)), ValueError, "ghost_mul: expected shape \\(6, 3, 3\\)"),
    (dict(ghost_add=torch.randn(3, 3, 3)), ValueError, "ghost_add: expected shape"),
    (dict(ghost_add=torch.randn(6, 3, 3, dtype=torch.float16)), TypeError, "ghost_add: expected dtype"),
    (dict(attn=torch.randn(1, 18, 4, 5, dtype=torch.float16)), TypeError, "attn: expected dtype"),
    (dict(v=torch.randn(6, 4, 5)), ValueError, "v: expected a 4-D tensor"),
    (dict(v=[[1.0]]), TypeError, "v: expected a torch.Tensor"),
    (dict(ghost_mul=torch.randn(6, 3, 3, device="meta")), ValueError, "ghost_mul: expected device"),
    (dict(apply_softmax=1), TypeError, "apply_softmax: expected a bool"),
])
def test_bad_input(change, error, match):
    args = {**_good(), "kernel_size": 3, **change}
    with pytest.raises(error, match=match):
        ops.elsa_attention(args.pop("v"), args.pop("attn"), **args)


def test_stride_is_not_an_argument():
    with pytest.raises(TypeError, match="stride"):
        ops.elsa_attention(**_good(), kernel_size=3, stride=2)


def test_forced_backends_list_their_reasons():
    v, attn, _, _, _ = _inputs(1, 258, 2, 3, 3, 3, "none", dtype=torch.float32)
    with pytest.raises(_backend.BackendUnavailableError, match="129 channels per head > 128"):
        ops.elsa_attention(v, attn, kernel_size=3, backend="triton")
    v, attn, _, _, _ = _inputs(1, 2, 1, 3, 3, 15, "none", dtype=torch.float32)
    with pytest.raises(_backend.BackendUnavailableError, match="kernel_size 15 > 13"):
        ops.elsa_attention(v, attn, kernel_size=15, backend="cuda")


def _bad(**changes):
    v, attn, mul, add, _ = _inputs(2, 4, 2, 5, 6, 3, "both", torch.float32)
    args = dict(v=v, attn=attn, ghost_mul=mul, ghost_add=add, kernel_size=3, dilation=1,
                apply_softmax=True)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, error, match", [
    (_bad(v=torch.zeros(2, 4, 5, 6, dtype=torch.int32)), TypeError,
     "v must be float32, float16 or bfloat16"),
    (_bad(attn=torch.zeros(2, 18, 5, 6, dtype=torch.float16)), TypeError,
     "attn must have the dtype of v"),
    (_bad(kernel_size=4), ValueError, "kernel_size must be a positive odd int, got 4"),
    (_bad(kernel_size=15, attn=torch.zeros(2, 225, 5, 6), ghost_mul=None, ghost_add=None),
     ValueError, "compiled for odd kernel sizes 1 to 13"),
    (_bad(dilation=0), ValueError, "dilation must be a positive int"),
    (_bad(attn=torch.zeros(2, 10, 5, 6)), ValueError, "attn must have G \\* kernel_size\\*\\*2"),
    (_bad(attn=torch.zeros(2, 18, 5, 7)), ValueError,
     "attn must have the batch and spatial sizes of v"),
    (_bad(attn=torch.zeros(2, 27, 5, 6)), ValueError,
     "v must have a channel count divisible by the 3 heads"),
    (_bad(ghost_mul=torch.zeros(4, 3, 5)), ValueError,
     r"ghost_mul must have shape \[4, 3, 3\], got \[4, 3, 5\]"),
    (_bad(ghost_add=torch.zeros(4, 3, 3, dtype=torch.int64)), TypeError,
     "ghost_add must be float32, float16 or bfloat16"),
])
def test_cuda_bindings_reject_bad_input(host_ops, args, error, match):
    """The CUDA bindings validate on their own (they are callable without the ops layer)."""
    with pytest.raises(error, match=match):
        host_ops.elsa_attention_fwd(*args.values())


def test_cuda_backward_rejects_bad_gradient_arguments(host_ops):
    v, attn, mul, add, dout = _inputs(2, 4, 2, 5, 6, 3, "both", torch.float32)
    with pytest.raises(ValueError, match="dout must have the shape of v"):
        host_ops.elsa_attention_bwd(dout[:, :2], v, attn, mul, add, 3, 1, True, [True] * 4)
    with pytest.raises(TypeError, match="dout must have the dtype of v"):
        host_ops.elsa_attention_bwd(dout.half(), v, attn, mul, add, 3, 1, True, [True] * 4)
    with pytest.raises(ValueError, match="needs_input_grad must have 4 entries"):
        host_ops.elsa_attention_bwd(dout, v, attn, mul, add, 3, 1, True, [True] * 3)


# --------------------------------------------------------------------------- extreme arguments

# Runs in a child process (a crash fails the test instead of killing pytest): the op on
# `backend` with a huge dilation against the official unfold math at dilation max(H, W),
# where every tap but the centre is outside the image, as for any larger dilation.
_HUGE_DILATION_PROBE = """
import sys, torch
from pyvit_ops.testing import interpreter
interpreter.enable()
from pyvit_ops.testing import host
import pyvit_ops
backend, K, dilation = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if backend == "cuda":
    host.load()
gen = torch.Generator().manual_seed(0)
v = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
attn = torch.randn(1, K * K, 4, 4, generator=gen, dtype=torch.float64)
mul = torch.randn(2, K, K, generator=gen, dtype=torch.float64)
leaves = [t.float().requires_grad_() for t in (v, attn, mul)]
out = pyvit_ops.elsa_attention(*leaves, kernel_size=K, dilation=dilation, backend=backend)
out.backward(torch.ones_like(out))
print(repr((out.double().tolist(), [t.grad.double().tolist() for t in leaves])))
"""


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("K, dilation", [(3, 65536), (3, 2**31 - 1), (5, 2**31 - 1)])
def test_huge_dilation_computes_the_centre_tap(backend, K, dilation):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _HUGE_DILATION_PROBE, backend, str(K),
                             str(dilation)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    out, grads = eval(result.stdout.strip().splitlines()[-1])
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
    attn = torch.randn(1, K * K, 4, 4, generator=gen, dtype=torch.float64)
    mul = torch.randn(2, K, K, generator=gen, dtype=torch.float64)

    def official(dtype):
        """The official math on the probe's float32 values, in ``dtype``."""
        leaves = [t.float().to(dtype).requires_grad_() for t in (v, attn, mul)]
        expected = elsa_official.elsa_attention(*leaves[:2], leaves[2], None, K, 4)
        expected.backward(torch.ones_like(expected))
        return [expected.detach()] + [t.grad for t in leaves]

    for name, g, o, w in zip(RESULTS, [out, *grads], official(torch.float64),
                             official(torch.float32)):
        assert_within(name, torch.tensor(g), o, w, torch.float32)


def test_cuda_plan_of_a_huge_dilation_is_bounded_by_the_image(host_ops):
    """The sub-grids of a dilation >= the image: one per pixel at most, for any dilation."""
    for H, W in ((4, 4), (1, 50000), (3, 70000)):
        v, attn = torch.zeros(1, 2, H, W), torch.zeros(1, 9, H, W)
        for dilation in (max(H, W), 65536, 2**31 - 1):
            why, plan = host_ops.elsa_attention_plan(v, attn, 3, dilation, False, 0, -1)
            assert why == "" and 1 <= plan[3] <= H * W, (H, W, dilation, plan)


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
def test_half_backward_with_scaled_gradient_stays_finite(backend):
    """fp16 with the upstream gradient scaled x4096 (GradScaler): dattn is finite and
    matches the reference, although dp_t - dp_centre exceeds the fp16 range."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(1, 32, 6, 6, generator=gen).half()
    attn = (torch.randn(1, 9, 6, 6, generator=gen) * 4).half()
    dout = (torch.randn(1, 32, 6, 6, generator=gen) * 4096).half()
    _check_against_reference(backend, v, attn, None, None, dout, kernel_size=3)


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
def test_extreme_finite_logits_match_reference(backend):
    """Logits at +-finfo.max / finfo.min: every result of the reference is finite, and
    the kernels give it (the base-2 rescaling of l * log2(e) would overflow)."""
    v, attn, mul, add, dout = _inputs(1, 4, 2, 4, 4, 3, "both", torch.float32)
    big = torch.finfo(torch.float32)
    attn[0, :9, 1, 1] = big.min         # a whole softmax at finfo.min
    attn[0, 9:13, 2, 2] = big.min       # some taps at finfo.min
    attn[0, 13:, 3, 2] = big.max        # several taps at finfo.max
    attn[0, 3, 0, 0], attn[0, 4, 0, 0] = big.max, big.min
    ref_out, ref_grads = _run(reference, v, attn, mul, add, dout, kernel_size=3)
    assert torch.isfinite(ref_out).all() and all(torch.isfinite(g).all() for g in ref_grads)
    _check_against_reference(backend, v, attn, mul, add, dout, kernel_size=3)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("change, match", [
    (dict(kernel_size=2**32 + 1), r"kernel_size: expected an int <= 2\*\*31 - 1, got 4294967297"),
    (dict(dilation=2**32), r"dilation: expected an int <= 2\*\*31 - 1, got 4294967296"),
    (dict(dilation=2**64), r"dilation: expected an int <= 2\*\*31 - 1, got 18446744073709551616"),
])
def test_int_arguments_beyond_int32_name_the_argument(backend, change, match):
    v, attn, _, _, _ = _inputs(1, 2, 1, 4, 4, 3, "none", torch.float32)
    with pytest.raises(ValueError, match=match):
        ops.elsa_attention(v, attn, **{"kernel_size": 3, **change}, backend=backend)


# --------------------------------------------------------------------------- launch limits

# Shared memory per block (opt-in) of the GPUs the CUDA kernels plan for, and the largest
# K whose plan fits there for 32-channel heads (ELSA-Swin) and for one channel per head.
SMEM_BUDGETS = {"no opt-in": 48 * 1024, "sm_86/89": 99 * 1024, "sm_80": 163 * 1024,
                "sm_90": 227 * 1024}


def _plans(host_ops, budget, Cg, samples_per_block=-1, B=1, G=1, H=56, W=56, ghost_grad=False):
    """{K: plan or None} of the CUDA kernels at ``budget`` bytes per block."""
    plans = {}
    for K in range(1, CUDA_MAX + 1, 2):
        v, attn = torch.zeros(B, G * Cg, H, W), torch.zeros(B, G * K * K, H, W)
        why, plan = host_ops.elsa_attention_plan(v, attn, K, 1, ghost_grad, budget,
                                                 samples_per_block)
        assert bool(why) == (not plan), (K, why, plan)
        plans[K] = plan or None
    return plans


CUDA_MAX = capabilities.capability("elsa_attention", "cuda").limit("kernel_size").value


@pytest.mark.parametrize("gpu", SMEM_BUDGETS)
def test_cuda_plans_fit_each_gpu_budget(host_ops, gpu):
    """Every plan stays within the budget, and what fits grows with it: the probabilities
    of a tile take K*K * 128 floats (K = 11: 60.5 KB), so without opt-in K <= 9 fits; with
    it every K does, staging fewer channels at once where the budget is small (K = 13,
    32-channel heads: 4 channels at a time on sm_86, 16 on sm_80, the whole head on sm_90)."""
    budget = SMEM_BUDGETS[gpu]
    expected_max = 9 if gpu == "no opt-in" else 13
    expected_chunk_k13 = {"sm_86/89": 4, "sm_80": 16, "sm_90": 32}.get(gpu)
    for Cg in (32, 1):
        plans = _plans(host_ops, budget, Cg)
        fits = [K for K, plan in plans.items() if plan is not None]
        assert fits == list(range(1, expected_max + 1, 2)), (Cg, fits)
        for K in fits:
            tile_h, tile_w, chunk, tiles, aggregate_smem, attn_smem, _ = plans[K]
            assert aggregate_smem <= budget and attn_smem <= budget, (K, plans[K])
            assert tile_h * tile_w == 128 and 1 <= chunk <= min(Cg, 32)
        if expected_chunk_k13 is not None:
            assert plans[13][2] == min(Cg, expected_chunk_k13), plans[13]


def test_cuda_samples_per_block_gpu_rule(host_ops):
    """The GPU rule (samples_per_block=0): about 1024 attn-gradient blocks, one sample
    each until the batch is larger; the host build's default (-1) puts two in a block."""
    def samples(B, default=False):
        v, attn = torch.zeros(B, 2, 8, 8).expand(B, 2, 8, 8), torch.zeros(B, 9, 8, 8)
        _, plan = host_ops.elsa_attention_plan(v, attn, 3, 1, True, 0, -1 if default else 0)
        assert plan[3] == 1, plan  # one tile per (sample, head): 8x8 pixels
        return plan[-1]

    assert [samples(B) for B in (1, 64, 1024, 1025, 4096)] == [1, 1, 1, 2, 4]
    assert [samples(B, default=True) for B in (1, 64)] == [1, 2]
    v, attn = torch.zeros(5, 2, 8, 8), torch.zeros(5, 9, 8, 8)
    assert host_ops.elsa_attention_plan(v, attn, 3, 1, False, 0, 0)[1][-1] == 1


@pytest.mark.parametrize("gpu", SMEM_BUDGETS)
def test_automatic_choice_falls_back_when_the_cuda_plan_does_not_fit(host_ops, monkeypatch,
                                                                   gpu):
    """The automatic choice asks the extension whether the plan fits this device's shared
    memory, and takes Triton when it does not, instead of failing at launch."""
    budget = SMEM_BUDGETS[gpu]
    monkeypatch.setattr(ops, "smem_per_block", lambda device: budget)
    fits = {K: plan is not None for K, plan in _plans(host_ops, budget, 32, H=4, W=4).items()}
    for K in (9, 11, 13):
        v, attn, _, _, _ = _inputs(1, 32, 1, 4, 4, K, "none", torch.float32)
        heads = 1

        def reasons(b):
            return ops._reasons(b, v, attn, None, None, heads, K, 1)

        # "cuda": the device type the automatic choice runs on (tensors here are on CPU).
        chosen = _backend.choose("elsa_attention", None, reasons, device="cuda")
        assert chosen == ("cuda" if fits[K] else "triton"), (K, reasons("cuda"))
        if not fits[K]:
            assert "shared memory" in reasons("cuda")[0]
            with pytest.raises(_backend.BackendUnavailableError, match="shared memory"):
                ops.elsa_attention(v, attn, kernel_size=K, backend="cuda")


@pytest.mark.parametrize("gpu", ["no opt-in", "sm_90"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_reasons_under_torch_compile_ask_the_plan(host_ops, monkeypatch, gpu, dynamic):
    """torch.compile(fullgraph=True) traces the cuda backend's reasons, the plan query
    included (no graph break on the extension's plan op), and they say what eager says:
    K = 11 fits sm_90's shared memory, not a block without opt-in."""
    monkeypatch.setattr(ops, "smem_per_block", lambda device: SMEM_BUDGETS[gpu])
    K = 11
    v, attn, _, _, _ = _inputs(1, 32, 1, 4, 4, K, "none", torch.float32)

    def fn(v, attn):
        return v + len(ops._reasons("cuda", v, attn, None, None, 1, K, 1))

    expected = ops._reasons("cuda", v, attn, None, None, 1, K, 1)
    assert bool(expected) == (gpu == "no opt-in") and len(expected) <= 1, expected
    torch._dynamo.reset()  # the plan's answer is a trace-time constant: no stale graph
    compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=dynamic)
    assert torch.equal(compiled(v, attn), v + len(expected))


def test_int32_offset_limits_are_backend_reasons():
    """A sample spanning 2**31 elements is a reason to skip Triton, not a launch failure."""
    v = torch.empty_strided((1, 2, 4, 4), (2**32, 2**31, 4, 1), device="meta")
    attn = torch.empty((1, 9, 4, 4), device="meta")
    why = ops._reasons("triton", v, attn, None, None, 1, 3, 1)
    assert any(r.startswith("v: offsets within one sample must fit in int32") for r in why), why


@pytest.mark.parametrize("ghost", [False, True])
def test_triton_grids_keep_the_batch_off_axes_1_and_2(monkeypatch, ghost):
    """Grid axes 1 and 2 stop at 65535: a batch of 70000 folds into axis 0."""
    recorders = {name: GridRecorder() for name in (
        "_elsa_attention_aggregate_kernel", "_elsa_attention_bwd_attn_kernel",
        "_elsa_attention_bwd_ghost_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(kernels, name, recorder)
    B, C, G, K = 70000, 4, 2, 3
    v, attn = torch.zeros(B, C, 1, 2), torch.zeros(B, G * K * K, 1, 2)
    mul = torch.zeros(C, K, K) if ghost else None
    kernels.elsa_attention_fwd(v, attn, mul, None, K, 1, True)
    kernels.elsa_attention_bwd(v, v, attn, mul, None, K, 1, True, [True, True, ghost, False])
    cfg = kernels.tile_config(C // G, 2, K, False)
    n_tiles = triton.cdiv(2, cfg.block_p_attn)
    chunk, tile_chunk = kernels.work_chunks(B, n_tiles, G)
    # The aggregation kernel runs twice: forward, then dv.
    expected = {"_elsa_attention_aggregate_kernel": [B * G, B * G],
                "_elsa_attention_bwd_attn_kernel": [triton.cdiv(B, chunk) * G]}
    for name, recorder in recorders.items():
        for grid in recorder.grids:
            assert all(extent <= 65535 for extent in grid[1:]), (name, grid)
        if name in expected:
            assert [math.prod(g) for g in recorder.grids] == expected[name], name
