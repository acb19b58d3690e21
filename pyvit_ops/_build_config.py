"""Compiler settings of the CUDA extension, shared by setup.py (the build) and
pyvit_ops.testing.cuda_report (the ptxas check), so the check compiles exactly what the
build ships. Imports nothing: setup.py loads this file before pyvit_ops is importable."""

# A100 (sm_80; its cubin also runs on sm_86 / sm_89) and H100 (sm_90).
ARCHS = ("80", "90")

CXX_FLAGS = ["-O3", "-std=c++20"]  # torch >= 2.10 headers require C++20

NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]


def gencode_flags(archs=ARCHS):
    """-gencode pairs emitting SASS for each architecture."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def archs_define(archs=ARCHS):
    """-D flag telling the binding layer what it was built for
    (torch.ops.pyvit_ops_cuda.built_archs()). No quotes or semicolons: torch passes the
    host compiler's flags through a shell unquoted."""
    return "-DPYVIT_ARCHS=" + ",".join(archs)
