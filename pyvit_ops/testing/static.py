"""Static compile report for the Triton kernels, for real GPUs, without one.

Every ``pyvit_ops.kernels.<op>`` module lists the (kernel, config, dtype) combinations
its launchers can pick in ``static_compile_specs()``; each spec is a dict::

    {"name": str, "fn": jit_fn, "signature": {arg: "*fp16" | "i32" | "constexpr" ...},
     "constexprs": {arg: value}, "num_warps": int, "num_stages": int,
     # optional:
     "uses_dot": bool,            # the kernel has a tl.dot: expect tensor-core instructions
     "dtype": str,                # label for the report (default: the pointer element types)
     "divisible_by_16": [arg],    # integer args the launcher guarantees to be multiples of 16
     "archs": [80, 90]}           # only these targets (default: every arch of the report)

A tuple argument (e.g. a tensor's strides, launched as ``x.stride()``) has a tuple of
element types as its signature entry, nested for nested tuples. An element the JIT
specialises to a constant (a unit stride becomes the constexpr 1) is given as that value
instead of a type; ``divisible_by_16`` names an element by its path::

    "signature": {"stride_x": ("i32", "i32", "i32", 1), ...},
    "divisible_by_16": [("stride_x", 0), ("stride_x", 1)]

``compile_triton(spec, arch)`` compiles one spec for sm_80 (A100) or sm_90a (H100) and
reads the cubin with the CUDA tools shipped beside Triton: registers, shared memory,
stack, spills (``STL``/``LDL`` in the SASS), tensor-core instructions (``HMMA``, and
``HGMMA`` = wgmma on sm_90a) and the theoretical occupancy.

Compiling needs the real ``triton.jit`` function, but the test suite runs with the
interpreter (``TRITON_INTERPRET=1``), which replaces every kernel by an interpreted one
at decoration time. ``report_all()`` therefore compiles in a fresh subprocess without
``TRITON_INTERPRET``::

    python -m pyvit_ops.testing.static [--json FILE] [--archs 80,90] [--modules OP|FILE.py ...]
"""
import argparse
import concurrent.futures
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import pkgutil
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ARCHS = (80, 90)
KERNELS_PACKAGE = "pyvit_ops.kernels"
# Where each kernels module's specs live: pyvit_ops.testing.specs.<op>.
SPECS_PACKAGE = "pyvit_ops.testing.specs"


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources that bound how many CTAs of a kernel are resident at once."""

    gpu: str
    target: str
    shared_per_sm: int
    shared_per_block: int          # largest opt-in dynamic allocation of one CTA
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reserved_shared_per_block: int = 1024   # the driver keeps 1 KB of every CTA's share (sm_80+)
    shared_granularity: int = 128
    reg_alloc_unit: int = 256               # registers are handed to a warp in units of 256
    sub_partitions: int = 4                 # the register file is split over 4 schedulers


SM_LIMITS = {
    80: SMLimits("A100", "sm_80", shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
    90: SMLimits("H100", "sm_90a", shared_per_sm=228 * 1024, shared_per_block=227 * 1024),
}


def _ceil_to(value, unit):
    return -(-value // unit) * unit


def occupancy(registers, shared_bytes, num_warps, arch):
    """Theoretical resident warps per SM and the resource that limits them.

    Follows the CUDA occupancy calculator: registers are allocated per warp in units
    of 256 within each of the 4 scheduler partitions; every CTA also costs 1 KB of
    reserved shared memory. Returns ``(warps, limit)``; ``warps == 0`` means one CTA
    does not fit on an SM at all (it would fail to launch).
    """
    sm = _limits(arch)
    if num_warps < 1:
        raise ValueError(f"num_warps must be >= 1, got {num_warps}")
    block_shared = _ceil_to(shared_bytes + sm.reserved_shared_per_block, sm.shared_granularity)
    if shared_bytes > sm.shared_per_block:
        return 0, "shared memory per CTA"
    regs_per_warp = _ceil_to(max(registers, 1) * 32, sm.reg_alloc_unit)
    warps_by_regs = (sm.regs_per_sm // sm.sub_partitions // regs_per_warp) * sm.sub_partitions
    blocks = {
        "registers": warps_by_regs // num_warps,
        "shared memory": sm.shared_per_sm // block_shared,
        "warps": sm.max_warps // num_warps,
        "blocks": sm.max_blocks,
    }
    limit = min(blocks, key=blocks.get)
    return blocks[limit] * num_warps, limit


def _limits(arch):
    if arch not in SM_LIMITS:
        raise ValueError(f"arch must be one of {sorted(SM_LIMITS)}, got {arch!r}")
    return SM_LIMITS[arch]


def _tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found beside Triton at {path}")
    return path


def _jit_function(fn, name):
    # Autotuner / Heuristics wrap the JITFunction in .fn; the interpreter's
    # InterpretedFunction has no compilable form at all.
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"spec {name!r}: 'fn' must be a triton.jit function, got {type(fn).__name__}; "
            "under TRITON_INTERPRET=1 kernels are interpreted and cannot be compiled, "
            "use report_all(), which compiles in a subprocess without the interpreter")
    return fn


def _source(spec):
    """ASTSource arguments for a spec, with the specialisation the JIT would apply; also
    ``{path: type}`` of every argument and tuple element (path ``(arg, index, ...)``) and
    the constexprs by readable name (``stride_x[3]`` for a tuple element)."""
    from triton.compiler import ASTSource

    name = spec.get("name", "?")
    for key in ("name", "fn", "signature", "num_warps", "num_stages"):
        if key not in spec:
            raise ValueError(f"spec {name!r} lacks the required key {key!r}")
    fn = _jit_function(spec["fn"], name)
    signature = dict(spec["signature"])
    constexprs = dict(spec.get("constexprs", {}))
    signature.update({arg: "constexpr" for arg in constexprs})
    for param in fn.params:
        # A constexpr parameter with a default may be left out, as at a launch.
        if param.name not in signature and param.is_constexpr and param.has_default:
            signature[param.name] = "constexpr"
            constexprs.setdefault(param.name, param.default)
    missing = [a for a in fn.arg_names if a not in signature]
    extra = [a for a in signature if a not in fn.arg_names]
    if missing or extra:
        raise ValueError(f"spec {name!r}: signature must name every argument of {fn.__name__}; "
                         f"missing {missing}, unknown {extra}")
    unset = [a for a, t in signature.items() if t == "constexpr" and a not in constexprs]
    if unset:
        raise ValueError(f"spec {name!r}: constexpr arguments {unset} have no value "
                         "in 'constexprs'")
    types = {(arg, *path): leaf for arg, entry in signature.items()
             for path, leaf in _elements(entry)}
    # Tuple elements given as values: constexprs, which Triton keys by their index path.
    constants = {path: value for path, value in types.items() if not isinstance(value, str)}
    types.update({path: "constexpr" for path in constants})
    signature = {arg: _with_constexprs(entry) for arg, entry in signature.items()}
    # Torch allocations are 16-byte aligned and the JIT specialises on that; without the
    # hint the compiler cannot vectorise loads and the figures would not be the real ones.
    aligned = [path for path, t in types.items() if t.startswith("*")]
    divisible = [(a,) if isinstance(a, str) else tuple(a)
                 for a in spec.get("divisible_by_16", ())]
    wrong = [a for a in divisible if types.get(a) not in ("i32", "i64")]
    if wrong:
        raise ValueError(f"spec {name!r}: divisible_by_16 must name i32/i64 arguments, got {wrong}")
    aligned += divisible
    attrs = {_triton_path(fn, p): [["tt.divisibility", 16]] for p in aligned}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs, constexprs={
        **constexprs, **{_triton_path(fn, p): v for p, v in constants.items()}})
    constexprs.update({p[0] + "".join(f"[{i}]" for i in p[1:]): v for p, v in constants.items()})
    return src, types, constexprs


def _elements(entry, path=()):
    """(index path, type or constant) of each element of a signature entry, nested
    tuples flattened; ``((), entry)`` for a plain argument."""
    if not isinstance(entry, tuple):
        return [(path, entry)]
    return [e for i, item in enumerate(entry) for e in _elements(item, path + (i,))]


def _with_constexprs(entry):
    """A signature entry as Triton takes it: tuple elements given as values are
    "constexpr"."""
    if isinstance(entry, tuple):
        return tuple(_with_constexprs(item) for item in entry)
    return entry if isinstance(entry, str) else "constexpr"


def _triton_path(fn, path):
    """``(arg, index, ...)`` as Triton keys an argument or tuple element."""
    return (fn.arg_names.index(path[0]), *path[1:])


def _dtype_label(spec, types):
    if "dtype" in spec:
        return str(spec["dtype"])
    return "+".join(sorted({t[1:] for t in types.values() if t.startswith("*")})) or "none"


def config_string(spec):
    """Human-readable configuration: constexprs, num_warps, num_stages, dtype."""
    _, types, constexprs = _source(spec)
    return _config(spec, types, constexprs)


def _config(spec, types, constexprs):
    parts = [f"{k}={v}" for k, v in constexprs.items()]
    parts += [f"num_warps={spec['num_warps']}", f"num_stages={spec['num_stages']}",
              f"dtype={_dtype_label(spec, types)}"]
    return ",".join(parts)


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# "/*0a30*/  @!P0 HMMA.16816.F32 R4, ..." -> opcode "HMMA"
_SASS_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)", re.M)
_SASS_TARGET = re.compile(r"code for (sm_\w+)")


# Bump when the parsing below changes, so cached results are not reused.
_CUBIN_INFO_VERSION = 1


def read_cubin(cubin):
    """Registers, stack, static shared / local memory and SASS opcode counts of a cubin.

    Disassembly dominates a compile whose cubin Triton already has in its cache
    (~0.25 s CPU each), so results are cached beside Triton's cache, keyed by the
    cubin's hash.
    """
    import triton

    digest = hashlib.sha256(cubin).hexdigest()
    cache = os.path.join(triton.knobs.cache.dir, "pyvit_ops_cubin_info",
                         f"v{_CUBIN_INFO_VERSION}-{digest}.json")
    try:
        with open(cache) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    info = _disassemble(cubin)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, cache)   # atomic: concurrent workers never read a partial file
    return info


def _disassemble(cubin):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        listing = _run_tool("cuobjdump", "-res-usage", "-sass", path)
    match = _RES_USAGE.search(listing)
    if match is None:
        raise RuntimeError(f"cannot read resource usage from cuobjdump output:\n{listing[:2000]}")
    opcodes = {}
    for op in _SASS_OPCODE.findall(listing):
        opcodes[op] = opcodes.get(op, 0) + 1
    target = _SASS_TARGET.search(listing)
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "stack_bytes": stack, "shared_static": shared,
            "local_bytes": local, "sass_target": target.group(1) if target else None,
            "opcodes": opcodes}


def _run_tool(name, *args):
    proc = subprocess.run([_tool(name), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def compile_triton(spec, arch):
    """Compile one spec for ``arch`` (80 → sm_80, 90 → sm_90a) and describe the binary.

    Needs the real jit function (no ``TRITON_INTERPRET``); see ``report_all``.
    Returns a dict with kernel, backend, arch, target, config, registers, stack_bytes,
    local_bytes, shared_bytes (dynamic + static per CTA), spill_stores, spill_loads
    (``STL``/``LDL`` instructions), hmma, hgmma, tensor_core_instructions,
    occupancy_warps (resident warps per SM) and occupancy_limit.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    sm = _limits(arch)
    src, types, constexprs = _source(spec)
    options = {"num_warps": int(spec["num_warps"]), "num_stages": int(spec["num_stages"])}
    if "maxnreg" in spec:  # a launcher's register cap changes what ptxas allocates
        options["maxnreg"] = int(spec["maxnreg"])
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    binary = read_cubin(kernel.asm["cubin"])
    ops = binary["opcodes"]
    shared = kernel.metadata.shared + binary["shared_static"]
    warps, limit = occupancy(binary["registers"], shared, options["num_warps"], arch)
    return {
        "kernel": spec["name"],
        "backend": "triton",
        "arch": arch,
        "target": binary["sass_target"],
        "gpu": sm.gpu,
        "config": _config(spec, types, constexprs),
        "dtype": _dtype_label(spec, types),
        "num_warps": options["num_warps"],
        "num_stages": options["num_stages"],
        "uses_dot": bool(spec.get("uses_dot", False)),
        "registers": binary["registers"],
        "stack_bytes": binary["stack_bytes"],
        "local_bytes": binary["local_bytes"],
        "shared_bytes": shared,
        "spill_stores": ops.get("STL", 0),
        "spill_loads": ops.get("LDL", 0),
        "hmma": ops.get("HMMA", 0),
        "hgmma": ops.get("HGMMA", 0),
        "tensor_core_instructions": ops.get("HMMA", 0) + ops.get("HGMMA", 0),
        "sass_instructions": sum(ops.values()),
        "occupancy_warps": warps,
        "occupancy_limit": limit,
    }


