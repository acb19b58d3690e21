"""Helpers shared by the Triton launchers.

Device placement: a Triton launch compiles for, checks its shared memory against and
runs on the *current* CUDA device, on that device's current stream, whatever device
its tensors live on. With tensors on ``cuda:1`` while the current device is 0
(``model.to("cuda:1")``, ``device_map``, one process driving several GPUs) it would
fail or read the other device's memory unordered with its work. ``on_tensor_device``
runs a launcher under its tensors' device (``torch.cuda.device``), so every launch
inside it, every ``torch.cuda`` query it makes without naming a device and the
stream its kernels go to are that device's. The CUDA C++ bindings do the same with a
``CUDAGuard`` (``csrc/bindings.h``).
"""
import contextvars
import functools
import itertools

import torch

# The device of the innermost launcher running in this context: read by the tests'
# launch recorder to check that every launch runs under its tensors' device.
_LAUNCH_DEVICE = contextvars.ContextVar("pyvit_ops_launch_device", default=None)


def launch_device():
    """The device the innermost ``on_tensor_device`` launcher entered, or None outside one."""
    return _LAUNCH_DEVICE.get()


def on_tensor_device(fn):
    """Decorator: run the launcher ``fn`` on the device of its first tensor argument
    (launchers take tensors of one device; the ops layer checks it)."""

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        device = next((v.device for v in itertools.chain(args, kwargs.values())
                       if isinstance(v, torch.Tensor)), None)
        if device is None:
            raise TypeError(f"{fn.__qualname__}: expected a tensor argument, got none")
        token = _LAUNCH_DEVICE.set(device)
        try:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        finally:
            _LAUNCH_DEVICE.reset(token)

    return launcher
