"""The reconstruction engine every model family shares: learn one unit, then walk the units.

A model is cut into units (a decoder block, a MobileNetV2 stage; see the family modules
:mod:`quantizer.reconstruct` and :mod:`quantizer.vision.reconstruct_cnn`). For each unit ``i``:

1. ``targets = float_unit_i(x_fp)``: the float unit on the float model's inputs;
2. its layers become :class:`~quantizer.layers.QuantLayer` wrappers (a rounding module of the
   configured method, optionally an LSQ activation quantizer whose grid starts from statistics
   of the unit's quantized-stream inputs);
3. :func:`learn_unit` minimizes ``loss(unit_i(x_q), targets)`` over the rounding (and activation)
   parameters, where ``x_q`` are the outputs of the already quantized units ``0..i-1`` (QDrop
   optionally mixes in ``x_fp``); the method's class decides the optimizer, its default step,
   whether the best iterate is kept, and its regularizer;
4. the wrappers are exported; ``x_q`` advances through the unit *as exported* (a
   :class:`~quantizer.layers.FrozenLayer`, bit-identical to the export's dequantization) and
   ``x_fp`` becomes ``targets``.

Streams (``x_fp``, ``x_q``, targets) pass through a unit in mini-batches. Where they live and
where a unit learns is the run's :class:`~quantizer.placement.Placement`: on the CPU (the
default) everything stays where it is; with ``device="cuda"`` each unit moves to the GPU for its
learning (block forward under bf16 autocast, rounding parameters fp32) and comes back exported,
and the streams stay on the GPU when they fit the memory budget, else in pinned CPU memory.
Every unit reports its time and memory (:func:`reconstruct_units`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from fxkernels.nn import set_submodule

from .config import QuantizeConfig
from .layers import FrozenLayer, QuantLayer
from .placement import Placement, UnitNeed, release_free_heap, rss_bytes, rss_peak_bytes, unit_need
from .rounding import method_class

if TYPE_CHECKING:
    from .resume import ResumeDir

Forward = Callable[[torch.Tensor], torch.Tensor]


class QuantizationError(RuntimeError):
    """Learning could not finish a unit (non-finite loss); finished units are kept."""


class MemoryBudgetError(QuantizationError):
    """A unit needs more memory than the run's ``memory_budget``; finished units are kept."""


def unit_output(out):
    """A unit's output tensor (HF blocks return tuples whose first item is the hidden state)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_stream(forward: Forward, x: torch.Tensor, batch: int, place: Optional[Placement] = None) -> torch.Tensor:
    """``forward`` over every row of ``x`` in mini-batches of ``batch``, concatenated (where
    ``place`` keeps streams; without it, or on the CPU, as ``torch.cat`` of the outputs)."""
    if place is None or place.is_cpu:
        return torch.cat([forward(x[s:s + batch]) for s in range(0, x.shape[0], batch)])
    # Filled batch by batch: the outputs are never held twice (list + concatenation) on the GPU.
    out = None
    for s in range(0, x.shape[0], batch):
        y = forward(x[s:s + batch])
        if out is None:
            out = place.empty_stream((x.shape[0],) + tuple(y.shape[1:]), y.dtype)
        out[s:s + y.shape[0]].copy_(y, non_blocking=True)
    place.synchronize()
    return out


def reconstruction_loss(y: torch.Tensor, t: torch.Tensor, kind: str,
                        channel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unit-output error. ``"mse"``: plain mean squared error. ``"token"``: each token's squared
    error divided by its target's mean square. LLM residual streams carry "massive activation"
    tokens (the attention sink) whose few channels are 100-1000x larger than the rest; under a
    plain MSE they own the gradient and the ordinary tokens, which decide perplexity, get none.
    ``"norm"``: ``"token"`` with each output channel's error weighted by ``channel_weight`` (the
    squared gains of the norms that read the unit's output, mean 1; see :func:`norm_channel_weight`),
    i.e. the error as the rest of the model sees it after its norms; ``"token"`` where it is None.
    ``"auto"``: as ``"norm"``, with the weight already chosen per unit (:func:`auto_channel_weight`)."""
    err = (y - t).pow(2)
    if kind in ("token",) + NORM_WEIGHTED_LOSSES:
        err = err / t.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-8)
    if kind in NORM_WEIGHTED_LOSSES and channel_weight is not None:
        err = err * channel_weight
    return err.mean()


