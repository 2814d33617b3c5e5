"""``flexround bench decode``: decode and prefill tokens/s of SmolLM2-135M side by side, in one
interleaved run, for

* Hugging Face fp32 ``generate()``;
* this project through ``generate()``: RTN W4 per-channel + INT8 ``lm_head``, q/k/v and gate/up fused;
* the same quantized model through :class:`fxkernels.Generator` (static cache, compiled decode step),
  at batch 1 and at batch ``--batch``;
* llama.cpp on the same model's Q4_1 GGUF, when ``llama-cpp-python`` is installed (an optional
  extra: ``pip install llama-cpp-python``; never needed by the tests).

Decode: ``--new-tokens`` greedy tokens after a short prompt, timed from the first new token to the
last (prefill excluded). Prefill: one ``--prompt-tokens`` prompt to its first new token. Each round
runs every contender in turn, so a drifting host slows all of them alike; the table shows medians.
A fresh process then measures what a user of the engine sees: the first compile with an empty
inductor cache, and the decode process's peak RSS (loading the checkpoint from disk).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional

import torch

from .decode_bench import interleaved_medians

PROMPT = "The history of Azerbaijan"
LLAMA_CPP = "llama.cpp, Q4_1 GGUF (llama-cpp-python)"


class _Clock:
    """A ``generate()`` streamer that only timestamps: the first ``put`` is the prompt, each later
    one a new token."""

    def __init__(self):
        self.times: List[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_decode(model, ids, new_tokens: int) -> float:
    clock = _Clock()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                       pad_token_id=model.config.eos_token_id)
    return (new_tokens - 1) / (clock.times[-1] - clock.times[1])


def hf_prefill(model, ids) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=model.config.eos_token_id)
    return ids.shape[1] / (time.perf_counter() - t)


def engine_decode(gen, ids, new_tokens: int) -> float:
    return gen.generate(ids, new_tokens).decode_tokens_per_second


def engine_prefill(gen, ids) -> float:
    return ids.shape[1] / gen.generate(ids, 1).prefill_seconds


def llama_cpp_model(threads: int, context: int):
    """llama.cpp on SmolLM2's Q4_1 GGUF, or None when llama-cpp-python is not installed.

    llama.cpp's extra weight buffers (AMX tiles, repacked layouts) are used when a probe process
    decodes with them; on a host where they crash (seen: a KVM guest with AMX, llama-cpp-python
    0.3.36, segmentation fault in the first decode) they are turned off, and the row says so."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from .models import smollm2_gguf_path

    extra = _llama_cpp_extra_buffers_work()
    if not extra:
        default_params = llama_cpp.llama_model_default_params

        def without_extra_buffers():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
        llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_buffers
    llm = llama_cpp.Llama(model_path=smollm2_gguf_path(), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                          n_batch=context, verbose=False)
    llm.extra_buffers = extra
    return llm


_PROBE = ("from llama_cpp import Llama; from quantizer.models import smollm2_gguf_path; "
          "llm = Llama(model_path=smollm2_gguf_path(), n_ctx=64, verbose=False); llm.eval([1, 2, 3])")


def _llama_cpp_extra_buffers_work() -> bool:
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    return probe.returncode == 0


def llama_cpp_decode(llm, ids, new_tokens: int) -> float:
    times = []
    for tok in llm.generate(ids[0].tolist(), top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == new_tokens:
            break
    return (new_tokens - 1) / (times[-1] - times[0])


def llama_cpp_prefill(llm, ids) -> float:
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids[0].tolist())
    return ids.shape[1] / (time.perf_counter() - t)


def quantized_smollm2(fp):
    """RTN W4 per-channel asym for every block linear, INT8 per-channel ``lm_head``."""
    from fxkernels import QuantSpec, replace_linears

    return replace_linears(copy.deepcopy(fp), QuantSpec(4, "channel"), skip=(),
                           overrides={"lm_head": QuantSpec(8, "channel")})


