"""Device placement of the Triton launches, and the limits every launch must respect.

A Triton launch runs on the current CUDA device and its current stream, not on its
tensors' device: every launcher runs under ``kernels._common.on_tensor_device``. On
CPU this is checked by construction: a recorder wraps the interpreter's launch and
notes, for every launch, the device of the innermost guarded launcher and the devices
of its tensor arguments (they must agree) and its grid (CUDA's limits per axis). An
AST check makes sure no launch site is reachable around a guard. The shared memory of
every compiled Triton config is checked against the smallest budget of the
architectures it runs on, from the committed static compile report.
"""
import ast
import contextlib
import importlib
import json
import pathlib

import pytest
import torch
from triton.runtime import interpreter

import pyvit_ops
from pyvit_ops import _backend
from pyvit_ops.kernels import _common
from pyvit_ops.kernels import scaled_dot_product_attention as sdpa_kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "kernels"
# A kernels module is kernels/<op>.py or the package kernels/<op>/.
KERNEL_MODULES = sorted(p.name.removesuffix(".py") for p in KERNEL_DIR.iterdir()
                        if not p.name.startswith("_")
                        and (p.suffix == ".py" or (p / "__init__.py").exists()))
GUARD = _common.on_tensor_device.__name__
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's grid size per axis (x, y, z)


# ----------------------------------------------------------------------------- launch recorder

class _Launch:
    def __init__(self, kernel, guarded, devices, grid):
        self.kernel, self.guarded, self.devices, self.grid = kernel, guarded, devices, grid

    def problem(self):
        """Why this launch breaks the device or grid rules ("" if it does not)."""
        if self.guarded is None:
            return f"{self.kernel}: launched outside an {GUARD} launcher"
        if any(d != self.guarded for d in self.devices):
            return (f"{self.kernel}: launched under {self.guarded}, tensors on "
                    f"{sorted(map(str, self.devices))}")
        if len(self.grid) > 3 or any(not 0 <= n <= limit
                                     for n, limit in zip(self.grid, GRID_LIMITS)):
            return f"{self.kernel}: grid {self.grid} exceeds {GRID_LIMITS}"
        return ""


def _tensor_devices(values):
    return {v.device for v in values if isinstance(v, torch.Tensor)}


def _record_launches(monkeypatch, execute):
    recorded = []
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        shape = grid(kwargs) if callable(grid) else grid
        recorded.append(_Launch(self.__name__, _common.launch_device(),
                                _tensor_devices([*args, *kwargs.values()]),
                                tuple(int(n) for n in shape)))
        if execute:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)
    return recorded


@pytest.fixture
def launches(monkeypatch):
    """Every interpreted Triton launch of the test, recorded before it runs."""
    return _record_launches(monkeypatch, execute=True)


@pytest.fixture
def grids_only(monkeypatch):
    """Like ``launches`` but the kernels do not run: the launchers' grids for inputs
    too big for the interpreter (outputs are left unwritten)."""
    return _record_launches(monkeypatch, execute=False)


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _backward(out, seed=1):
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))


def _sdpa_calls():
    """Forward and backward of every SDPA launcher path: a float bias broadcast over the
    batch (dbias tiles, split over the broadcast batch) with dropout; the packed-qkv
    entry with a key bias (dbias reduced per key); a bool mask; the dropout mask."""
    q, k, v, bias = _leaves((2, 2, 5, 12), (2, 2, 7, 12), (2, 2, 7, 12), (2, 5, 7))
    _backward(pyvit_ops.scaled_dot_product_attention(q, k, v, bias, dropout_p=0.3,
                                                     backend="triton"))
    qkv, key_bias = _leaves((2, 6, 3, 2, 8), (1, 1, 1, 6))
    _backward(pyvit_ops.scaled_dot_product_attention_qkvpacked(qkv, key_bias, backend="triton"))
    q, k, v = _leaves((1, 2, 3, 8), (1, 2, 4, 8), (1, 2, 4, 8))
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(2)) > 0.3
    _backward(pyvit_ops.scaled_dot_product_attention(q, k, v, mask, backend="triton"))
    sdpa_kernels.dropout_keep_mask(torch.tensor([5]), (1, 2, 3, 4), 0.5)
    # BEiT's relative-position table (with a class token): its dtable kernel.
    qkv, table = _leaves((2, 7, 3, 2, 8), (18, 2))
    _backward(pyvit_ops.scaled_dot_product_attention_qkvpacked(
        qkv, rel_pos_table=table, rel_pos_grid=(2, 3), backend="triton"))


