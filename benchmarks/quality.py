"""Perplexity and wall time of each quantization method on SmolLM2 (or --model), WikiText-2 test.

Methods: fp (unquantized), rtn, gptq (GPTQModel, needs `pip install gptqmodel`), autoround and
autoround-defaults (Intel AutoRound, `scripts/install_autoround.sh`, run by
benchmarks/autoround_run.py with --autoround-python in its own process), block-ap (eqat),
block-ap+e2e (eqat Block-AP, then E2E-QP through `eqat train-e2e` in its own process, with
full-precision AdamW fine-tuning of the same model measured beside it for memory,
benchmarks/fp_finetune_memory.py), and eqat[CONFIG] (the command a user runs, `eqat quantize --config
configs/CONFIG.yaml --scheme S --no-eval`, in its own process; its time is that process's wall
clock, its calibration is the config's). GPTQ, autoround and Block-AP get the same calibration windows
(C4 sample, --nsamples x --calib-seqlen, --seed); autoround tunes each block for
--autoround-iters steps (AutoRound's default 200), asymmetric like eqat's schemes.
autoround-defaults keeps AutoRound's own nsamples x seqlen (128 x 2048) and iters (200), on C4
windows (--calib-data, --seed) since its default data set (NeelNanda/pile-10k) needs the Hub.
AutoRound runs in float32 (amp off) like the other methods, and is evaluated on its own
dequantized weights. E2E-QP trains on C4 windows with its defaults. Rows are merged into
benchmarks/results/<name>.json (a row is replaced when the same method and scheme are run again
with the same settings), and the markdown table <name>.md is rewritten. Run:

    python benchmarks/quality.py --methods fp,rtn,gptq,block-ap --schemes w2g64,w3g64,w4g64 --max-windows 16
    python benchmarks/quality.py --methods 'eqat[w2-quality]' --schemes w2g64,w3g64,w4g64 --max-windows 40
    scripts/install_autoround.sh && python benchmarks/quality.py --methods autoround,autoround-defaults
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from eqat.data.sources import calibration_windows, eval_token_ids
from eqat.data.evaluate import perplexity
from eqat.models.loading import load_model
from eqat.io.report import environment, write_json
from eqat.pipeline import CalibOptions, resolve_model
from eqat.core.scheme import QuantScheme
from eqat.io.checkpoint import is_eqat_checkpoint, load_quantized, save_quantized
from eqat.engine.blockwise import peak_memory_bytes
from eqat.methods.block_ap import BlockAPConfig, BlockAPTrainer
from eqat.methods.e2e_qp import E2EQPConfig
from eqat.methods.rtn import quantize_rtn

RESULTS = Path(__file__).parent / "results"
GPTQ_CONCAT = 4
# where scripts/install_autoround.sh puts auto-round when it cannot share this environment
AUTOROUND_VENV = Path(os.environ.get("EQAT_AUTOROUND_VENV", Path.home() / ".cache" / "eqat" / "venvs" / "autoround"))
# auto-round 0.16.1's own defaults (AutoRound(nsamples=, seqlen=), SignRoundConfig(iters=)), for
# autoround-defaults; autoround_run.py records the values it ran with
AUTOROUND_DEFAULTS = {"nsamples": 128, "seqlen": 2048, "iters": 200}


def run_gptq(model_path: Path, scheme: QuantScheme, calib: torch.Tensor, workdir: Path) -> tuple[torch.nn.Module, dict]:
    """GPTQModel quantization, saved in `workdir` (a finished one is reused), then its own
    dequantized weights in float32 for evaluation."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    # everything in memory, as eqat does (GPTQModel's default offloads finished layers to disk)
    qc = QuantizeConfig(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.symmetric, desc_act=False,
                        offload_to_disk=False)
    # The same windows, concatenated 4 at a time: GPTQModel's CPU path costs ~1 min per layer per
    # 64 rows here, and what GPTQ uses (the Hessian X^T X of each layer) depends on the tokens,
    # not on how they are grouped into rows, up to the attention context of each token.
    rows = calib.reshape(-1, GPTQ_CONCAT * calib.shape[1]) if calib.shape[0] % GPTQ_CONCAT == 0 else calib
    out = workdir / f"gptq-{scheme.name}-{calib.shape[0]}x{calib.shape[1]}"
    timing = out / "bench_seconds.json"
    if not timing.is_file():
        data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in rows]
        t = time.perf_counter()
        # float32 like every other method here (GPTQModel picks bf16 on CPU, which AVX2 runs ~3x slower)
        m = GPTQModel.load(str(model_path), qc, device="cpu", dtype=torch.float32)
        m.quantize(data, batch_size=1)
        seconds = time.perf_counter() - t
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        m.save(str(tmp))
        write_json(tmp / timing.name, {"method_seconds": seconds})
        shutil.rmtree(out, ignore_errors=True)  # an unfinished earlier attempt
        tmp.replace(out)
    seconds = json.loads(timing.read_text())["method_seconds"]
    # GPTQModel's CPU kernels run fp16/bf16 only; evaluate its own dequantized weights in fp32.
    # TorchLinear (GPTQ_TORCH) dequantizes on CPU; the auto-picked TorchAtenLinear fails to at 4 bits.
    loaded = GPTQModel.load(str(out), device="cpu", dtype=torch.float16, backend=BACKEND.GPTQ_TORCH).model.eval()
    max_diff = dequantize_gptq_model(loaded)
    cfg = {k: str(getattr(qc, k)) for k in ("bits", "group_size", "sym", "desc_act", "damp_percent", "act_group_aware",
                                            "offload_to_disk")}
    return loaded, {"method_seconds": seconds, "gptq_config": cfg, "gptq_rows": list(rows.shape),
                    "fp16_vs_fp32_logit_max_diff": max_diff}


