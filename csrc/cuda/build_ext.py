"""Decides whether and how to build fxkernels._cuda (imported by setup.py).

FXK_BUILD_CUDA=0 skips the module, =1 forces it (any problem raises), unset/"auto" builds it
only when a usable CUDA toolkit is found and otherwise returns no extension with the reason, so
the default build of the CPU module never fails because of CUDA.

Two routes:

* CUDA torch: the ordinary ``CUDAExtension`` (torch's own CUDA_HOME guess is replaced by the
  toolkit found here, because ``nvcc`` on the PATH may be a wrapper script).
* CPU torch with a toolkit (development and CI machines): ``CUDAExtension`` fails there (no
  c10_cuda), so a ``CppExtension`` holds the ``.cu`` files, torch's ``CUDA_HOME`` is set
  explicitly so its build step compiles them with nvcc, and cudart is linked by hand with an
  rpath. The module imports without a GPU; calling a kernel raises a clear error.

FXK_CUDA_ARCHS (default "80;90") lists the SASS targets; PTX for the newest is embedded too so
later GPUs can JIT it.
"""

import glob
import os
import re
import shutil
import subprocess

SOURCES_CU = ("int8_gemm.cu", "quantize_act.cu")
SOURCES_CPP = ("host_check.cpp",)


def _nvcc_version(home):
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _lib_dir(home):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        d = os.path.join(home, sub)
        if glob.glob(os.path.join(d, "libcudart.so*")):
            return d
    return None


def candidate_homes():
    """Every plausible toolkit root, most specific first (duplicates removed)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        import torch.utils.cpp_extension as ce
        cands.append(ce.CUDA_HOME)
    except Exception:  # torch missing or broken: setup.py reports that itself
        pass
    cands.append("/usr/local/cuda")
    versioned = glob.glob("/usr/local/cuda-*")
    versioned.sort(key=lambda p: [int(x) for x in re.findall(r"\d+", os.path.basename(p))] or [0], reverse=True)
    cands += versioned + ["/opt/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    seen, out = set(), []
    for c in cands:
        if c and os.path.realpath(c) not in seen:
            seen.add(os.path.realpath(c))
            out.append(c)
    return out


def find_cuda_home(want_major=None):
    """(home, (major, minor), lib_dir) of the first usable toolkit, or (None, None, reasons)."""
    reasons = []
    for home in candidate_homes():
        if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
            reasons.append(f"{home}: no bin/nvcc")
            continue
        if not os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            reasons.append(f"{home}: no include/cuda_runtime_api.h")
            continue
        lib = _lib_dir(home)
        if lib is None:
            reasons.append(f"{home}: no libcudart")
            continue
        ver = _nvcc_version(home)
        if ver is None:
            reasons.append(f"{home}: nvcc --version failed")
            continue
        if ver < (11, 8):
            reasons.append(f"{home}: nvcc {ver[0]}.{ver[1]} cannot target sm_90 (need >= 11.8)")
            continue
        if want_major is not None and ver[0] != want_major:
            reasons.append(f"{home}: nvcc {ver[0]}.{ver[1]} does not match torch's CUDA {want_major}.x")
            continue
        return home, ver, lib
    return None, None, "; ".join(reasons) or "no candidate CUDA_HOME"


def _arch_flags():
    archs = [a.strip() for a in os.environ.get("FXK_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        if not re.fullmatch(r"\d{2,3}a?", a):
            raise ValueError(f"FXK_CUDA_ARCHS: entry {a!r}; expected numbers like '80;90'")
        if int(re.sub(r"\D", "", a)) < 80:
            raise ValueError(f"FXK_CUDA_ARCHS: sm_{a}; expected >= 80 (mma.m16n8k32 int8 and cp.async need sm_80)")
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    last = archs[-1]
    flags.append(f"-gencode=arch=compute_{last},code=compute_{last}")
    return flags


def _build(root, mode):
    import torch
    import torch.utils.cpp_extension as ce

    cuda_torch = bool(torch.version.cuda) and torch.cuda._is_compiled()
    want_major = int(torch.version.cuda.split(".")[0]) if cuda_torch else None
    home, ver, lib = find_cuda_home(want_major)
    if home is None:
        raise RuntimeError(f"no usable CUDA toolkit: {lib}")
    here = os.path.join(root, "csrc", "cuda")
    for f in SOURCES_CU + SOURCES_CPP:
        if not os.path.isfile(os.path.join(here, f)):
            raise RuntimeError(f"missing source csrc/cuda/{f}")
    sources = [os.path.join("csrc", "cuda", f) for f in SOURCES_CU + SOURCES_CPP] + ["csrc/bindings_cuda.cpp"]
    # torch's build step finds nvcc through this module global; point it at the real toolkit.
    ce.CUDA_HOME = home
    os.environ.setdefault("CUDA_HOME", home)
    # --threads compiles the per-architecture passes of each .cu in parallel.
    threads = max(1, min(4, os.cpu_count() or 1))
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "-Xptxas=-warn-spills", f"--threads={threads}"] + _arch_flags()
    # No FMA contraction in the host-side replay of the epilogue/quantization rounding.
    cxx_flags = ["-O2", "-ffp-contract=off"]
    kwargs = dict(
        sources=sources,
        include_dirs=[os.path.join(root, "csrc"), here, os.path.join(home, "include")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    if cuda_torch:
        ext = ce.CUDAExtension("fxkernels._cuda", **kwargs)
        route = "CUDAExtension"
    else:
        ext = ce.CppExtension("fxkernels._cuda", library_dirs=[lib], libraries=["cudart"],
                              extra_link_args=[f"-Wl,-rpath,{lib}"], **kwargs)
        route = "CppExtension + cudart (CPU torch)"
    return [ext], f"building fxkernels._cuda with nvcc {ver[0]}.{ver[1]} from {home} ({route})"


def cuda_extensions(root):
    """Returns (list of extensions, reason printed by setup.py)."""
    mode = os.environ.get("FXK_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode == "0":
        return [], "skipped (FXK_BUILD_CUDA=0)"
    if mode not in ("1", "auto"):
        raise ValueError(f"FXK_BUILD_CUDA={mode!r}; expected 0, 1 or unset (auto)")
    if mode == "1":
        return _build(root, mode)
    try:
        return _build(root, mode)
    except Exception as e:  # auto: never let CUDA trouble break the CPU build
        return [], f"skipped: {type(e).__name__}: {e} (set FXK_BUILD_CUDA=1 to force and see the failure)"
