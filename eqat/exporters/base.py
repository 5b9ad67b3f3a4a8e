"""What every exporter shares: the registry, the layer view of an eqat checkpoint, and the
writer of a complete Hugging Face folder.

An exporter says which schemes it can hold (`why_not`, asked once per distinct scheme with the
layers that have it), turns one quantized layer into its format's tensors (`convert_layer`, with
that layer's scheme), and writes its `quantization_config` (from the LayerSchemes: a mixed-precision
checkpoint reaches only exporters with `holds_mixed`; the others refuse and name those that can). `export_checkpoint`
does the rest: reads the eqat checkpoint, refuses before writing anything, converts every
layer, and writes config, shards (with an index when large), tokenizer, generation config, a
model card and `export_report.json` into a temporary sibling folder renamed into place.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from eqat import __version__
from eqat.core.layer_schemes import LayerSchemes, SchemeLike, as_layer_schemes, bits_summary, bits_text
from eqat.io.checkpoint import WEIGHTS, atomic_dir, check_free_space, module_schemes, read_eqat_config, side_files_bytes
from eqat.errors import EqatInputError
from eqat.io.lock import output_lock
from eqat.models.loading import check_model_dir, copy_processor_files, load_tokenizer
from eqat.io.outdir import check_output, resolve_out
from eqat.core.scheme import QuantScheme


@dataclass
class QuantizedLayer:
    """One quantized linear of an eqat checkpoint, in eqat's canonical layout (docs/checkpoint-format.md)."""

    name: str
    qweight: torch.Tensor  # int32 [N, packed_length(K, b)]
    scales: torch.Tensor  # fp16/bf16 [N, G]
    zeros: torch.Tensor  # fp16/bf16 [N, G], integer-valued
    bias: torch.Tensor | None  # [N]
    in_features: int  # K
    reassembly: tuple[torch.Tensor, torch.Tensor] | None = None  # (index int32 [2, K], scale float32 [K])

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]


@dataclass
class Exporter:
    """A format: its name, a one-line summary, and the three format-specific functions."""

    name: str
    summary: str
    why_not: Callable[[QuantScheme, dict[str, tuple[int, int]], dict], str | None]  # (scheme, {name: (N, K)}, options)
    # (layer, scheme, options) -> ({suffix: tensor}, {note: count}); notes are summed into the report
    convert_layer: Callable[[QuantizedLayer, QuantScheme, dict], tuple[dict[str, torch.Tensor], dict[str, int]]]
    quantization_config: Callable[[LayerSchemes, dict], dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)  # option -> default
    runtimes: str = ""  # which runtimes load it, for the model card and refusals
    # (src, converted state, folder, schemes, options): writes the model files in place of safetensors shards
    write_model: Callable[[Path, dict[str, torch.Tensor], Path, LayerSchemes, dict], None] | None = None
    holds_mixed: bool = False  # per-module schemes (mixed precision) in one folder
    holds_activations: bool = False  # schemes that quantize input activations (w8g-1a8): runs them as such
    holds_reassembly: bool = False  # QLLM's channel reassembly of a layer's input (eqat.core.reassembly)
    holds_mixed_activations: bool = False  # per-module schemes in a model that quantizes activations
    holds_experts: bool = False  # MoE experts as per-expert linears (eqat.models.experts), loaded by its runtimes
    # tensor names: False writes eqat's (transformers 5's module names, which GPTQModel reads:
    # model.layers.0.mlp.experts.3.gate_proj, model.language_model.layers.0...); True renames every tensor as
    # transformers' save_pretrained does (FamilySpec.saved_names, expert_saved_names), as published checkpoints are
    saved_names: bool = False
    # (schemes, options) -> options with what holds for the whole folder decided (e.g. one GPTQ checkpoint_format)
    resolve_options: Callable[[LayerSchemes, dict], dict] | None = None


EXPORTERS: dict[str, Exporter] = {}
EXPERT_LINEAR = re.compile(r"\.experts\.\d+\.")  # eqat.models.experts: model.layers.0.mlp.experts.3.gate_proj


def register(exporter: Exporter) -> Exporter:
    EXPORTERS[exporter.name] = exporter
    return exporter


