"""The reliability review's cases (issue 17), run for real against the `eqat` CLI in subprocesses.

    python benchmarks/reliability_cases.py [--tree PATH] [--name reliability_cases]

Each case sets up a tiny model (2 blocks, built in code) in a fresh folder, runs one `python -m
eqat ...` command (some kill a run first, plant a file or mount a tiny or read-only tmpfs), and
checks the promise of docs/reliability.md: `held` or `broken`, with the exit code and the first
line of the message. `--tree` runs the code of another checkout (e.g. a `git worktree` of an older
commit) through PYTHONPATH, for before/after tables. Writes results/<name>.{json,md}.
Cases that need `mount` (root) are reported `n/a` where it is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
Q = ["--nsamples", "4", "--val-samples", "2", "--calib-seqlen", "32", "--e2e-nsamples", "4", "--e2e-val-samples", "2",
     "--e2e-seqlen", "32", "--scheme", "w4g32", "--no-eval", "-q"]
RTN = ["--method", "rtn", "--scheme", "w4g32", "--no-eval", "-q"]


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


class Case:
    """One run in `work` (a fresh folder with `tiny/`, `calib.txt`, `ck/` = an RTN checkpoint)."""

    def __init__(self, env: dict, work: Path):
        self.env, self.work = env, work
        self.code, self.err = None, ""

    def eqat(self, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> int:
        p = subprocess.run([sys.executable, "-m", "eqat", *args], cwd=cwd or self.work, env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=timeout)
        self.code, self.err = p.returncode, p.stderr
        return p.returncode

    def killed(self, args: list[str], *ready: str, timeout: float = 120) -> None:
        """Start `eqat args`, SIGKILL it once a file matching one of the globs `ready` (under work,
        temporary `.tmp` names excluded) exists."""
        p = subprocess.Popen([sys.executable, "-m", "eqat", *args], cwd=self.work, env=self.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = time.time()
        def found() -> bool:
            return any(not f.name.endswith(".tmp") for pat in ready for f in self.work.glob(pat))
        while not found() and p.poll() is None and time.time() - t < timeout:
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()

    @property
    def message(self) -> str:
        lines = [ln.strip() for ln in self.err.splitlines() if ln.strip() and "torchao" not in ln and "pytree" not in ln
                 and "Warning" not in ln and "warn(" not in ln and "return forward" not in ln and "Writing model" not in ln
                 and "Loading weights" not in ln]
        tb = any("Traceback" in ln for ln in lines)
        last = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "") if tb else \
            " ".join(ln for ln in lines if not ln.startswith(("INFO", "WARNING:", "eqat: removing stale")))[:220]
        note = next((ln for ln in lines if "PAYLOAD" in ln or "payload did" in ln), "")
        return ("TRACEBACK " if tb else "") + (note[:24] + " " if tb and note else "") + last[:220]

    def clean_exit(self, code: int, *needles: str) -> bool:
        return self.code == code and "Traceback" not in self.err and all(n in " ".join(self.err.split()) for n in needles)


def plant_all(folder: Path, patterns: tuple[str, ...], marker: Path) -> list[str]:
    import torch

    planted = []
    for pat in patterns:
        for f in folder.glob(pat):
            if f.suffix == ".pt":
                torch.save({"k": Payload(str(marker))}, f)
            else:
                f.write_bytes(pickle.dumps(Payload(str(marker))))
            planted.append(f.name)
    return planted


# ---- the cases: (id, what, run(case) -> held) ---------------------------------------------------------------

def _payload_checked(c: Case) -> bool:
    """Held when the planted payload did not run and the run refused with exit 2."""
    ran = (c.work / "marker").exists()
    c.err = ("THE PAYLOAD RAN. " if ran else "payload did not run. ") + c.err
    return not ran and c.code == 2


def c_pickle_blockap(c: Case) -> bool:
    args = ["quantize", "--model", "tiny", "--out", "run", "--calib-data", "calib.txt", *Q, "--skip-e2e", "--epochs", "40"]
    c.killed(args, "run/resume/block_000.safetensors")
    plant_all(c.work / "run" / "resume", ("block_kwargs*",), c.work / "marker")
    c.eqat(*args)
    return _payload_checked(c)


def c_pickle_e2e(c: Case) -> bool:
    args = ["quantize", "--model", "tiny", "--out", "run", "--calib-data", "calib.txt", "--e2e-data", "calib.txt", *Q,
            "--e2e-steps", "400", "--e2e-save-every", "1"]
    c.killed(args, "run/resume/e2e/e2e_state.pt", "run/resume/e2e/e2e_state.json")  # the old name, the new one
    plant_all(c.work / "run" / "resume" / "e2e", ("e2e_state.pt", "e2e_state.*.safetensors"), c.work / "marker")
    c.eqat(*args)
    return _payload_checked(c)


def c_vllm_python_recorded(c: Case) -> bool:
    c.eqat("export", "ck", "--format", "gptq", "--out", "g", "-q")
    c.eqat("validate", "ck", "--export", "g", "--backends", "gptqmodel", "--windows", "1", "--seqlen", "32",
           "--vllm-python", "/bin/true", "--out", "v", "-q")
    return c.code == 0 and "vllm_python" not in (c.work / "v" / "eqat_validate.yaml").read_text()


def c_config_names_program(c: Case) -> bool:
    (c.work / "evil.yaml").write_text("vllm_python: /bin/true\n")
    c.eqat("validate", "ck", "--config", "evil.yaml", "-q")
    return c.clean_exit(2, "may not name a program")


def _force_onto(c: Case, out: str, cwd: Path | None = None, env: dict | None = None) -> None:
    c.eqat("quantize", "--model", str(c.work / "tiny"), *RTN, "--out", out, "--force", cwd=cwd, env=env)


def c_force_cwd(c: Case) -> bool:
    v = c.work / "v"
    v.mkdir()
    (v / "a").write_text("precious")
    _force_onto(c, ".", cwd=v)
    return (v / "a").exists() and c.clean_exit(2)


def c_force_home(c: Case) -> bool:
    home = c.work / "home"
    home.mkdir()
    (home / "notes").write_text("precious")
    _force_onto(c, str(home), env={"HOME": str(home)})
    return (home / "notes").exists() and c.clean_exit(2)


def c_force_parent_of_cwd(c: Case) -> bool:
    sub = c.work / "sub" / "deeper"
    sub.mkdir(parents=True)
    (c.work / "sub" / "a").write_text("precious")
    _force_onto(c, "..", cwd=sub)
    return (c.work / "sub" / "a").exists() and c.clean_exit(2)


def c_force_model(c: Case) -> bool:
    before = (c.work / "tiny" / "model.safetensors").read_bytes()
    _force_onto(c, "tiny")
    after = c.work / "tiny" / "model.safetensors"
    return after.exists() and after.read_bytes() == before and not (c.work / "tiny" / "eqat_config.json").exists()


def c_export_onto_source(c: Case) -> bool:
    before = (c.work / "ck" / "model.safetensors").read_bytes()
    c.eqat("export", "ck", "--format", "gptq", "--out", "ck", "--force", "-q")
    return (c.work / "ck" / "model.safetensors").read_bytes() == before and c.clean_exit(2)


def c_force_foreign(c: Case) -> bool:
    (c.work / "photos").mkdir()
    (c.work / "photos" / "cat.jpg").write_text("precious")
    _force_onto(c, "photos")
    return (c.work / "photos" / "cat.jpg").exists() and c.clean_exit(2, "--replace-foreign")


def c_symlink_lock(c: Case) -> bool:
    (c.work / "conc").mkdir()
    (c.work / "alias").symlink_to(c.work / "conc", target_is_directory=True)
    args = ["quantize", "--model", "tiny", "--calib-data", "calib.txt", *Q, "--skip-e2e", "--epochs", "200"]
    first = subprocess.Popen([sys.executable, "-m", "eqat", *args, "--out", "conc"], cwd=c.work, env=c.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.time()
    while not list(c.work.glob(".conc.lock")) and time.time() - t < 60:
        time.sleep(0.05)
    c.eqat(*args, "--out", "alias")
    first.kill()
    first.wait()
    return c.clean_exit(2, "in use")


def c_symlink_save(c: Case) -> bool:
    (c.work / "real").mkdir()
    (c.work / "alias").symlink_to(c.work / "real", target_is_directory=True)
    c.eqat("quantize", "--model", "tiny", *RTN, "--out", "alias")
    return c.code == 0 and (c.work / "real" / "eqat_config.json").exists()


def c_empty_parent(c: Case) -> bool:
    c.eqat("quantize", "--model", "tiny", "--out", "new/deep/out", "--lr-quant", "-1", "--no-eval", "-q")
    return c.code == 2 and not (c.work / "new").exists()


def c_lr_explodes(c: Case) -> bool:
    c.eqat("quantize", "--model", "tiny", "--out", "o", "--calib-data", "calib.txt", *Q, "--epochs", "1",
           "--lr-weight", "1e9", "--lr-quant", "1e9", "--skip-e2e")
    return c.clean_exit(1) and not (c.work / "o" / "eqat_config.json").exists()


def c_scales_leave_range(c: Case) -> bool:
    c.eqat("quantize", "--model", "tiny", "--out", "o", "--calib-data", "calib.txt", *Q, "--lr-quant", "0.05",
           "--epochs", "2", "--skip-e2e")
    from safetensors.torch import load_file

    scales = [t for k, t in load_file(str(c.work / "o" / "model.safetensors")).items() if k.endswith(".scales")]
    blocks = json.loads((c.work / "o" / "report.json").read_text())["blocks"]
    agree = all(b["final_loss"] < 10 * max(b["train_loss_last"], b["init_loss"]) for b in blocks)
    return all(bool((s.float() > 0).all()) for s in scales) and agree and "clamp limits" in c.err


def c_negative_lr(c: Case) -> bool:
    c.eqat("quantize", "--model", "tiny", "--out", "o", "--calib-data", "calib.txt", *Q, "--lr-weight", "-1",
           "--lr-quant", "-5", "--skip-e2e")
    return c.clean_exit(2, "positive")


def c_e2e_lr_huge(c: Case) -> bool:
    c.eqat("quantize", "--model", "tiny", "--out", "o", "--calib-data", "calib.txt", "--e2e-data", "calib.txt", *Q,
           "--e2e-lr", "1e9")
    return c.code == 0 and "warning" in c.err and "clamp limits" in c.err


def c_e2e_lr_negative_early(c: Case) -> bool:
    c.eqat("quantize", "--model", "tiny", "--out", "o", "--calib-data", "calib.txt", "--e2e-data", "calib.txt", *Q,
           "--e2e-lr", "-1")
    return c.clean_exit(2, "--e2e-lr") and not (c.work / "o").exists()


def c_validate_tampered(c: Case) -> bool:
    c.eqat("export", "ck", "--format", "gptq", "--out", "g", "-q")
    cfg = json.loads((c.work / "g" / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (c.work / "g" / "config.json").write_text(json.dumps(cfg))
    c.eqat("validate", "ck", "--export", "g", "--backends", "vllm", "--windows", "1", "--seqlen", "32", "-q")
    return c.clean_exit(1, "nothing was compared")


def c_validate_wrong_backend(c: Case) -> bool:
    c.eqat("export", "ck", "--format", "gptq", "--out", "g", "-q")
    c.eqat("validate", "ck", "--export", "g", "--backends", "onnxruntime", "--windows", "1", "--seqlen", "32", "-q")
    return c.clean_exit(1, "nothing was compared")


def c_validate_no_export(c: Case) -> bool:
    c.eqat("validate", "ck", "--windows", "1", "--seqlen", "32", "-q")
    return c.clean_exit(1, "nothing was compared")


def c_validate_self(c: Case) -> bool:
    c.eqat("validate", "ck", "--export", "ck", "--windows", "1", "--seqlen", "32", "-q")
    return c.clean_exit(2)


def c_validate_windows_0(c: Case) -> bool:
    c.eqat("validate", "ck", "--windows", "0", "-q")
    return c.clean_exit(2, "--windows")


def c_eval_seqlen_0(c: Case) -> bool:
    c.eqat("eval", "ck", "--seqlen", "0", "-q")
    return c.clean_exit(2, "--seqlen")


def c_validate_unwritable(c: Case) -> bool:
    c.eqat("export", "ck", "--format", "gptq", "--out", "g", "-q")
    (c.work / "afile").write_text("")
    c.eqat("validate", "ck", "--export", "g", "--backends", "gptqmodel", "--windows", "1", "--seqlen", "32",
           "--out", "afile/v", "-q")
    return c.clean_exit(2)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def c_truncated_model(c: Case) -> bool:
    _truncate(c.work / "tiny" / "model.safetensors")
    c.eqat("quantize", "--model", "tiny", *RTN, "--out", "o")
    return c.clean_exit(2)


def c_truncated_checkpoint(c: Case) -> bool:
    _truncate(c.work / "ck" / "model.safetensors")
    c.eqat("export", "ck", "--format", "gptq", "--out", "g", "-q")
    return c.clean_exit(2) and not (c.work / "g").exists()


def _mount(c: Case, options: str) -> Path | None:
    mnt = c.work / "mnt"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode == 0
    return mnt if ok else None


def _umount(mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], capture_output=True)


def c_read_only_fs(c: Case) -> bool | None:
    mnt = _mount(c, "ro")
    if mnt is None:
        return None
    try:
        c.eqat("quantize", "--model", "tiny", *RTN, "--out", str(mnt / "o"))
    finally:
        _umount(mnt)
    return c.clean_exit(2)


def c_small_disk(c: Case) -> bool | None:
    mnt = _mount(c, "size=200k")
    if mnt is None:
        return None
    try:
        c.eqat("quantize", "--model", "tiny", *RTN, "--out", str(mnt / "o"))
        left = [p.name for p in mnt.iterdir()]
    finally:
        _umount(mnt)
    return c.clean_exit(2, "disk") and "0.00 GiB" not in c.err and not left


def c_bad_device(c: Case) -> bool:
    c.eqat("quantize", "--model", "tiny", *RTN, "--out", "o", "--device", "tpu")
    return c.clean_exit(2, "--device")


def c_eval_gpu(c: Case) -> bool:
    c.eqat("eval", "tiny", "--device", "gpu", "-q")
    return c.clean_exit(2, "--device")


def c_config_not_utf8(c: Case) -> bool:
    (c.work / "c.yaml").write_bytes(b"bits: \xff\xfe 4\n")
    c.eqat("quantize", "--config", "c.yaml", "--model", "tiny", *RTN, "--out", "o")
    return c.clean_exit(2)


def c_export_onto_file(c: Case) -> bool:
    (c.work / "afile").write_text("x")
    c.eqat("export", "ck", "--format", "gptq", "--out", "afile", "--force", "-q")
    return c.clean_exit(2) and (c.work / "afile").read_text() == "x"


def _resumable(c: Case) -> list[str]:
    args = ["quantize", "--model", "tiny", "--out", "run", "--calib-data", "calib.txt", *Q, "--skip-e2e", "--epochs", "40"]
    c.killed(args, "run/resume/block_000.safetensors")
    return args


def c_truncated_stream(c: Case) -> bool:
    args = _resumable(c)
    time.sleep(0.2)
    for f in (c.work / "run" / "resume").glob("x_q.*.bin"):
        _truncate(f)
    c.eqat(*args)
    return c.clean_exit(2, "--force")


def c_corrupt_state(c: Case) -> bool:
    args = _resumable(c)
    (c.work / "run" / "resume" / "state.json").write_text('{"fingerprint": ')
    c.eqat(*args)
    return c.clean_exit(2, "--force")


def c_calib_flag_name(c: Case) -> bool:
    c.eqat("quantize", "--model", "tiny", "--out", "o", "--calib-data", "calib.txt", *Q, "--calib-seqlen", "200",
           "--nsamples", "400")
    return c.clean_exit(2, "--calib-seqlen")


def c_export_hf_folder(c: Case) -> bool:
    c.eqat("export", "tiny", "--format", "gptq", "--out", "g", "-q")
    return c.clean_exit(2, "not an eqat checkpoint") and "damaged" not in c.err


def c_mixtral(c: Case) -> bool:
    c.eqat("quantize", "--model", "mixtral", "--method", "rtn", "--bits", "2", "--group-size", "32", "--no-eval",
           "--out", "q", "-q")
    return c.clean_exit(2, "experts")


CASES: list[tuple[str, str, Callable[[Case], bool | None]]] = [
    ("1a", "pickle planted in Block-AP resume state, same command re-run", c_pickle_blockap),
    ("1b", "pickle planted in E2E-QP resume state, same command re-run", c_pickle_e2e),
    ("1c", "validate --vllm-python recorded in eqat_validate.yaml", c_vllm_python_recorded),
    ("1d", "--config file that sets vllm_python", c_config_names_program),
    ("2a", "cd v; quantize --out . --force", c_force_cwd),
    ("2b", "quantize --out ~ --force", c_force_home),
    ("2c", "quantize --out .. --force (a parent of the cwd)", c_force_parent_of_cwd),
    ("2d", "quantize --out MODEL --force", c_force_model),
    ("2e", "export --out SOURCE --force", c_export_onto_source),
    ("2f", "quantize --out FOREIGN_FOLDER --force", c_force_foreign),
    ("2g", "two runs, --out conc and --out alias (symlink to conc), at once", c_symlink_lock),
    ("2h", "quantize --out SYMLINK completes", c_symlink_save),
    ("2i", "refused run with --out new/deep/out leaves no empty parent", c_empty_parent),
    ("3a", "--lr-weight 1e9 --lr-quant 1e9 --skip-e2e", c_lr_explodes),
    ("3b", "--lr-quant 0.05 --epochs 2: scales leave the valid range", c_scales_leave_range),
    ("3c", "--lr-weight -1 --lr-quant -5", c_negative_lr),
    ("3d", "--e2e-lr 1e9: scales pinned, warned", c_e2e_lr_huge),
    ("3e", "--e2e-lr -1 refused before Block-AP", c_e2e_lr_negative_early),
    ("4a", "validate tampered GPTQ export --backends vllm", c_validate_tampered),
    ("4b", "validate GPTQ export --backends onnxruntime", c_validate_wrong_backend),
    ("4c", "validate with no --export", c_validate_no_export),
    ("4d", "validate with the checkpoint as --export", c_validate_self),
    ("4e", "validate --windows 0", c_validate_windows_0),
    ("4f", "eval --seqlen 0", c_eval_seqlen_0),
    ("4g", "validate --out under a file (unwritable report folder)", c_validate_unwritable),
    ("5a", "truncated model.safetensors in --model", c_truncated_model),
    ("5b", "truncated eqat checkpoint to export", c_truncated_checkpoint),
    ("5c", "--out on a read-only file system (tmpfs -o ro)", c_read_only_fs),
    ("5d", "--out on a 200 KiB disk", c_small_disk),
    ("5e", "--device tpu", c_bad_device),
    ("5f", "eval --device gpu", c_eval_gpu),
    ("5g", "--config file that is not UTF-8", c_config_not_utf8),
    ("5h", "export --out EXISTING_FILE --force", c_export_onto_file),
    ("5i", "truncated activation stream in resume/", c_truncated_stream),
    ("5j", "corrupt resume/state.json", c_corrupt_state),
    ("5k", "too few calibration tokens: message names --calib-seqlen", c_calib_flag_name),
    ("5l", "export of a plain Hugging Face folder", c_export_hf_folder),
    ("6a", "rtn on a tiny Mixtral (fused 3-D experts)", c_mixtral),
]


# ---- setup, run, tables -------------------------------------------------------------------------------------

def make_template(folder: Path, env: dict) -> None:
    """tiny/ (Llama, 2 blocks, hidden 64), mixtral/ (4 experts), calib.txt, ck/ (its RTN w4g32 checkpoint)."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoModelForCausalLM, MixtralConfig

    from tests.conftest import save_tiny_inputs

    _, _, fast = save_tiny_inputs(folder)
    cfg = MixtralConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / "mixtral")
    fast.save_pretrained(folder / "mixtral")
    c = Case(env, folder)
    if c.eqat("quantize", "--model", "tiny", *RTN, "--out", "ck"):
        raise SystemExit(f"could not make the template checkpoint: {c.message}")


