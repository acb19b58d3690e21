"""Test setup: every Triton kernel runs in the interpreter on CPU tensors."""
from pyvit_ops.testing import interpreter

# Must happen before any pyvit_ops kernel module is imported (triton.jit decides
# at decoration time whether a kernel is interpreted).
interpreter.enable()
