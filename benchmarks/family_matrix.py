"""Families x (methods, exporters, runtimes): what works, what is refused and why, on tiny random
models built from each family's config (tests/conftest.py), through the commands a user runs.

Per family:
    methods    `eqat quantize --method M` for rtn (w4g32sym), block-ap+e2e-qp (w4g32), lr-qat (w4g32),
               smoothquant (w8g32a8) and qllm (w4g32a8); group 32, the smallest GPTQModel's CPU
               kernel takes. Each: pass, or refused with eqat's first line
    exporters  `eqat export --format F` of the RTN checkpoint, every registered format
    runtimes   `eqat validate` of the RTN checkpoint against each export that was written: per
               (export, runtime) pass / fail / skipped (eqat validate's reason)

Each command runs in its own process. Results: benchmarks/results/family_matrix.{json,md}; a family run
again replaces its row, the others' rows stay. Run:

    python benchmarks/family_matrix.py [--families llama,gemma3_text,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqat.exporters.base import EXPORTERS  # noqa: E402
from eqat.io.report import environment, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
            "mixtral", "qwen3_moe", "olmoe", "llava", "qwen2_vl")
SMALL = ["--nsamples", "4", "--val-samples", "2", "--calib-seqlen", "32", "--epochs", "1", "--batch-size", "2",
         "--e2e-nsamples", "4", "--e2e-val-samples", "2", "--e2e-seqlen", "32", "--e2e-steps", "2",
         "--e2e-batch-size", "2", "--e2e-grad-accum", "1", "--no-eval", "-q"]
# symmetric for the RTN checkpoint that is exported: transformers reads compressed-tensors MoE experts only
# symmetric (docs/moe.md), and every other runtime here reads both
METHODS = {"rtn": ["--scheme", "w4g32sym"], "block-ap+e2e-qp": ["--scheme", "w4g32"],
           "lr-qat": ["--scheme", "w4g32", "--lr-qat-rank", "4"], "smoothquant": ["--scheme", "w8g32a8"],
           "qllm": ["--scheme", "w4g32a8", "--qllm-theta", "budget"]}


def eqat(*args: str) -> tuple[int, str, str]:
    # wide, so that eqat's error message (rich wraps it to the terminal) stays on one line for reason()
    env = {**os.environ, "COLUMNS": "1000"}
    proc = subprocess.run([sys.executable, "-m", "eqat", *args], capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def reason(stderr: str) -> str:
    """eqat's message, one line (what follows 'error: ')."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    found = next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else "")
    return " ".join(found.removeprefix("error:").split())[:400]


