"""Hugging Face integration: ``AutoModelForCausalLM.from_pretrained(dir)`` on a flexround checkpoint.

``fxkernels.save_quantized`` writes ``config.json`` with ``quantization_config: {"quant_method":
"flexround", "format_version": 3}``. Once :func:`register` has run, transformers routes that
``quant_method`` to :class:`FlexRoundHfQuantizer`, which swaps the listed modules for their layer
kinds (:mod:`fxkernels.layers`; :class:`~fxkernels.nn.QuantLinear` for every ``nn.Linear`` a
language model quantizes) on the meta device *before* transformers loads the weights, so the
stored ``qweight``/``scale``/``zero`` buffers are assigned exactly as saved (no float weight is ever
materialized, no dtype conversion of integer tensors). The result equals
``fxkernels.load_quantized(dir)`` bit for bit.

Registration is lazy so that ``import fxkernels`` stays fast and works without transformers:
:func:`install` registers at once when ``transformers.quantizers.auto`` is already imported, and
otherwise places an import hook that registers right after transformers imports that module.

Sharded checkpoints (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``,
written by ``save_quantized(..., max_shard_size=...)``) load as transformers loads any sharded model;
every shard's header is checked first, so a missing or truncated shard raises
:class:`~fxkernels.layers.CheckpointError` naming the file.

The layer list comes from ``quantization_config.layers`` when embedded in ``config.json``
(``save_pretrained`` of a loaded model writes it there) or else from ``quant_config.json`` next to
the weights.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Optional

QUANT_METHOD = "flexround"
_AUTO_MODULE = "transformers.quantizers.auto"
_registered = False
_classes = None  # (FlexRoundConfig, FlexRoundHfQuantizer) once built


def _build_classes():
    """Define the transformers subclasses (needs transformers; called on registration only)."""
    global _classes
    if _classes is not None:
        return _classes
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .checkpoint import CONFIG_NAME, check_weight_files, read_quant_config
    from .format import FORMAT_VERSION
    from .layers import CheckpointError, install_layers, kind_of, upgrade_entries

    class FlexRoundConfig(QuantizationConfigMixin):
        """``quantization_config`` of a flexround checkpoint (see docs/FORMAT.md).

        quant_method: must be ``"flexround"``.
        format_version: checkpoint format version (int, at most ``fxkernels.FORMAT_VERSION``).
        layers: optional ``{name: entry}`` (the ``layers`` table of docs/FORMAT.md); when absent the
            loader reads ``quant_config.json`` from the checkpoint directory.
        """

        def __init__(self, quant_method: str = QUANT_METHOD, format_version: int = FORMAT_VERSION,
                     layers: Optional[dict] = None, **kwargs):
            method = getattr(quant_method, "value", quant_method)
            if method != QUANT_METHOD:
                raise ValueError(
                    f"FlexRoundConfig: quant_method={method!r}; expected {QUANT_METHOD!r}. A checkpoint of "
                    f"another tool loads with that tool's own loader (e.g. 'gptq' through optimum/gptqmodel)")
            if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
                raise ValueError(f"FlexRoundConfig: format_version={format_version!r}; expected a positive integer")
            if format_version > FORMAT_VERSION:
                raise ValueError(
                    f"FlexRoundConfig: format_version={format_version}; this fxkernels reads versions up to "
                    f"{FORMAT_VERSION}: upgrade flexround (fxkernels) to load this checkpoint")
            if layers is not None and not isinstance(layers, dict):
                raise ValueError(f"FlexRoundConfig: layers is a {type(layers).__name__}; expected a dict "
                                 "{module name: entry} (docs/FORMAT.md) or None")
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.layers = layers
            self._extra = dict(kwargs)  # fields of newer writers, kept on save

        def to_dict(self) -> dict:
            d = dict(self._extra)
            d.update(quant_method=QUANT_METHOD, format_version=self.format_version)
            if self.layers is not None:
                d["layers"] = self.layers
            return d

        def __iter__(self):
            yield from self.to_dict().items()

    class FlexRoundHfQuantizer(HfQuantizer):
        """Loads pre-quantized flexround checkpoints; never quantizes on load."""

        requires_calibration = True
        quantization_config: "FlexRoundConfig"

        def __init__(self, quantization_config, **kwargs):
            if not kwargs.get("pre_quantized", True):
                raise ValueError(
                    "from_pretrained(..., quantization_config=FlexRoundConfig(...)) on a float model: flexround "
                    "does not quantize while loading. Quantize first (`flexround quantize --model DIR --out OUT` "
                    "or quantizer.quantize + fxkernels.save_quantized), then from_pretrained(OUT)")
            super().__init__(quantization_config, **kwargs)

        def validate_environment(self, *args, **kwargs):
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("from_pretrained: device_map offloads to 'disk'; flexround QuantLinear buffers "
                                 "cannot be disk-offloaded. Use device_map=None, 'cpu' or one device")

        def _layers(self, checkpoint_files) -> dict:
            qc = self.quantization_config
            if qc.layers is not None:
                # embedded by save_pretrained; entries of format versions 1-2 carry no kind
                qc.layers = upgrade_entries({"layers": qc.layers})
                return qc.layers
            if not checkpoint_files:
                raise CheckpointError(
                    "from_pretrained: a flexround checkpoint needs its layer list (quantization_config.layers in "
                    f"config.json or {CONFIG_NAME} next to the weights) and neither was found; "
                    "load it with fxkernels.load_quantized(DIR) from a directory written by fxkernels.save_quantized")
            directory = os.path.dirname(os.path.abspath(checkpoint_files[0]))
            try:
                config = read_quant_config(directory)
            except CheckpointError as e:
                raise CheckpointError(
                    f"from_pretrained: config.json says quant_method='flexround' but {e}. Load with "
                    "fxkernels.load_quantized(DIR) from a complete directory written by "
                    "fxkernels.save_quantized") from e
            qc.layers = config["layers"]
            return qc.layers

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            # Each module is built on its float predecessor's device (meta while transformers
            # initializes empty weights), with fp32 bias and activation-scale buffers whatever dtype
            # transformers set as torch's default, so the stored tensors load without rounding.
            layers = self._layers(checkpoint_files)
            if checkpoint_files:
                # transformers would fail on a missing or truncated shard only mid-load, with an error
                # that does not say it is a checkpoint problem: check every file's header first
                check_weight_files(os.path.dirname(os.path.abspath(checkpoint_files[0])), who="from_pretrained")
            install_layers(model, layers, who="from_pretrained")
            # the layer list is now in the current shape; save_pretrained writes it as such
            self.quantization_config.format_version = FORMAT_VERSION
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            left = [f"{n}.{b}" for n, m in model.named_modules() if kind_of(m) is not None
                    for b, t in m.named_buffers(recurse=False) if t is not None and t.device.type == "meta"]
            if left:
                raise CheckpointError(f"from_pretrained: quantized tensors {left[:8]} were not in the checkpoint")
            return model

        def is_serializable(self, *args, **kwargs):
            # save_pretrained writes the QuantLinear buffers and this config with `layers` embedded,
            # which from_pretrained reads back without quant_config.json.
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    _classes = (FlexRoundConfig, FlexRoundHfQuantizer)
    return _classes


def register() -> bool:
    """Register ``quant_method="flexround"`` with transformers now; True when registered.

    Returns False (without raising) when transformers is not installed or has no quantizer registry.
    Idempotent.
    """
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers import auto
    except ImportError:
        return False
    if not hasattr(auto, "AUTO_QUANTIZER_MAPPING") or not hasattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING"):
        return False
    config_cls, quantizer_cls = _build_classes()
    # Write the mappings directly rather than through register_*(): those raise when the name is
    # taken, and a second registration (importlib.reload, two fxkernels copies) must be harmless.
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = config_cls
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = quantizer_cls
    _registered = True
    return True


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _remove_hook()
        try:
            register()
        except Exception as e:  # never break `import transformers` because of us
            print(f"fxkernels: could not register the flexround quantizer with transformers ({e!r}); "
                  "use fxkernels.load_quantized(DIR)", file=sys.stderr)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._inner, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers the quantizer right after transformers imports its quantizer registry."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _WrappedLoader(spec.loader)
                return spec
        return None


_hook = _RegisterOnImport()


def _remove_hook():
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it is imported."""
    if _registered:
        return
    if _AUTO_MODULE in sys.modules:
        register()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


install()  # `import fxkernels` imports this module: register lazily (transformers is not imported here)
