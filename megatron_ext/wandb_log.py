"""W&B's offline run file (``offline-run-*/run-<id>.wandb``): read it, and rewind it on resume.

A resumed attempt reruns the steps after its checkpoint. Each attempt logs its own W&B run
(``metrics.attempt_id``), and the earlier attempts' offline files lose their rows after the
resumed step here, as ``metrics.jsonl`` does (``reporting.rewind``), so that syncing every
attempt uploads each step once. W&B's own rewind (``wandb.init(resume_from=...)``) is a
server-side preview and does nothing for runs that were never online.

The file is wandb-core's LevelDB-style log (core/internal/transactionlog, core/pkg/leveldb): a
7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte
header (IEEE crc32 of type and data, length, type: 1 full, 2 first, 3 middle, 4 last).
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2 as pb

log = logging.getLogger("megatron_ext.metrics")
_BLOCK, _CHUNK_HEADER, _FILE_HEADER = 32768, 7, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_payloads(path: Path) -> list[bytes]:
    """Every complete record of a run file, serialized; one cut off by a killed writer is
    left out."""
    return parse_payloads(path.read_bytes(), str(path))


def parse_payloads(data: bytes, name: str = "the data") -> list[bytes]:
    """``read_payloads`` of bytes read once (a writer may still be appending to the file)."""
    if data[:4] != b":W&B":
        raise ValueError(f"{name} is not a W&B run file")
    pos, parts, records = _FILE_HEADER, [], []
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK_HEADER])
        if left < _CHUNK_HEADER or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        parts.append(data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length])
        pos += _CHUNK_HEADER + length
        if kind in (_FULL, _LAST):
            records.append(b"".join(parts))
            parts = []
    return records


def read_records(path: Path) -> list[pb.Record]:
    return parse_records(path.read_bytes(), str(path))


def parse_records(data: bytes, name: str = "the data") -> list[pb.Record]:
    return [pb.Record.FromString(payload) for payload in parse_payloads(data, name)]


def encode(header: bytes, payloads: list[bytes]) -> bytes:
    """The bytes wandb-core writes for serialized records: chunks never cross a block."""
    out = bytearray(header)
    for data in payloads:
        first = True
        while True:
            left = _BLOCK - len(out) % _BLOCK
            if left < _CHUNK_HEADER:
                out += bytes(left)
                continue
            chunk, data = data[:left - _CHUNK_HEADER], data[left - _CHUNK_HEADER:]
            kind = (_FULL if not data else _FIRST) if first else (_LAST if not data else _MIDDLE)
            crc = zlib.crc32(chunk, zlib.crc32(bytes([kind])))
            out += struct.pack("<IHB", crc, len(chunk), kind) + chunk
            first = False
            if not data:
                break
    return bytes(out)


def rewound(records: list[pb.Record], step: int) -> list[pb.Record]:
    """``records`` without the history rows after ``step`` and the summaries of those rows;
    the alerts, console output and exit record of the attempt stay. Numbered afresh."""
    kept, past = [], False
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history" and record.history.step.num > step:
            past = True
            continue
        if not (past and kind == "summary"):
            kept.append(record)
    for num, record in enumerate(kept, start=1):
        record.num = num
    return kept


def rewind_offline_runs(folders: list[Path], step: int) -> int:
    """Rewind the run files of offline runs' ``folders`` to ``step``; the rows dropped.

    Runs that were online are on the server already and keep their history (W&B cannot
    delete rows): their attempt's tail after ``step`` stays visible in that attempt's run.
    """
    dropped = 0
    for path in sorted(p for folder in folders for p in folder.glob("run-*.wandb")):
        data = path.read_bytes()  # once: the header written back is that of the bytes parsed
        try:
            records = parse_records(data, str(path))
        except (ValueError, struct.error, DecodeError) as exc:  # another wandb's format
            log.warning("W&B: %s left as is (%s): its rows after step %d stay, and syncing "
                        "it beside the resumed attempt shows those steps twice", path, exc, step)
            continue
        kept = rewound(records, step)
        rows = sum(r.WhichOneof("record_type") == "history" for r in records) \
            - sum(r.WhichOneof("record_type") == "history" for r in kept)
        if not rows:
            continue
        tmp = path.with_suffix(".rewind")
        tmp.write_bytes(encode(data[:_FILE_HEADER],
                              [record.SerializeToString() for record in kept]))
        os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new one
        log.info("W&B: %s rewound to step %d (%d rows of rerun steps dropped)",
                 path.parent.name, step, rows)
        dropped += rows
    return dropped
