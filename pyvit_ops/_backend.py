"""Backend choice for every operator.

Each operator passes a ``reasons(backend) -> list[str]`` function; an empty list
means the backend can run this call. Forcing a backend that cannot run raises
with every reason; automatic choice walks ``PRIORITY`` (the automatic orders declared
in ``pyvit_ops.capabilities``) and falls back to the reference, which runs everywhere.
"""
import logging
import os

import torch

from pyvit_ops import capabilities

BACKENDS = capabilities.BACKENDS
ENV_VAR = "PYVIT_OPS_BACKEND"

# Automatic order on CUDA tensors, per operator.
PRIORITY = {op: capabilities.automatic_order(op) for op in capabilities.OPERATOR_NAMES}

log = logging.getLogger("pyvit_ops")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the call; the message lists every reason."""


def requested_backend(backend):
    """The backend asked for by argument, else by PYVIT_OPS_BACKEND, else None."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    return backend


def choose(op, backend, reasons, device, order=None):
    """Return the backend that runs ``op`` for this call; ``order`` replaces
    ``PRIORITY[op]`` for an automatic choice (an operator's per-call preference)."""
    backend = requested_backend(backend)
    if backend is not None:
        why = reasons(backend)
        if why:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} cannot run this call: " + "; ".join(why))
        return backend
    if torch.device(device).type != "cuda":
        return "reference"
    for candidate in order or PRIORITY[op]:
        why = reasons(candidate)
        if not why:
            return candidate
        if not torch.compiler.is_compiling():  # a logging call breaks a fullgraph trace
            log.debug("%s: skipping backend %r: %s", op, candidate, "; ".join(why))
    return "reference"


# Autocast casts these (as torch's own autocast: float64 and integer / bool tensors pass).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(t):
    """The low-precision dtype autocast asks for on ``t``'s device type, or None when
    autocast is off there (or ``t`` is not a tensor: validation reports that)."""
    if not isinstance(t, torch.Tensor):
        return None
    device_type = t.device.type
    if not torch.amp.is_autocast_available(device_type) or \
            not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(t, dtype, *, keep_float32=False):
    """``t`` cast to autocast's ``dtype`` if it is an eligible float tensor.

    ``keep_float32``: a float32 parameter (bias table, pads, ghost filters, a float32
    attention bias) stays float32, the operators read it as is, so it remains the fp32
    master and its gradient comes back in float32 without a low-precision copy.
    """
    if not isinstance(t, torch.Tensor) or t.dtype not in _AUTOCAST_ELIGIBLE:
        return t
    if keep_float32 and t.dtype == torch.float32:
        return t
    return t.to(dtype)


def autocast_disabled(t):
    """Context in which the operator runs after its inputs were cast: the reference's
    float32 math (and anything else inside) must not be autocast again."""
    return torch.autocast(t.device.type, enabled=False)


def interpreter_enabled():
    """True when ``TRITON_INTERPRET`` is set: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_import_error():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton ships with CUDA torch
        return f"triton is not importable ({exc})"
    return None


def common_reasons(backend, op, tensors):
    """Reasons shared by every operator: devices, interpreter, extension."""
    tensors = [t for t in tensors if t is not None]
    devices = {t.device.type for t in tensors}
    if backend == "reference":
        return []
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    reasons = capabilities.dtype_reasons(op, backend, tensors)
    if backend == "triton":
        err = _triton_import_error()
        if err:
            reasons.append(err)
        # The interpreter runs CPU tensors; nothing runs meta or other devices.
        foreign = devices - ({"cuda", "cpu"} if interpreter_enabled() else {"cuda"})
        if foreign:
            reasons.append(f"tensors on {sorted(foreign)}: Triton kernels need CUDA tensors "
                           "(or CPU tensors with TRITON_INTERPRET=1 for the interpreter)")
        # The kernels are compiled and checked for sm_80 and newer (bf16 / tf32 dots;
        # on sm_75 some configs exceed its 64 KB of shared memory per block).
        oldest = capabilities.capability(op, backend).min_compute_capability
        for device in dict.fromkeys(t.device for t in tensors if t.device.type == "cuda"):
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < oldest:
                reasons.append(f"{device}: expected compute capability >= "
                               f"{oldest[0]}.{oldest[1]} for the Triton kernels, got "
                               f"{major}.{minor}")
        return reasons
    from pyvit_ops import _ext

    # The tensors' own devices (with their index): the architecture check must ask
    # about the GPU the kernels run on, not the current one.
    for device in dict.fromkeys(t.device for t in tensors):
        ok, why = _ext.has_op(f"{op}_fwd", device)
        if not ok:
            reasons.append(why)
    return reasons
