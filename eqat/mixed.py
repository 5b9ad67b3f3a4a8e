"""Mixed precision in a quantize run: `--override` resolved on the loaded model, the `--avg-bits`
allocator (eqat.engine.allocate) with its result kept in the resume folder, and the report section.

`start_schemes` runs before anything is written (bad input: EqatInputError, nothing written);
`run_schemes` measures and allocates (or reads the allocation a killed run already made).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from eqat.core.layer_schemes import LayerSchemes, bits_summary
from eqat.core.scheme import QuantScheme
from eqat.engine.state import fingerprint_of
from eqat.io.report import write_json
from eqat.options import QuantizeOptions

ALLOCATION = "allocation.json"


def start_schemes(opts: QuantizeOptions, linears: Mapping[str, nn.Linear]) -> LayerSchemes:
    """--scheme with --override applied; checks every module's fit and, with --avg-bits, the budget
    (the options alone were checked by QuantizeOptions.check_mixed)."""
    from eqat.engine.allocate import check_budget

    start = LayerSchemes.resolve(opts.scheme, list(linears), opts.overrides())
    shapes = {n: (lin.out_features, lin.in_features) for n, lin in linears.items()}
    start.check(shapes)
    if opts.avg_bits is not None:
        levels = opts.promote_levels()
        for s in levels:
            LayerSchemes(s).check(shapes)
        check_budget(opts.avg_bits, bits_summary({n: (start(n), *shapes[n]) for n in shapes})["avg_code_bits"], levels)
    return start


def run_schemes(opts: QuantizeOptions, model: nn.Module, linears: Mapping[str, nn.Linear], start: LayerSchemes,
                windows: Callable[[int], torch.Tensor], state_dir: Path, resuming: bool
                ) -> tuple[LayerSchemes, dict[str, Any] | None]:
    """The run's schemes and its `mixed_precision` report section (None for a uniform run).
    `windows(n)`: n calibration windows int64 [n, T], fetched only when sensitivity is measured."""
    if not opts.mixed:
        return start, None
    section: dict[str, Any] = {"overrides": list(opts.override)}
    if opts.avg_bits is None:
        return start, section
    from eqat.engine.allocate import measure_and_allocate

    key = {k: v for k, v in fingerprint_of(opts).items()
           if k in ("scheme", "override", "avg_bits", "promote", "sensitivity", "sensitivity_windows", "tie_fused", "calib")}
    cache = state_dir / ALLOCATION
    if resuming and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == json.loads(json.dumps(key, default=str)):
            layers = {n: QuantScheme.parse(s) for n, s in saved["layers"].items()}
            return LayerSchemes(start.default, layers), {**section, **saved["section"], "reused": True}
    fixed = set(start.layers)
    schemes, found = measure_and_allocate(model, linears, start, fixed, opts.promote_levels(), opts.avg_bits,
                                          windows(opts.sensitivity_windows), opts.sensitivity, opts.tie_fused,
                                          opts.progress)
    section.update(found)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json(cache, {"key": key, "layers": {n: s.name for n, s in schemes.layers.items()}, "section": found})
    return schemes, section
