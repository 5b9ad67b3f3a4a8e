"""One run per output folder: a live owner blocks a second run; a dead owner's lock is taken over."""

import json
import os
import subprocess
import sys

import pytest

from eqat.errors import EqatInputError
from eqat.io.lock import lock_path, output_lock


def test_second_run_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    with output_lock(out, "eqat quantize") as path:
        assert path == lock_path(out) and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(EqatInputError, match=f"in use by another eqat run \\(eqat quantize, pid {os.getpid()}"):
            with output_lock(out):
                pass
        with output_lock(tmp_path / "other"):  # another folder is free
            pass
    assert not lock_path(out).exists()  # released
    with output_lock(out):  # and can be taken again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock_path(out).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}))
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert "removing stale lock" in capsys.readouterr().err


def test_a_lock_from_another_host_is_respected(tmp_path):
    out = tmp_path / "run"
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t"}))
    with pytest.raises(EqatInputError, match="pid 1 on elsewhere.*delete"):
        with output_lock(out):
            pass