def fresh_process_figures(ckpt: str, threads: int, new_tokens: int, activation_digits: Optional[str] = None) -> dict:
    """First compile with an empty inductor cache, decode rate and peak RSS, in a new process that
    loads the checkpoint and decodes with the engine."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "quantizer.bench_decode", "--child", ckpt, "--threads", str(threads),
               "--new-tokens", str(new_tokens)]
        if activation_digits is not None:
            cmd += ["--activation-digits", str(activation_digits)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(ckpt: str, threads: int, new_tokens: int, activation_digits: Optional[str]) -> None:
    from transformers import AutoTokenizer

    from fxkernels import load_quantized
    from fxkernels.generation import Generator

    torch.set_num_threads(threads)
    _set_activation_digits(activation_digits)
    model, tok = load_quantized(ckpt), AutoTokenizer.from_pretrained(ckpt)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    gen = Generator(model, activation_digits=engine_activation_digits(activation_digits))
    first = gen.generate(ids, new_tokens)
    again = gen.generate(ids, new_tokens)
    print(json.dumps({"compile_s": first.compile_seconds, "decode_tok_s": again.decode_tokens_per_second,
                      "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program: VmHWM, which execve
    resets (``ru_maxrss`` keeps the forking parent's size across exec, which is not ours)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def engine_activation_digits(text: Optional[str]):
    """``--activation-digits`` for :class:`fxkernels.Generator`: the flag's, else the Generator's
    own default."""
    if text is None:
        return "auto"
    from fxkernels.backends import cpu

    return cpu.activation_digits_from_text(str(text))


def _set_activation_digits(text: Optional[str]) -> None:
    if text is not None:
        from fxkernels.backends import cpu

        cpu.set_activation_digits(cpu.activation_digits_from_text(str(text)))


def run(threads: int = 2, new_tokens: int = 128, prompt_tokens: int = 512, batch: int = 8, rounds: int = 3,
        llama_cpp: bool = True, out: Callable[[str], None] = print, activation_digits: Optional[str] = None) -> dict:
    """``activation_digits``: "2", "4" or "auto", the CPU backend's
    :func:`~fxkernels.backends.cpu.set_activation_digits` for every quantized row (default: each
    contender's own, 4 for the eager layers and "auto" for :class:`fxkernels.Generator`)."""
    from fxkernels import fuse_projections, save_quantized
    from fxkernels.generation import Generator
    from fxkernels.generation.engine import cpu_activation_digits

    from .data import eval_text
    from .models import load_smollm2

    torch.set_num_threads(threads)
    _set_activation_digits(activation_digits)
    fp, tok = load_smollm2(log=lambda *a: None)
    short = tok(PROMPT, return_tensors="pt").input_ids
    long = tok(eval_text()[:20 * prompt_tokens], return_tensors="pt").input_ids[:, :prompt_tokens]
    fused = quantized_smollm2(fp)
    ckpt_dir = tempfile.TemporaryDirectory()
    save_quantized(fused, ckpt_dir.name, tokenizer=tok)
    fuse_projections(fused)
    gen = Generator(fused, activation_digits=engine_activation_digits(activation_digits))
    first = gen.generate(short, max(new_tokens, 64))
    out(f"engine: first compile {first.compile_seconds:.1f} s in this process")
    with torch.no_grad(), cpu_activation_digits(gen.activation_digits):  # the same kernels' precision
        hf_tokens = fused.generate(short, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                   pad_token_id=tok.eos_token_id)[0, short.shape[1]:]
    same = torch.equal(first.tokens[0, :64], hf_tokens)
    batch_ids = short.repeat(batch, 1)
    gen.generate(batch_ids, new_tokens)  # compiles the batch step

    contenders = {
        "Hugging Face fp32, generate()": lambda: (hf_decode(fp, short, new_tokens), hf_prefill(fp, long)),
        "W4 + INT8 lm_head (fused), generate()": lambda: (hf_decode(fused, short, new_tokens),
                                                          hf_prefill(fused, long)),
        "W4 + INT8 lm_head, fxkernels.Generator": lambda: (engine_decode(gen, short, new_tokens),
                                                           engine_prefill(gen, long)),
        f"same, batch {batch} (tokens/s of the batch)": lambda: (engine_decode(gen, batch_ids, new_tokens),
                                                                 float("nan")),
    }
    llm = llama_cpp_model(threads, prompt_tokens + new_tokens + 64) if llama_cpp else None
    if llm is not None:
        contenders[LLAMA_CPP] = lambda: (llama_cpp_decode(llm, short, new_tokens), llama_cpp_prefill(llm, long))
    rates = interleaved_medians(contenders, rounds)
    child = fresh_process_figures(ckpt_dir.name, threads, new_tokens, activation_digits)
    ckpt_dir.cleanup()

    ref = rates.get(LLAMA_CPP)
    digits = f"; activation digits {activation_digits or '4 (eager), auto (engine)'}"
    out(f"\nSmolLM2-135M, {threads} threads{digits}, greedy; decode: {new_tokens} new tokens after a "
        f"{short.shape[1]}-token prompt; prefill: a {long.shape[1]}-token prompt; median of {rounds} interleaved "
        "rounds\n")
    head = "| | decode tok/s | prefill tok/s |" + (" decode vs llama.cpp | prefill vs llama.cpp |" if ref else "")
    out(head)
    out("|---|---:|---:|" + ("---:|---:|" if ref else ""))
    for name, (d, p) in rates.items():
        cells = f"| {name} | {d:.1f} | {'' if p != p else f'{p:.0f}'} |"
        if ref:
            cells += f" {d / ref[0]:.2f}x | {'' if p != p else f'{p / ref[1]:.2f}x'} |"
        out(cells)
    b1 = rates["W4 + INT8 lm_head, fxkernels.Generator"][0]
    bn = rates[f"same, batch {batch} (tokens/s of the batch)"][0]
    out(f"\nbatch {batch} / batch 1 decode: {bn / b1:.2f}x; first 64 greedy tokens equal to generate() on the same "
        f"quantized model (at the engine's activation digits, {gen.activation_digits}): {same}")
    out(f"fresh process (load the checkpoint, empty inductor cache): first compile {child['compile_s']:.1f} s, "
        f"decode {child['decode_tok_s']:.1f} tok/s, peak RSS {child['peak_rss_mb']:.0f} MB")
    if llm is None and llama_cpp:
        out("(llama.cpp row missing: `pip install llama-cpp-python` to add it)")
    elif llm is not None and not llm.extra_buffers:
        out("llama.cpp ran without its extra weight buffers (AMX/repack): with them it crashed on this host")
    return {"rates": rates, "same_64_tokens": same, "fresh_process": child, "batch": batch, "threads": threads}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="flexround bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even when installed")
    p.add_argument("--activation-digits", choices=("2", "4", "auto"), default=None,
                   help="int8 digits per fp32 activation on AVX-512 VNNI CPUs (default: 4 in the eager "
                        "layers, auto in the engine)")
    p.add_argument("--child", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child, a.threads, a.new_tokens, a.activation_digits)
        return 0
    run(a.threads, a.new_tokens, a.prompt_tokens, a.batch, a.rounds, llama_cpp=not a.no_llama_cpp,
        activation_digits=a.activation_digits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
