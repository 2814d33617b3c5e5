"""Versioned configuration of a quantization run (every method shares one dataclass).

Method-specific knobs go in ``options`` (passed to the rounding's constructor, e.g.
``{"beta_start": 20}`` for AdaRound). ``to_dict``/``from_dict`` round-trip through JSON; the
resume directory stores the dict and refuses to continue under a different one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

from fxkernels.format import QuantSpec

from .placement import check_device
from .rounding import method_class, method_names

CONFIG_VERSION = 1
# Options that belong to the engine, not to the rounding's constructor: AdaRound's regularizer
# weight (see WeightQuantizer.regularizer_weight).
ENGINE_OPTIONS = ("reg_weight",)
#: block-output losses (QuantizeConfig.loss), the default first
LOSSES = ("auto", "token", "norm", "mse")

# Layers whose inputs are rotated by default when activations are int8: every linear of every
# block. Attention-sink tokens put token-wise outliers into the MLP down projections' inputs that
# no per-channel smoothing can fold into the weights, and smaller ones into the normalized
# residual stream; a block-Hadamard rotation spreads them (fxkernels.rotation). Measured on
# SmolLM2 with float weights and static int8 inputs everywhere: 21.09 without rotation, 19.04 with
# the down projections rotated, 18.69 with every input rotated (fp32 18.58). The cost is one fast
# Walsh-Hadamard transform per linear call (log2(block) add/subtract passes over the input).
AUTO_ROTATE = ("*",)
MIN_ROTATION_BLOCK = 16


def method_learning_rate(method: str, lr: Optional[float], iters: int, bits: Optional[int] = None) -> float:
    """``lr`` if given, else the method's default (its class's ``default_learning_rate``: SignRound
    AutoRound's 1/iters rule, FlexRound by weight bits when ``bits`` is given)."""
    if lr is not None:
        return float(lr)
    return float(method_class(method).default_learning_rate(bits, iters))