def default_autoround_python() -> str:
    """The install script's virtualenv when there is one, else this Python (where it installs
    auto-round when the pins fit)."""
    venv = AUTOROUND_VENV / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def run_autoround(model_path: Path, scheme: QuantScheme, calib: torch.Tensor, workdir: Path, python: str,
                  iters: int | None, seed: int) -> tuple[torch.nn.Module, dict]:
    """AutoRound through benchmarks/autoround_run.py run by `python`, on the windows `calib`;
    `iters` None means AutoRound's own defaults (nsamples, seqlen, iters). Its result, a float32
    HF folder of its dequantized weights, is kept in `workdir` (a finished one is reused)."""
    from safetensors.torch import save_file

    n, t = calib.shape
    tag = "defaults" if iters is None else f"iters{iters}"
    out = workdir / f"autoround-{model_path.name}-{scheme.name}-{n}x{t}-seed{seed}-{tag}"
    timing = out / "bench_seconds.json"
    if not timing.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        calib_file = out.with_name(out.name + "-calib.safetensors")
        save_file({"input_ids": calib.to(torch.int64).contiguous()}, str(calib_file))
        cmd = [python, str(Path(__file__).with_name("autoround_run.py")), "--model", str(model_path),
               "--bits", str(scheme.bits), "--group-size", str(scheme.group_size),
               "--sym" if scheme.symmetric else "--asym", "--calib", str(calib_file), "--out", str(out)]
        cmd += ["--own-defaults"] if iters is None else ["--iters", str(iters)]
        try:
            subprocess.run(cmd, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            raise SystemExit(f"AutoRound failed ({e}); is auto-round installed for {python}? "
                             "Run scripts/install_autoround.sh, or pass --autoround-python.") from e
        calib_file.unlink(missing_ok=True)
    run = json.loads(timing.read_text())
    model, _ = load_model(out)
    return model, {"method_seconds": run["seconds"], "autoround": {k: run.get(k) for k in (
        "auto_round_version", "torch_version", "threads", "settings", "calib")}, "autoround_dir": str(out)}


@torch.no_grad()
def dequantize_gptq_model(model: torch.nn.Module) -> float:
    """Replace GPTQModel's packed linears by float32 nn.Linear holding its own dequantized
    weights (`dequantize_weight()` is [K, N]); returns the largest logit difference between the
    fp16 packed model and the fp32 result on a short input, as a check."""
    from eqat.models.arch import replace_module

    x = torch.arange(1, 65)[None]
    before = model(x).logits.float()
    for name, m in list(model.named_modules()):
        if hasattr(m, "qweight") and hasattr(m, "dequantize_weight"):
            w = m.dequantize_weight().T.float().contiguous()
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
            replace_module(model, name, lin)
    model.float()
    return float((model(x).logits - before).abs().max())


def block_ap_dir(workdir: Path, scheme: QuantScheme, calib: torch.Tensor, config: BlockAPConfig) -> Path:
    """Where the benchmark keeps a Block-AP run, so later rows (E2E-QP) start from it."""
    return workdir / f"blockap-{scheme.name}-{config.loss}-seed{config.seed}-{calib.shape[0]}x{calib.shape[1]}"


def run_block_ap(model_path: Path, scheme: QuantScheme, calib: torch.Tensor, config: BlockAPConfig,
                 workdir: Path) -> tuple[torch.nn.Module, dict]:
    """Block-AP, resumed from (or reusing a finished run in) `block_ap_dir`; the time reported
    is the sum of the blocks' training times when the run was reused."""
    model, _ = load_model(model_path)
    t = time.perf_counter()
    records = BlockAPTrainer(model, scheme, config, block_ap_dir(workdir, scheme, calib, config)).run(calib)
    seconds = max(time.perf_counter() - t, sum(r.seconds for r in records))
    return model, {
        "method_seconds": seconds, "seconds_per_block": seconds / len(records),
        "peak_memory_bytes": peak_memory_bytes(torch.device("cpu")), "config": asdict(config),
        "weight_lr": config.weight_lr(scheme.bits),
        "blocks": [{"block": r.block, "init_loss": r.init_loss, "final_loss": r.final_loss, "seconds": r.seconds}
                   for r in records],
    }


def run_block_ap_e2e(model_path: Path, scheme: QuantScheme, calib: torch.Tensor, config: BlockAPConfig,
                     workdir: Path, fp_yardstick: bool = True) -> tuple[torch.nn.Module, dict]:
    """Block-AP (reused from `block_ap_dir` when finished), then `eqat train-e2e` and the
    full-precision fine-tuning yardstick, each in its own process so each peak is its own."""
    model, bap = run_block_ap(model_path, scheme, calib, config, workdir)
    base = block_ap_dir(workdir, scheme, calib, config)
    ckpt = base.with_name(base.name + "-ckpt")
    if not is_eqat_checkpoint(ckpt):
        _, tok = load_model(model_path)
        save_quantized(model, tok, ckpt, provenance={"method": "block-ap", "base_model": str(model_path)}, force=True)
    e2e_out = base.with_name(base.name + "-e2e")
    cfg = E2EQPConfig()
    cmd = [sys.executable, "-m", "eqat", "train-e2e", str(ckpt), "--out", str(e2e_out), "--no-eval", "--force", "--json",
           "-q"]
    t = time.perf_counter()
    e2e_report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    e2e_seconds = time.perf_counter() - t
    fp_ft = None
    if fp_yardstick:
        fp_cmd = [sys.executable, str(Path(__file__).with_name("fp_finetune_memory.py")), "--batch-size",
                  str(cfg.batch_size), "--grad-accum", str(cfg.grad_accum), "--seqlen", str(cfg.seqlen), "--model",
                  str(model_path)]
        fp_ft = json.loads(subprocess.run(fp_cmd, check=True, capture_output=True, text=True).stdout)
    e2e = e2e_report["e2e_qp"]
    e2e.pop("log", None)
    model, _, _ = load_quantized(e2e_out)
    return model, {
        "method_seconds": bap["method_seconds"] + e2e["train_seconds"],
        "block_ap": {k: bap[k] for k in ("method_seconds", "seconds_per_block", "peak_memory_bytes", "weight_lr")},
        "e2e_qp": {**e2e, "process_seconds": e2e_seconds, "process_peak_rss_bytes": e2e_report["process_peak_rss_bytes"]},
        "fp_finetune": fp_ft,
    }


def run_eqat_config(model_path: Path, scheme: QuantScheme, config: str, workdir: Path) -> tuple[torch.nn.Module, dict]:
    """`eqat quantize --config configs/<config>.yaml --scheme S --no-eval` in its own process, reused
    when a finished run is in the work folder (its wall seconds are kept beside it)."""
    config_path = Path(__file__).resolve().parents[1] / "configs" / f"{config}.yaml"
    if not config_path.is_file():
        raise SystemExit(f"eqat[{config}]: no such preset {config_path}; choose one of configs/*.yaml")
    out = workdir / f"eqat-{config}-{scheme.name}-{model_path.name}"
    timing = out / "bench_seconds.json"
    if not (is_eqat_checkpoint(out) and timing.is_file()):
        cmd = [sys.executable, "-m", "eqat", "quantize", "--config", str(config_path), "--model", str(model_path),
               "--scheme", scheme.name, "--out", str(out), "--no-eval", "--force", "--json", "-q"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        report = json.loads(proc.stdout)
        write_json(timing, {"process_seconds": time.perf_counter() - t,
                            "process_peak_rss_bytes": report.get("process_peak_rss_bytes")})
    model, _, _ = load_quantized(out)
    seconds = json.loads(timing.read_text())
    return model, {"method_seconds": seconds["process_seconds"], "config": config_path.read_text(),
                   "process_peak_rss_bytes": seconds["process_peak_rss_bytes"], "checkpoint": str(out)}


def run_method(method: str, model_path: Path, scheme: QuantScheme | None, calib: torch.Tensor,
               config: BlockAPConfig, workdir: Path, autoround_python: str | None = None,
               autoround_iters: int = AUTOROUND_DEFAULTS["iters"], fp_yardstick: bool = True
               ) -> tuple[torch.nn.Module, dict]:
    if method == "block-ap":
        return run_block_ap(model_path, scheme, calib, config, workdir)
    if method == "block-ap+e2e":
        return run_block_ap_e2e(model_path, scheme, calib, config, workdir, fp_yardstick)
    if method.startswith("eqat[") and method.endswith("]"):
        return run_eqat_config(model_path, scheme, method[5:-1], workdir)
    if method == "gptq":
        return run_gptq(model_path, scheme, calib, workdir)
    if method in ("autoround", "autoround-defaults"):
        return run_autoround(model_path, scheme, calib, workdir, autoround_python or default_autoround_python(),
                             autoround_iters if method == "autoround" else None, config.seed)
    model, _ = load_model(model_path)
    t = time.perf_counter()
    if method == "rtn":
        quantize_rtn(model, scheme)
    elif method != "fp":
        raise SystemExit(f"unknown method {method}; choose from fp, rtn, gptq, autoround, autoround-defaults, block-ap, "
                         "block-ap+e2e")
    return model, {"method_seconds": time.perf_counter() - t}


def merge_row(path: Path, settings: dict, row: dict) -> dict:
    """Add `row` to the results file (re-read now, so runs in parallel do not drop each other's rows).

    Rows measured under other settings are dropped, except fp/rtn rows, which use no calibration."""
    results = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    old = results.get("settings") or {}
    if old != settings:
        same_eval = all(old.get(k) == settings[k] for k in ("model", "seqlen", "max_windows", "eval_data"))
        results["rows"] = [r for r in results["rows"] if same_eval and r["method"] in ("fp", "rtn")]
    results["rows"] = [r for r in results["rows"] if (r["method"], r["scheme"]) != (row["method"], row["scheme"])]
    for r in results["rows"]:  # rows from before each row carried its own machine
        r.setdefault("environment", results.get("environment"))
    results["rows"].append({**row, "environment": environment()})
    results.update(settings=settings, environment=environment())
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
    return results


def markdown(name: str, results: dict) -> str:
    s = results["settings"]
    fp = next((r["ppl"] for r in results["rows"] if r["method"] == "fp"), None)
    ar_rows = [r for r in results["rows"] if "autoround" in r]
    calibrated = "gptq, autoround and block-ap" if ar_rows else "gptq and block-ap"
    md = [f"# Quality: {Path(s['model']).name}, WikiText-2 test, first {s['max_windows']} windows x {s['seqlen']} tokens",
          "", f"Calibration for {calibrated}: {s['calib']['data']}, {s['calib']['nsamples']} x "
          f"{s['calib']['seqlen']} tokens, seed {s['calib']['seed']}.", "",
          "| method | scheme | perplexity | gap to fp | method time (s) | machine |", "|---|---|---|---|---|---|"]
    order = {"fp": 0, "rtn": 1, "gptq": 2, "autoround": 2.3, "autoround-defaults": 2.6, "block-ap": 3,
             "block-ap+e2e": 4, "block-ap[relative]": 5}
    rank = lambda m: order.get(m, order["autoround"] if m.startswith("autoround[") else 6 if m.startswith("eqat[") else 9)  # noqa: E731
    if ar_rows:
        notes = sorted({f"{r['method']}: auto-round {r['autoround']['auto_round_version']}, "
                        f"{r['autoround']['settings']['nsamples']} x {r['autoround']['settings']['seqlen']} tokens, "
                        f"{r['autoround']['settings']['iters']} iters, batch {r['autoround']['settings']['batch_size']}"
                        for r in ar_rows})
        hub = (" autoround-defaults calibrates on windows of the same data and seed (its own nsamples x seqlen), "
               "as AutoRound's default data set (NeelNanda/pile-10k) needs the Hub."
               if any(r["method"] == "autoround-defaults" for r in ar_rows) else "")
        md[4:4] = ["AutoRound (asymmetric, float32 weights dequantized by AutoRound): " + "; ".join(notes) + "." + hub, ""]
    if any(r["method"].startswith("eqat[") for r in results["rows"]):
        md[4:4] = ["eqat[CONFIG]: `eqat quantize --config configs/CONFIG.yaml --scheme S --no-eval` (calibration, "
                   "budget and phases from the config); its time is the process's wall clock, loading included.", ""]
    for r in sorted(results["rows"], key=lambda r: (r["scheme"], rank(r["method"]))):
        gap = "-" if fp is None or r["method"] == "fp" else f"{r['ppl'] - fp:.2f}"
        cpu = (r.get("environment") or {}).get("cpu", "not recorded")
        md.append(f"| {r['method']} | {r['scheme']} | {r['ppl']:.2f} | {gap} | {r['method_seconds']:.1f} | {cpu} |")
    e2e_rows = [r for r in results["rows"] if "e2e_qp" in r]
    if e2e_rows:
        md += ["", "E2E-QP phase (own process) against full-precision AdamW fine-tuning of the same model "
               "(own process, same batch x accumulation x seqlen); peak = process RSS sampled during training.", "",
               "| scheme | Block-AP s | E2E-QP s | steps | tokens/s | trainable | held-out NLL before -> after "
               "| E2E-QP peak GiB | FP AdamW peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        gib = 2**30
        for r in sorted(e2e_rows, key=lambda r: r["scheme"]):
            e, f = r["e2e_qp"], r["fp_finetune"]
            fp_peak = f"{f['peak_memory']['peak_bytes'] / gib:.2f}" if f else "not run"
            md.append(f"| {r['scheme']} | {r['block_ap']['method_seconds']:.0f} | {e['train_seconds']:.0f} | {e['steps']} | "
                      f"{e['tokens_per_second']:.0f} | {e['trainable_params']:,} | {e['val_loss_before']:.3f} -> "
                      f"{e['val_loss_after']:.3f} | {e['peak_memory']['peak_bytes'] / gib:.2f} | "
                      f"{fp_peak} |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder; default: embedded SmolLM2-135M-Instruct")
    ap.add_argument("--schemes", default="w2g64,w3g64,w4g64")
    ap.add_argument("--methods", default="fp,rtn,gptq,block-ap")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=16)
    defaults = CalibOptions()
    ap.add_argument("--calib-data", default=defaults.data)
    ap.add_argument("--nsamples", type=int, default=defaults.nsamples)
    ap.add_argument("--calib-seqlen", type=int, default=defaults.seqlen)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--loss", default=BlockAPConfig.loss, choices=["mse", "relative"], help="Block-AP loss")
    ap.add_argument("--name", default="quality", help="results file stem")
    ap.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "eqat" / "bench",
                    help="keeps Block-AP runs (resumable, reused by later rows)")
    ap.add_argument("--autoround-iters", type=int, default=AUTOROUND_DEFAULTS["iters"],
                    help="AutoRound tuning steps per block for the autoround rows (AutoRound's default 200)")
    ap.add_argument("--autoround-python", default=None,
                    help=f"Python with auto-round (scripts/install_autoround.sh); default {AUTOROUND_VENV}/bin/python "
                         "when it exists, else this Python")
    ap.add_argument("--no-fp-yardstick", action="store_true",
                    help="block-ap+e2e: skip the full-precision AdamW fine-tuning run measured for memory beside E2E-QP")
    args = ap.parse_args()

    model_path = resolve_model(args.model)
    _, tok = load_model(model_path)
    ids = eval_token_ids(tok, "wikitext2")
    config = BlockAPConfig(seed=args.seed, loss=args.loss)
    calib_opts = CalibOptions(args.calib_data, args.nsamples, args.calib_seqlen, args.seed)
    # Block-AP holds out `val_samples` windows to report block losses; GPTQ gets the same training windows
    calib_all = calibration_windows(tok, args.calib_data, args.nsamples + config.val_samples, args.calib_seqlen, args.seed)
    settings = {"model": str(model_path), "eval_data": "wikitext2 test (carried copy)", "seqlen": args.seqlen,
                "max_windows": args.max_windows, "eval_tokens_total": int(ids.numel()), "calib": asdict(calib_opts)}
    path = RESULTS / f"{args.name}.json"
    for method in args.methods.split(","):
        label = method if not method.startswith("block-ap") or args.loss == BlockAPConfig.loss else f"{method}[{args.loss}]"
        if method == "autoround" and args.autoround_iters != AUTOROUND_DEFAULTS["iters"]:
            label = f"autoround[{args.autoround_iters} iters]"
        for scheme_name in ([None] if method == "fp" else args.schemes.split(",")):
            scheme = QuantScheme.parse(scheme_name) if scheme_name else None
            calib = calib_all if method.startswith("block-ap") else calib_all[: args.nsamples]
            if method == "autoround-defaults":
                calib = calibration_windows(tok, args.calib_data, AUTOROUND_DEFAULTS["nsamples"],
                                            AUTOROUND_DEFAULTS["seqlen"], args.seed)
            model, info = run_method(method, model_path, scheme, calib, config, args.work_dir,
                                     args.autoround_python, args.autoround_iters, not args.no_fp_yardstick)
            r = perplexity(model, ids, args.seqlen, args.max_windows, desc=f"{label} {scheme_name or ''}")
            row = {"method": label, "scheme": scheme_name or "-", "ppl": r.ppl, **info, "eval": r.to_dict()}
            results = merge_row(path, settings, row)
            print(f"{label:8s} {scheme_name or '-':8s} ppl {r.ppl:10.3f}  method {info['method_seconds']:7.1f} s", flush=True)
            (RESULTS / f"{args.name}.md").write_text(markdown(args.name, results))
    print(markdown(args.name, results))


if __name__ == "__main__":
    main()
