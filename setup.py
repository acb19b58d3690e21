"""Build script for pyvit_ops.

The Python package and the Triton kernels always install. The CUDA C++ extension
(`pyvit_ops._C`) is built when the CUDA toolkit is found; PYVIT_OPS_BUILD_CUDA=0
forces it off, =1 forces it on (and fails loudly if it cannot be built).
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    # Flags shared with pyvit_ops.testing.cuda_report; loaded by path because the
    # package itself (and torch) may not be importable yet.
    path = os.path.join(ROOT, "pyvit_ops", "_build_config.py")
    spec = importlib.util.spec_from_file_location("_pyvit_ops_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_build_config()


def _is_toolkit(home):
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
        os.path.join(home, "include", "cuda_runtime.h"))


def _find_cuda_home():
    # An nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc): only accept a
    # directory that also holds the CUDA headers.
    nvcc = shutil.which("nvcc")
    candidates = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return next((home for home in candidates if _is_toolkit(home)), None)


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
        import torch
    except ImportError:
        if forced:
            sys.exit("PYVIT_OPS_BUILD_CUDA=1 but torch is not importable in the build environment")
        return False, "torch not importable at build time"
    if torch.version.cuda is None:
        if forced:
            sys.exit(f"PYVIT_OPS_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        return False, f"torch {torch.__version__} is a CPU-only build"
    return True, cuda_home


def _extensions():
    want, why = _want_cuda()
    if not want:
        print(f"pyvit_ops: not building the CUDA extension ({why})", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # One translation unit per op (csrc/<op>.cu) plus the bindings: ninja compiles them
    # in parallel. csrc/host_emulation.h is only for the CPU test build.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + sorted(
        glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CUDAExtension(
        name="pyvit_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": BUILD.CXX_FLAGS + [BUILD.archs_define()],
            # -Xptxas=-v prints registers / spills per kernel; the build log is the report.
            "nvcc": BUILD.NVCC_FLAGS + ["-Xptxas=-v"] + BUILD.gencode_flags(),
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _kernel_packages():
    # One package per operator under kernels/ (shipped as pyvit_ops.kernels.<op>).
    return sorted(f"pyvit_ops.kernels.{os.path.basename(os.path.dirname(init))}"
                  for init in glob.glob(os.path.join(ROOT, "kernels", "*", "__init__.py")))


ext_modules, cmdclass = _extensions()

setup(
    name="pyvit_ops",
    version="0.1.0",
    description="Fused GPU kernels (Triton and CUDA C++) for vision-transformer operators",
    python_requires=">=3.9",
    packages=["pyvit_ops", "pyvit_ops.ops", "pyvit_ops.reference", "pyvit_ops.testing",
              "pyvit_ops.testing.specs", "pyvit_ops.nn",
              "pyvit_ops.kernels", "pyvit_ops.csrc"] + _kernel_packages(),
    # kernels/ and csrc/ live at the top of the repo and ship inside the package as
    # pyvit_ops.kernels and pyvit_ops/csrc (the sources pyvit_ops.testing.host builds).
    package_dir={"pyvit_ops": "pyvit_ops", "pyvit_ops.kernels": "kernels",
                 "pyvit_ops.csrc": "csrc"},
    package_data={"pyvit_ops.csrc": ["*.h", "*.cuh", "*.cu", "*.cpp"]},
    install_requires=["torch>=2.4", "triton", "numpy"],
    extras_require={"test": ["pytest>=7.0", "hypothesis>=6.100", "timm>=1.0", "ninja", "pybind11",
                             "tqdm"],
                    "bench": ["matplotlib", "tqdm"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