# --------------------------------------------------------------------------- report


def discover_modules():
    """Names of the kernel modules (``pyvit_ops.kernels.<op>``), private ones excluded."""
    package = importlib.import_module(KERNELS_PACKAGE)
    return sorted(f"{KERNELS_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
                  if not m.name.startswith("_"))


def _module_name(ref):
    if ref.endswith(".py") or "." in ref:
        return ref
    return f"{KERNELS_PACKAGE}.{ref}"


_MODULES = {}


def _import(ref):
    """Import a module by dotted name or by .py file path (used for test kernels)."""
    if ref not in _MODULES:
        if ref.endswith(".py"):
            name = "_static_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(ref))[0])
            spec = importlib.util.spec_from_file_location(name, ref)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module   # triton reads the kernel source through the module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(ref)
        _MODULES[ref] = module
    return _MODULES[ref]


_SPECS = {}


def _spec_module(ref):
    """The module whose ``static_compile_specs()`` lists ``ref``'s configs: the
    operator's ``pyvit_ops.testing.specs.<op>`` for a kernels module, else ``ref`` (a
    .py file of tests)."""
    if ref.startswith(KERNELS_PACKAGE + "."):
        return _import(f"{SPECS_PACKAGE}.{ref.rsplit('.', 1)[1]}")
    return _import(ref)


