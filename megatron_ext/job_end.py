"""The alert of last resort: a job attempt ended badly and no rank said why.

A rank killed by a signal (the kernel's OOM killer, a node failure, SIGKILL) runs no Python
and alerts nothing; ``srun --kill-on-bad-exit`` (and the local launcher) then kill its peers,
often before they reach their own failure alert. The batch script (after ``srun``) and the
local launcher (after a rank ends) run ``python -m megatron_ext.job_end <config.yaml>
<exit code> [<failures>]``: it posts one failure alert unless a rank already claimed one that
says why the attempt ended (``alerts.ONCE_PER_JOB`` in ``run_dir/alerts-sent/``); with
``<failures>``, the batch script gave the job up after that many failed attempts
(``cluster.max_restarts``), which is always said. After a failed node health check the batch
script runs it before any rank started; slurm/node_failed.sh's report (``run_dir/bad-nodes``:
which nodes, why, drained or not, requeued without them or not) is then the alert.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from launch import rank_exit
from launch.config import load
from launch.run_folder import BAD_NODES
from launch.schema import RunConfig
from megatron_ext import alerts

PLANNED_EXITS = (0, 128 + signal.SIGTERM)
"""0: finished, or saved on the pre-timeout signal; 143: Slurm ended the job (preemption,
requeue, scancel) after the ranks saved."""


def needs_alert(exit_code: int, claimed: list[str]) -> bool:
    """An unplanned end that no rank explained (``claimed``: the kinds already posted)."""
    return exit_code not in PLANNED_EXITS and not set(claimed) & set(alerts.ONCE_PER_JOB)


def explain(exit_code: int) -> str:
    name = rank_exit.signal_name(exit_code)
    died = f"killed by {name}" if name else f"ended with exit code {exit_code}"
    return (f"a rank {died} and no rank reported an error: out of memory (the kernel's OOM "
            "killer), a node failure, or a signal; the rank logs say which")


def gave_up(failures: int, max_restarts: int, exit_code: int) -> str:
    return (f"the job failed {failures} times (last exit code {exit_code}) and is not requeued "
            f"again (cluster.max_restarts={max_restarts}); the rank logs of each attempt say why")


def _node_failure(cfg: RunConfig, previous: str) -> int:
    """The previous attempt ended with its node: Slurm killed the batch script with the job
    (NODE_FAIL) and requeued it, so no teardown told anyone. Said once, by the next attempt."""
    node = rank_exit.failed_node(previous)
    if node is None:
        return 0
    message = (f"node {node} failed and Slurm requeued the job; "
               f"{rank_exit.last_committed(cfg.checkpoint.dir)}, which this attempt resumes")
    print(f"previous attempt: {message}", file=sys.stderr, flush=True)
    alerts.Alerts.from_config(cfg, rank=alerts.LAUNCHER).send_now(alerts.FAILURE, message,
                                                                   rank=alerts.LAUNCHER)
    return 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_ext.job_end")
    parser.add_argument("config")
    parser.add_argument("code", type=int)
    parser.add_argument("failures", type=int, nargs="?", default=0)
    parser.add_argument("--srun-log", help="the batch script's stderr, where srun reports tasks")
    parser.add_argument("--from", dest="offset", type=int, default=0,
                        help="where this attempt's part of --srun-log starts (bytes)")
    parser.add_argument("--node-failure", action="store_true",
                        help="the previous attempt, which Slurm ended itself: did a node fail?")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    cfg, exit_code = load(args.config), args.code
    if args.node_failure:
        return _node_failure(cfg, rank_exit.read_from(args.srun_log or "", args.offset))
    # srun's status can be that of the peers it stopped (143) after one died (SIGKILL, a crash):
    # the first task srun saw end says whether the attempt's end was planned
    first = rank_exit.died(Path(cfg.run_dir), args.srun_log, args.offset) if args.srun_log \
        else None
    exit_code = first.code if first else exit_code
    if exit_code in PLANNED_EXITS and args.failures <= 1:  # the script gave up: always said
        return 0
    claims = alerts.claims_dir(cfg)
    claimed = [p.name for p in claims.iterdir()] if claims.is_dir() else []
    bad_nodes = Path(cfg.run_dir) / BAD_NODES
    report = bad_nodes.read_text().strip() if bad_nodes.is_file() else ""
    if report:  # the check stopped the attempt before any rank started: every claim is the
        alerts.clear_claims(cfg)  # previous attempt's, and this is always said
        message = "node health check failed: " + "; ".join(report.splitlines())
    else:
        story = rank_exit.what_happened(cfg, exit_code, args.srun_log, args.offset)
        print(f"job attempt failed: {story}", file=sys.stderr, flush=True)
        if args.failures > 1:  # kept failing; with max_restarts=0 the first failure's own
            # alert (or explain's) is the only one
            message = gave_up(args.failures, cfg.cluster.max_restarts, args.code)
        elif needs_alert(exit_code, claimed):
            message = f"{explain(exit_code)}: {story}"
        else:
            return 0
    alerts.Alerts.from_config(cfg, rank=alerts.LAUNCHER).send_now(alerts.FAILURE, message,
                                                                   rank=alerts.LAUNCHER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
