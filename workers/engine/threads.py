"""numpy's BLAS kept to one thread while the engine computes.

OpenBLAS's worker threads busy-wait for a while after every call before they sleep. The engine's
matrix products are small (a batch of B coalitions times M players, the M x M regressions of the
reduce), and between onnxruntime batches they come every few milliseconds, so BLAS threads that
spin through the next batch take the cores from onnxruntime's threads (the README's "BLAS on one
thread" gives the measurement).
"""

from __future__ import annotations

import sys

from threadpoolctl import ThreadpoolController

_controller: ThreadpoolController | None = None
_modules_seen = -1


def one_blas_thread():
    """A context manager that limits the loaded BLAS libraries to one thread and restores them on exit.

    Finding the libraries takes about 1.3 ms, so it is done again only after an import: a BLAS
    library is loaded with the extension module that links it (OpenCV brings its own OpenBLAS when
    a masker first imports cv2), and a list found before that would leave it unlimited."""
    global _controller, _modules_seen
    if _controller is None or len(sys.modules) != _modules_seen:
        _controller = ThreadpoolController()
        _modules_seen = len(sys.modules)
    return _controller.limit(limits=1, user_api="blas")
