"""The CUDA C++ infrastructure, without a GPU.

- the host emulation of the CUDA execution model (csrc/host_emulation.h) runs kernels
  that use static and dynamic shared memory, __syncthreads, warp shuffles and atomics
  correctly (tests/host_emulation_selftest.cu, built with g++, called through ctypes),
  and makes their bugs fail every run: a missing barrier, a read of shared memory no
  thread wrote, a deadlock, a launch over the GPU's limits;
- the window-attention backward gives the reference's gradients with the GPU build's
  grouping of windows as well as with the test build's;
- its fp16 / bf16 conversions are bit-exact against torch, ties, inf and nan included;
- every csrc kernel compiles for sm_80 and sm_90 with 0 spilled registers;
- the host-emulation build of the bindings registers torch.ops.pyvit_ops_host and
  rejects bad input with errors that name the argument.
"""
import ctypes
import glob
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyvit_ops import _ext
from pyvit_ops.ops.window_attention import window_attention
from pyvit_ops.testing import cuda_report, host

HERE = os.path.dirname(os.path.abspath(__file__))
SELFTEST = os.path.join(HERE, "host_emulation_selftest.cu")
CUDA_INVALID_VALUE = 1
CUDA_INVALID_CONFIGURATION = 9
CUDA_OUT_OF_RESOURCES = 701
CUDA_LAUNCH_TIMEOUT = 702
F16, BF16 = 0, 1  # dtype codes of the self-test wrappers


