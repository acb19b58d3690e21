"""Build the CUDA C++ kernels for the CPU under host emulation (tests only).

``load()`` compiles one translation unit with g++ (-std=c++20, no CUDA toolkit needed):
the binding files ``csrc/*.cpp`` and every ``csrc/*.cu`` with ``PYVIT_HOST_EMULATION`` defined, so
``csrc/host_emulation.h`` stands in for the CUDA runtime (blocks run one after another,
the threads of a block one at a time, in adversarial orders). The ops are registered as
``torch.ops.pyvit_ops_host`` with the schemas of ``torch.ops.pyvit_ops_cuda`` and run
the kernel source on CPU tensors, with statements added that let the emulation check
launch bounds and find static shared memory (``emulation_source``). Differences from the
GPU build: a launch covers at most ``MAX_LAUNCH_ELEMENTS`` elements, so that test-sized
tensors exercise the launchers' splitting of big work into several 32-bit-indexed
launches, and the constants a kernel file picks with ``pyvit_host::test_constant`` take
their small test values unless ``gpu_constants()`` is in effect.

The build is cached (ninja tracks the headers); ``PYVIT_OPS_HOST_BUILD_DIR`` chooses
where (default ``~/.cache/pyvit_ops``). ``PYVIT_HOST_EMULATION_TIMEOUT`` (seconds, default
120) bounds how long a launch may go without a thread reaching a sync point before it
fails as looping forever instead of hanging; ``PYVIT_HOST_EMULATION_SEED`` varies the
random thread orders; ``PYVIT_HOST_EMULATION_SMEM_KB`` (default 163) is the emulated
GPU's opt-in shared memory per block.
"""
import contextlib
import glob
import hashlib
import os
import re
import shutil
import threading

import torch

