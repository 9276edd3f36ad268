"""Independent reference computations for the tests: Shapley values by definition, not by regression."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnxruntime as ort


def all_coalitions(n_players: int) -> np.ndarray:
    """Every subset of the players as a ``2^M x M`` bool matrix."""
    return np.array(list(itertools.product([False, True], repeat=n_players)), dtype=bool)


def brute_force_shapley(value_of, n_players: int) -> np.ndarray:
    """phi_i = sum over S not containing i of |S|! (M - |S| - 1)! / M! * (v(S + i) - v(S)).

    ``value_of(coalitions)`` maps an ``n x M`` bool matrix to ``n x K`` values.
    """
    coalitions = all_coalitions(n_players)
    values = np.asarray(value_of(coalitions), dtype=np.float64)
    index = {tuple(row): i for i, row in enumerate(coalitions)}
    phi = np.zeros((n_players, values.shape[1]))
    for row_index, row in enumerate(coalitions):
        size = int(row.sum())
        weight = math.factorial(size) * math.factorial(n_players - size - 1) / math.factorial(n_players) if size < n_players else 0.0
        for player in np.flatnonzero(~row):
            with_player = row.copy()
            with_player[player] = True
            phi[player] += weight * (values[index[tuple(with_player)]] - values[row_index])
    return phi


def onnx_value_function(model_bytes: bytes, image: np.ndarray, background: np.ndarray, segments: np.ndarray,
                        classes, mean: float = 0.0, std: float = 255.0, layout: str = "nchw"):
    """v(z) computed directly with onnxruntime: hidden superpixels take the background's pixels."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    dtype = np.float64 if session.get_inputs()[0].type == "tensor(double)" else np.float32

    def value_of(coalitions: np.ndarray) -> np.ndarray:
        out = []
        for z in coalitions:
            keep = z[segments][:, :, None]
            composite = (np.where(keep, image, background) - mean) / std
            x = composite.transpose(2, 0, 1)[None] if layout == "nchw" else composite[None]
            out.append(session.run(None, {name: x.astype(dtype)})[0][0])
        return np.asarray(out, dtype=np.float64)[:, list(classes)]

    return value_of
