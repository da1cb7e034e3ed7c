#!/usr/bin/env bash
# Create .venv with the pinned requirements (idempotent: reinstalls only when a requirements file
# changed). Usage: scripts/setup_env.sh [venv dir]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}
scripts/install_browser.sh  # headless Chromium for the report's browser test (Debian packages, when missing)
stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  scripts/fetch_wikipedia_sample.sh "$VENV/bin/python"  # rome.corpus 'wikipedia_sample' (a checked download)
  exit 0
fi
echo "setting up $VENV (python: $($PY --version))" >&2
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
# torch first, pinned to the CPU build: a bare 'torch' requirement would pull several GB of CUDA.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -r requirements.txt
"$VENV/bin/pip" install -q --no-deps -r requirements-nodeps.txt
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$want" > "$stamp"
scripts/fetch_wikipedia_sample.sh "$VENV/bin/python"  # rome.corpus 'wikipedia_sample' (a checked download)
echo "environment ready: $VENV" >&2
