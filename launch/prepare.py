"""Login-node steps between a valid config and a submitted job: paths, layout, data, run folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from launch.config import derive_layout, to_yaml
from launch.schema import DataSource, Layout, RunConfig


def _absolute(path: str, base: Path) -> str:
    return str(path if Path(path).is_absolute() else (base / path).resolve())


def absolutize(cfg: RunConfig, base: Path) -> RunConfig:
    """Ranks may start in another directory (a Slurm node); every path they read is absolute."""
    data = dataclasses.replace(
        cfg.data, tokenizer=_absolute(cfg.data.tokenizer, base) if cfg.data.tokenizer else "",
        sources=[DataSource(path=_absolute(s.path, base), weight=s.weight) for s in cfg.data.sources])
    checkpoint = dataclasses.replace(cfg.checkpoint, dir=_absolute(cfg.checkpoint.dir, base))
    return dataclasses.replace(cfg, run_dir=_absolute(cfg.run_dir, base), data=data,
                               checkpoint=checkpoint)


def choose_layout(cfg: RunConfig) -> tuple[RunConfig, Layout, str]:
    """The explicit layout, or for ``parallel=auto`` a default written back into the config.

    The config the ranks read always holds an explicit layout, so they never plan.
    """
    if not cfg.parallel.auto:
        return cfg, derive_layout(cfg), ""
    parallel = dataclasses.replace(cfg.parallel, auto=False, tp=1, pp=1, vpp=1, cp=1, dp=None,
                                   sp=False)
    cfg = dataclasses.replace(cfg, parallel=parallel)
    return cfg, derive_layout(cfg), " (parallel=auto: pure data parallelism)"


def prepare_data(cfg: RunConfig) -> None:
    if cfg.data.prepare_demo:
        from tools.demo_data import prepare

        prepare(Path(cfg.data.sources[0].path).parent, vocab_size=cfg.model.vocab_size)


def write_run_dir(cfg: RunConfig) -> Path:
    """The self-describing run folder: the exact config every rank will read."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(to_yaml(cfg))
    return config_path
