"""Block-AP learning rates on one family: the first --blocks blocks trained at each pair of rates.

Each variant trains the first blocks of the real model (both streams start in full precision) for
one pass over C4 calibration windows and scores every block's last packed state on held-out
windows (no keep-best, no backoff: the rates alone). `--only` trains only the weights of Linears
whose names contain one of the given parts (the others' weights at ~0), to see which Linears are
sensitive.

    python benchmarks/block_lr.py --model gemma3-270m --rates 1e-3:1e-3,1e-4:1e-4,1e-5:1e-5 --name block_lr_gemma3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from eqat.core.scheme import QuantScheme
from eqat.data import calibration_windows
from eqat.io.report import environment, write_json
from eqat.engine.blockwise import BlockwiseEngine
from eqat.methods.base import ParamGroup, get_method, register_method
from eqat.methods.block_ap import BlockAP, BlockAPConfig
from eqat.methods.fakequant import FakeQuantLinear
from eqat.models.default_model import packaged_model_path
from eqat.models.loading import load_model

RESULTS = Path(__file__).parent / "results"
OFF = 1e-12  # "not trained": AdamW needs a positive rate


def train_first_blocks(model_name: str, blocks: int, scheme: QuantScheme, lr_weight: float, lr_quant: float,
                       nsamples: int, seqlen: int, only: list[str] | None) -> list[dict]:
    """Held-out (RTN start, trained) block losses of the first `blocks` blocks at these rates."""
    model, tok = load_model(packaged_model_path(model_name))
    text = model.config.get_text_config()
    model.model.layers = model.model.layers[:blocks]
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:blocks]
    text.num_hidden_layers = blocks
    calib = calibration_windows(tok, "c4", nsamples + 8, seqlen, seed=0)
    cfg = BlockAPConfig(val_samples=8, epochs=1, lr_weight=lr_weight, lr_quant=lr_quant, keep_best=False,
                        lr_backoff=False)
    method = get_method("block-ap-some-linears")
    method.only = only
    records = BlockwiseEngine(model, method, cfg, scheme, tempfile.mkdtemp(), progress=False).run(calib)
    return [{"block": r.block, "start": r.init_loss, "trained": r.final_loss} for r in records]


class BlockAPSomeLinears(BlockAP):
    """Block-AP whose weights train only in the Linears named by `only` (the others' at ~0); registered
    under its own name so the engine can run it, as benchmarks/sink_block.py does."""

    name = "block-ap-some-linears"
    only: list[str] | None = None

    def prepare_block(self, block, scheme, cfg):
        groups = super().prepare_block(block, scheme, cfg)
        if not self.only:
            return groups
        frozen = {id(m.weight) for n, m in block.named_modules()
                  if isinstance(m, FakeQuantLinear) and not any(part in n for part in self.only)}
        kept = [ParamGroup(g.name, [p for p in g.params if id(p) not in frozen], g.lr) for g in groups]
        return [g for g in kept if g.params] + [
            ParamGroup("frozen_weights", [p for g in groups for p in g.params if id(p) in frozen], OFF)]


register_method(BlockAPSomeLinears)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rates", default="1e-3:1e-3,1e-4:1e-4,1e-5:1e-5", help="weight:scale pairs; 0 = not trained")
    ap.add_argument("--only", default="", help="';'-separated sets of Linear name parts, e.g. 'q_proj,k_proj;down_proj'")
    ap.add_argument("--name", default="block_lr")
    args = ap.parse_args()
    scheme = QuantScheme.parse(args.scheme)
    rows = []
    for pair in args.rates.split(","):
        w, q = (float(x) or OFF for x in pair.split(":"))
        for only in ([s.split(",") for s in args.only.split(";")] if args.only else [None]):
            t0 = time.perf_counter()
            blocks = train_first_blocks(args.model, args.blocks, scheme, w, q, args.nsamples, args.seqlen, only)
            rows.append({"lr_weight": w, "lr_quant": q, "only": only, "blocks": blocks,
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    lines = [f"# Block-AP rates on {args.model}, {args.scheme}: first {args.blocks} block(s), {args.nsamples} C4 windows "
             f"x {args.seqlen}, one epoch, last state, 8 held-out windows", "",
             f"`python benchmarks/block_lr.py --model {args.model} --scheme {args.scheme} --blocks {args.blocks} "
             f"--rates {args.rates}" + (f" --only '{args.only}'" if args.only else "") + f" --name {args.name}`", "",
             "| lr weight | lr scale/zero | weights trained | " + " | ".join(f"block {b} (start)" for b in range(args.blocks))
             + " | s |", "|---|---|---|" + "---|" * args.blocks + "---|"]
    for r in rows:
        fmt = lambda v: "~0" if v == OFF else f"{v:g}"  # noqa: E731
        cells = " | ".join(f"{b['trained']:.4g} ({b['start']:.4g})" for b in r["blocks"])
        lines.append(f"| {fmt(r['lr_weight'])} | {fmt(r['lr_quant'])} | {','.join(r['only']) if r['only'] else 'all'} | "
                     f"{cells} | {r['seconds']:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    write_json(RESULTS / f"{args.name}.json", {"args": vars(args), "rows": rows, "environment": environment()})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
