"""The CUDA C++ kernels (``csrc/``) as torch ops, when they are available.

Two builds of the same kernel source register the same schemas:

- ``pyvit_ops._C`` (setup.py, nvcc): ``torch.ops.pyvit_ops_cuda``, CUDA tensors;
- the host-emulation build (``pyvit_ops.testing.host.load()``, g++, tests only):
  ``torch.ops.pyvit_ops_host``, CPU tensors.

Importing this module never fails: without the extension ``HAS_CUDA_EXT`` is False and
``CUDA_EXT_ERROR`` says why, and the dispatcher reads ``has_op`` to skip the backend.
"""
import torch

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
# ops, so that Python's backend reasons and the C++ checks cannot disagree.
LIMIT_OPS = ("avg_pool2d_image_limit",)
_LIMITS = {}


def read_limits(namespace):
    """Read ``namespace``'s compiled limits once, when its library loads: an op call
    inside torch.compile's tracing (where backend reasons run) would not trace."""
    ops = _namespace(namespace)
    _LIMITS[namespace] = {name: int(getattr(ops, name)()) for name in LIMIT_OPS
                          if _has(namespace, name)}


def limit(tensor, name):
    """The compiled limit ``name`` of the build that runs ``tensor``'s device."""
    namespace = CUDA_NAMESPACE if tensor.device.type == "cuda" else HOST_NAMESPACE
    return _LIMITS[namespace][name]


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
