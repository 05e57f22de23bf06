"""Read back what W&B wrote in offline mode, so tests assert the metrics really are there."""
from __future__ import annotations

import json
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

from megatron_ext.wandb_log import read_records


def offline_runs(run_dir: Path, timeout_s: float = 30.0) -> list[list[pb.Record]]:
    """The records of each offline run under ``run_dir``, attempt after attempt.

    ``run.finish()`` can return before wandb-core has written the run's last records (seen
    under load: an alert read back missing), so this waits, up to ``timeout_s``, until every
    run file holds its exit record, and returns what is there then.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        runs = [read_records(path) for path in
                sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]
        if time.monotonic() > deadline or all(of_type(run, "exit") for run in runs):
            return runs
        time.sleep(0.1)


def wandb_records(run_dir: Path) -> list[pb.Record]:
    """Every record of every offline run under ``run_dir``, in attempt order."""
    return [record for run in offline_runs(run_dir) for record in run]


def of_type(records: list[pb.Record], kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list[pb.Record]) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in h.item} for h in of_type(records, "history")]