def _window_calls():
    """Single-tile windows (padded and shifted: dq / dk / dv, dbias and pad passes, the
    dtable sum), packed qkv, and a 72-token window (the tiled kernels) with a table."""
    q, k, v, table, pad_k, pad_v = _leaves(*[(1, 5, 3, 2, 4)] * 3, (9, 2), (2, 4), (2, 4))
    _backward(pyvit_ops.window_attention(q, k, v, table, window_size=2, shift_size=1,
                                         pad_kv=(pad_k, pad_v), backend="triton"))
    qkv, table = _leaves((1, 4, 4, 3, 1, 8), (9, 1))
    _backward(pyvit_ops.window_attention_qkvpacked(qkv, table, window_size=2, shift_size=1,
                                                   backend="triton"))
    q, k, v, table, pad_k, pad_v = _leaves(*[(1, 9, 10, 1, 16)] * 3, (17 * 15, 1), (1, 16),
                                           (1, 16))
    _backward(pyvit_ops.window_attention(q, k, v, table, window_size=(9, 8), shift_size=(4, 3),
                                         pad_kv=(pad_k, pad_v), backend="triton"))


def _elsa_calls():
    """Both layouts, fused softmax, both ghost tensors (their gradient-sum kernel)."""
    v, attn, mul, add = _leaves((2, 4, 5, 4), (2, 18, 5, 4), (4, 3, 3), (4, 3, 3))
    _backward(pyvit_ops.elsa_attention(v, attn, mul, add, kernel_size=3, dilation=2,
                                       backend="triton"))
    v, attn = (t.detach().to(memory_format=torch.channels_last).requires_grad_()
               for t in _leaves((1, 4, 3, 3), (1, 18, 3, 3)))
    _backward(pyvit_ops.elsa_attention(v, attn, kernel_size=3, backend="triton"))


def _pool_calls():
    """A strided pool and PoolFormer's pool(x) - x, NCHW and channels_last."""
    (x,) = _leaves((1, 2, 5, 4))
    _backward(pyvit_ops.avg_pool2d(x, 3, stride=2, padding=1, backend="triton"))
    (x,) = _leaves((2, 3, 5, 4))
    _backward(pyvit_ops.poolformer_pool(x, 3, backend="triton"))
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    _backward(pyvit_ops.poolformer_pool(x, 3, backend="triton"))


def _talking_heads_calls():
    """Forward and backward (dq, dk, dv kernels with the head-mix gradients)."""
    q, k, v, wl, bl, ww, bw = _leaves(*[(1, 2, 5, 8)] * 3, (2, 2), (2,), (2, 2), (2,))
    _backward(pyvit_ops.talking_heads_attention(q, k, v, wl, bl, ww, bw, scale=0.3,
                                                backend="triton"))


OP_CALLS = {"scaled_dot_product_attention": _sdpa_calls, "window_attention": _window_calls,
            "elsa_attention": _elsa_calls, "avg_pool2d": _pool_calls,
            "talking_heads_attention": _talking_heads_calls}


def _kernel_names(module):
    """Every launchable kernel (``*_kernel`` jit function) of a kernels module."""
    return {name for name, obj in vars(module).items()
            if isinstance(obj, interpreter.InterpretedFunction) and name.endswith("_kernel")}


def test_every_kernel_module_is_exercised():
    assert sorted(OP_CALLS) == KERNEL_MODULES


@pytest.mark.parametrize("op", sorted(OP_CALLS))
def test_every_launch_runs_on_its_tensors_device(op, launches):
    """Forward and backward on every Triton path of ``op``: each kernel of the module is
    launched, each launch under the guard of its tensors' device, within CUDA's grid
    limits."""
    OP_CALLS[op]()
    module = importlib.import_module(f"pyvit_ops.kernels.{op}")
    assert {launch.kernel for launch in launches} == _kernel_names(module)
    problems = [launch.problem() for launch in launches if launch.problem()]
    assert not problems, problems


