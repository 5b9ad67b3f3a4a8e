"""eqat's Triton kernels compile for sm_80 and sm_90 on a machine with no GPU, and the
autotuning candidates fit in shared memory (tests/kernels/compile_for_gpu.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from eqat.kernels.triton_ops import TUNING  # noqa: E402


def test_kernels_compile_for_ampere_and_hopper():
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_for_gpu.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    failed = [r for r in rows if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)[:3000]
    assert len(rows) == sum(len(space) for space in TUNING.values()) + 16
    hopper_fp16 = [r for r in rows if r["arch"] == 90 and r["act"] == "fp16" and r["group"] == 128]
    assert all(r["fits"] for r in hopper_fp16), [r for r in hopper_fp16 if not r["fits"]]
    for kernel in TUNING:  # and something fits everywhere (the autotuner drops candidates that do not)
        for arch in (80, 90):
            assert any(r["fits"] for r in rows if r["kernel"] == kernel and r["arch"] == arch), (kernel, arch)