def _ptr(array):
    return array.ctypes.data_as(ctypes.c_void_p)


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    """The self-test kernels built with g++ under host emulation, from the source host.py
    compiles (with the emulation's launch-bound and shared-memory statements)."""
    directory = tmp_path_factory.mktemp("emulation")
    source = host.write_emulation_source(SELFTEST, str(directory))
    library = directory / "selftest.so"
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
           "-DPYVIT_HOST_EMULATION", "-I", host.csrc_dir(), "-x", "c++", source,
           "-o", str(library)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    lib = ctypes.CDLL(str(library))
    for name in ("pv_block_sum", "pv_reverse_rows", "pv_shuffle", "pv_deadlock", "pv_spin",
                 "pv_neighbour", "pv_unwritten_shared", "pv_order", "pv_shared_budget",
                 "pv_count_blocks", "pv_atomic", "pv_divmod", "pv_round", "pv_widen"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


# ---- execution model ------------------------------------------------------------------

@pytest.mark.parametrize("blocks, threads, n", [(1, 32, 5), (3, 64, 1000), (4, 256, 4099)])
def test_block_sum_shared_memory_syncthreads_shuffles(selftest, blocks, threads, n):
    x = np.arange(n, dtype=np.float32) % 97 - 40  # integers: every order of summation is exact
    out = np.full(blocks, np.nan, dtype=np.float32)
    assert selftest.pv_block_sum(_ptr(x), n, _ptr(out), blocks, threads) == 0
    owner = np.arange(n) // threads % blocks  # block that reads element i (grid-stride loop)
    expected = np.array([x[owner == b].sum() for b in range(blocks)], dtype=np.float32)
    np.testing.assert_array_equal(out, expected)


def test_dynamic_shared_memory_and_exited_threads(selftest):
    rows, n = 12, 27  # 5 of the 32 threads per row exit before __syncthreads
    x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
    out = np.zeros_like(x)
    assert selftest.pv_reverse_rows(_ptr(x), rows, n, _ptr(out)) == 0
    np.testing.assert_array_equal(out, x[:, ::-1])


def test_shuffle_semantics(selftest):
    threads = 64
    out = np.zeros((threads, 4), dtype=np.int32)
    assert selftest.pv_shuffle(_ptr(out), threads) == 0
    t = np.arange(threads)
    lane, base = t % 32, t - t % 32
    expected = np.stack([
        1000 + base + 3,                                   # __shfl_sync(v, 3)
        1000 + base + (lane & ~7) + 5,                     # __shfl_sync(v, 5, width=8)
        np.where(lane % 8 + 3 < 8, 1000 + t + 3, 1000 + t),  # __shfl_down_sync(v, 3, width=8)
        1000 + base + (lane ^ 6),                          # __shfl_xor_sync(v, 6, width=8)
    ], axis=1)
    np.testing.assert_array_equal(out, expected)


def test_atomic_add(selftest):
    count = np.zeros(1, dtype=np.int32)
    total = np.zeros(1, dtype=np.float32)
    assert selftest.pv_atomic(_ptr(count), _ptr(total), 3, 128) == 0
    assert count[0] == 3 * 128
    assert total[0] == 3 * sum(range(128))


def test_invalid_launch_configuration_is_reported(selftest):
    x = np.zeros(4, dtype=np.float32)
    out = np.zeros(1, dtype=np.float32)
    assert selftest.pv_block_sum(_ptr(x), 4, _ptr(out), 1, 2048) == CUDA_INVALID_CONFIGURATION


def test_deadlocked_block_fails_the_launch_instead_of_hanging(selftest, capfd):
    assert selftest.pv_deadlock() == CUDA_LAUNCH_TIMEOUT
    assert "16 wait at __syncthreads() and 16 at a warp collective" in capfd.readouterr().err
    x = np.ones(64, dtype=np.float32)
    out = np.zeros(1, dtype=np.float32)
    assert selftest.pv_block_sum(_ptr(x), 64, _ptr(out), 1, 64) == 0 and out[0] == 64


def test_endless_kernel_fails_the_launch_instead_of_hanging(selftest, monkeypatch, capfd):
    monkeypatch.setenv("PYVIT_HOST_EMULATION_TIMEOUT", "1")
    flag = np.zeros(1, dtype=np.int32)
    assert selftest.pv_spin(_ptr(flag)) == CUDA_LAUNCH_TIMEOUT
    assert "made no progress" in capfd.readouterr().err
    flag[0] = 1  # lets the abandoned thread finish
    # The stuck thread is abandoned; the next launch gets a fresh one.
    x = np.ones(64, dtype=np.float32)
    out = np.zeros(1, dtype=np.float32)
    assert selftest.pv_block_sum(_ptr(x), 64, _ptr(out), 1, 64) == 0 and out[0] == 64


# ---- the emulation exposes kernel bugs on every run -----------------------------------

@pytest.mark.parametrize("blocks", [1, 4])
@pytest.mark.parametrize("barriers", [0, 1, 2, 3], ids=["none", "raw-only", "war-only", "both"])
def test_missing_barrier_fails_every_run(selftest, blocks, barriers):
    threads, tiles = 64, 2
    x = np.arange(blocks * tiles * threads, dtype=np.float32)
    expected = np.roll(x.reshape(-1, threads), -1, axis=1).ravel()
    for _ in range(3):
        out = np.zeros_like(x)
        assert selftest.pv_neighbour(_ptr(x), _ptr(out), blocks, threads, tiles, barriers) == 0
        assert np.array_equal(out, expected) == (barriers == 3)


def test_unwritten_shared_memory_reads_garbage(selftest):
    blocks = 3
    for _ in range(2):
        out = np.zeros((blocks, 32, 2), dtype=np.float32)
        assert selftest.pv_unwritten_shared(_ptr(out), blocks) == 0
        np.testing.assert_array_equal(out[0], np.broadcast_to([1.0, 2.0], (32, 2)))
        # Not the previous block's values: static and dynamic memory are poisoned.
        assert np.isnan(out[1:]).all()


def _orders(selftest, blocks, threads, phases):
    order = np.full((blocks, phases, threads), -1, dtype=np.int32)
    next_slot = np.zeros((blocks, phases), dtype=np.int32)
    assert selftest.pv_order(_ptr(order), _ptr(next_slot), blocks, threads, phases) == 0
    return order


def test_threads_run_alone_in_forward_reverse_and_random_order(selftest, monkeypatch):
    blocks, threads, phases = 2, 64, 3
    order = _orders(selftest, blocks, threads, phases)
    forward = np.arange(threads)
    kinds = {}
    for b in range(blocks):
        for phase in range(phases):
            row = order[b, phase]
            assert np.array_equal(np.sort(row), forward)
            kind = ("forward" if np.array_equal(row, forward) else
                    "reverse" if np.array_equal(row, forward[::-1]) else "random")
            kinds.setdefault(kind, []).append((b, phase))
    assert sorted(kinds) == ["forward", "random", "reverse"]
    # Deterministic for a seed; another seed gives other random orders.
    assert np.array_equal(_orders(selftest, blocks, threads, phases), order)
    monkeypatch.setenv("PYVIT_HOST_EMULATION_SEED", "1")
    reseeded = _orders(selftest, blocks, threads, phases)
    assert not np.array_equal(reseeded, order)
    b, phase = kinds["random"][0]
    assert not np.array_equal(reseeded[b, phase], order[b, phase])


KB = 1024


@pytest.mark.parametrize("static_kb, dynamic, attribute, smem_kb, error", [
    (0, 48 * KB - 128, -1, 163, 0),                # 128 static bytes + dynamic = 48 KB
    (0, 48 * KB, -1, 163, CUDA_INVALID_VALUE),     # one static float too many
    (0, 64 * KB, -1, 163, CUDA_INVALID_VALUE),     # over 48 KB without opting in
    (0, 64 * KB, 64 * KB, 163, 0),
    (0, 200 * KB, 200 * KB, 163, CUDA_INVALID_VALUE),  # opt-in over the GPU's budget
    (0, 100 * KB, 100 * KB, 99, CUDA_INVALID_VALUE),
    (0, 100 * KB, 100 * KB, 227, 0),
    (40, 8 * KB, -1, 163, 0),
    (40, 9 * KB, -1, 163, CUDA_INVALID_VALUE),
    (40, 123 * KB, 123 * KB, 163, 0),
    (40, 124 * KB, 124 * KB, 163, CUDA_INVALID_VALUE),  # static + dynamic over the budget
])
def test_shared_memory_over_budget_fails_the_launch(selftest, monkeypatch, static_kb, dynamic,
                                                    attribute, smem_kb, error):
    monkeypatch.setenv("PYVIT_HOST_EMULATION_SMEM_KB", str(smem_kb))
    out = np.zeros(32, dtype=np.float32)
    assert selftest.pv_shared_budget(_ptr(out), static_kb, dynamic, attribute) == error
    np.testing.assert_array_equal(out, 3.0 if error == 0 else 0.0)


def test_block_over_launch_bounds_fails_the_launch(selftest, capfd):
    x = np.arange(128, dtype=np.float32)
    out = np.zeros_like(x)
    # neighbour_kernel is declared with __launch_bounds__(64).
    assert selftest.pv_neighbour(_ptr(x), _ptr(out), 1, 128, 1, 3) == CUDA_OUT_OF_RESOURCES
    assert "expected at most 64 threads (__launch_bounds__), got 128" in capfd.readouterr().err
    assert not out.any()
    assert selftest.pv_neighbour(_ptr(x), _ptr(out), 2, 64, 1, 3) == 0


@pytest.mark.parametrize("grid, block, error", [
    ((2**31, 1, 1), (1, 1), CUDA_INVALID_CONFIGURATION),
    ((1, 65536, 1), (1, 1), CUDA_INVALID_CONFIGURATION),
    ((1, 1, 65536), (1, 1), CUDA_INVALID_CONFIGURATION),
    ((1, 1, 1), (1025, 1), CUDA_INVALID_CONFIGURATION),
    ((1, 1, 1), (1, 65), CUDA_INVALID_CONFIGURATION),
    ((1, 1, 1), (32, 33), CUDA_INVALID_CONFIGURATION),  # 1056 threads
    ((1, 65535, 1), (1, 1), 0),
    ((3, 2, 2), (32, 2), 0),
])
def test_grid_and_block_limits(selftest, grid, block, error):
    count = np.zeros(1, dtype=np.int32)
    assert selftest.pv_count_blocks(_ptr(count), *grid, *block) == error
    assert count[0] == (0 if error else np.prod(grid) * np.prod(block))


@pytest.mark.parametrize("divisor", [1, 2, 3, 7, 49, 96, 1000, 3136, 65537, 2**30 + 1,
                                     2**31 - 1])
def test_fast_divmod(selftest, divisor):
    rng = np.random.default_rng(divisor)
    edges = [0, 1, divisor - 1, divisor, divisor + 1, 2**31 - 2, 2**31 - 1]
    n = np.concatenate([np.array(edges, dtype=np.int64) % 2**31,
                        rng.integers(0, 2**31, 4000)]).astype(np.uint32)
    q = np.zeros_like(n)
    r = np.zeros_like(n)
    assert selftest.pv_divmod(_ptr(n), n.size, divisor, _ptr(q), _ptr(r)) == 0
    np.testing.assert_array_equal(q, n // np.uint32(divisor))
    np.testing.assert_array_equal(r, n % np.uint32(divisor))


# ---- fp16 / bf16 conversions ------------------------------------------------------------

def _all_patterns(dtype):
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def _hard_floats(dtype):
    """Every value of `dtype`, the ties between neighbours and their float32 neighbours,
    overflow / underflow boundaries and random float32 bit patterns (nan, inf, subnormal)."""
    values = _all_patterns(dtype).float()
    finite = values[torch.isfinite(values)].double().unique()  # sorted
    ties = ((finite[1:] + finite[:-1]) / 2).float()  # exact in float32 (one more bit)
    above = torch.nextafter(ties, torch.tensor(float("inf")))
    below = torch.nextafter(ties, torch.tensor(float("-inf")))
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0,
                            65519.996, 65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001,
                            3.4028235e38, 1e-45, -1e-45])
    random_bits = torch.randint(-2**31, 2**31, (200_000,), dtype=torch.int64,
                                generator=torch.Generator().manual_seed(0))
    random = random_bits.to(torch.int32).view(torch.float32)
    return torch.cat([values, ties, above, below, special, random]).contiguous()


