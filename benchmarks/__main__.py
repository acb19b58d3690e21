"""``python -m benchmarks``: the performance lab's one entry point.

On a CUDA GPU it times forward, backward and forward+backward of every operator
(pyvit_ops per backend, the naive PyTorch composition, torch SDPA, FlexAttention and
NATTEN where they apply) with ``triton.testing.do_bench`` at real model shapes and batch
1 / 32 / 128, appends the rows to ``<out>/timings_<gpu>.csv`` and plots the speedups.

Without a GPU it times the CPU path (the reference backend) against the naive
composition at a few model shapes per operator (a few minutes). ``--full`` times every
model shape and adds the memory-traffic figures (``traffic.py``, Triton interpreter) and
the static compile report (``static_report.py``): hours on 2 cores. ``--tiny`` runs a
small configuration of all of it (CI).
Every target is checked in ``<out>/summary_<device>.md`` (MET or MISSED with its figure),
assembled from the latest ``*.targets.txt`` of each kind in the output directory; a run
into ``benchmarks/results`` also rewrites ``benchmarks/RESULTS.md`` (``report.py``).
"""
import argparse
import os
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from benchmarks import harness, report, targets

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = "bench-results"
# Seconds of interleaved timing rounds per CPU case (at least 5 rounds): the default run
# keeps the budget short so that it ends in minutes; --full measures longer.
_CPU_BUDGET_S = {False: 0.5, True: 2.0}


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _csv_list(text):
    return [t for t in text.split(",") if t]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="*", default=list(harness.OPS), choices=harness.OPS)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in _csv_list(s)],
                        help="comma-separated batch sizes (default 1,32,128 on CUDA, 1 on CPU)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES),
                        help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--passes", type=_csv_list, default=list(harness.PASSES))
    parser.add_argument("--providers", type=_csv_list,
                        help="only these providers besides the naive baseline (default: all)")
    parser.add_argument("--models", type=_csv_list,
                        help="only shapes whose name starts with one of these (e.g. swin_b,vit_b)")
    parser.add_argument("--full", action="store_true",
                        help="every model shape; without a GPU also the traffic figures and "
                             "the static compile report (hours on 2 cores)")
    parser.add_argument("--tiny", action="store_true",
                        help="small shapes, batch 1, and quick traffic / static runs (CI)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output directory (default ./{DEFAULT_OUT}; the committed "
                             "figures are benchmarks/results)")
    parser.add_argument("--traffic", action=argparse.BooleanOptionalAction, default=None,
                        help="memory-traffic figures (default: with --full or --tiny, no GPU)")
    parser.add_argument("--static", action=argparse.BooleanOptionalAction, default=None,
                        help="static compile report (default: with --full or --tiny, no GPU)")
    parser.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU mode: torch threads (default 1: the figures compare "
                             "implementations, and on a loaded machine the thread barriers "
                             "of a multi-threaded run cost more than the work)")
    args = parser.parse_args(argv)
    bad = set(args.passes) - set(harness.PASSES)
    if bad:
        parser.error(f"--passes: expected a subset of {harness.PASSES}, got {sorted(bad)}")
    if args.tiny and _is_results_dir(args.out):
        parser.error(f"--tiny would merge its smoke-run records into the committed results "
                     f"in {harness.RESULTS_DIR}: pass --out DIR")
    return args


def _is_results_dir(path):
    return os.path.abspath(path) == os.path.abspath(harness.RESULTS_DIR)


def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def run_timing(args, device):
    """Time every selected op / shape / batch / provider and append the rows to the device's
    CSV; returns the CSV's newest rows of every case (this run's, and earlier runs' for the
    cases this one left out), which the plots and the target checks are made from."""
    on_cuda = device.type == "cuda"
    if on_cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: GPU timings of interpreted kernels mean "
                         "nothing; unset it")
    if not on_cuda:
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    batches = args.batches or ([1] if args.tiny or not on_cuda else [1, 32, 128])
    rid, meta = harness.run_id(), dict(harness.versions(), device=harness.device_name(device))
    tag = harness.device_tag(device)
    path = os.path.join(args.out, f"timings_{tag}.csv")
    cases = []
    for op in args.ops:
        module = harness.load_op(op)
        providers = module.providers(device)
        if args.providers:
            providers = {k: v for k, v in providers.items() if k in args.providers}
        shapes = harness.selected_shapes(module, args.tiny, args.models, args.full or on_cuda)
        cases += [(module, providers, shape, batch) for shape in shapes for batch in batches]
    print(f"== timing {len(cases)} cases on {harness.device_name(device)}, {_dtype_name(dtype)}, "
          f"passes {', '.join(args.passes)}", flush=True)
    with tqdm(cases, unit="case", dynamic_ncols=True) as bar:
        for module, providers, shape, batch in bar:
            bar.set_description(f"{module.OP} {shape.name} b{batch}")
            case_rows = harness.bench_case(module, shape, batch, device, dtype, providers,
                                           args.passes, log=tqdm.write,
                                           cpu_budget_s=_CPU_BUDGET_S[args.full])
            stamp = {"run_id": rid, "timestamp": harness.now()}
            harness.append_csv(path, case_rows, dict(meta, **stamp))
    print(f"   rows appended to {path} (run_id {rid})")
    rows = harness.latest_case_rows(path)
    for op in args.ops:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        runs = sorted({r["run_id"] for r in op_rows})
        title = (f"{op} on {harness.device_name(device)} ({op_rows[0]['dtype']}), "
                 f"run {', '.join(runs)}")
        png = harness.plot_speedups(op_rows, os.path.join(args.out, f"speedup_{op}_{tag}.png"),
                                    title)
        if png:
            print(f"   plot: {png}")
    return [r for r in rows if r["run_id"] == rid], rows


