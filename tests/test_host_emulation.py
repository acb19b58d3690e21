"""The CUDA C++ infrastructure, without a GPU.

- the host emulation of the CUDA execution model (csrc/host_emulation.h) runs kernels
  that use static and dynamic shared memory, __syncthreads, warp shuffles and atomics
  correctly (tests/host_emulation_selftest.cu, built with g++, called through ctypes),
  and makes their bugs fail every run: a missing barrier, a read of shared memory no
  thread wrote, a deadlock, a launch over the GPU's limits;
- the window-attention backward gives the reference's gradients with the GPU build's
  grouping of windows as well as with the test build's;
- its fp16 / bf16 conversions are bit-exact against torch, ties, inf and nan included;
- its tensor-core instructions (mma.sync m16n8k16, ldmatrix) hold the PTX ISA's fragment
  layouts: csrc/mma.cuh's coordinates and the emulated mma against tables written here from
  the ISA, tiles loaded by every loader against a matrix product (a planted register swap
  fails it), a row reduction and an mma chain that rely on the accumulator layout, and
  lanes that do not take part or bad ldmatrix addresses poison or fail;
- csrc/mma.cuh compiles to HMMA instructions without spills on sm_80 / sm_90a;
- every csrc kernel compiles for sm_80 and sm_90 with 0 spilled registers;
- the host-emulation build of the bindings registers torch.ops.pyvit_ops_host and
  rejects bad input with errors that name the argument.
"""
import ctypes
import glob
import os
import re
import subprocess
import sys

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
CUDA_ILLEGAL_ADDRESS = 700
CUDA_MISALIGNED_ADDRESS = 716
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
                 "pv_count_blocks", "pv_atomic", "pv_divmod", "pv_round", "pv_widen",
                 "pv_mma_registers", "pv_mma_coords", "pv_mma_tile", "pv_mma_row_max",
                 "pv_mma_chain", "pv_ldmatrix_fault"):
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


# ---- tensor cores: mma.sync m16n8k16 and ldmatrix (csrc/mma.cuh) ---------------------------

MMA_DTYPES = [pytest.param(torch.float16, F16, id="fp16"),
              pytest.param(torch.bfloat16, BF16, id="bf16")]


def _tptr(tensor):
    """The data pointer of `tensor`, which the caller keeps alive through the call."""
    assert tensor.is_contiguous()
    return ctypes.c_void_p(tensor.data_ptr())


def _ptx_fragments():
    """(row, column) of every element of every lane, from the PTX ISA's m16n8k16 tables for
    .f16 / .bf16 operands: A[lane, i] for a0..a7, B[lane, i] = (k, n) for b0..b3,
    C[lane, i] for c0..c3 (and d0..d3); element i sits in register i // 2, low half first."""
    a, b, c = np.zeros((32, 8, 2), int), np.zeros((32, 4, 2), int), np.zeros((32, 4, 2), int)
    for lane in range(32):
        group, tig = lane >> 2, lane % 4
        for i in range(8):
            a[lane, i] = (group if i < 2 or 4 <= i < 6 else group + 8,
                          tig * 2 + (i & 1) + (8 if i >= 4 else 0))
        for i in range(4):
            b[lane, i] = (tig * 2 + (i & 1) + (8 if i >= 2 else 0), group)
            c[lane, i] = (group if i < 2 else group + 8, tig * 2 + (i & 1))
    return a, b, c


def _registers(matrix, positions):
    """The 32-bit registers of every lane holding `matrix` (fp16 / bf16) at `positions`."""
    bits = matrix.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
    elements = bits[positions[..., 0], positions[..., 1]]
    return np.ascontiguousarray(elements[:, 0::2] | elements[:, 1::2] << 16)


def _integers(shape, low, high, seed):
    return torch.randint(low, high + 1, shape, generator=torch.Generator().manual_seed(seed))


def _mma_inputs(dtype, warps, exact, seed):
    """A (warps x 16x16), B (warps x 16x8, k x n), C (warps x 16x8 fp32): small integers,
    so that every order of summation is exact, or normal random values."""
    shapes = [(warps, 16, 16), (warps, 16, 8), (warps, 16, 8)]
    if exact:
        a, b = (_integers(s, -4, 4, seed + i).to(dtype) for i, s in enumerate(shapes[:2]))
        c = _integers(shapes[2], -50, 50, seed + 2).float()
    else:
        g = torch.Generator().manual_seed(seed)
        a, b = (torch.randn(s, generator=g).to(dtype) for s in shapes[:2])
        c = torch.randn(shapes[2], generator=g)
    return a, b, c


