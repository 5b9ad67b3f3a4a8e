"""Channel reassembly (QLLM): a fixed gather-and-average on a linear's input, stored as data.

A reassembly of a K-channel input is two tensors:

    index  int32 [2, K]   the source channels (a_k, b_k) of each new channel k
    scale  float32 [K]    its factor

    x'_k = scale_k * (x[a_k] + x[b_k])        W'[:, k] = W[:, a_k] + W[:, b_k] if a_k != b_k else W[:, a_k]

which covers the three kinds of new channel:

    kept channel c            a = b = c, scale 1/2                 x'_k = x_c
    sub-channel of c (1 of n)  a = b = c, scale 1/(2n)             x'_k = x_c / n   (disassembly)
    merged pair (i, j)        a = i, b = j, scale 1/2              x'_k = (x_i + x_j) / 2   (assembly)

A disassembled channel's n sub-channels each carry x_c / n against a copy of W[:, c], so they give
W[:, c] x_c exactly; a merged pair gives (W_i + W_j)(x_i + x_j) / 2, exact when x_i = x_j. The
channel count stays K (as many merges as added sub-channels), so the layer keeps its shape. Merges
mix two channels, so this cannot be folded into the preceding RMSNorm: eqat applies it in the
linear's forward (QuantLinear.forward, before activation quantization) and stores it in the
checkpoint as `<layer>.reassembly_index` and `<layer>.reassembly_scale` (docs/checkpoint-format.md).
"""

from __future__ import annotations

import torch

from eqat.errors import EqatInputError


def identity_reassembly(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reassembly that changes nothing: (index int32 [2, k], scale float32 [k])."""
    idx = torch.arange(k, dtype=torch.int32)
    return torch.stack([idx, idx]), torch.full((k,), 0.5)


def reassemble(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x' [..., K] in x's dtype: scale * (x[..., a] + x[..., b])."""
    a, b = index[0].long(), index[1].long()
    return (x.index_select(-1, a) + x.index_select(-1, b)) * scale.to(x.dtype)


def reassemble_weight(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> W' [N, K] (float32): column k is W[:, a_k] + W[:, b_k], or W[:, a_k] when a_k = b_k."""
    a, b = index[0].long(), index[1].long()
    w = weight.float()
    return w.index_select(1, a) + w.index_select(1, b) * (a != b).to(w.dtype)


def check_reassembly(index: torch.Tensor, scale: torch.Tensor, k: int, where: str) -> None:
    """Refuse (EqatInputError) a reassembly that is not one of K channels: wrong shapes, dtypes, indices
    out of range, or non-finite / non-positive scales (a damaged checkpoint)."""
    problem = None
    if index.dtype != torch.int32 or tuple(index.shape) != (2, k):
        problem = f"reassembly_index must be int32 [2, {k}], not {index.dtype} {list(index.shape)}"
    elif scale.dtype != torch.float32 or tuple(scale.shape) != (k,):
        problem = f"reassembly_scale must be float32 [{k}], not {scale.dtype} {list(scale.shape)}"
    elif index.numel() and (int(index.min()) < 0 or int(index.max()) >= k):
        problem = f"reassembly_index holds channels outside [0, {k})"
    elif not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        problem = "reassembly_scale holds values that are not finite and positive"
    if problem:
        raise EqatInputError(f"{where}: {problem}; the checkpoint is damaged (re-run `eqat quantize`).")
