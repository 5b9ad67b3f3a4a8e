"""The block-wise engine calls each block as the model does: Gemma 2/3 alternate sliding-window
and global attention, each with its own mask and rotary embedding, and the engine captures the
arguments of the first block of each type."""

import pytest
import torch

from eqat.engine.blockwise import BlockwiseEngine
from eqat.engine.selection import run_block
from eqat.core.scheme import QuantScheme
from eqat.methods.base import get_method
from tests.conftest import tiny_model


def _real_block_io(model, ids):
    """Each block's input and output in the model's own forward."""
    io = {}
    hooks = [b.register_forward_hook(lambda m, a, kw, out, i=i: io.__setitem__(i, (kw.get("hidden_states", a[0] if a else None),
                                                                                   out[0] if isinstance(out, tuple) else out)),
                                     with_kwargs=True)
             for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return io


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "llama"])
def test_captured_arguments_reproduce_every_blocks_own_forward(family, tmp_path):
    model = tiny_model(family, layers=4)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))  # 24 > the sliding window 8
    want = _real_block_io(model, ids)
    method = get_method("block-ap")
    engine = BlockwiseEngine(model, method, method.config(val_samples=0), QuantScheme.parse("w4g16"),
                             tmp_path / "state", progress=False)
    kw = engine._capture(ids, None)
    assert set(kw) == set(engine.layer_types)
    for i, block in enumerate(model.model.layers):
        with torch.no_grad():
            got = run_block(block, want[i][0], kw[engine.layer_types[i]])
        torch.testing.assert_close(got, want[i][1], rtol=1e-5, atol=1e-5)
    if family != "llama":  # the types' arguments differ, and the wrong one gives another output
        assert engine.layer_types[:2] == ["sliding_attention", "full_attention"]
        with torch.no_grad():
            wrong = run_block(model.model.layers[1], want[1][0], kw["sliding_attention"])
        assert not torch.allclose(wrong, want[1][1], rtol=1e-3, atol=1e-3)


def test_resume_state_with_other_attention_types_is_refused(tmp_path, monkeypatch):
    """A resume folder whose saved block arguments miss one of the model's attention types (another
    eqat's, or edited) is refused as damaged instead of calling full-attention blocks with the
    sliding-window mask."""
    from eqat.engine.blockwise import KWARGS
    from eqat.engine.state import load_state, save_state
    from eqat.errors import EqatInputError
    from tests.conftest import blockwise_killed_after

    method = get_method("block-ap")
    cfg = method.config(val_samples=0, epochs=1)
    calib = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    engine = BlockwiseEngine(tiny_model("gemma3_text", layers=2), method, cfg, QuantScheme.parse("w4g16"),
                             tmp_path / "state", progress=False)
    monkeypatch.setattr(BlockwiseEngine, "_save_block", blockwise_killed_after(0))
    with pytest.raises(KeyboardInterrupt):
        engine.run(calib)
    monkeypatch.undo()
    saved = load_state(tmp_path / "state", KWARGS, engine.fingerprint, "test")
    assert set(saved["kwargs"]) == {"sliding_attention", "full_attention"}
    del saved["kwargs"]["full_attention"], saved["rebuild"]["full_attention"]
    save_state(tmp_path / "state", KWARGS, engine.fingerprint, saved)
    again = BlockwiseEngine(tiny_model("gemma3_text", layers=2), method, cfg, QuantScheme.parse("w4g16"),
                            tmp_path / "state", progress=False)
    with pytest.raises(EqatInputError, match=r"holds block arguments for \['sliding_attention'\], and the model's "
                                             r"attention types are \['full_attention', 'sliding_attention'\]"):
        again.run(calib)