def test_recorder_flags_an_unguarded_launcher(launches, monkeypatch):
    """The check above fails when one launcher loses its guard."""
    from pyvit_ops.kernels import avg_pool2d

    monkeypatch.setattr(avg_pool2d, "avg_pool2d_fwd", avg_pool2d.avg_pool2d_fwd.__wrapped__)
    pyvit_ops.avg_pool2d(torch.randn(1, 2, 3, 3), 3, backend="triton")
    assert [launch.problem() for launch in launches] == [
        "_avg_pool2d_fwd_kernel: launched outside an on_tensor_device launcher"]


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (there is no GPU here)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_guard_enters_the_cuda_device_of_its_tensors(monkeypatch):
    """The device of the first tensor argument is made current around the launcher;
    CPU tensors need no guard."""
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    launcher = _common.on_tensor_device(lambda scale, x: _common.launch_device())
    assert launcher(2.0, torch.ones(1).as_subclass(_OnCuda1)) == torch.device("cuda", 1)
    assert launcher(2.0, x=torch.ones(1).as_subclass(_OnCuda1)) == torch.device("cuda", 1)
    assert entered == [torch.device("cuda", 1)] * 2
    assert launcher(2.0, torch.ones(1)) == torch.device("cpu")
    assert entered == [torch.device("cuda", 1)] * 2
    assert _common.launch_device() is None
    with pytest.raises(TypeError, match="expected a tensor argument"):
        launcher(2.0, None)


# Batches beyond the 65535 limit of grid axes y and z, from expanded (stride-0) inputs:
# only the launchers run (``grids_only``), so the size costs nothing.
_BIG = 70000


def _big(*shape):
    return torch.zeros(1, *shape[1:]).expand(*shape).requires_grad_()


BIG_BATCH_CALLS = {
    "scaled_dot_product_attention": lambda: _backward(pyvit_ops.scaled_dot_product_attention(
        _big(_BIG, 1, 1, 16), _big(_BIG, 1, 2, 16), _big(_BIG, 1, 2, 16), _big(_BIG, 1, 1, 2),
        backend="triton")),
    "window_attention": lambda: _backward(pyvit_ops.window_attention(
        _big(_BIG, 2, 2, 1, 16), _big(_BIG, 2, 2, 1, 16), _big(_BIG, 2, 2, 1, 16),
        torch.zeros(9, 1, requires_grad=True), window_size=2, backend="triton")),
    "elsa_attention": lambda: _backward(pyvit_ops.elsa_attention(
        _big(_BIG, 2, 2, 2), _big(_BIG, 9, 2, 2), kernel_size=3, backend="triton")),
    "avg_pool2d": lambda: _backward(pyvit_ops.poolformer_pool(_big(_BIG, 2, 2, 2), 3,
                                                              backend="triton")),
}


@pytest.mark.parametrize("op", sorted(BIG_BATCH_CALLS))
def test_grids_of_a_large_batch(op, grids_only):
    BIG_BATCH_CALLS[op]()
    assert grids_only
    problems = [launch.problem() for launch in grids_only if launch.problem()]
    assert not problems, problems


# ----------------------------------------------------------------------------- static check

def _decorator_names(fn):
    names = set()
    for d in fn.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        names.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", None))
    return names


def launch_sites(source):
    """``{"line N in f": guarded}`` for every launch site (``kernel[grid](...)``) of a
    module's source. A site is guarded when no call can reach it without passing an
    ``on_tensor_device`` launcher: its function is guarded, or private and referenced
    only from functions that are (recursively)."""
    tree = ast.parse(source)
    functions = {n.name: n for n in tree.body
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    # Which top-level function (None: module level) each name reference sits in.
    referrers = {}
    sites = []

    def visit(node, owner):
        for child in ast.iter_child_nodes(node):
            inner = child.name if owner is None and child in functions.values() else owner
            if isinstance(child, ast.Name) and child.id in functions:
                referrers.setdefault(child.id, []).append(owner)
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Subscript):
                sites.append((child.lineno, inner))
            visit(child, inner)

    visit(tree, None)

    def guarded(name, seen=()):
        if name is None or name in seen:
            return False
        if GUARD in _decorator_names(functions[name]):
            return True
        callers = referrers.get(name, [])
        return (name.startswith("_") and bool(callers)
                and all(guarded(c, seen + (name,)) for c in callers))

    return {f"line {line} in {owner or '<module>'}": guarded(owner) for line, owner in sites}


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_every_launch_site_is_behind_a_guard(module):
    package = KERNEL_DIR / module
    files = sorted(package.glob("*.py")) if package.is_dir() else [KERNEL_DIR / f"{module}.py"]
    sites = {f"{path.name}: {site}": guarded for path in files
             for site, guarded in launch_sites(path.read_text()).items()}
    assert sites
    assert [site for site, guarded in sites.items() if not guarded] == []


