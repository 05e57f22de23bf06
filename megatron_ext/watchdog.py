"""Hang detection: a rank that completes no step in time dumps its stacks and exits non-zero.

A hung collective blocks the main thread inside C code where no Python exception can reach
it, so a daemon thread watches the time since the last ``beat()`` and ends the process with
``os._exit``; the non-zero exit ends the Slurm step and lets the job be requeued. Work that is
no step (start-up, checkpoint saves) runs in a ``section`` with a bound of its own, as NVRx's
setup/step/checkpointing sections do, and stays out of the step statistic.
"""
from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import socket
import sys
import threading
import time
from pathlib import Path
from collections.abc import MutableMapping
from typing import Callable, Iterator, Optional, Union

from launch.schema import EXIT_TRANSIENT, RunConfig
from launch.watch_schema import WatchdogConfig


EXIT_CODE_HANG = EXIT_TRANSIENT
"""Exit status of a rank the watchdog ended (EX_TEMPFAIL: a retry may succeed)."""

_CALLBACK_TIMEOUT_S = 30.0  # on_hang (an alert), before_exit (a flush): each at most this


def hang_timeout(cfg: WatchdogConfig, slowest_step_s: Optional[float]) -> float:
    """Seconds without a completed step that count as a hang; None means no step completed."""
    if slowest_step_s is None:
        return cfg.first_step_timeout_s
    if cfg.timeout_s is not None:
        return cfg.timeout_s
    return max(cfg.min_timeout_s, cfg.step_time_factor * slowest_step_s)


class Watchdog:
    """A daemon thread that ends the process when ``beat()`` stops coming."""

    def __init__(self, cfg: WatchdogConfig, *, rank: int, dump_dir: Optional[Path] = None,
                 on_hang: Optional[Callable[[str], None]] = None) -> None:
        self._cfg, self._rank, self._on_hang = cfg, rank, on_hang
        self._dump_dir = dump_dir
        self._last_beat = time.monotonic()  # start-up counts against first_step_timeout_s
        self._beats, self._step = 0, 0
        self._slowest_step_s: Optional[float] = None
        self._section: Optional[tuple[str, float, float]] = None  # name, start, timeout
        self.context: Optional[Callable[[], str]] = None
        """More for the hang message, e.g. the last committed checkpoint; set by the loop."""
        self.before_exit: Optional[Callable[[], None]] = None
        """Flushes records (rank 0's W&B run) before ``os._exit`` skips every cleanup."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: RunConfig, *, rank: int, run_dir: Optional[Path] = None,
                    on_hang: Optional[Callable[[str], None]] = None
                    ) -> Union["Watchdog", "NullWatchdog"]:
        """``on_hang`` gets a one-line message, e.g. ``partial(alerts.send_now, HANG, rank=r)``."""
        if not cfg.resilience.watchdog.enabled:
            return NullWatchdog()
        return cls(cfg.resilience.watchdog, rank=rank,
                   dump_dir=Path(run_dir) if run_dir is not None else None, on_hang=on_hang)

    def beat(self, step: int = 0) -> None:
        """Call after every completed step (the global ``step``); the gap since the last beat,
        or since the last section ended, is that step's time."""
        now = time.monotonic()
        if self._beats:
            step_s = now - self._last_beat
            if self._slowest_step_s is None or step_s > self._slowest_step_s:
                self._slowest_step_s = step_s
        self._last_beat = now
        self._beats, self._step = self._beats + 1, step

    @contextlib.contextmanager
    def section(self, name: str, timeout_s: float) -> Iterator[None]:
        """Work that is no step (start-up, a save): a hang if it outlasts ``timeout_s``; its
        time is not the next step's."""
        self._section = (name, time.monotonic(), timeout_s)
        try:
            yield
        finally:
            self._section = None
            self._last_beat = time.monotonic()

    @property
    def timeout_s(self) -> float:
        return hang_timeout(self._cfg, self._slowest_step_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _watch(self) -> None:
        while True:
            section = self._section
            name, since, timeout = section or ("a training step", self._last_beat, self.timeout_s)
            idle = time.monotonic() - since
            if idle > timeout:
                self._fire(name, idle, timeout)
            # wake often enough to fire within ~10% of the timeout, at most once a second
            if self._stop.wait(min(1.0, max(0.01, timeout / 10))):
                return

    def _fire(self, what: str, idle_s: float, timeout_s: float) -> None:
        dumps = (f"; every thread's stack in {self._dump_dir}/hang-stacks-rank{self._rank}.txt "
                 "(each rank writes its own: the rank outside a collective is the stuck one)"
                 if self._dump_dir is not None else "; every thread's stack in its log")
        context = f"; {self._call_context()}" if self.context is not None else ""
        message = (f"rank {self._rank} on {socket.gethostname()}: {what} did not end within "
                   f"{timeout_s:.0f} s ({idle_s:.0f} s; last completed step {self._step}, "
                   f"{self._beats} in this attempt){context}{dumps}; exiting with "
                   f"{EXIT_CODE_HANG} for a restart")
        print(f"WATCHDOG: {message}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self._dump_dir is not None:
            self._dump_to_files(message)
        if self._on_hang is not None:
            self._call_bounded("on_hang", functools.partial(self._on_hang, message))
        if self.before_exit is not None:
            self._call_bounded("before_exit", self.before_exit)
        sys.stderr.flush()
        os._exit(EXIT_CODE_HANG)

    def _call_context(self) -> str:
        try:
            return self.context()
        except Exception as e:  # the exit matters more than the detail
            return f"(no context: {type(e).__name__})"

    def _dump_to_files(self, message: str) -> None:
        try:
            self._dump_dir.mkdir(parents=True, exist_ok=True)
            with open(self._dump_dir / f"hang-stacks-rank{self._rank}.txt", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            _dump_nccl_flight_recorder(self._dump_dir / f"nccl-trace-rank{self._rank}.pkl")
        except Exception as e:  # the exit below matters more than the files
            print(f"WATCHDOG: could not write dumps: {e!r}", file=sys.stderr, flush=True)

    @staticmethod
    def _call_bounded(name: str, callback: Callable[[], None]) -> None:
        """Run a callback on its own thread so a stuck alert or flush cannot block the exit."""
        def call() -> None:
            try:
                callback()
            except Exception as e:
                print(f"WATCHDOG: {name} failed: {e!r}", file=sys.stderr, flush=True)

        thread = threading.Thread(target=call, name=f"watchdog-{name}", daemon=True)
        thread.start()
        thread.join(_CALLBACK_TIMEOUT_S)


def _dump_nccl_flight_recorder(path: Path) -> None:
    """NCCL's record of recent collectives shows which one each rank is stuck in.

    Only when torch is loaded with CUDA; GPU ranks turn the recorder on at start
    (``record_collectives``).
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is not None:
        path.write_bytes(dump())


FLIGHT_RECORDER_ENV = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")  # new, old name
FLIGHT_RECORDER_ENTRIES = 2000  # collectives kept per rank; torch's tutorial value


def record_collectives(environ: MutableMapping[str, str] = os.environ) -> None:
    """Turn NCCL's flight recorder on, so the hang dump holds the collectives each rank was in.

    Must run before the NCCL process group exists; a size the job exported wins.
    """
    for name in FLIGHT_RECORDER_ENV:
        environ.setdefault(name, str(FLIGHT_RECORDER_ENTRIES))


class NullWatchdog:
    """Watchdog switched off: same interface, does nothing."""

    timeout_s = float("inf")
    context = None

    def beat(self, step: int = 0) -> None:
        pass

    @contextlib.contextmanager
    def section(self, name: str, timeout_s: float) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass
