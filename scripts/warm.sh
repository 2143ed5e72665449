#!/usr/bin/env bash
# Compile the numba kernels once, before the test processes start: their cache lives in the
# checkout (__pycache__), so in a fresh clone every test process and extract worker would
# otherwise compile the same kernels at the same time. A tiny extract -> train -> evaluate on
# the bundled digits runs every kernel (hashing, the code view, counting, training, pooling).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# each step's output is shown only when it fails
pipe() { .venv/bin/python -m cli.main --progress off "$@" > "$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }; }
pipe extract digits --limit 120 --workers 1 --out "$work/shards"
pipe train "$work/shards" --out "$work/run" --epochs 1
pipe evaluate "$work/run" digits --limit 40
echo "warm: compiled kernels cached" >&2
