"""One quality figure: perplexity of a model (fp32, RTN or a learned method) by the project's protocol.

Mirrors ``flexround quantize`` + ``flexround eval`` in one process (no checkpoint written): the
calibration windows of ``quantizer.data.calibration_ids`` (the wiki calibration split, seeded), the
perplexity of ``quantizer.evaluate.perplexity`` (12 x 512-token windows of the evaluation split, no
special tokens, fp32 logits), 2 threads. Prints one JSON line (also appended to ``--json-out``)
with the perplexity, wall time of the quantization and peak RSS.

``--shared-kwargs`` reproduces the engine before per-block keyword capture (every block ran with
block 0's attention mask and position embeddings) to measure what that cost on models whose layers
alternate sliding-window/global attention (Gemma 2/3).

    nice .venv/bin/python bench/quality_run.py --model ~/.cache/gemma3dl/gemma-3-270m-q4_k_m.gguf \\
        --method flexround --bits 4 --granularity channel
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from quantizer.config import LOSSES


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _share_block0_kwargs() -> None:
    """The engine as it was: every block gets block 0's keyword arguments."""
    import quantizer.reconstruct as R

    orig = R.capture_inputs

    def capture(model, layout, ids):
        x, kw = orig(model, layout, ids)
        return x, R.BlockKwargs([kw[0]] * len(kw))

    R.capture_inputs = capture


def _blocks_see_block0_kwargs(model) -> None:
    """The float model as the engine before per-block capture saw it: every block's forward gets
    block 0's keyword arguments (mask, position ids/embeddings) of the same call."""
    from quantizer.blocks import find_blocks

    blocks = find_blocks(model).blocks
    seen = {}

    def first(module, args, kwargs):
        seen.clear()
        seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})

    def other(module, args, kwargs):
        kw = dict(kwargs)
        kw.update({k: v for k, v in seen.items() if k in kw})
        return args, kw

    blocks[0].register_forward_pre_hook(first, with_kwargs=True)
    for b in blocks[1:]:
        b.register_forward_pre_hook(other, with_kwargs=True)


def _option(text: str):
    """``key=value`` with the value read as JSON where it parses (numbers, true/false), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF directory, .gguf file, or 'smollm2'")
    p.add_argument("--method", default="flexround", choices=["fp32", "rtn", "flexround", "signround", "adaround"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--granularity", default="channel", choices=["tensor", "channel", "group"])
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="step size (default: the method's)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration windows per optimizer step")
    p.add_argument("--qdrop", type=float, default=None, help="QDrop probability (default 0)")
    p.add_argument("--loss", default=None, choices=LOSSES,
                   help="reconstruction loss (default: the config's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword option of the rounding module (QuantizeConfig.options), e.g. learn_zero=true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shared-kwargs", action="store_true",
                   help="every block gets block 0's keyword arguments (the engine before per-block capture); "
                        "with --method fp32: the float model evaluated that way (the old engine's targets)")
    p.add_argument("--label", default="")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    from fxkernels import QuantSpec, replace_linears
    from quantizer.data import calibration_ids
    from quantizer.evaluate import perplexity
    from quantizer.models import load_model

    if a.shared_kwargs:
        _share_block0_kwargs()
    model, tok = load_model(os.path.expanduser(a.model))
    spec = QuantSpec(bits=a.bits, granularity=a.granularity, group_size=a.group_size)
    t = time.time()
    config = None
    if a.method == "rtn":
        replace_linears(model, spec, skip=("lm_head",))
    elif a.method != "fp32":
        from quantizer.api import QuantizeConfig, quantize

        kw = dict(method=a.method, weight=dataclasses.replace(spec, act_bits=None, act_mode="dynamic"), seed=a.seed,
                  progress=False)
        for k in ("iters", "nsamples", "seqlen", "lr", "batch_size", "qdrop", "loss"):
            if getattr(a, k) is not None:
                kw[k] = getattr(a, k)
        if a.option:
            kw["options"] = dict(_option(o) for o in a.option)
        config = QuantizeConfig(**kw)
        calib = calibration_ids(tok, config.nsamples, config.seqlen, seed=a.seed)
        model = quantize(model, calib, config)
    secs = time.time() - t
    if a.shared_kwargs and a.method == "fp32":
        _blocks_see_block0_kwargs(model)
    ppl = perplexity(model, tok, windows=a.windows, progress=False)
    row = {"model": a.model, "method": a.method, "label": a.label, "bits": a.bits, "granularity": a.granularity,
           "group_size": a.group_size, "shared_kwargs": a.shared_kwargs,
           "iters": config.iters if config else None, "nsamples": config.nsamples if config else None,
           "lr": config.learning_rate if config else None, "batch_size": config.batch_size if config else None,
           "qdrop": config.qdrop if config else None, "loss": config.loss if config else None,
           "options": config.options if config else None,
           "seqlen": config.seqlen if config else None, "perplexity": round(ppl, 4),
           "quantize_s": round(secs, 1), "peak_rss_mb": round(_peak_rss_mb())}
    line = json.dumps(row)
    print(line, flush=True)
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
