"""The SDPA dropout configs nearest the register limit, compiled for sm_80 and sm_90a
on every run (without a GPU): the dk/dv kernel with dropout, a float bias and dbias on
the 16 x 128 key tile (8 warps) of half inputs at head dim 64 sits at 250-255
registers, where the Philox state of the dropout mask decides whether it spills.

The sweep of every config is the static report's (benchmarks/static_report.py), whose
committed records tests/test_static_compile.py checks.
"""
import pytest

from pyvit_ops.testing import static


def static_compile_specs():
    """The half-precision head-dim-64 dk/dv specs with dropout (32- and 64-bit offsets),
    at the tile the launcher picks."""
    return [spec for spec in static.specs_of("scaled_dot_product_attention")
            if spec["name"].startswith("sdpa_bwd_dkdv_")
            and ("_d64_heavy_" in spec["name"] or "_d64_heavy64_" in spec["name"])
            and spec["dtype"] in ("fp16", "bf16")]


@pytest.fixture(scope="module")
def records():
    # report_all imports this file in a subprocess without the interpreter.
    return static.report_all(modules=[__file__], archs=(80, 90), jobs=2)


def test_dropout_dkdv_d64_half_compiles_without_spills(records):
    specs = static_compile_specs()
    assert len(specs) == 4, [spec["name"] for spec in specs]
    assert len(records) == 2 * len(specs)
    for r in records:
        assert "error" not in r, r
        assert r["spill_stores"] == r["spill_loads"] == 0, (
            f"{r['kernel']} {r['arch']}: {r['spill_stores']} STL / {r['spill_loads']} LDL, "
            f"{r['registers']} registers")
        assert r["tensor_core_instructions"] > 0, r