def test_static_check_finds_unguarded_launches():
    source = """
@on_tensor_device
def public(x):
    _helper(x)
    kernel[(1,)](x)

def _helper(x):
    kernel[(1,)](x)

def _leaked(x):
    kernel[(1,)](x)

def other(x):
    _leaked(x)

def unguarded(x):
    kernel[(1,)](x)

def _never_called(x):
    kernel[grid](x)
"""
    assert launch_sites(source) == {
        "line 5 in public": True, "line 8 in _helper": True, "line 11 in _leaked": False,
        "line 17 in unguarded": False, "line 20 in _never_called": False}


# ----------------------------------------------------------------------------- device queries

class _FakeCudaTensor:
    """What the backend choice reads of a tensor on cuda:1 (no GPU here)."""
    device, dtype = torch.device("cuda", 1), torch.float16


def test_cuda_backend_checks_the_tensors_device(monkeypatch):
    """The cuda backend's architecture check asks about the device the tensors are on
    (cuda:1 here), never the current device."""
    from pyvit_ops import _ext

    asked = []
    monkeypatch.setattr(_ext, "has_op", lambda name, device: asked.append(device) or (True, ""))
    assert _backend.common_reasons("cuda", "avg_pool2d", [_FakeCudaTensor()]) == []
    assert asked == [torch.device("cuda", 1)]


def test_triton_backend_needs_sm80(monkeypatch):
    """The Triton kernels are compiled and checked for sm_80 and newer (bf16 / tf32 dots,
    shared-memory budgets): an older GPU of the tensors, not of the current device,
    rules the backend out."""
    asked = []

    def capability(device=None):
        asked.append(device)
        return {1: (7, 5)}.get(torch.device(device).index, (9, 0))

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert _backend.common_reasons("triton", "avg_pool2d", [_FakeCudaTensor()]) == [
        "cuda:1: expected compute capability >= 8.0 for the Triton kernels, got 7.5"]
    assert asked == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert _backend.common_reasons("triton", "avg_pool2d", [_FakeCudaTensor()]) == []


# ----------------------------------------------------------------------------- shared memory

REPORT = ROOT / "benchmarks" / "results" / "static_report.json"
KB = 1024
# Largest shared memory one block may use (opt-in), per compute capability the Triton
# backend runs on (CUDA programming guide, "Technical Specifications").
SHARED_PER_BLOCK = {(8, 0): 163 * KB, (8, 6): 99 * KB, (8, 7): 163 * KB, (8, 9): 99 * KB,
                    (9, 0): 227 * KB, (10, 0): 227 * KB, (12, 0): 99 * KB}


def _report_targets(capability, monkeypatch):
    """The static report's compile targets whose configs and figures stand for what the
    launchers pick and Triton builds on ``capability``: the launchers choose their
    configs for the row of ``window_attention._arch`` (80: Ampere / Ada, 90: Hopper and
    newer); Triton's code for 8.x is sm_80's, for 9.0 sm_90a's; newer GPUs, not in the
    report, must fit both."""
    from pyvit_ops.kernels import window_attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    row = window_attention._arch(torch.device("cuda", 0))
    if capability[0] >= 10:
        return {"sm_80", "sm_90a"} if row == 90 else {"sm_80"}
    return {"sm_80" if row == 80 else "sm_90a"}


@pytest.mark.parametrize("capability", sorted(SHARED_PER_BLOCK),
                         ids=[f"sm_{a}{b}" for a, b in sorted(SHARED_PER_BLOCK)])
def test_triton_shared_memory_fits_every_architecture(capability, monkeypatch):
    records = [r for r in json.loads(REPORT.read_text()) if r["backend"] == "triton"]
    targets = _report_targets(capability, monkeypatch)
    used = [r for r in records if r["target"] in targets]
    assert {r["module"].rsplit(".", 1)[1] for r in used} == set(KERNEL_MODULES)
    assert all("shared_bytes" in r for r in used)
    budget = SHARED_PER_BLOCK[capability]
    over = [(r["kernel"], r["target"], r["shared_bytes"]) for r in used
            if r["shared_bytes"] > budget]
    assert not over, f"over {budget} bytes: {over}"