def _assert_same_bits(got, expected):
    """float tensors equal bit for bit, except that any nan matches any nan."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    g, e = got[~nan].view(bits[got.dtype]), expected[~nan].view(bits[expected.dtype])
    bad = (g != e).nonzero().flatten()
    assert bad.numel() == 0, (f"{bad.numel()} mismatches, first at {bad[:5].tolist()}: "
                              f"got {g[bad[:5]].tolist()}, expected {e[bad[:5]].tolist()}")


@pytest.mark.parametrize("dtype, code", [(torch.float16, F16), (torch.bfloat16, BF16)])
def test_round_to_nearest_even_matches_torch(selftest, dtype, code):
    x = _hard_floats(dtype)
    out = torch.empty(x.shape, dtype=dtype)
    assert selftest.pv_round(ctypes.c_void_p(x.data_ptr()), x.numel(),
                             ctypes.c_void_p(out.data_ptr()), code) == 0
    _assert_same_bits(out, x.to(dtype))


@pytest.mark.parametrize("dtype, code", [(torch.float16, F16), (torch.bfloat16, BF16)])
def test_widening_matches_torch(selftest, dtype, code):
    bits = _all_patterns(dtype).contiguous()
    out = torch.empty(bits.shape, dtype=torch.float32)
    assert selftest.pv_widen(ctypes.c_void_p(bits.data_ptr()), bits.numel(),
                             ctypes.c_void_p(out.data_ptr()), code) == 0
    _assert_same_bits(out, bits.float())


# ---- static compile figures ----------------------------------------------------------------

PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4kernPfi' for 'sm_90'
ptxas info    : Function properties for _Z4kernPfi
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 364 bytes cmem[0]
"""