def why_not_schemes(exporter: Exporter, schemes: SchemeLike, shapes: dict[str, tuple[int, int]],
                    options: dict, reassembled: tuple[str, ...] = ()) -> str | None:
    """Why `exporter` cannot hold layers `shapes` ({name: (N, K)}) at `schemes`, the layers named in
    `reassembled` with a channel reassembly of their input, or None."""
    schemes = as_layer_schemes(schemes)
    experts = [n for n in shapes if EXPERT_LINEAR.search(n)]
    if experts and not exporter.holds_experts:
        able = [n for n, e in EXPORTERS.items() if e.holds_experts]
        return (f"{exporter.name} cannot hold MoE experts ({len(experts)} expert linears, e.g. '{experts[0]}'): its "
                f"runtimes ({exporter.runtimes or exporter.name}) load no per-expert quantized tensors of this layout; "
                f"formats that hold them: {', '.join(able) or 'none'} (docs/moe.md)")
    if reassembled and not exporter.holds_reassembly:
        able = [n for n, e in EXPORTERS.items() if e.holds_reassembly]
        return (f"{exporter.name} cannot hold QLLM's channel reassembly ({len(reassembled)} layers, e.g. "
                f"'{reassembled[0]}'): it is a gather-and-average of each input that this format has no place for; "
                f"formats that hold it: {', '.join(able) or 'none yet'}; for {exporter.name}, quantize with "
                "--no-qllm-reassembly")
    groups = schemes.distinct(shapes)
    if len(groups) > 1 and not exporter.holds_mixed:
        mixed = [n for n, e in EXPORTERS.items() if e.holds_mixed]
        return (f"{exporter.name} holds one scheme per model and this one mixes {', '.join(s.name for s in groups)}; "
                f"formats with per-module schemes: {', '.join(mixed)}, or quantize without --override/--avg-bits")
    act = [s.name for s in groups if s.act is not None]
    if act and not exporter.holds_activations:
        able = [n for n, e in EXPORTERS.items() if e.holds_activations]
        return (f"{exporter.name} holds weight-only models and this one quantizes activations ({act[0]}): exported, it "
                f"would run with floating-point activations; formats that run them quantized: "
                f"{', '.join(able) or 'none yet'} (`eqat eval` measures the model itself)")
    if act and len(groups) > 1 and not exporter.holds_mixed_activations:
        able = [n for n, e in EXPORTERS.items() if e.holds_mixed_activations and e.holds_activations]
        return (f"{exporter.name} holds a weight-activation model at one scheme for every layer, and this one mixes "
                f"{', '.join(s.name for s in groups)}; quantize every layer at one scheme (no --override/--avg-bits), "
                f"or export to {', '.join(able) or 'none yet'}")
    for scheme, names in groups.items():
        reason = exporter.why_not(scheme, {n: shapes[n] for n in names}, options)
        if reason:
            return reason if len(groups) == 1 else f"{scheme.name} layers: {reason}"
    return None


