"""The sbatch script of a Slurm run, rendered by submitit's own template (pure: no I/O, no env).

``slurm_params`` gives the keyword arguments of submitit's SlurmExecutor; ``render`` feeds them
to the same function the executor calls at submission, so ``launch.dry_run=true`` prints exactly
what ``sbatch`` receives. Each rank runs ``python -m megatron_ext.train <config.yaml>`` under
srun directly (no pickled submitit wrapper), so its signal handler sees Slurm's signals.

Values reach the script in two ways: ``#SBATCH`` lines (submitit ``shlex.quote``s them; a line
break there would end the directive and start a shell line, so those must be one line) and the
shell body (every user value goes through ``shlex.quote`` / ``shlex.join`` here). Nothing is
read from the environment: secrets such as WANDB_API_KEY and SLACK_WEBHOOK_URL reach the ranks
because Slurm propagates the submitter's environment (``--export=ALL``, its default).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from submitit.slurm.slurm import _make_sbatch_string

from launch.schema import (ALERTS_SENT, ATTEMPT_LOG_FROM, FAILURES, NO_RESTART, REQUEUE_REQUEST,
                           RUN_CONFIG, ClusterConfig, RunConfig)
from launch.run_folder import BAD_NODES, HEALTHCHECK_LOG

REPO = Path(__file__).resolve().parent.parent


def rank_python(cluster: ClusterConfig, launcher_python: str) -> str:
    """The interpreter of every rank: the shared venv's, the container's, or the launcher's."""
    if cluster.venv:
        return str(Path(cluster.venv) / "bin" / "python")
    return "python" if cluster.container_image else launcher_python


def rank_argv(config_path: Path, python: str) -> list[str]:
    return [python, "-m", "megatron_ext.train", str(config_path)]


def _batch_stderr(cfg: RunConfig) -> str:
    """The batch script's stderr (submitit's ``logs/<job id>/<job id>_0_log.err``), where srun
    reports which task ended how; appended to by every attempt of a requeued job."""
    return (shlex.quote(str(Path(cfg.run_dir) / "logs")) +
            '/"${SLURM_JOB_ID}/${SLURM_JOB_ID}_0_log.err"')


def _setup_lines(cfg: RunConfig, repo: Path, python: str) -> list[str]:
    c = cfg.cluster
    lines = [
        "# The submitter's environment reaches every rank (--export=ALL, Slurm's default):",
        "# secrets such as WANDB_API_KEY and SLACK_WEBHOOK_URL are read there, never written here.",
        'echo "job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}, restart ${SLURM_RESTART_COUNT:-0}"',
        "# where this attempt's part of the stderr starts: job_end reads srun's reports from there",
        f"attempt_log_from=$(stat -c %s {_batch_stderr(cfg)} 2>/dev/null || echo 0)",
        # A requeued attempt reuses the job id and step ids: slurmctld's retried signal for the
        # previous attempt's step would kill this one's (slurm/settle.sh). 150 s: two of its
        # 60-s RPC retries, each bounded by MessageTimeout (10 s default).
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then bash '
        + shlex.quote(str(repo / "slurm" / "settle.sh")) + " 150; fi",
    ]
    env_files = ["megatron"] + ([c.interconnect] if c.interconnect != "none" else [])
    lines += ["source " + shlex.quote(str(repo / "slurm" / "env" / f"{name}.sh"))
              for name in env_files]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(c.env.items())]
    if c.container_image and not c.venv:
        lines.append(_image_check_line(c))
    # Under HyperPod's auto-resume the first rank of each node runs the check inside the
    # training step (megatron_ext/node_check.py): a failure in a step of its own would end the
    # job, where a failed training step gets its node replaced and is retried.
    if c.healthcheck and not c.auto_resume:
        lines += _healthcheck_lines(cfg, repo, python)
    return lines


def _image_check_line(c: ClusterConfig) -> str:
    """One task of the image imports the rank code first: an image without this package (or
    its dependencies) stops the job with one line naming the field, not a traceback per rank."""
    probe = ["srun", "--nodes=1", "--ntasks=1", *_container_args(c), "python", "-c",
             "import megatron_ext.train"]
    why = (f"cluster.container_image={c.container_image} cannot run the ranks: import "
           "megatron_ext.train failed in it; build the image from slurm/container/Dockerfile "
           "(README: A container image for HyperPod)")
    return f"{shlex.join(probe)} || {{ echo {shlex.quote(why)} >&2; exit 1; }}"


