"""Login-node steps between a valid config and a submitted job: paths, layout, data, run folder."""
from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Collection, Sequence

from launch.config import CONF_DIR, derive_layout, to_yaml, validate
from launch.eval_schema import eval_data_problems
from launch.planning.planner import configure, describe_pinned, explain_no_fit, pinned, plan
from launch.rank_exit import LAUNCH_COMMAND
from launch.run_folder import clear_alert_claims
from launch.schema import RUN_CONFIG, DataSource, Layout, RunConfig


def _absolute(path: str, base: Path) -> str:
    return str(path if Path(path).is_absolute() else (base / path).resolve())


def absolutize(cfg: RunConfig, base: Path) -> RunConfig:
    """Ranks may start in another directory (a Slurm node); every path they read is absolute."""
    data = dataclasses.replace(
        cfg.data, tokenizer=_absolute(cfg.data.tokenizer, base) if cfg.data.tokenizer else "",
        sources=[DataSource(path=_absolute(s.path, base), weight=s.weight) for s in cfg.data.sources],
        validation=[DataSource(path=_absolute(s.path, base), weight=s.weight)
                    for s in cfg.data.validation])
    checkpoint = dataclasses.replace(cfg.checkpoint, dir=_absolute(cfg.checkpoint.dir, base))
    train = dataclasses.replace(
        cfg.train, init_from=_absolute(cfg.train.init_from, base) if cfg.train.init_from else "")
    return dataclasses.replace(cfg, run_dir=_absolute(cfg.run_dir, base), data=data,
                               checkpoint=checkpoint, train=train)


def for_sweep_point(cfg: RunConfig, point: str, sweep: str) -> RunConfig:
    """Each sweep point checkpoints in its own folder and S3 prefix, named by its overrides
    (stable on resubmit), and records the ``sweep`` it belongs to (its W&B group) and the point
    itself (its W&B name and Slack headline). A shared prefix would let a point restore
    another's checkpoint, or delete its copies by retention."""
    safe = "".join(c if c.isalnum() or c in "=,._-" else "_" for c in point)
    s3_uri = f"{cfg.checkpoint.s3_uri.rstrip('/')}/{safe}" if cfg.checkpoint.s3_uri else ""
    checkpoint = dataclasses.replace(cfg.checkpoint, dir=str(Path(cfg.checkpoint.dir) / safe),
                                     s3_uri=s3_uri)
    return dataclasses.replace(cfg, checkpoint=checkpoint, sweep=sweep, sweep_point=point)


def for_probe(cfg: RunConfig) -> RunConfig:
    """A probe (``train.probe_warmup_steps`` > 0) saves no checkpoint and resumes none: its
    checkpoint folder is a fresh one in its run folder, since a name's usual folder may hold a
    training run's checkpoints past the probe's last step; other runs are returned as given."""
    if not cfg.train.probe_warmup_steps:
        return cfg
    checkpoint = dataclasses.replace(
        cfg.checkpoint, dir=str(Path(cfg.run_dir) / "checkpoints"), save_interval=0,
        interval_minutes=0.0, save_on_exit=False, s3_uri="")
    return dataclasses.replace(cfg, checkpoint=checkpoint)


def choose_layout(cfg: RunConfig, explicit: Collection[str] = frozenset()
                  ) -> tuple[RunConfig, Layout, str]:
    """The explicit layout, or for ``parallel=auto`` the planner's best, written into the config.

    ``explicit`` are the keys the command line set (``launch.config.explicit_keys``): the
    planner keeps those it would otherwise choose (``parallel.tp``, ``train.micro_batch_size``,
    ``train.recompute``...). The config the ranks read always holds an explicit layout, so they
    never plan. GPU clusters also get the memory check: an explicit layout predicted not to fit
    is refused.
    """
    if not cfg.parallel.auto:
        layout = derive_layout(cfg)
        if cfg.cluster.kind == "slurm" and not validate(cfg, layout):
            refusal = explain_no_fit(cfg, layout)
            if refusal:
                raise SystemExit(f"error: {refusal}")
        return cfg, layout, ""
    pins = pinned(cfg, explicit)
    ranked = plan(cfg, pins)
    if not ranked:
        raise SystemExit(f"error: parallel=auto: no layout of {cfg.model.name}"
                         f"{describe_pinned(pins)} fits {cfg.cluster.world_size} "
                         f"{cfg.cluster.gpu} GPUs of {cfg.cluster.gpu_memory_gib:g} GiB; add nodes"
                         f"{' or drop a given setting' if pins else ''}")
    best = ranked[0]
    cfg = configure(cfg, best)
    return cfg, best.layout, (f" (parallel=auto: predicted {best.required_gib:.1f} GiB/GPU, "
                              f"{best.step_time_s:.2f} s/step, micro-batch "
                              f"{cfg.train.micro_batch_size}, recompute {cfg.train.recompute})")


def prepare_data(cfg: RunConfig) -> None:
    """Build the demo dataset where it is missing, with the data tool run as its own program:
    tools stand on launch, never the other way round (README, "Project layout")."""
    if cfg.data.prepare_demo:
        out_dir = Path(cfg.data.sources[0].path).parent
        command = [sys.executable, "-m", "tools.demo_data", str(out_dir),
                   "--vocab-size", str(cfg.model.vocab_size)]
        if subprocess.run(command, cwd=CONF_DIR.parent).returncode != 0:
            raise SystemExit("error: data.prepare_demo: building the demo data failed: "
                             f"{shlex.join(command)}")


def data_problems(cfg: RunConfig) -> list[str]:
    """Each indexed source's ``.bin`` and ``.idx`` must exist (seen from the login node, before
    anything is queued: the ranks would only fail on them after the job started); so must the
    validation data, and each validation split must hold sequences."""
    if cfg.data.kind != "indexed":
        return []
    missing = [f"data.sources[{i}].path={source.path}: {source.path}{ext} does not exist (a "
               "megatron indexed dataset is <prefix>.bin and <prefix>.idx; build it with "
               "python -m tools.prepare_data)"
               for i, source in enumerate(cfg.data.sources) for ext in (".bin", ".idx")
               if not Path(source.path + ext).exists()]
    return missing + eval_data_problems(cfg)


def launch_command(cfg: RunConfig, overrides: Sequence[str], cwd: Path,
                   sweep_point: bool = False) -> str:
    """The command that launches this run again, and so resumes it: the same overrides from
    the same directory; a sweep point as a single run of its own checkpoint folder."""
    pinned = [f"checkpoint.dir={cfg.checkpoint.dir}", f"checkpoint.s3_uri={cfg.checkpoint.s3_uri}"]
    argv = [sys.executable, "-m", "launch", *overrides, *(pinned if sweep_point else [])]
    return f"cd {shlex.quote(str(cwd))} && {shlex.join(argv)}"


def write_run_dir(cfg: RunConfig, command: str = "") -> Path:
    """The self-describing run folder: the exact config every rank will read, and the command
    that launched it (``rank_exit.LAUNCH_COMMAND``, which a failure report repeats)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_alert_claims(run_dir)
    config_path = run_dir / RUN_CONFIG
    config_path.write_text(to_yaml(cfg))
    if command:
        (run_dir / LAUNCH_COMMAND).write_text(command + "\n")
    return config_path
