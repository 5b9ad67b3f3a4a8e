"""The block-wise engine: train a quantization method one decoder block at a time.

For each decoder block i, in order:
  1. targets  Y_fp = fp_block_i(X_fp)      (X_fp: the full-precision model's stream)
  2. the method may change the block from what its inputs look like (`calibrate_block`: SmoothQuant's
     migration, QLLM's channel reassembly), then wraps it (`prepare_block`); its parameter groups
     (none for an untrained method) train with AdamW
     (cosine to lr * min_lr_ratio) to minimise the method's `block_loss(block_i^q(X_q), Y_fp)`
  3. the method freezes the block to packed QuantLinears, then X_q <- block_i^q(X_q), X_fp <- Y_fp.

Two streams, as in EfficientQAT: the targets come from the full-precision model (errors do not
compound into the targets), the inputs from the already-quantized blocks (each block learns to
correct what its predecessors left). Both are `act_dtype` tensors in memory or memory-mapped files
(`offload="disk"`); one block is on the compute device at a time. After each block the packed
block, both streams and `state.json` are written to `state_dir`, so a killed run resumes at the
first unfinished block and ends with the same model as an uninterrupted one. Resume state is JSON,
safetensors and raw activation files only (block 0's keyword arguments through eqat.engine.state):
nothing is unpickled.

A step with a non-finite loss or gradient is skipped (eqat.engine.guard); after repeated ones the
block restarts from its state before training (in float32 after a bf16 overflow, then at half the
learning rates). A block whose training ends no better than its start on the held-out windows
(with --keep-best) is trained again from that start at a tenth of the learning rates, at most twice
per run, and later blocks keep the lowered rates (--lr-backoff; Gemma 3's blocks need rates ~100x
below SmolLM2's, docs/block-ap.md). A block whose packed output or stored tensors are not finite stops the run
(EqatError, exit 1) before it is saved. The engine never looks at which method it runs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from eqat.core.dtypes import parse_dtype
from eqat.core.qlinear import QuantLinear
from eqat.core.reassembly import identity_reassembly
from eqat.core.layer_schemes import LayerSchemes, SchemeLike, as_layer_schemes
from eqat.engine.config import BlockwiseConfig
from eqat.engine.guard import NonFiniteGuard, NonFiniteRun
from eqat.engine.health import nonfinite_tensors, scales_at_limits
from eqat.engine.selection import Best, HeldoutNLL, run_block
from eqat.engine.state import check_fingerprint, damaged, load_state, save_state, storable
from eqat.engine.streams import ActivationStream
from eqat.errors import EqatError, EqatInputError
from eqat.models.families import FamilySpec
from eqat.models.experts import routing_counts, set_counting
from eqat.models.arch import arch_for, block_linears, check_scheme, decoder_blocks, get_submodule, replace_module

if TYPE_CHECKING:
    from eqat.methods.base import BlockwiseMethod, ParamGroup

STATE = "state.json"
KWARGS = "block_kwargs"  # block_kwargs.json + .safetensors: the blocks' keyword arguments, by attention type
MAX_RESTARTS = 2  # restarts of a block after repeated non-finite steps, each at half the learning rates
BACKOFF, MAX_BACKOFF_LEVEL = 0.1, 2  # --lr-backoff: each cut multiplies the rates by BACKOFF, at most this often per run


@dataclass
class BlockRecord:
    """What happened to one block (losses are MSE on the held-out windows)."""

    block: int
    init_loss: float  # RTN initialisation, before training
    final_loss: float  # after training, rounding and packing
    train_loss_first: float
    train_loss_last: float
    steps: int
    seconds: float
    precision: str
    train_losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (eqat/engine/guard.py)
    restarts: int = 0  # restarts from the block's state before training, each at half the learning rates
    lr_scale: float = 1.0  # the learning rates' multiplier the kept training ran at (restarts, backoffs)
    scales_at_limit: int = 0  # stored scales at SCALE_MIN or SCALE_MAX (eqat.core.quantizer)
    scales_total: int = 0
    kept_epoch: int = -1  # which packed state was kept: 0 = the start (RTN), k = after epoch k
    fake_quant_loss: float | None = None  # held-out loss of the trained block before packing
    heldout_losses: list[float] = field(default_factory=list)  # packed, at the start and after each epoch
    selected_by: str = "loss"  # what chose kept_epoch: the held-out block loss, or "nll" (eqat.engine.selection)
    heldout_nll: list[float] = field(default_factory=list)  # with "nll": each candidate's next-token loss
    calibration: dict[str, Any] = field(default_factory=dict)  # what the method's calibrate_block did
    # MoE blocks: tokens routed to each expert over the calibration windows (full-precision inputs), by
    # experts module; an expert no token reaches gets no gradient and keeps its round-to-nearest start
    routing: dict[str, Any] = field(default_factory=dict)
    backoffs: int = 0  # --lr-backoff: times this block was trained again at a tenth of the rates
    backoff_level: int = 0  # backoffs so far in the run (this block's and earlier blocks'), carried to the next block


@dataclass
class BlockData:
    """What a method's `calibrate_block` sees of block i: `run(block, rows)` runs a block over those
    windows of the quantized-input stream (no grad; hooks on its modules see the activations),
    `loss(block, rows)` is the method's block loss of a block on them against the fp targets."""

    train: range  # the training windows (the held-out ones are for the engine's selection)
    run: Callable[[nn.Module, range], None]
    loss: Callable[[nn.Module, range], float]
    family: FamilySpec  # the model's family: its sites and norm convention (eqat.models.families)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _saved(i: int) -> str:
    return "no block is saved yet" if i == 0 else f"blocks 0-{i - 1} are saved"


