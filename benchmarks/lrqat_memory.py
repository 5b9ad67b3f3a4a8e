"""Training memory of LR-QAT against full-model QAT, E2E-QP and full-precision AdamW (issue 20, item 3).

Every variant trains the same model on the same batches (--batch-size x --seqlen C4 tokens, AdamW,
--steps steps) in its own process, and reports its peak resident memory (sampled RSS, so the torch
runtime is included in every row) and an exact accounting of what stays allocated through training:
parameters and buffers, gradients and AdamW's two moments of every trainable tensor. Variants:

    fp-adamw     every parameter trainable, float32 (the yardstick)
    qat          full-model QAT: every block weight trainable through the fake quantizer (eqat's
                 FakeQuantLinear, Block-AP's layer), with its scales and zero-points; embeddings,
                 norms and LM head frozen, as in LR-QAT
    lr-qat       LR-QAT end to end: frozen grid U (int8 fixed point, or --phi0), A and B of rank r,
                 scales trainable; the fp weights dropped
    e2e-qp       E2E-QP on the RTN-packed model: the step sizes only

each with and without activation checkpointing (--checkpointing both). The 7B rows apply the same
per-tensor rules to Llama-2-7B's shapes (computed, not run). Run:

    python benchmarks/lrqat_memory.py --scheme w4g64 --batch-size 2 --seqlen 256 --steps 3
    python benchmarks/lrqat_memory.py --device cuda --name lrqat_memory_cuda   # exact peaks, on a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("fp-adamw", "qat", "lr-qat:int8", "lr-qat:bfloat16", "e2e-qp")
LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000,
             "tied": False}


def setup(variant: str, model, scheme, rank: int):
    """Make `variant`'s parameters trainable, in place; the trainable tensors."""
    from eqat.core.layer_schemes import LayerSchemes
    from eqat.methods.e2e_qp import E2EQP, E2EQPConfig
    from eqat.methods.fakequant import trainable_groups, wrap_block
    from eqat.methods.lr_qat import LRQAT, LRQATConfig
    from eqat.methods.rtn import quantize_rtn
    from eqat.models.arch import decoder_blocks

    if variant == "fp-adamw":
        return [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    if variant == "qat":
        out = []
        for block in decoder_blocks(model):
            wrap_block(block, scheme, torch.float16)
            weights, qparams = trainable_groups(block)
            out += weights + qparams
        return out
    if variant.startswith("lr-qat"):
        method = LRQAT()
        method.start_from_full_precision(LayerSchemes(scheme), torch.float16)
        groups = method.prepare_model(model, LRQATConfig(rank=rank, phi0=variant.split(":")[1]))
    else:
        quantize_rtn(model, scheme)
        groups = E2EQP().prepare_model(model, E2EQPConfig())
    return [p for g in groups for p in g.params]


def accounting(model, trainable) -> dict[str, int]:
    """Bytes that live through training: every parameter and buffer, plus a gradient and AdamW's
    two float32 moments per trainable element."""
    ids = {id(p) for p in trainable}
    stored = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) in ids)
    adam = sum(2 * 4 * p.numel() for p in trainable)
    return {"stored_bytes": stored, "grad_bytes": grads, "adam_bytes": adam, "total_bytes": stored + grads + adam}


