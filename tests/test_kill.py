"""`eqat quantize` killed for real (SIGKILL, SIGINT) in a subprocess, at points found by watching
its files: once Block-AP has started, right after block 1 is saved, inside E2E-QP, and while the
finished checkpoint is being written. The output folder is never a half-written checkpoint, and
re-running the same command finishes with a model identical to an uninterrupted run's."""

import json
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
def _exists(pattern):
    return lambda out: any(out.parent.glob(pattern.format(name=out.name)))


def _next_block(n):
    def reached(out):
        try:
            return json.loads((out / "resume" / "state.json").read_text())["next_block"] >= n
        except (OSError, ValueError, KeyError):
            return False
    return reached


# (signal, where, when to send it): points inside Block-AP, between blocks, inside E2E-QP and while saving
KILLS = [
    (signal.SIGKILL, "block-ap started", _exists("{name}/resume/block_kwargs.pt")),
    (signal.SIGKILL, "after block 1", _next_block(1)),
    (signal.SIGINT, "inside Block-AP", _exists("{name}/resume/block_kwargs.pt")),
    (signal.SIGKILL, "inside E2E-QP", _exists("{name}/resume/e2e/e2e_state.pt")),
    (signal.SIGKILL, "while saving", _exists(".{name}.tmp-*")),
    (signal.SIGINT, "inside E2E-QP", _exists("{name}/resume/e2e/e2e_state.pt")),
]

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


@pytest.mark.parametrize("sig,where,reached", KILLS, ids=[f"{s.name}-{w.replace(' ', '-')}" for s, w, _ in KILLS])
def test_killed_run_resumes_to_the_same_model(reference, sig, where, reached):
    root, seconds = reference
    out = root / f"run-{sig.name}-{where.replace(' ', '-')}"
    p = run(root / "tiny", out)
    while p.poll() is None and not reached(out):
        time.sleep(0.02)
    p.send_signal(sig)
    code = p.wait(timeout=600)
    seen = state_of(out)
    print(f"\nkill {sig.name} {where}: exit {code}, folder {seen}")
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
