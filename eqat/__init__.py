"""eqat: low-bit weight-only LLMs with quantization-aware training (EfficientQAT), exported to real runtimes.

Importing eqat imports neither transformers nor Triton and does not initialise CUDA; the
names below load their modules on first use.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

# transformers and GPTQModel import torchao (a GPTQModel dependency) when installed; torchao then logs a
# warning per CUDA extension a CPU build lacks, and torch one per Enum it registers: noise on every
# command, about nothing eqat uses. Their errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from eqat.errors import EqatError, EqatInputError  # noqa: E402
from eqat.core.scheme import QuantScheme  # noqa: E402

_LAZY = {
    "QuantLinear": "eqat.core.qlinear",
    "load_model": "eqat.models.loading",
    "quantize_rtn": "eqat.methods.rtn",
    "save_quantized": "eqat.io.checkpoint",
    "load_quantized": "eqat.io.checkpoint",
    "perplexity": "eqat.data.evaluate",
    "BlockAPConfig": "eqat.methods.block_ap",
    "BlockAPTrainer": "eqat.methods.block_ap",
    "E2EQPConfig": "eqat.methods.e2e_qp",
    "E2EQPTrainer": "eqat.methods.e2e_qp",
}

__all__ = ["__version__", "QuantScheme", "EqatError", "EqatInputError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eqat' has no attribute {name!r}")