def has_specs(ref):
    """True when ``ref`` (an op name, kernels module or .py file) has static specs."""
    return hasattr(_spec_module(_module_name(ref)), "static_compile_specs")


def specs_of(ref):
    """The static compile specs of ``ref`` (an op name, kernels module or .py file)."""
    return _specs(_module_name(ref))


def _specs(ref):
    if ref not in _SPECS:
        module = _spec_module(ref)
        if not hasattr(module, "static_compile_specs"):
            raise AttributeError(f"{ref} defines no static_compile_specs()")
        _SPECS[ref] = list(module.static_compile_specs())
    return _SPECS[ref]


def _error(exc):
    return f"{type(exc).__name__}: {exc}"[:4000]


def _compile_task(ref, index, name, arch):
    """One (module, spec, arch) compilation; failures become records with "error"."""
    record = {"module": ref, "kernel": name, "backend": "triton", "arch": arch}
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        specs = _specs(ref)
        if index >= len(specs) or specs[index].get("name", f"{ref}[{index}]") != name:
            raise RuntimeError(f"{ref} changed while the report ran "
                               f"(spec {index} is no longer {name!r})")
        spec = specs[index]
        record["uses_dot"] = bool(spec.get("uses_dot", False))
        record["config"] = config_string(spec)
        record.update(compile_triton(spec, arch))
    except Exception as exc:  # any failure is reported per spec, never aborts the report
        record["error"] = _error(exc)
    record["compile_seconds"] = round(time.perf_counter() - start, 3)
    record["compile_cpu_seconds"] = round(_cpu_seconds() - cpu_start, 3)
    return record


