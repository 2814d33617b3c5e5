"""The packed weight layout of the checkpoint format: the executable specification.

Every quantized layer (linear, or a convolution viewed as its ``[N, K]`` weight matrix) is
described by a :class:`QuantSpec` and three tensors:

* ``qweight``: the integer codes of the weight ``W`` (shape ``[N, K]``, out x in), stored
  - for ``bits <= 4``: ``uint8 [N, ceil(K/2)]``, two codes per byte along K, the code of the
    even column ``k`` in the low nibble and of ``k+1`` in the high nibble. 2- and 3-bit codes
    also take a nibble (one kernel family serves all low-bit widths);
  - for ``5 <= bits <= 8``: ``int8 [N, K]`` holding ``q - 128`` (the unsigned code shifted into
    the signed range, so integer GEMMs can read it as a plain int8 operand).
* ``scale``: ``float32``, shape ``[1]`` (tensor), ``[N]`` (channel) or ``[N, K // group_size]``
  (group).
* ``zero``: ``int32``, same shape as ``scale``: the integer zero point in the *unsigned* code
  domain ``[0, 2**bits - 1]``. Symmetric specs always have ``zero == 2**(bits-1)``.

Dequantization is ``W[n, k] = scale[n, g(k)] * (q[n, k] - zero[n, g(k)])`` with ``q`` the
unsigned code in ``[0, 2**bits - 1]``. This module is the only place that knows the byte layout;
kernels may repack once at load but must agree with :func:`unpack` bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

# quant_config.json version (docs/FORMAT.md). 2 added the optional per-layer "input_rotation"; 3 gives
# every layer entry its "kind" (fxkernels.layers) and folds the CNN tables into "layers". The tensor
# layout below has not changed since 1, and versions 1 and 2 still load.
FORMAT_VERSION = 3
GRANULARITIES = ("tensor", "channel", "group")
ACT_MODES = ("static", "dynamic")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How a weight (and optionally the activation feeding it) is quantized.

    bits: weight code width, 2..8.
    granularity: "tensor" (one scale), "channel" (one per output row) or "group"
        (one per ``group_size`` consecutive input columns of each row).
    group_size: columns per group; required for "group", ignored otherwise.
    symmetric: zero point fixed at ``2**(bits-1)``; otherwise a learned/min-max integer zero.
    act_bits: None for weight-only; 8 quantizes the layer input to int8 (W4A8 / W8A8).
    act_mode: "static" (per-tensor scale and zero fixed at calibration, stored in the
        checkpoint) or "dynamic" (asymmetric per-token, computed at run time).
    """

    bits: int = 4
    granularity: str = "channel"
    group_size: Optional[int] = None
    symmetric: bool = False
    act_bits: Optional[int] = None
    act_mode: str = "dynamic"

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec: bits={self.bits!r}; expected an integer in 2..8")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec: granularity={self.granularity!r}; expected one of {GRANULARITIES}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 2:
                raise ValueError(
                    f"QuantSpec: group_size={self.group_size!r}; expected a positive even integer "
                    "when granularity='group'")
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        if self.act_bits not in (None, 8):
            raise ValueError(f"QuantSpec: act_bits={self.act_bits!r}; expected None or 8")
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"QuantSpec: act_mode={self.act_mode!r}; expected one of {ACT_MODES}")

    # -- derived facts -------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def packed(self) -> bool:
        """True when codes share bytes (two nibbles per uint8)."""
        return self.bits <= 4

    @property
    def storage_offset(self) -> int:
        """What is subtracted from an unsigned code before it is stored (128 for int8 storage)."""
        return 0 if self.packed else 128

    def num_groups(self, in_features: int) -> int:
        return in_features // self.group_size if self.granularity == "group" else 1

    def scale_shape(self, out_features: int, in_features: int) -> Tuple[int, ...]:
        if self.granularity == "tensor":
            return (1,)
        if self.granularity == "channel":
            return (out_features,)
        return (out_features, in_features // self.group_size)

    def packed_shape(self, out_features: int, in_features: int) -> Tuple[int, int]:
        return (out_features, (in_features + 1) // 2) if self.packed else (out_features, in_features)

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise if a [out_features, in_features] weight cannot be stored with this spec."""
        if self.packed and in_features % 2:
            raise ValueError(
                f"in_features={in_features}: {self.bits}-bit codes pack two per byte, so the input "
                "dimension must be even")
        if self.granularity == "group" and in_features % self.group_size:
            raise ValueError(
                f"in_features={in_features} is not divisible by group_size={self.group_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"QuantSpec: unknown fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

    def __str__(self) -> str:
        g = {"tensor": "per-tensor", "channel": "per-channel"}.get(
            self.granularity, f"g{self.group_size}")
        a = f"A{self.act_bits}-{self.act_mode}" if self.act_bits else ""
        return f"W{self.bits}{a} {g} {'sym' if self.symmetric else 'asym'}"


# -- broadcasting scale/zero over the weight ---------------------------------------------
def expand_per_weight(t: torch.Tensor, spec: QuantSpec, out_features: int, in_features: int) -> torch.Tensor:
    """Broadcast a scale or zero tensor of ``spec.scale_shape`` to ``[N, K]``."""
    if spec.granularity == "tensor":
        return t.reshape(1, 1).expand(out_features, in_features)
    if spec.granularity == "channel":
        return t.reshape(out_features, 1).expand(out_features, in_features)
    return t.repeat_interleave(spec.group_size, dim=1)


def as_grouped(t: torch.Tensor, spec: QuantSpec, out_features: int) -> torch.Tensor:
    """Scale/zero as ``[N, num_groups]`` (the layout every kernel takes)."""
    if spec.granularity == "tensor":
        return t.reshape(1, 1).expand(out_features, 1).contiguous()
    if spec.granularity == "channel":
        return t.reshape(out_features, 1).contiguous()
    return t.contiguous()


# -- pack / unpack -----------------------------------------------------------------------
def pack(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Unsigned codes ``[N, K]`` (any integer dtype, values in ``[0, 2**bits-1]``) -> storage."""
    if q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack: q has dtype {q.dtype} and shape {tuple(q.shape)}; expected a 2-D integer tensor")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > spec.qmax):
        raise ValueError(
            f"pack: codes span [{int(q.min())}, {int(q.max())}]; expected [0, {spec.qmax}] for {spec.bits} bits")
    n, k = q.shape
    if spec.packed:
        if k % 2:
            raise ValueError(f"pack: K={k} is odd; {spec.bits}-bit codes pack two per byte along K")
        q = q.to(torch.uint8)
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return (q.to(torch.int16) - 128).to(torch.int8).contiguous()


def unpack(qweight: torch.Tensor, spec: QuantSpec, in_features: Optional[int] = None) -> torch.Tensor:
    """Storage -> unsigned codes ``[N, K]`` as ``int32``; exact inverse of :func:`pack`."""
    if spec.packed:
        if qweight.dtype != torch.uint8:
            raise ValueError(f"unpack: qweight dtype {qweight.dtype}; expected torch.uint8 for {spec.bits} bits")
        lo = (qweight & 0xF).to(torch.int32)
        hi = (qweight >> 4).to(torch.int32)
        q = torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], -1)
        return q if in_features is None else q[:, :in_features]
    if qweight.dtype != torch.int8:
        raise ValueError(f"unpack: qweight dtype {qweight.dtype}; expected torch.int8 for {spec.bits} bits")
    return qweight.to(torch.int32) + 128


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight a checkpoint stands for: ``scale * (q - zero)``, computed in fp32."""
    q = unpack(qweight, spec, in_features)
    n = q.shape[0]
    s = expand_per_weight(scale.float(), spec, n, in_features)
    z = expand_per_weight(zero.to(torch.int32), spec, n, in_features)
    return ((q - z).float() * s).to(dtype)


# -- round to nearest --------------------------------------------------------------------
def _reduce_rows(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View the weight so that each row of the result shares one scale."""
    n, k = w.shape
    if spec.granularity == "tensor":
        return w.reshape(1, -1)
    if spec.granularity == "channel":
        return w
    return w.reshape(n * (k // spec.group_size), spec.group_size)


def grid_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero (unsigned domain) covering ``[lo, hi]`` (per row, fp32)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.symmetric:
        half = 1 << (spec.bits - 1)
        absmax = torch.maximum(-lo, hi)
        # The negative side has one more level (-half); use the positive side's half-1 levels
        # for the largest magnitude so nothing clips on either side.
        scale = absmax / (half - 1)
        zero = torch.full_like(scale, half, dtype=torch.int32)
    else:
        scale = (hi - lo) / spec.qmax
        zero = None
    scale = torch.where(scale > 0, scale, torch.ones_like(scale) * 1e-8)  # all-zero rows
    if zero is None:
        zero = torch.clamp(torch.round(-lo / scale), 0, spec.qmax).to(torch.int32)
    return scale.float(), zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest codes of ``w`` ``[N, K]`` on a given grid (scale/zero in spec shape)."""
    n, k = w.shape
    s = expand_per_weight(scale.float(), spec, n, k)
    z = expand_per_weight(zero.to(torch.int32), spec, n, k)
    return torch.clamp(torch.round(w.float() / s) + z, 0, spec.qmax).to(torch.int32)


def check_weight(w: torch.Tensor, name: str = "weight") -> None:
    if w.dim() != 2:
        raise ValueError(f"{name}: shape {tuple(w.shape)}; expected a 2-D [out_features, in_features] tensor")
    if not w.dtype.is_floating_point:
        raise ValueError(f"{name}: dtype {w.dtype}; expected a floating-point tensor")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name}: contains {bad} NaN/Inf values; expected finite weights")


# Elements per block of rows in quantize_rtn's clipping search (128K fp32: 512 KiB per temporary).
_MSE_BLOCK_ELEMENTS = 1 << 17


def _mse_search(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                spec: QuantSpec, grid: int, max_shrink: float, norm: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The clipping search of :func:`quantize_rtn` over some rows: the grid, per row, whose range
    shrunk by ``1 - i / grid`` (``i = 0 .. max_shrink * grid``) gives the least ``sum |w - dequant|^norm``
    (the first such factor on ties); ``scale``/``zero`` are the min-max grid it starts from."""
    best_err = torch.full_like(lo, float("inf"))
    for i in range(int(max_shrink * grid) + 1):
        f = 1 - i / grid
        s, z = grid_from_range(lo * f, hi * f, spec)
        s2, z2 = s[:, None], z[:, None]
        # in place, op for op what clamp(round(rows / s) + z, 0, qmax), then ((q - z) * s - rows).abs()
        # .pow(norm).sum(1) compute, without a fresh temporary per op
        e = torch.div(rows, s2).round_().add_(z2).clamp_(0, spec.qmax)
        e = e.sub_(z2).mul_(s2).sub_(rows).abs_().pow_(norm)
        err = e.sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_rtn(w: torch.Tensor, spec: QuantSpec, mse: bool = False,
                 grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of a ``[N, K]`` weight.

    Returns ``(q, scale, zero)``: unsigned int32 codes ``[N, K]`` and the grid in
    ``spec.scale_shape``. With ``mse=True`` the range of every scale row is shrunk by the factor
    in ``[1 - max_shrink, 1]`` that minimizes ``sum |w - dequant(q)|^norm`` (the clipping search of
    GPTQ/OmniQuant-style RTN), which often beats min-max at 3-4 bits.
    """
    check_weight(w)
    n, k = w.shape
    spec.check_shape(n, k)
    rows = _reduce_rows(w.detach().float(), spec)
    lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    scale, zero = grid_from_range(lo, hi, spec)
    if mse and rows.shape[0] > 1 and rows.shape[1] % 64 == 0:
        # Rows are independent: the search runs over blocks of rows whose temporaries stay in
        # cache, on one thread (a parallel region per small op spends more time waiting than
        # computing, worst when other work shares the cores: 4.3 s instead of 24-50 s for a
        # 5632x2048 weight on a busy 2-core host). Every element sees the same operations as in a
        # whole-weight pass and each row's error is summed on its own, so the grid is the same bit
        # for bit. Row lengths that are a multiple of 64 keep every vectorized loop free of scalar
        # tails (whose pow may differ from the vector one in the last bit); others, and a
        # per-tensor grid (one row, whose sum is split across threads), take the whole-weight pass.
        step = max(1, _MSE_BLOCK_ELEMENTS // rows.shape[1])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            parts = [_mse_search(rows[r:r + step], lo[r:r + step], hi[r:r + step], scale[r:r + step],
                                 zero[r:r + step], spec, grid, max_shrink, norm)
                     for r in range(0, rows.shape[0], step)]
        finally:
            torch.set_num_threads(threads)
        scale = torch.cat([s for s, _ in parts])
        zero = torch.cat([z for _, z in parts])
    elif mse:
        scale, zero = _mse_search(rows, lo, hi, scale, zero, spec, grid, max_shrink, norm)
    shape = spec.scale_shape(n, k)
    scale, zero = scale.reshape(shape), zero.reshape(shape)
    return quantize_codes(w, scale, zero, spec), scale, zero


@torch.no_grad()
def register_layer_buffers(module: torch.nn.Module, spec: QuantSpec, out_features: int, in_features: int,
                           bias: bool, device=None) -> None:
    """Give ``module`` the buffers a quantized ``[out_features, in_features]`` weight is stored in:
    ``qweight`` (``spec.packed_shape``: uint8 nibbles or int8), ``scale`` fp32 and ``zero`` int32 of
    ``spec.scale_shape``, ``bias`` fp32 ``[N]`` (None when ``bias`` is false), and for static
    activations ``act_scale`` fp32 ``[1]`` and ``act_zero`` int32 ``[1]`` (plain None attributes
    otherwise). Every quantized layer kind stores this set under these names (docs/FORMAT.md).
    Values are placeholders (scale 1, the rest 0) until a checkpoint or codes are loaded."""
    sshape = spec.scale_shape(out_features, in_features)
    qdtype = torch.uint8 if spec.packed else torch.int8
    module.register_buffer("qweight", torch.zeros(spec.packed_shape(out_features, in_features), dtype=qdtype,
                                                  device=device))
    module.register_buffer("scale", torch.ones(sshape, dtype=torch.float32, device=device))
    module.register_buffer("zero", torch.zeros(sshape, dtype=torch.int32, device=device))
    module.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)
    if spec.act_bits and spec.act_mode == "static":
        module.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device))
        module.register_buffer("act_zero", torch.zeros(1, dtype=torch.int32, device=device))
    else:
        module.act_scale = module.act_zero = None
