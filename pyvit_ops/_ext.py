"""The CUDA C++ kernels (``csrc/``) as torch ops, when they are available.

Two builds of the same kernel source register the same schemas:

- ``pyvit_ops._C`` (setup.py, nvcc): ``torch.ops.pyvit_ops_cuda``, CUDA tensors;
- the host-emulation build (``pyvit_ops.testing.host.load()``, g++, tests only):
  ``torch.ops.pyvit_ops_host``, CPU tensors.

Importing this module never fails: without the extension ``HAS_CUDA_EXT`` is False and
``CUDA_EXT_ERROR`` says why, and the dispatcher reads ``has_op`` to skip the backend.
"""
import torch

from pyvit_ops import capabilities

CUDA_NAMESPACE = "pyvit_ops_cuda"
HOST_NAMESPACE = "pyvit_ops_host"

try:
    from pyvit_ops import _C  # noqa: F401  (loading the library registers the ops)
except (ImportError, OSError) as exc:  # not built, or built against another torch
    HAS_CUDA_EXT = False
    CUDA_EXT_ERROR = f"CUDA extension not built: {exc}"
else:
    HAS_CUDA_EXT = True
    CUDA_EXT_ERROR = None


def _namespace(name):
    return getattr(torch.ops, name)


def _has(namespace, op):
    # torch.ops namespaces resolve ops lazily: a missing op raises AttributeError.
    try:
        getattr(_namespace(namespace), op)
    except (AttributeError, RuntimeError):
        return False
    return True


# Limits the kernels are compiled with, exported by each build as ``<name>() -> int``
# ops. The backend reasons read the declared values (pyvit_ops.capabilities); a build
# whose limits differ from them (compiled from other sources) does not run, so that
# the reasons and the C++ checks cannot disagree.
LIMIT_OPS = tuple(capabilities.exported_limits())
_LIMITS = {}
_LIMITS_MISMATCH = {}


def read_limits(namespace):
    """Read ``namespace``'s compiled limits once, when its library loads (an op call
    inside torch.compile's tracing, where backend reasons run, would not trace), and
    note any that differ from the declared ones."""
    ops = _namespace(namespace)
    _LIMITS[namespace] = {name: int(getattr(ops, name)()) for name in LIMIT_OPS
                          if _has(namespace, name)}
    declared = capabilities.exported_limits()
    wrong = [f"{name}: built {_LIMITS[namespace].get(name, 'missing')}, declared {value}"
             for name, value in declared.items() if _LIMITS[namespace].get(name) != value]
    _LIMITS_MISMATCH[namespace] = "; ".join(wrong)


def limits(namespace):
    """``{name: value}`` of the limits the build ``namespace`` exported when it loaded."""
    return dict(_LIMITS[namespace])


def limits_reason(namespace):
    """Why the build ``namespace`` does not run: it was compiled with other limits than
    the declared ones ("" if not, or if it is not loaded)."""
    wrong = _LIMITS_MISMATCH.get(namespace)
    if not wrong:
        return ""
    build = "CUDA extension" if namespace == CUDA_NAMESPACE else "host-emulation build"
    return (f"the {build} was compiled with other limits than pyvit_ops.capabilities "
            f"declares ({wrong}); rebuild it")


def host_loaded():
    """True once the host-emulation build is loaded into this process."""
    return _has(HOST_NAMESPACE, "built_archs")


def built_archs():
    """SM architectures of the CUDA extension, e.g. ``("80", "90")``; ``()`` if not built."""
    if not HAS_CUDA_EXT:
        return ()
    return tuple(torch.ops.pyvit_ops_cuda.built_archs().split(","))


def _arch_reason(device):
    """Why the extension's cubins cannot run on ``device`` ("" if they can).

    Only SASS is shipped: a cubin for sm_XY runs on sm_XZ with Z >= Y (same major).
    """
    major, minor = torch.cuda.get_device_capability(device)
    archs = built_archs()
    if any(int(a) // 10 == major and int(a) % 10 <= minor for a in archs):
        return ""
    return (f"the CUDA extension was built for sm_{', sm_'.join(archs)}, which cannot run on "
            f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}); rebuild with that "
            "architecture")


def has_op(name, device):
    """``(True, "")`` if the cuda backend's op ``name`` can run on ``device``, else
    ``(False, reason)``. ``device``: a torch.device or a string such as "cuda", "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        if not HAS_CUDA_EXT:
            return False, CUDA_EXT_ERROR
        if not _has(CUDA_NAMESPACE, name):
            return False, (f"the CUDA extension has no op {name!r}; rebuild it "
                           "(python setup.py build_ext --inplace)")
        stale = limits_reason(CUDA_NAMESPACE)
        if stale:
            return False, stale
        if torch.cuda.is_available():
            reason = _arch_reason(device)
            if reason:
                return False, reason
        return True, ""
    if device.type == "cpu":
        if not host_loaded():
            return False, ("CPU tensors run the CUDA kernels only under the host-emulation "
                           "test harness (pyvit_ops.testing.host.load()), which is not loaded")
        if not _has(HOST_NAMESPACE, name):
            return False, f"the host-emulation build has no op {name!r}"
        stale = limits_reason(HOST_NAMESPACE)
        if stale:
            return False, stale
        return True, ""
    return False, f"the cuda backend does not run on {device.type} tensors"


def lib(tensor):
    """The torch.ops namespace with the CUDA kernels for ``tensor``'s device."""
    device = tensor.device
    if device.type == "cuda":
        if not HAS_CUDA_EXT:
            raise RuntimeError(CUDA_EXT_ERROR)
        return _namespace(CUDA_NAMESPACE)
    if device.type == "cpu":
        if not host_loaded():
            raise RuntimeError(
                "CPU tensors run the CUDA kernels only under the host-emulation test harness: "
                "call pyvit_ops.testing.host.load() first (tests do)")
        return _namespace(HOST_NAMESPACE)
    raise RuntimeError(f"the cuda backend does not run on {device.type} tensors")


if HAS_CUDA_EXT:
    read_limits(CUDA_NAMESPACE)
