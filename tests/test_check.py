"""``python -m pyvit_ops.check``: its core on CPU tensors at the small shapes (the
Triton kernels in the interpreter, the CUDA C++ kernels under host emulation), the
table and the JSON it writes, and that a wrong kernel result fails the check."""
import json
import subprocess
import sys

import pytest
import torch

from pyvit_ops import check
from pyvit_ops.kernels import avg_pool2d as pool_kernels
from pyvit_ops.testing import host


def _case(name):
    return next(c for c in check.SHAPE_SETS["small"] if c.name == name)


def test_core_runs_every_gradient_on_both_backends():
    host.load()
    case = _case("vit_b_bias")
    seen = []
    records = check.run_checks("cpu", [case], dtypes=(torch.float16,), done=seen.append)
    assert seen == records
    assert [(r["backend"], r["dtype"], r["status"]) for r in records] == [
        ("triton", "float16", "pass"), ("cuda", "float16", "pass")], records
    for r in records:
        assert [t["name"] for t in r["tensors"]] == ["out", "dqkv", "dbias"]
        for t in r["tensors"]:
            # PyTorch's own half-precision error is never zero at these sizes, so the limit
            # is the rule's, not only its floor.
            assert 0.0 < t["torch_error"] and t["error"] <= t["limit"] == pytest.approx(
                check.FACTOR * t["torch_error"] + check.FLOOR_EPS
                * torch.finfo(torch.float16).eps * t["peak"])


def test_main_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert check.main(["--ops", "avg_pool2d", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "no CUDA GPU" in text and f"rule: {check.RULE}" in text
    assert f"written to {path}" in text
    result = json.loads(path.read_text())
    assert result["passed"] and result["shapes"] == "small" and result["rule"] == check.RULE
    assert result["versions"]["gpu"] is None and result["placement"] == []
    runs = {(r["backend"], r["dtype"]): r for r in result["results"]}
    assert set(runs) == {(b, d) for b in ("triton", "cuda")
                         for d in ("float32", "float16", "bfloat16")}
    for (backend, dtype), r in runs.items():
        assert r["status"] == "pass" and r["case"] == "poolformer_s1"
        assert [t["name"] for t in r["tensors"]] == ["out", "dx"]
        row = next(line for line in text.splitlines()
                   if line.startswith("avg_pool2d") and f" {backend} " in line
                   and f" {dtype} " in line)
        assert " pass " in row
    assert result["counts"] == {"pass": 6, "fail": 0, "error": 0, "not run": 0}


def test_wrong_kernel_result_fails(tmp_path, capsys, monkeypatch):
    launcher = pool_kernels.avg_pool2d_fwd

    def off_by_a_little(*args, **kwargs):
        out = launcher(*args, **kwargs)
        out[0, 0, 0, 0] += 1e-3  # one wrong pixel, as a border bug would make
        return out

    monkeypatch.setattr(pool_kernels, "avg_pool2d_fwd", off_by_a_little)
    path = tmp_path / "out.json"
    code = check.main(["--ops", "avg_pool2d", "--backends", "triton", "--dtypes", "float32",
                       "--json", str(path)])
    assert code == 1
    (record,) = json.loads(path.read_text())["results"]
    assert record["status"] == "fail"
    # The backward does not go through the patched launcher: only the output is wrong.
    assert {t["name"]: t["ok"] for t in record["tensors"]} == {"out": False, "dx": True}
    text = capsys.readouterr().out
    assert "fail: avg_pool2d poolformer_s1 triton float32 on cpu: out error" in text
    assert "FAILED" in text


def test_placement_compares_the_two_devices(monkeypatch):
    """On CPU both devices are the CPU: the comparison still runs, and one ulp of
    difference between the devices fails it although the rule passes both."""
    case = _case("poolformer_s1")
    record = check.check_placement(case, "triton", torch.float32, "cpu", "cpu")
    assert record["status"] == "pass" and record["device"] == "cpu (current cpu)", record
    assert [t["name"] for t in record["tensors"]] == ["out", "dx"]

    launcher, calls = pool_kernels.avg_pool2d_fwd, []

    def one_ulp_off_on_the_second_call(*args, **kwargs):
        out = launcher(*args, **kwargs)
        calls.append(out.device)
        if len(calls) == 2:
            out[0, 0, 0, 0] = torch.nextafter(out[0, 0, 0, 0], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(pool_kernels, "avg_pool2d_fwd", one_ulp_off_on_the_second_call)
    record = check.check_placement(case, "triton", torch.float32, "cpu", "cpu")
    assert len(calls) == 2 and record["status"] == "fail"
    assert all(t["ok"] for t in record["tensors"])
    assert record["reason"].startswith("out: differs from cpu by up to ")


def test_help():
    done = subprocess.run([sys.executable, "-m", "pyvit_ops.check", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--json PATH" in done.stdout and "float64 reference" in done.stdout