def norm_channel_weight(gains: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-channel weight of the ``"norm"`` loss: the mean over ``gains`` (one per norm that reads
    the unit's output on the residual stream) of ``gain**2`` scaled to mean 1; None without gains.
    A norm divides each token by its RMS and multiplies channel ``c`` by ``gain[c]``, so an output
    error ``e`` reaches what follows that norm as ``e * gain / rms``. On models whose few
    massive-activation channels hold most of the stream's energy but get small gains from every
    norm (Gemma 3: 4 of 640 channels hold 70-98 %), a loss without the gains spends the learning
    on errors the rest of the model barely sees."""
    parts = []
    for g in gains:
        w = g.float().pow(2)
        m = float(w.mean())
        if m > 0 and torch.isfinite(w).all():
            parts.append(w / m)
    return torch.stack(parts).mean(0) if parts else None


#: losses that weigh channels by the gains of the norms reading a unit's output
NORM_WEIGHTED_LOSSES = ("norm", "auto")
#: ``"auto"`` weighs by the norms' gains where less than this share of the stream's energy (as the
#: token loss measures it) survives them; measured: SmolLM2-135M 0.81-1.31 on every block (token
#: wins there), Gemma-3-270M 0.006-0.22 (norm wins by 3 perplexity at W4, 20 at W3)
AUTO_NORM_BELOW = 0.5


@torch.no_grad()
def energy_through_gains(targets: torch.Tensor, channel_weight: torch.Tensor, rows: int = 8) -> float:
    """How much of a unit's output error, spread like its targets' token-normalized energy, the
    norms reading it pass on: ``sum_c E_c * w_c`` with ``E`` the per-channel share of
    ``t**2 / mean_c(t**2)`` over the first ``rows`` targets and ``w`` the ``"norm"`` weight (mean 1).
    About 1 where the gains do not favour the high-energy channels; near 0 where a few channels
    hold the stream's energy and every norm damps them, so that the ``"token"`` loss spends its
    learning on errors the rest of the model does not see."""
    t = targets[:rows].float()
    share = (t.pow(2) / t.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-8)).reshape(-1, t.shape[-1]).mean(0)
    share = share / share.sum().clamp_min(1e-30)
    return float((share * channel_weight.to(share.device)).sum())


def auto_channel_weight(targets: torch.Tensor, channel_weight: Optional[torch.Tensor]
                        ) -> Tuple[Optional[torch.Tensor], str]:
    """The ``"auto"`` loss's choice for one unit: ``(weight, description)``; the norm weight where
    :func:`energy_through_gains` is below :data:`AUTO_NORM_BELOW`, else None (the token loss)."""
    if channel_weight is None:
        return None, "token loss (no norm reads this output)"
    passed = energy_through_gains(targets, channel_weight)
    if passed < AUTO_NORM_BELOW:
        return channel_weight, f"norm loss ({passed:.3f} of the stream's energy passes the readers' gains)"
    return None, f"token loss ({passed:.3f} of the stream's energy passes the readers' gains)"


@torch.no_grad()
def eval_loss(forward: Forward, x: torch.Tensor, t: torch.Tensor, batch: int, kind: str,
              channel_weight: Optional[torch.Tensor] = None) -> float:
    total = 0.0
    for s in range(0, x.shape[0], batch):
        y = forward(x[s:s + batch])
        total += float(reconstruction_loss(y, t[s:s + batch].to(y.device), kind, channel_weight)) * y.numel()
    return total / t.numel()


def set_hard(wrappers: Dict[str, QuantLayer], hard: bool) -> None:
    """Soft rounding while learning for the methods that relax it; hard everywhere else."""
    for w in wrappers.values():
        w.wq.hard = hard if type(w.wq).soft_while_learning else True


def optimizer_step(opts, scheds, wrappers: Dict[str, QuantLayer], loss: torch.Tensor) -> None:
    """One learning step: gradients of ``loss``, every optimizer and schedule, then the roundings'
    projections (SignRound keeps its offsets inside their box). Gradients start and end as None."""
    loss.backward()
    for o in opts:
        o.step()
    for sch in scheds:
        sch.step()
    for w in wrappers.values():
        w.wq.project()
    # The gradients are spent: freed now rather than at the next step's zero_grad, they are not
    # held through the next forward (one weight-sized tensor per layer less at its peak).
    for o in opts:
        o.zero_grad()


@torch.no_grad()
def start_activation_grids(forward: Forward, wrappers: Dict[str, QuantLayer], x: torch.Tensor, batch: int) -> None:
    """Initialize every activation quantizer from the inputs its layer sees while ``x`` passes."""
    with_aq = [w for w in wrappers.values() if w.aq is not None]
    if not with_aq:
        return
    for w in with_aq:
        w.aq.enabled, w.record = False, []
    run_stream(forward, x, batch)
    for w in with_aq:
        w.aq.init_from(torch.cat([r.reshape(-1) for r in w.record]))
        w.aq.enabled, w.record = True, None


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``; a tensor whose elements are bit for bit one value (FlexRound's log-scales
    before learning are all +0.0) is kept as that element broadcast to the shape: the same values
    when loaded back, and no weight-sized copy held while the unit learns."""
    flat = t.detach().reshape(-1)
    if flat.numel() > 1 and t.is_floating_point() and t.element_size() in _BITS:
        bits = flat.view(_BITS[t.element_size()])
        if bool((bits == bits[0]).all()):
            return flat[:1].clone().expand(t.shape)
    return t.detach().clone()


def _state(wrappers):
    """A copy of the wrappers' learned state. Buffers (the float weight, the initial grid, the
    activation grid's start) do not change while learning, so they are shared rather than
    copied: that saves one weight-sized copy per layer while a unit learns."""
    def snapshot(w):
        return {k: (_copy(t) if isinstance(t, nn.Parameter) else t) for k, t in w.state_dict(keep_vars=True).items()}
    return {k: snapshot(w) for k, w in wrappers.items()}


def _load_state(wrappers, state):
    for k, w in wrappers.items():
        w.load_state_dict(state[k])


@dataclasses.dataclass
class UnitData:
    """The streams one unit learns from.

    xq, xfp, targets: quantized-stream inputs, float-stream inputs, float outputs (same rows).
    check: ``(inputs, float targets)`` on which the loss before and after learning is measured;
    the learned rounding is kept only if it lowers that loss.
    act_init: inputs whose statistics start the activation grids.
    batch: mini-batch of the evaluation passes.
    channel_weight: per output channel weight of the ``"norm"`` loss (None: unweighted).
    loss_choice: what the ``"auto"`` loss chose for this unit ("" for the other losses)."""

    xq: torch.Tensor
    xfp: torch.Tensor
    targets: torch.Tensor
    check: Tuple[torch.Tensor, torch.Tensor]
    act_init: torch.Tensor
    batch: int
    channel_weight: Optional[torch.Tensor] = None
    loss_choice: str = ""


def _optimizers(wrappers: Dict[str, QuantLayer], cfg: QuantizeConfig):
    method = method_class(cfg.method)
    lr = cfg.learning_rate
    wgroups = [g for w in wrappers.values() for g in w.wq.param_groups(lr)]
    aparams = [p for w in wrappers.values() if w.aq is not None for p in w.aq.parameters()]
    opts = [method.make_optimizer(wgroups, lr, cfg.iters)]
    if aparams and cfg.act_lr > 0:
        opts.append(torch.optim.Adam(aparams, lr=cfg.act_lr, fused=True))
    # Linear decay to zero: short schedules end with small steps, so the last iterate (the one
    # exported) is not a random point of a noisy walk around the optimum. Optimizers that are not
    # torch optimizers (SignSGD) carry their own schedule.
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 - t / cfg.iters)
              for o in opts if isinstance(o, torch.optim.Optimizer) and cfg.lr_decay]
    return opts, scheds


