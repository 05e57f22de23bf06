"""``python -m launch [group=option ...] [key=value ...]``: compose, validate, plan, submit."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.config import CONF_DIR, register_schema, to_run_config, to_yaml, validate
from launch.prepare import absolutize, choose_layout, prepare_data, write_run_dir
from launch.schema import RunConfig


def _typed(cfg: DictConfig) -> RunConfig:
    try:
        return to_run_config(cfg)
    except OmegaConfBaseException as err:  # a wrong type: name the field, stop in milliseconds
        key = getattr(err, "full_key", "") or "config"
        print(f"error: {key}: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(raw: DictConfig) -> None:
    cfg = absolutize(_typed(raw), Path.cwd())
    cfg, layout, note = choose_layout(cfg)
    problems = validate(cfg, layout)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    print(f"layout: {layout.describe()}{note}")
    if cfg.launch.dry_run:
        print(to_yaml(cfg))
        return
    prepare_data(cfg)
    config_path = write_run_dir(cfg)
    from launch.submit import follow, submit  # submitit only once there is something to submit

    job = submit(cfg, config_path)
    print(f"submitted job {job.job_id}; run folder {cfg.run_dir}", flush=True)
    if cfg.cluster.kind == "local" and cfg.launch.wait:
        sys.exit(follow(job))


if __name__ == "__main__":
    register_schema()
    main()
