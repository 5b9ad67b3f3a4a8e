"""What a run is asked to do: the option dataclasses of `eqat quantize`, `train-e2e` and `eval`.

Each field is made with `option()` (eqat.core.options), so these classes are also the source of
the CLI flags, the `--config` keys and the resume fingerprints (`QuantizeOptions.fingerprint`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from eqat.core.layer_schemes import OVERRIDE_HELP, Override
from eqat.core.options import option
from eqat.core.scheme import QuantScheme
from eqat.engine.state import fingerprint_of
from eqat.errors import EqatInputError
from eqat.methods import get_method, parse_plan
from eqat.methods.base import BLOCKWISE, END_TO_END, Method

DEFAULT_PLAN = "block-ap+e2e-qp"
RESUME = "resume"
FORCE_HELP = "Discard an existing output folder that eqat wrote (finished or not) and start over."
FOREIGN_HELP = ("With --force: also replace a non-empty folder eqat did not write. The current folder, the home folder "
                "and the run's inputs are never replaced.")


@dataclass
class EvalOptions:
    data: str = option("wikitext2", "Evaluation text: wikitext2, c4, a .txt/.jsonl path, ...")
    seqlen: int = option(2048, "Evaluation window length in tokens.")
    max_windows: int | None = option(None, "Evaluate at most this many windows (bounds CPU time).")

    def check(self) -> None:
        """Refuse --seqlen < 2 and --max-windows < 1 before any work (EqatInputError)."""
        from eqat.data.evaluate import check_windows

        check_windows(self.seqlen, self.max_windows)


@dataclass
class CalibOptions:
    """Calibration windows of block-wise methods (which hold out `val_samples` more)."""

    data: str = option("c4", "Calibration text (block-wise methods): c4, c4-hub, redpajama, wikitext2-hub, a .txt/.jsonl path.")
    nsamples: int = option(64, "Calibration windows to train on (block-wise methods).")
    seqlen: int = option(256, "Calibration window length in tokens (block-wise methods).")
    seed: int = option(0, "Seed for calibration sampling and shuffling (every trained phase).")


@dataclass
class QuantizeOptions:
    model: str | None = option(None, "Local Hugging Face causal-LM folder, or a packaged model by name (gemma3-270m); default: the embedded SmolLM2-135M-Instruct.",
                               flags=("--model", "-m"), result=False)  # the fingerprint holds the resolved path
    method: str = option(DEFAULT_PLAN, "Plan of methods joined by '+': one data-free or block-wise method (or lr-qat, "
                                       "which starts from full precision), then any end-to-end ones (block-ap+e2e-qp, "
                                       "block-ap, rtn, rtn+e2e-qp, lr-qat, lr-qat-block+lr-qat).", result=False)
    scheme: QuantScheme = option(factory=QuantScheme, cli=False)
    override: list[str] = option(factory=list, help=f"Give matching modules their own scheme: {OVERRIDE_HELP}. Repeat "
                                 "the flag for more; the last match wins (docs/mixed-precision.md).")
    avg_bits: float | None = option(None, "Mixed precision: promote the layers whose quantization costs the most "
                                          "(measured, --sensitivity) to a --promote scheme until the average code bits "
                                          "per quantized weight reach this budget (2-8), e.g. 2.25 with --scheme w2g64.")
    promote: str = option("", "Schemes --avg-bits may promote layers to, comma-separated (default: 8 bits at --scheme's "
                              "group size and symmetry).")
    sensitivity: str = option("fisher", "How --avg-bits measures each layer's sensitivity: fisher (one backward pass "
                                        "per window, seconds) or kl (one forward per layer and scheme, minutes).")
    sensitivity_windows: int = option(16, "Calibration windows (--calib-data, --calib-seqlen) --avg-bits measures on.")
    tie_fused: bool = option(True, "--avg-bits gives q/k/v and gate/up of a block one scheme (vLLM fuses them).",
                             flags=("--tie-fused/--no-tie-fused",))
    out: str | None = option(None, "Output folder; default eqat-out/<model>-<scheme>-<method>.", param="out_dir",
                             flags=("--out", "-o"), result=False)
    dtype: str = option("float16", "Storage dtype of scales and zero-points: float16 or bfloat16.")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto.")
    force: bool = option(False, FORCE_HELP, result=False)
    replace_foreign: bool = option(False, FOREIGN_HELP, result=False)
    evaluate: bool = option(True, "Measure perplexity before and after quantizing.", flags=("--eval/--no-eval",),
                            result=False)
    eval: EvalOptions = option(factory=EvalOptions, cli=False, result=False)
    calib: CalibOptions = option(factory=CalibOptions, cli=False)
    skip_e2e: bool = option(False, "Stop after the first method of --method (drop its end-to-end methods).", result=False)
    configs: dict = option(factory=dict, cli=False)  # method name -> its config; a missing one: the defaults
    ignored_flags: list = option(factory=list, cli=False, result=False)  # warnings: method flags no method of the plan reads
    progress: bool = option(True, cli=False, result=False)
    allow_unquantized: bool = option(False, "Go on when more than 10% of the decoder blocks' weight matrices would stay "
                                            "in full precision (e.g. fused tensors no family spec declares, which are not nn.Linear); "
                                            "report.json records the share.", result=False)

    def plan(self) -> list[Method]:
        return parse_plan(self.method, self.skip_e2e)

    def config_for(self, method: Method) -> Any:
        return self.configs.setdefault(method.name, method.config())

    @property
    def mixed(self) -> bool:
        return bool(self.override) or self.avg_bits is not None

    def overrides(self) -> list[Override]:
        return [Override.parse(o) for o in self.override]

    def promote_levels(self) -> list[QuantScheme]:
        """The schemes --avg-bits may promote to (EqatInputError for a bad name)."""
        if not self.promote.strip():
            s = self.scheme
            return [replace(s, bits=8)]  # keeps the activation quantization
        return [QuantScheme.parse(t) for t in self.promote.split(",") if t.strip()]

    def check_mixed(self) -> None:
        """The mixed-precision options that need no model, before any work (EqatInputError)."""
        from eqat.engine.allocate import SENSITIVITY, check_budget

        self.overrides()
        if self.avg_bits is None:
            return
        levels = self.promote_levels()
        if not any(s.bits > self.scheme.bits for s in levels):
            raise EqatInputError(f"--promote {self.promote or levels[0].name} has no scheme wider than --scheme "
                                 f"{self.scheme.name}; give one with more bits, e.g. --promote w8g64.")
        check_budget(self.avg_bits, 0.0, levels)  # the range; the start bits are checked once the model is loaded
        if self.sensitivity not in SENSITIVITY:
            raise EqatInputError(f"--sensitivity must be one of {', '.join(SENSITIVITY)}, got '{self.sensitivity}'.")
        if self.sensitivity_windows < 1:
            raise EqatInputError(f"--sensitivity-windows must be at least 1, got {self.sensitivity_windows}.")

    def to_dict(self) -> dict[str, Any]:
        """The options as recorded in report.json and run_config.json (the plan's configs only)."""
        plan = self.plan()
        d = {k: v for k, v in asdict(self).items() if k != "configs"}
        d["scheme"] = self.scheme.to_dict()
        d["plan"] = [m.name for m in plan]
        d["methods"] = {m.name: asdict(self.config_for(m)) for m in plan}
        if plan[0].phase != BLOCKWISE:
            d.pop("calib")
        return d

    def fingerprint(self, model_path: Path, upto: list[Method]) -> dict[str, Any]:
        """What shapes the model after the phases `upto` (a prefix of the plan); a resumed phase must match it."""
        fp = fingerprint_of(self)
        fp.pop("configs"), fp.pop("calib")
        fp["model_path"] = str(model_path)
        if upto[0].phase == BLOCKWISE:
            fp["calib"] = fingerprint_of(self.calib)
        fp["methods"] = {m.name: fingerprint_of(self.config_for(m)) for m in upto}
        return fp


@dataclass
class TrainE2EOptions:
    checkpoint: str = option("", cli=False)
    out: str | None = option(None, "Output folder; default <checkpoint>-e2e.", param="out_dir", flags=("--out", "-o"),
                             result=False)
    method: str = option("e2e-qp", "End-to-end method(s) to run, joined by '+'.", result=False)
    device: str = option("cpu", "cpu, cuda, cuda:N or auto.")
    force: bool = option(False, FORCE_HELP, result=False)
    replace_foreign: bool = option(False, FOREIGN_HELP, result=False)
    evaluate: bool = option(True, "Measure perplexity before and after.", flags=("--eval/--no-eval",), result=False)
    eval: EvalOptions = option(factory=EvalOptions, cli=False, result=False)
    seed: int = option(0, "Seed for sampling and shuffling the training sequences.")
    configs: dict = option(factory=dict, cli=False)
    progress: bool = option(True, cli=False, result=False)

    def plan(self) -> list[Method]:
        names = [n.strip() for n in self.method.split("+")]
        methods = [get_method(n) for n in names if n]
        wrong = [m.name for m in methods if m.phase != END_TO_END]
        if not methods or wrong:
            raise EqatInputError(f"train-e2e --method takes end-to-end methods (e.g. e2e-qp), not '{self.method}'; "
                                 "make a checkpoint with `eqat quantize --method ...` first.")
        return methods

    def config_for(self, method: Method) -> Any:
        return self.configs.setdefault(method.name, method.config())