def _healthcheck_lines(cfg: RunConfig, repo: Path, python: str) -> list[str]:
    """One check per node; on failure slurm/node_failed.sh names, drains and excludes the bad
    nodes and has job_end post what it did; the job stops before any rank starts."""
    c, run_dir = cfg.cluster, Path(cfg.run_dir)
    log = str(run_dir / HEALTHCHECK_LOG)
    check = ["srun", f"--ntasks={c.nodes}", "--ntasks-per-node=1", "bash",
             str(repo / "slurm" / "healthcheck.sh"), *c.healthcheck_args()]
    # job_end (exit code 1) goes last: node_failed.sh posts its report before a requeue
    failed = ["bash", str(repo / "slurm" / "node_failed.sh"), log, str(c.nodes), str(run_dir),
              str(c.max_restarts), "1" if c.requeue else "0", *_job_end_argv(cfg, python), "1"]
    return [f"{shlex.join(check)} 2>&1 | tee {shlex.quote(log)}; checked=${{PIPESTATUS[0]}}",
            f'if [ "$checked" -ne 0 ]; then {shlex.join(failed)}; exit 1; fi']


def _attempt_mark(cfg: RunConfig) -> str:
    return shlex.quote(str(Path(cfg.run_dir) / ATTEMPT_LOG_FROM))


def _untold_end_lines(cfg: RunConfig, python: str) -> list[str]:
    """An attempt Slurm ended itself (a node failure: the batch script is killed with the job,
    its teardown never runs) left its mark: the next attempt reports it (``job_end --node-failure``)."""
    mark = _attempt_mark(cfg)
    return [f'if [ -s {mark} ]; then {shlex.join(_job_end_argv(cfg, python))} 0 --node-failure '
            f'--srun-log {_batch_stderr(cfg)} --from "$(cat {mark})" || true; fi',
            f'echo "$attempt_log_from" > {mark}']


def _requeue_request(cfg: RunConfig) -> str:
    return shlex.quote(str(Path(cfg.run_dir) / REQUEUE_REQUEST))


def _restart_lines(cfg: RunConfig) -> list[str]:
    """A failed attempt is requeued unless a rank recorded that a rerun would fail the same way
    (``NO_RESTART``), at most ``cluster.max_restarts`` times (counted in ``FAILURES``).

    Any other failure counts as one a restart may cure: a rank exits ``EXIT_TRANSIENT`` for a
    hang or a lost peer, and a rank killed by a signal (a node failure) can leave nothing. srun's
    status cannot tell them apart: it reports the peers it terminated (143), not the first exit.
    """
    run_dir = Path(cfg.run_dir)
    no_restart, failures = (shlex.quote(str(run_dir / name)) for name in (NO_RESTART, FAILURES))
    limit = cfg.cluster.max_restarts
    return [
        'gave_up=""',
        f'if [ "$rc" -ne 0 ] && [ -e {no_restart} ]; then',
        f'  echo "exit $rc: not requeued, a rerun would fail the same way: $(cat {no_restart})" >&2',
        'elif [ "$rc" -ne 0 ]; then',
        f'  failures=$(( $(cat {failures} 2>/dev/null || echo 0) + 1 )); echo "$failures" > {failures}',
        f'  if [ "$failures" -le {limit} ]; then',
        f'    echo "exit $rc: restart $failures of cluster.max_restarts={limit}" >&2; touch {_requeue_request(cfg)}',
        f'  else gave_up="$failures"; echo "exit $rc: failed $failures times, not requeued (cluster.max_restarts={limit})" >&2; fi',
        'fi',
    ]


def _teardown_lines(cfg: RunConfig, python: str) -> list[str]:
    """After srun: requeue a job whose ranks saved for the time limit, or that failed in a way a
    restart may cure (``_restart_lines``).

    The batch shell (on the host) requeues rather than a rank, because inside a container
    ``scontrol`` is not available; rank 0 asks by creating ``REQUEUE_REQUEST`` in the run folder.
    A step that failed without any rank saying why (a rank killed by the OOM killer), or a job
    given up after ``cluster.max_restarts``, gets the alert of ``megatron_ext.job_end``: run by
    the host's Python where it has the ranks' (a venv, the launcher's), else in one task of the
    container image (HyperPod), whose Python the host lacks.
    """
    lines = ["rc=$?"] + (_restart_lines(cfg) if cfg.cluster.requeue else ['gave_up=""'])
    lines.append(f'if [ "$rc" -ne 0 ]; then {shlex.join(_job_end_argv(cfg, python))} "$rc" '
                 f'$gave_up --srun-log {_batch_stderr(cfg)} --from "$attempt_log_from" || true; fi')
    lines.append(f"rm -f {_attempt_mark(cfg)}  # this attempt's end is told")
    if cfg.cluster.requeue:
        request = _requeue_request(cfg)
        lines.append(f'if [ -e {request} ]; then rm -f {request}; scontrol requeue "$SLURM_JOB_ID"; fi')
    return lines + ['exit "$rc"']


