import math

import torch
from torch import nn

from eqat.engine.selection import Best, HeldoutNLL


def candidates(*values):
    """Modules that carry their own score in a buffer."""
    out = []
    for v in values:
        m = nn.Module()
        m.register_buffer("v", torch.tensor(float(v)))
        out.append(m)
    return out


def test_best_by_loss_keeps_the_lowest_and_the_earliest_of_ties():
    best = Best(lambda m: float(m.v))
    for epoch, m in enumerate(candidates(3.0, 1.0, 2.0, 1.0)):
        best.offer(epoch, m)
    assert (best.epoch, best.loss, best.score) == (1, 1.0, 1.0)
    assert best.losses == [3.0, 1.0, 2.0, 1.0] and best.scores == []


def test_best_by_score_keeps_its_own_loss_and_records_both():
    best = Best(lambda m: float(m.v), lambda m: -float(m.v))  # the score prefers the highest loss
    for epoch, m in enumerate(candidates(3.0, 5.0, 4.0)):
        best.offer(epoch, m)
    assert (best.epoch, best.loss, best.score) == (1, 5.0, -5.0)
    assert best.losses == [3.0, 5.0, 4.0] and best.scores == [-3.0, -5.0, -4.0]


def test_a_non_finite_score_is_never_kept_over_a_finite_one():
    best = Best(lambda m: float(m.v))
    for epoch, m in enumerate(candidates(math.nan, 7.0, math.inf, -math.inf)):
        best.offer(epoch, m)
    assert best.epoch == 1 and best.loss == 7.0
    first_nan = Best(lambda m: float(m.v))
    first_nan.offer(0, candidates(math.nan)[0])
    assert first_nan.epoch == 0  # nothing better offered: the only candidate stays


class Affine(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, **kw):
        return (x @ self.w,)  # decoder layers return tuples


def test_heldout_nll_is_the_cross_entropy_of_block_rest_norm_head():
    torch.manual_seed(0)
    n, t, h, v = 5, 6, 4, 11
    blocks = [Affine(torch.randn(h, h)) for _ in range(3)]
    norm, head = nn.LayerNorm(h), nn.Linear(h, v)
    ids = torch.randint(0, v, (n, t))
    xs = torch.randn(n, t, h)
    rows = range(2, 5)
    score = HeldoutNLL(blocks, norm, head, ids, [{}] * 3, torch.device("cpu"), batch_size=2)
    candidate = Affine(torch.randn(h, h))
    with torch.no_grad():
        hidden = xs[2:5] @ candidate.w @ blocks[2].w  # candidate for block 1, then block 2
        logits = head(norm(hidden))
        ref = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[2:5, 1:].flatten())
    assert math.isclose(score(1, candidate, xs, rows), float(ref), rel_tol=1e-5)
    with torch.no_grad():  # the last block: nothing after it
        ref_last = nn.functional.cross_entropy(head(norm(xs[2:5] @ candidate.w))[:, :-1].flatten(0, 1),
                                               ids[2:5, 1:].flatten())
    assert math.isclose(score(2, candidate, xs, rows), float(ref_last), rel_tol=1e-5)
    capped = HeldoutNLL(blocks, norm, head, ids, [{}] * 3, torch.device("cpu"), batch_size=2, softcap=0.5)
    with torch.no_grad():  # Gemma 2's final soft-capping: 0.5 * tanh(logits / 0.5)
        logits = 0.5 * torch.tanh(head(norm(xs[2:5] @ candidate.w)) / 0.5)
        ref_capped = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[2:5, 1:].flatten())
    assert math.isclose(capped(2, candidate, xs, rows), float(ref_capped), rel_tol=1e-5)
    assert not math.isclose(float(ref_capped), float(ref_last), rel_tol=1e-3)
