"""What every eqat command shares: the typer app, the consoles, the common options and the
printing helpers."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from eqat.cli.config import apply_config
from eqat.options import FOREIGN_HELP

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="eqat: low-bit weight-only LLM quantization (EfficientQAT) and export to real runtimes.",
)
err = Console(stderr=True)
out = Console()
_json_stdout: list = []  # the real stdout while a --json run sends everything else to stderr


def emit_json(obj: object) -> None:
    """Print `obj` as JSON on the real stdout (in --json mode, the only thing written there)."""
    Console(file=_json_stdout[-1] if _json_stdout else sys.stdout).print_json(json.dumps(obj, default=str))

REPLACE_FOREIGN = typer.Option(False, "--replace-foreign", help=FOREIGN_HELP)
CONFIG = typer.Option(None, "--config", "-c", callback=apply_config, is_eager=True, expose_value=True,
                      help="YAML file of this command's options, keyed by parameter name (e.g. `max_windows: 8`, "
                           "`evaluate: false`; docs/cli.md lists the keys); flags given here win. Every run writes the options it used to <output>/eqat_<command>.yaml.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or tables.")
JSON = typer.Option(False, "--json", help="Print the report as JSON on stdout.")


def _print_e2e(section: dict) -> None:
    pm = section["peak_memory"]
    vb, va = section.get("val_loss_before"), section.get("val_loss_after")
    held = f"held-out NLL {vb:.4f} -> {va:.4f}, " if vb is not None and va is not None else ""
    out.print(f"E2E-QP: {section['steps']} steps, lr {section['lr']:.2g}, {section['trainable_params']:,} trainable scales, "
              f"{held}{section['tokens_per_second']:.0f} tokens/s, peak memory {pm['peak_bytes'] / 2**30:.2f} GiB")


def _scheme(scheme: Optional[str], bits: int, group_size: int, symmetric: bool):
    from eqat.core.scheme import QuantScheme

    return QuantScheme.parse(scheme) if scheme else QuantScheme(bits, group_size, symmetric)


def _print_warnings(report: dict) -> None:
    """A run's warnings on stderr, also with --quiet and --json (they are in report.json too)."""
    for w in report.get("warnings", []):
        err.print(f"[bold yellow]warning:[/bold yellow] {escape(w)}", highlight=False)


def _fmt_ppl(r: Optional[dict]) -> str:
    return "-" if not r else f"{r['ppl']:.2f}"
