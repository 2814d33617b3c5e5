"""Decides whether and how to build fxkernels._cuda (imported by setup.py)."""

import os


def cuda_extensions(root):
    """Returns (list of extensions, reason printed by setup.py)."""
    if os.environ.get("FXK_BUILD_CUDA", "auto") == "0":
        return [], "skipped (FXK_BUILD_CUDA=0)"
    return [], "skipped: no CUDA sources in csrc/cuda yet"
