"""Versioned configuration of a quantization run (every method shares one dataclass).

Method-specific knobs go in ``options`` (passed to the rounding's constructor, e.g.
``{"beta_start": 20}`` for AdaRound). ``to_dict``/``from_dict`` round-trip through JSON; the
resume directory stores the dict and refuses to continue under a different one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from fxkernels.format import QuantSpec

CONFIG_VERSION = 1
METHODS = ("rtn", "flexround", "adaround", "signround")

# Learning rates that worked on SmolLM2-135M in short schedules (see docs/RESULTS.md). FlexRound
# and AdaRound use Adam (FlexRound on log-parameters); SignRound uses signed SGD whose step is a
# fraction of one quantization step, AutoRound's 1/iters rule. FlexRound at 6e-3 rather than 3e-3:
# within 100-200 steps the log-scales must travel far enough to move small codes by a whole step
# (measured: W3 per-channel 39.85 -> 31.88 at 100 steps, 31.30 -> 28.57 at 200; W4 21.34 -> 21.07);
# 8-bit weights take a smaller step (flexround_default_lr).
# Layers whose inputs are rotated by default when activations are int8: every linear of every
# block. Attention-sink tokens put token-wise outliers into the MLP down projections' inputs that
# no per-channel smoothing can fold into the weights, and smaller ones into the normalized
# residual stream; a block-Hadamard rotation spreads them (fxkernels.rotation). Measured on
# SmolLM2 with float weights and static int8 inputs everywhere: 21.09 without rotation, 19.04 with
# the down projections rotated, 18.69 with every input rotated (fp32 18.58). The cost is one fast
# Walsh-Hadamard transform per linear call (log2(block) add/subtract passes over the input).
AUTO_ROTATE = ("*",)
MIN_ROTATION_BLOCK = 16

DEFAULT_LR = {"flexround": 6e-3, "adaround": 1e-2, "signround": None, "rtn": 0.0}


def flexround_default_lr(bits: int) -> float:
    """FlexRound's default Adam step for ``bits``-bit weights.

    A weight whose code sits ``c`` steps from the zero point moves by about ``c * d(log S2)`` grid
    steps, so one Adam step moves 8-bit weights (``|c|`` up to 128) 16x further than 4-bit ones
    (up to 8). Measured on SmolLM2 (docs/RESULTS.md): 6e-3 is best at 3-4 bits; at W8A8, 6e-3 left
    several blocks no better than their initial grid while 1e-3 cut block losses 2-3x. Between 4
    and 8 bits the step is interpolated geometrically."""
    if bits <= 4:
        return 6e-3
    if bits >= 8:
        return 1e-3
    return 6e-3 * (1e-3 / 6e-3) ** ((bits - 4) / 4)


def method_learning_rate(method: str, lr: Optional[float], iters: int, bits: Optional[int] = None) -> float:
    """``lr`` if given, else the method's default (SignRound: AutoRound's 1/iters rule; FlexRound:
    by weight bits when ``bits`` is given, see :func:`flexround_default_lr`)."""
    if lr is not None:
        return float(lr)
    if method == "flexround" and bits is not None:
        return flexround_default_lr(bits)
    if method == "signround":
        return 1.0 / max(iters, 1)
    return DEFAULT_LR[method]


@dataclasses.dataclass
class QuantizeConfig:
    """One quantization run.

    method: "flexround" | "signround" | "adaround" | "rtn".
    weight: the weight format (bits, granularity, group_size, symmetric) of every quantized linear.
    act_bits: None (weight-only) or 8: per-tensor static int8 activations on every linear input,
        initialized from calibration statistics and learned (LSQ) with the weights.
    iters: optimizer steps per block (0: export the initial grid, i.e. RTN).
    lr: step size of the rounding parameters (None: the method's default, DEFAULT_LR; FlexRound's
        depends on the weight bits, flexround_default_lr).
    act_lr: Adam step size of the activation log-scales and zero points.
    lr_decay: decay Adam's step size linearly to 0 over ``iters`` (SignRound always decays).
    nsamples, seqlen: calibration windows used (the calibration tensor may hold more).
    batch_size: windows per optimizer step.
    init: "mse" (clipping-searched RTN grid) or "minmax" initial grid (FlexRound, AdaRound).
    qdrop: probability of feeding a block input element from the float model instead of the
        quantized one while learning (QDrop); 0 disables.
    loss: "mse" (block-output mean squared error) or "token" (each token's error relative to its
        target's mean square, so that massive-activation tokens do not own the gradient).
    smooth: SmoothQuant's alpha in [0, 1], used only with act_bits=8 (None disables): before
        learning a block, migrate per-channel activation range into the weights where the producer
        is a norm or a linear (quantizer.smooth); 0.5 balances the two.
    rotate: linear names or glob patterns whose input is rotated by a block Hadamard transform
        (fxkernels.rotation; applied online by the exported QuantLinear). None = automatic: every
        block linear (AUTO_ROTATE) when act_bits=8, nothing for weight-only; () = none.
    eval_samples: windows on which "loss before -> after" is measured per block.
    skip: names or glob patterns of linears left in float (lm_head by default).
    resume_dir: directory where finished blocks are saved; a rerun continues after them.
    options: keyword options of the rounding module (see quantizer.rounding).
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
    loss: str = "token"
    smooth: Optional[float] = 0.5
    rotate: Optional[Tuple[str, ...]] = None
    skip: Tuple[str, ...] = ("lm_head",)
    resume_dir: Optional[str] = None
    progress: bool = True
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if isinstance(self.weight, dict):
            self.weight = QuantSpec.from_dict(self.weight)
        if isinstance(self.skip, (list, str)):
            self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        if isinstance(self.rotate, (list, str)):
            self.rotate = (self.rotate,) if isinstance(self.rotate, str) else tuple(self.rotate)
        self.validate()

    def validate(self) -> None:
        def bad(name, expected):
            raise ValueError(f"QuantizeConfig: {name}={getattr(self, name)!r}; expected {expected}")

        if self.method not in METHODS:
            bad("method", f"one of {METHODS}")
        if not isinstance(self.weight, QuantSpec):
            bad("weight", "a fxkernels.QuantSpec")
        if self.weight.act_bits is not None:
            bad("weight", "a weight-only QuantSpec (set activations with act_bits=8)")
        if self.act_bits not in (None, 8):
            bad("act_bits", "None or 8")
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
        if self.loss not in ("mse", "token"):
            bad("loss", "'mse' or 'token'")
        if self.init not in ("mse", "minmax"):
            bad("init", "'mse' or 'minmax'")
        if not (isinstance(self.qdrop, (int, float)) and 0 <= self.qdrop <= 1):
            bad("qdrop", "a probability in [0, 1]")
        if not isinstance(self.options, dict):
            bad("options", "a dict of keyword options for the rounding module")
        if self.version != CONFIG_VERSION:
            bad("version", f"{CONFIG_VERSION} (this quantizer's config version)")

    # -- derived -------------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        return method_learning_rate(self.method, self.lr, self.iters, self.weight.bits)

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
                                 f"no power-of-two factor >= {MIN_ROTATION_BLOCK}; expected layers a Hadamard block divides")
            blocks[name] = b
        return blocks

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight"] = self.weight.to_dict()
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
        for k in ("resume_dir", "progress"):
            d.pop(k)
        return d
