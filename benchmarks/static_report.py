"""Static compile report: every Triton kernel config and every CUDA kernel, for sm_80 and
sm_90(a), compiled here without a GPU.

    python benchmarks/static_report.py --json benchmarks/results/static_report.json

Triton: ``pyvit_ops.testing.static.report_all`` compiles each ``static_compile_specs()``
entry of ``pyvit_ops.kernels.<op>`` (in a subprocess without the interpreter) and reads
registers, shared memory, spills and HMMA / HGMMA counts from the cubin. CUDA:
``pyvit_ops.testing.cuda_report.ptxas_report`` reads ptxas' registers / spills per
kernel; the tensor-core instruction count comes from the SASS of the same source compiled
to a cubin with the build's flags. One record per (kernel, backend, arch, config), with at
least kernel, backend, arch, config, registers, shared_bytes, spill_stores, spill_loads,
tensor_core_instructions. The target check (no spills, tensor cores in every ``tl.dot``
kernel) is written beside the JSON as ``<name>.targets.txt``.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, targets  # noqa: E402

ARCHS = (80, 90)
_TARGET = {80: "sm_80", 90: "sm_90a"}  # Triton compiles sm_90 as sm_90a (wgmma)
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.M)
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)", re.M)


def triton_records(modules=None, archs=ARCHS, max_specs=None, jobs=2, timeout=None):
    """Records of the Triton kernels; ``max_specs`` compiles only the first N specs of each
    module (a quick check); ``timeout`` in seconds for the whole compilation (None: none,
    the full report is a thousand-odd compilations per arch)."""
    from pyvit_ops.testing import static

    if max_specs is None:
        records = static.report_all(modules=modules, archs=archs, jobs=jobs, timeout=timeout)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            records = static.report_all(modules=_first_specs(modules, max_specs, tmp),
                                        archs=archs, jobs=jobs, timeout=timeout)
    for r in records:
        r["backend"] = "triton"
        if "arch" in r:
            r["arch"] = r.get("target") or _TARGET.get(r["arch"], f"sm_{r['arch']}")
    return records


def _first_specs(modules, count, tmp):
    """Stand-in modules exposing the first ``count`` specs of each kernel module."""
    from pyvit_ops.testing import static

    paths = []
    for name in modules or static.discover_modules():
        dotted = name if "." in name else f"{static.KERNELS_PACKAGE}.{name}"
        path = os.path.join(tmp, f"{dotted.rsplit('.', 1)[-1]}.py")
        with open(path, "w") as f:
            f.write("from pyvit_ops.testing import static\n\n\n"
                    f"def static_compile_specs():\n"
                    f"    return static.specs_of({dotted!r})[:{int(count)}]\n")
        paths.append(path)
    return paths


def cuda_records(archs=ARCHS, sources=None):
    """Records of the CUDA C++ kernels (ptxas figures + tensor-core instruction counts)."""
    from pyvit_ops.testing import cuda_report

    archs = tuple(str(a) for a in archs)
    records = cuda_report.ptxas_report(archs=archs, sources=sources)
    counts = {}
    for source in sorted({r["source"] for r in records}):
        for arch in archs:
            counts.update(_sass_tensor_core_counts(cuda_report, source, arch))
    for r in records:
        r["backend"] = "cuda"
        r["tensor_core_instructions"] = counts.get((r["source"], r["arch"], r["kernel"]))
        r["config"] = f"nvcc {' '.join(_nvcc_flags())}"
        r["arch"] = f"sm_{r['arch']}"
    return records


def _nvcc_flags():
    from pyvit_ops import _build_config

    return _build_config.NVCC_FLAGS


def _sass_tensor_core_counts(cuda_report, source, arch):
    """{(source, arch, demangled kernel): HMMA + HGMMA instructions} from the cubin of
    ``source`` built with the extension's flags."""
    from pyvit_ops import _build_config
    from pyvit_ops.testing import static
    from pyvit_ops.testing.host import csrc_dir

    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernels.cubin")
        subprocess.run([cuda_report.nvcc_path(), "-cubin", os.path.join(csrc_dir(), source),
                        "-o", cubin, "-I", csrc_dir(), *_build_config.NVCC_FLAGS,
                        f"-arch=sm_{arch}"], check=True, capture_output=True, text=True)
        sass = subprocess.run([static._tool("cuobjdump"), "-sass", cubin], check=True,
                              capture_output=True, text=True).stdout
    parts = _FUNCTION.split(sass)[1:]  # [name, body, name, body, ...]
    names = cuda_report._demangle(parts[0::2])
    counts = {}
    for name, body in zip(names, parts[1::2]):
        ops = _OPCODE.findall(body)
        counts[(source, arch, name)] = sum(op in ("HMMA", "HGMMA") for op in ops)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/static_report.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the records to this file")
    parser.add_argument("--archs", default="80,90", help="comma-separated (default: 80,90)")
    parser.add_argument("--modules", nargs="*",
                        help="Triton kernel modules (op names; default: all)")
    parser.add_argument("--sources", nargs="*", help="CUDA .cu files (default: every csrc/*.cu)")
    parser.add_argument("--max-specs", type=int,
                        help="compile only the first N Triton specs of each module")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    parser.add_argument("--tiny", action="store_true",
                        help="CI configuration: avg_pool2d, sm_80, 2 Triton specs, avg_pool2d.cu")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float,
                        help="seconds allowed for the Triton compilations (default: no limit)")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.archs.split(",") if a)
    modules, sources, max_specs = args.modules, args.sources, args.max_specs
    if args.tiny:
        from pyvit_ops.testing.host import csrc_dir

        archs, modules, max_specs = (80,), ["avg_pool2d"], 2
        sources = [os.path.join(csrc_dir(), "avg_pool2d.cu")]
    start = time.perf_counter()
    records = triton_records(modules, archs, max_specs, args.jobs, args.timeout)
    if not args.no_cuda:
        try:
            records += cuda_records(archs, sources)
        except Exception as exc:  # no nvcc, or a file that does not compile: say so
            records.append({"kernel": "csrc/*.cu", "backend": "cuda",
                            "error": f"{type(exc).__name__}: {exc}"[:4000]})
    if args.modules or args.sources or args.no_cuda or args.max_specs:  # a partial run
        records = merge_partial(args.json, records, whole=not max_specs)
    lines = targets.static_lines(records)
    harness.write_records(args.json, records, lines)
    print(format_table(records))
    print("\n".join(lines))
    print(f"{len(records)} records in {time.perf_counter() - start:.0f} s -> {args.json}")
    return 0


