"""The CUDA C++ infrastructure, without a GPU (VERIFY.md §4).

- the host emulation of the CUDA execution model (csrc/host_emulation.h) runs kernels
  that use static and dynamic shared memory, __syncthreads, warp shuffles and atomics
  correctly (tests/host_emulation_selftest.cu, built with g++, called through ctypes);
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
from pyvit_ops.testing import cuda_report, host

HERE = os.path.dirname(os.path.abspath(__file__))
SELFTEST = os.path.join(HERE, "host_emulation_selftest.cu")
CUDA_INVALID_CONFIGURATION = 9
CUDA_LAUNCH_TIMEOUT = 702
F16, BF16 = 0, 1  # dtype codes of the self-test wrappers


def _ptr(array):
    return array.ctypes.data_as(ctypes.c_void_p)


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    """The self-test kernels built with g++ under host emulation."""
    library = tmp_path_factory.mktemp("emulation") / "selftest.so"
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
           "-DPYVIT_HOST_EMULATION", "-I", host.csrc_dir(), "-x", "c++", SELFTEST,
           "-o", str(library)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    lib = ctypes.CDLL(str(library))
    for name in ("pv_block_sum", "pv_reverse_rows", "pv_shuffle", "pv_deadlock", "pv_atomic",
                 "pv_divmod", "pv_round", "pv_widen"):
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


def test_deadlocked_block_fails_the_launch_instead_of_hanging(selftest, monkeypatch, capfd):
    monkeypatch.setenv("PYVIT_HOST_EMULATION_TIMEOUT", "1")
    assert selftest.pv_deadlock() == CUDA_LAUNCH_TIMEOUT
    assert "made no progress" in capfd.readouterr().err
    # The stuck threads are abandoned; the next launch gets fresh workers.
    x = np.ones(64, dtype=np.float32)
    out = np.zeros(1, dtype=np.float32)
    assert selftest.pv_block_sum(_ptr(x), 64, _ptr(out), 1, 64) == 0 and out[0] == 64


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
