#!/usr/bin/env bash
# Explain the shipped example image with the shipped example model, in-process; PNGs land in out/example/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
.venv/bin/shapfleet explain examples/circle.png --model examples/shapes.onnx \
    --class-names examples/class_names.json --preprocess unit \
    --n-segments 30 --compactness 10 --sigma 1 --masker mean --top-k 2 --nsamples 1000 --seed 0 \
    --out out/example
echo "Pictures: out/example/summary.png and out/example/class-*.png; arrays: out/example/attributions.npz" >&2