def run_one(args) -> dict:
    from eqat.core.scheme import QuantScheme
    from eqat.data.e2e_data import e2e_examples
    from eqat.engine.end2end import _checkpointing, lm_loss_sum
    from eqat.engine.memory import PeakMemory, rss_bytes
    from eqat.models.loading import load_model
    from eqat.pipeline import resolve_model

    base = rss_bytes()  # the interpreter, torch and eqat imported: subtracted in the "over runtime" columns
    model, tok = load_model(resolve_model(args.model))
    train, _ = e2e_examples(tok, "c4", args.batch_size * args.steps, 0, args.seqlen, seed=0)
    loaded = rss_bytes()
    trainable = setup(args.variant, model, QuantScheme.parse(args.scheme), args.rank)
    device = torch.device(args.device)
    model.to(device)  # on CUDA the peak is torch.cuda.max_memory_allocated: exact, no runtime in it
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    if args.checkpointing:
        _checkpointing(model, True)
        model.train()
    t = time.perf_counter()
    with PeakMemory(device) as pm:
        for step in range(args.steps):
            batch = train.rows(slice(step * args.batch_size, (step + 1) * args.batch_size))
            (lm_loss_sum(model, batch, device, False) / max(batch.predicted_tokens(), 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"variant": args.variant, "checkpointing": args.checkpointing, "trainable_params": sum(p.numel() for p in trainable),
            "seconds_per_step": (time.perf_counter() - t) / args.steps, "rss_runtime_bytes": base if device.type == "cpu" else 0, "rss_after_load_bytes": loaded,
            "rss_before_training_bytes": pm.start_bytes, "peak_rss_bytes": pm.peak_bytes, **accounting(model, trainable)}


def llama_7b_accounting(variant: str, bits: int, group: int, rank: int) -> int:
    """The accounting of `run_one` applied to Llama-2-7B's shapes (fp32 where eqat's CPU run is fp32)."""
    c = LLAMA2_7B
    h, f, n = c["hidden"], c["intermediate"], c["layers"]
    kv = h * c["kv_heads"] // c["heads"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)] * n  # (out, in)
    lin = sum(o * i for o, i in shapes)
    groups = sum(o * (i // group) for o, i in shapes)
    other = c["vocab"] * h * (1 if c["tied"] else 2) + (2 * n + 1) * h  # embeddings, head, norms
    if variant == "fp-adamw":
        return 16 * (lin + other)
    if variant == "qat":  # fp32 weight + grad + moments; scale and zero trainable too
        return 16 * lin + 2 * 16 * groups + 4 * other
    if variant.startswith("lr-qat"):
        grid = 1 if variant.endswith("int8") else 2
        adapters = sum(rank * (o + i) for o, i in shapes)
        return grid * lin + 16 * adapters + 16 * groups + 2 * 4 * groups + 4 * other  # + zero and zero0 buffers
    return lin * bits // 8 + 16 * groups + 2 * groups + 4 * other  # e2e-qp: packed codes, fp16 zeros, fp32 scales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--checkpointing", default="both", choices=["both", "on", "off"])
    ap.add_argument("--variant", default=None, help="run one variant in this process and print its JSON")
    ap.add_argument("--name", default="lrqat_memory")
    ap.add_argument("--device", default="cpu", help="cpu (peak RSS, sampled) or cuda (peak allocated, exact)")
    args = ap.parse_args()
    if args.variant:
        args.checkpointing = args.checkpointing == "on"
        print(json.dumps(run_one(args)))
        return
    from eqat.core.scheme import QuantScheme
    from eqat.io.report import environment, write_json

    scheme = QuantScheme.parse(args.scheme)
    rows = []
    for v in args.variants.split(","):
        for ck in ({"both": ["off", "on"]}.get(args.checkpointing) or [args.checkpointing]):
            cmd = [sys.executable, __file__, "--variant", v, "--checkpointing", ck, "--scheme", args.scheme,
                   "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen), "--steps", str(args.steps),
                   "--rank", str(args.rank), "--device", args.device] + (["--model", args.model] if args.model else [])
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            row["llama2_7b_total_bytes"] = llama_7b_accounting(v, scheme.bits, scheme.group_size, args.rank)
            rows.append(row)
            print(f"{v:16s} ckpt={ck:3s} peak {row['peak_rss_bytes'] / 2**30:.2f} GiB  trainable {row['trainable_params']:,}",
                  flush=True)
    from eqat.pipeline import resolve_model

    settings = {k: getattr(args, k) for k in ("scheme", "batch_size", "seqlen", "steps", "rank", "device")}
    settings["model"] = resolve_model(args.model).name
    write_json(RESULTS / f"{args.name}.json", {"settings": settings, "rows": rows, "environment": environment()})
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, settings))
    print(markdown(rows, settings))


def markdown(rows: list[dict], s: dict) -> str:
    gib = 2**30
    qat = {r["checkpointing"]: r for r in rows if r["variant"] == "qat"}
    md = [f"# Training memory, {s['model']}, {s['scheme']}, batch {s['batch_size']} x {s['seqlen']} tokens, "
          f"AdamW, {s['steps']} steps, LR-QAT rank {s['rank']}", "",
          ("Peak: torch.cuda.max_memory_allocated over the steps (exact; no runtime in it)" if s.get("device") == "cuda"
           else "Peak RSS includes the torch runtime and the data (the same in every row)") +
          "; the accounting counts what lives "
          "through training: parameters and buffers, gradients, AdamW moments (activations excluded). The 7B column "
          "applies the accounting to Llama-2-7B's shapes.", "",
          "| variant | checkpointing | trainable params | peak RSS GiB | / QAT's | peak over runtime GiB | / QAT's | "
          "accounting MiB | / QAT's | s/step | Llama-2-7B accounting GiB | / QAT's |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(r: dict, key) -> str:
        q = qat.get(r["checkpointing"])
        return f"{key(r) / key(q):.2f}" if q else "-"

    over = lambda r: r["peak_rss_bytes"] - r["rss_runtime_bytes"]  # noqa: E731
    for r in rows:
        md.append(f"| {r['variant']} | {'yes' if r['checkpointing'] else 'no'} | {r['trainable_params']:,} | "
                  f"{r['peak_rss_bytes'] / gib:.2f} | {ratio(r, lambda x: x['peak_rss_bytes'])} | {over(r) / gib:.2f} | "
                  f"{ratio(r, over)} | {r['total_bytes'] / 2**20:.0f} | {ratio(r, lambda x: x['total_bytes'])} | "
                  f"{r['seconds_per_step']:.2f} | {r['llama2_7b_total_bytes'] / gib:.1f} | "
                  f"{ratio(r, lambda x: x['llama2_7b_total_bytes'])} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
