"""Backend choice for every operator.

Each operator passes a ``reasons(backend) -> list[str]`` function; an empty list
means the backend can run this call. Forcing a backend that cannot run raises
with every reason; automatic choice walks ``PRIORITY`` and falls back to the
reference, which runs everywhere.
"""
import logging
import os

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "PYVIT_OPS_BACKEND"

# Automatic order on CUDA tensors, per operator. The rule (README "Backends"):
# the Triton kernels use tensor cores for the matrix products and are tuned for the
# model shapes, so they come first for the attention operators; the memory-bound
# pooling and ELSA aggregations are equally served by both, and the CUDA kernel
# avoids Triton's launch overhead, so it comes first there when it is built.
PRIORITY = {
    "scaled_dot_product_attention": ("triton", "cuda"),
    "window_attention": ("triton", "cuda"),
    "elsa_attention": ("cuda", "triton"),
    "avg_pool2d": ("cuda", "triton"),
}

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


def choose(op, backend, reasons, device):
    """Return the backend that runs ``op`` for this call."""
    backend = requested_backend(backend)
    if backend is not None:
        why = reasons(backend)
        if why:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} cannot run this call: " + "; ".join(why))
        return backend
    if torch.device(device).type != "cuda":
        return "reference"
    for candidate in PRIORITY[op]:
        why = reasons(candidate)
        if not why:
            return candidate
        log.debug("%s: skipping backend %r: %s", op, candidate, "; ".join(why))
    return "reference"


def interpreter_enabled():
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
    reasons = []
    if any(t.dtype == torch.float64 for t in tensors):
        reasons.append("float64 runs only on the reference backend")
    if backend == "triton":
        err = _triton_import_error()
        if err:
            reasons.append(err)
        if devices - {"cuda"} and not interpreter_enabled():
            reasons.append(f"tensors on {sorted(devices - {'cuda'})}: Triton kernels need CUDA "
                           "tensors (or TRITON_INTERPRET=1 for the interpreter)")
        return reasons
    if backend == "cuda":
        from pyvit_ops import _ext

        for device in sorted(devices):
            ok, why = _ext.has_op(f"{op}_fwd", device)
            if not ok:
                reasons.append(why)
        return reasons
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def available(op, reasons_fn):
    """{backend: (available, reason)} for ``python -m pyvit_ops.info``."""
    return {b: (not reasons_fn(b), "; ".join(reasons_fn(b)) or "ok") for b in BACKENDS}