def learn_unit(index: int, forward: Forward, wrappers: Dict[str, QuantLayer], data: UnitData, cfg: QuantizeConfig,
               label: str, log: Callable[[str], None]) -> Tuple[float, float]:
    """Learn one unit's rounding (and activation grids); returns the check loss (before, after).

    ``forward`` maps a batch of unit inputs to the unit's output with ``wrappers`` installed;
    ``index`` seeds the unit's batch order and QDrop masks."""
    method = method_class(cfg.method)
    start_activation_grids(forward, wrappers, data.act_init, data.batch)
    set_hard(wrappers, True)
    before = eval_loss(forward, *data.check, data.batch, cfg.loss, data.channel_weight)
    if cfg.iters == 0 or not method.learns:
        return before, before
    init_state = _state(wrappers)
    set_hard(wrappers, False)
    opts, scheds = _optimizers(wrappers, cfg)
    reg_weight = 0.0
    if method.regularizer_weight is not None:
        # Scaled by the unit's initial loss so that one weight suits every unit.
        reg_weight = float(cfg.options.get("reg_weight", method.regularizer_weight)) * before
    best_loss, best_state = float("inf"), None

    n = data.xq.shape[0]
    bs = min(cfg.batch_size, n)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range((cfg.iters * bs) // n + 1)])
    it: Iterable[int] = range(cfg.iters)
    if cfg.progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=label, leave=False, unit="it")
    for step in it:
        idx = order[step * bs:(step + 1) * bs]
        xin = data.xq[idx]
        if cfg.qdrop > 0:
            # The mask comes from the CPU generator on every device: same seed, same masks.
            keep_fp = torch.rand(xin.shape, generator=gen) < cfg.qdrop
            xin = torch.where(keep_fp.to(xin.device), data.xfp[idx], xin)
        y = forward(xin)
        rec = reconstruction_loss(y, data.targets[idx].to(y.device), cfg.loss, data.channel_weight)
        loss = rec
        if reg_weight:
            regs = [r for r in (w.wq.regularizer(step / cfg.iters) for w in wrappers.values()) if r is not None]
            if regs:
                loss = loss + reg_weight * torch.stack(regs).mean()
        if not torch.isfinite(loss):
            raise QuantizationError(
                f"{label}: the loss became {float(loss.detach())} at iteration {step}; learning stopped. Units before "
                f"this one are finished (and saved if resume_dir was given). Try a smaller lr (now "
                f"{cfg.learning_rate:g}) or check the model's activations for Inf/NaN.")
        if method.keep_best and float(rec.detach()) < best_loss:
            best_loss, best_state = float(rec.detach()), _state(wrappers)
        optimizer_step(opts, scheds, wrappers, loss)
        if cfg.progress and step % 10 == 0:
            it.set_postfix(loss=f"{float(rec.detach()):.3e}")
    if best_state is not None:
        _load_state(wrappers, best_state)
    set_hard(wrappers, True)
    after = eval_loss(forward, *data.check, data.batch, cfg.loss, data.channel_weight)
    if not after <= before:  # also catches NaN
        # Learning made this unit worse on the check inputs (short schedule, noisy batches):
        # ship the initial grid instead.
        _load_state(wrappers, init_state)
        log(f"{label}: learned loss {after:.4e} is not below the initial {before:.4e}; keeping the initial grid")
        after = before
    return before, after