def _cpu_seconds():
    # Wall time means little on a shared machine; CPU time of this process plus the
    # ptxas / cuobjdump children it waited for is what a compile costs.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _kernel_name(spec):
    fn = spec["fn"]
    return getattr(getattr(fn, "fn", fn), "__name__", spec.get("name", "?"))


def _pressure(spec):
    """Tile elements per thread (the product of the BLOCK_* constexprs over the
    threads), the figure that decides a config's registers; fp32 breaks ties (its
    tiles take the most registers)."""
    elements = 1
    for key, value in spec.get("constexprs", {}).items():
        if key.startswith("BLOCK") and isinstance(value, int) and not isinstance(value, bool):
            elements *= value
    fp32 = "fp32" in str(spec.get("dtype", "")) or any(
        t == "*fp32" for t in spec.get("signature", {}).values())
    return elements / spec["num_warps"], fp32


def representative(specs):
    """Indices of one spec per kernel function: its highest register pressure."""
    best = {}
    for i, spec in enumerate(specs):
        name = _kernel_name(spec)
        if name not in best or _pressure(spec) > _pressure(specs[best[name]]):
            best[name] = i
    return sorted(best.values())


def run_report(modules=None, archs=ARCHS, jobs=2, representative_only=False):
    """Compile every spec of ``modules`` for every arch in this process's pool.

    ``modules=None`` discovers the ``pyvit_ops.kernels`` modules that define
    ``static_compile_specs``. ``representative_only``: one spec per kernel function
    (``representative``), the quick check CI runs; the full sweep is the static
    report's. Must run without ``TRITON_INTERPRET``.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run_report needs real jit functions; unset TRITON_INTERPRET "
                           "or call report_all(), which starts a clean subprocess")
    for arch in archs:
        _limits(arch)
    records, tasks = [], []
    if modules is None:
        refs = []
        for name in discover_modules():
            try:
                if has_specs(name):
                    refs.append(name)
            except Exception as exc:  # a kernel module that does not import is a failure
                records.append({"module": name, "kernel": name, "backend": "triton",
                                "error": _error(exc)})
    else:
        refs = [_module_name(m) for m in modules]
    for ref in refs:
        try:
            specs = _specs(ref)
        except Exception as exc:
            records.append({"module": ref, "kernel": ref, "backend": "triton",
                            "error": _error(exc)})
            continue
        # A spec may name the archs it is meant for (a launcher picking e.g. its
        # pipeline depth per arch); it is compiled only for those.
        chosen = representative(specs) if representative_only else range(len(specs))
        tasks += [(ref, i, specs[i].get("name", f"{ref}[{i}]"), arch)
                  for i in chosen for arch in archs
                  if int(arch) in {int(a) for a in specs[i].get("archs", archs)}]
    if jobs <= 1 or len(tasks) <= 1:
        return records + [_compile_task(*t) for t in tasks]
    # spawn: workers import the kernel modules afresh instead of forking a process
    # that may hold LLVM / torch thread state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_compile_task, *t) for t in tasks]
        for task, future in zip(tasks, futures):
            try:
                records.append(future.result())
            except Exception as exc:  # e.g. a worker killed by a crash inside LLVM
                ref, _, name, arch = task
                records.append({"module": ref, "kernel": name, "backend": "triton",
                                "arch": arch, "error": _error(exc)})
    return records


def report_all(modules=None, archs=ARCHS, jobs=2, timeout=1800, representative_only=False):
    """Static compile records of every spec × arch, compiled in a clean subprocess.

    Safe to call under the interpreter (tests): the subprocess runs
    ``python -m pyvit_ops.testing.static`` with ``TRITON_INTERPRET`` removed.
    ``modules``: None (discover ``pyvit_ops.kernels``), or op names / dotted module
    names / paths of .py files defining ``static_compile_specs``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pyvit_ops.testing.static", "--json", out, "--quiet",
               "--archs", ",".join(str(a) for a in archs), "--jobs", str(jobs)]
        if modules is not None:
            cmd += ["--modules", *modules]
        if representative_only:
            cmd.append("--representative")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # Own session, so that a timeout or Ctrl-C also ends the pool workers it spawned.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"static compile subprocess failed (exit {proc.returncode}):\n"
                               f"{stderr[-6000:]}")
        with open(out) as f:
            return json.load(f)


