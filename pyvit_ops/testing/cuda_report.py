"""Static compile report for the CUDA C++ kernels, for real GPUs, without one.

``ptxas_report()`` compiles every ``csrc/*.cu`` for each architecture with the flags of
the real build (pyvit_ops/_build_config.py) plus ``-Xptxas -v`` and parses what ptxas
says per kernel: registers, shared memory, stack, spill stores / loads (want 0). The .cu
files never include torch, so this takes seconds per file::

    python -m pyvit_ops.testing.cuda_report [--archs 80,90] [FILE.cu ...]
"""
import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import tempfile

from pyvit_ops import _build_config
from pyvit_ops.testing.host import csrc_dir

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_(?P<arch>\w+)'")
_FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                    r"(?P<loads>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


def nvcc_path():
    """nvcc of CUDA_HOME / CUDA_PATH, /usr/local/cuda or PATH; None if there is none."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def parse_ptxas(text, source=""):
    """Kernel records from ``-Xptxas -v`` output (non-kernel device functions skipped)."""
    records, current = [], None
    for line in text.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = {"kernel": entry["name"], "arch": entry["arch"], "source": source,
                       "registers": None, "shared_bytes": 0, "spill_stores": None,
                       "spill_loads": None, "stack": None}
            records.append(current)
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current.update(stack=int(frame["stack"]), spill_stores=int(frame["stores"]),
                           spill_loads=int(frame["loads"]))
        used = _USED.search(line)
        if used:
            current["registers"] = int(used["regs"])
            smem = _SMEM.search(line)
            if smem:
                current["shared_bytes"] = int(smem["smem"])
            current = None  # the "Used" line closes the kernel's block
    for record, name in zip(records, _demangle([r["kernel"] for r in records])):
        record["kernel"] = name
    return records


def _compile(nvcc, source, arch, include_dir):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", source, "-o", os.path.join(tmp, "out.o"), "-I", include_dir,
               *_build_config.NVCC_FLAGS, "-Xptxas", "-v",
               *_build_config.gencode_flags((arch,))]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source} (sm_{arch}):\n{result.stderr[-4000:]}")
    return parse_ptxas(result.stdout + result.stderr, source=os.path.basename(source))


def ptxas_report(archs=_build_config.ARCHS, sources=None, jobs=2):
    """One dict per (kernel, arch): kernel (demangled), arch, source, registers,
    shared_bytes (static), spill_stores, spill_loads, stack (bytes).

    ``sources`` defaults to every csrc/*.cu. Raises RuntimeError if nvcc is missing or a
    file does not compile.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME to a CUDA toolkit")
    csrc = csrc_dir()
    if sources is None:
        sources = sorted(glob.glob(os.path.join(csrc, "*.cu")))
    tasks = [(source, str(arch)) for source in sources for arch in archs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(lambda task: _compile(nvcc, task[0], task[1], csrc), tasks)
        return [record for records in results for record in records]


def format_table(records):
    header = f"{'arch':>4} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}  kernel"
    lines = [header]
    for r in records:
        lines.append(f"{r['arch']:>4} {r['registers']:>4} {r['shared_bytes']:>6} {r['stack']:>5} "
                     f"{r['spill_stores']:>5}/{r['spill_loads']:<5}  {r['kernel']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyvit_ops.testing.cuda_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(_build_config.ARCHS),
                        help="comma-separated SM architectures (default: %(default)s)")
    parser.add_argument("sources", nargs="*", help=".cu files (default: every csrc/*.cu)")
    args = parser.parse_args(argv)
    records = ptxas_report(archs=tuple(args.archs.split(",")), sources=args.sources or None)
    print(format_table(records))
    spilled = [r for r in records if r["spill_stores"] or r["spill_loads"]]
    if spilled:
        raise SystemExit(f"{len(spilled)} kernel(s) spill registers")


if __name__ == "__main__":
    main()