def speedup_table(rows):
    """One line per (op, shape, provider): the fwd+bwd time and its ratio to naive."""
    full = [r for r in rows if r["pass"] == "full" and r["provider"] != harness.NAIVE]
    lines = [f"{'op':<30} {'shape':<44} {'provider':<22} {'fwd+bwd ms':>10} {'vs naive':>8}"]
    for r in full:
        ms, ratio = r.get("min_ms") or r.get("median_ms"), r.get("speedup_vs_naive")
        cells = (f"{float(ms):10.2f} {float(ratio):7.2f}x" if ms not in (None, "")
                 and ratio not in (None, "") else f"{'-':>10} {'-':>8}  {r['status'][:40]}")
        lines.append(f"{r['op']:<30} {r['model']:<44} {r['provider']:<22} {cells}")
    return lines


def _script(name, extra):
    """Run ``benchmarks/<name>`` in a fresh interpreter (traffic needs TRITON_INTERPRET set
    before any kernel is imported; the static report must not have it)."""
    cmd = [sys.executable, os.path.join(_HERE, name), *extra]
    print(f"== python {' '.join(os.path.relpath(c) if os.path.isabs(c) else c for c in cmd[1:])}",
          flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(_HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    print(f"   ({time.perf_counter() - start:.0f} s)")


def _static_selection(ops):
    """static_report.py arguments limiting it to the kernels of ``ops`` (the Triton module
    and the CUDA source named after each op); none when every op is selected."""
    if set(ops) == set(harness.OPS):
        return []
    from pyvit_ops.testing.host import csrc_dir

    sources = [os.path.join(csrc_dir(), f"{op}.cu") for op in ops]
    return ["--modules", *ops, "--sources", *[s for s in sources if os.path.exists(s)]]


def write_summary(out, device):
    """``summary_<device>.md``: the target checks of the latest timing run on this device
    and of the latest traffic and static runs in ``out``, each with its file's date."""
    tag = harness.device_tag(device)
    sections = (
        (f"timings_{tag}.targets.txt", "GPU timings (do_bench)" if device.type == "cuda"
         else "CPU path vs naive composition on CPU"),
        ("traffic.targets.txt", "Memory traffic (Triton interpreter, aten dispatch mode) and "
                                "modelled H100 time"),
        ("static_report.targets.txt", "Static compile report (sm_80, sm_90a)"))
    versions = ", ".join(f"{k} {v}" for k, v in harness.versions().items())
    path = os.path.join(out, f"summary_{tag}.md")
    with open(path, "w") as f:
        f.write(f"# pyvit_ops benchmark targets ({harness.device_name(device)})\n\n"
                f"Written {harness.now()}; {versions}. MET / MISSED lines carry the figure "
                "they judged; MODEL lines are a roofline model, not a measurement.\n")
        for name, title in sections:
            source = os.path.join(out, name)
            if not os.path.exists(source):
                continue
            with open(source) as g:
                lines = g.read().rstrip("\n")
            stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(source)))
            f.write(f"\n## {title}\n\n`{name}`, {stamp}\n\n```\n{lines}\n```\n")
    return path


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = _device(args.device)
    cpu_mode = device.type != "cuda"
    os.makedirs(args.out, exist_ok=True)
    measured = []
    if args.timing:
        measured, rows = run_timing(args, device)
        harness.write_lines(os.path.join(args.out, f"timings_{harness.device_tag(device)}.targets.txt"),
                            targets.timing_lines(rows, device.type))
    tiny = ["--tiny"] if args.tiny else []
    lab = cpu_mode and (args.full or args.tiny)
    if args.traffic if args.traffic is not None else lab:
        models = ["--models", *args.models] if args.models else []
        _script("traffic.py", ["--json", os.path.join(args.out, "traffic.json"),
                               "--ops", *args.ops, *models, *tiny])
    if args.static if args.static is not None else lab:
        _script("static_report.py", ["--json", os.path.join(args.out, "static_report.json"),
                                     *_static_selection(args.ops), *tiny])
    summary = write_summary(args.out, device)
    if measured:
        print("\n== what this run measured (CPU: the CPU path; fastest of interleaved rounds)"
              if cpu_mode else "\n== what this run measured (median of do_bench)")
        print("\n".join(speedup_table(measured)))
    print(f"\n== files in {os.path.abspath(args.out)}:")
    for name in sorted(os.listdir(args.out)):
        print(f"   {name}")
    print(f"   target checks (MET / MISSED): {summary}")
    if _is_results_dir(args.out):
        report.main([])  # benchmarks/RESULTS.md shows what was just measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
