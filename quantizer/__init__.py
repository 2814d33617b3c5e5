"""quantizer: post-training quantization (FlexRound, SignRound, AdaRound, RTN) to fxkernels formats.

    from quantizer import quantize, QuantizeConfig
    model = quantize(model, calibration_ids, QuantizeConfig(method="flexround", weight=QuantSpec(4, "channel")))
"""


def __getattr__(name):  # lazy: `flexround eval` should not import the learning engine
    if name in ("quantize", "QuantizeConfig", "QuantizationError", "prepare_calibration"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'quantizer' has no attribute {name!r}")


__all__ = ["quantize", "QuantizeConfig", "QuantizationError", "prepare_calibration"]
