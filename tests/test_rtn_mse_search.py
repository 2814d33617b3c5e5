"""quantize_rtn's clipping search runs over blocks of rows with in-place ops: the grid it picks must
be the one of the whole-weight search it replaced, bit for bit (same seed: same codes)."""

import pytest
import torch

from fxkernels import format as fmt
from fxkernels.format import QuantSpec, grid_from_range, quantize_codes, quantize_rtn


def _whole_weight_search(w, spec, grid=100, max_shrink=0.8, norm=2.4):
    """The search as one pass over the whole weight per shrink factor (the earlier implementation)."""
    n, k = w.shape
    rows = fmt._reduce_rows(w.detach().float(), spec)
    lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    scale, zero = grid_from_range(lo, hi, spec)
    best_err = torch.full_like(lo, float("inf"))
    for i in range(int(max_shrink * grid) + 1):
        f = 1 - i / grid
        s, z = grid_from_range(lo * f, hi * f, spec)
        q = torch.clamp(torch.round(rows / s[:, None]) + z[:, None], 0, spec.qmax)
        err = ((q - z[:, None]) * s[:, None] - rows).abs().pow(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    shape = spec.scale_shape(n, k)
    scale, zero = scale.reshape(shape), zero.reshape(shape)
    return quantize_codes(w, scale, zero, spec), scale, zero


CASES = [
    (QuantSpec(4, "channel"), 1100, 256),          # three blocks of rows, the last one short
    (QuantSpec(4, "channel"), 200, 2048),          # the 1B model's K
    (QuantSpec(3, "channel", symmetric=True), 97, 512),
    (QuantSpec(4, "group", 128), 1100, 512),       # 4400 rows of 128: three blocks
    (QuantSpec(2, "group", 32), 64, 96),           # rows of 32: the whole-weight pass
    (QuantSpec(4, "channel"), 600, 352),           # K not a multiple of 64: the whole-weight pass
    (QuantSpec(8, "channel"), 5, 33),              # 8 bits: any K
    (QuantSpec(4, "tensor"), 64, 128),             # one row
]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("spec,n,k", CASES, ids=[f"{s}-{n}x{k}" for s, n, k in CASES])
@pytest.mark.parametrize("scale_by", [1.0, 1e-3])
def test_blocked_search_is_the_whole_weight_search_bit_for_bit(spec, n, k, scale_by, threads):
    g = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g) * scale_by
    w[0].zero_()  # an all-zero row takes the 1e-8 scale
    w[min(2, n - 1), : k // 2] *= 40  # outliers: clipping pays off
    q, s, z = quantize_rtn(w, spec, mse=True)
    assert torch.get_num_threads() == threads  # the search gives the caller's thread count back
    q0, s0, z0 = _whole_weight_search(w, spec)
    assert s.dtype == s0.dtype and z.dtype == z0.dtype
    assert torch.equal(s, s0) and torch.equal(z, z0) and torch.equal(q, q0)


def test_block_size_does_not_change_the_grid(monkeypatch):
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(5))
    spec = QuantSpec(4, "channel")
    ref = quantize_rtn(w, spec, mse=True)
    for elements in (1, 256 * 7, 1 << 30):  # one row per block, 7 rows, everything at once
        monkeypatch.setattr(fmt, "_MSE_BLOCK_ELEMENTS", elements)
        out = quantize_rtn(w, spec, mse=True)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
