"""Build of the `sslkernels` extension (``sslkernels._C``) from ``csrc/``.

Install from the repository root with ``pip install --no-build-isolation -e .`` (torch must already
be installed: the extension is compiled against it).

The CUDA kernels are compiled whenever nvcc is found and torch is a CUDA build; no GPU is needed
at build time. Environment:

* ``CUDA_HOME``: CUDA toolkit; defaults to ``/usr/local/cuda`` when that directory exists.
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures; defaults to ``8.0;9.0`` (Ampere, Hopper) when no
  GPU is visible (with a GPU, torch's default builds for the visible one).
* ``SSLKERNELS_FORCE_CPU=1``: build the CPU kernels only.
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

# Decide CUDA_HOME before torch.utils.cpp_extension reads it at import time: a `nvcc` wrapper on
# PATH (e.g. /usr/local/bin/nvcc) would otherwise make it guess CUDA_HOME=/usr/local.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvcc_available() -> bool:
    if CUDA_HOME is None:
        return False
    return os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None


def _use_cuda() -> bool:
    if os.environ.get("SSLKERNELS_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and _nvcc_available()


def get_extensions():
    use_cuda = _use_cuda()
    csrc = "csrc"
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    # -fno-trapping-math lets GCC if-convert the clamps in the exp loops and vectorise them; it
    # changes no result, only whether FP exception flags are honoured. No contraction into FMA
    # (here and in nvcc): it would break exact cancellations the definitions rely on, e.g. a row
    # of fd_pseudo_label whose two softmaxes are equal must get exactly zero gradient.
    cxx_flags = ["-O3", "-fno-trapping-math", "-ffp-contract=off"]
    link_flags = []
    # at::parallel_for runs serially unless the extension itself is compiled with OpenMP; the
    # libgomp that torch already loaded is reused at run time (same soname).
    if platform.system() == "Linux":
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob(os.path.join(csrc, "*.cu")))
        cxx_flags.append("-DSSLKERNELS_WITH_CUDA")
        return [
            CUDAExtension(
                "sslkernels._C",
                sources,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false", "-DSSLKERNELS_WITH_CUDA"]},
                extra_link_args=link_flags,
            )
        ]
    return [CppExtension("sslkernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]


ext_modules = get_extensions()
print(
    f"sslkernels: building {'CPU + CUDA' if _use_cuda() else 'CPU-only'} kernels "
    f"(CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})",
    file=sys.stderr,
)

setup(
    name="sslkernels",
    version="0.1.0",
    description="Fused masked cross-entropy, per-class confidence and finite-difference pseudo-label ops",
    packages=find_packages(include=["sslkernels", "sslkernels.*"]),
    ext_modules=ext_modules,
    install_requires=["torch"],
    python_requires=">=3.10",
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
