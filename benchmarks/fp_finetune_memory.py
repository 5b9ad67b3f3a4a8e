"""Peak memory of full-precision fine-tuning with AdamW: the yardstick for E2E-QP's memory.

Loads the unquantized model in float32, trains *every* parameter with AdamW on the same
sequence shape E2E-QP uses (batch x seqlen, gradient accumulation, optional gradient
checkpointing) for a few steps (AdamW allocates its state at the first step, so the peak is
reached by step 2), and prints one JSON object. Run by benchmarks/quality.py in its own
process, so its peak is not mixed with another phase's:

    python benchmarks/fp_finetune_memory.py --batch-size 2 --grad-accum 2 --seqlen 256 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from eqat.engine.memory import PeakMemory
from eqat.models.loading import load_model
from eqat.pipeline import resolve_model
from eqat.engine.end2end import _checkpointing, lm_loss_sum
from eqat.data.e2e_data import e2e_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="c4")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args()

    model, tok = load_model(resolve_model(args.model))
    n = args.batch_size * args.grad_accum * args.steps
    train, _ = e2e_examples(tok, args.data, n, 0, args.seqlen, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    if args.grad_checkpointing:
        _checkpointing(model, True)
        model.train()
    device = torch.device("cpu")
    t = time.perf_counter()
    with PeakMemory(device) as pm:
        for step in range(args.steps):
            for a in range(args.grad_accum):
                i = (step * args.grad_accum + a) * args.batch_size
                batch = train.rows(slice(i, i + args.batch_size))
                (lm_loss_sum(model, batch, device, False) / max(batch.predicted_tokens(), 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    print(json.dumps({
        "what": "full-precision AdamW fine-tuning, all parameters, float32",
        "trainable_params": sum(p.numel() for p in params), "steps": args.steps, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "seqlen": args.seqlen, "grad_checkpointing": args.grad_checkpointing,
        "seconds": time.perf_counter() - t, "peak_memory": pm.to_dict(),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
