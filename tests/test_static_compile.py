"""Static compile checks: every Triton kernel config compiles for sm_80 and sm_90a
without register spills, and kernels with tl.dot use tensor cores.

The harness itself is tested on probe kernels defined in this file: report_all()
imports this file in a subprocess without the interpreter and compiles them for real.
"""
import json
import os
import time

import pytest
import triton
import triton.language as tl

from pyvit_ops.testing import static


@triton.jit
def _probe_dot_kernel(A, B, C, M, stride_am, stride_bk, stride_cm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One BLOCK_M x BLOCK_N tile of C = A @ B with K == BLOCK_K; rows past M masked.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a = tl.load(A + rows[:, None] * stride_am + ks[None, :], mask=rows[:, None] < M, other=0.0)
    b = tl.load(B + ks[:, None] * stride_bk + cols[None, :])
    c = tl.dot(a, b)
    tl.store(C + rows[:, None] * stride_cm + cols[None, :], c.to(C.dtype.element_ty),
             mask=rows[:, None] < M)


@triton.jit
def _probe_spill_kernel(X, Y, BLOCK: tl.constexpr):
    # The whole block stays live across the reduction: with one warp, BLOCK=8192 needs
    # 256 fp32 registers per thread, more than the 255 a thread can have.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(Y + offs, x / tl.sum(x, axis=0))


PROBE_DTYPES = ("fp16", "bf16", "fp32")


def static_compile_specs():
    """Probe specs, in the format the kernel modules use."""
    specs = []
    for dtype in PROBE_DTYPES:
        ptr = "*" + dtype
        specs.append({
            "name": f"_probe_dot_kernel_{dtype}", "fn": _probe_dot_kernel,
            "signature": {"A": ptr, "B": ptr, "C": ptr, "M": "i32", "stride_am": "i32",
                          "stride_bk": "i32", "stride_cm": "i32"},
            "constexprs": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
            "num_warps": 4, "num_stages": 2, "uses_dot": True,
        })
    specs.append({
        "name": "_probe_spill_kernel", "fn": _probe_spill_kernel,
        "signature": {"X": "*fp32", "Y": "*fp32"}, "constexprs": {"BLOCK": 8192},
        "num_warps": 1, "num_stages": 1,
    })
    specs.append({  # incomplete signature: must come back as an error record
        "name": "_probe_bad_spec", "fn": _probe_spill_kernel,
        "signature": {"X": "*fp32"}, "constexprs": {"BLOCK": 64}, "num_warps": 1, "num_stages": 1,
    })
    return specs


@pytest.fixture(scope="module")
def probe_records():
    records = static.report_all(modules=[__file__], archs=(80, 90), jobs=2)
    return {(r["kernel"], r["arch"]): r for r in records}


@pytest.mark.parametrize("dtype", PROBE_DTYPES)
@pytest.mark.parametrize("arch", [80, 90])
def test_probe_dot_uses_tensor_cores(probe_records, dtype, arch):
    r = probe_records[(f"_probe_dot_kernel_{dtype}", arch)]
    assert "error" not in r, r.get("error")
    assert r["target"] == {80: "sm_80", 90: "sm_90a"}[arch]
    assert r["backend"] == "triton"
    assert r["config"] == f"BLOCK_M=64,BLOCK_N=64,BLOCK_K=32,num_warps=4,num_stages=2,dtype={dtype}"
    assert r["spill_stores"] == r["spill_loads"] == 0, r
    assert r["registers"] > 0 and r["shared_bytes"] > 0, r
    if arch == 80:
        assert r["hmma"] > 0 and r["hgmma"] == 0, r
    else:  # a 64-row tile over 4 warps is exactly one wgmma warpgroup
        assert r["hgmma"] > 0, r
    assert r["tensor_core_instructions"] == r["hmma"] + r["hgmma"]
    assert 0 < r["occupancy_warps"] <= 64


@pytest.mark.parametrize("arch", [80, 90])
def test_probe_spills_are_detected(probe_records, arch):
    r = probe_records[("_probe_spill_kernel", arch)]
    assert "error" not in r, r.get("error")
    assert r["spill_stores"] > 0 and r["spill_loads"] > 0, r
    assert r["stack_bytes"] > 0, r
    assert r["tensor_core_instructions"] == 0, r


@pytest.mark.parametrize("arch", [80, 90])
def test_bad_spec_becomes_error_record(probe_records, arch):
    r = probe_records[("_probe_bad_spec", arch)]
    assert "missing ['Y']" in r["error"], r


def test_compile_refuses_interpreted_function():
    # Under the interpreter (tests/conftest.py) the probe is not compilable in-process.
    spec = static_compile_specs()[0]
    with pytest.raises(TypeError, match="report_all"):
        static.compile_triton(spec, 80)


def test_unknown_arch_rejected():
    with pytest.raises(ValueError, match="arch must be one of"):
        static.occupancy(32, 0, 4, 75)


@pytest.mark.parametrize("registers, shared, num_warps, arch, warps, limit", [
    # 168 regs -> 5376 per warp, 3 warps per 16K-register partition -> 12 warps
    (168, 8192, 4, 80, 12, "registers"),
    (32, 0, 4, 90, 64, None),
    # 100 KB + 1 KB reserved per CTA: one CTA on A100 (164 KB), two on H100 (228 KB)
    (32, 100 * 1024, 4, 80, 4, "shared memory"),
    (32, 100 * 1024, 4, 90, 8, "shared memory"),
    # 200 KB does not fit an A100 CTA at all
    (32, 200 * 1024, 4, 80, 0, "shared memory per CTA"),
    (32, 200 * 1024, 8, 90, 8, "shared memory"),
    (255, 0, 8, 80, 8, "registers"),
])
def test_occupancy(registers, shared, num_warps, arch, warps, limit):
    got_warps, got_limit = static.occupancy(registers, shared, num_warps, arch)
    assert got_warps == warps
    if limit is not None:
        assert got_limit == limit


KERNEL_MODULES = ["avg_pool2d", "elsa_attention", "scaled_dot_product_attention",
                  "talking_heads_attention", "window_attention"]


def test_every_kernel_module_is_checked():
    # KERNEL_MODULES is explicit; a new kernel module must not slip past the static
    # check unnoticed.
    found = {name.rsplit(".", 1)[1] for name in static.discover_modules()
             if static.has_specs(name)}
    assert found == set(KERNEL_MODULES)


def _problems(records):
    problems = []
    for r in records:
        where = f"{r['kernel']} {r.get('arch')} [{r.get('config', '?')}]"
        if "error" in r:
            problems.append(f"{where}: {r['error']}")
            continue
        if r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{where}: spills {r['spill_stores']} STL / {r['spill_loads']} LDL, "
                            f"{r['registers']} registers")
        if r["uses_dot"] and r["tensor_core_instructions"] == 0:
            problems.append(f"{where}: uses_dot but no HMMA/HGMMA in the SASS")
        if r["occupancy_warps"] == 0:
            problems.append(f"{where}: cannot launch ({r['occupancy_limit']}: "
                            f"{r['shared_bytes']} B shared)")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernel_module_compiles_without_spills(module):
    """One config per kernel function of one module (the one with the most tile elements
    per thread), compiled for sm_80 and sm_90a. The full sweep of every config is the
    static report's job (benchmarks/static_report.py); its records are checked below."""
    start = time.perf_counter()
    records = static.report_all(modules=[module], representative_only=True)
    elapsed = time.perf_counter() - start
    print(f"\n{static.format_table(records)}\nstatic compile report: {len(records)} records "
          f"in {elapsed:.1f} s wall, {static.total_cpu_seconds(records):.0f} s CPU")
    assert records, f"pyvit_ops.kernels.{module} defines no static_compile_specs()"
    kernels = {static._kernel_name(spec) for spec in static.specs_of(module)}
    assert len(records) == len(kernels) * len(static.ARCHS), (len(records), sorted(kernels))
    problems = _problems(records)
    assert not problems, f"{len(problems)} of {len(records)} records fail:\n" + "\n".join(problems)


