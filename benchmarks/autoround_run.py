"""Intel AutoRound (PyPI `auto-round`) on a local HF causal LM, saved as a plain float32 HF folder.

Run with the Python that has auto-round (scripts/install_autoround.sh prints it); this script
imports only torch, transformers, safetensors and auto_round, not eqat. benchmarks/quality.py
calls it for its `autoround` and `autoround-defaults` rows.

The output folder holds AutoRound's own quantized-then-dequantized weights (its "fake" format:
every quantized Linear keeps a float weight with at most 2^bits values per group) as
model.safetensors + config.json + the tokenizer files of --model, so eqat's `load_model` reads
it, and bench_seconds.json with `seconds` (wall time of AutoRound's quantize() alone), the
settings and the auto-round version. It is written to OUT.tmp and renamed to OUT when complete.

Calibration: --calib FILE is a safetensors file with an int64 tensor `input_ids` [n, T]
(quality.py writes eqat's C4 windows there). Without --own-defaults AutoRound gets all n
windows of T tokens; with --own-defaults it keeps its own nsamples/seqlen/iters/batch_size
defaults, taking the first `nsamples` windows cut to `seqlen` tokens. Without --calib
AutoRound loads its own default dataset (NeelNanda/pile-10k), which needs the Hugging Face Hub.

    python benchmarks/autoround_run.py --model M --bits 2 --group-size 64 --calib calib.safetensors --out OUT
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

# settings of auto_round.AutoRound that --own-defaults leaves to AutoRound; iters' default lives
# in its SignRound config
DEFAULT_KEYS = ("nsamples", "seqlen", "batch_size", "dataset", "seed")
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges", "spiece")


def autoround_defaults() -> dict:
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig

    params = inspect.signature(AutoRound.__new__).parameters
    d = {k: params[k].default for k in ("nsamples", "seqlen", "batch_size", "seed")}
    d["iters"] = inspect.signature(SignRoundConfig.__init__).parameters["iters"].default
    try:  # the compressor builder holds the default dataset name
        from auto_round.autoround import _CompressorBuilder

        d["dataset"] = inspect.signature(_CompressorBuilder.__new__).parameters["dataset"].default
    except (ImportError, KeyError, AttributeError):
        d["dataset"] = "NeelNanda/pile-10k"
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="local HF causal-LM folder")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=64)
    sym = ap.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", help="symmetric (AutoRound's own default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric, as eqat's schemes (default)")
    ap.set_defaults(sym=False)
    ap.add_argument("--calib", type=Path, default=None, help="safetensors file with int64 `input_ids` [n, T]")
    ap.add_argument("--own-defaults", action="store_true",
                    help="AutoRound's own nsamples/seqlen/iters/batch_size (and dataset unless --calib)")
    ap.add_argument("--iters", type=int, default=None, help="tuning steps per block; default AutoRound's")
    ap.add_argument("--nsamples", type=int, default=None, help="default: all windows of --calib (AutoRound's with --own-defaults)")
    ap.add_argument("--batch-size", type=int, default=None, help="default AutoRound's")
    ap.add_argument("--seed", type=int, default=None, help="AutoRound's seed; default AutoRound's")
    ap.add_argument("--amp", action="store_true",
                    help="let AutoRound tune in bf16 (its CPU default); off: float32 like eqat's other methods "
                         "(bf16 runs several times slower on AVX2-only CPUs)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()

    import auto_round
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    defaults = autoround_defaults()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    kw: dict = {}
    calib_info = None
    if args.calib is not None:
        from safetensors.torch import load_file

        ids = load_file(str(args.calib))["input_ids"].long()
        if ids.dim() != 2:
            sys.exit(f"{args.calib}: input_ids must be [n, T], got {list(ids.shape)}")
        seqlen = defaults["seqlen"] if args.own_defaults else ids.shape[1]
        if ids.shape[1] < seqlen:
            sys.exit(f"{args.calib}: windows of {ids.shape[1]} tokens, AutoRound's default seqlen is {seqlen}")
        nsamples = args.nsamples or (defaults["nsamples"] if args.own_defaults else ids.shape[0])
        if ids.shape[0] < nsamples:
            print(f"warning: {args.calib} has {ids.shape[0]} windows, fewer than nsamples={nsamples}", file=sys.stderr)
            nsamples = ids.shape[0]
        ids = ids[:nsamples, :seqlen]
        # one dict per window: AutoRound forwards each as a batch of one and builds the attention
        # mask as it does for its own data (pad id masked, last token masked)
        kw["dataset"] = [{"input_ids": row[None].clone()} for row in ids]
        kw.update(nsamples=nsamples, seqlen=seqlen)
        calib_info = {"file": str(args.calib), "windows": list(ids.shape)}
    elif not args.own_defaults:
        sys.exit("give --calib FILE, or --own-defaults to let AutoRound load its default dataset (needs the Hub)")
    elif args.nsamples:
        kw["nsamples"] = args.nsamples
    if args.iters is not None:
        kw["iters"] = args.iters
    elif not args.own_defaults:
        kw["iters"] = defaults["iters"]
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    if args.seed is not None:
        kw["seed"] = args.seed

    ar = AutoRound(model, tokenizer=tok, bits=args.bits, group_size=args.group_size, sym=args.sym,
                   device_map="cpu", amp=args.amp, format="fake", low_cpu_mem_usage=False, **kw)
    t = time.perf_counter()
    qmodel, _ = ar.quantize()
    seconds = time.perf_counter() - t

    out = args.out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    qmodel = qmodel.to("cpu").float().eval()
    cfg = qmodel.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # plain float weights: nothing for transformers to unpack
    qmodel.save_pretrained(tmp, safe_serialization=True)
    for f in sorted(args.model.iterdir()):  # tokenizer files exactly as the base model has them
        if f.is_file() and f.name.startswith(TOKENIZER_FILES):
            shutil.copy2(f, tmp / f.name)
    used = {k: kw.get(k, defaults.get(k)) for k in ("iters", *DEFAULT_KEYS)}
    if calib_info:
        used["dataset"] = f"--calib {args.calib.name}"
    info = {
        "seconds": seconds,
        "auto_round_version": auto_round.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {"bits": args.bits, "group_size": args.group_size, "sym": args.sym, "amp": args.amp,
                     "own_defaults": args.own_defaults, **used},
        "autoround_defaults": defaults,
        "calib": calib_info,
        "model": str(args.model),
    }
    (tmp / "bench_seconds.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # an unfinished or older run
    os.replace(tmp, out)
    print(json.dumps({"out": str(out), "seconds": seconds}))


if __name__ == "__main__":
    main()
