"""Builds detr_cuda and its compiled operator, detr_cuda._C.

C++ sources in csrc/ (and csrc/cpu/) are always built. CUDA sources in
csrc/cuda/ are added when torch has CUDA and nvcc is found, or when
FORCE_CUDA=1 (a build machine without a visible GPU). TORCH_CUDA_ARCH_LIST is
respected; without it the build covers sm_80, sm_86, sm_89 and sm_90.

Install with:  pip install -e . --no-build-isolation
(no build isolation: the extension must be built against the torch that is
already installed, and an isolated build would pull another torch).
"""
import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def compiler_is_gcc():
    """Whether the C++ compiler torch.utils.cpp_extension will call ($CXX, else c++) is GCC."""
    try:
        version = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in version and "Free Software Foundation" in version


def build_extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    # -fopenmp-simd honours `#pragma omp simd` (vectorised loops).
    # -fno-trapping-math: nothing here reads floating-point exception flags,
    # and without it GCC will not turn the CPU kernel's per-sample selects
    # into vector blends (the set-up loop would stay scalar). clang's default.
    extra_compile_args = {"cxx": ["/O2", "/std:c++17"] if os.name == "nt" else
                          ["-O3", "-std=c++17", "-fopenmp-simd", "-fno-trapping-math"]}
    extra_link_args = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available() and compiler_is_gcc():
        # at::parallel_for is inline code that runs in parallel only when the
        # extension itself is compiled with OpenMP (_OPENMP defined); without
        # -fopenmp the CPU kernels ran on one thread. libgomp.so.1 resolves to
        # the one torch already loaded, so there is one thread pool and
        # torch.set_num_threads applies to the kernels too. (clang's -fopenmp
        # would bring its own runtime, libomp: a clang build stays serial.)
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    define_macros = []
    if want_cuda():
        if torch.version.cuda is None:
            raise RuntimeError("FORCE_CUDA=1 but this torch build has no CUDA "
                               f"(torch {torch.__version__}); install a CUDA build of torch first")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        return CUDAExtension("detr_cuda._C", cpp_sources + cuda_sources, include_dirs=[os.path.join(ROOT, "csrc")],
                             define_macros=define_macros, extra_compile_args=extra_compile_args,
                             extra_link_args=extra_link_args)
    return CppExtension("detr_cuda._C", cpp_sources, include_dirs=[os.path.join(ROOT, "csrc")],
                        define_macros=define_macros, extra_compile_args=extra_compile_args,
                        extra_link_args=extra_link_args)


setup(
    name="detr_cuda",
    version="0.1.0",
    description="Deformable DETR with DN training on a custom C++/CUDA MSDeformAttn operator",
    packages=find_packages(include=["detr_cuda", "detr_cuda.*"]),
    python_requires=">=3.9",
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
