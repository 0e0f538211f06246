#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the tested pins.
# torch is installed first and pinned, so nothing pulls the multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]' -c constraints.txt
echo "setup: $(python -c 'import torch, deepspeed, megatron.core as m; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| megatron-core", m.__version__)' 2>/dev/null)"
