"""``python -m pyvit_ops.check``: is pyvit_ops right on this machine's GPU?

Runs every operator x kernel backend (triton; cuda where the extension runs on this
GPU) x dtype (float32, float16, bfloat16) at model shapes, forward and the gradient
of every input and parameter, against the float64 reference backend, with one
tolerance rule (``RULE``); with two GPUs it also runs each case on ``cuda:1`` while
``cuda:0`` is current. Prints a pass / fail table and writes it as JSON; the exit
code is 0 when everything that ran passed and something ran, else 1.

Without a GPU the same checks (``run_checks``, which only the device and the shape
set change) run at small shapes on CPU tensors: the Triton kernels in the Triton
interpreter, the CUDA C++ kernels under the host emulation
(``pyvit_ops.testing.host``, compiled with g++ the first time).
"""
import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Tuple

import torch

from pyvit_ops.testing import interpreter

# Kernel modules imported before the interpreter was on stay compiled for the GPU.
_KERNELS_PRELOADED = (not interpreter.is_enabled() and
                      any(m.startswith("pyvit_ops.kernels.") for m in sys.modules))
if not torch.cuda.is_available():
    # Before the first kernel module is imported: triton.jit decides at decoration
    # time whether a kernel is interpreted.
    interpreter.enable()

import pyvit_ops  # noqa: E402
from pyvit_ops import _backend, info  # noqa: E402
from pyvit_ops.testing import host  # noqa: E402

KERNEL_BACKENDS = ("triton", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPERATORS = tuple(_backend.PRIORITY)
DEFAULT_JSON = "pyvit_ops_check.json"

# The tolerance rule. PyTorch's own error is that of the reference backend (plain
# PyTorch) on the same inputs in the same dtype: the rounding any implementation in
# that dtype pays. The floor covers results PyTorch happens to round exactly.
FACTOR = 8
FLOOR_EPS = 1
RULE = (f"a tensor passes when max|kernel - float64| <= {FACTOR} x max|PyTorch - float64| "
        f"+ {FLOOR_EPS} x eps(dtype) x max|float64|, where float64 is the reference backend on "
        "the same inputs in float64 and PyTorch is the reference backend on them in the "
        "kernel's dtype, both under this process's float32 matmul precision")


@dataclasses.dataclass(frozen=True)
class Case:
    """One operator call at one shape: ``fn(*leaves, backend=...)``; every leaf (input
    or parameter) gets a gradient."""

    op: str
    name: str
    leaves: Tuple[Tuple[str, Tuple[int, ...]], ...]
    fn: Callable

    def make_leaves(self, dtype, device, seed=0):
        """Fresh leaves; the same values (up to rounding) for every dtype and device."""
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(shape, generator=g).to(dtype).to(device).requires_grad_()
                for _, shape in self.leaves]

    @property
    def shape(self):
        return " ".join(f"{name}{tuple(shape)}".replace(" ", "") for name, shape in self.leaves)


def _sdpa(q, k, v, *, backend):
    return pyvit_ops.scaled_dot_product_attention(q, k, v, backend=backend)


def _sdpa_packed_bias(qkv, bias, *, backend):
    # ViT's path (pyvit_ops.nn.Attention): one packed projection.
    return pyvit_ops.scaled_dot_product_attention_qkvpacked(qkv, bias, backend=backend)


def _window(window, shift):
    def call(qkv, table, *, backend):
        # Swin's path (pyvit_ops.nn.WindowAttention): one packed projection.
        return pyvit_ops.window_attention_qkvpacked(qkv, table, window_size=window,
                                                    shift_size=shift, backend=backend)
    return call


def _elsa(v, attn, ghost_mul, ghost_add, *, backend):
    return pyvit_ops.elsa_attention(v, attn, ghost_mul, ghost_add, kernel_size=7,
                                    backend=backend)


def _poolformer(x, *, backend):
    return pyvit_ops.poolformer_pool(x, 3, backend=backend)


