"""Train the example classifier shipped in ``examples/``: circles, squares and triangles in 32x32 RGB images.

The model is Conv(3->16, 5x5) -> ReLU -> [GlobalMaxPool, GlobalAveragePool] -> Dense(3) -> Softmax (the
max pool sees corners and edges wherever they are), trained with Adam in
plain numpy (no deep-learning framework needed) and written to ONNX with onnx.helper. Input: NCHW float32,
pixels scaled to 0..1 (``--preprocess unit``). Run from the repository root:

    python examples/train_shapes_model.py

It rewrites ``examples/shapes.onnx``, ``examples/class_names.json`` and the sample images, and prints
the held-out accuracy. Everything is seeded, so reruns give the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageDraw

CLASSES = ["circle", "square", "triangle"]
SIZE = 32
FILTERS = 16
KERNEL = 5
HERE = Path(__file__).resolve().parent


def draw_shape(rng: np.random.Generator, label: int) -> np.ndarray:
    """One 32x32 RGB image: a shape of random colour, size and place on a noisy, tinted background."""
    base = rng.uniform(40, 200, 3)
    noise = rng.normal(0, 12, (SIZE, SIZE, 3))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(6, 11)
    cx, cy = rng.uniform(radius + 1, SIZE - radius - 1, 2)
    colour = tuple(int(v) for v in (base + rng.choice([-1, 1], 3) * rng.uniform(60, 120, 3)).clip(0, 255))
    if label == 0:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif label == 1:
        half = radius * 0.85
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=colour)
    return np.asarray(image)


def make_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(CLASSES), n)
    images = np.stack([draw_shape(rng, int(label)) for label in labels])
    return images, labels


def im2col(x: np.ndarray) -> np.ndarray:
    """N x C x H x W (zero-padded for a same-size 5x5 convolution) -> N*H*W x C*5*5 patches."""
    n, c, h, w = x.shape
    pad = KERNEL // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (KERNEL, KERNEL), axis=(2, 3))  # N C H W k k
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * KERNEL * KERNEL)


def forward(params: dict, x: np.ndarray):
    n = len(x)
    cols = im2col(x)
    conv = cols @ params["K"].reshape(FILTERS, -1).T + params["kb"]  # N*H*W x F
    relu = np.maximum(conv, 0).reshape(n, SIZE * SIZE, FILTERS)
    pooled = np.concatenate([relu.max(axis=1), relu.mean(axis=1)], axis=1)  # N x 2F
    logits = pooled @ params["D"] + params["db"]
    return cols, conv, pooled, logits


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def train(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, epochs: int = 25) -> dict:
    x_all = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    params = {
        "K": rng.normal(0, 0.2, (FILTERS, 3, KERNEL, KERNEL)).astype(np.float32),
        "kb": np.zeros(FILTERS, np.float32),
        "D": rng.normal(0, 0.5, (2 * FILTERS, len(CLASSES))).astype(np.float32),
        "db": np.zeros(len(CLASSES), np.float32),
    }
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    step, rate, beta1, beta2 = 0, 0.01, 0.9, 0.999
    for epoch in range(epochs):
        order = rng.permutation(len(x_all))
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            x, y = x_all[batch], labels[batch]
            n = len(batch)
            cols, conv, pooled, logits = forward(params, x)
            grad_logits = softmax(logits)
            grad_logits[np.arange(n), y] -= 1
            grad_logits /= n
            grads = {"D": pooled.T @ grad_logits, "db": grad_logits.sum(axis=0)}
            grad_pooled = grad_logits @ params["D"].T  # N x 2F: max features, then mean features
            relu = np.maximum(conv, 0).reshape(n, SIZE * SIZE, FILTERS)
            grad_relu = np.repeat(grad_pooled[:, None, FILTERS:] / (SIZE * SIZE), SIZE * SIZE, axis=1)
            winners = relu.argmax(axis=1)  # N x F: where each filter's maximum is
            grad_relu[np.arange(n)[:, None], winners, np.arange(FILTERS)[None, :]] += grad_pooled[:, :FILTERS]
            grad_conv = grad_relu.reshape(-1, FILTERS) * (conv > 0)
            grads["K"] = (grad_conv.T @ cols).reshape(params["K"].shape)
            grads["kb"] = grad_conv.sum(axis=0)
            step += 1
            for k in params:
                m, v = moments[k]
                m[...] = beta1 * m + (1 - beta1) * grads[k]
                v[...] = beta2 * v + (1 - beta2) * grads[k] ** 2
                params[k] -= (rate * (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + 1e-8)).astype(np.float32)
        if epoch == epochs * 2 // 3:
            rate /= 3
    return params


def to_onnx(params: dict) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["image", "K", "kb"], ["conv"], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalMaxPool", ["relu"], ["max_pooled"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["mean_pooled"]),
        helper.make_node("Concat", ["max_pooled", "mean_pooled"], ["pooled"], axis=1),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "D", "db"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "shapes",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(CLASSES)])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="shapfleet-examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    rng = np.random.default_rng(7)
    train_images, train_labels = make_dataset(rng, 3000)
    test_images, test_labels = make_dataset(rng, 600)
    params = train(train_images, train_labels, rng)
    _, _, _, logits = forward(params, test_images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    accuracy = float((logits.argmax(axis=1) == test_labels).mean())
    onnx.save_model(to_onnx(params), HERE / "shapes.onnx")
    (HERE / "class_names.json").write_text(json.dumps(CLASSES) + "\n")
    sample_rng = np.random.default_rng(11)
    for label, name in enumerate(CLASSES):
        Image.fromarray(draw_shape(sample_rng, label)).save(HERE / f"{name}.png")
    print(json.dumps({"held_out_accuracy": round(accuracy, 4), "test_images": len(test_labels)}))


if __name__ == "__main__":
    main()
