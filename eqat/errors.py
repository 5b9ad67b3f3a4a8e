"""Errors eqat raises on purpose.

`EqatInputError` means the user gave something eqat cannot work with (a bad scheme, a
missing model folder, an unreadable data file). The CLI turns it into exit code 2 with
its message; the message names the problem and the fix.
"""

from __future__ import annotations


class EqatError(Exception):
    """Base class of eqat's own errors."""


class EqatInputError(EqatError, ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it."""