def make_model(family: str, folder: Path, tokenizer) -> Path:
    from tests.conftest import tiny_model

    path = folder / f"tiny-{family}"
    tiny_model(family, vocab=len(tokenizer), split=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_family(family: str, folder: Path, tokenizer, text: Path) -> dict:
    src = make_model(family, folder, tokenizer)
    data = ["--calib-data", str(text), "--e2e-data", str(text)]
    row: dict = {"family": family, "methods": {}, "exporters": {}, "runtimes": {}}
    for method, flags in METHODS.items():
        out, t = folder / f"{family}-{method}", time.perf_counter()
        code, _, err = eqat("quantize", "--model", str(src), "--method", method, *flags, *SMALL, *data, "--out", str(out))
        row["methods"][method] = {"status": "pass" if code == 0 else ("refused" if code == 2 else "fail"),
                                  "why": "" if code == 0 else reason(err), "seconds": round(time.perf_counter() - t, 1)}
    ck = folder / f"{family}-rtn"
    if row["methods"]["rtn"]["status"] != "pass":
        return row
    written = []
    for fmt in EXPORTERS:
        code, _, err = eqat("export", str(ck), "--format", fmt, "--out", str(folder / f"{family}-{fmt}"), "-q")
        row["exporters"][fmt] = {"status": "pass" if code == 0 else ("refused" if code == 2 else "fail"),
                                 "why": "" if code == 0 else reason(err)}
        if code == 0:
            written += ["--export", str(folder / f"{family}-{fmt}")]
    if written:
        report = folder / f"{family}-validate"
        code, stdout, err = eqat("validate", str(ck), *written, "--windows", "2", "--seqlen", "32", "--new-tokens", "4",
                                 "--out", str(report), "--json", "-q")
        try:
            rows = json.loads(stdout)["rows"]
        except ValueError:
            row["runtimes"]["validate"] = {"status": "fail", "why": reason(err)}
            return row
        for r in rows:
            if r["status"] == "reference":
                continue
            row["runtimes"][f"{r['name']} / {r['backend']}"] = {
                "status": r["status"], "why": r.get("reason") or "",
                "ppl_delta_pct": r.get("ppl_delta_pct"), "top1_agree": r.get("top1_agree")}
    return row


def cell(entry: dict) -> str:
    if entry["status"] == "pass":
        return "pass"
    return f"{entry['status']}: {entry['why'][:160]}".replace("|", "/")


def markdown(rows: list[dict]) -> str:
    lines = ["# Families x methods, exporters and runtimes (tiny random models, benchmarks/family_matrix.py)", "",
             "Each cell: the command's outcome; refused/skipped cells give eqat's reason (shortened).", "",
             "## Methods (`eqat quantize`)", "", "| family | " + " | ".join(METHODS) + " |",
             "|---|" + "---|" * len(METHODS)]
    lines += [f"| {r['family']} | " + " | ".join(cell(r["methods"][m]) for m in METHODS) + " |" for r in rows]
    lines += ["", "## Exporters (`eqat export` of the RTN w4g32sym checkpoint)", "",
              "| family | " + " | ".join(EXPORTERS) + " |", "|---|" + "---|" * len(EXPORTERS)]
    lines += [f"| {r['family']} | " + " | ".join(cell(r["exporters"][f]) if f in r["exporters"] else "not run: RTN failed"
                                                 for f in EXPORTERS) + " |" for r in rows]
    lines += ["", "## Runtimes (`eqat validate` of each written export against eqat's forward)", ""]
    runs = [r for r in rows if r["runtimes"]]
    columns = sorted({k.removeprefix(f"{r['family']}-") for r in runs for k in r["runtimes"]})
    if runs:
        lines += ["| family | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in runs:
        found = {k.removeprefix(f"{r['family']}-"): v for k, v in r["runtimes"].items()}
        lines.append(f"| {r['family']} | " + " | ".join(cell(found[c]) if c in found else "-" for c in columns) + " |")
    lines += [f"- **{r['family']}**: nothing to validate (no export written)" for r in rows if not r["runtimes"]]
    return "\n".join(lines) + "\n"


def save(rows: list[dict], seconds: float) -> list[dict]:
    """Merge `rows` into the results (a family run again replaces its row) and rewrite both files."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "family_matrix.json"
    done = {r["family"] for r in rows}
    kept = [r for r in json.loads(path.read_text())["rows"] if r["family"] not in done] if path.is_file() else []
    rows = sorted(kept + rows, key=lambda r: FAMILIES.index(r["family"]) if r["family"] in FAMILIES else len(FAMILIES))
    write_json(path, {"rows": rows, "seconds": seconds, "environment": environment()})
    (RESULTS / "family_matrix.md").write_text(markdown(rows))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args()
    from tests.conftest import save_tiny_inputs, train_tiny_tokenizer

    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, text, _ = save_tiny_inputs(folder)
        tokenizer = train_tiny_tokenizer()
        for family in args.families.split(","):
            print(f"{family} ...", flush=True)
            t = time.perf_counter()
            rows.append({**run_family(family, folder, tokenizer, text), "seconds": round(time.perf_counter() - t, 1)})
            print(json.dumps(rows[-1])[:600], flush=True)
            merged = save(rows, time.perf_counter() - t0)  # after each family: an interrupted run keeps what it did
    print(markdown(merged))


if __name__ == "__main__":
    main()
