"""Build fxkernels._C (CPU kernels, always) and fxkernels._cuda (when a CUDA toolkit is usable).

Install torch first (`pip install torch==2.13.0` on a CPU machine), then
`pip install --no-build-isolation -e '.[test]'`. FXK_BUILD_CUDA=1 forces the CUDA module (the
build fails loudly if it cannot be built), FXK_BUILD_CUDA=0 skips it, unset means "when usable".
"""

import glob
import os
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit("flexround: install torch first (CPU machines: `pip install torch==2.13.0`), then "
             "`pip install --no-build-isolation -e .` so the extension builds against it")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "csrc", "cuda"))
from build_ext import cuda_extensions  # noqa: E402  (csrc/cuda/build_ext.py)


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


# AVX2/AVX-512 code is compiled per function with target attributes and chosen at run time,
# so the module itself is built for the baseline x86-64 ISA and never faults on an old CPU.
cpu_ext = CppExtension(
    "fxkernels._C",
    sources=rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))) + ["csrc/bindings_cpu.cpp"],
    include_dirs=[os.path.join(HERE, "csrc")],
    extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno"],
    extra_link_args=["-fopenmp"],
)

ext_modules = [cpu_ext]
cuda_exts, cuda_reason = cuda_extensions(HERE)
print(f"flexround: CUDA extension: {cuda_reason}")
ext_modules += cuda_exts

# Everything else (name, version, dependencies, extras, the `flexround` script, packages) is in
# pyproject.toml; only the compiled modules need code.
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
