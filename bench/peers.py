"""shapiq's approximators on a game served by bench/run.py (runs in bench/.peers, Python >= 3.12).

    bench/.peers/bin/python bench/peers.py   (stdin/stdout are the pipe to the game's process)

The peers need shapiq >= 1.6, which needs Python >= 3.12, while shapfleet keeps Python >= 3.10, so
they run in their own interpreter and ask the benchmark's process for the game's values: every
request is one coalition matrix (a .npy of bools, n x M) and every answer one .npy of floats (n x K).
The model call therefore costs the peers exactly what it costs shapfleet and shap. This process
first imports shapiq and says ``ready`` (the benchmark starts its clock then, as it would for a
notebook that has imported it); the first message is a JSON line {"tool", "players", "budget",
"seed", "classes"}; the last one this process writes is
the Shapley values (M x K) as a .npy. Each class is explained with its own full budget (shapiq's
approximators explain one output), so a peer's figure at budget B spends B evaluations per class.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np


def send(stream, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def receive(stream) -> np.ndarray:
    size = int.from_bytes(stream.read(8), "little")
    return np.load(io.BytesIO(stream.read(size)), allow_pickle=False)


def approximator(tool: str, n: int, budget: int, seed: int):
    from shapiq.approximator import LeverageSHAP, OddSHAP, PolySHAP

    if tool == "shapiq_oddshap":
        return OddSHAP(n, random_state=seed)
    if tool == "shapiq_leverageshap":
        return LeverageSHAP(n, random_state=seed)
    if tool == "shapiq_polyshap":
        # Third order, as many terms as half the budget up to 2,048 (a partial frontier; more makes
        # its least squares take minutes at 16,000 evaluations), paired sampling.
        return PolySHAP(n, max_order=3, max_terms=max(n + 1, min(budget // 2, 2048)), pairing_trick=True,
                        random_state=seed)
    raise SystemExit(f"unknown tool {tool}")


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    import shapiq.approximator  # noqa: F401  (imported before "ready", so the timing leaves it out)

    stdout.write(b"ready\n")
    stdout.flush()
    request = json.loads(stdin.readline())
    n, budget, seed, classes = request["players"], request["budget"], request["seed"], request["classes"]
    values = np.zeros((n, classes))
    for k in range(classes):
        def game(coalitions: np.ndarray, k: int = k) -> np.ndarray:
            send(stdout, np.asarray(coalitions, dtype=bool))
            return receive(stdin)[:, k]

        estimate = approximator(request["tool"], n, budget, seed).approximate(budget, game)
        values[:, k] = [estimate[(i,)] for i in range(n)]
    send(stdout, np.zeros((0, n), dtype=bool))  # the end of the requests
    send(stdout, values)


if __name__ == "__main__":
    main()
