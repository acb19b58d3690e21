"""Verification harness: run GPU kernels without a GPU (see ../shared/VERIFY.md).

- ``interpreter``: Triton interpreter setup for tests (with the bf16 ``tl.dot`` fix).
- ``static``: compile Triton kernels / the CUDA extension for sm_80 and sm_90a and
  read registers, spills, shared memory and tensor-core instructions.
- ``host``: build the CUDA C++ kernels with g++ under a host emulation of the
  CUDA execution model and run them on CPU tensors.
"""
