"""The alert of last resort: a job attempt that ended badly with no rank saying why."""
from __future__ import annotations

import signal

from launch.prepare import write_run_dir
from launch.run_folder import BAD_NODES
from megatron_ext import alerts, job_end
from tests.conftest import make_config
from tests.slack_receiver import Receiver


def test_only_an_unexplained_unplanned_end_needs_an_alert():
    killed = 128 + signal.SIGKILL
    assert job_end.needs_alert(killed, claimed=[])
    assert job_end.needs_alert(1, claimed=[alerts.STRAGGLER])  # a straggler says nothing of it
    for kind in alerts.ONCE_PER_JOB:  # a rank already said why the attempt ended
        assert not job_end.needs_alert(killed, claimed=[kind])
    assert not job_end.needs_alert(0, claimed=[])  # finished, or saved on the pre-timeout signal
    assert not job_end.needs_alert(128 + signal.SIGTERM, claimed=[])  # Slurm ended the job
    assert "a rank killed by SIGKILL" in job_end.explain(killed)
    assert "a rank ended with exit code 1" in job_end.explain(1)


def test_the_launcher_posts_once_and_never_after_a_rank_did(tmp_path, monkeypatch):
    receiver = Receiver()
    try:
        monkeypatch.setenv(alerts.URL_ENV, receiver.url)
        config = write_run_dir(make_config("logging.slack.enabled=true", run_dir=str(tmp_path)))
        for _ in range(2):  # every failed rank's wrapper calls it; the first claim wins
            assert job_end.main([str(config), str(128 + signal.SIGKILL)]) == 0
        assert len(receiver.posts) == 1
        assert "failed (launcher on" in receiver.posts[0] and "SIGKILL" in receiver.posts[0]
    finally:
        receiver.close()


def test_a_job_given_up_after_max_restarts_says_so_once_even_after_a_rank_alerted(
        tmp_path, monkeypatch):
    receiver = Receiver()
    try:
        monkeypatch.setenv(alerts.URL_ENV, receiver.url)
        config = write_run_dir(make_config("logging.slack.enabled=true", "cluster.max_restarts=2",
                                           run_dir=str(tmp_path)))
        (alerts.claims_dir(make_config(run_dir=str(tmp_path))) / alerts.HANG).mkdir(parents=True)
        assert job_end.main([str(config), "75"]) == 0  # the hang alert said why: nothing more
        assert job_end.main([str(config), "75", "3"]) == 0
        assert len(receiver.posts) == 1 and ("the job failed 3 times (last exit code 75) and is "
                                             "not requeued again (cluster.max_restarts=2)"
                                             in receiver.posts[0])
    finally:
        receiver.close()


def test_a_job_given_up_on_a_sigterm_end_still_says_so(tmp_path, monkeypatch):
    """The batch script counts an attempt its ranks left with 143 (SIGTERM from outside) as a
    failure; when it gives up on such a one, the alert must go out (it was taken as planned)."""
    receiver = Receiver()
    try:
        monkeypatch.setenv(alerts.URL_ENV, receiver.url)
        config = write_run_dir(make_config("logging.slack.enabled=true", "cluster.max_restarts=1",
                                           run_dir=str(tmp_path)))
        assert job_end.main([str(config), str(128 + signal.SIGTERM)]) == 0  # planned: silent
        assert not receiver.posts
        assert job_end.main([str(config), str(128 + signal.SIGTERM), "2"]) == 0
        assert len(receiver.posts) == 1 and "the job failed 2 times (last exit code 143) and " \
            "is not requeued again (cluster.max_restarts=1)" in receiver.posts[0]
    finally:
        receiver.close()


def test_a_failed_node_health_check_is_the_alert_with_the_nodes_and_what_was_done(
        tmp_path, monkeypatch):
    receiver = Receiver()
    try:
        monkeypatch.setenv(alerts.URL_ENV, receiver.url)
        config = write_run_dir(make_config("logging.slack.enabled=true", run_dir=str(tmp_path)))
        # the previous attempt's claim is still there: the batch script stopped before clearing it
        (alerts.claims_dir(make_config(run_dir=str(tmp_path))) / alerts.FAILURE).mkdir(parents=True)
        (tmp_path / BAD_NODES).write_text(  # as slurm/node_failed.sh writes it
            "node n2 failed the health check: fatal GPU Xid 79 in the last 3600s\n"
            "could not drain n2 (slurm_update error: Access/permission denied): ask an "
            "administrator to drain it\nrequeued (restart 1 of cluster.max_restarts=3) "
            "excluding n2\n")
        assert job_end.main([str(config), "1"]) == 0
        assert len(receiver.posts) == 1
        assert ("node health check failed: node n2 failed the health check: fatal GPU Xid 79 in "
                "the last 3600s; could not drain n2" in receiver.posts[0])
        assert "excluding n2" in receiver.posts[0]
    finally:
        receiver.close()


def test_an_attempt_srun_ended_143_after_a_rank_was_killed_is_alerted(tmp_path, monkeypatch):
    """srun exits 143 when it SIGTERMed the peers of a rank that was SIGKILLed: the first task
    srun saw end (its stderr) says the attempt's end was not planned; ranks that all saved and
    left with 143 were."""
    receiver = Receiver()
    srun_log = tmp_path / "batch.err"
    try:
        monkeypatch.setenv(alerts.URL_ENV, receiver.url)
        config = write_run_dir(make_config("logging.slack.enabled=true", run_dir=str(tmp_path)))
        srun_log.write_text("srun: error: n1: task 0: Exited with exit code 143\n"
                            "srun: error: n2: task 1: Exited with exit code 143\n")
        argv = [str(config), str(128 + signal.SIGTERM), "--srun-log", str(srun_log)]
        assert job_end.main([*argv, "--from", "0"]) == 0 and not receiver.posts  # they saved
        offset = srun_log.stat().st_size
        with srun_log.open("a") as log:
            log.write("srun: error: n2: task 1: Killed\n"
                      "srun: launch/slurm: _step_signal: Terminating StepId=2.1\n"
                      "srun: error: n1: task 0: Terminated\n")
        assert job_end.main([*argv, "--from", str(offset)]) == 0
        assert len(receiver.posts) == 1, receiver.posts
        assert "a rank killed by SIGKILL" in receiver.posts[0]
        assert "rank 1 on n2 was killed by SIGKILL" in receiver.posts[0]
    finally:
        receiver.close()
