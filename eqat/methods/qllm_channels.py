"""QLLM's channel disassembly and assembly (Liu et al., ICLR 2024, section 3.1), as data.

Given the calibration statistics of one site's input x [tokens, K] (per-channel max |x_c|, and the
Gram matrix X^T X) and the stacked weights W [N, K] of the linears reading it:

- disassembly at threshold theta: channel c with M_c = max|x_c| > theta becomes n_c = ceil(M_c / theta)
  sub-channels carrying x_c / n_c (each against a copy of W[:, c]), so no sub-channel exceeds theta;
- assembly: the channel count returns to K by merging as many pairs (i, j) of the other channels as
  were added, the pairs of least merge error ||(x_i - x_j)(W_i - W_j)||^2 / 4 = ||x_i - x_j||^2
  ||W_i - W_j||^2 / 4 (exact from the two Gram matrices), found by bipartite matching between the
  even and the odd candidates (each channel merged at most once, sub-channels never);
- the result is an eqat.core.reassembly (index [2, K], scale [K]).
"""

from __future__ import annotations

import math

import torch

from eqat.core.reassembly import identity_reassembly


def disassembly_counts(absmax: torch.Tensor, theta: float) -> torch.Tensor:
    """n_c (int64 [K], >= 1): how many sub-channels each channel becomes at threshold `theta`."""
    return torch.where(absmax > theta, torch.ceil(absmax / theta), torch.ones_like(absmax)).long()


def added_channels(absmax: torch.Tensor, theta: float) -> int:
    return int((disassembly_counts(absmax, theta) - 1).sum())


def smallest_theta(absmax: torch.Tensor, budget: int) -> float:
    """The smallest threshold whose disassembly adds at most `budget` channels (bisection; the added
    count falls as theta grows). Returns max|x| (nothing split) when the budget is 0."""
    hi = float(absmax.max())
    if budget <= 0 or hi <= 0:
        return hi
    lo = hi / (budget + 1)  # below this, the largest channel alone needs more than `budget` extra
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if added_channels(absmax, mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


def theta_candidates(absmax: torch.Tensor, budget: int, count: int) -> list[float]:
    """`count` thresholds, geometrically spaced from the smallest that fits `budget` up to just below
    max|x| (where only the largest channel splits in two)."""
    top = float(absmax.max())
    low = smallest_theta(absmax, budget)
    if count <= 1 or low >= top * 0.99:
        return [low]
    high = top * 0.99
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


def pair_distances(gram: torch.Tensor, diag: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """||v_r - v_c||^2 [len(rows), len(cols)] from a Gram matrix of the vectors (clamped at 0)."""
    return (diag[rows][:, None] + diag[cols][None, :] - 2 * gram[rows][:, cols]).clamp_min(0)


def merge_pairs(x_gram: torch.Tensor, w_gram: torch.Tensor, candidates: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """Up to `count` disjoint pairs (i, j) of `candidates` (channel indices), i from the even-placed
    half and j from the odd-placed half, taken greedily by least merge error (float64 Gram matrices
    [K, K] of the inputs and of the weights' columns)."""
    if count <= 0:
        return []
    left, right = candidates[0::2], candidates[1::2]
    err = (pair_distances(x_gram, x_gram.diagonal(), left, right)
           * pair_distances(w_gram, w_gram.diagonal(), left, right) / 4)
    free_l = torch.ones(len(left), dtype=torch.bool)
    free_r = torch.ones(len(right), dtype=torch.bool)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < count:
        masked = err.masked_fill(~free_l[:, None] | ~free_r[None, :], math.inf)
        best, j = masked.min(1)
        taken = 0
        for i in torch.argsort(best).tolist():
            if len(pairs) == count or not math.isfinite(float(best[i])):
                break
            if free_r[j[i]]:  # a right channel someone with a smaller error took waits for the next round
                pairs.append((int(left[i]), int(right[j[i]])))
                free_l[i], free_r[j[i]] = False, False
                taken += 1
        if taken == 0:
            break
    return pairs


def build_reassembly(counts: torch.Tensor, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(index int32 [2, K], scale float32 [K]) from the disassembly counts and the merged pairs: a merged
    pair sits at its first channel's place, the added sub-channels take the places the merges free."""
    k = counts.numel()
    index, scale = identity_reassembly(k)
    scale = 0.5 / counts.float()
    extra = [c for c in torch.nonzero(counts > 1).flatten().tolist() for _ in range(int(counts[c]) - 1)]
    if len(extra) != len(pairs):
        raise ValueError(f"{len(extra)} sub-channels added but {len(pairs)} pairs merged; the count must stay {k}")
    for (i, j), c in zip(pairs, extra):
        index[1, i], scale[i] = j, 0.5
        index[0, j], index[1, j], scale[j] = c, c, 0.5 / float(counts[c])
    return index, scale


def reassembly_at(absmax: torch.Tensor, x_gram: torch.Tensor, w_gram: torch.Tensor, theta: float
                  ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The reassembly of a site at threshold `theta`: (index, scale, channels added), or None when
    there are too few channels left to merge back to K."""
    counts = disassembly_counts(absmax, theta)
    added = int((counts - 1).sum())
    candidates = torch.nonzero(counts == 1).flatten()
    pairs = merge_pairs(x_gram, w_gram, candidates, added)
    if len(pairs) < added:
        return None
    index, scale = build_reassembly(counts, pairs)
    return index, scale, added
