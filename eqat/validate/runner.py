"""`validate(model_dir, exports, backends, ...)`: the eqat checkpoint is the reference; every
(folder, backend) pair that can run here is loaded and scored on the same token windows and
prompts against eqat's own forward in the same dtype; the rest are reported as skipped, with
the reason. The run passes only when at least one export folder was compared by a runtime
(pass, fail or error rows; the checkpoint on eqat's own kernels is no export) and none failed.
Returns the report (rows, `compared`, verdict and its `reason`); eqat/validate/report.py writes it out.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from eqat.errors import EqatInputError
from eqat.validate.backends import BACKENDS, Loaded, folder_kind, kernel_env, vllm_why_not
from eqat.validate.metrics import Thresholds, agreement, greedy_agreement, perplexity_of, run_windows

PROMPTS = ("The capital of France is", "In 1905, Albert Einstein published",
           "The three primary colours are", "def fibonacci(n):")


def greedy(logits_fn, prompts: list[torch.Tensor], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of all prompts at once (left-padded batch, full re-computation, no
    cache): one forward per new token, the same procedure for every backend."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.stack([torch.nn.functional.pad(p[0], (width - p.shape[1], 0)) for p in prompts])
    mask = torch.stack([torch.nn.functional.pad(torch.ones_like(p[0]), (width - p.shape[1], 0)) for p in prompts])
    for _ in range(new_tokens):
        with torch.no_grad():
            nxt = logits_fn(ids, mask)[:, -1].float().argmax(-1, keepdim=True).cpu()
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, width:].tolist()


class Reference:
    """eqat's own forward on the windows and prompts, computed once per dtype."""

    def __init__(self, model_dir: Path, windows: list[torch.Tensor], prompts: list[torch.Tensor], new_tokens: int,
                 activations_quantized: bool = False):
        self.model_dir, self.windows, self.prompts, self.new_tokens = model_dir, windows, prompts, new_tokens
        # a weight-activation model turns rounding noise into other activation codes: measure how far eqat
        # in float32 is from itself in float64, the floor no float32 runtime can be held below
        self.activations_quantized = activations_quantized
        self.cache: dict[torch.dtype, dict[str, Any]] = {}

    def _logits(self, dtype: torch.dtype) -> list[torch.Tensor]:
        from eqat.io.checkpoint import load_quantized

        model = load_quantized(self.model_dir)[0].to(dtype)
        with kernel_env("torch"):
            return run_windows(lambda ids, mask=None: model(input_ids=ids, attention_mask=mask).logits, self.windows)[0]

    def _noise_floor(self, logits: list[torch.Tensor], exact: list[torch.Tensor]) -> dict[str, float]:
        ag = agreement(logits, exact)
        ppl, exact_ppl = perplexity_of(logits, self.windows), perplexity_of(exact, self.windows)
        return {"self_top1": ag["top1_agree"], "self_kl": ag["mean_kl"], "self_ppl_delta_pct": 100 * (ppl / exact_ppl - 1)}

    def get(self, dtype: torch.dtype) -> dict[str, Any]:
        if dtype not in self.cache:
            from eqat.io.checkpoint import load_quantized

            model = load_quantized(self.model_dir)[0].to(dtype)

            def fn(ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
                with kernel_env("torch"):
                    return model(input_ids=ids, attention_mask=mask).logits
            logits, seconds = run_windows(fn, self.windows)
            self.cache[dtype] = {"logits": logits, "seconds": seconds, "ppl": perplexity_of(logits, self.windows),
                                 "greedy": greedy(fn, self.prompts, self.new_tokens)}
            if dtype != torch.float32:  # how far eqat in this dtype is from itself in float32: the noise floor
                floor = self._noise_floor(logits, self.get(torch.float32)["logits"])
                self.cache[dtype].update(floor if self.activations_quantized else {"self_top1": floor["self_top1"]})
            elif self.activations_quantized:
                self.cache[dtype].update(self._noise_floor(logits, self._logits(torch.float64)))
        return self.cache[dtype]


def _score(loaded: Loaded, ref: Reference, load_s: float) -> dict[str, Any]:
    with torch.no_grad():  # warm-up (runtimes that compile on first call), outside the timing
        loaded.logits(ref.windows[0][:, :16])
    logits, seconds = run_windows(loaded.logits, ref.windows)
    base = ref.get(loaded.dtype)
    tokens = sum(w.numel() for w in ref.windows)
    row = {"ppl": perplexity_of(logits, ref.windows), "load_s": round(load_s, 2), "tokens_per_s": tokens / seconds,
           **agreement(logits, base["logits"]),
           **greedy_agreement(greedy(loaded.logits, ref.prompts, ref.new_tokens), base["greedy"])}
    row["ppl_delta_pct"] = 100 * (row["ppl"] / base["ppl"] - 1)
    row["reference_ppl"] = base["ppl"]
    row.update({f"reference_{k}": v for k, v in base.items() if k.startswith("self_")})
    return row


WRAPPERS = ("EngineDeadError", "Engine core initialization failed", "Worker failed with error", "See root cause",
            "See stack trace", "EngineCore failed")


def vllm_root_cause(stderr: str) -> str:
    """The first exception line of vLLM's log that is not one of its wrappers, without the log
    prefix, plus the per-kernel reasons when no kernel could serve a layer."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"\b([A-Z]\w*(?:Error|Exception)): (.*)", line)
        if m and not any(w in line for w in WRAPPERS):
            why = f"{m.group(1)}: {m.group(2).strip()}"
            reasons = [re.sub(r"^.*?\] ", "", ln).strip() for ln in lines[i + 1:i + 8] if "cannot implement due to" in ln]
            return " ".join([why] + reasons)[:600]
    return (lines[-1] if lines else "vLLM exited without a message")[:600]


def _vllm_kernel(log: str) -> str:
    """The linear kernel vLLM chose, from its log ("Using CPUWNA16LinearKernel for ..."), or ''."""
    m = re.search(r"Using (\w+Kernel) for", log)
    return m.group(1) if m else ""


def run_vllm(folder: Path, ref: Reference, python: str | None, timeout: int) -> dict[str, Any]:
    """vLLM in a subprocess, compared with eqat's forward in vLLM's dtype: perplexity from the
    log-probabilities of the actual tokens, top-1 agreement from vLLM's top-ranked token at each
    position, the actual tokens' log-probability difference (vLLM returns no full logits, so no KL),
    and greedy tokens."""
    dtype = torch.float16 if torch.cuda.is_available() else torch.bfloat16  # vLLM's CPU default is bf16
    spec = {"model": str(folder), "dtype": str(dtype).removeprefix("torch."),
            "windows": [w[0].tolist() for w in ref.windows], "prompts": [p[0].tolist() for p in ref.prompts],
            "max_new_tokens": ref.new_tokens, "max_model_len": max(w.shape[1] for w in ref.windows) + 8}
    worker = Path(__file__).with_name("vllm_worker.py")
    with tempfile.TemporaryDirectory(prefix="eqat-vllm-") as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run([python or sys.executable, str(worker), str(result)], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"})  # INFO names the kernel
        if proc.returncode or not result.exists():
            raise RuntimeError(vllm_root_cause(proc.stderr + "\n" + proc.stdout))  # its workers log to either
        res = json.loads(result.read_text())
    base = ref.get(dtype)
    ours_lp, ours_top1 = [], []
    for logits, w in zip(base["logits"], ref.windows):  # position t-1 predicts token t
        lsm = logits[0, :-1].log_softmax(-1)
        ours_lp.append(lsm.gather(-1, w[0, 1:, None])[:, 0])
        ours_top1.append(lsm.argmax(-1))
    theirs_lp = torch.tensor([x for xs in res["logprob"] for x in xs], dtype=torch.float64)
    diff = (theirs_lp - torch.cat(ours_lp).double()).abs()
    top1 = (torch.tensor([x for xs in res["top1"] for x in xs]) == torch.cat(ours_top1)).double().mean().item()
    ppl = math.exp(-theirs_lp.mean().item())
    return {"ppl": ppl, "ppl_delta_pct": 100 * (ppl / base["ppl"] - 1), "reference_ppl": base["ppl"],
            "load_s": round(res["load_s"], 2), "tokens_per_s": sum(w.numel() for w in ref.windows) / res["forward_s"],
            "max_abs_logit": None, "mean_abs_logit": None, "mean_kl": None, "top1_agree": top1,
            "max_abs_logprob": diff.max().item(), "mean_abs_logprob": diff.mean().item(),
            "dtype": spec["dtype"], "quantization": res.get("quantization", ""), "kernel": _vllm_kernel(proc.stdout + proc.stderr),
            **{f"reference_{k}": v for k, v in base.items() if k.startswith("self_")},
            **greedy_agreement(res["greedy"], base["greedy"])}


COMPARED = ("pass", "fail", "error")  # statuses of a runtime that ran; `reference` and `skipped` compare nothing
Folder = tuple[Path, str, dict]  # (path, kind, quantization_config)


def _folders(model_dir: str | Path, exports: list[str | Path], backends: list[str] | None) -> list[Folder]:
    """The checkpoint then each export, with its kind; bad input refused (EqatInputError)."""
    from eqat.models.loading import check_model_dir

    model_dir = check_model_dir(model_dir)
    if folder_kind(model_dir)[0] != "eqat":
        raise EqatInputError(f"{model_dir} is not an eqat checkpoint (no eqat_config.json); validate takes the checkpoint "
                             "you exported from, then --export for each export folder.")
    unknown = set(backends or ()) - set(BACKENDS)
    if unknown:
        raise EqatInputError(f"unknown backend(s) {sorted(unknown)}; available: {', '.join(BACKENDS)}.")
    folders = [(model_dir, "eqat", folder_kind(model_dir)[1])]
    for e in exports:
        path = check_model_dir(e)
        if path.resolve() == model_dir.resolve():
            raise EqatInputError(f"--export {e} is the checkpoint itself, the reference: comparing it with itself checks "
                                 f"no export. Export it first (eqat export {model_dir} --format gptq --out DIR), then "
                                 "pass --export DIR.")
        folders.append((path, *folder_kind(path)))
    return folders


def _why_not(backend_name: str, kind: str, qc: dict, vllm_python: str | None, path: Path | None = None) -> str | None:
    if backend_name == "vllm":
        return vllm_why_not(kind, qc, vllm_python, path)
    return BACKENDS[backend_name].why_not(kind, qc)


def _run_one(folder: Folder, backend_name: str, ref: Reference, thresholds: Thresholds, vllm_python: str | None,
             vllm_timeout: int) -> dict[str, Any]:
    """One (folder, backend) row: skipped (with the reason), error (with the message), pass or fail."""
    path, kind, qc = folder
    row: dict[str, Any] = {"folder": str(path), "name": path.name, "kind": kind, "backend": backend_name}
    reason = _why_not(backend_name, kind, qc, vllm_python, path)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    backend, t = BACKENDS[backend_name], time.perf_counter()
    try:
        if backend.load is None:
            row.update(run_vllm(path, ref, vllm_python, vllm_timeout))
        else:
            loaded = backend.load(path, kind, qc)
            row.update(_score(loaded, ref, time.perf_counter() - t), dtype=str(loaded.dtype).removeprefix("torch."),
                       kernel=loaded.kernel)
            del loaded
    except Exception as exc:  # a runtime that fails is a failed check, with its message
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:400]}"}
    failures = thresholds.failures(row)
    return {**row, "status": "fail" if failures else "pass", "failures": failures}


def _nothing_compared(exports: list[Folder], rows: list[dict], backends: list[str] | None,
                      vllm_python: str | None) -> str:
    """Why no export was compared, and what to pass instead."""
    if not exports:
        return ("nothing was compared: no --export folder was given, and the checkpoint on eqat's own kernels checks "
                "no export; pass --export DIR for each folder `eqat export` wrote.")
    parts = []
    for path, kind, qc in exports:
        readers = [b.name for b in BACKENDS.values() if kind in b.kinds]
        runnable = [b for b in readers if _why_not(b, kind, qc, vllm_python, path) is None]
        skipped = [f"{r['backend']} skipped ({r['reason']})" for r in rows if r["folder"] == str(path)]
        tried = "; ".join(skipped) or f"no backend in --backends {','.join(backends or ())} reads {kind}"
        fix = (f"pass --backends {','.join(runnable)} (or leave --backends out)" if runnable else
               "none of them can run it here: the skip reasons say what to install or which device it needs")
        parts.append(f"{path.name} ({kind}): {tried}. Backends that read {kind}: {', '.join(readers)}; {fix}.")
    return "nothing was compared: no export folder was loaded by any runtime. " + " ".join(parts)


def _verdict(rows: list[dict], model_dir: Path, exports: list[Folder], backends: list[str] | None,
             vllm_python: str | None) -> tuple[bool, int, str]:
    """(passed, export comparisons made, the reason): a run passes only when at least one export
    was compared by a runtime and no row failed or raised."""
    compared = sum(r["status"] in COMPARED and r["folder"] != str(model_dir) for r in rows)
    bad = [r for r in rows if r["status"] in ("fail", "error")]
    if bad:
        why = "; ".join(f"{r['name']} on {r['backend']}: {r.get('reason') or ', '.join(r['failures'])}" for r in bad)
        return False, compared, f"{len(bad)} of {sum(r['status'] in COMPARED for r in rows)} comparisons failed: {why}"
    if not compared:
        return False, 0, _nothing_compared(exports, rows, backends, vllm_python)
    return True, compared, f"{compared} export comparison(s), all within the thresholds"


def validate(model_dir: str | Path, exports: list[str | Path] = (), backends: list[str] | None = None,
             windows: int = 2, seqlen: int = 512, new_tokens: int = 16, thresholds: Thresholds = Thresholds(),
             vllm_python: str | None = None, vllm_timeout: int = 900, progress: bool = True) -> dict[str, Any]:
    """Score every export (and the checkpoint itself on other kernels) against the checkpoint.
    It passes when at least one export was compared by a runtime and nothing failed."""
    from eqat.core.layer_schemes import bits_summary
    from eqat.io.checkpoint import load_quantized, modules_of_model, quantized_modules
    from eqat.data.sources import eval_token_ids
    from eqat.data.evaluate import check_windows

    check_windows(seqlen, windows, "--windows")
    if new_tokens < 1:
        raise EqatInputError(f"--new-tokens {new_tokens}: greedy agreement needs at least 1 generated token; "
                             "pass --new-tokens 1 or more.")
    folders = _folders(model_dir, exports, backends)
    model_dir = folders[0][0]
    qmodel, tok, meta = load_quantized(model_dir)
    bits = bits_summary(modules_of_model(quantized_modules(qmodel)))
    activations_quantized = any(m.scheme.act is not None for m in quantized_modules(qmodel).values())
    del qmodel
    ids = eval_token_ids(tok, "wikitext2")
    if ids.numel() < windows * seqlen:
        raise EqatInputError(f"the evaluation text has {ids.numel()} tokens, fewer than {windows} x {seqlen}; "
                             "lower --windows or --seqlen.")
    ref = Reference(model_dir, [ids[None, i * seqlen:(i + 1) * seqlen] for i in range(windows)],
                    [tok(p, return_tensors="pt").input_ids for p in PROMPTS], new_tokens, activations_quantized)

    plan = [(folder, b.name) for folder in folders for b in BACKENDS.values()
            if folder[1] in b.kinds and (backends is None or b.name in backends)]
    # GPTQModel runs last: loading an MoE model, its Defuser replaces transformers' MoE block classes for the
    # whole process, after which transformers would misload the other folders' experts. Rows keep plan order.
    order = sorted(range(len(plan)), key=lambda i: plan[i][1] == "gptqmodel")
    rows: list[dict[str, Any]] = [{}] * len(plan)
    for i in tqdm(order, desc="validate", unit="backend", disable=not progress):
        folder, name = plan[i]
        if folder[0] == model_dir and name == "eqat-torch":
            base = ref.get(torch.float32)
            rows[i] = {"folder": str(model_dir), "name": model_dir.name, "kind": "eqat", "backend": name,
                       "status": "reference", "dtype": "float32", "ppl": base["ppl"], "ppl_delta_pct": 0.0,
                       "tokens_per_s": sum(w.numel() for w in ref.windows) / base["seconds"]}
        else:
            rows[i] = _run_one(folder, name, ref, thresholds, vllm_python, vllm_timeout)
    ok, compared, reason = _verdict(rows, model_dir, folders[1:], backends, vllm_python)
    return {"model": str(model_dir), "scheme": meta["scheme"], "bits": bits, "windows": windows, "seqlen": seqlen,
            "new_tokens": new_tokens, "prompts": list(PROMPTS), "thresholds": vars(thresholds), "rows": rows,
            "compared": compared, "passed": ok, "reason": reason}
