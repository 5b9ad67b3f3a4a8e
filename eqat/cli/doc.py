"""docs/cli.md, generated from the CLI itself: `python -m eqat.cli.doc > docs/cli.md`
(tests/test_clidoc.py fails when the page and the CLI disagree)."""

from __future__ import annotations

import click
import typer.main

from eqat.cli import app
from eqat.cli.config import COMMAND_LINE_ONLY

HEADER = """# CLI reference

Generated from the CLI by `python -m eqat.cli.doc > docs/cli.md`; a test keeps it in step.
Every command takes `--help`. Exit codes: 0 ok, 1 a run or a check failed, 2 bad input (the
message names the problem and the fix), 130 interrupted (re-run the same command to resume).
`--config FILE.yaml` gives any command its options from a file (flags on the command line win);
each run writes the options it used to `eqat_<command>.yaml` in its output folder.
"""


def _names(p: click.Parameter) -> str:
    if isinstance(p, click.Argument):
        return p.name.upper()
    names = list(p.opts) + [f"{o}" for o in p.secondary_opts]
    return ", ".join(f"`{n}`" for n in names)


def _default(p: click.Parameter) -> str:
    if isinstance(p, click.Argument):
        return "required" if p.required else "optional"
    if p.required:
        return "required"
    d = p.default
    if callable(d) or d is None or d == () or d == []:
        return ""
    return f"`{d}`"


def render() -> str:
    group = typer.main.get_command(app)
    out = [HEADER]
    for name, cmd in group.commands.items():
        out.append(f"## eqat {name}\n\n{(cmd.help or '').strip()}\n")
        out.append("| option | `--config` key | default | meaning |\n|---|---|---|---|")
        for p in cmd.params:
            help_text = " ".join((getattr(p, "help", None) or "").split()).replace("|", "/")
            key = "" if p.name == "config" or p.name in COMMAND_LINE_ONLY else f"`{p.name}`"
            out.append(f"| {_names(p)} | {key} | {_default(p)} | {help_text} |")
        if cmd.epilog:
            examples = [ln.strip() for ln in cmd.epilog.splitlines() if ln.strip().startswith("eqat ")]
            notes = [ln.strip() for ln in cmd.epilog.splitlines() if ln.strip() and not ln.strip().startswith(("eqat ", "Examples"))]
            if examples:
                out.append("\nExamples:\n\n```bash\n" + "\n".join(examples) + "\n```")
            if notes:
                out.append("\n" + " ".join(notes))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
