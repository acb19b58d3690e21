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
from torch._prims_common import suggest_memory_format

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


INT32_MAX = 2**31 - 1


def sample_span(t, batch_axes=(0,)):
    """The largest element offset inside one sample of ``t``: over every axis but the
    ``batch_axes``, whose offsets the kernels compute in int64."""
    return sum((size - 1) * abs(stride) for axis, (size, stride)
               in enumerate(zip(t.shape, t.stride())) if axis not in batch_axes and size > 0)


def offsets_fit_int32(t):
    """True if every element offset inside one sample of ``t`` (its first axis is the
    batch) fits in int32."""
    return sample_span(t) <= INT32_MAX


def int32_reasons(**tensors):
    """Why kernels that index within one sample in int32 cannot index these tensors."""
    return [f"{name}: offsets within one sample must fit in int32, got shape "
            f"{tuple(t.shape)} with strides {t.stride()}"
            for name, t in tensors.items() if not offsets_fit_int32(t)]


def check_int32(**tensors):
    """Raise ValueError with the first of ``int32_reasons(**tensors)``, if any."""
    reasons = int32_reasons(**tensors)
    if reasons:
        raise ValueError(reasons[0])


# Short dtype names, as Triton's signatures and the tile-config keys spell them.
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=None)
def sm_count(device):
    """Streaming multiprocessors of the CUDA ``device`` (sizes grids to fill the GPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


# Output geometry of avg_pool2d: the launchers, the reference and the fake (meta)
# implementation agree on it through these (torch only, so the reference does not
# import Triton).
def pool_output_size(size, kernel_size, stride, padding):
    """Pooled length of one spatial axis (floor mode, as torch with ceil_mode=False)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def pool_output_shape(x_shape, kernel_size, stride, padding):
    """``(B, C, Ho, Wo)`` of pooling an ``x_shape = (B, C, H, W)`` input; the pool
    arguments are ``(h, w)`` pairs."""
    B, C, H, W = x_shape
    return (B, C, pool_output_size(H, kernel_size[0], stride[0], padding[0]),
            pool_output_size(W, kernel_size[1], stride[1], padding[1]))


def pool_memory_format(x):
    """The layout of the pooling output (and of grad_x): the input's, as torch's pooling
    decides it (``Tensor.suggest_memory_format``), so strided views of a channels_last
    tensor stay channels_last."""
    return suggest_memory_format(x)


def elsa_memory_format(t):
    """Memory format of ELSA's output / gradient of a (B, C, H, W) tensor: channels_last
    when its channel axis is the contiguous one (also for strided views such as v
    sliced out of a channels_last projection), else contiguous NCHW."""
    if t.shape[1] > 1 and t.stride(1) == 1 and t.stride(3) != 1:
        return torch.channels_last
    return torch.contiguous_format


def effective_dilation(dilation, H, W):
    """The dilation ELSA computes ``dilation`` with: from ``max(H, W)`` on, every tap but
    the centre lies outside the image and adds nothing, so any larger dilation gives the
    same result; the clamp bounds padding, offsets and the CUDA kernels' sub-grid count."""
    return min(dilation, max(H, W, 1))
