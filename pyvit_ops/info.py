"""``python -m pyvit_ops.info [--json]``: versions, the CUDA extension, and per
operator which backends can run on this machine (and why not)."""
import argparse
import json
import platform
import shutil
import subprocess

import torch

from pyvit_ops import _backend, _ext, __version__

OPERATORS = tuple(_backend.PRIORITY)


def _cuda_toolkit():
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if shutil.os.path.exists(
        "/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out else nvcc


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception as exc:  # pragma: no cover
        return f"not importable ({exc})"


def collect():
    """Everything ``main`` prints, as a JSON-ready dict: versions, the CUDA extension
    (built, archs, or why not) and, per operator, ``{backend: {"available", "reason"}}``
    for a tensor on this machine's device (the GPU if there is one, else the CPU) plus
    the automatic order on CUDA. Only the reasons that do not depend on a call's
    shapes are probed (device, float64, extension); head-dim or window limits show up
    per call."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(1, device=device)
    operators = {}
    for op in OPERATORS:
        entry = {}
        for backend in _backend.BACKENDS:
            reasons = _backend.common_reasons(backend, op, [probe])
            if backend != "reference" and device == "cpu":
                reasons = reasons or ["CPU tensors run on the reference backend automatically"]
            entry[backend] = {"available": not reasons, "reason": "; ".join(reasons) or "ok"}
        entry["automatic_order_on_cuda"] = list(_backend.PRIORITY[op])
        operators[op] = entry
    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_toolkit": _cuda_toolkit(),
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_extension": {"built": _ext.HAS_CUDA_EXT, "archs": _ext.built_archs(),
                           "reason": "ok" if _ext.HAS_CUDA_EXT else _ext.CUDA_EXT_ERROR},
        "operators": operators,
    }


def main(argv=None):
    """Print ``collect()`` as text, or as one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(prog="python -m pyvit_ops.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    info = collect()
    if parser.parse_args(argv).json:
        print(json.dumps(info, indent=2))
        return
    for key in ("version", "python", "torch", "triton", "cuda_toolkit", "torch_cuda", "gpu"):
        print(f"{key:14s} {info[key]}")
    ext = info["cuda_extension"]
    print(f"{'cuda_extension':14s} built={ext['built']} archs={ext['archs']} ({ext['reason']})")
    for op, entry in info["operators"].items():
        print(f"\n{op}  (automatic order on CUDA: {', '.join(entry['automatic_order_on_cuda'])})")
        for backend in _backend.BACKENDS:
            e = entry[backend]
            print(f"  {backend:10s} {'yes' if e['available'] else 'no ':3s}  {e['reason']}")


if __name__ == "__main__":
    main()