def formats_for(scheme: SchemeLike, shapes: dict[str, tuple[int, int]],
                reassembled: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Per format, why it cannot hold `scheme` (one, or per module) on layers of `shapes` ({name: (N, K)}),
    those in `reassembled` with a channel reassembly, or None when it can (each format's default options)."""
    return {name: why_not_schemes(e, scheme, shapes, dict(e.options), reassembled) for name, e in EXPORTERS.items()}


def reassembled_layers(meta: dict) -> tuple[str, ...]:
    """The layers of a checked eqat_config.json that hold a channel reassembly."""
    return tuple(n for n, info in meta["quantized_modules"].items() if info.get("reassembly"))


def holders_text(fits: dict[str, str | None]) -> str:
    """'gptq (GPTQModel, ...); onnx (...)': the formats that can hold it, with the runtimes that load them."""
    return "; ".join(f"{n} ({EXPORTERS[n].runtimes})" for n, why in fits.items() if why is None) or "none"


def checkpoint_formats(src: str | Path) -> dict[str, str | None]:
    """`formats_for` an eqat checkpoint, from its config alone (no weights read)."""
    from transformers import AutoConfig

    src = check_model_dir(src)
    meta = read_eqat_config(src)
    shapes = _layer_shapes(AutoConfig.from_pretrained(src), list(meta["quantized_modules"]))
    return formats_for(checkpoint_schemes(meta), shapes, reassembled_layers(meta))


def checkpoint_bits(src: str | Path) -> dict[str, Any]:
    """bits_summary of an eqat checkpoint: recorded in its config, or (older checkpoints) computed from it."""
    from transformers import AutoConfig

    src = check_model_dir(src)
    meta = read_eqat_config(src)
    if isinstance(meta.get("bits"), dict):
        return meta["bits"]
    schemes = checkpoint_schemes(meta)
    shapes = _layer_shapes(AutoConfig.from_pretrained(src), list(meta["quantized_modules"]))
    return bits_summary({n: (schemes(n), *shapes[n]) for n in shapes})


def checkpoint_schemes(meta: dict) -> LayerSchemes:
    """The LayerSchemes of a checked eqat_config.json."""
    return LayerSchemes(QuantScheme.from_dict(meta["scheme"]), module_schemes(meta))


def _layer_shapes(config: Any, names: list[str]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each named linear, from a skeleton of the model (no weights)."""
    from eqat.models.arch import model_skeleton

    model = model_skeleton(config)
    return {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in names}


def read_layers(src: Path, meta: dict, config: Any) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor]]:
    """(quantized layers, every other tensor) of the eqat checkpoint `src`, whose config is `config`."""
    try:
        state = load_file(str(src / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise EqatInputError(f"cannot read {src / WEIGHTS}: {e}. The checkpoint is damaged; re-run `eqat quantize`.") from e
    shapes = _layer_shapes(config, list(meta["quantized_modules"]))
    layers = {}
    for name, info in meta["quantized_modules"].items():
        try:
            qweight, scales, zeros = (state.pop(f"{name}.{t}") for t in ("qweight", "scales", "zeros"))
            reassembly = (tuple(state.pop(f"{name}.reassembly_{t}") for t in ("index", "scale"))
                          if info.get("reassembly") else None)
        except KeyError as e:
            raise EqatInputError(f"{src / WEIGHTS} lacks tensor {e} of quantized module '{name}'; the checkpoint is damaged.") from e
        bias = state.pop(f"{name}.bias", None) if info.get("bias") else None
        layers[name] = QuantizedLayer(name, qweight, scales, zeros, bias, shapes[name][1], reassembly)
    return layers, state


def _model_card(src: Path, exporter: Exporter, schemes: LayerSchemes, meta: dict, qconfig: dict, bits: dict) -> str:
    prov, scheme = meta.get("provenance", {}), schemes.default
    mixed = "" if schemes.uniform else (
        f" Mixed precision: {len(schemes.layers)} modules have their own scheme "
        "(" + ", ".join(f"{k}: {v['layers']} layers" for k, v in bits["by_scheme"].items()) + ").")
    return (f"---\nlibrary_name: transformers\ntags: [eqat, {exporter.name}, {scheme.bits}-bit]\n---\n\n"
            f"# {src.name} ({exporter.name})\n\n"
            f"Weight-only {scheme.bits}-bit quantization, group size {scheme.group_size}, "
            f"{'symmetric' if scheme.symmetric else 'asymmetric'}; method: {prov.get('method', 'unknown')}; "
            f"base model: {prov.get('base_model', 'unknown')}.{mixed} {bits_text(bits)}.\n\n"
            f"Exported by eqat {__version__} from an eqat checkpoint with `eqat export --format {exporter.name}`; "
            f"the integer codes, zero-points and scales are repacked losslessly (docs/formats.md).\n"
            f"Loads in: {exporter.runtimes}.\n\n"
            f"Validation: compare it with its source with `eqat validate {src.name} --export <this folder>`.\n\n"
            f"```json\n{json.dumps(qconfig, indent=2)}\n```\n")


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str) -> None:
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _saved_names(state: dict[str, torch.Tensor], qconfig: dict, exporter: Exporter, config: Any
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors named as transformers saves them where `exporter.saved_names` (FamilySpec.saved_names
    and expert_saved_names), and what stays in full precision although a Linear (MoE routers,
    a VLM's vision tower and projector) added to the quantization_config's `ignore` list where it has
    one (compressed-tensors: a `targets: [Linear]` group would otherwise claim them)."""
    from eqat.models.families import registered_families
    from eqat.models.families.spec import saved_name

    spec = registered_families().get(getattr(config, "model_type", "") or "")
    if spec is None:
        return state, qconfig
    if exporter.saved_names:
        state = {saved_name(spec, k): v for k, v in state.items()}
    ignore = list(qconfig["ignore"]) if isinstance(qconfig.get("ignore"), list) else None
    if ignore is not None and spec.router:
        router = saved_name(spec, f".{spec.router}.").strip(".") if exporter.saved_names else spec.router
        ignore.append(f"re:.*\\.{re.escape(router)}$")
    if ignore is not None:  # vision tower and projector, under the loaded model's names and the saved ones
        ignore += [f"re:(.*\\.)?{re.escape(part.rpartition('.')[2])}\\..*" for part in spec.keep]
        qconfig = {**qconfig, "ignore": ignore}
    return state, qconfig


def export_checkpoint(src: str | Path, fmt: str, out: str | Path, force: bool = False,
                      max_shard_size: str = "4GB", progress: bool = True, replace_foreign: bool = False,
                      **options: Any) -> dict[str, Any]:
    """Export the eqat checkpoint `src` to `fmt` in `out`; returns the export report.
    `replace_foreign` (with `force`) allows replacing a non-empty folder eqat did not write."""
    if fmt not in EXPORTERS:
        raise EqatInputError(f"unknown export format '{fmt}'; available: {', '.join(EXPORTERS)}.")
    exporter = EXPORTERS[fmt]
    unknown = set(options) - set(exporter.options)
    if unknown:
        raise EqatInputError(f"format '{fmt}' takes no option {sorted(unknown)}; its options: {sorted(exporter.options) or 'none'}.")
    opts = {**exporter.options, **{k: v for k, v in options.items() if v is not None}}
    for key, default in exporter.options.items():
        if isinstance(default, bool) and not isinstance(opts[key], bool):
            raise EqatInputError(f"option {key} of format '{fmt}' takes true or false, not {opts[key]!r}.")
    src = check_model_dir(src)
    meta = read_eqat_config(src)
    schemes = checkpoint_schemes(meta)
    out = resolve_out(out)
    check_output(out, [src], force, replace_foreign)
    if out.exists() and not force:
        raise EqatInputError(f"output folder {out} already exists; pass --force to replace it or choose another --out.")
    t0 = time.perf_counter()
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(src)
    layers, rest = read_layers(src, meta, config)
    shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
    if exporter.resolve_options is not None:
        opts = exporter.resolve_options(schemes, opts)
    reassembled = reassembled_layers(meta)
    reason = why_not_schemes(exporter, schemes, shapes, opts, reassembled)
    if reason:
        fits = formats_for(schemes, shapes, reassembled)
        raise EqatInputError(f"format '{fmt}' cannot hold this checkpoint ({schemes.name}): {reason}. "
                             f"Formats that can hold it, and who loads them: {holders_text(fits)}.")
    state: dict[str, torch.Tensor] = dict(rest)
    notes: dict[str, int] = {}
    for name, layer in tqdm(layers.items(), desc=f"export {fmt}", unit="layer", disable=not progress):
        tensors, layer_notes = exporter.convert_layer(layer, schemes(name), opts)
        state.update({f"{name}.{suffix}": t.contiguous() for suffix, t in tensors.items()})
        for key, count in layer_notes.items():
            notes[key] = notes.get(key, 0) + count
    qconfig = exporter.quantization_config(schemes, opts)
    state, qconfig = _saved_names(state, qconfig, exporter, config)
    bits = bits_summary({n: (schemes(n), *shapes[n]) for n in shapes})
    report = {"format": fmt, "options": opts, "scheme": schemes.default.to_dict(), "schemes": schemes.to_dict(),
              "bits": bits, "source": str(src),
              "eqat_version": __version__, "quantized_layers": len(layers), "notes": notes,
              "seconds": None, "runtimes": exporter.runtimes}
    check_free_space(out.parent, sum(t.numel() * t.element_size() for t in state.values()) + side_files_bytes(src),
                     f"the {fmt} export")
    with output_lock(out, f"eqat export --format {fmt}"), atomic_dir(out, force=force) as tmp:
        config.quantization_config = qconfig
        config.save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(src).save_pretrained(tmp)
        except OSError:
            pass  # the source has none
        load_tokenizer(src).save_pretrained(tmp)
        copy_processor_files(src, tmp)
        if exporter.write_model is not None:
            exporter.write_model(src, state, tmp, schemes, opts)
        else:
            _write_shards(state, tmp, max_shard_size)
        (tmp / "README.md").write_text(_model_card(src, exporter, schemes, meta, qconfig, bits))
        report["seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2))
    return report
