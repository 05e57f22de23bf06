"""W&B metrics from rank 0, and the progress line people read in the log.

Name, group and tags derive from the config so a Hydra sweep (``cfg.sweep``) or a Slurm array
groups in the W&B UI. The run id derives from the job, and every attempt of it (a requeue, a
rerun that resumes) logs its own run in the same group, ``<run id>-a<N>`` from the second on:
two attempts under one id made ``wandb sync`` of their offline folders keep one of them.
W&B reads its API key from ``$WANDB_API_KEY`` itself; no secret from the environment reaches
the logged config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from launch.schema import Layout, RunConfig
from megatron_ext.env import RunEnv

log = logging.getLogger("megatron_ext.metrics")

_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|WEBHOOK|CREDENTIAL", re.IGNORECASE)
_REDACTED = "<redacted>"


def layout_tag(layout: Layout) -> str:
    """Compact layout for names and tags, e.g. ``tp2-pp2-dp4`` (size-1 dimensions left out)."""
    parts = [f"{dim}{size}" for dim, size in
             (("tp", layout.tp), ("pp", layout.pp), ("vpp", layout.vpp), ("cp", layout.cp),
              ("dp", layout.dp)) if size > 1]
    return "-".join(parts + (["sp"] if layout.sp else [])) or "single"


def _sanitize(text: str, limit: int = 64) -> str:
    """W&B ids allow letters, digits, '-' and '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)[:limit]


def sweep_id(cfg: RunConfig, env: RunEnv) -> Optional[str]:
    """The Hydra multirun the launcher recorded, else the Slurm array."""
    return cfg.sweep or env.slurm_array_job


def run_id(cfg: RunConfig, env: RunEnv) -> str:
    """Stable across requeues: Slurm keeps the job id; local reruns keep the checkpoint dir."""
    job = env.slurm_job or hashlib.sha1(os.path.abspath(cfg.checkpoint.dir).encode()).hexdigest()[:12]
    return _sanitize(f"{cfg.name}-{cfg.cluster.name}-{job}")


def attempt_id(run: str, attempt: int) -> str:
    """The W&B id of one attempt of ``run``: the run id itself for the first."""
    return run if attempt == 1 else f"{run}-a{attempt}"


def earlier_attempts(run_dir: Path, run: str) -> dict[Path, int]:
    """W&B's folders (``[offline-]run-<date>_<time>-<id>``) of ``run``'s earlier attempts and
    their numbers: in this run folder (a requeue) and its siblings (a relaunch writes a new
    launch folder next to it, ``runs/<name>/launches/<time>``)."""
    pattern = re.compile(rf"(?:offline-)?run-\d{{8}}_\d{{6}}-{re.escape(run)}(?:-a(\d+))?")
    found = {}
    for folder in sorted(run_dir.resolve().parent.glob("*/wandb/*run-*")):
        match = pattern.fullmatch(folder.name)
        if match and folder.is_dir():
            found[folder] = int(match.group(1) or 1)
    return found


_THROUGHPUT = ("step_time_s", "tokens", "tokens_per_s", "tokens_per_s_per_gpu",
               "tflops_per_s_per_gpu", "mfu")
_PREFIX_PANELS = {"peak_": "memory", "checkpoint_": "checkpoint", "straggler_": "straggler"}


def panel_key(name: str) -> str:
    """W&B key of a flat step value: ``throughput/mfu``, ``memory/peak_...``; W&B draws one
    dashboard section per prefix. Names that already carry a section pass through."""
    if "/" in name:
        return name
    if name in _THROUGHPUT:
        return f"throughput/{name}"
    section = next((panel for prefix, panel in _PREFIX_PANELS.items()
                    if name.startswith(prefix)), "train")
    return f"{section}/{name}"


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """Values of variables whose names look secret (long enough to be worth matching)."""
    return [v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= 8]


def redact(value: Any, secrets: list[str]) -> Any:
    """A copy of a nested dict/list config with every secret substring replaced."""
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, _REDACTED)
    return value


def wandb_settings(cfg: RunConfig, layout: Layout, env: RunEnv, secrets: list[str],
                   attempt: int = 1, start_step: int = 0) -> dict:
    """Keyword arguments for ``wandb.init``, without ``dir``; pure for tests. ``job_type`` and
    ``config.attempt`` say which attempt this is and the step it resumed from."""
    sweep = sweep_id(cfg, env)
    tag = layout_tag(layout)
    run = run_id(cfg, env)
    config = dataclasses.asdict(cfg) | {"layout": dataclasses.asdict(layout), "attempt": {
        "run": run, "number": attempt, "resumed_from_step": start_step}}
    return dict(
        project=cfg.logging.wandb.project, entity=cfg.logging.wandb.entity or None,
        mode=cfg.logging.wandb.mode, id=attempt_id(run, attempt),
        job_type=f"resume-from-step-{start_step}" if start_step else "train",
        name=f"{cfg.name}-{cfg.model.name}-{tag}-{cfg.cluster.name}"
        + (f"-{cfg.sweep_point}" if cfg.sweep_point else ""),
        group=f"sweep-{sweep}" if sweep else cfg.name,
        tags=[cfg.model.name, tag, cfg.cluster.name, f"world{layout.world_size}"]
        + ([f"sweep-{sweep}"] if sweep else []),
        config=redact(config, secrets))


