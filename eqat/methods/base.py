"""The method protocol and the registry.

A method is a small class that says *what* to train; the engines (eqat.engine.blockwise,
eqat.engine.end2end) say *how*: data, streams, optimizer, schedule, guard, resume state and
progress are theirs, and neither knows which method it runs. A method names

- `name` (what `--method` takes), `summary` (one line for `--help` and `eqat info`);
- `phase`: DATA_FREE (no data: RTN), BLOCKWISE (one decoder block at a time against the full-
  precision block's outputs: Block-AP) or END_TO_END (the whole model on the language-model loss,
  on a model that is already quantized: E2E-QP);
- `config`: its config dataclass, a subclass of the phase's engine config (eqat.engine.config) for
  trained phases; fields beyond the engine's become `--<cli_prefix><field>` flags;
- the hooks of its phase (below): which modules it wraps, which parameter groups train at which
  learning rates, its loss, and how it freezes to packed `QuantLinear`s.

`register_method` (a class decorator) makes it available to `--method`, the CLI flags, the report
and the conformance tests (tests/methods/test_conformance.py). docs/extending.md walks through one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from eqat.core.layer_schemes import SchemeLike
from eqat.engine.config import BlockwiseConfig, EndToEndConfig
from eqat.errors import EqatInputError

DATA_FREE, BLOCKWISE, END_TO_END = "data-free", "block-wise", "end-to-end"
PHASES = (DATA_FREE, BLOCKWISE, END_TO_END)
ENGINE_CONFIG = {BLOCKWISE: BlockwiseConfig, END_TO_END: EndToEndConfig}
ENGINE_PREFIX = {BLOCKWISE: "", END_TO_END: "e2e_"}  # CLI prefix of the engines' own fields


@dataclass
class ParamGroup:
    """Parameters that train together at one learning rate (one AdamW group)."""

    name: str  # "weights", "quant", "scales": recorded in the report
    params: list[nn.Parameter]
    lr: float


class Method:
    """Base of every method; subclass one of the three phase classes below."""

    name: ClassVar[str]
    phase: ClassVar[str]
    config: ClassVar[type]
    summary: ClassVar[str] = ""
    label: ClassVar[str] = ""  # how messages and progress bars name it ("Block-AP"); default: name
    cli_prefix: ClassVar[str] = ""  # of the flags of the config's own fields (those beyond the engine's)
    # True: what it trains (or packs) computes with the scheme's activation quantization (QuantLinear's
    # forward applies it); False: weight-only, refused for a scheme such as w8g-1a8
    quantizes_activations: ClassVar[bool] = False

    def check_layers(self, shapes: dict[str, tuple[int, int]], schemes: list[Any], cfg: Any) -> None:
        """Before any work or write: refuse (EqatInputError) layers the method cannot train.
        shapes: name -> (out, in) of every layer it will see; schemes: every scheme a layer may get."""

    def check_model(self, model: Any, cfg: Any) -> None:
        """Before any work or write: refuse (EqatInputError) a model the method cannot run on, e.g.
        a family without the norm -> linear sites SmoothQuant needs (eqat.models.families)."""

    def describe(self, cfg: Any, scheme: SchemeLike) -> dict[str, Any]:
        """Extra facts for the method's report section (e.g. the learning rates it chose)."""
        return {}


class DataFreeMethod(Method):
    phase = DATA_FREE

    def quantize(self, model: nn.Module, scheme: SchemeLike, cfg: Any, dtype: torch.dtype,
                 on_layer: Callable[[str, float], None] | None = None) -> dict[str, float]:
        """Replace every block Linear by a packed QuantLinear, in place; relative error per layer."""
        raise NotImplementedError


class BlockwiseMethod(Method):
    phase = BLOCKWISE

    def calibrate_block(self, block: nn.Module, data: Any, scheme: SchemeLike, cfg: Any) -> dict[str, Any]:
        """Before `prepare_block`: change the full-precision block in place from its inputs (`data`, an
        eqat.engine.blockwise.BlockData), e.g. migrate activation outliers into the weights; facts for
        the block's record. Default: nothing."""
        return {}

    def prepare_block(self, block: nn.Module, scheme: SchemeLike, cfg: Any) -> list[ParamGroup]:
        """Wrap `block`'s Linears for training (in place, on the block's device); the groups to train
        (none: the engine packs the block as wrapped, without training)."""
        raise NotImplementedError

    def block_loss(self, out: torch.Tensor, target: torch.Tensor, cfg: Any) -> torch.Tensor:
        """Per-token loss [..., T] (float32) of block outputs [..., T, H] against the fp targets."""
        raise NotImplementedError

    def freeze_block(self, block: nn.Module, cfg: Any, dtype: torch.dtype) -> None:
        """Replace the wrapped Linears by packed QuantLinears (scales/zeros stored in `dtype`), in place."""
        raise NotImplementedError


