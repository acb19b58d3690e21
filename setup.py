"""Build script for pyvit_ops.

The Python package and the Triton kernels always install. The CUDA C++ extension
(`pyvit_ops._C`) is built when the CUDA toolkit is found; PYVIT_OPS_BUILD_CUDA=0
forces it off, =1 forces it on (and fails loudly if it cannot be built).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ARCHS = ("80", "90")


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def _want_cuda():
    flag = os.environ.get("PYVIT_OPS_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "off", "no"):
        return False, "PYVIT_OPS_BUILD_CUDA=0"
    cuda_home = _find_cuda_home()
    forced = flag in ("1", "true", "on", "yes")
    if cuda_home is None:
        if forced:
            sys.exit("PYVIT_OPS_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return False, "no CUDA toolkit found"
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported; without it the
    # link step looks for libcudart in the wrong place.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch  # noqa: F401
    except ImportError:
        if forced:
            sys.exit("PYVIT_OPS_BUILD_CUDA=1 but torch is not importable in the build environment")
        return False, "torch not importable at build time"
    return True, cuda_home


def _extensions():
    want, why = _want_cuda()
    if not want:
        print(f"pyvit_ops: not building the CUDA extension ({why})", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + sorted(
        glob.glob(os.path.join("csrc", "*.cpp")))
    gencode = []
    for arch in ARCHS:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    ext = CUDAExtension(
        name="pyvit_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            # -Xptxas=-v prints registers / spills per kernel; the build log is the report.
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-Xptxas=-v", "-lineinfo",
                     "-DPYVIT_ARCHS=\"" + ";".join(ARCHS) + "\""] + gencode,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="pyvit_ops",
    version="0.1.0",
    description="Fused GPU kernels (Triton and CUDA C++) for vision-transformer operators",
    python_requires=">=3.9",
    packages=["pyvit_ops", "pyvit_ops.ops", "pyvit_ops.reference", "pyvit_ops.testing",
              "pyvit_ops.kernels"],
    # kernels/ lives at the top of the repo and ships inside the package as pyvit_ops.kernels
    package_dir={"pyvit_ops": "pyvit_ops", "pyvit_ops.kernels": "kernels"},
    package_data={"pyvit_ops": ["csrc/*", "csrc/**/*"]},
    install_requires=["torch>=2.4", "triton", "numpy"],
    extras_require={"test": ["pytest", "hypothesis", "timm", "ninja", "pybind11"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
