"""eqat's own quantized checkpoint: a Hugging Face folder plus packed QuantLinear tensors.

A checkpoint folder holds:
    config.json, generation_config.json   the base model's config (no quantization_config)
    tokenizer files                       as saved by the tokenizer
    model.safetensors                     every tensor of the model; quantized Linears appear as
                                          <name>.qweight (int32), <name>.scales, <name>.zeros
                                          (fp16/bf16) and <name>.bias, and with a channel
                                          reassembly (QLLM) <name>.reassembly_index (int32)
                                          and <name>.reassembly_scale; tied tensors saved once
    eqat_config.json                      format name and version, the QuantScheme, the storage
                                          dtype, the list of quantized modules (each with its own
                                          scheme when it differs: mixed precision), provenance
Folders are written to a temporary sibling and renamed into place when complete.
The full specification is docs/checkpoint-format.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from eqat import __version__
from eqat.errors import EqatInputError
from eqat.core.qlinear import QuantLinear
from eqat.core.reassembly import check_reassembly
from eqat.core.layer_schemes import bits_summary, dominant
from eqat.core.scheme import QuantScheme

FORMAT_NAME = "eqat"
# 2: per-module "scheme" entries (mixed precision); 3: per-module "reassembly" (QLLM's channel reassembly).
# A checkpoint is written with the lowest version that holds it (uniform weight-only ones are still 1).
FORMAT_VERSION = 3
EQAT_CONFIG = "eqat_config.json"
WEIGHTS = "model.safetensors"


def is_eqat_checkpoint(path: str | Path) -> bool:
    return (Path(path) / EQAT_CONFIG).is_file()


@contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of `out`; rename it to `out` only if the block succeeds."""
    from eqat.io.outdir import refuse_dangerous, resolve_out

    out = resolve_out(out)
    if out.exists() and not force:
        raise EqatInputError(f"output folder {out} already exists; pass --force to replace it or choose another --out.")
    if out.exists() and not out.is_dir():
        raise EqatInputError(f"--out {out} is a file, not a folder; choose a folder path.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            refuse_dangerous(out)  # last line of defence: never the current or home folder
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; give them the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors kept once (under their first name), contiguous."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def modules_of_model(qmods: dict[str, QuantLinear]) -> dict[str, tuple[QuantScheme, int, int]]:
    """name -> (scheme, N, K) of QuantLinears, what bits_summary and the exporters' checks take."""
    return {name: (m.scheme, m.out_features, m.in_features) for name, m in qmods.items()}


def module_schemes(meta: dict[str, Any]) -> dict[str, QuantScheme]:
    """Each quantized module's scheme, from a checked eqat_config.json (its own entry, else the default)."""
    default = QuantScheme.from_dict(meta["scheme"])
    return {name: QuantScheme.from_dict(info["scheme"]) if "scheme" in info else default
            for name, info in meta["quantized_modules"].items()}


REPORT_BYTES = 4 << 20  # reports, plots, configs and the model card beside the weights (a few 100 KB measured)


def side_files_bytes(src: str | Path | None) -> int:
    """Bytes a folder written from `src` holds beside its tensors: `src`'s non-weight files
    (tokenizer, configs) plus REPORT_BYTES for reports and plots."""
    if src is None:
        return REPORT_BYTES
    files = [f for f in Path(src).iterdir() if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf")]
    return REPORT_BYTES + sum(f.stat().st_size for f in files)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def check_free_space(folder: str | Path, need_bytes: int, what: str) -> None:
    """Refuse (EqatInputError) before writing `what` when the disk holding `folder` has less than
    `need_bytes` plus 5% free: a full disk must not be found half-way through a write. A disk that
    fills anyway (another writer) is caught by the CLI as exit 2 with the same advice."""
    folder = Path(folder).absolute()
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < need_bytes * 1.05:
        raise EqatInputError(f"not enough disk space for {what} in {folder}: need about {human_bytes(need_bytes * 1.05)}, "
                             f"{human_bytes(free)} free; free some space or choose another --out.")


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    provenance: dict[str, Any] | None = None,
    force: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` (with QuantLinear modules) and `tokenizer` as an eqat checkpoint.

    `extra(folder)` may add files (reports, plots) to the folder before it is moved into place.
    """
    qmods = quantized_modules(model)
    if not qmods:
        raise ValueError("the model has no QuantLinear modules; quantize it before saving an eqat checkpoint")
    default = dominant([m.scheme for m in qmods.values()], [m.in_features * m.out_features for m in qmods.values()])
    modules = {name: {"bias": m.bias is not None, **({} if m.scheme == default else {"scheme": m.scheme.to_dict()}),
                      **({"reassembly": True} if m.reassembled else {})}
               for name, m in qmods.items()}
    mixed = any("scheme" in v for v in modules.values())
    version = 3 if any(m.reassembled for m in qmods.values()) else 2 if mixed else 1
    first = next(iter(qmods.values()))
    meta = {
        "format": FORMAT_NAME,
        "format_version": version,  # an older eqat reads what it can hold and refuses the rest
        "eqat_version": __version__,
        "scheme": default.to_dict(),
        "storage_dtype": str(first.scales.dtype).removeprefix("torch."),
        "quantized_modules": modules,
        "bits": bits_summary(modules_of_model(qmods)),
        "provenance": provenance or {},
    }
    state = _unique_state_dict(model)
    tok_dir = getattr(tokenizer, "name_or_path", None)
    side = side_files_bytes(tok_dir if tok_dir and Path(tok_dir).is_dir() else None)
    check_free_space(Path(out_dir).parent, sum(t.numel() * t.element_size() for t in state.values()) + side, "the checkpoint")
    with atomic_dir(out_dir, force=force) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if tok_dir and Path(tok_dir).is_dir():
            from eqat.models.loading import copy_processor_files

            copy_processor_files(Path(tok_dir), tmp)  # a VLM's image processor and chat template
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "eqat_format": FORMAT_NAME})
        (tmp / EQAT_CONFIG).write_text(json.dumps(meta, indent=2))
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def read_eqat_config(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / EQAT_CONFIG
    if not cfg_path.exists():
        raise EqatInputError(f"{Path(path)} is not an eqat checkpoint (no {EQAT_CONFIG}): run `eqat quantize` on it "
                             "first, then use the folder it writes.")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8
        raise EqatInputError(f"cannot read {cfg_path}: {e}. The checkpoint is damaged; re-run `eqat quantize`.") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise EqatInputError(f"{cfg_path} is not an eqat checkpoint config (format={got!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise EqatInputError(f"{cfg_path}: format_version must be a positive integer, not {version!r}; the file is damaged.")
    if version > FORMAT_VERSION:
        raise EqatInputError(
            f"{cfg_path} has checkpoint format version {version}, newer than this eqat "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade eqat."
        )
    _check_meta(meta, cfg_path)
    return meta


def _check_meta(meta: dict[str, Any], cfg_path: Path) -> None:
    """The fields load_quantized and the exporters rely on, with their types (EqatInputError naming the field)."""
    def bad(field: str, want: str) -> EqatInputError:
        return EqatInputError(f"{cfg_path}: field '{field}' must be {want}, not {meta.get(field)!r:.80}; the file is damaged "
                              "(re-run `eqat quantize`, or restore the file).")

    if not isinstance(meta.get("scheme"), dict):
        raise bad("scheme", "a mapping (bits, group_size, symmetric)")
    try:
        QuantScheme.from_dict(meta["scheme"])
    except EqatInputError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise EqatInputError(f"{cfg_path}: field 'scheme' is invalid ({e!r}); the file is damaged.") from e
    if meta.get("storage_dtype") not in ("float16", "bfloat16", "float32"):
        raise bad("storage_dtype", "float16 or bfloat16")
    mods = meta.get("quantized_modules")
    if not isinstance(mods, dict) or not mods or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("bias"), bool) for k, v in mods.items()):
        raise bad("quantized_modules", "a non-empty mapping of module name to {bias: true|false[, scheme: {...}]}")
    if not all(isinstance(v.get("reassembly", False), bool) for v in mods.values()):
        raise bad("quantized_modules", "a mapping whose entries' 'reassembly' is true or false")
    for name, info in mods.items():
        if "scheme" not in info:
            continue
        try:
            if not isinstance(info["scheme"], dict):
                raise TypeError("not a mapping")
            QuantScheme.from_dict(info["scheme"])
        except EqatInputError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise EqatInputError(f"{cfg_path}: the scheme of module '{name}' is invalid ({e!r}); the file is damaged.") from e
    if not isinstance(meta.get("provenance", {}), dict):
        raise bad("provenance", "a mapping")


def load_quantized(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load an eqat checkpoint: (model with QuantLinear modules, tokenizer, eqat_config)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from eqat.core.dtypes import parse_dtype
    from eqat.models.arch import model_class, split_experts
    from eqat.models.loading import check_model_dir, load_tokenizer

    p = check_model_dir(path)
    meta = read_eqat_config(p)
    schemes = module_schemes(meta)
    dtype = parse_dtype(meta["storage_dtype"])
    try:
        config = AutoConfig.from_pretrained(p)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EqatInputError(f"cannot read {p / 'config.json'}: {str(e)[:300]}; the checkpoint is damaged.") from e
    with init_empty_weights(include_buffers=False):
        model = model_class(config).from_config(config, dtype=torch.float32)
    split_experts(model)  # MoE checkpoints hold per-expert modules
    for name, info in meta["quantized_modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise EqatInputError(f"{p / EQAT_CONFIG} names module '{name}', which the model in config.json lacks.") from e
        parent, _, child = name.rpartition(".")
        if not isinstance(old, nn.Linear):
            raise EqatInputError(f"{p / EQAT_CONFIG} names module '{name}', which is a {type(old).__name__}, not a Linear.")
        try:
            new = QuantLinear(old.in_features, old.out_features, schemes[name], bias=info["bias"], dtype=dtype,
                              device="meta")
        except ValueError as e:
            raise EqatInputError(f"{p / EQAT_CONFIG}: scheme {schemes[name].name} does not fit module '{name}' ({e}).") from e
        if info.get("reassembly"):  # placeholders the state dict fills (assign=True), checked below
            new.set_reassembly(torch.empty(2, old.in_features, dtype=torch.int32, device="meta"),
                               torch.empty(old.in_features, device="meta"))
        setattr(model.get_submodule(parent), child, new)
    try:
        state = load_file(str(p / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise EqatInputError(f"cannot read {p / WEIGHTS}: {e}. The file is damaged; re-run `eqat quantize`.") from e
    try:
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise EqatInputError(f"{p / WEIGHTS} does not match {p / 'config.json'}: {str(e)[:500]}") from e
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if unexpected or missing:
        raise EqatInputError(
            f"{p / WEIGHTS} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for name, m in quantized_modules(model).items():
        if m.reassembled:
            check_reassembly(m.reassembly_index, m.reassembly_scale, m.in_features, f"{p / WEIGHTS}, module '{name}'")
    return model.to(device).eval(), load_tokenizer(p), meta
