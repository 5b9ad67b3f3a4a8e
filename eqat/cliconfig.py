"""`--config FILE.yaml` for the CLI: a flat mapping of a command's options (the names as in
`--help`, with dashes or underscores) used as defaults, so flags on the command line still win;
and the file every run writes next to its output (`eqat_<command>.yaml`) to reproduce it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import yaml

from eqat.errors import EqatInputError

# Programs a run executes: a config file (perhaps someone else's) may not name one, and none is recorded.
EXECUTABLES = {"vllm_python": "pass --vllm-python on the command line or set EQAT_VLLM_PYTHON"}
NOT_SAVED = {"config", "json_out", "quiet", "force", *EXECUTABLES}  # how a run is shown or overwritten, or what it executes


def apply_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager callback of --config: load the file into the command's defaults."""
    if not value:
        return value
    try:
        data = yaml.safe_load(Path(value).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise EqatInputError(f"cannot read --config {value}: {e}") from e
    if not isinstance(data, dict):
        raise EqatInputError(f"--config {value} must hold a mapping of option names to values, not {type(data).__name__}.")
    names = {p.name for p in ctx.command.params} - {"config"}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise EqatInputError(f"--config {value}: `eqat {ctx.command.name}` has no option {unknown}; "
                             f"its options: {', '.join(sorted(names))}.")
    for key, fix in EXECUTABLES.items():
        if data.get(key) is not None:
            raise EqatInputError(f"--config {value} sets {key}: a config file may not name a program to run; {fix}.")
        data.pop(key, None)  # `null`, as older recorded configs have it: nothing to run
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def save_config(ctx: click.Context, folder: str | Path) -> Path:
    """Write the options this run used to `folder/eqat_<command>.yaml` (atomically); returns the path."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v) if isinstance(v, Path) else v

    params = {k: plain(v) for k, v in ctx.params.items() if k not in NOT_SAVED}
    path = Path(folder) / f"eqat_{ctx.command.name}.yaml"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(f"# eqat {ctx.command.name} --config {path.name} reproduces this run\n"
                   + yaml.safe_dump(params, sort_keys=False))
    os.replace(tmp, path)
    return path
