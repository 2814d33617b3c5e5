"""Fast token generation for causal LMs holding QuantLinear layers: a static KV cache and a
compiled fixed-shape decode step (see :class:`Generator`)."""

from .engine import Decoder, GenerationOutput, Generator
from .layout import FAMILIES, UnsupportedModelError
from .sampling import Sampling

__all__ = ["Generator", "GenerationOutput", "Sampling", "Decoder", "UnsupportedModelError", "FAMILIES"]
