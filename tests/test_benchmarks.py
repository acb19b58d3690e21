"""The performance lab cannot rot: ``python -m benchmarks --tiny`` runs end to end on a
CPU-only machine (CPU timings, interpreter traffic, static compile report) and its
outputs carry the promised fields; the GPU-only providers and target checks are
exercised on CPU where they can be."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ is a package of the checkout, not of the install

from benchmarks import harness, report, targets  # noqa: E402
TRAFFIC_FIELDS = {"op", "pass", "shape", "fused_bytes", "naive_bytes", "compulsory_bytes", "flops"}
STATIC_FIELDS = {"kernel", "backend", "arch", "config", "registers", "shared_bytes",
                 "spill_stores", "spill_loads", "tensor_core_instructions"}


def _clean_env():
    # A fresh checkout's shell: no interpreter flag (conftest sets it for this process).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return out, proc.stdout


def test_entry_point_times_cpu_path_and_naive(tiny_run):
    out, _ = tiny_run
    with open(out / "timings_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == set(harness.CSV_FIELDS)
    for op in harness.OPS:
        for provider in (harness.NAIVE, "pyvit_ops[reference]"):
            got = [r for r in rows if r["op"] == op and r["provider"] == provider]
            assert {r["pass"] for r in got} == set(harness.PASSES), (op, provider)
            for r in got:
                # "ok" also proves the CPU path matched the naive composition
                assert r["status"] == "ok", r
                assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
                assert r["peak_mem_mb"] != "" and float(r["speedup_vs_naive"]) > 0
    for op in ("scaled_dot_product_attention", "window_attention"):
        sdpa = [r for r in rows if r["op"] == op and "sdpa" in r["provider"]]
        assert sdpa and all(r["status"] == "ok" for r in sdpa), sdpa


def test_entry_point_writes_traffic_json(tiny_run):
    out, _ = tiny_run
    with open(out / "traffic.json") as f:
        records = json.load(f)
    assert {(r["op"], r["pass"]) for r in records} == {
        (op, p) for op in harness.OPS for p in ("fwd", "bwd")}
    for r in records:
        assert TRAFFIC_FIELDS <= set(r), r
        assert "error" not in r, r
        assert r["fused_bytes"] > 0 and r["naive_bytes"] > r["compulsory_bytes"] > 0, r
        assert r["model_h100_fused_s"] > 0 and r["model_h100_naive_s"] > 0


def test_entry_point_writes_static_json(tiny_run):
    out, _ = tiny_run
    with open(out / "static_report.json") as f:
        records = json.load(f)
    assert {r["backend"] for r in records} == {"triton", "cuda"}
    for r in records:
        assert "error" not in r, r
        assert STATIC_FIELDS <= set(r), r
        assert r["registers"] > 0 and r["arch"] == "sm_80"


def test_entry_point_checks_every_target(tiny_run):
    out, stdout = tiny_run
    summary = (out / "summary_cpu.md").read_text()
    for op in harness.OPS:
        assert f"{op}: CPU path no slower than naive" in summary
        assert f"{op} fwd: fused bytes <=" in summary and f"{op} bwd: fused bytes <=" in summary
    assert "static: no register spills" in summary
    assert "MODEL, not a measurement" in summary
    assert "summary_cpu.md" in stdout


def test_report_renders_every_section_of_a_run(tiny_run):
    out, _ = tiny_run
    block = report.render(str(out))
    for title in ("### Memory traffic", "### Static compile report", "### Timings: cpu",
                  "### Targets"):
        assert title in block, title
    for op in harness.OPS:
        assert f"| `{op}` | fwd |" in block and f"| `{op}` | bwd |" in block, op
        assert f"| `{op}` | pyvit_ops[reference] |" in block, op
    assert "MISSED" in block or "MET" in block


def test_results_page_is_the_committed_data():
    # benchmarks/RESULTS.md is rendered from benchmarks/results; a new run there (or a
    # hand edit of the page) without `python benchmarks/report.py` fails here.
    assert report.main(["--check"]) == 0, "run python benchmarks/report.py"


def test_tiny_refuses_the_committed_results_dir(capsys):
    from benchmarks import __main__ as entry

    with pytest.raises(SystemExit) as exc:  # argparse refuses before anything runs
        entry.main(["--tiny", "--out", harness.RESULTS_DIR])
    assert exc.value.code == 2 and "pass --out DIR" in capsys.readouterr().err


def test_traffic_naive_only_says_the_fused_path_was_not_measured():
    from benchmarks import traffic

    module = harness.load_op("avg_pool2d")
    shape = harness.selected_shapes(module, True, None)[0]
    records = traffic.measure(module, shape, 1, torch.float32, 1, fused=False)
    assert [r["pass"] for r in records] == ["fwd", "bwd"]
    for r in records:
        assert r["error"] == traffic.NOT_MEASURED and "fused_bytes" not in r
        assert r["naive_bytes"] > 0 and r["compulsory_bytes"] > 0


def test_latest_case_rows_keeps_each_case_from_its_newest_run(tmp_path):
    path = str(tmp_path / "t.csv")

    def rows(model, ms):
        return [{"op": "avg_pool2d", "model": model, "batch": 1, "dtype": "float32",
                 "provider": prov, "pass": "full", "median_ms": ms} for prov in ("naive", "x")]

    harness.append_csv(path, rows("a", 1.0) + rows("b", 2.0), {"run_id": "1"})
    harness.append_csv(path, rows("b", 3.0), {"run_id": "2"})
    got = {(r["model"], r["run_id"], r["median_ms"]) for r in harness.latest_case_rows(path)}
    assert got == {("a", "1", "1"), ("b", "2", "3")}


@pytest.mark.parametrize("op", ["scaled_dot_product_attention", "window_attention"])
def test_flex_attention_provider_matches_naive(op):
    # The GPU runs it compiled; eager FlexAttention runs the same score_mod on CPU
    # (forward only: FlexAttention has no CPU backward).
    module = harness.load_op(op)
    for shape in module.tiny_shapes():
        inp = module.make_inputs(shape.params, 2, torch.device("cpu"), torch.float32,
                                 requires_grad=False)
        with torch.no_grad():
            got = module.flex_attention_provider(compiled=False)(inp)
            assert harness.compare(got, module.naive(inp)) is None, shape


def test_peak_memory_cpu_sees_the_allocations():
    x = torch.ones(1 << 20)
    peak = harness.peak_memory_cpu(lambda: (x * 2).exp(), [])
    assert 8 << 20 <= peak < 16 << 20  # two 4 MB temporaries alive at once, nothing else


def test_gpu_timing_targets_say_met_and_missed_with_the_figure():
    def row(op, model, provider, speedup):
        return {"op": op, "model": model, "batch": 32, "pass": "full", "provider": provider,
                "speedup_vs_naive": speedup}

    rows = [row("window_attention", "swin_b.224.s1.w", "pyvit_ops[triton]", 6.5),
            row("window_attention", "swin_b.224.s1.w", "pyvit_ops[cuda]", 7.0),
            row("window_attention", "swin_b.224.s2.w", "pyvit_ops[triton]", 4.2),
            row("scaled_dot_product_attention", "vit_b.224", "pyvit_ops[triton]", 1.2),
            row("scaled_dot_product_attention", "beit_b.224.relpos_bias", "pyvit_ops[triton]", 3.4)]
    lines = targets.timing_lines(rows, "cuda")
    head = next(i for i, line in enumerate(lines) if "window_attention" in line)
    assert lines[head].startswith("MISSED") and "1/2 shapes" in lines[head]
    assert "min x4.20" in lines[head] and "swin_b.224.s2.w B=32 x4.20" in lines[head + 1]
    sdpa = next(line for line in lines if "scaled_dot_product_attention" in line)
    assert sdpa.startswith("MET") and "(beit_b)" in sdpa and "x3.40" in sdpa


def test_static_partial_run_replaces_a_whole_module(tmp_path):
    from benchmarks import static_report

    def rec(module, arch, config):
        return {"backend": "triton", "module": module, "kernel": "k", "arch": arch,
                "config": config}
    path = tmp_path / "static.json"
    old = [rec("a", "sm_80", "old"), rec("a", "sm_90a", "old"), rec("b", "sm_80", "old")]
    path.write_text(json.dumps(old))
    new = [rec("a", "sm_80", "new")]
    # module a recompiled in full for sm_80: its renamed config's stale record goes; the
    # other arch and the other module stay.
    merged = static_report.merge_partial(str(path), new, whole=True)
    assert sorted((r["module"], r["arch"], r["config"]) for r in merged) == [
        ("a", "sm_80", "new"), ("a", "sm_90a", "old"), ("b", "sm_80", "old")]
    # --max-specs compiles a few specs only: nothing else is replaced.
    assert len(static_report.merge_partial(str(path), new, whole=False)) == 4