def test_parse_ptxas():
    [record] = cuda_report.parse_ptxas(PTXAS_SAMPLE, source="k.cu")
    assert record == {"kernel": "kern(float*, int)", "arch": "90", "source": "k.cu",
                      "registers": 255, "shared_bytes": 2048, "spill_stores": 4,
                      "spill_loads": 12, "stack": 8}


@pytest.mark.skipif(cuda_report.nvcc_path() is None,
                    reason="nvcc not found (set CUDA_HOME): cannot compile for sm_80 / sm_90")
def test_csrc_kernels_compile_without_spills():
    sources = sorted(glob.glob(os.path.join(host.csrc_dir(), "*.cu")))
    assert sources
    # The self-test kernels too: the source run under emulation above also builds with nvcc.
    records = cuda_report.ptxas_report(archs=("80", "90"), sources=sources + [SELFTEST])
    for source in sources + [SELFTEST]:
        for arch in ("80", "90"):
            assert any(r["source"] == os.path.basename(source) and r["arch"] == arch
                       for r in records), f"no kernel of {source} compiled for sm_{arch}"
    spilled = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills:\n" + cuda_report.format_table(spilled)


# ---- host-emulation build of the bindings ----------------------------------------------------

@pytest.fixture(scope="module")
def host_ops():
    return host.load()


