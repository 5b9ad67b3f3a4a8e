"""What the two engines do, whatever method they run. A method's config subclasses one of these
and adds its own fields (learning rates, loss); the engine reads only the fields below."""

from __future__ import annotations

import math
from dataclasses import dataclass

from eqat.core.options import option
from eqat.engine.selection import SELECT_BY
from eqat.engine.streams import OFFLOADS
from eqat.errors import EqatInputError

SCHEDULES = ("cosine", "constant", "linear")
ACT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class BlockwiseConfig:
    """The block-wise engine: AdamW over each block's parameter groups, cosine to lr * min_lr_ratio."""

    epochs: int = option(2, "Epochs over the calibration windows per block.")
    batch_size: int = option(2, "Windows per step.")
    weight_decay: float = option(0.0, cli=False)
    min_lr_ratio: float = option(1 / 20, cli=False)
    val_samples: int = option(8, "Further windows held out to measure each block's loss.")
    act_dtype: str = option("bfloat16", "dtype of stored activations: bfloat16, float16, float32.")
    keep_best: bool = option(True, "Keep each block's best packed state on the held-out windows (the start, i.e. RTN, "
                                   "or the end of an epoch) instead of the last one.", flags=("--keep-best/--keep-last",))
    lr_backoff: bool = option(True, "With --keep-best: a block whose training ends no better than its start is trained "
                                    "again at a tenth of the learning rates (twice per run at most; later blocks keep "
                                    "the lowered rates; docs/block-ap.md).", flags=("--lr-backoff/--no-lr-backoff",))
    keep_best_by: str = option("loss", "What --keep-best compares: loss (the method's block loss on the held-out "
                                       "windows) or nll (their next-token loss through the rest of the model in full "
                                       "precision; slower, for when one entry owns the block loss, as at 2 bits).")
    offload: str = option("cpu", "Where block activations live: cpu (memory) or disk (memory-mapped files).", result=False)
    storage_dtype: str = option("float16", cli=False)  # of scales and zero-points: the pipeline sets it from --dtype
    seed: int = option(0, cli=False)  # the pipeline sets it from --seed

    def check(self) -> None:
        if self.offload not in OFFLOADS:
            raise EqatInputError(f"--offload must be one of {', '.join(OFFLOADS)}, got '{self.offload}'.")
        if self.keep_best_by not in SELECT_BY:
            raise EqatInputError(f"--keep-best-by must be one of {', '.join(SELECT_BY)}, got '{self.keep_best_by}'.")
        if self.act_dtype not in ACT_DTYPES:
            raise EqatInputError(f"--act-dtype must be bfloat16, float16 or float32, got '{self.act_dtype}'.")
        if self.epochs < 0 or self.batch_size < 1 or self.val_samples < 0:
            raise EqatInputError("need --epochs >= 0, --batch-size >= 1 and --val-samples >= 0.")
        if not (self.weight_decay >= 0 and 0 <= self.min_lr_ratio <= 1):
            raise EqatInputError("need weight_decay >= 0 and 0 <= min_lr_ratio <= 1.")


@dataclass
class EndToEndConfig:
    """The end-to-end engine: data, batches, schedule, clipping, state. Paper defaults for E2E-QP
    (AdamW, no weight decay, cosine with 3% warm-up, grad norm 0.3, 1 epoch); sizes for a CPU."""

    data: str = option("c4", "Training text: c4, a .txt/.jsonl path; a .jsonl with prompt/response fields trains on the "
                             "responses only.")
    nsamples: int = option(64, "Training sequences.")
    val_samples: int = option(8, "Held-out sequences of the same text, scored before and after training.")
    seqlen: int = option(256, "Sequence length in tokens.")
    epochs: int = option(1, "Epochs over the training sequences.")
    max_steps: int | None = option(None, "Optimizer steps (overrides the epochs).", param="e2e_steps")
    batch_size: int = option(2, "Sequences per forward pass.")
    grad_accum: int = option(2, "Forward passes per optimizer step.")
    schedule: str = option("cosine", "Learning-rate schedule after warm-up: cosine, constant or linear (to zero).")
    warmup_ratio: float = option(0.03, "Warm-up as a fraction of the steps.", param="e2e_warmup")
    weight_decay: float = option(0.0, cli=False)
    max_grad_norm: float = option(0.3, "Gradient-norm clip (0 = none).")
    grad_checkpointing: bool = option(False, "Recompute each block in the backward (less memory, ~1.3x time).",
                                      param="grad_checkpointing")
    prompt_format: str = option("plain", "Instruction data: plain (prompt + response) or chat (the tokenizer's chat "
                                         "template).", param="prompt_format")
    save_every: int = option(10, "Write the resumable state every this many steps.", result=False)
    seed: int = option(0, cli=False)  # the pipeline sets it from --seed

    def check(self) -> None:
        if self.nsamples < 1 or self.val_samples < 0 or self.seqlen < 2:
            raise EqatInputError("E2E-QP needs --e2e-nsamples >= 1, --e2e-val-samples >= 0 and --e2e-seqlen >= 2.")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 0 or (self.max_steps is not None and self.max_steps < 0):
            raise EqatInputError("E2E-QP needs --e2e-batch-size >= 1, --e2e-grad-accum >= 1, --e2e-epochs >= 0, --e2e-steps >= 0.")
        if self.nsamples < self.batch_size * self.grad_accum:
            raise EqatInputError(
                f"one E2E-QP step takes --e2e-batch-size x --e2e-grad-accum = {self.batch_size * self.grad_accum} "
                f"sequences but --e2e-nsamples is {self.nsamples}; raise --e2e-nsamples or lower those."
            )
        if self.schedule not in SCHEDULES:
            raise EqatInputError(f"--e2e-schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'.")
        if not self.weight_decay >= 0:
            raise EqatInputError(f"E2E-QP weight_decay must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.warmup_ratio < 1 or not self.max_grad_norm >= 0 or self.save_every < 1:
            raise EqatInputError("need 0 <= --e2e-warmup < 1, --e2e-max-grad-norm >= 0 and save_every >= 1.")

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps over `n_train` sequences (an incomplete last step of an epoch is dropped)."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * max(n_train // (self.batch_size * self.grad_accum), 1)


def check_lr(flag: str, lr: float | None, doc: str) -> None:
    """Refuse a learning rate that is not a positive finite number (None means the method's default)."""
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise EqatInputError(f"{flag} must be a positive learning rate, got {lr}; the defaults are in {doc}.")
