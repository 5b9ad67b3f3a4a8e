"""`eqat quantize` killed for real (SIGKILL, SIGINT) in a subprocess, at points found by watching
its files: once Block-AP has started, right after block 1 is saved, inside E2E-QP, and while the
finished checkpoint is being written. The output folder is never a half-written checkpoint, and
re-running the same command finishes with a model identical to an uninterrupted run's."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["quantize", "--scheme", "w2g32", "--nsamples", "8", "--val-samples", "2", "--calib-seqlen", "32", "--epochs", "1",
        "--e2e-nsamples", "8", "--e2e-val-samples", "2", "--e2e-seqlen", "32", "--e2e-epochs", "1",
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
# (SIGKILL as Block-AP starts is the SIGINT case's moment; the random-moment runs below SIGKILL inside it too)
KILLS = [
    (signal.SIGKILL, "after block 1", _next_block(1)),
    (signal.SIGINT, "inside Block-AP", _exists("{name}/resume/block_kwargs.json")),
    (signal.SIGKILL, "inside E2E-QP", _exists("{name}/resume/e2e/e2e_state.json")),
    (signal.SIGKILL, "while saving", _exists(".{name}.tmp-*")),
    (signal.SIGINT, "inside E2E-QP", _exists("{name}/resume/e2e/e2e_state.json")),
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


def wrote_since(out, since):
    """Whether the run has written into `out/resume` since wall time `since` (its first saved block
    or step: training is under way)."""
    try:
        files = list((out / "resume").rglob("*"))
    except OSError:  # not there yet, or gone: the run finished and its checkpoint replaced resume/
        return False
    for f in files:
        try:
            if f.stat().st_mtime > since:
                return True
        except OSError:  # replaced while we looked
            continue
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer):
    """An uninterrupted run; returns (root, seconds from its first write into resume/ to its end:
    the span in which training state exists on disk)."""
    from tests.conftest import tiny_model

    root = tmp_path_factory.mktemp("kill")
    model = tiny_model("llama", vocab=len(tiny_tokenizer))
    model.save_pretrained(root / "tiny")
    tiny_tokenizer.save_pretrained(root / "tiny")
    started, first = time.time(), None
    p = run(root / "tiny", root / "ref")
    while p.poll() is None:
        if first is None and wrote_since(root / "ref", started):
            first = time.perf_counter()
        time.sleep(0.01)
    assert p.wait(timeout=600) == 0 and first is not None, p.stderr.read()
    return root, time.perf_counter() - first


def kill_at(root, out, sig, when):
    """Start the run (or its re-run), send `sig` once `when(out, wall start time)` holds; returns what
    the kill left: 'complete', 'resumable' or 'absent' (`state_of` fails on anything else)."""
    started = time.time()
    p = run(root / "tiny", out)
    while p.poll() is None and not when(out, started):
        time.sleep(0.02)
    p.send_signal(sig)
    code = p.wait(timeout=600)
    seen = state_of(out)
    # SIGINT: exit 130 with eqat's message, or death by SIGINT, with or without the message (seen:
    # Python re-raises it at exit when it landed while module code ran from C, and a run died of it
    # silently, as when a library has put SIGINT back to its default for a moment); the folder must
    # be as valid after that as after a SIGKILL, which is what the caller checks
    assert code in (0, -signal.SIGKILL, 130, -signal.SIGINT), p.stderr.read()
    if code == 130:
        assert "re-run the same command to resume" in p.stderr.read()
    return seen


def finish_and_compare(root, out):
    if state_of(out) != "complete":  # re-run the same command
        p = run(root / "tiny", out)
        assert p.wait(timeout=600) == 0, p.stderr.read()
    assert state_of(out) == "complete"
    assert not list(root.glob(f".{out.name}*")), "a lock or temporary sibling was left behind"
    a, b = load_file(root / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"differs after a kill ({out.name})"


@pytest.mark.parametrize("sig,where,reached", KILLS, ids=[f"{s.name}-{w.replace(' ', '-')}" for s, w, _ in KILLS])
def test_killed_run_resumes_to_the_same_model(reference, sig, where, reached):
    root, _ = reference
    out = root / f"run-{sig.name}-{where.replace(' ', '-')}"
    seen = kill_at(root, out, sig, lambda o, t: reached(o))
    print(f"\nkill {sig.name} {where}: folder {seen}")
    finish_and_compare(root, out)


def after_first_write(delay):
    """A kill condition: `delay` seconds after this run first wrote into resume/ (a block or step saved)."""
    seen = []

    def when(out, started):
        if not seen:
            if wrote_since(out, started):
                seen.append(time.perf_counter())
            return False
        return time.perf_counter() - seen[0] >= delay
    return when


@pytest.mark.parametrize("seed", range(3))  # seeds 0-2: both signal orders, moments all over the span
def test_killed_at_random_moments_resumes_to_the_same_model(reference, seed):
    """Kills at moments drawn from `seed`, uniform over the span of an uninterrupted run in which
    training state is on disk (from its first saved block to its end: Block-AP, E2E-QP, saving,
    wherever the time goes), SIGKILL and SIGINT in turn: two kills in a row on the same folder, the
    second timed from the resumed run's first save, then a final re-run; the model is still the
    uninterrupted one."""
    root, seconds = reference
    rng = random.Random(seed)
    out = root / f"random-{seed}"
    for k in range(2):
        sig, delay = (signal.SIGKILL, signal.SIGINT)[(seed + k) % 2], rng.uniform(0.0, 1.0 if k == 0 else 0.5) * seconds  # a resumed run has less left to do
        seen = kill_at(root, out, sig, after_first_write(delay))
        print(f"\nseed {seed} kill {k + 1}: {sig.name} {delay:.2f} s after a save, of a {seconds:.2f} s span: folder {seen}")
        if seen == "complete":  # the run ended before the kill
            break
    finish_and_compare(root, out)
