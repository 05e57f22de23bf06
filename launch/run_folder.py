"""The run folder's contract between the launcher, the batch script and the ranks: the names
of the files through which they tell each other what happened, and the exit code of a failure
a restart may cure. Re-exported by ``launch.schema``."""
from __future__ import annotations

import shutil
from pathlib import Path

RUN_CONFIG = "config.yaml"
"""File in ``run_dir``: the resolved config every rank (and ``megatron_ext.job_end``) reads."""
ALERTS_SENT = "alerts-sent"
"""Folder in ``run_dir`` where the first rank to send a job-wide alert (a failure, a hang) of a
job attempt claims it, so 256 ranks hitting the same failure post one alert; cleared for each
attempt by the launcher and the batch script."""
REQUEUE_REQUEST = "requeue-request"
"""File in ``run_dir`` rank 0 creates after saving on the pre-timeout signal; the batch script
then requeues the job. A file, not an exit code: ranks exit 0 so that ``srun
--kill-on-bad-exit`` never cuts a peer's clean exit short."""
NO_RESTART = "no-restart"
"""File in ``run_dir`` a rank creates, with the reason, when it stops on a failure that would
repeat on a rerun from the same checkpoint (NaN stop, corrupt checkpoint, rejected config, out
of memory): the batch script then never requeues the job. A file, because ``srun`` reports the
exit of a peer it killed, not the first failure's."""
EXIT_TRANSIENT = 75
"""A rank's exit status for a failure a restart may cure (EX_TEMPFAIL): the watchdog's hang, a
collective that timed out or lost its peer. The batch script requeues it, up to
``cluster.max_restarts`` times."""
FAILURES = "failures"
"""File in ``run_dir``: how many attempts of this launch failed and were requeued (the batch
script's count for ``cluster.max_restarts``; time-limit requeues are not failures)."""

HEALTHCHECK_LOG = "healthcheck.log"
"""File in ``run_dir``: the node health check's output of the job attempt's every node, where the
batch script runs it in a step of its own (clusters without HyperPod's auto-resume)."""
BAD_NODES = "bad-nodes"
"""File in ``run_dir`` slurm/node_failed.sh writes after a failed node health check: the nodes,
why, and whether they were drained and the job requeued without them; the batch script's
``megatron_ext.job_end`` posts it as the failure alert."""
ATTEMPT_LOG_FROM = "attempt-log-from"
"""File in ``run_dir``: where the running attempt's part of the batch stderr starts; removed by
its teardown, so the next attempt finds it only after Slurm ended the job itself (a node
failure) and reports that end."""


def clear_alert_claims(run_dir: Path | str) -> None:
    """A new attempt of the job alerts afresh: the launcher, and rank 0 under HyperPod's
    ``srun --auto-resume`` (which retries the step without the batch script), call this."""
    shutil.rmtree(Path(run_dir) / ALERTS_SENT, ignore_errors=True)
