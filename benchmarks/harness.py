"""Shared benchmark machinery: model shapes, providers, timing, memory, CSV, plots.

Every operator script (``benchmarks/<op>.py``) describes its operator to the harness
with the same few names:

- ``OP``: the operator's name;
- ``model_shapes()`` / ``tiny_shapes()``: lists of :class:`Shape` taken from real
  models (or small ones for smoke runs and CI);
- ``make_inputs(params, batch, device, dtype, requires_grad=True)`` -> :class:`Inputs`,
  laid out as the model produces them (e.g. q, k, v as strided views of one packed
  projection);
- ``naive(inp)``: the PyTorch composition a user runs today, the baseline of every ratio;
- ``providers(device)`` -> ``{name: fn(inp) -> Tensor}``: the other implementations
  (pyvit_ops per backend, torch SDPA, FlexAttention, NATTEN where they apply);
- ``fused(inp)``: the Triton path measured by ``traffic.py``;
- ``flops(params, batch)`` -> ``{"fwd": Flops, "bwd": Flops}``;
- optionally ``reduce(params, max_units)`` (traffic.py may measure fewer heads and scale
  back) and ``backward_reads(inp)`` (the forward inputs the backward must read, when
  not all of them).

A provider raises :class:`Unavailable` (or the library's own error) when it cannot run
a shape; the harness records why instead of stopping. Timing uses
``triton.testing.do_bench`` on CUDA and, on CPU, rounds that run every provider in turn;
every ratio is between providers measured side by side in the same run (CUDA: medians;
CPU: the fastest of the interleaved runs, since preemption on a shared machine only adds
time).
"""
import csv
import dataclasses
import datetime
import functools
import importlib
import json
import math
import os
import platform
import statistics
import time

import torch

OPS = ("scaled_dot_product_attention", "window_attention", "elsa_attention", "avg_pool2d",
       "talking_heads_attention")
PASSES = ("fwd", "bwd", "full")
NAIVE = "naive"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# H100 SXM figures for the roofline model in traffic.py (a model, never a measurement).
H100_BANDWIDTH = 3.35e12          # bytes / s, HBM3
H100_TENSOR_FLOPS = 990e12        # dense bf16 tensor-core FLOP / s
H100_FP32_FLOPS = 67e12           # FP32 CUDA-core FLOP / s: elementwise work runs there

# Output tolerance of a provider against the naive composition, per dtype (atol, rtol).
TOLERANCES = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2),
              torch.bfloat16: (6e-2, 6e-2)}

CSV_FIELDS = ("run_id", "timestamp", "op", "model", "shape", "batch", "dtype", "provider",
              "pass", "median_ms", "p20_ms", "p80_ms", "min_ms", "speedup_vs_naive", "peak_mem_mb",
              "status", "device", "torch", "triton", "pyvit_ops", "host")


