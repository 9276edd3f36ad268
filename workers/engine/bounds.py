"""Bounds on every model call of this process: wall time, resident memory, and a stop signal.

A model call is one onnxruntime run (one batch). Inside :meth:`CallBounds.scope` every call made
through :func:`run_bounded` is watched by one daemon thread of this process, which looks at the
calls in flight (several, when runs go side by side on the CPU) every ``POLL_SECONDS``. When a call
has run longer than ``seconds``, when the process's resident memory exceeds ``memory_bytes``, or
when ``stop()`` names a reason to stop (the job was canceled), it sets the call's
``RunOptions.terminate``: onnxruntime checks that flag before every node, and inside a ``Loop``
before every iteration, so the call raises within a node's time and :func:`run_bounded` raises the
error that names the bound instead.

One kernel that never returns (a single enormous operator) is beyond what the flag can stop: a call
still running ``GRACE_SECONDS`` after its flag was set is handed to ``on_stuck(error)``, which on the
fleet records the job's failure and ends the process (its Celery pool starts a fresh one).

The same thread asks ``stop()`` every ``STOP_CHECK_SECONDS`` while a scope is open, and every call
first raises a stop already recorded (:meth:`CallBounds.check`), so a canceled job ends within about a
second: at its next batch, or inside a long one. Without a scope (a user's own run without limits) the
calls run unwatched.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from shapfleet.errors import Canceled, ModelMemoryLimit, ModelTimeLimit, ShapfleetError

#: How often the watching thread looks at the call in flight (and asks ``stop()``), seconds.
POLL_SECONDS = 0.2
#: How often ``stop()`` is asked (a read of the job's status on the fleet), seconds.
STOP_CHECK_SECONDS = 1.0
#: How long a terminated call may take to return before the process is given up.
GRACE_SECONDS = 10.0

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class _Scope:
    seconds: float | None
    memory_bytes: int | None
    stop: Callable[[], str | None] | None
    on_stuck: Callable[[ShapfleetError], None] | None
    stopped: ShapfleetError | None = None
    next_stop_check: float = 0.0


@dataclass
class _Call:
    options: object  # onnxruntime.RunOptions
    started: float
    what: str
    tripped: ShapfleetError | None = None
    tripped_at: float = 0.0


class CallBounds:
    """The bounds of this process's model calls; one per process (:data:`BOUNDS`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scope: _Scope | None = None
        self._calls: dict[int, _Call] = {}
        self._thread: threading.Thread | None = None
        self._thread_pid = 0

    @contextmanager
    def scope(self, seconds: float | None = None, memory_bytes: int | None = None,
              stop: Callable[[], str | None] | None = None,
              on_stuck: Callable[[ShapfleetError], None] | None = None) -> Iterator[None]:
        """Watch the model calls made inside: ``seconds`` per call, ``memory_bytes`` of resident memory
        (None or 0: unbounded), ``stop()`` (asked every ``STOP_CHECK_SECONDS``, from the watching thread)
        returning a reason to stop, or None. Scopes do not nest: the inner one replaces the outer until it ends."""
        previous = self._scope
        self._scope = _Scope(seconds or None, memory_bytes or None, stop, on_stuck)
        self._ensure_thread()
        try:
            yield
        finally:
            self._scope = previous

    def check(self) -> None:
        """Raise the stop recorded for this scope, if any (called before every model call)."""
        scope = self._scope
        if scope is not None and scope.stopped is not None:
            raise scope.stopped

    def run(self, call: Callable[[object], object], what: str):
        """``call(run_options)`` under the bounds; ``what`` names the call in errors ("a batch of 64")."""
        scope = self._scope
        if scope is None:
            return call(None)
        self.check()
        import onnxruntime as ort

        watched = _Call(ort.RunOptions(), time.monotonic(), what)
        with self._lock:
            self._calls[id(watched)] = watched
        try:
            return call(watched.options)
        except Exception:
            if watched.tripped is not None:
                raise watched.tripped from None
            raise
        finally:
            with self._lock:
                del self._calls[id(watched)]
            if watched.tripped is not None and isinstance(watched.tripped, Canceled):
                scope.stopped = watched.tripped

    # -- the watching thread -----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread_pid == os.getpid() and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._watch, name="shapfleet-call-bounds", daemon=True)
        self._thread_pid = os.getpid()
        self._thread.start()

    def _ask_stop(self, scope: _Scope, now: float) -> None:
        if scope.stop is None or scope.stopped is not None or now < scope.next_stop_check:
            return
        scope.next_stop_check = now + STOP_CHECK_SECONDS
        try:
            reason = scope.stop()
        except Exception:  # the records are unreachable for a moment: the call's other bounds still hold
            return
        if reason:
            scope.stopped = Canceled(reason)

    def _watch(self) -> None:
        while True:
            time.sleep(POLL_SECONDS)
            scope = self._scope
            if scope is None:
                continue
            now = time.monotonic()
            self._ask_stop(scope, now)
            with self._lock:
                calls = list(self._calls.values())
            for call in calls:
                if call.tripped is None:
                    call.tripped = self._exceeded(scope, call, now)
                    if call.tripped is not None:
                        call.tripped_at = now
                        call.options.terminate = True
                elif now - call.tripped_at > GRACE_SECONDS and scope.on_stuck is not None:
                    on_stuck, scope.on_stuck = scope.on_stuck, None
                    on_stuck(call.tripped)

    @staticmethod
    def _exceeded(scope: _Scope, call: _Call, now: float) -> ShapfleetError | None:
        if scope.stopped is not None:
            return scope.stopped
        if scope.seconds is not None and now - call.started > scope.seconds:
            return ModelTimeLimit(
                f"a model call ({call.what}) ran longer than SHAPFLEET_MODEL_CALL_SECONDS={scope.seconds:g} s; "
                "the model's run time may depend on its input (a Loop or Range sized from it)")
        if scope.memory_bytes is not None:
            used = resident_bytes()
            if used > scope.memory_bytes:
                return memory_exceeded(scope.memory_bytes, call.what, used)
        return None

    @property
    def memory_bytes(self) -> int | None:
        return self._scope.memory_bytes if self._scope is not None else None


def memory_exceeded(limit: int, what: str, used: int | None = None) -> ModelMemoryLimit:
    """The error for a model call that needed more memory than a worker process may use."""
    seen = f" (the process held {used} bytes)" if used else ""
    return ModelMemoryLimit(f"a model call ({what}) needed more memory than SHAPFLEET_WORKER_MEMORY_BYTES="
                            f"{limit} allows a worker process{seen}")


#: This process's bounds.
BOUNDS = CallBounds()


def run_bounded(call: Callable[[object], object], what: str):
    """Run ``call(run_options)`` (an onnxruntime run) under this process's bounds; an allocation that
    fails under the worker's memory ceiling raises the error naming that ceiling."""
    try:
        return BOUNDS.run(call, what)
    except MemoryError:
        if BOUNDS.memory_bytes:
            raise memory_exceeded(BOUNDS.memory_bytes, what) from None
        raise
    except ShapfleetError:
        raise
    except Exception as e:
        if BOUNDS.memory_bytes and "Failed to allocate memory" in str(e):
            raise memory_exceeded(BOUNDS.memory_bytes, what) from None
        raise
