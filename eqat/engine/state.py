"""Run state, in one place: the fingerprint that says whether a resume is valid, and resume state
that cannot execute code (tensors in safetensors, everything else in JSON).

`fingerprint_of(config)` is derived from the config dataclasses themselves: every field counts
unless its metadata says it does not change the result (`option(..., result=False)`: `offload`,
`save_every`, the output folder, progress), so a new option is in the fingerprint by default and
nobody maintains a list of keys. `check_fingerprint` is the one comparison (both sides normalised
through JSON), used by `load_state` and by the block-wise engine's `state.json`.

`save_state(folder, name, fingerprint, obj)` writes `<name>.json` (the fingerprint, then `obj`
with each tensor replaced by a reference) and `<name>.<serial>.safetensors` (the tensors). The
JSON file is the commit point: it is renamed into place last and names its tensor file, so a
kill at any moment leaves the previous pair intact. `load_state` reads and checks the JSON and
the fingerprint *before* it opens the tensor file, and only ever parses JSON and safetensors:
nothing in a resume folder is unpickled. A missing, damaged or foreign file is `EqatInputError`
(exit 2) naming the folder and the fix.

`obj` may nest dicts (any JSON-able keys: str, int, float, bool), lists, tuples, tensors, str,
int, float, bool and None, which covers optimizer and scheduler `state_dict()`s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eqat.core.options import affects_result
from eqat.errors import EqatInputError

FORMAT = "eqat-resume-state"
VERSION = 1


def fingerprint_of(obj: Any) -> Any:
    """The part of `obj` that determines a run's result, as plain JSON data: dataclasses field by
    field (recursively; fields marked `result=False` left out), objects with `to_dict()` (QuantScheme)
    through it, containers element-wise, paths as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: fingerprint_of(getattr(obj, f.name)) for f in dataclasses.fields(obj) if affects_result(f)}
    if hasattr(obj, "to_dict"):
        return fingerprint_of(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): fingerprint_of(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [fingerprint_of(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _normal(fp: Any) -> Any:
    return json.loads(json.dumps(fp, default=str))


def check_fingerprint(saved: Any, expected: Any, folder: str | Path, what: str) -> None:
    """Refuse (EqatInputError, exit 2) a resume folder whose state was written with other settings."""
    if _normal(saved) != _normal(expected):
        raise EqatInputError(f"{Path(folder)} holds {what} with other settings; re-run with the same settings to "
                             "resume, or pass --force to start over.")


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"resume state cannot hold a {type(obj).__name__}")


def storable(obj: Any) -> bool:
    """Whether `obj` can be part of a resume state."""
    try:
        _encode(obj, {})
    except TypeError:
        return False
    return True


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def damaged(path: Path, why: str) -> EqatInputError:
    return EqatInputError(f"the resume state {path} is damaged ({why}); pass --force to start over "
                          "(or restore the file).")


def save_state(folder: str | Path, name: str, fingerprint: Any, obj: Any) -> None:
    """Write `obj` as resume state `name` in `folder`, atomically, with `fingerprint`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / f"{name}.json"
    old = _read_index(index).get("tensor_file") if index.is_file() else None
    serial = 0 if old is None else int(str(old).split(".")[-2]) + 1
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(obj, tensors)
    tensor_file = f"{name}.{serial}.safetensors"
    tmp = folder / f"{tensor_file}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / tensor_file)
    doc = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "tensor_file": tensor_file, "state": body}
    tmp = folder / f"{name}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, index)
    if old and old != tensor_file:
        (folder / str(old)).unlink(missing_ok=True)


def _read_index(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or UTF-8
        raise damaged(path, f"{type(e).__name__}: {str(e)[:120]}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tensor_file"), str):
        raise damaged(path, "not an eqat resume-state file")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise damaged(path, f"resume-state version {doc.get('version')!r}, this eqat reads {VERSION}")
    tf = doc["tensor_file"]
    if "/" in tf or "\\" in tf or not tf.startswith(path.stem + ".") or not tf.endswith(".safetensors"):
        raise damaged(path, f"tensor_file {tf!r} is not a file of this state")
    try:
        int(tf.split(".")[-2])
    except ValueError as e:
        raise damaged(path, f"tensor_file {tf!r} is not a file of this state") from e
    return doc


def load_state(folder: str | Path, name: str, fingerprint: Any, what: str) -> Any | None:
    """The object saved as `name` in `folder`, or None when there is none.

    Raises EqatInputError when the saved fingerprint differs from `fingerprint` (another run's
    state: `what` names it in the message), or when a file is damaged.
    """
    index = Path(folder) / f"{name}.json"
    if not index.is_file():
        return None
    doc = _read_index(index)
    check_fingerprint(doc.get("fingerprint"), fingerprint, folder, what)
    tensor_path = Path(folder) / doc["tensor_file"]
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as e:
        raise damaged(tensor_path, f"{type(e).__name__}: {str(e)[:120]}") from e
    try:
        return _decode(doc["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise damaged(index, f"it refers to a tensor that {tensor_path.name} lacks ({e})") from e