class Unavailable(RuntimeError):
    """A provider cannot run this shape / device; the message says why."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """One operator call of a real model: ``model`` names it (``swin_t+swin_s`` when two
    models share the shape), ``stage`` places it, ``params`` sizes it (no batch)."""

    model: str
    stage: str
    params: dict

    @property
    def name(self):
        return f"{self.model}.{self.stage}"


@dataclasses.dataclass
class Inputs:
    """Arguments of one call, also readable as attributes. ``leaves`` require grad (their
    ``.grad`` is reset between timed runs); ``reads`` are the operator's own tensor
    arguments (None where absent, e.g. no bias), for the compulsory traffic; ``extra``
    holds constants built once per shape (masks, indices, the upstream gradient)."""

    leaves: dict
    reads: dict
    extra: dict = dataclasses.field(default_factory=dict)

    def __getattr__(self, name):
        for group in ("reads", "leaves", "extra"):
            values = self.__dict__.get(group, {})
            if name in values:
                return values[name]
        raise AttributeError(name)


@dataclasses.dataclass(frozen=True)
class Flops:
    """Arithmetic of one pass: tensor-core matrix products and the rest (elementwise,
    reductions), multiply-add counted as 2. ``recompute`` is matmul work the fused
    backward repeats (flash-style recomputation of the scores)."""

    matmul: float = 0.0
    other: float = 0.0
    recompute: float = 0.0

    @property
    def total(self):
        return self.matmul + self.other


def load_op(name):
    """The benchmark script of an operator (``benchmarks.<op>``)."""
    if name not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {name!r}")
    return importlib.import_module(f"benchmarks.{name}")


def selected_shapes(module, tiny, models=None, full=True):
    """The benchmark script's tiny (CI) or model shapes; with ``models``, only those
    whose name starts with one of them; without ``full``, only ``module.QUICK``'s."""
    shapes = module.tiny_shapes() if tiny else module.model_shapes()
    models = models or (None if full or tiny else module.QUICK)
    if models:
        shapes = [s for s in shapes if any(s.name.startswith(m) for m in models)]
    return shapes


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_records(path, records, target_lines):
    """``records`` as JSON to ``path``, their target checks to ``<stem>.targets.txt``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    write_lines(os.path.splitext(path)[0] + ".targets.txt", target_lines)


def merge_records(path, records, key, replaces=None):
    """``records`` in place of the records of the JSON at ``path`` with the same ``key``
    fields, keeping the rest: a partial run (a few ops or kernels) refreshes just those.
    Old records for which ``replaces(record)`` is true are dropped even without a new
    record of the same key (a unit measured again in full, whose configs changed)."""
    if not os.path.exists(path):
        return records
    with open(path) as f:
        old = json.load(f)
    if replaces is not None:
        old = [r for r in old if not replaces(r)]
    new = {tuple(r.get(k) for k in key): r for r in records}
    merged = [new.pop(tuple(r.get(k) for k in key), r) for r in old]
    return merged + list(new.values())


def pyvit_function(name):
    """The public pyvit_ops function ``name``, imported when first called so that
    ``traffic.py`` can turn the Triton interpreter on before any kernel module loads."""
    import pyvit_ops

    fn = getattr(pyvit_ops, name, None)
    if fn is None:
        module = importlib.import_module(f"pyvit_ops.ops.{name}")
        fn = getattr(module, name)
    return fn


def pyvit_providers(call, device):
    """``pyvit_ops[backend]`` providers: on CUDA every GPU backend, on CPU the CPU path
    (the reference backend, what ``backend=None`` runs on CPU tensors)."""
    backends = ("triton", "cuda") if torch.device(device).type == "cuda" else ("reference",)
    return {f"pyvit_ops[{b}]": (lambda inp, b=b: call(inp, b)) for b in backends}


def optional_provider(factory):
    """``factory()``, or where it fails (a library missing or broken) a provider that
    raises :class:`Unavailable` with the reason, so the CSV says why it has no figures."""
    try:
        return factory()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"

        def unavailable(inp):
            raise Unavailable(reason)

        return unavailable


@functools.lru_cache(maxsize=None)
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, allowed to specialise on every benchmark shape
    (dynamo's default of 8 recompilations would silently fall back to eager)."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096)
    return torch.compile(flex_attention, dynamic=False)


# ------------------------------------------------------------------ environment


def versions():
    import triton

    import pyvit_ops

    try:
        version = pyvit_ops.__version__
    except AttributeError:
        from importlib import metadata
        version = metadata.version("pyvit_ops")
    return {"torch": torch.__version__, "triton": triton.__version__, "pyvit_ops": version,
            "host": platform.node()}


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_tag(device):
    """Short file-name tag: ``cpu`` or the GPU's name (``cuda-nvidia-h100-80gb-hbm3``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")


# ------------------------------------------------------------------ measuring


def _reset_grads(leaves):
    for t in leaves:
        t.grad = None


def time_cpu_side_by_side(fns, leaves, budget_s=2.0, min_reps=5, max_reps=50):
    """``{key: (median, p20, p80, min)}`` in ms of every ``fns[key]`` on CPU. One warm-up each,
    then rounds that run every function once in turn, until the time budget is spent (at
    least ``min_reps`` rounds): a load change on a shared machine then hits every
    provider alike instead of whichever ran at that moment."""
    samples = {key: [] for key in fns}
    for fn in fns.values():
        _reset_grads(leaves)
        fn()
    spent, rounds = 0.0, 0
    while rounds < min_reps or (spent < budget_s and rounds < max_reps):
        for key, fn in fns.items():
            _reset_grads(leaves)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            samples[key].append(elapsed * 1e3)
            spent += elapsed
        rounds += 1
    result = {}
    for key, values in samples.items():
        q = statistics.quantiles(values, n=10, method="inclusive")
        result[key] = (statistics.median(values), q[1], q[7], min(values))
    return result


def time_cuda(fn, leaves):
    """Median, p20, p80 and min in ms from ``triton.testing.do_bench`` (L2 flushed between
    runs, grads reset so that accumulation does not add a kernel)."""
    from triton.testing import do_bench

    return tuple(do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves),
                          quantiles=[0.5, 0.2, 0.8, 0.0]))


