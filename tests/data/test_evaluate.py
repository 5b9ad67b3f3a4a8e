import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model
from eqat.errors import EqatInputError
from eqat.data.evaluate import perplexity


def test_matches_manual_computation():
    model = tiny_model(vocab=100)
    ids = torch.randint(0, 100, (3 * 32 + 5,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, seqlen=32, progress=False)
    assert r.windows == 3 and r.tokens == 3 * 31
    nll = 0.0
    with torch.no_grad():
        for w in ids[:96].view(3, 32):
            logits = model(w[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
    assert r.ppl == pytest.approx(math.exp(nll / 93), rel=1e-6)
    assert perplexity(model, ids, seqlen=32, max_windows=1, progress=False).windows == 1
    batched = perplexity(model, ids, seqlen=32, batch_size=2, progress=False)
    assert batched.ppl == pytest.approx(r.ppl, rel=1e-5)


class Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.p = vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, use_cache=False):
        return type("O", (), {"logits": torch.zeros(*x.shape, self.vocab)})()


def test_uniform_model_has_perplexity_vocab():
    r = perplexity(Uniform(50), torch.arange(200) % 50, seqlen=20, progress=False)
    assert r.ppl == pytest.approx(50, rel=1e-6)


def test_too_short_text():
    with pytest.raises(EqatInputError, match="less than one window"):
        perplexity(Uniform(5), torch.arange(10), seqlen=64, progress=False)


@pytest.mark.parametrize("seqlen, max_windows, message", [(0, None, "--seqlen 0"), (1, 4, "--seqlen 1"),
                                                          (8, 0, "--max-windows 0"), (8, -1, "--max-windows -1")])
def test_window_options_that_measure_nothing_are_bad_input(seqlen, max_windows, message):
    """They raised ZeroDivisionError (seqlen 0 or 1) or blamed the text's length (max_windows 0)."""
    with pytest.raises(EqatInputError, match=message):
        perplexity(Uniform(5), torch.arange(100) % 5, seqlen=seqlen, max_windows=max_windows, progress=False)
