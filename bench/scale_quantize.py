#!/usr/bin/env python
"""Scale bench: quantization time per block and peak memory against model size.

Writes LLaMA-shaped Hugging Face models with random weights (~135M, ~360M, ~1B, ~3B parameters)
tensor by tensor as sharded safetensors (never materializing the model), quantizes each with
RTN and FlexRound (a few steps per block), every run in its own child process so that its peak
RSS is its own, and prints a markdown table (time per block, peak RSS, against parameters),
writes ``scale.json`` (raw figures) and ``scale.png`` (the curves), and states a *predicted* GPU
time for a 7B model from the block FLOPs and bytes (a model, not a measurement).

    OMP_NUM_THREADS=2 .venv/bin/python bench/scale_quantize.py --sizes 135m,360m,1b \
        --methods rtn,flexround --steps 10 --out bench-out/scale

Random-weight models need no tokenizer: calibration is random token ids (deterministic seed).
When the SmolLM2 fp32 cache (``~/.cache/flexround/smollm2-135m-instruct-fp32``, vocabulary 49152)
is present its tokenizer files are copied next to the weights, so a reloaded model can also
generate text. Models are cached in ``--models-dir`` and reused when their recipe matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_CACHE = os.path.expanduser("~/.cache/flexround/smollm2-135m-instruct-fp32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "generation_config.json")
RECIPE_NAME = "random_init.json"
VOCAB = 49152  # SmolLM2's tokenizer


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """The LLaMA hyper-parameters that set parameter count and block cost."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = VOCAB
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_linears(self) -> Dict[str, Tuple[int, int]]:
        """``{relative name: (out_features, in_features)}`` of one decoder block."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, h), "mlp.gate_proj": (self.intermediate, h),
                "mlp.up_proj": (self.intermediate, h), "mlp.down_proj": (h, self.intermediate)}

    def block_params(self) -> int:
        return sum(n * k for n, k in self.block_linears().values()) + 2 * self.hidden

    def params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.block_params() + self.hidden

    def hf_config(self) -> dict:
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                                       intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                                       num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                                       max_position_embeddings=2048, tie_word_embeddings=self.tied,
                                       rms_norm_eps=1e-5, rope_theta=10000.0)
        d = cfg.to_dict()
        d["architectures"] = ["LlamaForCausalLM"]
        d["torch_dtype"] = d["dtype"] = "float32"
        return d


SIZES: Dict[str, LlamaShape] = {
    # SmolLM2-135M's and -360M's shapes (tied embeddings), then the issue's ~1B and ~3B
    "135m": LlamaShape(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, tied=True),
    "360m": LlamaShape(hidden=960, layers=32, intermediate=2560, heads=15, kv_heads=5, tied=True),
    "1b": LlamaShape(hidden=2048, layers=16, intermediate=5632, heads=32, kv_heads=32),
    "3b": LlamaShape(hidden=3072, layers=28, intermediate=8192, heads=24, kv_heads=8),  # LLaMA-3.2-3B's blocks
    # a smoke test of the harness (seconds)
    "tiny": LlamaShape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256),
}
# The model the GPU prediction is for (LLaMA-2-7B's shape).
LLAMA_7B = LlamaShape(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000)


# -- writing a random-weight model, tensor by tensor ----------------------------------------
def tensor_plan(shape: LlamaShape) -> List[Tuple[str, Tuple[int, ...], str]]:
    """``(name, shape, init)`` of every stored tensor of ``LlamaForCausalLM``, in order; init is
    ``"normal"`` (weights) or ``"ones"`` (RMSNorm scales)."""
    plan = [("model.embed_tokens.weight", (shape.vocab, shape.hidden), "normal")]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        plan.append((p + "input_layernorm.weight", (shape.hidden,), "ones"))
        plan += [(p + rel + ".weight", nk, "normal") for rel, nk in shape.block_linears().items()]
        plan.append((p + "post_attention_layernorm.weight", (shape.hidden,), "ones"))
    plan.append(("model.norm.weight", (shape.hidden,), "ones"))
    if not shape.tied:
        plan.append(("lm_head.weight", (shape.vocab, shape.hidden), "normal"))
    return plan


def _recipe(shape: LlamaShape, seed: int, std: float) -> dict:
    return {"shape": dataclasses.asdict(shape), "seed": seed, "std": std, "writer": 1}


def write_random_llama(directory: str, shape: LlamaShape, seed: int = 0, std: float = 0.02,
                       max_shard_bytes="500MB", tokenizer_from: Optional[str] = None) -> str:
    """Write a ``LlamaForCausalLM`` directory with random weights (normal(0, std) linears and
    embeddings, as Hugging Face initializes LLaMA; RMSNorm scales 1) as sharded fp32 safetensors
    + config.json, generating one tensor at a time: memory holds at most about one shard.

    The directory is written atomically; tensor ``i`` of :func:`tensor_plan` is drawn from
    ``torch.Generator().manual_seed(seed * 1_000_003 + i)``, so the weights are reproducible.
    tokenizer_from: a directory whose tokenizer files are copied (its vocabulary must match).
    """
    import torch

    from fxkernels.checkpoint import ShardSink, atomic_directory

    if not isinstance(shape, LlamaShape):
        raise ValueError(f"write_random_llama: shape={shape!r}; expected a LlamaShape")
    if not (isinstance(std, float) and std > 0):
        raise ValueError(f"write_random_llama: std={std!r}; expected a positive float")
    with atomic_directory(directory, prefix=".tmp-random-llama-") as tmp:
        sink = ShardSink(tmp, max_shard_bytes, metadata={"format": "pt"})
        for i, (name, dims, init) in enumerate(tensor_plan(shape)):
            if init == "ones":
                t = torch.ones(dims)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                t = torch.randn(dims, generator=g).mul_(std)
            sink.add(name, t)
            del t
        sink.finish()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(shape.hf_config(), f, indent=2, sort_keys=True)
        if tokenizer_from:
            for fname in TOKENIZER_FILES:
                src = os.path.join(tokenizer_from, fname)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, fname))
        with open(os.path.join(tmp, RECIPE_NAME), "w") as f:
            json.dump(_recipe(shape, seed, std), f, indent=1, sort_keys=True)
    return os.path.abspath(directory)


def cached_random_llama(models_dir: str, size: str, seed: int = 0, std: float = 0.02, log=print) -> str:
    """The directory of size ``size`` under ``models_dir``, written unless an identical one exists."""
    shape = SIZES[size]
    path = os.path.join(models_dir, f"random-llama-{size}-seed{seed}")
    recipe = os.path.join(path, RECIPE_NAME)
    if os.path.exists(recipe):
        with open(recipe) as f:
            if json.load(f) == _recipe(shape, seed, std):
                return path
    t0 = time.perf_counter()
    tok = SMOLLM2_CACHE if shape.vocab == VOCAB and os.path.isdir(SMOLLM2_CACHE) else None
    write_random_llama(path, shape, seed=seed, std=std, tokenizer_from=tok)
    log(f"wrote {path} ({shape.params() / 1e6:.0f}M parameters) in {time.perf_counter() - t0:.1f} s")
    return path


# -- FLOPs and the GPU prediction -------------------------------------------------------------
def block_forward_flops(shape: LlamaShape, tokens: int, seqlen: int) -> float:
    """FLOPs of one block's forward over ``tokens`` tokens in windows of ``seqlen``: 2 per
    multiply-add of the linears, plus causal attention (QK^T and AV over half the window)."""
    linear = 2 * sum(n * k for n, k in shape.block_linears().values())
    attention = 2 * seqlen * shape.hidden  # 2 matmuls x 2 FLOP x seqlen/2 keys x hidden, per token
    return float(tokens) * (linear + attention)


@dataclasses.dataclass(frozen=True)
class GpuAssumptions:
    """What the prediction assumes (each figure is printed next to it)."""

    name: str = "H100/H200 SXM"
    bf16_peak_tflops: float = 989.0  # dense bf16 tensor-core peak of both (H200 = H100 compute)
    mfu: float = 0.30  # fraction reached by one block's matmuls at a few hundred tokens per step
    hbm_tbps: float = 3.35  # H100 SXM (H200: 4.8)
    hbm_efficiency: float = 0.6
    # fp32 bytes moved per weight per learning step by unfused eager ops: the fake-quant forward
    # (read W, S2, write W_hat, temporaries), its backward, and Adam on S2 (param, grad, m, v)
    bytes_per_weight_step: float = 150.0


def predict_flexround_gpu_seconds(shape: LlamaShape, steps: int, nsamples: int, seqlen: int, batch_size: int,
                                  gpu: GpuAssumptions = GpuAssumptions()) -> dict:
    """Predicted seconds to learn every block of ``shape`` with FlexRound on one GPU: per step, a
    forward + backward (3x the forward FLOPs) over ``batch_size * seqlen`` tokens at ``mfu`` of the
    bf16 peak, plus the per-weight elementwise traffic at ``hbm_efficiency`` of the bandwidth; per
    block once, the float and quantized forwards over all calibration windows."""
    w = sum(n * k for n, k in shape.block_linears().values())
    flops_step = 3 * block_forward_flops(shape, batch_size * seqlen, seqlen)
    flops_once = 2 * block_forward_flops(shape, nsamples * seqlen, seqlen)
    rate = gpu.bf16_peak_tflops * 1e12 * gpu.mfu
    compute_step = flops_step / rate
    memory_step = w * gpu.bytes_per_weight_step / (gpu.hbm_tbps * 1e12 * gpu.hbm_efficiency)
    per_block = steps * (compute_step + memory_step) + flops_once / rate
    return {"gpu": gpu.name, "assumptions": dataclasses.asdict(gpu), "steps": steps, "nsamples": nsamples,
            "seqlen": seqlen, "batch_size": batch_size, "block_weights": w, "flops_per_step": flops_step,
            "compute_ms_per_step": 1e3 * compute_step, "memory_ms_per_step": 1e3 * memory_step,
            "seconds_per_block": per_block, "seconds_total": per_block * shape.layers, "blocks": shape.layers}


# -- one run, in a child process ----------------------------------------------------------------
def _vmhwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _streaming_entry():
    """The streaming quantizer (models larger than memory), when this checkout has one."""
    try:
        from quantizer import streaming
    except ImportError:
        return None
    return getattr(streaming, "quantize_pretrained", None)


# the engine's per-block log line: "block 3/30: loss 1.1e-01 -> 9.8e-02 (42.4 s, RSS 0.92 GiB, peak 0.99 GiB)"
_BLOCK_SECONDS = re.compile(r"^(?P<label>.+?): .*\((?P<s>[0-9.]+) s[,)]")


def _quantize_in_memory(spec: dict, log) -> dict:
    """Load the whole fp32 model, ``quantizer.quantize`` it, save it sharded (the path before
    streaming; its peak RSS holds the whole model)."""
    import torch
    import transformers

    from fxkernels import save_quantized
    from quantizer.api import quantize
    from quantizer.config import QuantizeConfig

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    load_s = time.perf_counter() - t0
    ids = _calibration(spec, model.config.vocab_size)
    per_block = []

    def collect(msg: str) -> None:
        m = _BLOCK_SECONDS.match(msg)
        if m and m.group("label").startswith("block "):
            per_block.append({"label": m.group("label"), "seconds": float(m.group("s"))})
        log(msg)

    cfg = QuantizeConfig(method=spec["method"], iters=spec["steps"], nsamples=spec["nsamples"],
                         seqlen=spec["seqlen"], eval_samples=min(2, spec["nsamples"]), progress=False)
    t1 = time.perf_counter()
    quantize(model, ids, cfg, log=collect)
    quant_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    save_quantized(model, spec["ckpt"], max_shard_size=spec["max_shard_size"])
    return {"engine": "in-memory", "load_seconds": load_s, "quantize_seconds": quant_s,
            "save_seconds": time.perf_counter() - t2, "blocks": per_block}


def _quantize_streaming(entry, spec: dict, log) -> dict:
    """``quantizer.streaming.quantize_pretrained``: one block at a time from the files, the
    checkpoint written shard by shard; its per-block stats carry ``seconds`` and RSS peaks."""
    from quantizer.config import QuantizeConfig

    ids = _calibration(spec, spec["vocab"])
    cfg = QuantizeConfig(method=spec["method"], iters=spec["steps"], nsamples=spec["nsamples"],
                         seqlen=spec["seqlen"], eval_samples=min(2, spec["nsamples"]), progress=False)
    t1 = time.perf_counter()
    kwargs = {"max_blocks": spec["max_blocks"]} if spec.get("max_blocks") else {}
    result = entry(spec["model"], spec["ckpt"], ids, cfg, max_shard_size=spec["max_shard_size"], log=log, **kwargs)
    blocks = [{k: v for k, v in s.items() if isinstance(v, (int, float, str)) or v is None} for s in result.stats]
    return {"engine": "streaming", "quantize_seconds": time.perf_counter() - t1, "engine_seconds": result.seconds,
            "engine_rss_peak_bytes": result.rss_peak_bytes, "blocks": blocks,
            # max_blocks: only the first blocks were learned and nothing was written
            "first_blocks_only": len(blocks) < SIZES[spec["size"]].layers}


def _calibration(spec: dict, vocab: int):
    import torch

    g = torch.Generator().manual_seed(spec["seed"])
    return torch.randint(0, vocab, (spec["nsamples"], spec["seqlen"]), generator=g)


def _verify(spec: dict, log) -> dict:
    """Reload the checkpoint (shard by shard) and greedily generate a few tokens on the CPU kernels."""
    import torch

    from fxkernels import load_quantized

    t0 = time.perf_counter()
    model = load_quantized(spec["ckpt"])
    load_s = time.perf_counter() - t0
    ids = _calibration(spec, spec["vocab"])[:1, :16]
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    gen_s = time.perf_counter() - t1
    log(f"reloaded in {load_s:.1f} s; generated {out.shape[1] - ids.shape[1]} tokens in {gen_s:.1f} s")
    return {"load_seconds": load_s, "generate_seconds": gen_s, "new_tokens": int(out.shape[1] - ids.shape[1])}


def child_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    torch.set_num_threads(spec["threads"])

    def log(msg: str) -> None:
        print(f"  [{spec['size']} {spec['method']}] {msg}", flush=True)

    if spec["task"] == "verify":
        result = _verify(spec, log)
    else:
        entry = None if spec["engine"] == "in-memory" else _streaming_entry()
        if spec["engine"] == "streaming" and entry is None:
            raise SystemExit("--engine streaming: this checkout has no quantizer.streaming entry point")
        result = _quantize_streaming(entry, spec, log) if entry is not None else _quantize_in_memory(spec, log)
    result["vmhwm_bytes"] = _vmhwm_bytes()
    tmp = spec["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, spec["result"])
    return 0


def run_child(spec: dict, workdir: str, timeout: Optional[float] = None) -> dict:
    """Run one task in a fresh interpreter; returns its result plus its own peak RSS (wait4).

    timeout: seconds after which the child is stopped; the result is then ``partial`` and holds
    the blocks its log reported as finished (their seconds), with the peak RSS reached so far."""
    import threading

    name = f"{spec['size']}-{spec['method']}-{spec['task']}"
    spec = dict(spec, result=os.path.join(workdir, name + ".result.json"))
    spec_path = os.path.join(workdir, name + ".spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if os.path.exists(spec["result"]):
        os.remove(spec["result"])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec_path], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    blocks: List[dict] = []

    def pump():  # echo the child's log and keep its finished blocks, in case it is stopped
        for line in proc.stdout:
            print(line, end="", flush=True)
            m = _BLOCK_SECONDS.match(line.strip().split("] ", 1)[-1])
            if m and m.group("label").startswith("block "):
                blocks.append({"label": m.group("label"), "seconds": float(m.group("s"))})

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over all children)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if timer:
        timer.cancel()
    reader.join(timeout=10)
    wall = time.perf_counter() - t0
    if os.path.exists(spec["result"]):
        with open(spec["result"]) as f:
            result = json.load(f)
        result["partial"] = bool(result.get("first_blocks_only"))
    elif timeout and wall >= timeout:
        print(f"{name}: stopped after {timeout:.0f} s (--run-timeout) with {len(blocks)} blocks finished", flush=True)
        result = {"engine": spec["engine"], "blocks": blocks, "quantize_seconds": None, "partial": True}
    else:
        raise RuntimeError(f"{name}: the child exited with {proc.returncode} (output above)")
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # the child's CPU time, all threads
    result["wall_seconds"] = wall
    # other work on the host stretches the times (never the memory): keep the 1-minute load average
    result["loadavg"] = [load_before, os.getloadavg()[0]]
    return result


# -- the report -------------------------------------------------------------------------------
def _median(xs: List[float]) -> Optional[float]:
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def summarize(size: str, method: str, steps: int, run: dict, verify: Optional[dict], ckpt_bytes: int) -> dict:
    shape = SIZES[size]
    secs = [b["seconds"] for b in run.get("blocks", []) if "seconds" in b]
    if len(secs) != shape.layers and not run.get("partial"):  # no per-block figures: spread the total evenly
        secs = [run["quantize_seconds"] / shape.layers] * shape.layers
    # process CPU time per block (all threads; the streaming engine measures it): steadier than wall
    # time when other work shares the cores
    cpu = [b["cpu_seconds"] for b in run.get("blocks", []) if b.get("cpu_seconds") is not None]
    return {"size": size, "method": method, "steps": steps if method != "rtn" else 0, "engine": run["engine"],
            "params": shape.params(), "blocks": shape.layers, "block_params": shape.block_params(),
            "fp32_bytes": 4 * shape.params(), "seconds_per_block": _median(secs), "block_seconds": secs,
            "cpu_seconds_per_block": _median(cpu), "block_cpu_seconds": cpu, "cpu_seconds": run.get("cpu_seconds"),
            "first_blocks_only": bool(run.get("first_blocks_only")),
            "quantize_seconds": run["quantize_seconds"], "wall_seconds": run["wall_seconds"],
            "loadavg": run.get("loadavg"),
            "peak_rss_bytes": run["peak_rss_bytes"], "ckpt_bytes": ckpt_bytes,
            "block_rss_peaks": [b.get("rss_peak_bytes") for b in run.get("blocks", [])],
            "blocks_done": len(secs) if run.get("partial") else shape.layers, "partial": bool(run.get("partial")),
            "verify": verify}


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def markdown_table(rows: List[dict]) -> str:
    head = ("| model | params | blocks | params/block | method | steps | engine | wall s/block (median) "
            "| CPU s/block (median) | quantize s | peak RSS GB (GiB) | fp32 weights GB | checkpoint GB "
            "| reload + 8 tokens |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        v = r.get("verify")
        ver = "-" if not v else (f"{v['load_seconds']:.1f} s + {v['generate_seconds']:.1f} s, "
                                 f"{_gb(v['peak_rss_bytes'])} GB")
        spb = "-" if r["seconds_per_block"] is None else f"{r['seconds_per_block']:.2f}"
        cpb = "-" if r.get("cpu_seconds_per_block") is None else f"{r['cpu_seconds_per_block']:.2f}"
        if r.get("first_blocks_only"):
            total = f"PARTIAL: first {r['blocks_done']}/{r['blocks']} blocks only, nothing written"
        elif r.get("partial"):
            total = f"PARTIAL: stopped after {r['blocks_done']}/{r['blocks']} blocks"
        else:
            total = f"{r['quantize_seconds']:.0f}"
        rss = r["peak_rss_bytes"]
        peak = "-" if rss is None else f"{rss / 1e9:.2f} ({rss / 2**30:.2f})"
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['blocks']} | {r['block_params'] / 1e6:.1f}M "
                     f"| {r['method']} | {r['steps']} | {r['engine']} | {spb} | {cpb} "
                     f"| {total} | {peak} | {_gb(r['fp32_bytes'])} "
                     f"| {_gb(r['ckpt_bytes'])} | {ver} |")
    return "\n".join(lines)


def prediction_text(pred: dict, label: str) -> str:
    a = pred["assumptions"]
    return (f"PREDICTION (not a measurement) for a 7B LLaMA ({LLAMA_7B.layers} blocks of "
            f"{pred['block_weights'] / 1e6:.0f}M weights), FlexRound {label}: steps={pred['steps']}, "
            f"batch {pred['batch_size']} x seqlen {pred['seqlen']}, nsamples {pred['nsamples']}: "
            f"{pred['flops_per_step'] / 1e12:.2f} TFLOP per step -> {pred['compute_ms_per_step']:.1f} ms at "
            f"{a['mfu']:.0%} of {a['bf16_peak_tflops']:.0f} TFLOP/s bf16, + {pred['memory_ms_per_step']:.1f} ms of "
            f"elementwise traffic ({a['bytes_per_weight_step']:.0f} B/weight/step at {a['hbm_efficiency']:.0%} of "
            f"{a['hbm_tbps']} TB/s); {pred['seconds_per_block']:.1f} s per block, "
            f"{pred['seconds_total'] / 60:.1f} min for the model on one {pred['gpu']}.")


def plot(rows: List[dict], path: str) -> Optional[str]:
    try:
        from quantizer.plots import _pyplot, _save
        plt = _pyplot()
    except ImportError as e:
        print(f"no plot: {e}")
        return None
    rows = [r for r in rows if r["seconds_per_block"] is not None]
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in sorted({r["method"] for r in rows}):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["params"])
        label = f"{method} ({rs[0]['steps']} steps)" if rs[0]["steps"] else method
        xs = [r["params"] / 1e9 for r in rs]
        line = a1.plot(xs, [r["seconds_per_block"] for r in rs], "o:", label=f"{label}, wall")[0]
        cpu = [(x, r["cpu_seconds_per_block"]) for x, r in zip(xs, rs) if r.get("cpu_seconds_per_block")]
        if cpu:
            a1.plot([x for x, _ in cpu], [c for _, c in cpu], "s-", color=line.get_color(), label=f"{label}, CPU")
        a2.plot(xs, [r["peak_rss_bytes"] / 1e9 for r in rs], "o-", label=label)
        for x, r in zip(xs, rs):
            if r.get("partial"):  # per-block figures of a run that did only its first blocks
                a2.annotate(f"first {r['blocks_done']}/{r['blocks']} blocks", (x, r["peak_rss_bytes"] / 1e9),
                            textcoords="offset points", xytext=(-40, 8), fontsize=7)
    sizes = sorted({(r["params"], r["fp32_bytes"]) for r in rows})
    a2.plot([p / 1e9 for p, _ in sizes], [b / 1e9 for _, b in sizes], "k--", lw=1, label="fp32 weights")
    for ax, ylabel in ((a1, "seconds per block (CPU: all threads)"), (a2, "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    a1.set_title("quantization time per block (CPU)")
    a2.set_title("peak resident memory per run")
    path = _save(fig, path)
    plt.close(fig)
    return path


# -- main ---------------------------------------------------------------------------------------
def _csv(value: str, allowed, what: str) -> List[str]:
    items = [v.strip().lower() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"--{what} {value!r}: expected a comma-separated subset of {list(allowed)}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="135m,360m,1b", help=f"comma-separated subset of {list(SIZES)}")
    p.add_argument("--methods", default="rtn,flexround", help="comma-separated: rtn, flexround")
    p.add_argument("--steps", type=int, default=10, help="learning steps per block for flexround (default 10)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                   help="torch threads per run (default $OMP_NUM_THREADS or 2)")
    p.add_argument("--engine", choices=("auto", "streaming", "in-memory"), default="auto",
                   help="auto: the streaming quantizer when present, else load the whole model")
    p.add_argument("--max-shard-size", default="100MB", help="shard size of the written checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-blocks", type=int, default=None,
                   help="learn only the first K blocks of each model and write nothing (streaming engine): "
                   "per-block time and peak RSS of a model whose whole run takes too long; the table marks "
                   "such rows PARTIAL")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="stop a quantization run after this many seconds and report the blocks it finished")
    p.add_argument("--no-verify", action="store_true", help="skip reloading each checkpoint and generating")
    p.add_argument("--keep", action="store_true", help="keep the quantized checkpoints (default: delete)")
    p.add_argument("--models-dir", default=os.path.expanduser("~/.cache/flexround/scale-models"),
                   help="where the random-weight models are written and reused")
    p.add_argument("--out", default="bench-out/scale", help="directory for scale.json, scale.png, scale.md")
    p.add_argument("--from-json", help="comma-separated scale.json files: merge their rows into one report in --out "
                   "(nothing is run)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return a
    try:
        a.sizes = _csv(a.sizes, SIZES, "sizes")
        a.methods = _csv(a.methods, ("rtn", "flexround"), "methods")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    for name in ("steps", "nsamples", "seqlen", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} {getattr(a, name)}: expected a positive integer")
    if a.max_blocks is not None and a.max_blocks < 1:
        p.error(f"--max-blocks {a.max_blocks}: expected a positive integer")
    if a.max_blocks is not None and a.engine == "in-memory":
        p.error("--max-blocks needs the streaming engine")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        return child_main(a.child)
    os.makedirs(a.out, exist_ok=True)
    if a.from_json:  # merge earlier sweeps (e.g. run in parallel) into one report
        rows = []
        for path in a.from_json.split(","):
            with open(path) as f:
                rows += json.load(f)["rows"]
        rows.sort(key=lambda r: (r["params"], r["method"]))
        return report(rows, a)
    work = os.path.join(a.out, "runs")
    os.makedirs(work, exist_ok=True)
    engine = a.engine
    if engine == "auto":
        engine = "streaming" if _streaming_entry() is not None else "in-memory"
    print(f"engine: {engine}; {a.threads} threads; nsamples {a.nsamples} x seqlen {a.seqlen}; "
          f"flexround {a.steps} steps per block", flush=True)
    rows = []
    json_path = os.path.join(a.out, "scale.json")
    for size in a.sizes:
        model_dir = cached_random_llama(a.models_dir, size, seed=a.seed)
        for method in a.methods:
            ckpt = os.path.join(a.out, f"ckpt-{size}-{method}")
            spec = {"size": size, "method": method, "steps": a.steps if method != "rtn" else 0, "model": model_dir,
                    "ckpt": ckpt, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed, "threads": a.threads,
                    "engine": engine, "max_shard_size": a.max_shard_size, "vocab": SIZES[size].vocab,
                    "task": "quantize", "max_blocks": a.max_blocks}
            print(f"{size} {method}: quantizing {model_dir}", flush=True)
            run = run_child(spec, work, timeout=a.run_timeout)
            ckpt_bytes = None if run["partial"] else sum(
                os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
            verify = None
            if not a.no_verify and not run["partial"]:
                verify = run_child(dict(spec, task="verify"), work)
            if run["partial"]:  # a stopped writer leaves its temporary directory behind
                for f in os.listdir(a.out):
                    if f.startswith(".tmp-"):
                        shutil.rmtree(os.path.join(a.out, f), ignore_errors=True)
            if not a.keep:
                shutil.rmtree(ckpt, ignore_errors=True)
            row = summarize(size, method, a.steps, run, verify, ckpt_bytes)
            rows.append(row)
            spb = "-" if row["seconds_per_block"] is None else f"{row['seconds_per_block']:.2f}"
            print(f"{size} {method}: {spb} s/block (median of {row['blocks_done']}), peak RSS "
                  f"{_gb(row['peak_rss_bytes'])} GB", flush=True)
            _write_json(json_path, rows, a)  # after every run: a long sweep keeps what it measured
    return report(rows, a)


def report(rows: List[dict], a) -> int:
    """Table, predictions, JSON and plot of ``rows`` into ``a.out``."""
    from quantizer.config import QuantizeConfig

    json_path = os.path.join(a.out, "scale.json")

    d = QuantizeConfig()
    preds = [predict_flexround_gpu_seconds(LLAMA_7B, d.iters, d.nsamples, d.seqlen, d.batch_size),
             predict_flexround_gpu_seconds(LLAMA_7B, a.steps, a.nsamples, a.seqlen, 1),
             # auto-round's defaults (200 steps, batch 8 x 2048 tokens, 128 windows): it quotes
             # about 10 minutes for a 7B model on one GPU, a check on the assumptions
             predict_flexround_gpu_seconds(LLAMA_7B, 200, 128, 2048, 8)]
    _write_json(json_path, rows, a, preds)
    table = markdown_table(rows)
    text = "\n\n".join([table, prediction_text(preds[0], "default schedule (QuantizeConfig())"),
                        prediction_text(preds[1], "this bench's schedule"),
                        prediction_text(preds[2], "auto-round's schedule, whose quoted ~10 min checks the model"),
                        _cpu_extrapolation(rows)])
    print("\n" + text)
    with open(os.path.join(a.out, "scale.md"), "w") as f:
        f.write(text + "\n")
    png = plot(rows, os.path.join(a.out, "scale.png"))
    print(f"\nwrote {json_path}, {os.path.join(a.out, 'scale.md')}" + (f", {png}" if png else ""))
    return 0


def _cpu_extrapolation(rows: List[dict]) -> str:
    """Measured seconds per block per million block weights, extrapolated to 7B (a CPU estimate)."""
    out = []
    rows = [r for r in rows if r["seconds_per_block"] is not None]
    for method in sorted({r["method"] for r in rows}):
        r = max((r for r in rows if r["method"] == method), key=lambda r: r["params"])
        per_weight = r["seconds_per_block"] / r["block_params"]
        total = per_weight * LLAMA_7B.block_params() * LLAMA_7B.layers
        out.append(f"{method}: {total / 3600:.1f} h")
    return ("CPU extrapolation to 7B (time per block proportional to block weights, from the largest size "
            f"measured): {', '.join(out)}.")


def _write_json(path: str, rows: List[dict], a, preds=None) -> None:
    import platform

    doc = {"rows": rows, "args": {k: v for k, v in vars(a).items() if k != "child"},
           "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
           "prediction_7b": preds, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