def _cases(sdpa_bias, sdpa_long, swin, swin12, elsa, pool):
    """Cases from sizes: sdpa_bias (B, N, heads, D), sdpa_long (B, heads, N, D),
    swin / swin12 (B, grid, heads, D), elsa (B, C, heads, grid), pool (B, C, grid)."""
    B, N, h, D = sdpa_bias
    Bl, hl, Nl, Dl = sdpa_long
    table = lambda w, heads: ((2 * w - 1) ** 2, heads)  # noqa: E731
    Bs, gs, hs, Ds = swin
    Bw, gw, hw, Dw = swin12
    Be, Ce, he, ge = elsa
    Bp, Cp, gp = pool
    return [
        Case("scaled_dot_product_attention", "vit_b_bias",
             (("qkv", (B, N, 3, h, D)), ("bias", (h, N, N))), _sdpa_packed_bias),
        Case("scaled_dot_product_attention", "long_d128",
             tuple((name, (Bl, hl, Nl, Dl)) for name in "qkv"), _sdpa),
        Case("window_attention", "swin_t_s1_w7",
             (("qkv", (Bs, gs, gs, 3, hs, Ds)), ("table", table(7, hs))), _window(7, 3)),
        Case("window_attention", "swin_384_w12",
             (("qkv", (Bw, gw, gw, 3, hw, Dw)), ("table", table(12, hw))), _window(12, 6)),
        Case("elsa_attention", "elsa_swin_t_s1",
             (("v", (Be, Ce, ge, ge)), ("attn", (Be, he * 49, ge, ge)),
              ("ghost_mul", (Ce, 7, 7)), ("ghost_add", (Ce, 7, 7))), _elsa),
        Case("avg_pool2d", "poolformer_s1",
             (("x", (Bp, Cp, gp, gp)),), _poolformer),
    ]


# "model": ViT-B (N=197, D=64) with a per-head bias, N=1024 D=128, Swin-T stage 1 (56x56,
# window 7, shift 3, 3 heads, D=32), Swin-B 384 stage 1 (96x96, window 12, shift 6),
# ELSA-Swin-T stage 1 (96 channels, 3 heads, 56x56, K=7), PoolFormer-S12 stage 1 (64
# channels, 56x56). "small": the same calls at sizes the interpreter and the host
# emulation run in seconds (grids still cover borders, shifts and every window kind).
SHAPE_SETS = {
    "model": _cases(sdpa_bias=(2, 197, 12, 64), sdpa_long=(2, 4, 1024, 128),
                    swin=(2, 56, 3, 32), swin12=(1, 96, 4, 32),
                    elsa=(2, 96, 3, 56), pool=(2, 64, 56)),
    "small": _cases(sdpa_bias=(1, 17, 2, 16), sdpa_long=(1, 1, 40, 128),
                    swin=(1, 14, 2, 16), swin12=(1, 12, 1, 8),
                    elsa=(1, 8, 2, 9), pool=(1, 4, 9)),
}


# --------------------------------------------------------------------------- core


def _results(case, backend, leaves, dtype):
    """[output, gradient of each leaf], detached. The cotangent is random (a plain sum
    would hide errors that cancel), the same for every run, rounded to ``dtype``."""
    out = case.fn(*leaves, backend=backend)
    g = torch.Generator().manual_seed(1)
    cotangent = torch.randn(out.shape, generator=g).to(dtype).to(out.device, out.dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, cotangent)]


def _error(x, expected):
    """max |x - expected| in float64; inf when x holds a NaN or an infinity."""
    diff = (x.double() - expected).abs()
    inf = float("inf")
    return torch.nan_to_num(diff, nan=inf, posinf=inf).max().item() if diff.numel() else 0.0


def _names(case):
    return ["out"] + [f"d{name}" for name, _ in case.leaves]


def _judge(case, dtype, results, expected, baseline):
    """Per tensor: error, PyTorch's error, limit and ok; plus what is wrong with the
    results' dtypes or shapes."""
    eps = torch.finfo(dtype).eps
    tensors, problems = [], []
    for name, got, want, torch_got in zip(_names(case), results, expected, baseline):
        if got.dtype != dtype or got.shape != want.shape:
            problems.append(f"{name}: expected {str(dtype).removeprefix('torch.')} "
                            f"{tuple(want.shape)}, got {str(got.dtype).removeprefix('torch.')} "
                            f"{tuple(got.shape)}")
            continue
        peak = want.abs().max().item() if want.numel() else 0.0
        error, torch_error = _error(got, want), _error(torch_got, want)
        limit = FACTOR * torch_error + FLOOR_EPS * eps * peak
        tensors.append(dict(name=name, error=error, torch_error=torch_error, limit=limit,
                            peak=peak, ok=error <= limit))
    return tensors, problems


def _record(case, backend, dtype, device, status, reason="", tensors=(), seconds=0.0):
    return dict(op=case.op, case=case.name, shape=case.shape, backend=backend,
                dtype=str(dtype).removeprefix("torch."), device=str(device), status=status,
                reason=reason, seconds=round(seconds, 3), tensors=list(tensors))