# -- the unit loop ---------------------------------------------------------------------------
@dataclasses.dataclass
class Unit:
    """One piece of a model that is learned at once.

    root: the module the layer names are relative to (wrappers and frozen layers go there).
    layers: ``(name, float layer)`` pairs to quantize (empty: the unit is only propagated).
    forward: one batch through the unit as currently installed in ``root``.
    run_float: the float unit over a whole stream (the targets).
    output_gains: per-channel gains of the norms that read the unit's output on the residual
    stream (the ``"norm"`` loss); empty where none are known."""

    label: str
    root: nn.Module
    layers: List[Tuple[str, nn.Module]]
    forward: Forward
    run_float: Forward
    output_gains: Tuple[torch.Tensor, ...] = ()


class Family:
    """How one kind of model is quantized unit by unit; the loop calls these in order.
    Subclasses implement :meth:`units` and :meth:`wrap`; the other hooks default to nothing."""

    #: rows of whole-stream passes through a unit (targets and propagation)
    stream_batch: int = 8
    #: rows of the activation-grid start (None: the check inputs)
    act_init_rows: Optional[int] = None
    #: where the run learns (set by :func:`reconstruct_units` before the first unit)
    placement: Optional[Placement] = None

    def place(self, placement: Placement) -> None:
        """Move what every unit shares (e.g. a decoder's attention mask and position embeddings)
        to ``placement``'s device; called once, before the first unit."""

    def unit_done(self, unit: Unit, index: int, exported: Dict[str, nn.Module]) -> None:
        """Called when unit ``index`` is finished, exported and deployed (its layers on the CPU),
        e.g. to write it out and release it (:mod:`quantizer.streaming`)."""

    def units(self) -> Iterable[Unit]:
        raise NotImplementedError

    def wrap(self, unit: Unit, name: str, layer: nn.Module) -> QuantLayer:
        raise NotImplementedError

    def before_wrapping(self, unit: Unit, xq: torch.Tensor) -> None:
        """Change the float unit before its layers are wrapped or loaded from a resume directory
        (e.g. SmoothQuant); ``xq`` are the unit's quantized-stream inputs."""

    def after_learning(self, unit: Unit, wrappers: Dict[str, QuantLayer], xfp: torch.Tensor,
                       xq: torch.Tensor) -> bool:
        """Adjust the learned wrappers (e.g. bias correction); True if they changed."""
        return False

    def deploy(self, unit: Unit, name: str, exported: nn.Module) -> None:
        """Put the exported layer where it ships (default: in ``unit.root``)."""
        set_submodule(unit.root, name, exported)


