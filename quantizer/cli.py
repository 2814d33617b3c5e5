"""The ``flexround`` command: quantize, eval, generate, kernels, bench, demo.

Run ``flexround <command> --help`` for each command's options and examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import List, Optional

EPILOG = """examples:
  flexround demo                                   # the README's main job on SmolLM2-135M
  flexround quantize --model smollm2 --method rtn --bits 4 --granularity channel --out out/w4
  flexround eval --model out/w4                    # perplexity on the held-out Wikipedia text
  flexround generate --model out/w4 --prompt "The capital of France is"
  flexround inspect out/w4                         # layers, bits, sizes, compression ratio
  flexround export --format gptq --model out/w4 --out out/w4-gptq
  flexround kernels                                # which kernels can run here, and why not
"""


def _spec_from_args(a):
    from fxkernels import QuantSpec

    group_size = a.group_size if a.granularity == "group" else None
    return QuantSpec(bits=a.bits, granularity=a.granularity, group_size=group_size,
                     symmetric=a.symmetric, act_bits=a.act_bits,
                     act_mode=a.act_mode if a.act_bits else "dynamic")


def _load_any(path: str):
    """A quantized checkpoint directory (quant_config.json) or a float model source."""
    from fxkernels.checkpoint import CONFIG_NAME, load_quantized

    if os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_NAME)):
        from transformers import AutoTokenizer

        return load_quantized(path), AutoTokenizer.from_pretrained(path)
    from .models import load_model

    return load_model(path)


def _threads(n: Optional[int]):
    import torch

    torch.set_num_threads(n or min(2, os.cpu_count() or 1))


# the CPU backend's set_activation_digits choices (repeated here: the parser must not import torch)
ACTIVATION_DIGITS = ("2", "4", "auto")


def _activation_digits(a) -> Optional[str]:
    """Apply ``--activation-digits``; returns an error message if it cannot be applied."""
    if getattr(a, "activation_digits", None) is None:
        return None
    try:
        from fxkernels.backends import cpu
    except ImportError as e:
        return f"--activation-digits needs the CPU extension ({e})"
    cpu.set_activation_digits(cpu.activation_digits_from_text(a.activation_digits))
    return None


def _engine_activation_digits(a):
    """``--activation-digits`` for :class:`fxkernels.Generator` (its own default without the flag)."""
    from .bench_decode import engine_activation_digits

    return engine_activation_digits(getattr(a, "activation_digits", None))


def _add_activation_digits(p) -> None:
    p.add_argument("--activation-digits", choices=ACTIVATION_DIGITS, default=None,
                   help="CPU weight-only layers on AVX-512 VNNI: int8 digits per fp32 activation (4: as exact "
                        "as fp32, the default of eager layers; auto: 2 per row, 4 for rows that 2 would round "
                        "coarser than bf16, the default of the decode engine; 2: ~14 bits of each row's range)")


def _quantize_config(a, spec):
    from .api import QuantizeConfig

    kwargs = dict(method=a.method, weight=dataclasses.replace(spec, act_bits=None, act_mode="dynamic"),
                  act_bits=spec.act_bits, seed=a.seed, skip=tuple(a.skip), resume_dir=a.resume_dir,
                  device=a.device, memory_budget=a.memory_budget)
    for k in ("iters", "lr", "batch_size", "nsamples", "seqlen", "loss", "qdrop", "smooth"):
        if getattr(a, k) is not None:
            kwargs[k] = getattr(a, k)
    if a.rotate is not None:
        kwargs["rotate"] = tuple(p for p in a.rotate.split(",") if p) if a.rotate != "none" else ()
    return QuantizeConfig(**kwargs)


def _calibration(a, tok, config):
    from .data import calibration_ids, calibration_text, read_text

    text = read_text(a.calibration) if a.calibration else calibration_text()
    return calibration_ids(tok, config.nsamples, config.seqlen, seed=a.seed, text=text)


def _quantize_streamed(a, spec) -> int:
    """--stream: block by block from the model's files (quantizer.streaming); every method goes
    through the engine, RTN included (its grid then starts from QuantizeConfig.init)."""
    from transformers import AutoTokenizer

    from .streaming import DEFAULT_SHARD_SIZE, quantize_pretrained, source_directory

    if spec.act_bits and spec.act_mode != "static":
        print("error: --stream calibrates static per-tensor activations; use --act-mode static", file=sys.stderr)
        return 2
    config = _quantize_config(a, spec)
    directory = source_directory(a.model)
    tok = AutoTokenizer.from_pretrained(directory)
    result = quantize_pretrained(directory, a.out, _calibration(a, tok, config), config, tokenizer=tok,
                                 max_shard_size=a.max_shard_size or DEFAULT_SHARD_SIZE,
                                 extra={"method": a.method, "source": a.model})
    print(f"quantized with {a.method} ({spec}) in {result.seconds:.1f} s, streamed block by block, peak RSS "
          f"{result.rss_peak_bytes / 2**30:.2f} GiB -> {result.directory}")
    return 0


def _size(value: str) -> int:
    """A byte count: an integer or a size such as ``6GB`` / ``500MB``."""
    from fxkernels.checkpoint import parse_shard_size

    try:
        return parse_shard_size(value, "--memory-budget")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_quantize(a) -> int:

    from fxkernels import replace_linears, save_quantized

    from .models import load_model

    _threads(a.threads)
    spec = _spec_from_args(a)
    if a.stream:
        return _quantize_streamed(a, spec)
    model, tok = load_model(a.model)
    t = time.time()
    if a.method == "rtn":
        if spec.act_bits and spec.act_mode == "static":
            print("error: --method rtn with static activations needs calibration; use --act-mode dynamic "
                  "or a learned method (flexround, signround, adaround)", file=sys.stderr)
            return 2
        replace_linears(model, spec, skip=tuple(a.skip), mse=a.mse)
    else:
        from .api import quantize

        if spec.act_bits and spec.act_mode != "static":
            print("error: learned methods calibrate static per-tensor activations; use --act-mode static "
                  "(or --method rtn for dynamic per-token activations)", file=sys.stderr)
            return 2
        config = _quantize_config(a, spec)
        model = quantize(model, _calibration(a, tok, config), config)
    secs = time.time() - t
    save_quantized(model, a.out, tokenizer=tok, max_shard_size=a.max_shard_size,
                   extra={"method": a.method, "source": a.model, "seconds": round(secs, 1)})
    print(f"quantized with {a.method} ({spec}) in {secs:.1f} s -> {a.out}")
    return 0


def _is_cnn_checkpoint(path: str) -> bool:
    from fxkernels.checkpoint import CONFIG_NAME, checkpoint_layers

    if not os.path.exists(os.path.join(path, CONFIG_NAME)):
        return False
    return any(e["kind"] == "conv2d" for e in checkpoint_layers(path).values())


def _eval_vision(a) -> int:
    """Top-1 agreement and mean KL of a MobileNetV2 checkpoint against the fp32 network."""
    from fxkernels.conv import load_quantized_cnn

    from .vision.data import evaluation_images
    from .vision.evaluate import agreement
    from .vision.mobilenetv2 import load_folded_mobilenet_v2

    fp = load_folded_mobilenet_v2()
    q = load_quantized_cnn(a.model, load_folded_mobilenet_v2())
    images = evaluation_images(a.images)
    res = agreement(fp, q, images)
    print(json.dumps({"model": a.model, "images": images.shape[0], **res}))
    return 0


def cmd_eval(a) -> int:
    from .evaluate import perplexity
    from .data import read_text

    _threads(a.threads)
    err = _activation_digits(a)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.path.isdir(a.model) and _is_cnn_checkpoint(a.model):
        return _eval_vision(a)
    model, tok = _load_any(a.model)
    text = read_text(a.text) if a.text else None
    ppl = perplexity(model, tok, text=text, windows=a.windows, seqlen=a.seqlen)
    print(json.dumps({"model": a.model, "perplexity": round(ppl, 4), "windows": a.windows, "seqlen": a.seqlen}))
    return 0


def generate_text(model, tok, prompt: str, max_new_tokens: int):
    import torch

    ids = tok(prompt, return_tensors="pt").input_ids
    t = time.time()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens,
                             pad_token_id=tok.eos_token_id)
    secs = time.time() - t
    new = out[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), new, new.numel() / secs


def cmd_generate(a) -> int:
    import torch

    _threads(a.threads)
    err = _activation_digits(a)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tok = _load_any(a.model)
    if a.hf_generate:
        if not a.no_fuse:
            from fxkernels import fuse_projections
            fuse_projections(model)  # q/k/v and gate/up as one kernel call each; bit-identical
        text, _, tps = generate_text(model, tok, a.prompt, a.max_new_tokens)
        print(a.prompt + text)
        print(f"[{tps:.1f} tokens/s, Hugging Face generate(), greedy, {a.max_new_tokens} tokens]", file=sys.stderr)
        return 0
    from fxkernels.generation import Generator, Sampling, UnsupportedModelError

    try:
        gen = Generator(model, compile=not a.no_compile, fuse=not a.no_fuse,
                        activation_digits=_engine_activation_digits(a))
    except UnsupportedModelError as e:
        print(f"error: {e} (`flexround generate --hf-generate` runs it)", file=sys.stderr)
        return 2
    sampling = Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    ids = tok(a.prompt, return_tensors="pt").input_ids
    stops = [t for t in [tok.eos_token_id] if t is not None]
    shown: list = []
    print(a.prompt, end="", flush=True)

    def stream(step_tokens: "torch.Tensor") -> None:  # print the text as it grows
        before = tok.decode(shown, skip_special_tokens=True)
        shown.append(int(step_tokens[0]))
        print(tok.decode(shown, skip_special_tokens=True)[len(before):], end="", flush=True)

    out = gen.generate(ids, a.max_new_tokens, sampling=sampling, stop_tokens=stops, streamer=stream)
    print()
    print(f"[decode {out.decode_tokens_per_second:.1f} tokens/s, prefill {ids.shape[1]} tokens in "
          f"{out.prefill_seconds * 1e3:.0f} ms, compile {out.compile_seconds:.1f} s; fxkernels.Generator, "
          f"{'greedy' if sampling.greedy else 'sampled'}, {out.tokens.shape[1]} tokens]", file=sys.stderr)
    return 0


def cmd_kernels(a) -> int:
    from fxkernels.dispatch import format_kernel_table

    print(format_kernel_table())
    return 0


def cmd_bench(a) -> int:
    err = _activation_digits(a)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.what == "kernels":
        try:
            from fxkernels.bench import main as bench_main
        except ImportError as e:
            print(f"error: the CPU benchmark harness is unavailable ({e})", file=sys.stderr)
            return 2
        _threads(a.threads)
        argv = ["--full"] if a.full else []
        if a.threads:
            argv += ["--threads", str(a.threads)]
        bench_main(argv)  # prints the table as it goes
        return 0
    if a.what == "decode":
        from .bench_decode import run

        run(threads=a.threads or 2, new_tokens=a.new_tokens, batch=a.batch, rounds=a.rounds,
            llama_cpp=not a.no_llama_cpp, activation_digits=a.activation_digits)
        return 0
    return 2


def cmd_plot(a) -> int:
    from . import plots

    if a.kind == "grid-shift":
        if not (a.model and a.quantized and a.layer):
            print("error: plot grid-shift needs --model (float), --quantized (checkpoint) and --layer", file=sys.stderr)
            return 2
        from fxkernels.checkpoint import load_quantized

        from .models import load_model

        fp, _ = load_model(a.model)
        q = load_quantized(a.quantized)
        try:
            qlayer, flayer = q.get_submodule(a.layer), fp.get_submodule(a.layer)
        except AttributeError:
            names = [n for n, m in q.named_modules() if hasattr(m, "qweight")][:5]
            print(f"error: --layer {a.layer!r} is not in the checkpoint; quantized layers include {names}",
                  file=sys.stderr)
            return 2
        path = plots.plot_grid_shift(flayer.weight, qlayer, a.out, title=a.title or "")
    elif a.kind == "ppl":
        path = plots.plot_ppl_vs_bits(plots.read_rows(a.results), a.out, fp_ppl=a.fp32, title=a.title or "")
    else:
        path = plots.plot_speed_vs_m(plots.read_rows(a.results), a.out, title=a.title or "")
    print(f"wrote {path}")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    _threads(a.threads)
    return run_demo(out_dir=a.out, quick=a.quick)


def cmd_vision(a) -> int:
    from .vision.cli import main as vision_main
    vision_main(a.vision_args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexround", description="FlexRound post-training quantization and fast "
                                "INT4/INT8 kernels.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a checkpoint",
                       description="Quantize every linear layer (except --skip) and write a safetensors+JSON "
                       "checkpoint that fxkernels.load_quantized and `flexround eval/generate` read.")
    q.add_argument("--model", required=True, help="HF directory, .gguf file, hub id (online), or 'smollm2'")
    from .config import LOSSES
    from .rounding import method_names, methods_help

    q.add_argument("--method", default="flexround", choices=method_names(),
                   help=f"rounding method (default flexround): {methods_help()}")
    q.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    q.add_argument("--granularity", default="channel", choices=["tensor", "channel", "group"])
    q.add_argument("--group-size", type=int, default=128, help="columns per group when --granularity group")
    q.add_argument("--symmetric", action="store_true", help="symmetric grid (zero = 2**(bits-1))")
    q.add_argument("--act-bits", type=int, default=None, choices=[8], help="also quantize activations (W8A8)")
    q.add_argument("--act-mode", default="static", choices=["static", "dynamic"],
                   help="activation grid: static per-tensor (learned) or dynamic per-token")
    q.add_argument("--mse", action="store_true", help="RTN: search the clipping range by MSE")
    q.add_argument("--skip", nargs="*", default=["lm_head"], help="layer names/patterns kept in float")
    q.add_argument("--calibration", help="text file, directory of .txt files, or dataset:NAME[:CONFIG[:SPLIT[:FIELD]]] "
                   "(needs `datasets`; default: the shipped Wikipedia calibration split)")
    q.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: QuantizeConfig's)")
    q.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window")
    q.add_argument("--iters", type=int, default=None, help="optimizer steps per block")
    q.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    q.add_argument("--batch-size", type=int, default=None, help="calibration windows per step")
    q.add_argument("--loss", default=None, choices=LOSSES,
                   help="block-output loss: per-token normalized ('token'), the same with each channel weighted "
                        "by the squared gains of the norms that read the block's output ('norm'), plain MSE, or "
                        "'auto' (default: 'norm' on blocks whose readers damp the stream's high-energy channels)")
    q.add_argument("--qdrop", type=float, default=None, help="QDrop probability of feeding float inputs (default 0)")
    q.add_argument("--smooth", type=float, default=None,
                   help="W8A8: migrate activation outliers into the weights first (SmoothQuant alpha, e.g. 0.5)")
    q.add_argument("--rotate", default=None, metavar="PATTERNS",
                   help="comma-separated linear names/globs whose input is Hadamard-rotated online, or 'none' "
                        "(default: every block linear when activations are int8)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--resume-dir", default=None, help="directory to keep finished blocks in (resumable)")
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--device", default="cpu",
                   help="where each block learns: cpu (default) or cuda[:N]; the model's weights stay on the CPU")
    q.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="bytes one block's learning may use on the device (e.g. 6GB); a block that needs more "
                        "stops the run before it learns. On CUDA it also decides whether the calibration "
                        "streams stay on the GPU (default: the free GPU memory)")
    q.add_argument("--stream", action="store_true",
                   help="read the model block by block from its safetensors files and write the checkpoint "
                        "shard by shard: for models whose fp32 weights do not fit in memory")
    q.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="split the written weights into shards of at most SIZE (e.g. 2GB; default: one file, "
                        "100MB with --stream)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity on held-out text",
                       description="Perplexity = exp(mean cross-entropy) over consecutive windows of the "
                       "evaluation text (default: the held-out Wikipedia split; 12 windows of 512 tokens). "
                       "For a MobileNetV2 checkpoint (`flexround vision --save`): top-1 agreement and mean KL "
                       "against the fp32 network on held-out photo crops.")
    e.add_argument("--model", required=True, help="checkpoint directory or float model source")
    e.add_argument("--text", help="text file or directory (default: held-out Wikipedia split)")
    e.add_argument("--windows", type=int, default=12, help="number of windows (0: all)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--images", type=int, default=200,
                   help="vision checkpoints (flexround vision --save): evaluation crops for top-1 agreement")
    e.add_argument("--threads", type=int, default=None)
    _add_activation_digits(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a prompt (compiled static-cache engine)",
                       description="Streams the continuation of --prompt through fxkernels.Generator: prefill, then "
                       "a compiled fixed-shape decode step over a static KV cache (the first call compiles: "
                       "~10-60 s on 2 cores, faster once inductor's cache is warm). Greedy unless --temperature > 0.")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--no-compile", action="store_true", help="run the decode step eagerly (no compile time)")
    g.add_argument("--hf-generate", action="store_true",
                   help="use Hugging Face generate() instead of the engine (any architecture; greedy)")
    g.add_argument("--no-fuse", action="store_true",
                   help="call q/k/v and gate/up separately (default: one fused kernel call per group)")
    _add_activation_digits(g)
    g.set_defaults(func=cmd_generate)

    k = sub.add_parser("kernels", help="list kernels and why each is or is not usable here")
    k.set_defaults(func=cmd_kernels)

    b = sub.add_parser("bench", help="speed tables: kernels (CPU), decode (whole model, vs llama.cpp)",
                       description="kernels: one linear per shape against fp32 and fbgemm. decode: SmolLM2-135M "
                       "decode and prefill tokens/s of HF fp32 generate(), the quantized model through generate() "
                       "and through fxkernels.Generator, and llama.cpp when llama-cpp-python is installed.")
    b.add_argument("what", choices=["kernels", "decode"])
    b.add_argument("--full", action="store_true", help="kernels: full (K, N, M) grid instead of the quick subset")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--new-tokens", type=int, default=128, help="decode: greedy tokens per run")
    b.add_argument("--batch", type=int, default=8, help="decode: the engine's batched row")
    b.add_argument("--rounds", type=int, default=3, help="decode: interleaved rounds (medians)")
    b.add_argument("--no-llama-cpp", action="store_true", help="decode: leave llama.cpp out even when installed")
    _add_activation_digits(b)
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plot", help="PNG plots: grid shift, perplexity vs bits, kernel speed vs M",
                        description="grid-shift: learned code minus round-to-nearest code against |W| for one layer "
                        "(FlexRound paper, Figure 3). ppl: perplexity vs bits per method from a JSON/JSONL file of "
                        "{method, bits, ppl} rows. speed: time vs M per kernel from {kernel, M, ms} rows.")
    pl.add_argument("kind", choices=["grid-shift", "ppl", "speed"])
    pl.add_argument("--out", required=True, help="PNG path")
    pl.add_argument("--model", help="grid-shift: the float model source")
    pl.add_argument("--quantized", help="grid-shift: the quantized checkpoint directory")
    pl.add_argument("--layer", help="grid-shift: dotted layer name, e.g. model.layers.0.self_attn.q_proj")
    pl.add_argument("--results", help="ppl/speed: JSON list or JSON-lines rows")
    pl.add_argument("--fp32", type=float, default=None, help="ppl: the float model's perplexity (dashed line)")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=cmd_plot)

    d = sub.add_parser("demo", help="the main job: quantize SmolLM2-135M, evaluate, generate, time")
    d.add_argument("--out", default="out/demo", help="where checkpoints and the report go")
    d.add_argument("--quick", action="store_true", help="fewer evaluation windows (smoke test)")
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=cmd_demo)
    v = sub.add_parser("vision", help="quantize ImageNet MobileNetV2 (the paper's CNN setting)", add_help=False,
                       description="Arguments go to `python -m quantizer.vision.cli`; `flexround vision --help` "
                       "lists them.")
    v.add_argument("vision_args", nargs=argparse.REMAINDER)
    v.set_defaults(func=cmd_vision)
    from .inspect_ckpt import add_parsers  # `inspect` and `export` subcommands
    add_parsers(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