def peak_memory_cuda(fn, leaves, device):
    """Bytes allocated at the peak of ``fn`` above what was allocated before it."""
    _reset_grads(leaves)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_memory_cpu(fn, leaves):
    """Peak of the bytes the CPU allocator holds during ``fn`` above what it held before,
    from the profiler's allocation timeline (tensors created and destroyed in order);
    None when this torch has no such timeline."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto prints a start and a stop line to stderr for every profiled region.
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")
    _reset_grads(leaves)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    try:
        timeline = prof._memory_profile().timeline
    except Exception:  # private API: a torch without it reports no figure, not a wrong one
        return None
    live = peak = 0
    for _, action, _, size in sorted((e for e in timeline if e[0] >= 0), key=lambda e: e[0]):
        if action.name == "CREATE":
            live += size
        elif action.name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak


def pass_functions(provider, inp, out, dout):
    """``{pass: fn}`` for one provider: forward (inputs requiring grad, as in training),
    backward alone (through ``out``, one retained forward), forward + backward."""
    return {
        "fwd": lambda: provider(inp),
        "bwd": lambda: out.backward(dout, retain_graph=True),
        "full": lambda: provider(inp).backward(dout),
    }


def compare(out, expected):
    """None when ``out`` matches ``expected`` within the dtype's tolerance, else a short
    description of the mismatch."""
    atol, rtol = TOLERANCES.get(expected.dtype, (1e-5, 1e-5))
    out, expected = out.float(), expected.float()
    if out.shape != expected.shape:
        return f"shape {tuple(out.shape)} != naive {tuple(expected.shape)}"
    if torch.allclose(out, expected, atol=atol, rtol=rtol):
        return None
    err = (out - expected).abs()
    return f"max abs err {err.max().item():.3g} vs naive (atol {atol}, rtol {rtol})"


def _status_of(exc):
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    kind = "unavailable" if isinstance(exc, Unavailable) or "Unavailable" in type(exc).__name__ \
        else "error"
    if "out of memory" in text.lower():
        kind = "oom"
    return f"{kind}: {text[:300]}"


def bench_case(module, shape, batch, device, dtype, providers, passes, check=True, log=print,
               cpu_budget_s=2.0):
    """Time every provider (the naive composition first) on one shape; returns rows with
    ``speedup_vs_naive`` filled in from this run's naive medians. On CUDA each provider is
    timed with do_bench and released before the next (memory); on CPU all providers are
    timed in interleaved rounds for about ``cpu_budget_s`` seconds."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    inp = module.make_inputs(shape.params, batch, device, dtype)
    leaves = list(inp.leaves.values())
    rows, pending, expected = [], {}, None
    for name, provider in [(NAIVE, module.naive)] + list(providers.items()):
        base = {"op": module.OP, "model": shape.name, "shape": module.describe(shape.params, batch),
                "batch": batch, "dtype": str(dtype).replace("torch.", ""), "provider": name}
        approximate = getattr(provider, "approximate", None)
        try:
            out = provider(inp)
            status = "ok" if approximate is None else f"ok (not equivalent: {approximate})"
            if name == NAIVE:
                expected = out.detach()
            elif check and expected is not None and approximate is None:
                mismatch = compare(out, expected)
                status = "ok" if mismatch is None else f"mismatch: {mismatch}"
            fns = pass_functions(provider, inp, out, _dout(inp, out))
            del out
        except Exception as exc:  # one provider failing must not stop the others
            rows += [dict(base, **{"pass": p, "status": _status_of(exc)}) for p in passes]
            log(f"  {shape.name:<28} {name:<22} {_status_of(exc)[:110]}")
            _free(device)
            continue
        for p in passes:
            pending[(name, p)] = (dict(base, **{"pass": p, "status": status}), fns[p])
        if on_cuda:
            rows += _measure(pending, leaves, device)
            pending = {}
    if pending:
        rows += _measure(pending, leaves, device, cpu_budget_s)
    # On a shared CPU, preemption only ever adds time (on a loaded machine most samples
    # carry some), so the CPU ratios use the fastest run; on CUDA do_bench's median.
    stat = "median_ms" if on_cuda else "min_ms"
    naive_ms = {r["pass"]: r[stat] for r in rows if r["provider"] == NAIVE and r.get(stat)}
    for row in rows:
        if row.get(stat) and naive_ms.get(row["pass"]):
            row["speedup_vs_naive"] = naive_ms[row["pass"]] / row[stat]
        if row.get("median_ms") is not None:
            note = "" if row["status"] == "ok" else row["status"]
            log(f"  {shape.name:<28} {row['provider']:<22} {row['pass']:<4} "
                f"{row[stat]:9.3f} ms  x{row.get('speedup_vs_naive', float('nan')):6.2f}"
                f"  {_fmt_mb(row.get('peak_mem_mb'))}  {note}")
    return rows


