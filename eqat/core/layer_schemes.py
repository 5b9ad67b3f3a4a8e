"""`LayerSchemes`: which `QuantScheme` each Linear gets (mixed precision), and what that costs in bits.

A run has one default scheme; `--override PATTERN=SCHEME` (or the `--avg-bits` allocator,
eqat.engine.allocate) gives chosen modules another one. Patterns match full module names such as
`model.layers.11.mlp.down_proj`:
    a plain name      that module, or every module whose name ends with `.<name>`
                      (`layers.11.mlp.down_proj`, `down_proj`)
    a glob            `*`, `?`, `[...]` over the full name (`*.11.mlp.down_proj`, `*.mlp.*`)
    `re:<regex>`      a Python regular expression matching the full name (re.fullmatch)
When several overrides match a module the last one wins. An override that matches no module is an
error, never a silent no-op.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping, Sequence, Union

from eqat.core.scheme import QuantScheme
from eqat.errors import EqatInputError

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # what vLLM fuses
OVERRIDE_HELP = ("PATTERN=SCHEME, e.g. model.layers.11.mlp.down_proj=w8g64, '*.mlp.down_proj=w4g64' or "
                 "'re:.*\\.1[0-2]\\.mlp\\..*=w3g64'")


def matches(pattern: str, name: str) -> bool:
    """Whether override `pattern` selects module `name` (module docstring: plain, glob, re:)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def fused_group(name: str) -> tuple[str, list[str]] | None:
    """For a member of a layer vLLM fuses (q/k/v, gate/up): (the fused layer's full name, its members'
    full names); None for any other module."""
    parent, _, leaf = name.rpartition(".")
    for fused, members in FUSED.items():
        if leaf in members:
            return f"{parent}.{fused}", [f"{parent}.{m}" for m in members]
    return None


@dataclass(frozen=True)
class Override:
    """One `PATTERN=SCHEME` override."""

    pattern: str
    scheme: QuantScheme

    @classmethod
    def parse(cls, text: str) -> "Override":
        pattern, sep, scheme = str(text).rpartition("=")
        if not sep or not pattern.strip() or not scheme.strip():
            raise EqatInputError(f"cannot parse override '{text}': write it as {OVERRIDE_HELP}.")
        pattern = pattern.strip()
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise EqatInputError(f"override '{text}': the regular expression is invalid ({e}); "
                                     f"write it as {OVERRIDE_HELP}.") from e
        return cls(pattern, QuantScheme.parse(scheme))

    def text(self) -> str:
        return f"{self.pattern}={self.scheme.name}"