@dataclasses.dataclass
class QuantizeConfig:
    """One quantization run.

    method: a registered rounding method (quantizer.rounding.method_names(): "rtn", "flexround",
        "adaround", "signround" and any added one).
    weight: the weight format (bits, granularity, group_size, symmetric) of every quantized layer.
    first_last: the weight format of a model's first and last quantized layers, for families that
        single them out (MobileNetV2's stem conv and classifier); with act_bits their inputs use
        the same width as these weights. None: they are quantized like the rest.
    act_bits: None (weight-only) or 2..8: per-tensor static activations on every layer input,
        initialized from calibration statistics and learned (LSQ) with the weights. Language
        models take 8 only (the int8 kernels); below 8 bits vision models simulate the grid.
    iters: optimizer steps per block (0: export the initial grid, i.e. RTN).
    lr: step size of the rounding parameters (None: the method's default_learning_rate; FlexRound's
        depends on the weight bits).
    act_lr: Adam step size of the activation log-scales and zero points.
    lr_decay: decay Adam's step size linearly to 0 over ``iters`` (SignRound always decays).
    nsamples, seqlen: calibration windows used (the calibration tensor may hold more).
    batch_size: windows per optimizer step.
    init: "mse" (clipping-searched RTN grid) or "minmax" initial grid (FlexRound, AdaRound).
    qdrop: probability of feeding a block input element from the float model instead of the
        quantized one while learning (QDrop); 0 disables.
    loss: "auto" (default: per block, "norm" where the norms reading its output damp the
        channels that hold most of the stream's energy, else "token"; see
        ``quantizer.engine.energy_through_gains``), "token" (each token's error relative to its
        target's mean square, so that massive-activation tokens do not own the gradient), "norm"
        ("token" with each channel weighted by the squared gains of the norms that read the
        block's output on the residual stream, i.e. the error as the rest of the model sees it;
        "token" where no such norm is known; docs/RESULTS.md: better on Gemma 3, worse at 3 bits
        on SmolLM2) or "mse" (plain block-output mean squared error).
    smooth: SmoothQuant's alpha in [0, 1], used only with act_bits=8 (None disables): before
        learning a block, migrate per-channel activation range into the weights where the producer
        is a norm or a linear (quantizer.smooth); 0.5 balances the two.
    rotate: linear names or glob patterns whose input is rotated by a block Hadamard transform
        (fxkernels.rotation; applied online by the exported QuantLinear). None = automatic: every
        block linear (AUTO_ROTATE) when act_bits=8, nothing for weight-only; () = none.
    eval_samples: windows on which "loss before -> after" is measured per block.
    skip: names or glob patterns of linears left in float (lm_head by default).
    resume_dir: directory where finished blocks are saved; a rerun continues after them.
    options: keyword options of the rounding module (see quantizer.rounding), plus "reg_weight"
        for methods with a regularizer.
    device: where blocks learn: "cpu" (default; the results are those of every earlier version)
        or "cuda[:index]" (each block moves to the GPU for its learning, forward under bf16
        autocast, rounding parameters fp32; the model's weights stay on the CPU). Not part of the
        resume identity: a run may continue on another device.
    memory_budget: bytes the compute device may hold for one block's learning (its float
        weights, the learning state, the activations of a step and, when they fit, the streams;
        quantizer.placement.unit_need). A block that needs more raises MemoryBudgetError before
        it learns. None: no check on the CPU; on CUDA the free device memory decides whether
        the streams stay on the GPU or in pinned CPU memory.
    """

    method: str = "flexround"
    weight: QuantSpec = dataclasses.field(default_factory=lambda: QuantSpec(bits=4, granularity="channel"))
    act_bits: Optional[int] = None
    iters: int = 200
    lr: Optional[float] = None
    act_lr: float = 2e-3
    lr_decay: bool = True
    nsamples: int = 64
    seqlen: int = 256
    batch_size: int = 1
    seed: int = 0
    init: str = "mse"
    qdrop: float = 0.0
    eval_samples: int = 8
    loss: str = "auto"
    smooth: Optional[float] = 0.5
    rotate: Optional[Tuple[str, ...]] = None
    skip: Tuple[str, ...] = ("lm_head",)
    resume_dir: Optional[str] = None
    progress: bool = True
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = CONFIG_VERSION
    first_last: Optional[QuantSpec] = None
    device: str = "cpu"
    memory_budget: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.weight, dict):
            self.weight = QuantSpec.from_dict(self.weight)
        if isinstance(self.first_last, dict):
            self.first_last = QuantSpec.from_dict(self.first_last)
        if isinstance(self.skip, (list, str)):
            self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        if isinstance(self.memory_budget, str):  # "6GB", "500MB", as for max_shard_size
            from fxkernels.checkpoint import parse_shard_size

            self.memory_budget = parse_shard_size(self.memory_budget, "QuantizeConfig: memory_budget")
        if isinstance(self.rotate, (list, str)):
            self.rotate = (self.rotate,) if isinstance(self.rotate, str) else tuple(self.rotate)
        self.validate()

    def validate(self) -> None:
        def bad(name, expected):
            raise ValueError(f"QuantizeConfig: {name}={getattr(self, name)!r}; expected {expected}")

        if self.method not in method_names():
            bad("method", f"one of {method_names()}")
        for name in ("weight", "first_last"):
            spec = getattr(self, name)
            if spec is None and name == "first_last":
                continue
            if not isinstance(spec, QuantSpec):
                bad(name, "a fxkernels.QuantSpec" + (" or None" if name == "first_last" else ""))
            if spec.act_bits is not None:
                bad(name, "a weight-only QuantSpec (set activations with act_bits)")
        if self.act_bits is not None and (not isinstance(self.act_bits, int) or isinstance(self.act_bits, bool)
                                          or not 2 <= self.act_bits <= 8):
            bad("act_bits", "None or an integer in 2..8")
        for name in ("iters",):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "a non-negative integer")
        for name in ("nsamples", "seqlen", "batch_size", "eval_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "a positive integer")
        if self.batch_size > self.nsamples:
            bad("batch_size", f"at most nsamples={self.nsamples}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            bad("lr", "None or a positive number")
        if not (isinstance(self.act_lr, (int, float)) and self.act_lr >= 0):
            bad("act_lr", "a non-negative number")
        if self.smooth is not None and not (isinstance(self.smooth, (int, float)) and 0 <= self.smooth <= 1):
            bad("smooth", "None or an alpha in [0, 1]")
        if self.rotate is not None and not (isinstance(self.rotate, tuple)
                                            and all(isinstance(p, str) and p for p in self.rotate)):
            bad("rotate", "None (automatic) or a tuple of layer-name patterns")
        if self.loss not in LOSSES:
            bad("loss", ", ".join(repr(x) for x in LOSSES[:-1]) + f" or {LOSSES[-1]!r}")
        if self.init not in ("mse", "minmax"):
            bad("init", "'mse' or 'minmax'")
        if not (isinstance(self.qdrop, (int, float)) and 0 <= self.qdrop <= 1):
            bad("qdrop", "a probability in [0, 1]")
        if not isinstance(self.options, dict):
            bad("options", "a dict of keyword options for the rounding module")
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        if not isinstance(self.device, str):
            bad("device", "'cpu', 'cuda' or 'cuda:<index>'")
        check_device(self.device)
        if self.memory_budget is not None and (not isinstance(self.memory_budget, int)
                                               or isinstance(self.memory_budget, bool) or self.memory_budget <= 0):
            bad("memory_budget", "None or a positive number of bytes")
        if self.version != CONFIG_VERSION:
            bad("version", f"{CONFIG_VERSION} (this quantizer's config version)")

    # -- derived -------------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        return method_learning_rate(self.method, self.lr, self.iters, self.weight.bits)

    def rounding_options(self) -> Dict[str, Any]:
        """Constructor keywords of the rounding: ``options`` without the engine's, plus ``init``
        for methods that take one (unless ``options`` sets it)."""
        options = {k: v for k, v in self.options.items() if k not in ENGINE_OPTIONS}
        if method_class(self.method).takes_init:
            options.setdefault("init", self.init)
        return options

    @property
    def layer_spec(self) -> QuantSpec:
        """The QuantSpec of exported layers (weights plus static activations if any)."""
        if self.act_bits:
            return dataclasses.replace(self.weight, act_bits=self.act_bits, act_mode="static")
        return self.weight

    def rotation_blocks(self, names) -> Dict[str, int]:
        """``{layer name: Hadamard block}`` for the ``(name, nn.Linear)`` pairs whose input is rotated."""
        from fxkernels.rotation import default_rotation_block

        from .blocks import matches

        auto = self.rotate is None
        patterns = (AUTO_ROTATE if self.act_bits else ()) if auto else self.rotate
        blocks = {}
        for name, lin in names:
            if not patterns or not matches(name, patterns):
                continue
            b = default_rotation_block(lin.in_features)
            if b < MIN_ROTATION_BLOCK:
                if auto:
                    continue
                raise ValueError(f"QuantizeConfig: rotate matches {name!r}, whose in_features={lin.in_features} has "
                                 f"no power-of-two factor >= {MIN_ROTATION_BLOCK}; expected layers a Hadamard "
                                 "block divides")
            blocks[name] = b
        return blocks

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight"] = self.weight.to_dict()
        d["first_last"] = None if self.first_last is None else self.first_last.to_dict()
        d["skip"] = list(self.skip)
        d["rotate"] = None if self.rotate is None else list(self.rotate)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"QuantizeConfig: unknown fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

    def fingerprint_dict(self) -> dict:
        """The fields that change the result (what a resume directory must agree on)."""
        d = self.to_dict()
        # Where and within what memory a run learns does not change what a block may resume from.
        for k in ("resume_dir", "progress", "device", "memory_budget"):
            d.pop(k)
        if d["first_last"] is None:  # resume directories written before the field existed stay valid
            d.pop("first_last")
        return d
