"""The one map from dtype names (CLI options, config fields, checkpoint metadata) to torch dtypes."""

from __future__ import annotations

import torch

from eqat.errors import EqatInputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` / `"bf16"` / a torch.dtype -> torch.dtype; anything else is bad input."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise EqatInputError(f"unknown dtype '{name}': use one of float32, float16, bfloat16.")
    return DTYPES[name]