@dataclass(frozen=True)
class LayerSchemes:
    """The default scheme plus the modules (full names) that have their own."""

    default: QuantScheme
    layers: Mapping[str, QuantScheme] = field(default_factory=dict)

    def __post_init__(self) -> None:  # keep only real differences, so uniform maps compare equal
        object.__setattr__(self, "layers", {n: s for n, s in sorted(self.layers.items()) if s != self.default})

    def __call__(self, name: str) -> QuantScheme:
        return self.layers.get(name, self.default)

    @property
    def uniform(self) -> bool:
        return not self.layers

    @property
    def name(self) -> str:
        """`w2g64`, or `w2g64-mixed` when some modules have their own scheme."""
        return self.default.name + ("" if self.uniform else "-mixed")

    def within(self, prefix: str) -> "LayerSchemes":
        """The same map with names relative to `prefix` (e.g. `model.layers.3`), for one block."""
        head = prefix + "."
        return LayerSchemes(self.default, {n[len(head):]: s for n, s in self.layers.items() if n.startswith(head)})

    def distinct(self, names: Iterable[str]) -> dict[QuantScheme, list[str]]:
        """Modules of `names` grouped by scheme, the most common first."""
        groups: dict[QuantScheme, list[str]] = {}
        for n in names:
            groups.setdefault(self(n), []).append(n)
        return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))

    def check(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Every module's scheme fits its in_features (shapes: name -> (N, K)); EqatInputError naming the module."""
        for name, (_, k) in shapes.items():
            self(name).check_layer(name, k)
        unknown = sorted(set(self.layers) - set(shapes))
        if unknown:
            raise EqatInputError(f"per-module schemes name modules the model lacks: {', '.join(unknown[:5])}.")

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default.to_dict(), "layers": {n: s.name for n, s in self.layers.items()}}

    @classmethod
    def resolve(cls, default: QuantScheme, names: Sequence[str], overrides: Sequence[Override]) -> "LayerSchemes":
        """Apply `overrides` in order to the modules `names`; EqatInputError for one that matches nothing."""
        layers: dict[str, QuantScheme] = {}
        for o in overrides:
            hit = [n for n in names if matches(o.pattern, n)]
            if not hit:
                example = names[len(names) // 2] if names else "(none)"
                raise EqatInputError(
                    f"override '{o.text()}' matches no quantizable module; patterns match full names such as "
                    f"'{example}' (plain name or dotted suffix, glob with *, or re:<regex>). "
                    "`eqat info <model>` lists the layers.")
            layers.update({n: o.scheme for n in hit})
        return cls(default, layers)


SchemeLike = Union[QuantScheme, LayerSchemes]


def as_layer_schemes(scheme: SchemeLike) -> LayerSchemes:
    return scheme if isinstance(scheme, LayerSchemes) else LayerSchemes(scheme)


def dominant(schemes: Iterable[QuantScheme], weights: Iterable[int] | None = None) -> QuantScheme:
    """The scheme holding the most weights (the most layers when `weights` is None); ties: fewest bits."""
    schemes = list(schemes)
    count: Counter = Counter()
    for s, w in zip(schemes, [1] * len(schemes) if weights is None else weights):
        count[s] += w
    return max(count, key=lambda s: (count[s], -s.bits, s.name))


def step_ratio(default: QuantScheme, scheme: QuantScheme) -> float:
    """How much smaller `scheme`'s step sizes are than `default`'s on the same weights (qmax ratio).
    Mixed precision trains each width's scales at the default's learning rate times this, so an
    8-bit scale (about 1/85 of a 2-bit one) moves by the same fraction per Adam step, not 85x more."""
    return default.qmax / scheme.qmax


def bits_summary(layers: Mapping[str, tuple[QuantScheme, int, int]], scale_bits: int = 16) -> dict[str, Any]:
    """What the quantized Linears cost. `layers`: name -> (scheme, N, K).

    avg_code_bits: the weight codes alone, averaged over every quantized weight.
    bits_per_weight: with one scale (`scale_bits`) and, for asymmetric schemes, one zero-point at the
        code width per group, as the GPTQ, compressed-tensors and ONNX exports pack them.
    checkpoint_bits_per_weight: the same as eqat's checkpoint stores it (zero-points at `scale_bits`).
    """
    weights = codes = packed = stored = 0
    by_scheme: dict[str, dict[str, int]] = {}
    for scheme, n, k in layers.values():
        g = n * scheme.num_groups(k)
        weights += n * k
        codes += n * k * scheme.bits
        packed += g * (scale_bits + (0 if scheme.symmetric else scheme.bits))
        stored += g * (scale_bits + (0 if scheme.symmetric else scale_bits))
        row = by_scheme.setdefault(scheme.name, {"layers": 0, "weights": 0})
        row["layers"] += 1
        row["weights"] += n * k
    if not weights:
        return {"weights": 0, "avg_code_bits": 0.0, "bits_per_weight": 0.0, "checkpoint_bits_per_weight": 0.0,
                "by_scheme": {}}
    return {"weights": weights, "avg_code_bits": codes / weights, "bits_per_weight": (codes + packed) / weights,
            "checkpoint_bits_per_weight": (codes + stored) / weights, "by_scheme": by_scheme}


def bits_text(summary: Mapping[str, Any]) -> str:
    """One line for terminals and model cards: `2.25 code bits/weight, 2.53 with scales and zero-points`."""
    return (f"{summary['avg_code_bits']:.3f} code bits per weight, {summary['bits_per_weight']:.3f} with scales and "
            "zero-points")
