"""The watchdog in a real subprocess: a rank that stops beating is ended, one that beats lives."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from launch.watch_schema import WatchdogConfig
from megatron_ext.watchdog import (EXIT_CODE_HANG, NullWatchdog, Watchdog, hang_timeout,
                                   record_collectives)
from tests.conftest import REPO, make_config

TIMEOUT_S = 0.5  # the derived timeout in the script: max(min_timeout_s, 5 x 20 ms steps)

RANK_SCRIPT = """
import sys, time
from pathlib import Path
from launch.watch_schema import WatchdogConfig
from megatron_ext.watchdog import Watchdog

mode, dump_dir = sys.argv[1], Path(sys.argv[2])
cfg = WatchdogConfig(min_timeout_s=0.5, step_time_factor=5.0, first_step_timeout_s=5.0)
watchdog = Watchdog(cfg, rank=3, dump_dir=dump_dir,
                    on_hang=lambda message: print("ON_HANG", message, flush=True))

def train_step():
    time.sleep(0.02)

def stuck_in_allreduce():
    time.sleep(60)

for _ in range(10 if mode == "hang" else 75):  # 75 steps outlast the timeout threefold
    train_step()
    watchdog.beat()
if mode == "hang":
    stuck_in_allreduce()
watchdog.close()
print("FINISHED", flush=True)
"""


def run_rank(mode: str, dump_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RANK_SCRIPT, mode, str(dump_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - start


def test_hang_timeout_rules():
    cfg = WatchdogConfig(min_timeout_s=300, step_time_factor=10, first_step_timeout_s=1800)
    assert hang_timeout(cfg, None) == 1800
    assert hang_timeout(cfg, 2.0) == 300
    assert hang_timeout(cfg, 45.0) == 450
    cfg.timeout_s = 60
    assert hang_timeout(cfg, 45.0) == 60 and hang_timeout(cfg, None) == 1800


def test_silent_rank_dumps_stacks_alerts_and_exits(tmp_path):
    proc, elapsed = run_rank("hang", tmp_path)
    assert proc.returncode == EXIT_CODE_HANG, proc.stderr
    assert elapsed < 0.2 + TIMEOUT_S + 3.0  # steps + timeout + interpreter start-up margin
    assert "stuck_in_allreduce" in proc.stderr and "WATCHDOG: rank 3" in proc.stderr
    assert "ON_HANG rank 3" in proc.stdout and "FINISHED" not in proc.stdout
    assert "stuck_in_allreduce" in (tmp_path / "hang-stacks-rank3.txt").read_text()


def test_beating_rank_is_left_alone(tmp_path):
    proc, elapsed = run_rank("beat", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert elapsed > 3 * TIMEOUT_S and "FINISHED" in proc.stdout
    assert "WATCHDOG" not in proc.stderr and not list(tmp_path.iterdir())


SECTION_SCRIPT = """
import sys, time
from launch.watch_schema import WatchdogConfig
from megatron_ext.watchdog import Watchdog

save_s = float(sys.argv[1])
cfg = WatchdogConfig(min_timeout_s=0.5, step_time_factor=5.0, first_step_timeout_s=5.0)
watchdog = Watchdog(cfg, rank=2)
for step in range(1, 11):
    time.sleep(0.02)
    watchdog.beat(step)
    if step == 5:
        with watchdog.section("a checkpoint save", 1.5):
            time.sleep(save_s)  # longer than the 0.5 s step timeout
print("TIMEOUT", watchdog.timeout_s, flush=True)
watchdog.close()
"""


def test_a_save_has_its_own_bound_and_stays_out_of_the_step_timeout():
    """A 45 s save under a 20 s timeout was a hang; one 15 s save raised every later timeout."""
    ok = subprocess.run([sys.executable, "-c", SECTION_SCRIPT, "1.0"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "WATCHDOG" not in ok.stderr and "TIMEOUT 0.5" in ok.stdout  # still the step rule
    stuck = subprocess.run([sys.executable, "-c", SECTION_SCRIPT, "30"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert stuck.returncode == EXIT_CODE_HANG
    assert ("WATCHDOG: rank 2 on " in stuck.stderr
            and ": a checkpoint save did not end within 2 s" in stuck.stderr)
    assert "last completed step 5, 5 in this attempt" in stuck.stderr


def test_timeout_follows_the_slowest_step():
    cfg = WatchdogConfig(min_timeout_s=0.1, step_time_factor=100.0, first_step_timeout_s=60.0)
    watchdog = Watchdog(cfg, rank=0)
    try:
        assert watchdog.timeout_s == 60.0
        watchdog.beat()
        time.sleep(0.05)
        watchdog.beat()
        assert 5.0 <= watchdog.timeout_s < 30.0  # 100 x ~50 ms
    finally:
        watchdog.close()


def test_disabled_watchdog_is_a_null_object():
    cfg = make_config("resilience.watchdog.enabled=false")
    watchdog = Watchdog.from_config(cfg, rank=0)
    assert isinstance(watchdog, NullWatchdog)
    watchdog.beat()
    watchdog.close()


def test_gpu_ranks_turn_the_nccl_flight_recorder_on_unless_the_job_sized_it():
    environ = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "50"}  # exported by the user: kept
    record_collectives(environ)
    assert environ == {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_TRACE_BUFFER_SIZE": "50"}
