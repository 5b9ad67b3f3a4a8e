"""Diagnose Block-AP on the block that creates a massive activation (SmolLM2: block 11).

Runs the full-precision model up to block --block on C4 calibration windows (both streams = the
full-precision stream, so only this block's own quantization is measured), then trains that block
alone with each variant through the block-wise engine and scores the packed result on the held-out
windows, split where the loss is:

  mse          plain MSE over all tokens (the paper's loss; what report.json shows for --loss mse)
  mse_normal   plain MSE over ordinary tokens (RMS <= 20 x the window's median token RMS)
  sink_rel     relative error ||e||^2/||y||^2 of the outlier (sink) tokens
  massive_share  share of the plain MSE on the massive entries (|y| > 20 x median token RMS)
  normed_*     the same after the next block's input RMSNorm (what its attention sees)

Also: RTN with one Linear quantized at a time (which layer causes the loss), and the trained
block before packing against the packed one with fp16 and bf16 scales (what packing costs).

    python benchmarks/sink_block.py --scheme w2g64 --variants mse,relative,sink,clamp --name sink_block_w2g64
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from eqat.core.qlinear import QuantLinear
from eqat.core.scheme import QuantScheme
from eqat.data import calibration_windows
from eqat.engine.blockwise import BlockwiseEngine, run_block
from eqat.engine.streams import ActivationStream
from eqat.io.report import environment, write_json
from eqat.methods.base import get_method, register_method
from eqat.methods.block_ap import BlockAP, BlockAPConfig
from eqat.methods.fakequant import FakeQuantLinear, trainable_groups, wrap_block
from eqat.methods.base import ParamGroup
from eqat.models.arch import block_linears, decoder_blocks, replace_module
from eqat.models.default_model import default_model_path
from eqat.models.loading import load_model

RESULTS = Path(__file__).parent / "results"
RATIO = 20.0


class BlockAPWideLayer(BlockAP):
    """Block-AP with one Linear of the block at a wider scheme (the experiment behind per-layer
    precision); registered under its own name so the engine can run it."""

    name = "block-ap-wide-layer"
    wide: tuple[str, QuantScheme] | None = None

    def prepare_block(self, block, scheme, cfg):
        if self.wide:
            layer, wide = self.wide
            lin = block.get_submodule(layer)
            replace_module(block, layer, FakeQuantLinear(lin, wide, torch.float16))
        wrap_block(block, scheme, torch.float16)
        weights, qparams = trainable_groups(block)
        return [ParamGroup("weights", weights, cfg.weight_lr(scheme.bits)), ParamGroup("quant", qparams, cfg.lr_quant)]


register_method(BlockAPWideLayer)


@torch.no_grad()
def split_errors(block, xs: torch.Tensor, ys: torch.Tensor, kw, norm) -> dict[str, float]:
    """Where the held-out error is: [n, T, H] inputs and full-precision targets."""
    sums = {k: 0.0 for k in ("sq", "sq_normal", "n_normal", "sq_massive", "sink_rel", "n_sink", "nsq_normal", "nsq_sink")}
    n_entries = 0
    for s in range(xs.shape[0]):
        x, y = xs[s : s + 1].float(), ys[s : s + 1].float()
        out = run_block(block, x, kw).float()
        err = (out - y).pow(2)
        rms = y.pow(2).mean(-1).sqrt()  # [1, T]
        typical = rms.median(-1).values[..., None]
        sink = rms > RATIO * typical
        massive = y.abs() > RATIO * typical[..., None]
        nerr = (norm(out) - norm(y)).pow(2).mean(-1)
        sums["sq"] += float(err.sum())
        sums["sq_massive"] += float(err[massive].sum())
        sums["sq_normal"] += float(err.mean(-1)[~sink].sum())
        sums["n_normal"] += int((~sink).sum())
        sums["sink_rel"] += float((err.sum(-1) / y.pow(2).sum(-1))[sink].sum())
        sums["n_sink"] += int(sink.sum())
        sums["nsq_normal"] += float(nerr[~sink].sum())
        sums["nsq_sink"] += float(nerr[sink].sum())
        n_entries += err.numel()
    n_sink = max(sums["n_sink"], 1)
    return {"mse": sums["sq"] / n_entries, "mse_normal": sums["sq_normal"] / max(sums["n_normal"], 1),
            "sink_rel": sums["sink_rel"] / n_sink, "massive_share": sums["sq_massive"] / max(sums["sq"], 1e-30),
            "normed_normal": sums["nsq_normal"] / max(sums["n_normal"], 1), "normed_sink": sums["nsq_sink"] / n_sink,
            "sink_tokens": sums["n_sink"]}


def rtn_one_layer(block, layer: str | None, scheme: QuantScheme):
    """The block with RTN on `layer` only (None: every Linear)."""
    q = copy.deepcopy(block)
    for name, lin in block_linears(q).items():
        if layer is None or name == layer:
            replace_module(q, name, QuantLinear.from_weight(lin.weight.detach(), scheme, bias=lin.bias))
    return q


def parse_variant(spec: str, scheme: QuantScheme) -> tuple[dict, tuple[str, QuantScheme] | None]:
    """'loss[:key=value...]', e.g. 'sink:sink_weight=10', 'mse:epochs=6', 'mse:wide=mlp.down_proj@w8g64'."""
    loss, *kvs = spec.split(":")
    overrides: dict = {"loss": loss}
    wide = None
    for kv in kvs:
        k, v = kv.split("=")
        if k == "wide":
            layer, sch = v.split("@")
            wide = (layer, QuantScheme.parse(sch))
        else:
            overrides[k] = type(getattr(BlockAPConfig(), k) if getattr(BlockAPConfig(), k) is not None else 1.0)(v)
    return overrides, wide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="w2g64")
    ap.add_argument("--block", type=int, default=11)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--val-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--variants", default="mse,relative,sink,clamp")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    scheme = QuantScheme.parse(args.scheme)
    model, tok = load_model(default_model_path())
    calib = calibration_windows(tok, "c4", args.nsamples + args.val_samples, args.calib_seqlen, 0)
    blocks = decoder_blocks(model)
    n, t, h = calib.shape[0], calib.shape[1], model.config.hidden_size
    base_cfg = dict(epochs=args.epochs, val_samples=args.val_samples, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="sink-block-"))
    engine = BlockwiseEngine(model, get_method("block-ap"), BlockAPConfig(**base_cfg), scheme, tmp, progress=False)
    x = ActivationStream.create(tmp / "x", (n, t, h), torch.bfloat16, "cpu")
    kw = engine._capture(calib, x)
    for i in range(args.block):
        y = ActivationStream.create(tmp / f"y{i}", (n, t, h), torch.bfloat16, "cpu")
        engine._apply(blocks[i], x, y, kw)
        x = y
    fp_block = copy.deepcopy(blocks[args.block])
    yfp = ActivationStream.create(tmp / "yfp", (n, t, h), torch.bfloat16, "cpu")
    engine._apply(fp_block, x, yfp, kw)
    val = slice(args.nsamples, n)
    xv, yv = x[val], yfp[val]
    norm = (blocks[args.block + 1].input_layernorm if args.block + 1 < len(blocks) else model.model.norm).float()
    rows = []

    def row(label: str, block, extra: dict | None = None) -> None:
        r = {"variant": label, **split_errors(block, xv, yv, kw, norm), **(extra or {})}
        rows.append(r)
        print(json.dumps(r), flush=True)

    row("fp (no quantization)", fp_block)
    row("rtn, all layers", rtn_one_layer(fp_block, None, scheme))
    for layer in block_linears(fp_block):
        row(f"rtn, only {layer}", rtn_one_layer(fp_block, layer, scheme))
    for spec in args.variants.split(","):
        overrides, wide = parse_variant(spec, scheme)
        cfg = BlockAPConfig(**{**base_cfg, **overrides})
        method = get_method("block-ap-wide-layer")
        method.wide = wide
        engine.method, engine.config = method, cfg
        engine.blocks[args.block] = copy.deepcopy(fp_block)
        t0 = time.perf_counter()
        engine._block(args.block, x, x, kw, args.nsamples)
        rec = engine.records[-1]
        row(f"block-ap {spec}", engine.blocks[args.block],
            {"kept_epoch": rec.kept_epoch, "heldout_losses": rec.heldout_losses, "fake_quant_loss": rec.fake_quant_loss,
             "seconds": time.perf_counter() - t0})
    name = args.name or f"sink_block_{scheme.name}"
    md = [f"# Block {args.block} of SmolLM2-135M-Instruct at {scheme.name}: where the held-out error is", "",
          f"{args.nsamples} C4 windows x {args.calib_seqlen} tokens to train, {args.val_samples} held out, "
          f"{args.epochs} epochs; both streams full precision. Outlier: > {RATIO:g} x the window's median token RMS.", "",
          "| variant | MSE | MSE ordinary tokens | sink rel. error | massive-entry share | normed err ordinary | "
          "normed err sink | kept |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['mse']:.4g} | {r['mse_normal']:.4g} | {r['sink_rel']:.3g} | "
                  f"{r['massive_share']:.1%} | {r['normed_normal']:.4g} | {r['normed_sink']:.4g} | {r.get('kept_epoch', '-')} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    write_json(RESULTS / f"{name}.json", {"args": vars(args), "rows": rows, "environment": environment()})
    print("\n".join(md))


if __name__ == "__main__":
    main()
