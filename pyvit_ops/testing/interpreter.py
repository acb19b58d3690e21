"""Triton interpreter setup for tests.

``enable()`` must run before the first ``@triton.jit`` kernel is defined, because
``triton.jit`` decides at decoration time whether a kernel is interpreted.
"""
import os

import numpy as np

_PATCHED = False


def enable():
    """Turn on the interpreter and patch its ``tl.dot`` (bf16 operands, float32 input
    precision); idempotent."""
    os.environ["TRITON_INTERPRET"] = "1"
    _patch_dot()


def is_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tf32(x):
    """float32 array ``x`` rounded to TF32 (10 explicit mantissa bits) as the GPU's
    ``cvt.rna.tf32.f32`` does: to nearest, ties away from zero. Adding half an ulp to
    the bit pattern rounds the magnitude (a carry moves into the exponent, up to inf);
    non-finite values pass unchanged (a NaN payload in the low bits would round to inf)."""
    x = np.asarray(x, dtype=np.float32)
    bits = (x.view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where(np.isfinite(x), bits.view(np.float32), x)


def _dot_fp32(a, b, d, precision):
    """``tl.dot`` of float32 operands at ``precision`` (an ``INPUT_PRECISION``), with
    the products triton 3.8 emits on NVIDIA GPUs: TF32 rounds both operands; TF32x3
    splits each into hi = tf32(x) and lo = tf32(x - hi) and accumulates lo*hi + hi*lo,
    zeroes that sum's NaNs (an inf operand's lo is NaN: inf - inf) and adds it to
    hi*hi, so non-finite operands give what the exact product gives; IEEE is exact."""
    name = precision.name.upper()
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as on the GPU
        if name == "TF32":
            return np.matmul(tf32(a), tf32(b), dtype=np.float32) + d
        if name == "TF32X3":
            a_hi, b_hi = tf32(a), tf32(b)
            a_lo, b_lo = tf32(a - a_hi), tf32(b - b_hi)
            small = np.matmul(a_lo, b_hi, dtype=np.float32) + np.matmul(a_hi, b_lo,
                                                                           dtype=np.float32)
            small = np.where(np.isnan(small), np.float32(0), small)
            return np.matmul(a_hi, b_hi, dtype=np.float32) + small + d
        return np.matmul(a, b, dtype=np.float32) + d


def _patch_dot():
    # Test-only: real GPU compilation never goes through this builder.
    global _PATCHED
    if _PATCHED:
        return
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def _widen(handle):
        # Upstream bug (triton 3.8/3.9): the interpreter keeps bf16 tensors as raw
        # uint16 bit patterns and np.matmul multiplies those integers, so bf16 tl.dot
        # returns garbage. Widen the bits to fp32 first; bf16 -> fp32 is exact.
        if handle.dtype.is_bf16():
            bits = handle.data.astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        # Upstream computes every float32 product exactly, whatever input_precision
        # says: the tests would never see TF32's ~1e-3 relative error.
        if a.dtype.is_fp32() and b.dtype.is_fp32() and d.dtype.is_fp32():
            return interpreter.TensorHandle(
                _dot_fp32(a.data, b.data, d.data, input_precision), d.dtype.scalar)
        return original(self, _widen(a), _widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot

    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        # Upstream bug (triton 3.8): float32 -> bf16 casts truncate, where the GPU's
        # cvt.rn.bf16.f32 rounds to nearest even (1 - 2**-24 becomes 1 - 2**-8, not 1).
        if src.dtype.scalar == interpreter.tl.float32 and \
                dst_type.scalar == interpreter.tl.bfloat16:
            return interpreter.TensorHandle(_bf16_bits(src.data), dst_type.scalar)
        return original_cast(self, src, dst_type)

    builder.cast_impl = cast_impl

    def flush_to_zero(op):
        # On the GPU, float32 tl.exp / tl.exp2 are ex2.approx.ftz.f32: a subnormal result
        # is 0. numpy keeps it, so a tiny weight times an inf value would be inf here and
        # NaN on the GPU.
        def create(self, arg):
            out = op(self, arg)
            if out.dtype.scalar == interpreter.tl.float32:
                data = out.data
                out = interpreter.TensorHandle(
                    np.where(np.abs(data) < np.float32(2.0 ** -126), np.float32(0), data)
                    .astype(np.float32), out.dtype.scalar)
            return out
        return create

    builder.create_exp2 = flush_to_zero(builder.create_exp2)
    builder.create_exp = flush_to_zero(builder.create_exp)
    _PATCHED = True


def _bf16_bits(x):
    """float32 array ``x`` rounded to nearest even bfloat16, as uint16 bit patterns (the
    interpreter's bf16 storage); a carry moves into the exponent (up to inf), NaN stays
    NaN."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> \
        np.uint32(16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded.astype(np.uint16))