def test_window_backward_at_gpu_constants(host_ops):
    """The backward's grouping of windows into blocks at the GPU build's constant (one
    window per block here) as well as the test build's (five): both match the reference,
    and the table gradient's summation order, hence its bits, differ."""
    torch.manual_seed(0)
    shape, window, shift = (1, 9, 10, 2, 32), (4, 5), (2, 1)
    q, k, v = torch.randn(*shape[:3], 3, *shape[3:]).unbind(3)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), shape[3])
    pad_kv = tuple(torch.randn(2, shape[3], shape[4]).unbind(0))
    grad = torch.randn(shape)

    def gradients(backend, tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        out = window_attention(*tensors[:4], window_size=window, shift_size=shift,
                               pad_kv=tuple(tensors[4:]), backend=backend)
        return torch.autograd.grad(out, tensors, grad.to(out.dtype))

    inputs = [q, k, v, table, *pad_kv]
    expected = gradients("reference", [t.double() for t in inputs])
    emulated = gradients("cuda", inputs)
    with host.gpu_constants():
        gpu = gradients("cuda", inputs)
    for got in (emulated, gpu):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.double(), e, atol=5e-5, rtol=2e-5)
    assert not torch.equal(emulated[3], gpu[3])


def test_host_build_is_registered(host_ops):
    assert host.load() is host_ops  # idempotent
    assert host_ops.built_archs() == "host-emulation"
    assert _ext.has_op("avg_pool2d_fwd", "cpu") == (True, "")
    assert _ext.has_op("avg_pool2d_bwd", torch.device("cpu")) == (True, "")
    ok, reason = _ext.has_op("no_such_op", "cpu")
    assert not ok and "no_such_op" in reason
    ok, reason = _ext.has_op("avg_pool2d_fwd", "meta")
    assert not ok and "meta" in reason
    assert _ext.lib(torch.zeros(1)) is host_ops


def test_launches_split_into_32bit_chunks(host_ops):
    # 9x7 images of 5 channels (315 elements): the host build caps a launch at
    # MAX_LAUNCH_ELEMENTS, so this batch needs several launches forward and backward.
    assert 5 * 9 * 7 < host.MAX_LAUNCH_ELEMENTS < 7 * 5 * 9 * 7
    x = torch.randn(7, 5, 9, 7, dtype=torch.float64).float().requires_grad_()
    y = host_ops.avg_pool2d_fwd(x.detach(), [3, 3], [1, 1], [1, 1], True)
    expected = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(y)
    dx = host_ops.avg_pool2d_bwd(grad, x.detach(), [3, 3], [1, 1], [1, 1], True)
    torch.testing.assert_close(dx, torch.autograd.grad(expected, x, grad)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("call, error, match", [
    (lambda ops, x: ops.avg_pool2d_fwd(x.int(), [3, 3], [1, 1], [1, 1], False),
     TypeError, "x must be float32, float16 or bfloat16"),
    (lambda ops, x: ops.avg_pool2d_fwd(x[0], [3, 3], [1, 1], [1, 1], False),
     ValueError, "x must have 4 dimensions"),
    (lambda ops, x: ops.avg_pool2d_fwd(x, [3, 3], [1, 1], [2, 2], False),
     ValueError, "padding must be at most half of kernel_size"),
    (lambda ops, x: ops.avg_pool2d_fwd(x, [3, 3, 3], [1, 1], [1, 1], False),
     ValueError, "kernel_size must have 1 or 2 elements"),
    (lambda ops, x: ops.avg_pool2d_fwd(x, [3, 3], [0, 1], [1, 1], False),
     ValueError, "stride must be positive"),
    (lambda ops, x: ops.avg_pool2d_fwd(x, [3, 3], [2, 2], [1, 1], True),
     ValueError, "subtract_input=True needs an output of the input's size"),
    (lambda ops, x: ops.avg_pool2d_fwd(x, [9, 9], [1, 1], [0, 0], False),
     ValueError, "does not fit the input"),
    (lambda ops, x: ops.avg_pool2d_bwd(x[:, :, :4], x, [3, 3], [1, 1], [1, 1], False),
     ValueError, r"grad_out must have the output shape \[2, 3, 5, 6\]"),
    (lambda ops, x: ops.avg_pool2d_bwd(x.half(), x, [3, 3], [1, 1], [1, 1], False),
     TypeError, "grad_out must have the dtype of x"),
])
def test_bindings_reject_bad_input(host_ops, call, error, match):
    x = torch.randn(2, 3, 5, 6)
    with pytest.raises(error, match=match):
        call(host_ops, x)
