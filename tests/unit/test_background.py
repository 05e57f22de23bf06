"""The background worker behind S3 copies and alerts: in order, never raising, bounded waits."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from megatron_ext.background import BackgroundWorker


def _errors() -> tuple[list[tuple[str, str]], Callable[[str, Exception], None]]:
    seen: list[tuple[str, str]] = []
    return seen, lambda what, exc: seen.append((what, str(exc)))


def _fail(message: str) -> None:
    raise RuntimeError(message)


def test_jobs_run_in_order_and_a_failure_is_reported_not_raised() -> None:
    seen, on_error = _errors()
    worker = BackgroundWorker("test", on_error=on_error)
    done: list[int] = []
    for i in range(5):
        assert worker.submit(f"job {i}", lambda i=i: done.append(i) if i != 2 else _fail("boom"))
    assert worker.wait(5.0)
    assert done == [0, 1, 3, 4] and seen == [("job 2", "boom")]


def test_a_failing_error_handler_does_not_stop_the_worker() -> None:
    def broken(what: str, exc: Exception) -> None:
        raise ValueError("handler")

    worker = BackgroundWorker("test", on_error=broken)
    done: list[str] = []
    worker.submit("bad", lambda: _fail("x"))
    worker.submit("good", lambda: done.append("good"))
    assert worker.wait(5.0) and done == ["good"]


def test_waits_are_bounded_and_a_full_backlog_drops_jobs() -> None:
    release = threading.Event()
    worker = BackgroundWorker("test", on_error=_errors()[1], max_backlog=1)
    worker.submit("stuck", release.wait)
    time.sleep(0.05)  # the worker took the stuck job: one place left in the backlog
    assert worker.submit("queued", lambda: None)
    start = time.monotonic()
    assert not worker.submit("dropped", lambda: None)  # and without waiting for room
    assert not worker.wait(0.1) and not worker.close(0.1)
    assert time.monotonic() - start < 1.0
    release.set()
    assert worker.wait(5.0)


def test_close_ends_the_thread_once_idle() -> None:
    worker = BackgroundWorker("test-close", on_error=_errors()[1])
    worker.submit("job", lambda: time.sleep(0.05))
    assert worker.close(5.0)
    assert not any(t.name == "test-close" for t in threading.enumerate())
    assert worker.wait(0.0)
