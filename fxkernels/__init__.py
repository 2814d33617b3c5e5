"""fxkernels: packed INT2..8 weights, QuantLinear, and the kernels that run them.

Deployment needs only this package; the quantizer (``quantizer``) depends on it, never the reverse.
"""

from .format import FORMAT_VERSION, QuantSpec, dequantize, pack, quantize_rtn, unpack
from .dispatch import available_kernels, use_backend
from .nn import QuantLinear, replace_linears
from .fusion import fuse_projections, unfuse_projections
from .generation import Generator, Sampling
from . import ops  # registers the fxk:: torch.library ops
from . import hf  # noqa: F401  (from_pretrained support: registers quant_method 'flexround' lazily)

__version__ = "0.1.0"


def save_quantized(*args, **kwargs):
    from .checkpoint import save_quantized as _save
    return _save(*args, **kwargs)


def load_quantized(*args, **kwargs):
    from .checkpoint import load_quantized as _load
    return _load(*args, **kwargs)


save_quantized.__doc__ = "See fxkernels.checkpoint.save_quantized."
load_quantized.__doc__ = "See fxkernels.checkpoint.load_quantized."

__all__ = ["QuantSpec", "QuantLinear", "replace_linears", "pack", "unpack", "dequantize", "quantize_rtn",
           "save_quantized", "load_quantized", "available_kernels", "use_backend", "ops", "FORMAT_VERSION",
           "fuse_projections", "unfuse_projections", "Generator", "Sampling"]