def _learn_and_export(family: Family, unit: Unit, forward: Forward, index: int, data: UnitData, cfg: QuantizeConfig,
                      log: Callable[[str], None]) -> Tuple[Dict[str, nn.Module], float, float]:
    """Wrap the unit's layers, learn them, let the family adjust them; ``(exported layers, check
    loss before, after)``. On any error the unit gets its float layers back."""
    wrappers = {}
    for name, layer in unit.layers:
        wrappers[name] = family.wrap(unit, name, layer)
        set_submodule(unit.root, name, wrappers[name])
    try:
        before, after = learn_unit(index, forward, wrappers, data, cfg, unit.label, log)
        if family.after_learning(unit, wrappers, data.xfp, data.xq):
            after = eval_loss(forward, *data.check, data.batch, cfg.loss, data.channel_weight)
    except BaseException:
        # Leave the model usable: this unit goes back to its float layers.
        for name, layer in unit.layers:
            set_submodule(unit.root, name, layer)
        raise
    return {name: w.export() for name, w in wrappers.items()}, before, after


def _load_finished(resume: "ResumeDir", index: int, unit: Unit) -> Dict[str, nn.Module]:
    exported = resume.load_block(index)
    expected = sorted(n for n, _ in unit.layers)
    if sorted(exported) != expected:
        raise ValueError(f"resume_dir={resume.path!r}: block {index} holds layers {sorted(exported)}; "
                         f"expected {expected}")
    return exported


