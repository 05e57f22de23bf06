"""Which rank died first, how, and what to do: the words the local launcher and the batch
script print when a job attempt fails (pure, but for ``last_committed``).

A dead rank's peers are killed right after it (``srun --kill-on-bad-exit``, the local
launcher's same rule), so every rank of a failed attempt ends non-zero; only the first one
says what happened. On Slurm it is the first ``srun: error: <node>: task <n>: <how>`` line
srun writes to the batch script's stderr (its ``<how>`` is ``strsignal``'s text or "Exited
with exit code N"); locally, the first rank to fail records itself (``FIRST_EXIT``).
"""
from __future__ import annotations

import contextlib
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launch.resume import newest_committed
from launch.run_folder import EXIT_TRANSIENT, REQUEUE_REQUEST
from launch.schema import RunConfig

FIRST_EXIT = "first-exit"
"""File in ``run_dir``: ``<rank> <node> <exit code>`` of the first local rank that failed."""
LAUNCH_COMMAND = "launch-command"
"""File in ``run_dir``: the command that launched the run, which also resumes it."""
_SRUN_ERROR = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.+)$", re.M)
_BY_TEXT = {signal.strsignal(s): s for s in signal.Signals if signal.strsignal(s)}
_NODE_FAILURE = re.compile(r"^srun: error: Node failure on (\S+)$", re.M)
_EXITED = re.compile(r"Exited with exit code (\d+)")


def signal_name(code: int) -> Optional[str]:
    """The signal behind a shell exit status (128 + its number), e.g. ``SIGKILL``; else None."""
    return signal.Signals(code - 128).name if 128 < code < 128 + 65 else None


@dataclass(frozen=True)
class RankExit:
    rank: str
    """A rank, or srun's task range (``0-3``) when several ended together."""
    node: str
    code: int
    """As the shell reports it: 128 + the signal's number for a rank killed by one."""

    def how(self) -> str:
        name = signal_name(self.code)
        if name:
            oom = (f" (SIGKILL is often the kernel's OOM killer: look for 'Out of memory' in "
                   f"dmesg on {self.node})" if name == "SIGKILL" else "")
            return f"was killed by {name}{oom}"
        if self.code == EXIT_TRANSIENT:
            return f"exited with code {self.code} (a hang or a lost peer; its log says which)"
        return f"exited with code {self.code} (its log has the error)"


def first_srun_error(text: str) -> Optional[RankExit]:
    """The first task failure srun reported in ``text`` (a batch script's stderr)."""
    for node, tasks, how in _SRUN_ERROR.findall(text):
        exited = _EXITED.fullmatch(how.strip())
        if exited:
            return RankExit(tasks, node, int(exited.group(1)))
        if how.strip() in _BY_TEXT:
            return RankExit(tasks, node, 128 + _BY_TEXT[how.strip()])
    return None


def failed_node(text: str) -> Optional[str]:
    """The node srun reported failed in ``text``, if any."""
    found = _NODE_FAILURE.search(text)
    return found.group(1) if found else None


def read_from(path: str, offset: int) -> str:
    """``path`` from byte ``offset`` on; '' when it cannot be read."""
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        f.seek(offset)
        return f.read()
    return ""


def last_committed(checkpoint_dir: str) -> str:
    folder = newest_committed(Path(checkpoint_dir))
    return (f"the last committed checkpoint is {folder}" if folder
            else f"no checkpoint was committed in {checkpoint_dir}")


def describe(died: Optional[RankExit], code: int, checkpoint: str, then: str) -> str:
    """One paragraph: who died and how, the last committed checkpoint, and what happens next
    (``then``: "the requeued job resumes from it" or the command that does)."""
    who = (f"rank {died.rank} on {died.node} {died.how()}; the other ranks were stopped after "
           "it" if died else f"the job step ended with exit code {code} (no rank's end was seen)")
    return f"{who}; {checkpoint}; {then}"


def died(run_dir: Path, srun_log: str | None, offset: int) -> RankExit | None:
    """The first rank to fail: from srun's messages in this attempt's part of the batch
    script's stderr (from byte ``offset``), or as the local launcher recorded it."""
    if srun_log:
        return first_srun_error(read_from(srun_log, offset))
    with contextlib.suppress(OSError, ValueError):
        rank, node, code = (run_dir / FIRST_EXIT).read_text().split()
        return RankExit(rank, node, int(code))
    return None


def what_happened(cfg: RunConfig, exit_code: int, srun_log: str | None = None,
                  offset: int = 0) -> str:
    """Who died first and how, the last committed step, and what resumes the run."""
    run_dir = Path(cfg.run_dir)
    command = run_dir / LAUNCH_COMMAND
    if (run_dir / REQUEUE_REQUEST).exists():
        then = "the job is requeued and resumes from there"
    elif command.is_file():
        then = f"to resume: {command.read_text().strip()}"
    else:
        then = "to resume, launch again with the same name and checkpoint.dir"
    return describe(died(run_dir, srun_log, offset), exit_code,
                    last_committed(cfg.checkpoint.dir), then)