class _Stop(Exception):
    pass


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


class BlockwiseEngine:
    """`method` over `model` (a decoder-only LM on CPU) with `scheme`; state in `state_dir`.

    `config` is the method's config (a BlockwiseConfig). `fingerprint` identifies the run (model,
    scheme, data, options; eqat.engine.state.run_fingerprint): resuming with a different one is
    refused. `run(calib)` trains and leaves the model with packed QuantLinears.
    """

    def __init__(
        self,
        model: nn.Module,
        method: "BlockwiseMethod",
        config: BlockwiseConfig,
        scheme: SchemeLike,
        state_dir: str | Path,
        device: str | torch.device = "cpu",
        fingerprint: dict[str, Any] | None = None,
        progress: bool = True,
        on_block: Callable[[BlockRecord], None] | None = None,
    ) -> None:
        config.check()
        self.schemes = as_layer_schemes(scheme)
        check_scheme(model, self.schemes)
        self.model, self.method, self.config = model, method, config
        self.scheme = self.schemes.default
        self.family = arch_for(model)
        self.blocks_prefix = self.family.blocks
        self.state_dir = Path(state_dir)
        self.device = torch.device(device)
        self.fingerprint = fingerprint or {}
        self.progress, self.on_block = progress, on_block
        self.blocks = decoder_blocks(model)
        types = list(getattr(model.config.get_text_config(), "layer_types", None) or [])
        # the attention type of each block (Gemma 2/3: sliding or full); its mask and rotary differ
        self.layer_types = types if len(types) == len(self.blocks) else ["all"] * len(self.blocks)
        self.act_dtype = parse_dtype(config.act_dtype)
        self.storage_dtype = parse_dtype(config.storage_dtype)
        self.records: list[BlockRecord] = []
        self._calib: torch.Tensor | None = None  # token ids of the run, for --keep-best-by nll
        self._scorer: HeldoutNLL | None = None
        if config.keep_best and config.keep_best_by == "nll":
            self._final_norm_and_head()  # refuse before any work, not after block 0 trained

    # ---- inputs of block 0 -------------------------------------------------------------
    @torch.no_grad()
    def _capture(self, calib: torch.Tensor, stream: ActivationStream | None) -> dict[str, dict[str, Any]]:
        """Fill `stream` with the inputs of block 0 (None: run one window only); return the keyword
        arguments of the first block of each attention type, by type."""
        spec = self.family
        front = [get_submodule(self.model, p) for p in (spec.embed, spec.rotary)]
        front = [m for m in front if m is not None]
        for m in front:
            m.to(self.device)
        kwargs: dict[str, dict[str, Any]] = {}

        def hook(_mod, args, kw):
            x = args[0] if args else kw["hidden_states"]
            hook.x = x
            kwargs.setdefault(self.layer_types[0], {k: v for k, v in kw.items() if k != "hidden_states"})
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for i in range(calib.shape[0] if stream is not None else 1):
                try:
                    self.model(calib[i : i + 1].to(self.device), use_cache=False)
                except _Stop:
                    if stream is not None:
                        stream[i] = hook.x[0].cpu()
            handle.remove()
            self._capture_other_types(calib[:1].to(self.device), kwargs)
        finally:
            handle.remove()
            for m in front:
                m.to("cpu")
        # no cache: recent transformers name it `cache` and warn when `past_key_values` is passed as well
        return {t: {**{k: v.cpu() if isinstance(v, torch.Tensor) else _to(v, torch.device("cpu")) for k, v in kw.items()},
                    ("cache" if "cache" in kw else "past_key_values"): None, "use_cache": False}
                for t, kw in kwargs.items()}

    def _capture_other_types(self, ids: torch.Tensor, kwargs: dict[str, dict[str, Any]]) -> None:
        """The keyword arguments of the first block of each type not in `kwargs`: one forward of `ids`
        with the blocks up to the last of those swapped for recorders that pass their input on."""
        first = {t: self.layer_types.index(t) for t in dict.fromkeys(self.layer_types) if t not in kwargs}
        if not first:
            return
        last, originals = max(first.values()), list(self.blocks)
        wanted = {i: t for t, i in first.items()}

        class Recorder(nn.Module):
            def __init__(self, i: int) -> None:
                super().__init__()
                self.i = i

            def forward(self, hidden_states, **kw):
                if self.i in wanted:
                    kwargs[wanted[self.i]] = kw
                if self.i == last:
                    raise _Stop
                return hidden_states

        for i in range(last + 1):
            self.blocks[i] = Recorder(i)
        try:
            self.model(ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for i in range(last + 1):
                self.blocks[i] = originals[i]

    # ---- resume state --------------------------------------------------------------------
    def _paths(self, i: int) -> tuple[Path, Path]:
        return self.state_dir / f"x_fp.{i:03d}.bin", self.state_dir / f"x_q.{i:03d}.bin"

    def _read_state(self) -> dict[str, Any] | None:
        path = self.state_dir / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise damaged(path, f"{type(e).__name__}: {str(e)[:120]}") from e
        if not isinstance(state, dict):
            raise damaged(path, "not a mapping")
        check_fingerprint(state.get("fingerprint"), self.fingerprint, self.state_dir, "an unfinished run")
        if not isinstance(state.get("next_block"), int) or not isinstance(state.get("records"), list):
            raise damaged(path, "no next_block or records")
        return state

    def _save_kwargs(self, kw: dict[str, dict[str, Any]]) -> None:
        """The blocks' keyword arguments by type; those a resume state cannot hold are rebuilt on resume."""
        keep = {t: {k: v for k, v in a.items() if storable(v)} for t, a in kw.items()}
        rebuild = {t: sorted(set(a) - set(keep[t])) for t, a in kw.items()}
        save_state(self.state_dir, KWARGS, self.fingerprint, {"kwargs": keep, "rebuild": rebuild})

    def _load_kwargs(self, calib: torch.Tensor) -> dict[str, Any]:
        saved = load_state(self.state_dir, KWARGS, self.fingerprint, "an unfinished run")
        if saved is None:
            raise damaged(self.state_dir / f"{KWARGS}.json", "the file is missing")
        kw, rebuild = saved["kwargs"], saved["rebuild"]
        if isinstance(rebuild, list):  # written before kwargs were kept per attention type
            kw, rebuild = {self.layer_types[0]: kw}, {self.layer_types[0]: rebuild}
        if set(kw) != set(self.layer_types):
            raise damaged(self.state_dir / f"{KWARGS}.json", f"it holds block arguments for {sorted(kw)}, and the "
                          f"model's attention types are {sorted(set(self.layer_types))}")
        if any(rebuild.values()):
            fresh = self._capture(calib, None)
            for t, names in rebuild.items():
                kw[t].update({k: fresh[t][k] for k in names})
        return kw

    def _write_state(self, next_block: int, shape: tuple[int, int, int]) -> None:
        state = {
            "fingerprint": self.fingerprint, "next_block": next_block, "num_blocks": len(self.blocks),
            "shape": list(shape), "records": [asdict(r) for r in self.records],
        }
        tmp = self.state_dir / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, default=str))
        os.replace(tmp, self.state_dir / STATE)

    def _open_stream(self, path: Path, shape: tuple[int, int, int]) -> ActivationStream:
        try:
            return ActivationStream.open(path, shape, self.act_dtype, self.config.offload)
        except FileNotFoundError as e:
            raise damaged(path, str(e)) from e

    def _save_block(self, i: int) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.blocks[i].state_dict().items()}
        tmp = self.state_dir / f"block_{i:03d}.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.state_dir / f"block_{i:03d}.safetensors")

    def _load_block(self, i: int) -> None:
        block = self.blocks[i]
        schemes = self._block_schemes(i)
        for name, lin in list(block_linears(block).items()):
            q = QuantLinear(lin.in_features, lin.out_features, schemes(name), bias=lin.bias is not None,
                            dtype=self.storage_dtype)
            replace_module(block, name, q)
        path = self.state_dir / f"block_{i:03d}.safetensors"
        try:
            tensors = load_file(str(path))
            for name, m in block_linears(block).items():
                if f"{name}.reassembly_index" in tensors:  # placeholders the saved tensors overwrite
                    m.set_reassembly(*identity_reassembly(m.in_features))
            block.load_state_dict(tensors, strict=True)
        except (OSError, SafetensorError, RuntimeError) as e:
            raise damaged(path, f"{type(e).__name__}: {str(e)[:120]}") from e

    # ---- one block ----------------------------------------------------------------------
    def _block_schemes(self, i: int) -> LayerSchemes:
        """The schemes of block `i`'s Linears, by their names inside the block."""
        return self.schemes.within(f"{self.blocks_prefix}.{i}")

    def _loss(self, block: nn.Module, xs: ActivationStream, ys: ActivationStream, idx: range, kw) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for s in range(idx.start, idx.stop, self.config.batch_size):
                b = slice(s, min(s + self.config.batch_size, idx.stop))
                out = run_block(block, xs[b].to(self.device, torch.float32), kw)
                per_token = self.method.block_loss(out, ys[b].to(self.device, torch.float32), self.config)
                total += float(per_token.sum())
                count += per_token.numel()
        return total / max(count, 1)

    @torch.no_grad()
    def _run_rows(self, block: nn.Module, src: ActivationStream, rows: range, kw) -> None:
        for s in range(rows.start, rows.stop, self.config.batch_size):
            run_block(block, src[s : min(s + self.config.batch_size, rows.stop)].to(self.device, torch.float32), kw)

    @torch.no_grad()
    def _apply(self, block: nn.Module, src: ActivationStream, dst: ActivationStream, kw) -> None:
        """dst = block(src), batch by batch."""
        n, bs = src.shape[0], self.config.batch_size
        for s in range(0, n, bs):
            dst[s : s + bs] = run_block(block, src[s : s + bs].to(self.device, torch.float32), kw).cpu()

    def _train(self, i: int, block: nn.Module, groups: list["ParamGroup"], xq: ActivationStream, yfp: ActivationStream,
               n_train: int, kw, autocast: bool, guard: NonFiniteGuard, lr_scale: float = 1.0,
               on_epoch: Callable[[int], None] | None = None) -> tuple[list[float], int]:
        cfg = self.config
        params = [p for g in groups for p in g.params]
        if not params:  # an untrained method (SmoothQuant, QLLM without low-rank tuning)
            return [], 0
        opt = torch.optim.AdamW([{"params": g.params, "lr": g.lr * lr_scale} for g in groups],
                                weight_decay=cfg.weight_decay)
        per_epoch = math.ceil(n_train / cfg.batch_size)
        total = cfg.epochs * per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t / max(total, 1)))
        )
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + i)
        losses: list[float] = []
        bar = tqdm(total=total, desc=f"block {i + 1}/{len(self.blocks)}", unit="step", leave=False,
                   disable=not self.progress)
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n_train, generator=gen)
            for s in range(0, n_train, cfg.batch_size):
                idx = perm[s : s + cfg.batch_size]
                x = xq[idx].to(self.device, torch.float32)
                y = yfp[idx].to(self.device, torch.float32)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                    out = run_block(block, x, kw)
                loss = self.method.block_loss(out, y, cfg).mean()
                step = bar.n
                opt.zero_grad(set_to_none=True)
                try:
                    ok = guard.loss_ok(step, loss.item())
                    if ok:
                        loss.backward()
                        ok = guard.grads_ok(step, params)
                except NonFiniteRun:
                    bar.close()
                    raise
                if ok:
                    opt.step()
                    guard.good_step()
                    losses.append(loss.item())
                sched.step()
                bar.update()
                if losses:
                    bar.set_postfix(loss=f"{losses[-1]:.3g}", skipped=guard.skipped)
            if on_epoch:
                on_epoch(epoch + 1)
        bar.close()
        return losses, total

    def _block(self, i: int, xfp: ActivationStream, xq: ActivationStream, kw, n_train: int) -> tuple[ActivationStream, ActivationStream]:
        cfg = self.config
        n, t, h = xfp.shape
        t0 = time.perf_counter()
        block = self.blocks[i].to(self.device)
        p_fp, p_q = self._paths(i + 1)
        yfp = ActivationStream.create(p_fp, (n, t, h), self.act_dtype, cfg.offload)
        set_counting(block, True, reset=True)
        self._apply(block, xfp, yfp, kw)
        set_counting(block, False)
        routing = {name: {"tokens": counts, "never_routed": [e for e, c in enumerate(counts) if c == 0]}
                   for name, counts in routing_counts(block).items()}
        val = range(n_train, n) if n > n_train else range(0, n_train)
        precision = "bf16-autocast" if self.device.type == "cuda" else "fp32"
        data = BlockData(range(0, n_train), lambda b, rows: self._run_rows(b, xq, rows, kw),
                         lambda b, rows: self._loss(b, xq, yfp, rows, kw), self.family)
        calibration = self.method.calibrate_block(block, data, self._block_schemes(i), cfg)
        backup = copy.deepcopy(block)  # the block's last good state, restored on a restart
        guard = NonFiniteGuard(f"{self.method.label} block {i}")
        restarts, backoffs = 0, 0
        level = self.records[-1].backoff_level if self.records else 0
        lr_scale = BACKOFF ** level
        while True:
            groups = self.method.prepare_block(block, self._block_schemes(i), cfg)
            init_loss = self._loss(block, xq, yfp, val, kw)
            best = Best(lambda b: self._loss(b, xq, yfp, val, kw),
                        (lambda b: self._nll(i, b, xq, val, kw)) if cfg.keep_best_by == "nll" else None)
            if cfg.keep_best:
                best.offer(0, self._packed(block))
            on_epoch = (lambda e: best.offer(e, self._packed(block))) if cfg.keep_best else None
            try:
                losses, steps = self._train(i, block, groups, xq, yfp, n_train, kw, precision != "fp32", guard, lr_scale,
                                            on_epoch)
            except NonFiniteRun as e:
                self.blocks[i] = block = copy.deepcopy(backup)
                guard.consecutive = 0
                if precision != "fp32":  # low-precision overflow (the reference implementation's known failure)
                    precision = "fp32"
                    continue
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise EqatError(f"{e}, after {MAX_RESTARTS} restarts at half the learning rate each; {_saved(i)} and "
                                    "the run resumes at this block: re-run with lower learning rates (e.g. --lr-weight/"
                                    "--lr-quant) or --act-dtype float32.") from e
                lr_scale /= 2
                continue
            if not (cfg.lr_backoff and cfg.keep_best and losses and best.epoch == 0 and level < MAX_BACKOFF_LEVEL):
                break
            self.blocks[i] = block = copy.deepcopy(backup)  # training made it worse: again, from the start, slower
            level, backoffs, lr_scale = level + 1, backoffs + 1, lr_scale * BACKOFF
        fake_quant_loss = self._loss(block, xq, yfp, val, kw)  # the trained block before packing
        if cfg.keep_best:
            block, final_loss, kept = best.block, best.loss, best.epoch
        else:
            self.method.freeze_block(block, cfg, self.storage_dtype)
            final_loss, kept = self._loss(block, xq, yfp, val, kw), cfg.epochs
        self._check_finite(i, block, final_loss)
        at_limit, n_scales = scales_at_limits(block)
        xq_next = ActivationStream.create(p_q, (n, t, h), self.act_dtype, cfg.offload)
        self._apply(block, xq, xq_next, kw)
        self.blocks[i] = block.to("cpu")
        rec = BlockRecord(i, init_loss, final_loss, losses[0] if losses else init_loss,
                          losses[-1] if losses else init_loss, steps, time.perf_counter() - t0, precision, losses,
                          guard.skipped, restarts, lr_scale, at_limit, n_scales, kept, fake_quant_loss, best.losses,
                          cfg.keep_best_by if cfg.keep_best else "last", best.scores, calibration, routing,
                          backoffs, level)
        self.records.append(rec)
        return yfp, xq_next

    def _nll(self, i: int, block: nn.Module, xs: ActivationStream, rows: range, kw) -> float:
        """--keep-best-by nll: the next-token loss of windows `rows` with `block` as block i."""
        if self._scorer is None:
            norm, head = self._final_norm_and_head()
            self._scorer = HeldoutNLL(self.blocks, norm, head, self._calib, self._kwargs, self.device,
                                      self.config.batch_size, getattr(self.model.config.get_text_config(), "final_logit_softcapping", None))
        return self._scorer(i, block, xs, rows)

    def _final_norm_and_head(self) -> tuple[nn.Module, nn.Module]:
        spec = self.family
        norm, head = get_submodule(self.model, spec.final_norm), get_submodule(self.model, spec.lm_head)
        if norm is None or head is None:
            raise EqatInputError(f"--keep-best-by nll needs the final norm '{spec.final_norm}' and the LM head "
                                 f"'{spec.lm_head}', which this model lacks; use --keep-best-by loss.")
        return norm, head

    def _packed(self, block: nn.Module) -> nn.Module:
        """A packed copy of the block being trained (the block itself is left as it is)."""
        packed = copy.deepcopy(block)
        with torch.no_grad():
            self.method.freeze_block(packed, self.config, self.storage_dtype)
        return packed

    def _check_finite(self, i: int, block: nn.Module, loss: float) -> None:
        """Stop (EqatError, exit 1) before saving block i when its packed form is broken."""
        bad = nonfinite_tensors(block)
        if bad or not math.isfinite(loss):
            what = f"stored tensors {bad[:4]} are not finite" if bad else f"its held-out loss after packing is {loss}"
            raise EqatError(f"{self.method.label} block {i}: {what}; {_saved(i)}. Re-run with lower --lr-weight/"
                            "--lr-quant (the run resumes at this block), or --force to start over.")

    # ---- the whole model ----------------------------------------------------------------
    def run(self, calib: torch.Tensor) -> list[BlockRecord]:
        """Train every block on `calib` (LongTensor [n, T]; the last `val_samples` rows are held out)."""
        cfg = self.config
        n, t = calib.shape
        h = self.model.config.get_text_config().hidden_size
        n_train = n - cfg.val_samples if n > cfg.val_samples else n
        self._calib = calib
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        if state is None:
            xfp = ActivationStream.create(self._paths(0)[0], (n, t, h), self.act_dtype, cfg.offload)
            kw = self._capture(calib, xfp)
            xfp.save()
            self._save_kwargs(kw)
            xq = ActivationStream.create(self._paths(0)[1], (n, t, h), self.act_dtype, cfg.offload)
            xq.data.copy_(xfp.data)
            xq.save()
            start = 0
            self._write_state(0, (n, t, h))
        else:
            start = int(state["next_block"])
            try:
                self.records = [BlockRecord(**r) for r in state["records"]]
            except TypeError as e:
                raise damaged(self.state_dir / STATE, f"bad block records: {e}") from e
            for j in range(start):
                self._load_block(j)
            kw = self._load_kwargs(calib)
            xfp, xq = (self._open_stream(p, (n, t, h)) for p in self._paths(start))
        self._kwargs = [{k: _to(v, self.device) for k, v in kw[t].items()} for t in self.layer_types]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for i in range(start, len(self.blocks)):
            xfp_next, xq_next = self._block(i, xfp, xq, self._kwargs[i], n_train)
            self._save_block(i)
            xfp_next.save()
            xq_next.save()
            self._write_state(i + 1, (n, t, h))
            for old in self._paths(i):
                old.unlink(missing_ok=True)
            xfp.release(), xq.release()
            xfp, xq = xfp_next, xq_next
            if self.on_block:
                self.on_block(self.records[-1])
        return self.records
