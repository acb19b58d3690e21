"""Triton interpreter setup for tests.

``enable()`` must run before the first ``@triton.jit`` kernel is defined, because
``triton.jit`` decides at decoration time whether a kernel is interpreted.
"""
import os

import numpy as np

_PATCHED = False


def enable():
    """Turn on the interpreter and patch its bf16 ``tl.dot``; idempotent."""
    os.environ["TRITON_INTERPRET"] = "1"
    _patch_bf16_dot()


def is_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_bf16_dot():
    # Upstream bug (triton 3.8/3.9): the interpreter keeps bf16 tensors as raw
    # uint16 bit patterns and np.matmul multiplies those integers, so bf16 tl.dot
    # returns garbage. Widen the bits to fp32 first; bf16 -> fp32 is exact.
    # Test-only: real GPU compilation never goes through this builder.
    global _PATCHED
    if _PATCHED:
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def _widen(handle):
        if handle.dtype.is_bf16():
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _PATCHED = True
