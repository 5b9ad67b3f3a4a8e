"""Which folders a run may replace: eqat deletes only what eqat wrote.

Every command that writes a folder (`quantize`, `train-e2e`, `export`, `validate`) resolves it
with `resolve_out` (symlinks followed, so the lock and the final rename act on the real folder)
and checks it with `check_output` before any work:
  - never replaced, whatever the flags: the current folder or any folder above it, the home
    folder or one above it, an input of the run (model, checkpoint, export) or a folder holding
    one; a path that is a file;
  - replaced only with `--force`: eqat's own output (it holds one of `EQAT_MARKERS`);
  - replaced only with `--force --replace-foreign`: any other non-empty folder.
`refuse_dangerous` repeats the first rule at the moment a folder is removed (`atomic_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from eqat.errors import EqatInputError

# files or folders that only eqat writes into an output folder
EQAT_MARKERS = ("eqat_config.json", "report.json", "resume", "export_report.json", "validate.json",
                "eqat_quantize.yaml", "eqat_train-e2e.yaml", "eqat_export.yaml", "eqat_validate.yaml")


def resolve_out(out: str | Path) -> Path:
    """The absolute, symlink-free path of an output folder (it need not exist)."""
    return Path(out).expanduser().resolve()


def looks_like_eqat_output(folder: Path) -> bool:
    return any((folder / m).exists() for m in EQAT_MARKERS)


def refuse_dangerous(out: Path, inputs: Iterable[str | Path] = ()) -> None:
    """Raise EqatInputError if replacing `out` would remove the current folder, the home folder,
    an input of the run, or a folder above any of them."""
    out = resolve_out(out)
    guarded = [(Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "your home folder")]
    guarded += [(resolve_out(p), "an input of this run") for p in inputs]
    for path, what in guarded:
        if path == out or out in path.parents:
            where = "is" if path == out else "holds"
            raise EqatInputError(f"--out {out} {where} {what} ({path}); eqat never replaces it. Choose another --out, "
                                 "e.g. a new folder beside it.")


def check_output(out: Path, inputs: Iterable[str | Path], force: bool, replace_foreign: bool = False) -> None:
    """Refuse (EqatInputError) before any work when writing `out` could destroy something eqat did
    not write. Leaves the decision about eqat's own outputs without --force to the caller."""
    inputs = list(inputs)
    if out.exists() and not out.is_dir():
        raise EqatInputError(f"--out {out} is a file, not a folder; choose a folder path.")
    refuse_dangerous(out, inputs)
    if not (force and out.is_dir() and any(out.iterdir())):
        return
    if not looks_like_eqat_output(out) and not replace_foreign:
        raise EqatInputError(f"--out {out} is a non-empty folder that eqat did not write (no {EQAT_MARKERS[0]}, "
                             "report.json or resume/ inside), so --force will not delete it. Choose another --out, or "
                             "add --replace-foreign to delete its contents.")
