"""Options as data. A config dataclass field made with `option()` says its default, its help, its
command-line name and whether it changes the result of a run; the CLI flags and `--config` keys
(eqat.cli.flags), docs/cli.md and the resume fingerprints (eqat.engine.state) are all derived from
it, so adding an option to a method is one edit.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any, Callable


def option(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           param: str | None = None, flags: tuple[str, ...] = (), cli: bool = True, result: bool = True) -> Any:
    """A dataclass field with eqat's metadata.

    help: the `--help` text. param: the CLI parameter (and `--config` key) name when it is not
    `<prefix><field>`; flags: explicit declarations, e.g. ("--eval/--no-eval",) or ("--out", "-o").
    cli=False: not a flag (set by the pipeline or only from Python). result=False: the field does
    not change what a run computes (where activations live, how often state is saved), so it is
    left out of the resume fingerprint and may differ between a killed run and its resume.
    """
    meta = {"help": help, "param": param, "flags": tuple(flags), "cli": cli, "result": result}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def affects_result(f) -> bool:
    """Whether a dataclass field belongs in the resume fingerprint (True unless marked otherwise)."""
    return f.metadata.get("result", True)