def merge_partial(path, records, whole):
    """A partial run's ``records`` merged into the JSON at ``path``. With ``whole`` (every
    spec of each module / source compiled), a unit's new records replace all its old ones
    for that arch: a config whose constexprs changed would otherwise leave a stale record."""
    full = {_unit(r) for r in records} if whole else set()
    return harness.merge_records(path, records, ("backend", "kernel", "arch", "config"),
                                 replaces=lambda r: _unit(r) in full)


def _unit(record):
    """(backend, Triton module or CUDA source, arch): what one partial run compiles whole."""
    return (record.get("backend"), record.get("module") or record.get("source"),
            record.get("arch"))


def format_table(records):
    head = (f"{'backend':<7} {'arch':<7} {'regs':>4} {'smem':>7} {'spill':>7} {'tc':>5}  "
            "kernel [config]")
    lines = [head, "-" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"{r['backend']:<7} {str(r.get('arch', '-')):<7} ERROR "
                         f"{r['kernel']}: {r['error'].splitlines()[0][:140]}")
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        tc = "?" if r.get("tensor_core_instructions") is None else r["tensor_core_instructions"]
        config = r["config"] if r["backend"] == "triton" else ""
        lines.append(f"{r['backend']:<7} {r['arch']:<7} {r['registers']:>4} {r['shared_bytes']:>7} "
                     f"{spill:>7} {tc:>5}  {r['kernel']} {config}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
