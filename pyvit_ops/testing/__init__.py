"""Verification harness: run GPU kernels without a GPU (see CONTRIBUTING.md).

- ``interpreter``: Triton interpreter setup for tests, with the GPU's float32 arithmetic
  modelled (``tl.dot`` input precision, bf16 rounding, flush-to-zero exponentials).
- ``static``: compile Triton kernels / the CUDA extension for sm_80 and sm_90a and
  read registers, spills, shared memory and tensor-core instructions.
- ``host``: build the CUDA C++ kernels with g++ under a host emulation of the
  CUDA execution model and run them on CPU tensors.
- ``specs``: the static compile specs of each operator's Triton kernels.
- ``traffic``, ``fuzz``, ``cuda_report``: the memory-traffic meter, the fuzz strategies,
  nvcc's register and spill report.
- ``elsa_official``: the official ELSA module's unfold aggregation, the oracle of the
  ELSA tests and the baseline of its benchmark.
- ``coverage``: the share of each timm family's attention / token-mixer modules that
  ``patch_timm`` swaps, and its parity; writes ``docs/coverage.md``.
"""