def _measure(pending, leaves, device, cpu_budget_s=2.0):
    """Rows of ``{key: (row, fn)}`` with time and peak memory filled in, or the error."""
    timed, failures = {}, {}
    if device.type == "cuda":
        for key, (_, fn) in pending.items():
            try:
                timed[key] = time_cuda(fn, leaves)
            except Exception as exc:  # e.g. out of memory in one pass only
                failures[key] = _status_of(exc)
                _free(device)
    else:
        try:
            timed = time_cpu_side_by_side({k: fn for k, (_, fn) in pending.items()}, leaves,
                                          budget_s=cpu_budget_s)
        except Exception as exc:
            failures = {key: _status_of(exc) for key in pending}
    rows = []
    for key, (row, fn) in pending.items():
        rows.append(row)
        if key in failures:
            row["status"] = failures[key]
            continue
        row.update(zip(("median_ms", "p20_ms", "p80_ms", "min_ms"), timed[key]))
        try:
            peak = (peak_memory_cuda(fn, leaves, device) if device.type == "cuda"
                    else peak_memory_cpu(fn, leaves))
            row["peak_mem_mb"] = None if peak is None else peak / 2**20
        except Exception as exc:
            row["status"] = _status_of(exc)
    _reset_grads(leaves)
    _free(device)
    return rows


def _dout(inp, out):
    """The upstream gradient: fixed random values in the output's shape, made once per
    case so that every provider gets the same one."""
    if "dout" not in inp.extra:
        g = torch.Generator(device="cpu").manual_seed(1)
        inp.extra["dout"] = torch.randn(out.shape, generator=g).to(out.dtype).to(out.device)
    return inp.extra["dout"]


def _fmt_mb(mb):
    return "   peak ?" if mb is None else f"{mb:8.1f} MB"


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ CSV and plots


def append_csv(path, rows, meta):
    """Append ``rows`` (with run metadata) to ``path``, writing the header for a new file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in dict(meta, **row).items()})


def latest_case_rows(path):
    """The rows of the timings CSV at ``path`` from the newest run of each case (op, model,
    batch, dtype): a run of a few ops refreshes just those, and the ratios of a case stay
    the ones measured side by side within one run."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    def case(r):
        return r["op"], r["model"], r["batch"], r["dtype"]

    newest = {}
    for r in rows:
        newest[case(r)] = max(newest.get(case(r), ""), r["run_id"])
    return [r for r in rows if r["run_id"] == newest[case(r)]]


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def plot_speedups(rows, path, title):
    """Bar chart of speedup vs the naive composition, one panel per pass, one bar group per
    shape; returns the path written, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    rows = [r for r in rows if r.get("speedup_vs_naive") not in (None, "")
            and r["provider"] != NAIVE]
    if not rows:
        return None
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    shapes = list(dict.fromkeys(f"{r['model']} B={r['batch']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width_in = min(24, max(8, 0.3 * len(shapes) * len(providers)))
    fig, axes = plt.subplots(len(passes), 1, figsize=(width_in, 3.4 * len(passes)), squeeze=False)
    width = 0.8 / len(providers)
    for ax, p in zip(axes[:, 0], passes):
        for i, prov in enumerate(providers):
            values = {f"{r['model']} B={r['batch']}": float(r["speedup_vs_naive"])
                      for r in rows if r["pass"] == p and r["provider"] == prov}
            xs = [j + i * width for j, s in enumerate(shapes) if s in values]
            # Bars grow from 1 (as fast as naive) up for speedups, down for slowdowns.
            ax.bar(xs, [values[s] - 1.0 for s in shapes if s in values], width, bottom=1.0,
                   label=prov)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        # CPU ratios sit within a factor of two of 1: label them more finely than decades.
        values = [float(r["speedup_vs_naive"]) for r in rows if r["pass"] == p] + [1.0]
        narrow = max(values) / min(values) < 4
        subs = (1.0, 1.25, 1.6, 2.0, 2.5, 3.2, 4.0, 5.0, 6.3, 8.0) if narrow else (1.0, 2.0, 5.0)
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=subs))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(axis="y", which="major", linewidth=0.3)
        ax.set_ylabel(f"{p}: naive / provider")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=35, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_id():
    return datetime.datetime.now().strftime("%Y%m%dT%H%M%S")


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None
