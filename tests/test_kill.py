"""`eqat quantize` killed for real (SIGKILL, SIGINT) at points spread over a run, in a
subprocess: the output folder is never a half-written checkpoint, and re-running the same
command finishes with a model identical to an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["quantize", "--scheme", "w2g32", "--nsamples", "8", "--val-samples", "2", "--calib-seqlen", "32", "--epochs", "2",
        "--e2e-nsamples", "8", "--e2e-val-samples", "2", "--e2e-seqlen", "32", "--e2e-epochs", "2",
        "--e2e-grad-accum", "1", "--e2e-save-every", "1", "--no-eval", "-q", "--seed", "0"]
KILLS = [(signal.SIGKILL, 0.3), (signal.SIGKILL, 0.5), (signal.SIGKILL, 0.7), (signal.SIGKILL, 0.9), (signal.SIGINT, 0.6)]


def run(model, out, **kw):
    return subprocess.Popen([sys.executable, "-m", "eqat", *ARGS, "--model", str(model), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def state_of(out):
    """complete | resumable | absent; anything else (a half-written final file) fails."""
    if not out.exists():
        return "absent"
    names = {p.name for p in out.iterdir()}
    if "eqat_config.json" in names:
        assert {"model.safetensors", "config.json", "report.json"} <= names, names
        return "complete"
    assert names <= {"resume"}, f"unfinished folder holds {names}"
    return "resumable"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer):
    from conftest import tiny_model

    root = tmp_path_factory.mktemp("kill")
    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    model.save_pretrained(root / "tiny")
    tiny_tokenizer.save_pretrained(root / "tiny")
    t = time.perf_counter()
    p = run(root / "tiny", root / "ref")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    return root, time.perf_counter() - t


@pytest.mark.parametrize("sig,when", KILLS, ids=[f"{s.name}-{w}" for s, w in KILLS])
def test_killed_run_resumes_to_the_same_model(reference, sig, when):
    root, seconds = reference
    out = root / f"run-{sig.name}-{when}"
    p = run(root / "tiny", out)
    time.sleep(when * seconds)
    p.send_signal(sig)
    code = p.wait(timeout=600)
    seen = state_of(out)
    assert code in (0, -signal.SIGKILL, 130), p.stderr.read()
    if code == 130:
        assert "re-run the same command to resume" in p.stderr.read()
    if seen != "complete":  # re-run the same command
        p = run(root / "tiny", out)
        assert p.wait(timeout=600) == 0, p.stderr.read()
    assert state_of(out) == "complete"
    assert not list(root.glob(f".{out.name}*")), "a lock or temporary sibling was left behind"
    a, b = load_file(root / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"differs after a kill ({seen})"
