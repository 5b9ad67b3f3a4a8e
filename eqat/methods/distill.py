"""Distillation targets for end-to-end training: the full-precision teacher's next-token distribution.

    kd  = T^2 * sum over predicted positions of KL(p_teacher || p_student), both at temperature T
    mix = kd_weight * kd + (1 - kd_weight) * next-token NLL

The teacher runs beside the student every step ("live": the exact KL over the whole vocabulary,
at the cost of the teacher's weights in memory and one more forward pass per step), or once
before training ("topk": its k largest logits per position, cached in the run's resume folder as
safetensors; the KL is then taken over the teacher's top k, renormalised: the standard sparse
form, exact in the limit k = vocabulary). Only positions that carry next-token loss count (the
labels shifted by one), so instruction data distils on the responses only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from eqat.data.e2e_data import IGNORE, E2EData
from eqat.engine.end2end import logits_of, nll_sum  # noqa: F401  (nll_sum: re-exported)
from eqat.errors import EqatInputError

LOSSES = ("nll", "kd", "mix")
TEACHER_LOGITS = ("live", "topk")
CACHE = "teacher_topk.safetensors"


def load_teacher(path: str, student: nn.Module) -> nn.Module:
    """The full-precision teacher (float32, eval mode), checked to share the student's vocabulary."""
    from eqat.models.loading import load_model

    if not path:
        raise EqatInputError("distillation needs a teacher: pass --e2e-teacher with the full-precision model folder "
                             "(E2EQPConfig.teacher in Python).")
    teacher, _ = load_model(path)
    n_t = teacher.get_output_embeddings().weight.shape[0]
    n_s = student.get_output_embeddings().weight.shape[0]
    if n_t != n_s:
        raise EqatInputError(f"the teacher {path} has {n_t} output tokens but the student {n_s}: distillation needs "
                             "the same tokenizer; pass the model the checkpoint was quantized from with --e2e-teacher.")
    return teacher.eval()


@torch.no_grad()
def teacher_topk(teacher: nn.Module, data: E2EData, k: int, batch_size: int, device: torch.device,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits of every position and their token ids: float32 and int32 [n, T-1, k]."""
    teacher.to(device)
    values, ids = [], []
    for s in tqdm(range(0, len(data), batch_size), desc="teacher top-k logits", unit="batch", disable=not progress):
        top = logits_of(teacher, data.rows(slice(s, s + batch_size)), device, False).topk(k, dim=-1)
        values.append(top.values.cpu())
        ids.append(top.indices.to(torch.int32).cpu())
    return torch.cat(values), torch.cat(ids)


def _data_key(teacher_path: str, data: E2EData, k: int) -> str:
    h = hashlib.sha256(data.input_ids.numpy().tobytes())
    h.update(data.attention_mask.numpy().tobytes())
    h.update(f"{Path(teacher_path).resolve()}|{k}".encode())
    return h.hexdigest()


def cached_teacher_topk(folder: Path, teacher_path: str, student: nn.Module, data: E2EData, k: int, batch_size: int,
                        device: torch.device, progress: bool = True) -> E2EData:
    """`data` with the teacher's top-k logits attached, read from `folder/CACHE` when it was written for
    the same teacher, sequences and k (a safetensors file: nothing is unpickled), else computed and
    written (to a temporary name, then renamed)."""
    path, key = folder / CACHE, _data_key(teacher_path, data, k)
    try:
        cached = load_file(str(path)) if path.is_file() else None
    except (OSError, SafetensorError):
        cached = None  # a damaged cache is recomputed, never trusted
    if cached is not None and set(cached) == {"key", "logits", "ids"} and bytes(cached["key"].tolist()).hex() == key:
        return replace(data, teacher_logits=cached["logits"], teacher_ids=cached["ids"])
    teacher = load_teacher(teacher_path, student)
    logits, ids = teacher_topk(teacher, data, k, batch_size, device, progress)
    del teacher
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"key": torch.tensor(list(bytes.fromhex(key)), dtype=torch.uint8), "logits": logits, "ids": ids}, str(tmp))
    os.replace(tmp, path)
    return replace(data, teacher_logits=logits, teacher_ids=ids)


def kd_sum(student_logits: torch.Tensor, batch: E2EData, temperature: float,
           teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * summed KL(teacher || student) over the predicted positions (float32 scalar).

    student_logits: [B, T-1, V]. The teacher is `teacher_logits` [B, T-1, V] (live) or the top-k
    attached to `batch` (teacher_logits/teacher_ids [B, T-1, k]: KL over those k tokens, renormalised)."""
    mask = batch.labels[:, 1:].to(student_logits.device) != IGNORE
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    if teacher_logits is None:
        log_q = log_q.gather(-1, batch.teacher_ids.to(log_q.device).long())
        teacher_logits = batch.teacher_logits.to(log_q.device)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl[mask].sum() * temperature**2