def test_representative_picks_the_largest_tile_per_kernel():
    specs = [{"fn": _probe_dot_kernel, "constexprs": {"BLOCK_M": 64, "BLOCK_N": 64},
              "num_warps": 4, "signature": {"A": "*fp16"}},
             {"fn": _probe_dot_kernel, "constexprs": {"BLOCK_M": 128, "BLOCK_N": 64},
              "num_warps": 4, "signature": {"A": "*fp16"}},
             {"fn": _probe_dot_kernel, "constexprs": {"BLOCK_M": 128, "BLOCK_N": 64},
              "num_warps": 4, "signature": {"A": "*fp32"}},
             {"fn": _probe_spill_kernel, "constexprs": {"BLOCK": 64}, "num_warps": 1,
              "signature": {"X": "*fp32"}}]
    assert static.representative(specs) == [2, 3]


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_committed_static_report_covers_every_config(module):
    """benchmarks/results/static_report.json (the full sweep) holds a clean record of every
    config the launchers can pick, for both archs: a new or renamed config needs a
    ``python benchmarks/static_report.py --json benchmarks/results/static_report.json
    --modules <op>`` run."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                        "static_report.json")
    with open(path) as f:
        records = [r for r in json.load(f) if r.get("module") == f"pyvit_ops.kernels.{module}"]
    specs = static.specs_of(module)
    want = {(spec["name"], static.SM_LIMITS[arch].target) for spec in specs
            for arch in spec.get("archs", static.ARCHS)}
    have = {(r["kernel"], r.get("arch")) for r in records}
    assert not sorted(want - have), f"configs without a record: {sorted(want - have)[:20]}"
    problems = _problems([r for r in records if (r["kernel"], r.get("arch")) in want])
    assert not problems, "\n".join(problems)
