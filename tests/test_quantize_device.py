"""quantize(device=...): the CPU path is unchanged bit for bit, devices and budgets are checked at
the API boundary, per-block time/memory stats, and (with a GPU) learning on CUDA."""

import pytest
import torch

from fxkernels import QuantLinear
from quantizer import MemoryBudgetError
from quantizer.api import quantize
from quantizer.config import QuantizeConfig
from quantizer.placement import Placement, check_device

from .conftest import quiet_log as quiet
from .conftest import tiny_calibration as calib
from .conftest import tiny_quantize_config as cfg

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(layers=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def codes(model):
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for b, t in m.state_dict().items()}



@pytest.mark.parametrize("method", ["rtn", "flexround"])
def test_explicit_cpu_device_gives_the_default_codes(method):
    """device="cpu" (config field, quantize keyword, torch.device) is the default path: the same
    packed codes, scales and zero points bit for bit (the existing bit-exact tests pin the
    default path itself)."""
    runs = []
    for kw in ({}, {"device": "cpu"}):
        m = tiny_llama()
        quantize(m, calib(), cfg(method=method), log=quiet, **kw)
        runs.append(codes(m))
    m = tiny_llama()
    quantize(m, calib(), cfg(method=method, device=torch.device("cpu")), log=quiet)
    runs.append(codes(m))
    assert len(runs[0]) >= 14 * 3  # qweight, scale, zero of 14 linears
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        assert all(torch.equal(other[k], runs[0][k]) for k in runs[0])


def test_cpu_path_never_calls_cuda(monkeypatch):
    """Nothing in the CPU path may touch CUDA (it would initialize a driver, or fail without one)."""
    def refuse(*a, **k):
        raise AssertionError("a CUDA API was called on the CPU path")

    for name in ("is_available", "device_count", "current_device", "synchronize", "reset_peak_memory_stats",
                 "max_memory_allocated", "mem_get_info", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    m = tiny_llama()
    quantize(m, calib(), cfg(device="cpu", memory_budget=2**30), log=quiet)
    assert len(codes(m)) > 0


def test_devices_that_do_not_exist_are_refused():
    with pytest.raises(ValueError, match=r"device='banana'.*expected 'cpu', 'cuda'"):
        cfg(device="banana")
    with pytest.raises(ValueError, match=r"device='mps'.*'cpu' or 'cuda"):
        cfg(device="mps")
    with pytest.raises(ValueError, match="device=3"):
        cfg(device=3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda'.*no CUDA device.*expected 'cpu'"):
            cfg(device="cuda")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"device='cuda:{n + 2}'"):
        check_device(f"cuda:{n + 2}")
    with pytest.raises(ValueError, match="device='cuda:3'"):  # the keyword of quantize() is checked the same way
        quantize(tiny_llama(1), calib(), cfg(), log=quiet, device="cuda:3" if n <= 3 else "tpu")


def test_device_and_budget_are_not_part_of_the_resume_identity():
    a = cfg().fingerprint_dict()
    b = cfg(device="cpu", memory_budget=123456789).fingerprint_dict()
    assert a == b and "device" not in a and "memory_budget" not in a
    assert QuantizeConfig.from_dict(cfg(memory_budget="2GB").to_dict()).memory_budget == 2 * 10**9


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "lots"])
def test_bad_memory_budget(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        cfg(memory_budget=bad)


def test_too_small_budget_stops_before_learning():
    m = tiny_llama()
    with pytest.raises(MemoryBudgetError, match=r"block 1/2: needs about .*memory_budget=1000 bytes"):
        quantize(m, calib(), cfg(memory_budget=1000), log=quiet)
    # nothing was quantized, the model is left usable in float
    assert not codes(m)
    m(calib()[:1])


def test_each_block_logs_time_and_memory():
    lines = []
    quantize(tiny_llama(), calib(), cfg(iters=2), log=lines.append)
    blocks = [x for x in lines if x.startswith("block ")]
    assert len(blocks) == 2 and all(" s, RSS " in x and "peak" in x for x in blocks), blocks


def test_placement_on_cpu_is_the_identity():
    p = Placement(torch.device("cpu"))
    x = torch.randn(3, 4)

    def f(t):
        return t * 2

    assert p.forward(f) is f and p.compute(x) is x and p.store(x) is x
    kw = {"mask": x, "pos": (x, x)}
    assert p.move_tree(kw) is kw


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_learning_on_cuda_ships_cpu_layers_close_to_the_cpu_run():
    ref = tiny_llama()
    quantize(ref, calib(), cfg(), log=quiet)
    m = tiny_llama()
    stats = []
    quantize(m, calib(), cfg(device="cuda"), log=stats.append)
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert all(t.device.type == "cpu" for t in codes(m).values())
    assert any("cuda:0 peak" in s for s in stats)
    # bf16 autocast changes the learned rounding a little, not the grid: most codes agree
    a, b = codes(ref), codes(m)
    same = sum(int((a[k] == b[k]).sum()) for k in a if k.endswith("qweight"))
    total = sum(a[k].numel() for k in a if k.endswith("qweight"))
    assert same / total > 0.5
