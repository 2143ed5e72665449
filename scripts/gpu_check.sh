#!/usr/bin/env bash
# The GPU check behind docs/training.md "On a GPU": run from the repo root on a CUDA machine whose python3
# has torch (CUDA build), numba, pyarrow, click, tqdm, pillow, scikit-learn, matplotlib and faiss.
# gpu_data/shards: pipe extract ../shared/data/cifar10-train-jpg.tar.gz --per-class 100 --out gpu_data/shards
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m cli.main extract digits --out /tmp/d/shards --overwrite
python3 -m cli.main train /tmp/d/shards --out /tmp/d/run --device cuda --epochs 8 --patience 0 --overwrite
python3 -m cli.main evaluate /tmp/d/run digits --split test --json
for dev in cuda cpu; do
  /usr/bin/time -f "$dev wall %e s" python3 -m cli.main train gpu_data/shards --out "/tmp/g-$dev" --device "$dev" --epochs 3 --patience 0 --overwrite
  cat "/tmp/g-$dev/metrics.jsonl" >> "$out/cifar.log"
done
