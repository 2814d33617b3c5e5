"""quantizer: post-training quantization (FlexRound, SignRound, AdaRound, RTN) to fxkernels formats.

    from quantizer import quantize, QuantizeConfig
    model = quantize(model, calibration_ids, QuantizeConfig(method="flexround", weight=QuantSpec(4, "channel")))

    # learn each block on a GPU; the model stays on the CPU
    model = quantize(model, calibration_ids, config, device="cuda")

    # a model larger than memory: read block by block from its files, written shard by shard
    result = quantize_pretrained("path/to/hf-model", "out/w4", calibration_ids, config)
"""

_API = ("quantize", "QuantizeConfig", "QuantizationError", "prepare_calibration")


def __getattr__(name):  # lazy: `flexround eval` should not import the learning engine
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in ("quantize_pretrained", "StreamResult"):
        from . import streaming

        return getattr(streaming, name)
    if name == "MemoryBudgetError":
        from .engine import MemoryBudgetError

        return MemoryBudgetError
    raise AttributeError(f"module 'quantizer' has no attribute {name!r}")


__all__ = list(_API) + ["quantize_pretrained", "StreamResult", "MemoryBudgetError"]
