#!/usr/bin/env bash
# The main job on the embedded default (scikit-learn's 8x8 digits): set up, extract, train,
# evaluate on the held-out test split, and query one test image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
pipe=.venv/bin/pipe
out=artifacts/digits
$pipe extract digits --split train --out "$out/shards" --overwrite
$pipe train "$out/shards" --out "$out/run" --overwrite
.venv/bin/python -c "
import sys, pipeline
from pipeline.data.images import encode_png
img = next(pipeline.open_source('digits', split='test').batches(1, 1)).images[0]
open(sys.argv[1], 'wb').write(encode_png(img))" "$out/test-0.png"
$pipe query "$out/run" "$out/test-0.png" --k 3 --patches 5 --png "$out/png"
echo "digits --split test accuracy:"
$pipe evaluate "$out/run" digits --split test
