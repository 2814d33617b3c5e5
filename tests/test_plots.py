"""Plot data (grid shift) is computed correctly and every plot writes a PNG."""

import pytest
import torch
from torch import nn

from fxkernels import QuantLinear, QuantSpec
from fxkernels.format import quantize_rtn
from quantizer import plots


def test_grid_shift_is_zero_for_rtn_and_counts_moves():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    spec = QuantSpec(4, "channel")
    rtn = QuantLinear.from_linear(lin, spec)
    assert (plots.grid_shift(lin.weight, rtn)["shift"] == 0).all()
    q, s, z = quantize_rtn(lin.weight.detach(), spec)
    moved = q.clone()
    moved[0, 0] = min(int(q[0, 0]) + 2, 15) if q[0, 0] <= 13 else int(q[0, 0]) - 2
    layer = QuantLinear.from_codes(moved, s, z, spec)
    shift = plots.grid_shift(lin.weight, layer)["shift"]
    assert int((shift != 0).sum()) == 1 and abs(int(shift[0])) == 2


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    lin = nn.Linear(32, 8)
    layer = QuantLinear.from_linear(lin, QuantSpec(4, "channel"))
    for path in (plots.plot_grid_shift(lin.weight, layer, str(tmp_path / "g.png")),
                 plots.plot_ppl_vs_bits([{"method": "rtn", "bits": 4, "ppl": 30.0},
                                         {"method": "rtn", "bits": 3, "ppl": 400.0}], str(tmp_path / "p.png"), 18.5),
                 plots.plot_speed_vs_m([{"kernel": "cpu", "M": 1, "ms": 0.5}, {"kernel": "cpu", "M": 8, "ms": 0.9}],
                                       str(tmp_path / "s.png"))):
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
