"""eqat: low-bit weight-only LLMs with quantization-aware training (EfficientQAT), exported to real runtimes.

Importing eqat imports neither transformers nor Triton and does not initialise CUDA; the
names below load their modules on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from eqat.errors import EqatError, EqatInputError  # noqa: E402
from eqat.scheme import QuantScheme  # noqa: E402

_LAZY = {
    "QuantLinear": "eqat.qlinear",
    "load_model": "eqat.model",
    "quantize_rtn": "eqat.train.rtn",
    "save_quantized": "eqat.checkpoint",
    "load_quantized": "eqat.checkpoint",
    "perplexity": "eqat.evaluate",
    "BlockAPConfig": "eqat.train.blockap",
    "BlockAPTrainer": "eqat.train.blockap",
    "E2EQPConfig": "eqat.train.e2e",
    "E2EQPTrainer": "eqat.train.e2e",
}

__all__ = ["__version__", "QuantScheme", "EqatError", "EqatInputError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eqat' has no attribute {name!r}")
