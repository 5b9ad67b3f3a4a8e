"""One run per output folder: `output_lock(out)` holds `.<name>.lock` beside `out` while a run
writes it. The lock file records the owner's PID, host and start time; a second run refuses
with that information. A lock whose process is gone (same host, PID not alive) is stale: it is
taken over, with a note on stderr."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from eqat.errors import EqatInputError


def lock_path(out: str | Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary siblings `.<name>.tmp-*` (atomic_dir, write_json) left by a killed run: with the
    lock held no other eqat run can be writing them."""
    import shutil

    for tmp in out.absolute().parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _make_parents(folder: Path, out: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created, deepest first (EqatInputError if it cannot)."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EqatInputError(f"cannot create {folder} for --out {out}: {e.strerror or e}; choose a writable --out.") from e
    return created


def _remove_if_empty(folders: list[Path]) -> None:
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


@contextmanager
def output_lock(out: str | Path, command: str = "eqat") -> Iterator[Path]:
    """Hold the lock of output folder `out` for the block; raise EqatInputError if another live run holds it.

    The lock is named after the resolved path (symlinks followed), so two spellings of one folder
    share it. Parent folders it had to create are removed again if the run leaves nothing in them.
    """
    out = Path(out).expanduser().resolve()
    path = lock_path(out)
    created = _make_parents(path.parent, out)
    try:
        with _held(path, out, command):
            yield path
    finally:
        if not out.exists():
            _remove_if_empty(created)


@contextmanager
def _held(path: Path, out: Path, command: str) -> Iterator[None]:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "command": command}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = None
        except OSError as e:  # read-only file system, no permission
            raise EqatInputError(f"cannot write in {path.parent} ({e.strerror or e}), so --out {out} cannot be written "
                                 "there; choose a writable --out.") from e
        if fd is None:
            owner = _read(path)
            pid, host = owner.get("pid"), owner.get("host")
            if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                print(f"eqat: removing stale lock {path} (pid {pid} is gone)", file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            if not owner:  # being written this instant, or empty: look again
                time.sleep(0.05)
                owner = _read(path)
                if not owner:
                    path.unlink(missing_ok=True)
                    continue
            raise EqatInputError(
                f"output folder {Path(out)} is in use by another eqat run ({owner.get('command', 'eqat')}, pid {pid} on "
                f"{host}, since {owner.get('started')}); wait for it to finish or choose another --out. If no such run "
                f"is alive, delete {path}.")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise EqatInputError(f"cannot take the lock {path}; delete it if no eqat run is writing {Path(out)}.")
    _remove_stale_temporaries(out)
    try:
        yield
    finally:
        if _read(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
