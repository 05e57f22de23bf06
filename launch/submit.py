"""Turn a validated run into a submitit job: local processes (default) or a Slurm allocation.

``rank_command``, ``executor_params`` and ``dry_run_text`` are pure; ``submit`` and ``follow``
do the I/O. Every rank runs ``python -m megatron_ext.train <run_dir>/config.yaml`` as an argv
list; on Slurm, launch/sbatch.py renders (and quotes) the script around it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import submitit

from launch import rank_exit, sbatch
from launch.config import ConfigError, to_yaml
from launch.planning import time_limit
from launch.schema import RUN_CONFIG, RunConfig


def rank_command(config_path: Path, python: str = sys.executable) -> list[str]:
    return sbatch.rank_argv(config_path, python)


def slurm_folder(cfg: RunConfig) -> Path:
    """Per-job log folder, ``logs/<job id>/`` (submitit fills %j), one per submission."""
    return Path(cfg.run_dir) / "logs" / "%j"


def executor_params(cfg: RunConfig, python: str = sys.executable) -> dict[str, Any]:
    """submitit parameters: one task per rank; on a GPU node one task per GPU."""
    c = cfg.cluster
    if c.kind == "slurm":
        return sbatch.slurm_params(cfg, python)
    return {"nodes": c.nodes, "tasks_per_node": c.gpus_per_node, "timeout_min": c.timeout_min,
            "name": cfg.name}


def shared_fs_problems(cfg: RunConfig) -> list[str]:
    """Paths the compute nodes read or write must live on ``cluster.shared_dir`` when it is set."""
    shared = cfg.cluster.shared_dir
    if cfg.cluster.kind != "slurm" or not shared:
        return []
    paths = {"run_dir": cfg.run_dir, "checkpoint.dir": cfg.checkpoint.dir,
             "data.tokenizer": cfg.data.tokenizer,
             **{f"data.sources[{i}].path": s.path for i, s in enumerate(cfg.data.sources)},
             **{f"data.validation[{i}].path": s.path for i, s in enumerate(cfg.data.validation)}}
    return [f"{key}={path} is not under cluster.shared_dir={shared}; the compute nodes cannot "
            "reach it (launch from the shared filesystem, or point the path there)"
            for key, path in paths.items() if path and not Path(path).is_relative_to(shared)]


def node_path_problems(cfg: RunConfig, repo: Path = sbatch.REPO) -> list[str]:
    """What every node runs must exist, and be on ``cluster.shared_dir`` when it is set: the
    repo checkout (the batch script sources slurm/ from it, the ranks import it), the venv,
    and a container image given as a file (not a registry reference such as ``nvcr.io#...``)."""
    c = cfg.cluster
    if c.kind != "slurm":
        return []
    paths = {"the repo checkout": str(repo)}
    out = []
    if c.venv:
        paths["cluster.venv"] = c.venv
        if not (Path(c.venv) / "bin" / "python").exists():
            out.append(f"cluster.venv={c.venv} has no bin/python here; create the venv on the "
                       "shared filesystem (python -m venv) or leave cluster.venv empty")
    if c.container_image.startswith("/"):
        paths["cluster.container_image"] = c.container_image
        if not Path(c.container_image).is_file():
            out.append(f"cluster.container_image={c.container_image} does not exist; import it "
                       "first (enroot import -o <file>.sqsh dockerd://<image>)")
    if c.shared_dir:
        out += [f"{key}={path} is not under cluster.shared_dir={c.shared_dir}; the compute "
                "nodes cannot read it" for key, path in paths.items()
                if not Path(path).is_relative_to(c.shared_dir)]
    return out


def registered_cpus(partition: str) -> Optional[int]:
    """CPUs Slurm registered for the smallest node of ``partition`` (the default: every node);
    None when ``sinfo`` is missing or reports none."""
    command = ["sinfo", "-h", "-N", "-o", "%c"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    counts = [int(word) for word in out.stdout.split() if word.isdigit()]
    return min(counts) if counts else None


def with_registered_cpus(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """``cluster.cpus_per_task=0`` on Slurm: each rank's share of ``registered_cpus``, or the
    problem saying it could not be asked. A request above what Slurm registered is refused by
    sbatch, so it is never guessed."""
    c = cfg.cluster
    if c.kind != "slurm" or c.cpus_per_task:
        return cfg, []
    cpus = registered_cpus(c.partition)
    where = f"partition {c.partition}" if c.partition else "the default partition"
    if cpus is None or cpus < c.gpus_per_node:
        return cfg, [f"cluster.cpus_per_task=0 takes the CPUs Slurm registered for {where}'s "
                     f"nodes, but sinfo reported {cpus}; set cluster.cpus_per_task (at most the "
                     f"node's CPUs / cluster.gpus_per_node={c.gpus_per_node})"]
    return dataclasses.replace(cfg, cluster=dataclasses.replace(
        c, cpus_per_task=cpus // c.gpus_per_node)), []


def dry_run_text(cfg: RunConfig, python: str = sys.executable) -> str:
    """The resolved config and, on Slurm, the sbatch script a real launch would submit."""
    cfg, cpu_problems = with_registered_cpus(cfg)
    text = to_yaml(cfg)
    if cfg.cluster.kind == "slurm":
        script = sbatch.render(cfg, Path(cfg.run_dir) / RUN_CONFIG, slurm_folder(cfg), python)
        warnings = "".join(f"warning: {p}\n" for p in cpu_problems + shared_fs_problems(cfg)
                           + node_path_problems(cfg))
        text += f"\n{time_limit.describe(cfg)}\n{warnings}# ---- sbatch script ----\n{script}"
    return text


def _local_executor(cfg: RunConfig, folder: Path) -> submitit.Executor:
    if cfg.cluster.debug:
        executor: submitit.Executor = submitit.DebugExecutor(folder=folder)
    else:
        executor = submitit.LocalExecutor(folder=folder)
    params = executor_params(cfg)
    params.pop("name")  # the local executors take no job name
    executor.update_parameters(**params)
    return executor


def _submit_slurm(cfg: RunConfig, config_path: Path) -> submitit.Job:
    """``sbatch`` the rendered script through submitit's SlurmExecutor.

    The ranks run the training module directly (``_submit_command``), not submitit's pickled
    wrapper, which would swallow the pre-timeout signal; so the Job has no result pickle: read
    state with squeue/scontrol and results from the run folder.
    """
    problems = (shared_fs_problems(cfg) + node_path_problems(cfg)
                + sbatch.header_problems(cfg, slurm_folder(cfg)))
    if problems:
        raise ConfigError(problems)
    slurm_folder(cfg).parent.mkdir(parents=True, exist_ok=True)  # where submitit stages the script
    executor = submitit.SlurmExecutor(folder=slurm_folder(cfg))
    executor.update_parameters(**executor_params(cfg))
    argv = rank_command(config_path, sbatch.rank_python(cfg.cluster, sys.executable))
    return executor._submit_command(shlex.join(argv))


def submit(cfg: RunConfig, config_path: Path) -> submitit.Job:
    if cfg.cluster.kind == "slurm":
        return _submit_slurm(cfg, config_path)
    executor = _local_executor(cfg, Path(cfg.run_dir) / "logs")
    return executor.submit(run_rank, rank_command(config_path), str(Path.cwd()))


def run_rank(argv: list[str], cwd: str) -> None:
    """One local rank, as a task of submitit's local executor.

    The rank writes straight to the task's log (no pipe to drain), and when it ends, however it
    ends, its process group is killed: megatron's async-checkpoint worker must not outlive a
    SIGKILLed rank and keep the job alive. A rank that fails ends the job's other ranks too.
    """
    process = subprocess.Popen(argv, cwd=cwd, start_new_session=True)
    try:
        code = process.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    if code != 0:
        _claim_first_exit(Path(argv[-1]).parent, 128 - code if code < 0 else code)
        _kill_peer_ranks()
        # as the batch script does after srun: the alert of last resort (megatron_ext.job_end)
        shell_code = 128 - code if code < 0 else code  # a signal, as the shell reports it
        subprocess.run([argv[0], "-m", "megatron_ext.job_end", argv[-1], str(shell_code)],
                       cwd=cwd, check=False)
        raise RuntimeError(f"rank exited with code {code}: {shlex.join(argv)}")


def _claim_first_exit(run_dir: Path, shell_code: int) -> None:
    """Record this rank as the first that failed, unless one already is: its peers are killed
    next (``_kill_peer_ranks``) and would otherwise look as dead as it does."""
    rank = os.environ.get("SUBMITIT_LOCAL_GLOBALID", "?")
    with contextlib.suppress(FileExistsError, OSError):
        with open(run_dir / rank_exit.FIRST_EXIT, "x") as f:
            f.write(f"{rank} {socket.gethostname()} {shell_code}\n")


def _kill_peer_ranks() -> None:
    """What ``srun --kill-on-bad-exit`` does on Slurm: one failed rank ends the whole job.

    Peers of a dead rank wait in a collective until ``resilience.collective_timeout_s``; a
    frozen rank (SIGSTOP, a stuck node) never exits, and submitit's local controller waits for
    every task, so the job would never end. The peers are the other tasks of that controller
    (this task's parent); each runs its rank as a session leader (``run_rank``), so killing
    the rank's group takes its checkpoint writer along. SIGKILL ends stopped processes too.
    """
    controller = os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    if controller is None or int(controller) != os.getppid():
        return  # not a local-executor task (the debug executor runs in the launcher)
    for task in psutil.Process(os.getppid()).children():
        if task.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            for rank in task.children():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(rank.pid, signal.SIGKILL)


def follow(job: submitit.Job, cfg: RunConfig, poll_s: float = 0.5) -> int:
    """Stream rank 0's output while the job runs; the exit code says whether every rank
    finished, and a failure is explained (``rank_exit``: which rank died first and how)."""
    stdout = job.task(0).paths.stdout
    offset = 0
    while True:
        done = job.done()
        if stdout.exists():
            with stdout.open() as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            sys.stdout.write(chunk)
            sys.stdout.flush()
        if done:
            break
        time.sleep(poll_s)
    failed = [t for t in range(job.num_tasks) if job.task(t).exception() is not None]
    if failed:
        first = rank_exit.died(Path(cfg.run_dir), None, 0)
        code = first.code if first else 1
        print(f"job failed: {rank_exit.what_happened(cfg, code)}", file=sys.stderr)
    for task in failed:
        print(f"rank {task} failed; its log: {job.task(task).paths.stderr}", file=sys.stderr)
    return 1 if failed else 0
