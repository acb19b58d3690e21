"""``python -m benchmarks``: the performance lab's one entry point.

On a CUDA GPU it times forward, backward and forward+backward of every operator
(pyvit_ops per backend, the naive PyTorch composition, torch SDPA, FlexAttention and
NATTEN where they apply) with ``triton.testing.do_bench`` at real model shapes and batch
1 / 32 / 128, appends the rows to ``results/timings_<gpu>.csv`` and plots the speedups.

Without a GPU it runs the CPU mode: the CPU path (the reference backend) timed against
the naive composition on CPU at model shapes, then the memory-traffic figures
(``traffic.py``, in a subprocess with the Triton interpreter) and the static compile
report (``static_report.py``). ``--tiny --out DIR`` runs a small configuration of all of it
(CI); it refuses to write into ``benchmarks/results``.
Every target is checked in ``results/summary_<device>.md`` (MET or MISSED with its figure),
assembled from the latest ``*.targets.txt`` of each kind in the output directory; a run
into ``benchmarks/results`` then rewrites the README's results section (``report.py``).
"""
import argparse
import os
import subprocess
import sys
import time

import torch

from benchmarks import harness, report, targets

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HERE = os.path.dirname(os.path.abspath(__file__))


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
    parser.add_argument("--tiny", action="store_true",
                        help="small shapes, batch 1, and quick traffic / static runs (CI)")
    parser.add_argument("--out", default=harness.RESULTS_DIR, help="output directory")
    parser.add_argument("--traffic", action=argparse.BooleanOptionalAction, default=None,
                        help="memory-traffic figures (default: on in CPU mode)")
    parser.add_argument("--static", action=argparse.BooleanOptionalAction, default=None,
                        help="static compile report (default: on in CPU mode)")
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


def run_timing(args, device, log=print):
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
    for op in args.ops:
        module = harness.load_op(op)
        shapes = harness.selected_shapes(module, args.tiny, args.models)
        providers = module.providers(device)
        if args.providers:
            providers = {k: v for k, v in providers.items() if k in args.providers}
        log(f"== {op}: {len(shapes)} shapes x batches {batches}, {harness.device_name(device)}, "
            f"{_dtype_name(dtype)}; providers: naive, {', '.join(providers)}")
        for shape in shapes:
            for batch in batches:
                case_rows = harness.bench_case(module, shape, batch, device, dtype, providers,
                                               args.passes, log=log)
                stamp = {"run_id": rid, "timestamp": harness.now()}
                harness.append_csv(path, case_rows, dict(meta, **stamp))
    log(f"   rows appended to {os.path.relpath(path)} (run_id {rid})")
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
            log(f"   plot: {os.path.relpath(png)}")
    return rows


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
    if args.timing:
        rows = run_timing(args, device)
        harness.write_lines(os.path.join(args.out, f"timings_{harness.device_tag(device)}.targets.txt"),
                     targets.timing_lines(rows, device.type))
    tiny = ["--tiny"] if args.tiny else []
    if args.traffic if args.traffic is not None else cpu_mode:
        models = ["--models", *args.models] if args.models else []
        _script("traffic.py", ["--json", os.path.join(args.out, "traffic.json"),
                               "--ops", *args.ops, *models, *tiny])
    if args.static if args.static is not None else cpu_mode:
        _script("static_report.py", ["--json", os.path.join(args.out, "static_report.json"),
                                     *_static_selection(args.ops), *tiny])
    summary = write_summary(args.out, device)
    with open(summary) as f:
        print(f"\n== {os.path.relpath(summary)}\n{f.read()}")
    if _is_results_dir(args.out):
        report.main([])  # the README's results section shows what was just measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
