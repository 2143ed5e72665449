#!/usr/bin/env bash
# Create .venv (if missing) and install patchhash into it with the CPU build of torch and faiss-cpu.
# Usage: bash scripts/setup.sh [extra,...]    e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu${1:+,$1}"
[ -x .venv/bin/python ] || { echo "setup: creating .venv" >&2; python3 -m venv .venv; }
echo "setup: installing patchhash[${extras}] with the CPU build of torch into .venv (a minute or two on a fresh machine)" >&2
# torch==2.13.0 is the CPU build this machine keeps on disk; pyproject.toml itself accepts any torch>=2.2.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[${extras}]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import pipeline, faiss, torch"
echo "setup: done" >&2
