"""The Slurm job script: golden files, quoting, secrets, and the requeue contract with the ranks.

Rendering is pure, so these run in milliseconds without Slurm. Paths, the interpreter and the
repository location are fixed so the golden files are byte-for-byte reproducible; regenerate
them with ``UPDATE_GOLDEN=1 pytest tests/unit/test_sbatch.py`` and review the diff by eye.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launch import sbatch
from launch.config import with_values
from launch.submit import dry_run_text, executor_params, shared_fs_problems, with_registered_cpus
from launch.run_folder import BAD_NODES, HEALTHCHECK_LOG
from launch.schema import ALERTS_SENT, FAILURES, NO_RESTART, REQUEUE_REQUEST
from megatron_ext.signals import StopSignals
from tests.conftest import REPO, make_config

GOLDEN = REPO / "tests" / "golden"
FIXED_REPO = Path("/opt/slurm-llm")
RUN = Path("/fsx/runs/llama/launches/2025-01-01_00-00-00")


def _render(*overrides: str, run: Path = RUN, repo: Path = FIXED_REPO,
            changes: dict[str, Any] | None = None) -> str:
    """Hostile values go in through ``changes`` (no Hydra override grammar in the way)."""
    cfg = with_values(make_config(*overrides), **{
        "run_dir": str(run), "checkpoint.dir": f"{RUN.parent.parent}/checkpoints", **(changes or {})})
    return sbatch.render(cfg, run / "config.yaml", run / "logs" / "%j", "/usr/bin/python3", repo)


# cluster.cpus_per_task as the launcher resolves it where sinfo reports p5's 192 vCPUs
@pytest.mark.parametrize("golden, overrides", [
    ("hyperpod_p5_4nodes.sbatch", ["cluster=hyperpod_p5", "cluster.nodes=4", "name=llama",
                                   "cluster.cpus_per_task=24"]),
    ("pcs_p5_2nodes.sbatch", ["cluster=pcs_p5", "cluster.nodes=2", "name=llama",
                              "cluster.cpus_per_task=24"]),
])
def test_sbatch_matches_golden_file(golden: str, overrides: list[str]) -> None:
    text = _render(*overrides)
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / golden).write_text(text)
    assert text == (GOLDEN / golden).read_text()


def test_hyperpod_and_pcs_differ_where_the_platforms_do() -> None:
    hyperpod, pcs = _render("cluster=hyperpod_p5"), _render("cluster=pcs_p5")
    assert "--auto-resume=1" in hyperpod and "--auto-resume" not in pcs
    assert "--gpus-per-node" not in hyperpod and "#SBATCH --gpus-per-node=8" in pcs
    assert "--container-image=/fsx/apps/slurm-llm.sqsh" in hyperpod
    assert "/fsx/venvs/slurm-llm/bin/python -m megatron_ext.train" in pcs
    for text in (hyperpod, pcs):
        assert "#SBATCH --exclusive" in text and "#SBATCH --requeue" in text
        assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --ntasks-per-node=8" in text
        assert "source /opt/slurm-llm/slurm/env/efa.sh" in text


def test_the_health_check_runs_where_a_bad_node_gets_replaced_or_excluded() -> None:
    """HyperPod: inside the auto-resumed training step (megatron_ext/node_check.py), never in a
    step of its own, whose failure would end the job. PCS: a step of its own with the
    instance type's EFA devices; on failure node_failed.sh drains and excludes the bad nodes
    and job_end posts its report before the job stops."""
    hyperpod, pcs_p4d = _render("cluster=hyperpod_p5"), _render("cluster=pcs_p4d")
    assert "healthcheck.sh" not in hyperpod and "node_failed.sh" not in hyperpod
    run = "/fsx/runs/llama/launches/2025-01-01_00-00-00"
    assert (f"srun --ntasks=1 --ntasks-per-node=1 bash /opt/slurm-llm/slurm/healthcheck.sh 8 40 4"
            f" 2>&1 | tee {run}/{HEALTHCHECK_LOG}; checked=${{PIPESTATUS[0]}}") in pcs_p4d
    assert (f'if [ "$checked" -ne 0 ]; then bash /opt/slurm-llm/slurm/node_failed.sh '
            f"{run}/{HEALTHCHECK_LOG} 1 {run} 3 1 /fsx/venvs/slurm-llm/bin/python -m "
            f"megatron_ext.job_end {run}/config.yaml 1; exit 1; fi") in pcs_p4d
    no_requeue = _render("cluster=pcs_p4d", "cluster.requeue=false")
    assert f"node_failed.sh {run}/{HEALTHCHECK_LOG} 1 {run} 3 0 /fsx/venvs" in no_requeue
    assert "healthcheck.sh 8 80 0 " in _render("cluster=slurm")  # no EFA: not counted


def test_an_image_without_the_package_stops_the_job_with_one_line_naming_the_field(
        tmp_path: Path) -> None:
    """The setup line runs for real, with a fake ``srun`` whose task fails as python does in an
    image without the package ("No module named megatron_ext")."""
    line = next(text for text in _render("cluster=hyperpod_p5").splitlines()
                if "import megatron_ext" in text)
    srun = tmp_path / "srun"
    for rc in (1, 0):
        srun.write_text(f"#!/bin/bash\necho 'python: No module named megatron_ext' >&2\nexit {rc}\n"
                        if rc else "#!/bin/bash\nexit 0\n")
        srun.chmod(0o755)
        done = subprocess.run(["bash", "-c", line + "\necho started"], capture_output=True,
                              text=True, env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"})
        if rc:
            assert done.returncode == 1 and "started" not in done.stdout
            assert done.stderr.splitlines()[-1] == (
                "cluster.container_image=/fsx/apps/slurm-llm.sqsh cannot run the ranks: import "
                "megatron_ext.train failed in it; build the image from slurm/container/Dockerfile "
                "(README: A container image for HyperPod)")
        else:
            assert done.returncode == 0 and "started" in done.stdout
    assert "import megatron_ext" not in _render("cluster=pcs_p5")  # a venv: the host's Python


def test_secrets_in_the_environment_never_reach_the_script(monkeypatch) -> None:
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.example/T000-SECRET-hook")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-0123456789-SECRET")
    cfg = make_config("cluster=hyperpod_p5", "logging.wandb.mode=online",
                      "logging.slack.enabled=true", run_dir=str(RUN))
    for text in (_render("cluster=hyperpod_p5", "logging.wandb.mode=online"), dry_run_text(cfg)):
        assert "T000-SECRET-hook" not in text and "0123456789-SECRET" not in text


def test_secret_looking_env_entries_and_multiline_directives_are_refused() -> None:
    cfg = with_values(make_config("cluster=slurm"), **{
        "cluster.env": {"WANDB_API_KEY": "abc"}, "cluster.partition": "gpu\ntouch /tmp/x #",
        "cluster.signal": "KILL@10"})
    problems = "\n".join(cfg.cluster.problems())
    assert "cluster.env.WANDB_API_KEY looks like a secret" in problems
    assert "cluster.partition=" in problems and "must be a single line" in problems
    assert "cluster.signal='KILL@10'" in problems
    with pytest.raises(ValueError, match="single line"):
        sbatch.render(cfg, RUN / "config.yaml", RUN / "logs", "python")


NASTY = ["; touch {canary}", "$(touch {canary})", "`touch {canary}`", "' ; touch {canary} ; '",
         '" ; touch {canary} ; "', "x\ntouch {canary}"]


def _stub(bin_dir: Path, name: str, record: Path) -> None:
    """A stand-in for a Slurm command that records its argv, NUL-separated, one call a line."""
    path = bin_dir / name
    path.write_text(f'#!/bin/bash\nprintf "%s\\0" {name} "$@" >> {record}\necho >> {record}\n')
    path.chmod(0o755)


@pytest.mark.parametrize("nasty", NASTY)
def test_hostile_values_are_data_not_commands(nasty: str, tmp_path: Path) -> None:
    """Run the rendered script under bash with srun/scontrol stubbed: nothing injected runs."""
    canary = tmp_path / "canary"
    value = nasty.format(canary=canary)
    one_line = value.replace("\n", " ")  # #SBATCH values must be one line (refused otherwise)
    run = tmp_path / f"run {one_line}"
    text = _render("cluster=hyperpod_p5", run=run, repo=REPO, changes={
        "name": one_line, "cluster.partition": one_line, "cluster.container_image": value,
        "cluster.container_mounts": value, "cluster.env": {"USER_VALUE": value}})
    bin_dir, record = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name in ("srun", "scontrol"):
        _stub(bin_dir, name, record)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30,
                   check=True)
    assert not canary.exists()
    calls = [c.split("\0") for c in record.read_text().split("\0\n") if c]
    train = next(c for c in calls if "megatron_ext.train" in c)
    assert f"--container-image={value}" in train and f"--container-mounts={value}" in train
    assert train[-1] == str(run / "config.yaml")


def test_values_reach_the_environment_verbatim(tmp_path: Path) -> None:
    value = "a b;$(c)`d`'e\"f\ng"
    text = _render("cluster=slurm", "cluster.healthcheck=false", repo=REPO,
                   changes={"cluster.env": {"USER_VALUE": value}})
    setup = text.split("# command")[0] + 'printf "%s" "$USER_VALUE"\n'
    out = subprocess.run(["bash", "-c", setup], capture_output=True, text=True, check=True)
    assert out.stdout.endswith(value)


def test_the_script_requeues_when_rank_0_asks() -> None:
    text = _render("cluster=pcs_p5")
    request = f"/fsx/runs/llama/launches/2025-01-01_00-00-00/{REQUEUE_REQUEST}"
    claims = f"/fsx/runs/llama/launches/2025-01-01_00-00-00/{ALERTS_SENT}"
    no_restart = f"/fsx/runs/llama/launches/2025-01-01_00-00-00/{NO_RESTART}"
    bad_nodes = f"/fsx/runs/llama/launches/2025-01-01_00-00-00/{BAD_NODES}"
    # a stale request, the alert claims, the no-restart verdict and the health check's report
    # of the previous attempt go
    assert f"rm -rf {request} {claims} {no_restart} {bad_nodes}\n" in text.split("# command")[0]
    assert (f'if [ -e {request} ]; then rm -f {request}; scontrol requeue "$SLURM_JOB_ID"; fi'
            in text)
    assert "scontrol requeue" not in _render("cluster=pcs_p5", "cluster.requeue=false")


def _teardown(tmp_path: Path, rc: int, *overrides: str) -> tuple[str, str]:
    """The batch script's teardown after a srun that returned ``rc``; what it asked of
    ``scontrol`` (a stand-in on PATH: the real one is exercised in test_slurm) and its stderr."""
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    text = _render("cluster=pcs_p5", "cluster.max_restarts=2", *overrides, run=run)
    (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/asked\n')
    (tmp_path / "scontrol").chmod(0o755)
    teardown = text.split("# teardown\n")[1].replace(
        "/fsx/venvs/slurm-llm/bin/python -m megatron_ext.job_end", "true")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    out = subprocess.run(["bash", "-c", f"(exit {rc}); {teardown}"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == rc
    asked = tmp_path / "asked"
    return (asked.read_text() if asked.exists() else ""), out.stderr


def test_failures_a_restart_may_cure_are_requeued_at_most_max_restarts_times(
        tmp_path: Path) -> None:
    for attempt in (1, 2):
        asked, err = _teardown(tmp_path, 75)
        assert asked.count("requeue 7") == attempt and f"restart {attempt} of" in err
    asked, err = _teardown(tmp_path, 143)  # srun's status after it terminated the peers
    assert asked.count("requeue 7") == 2 and "failed 3 times, not requeued" in err
    assert (tmp_path / "run" / FAILURES).read_text() == "3\n"


def test_with_a_container_image_alone_the_alert_of_last_resort_runs_in_the_image() -> None:
    """HyperPod's host has no Python of the ranks': an OOM-killed rank alerted nothing."""
    text = _render("cluster=hyperpod_p5")
    teardown = text.split("# teardown\n")[1]
    assert ('if [ "$rc" -ne 0 ]; then srun --nodes=1 --ntasks=1 '
            "--container-image=/fsx/apps/slurm-llm.sqsh --container-mounts=/fsx:/fsx python -m "
            "megatron_ext.job_end /fsx/runs/llama/launches/2025-01-01_00-00-00/config.yaml "
            '"$rc" $gave_up || true; fi') in teardown


def test_a_failure_that_would_repeat_is_never_requeued(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / NO_RESTART).write_text("loss nan at step 3\n")
    asked, err = _teardown(tmp_path, 1)
    assert asked == "" and "a rerun would fail the same way: loss nan at step 3" in err
    assert _teardown(tmp_path, 0)[0] == ""  # a finished job is left alone
    assert _teardown(tmp_path / "off", 75, "cluster.requeue=false")[0] == ""


@pytest.mark.parametrize("signame, code, requeue", [("SIGUSR1", 0, True),
                                                    ("SIGTERM", 128 + 15, False)])
def test_a_signal_sets_the_flag_the_loop_polls(signame: str, code: int, requeue: bool) -> None:
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        stop = StopSignals("USR1@120")
        assert not stop.requested()
        os.kill(os.getpid(), getattr(signal, signame))
        assert stop.requested() and stop.exit_code == code and stop.wants_requeue == requeue
        # what an S3 copy of the stop save may still use: to the limit, less the requeue margin
        left = stop.seconds_left(margin_s=30)
        assert 85 < left <= 90 if requeue else left == 0  # SIGTERM: Slurm kills KillWait later
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_local_parameters_are_unchanged_and_shared_paths_are_checked() -> None:
    assert executor_params(make_config()) == {"nodes": 1, "tasks_per_node": 2,
                                              "timeout_min": 60, "name": "demo"}
    cfg = make_config("cluster=pcs_p5", "data=synthetic", run_dir="/home/me/run")
    assert [p.split("=")[0] for p in shared_fs_problems(cfg)] == ["run_dir", "checkpoint.dir"]


@pytest.mark.parametrize("interconnect", ["none", "efa"])
def test_the_environment_megatron_relies_on_is_set_and_a_user_value_wins(
        interconnect: str) -> None:
    text = _render("cluster=pcs_p5", f"cluster.interconnect={interconnect}",
                   "cluster.healthcheck=false", repo=REPO)
    setup = text.split("# command")[0] + ('echo "$CUDA_DEVICE_MAX_CONNECTIONS '
                                          '$TORCH_NCCL_AVOID_RECORD_STREAMS ${NCCL_NVLS_ENABLE:-unset}"')
    env = {k: v for k, v in os.environ.items() if "NCCL" not in k and not k.startswith("CUDA")}

    def run(**exported: str) -> str:
        return subprocess.run(["bash", "-c", setup], env={**env, **exported}, capture_output=True,
                              text=True, check=True).stdout.split("\n")[-2]
    nvls = "0" if interconnect == "efa" else "unset"  # NVLS is an EFA-cluster setting
    assert run() == f"1 1 {nvls}"
    assert run(CUDA_DEVICE_MAX_CONNECTIONS="8", NCCL_NVLS_ENABLE="1") == "8 1 1"


def _sinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """sinfo as a node group answers (the real one runs in test_slurm's jobs)."""
    (tmp_path / "sinfo").write_text(f"#!/bin/sh\nprintf '{answer}'\n")
    (tmp_path / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_cpus_per_task_is_what_slurm_registered_for_the_partition(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sinfo(tmp_path, monkeypatch, "192\n96\n")  # one node group with hyper-threading off
    cfg, problems = with_registered_cpus(make_config("cluster=pcs_p5", "cluster.nodes=2"))
    assert problems == [] and cfg.cluster.cpus_per_task == 12
    _sinfo(tmp_path, monkeypatch, "")
    _, problems = with_registered_cpus(make_config("cluster=pcs_p5"))
    assert problems and problems[0].startswith("cluster.cpus_per_task=0 takes the CPUs Slurm "
                                               "registered for partition gpu-p5's nodes")
    fixed = make_config("cluster=pcs_p5", "cluster.cpus_per_task=16")
    assert with_registered_cpus(fixed) == (fixed, [])