NAME = "pyvit_ops_host"
MAX_LAUNCH_ELEMENTS = 1024
_LOCK = threading.Lock()
_MARKED = re.compile(r"\b(__launch_bounds__\s*\(|__shared__\b)")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def csrc_dir():
    """The kernel sources: ``pyvit_ops/csrc`` when installed, ``csrc/`` in a checkout."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(package, "csrc"),
                      os.path.join(os.path.dirname(package), "csrc")):
        if os.path.isfile(os.path.join(candidate, "host_emulation.h")):
            return candidate
    raise RuntimeError(f"pyvit_ops kernel sources not found next to {package} "
                       "(expected csrc/host_emulation.h)")


def _build_dir(csrc):
    root = os.environ.get("PYVIT_OPS_HOST_BUILD_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "pyvit_ops")
    # One build per source tree and torch version: both change what is compiled.
    tag = hashlib.sha1(f"{csrc}|{torch.__version__}".encode()).hexdigest()[:10]
    path = os.path.join(root, f"host-{tag}")
    os.makedirs(path, exist_ok=True)
    return path


def _check_toolchain():
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"the host-emulation build needs a C++20 compiler (g++ >= 11): "
                           f"{compiler!r} not found; install g++ or set CXX")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("the host-emulation build needs ninja (pip install ninja)")


def _split(text, stop):
    """(top-level comma-separated parts of ``text`` up to the first top-level character in
    ``stop``, index just past that character); parentheses, brackets and, outside them,
    template angle brackets nest."""
    parts, start, depth, angle = [], 0, 0, 0
    for i, ch in enumerate(text):
        if depth == 0 and angle == 0 and ch in stop:
            return parts + [text[start:i]], i + 1
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and ch in "<>":
            angle += 1 if ch == "<" else -1
        elif depth == 0 and angle == 0 and ch == ",":
            parts.append(text[start:i])
            start = i + 1
    raise ValueError(f"no {stop!r} ends {text[:80]!r}")


def emulation_source(text):
    """CUDA source ``text`` with the statements that let the emulation check what the GPU
    checks (host_emulation.h), on the lines of the source so that line numbers stay:
    - ``PV_HOST_LAUNCH_BOUNDS(<bound>);`` at the start of the body of every kernel
      declared with ``__launch_bounds__(<bound>)``: the bound is an expression of the
      kernel's template parameters, so only the body can evaluate it;
    - ``PV_HOST_SHARED(<names>);`` after every ``__shared__`` declaration: the block's
      first thread to get there poisons the variables and counts their bytes (the
      compiler offers no way to find the static variables of a template instance)."""
    out, pos = [], 0
    for match in _MARKED.finditer(text):
        line_start = text.rfind("\n", 0, match.start()) + 1
        if match.start() < pos or "//" in text[line_start:match.start()]:
            continue
        rest = text[match.end():]
        if match.group(1) == "__shared__":
            declarators, length = _split(rest, ";")
            names = [_IDENTIFIER.findall(d.split("[")[0])[-1] for d in declarators]
            insert = f" PV_HOST_SHARED({', '.join(names)});"
        else:
            _, length = _split(rest, ")")
            insert = f" PV_HOST_LAUNCH_BOUNDS({rest[:length - 1]});"
            length = rest.index("{", length) + 1
        end = match.end() + length
        out += [text[pos:end], insert]
        pos = end
    return "".join(out) + text[pos:]


def _write_if_changed(path, text):
    # Rewriting an unchanged file would make ninja rebuild.
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def write_emulation_source(source, directory):
    """``emulation_source`` of the file ``source``, written to ``directory``; its path.
    Compiler messages name ``source``."""
    path = os.path.join(directory, os.path.basename(source))
    with open(source) as f:
        text = emulation_source(f.read())
    _write_if_changed(path, f'#line 1 "{os.path.abspath(source)}"\n{text}')
    return path


def _write_unit(csrc, build_dir):
    """The single translation unit: torch-facing bindings first (so torch's headers are
    parsed before the emulation's macros exist), then every kernel file."""
    def paths(pattern):
        return sorted(glob.glob(os.path.join(csrc, pattern)))

    kernels = os.path.join(build_dir, "kernels")
    os.makedirs(kernels, exist_ok=True)
    lines = ["// Generated by pyvit_ops.testing.host: the CUDA kernels under host emulation.",
             "#define PYVIT_HOST_EMULATION 1"]
    lines += [f'#include "{os.path.basename(p)}"' for p in paths("*.cpp")]
    lines += [f'#include "{write_emulation_source(p, kernels)}"' for p in paths("*.cu")]
    path = os.path.join(build_dir, f"{NAME}.cpp")
    _write_if_changed(path, "\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def gpu_constants():
    """Within the block, the kernels use the GPU build's values of the constants that the
    test build shrinks (``pyvit_host::test_constant``)."""
    saved = os.environ.get("PYVIT_HOST_EMULATION_GPU_CONSTANTS")
    os.environ["PYVIT_HOST_EMULATION_GPU_CONSTANTS"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PYVIT_HOST_EMULATION_GPU_CONSTANTS"]
        else:
            os.environ["PYVIT_HOST_EMULATION_GPU_CONSTANTS"] = saved


def load():
    """Build (first call) and load the host-emulation ops; returns ``torch.ops.pyvit_ops_host``.

    Idempotent and thread-safe. Raises RuntimeError when no C++ compiler or ninja is found.
    """
    from pyvit_ops import _ext

    with _LOCK:
        if not _ext.host_loaded():
            _check_toolchain()
            from torch.utils import cpp_extension

            csrc = csrc_dir()
            build_dir = _build_dir(csrc)
            cpp_extension.load(
                name=NAME,
                sources=[_write_unit(csrc, build_dir)],
                extra_cflags=["-O2", "-std=c++20", "-pthread",
                              f"-DPV_MAX_LAUNCH_ELEMENTS={MAX_LAUNCH_ELEMENTS}"],
                extra_ldflags=["-pthread"],
                extra_include_paths=[csrc],
                build_directory=build_dir,
                with_cuda=False,
                is_python_module=False,
                verbose=False,
            )
            _ext.read_limits(_ext.HOST_NAMESPACE)
    return torch.ops.pyvit_ops_host
