"""Quantization methods, each in its own module, registered by `@register_method` (eqat.methods.base).

Importing this package registers the built-in methods, then any that installed packages declare
under the `eqat.methods` entry-point group.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from eqat.methods import block_ap, e2e_qp, lr_qat, qllm, rtn, smoothquant  # noqa: F401  (they register themselves)
from eqat.methods.base import get_method, parse_plan, register_method, registered_methods  # noqa: F401

for _ep in entry_points(group="eqat.methods"):  # methods of other installed packages
    try:
        _ep.load()
    except Exception as _e:  # a broken plugin must not take eqat down with it
        import warnings

        warnings.warn(f"eqat: the method plugin {_ep.name} ({_ep.value}) failed to load: {_e}", stacklevel=1)
