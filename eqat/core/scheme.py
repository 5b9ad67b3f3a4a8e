"""`QuantScheme`: *what* a quantization is: the weights' bits, group size and symmetry, and
optionally the input activations' (`ActScheme`: bits, per token, dynamic, symmetry).

The scheme is the single object that drives fake-quant training, the conversion to packed
`QuantLinear` modules and every exporter. It serialises to JSON with a version: 1 for weight-only
schemes (as every eqat before activation quantization wrote them), 2 when activations are quantized,
so an older eqat refuses a weight-activation model instead of running it as weight-only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from eqat.errors import EqatInputError

SUPPORTED_BITS = (2, 3, 4, 6, 8)
ACT_BITS = (4, 6, 8)
SCHEME_VERSION = 2  # the newest this eqat reads; weight-only schemes are still written as version 1


@dataclass(frozen=True)
class ActScheme:
    """Fake quantization of a Linear's input activations, per token (one scale and zero-point per
    row of the last dim) and dynamic (computed from each input as it arrives).

    bits: 4, 6 or 8.
    symmetric: zero-point 0 and codes in [-2^(b-1), 2^(b-1) - 1] (what int8 GEMMs take);
        otherwise codes in [0, 2^b - 1] with a per-token integer zero-point.
    """

    bits: int = 8
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise EqatInputError(f"unsupported activation bits={self.bits}: eqat quantizes activations to "
                                 f"{', '.join(map(str, ACT_BITS))} bits; write the scheme as e.g. w8g-1a8 or w4g64a8sym.")

    @property
    def name(self) -> str:
        return f"a{self.bits}" + ("sym" if self.symmetric else "")

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "granularity": "token", "dynamic": True, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActScheme":
        if d.get("granularity", "token") != "token" or not d.get("dynamic", True):
            raise EqatInputError(f"activation quantization {d} is not per-token dynamic, the one kind this eqat runs; "
                                 "upgrade eqat.")
        return cls(bits=int(d["bits"]), symmetric=bool(d.get("symmetric", False)))


@dataclass(frozen=True)
class QuantScheme:
    """Uniform weight-only quantization of each Linear, per group of input channels.

    bits: code width, one of 2, 3, 4, 6, 8 (6: for W6A6; the torch kernel and eqat's own
        checkpoint run it, the weight-only exporters other than compressed-tensors refuse it).
    group_size: consecutive input channels that share one scale and zero-point;
        -1 means one group per output channel (per-channel).
    symmetric: if True the zero-point is fixed at 2^(bits-1) (the GPTQ `sym=True`
        convention) and only the scale is learned; otherwise both are.
    act: how the layer's input activations are quantized; None keeps them in floating point.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    act: ActScheme | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise EqatInputError(
                f"unsupported bits={self.bits}: eqat quantizes to {', '.join(map(str, SUPPORTED_BITS))} bits; "
                "pick one of those (e.g. --bits 4)."
            )
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise EqatInputError(
                f"invalid group_size={self.group_size}: use a positive divisor of the layers' in_features "
                "(e.g. 32, 64, 128) or -1 for per-channel."
            )

    @property
    def qmax(self) -> int:
        """Largest code, 2^bits - 1."""
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        """Short name such as `w4g64`, `w2g-1`, `w4g128sym`, `w8g-1a8` (weights and activations)."""
        return f"w{self.bits}g{self.group_size}" + ("sym" if self.symmetric else "") + (self.act.name if self.act else "")

    def group_size_for(self, in_features: int) -> int:
        """Effective group size for a layer of `in_features` inputs (per-channel -> in_features)."""
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return in_features // self.group_size_for(in_features)

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise `EqatInputError` if this scheme cannot quantize a layer with `in_features` inputs."""
        if self.group_size == -1 or in_features % self.group_size == 0:
            return
        valid = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        hint = f"group sizes that divide it: {', '.join(map(str, valid))}, or -1 (per-channel)" if valid else \
            "use -1 (per-channel)"
        raise EqatInputError(
            f"group_size={self.group_size} does not divide in_features={in_features} of layer '{name}'; {hint}."
        )

    def to_dict(self) -> dict[str, Any]:
        d = {"version": 1, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        return d if self.act is None else {**d, "version": 2, "act": self.act.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantScheme":
        version = d.get("version", 1)
        if version > SCHEME_VERSION:
            raise EqatInputError(
                f"quantization scheme version {version} is newer than this eqat understands ({SCHEME_VERSION}); "
                "upgrade eqat."
            )
        act = ActScheme.from_dict(d["act"]) if d.get("act") else None
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]), symmetric=bool(d.get("symmetric", False)),
                   act=act)

    @classmethod
    def parse(cls, text: str) -> "QuantScheme":
        """Parse a short name: `w4g64`, `w2g-1`, `w3g128sym`; `a<bits>[sym]` after it quantizes the
        input activations too (`w8g-1a8`, `w4g64a8sym`)."""
        m = re.fullmatch(r"w(\d+)g(-1|\d+)(sym)?(?:a(\d+)(sym)?)?", text.strip().lower())
        if not m:
            raise EqatInputError(f"cannot parse scheme '{text}': write it as w<bits>g<group>[sym][a<bits>[sym]], e.g. "
                                 "w4g64, w2g-1 or w8g-1a8 (8-bit activations).")
        act = ActScheme(int(m.group(4)), m.group(5) is not None) if m.group(4) else None
        return cls(bits=int(m.group(1)), group_size=int(m.group(2)), symmetric=m.group(3) is not None, act=act)
