"""The `eqat` command line: argument handling only; the work lives in eqat.pipeline.

Exit codes: 0 ok, 1 a run failed or a check failed, 2 bad input (the message says the fix).
"""

from __future__ import annotations

import errno
import sys

import typer
from rich.markup import escape

from eqat.cli import train  # noqa: F401, I001  (adds quantize, eval, train-e2e to the app, in that order)
from eqat.cli import tools  # noqa: F401, E402  (adds export, validate, info)
from eqat.cli.common import _json_stdout, app, err
from eqat.errors import EqatError, EqatInputError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: maps eqat's errors to exit codes (2 bad input, 1 failure). With --json, whatever
    else would reach stdout (progress, libraries' banners and logs) goes to stderr, so stdout holds
    the JSON alone."""
    if "--json" in sys.argv[1:]:
        _json_stdout.append(sys.stdout)
        sys.stdout = sys.stderr
    try:
        _run()
    finally:
        if _json_stdout:
            sys.stdout = _json_stdout.pop()


def _disk_error(e: OSError) -> str | None:
    """The message for a write that the disk refused (full, read-only, no permission), else None.
    Every output is written to a temporary name first, so nothing half-written is left under a
    final name; resumable runs resume."""
    where = f" while writing {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full{where}. Nothing was left half-written; free some space (or choose another --out) "
                "and re-run the same command: an interrupted quantize or train-e2e resumes.")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {e.strerror}. Choose a writable --out."
    return None


def _run() -> None:
    try:
        rc = app(standalone_mode=False)  # returns the exit code of typer.Exit, e.g. 130 for Ctrl-C
        if isinstance(rc, int) and rc:
            if rc == 130:
                err.print("interrupted; re-run the same command to resume")
            sys.exit(rc)
    except EqatInputError as e:
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}")
        sys.exit(2)
    except EqatError as e:
        err.print(f"[bold red]failed:[/bold red] {escape(str(e))}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; re-run the same command to resume")
        sys.exit(130)
    except OSError as e:
        why = _disk_error(e)
        if why is None:
            raise
        err.print(f"[bold red]error:[/bold red] {escape(why)}")
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as e:  # usage errors (bad option values) with standalone_mode=False
        if hasattr(e, "show"):
            e.show()
        sys.exit(getattr(e, "exit_code", 2))


if __name__ == "__main__":
    main()