class EndToEndMethod(Method):
    phase = END_TO_END
    # True: the method may start a plan from the full-precision model (LR-QAT wraps each nn.Linear
    # itself); the pipeline then calls `start_from_full_precision` before the engine runs
    from_full_precision: ClassVar[bool] = False

    def start_from_full_precision(self, schemes: Any, storage: torch.dtype) -> None:
        """Called by the pipeline when this method starts a plan: `schemes` (a LayerSchemes) gives each
        full-precision linear its scheme, `storage` the dtype of the finished scales and zero-points."""
        raise NotImplementedError(f"{self.name} trains a quantized model; it cannot start from full precision")

    def prepare_model(self, model: nn.Module, cfg: Any) -> list[ParamGroup]:
        """Make the trained parameters trainable (everything else frozen); the groups to train."""
        raise NotImplementedError

    def prepare_data(self, model: nn.Module, train: Any, cfg: Any, state_dir: Path, device: torch.device) -> Any:
        """Before training: return the training E2EData, with whatever the method adds (E2E-QP's
        distillation attaches the teacher's top-k logits); `state_dir` may hold a cache of it."""
        return train

    def loss_sum(self, model: nn.Module, batch: Any, device: torch.device, autocast: bool) -> torch.Tensor:
        """Summed training loss over the labelled tokens of `batch` (an E2EData); default: next-token NLL."""
        from eqat.engine.end2end import lm_loss_sum

        return lm_loss_sum(model, batch, device, autocast)

    def heldout_loss_sum(self, model: nn.Module, batch: Any, device: torch.device, autocast: bool) -> torch.Tensor:
        """Summed loss the held-out sequences are scored with, before and after training: next-token
        NLL, so runs with different training losses compare."""
        from eqat.engine.end2end import lm_loss_sum

        return lm_loss_sum(model, batch, device, autocast)

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. to keep parameters in range)."""

    def finalize_model(self, model: nn.Module, cfg: Any) -> None:
        """Back to the checkpoint's storage: trained parameters frozen and cast, in place."""
        raise NotImplementedError


def report_key(name: str) -> str:
    """The report.json section of the method `name` (`block_ap`, `e2e_qp`)."""
    return name.replace("-", "_")


_REGISTRY: dict[str, type[Method]] = {}


def check_activations(method: Method, schemes: list[Any]) -> None:
    """Refuse (EqatInputError) a weight-only method for schemes that quantize activations."""
    act = sorted({s.name for s in schemes if s.act is not None})
    if act and not method.quantizes_activations:
        able = [n for n, c in registered_methods().items() if c.quantizes_activations]
        raise EqatInputError(f"{method.name} trains weight-only quantization, and the scheme {act[0]} quantizes "
                             f"activations; methods for weight-activation schemes: {', '.join(able)} (docs/checkpoint-format.md).")


def register_method(cls: type) -> type:
    """Class decorator: check `cls` and make it available by `cls.name`."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name or "+" in cls.name:
        raise TypeError(f"{cls.__name__}.name must be a non-empty string without '+'")
    if getattr(cls, "phase", None) not in PHASES:
        raise TypeError(f"{cls.__name__}.phase must be one of {PHASES}")
    cls.label = cls.__dict__.get("label") or cls.name
    if not dataclasses.is_dataclass(getattr(cls, "config", None)):
        raise TypeError(f"{cls.__name__}.config must be a dataclass")
    base = ENGINE_CONFIG.get(cls.phase)
    if base is not None and not issubclass(cls.config, base):
        raise TypeError(f"{cls.__name__}.config must subclass {base.__name__} (a {cls.phase} method)")
    old = _REGISTRY.get(cls.name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise TypeError(f"a method named {cls.name!r} is already registered ({old.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def registered_methods() -> dict[str, type[Method]]:
    """Every registered method class by name (importing any eqat.methods module first runs
    eqat/methods/__init__.py, which registers the built-in ones)."""
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    """A fresh instance of the method `name` (one per run: a method may keep state within its run)."""
    methods = registered_methods()
    if name not in methods:
        raise EqatInputError(f"unknown method '{name}'; registered: {', '.join(sorted(methods))}.")
    return methods[name]()


def parse_plan(plan: str, skip_end_to_end: bool = False) -> list[Method]:
    """`block-ap+e2e-qp` -> [BlockAP, E2EQP]. A plan is one data-free or block-wise method (it makes
    the packed model), or an end-to-end one that starts from full precision (`from_full_precision`:
    lr-qat), followed by any end-to-end methods; `skip_end_to_end` drops the later ones."""
    names = [p.strip() for p in plan.split("+")]
    if not plan.strip() or any(not n for n in names):
        raise EqatInputError(f"--method '{plan}' is not a plan; e.g. block-ap+e2e-qp, block-ap or rtn.")
    methods = [get_method(n) for n in names]
    if methods[0].phase == END_TO_END and not methods[0].from_full_precision:
        raise EqatInputError(f"--method '{plan}': {methods[0].name} trains a quantized model, so a data-free or "
                             f"block-wise method must come first (e.g. block-ap+{methods[0].name}); to train an "
                             "existing checkpoint use `eqat train-e2e`.")
    later = [m.name for m in methods[1:] if m.phase != END_TO_END]
    if methods[0].phase == END_TO_END and skip_end_to_end:
        raise EqatInputError(f"--skip-e2e would drop every phase of --method '{plan}': {methods[0].name} is end to end.")
    if later:
        raise EqatInputError(f"--method '{plan}': only end-to-end methods may follow {methods[0].name}, not "
                             f"{', '.join(later)}.")
    return methods[:1] if skip_end_to_end else methods


def plan_help() -> str:
    """The registered methods, for `--help`."""
    return "; ".join(f"{m.name} ({m.phase}): {m.summary}" for m in registered_methods().values())
