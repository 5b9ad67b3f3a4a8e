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


@contextmanager
def output_lock(out: str | Path, command: str = "eqat") -> Iterator[Path]:
    """Hold the lock of output folder `out` for the block; raise EqatInputError if another live run holds it."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "command": command}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
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
    _remove_stale_temporaries(Path(out))
    try:
        yield path
    finally:
        if _read(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