def _check_budget(unit: Unit, need: UnitNeed, place: Placement, budget: Optional[int]) -> None:
    """Decide where the streams live (CUDA: on the device when they fit next to the unit) and
    refuse a unit that cannot fit ``budget`` bytes (the compute device's memory for this run;
    None: no limit on the CPU, the free memory on CUDA)."""
    if not place.is_cpu:
        limit = budget if budget is not None else place.device_free()
        place.streams_to(need.on_device(True) <= limit)
        if need.on_device(False) > limit:
            raise MemoryBudgetError(
                f"{unit.label}: needs about {need.on_device(False) / 2**30:.2f} GiB on {place.device} "
                f"({need.describe()}, streams in pinned CPU memory); "
                f"{'memory_budget' if budget is not None else 'free device memory'}={limit} bytes. Expected at least "
                f"{need.on_device(False)} bytes: use a larger memory_budget or device, or fewer seqlen tokens")
        return
    if budget is not None and need.on_device(True) > budget:
        raise MemoryBudgetError(
            f"{unit.label}: needs about {need.on_device(True) / 2**30:.2f} GiB ({need.describe()}); "
            f"memory_budget={budget} bytes. Expected a budget of at least {need.on_device(True)} bytes: raise "
            "memory_budget, or lower nsamples/seqlen (the streams)")


def _unit_data(family: Family, cfg: QuantizeConfig, xq, xfp, targets, hq, htargets,
               output_gains: Tuple[torch.Tensor, ...] = ()) -> UnitData:
    ne = min(cfg.eval_samples, xq.shape[0])
    check = (hq, htargets) if hq is not None else (xq[:ne], targets[:ne])
    act_init = xq[:family.act_init_rows] if family.act_init_rows else xq[:ne]
    weight = norm_channel_weight(list(output_gains)) if cfg.loss in NORM_WEIGHTED_LOSSES else None
    if weight is not None and weight.shape[0] != targets.shape[-1]:
        weight = None  # the norm does not read this output as it is (a family's unusual layout)
    choice = ""
    if cfg.loss == "auto":
        weight, choice = auto_channel_weight(targets, weight)
    if weight is not None and family.placement is not None:
        weight = family.placement.compute(weight)  # once per unit, not at every loss evaluation
    return UnitData(xq, xfp, targets, check, act_init, cfg.batch_size, weight, choice)


