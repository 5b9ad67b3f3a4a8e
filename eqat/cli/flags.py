"""CLI flags generated from the option dataclasses (eqat.core.options): one source of names,
defaults and help for `--help`, `--config` keys, docs/cli.md and the Python API.

A `Flag` is one command-line parameter; it sets one field in one or more option objects ("targets":
the block-wise engine's `--epochs` sets `epochs` in every block-wise method's config). `flags_of`
reads a dataclass, `command_with` gives a typer command the flags as its signature, and `apply`
writes the parsed values into the option objects.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Optional

import typer


@dataclass
class Flag:
    param: str  # the parameter and --config key: calib_seqlen
    annotation: Any
    default: Any
    help: str
    decls: tuple[str, ...]  # ("--calib-seqlen",)
    targets: list[tuple[str, str]] = field(default_factory=list)  # (section, field name)


def _plain_type(tp: Any) -> Any:
    """`int | None` -> Optional[int] (what typer reads); other types unchanged."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return Optional[rest[0]]
    return tp


def flags_of(cls: type, section: str, prefix: str = "", rename: dict[str, str] | None = None,
             note: str = "", only: Callable[[dataclasses.Field], bool] | None = None) -> list[Flag]:
    """The CLI flags of dataclass `cls`'s fields (those with cli=True): parameter `<prefix><field>`
    unless the field's `param` (or `rename`) says otherwise; `note` is appended to each help."""
    hints = typing.get_type_hints(cls)
    flags = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or (only is not None and not only(f)):
            continue
        param = (rename or {}).get(f.name) or meta.get("param") or f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        decls = meta.get("flags") or ("--" + param.replace("_", "-"),)
        text = meta.get("help", "") + (f" ({note})" if note else "")
        flags.append(Flag(param, _plain_type(hints[f.name]), default, text, tuple(decls), [(section, f.name)]))
    return flags


def merge(flags: list[Flag]) -> list[Flag]:
    """One Flag per parameter name; the targets of repeated names are joined (their defaults must agree)."""
    by_name: dict[str, Flag] = {}
    for f in flags:
        if f.param not in by_name:
            by_name[f.param] = dataclasses.replace(f, targets=list(f.targets))
            continue
        first = by_name[f.param]
        if first.default != f.default or first.annotation != f.annotation:
            raise TypeError(f"--{f.param.replace('_', '-')} is declared twice with different types or defaults "
                            f"({first.targets[0]} and {f.targets[0]}); give one of them another name")
        first.targets.extend(f.targets)
    return list(by_name.values())


def typer_parameter(flag: Flag) -> inspect.Parameter:
    info = typer.Option(*flag.decls, help=flag.help)
    return inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=flag.default,
                             annotation=Annotated[flag.annotation, info])


def command_with(func: Callable, flags: list[Flag]) -> Callable:
    """`func(**kwargs)` with a signature that lists its own parameters, then `flags`, for typer."""
    sig = inspect.signature(func)
    hints = typing.get_type_hints(func, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
           if p.kind != inspect.Parameter.VAR_KEYWORD]
    params = own + [typer_parameter(f) for f in flags]
    positional = [p for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
    func.__signature__ = sig.replace(parameters=positional + keyword)  # type: ignore[attr-defined]
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def apply(flags: list[Flag], values: dict[str, Any], sections: dict[str, Any]) -> None:
    """Set each flag's value into its target fields. A section is one object or a list of them (each
    gets the value); a section missing from `sections` is skipped."""
    for f in flags:
        if f.param not in values:
            continue
        for section, name in f.targets:
            targets = sections.get(section, [])
            for obj in targets if isinstance(targets, list) else [targets]:
                setattr(obj, name, values[f.param])