def total_cpu_seconds(records):
    """CPU seconds the compile workers spent on ``records`` (compiler children included)."""
    return sum(r.get("compile_cpu_seconds", 0.0) for r in records)


def format_table(records):
    """Plain-text table of records, one line per (kernel, arch, config)."""
    head = f"{'kernel':<34} {'arch':<7} {'regs':>4} {'smem':>7} {'spill':>7} {'hmma':>5} " \
           f"{'hgmma':>5} {'occ':>3}  config"
    lines = [head, "-" * len(head)]
    for r in records:
        arch = SM_LIMITS[r["arch"]].target if r.get("arch") in SM_LIMITS else "-"
        if "error" in r:
            first = r["error"].splitlines()[0] if r["error"] else ""
            lines.append(f"{r['kernel']:<34} {arch:<7} ERROR {first[:160]}")
            continue
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"{r['kernel']:<34} {arch:<7} {r['registers']:>4} {r['shared_bytes']:>7} "
                     f"{spills:>7} {r['hmma']:>5} {r['hgmma']:>5} {r['occupancy_warps']:>3}  "
                     f"{r['config']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pyvit_ops.testing.static",
        description="Compile the Triton kernels for sm_80 / sm_90a and report registers, "
                    "shared memory, spills, tensor-core instructions and occupancy.")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--archs", default=",".join(str(a) for a in ARCHS),
                        help="comma-separated compute capabilities (default: 80,90)")
    parser.add_argument("--modules", nargs="*",
                        help="op names, dotted module names or .py files (default: all kernels)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile processes")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    parser.add_argument("--representative", action="store_true",
                        help="one config per kernel function (its highest register pressure)")
    args = parser.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.archs.split(",") if a)
    except ValueError:
        parser.error(f"--archs must be integers like 80,90, got {args.archs!r}")
    start = time.perf_counter()
    records = run_report(args.modules, archs, args.jobs, args.representative)
    elapsed = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if not args.quiet:
        print(format_table(records))
        print(f"{len(records)} records, {sum('error' in r for r in records)} errors, "
              f"{elapsed:.1f} s wall, {total_cpu_seconds(records):.0f} s CPU in compile workers")
    return 0


if __name__ == "__main__":
    # Run through the package module so pickled task functions resolve in the workers.
    from pyvit_ops.testing import static as _static

    sys.exit(_static.main())
