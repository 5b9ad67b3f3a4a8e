"""Exports of eqat checkpoints through the real runtimes, by `eqat validate`: every format eqat
writes, every runtime installed here, against eqat's own forward in the runtime's dtype.

    python benchmarks/export_loaders.py CKPT [CKPT ...] --windows 2 --seqlen 512 \
        [--vllm-python /path/to/vllm-venv/bin/python]

Per checkpoint: exports to gptq (checkpoint_format auto, plus v1 when auto picked v2), awq
(4-bit), compressed-tensors, onnx and bitblas (refused where bitblas does not import), then
`eqat.validate.validate` over all of them. Writes results/<name>.{json,md} (one table for all
checkpoints) and each checkpoint's validate report under results/<name>/<checkpoint>/.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from eqat.io.checkpoint import read_eqat_config
from eqat.errors import EqatInputError
from eqat.exporters import export_checkpoint
from eqat.io.report import environment, write_json
from eqat.validate import validate, write_report
from eqat.validate.report import COLUMNS, table_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="export_loaders", help="results file stem")
    args = ap.parse_args()

    reports, lines, exports_made = [], [], []
    for ck in args.checkpoints:
        symmetric = read_eqat_config(ck)["scheme"]["symmetric"]
        with tempfile.TemporaryDirectory() as tmp:
            folders = []
            plan = [("gptq", {}, "gptq")] + ([] if symmetric else [("gptq", {"checkpoint_format": "gptq"}, "gptq-v1")])
            plan += [("awq", {}, "awq"), ("compressed-tensors", {}, "compressed-tensors"), ("onnx", {}, "onnx"),
                     ("bitblas", {}, "bitblas")]
            for fmt, opts, tag in plan:
                t = time.perf_counter()
                try:
                    rep = export_checkpoint(ck, fmt, Path(tmp) / tag, **opts)
                except EqatInputError as e:
                    exports_made.append({"checkpoint": ck.name, "export": tag, "status": "refused", "reason": str(e)[:300]})
                    continue
                exports_made.append({"checkpoint": ck.name, "export": tag, "status": "written", "notes": rep["notes"],
                                     "options": rep["options"], "seconds": round(time.perf_counter() - t, 2)})
                folders.append(Path(tmp) / tag)
            report = validate(ck, folders, windows=args.windows, seqlen=args.seqlen, vllm_python=args.vllm_python)
            for r in report["rows"]:
                r["name"] = f"{ck.name}/{r['name']}" if r["name"] != ck.name else ck.name
            write_report(report, args.out / args.name / ck.name)
            reports.append(report)
            lines += table_rows(report)
        write_tables(args, reports, lines, exports_made)  # after every checkpoint: a long run keeps what it measured


def write_tables(args: argparse.Namespace, reports: list[dict], lines: list[list[str]], exports_made: list[dict]) -> None:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "\n".join("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in lines)
    refused = "\n".join(f"- {e['checkpoint']} -> {e['export']}: {e['reason']}" for e in exports_made if e["status"] == "refused")
    t = reports[0]["thresholds"]
    text = (f"`eqat validate` of each checkpoint against its exports; WikiText-2 test, {args.windows} windows of "
            f"{args.seqlen} tokens; greedy agreement over {reports[0]['new_tokens']} tokens on {len(reports[0]['prompts'])} prompts; "
            f"each runtime compared with eqat's own forward in the runtime's dtype. Thresholds: |ppl delta| <= "
            f"{t['max_ppl_delta_pct']}%, top-1 >= {100 * t['min_top1_agree']:.0f}%, mean KL <= {t['max_mean_kl']:.0e} "
            f"(bfloat16 runtimes: top-1 >= {100 * t['min_top1_agree_bf16']:.0f}%, mean KL <= {t['max_mean_kl_bf16']:.0e}).\n\n"
            + head + body + "\n\nExports refused before writing:\n\n" + (refused or "- none") + "\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    write_json(args.out / f"{args.name}.json", {"windows": args.windows, "seqlen": args.seqlen, "exports": exports_made,
                                                "reports": reports, "environment": environment()})


if __name__ == "__main__":
    main()
