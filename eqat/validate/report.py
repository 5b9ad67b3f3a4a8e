"""Writes a validation report: validate.json (everything), validate.md (the table),
validate.html (the table and a plot of per-backend KL divergence and top-1 agreement) and
validate.png, into a folder renamed into place when complete."""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from eqat.core.layer_schemes import bits_text
from eqat.io.checkpoint import atomic_dir
from eqat.errors import EqatInputError
from eqat.io.lock import output_lock
from eqat.io.report import environment

COLUMNS = ("export", "backend", "dtype", "status", "ppl", "ppl delta", "top-1", "mean KL", "max |dlogit|",
           "greedy", "load s", "tok/s", "note")
CONSOLE = ("export", "backend", "status", "ppl", "ppl delta", "top-1", "mean KL", "greedy", "note")  # the terminal table


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table_rows(report: dict) -> list[list[str]]:
    """One list of cells per row, in COLUMNS order."""
    out = []
    for r in report["rows"]:
        note = r.get("reason") or "; ".join(r.get("failures") or [])
        if not note and r.get("mean_abs_logprob") is not None:  # vLLM: log-probabilities, not logits
            note = f"|d log p(token)| mean {r['mean_abs_logprob']:.4f}, max {r['max_abs_logprob']:.3f} (no full logits: no KL)"
        delta = "(reference)" if r["status"] == "reference" else _fmt(r.get("ppl_delta_pct"), "+.3f") + ("%" if r.get("ppl_delta_pct") is not None else "")
        greedy = "" if r.get("greedy_prefix_agree") is None else f"{100 * r['greedy_prefix_agree']:.0f}% ({r['greedy_identical']}/{len(report['prompts'])})"
        backend = f"{r['backend']} ({r['kernel']})" if r.get("kernel") else r["backend"]
        out.append([r["name"], backend, r.get("dtype", ""), r["status"], _fmt(r.get("ppl"), ".3f"), delta,
                    "" if r.get("top1_agree") is None else f"{100 * r['top1_agree']:.1f}%", _fmt(r.get("mean_kl"), ".2e"),
                    _fmt(r.get("max_abs_logit"), ".4f"), greedy, _fmt(r.get("load_s"), ".1f"),
                    _fmt(r.get("tokens_per_s"), ".0f"), note])
    return out


def markdown(report: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(report)]
    t = report["thresholds"]
    bits = f", {bits_text(report['bits'])}" if report.get("bits") else ""
    return (f"Reference: eqat checkpoint `{report['model']}` ({report['scheme']}{bits}); WikiText-2 test, {report['windows']} "
            f"windows of {report['seqlen']} tokens; greedy agreement over {report['new_tokens']} new tokens on "
            f"{len(report['prompts'])} prompts. Each backend is compared with eqat's own forward in the backend's dtype. "
            f"Thresholds: |ppl delta| <= {t['max_ppl_delta_pct']}%, top-1 >= {100 * t['min_top1_agree']:.0f}%, "
            f"mean KL <= {t['max_mean_kl']:.0e} (bfloat16 runtimes: top-1 >= {100 * t['min_top1_agree_bf16']:.0f}%, "
            f"mean KL <= {t['max_mean_kl_bf16']:.0e}). Verdict: **{'PASS' if report['passed'] else 'FAIL'}**"
            f"{': ' + report['reason'].rstrip('.') if report.get('reason') else ''}.\n\n"
            + "\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> bool:
    """Per-backend mean KL (log scale) and top-1 agreement (vLLM has top-1 but no KL); each bar
    with its own threshold mark (bfloat16 runtimes have looser ones). False when no row has either."""
    rows = [r for r in report["rows"] if r.get("top1_agree") is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report["thresholds"]
    bf16 = [r.get("dtype") == "bfloat16" for r in rows]
    labels = [f"{r['name']}\n{r['backend']} ({r.get('dtype', '')})" for r in rows]
    x = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4.5))
    colors = ["tab:green" if r["status"] == "pass" else "tab:red" for r in rows]
    kl = [max(r["mean_kl"], 1e-12) if r.get("mean_kl") is not None else 0 for r in rows]
    a.bar(x, kl, color=colors)
    a.scatter(x, [t["max_mean_kl_bf16"] if h else t["max_mean_kl"] for h in bf16], marker="_", s=600, color="k", zorder=3)
    a.set_yscale("log")
    a.set_ylim(bottom=min([k for k in kl if k > 0] or [1e-6]) / 10)
    a.set_title("mean KL(reference || backend), nats (none: no full logits)")
    b.bar(x, [100 * r["top1_agree"] for r in rows], color=colors)
    b.scatter(x, [100 * (t["min_top1_agree_bf16"] if h else t["min_top1_agree"]) for h in bf16], marker="_", s=600,
              color="k", zorder=3)
    b.set_ylim(min(90, min(100 * r["top1_agree"] for r in rows) - 1), 100.5)
    b.set_title("top-1 agreement with the reference, % (thresholds: black)")
    for ax in (a, b):
        ax.set_xticks(list(x), labels, fontsize=7, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def html_page(report: dict, png: Path | None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr class='{}'>{}</tr>".format(
        html.escape(row[3]), "".join(f"<td>{html.escape(c)}</td>" for c in row)) for row in table_rows(report))
    img = ""
    if png is not None:
        img = f"<img alt='per-backend KL and top-1 agreement' src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>"
    verdict = "PASS" if report["passed"] else "FAIL"
    return (f"<!doctype html><meta charset='utf-8'><title>eqat validate: {html.escape(Path(report['model']).name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 6px;font-size:13px}.pass td:nth-child(4){color:green}.fail td:nth-child(4),.error td:nth-child(4)"
            "{color:#b00;font-weight:bold}.skipped{color:#777}</style>"
            f"<h1>eqat validate: {verdict}</h1><p>{html.escape(markdown(report).split(chr(10))[0])}</p>"
            f"<table><tr>{head}</tr>{body}</table>{img}")


def check_report_folder(out: Path) -> None:
    """Refuse, before any backend runs, a report folder that cannot be written: the report goes
    into a temporary sibling of `out`, renamed into place, so the nearest existing folder above
    `out` must take a new entry (os.access, then a real probe folder, created and removed)."""
    out = Path(out).absolute()
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    fix = "pass --out DIR to write the report somewhere writable."
    if out.exists() and not out.is_dir():
        raise EqatInputError(f"cannot write the report folder {out}: it is a file; {fix}")
    if not parent.is_dir():
        raise EqatInputError(f"cannot write the report folder {out}: {parent} is a file, not a folder; {fix}")
    for folder in (parent, out) if out.is_dir() else (parent,):  # an existing `out` is emptied, then replaced
        if not os.access(folder, os.W_OK | os.X_OK):
            raise EqatInputError(f"cannot write the report folder {out}: {folder} is not writable (read-only?); {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.probe-"))
    except OSError as e:
        raise EqatInputError(f"cannot write the report folder {out}: {e.strerror or e} in {parent}; {fix}") from e


def write_report(report: dict, out: Path, force: bool = True) -> Path:
    """Write the report files into `out` (atomically); returns `out`."""
    report = {**report, "environment": environment()}
    with output_lock(out, "eqat validate"), atomic_dir(out, force=force) as tmp:
        (tmp / "validate.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "validate.md").write_text(markdown(report))
        png = tmp / "validate.png"
        (tmp / "validate.html").write_text(html_page(report, png if plot(report, png) else None))
    return out
