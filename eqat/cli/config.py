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

# What a config file (perhaps someone else's) may not set, and no run records: programs a run
# executes, and permission to delete a folder eqat did not write.
COMMAND_LINE_ONLY = {
    "vllm_python": "a config file may not name a program to run; pass --vllm-python on the command line or set "
                   "EQAT_VLLM_PYTHON",
    "replace_foreign": "a config file may not allow deleting folders eqat did not write; pass --replace-foreign on the "
                       "command line",
}
NOT_SAVED = {"config", "json_out", "quiet", "force", *COMMAND_LINE_ONLY}  # how a run is shown or overwritten, or what it executes


def apply_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager callback of --config: load the file into the command's defaults."""
    if not value:
        return value
    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise EqatInputError(f"cannot read --config {value}: {str(e)[:200]}. It must be a UTF-8 YAML file "
                             "(e.g. an eqat_<command>.yaml that a run wrote).") from e
    if not isinstance(data, dict):
        raise EqatInputError(f"--config {value} must hold a mapping of option names to values, not {type(data).__name__}.")
    names = {p.name for p in ctx.command.params} - {"config"}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise EqatInputError(f"--config {value}: `eqat {ctx.command.name}` has no option {unknown}; "
                             f"its options: {', '.join(sorted(names))}.")
    for key, why in COMMAND_LINE_ONLY.items():
        if data.get(key) not in (None, False):
            raise EqatInputError(f"--config {value} sets {key}: {why}.")
        data.pop(key, None)  # `null`/`false`, as older recorded configs have it: nothing to run or delete
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