class MetricsLogger:
    """Rank 0's W&B run; build it with ``from_config`` so other ranks get a null logger."""

    def __init__(self, settings: dict, run_dir: Path, init_timeout_s: float = 90.0) -> None:
        import wandb  # only rank 0 pays the import

        run_dir.mkdir(parents=True, exist_ok=True)
        self._closed = False
        self.offline_fallback: Optional[str] = None
        """Why the run logs offline though ``mode=online`` was asked, and how to sync it."""
        try:
            self._run = wandb.init(dir=str(run_dir), settings={"init_timeout": init_timeout_s},
                                   **settings)
        except wandb.errors.Error as err:  # an unreachable server must not end the job
            if settings["mode"] != "online":
                raise
            wandb.teardown()  # its service still holds the run id ("run ID ... is in use")
            self._run = wandb.init(dir=str(run_dir), **{**settings, "mode": "offline"})
            reason = redact(f"{type(err).__name__}: {err}", secret_values(os.environ))[:300]
            self.offline_fallback = (
                f"W&B online start failed ({reason}); metrics go offline to "
                f"{self._run.settings.sync_dir}; upload them later with "
                f"`wandb sync {self._run.settings.sync_dir}`")
            log.warning("%s", self.offline_fallback)
        log.info("W&B run %s (%s) in %s mode", self._run.id, self._run.name,
                 "offline" if self.offline_fallback else settings["mode"])

    @classmethod
    def from_config(cls, cfg: RunConfig, *, env: RunEnv, layout: Layout, run_dir: Path,
                    start_step: int = 0) -> Union["MetricsLogger", "NullMetricsLogger"]:
        """``start_step``: the checkpoint this attempt resumed from; the earlier attempts'
        offline runs are rewound to it, so that each step is in one attempt's run."""
        if env.rank != 0 or cfg.logging.wandb.mode == "disabled":
            return NullMetricsLogger()
        from megatron_ext.wandb_log import rewind_offline_runs  # wandb's protobufs: rank 0 only

        earlier = earlier_attempts(Path(run_dir), run_id(cfg, env))
        rewind_offline_runs([f for f in earlier if f.name.startswith("offline-")], start_step)
        attempt = max(earlier.values(), default=0) + 1  # distinct, also after a gap
        return cls(wandb_settings(cfg, layout, env, secret_values(os.environ), attempt,
                                  start_step), Path(run_dir), cfg.logging.wandb.init_timeout_s)

    @property
    def run_id(self) -> str:
        return self._run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log({panel_key(name): value for name, value in values.items()}, step=step)

    def close(self, exit_code: int = 0, timeout_s: Optional[float] = None) -> None:
        """Finish the run: W&B writes a step's row, and its buffered records, only then (a
        process that ends without it loses the last step, often the whole attempt). A failing
        rank passes ``timeout_s``: an unreachable server may not hold up its exit."""
        if self._closed:
            return
        self._closed = True
        if timeout_s is None:
            self._run.finish(exit_code=exit_code)
            return
        finish = threading.Thread(target=self._run.finish, kwargs={"exit_code": exit_code},
                                  name="wandb-finish", daemon=True)
        finish.start()
        finish.join(timeout_s)
        if finish.is_alive():
            log.warning("W&B did not finish within %.0f s; its last records may be missing",
                        timeout_s)


class NullMetricsLogger:
    """No W&B on this rank: same interface, does nothing."""

    run_id = None
    offline_fallback = None

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self, exit_code: int = 0, timeout_s: Optional[float] = None) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_progress(step: int, steps: int, loss: float, lr: float, grad_norm: float,
                    step_time_s: float, tokens_per_s: float, eta_s: float) -> str:
    """One line per log interval, aligned so columns line up in a scrolling log."""
    width = len(str(steps))
    return (f"step {step:>{width}}/{steps} | loss {loss:.4f} | lr {lr:.3e} | "
            f"grad norm {grad_norm:.3f} | {step_time_s * 1000:,.0f} ms/step | "
            f"{tokens_per_s:,.0f} tokens/s | eta {_duration(eta_s)}")


def format_validation(val: dict[str, float]) -> str:
    """The progress line's tail after a validation pass: overall, then each source."""
    sources = ", ".join(f"{key[4:-5]} {value:.4f}" for key, value in val.items()
                        if key.endswith("/loss") and key != "val/loss")
    return f" | val loss {val['val/loss']:.4f} ({sources}; {val['val/time_s']:.1f} s)"
