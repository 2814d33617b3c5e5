"""Side-by-side with a peer: auto-round (SignRound) against this project's FlexRound, same model,
same calibration windows, same evaluation. An optional extra: never needed by the tests.

auto-round lives in its own virtual environment (``--venv``, default ``~/.cache/flexround-peer/venv``;
``--setup`` creates it: ``pip install torch==2.13.0`` first so the local CPU wheel is used, then
``auto-round``). The steps:

1. here: the model in fp32 (``quantizer.models.load_model``; a GGUF file is converted once) and the
   project's calibration windows (``quantizer.data.calibration_ids``: the wiki calibration split,
   ``--nsamples`` x ``--seqlen`` tokens at seeded offsets), saved as token ids;
2. in the peer's environment (this file with ``--worker``): ``AutoRound`` on those windows (passed as
   a list of token-id tensors, so it tokenizes nothing itself), W``--bits`` asymmetric, per channel
   (``--group-size -1``) or grouped, every block linear, ``lm_head`` float; the fake-quantized
   (dequantized) weights of the quantized linears are saved in fp32 (``qdq_weights.pt``); wall
   time and peak RSS measured in that process;
3. here: the fp32 model with those weights put in, perplexity with the project's own code
   (``quantizer.evaluate.perplexity``: 12 x 512-token windows of the evaluation split, no special
   tokens, fp32 logits, 2 threads);
4. the project's row: ``bench/quality_run.py`` in a child process (its own wall time and peak RSS),
   unless ``--ours-json`` gives rows already measured.

    nice .venv/bin/python bench/peer_autoround.py --setup --model ~/.cache/gemma3dl/gemma-3-270m-q4_k_m.gguf \\
        --iters 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "flexround-peer", "venv")
AUTO_ROUND = "auto-round==0.16.1"


def _peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


# -- the peer's side (runs in the peer's venv; imports nothing from this project) --------------
def worker(a) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    from auto_round import AutoRound

    model = AutoModelForCausalLM.from_pretrained(a.fp32_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.fp32_dir)
    from safetensors.torch import load_file, save_file

    ids = load_file(a.calib)["ids"]
    dataset = [row[None].clone() for row in ids]
    t = time.time()
    ar = AutoRound(model, tok, scheme="W4A16", bits=a.bits, group_size=a.group_size, sym=False, iters=a.iters,
                   nsamples=ids.shape[0], seqlen=ids.shape[1], dataset=dataset, device_map="cpu",
                   enable_torch_compile=False, seed=a.seed)
    qmodel, _ = ar.quantize()
    secs = time.time() - t
    # The quantized model holds the dequantized (fake-quant) weights in memory. auto-round's own
    # "fake" export is not used: it writes them in 16 bits and then restores the fp32 source
    # tensors of the same names, i.e. the unquantized weights.
    weights, most = {}, 0
    for name, m in qmodel.named_modules():
        if isinstance(m, torch.nn.Linear) and getattr(m, "scale", None) is not None:
            w = m.weight.detach().float().cpu().contiguous()
            weights[name + ".weight"] = w
            if a.group_size in (-1, 0):   # per channel: at most 2**bits levels per row
                most = max(most, max(int(torch.unique(r).numel()) for r in w[:8]))
    if not weights:
        raise SystemExit("auto-round left no quantized nn.Linear (no .scale attribute found)")
    os.makedirs(a.out_dir, exist_ok=True)
    save_file(weights, os.path.join(a.out_dir, "qdq_weights.safetensors"))
    if most > 2 ** a.bits:
        raise SystemExit(f"auto-round's weights have {most} distinct values in a row; expected <= {2 ** a.bits}")
    print("WORKER " + json.dumps({"quantize_s": round(secs, 1), "peak_rss_mb": round(_peak_rss_mb())}), flush=True)
    return 0


# -- this project's side ---------------------------------------------------------------------
def setup(venv: str) -> None:
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "torch==2.13.0"], check=True)
    subprocess.run([py, "-m", "pip", "install", AUTO_ROUND], check=True)


def fp32_dir(model: str) -> str:
    """The fp32 Hugging Face directory ``quantizer.models.load_model`` reads (converted once)."""
    from quantizer import models

    models.load_model(model)
    if model in ("smollm2", "SmolLM2-135M", "smollm2-135m"):
        return os.path.join(models.cache_root(), "smollm2-135m-instruct-fp32")
    if model.endswith(".gguf"):
        key = os.path.splitext(os.path.basename(model))[0] + f"-{os.path.getsize(model)}-fp32"
        return os.path.join(models.cache_root(), key)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=False, help="HF directory, .gguf file, or 'smollm2'")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=-1, help="-1: per output channel")
    p.add_argument("--iters", type=int, default=200, help="auto-round iterations per block (its default: 200)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--venv", default=DEFAULT_VENV)
    p.add_argument("--setup", action="store_true", help="create the peer's venv first (pip install)")
    p.add_argument("--work-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "flexround-peer", "runs"))
    p.add_argument("--ours-json", default=None,
                   help="JSON lines of bench/quality_run.py (rows for this model/bits) instead of running ours")
    p.add_argument("--skip-ours", action="store_true")
    # the worker's arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fp32-dir", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if not a.model:
        p.error("--model is required")

    sys.path.insert(0, ROOT)
    import torch

    torch.set_num_threads(a.threads)
    from quantizer.data import calibration_ids
    from quantizer.evaluate import perplexity

    if a.setup or not os.path.exists(os.path.join(a.venv, "bin", "python")):
        setup(a.venv)
    model = os.path.expanduser(a.model)
    src = fp32_dir(model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    ids = calibration_ids(tok, a.nsamples, a.seqlen, seed=a.seed)
    gran = "channel" if a.group_size in (-1, 0) else f"g{a.group_size}"
    run = os.path.join(a.work_dir, f"{os.path.basename(src)}-w{a.bits}{gran}-it{a.iters}")
    os.makedirs(run, exist_ok=True)
    # safetensors both ways between the two processes: nothing here is unpickled
    from safetensors.torch import load_file, save_file

    calib = os.path.join(run, "calib_ids.safetensors")
    save_file({"ids": ids.contiguous()}, calib)

    rows = []
    cmd = [os.path.join(a.venv, "bin", "python"), os.path.abspath(__file__), "--worker", "--fp32-dir", src,
           "--calib", calib, "--out-dir", os.path.join(run, "fake"), "--bits", str(a.bits),
           "--group-size", str(a.group_size), "--iters", str(a.iters), "--seed", str(a.seed),
           "--threads", str(a.threads)]
    t = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    wall = time.time() - t
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        print(f"auto-round worker failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode
    meta = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("WORKER "))[7:])
    peer = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qdq = load_file(os.path.join(run, "fake", "qdq_weights.safetensors"))
    missing = set(qdq) - set(peer.state_dict())
    if missing:
        raise SystemExit(f"auto-round's weights name layers the model lacks: {sorted(missing)[:5]}")
    peer.load_state_dict(qdq, strict=False)
    print(f"loaded {len(qdq)} auto-round fake-quantized weights", flush=True)
    ppl = perplexity(peer, tok, progress=False)
    rows.append({"method": f"auto-round {AUTO_ROUND.split('==')[1]} (SignRound), {a.iters} iters",
                 "perplexity": round(ppl, 2), "quantize_s": meta["quantize_s"], "process_s": round(wall, 1),
                 "peak_rss_mb": meta["peak_rss_mb"]})
    del peer

    if not a.skip_ours:
        ours = []
        if a.ours_json:
            with open(a.ours_json) as f:
                ours = [json.loads(line) for line in f if line.strip()]
            ours = [r for r in ours if r.get("model") == a.model and r.get("bits") in (a.bits, None)
                    and not r.get("shared_kwargs")]
        else:
            q = [sys.executable, os.path.join(ROOT, "bench", "quality_run.py"), "--model", model, "--bits", str(a.bits),
                 "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed),
                 "--threads", str(a.threads)]
            if a.group_size not in (-1, 0):
                q += ["--granularity", "group", "--group-size", str(a.group_size)]
            for method in ("fp32", "rtn", "flexround"):
                out = subprocess.run(q + ["--method", method], stdout=subprocess.PIPE, text=True, check=True).stdout
                ours.append(json.loads(out.strip().splitlines()[-1]))
        for r in ours:
            name = {"fp32": "fp32", "rtn": "RTN"}.get(r["method"], f"this project, {r['method']} ({r.get('iters')} "
                                                                  "steps per block)")
            rows.insert(len(rows) - 1, {"method": name, "perplexity": r["perplexity"],
                                        "quantize_s": r["quantize_s"] if r["method"] != "fp32" else None,
                                        "process_s": None, "peak_rss_mb": r.get("peak_rss_mb")})

    print(f"\n{a.model}: W{a.bits} {gran} asym, every block linear (lm_head float), calibration "
          f"{a.nsamples} x {a.seqlen} tokens (project's wiki split, seed {a.seed}), perplexity 12 x 512 "
          f"(project's evaluation split), {a.threads} threads\n")
    print("| | perplexity | quantize time | peak RSS |")
    print("|---|---:|---:|---:|")
    for r in rows:
        secs = "" if r["quantize_s"] is None else f"{r['quantize_s'] / 60:.1f} min"
        rss = "" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb'] / 1024:.1f} GB"
        print(f"| {r['method']} | {r['perplexity']:.2f} | {secs} | {rss} |")
    with open(os.path.join(run, "rows.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
