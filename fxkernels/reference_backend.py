"""Registers :mod:`fxkernels.reference` as the lowest-priority kernel of every op."""

from . import reference
from .dispatch import Kernel, register, set_backend_status


def _always(*args):
    return True, "pure torch, runs everywhere"


set_backend_status("reference", True, "pure torch, runs on every device")
register(Kernel("reference_dequant_linear", "reference", "dequant_linear",
                reference.dequant_linear, _always, priority=-1000))
register(Kernel("reference_quantize_act", "reference", "quantize_act",
                reference.quantize_act, _always, priority=-1000))
register(Kernel("reference_qact_linear", "reference", "qact_linear",
                reference.qact_linear, _always, priority=-1000))
