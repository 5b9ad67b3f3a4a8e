#!/usr/bin/env bash
# Installs Intel AutoRound (PyPI auto-round) for the `autoround` rows of benchmarks/quality.py,
# which runs benchmarks/autoround_run.py with the Python printed on the last line.
#
# auto-round 0.16.1 asks for torch, transformers>=4.38, accelerate, datasets, ... without upper
# pins, so a dry run in eqat's environment (torch 2.13.0+cpu, transformers 5.24) installs only
# auto-round itself: then it goes there. Should a dry run ever want to change torch,
# transformers or accelerate, it gets its own virtualenv at $EQAT_AUTOROUND_VENV (default
# ~/.cache/eqat/venvs/autoround), with torch pinned to the version here so that pip takes the
# local CPU build and not the CUDA one (a bare `torch` pulls GBs of CUDA packages).
# EQAT_AUTOROUND_FORCE_VENV=1 takes the virtualenv in any case. Idempotent.
# Usage: scripts/install_autoround.sh   (PYTHON=... picks eqat's Python; default python3)
set -euo pipefail
VERSION=0.16.1
PY=${PYTHON:-python3}
VENV=${EQAT_AUTOROUND_VENV:-$HOME/.cache/eqat/venvs/autoround}
PIP=(--disable-pip-version-check)
has_it() { "$1" -c "import auto_round, sys; sys.exit(auto_round.__version__ != '$VERSION')" 2>/dev/null; }

if has_it "$VENV/bin/python"; then
  echo "auto-round $VERSION already in $VENV" >&2; echo "$VENV/bin/python"; exit 0
fi
if [[ ${EQAT_AUTOROUND_FORCE_VENV:-0} != 1 ]] && has_it "$PY"; then
  echo "auto-round $VERSION already in $("$PY" -c 'import sys; print(sys.prefix)')" >&2
  "$PY" -c 'import sys; print(sys.executable)'; exit 0
fi

clash=1
if [[ ${EQAT_AUTOROUND_FORCE_VENV:-0} != 1 ]]; then
  report=$(mktemp)
  "$PY" -m pip install "${PIP[@]}" -q --dry-run --report "$report" "auto-round==$VERSION" >/dev/null
  clash=$("$PY" - "$report" <<'EOF'
import json, sys
changed = [i["metadata"]["name"] + "==" + i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]
           if i["metadata"]["name"].lower() in ("torch", "transformers", "accelerate")]
print("would change " + ", ".join(changed) if changed else "", file=sys.stderr)
print(int(bool(changed)))
EOF
)
  rm -f "$report"
fi

if [[ $clash == 0 ]]; then
  echo "auto-round $VERSION fits eqat's environment: installing it there" >&2
  "$PY" -m pip install "${PIP[@]}" -q "auto-round==$VERSION"
  "$PY" -c 'import sys; print(sys.executable)'
else
  TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)
  echo "auto-round $VERSION gets its own virtualenv $VENV (torch==$TORCH, CPU build)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install "${PIP[@]}" -q "torch==$TORCH" "auto-round==$VERSION" safetensors
  "$VENV/bin/python" -c "import auto_round, torch; print('auto-round', auto_round.__version__, 'torch', torch.__version__)" >&2
  echo "$VENV/bin/python"
fi
