"""Read back what W&B wrote in offline mode, so tests assert the metrics really are there."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb


def wandb_records(run_dir: Path) -> list[pb.Record]:
    """Parse the offline ``run-<id>.wandb`` files: W&B's LevelDB-style log of protobufs.

    Layout: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each
    with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, parts = path.read_bytes(), 7, []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (length == 0 and kind == 0):  # block padding
                pos += left
                continue
            parts.append(data[pos + 7:pos + 7 + length])
            pos += 7 + length
            if kind in (1, 4):
                records.append(pb.Record.FromString(b"".join(parts)))
                parts = []
    return records


def of_type(records: list[pb.Record], kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list[pb.Record]) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in h.item} for h in of_type(records, "history")]
