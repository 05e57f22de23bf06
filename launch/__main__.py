"""``python -m launch [group=option ...] [key=value ...]``: compose, validate, plan, submit."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from hydra.errors import HydraException

from launch.calibration_file import with_calibration
from launch.config import (CONF_DIR, compose, explicit_keys, one_line_error, register_schema,
                           to_run_config, validate)
from launch.prepare import (absolutize, choose_layout, data_problems, for_probe,
                            for_sweep_point, launch_command, prepare_data, write_run_dir)
from launch.planning.time_limit import with_time_limit
from launch import resume
from launch.schema import RunConfig
from launch.sft_epochs import with_epochs


def _refuse(err: Exception) -> None:
    """One line naming the field, instead of Hydra's multi-line report."""
    print(one_line_error(err), file=sys.stderr)
    sys.exit(2)


def _preflight(argv: list[str]) -> None:
    """Compose a single run's overrides up front so a typo fails in one line (sweeps skip this)."""
    if "-m" in argv or "--multirun" in argv:
        return
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith("hydra")]
    try:
        to_run_config(compose(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        _refuse(err)


def _exit_on(problems: list[str]) -> None:
    """Every problem, one line each, then exit 2; nothing when there are none."""
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(2)


def _typed(cfg: DictConfig) -> RunConfig:
    try:
        return to_run_config(cfg)
    except OmegaConfBaseException as err:
        _refuse(err)
        raise


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(raw: DictConfig) -> None:
    cfg, calibration_problems = with_calibration(absolutize(_typed(raw), Path.cwd()))
    _exit_on(calibration_problems)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # sweep points must not resume each other's checkpoints
        cfg = for_sweep_point(cfg, hydra_cfg.job.override_dirname or str(hydra_cfg.job.num),
                              sweep=f"{cfg.name}-{Path(hydra_cfg.sweep.dir).name}")
    cfg = for_probe(cfg)
    explicit = explicit_keys(hydra_cfg.overrides.task)
    cfg, epoch_problems = with_epochs(cfg, explicit)
    _exit_on(epoch_problems)
    if cfg.train.epochs:
        print(f"train.epochs={cfg.train.epochs}: train.steps={cfg.train.steps}")
    _exit_on(validate(cfg))  # before planning: the planner divides by what it checks
    cfg, layout, note = choose_layout(cfg, explicit)
    _exit_on(validate(cfg, layout))
    cfg = with_time_limit(cfg, layout)
    print(f"layout: {layout.describe()}{note}")
    resume_problems, changed = resume.check(cfg)  # a relaunch over an existing checkpoint
    _exit_on(resume_problems)
    if changed:
        print(changed)
    if cfg.launch.dry_run:
        from launch.submit import dry_run_text

        print(dry_run_text(cfg))
        return
    prepare_data(cfg)
    # submitit only once there is something to submit
    from launch.submit import (follow, node_path_problems, shared_fs_problems, submit,
                               with_registered_cpus)

    cfg, cpu_problems = with_registered_cpus(cfg)
    _exit_on(cpu_problems + data_problems(cfg) + shared_fs_problems(cfg) + node_path_problems(cfg))
    config_path = write_run_dir(cfg, launch_command(
        cfg, hydra_cfg.overrides.task, Path.cwd(), hydra_cfg.mode == RunMode.MULTIRUN))
    if changed:
        (config_path.parent / resume.RESUME_CHANGES).write_text(changed + "\n")
    job = submit(cfg, config_path)
    print(f"submitted job {job.job_id}; run folder {cfg.run_dir}", flush=True)
    if cfg.cluster.kind == "local" and cfg.launch.wait:
        code = follow(job, cfg)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(code)
        if code:  # sys.exit would end the sweep here; Hydra reports a raise after every point
            raise RuntimeError(f"sweep point {cfg.sweep_point} failed; run folder {cfg.run_dir}")


if __name__ == "__main__":
    register_schema()
    _preflight(sys.argv[1:])
    main()