def _runs(case, dtype, device, backends, unavailable):
    """Yield ``(record, results)`` of ``case`` in ``dtype`` on each backend; results
    (output and gradients) are None unless the backend ran."""
    leaves = case.make_leaves(dtype, device)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    expected = _results(case, "reference", exact, dtype)
    baseline = None
    for backend in backends:
        start = time.perf_counter()
        results = None
        if backend in unavailable:
            record = _record(case, backend, dtype, device, "not run", unavailable[backend])
        else:
            if baseline is None:
                baseline = _results(case, "reference", leaves, dtype)
            try:
                results = _results(case, backend, leaves, dtype)
            except _backend.BackendUnavailableError as exc:
                record = _record(case, backend, dtype, device, "not run", str(exc))
            except Exception as exc:  # a crash is a failure, reported with the others
                record = _record(case, backend, dtype, device, "error",
                                 f"{type(exc).__name__}: {exc}".splitlines()[0],
                                 seconds=time.perf_counter() - start)
            else:
                tensors, problems = _judge(case, dtype, results, expected, baseline)
                failed = problems + [t["name"] for t in tensors if not t["ok"]]
                record = _record(case, backend, dtype, device, "fail" if failed else "pass",
                                 "; ".join(problems), tensors, time.perf_counter() - start)
        yield record, results


def run_checks(device, cases, backends=KERNEL_BACKENDS, dtypes=DTYPES, unavailable=None,
               done=lambda record: None):
    """Check every case x dtype x backend on ``device`` (a CUDA GPU, or the CPU through
    the interpreter and the host emulation): one JSON-ready record each, with ``status``
    "pass", "fail", "error" (it raised) or "not run" (``reason`` says why: the backend
    refuses the call, or ``unavailable[backend]`` says it cannot run here at all);
    ``done(record)`` after each."""
    records = []
    for case in cases:
        for dtype in dtypes:
            for record, _ in _runs(case, dtype, torch.device(device), backends,
                                   unavailable or {}):
                records.append(record)
                done(record)
    return records


def check_placement(case, backend, dtype, device, other):
    """``run_checks``'s record of ``case`` on ``other`` while ``device`` is current, which
    also fails unless the results live on ``other``, the current device is unchanged
    and, when both devices are the same GPU model, the results equal those on
    ``device`` bit for bit (the kernels are deterministic)."""
    device, other = torch.device(device), torch.device(other)
    cuda = device.type == "cuda"
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        current = torch.cuda.current_device() if cuda else None
        ((record, results),) = _runs(case, dtype, other, [backend], {})
        problems = [record["reason"]] if record["reason"] else []
        if results is not None:
            if cuda and torch.cuda.current_device() != current:
                problems.append(f"current device: expected {current}, got "
                                f"{torch.cuda.current_device()}")
            problems += [f"{name}: expected on {other}, got {t.device}"
                         for name, t in zip(_names(case), results) if t.device != other]
            if not cuda or torch.cuda.get_device_name(device) == torch.cuda.get_device_name(
                    other):
                here = _results(case, backend, case.make_leaves(dtype, device), dtype)
                for name, a, b in zip(_names(case), here, results):
                    diff = _error(b.to(device), a.double())
                    if diff:
                        problems.append(f"{name}: differs from {device} by up to {diff:.3e}")
    record.update(device=f"{other} (current {device})", reason="; ".join(problems))
    if problems and record["status"] == "pass":
        record["status"] = "fail"
    return record


# --------------------------------------------------------------------------- report


def _worst(record):
    """The tensor closest to (or furthest over) its limit; None if none was measured."""
    return max(record["tensors"], default=None,
               key=lambda t: t["error"] / t["limit"] if t["limit"] else (
                   0.0 if t["error"] == 0.0 else float("inf")))


def format_table(records):
    """Lines of the pass / fail table: one row per run with its worst tensor's error and
    limit, then every failing tensor and the reason of every run that did not pass."""
    head = ("operator", "case", "backend", "dtype", "status", "worst", "error", "limit",
            "pytorch", "seconds")
    rows = []
    for r in records:
        w = _worst(r)
        cells = (w["name"], f"{w['error']:.2e}", f"{w['limit']:.2e}", f"{w['torch_error']:.2e}") \
            if w else ("-",) * 4
        rows.append((r["op"], r["case"], r["backend"], r["dtype"], r["status"].upper()
                     if r["status"] != "pass" else "pass", *cells, f"{r['seconds']:.1f}"))
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in (head, *rows)]
    for r in records:
        if r["status"] == "pass":
            continue
        what = f"{r['op']} {r['case']} {r['backend']} {r['dtype']} on {r['device']}"
        if r["reason"]:
            lines.append(f"{r['status']}: {what}: {r['reason']}")
        lines += [f"{r['status']}: {what}: {t['name']} error {t['error']:.3e} > limit "
                  f"{t['limit']:.3e} (PyTorch {t['torch_error']:.3e})"
                  for t in r["tensors"] if not t["ok"]]
    return lines


