"""Static compile specs of the Triton kernels, one module per operator (pyvit_ops.testing.static)."""