def reconstruct_units(family: Family, x: torch.Tensor, cfg: QuantizeConfig, log: Callable[[str], None],
                      resume: Optional["ResumeDir"] = None, holdout: Optional[torch.Tensor] = None,
                      place: Optional[Placement] = None) -> List[dict]:
    """Quantize every unit of ``family`` in order, starting from the first unit's inputs ``x``.

    resume: units it already holds are loaded instead of learned; every newly finished unit is
    saved to it.
    holdout: inputs never learned on, carried through the float and the quantized units like
    ``x``; when given they decide whether each unit keeps its learned rounding (else the first
    ``cfg.eval_samples`` rows of ``x`` do).
    place: where units learn and streams live (default: the CPU, everything in place).

    Returns one dict per unit learned or loaded (a stable interface, read by the scale bench):
    ``unit`` (index), ``label``, ``loss_before``, ``loss_after`` (NaN for loaded units),
    ``seconds`` (wall time of the unit, targets and propagation included), ``rss_bytes`` (process
    resident size when the unit is done), ``rss_peak_bytes`` (the process's resident high-water
    mark so far, VmHWM), ``rss_peak_delta_bytes`` (how much this unit raised that mark),
    ``need_bytes`` (the estimated need, :func:`quantizer.placement.unit_need`), ``device`` and
    ``device_peak_bytes`` (``torch.cuda.max_memory_allocated`` during the unit; None on the CPU),
    ``loss_choice`` (what ``loss="auto"`` chose for the unit and why; "" otherwise)."""
    place = place or Placement(torch.device("cpu"))
    family.placement = place
    family.place(place)
    xfp, xq = place.store(x), place.clone_stream(x)
    hfp, hq = (place.store(holdout), place.clone_stream(holdout)) if holdout is not None else (None, None)
    # Only the streams keep the inputs alive from here on (a caller that passes its last reference
    # saves one stream of memory: see quantizer.streaming).
    del x, holdout
    learns = method_class(cfg.method).learns and cfg.iters > 0
    pb = family.stream_batch
    stats = []
    for i, unit in enumerate(family.units()):
        tu, hwm = time.time(), rss_peak_bytes()
        place.reset_peak()
        need = None
        if unit.layers:
            need = unit_need(unit.root, unit.layers, xq, cfg.batch_size, learns)
            _check_budget(unit, need, place, cfg.memory_budget)
            xfp, xq = place.store(xfp), place.store(xq)
            hfp, hq = (place.store(hfp), place.store(hq)) if hq is not None else (None, None)
        if not place.is_cpu:
            unit.root.to(place.device)
        forward, run_float = place.forward(unit.forward), place.forward(unit.run_float)
        targets = run_stream(run_float, xfp, pb, place)
        htargets = run_stream(run_float, hfp, pb, place) if hfp is not None else None
        if unit.layers:
            torch.manual_seed(cfg.seed * 1_000_003 + i)
            # Also for a unit loaded from ``resume``: what this changes outside the quantized
            # layers (SmoothQuant rescales norms) is not in the saved files and must be redone.
            family.before_wrapping(unit, xq)
            if resume is not None and i < resume.finished:
                exported, before, after = _load_finished(resume, i, unit), float("nan"), float("nan")
                choice = ""
                exported = {name: layer.to(place.device) for name, layer in exported.items()}
            else:
                data = _unit_data(family, cfg, xq, xfp, targets, hq, htargets, unit.output_gains)
                choice = data.loss_choice
                exported, before, after = _learn_and_export(family, unit, forward, i, data, cfg, log)
                del data  # it holds views of the streams, which must die when they are replaced
            # Advance the quantized streams through the unit exactly as exported.
            for name, layer in exported.items():
                set_submodule(unit.root, name, FrozenLayer(layer))
        # The float inputs are no longer needed: free them before the quantized stream is copied.
        xfp, hfp = targets, htargets
        xq = run_stream(forward, xq, pb, place)
        hq = run_stream(forward, hq, pb, place) if hq is not None else None
        if not place.is_cpu:
            # The exported layers ship from the CPU; the unit's float parts go back there too.
            exported = {name: layer.to("cpu") for name, layer in exported.items()} if unit.layers else {}
        if unit.layers:
            for name, layer in exported.items():
                family.deploy(unit, name, layer)
        if not place.is_cpu:
            unit.root.to("cpu")
        if not unit.layers:
            continue
        if resume is not None and i >= resume.finished:
            resume.save_block(i, exported)
        family.unit_done(unit, i, exported)
        release_free_heap()
        seconds = time.time() - tu
        peak = rss_peak_bytes()
        st = {"unit": i, "label": unit.label, "loss_before": before, "loss_after": after, "seconds": seconds,
              "rss_bytes": rss_bytes(), "rss_peak_bytes": peak, "rss_peak_delta_bytes": peak - hwm,
              "need_bytes": need.on_device(True), "device": str(place.device),
              "device_peak_bytes": place.device_peak(), "loss_choice": choice}
        memory = f"RSS {st['rss_bytes'] / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB"
        if st["device_peak_bytes"] is not None:
            memory += f", {place.device} peak {st['device_peak_bytes'] / 2**30:.2f} GiB"
        if before == before:
            log(f"{unit.label}: loss {before:.4e} -> {after:.4e} ({seconds:.1f} s, {memory}"
                + (f"; {choice})" if choice else ")"))
        else:
            log(f"{unit.label}: loaded from resume_dir ({seconds:.1f} s, {memory})")
        stats.append(st)
        if not torch.isfinite(xq).all():
            raise QuantizationError(f"{unit.label}: the quantized model's activations became non-finite "
                                    "after this unit")
    return stats