def _progress(total):
    """``done(record)`` callback that shows progress: a tqdm bar on a terminal when tqdm
    is installed, else one line per run."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not sys.stdout.isatty():
        count = [0]

        def done(r):
            count[0] += 1
            print(f"[{count[0]}/{total}] {r['op']} {r['case']} {r['backend']} {r['dtype']}: "
                  f"{r['status']} ({r['seconds']:.1f} s)", flush=True)
        return done, lambda: None
    bar = tqdm(total=total, unit="run", file=sys.stdout)

    def done(r):
        bar.set_postfix_str(f"{r['op']} {r['case']} {r['backend']} {r['dtype']}: {r['status']}")
        bar.update()
    return done, bar.close


def _prepare(device, backends):
    """{backend: why it cannot run on ``device`` at all}; builds the host emulation."""
    unavailable = {}
    if device.type == "cuda":
        return unavailable
    if "triton" in backends and _KERNELS_PRELOADED:
        unavailable["triton"] = ("the Triton kernels were imported before the interpreter was "
                                 "enabled; run python -m pyvit_ops.check in a fresh process")
    if "cuda" in backends:
        print("building the CUDA C++ kernels for the CPU (host emulation, g++; a few minutes "
              "the first time, cached afterwards) ...", flush=True)
        start = time.perf_counter()
        try:
            host.load()
        except Exception as exc:
            unavailable["cuda"] = f"host-emulation build failed: {exc}".splitlines()[0]
            print(unavailable["cuda"])
        else:
            print(f"host emulation ready ({time.perf_counter() - start:.0f} s)", flush=True)
    return unavailable


def _header(versions, device):
    ext = versions["cuda_extension"]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"GPU {versions['gpu']} (sm_{major}{minor}, {device})"
    else:
        where = "no CUDA GPU: CPU tensors"
    return [f"pyvit_ops {versions['version']} check on {where}",
            f"torch {versions['torch']}, triton {versions['triton']}, CUDA (torch) "
            f"{versions['torch_cuda']}, toolkit {versions['cuda_toolkit']}, extension "
            f"built={ext['built']} archs={list(ext['archs'])}, float32 matmul precision "
            f"{torch.get_float32_matmul_precision()}"]


def main(argv=None):
    """Run the checks, print the table, write the JSON; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m pyvit_ops.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=DEFAULT_JSON, metavar="PATH",
                        help=f"where to write the results (default: ./{DEFAULT_JSON})")
    parser.add_argument("--shapes", choices=tuple(SHAPE_SETS),
                        help="shape set (default: model on a GPU, small without one)")
    parser.add_argument("--ops", nargs="+", choices=OPERATORS, default=OPERATORS)
    parser.add_argument("--backends", nargs="+", choices=KERNEL_BACKENDS, default=KERNEL_BACKENDS)
    parser.add_argument("--dtypes", nargs="+", choices=[str(d).removeprefix("torch.")
                                                        for d in DTYPES],
                        default=[str(d).removeprefix("torch.") for d in DTYPES])
    args = parser.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    shapes = args.shapes or ("model" if gpu else "small")
    cases = [c for c in SHAPE_SETS[shapes] if c.op in args.ops]
    dtypes = [getattr(torch, d) for d in args.dtypes]
    versions = info.collect()
    print("\n".join(_header(versions, device)))
    if not gpu:
        print("No CUDA GPU found: checking on CPU tensors at small shapes instead, the Triton "
              "kernels in the Triton interpreter and the CUDA C++ kernels under the host "
              "emulation. This checks the kernels' logic, not a GPU's compilation of them.")
    print(f"rule: {RULE}", flush=True)
    unavailable = _prepare(device, args.backends)
    done, close = _progress(len(cases) * len(dtypes) * len(args.backends))
    try:
        records = run_checks(device, cases, args.backends, dtypes, unavailable, done)
    finally:
        close()
    placement = []
    if gpu and torch.cuda.device_count() >= 2:
        # One dtype: placement is about devices and streams, not rounding.
        placement = [check_placement(case, backend, torch.float16, "cuda:0", "cuda:1")
                     for case in cases for backend in args.backends
                     if backend not in unavailable]
    print("\n".join(format_table(records)))
    if placement:
        print("\ndevice placement: tensors on cuda:1 while cuda:0 is current")
        print("\n".join(format_table(placement)))
    elif gpu:
        print("\ndevice placement: not checked (needs two GPUs)")
    runs = records + placement
    passed = any(r["status"] == "pass" for r in runs) and not any(
        r["status"] in ("fail", "error") for r in runs)
    counts = {s: sum(r["status"] == s for r in runs) for s in ("pass", "fail", "error", "not run")}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ": "
          + ("PASSED" if passed else "FAILED"))
    path = os.path.abspath(args.json)
    with open(path, "w") as f:
        json.dump(dict(versions=versions, device=str(device), shapes=shapes, rule=RULE,
                       float32_matmul_precision=torch.get_float32_matmul_precision(),
                       factor=FACTOR, floor_eps=FLOOR_EPS, passed=passed, counts=counts,
                       results=records, placement=placement), f, indent=2)
    print(f"written to {path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