def run_cases(env: dict, only: set[str] | None) -> list[dict]:
    import shutil

    rows = []
    with tempfile.TemporaryDirectory(prefix="eqat-cases-") as tmp:
        template = Path(tmp) / "template"
        template.mkdir()
        make_template(template, env)
        for cid, what, fn in CASES:
            if only and cid not in only:
                continue
            work = Path(tmp) / cid
            shutil.copytree(template, work, symlinks=True)
            case, t = Case(env, work.resolve()), time.time()
            try:
                held = fn(case)
            except Exception as e:  # the case itself broke (e.g. a file the old code never wrote)
                held, case.err = False, f"Traceback (case): {type(e).__name__}: {e}\n" + case.err
            status = "n/a" if held is None else "held" if held else "broken"
            rows.append({"id": cid, "case": what, "status": status, "exit": case.code, "message": case.message,
                         "seconds": round(time.time() - t, 1)})
            print(f"{cid:4} {status:7} exit {case.code}  {what}: {case.message[:120]}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose eqat runs (PYTHONPATH)")
    ap.add_argument("--only", default=None, help="comma-separated case ids")
    ap.add_argument("--name", default="reliability_cases")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    tree = args.tree.resolve()
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    rows = run_cases(env, set(args.only.split(",")) if args.only else None)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("held", "broken", "n/a")}
    result = {"tree": str(tree), "commit": commit, "cases": rows, "counts": counts, "seconds": round(time.time() - t0)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Reliability cases at {commit}", "", f"`python benchmarks/reliability_cases.py` ({result['seconds']} s): "
          f"{len(rows)} cases, {counts['held']} held, {counts['broken']} broken, {counts['n/a']} n/a.", "",
          "| id | case | status | exit | message |", "|---|---|---|---|---|"]
    md += [f"| {r['id']} | {r['case']} | {r['status']} | {r['exit']} | {r['message'][:160].replace('|', '/')} |"
           for r in rows]
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"{counts} in {result['seconds']} s; {args.out / args.name}.md")


if __name__ == "__main__":
    main()