def _assert_product(d, a, b, c, exact):
    """d == a @ b + c: bit-exact, or within the fp32 rounding of a 17-term sum."""
    expected = a.double() @ b.double() + c.double()
    if exact:
        assert torch.equal(d.double(), expected)
        return
    magnitude = a.double().abs() @ b.double().abs() + c.double().abs()
    error = (d.double() - expected).abs()
    assert (error <= 17 * 2.0**-24 * magnitude).all(), f"max error {error.max().item()}"


def test_mma_coordinates_follow_the_ptx_isa(selftest):
    coords = np.zeros((32, 16, 2), dtype=np.int32)
    assert selftest.pv_mma_coords(_ptr(coords)) == 0
    a, b, c = _ptx_fragments()
    np.testing.assert_array_equal(coords[:, 0:8], a)
    np.testing.assert_array_equal(coords[:, 8:12], b)
    np.testing.assert_array_equal(coords[:, 12:16], c)


def _mma_registers(selftest, a, b, c, code, absent=-1, diverged=-1):
    """D (16x8) of one emulated mma on registers packed here by the PTX ISA's tables; NaN
    where no lane that took part holds the element."""
    pa, pb, pc = _ptx_fragments()
    ra, rb = _registers(a, pa), _registers(b, pb)
    rc = np.ascontiguousarray(c.numpy()[pc[..., 0], pc[..., 1]])
    rd = np.zeros((32, 4), dtype=np.float32)
    assert selftest.pv_mma_registers(_ptr(ra), _ptr(rb), _ptr(rc), _ptr(rd), code, absent,
                                     diverged) == 0
    d = torch.full((16, 8), float("nan"))
    for lane in set(range(32)) - {absent, diverged}:
        d[pc[lane, :, 0], pc[lane, :, 1]] = torch.from_numpy(rd[lane])
    return d


@pytest.mark.parametrize("exact", [True, False], ids=["integers", "random"])
@pytest.mark.parametrize("dtype, code", MMA_DTYPES)
def test_emulated_mma_on_ptx_registers(selftest, dtype, code, exact):
    a, b, c = (t[0] for t in _mma_inputs(dtype, 1, exact, seed=1))
    _assert_product(_mma_registers(selftest, a, b, c, code), a, b, c, exact)


@pytest.mark.parametrize("how", ["absent", "diverged"])
def test_mma_lane_that_does_not_take_part_poisons_its_rows_and_column(selftest, how):
    a, b, c = (t[0] for t in _mma_inputs(torch.float16, 1, True, seed=2))
    lane = 13  # group 3: rows 3 and 11 of A and C, column 3 of B
    d = _mma_registers(selftest, a, b, c, F16, **{how: lane})
    poisoned = torch.zeros(16, 8, dtype=torch.bool)
    poisoned[[3, 11]] = True
    poisoned[:, 3] = True
    assert torch.isnan(d[poisoned]).all()
    expected = a.double() @ b.double() + c.double()
    assert torch.equal(d[~poisoned].double(), expected[~poisoned])


@pytest.mark.parametrize("via_ldmatrix", [False, True], ids=["lanes", "ldmatrix"])
@pytest.mark.parametrize("b_k_major", [False, True], ids=["b-n-major", "b-k-major"])
@pytest.mark.parametrize("dtype, code", MMA_DTYPES)
def test_mma_tile_through_the_loaders(selftest, dtype, code, b_k_major, via_ldmatrix):
    warps = 2
    for exact in (True, False):
        a, b, c = _mma_inputs(dtype, warps, exact, seed=3)
        stored_b = b.contiguous() if b_k_major else b.transpose(1, 2).contiguous()
        d = torch.full((warps, 16, 8), float("nan"))
        assert selftest.pv_mma_tile(_tptr(a), _tptr(stored_b), _tptr(c), _tptr(d), warps, code,
                                    b_k_major, via_ldmatrix, 0) == 0
        _assert_product(d, a, b, c, exact)


@pytest.mark.parametrize("bug", [1, 2, 3], ids=["a-registers-1-2", "b-registers-0-1",
                                                "d-registers-1-2"])
@pytest.mark.parametrize("via_ldmatrix", [False, True], ids=["lanes", "ldmatrix"])
def test_mma_layout_bug_fails_the_comparison(selftest, via_ldmatrix, bug):
    a, b, c = _mma_inputs(torch.float16, 1, True, seed=4)
    stored_b = b.transpose(1, 2).contiguous()
    d = torch.zeros(1, 16, 8)
    assert selftest.pv_mma_tile(_tptr(a), _tptr(stored_b), _tptr(c), _tptr(d), 1, F16, False,
                                via_ldmatrix, bug) == 0
    with pytest.raises(AssertionError):
        _assert_product(d, a, b, c, exact=True)


