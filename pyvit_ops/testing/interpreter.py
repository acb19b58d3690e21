"""Triton interpreter setup for tests.

``enable()`` must run before the first ``@triton.jit`` kernel is defined, because
``triton.jit`` decides at decoration time whether a kernel is interpreted.
"""
import os

import numpy as np

_PATCHED = False


def enable():
    """Turn on the interpreter and patch its ``tl.dot`` (bf16 fix, TF32 rounding);
    idempotent."""
    os.environ["TRITON_INTERPRET"] = "1"
    _patch_dot()


def is_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tf32_truncate(x):
    # Tensor cores read only the top 19 bits (sign, exponent, 10 mantissa bits) of a
    # fp32 operand in TF32 mode: model it as truncation, the worse of the two roundings.
    return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _tf32_round(x):
    # cvt.rna.tf32.f32, which the 3xTF32 split uses: nearest, ties away from zero.
    bits = x.view(np.uint32).astype(np.uint64) + 0x1000
    return (bits.astype(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _patch_dot():
    # Two upstream gaps (triton 3.8/3.9), test-only: real GPU compilation never goes
    # through this builder.
    # - bf16: the interpreter keeps bf16 tensors as raw uint16 bit patterns and
    #   np.matmul multiplies those integers, so bf16 tl.dot returns garbage. Widen the
    #   bits to fp32 first; bf16 -> fp32 is exact.
    # - fp32: input_precision is ignored, so TF32 dots (Triton's default for fp32)
    #   came out IEEE-exact and tests could not see the error a GPU makes. Operands
    #   are reduced to TF32 here; "tf32x3" is the hi/lo split of three TF32 products.
    global _PATCHED
    if _PATCHED:
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    from triton._C.libtriton import ir

    precision = ir.INPUT_PRECISION

    def _widen(handle):
        if handle.dtype.is_bf16():
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)
        return handle

    def _fp32(data):
        return interpreter.TensorHandle(data, interpreter.tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = _widen(a), _widen(b)
        if not (a.dtype.is_fp32() and b.dtype.is_fp32()):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        if input_precision == precision.TF32:
            a, b = _fp32(_tf32_truncate(a.data)), _fp32(_tf32_truncate(b.data))
        elif input_precision == precision.TF32x3:
            a_hi, b_hi = _tf32_round(a.data), _tf32_round(b.data)
            a_lo, b_lo = _tf32_round(a.data - a_hi), _tf32_round(b.data - b_hi)
            for x, y in ((a_lo, b_hi), (a_hi, b_lo)):
                d = original(self, _fp32(x), _fp32(y), d, input_precision,
                             max_num_imprecise_acc)
            a, b = _fp32(a_hi), _fp32(b_hi)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _PATCHED = True