def _job_end_argv(cfg: RunConfig, python: str) -> list[str]:
    """``megatron_ext.job_end`` by the host's Python where it has the ranks' (a venv, the
    launcher's), else in one task of the container image, whose Python the host lacks."""
    c = cfg.cluster
    job_end = [rank_python(c, python), "-m", "megatron_ext.job_end",
               str(Path(cfg.run_dir) / RUN_CONFIG)]
    if c.container_image and not c.venv:
        return ["srun", "--nodes=1", "--ntasks=1", *_container_args(c)] + job_end
    return job_end


def _srun_args(c: ClusterConfig) -> list[str]:
    # One rank that dies or exits non-zero ends the step: its peers would otherwise sit in a
    # collective until the timeout, and a frozen rank would hold the job to its time limit.
    # No CPU binding: srun's default binds each task to cores without regard to which socket
    # its GPU hangs off; AWS's nccl-tests on p4d/p5 run with --cpu-bind=none.
    args: list[str] = ["--kill-on-bad-exit=1", "--cpu-bind=none"]
    if c.auto_resume:
        args.append("--auto-resume=1")
    return args + _container_args(c)


def _container_args(c: ClusterConfig) -> list[str]:
    """pyxis's flags that run a step in ``cluster.container_image``."""
    args = [f"--container-image={c.container_image}"] if c.container_image else []
    if c.container_mounts:
        args.append(f"--container-mounts={c.container_mounts}")
    return args


def slurm_params(cfg: RunConfig, python: str, repo: Path = REPO) -> dict[str, Any]:
    """SlurmExecutor parameters: one task per GPU (rank), whole nodes, signal, requeue, setup."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": cfg.name, "nodes": c.nodes, "ntasks_per_node": c.gpus_per_node,
        "time": c.timeout_min, "wckey": None,
        "setup": _setup_lines(cfg, repo, python) + _untold_end_lines(cfg, python) + [
            "rm -rf " + " ".join(shlex.quote(str(Path(cfg.run_dir) / name)) for name in
                                 (REQUEUE_REQUEST, ALERTS_SENT, NO_RESTART, BAD_NODES))],
        "teardown": _teardown_lines(cfg, python),
        "srun_args": _srun_args(c),
        # submitit's own --signal (USR2@90) is for its pickled wrapper, which is not used here.
        "additional_parameters": {"signal": c.signal,
                                  "requeue" if c.requeue else "no-requeue": True,
                                  # the script starts once every node booted (cloud nodes
                                  # power up on demand), not when the first one did
                                  "wait_all_nodes": 1},
    }
    if c.cpus_per_task:  # 0: not known yet (a dry run where sinfo could not answer)
        params["cpus_per_task"] = c.cpus_per_task
    for key in ("partition", "account", "qos"):
        if getattr(c, key):
            params[key] = getattr(c, key)
    if c.exclusive:  # the whole node, its memory too (as AWS's NeMo sample asks)
        params["exclusive"] = True
        params["mem"] = "0"
    if c.gpus_per_node_directive:
        params["gpus_per_node"] = c.gpus_per_node
    return params


def header_problems(cfg: RunConfig, folder: Path) -> list[str]:
    """Values that become ``#SBATCH`` lines must be one line, or the rest would run as shell."""
    values = {"name": cfg.name, "run_dir": str(folder), **{
        f"cluster.{k}": getattr(cfg.cluster, k) for k in ("partition", "account", "qos")}}
    return [f"{key}={value!r} must be a single line to go into the sbatch script"
            for key, value in values.items() if any(ch in value for ch in "\n\r\0")]


def render(cfg: RunConfig, config_path: Path, folder: Path, python: str,
           repo: Path = REPO) -> str:
    """The sbatch script that ``submit`` hands to ``sbatch`` for this run."""
    problems = header_problems(cfg, folder)
    if problems:
        raise ValueError("; ".join(problems))
    command = shlex.join(rank_argv(config_path, rank_python(cfg.cluster, python)))
    return _make_sbatch_string(command=command, folder=folder, **slurm_params(cfg, python, repo))