def test_row_max_of_an_accumulator_tile_in_registers(selftest):
    c = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    row_max = torch.full((16,), float("nan"))
    assert selftest.pv_mma_row_max(_tptr(c), _tptr(row_max)) == 0
    assert torch.equal(row_max, c.amax(dim=1))


@pytest.mark.parametrize("dtype, code", MMA_DTYPES)
def test_mma_chain_keeps_the_product_in_registers(selftest, dtype, code):
    a = _integers((16, 16), -3, 3, 6).to(dtype)
    b1 = _integers((16, 16), -3, 3, 7).to(dtype)
    b2 = _integers((16, 8), -3, 3, 8).to(dtype)
    stored_b1, stored_b2 = b1.T.contiguous(), b2.T.contiguous()  # n-major
    d = torch.full((16, 8), float("nan"))
    assert selftest.pv_mma_chain(_tptr(a), _tptr(stored_b1), _tptr(stored_b2), _tptr(d),
                                 code) == 0
    p = (a.double() @ b1.double()).to(dtype)  # |p| <= 144: exact in fp16 and bf16
    assert torch.equal(d.double(), p.double() @ b2.double())


@pytest.mark.parametrize("fault, error, message", [
    (0, 0, None),
    (1, CUDA_MISALIGNED_ADDRESS, "ldmatrix row address not 16-byte aligned"),
    (2, CUDA_ILLEGAL_ADDRESS, "ldmatrix row address outside the block's shared memory"),
])
def test_ldmatrix_checks_its_addresses(selftest, capfd, fault, error, message):
    a = torch.arange(256, dtype=torch.float16).reshape(16, 16)
    out = torch.zeros(32)
    assert selftest.pv_ldmatrix_fault(_tptr(a), _tptr(out), fault) == error
    if message is None:
        lanes = torch.arange(32)
        assert torch.equal(out, a[lanes // 4, 2 * (lanes % 4)].float())
    else:
        assert message in capfd.readouterr().err


@pytest.mark.skipif(cuda_report.nvcc_path() is None,
                    reason="nvcc not found (set CUDA_HOME): cannot compile for sm_80 / sm_90a")
@pytest.mark.parametrize("arch", ["80", "90a"])
def test_mma_compiles_to_tensor_core_instructions(arch):
    if os.path.dirname(HERE) not in sys.path:  # benchmarks/ is a package of the checkout
        sys.path.insert(0, os.path.dirname(HERE))
    from benchmarks import static_report

    counts = static_report._sass_tensor_core_counts(cuda_report, SELFTEST, arch)
    hmma = {name: n for (_, _, name), n in counts.items()
            if re.search(r"mma_(registers|tile|chain)_kernel", name)}
    assert len(hmma) == 6 and all(n >= 1 for n in hmma.values()), hmma
    records = cuda_report.ptxas_report(archs=(arch,), sources=[SELFTEST])
    spilled = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills:\n" + cuda_report.format_table(spilled)


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


@pytest.mark.parametrize("shape, window", [((1, 9, 10, 2, 32), (4, 5)),
                                           ((1, 17, 15, 2, 16), (9, 8))],
                         ids=["one-tile", "tiled"])
@pytest.mark.parametrize("cosine", [False, True], ids=["v1", "cosine"])
def test_window_backward_at_gpu_constants(host_ops, monkeypatch, cosine, shape, window):
    """The backward's grouping of windows into blocks at the GPU build's constant (one
    window per block here) as well as the test build's (five; two for the tiled kernel's
    72-slot windows): both match the reference (cosine attention: with the logit scale's
    gradient, also summed over blocks), and the table gradient's summation order, hence
    its bits, differ. On the emulated GPU with the smallest opt-in shared memory of sm_80+
    (sm_86/89, 99 KB), which the tiled backward needs."""
    monkeypatch.setenv("PYVIT_HOST_EMULATION_SMEM_KB", "99")
    torch.manual_seed(0)
    shift = (2, 1)
    q, k, v = torch.randn(*shape[:3], 3, *shape[3:]).unbind(3)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), shape[3])
    pad_kv = tuple(torch.randn(2, shape[3], shape[4]).unbind(0))
    logit_scale = [torch.tensor([1.0, 2.0])] if cosine else []
    grad = torch.randn(shape)

    def gradients(backend, tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        out = window_attention(*tensors[:4], window_size=window, shift_size=shift,
                               pad_kv=tuple(tensors[4:6]), logit_scale=(tensors[6:] or [None])[0],
                               backend=backend)
        return torch.autograd.grad(out, tensors, grad.to(out.dtype))

    inputs = [q, k, v, table, *pad_kv, *logit_scale]
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
