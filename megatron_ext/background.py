"""One background thread that runs jobs in order, for work that must never block training.

S3 copies (``replicate``) and Slack posts (``alerts``) talk to endpoints that can be slow,
down or hung. The training loop only enqueues; the jobs run one at a time, in the order they
were submitted, on a daemon thread; a job that raises is reported, never raised; and the exit
waits for the backlog at most a given time, after which a job stuck on a dead endpoint dies
with the process.

Why not ``concurrent.futures.ThreadPoolExecutor(max_workers=1)``: its worker is not a daemon
(the interpreter joins it at exit, with no time limit, so a hung endpoint would hold the exit)
and it refuses new work once the interpreter is exiting.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("megatron_ext.background")

_STOP = None  # the item that ends the worker, queued by close()


class BackgroundWorker:
    """Runs submitted jobs one at a time, in order, on a daemon thread; ``wait`` is bounded."""

    def __init__(self, name: str, *, on_error: Callable[[str, Exception], object],
                 max_backlog: int = 0) -> None:
        """``on_error(what, exc)`` runs on the worker for a job that raised; ``max_backlog``
        bounds the jobs waiting (0: unbounded), beyond which ``submit`` drops the job."""
        self._on_error = on_error
        # Queue rather than SimpleQueue for its count of unfinished jobs (task_done / join).
        self._jobs: queue.Queue[tuple[str, Callable[[], object]] | None] = queue.Queue(max_backlog)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, what: str, job: Callable[[], object]) -> bool:
        """Queue ``job`` (``what`` names it in errors) without waiting; False if the backlog is
        full and the job was dropped."""
        try:
            self._jobs.put_nowait((what, job))
        except queue.Full:
            return False
        return True

    def wait(self, timeout_s: float) -> bool:
        """Block until every job submitted so far ran or failed; False after ``timeout_s`` s.

        ``Queue.join()`` with a time limit: the same condition and count it waits on.
        """
        done = self._jobs.all_tasks_done
        with done:
            return done.wait_for(lambda: not self._jobs.unfinished_tasks, timeout_s)

    def close(self, timeout_s: float) -> bool:
        """``wait``, then end the thread; on a timeout (False) the thread dies with the process."""
        if not self.wait(timeout_s):
            return False
        try:
            self._jobs.put_nowait(_STOP)
        except queue.Full:  # submitted to since the wait: those jobs run, the thread stays
            return True
        self._thread.join(timeout=1.0)
        return True

    def _run(self) -> None:
        while (item := self._jobs.get()) is not _STOP:
            what, job = item
            try:
                job()
            except Exception as exc:  # background work must never take the rank down
                try:
                    self._on_error(what, exc)
                except Exception:  # the worker must go on, and task_done must still be called
                    log.exception("error handler failed for %s", what)
            finally:
                self._jobs.task_done()
        self._jobs.task_done()
