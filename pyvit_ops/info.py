"""``python -m pyvit_ops.info [--json | --markdown]``: versions, the CUDA extension, and
per operator and backend whether it can run on this machine (and why not) with what it
declares (``pyvit_ops.capabilities``: dtypes, limits, float32 arithmetic, architectures).
``--markdown`` prints the README's support matrix."""
import argparse
import json
import platform
import shutil
import subprocess

import torch

from pyvit_ops import _backend, _ext, __version__, capabilities

OPERATORS = capabilities.OPERATOR_NAMES


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
    (built, archs, its compiled limits, or why not) and, per operator, the automatic
    order on CUDA with its reason and ``{backend: {"available", "reason", ...}}`` for a
    tensor on this machine's device (the GPU if there is one, else the CPU), the rest of
    each backend's entry being its declaration (``Capability.as_dict``: dtypes,
    forward / backward, float32, architectures, limits, conditions). Only the reasons
    that do not depend on a call's shapes are probed (device, extension); the limits
    apply per call."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(1, device=device)
    operators = {}
    for op in OPERATORS:
        entry = {}
        for backend in capabilities.declared_backends(op):
            reasons = _backend.common_reasons(backend, op, [probe])
            if backend != "reference" and device == "cpu":
                reasons = reasons or ["CPU tensors run on the reference backend automatically"]
            entry[backend] = {"available": not reasons, "reason": "; ".join(reasons) or "ok",
                              **capabilities.capability(op, backend).as_dict()}
        entry["automatic_order_on_cuda"] = list(capabilities.automatic_order(op))
        entry["automatic_order_reason"] = capabilities.get_operator(op).order_reason
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
                           "limits": _ext.limits(_ext.CUDA_NAMESPACE) if _ext.HAS_CUDA_EXT
                           else {},
                           "reason": (_ext.limits_reason(_ext.CUDA_NAMESPACE) or "ok")
                           if _ext.HAS_CUDA_EXT else _ext.CUDA_EXT_ERROR},
        "operators": operators,
    }


def _yes(flag):
    return "yes" if flag else "no"


def main(argv=None):
    """Print ``collect()`` as text, or as one JSON object with ``--json``; ``--markdown``
    prints the support matrix instead."""
    parser = argparse.ArgumentParser(prog="python -m pyvit_ops.info", description=__doc__)
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object")
    output.add_argument("--markdown", action="store_true",
                        help="print the support matrix (README.md) and nothing else")
    args = parser.parse_args(argv)
    if args.markdown:
        print(capabilities.support_matrix_markdown(), end="")
        return
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key in ("version", "python", "torch", "triton", "cuda_toolkit", "torch_cuda", "gpu"):
        print(f"{key:14s} {info[key]}")
    ext = info["cuda_extension"]
    print(f"{'cuda_extension':14s} built={ext['built']} archs={ext['archs']} ({ext['reason']})")
    for op, entry in info["operators"].items():
        print(f"\n{op}  (automatic order on CUDA: {', '.join(entry['automatic_order_on_cuda'])})")
        for backend in capabilities.declared_backends(op):
            e = entry[backend]
            declared = capabilities.capability(op, backend)
            print(f"  {backend:10s} {'yes' if e['available'] else 'no ':3s}  {e['reason']}")
            print(f"{'':16s}dtypes {', '.join(e['dtypes'])}; forward {_yes(e['forward'])}, "
                  f"backward {_yes(e['backward'])}; float32: {e['float32']}; "
                  f"architectures: {e['architectures']}")
            for line in [limit.describe() for limit in declared.limits] + e["conditions"]:
                print(f"{'':16s}limit: {line}")


if __name__ == "__main__":
    main()
