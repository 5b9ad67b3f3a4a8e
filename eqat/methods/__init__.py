"""Quantization methods, each in its own module, registered by `@register_method` (eqat.methods.base).

Importing this package registers the built-in methods, then any that installed packages declare
under the `eqat.methods` entry-point group.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from eqat.methods import block_ap, e2e_qp, rtn  # noqa: F401  (they register themselves)
from eqat.methods.base import get_method, parse_plan, register_method, registered_methods  # noqa: F401

for _ep in entry_points(group="eqat.methods"):
    _ep.load()
