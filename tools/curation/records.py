"""Input files and the records in them: every record comes back, good or malformed.

A malformed record (bad JSON, no text, a null, a non-string, invalid UTF-8, a lone surrogate,
an unreadable file) is returned with its line and the reason instead of raising, so one bad
line never ends a run and the report can count reasons and name file and line.

How a row becomes text is one small callable (``TextField``); another format (e.g. chat
messages rendered by a template) plugs in as another callable with the same shape.
"""
from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
"""What a directory is searched for; a file named on the command line is read whatever its
name (JSONL, gzip-compressed when it ends in .gz, Parquet when it ends in .parquet)."""


class Malformed(ValueError):
    """A row that holds no usable text; the message is the reason, counted as given."""


@dataclass(frozen=True)
class Record:
    line: int
    """1-based line (JSONL) or row (Parquet); 0 for a problem with the whole file."""
    text: str | None
    problem: str = ""
    """Why ``text`` is None: a short reason, the same for every record with that defect."""
    detail: str = ""


@dataclass(frozen=True)
class TextField:
    """The plain pre-training format: one string field per row."""

    key: str = "text"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.key,)

    def __call__(self, row: Any) -> str:
        if not isinstance(row, dict):
            raise Malformed(f"not a JSON object ({type(row).__name__})")
        if self.key not in row:
            raise Malformed(f"no {self.key!r} field")
        value = row[self.key]
        if value is None:
            raise Malformed(f"{self.key!r} is null")
        if not isinstance(value, str):
            raise Malformed(f"{self.key!r} is not a string ({type(value).__name__})")
        return value


Extractor = Callable[[Any], str]


def _wanted(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SUFFIXES)


def input_files(inputs: list[Path]) -> list[Path]:
    """Files given, and the supported files under directories given, sorted per directory;
    a file reached twice (a folder and a file in it, or a link) is read once, where first met."""
    out: list[Path] = []
    seen: set[Path] = set()
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _wanted(p))
        elif path.is_file():
            found = [path]
        else:
            raise FileNotFoundError(f"input {path} does not exist")
        for file in found:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                out.append(file)
    if not out:
        raise FileNotFoundError(f"no {', '.join(SUFFIXES)} files in {', '.join(map(str, inputs))}")
    return out


def _record(line: int, row: Any, extract: Extractor) -> Record:
    try:
        text = extract(row)
    except Malformed as err:
        return Record(line, None, str(err))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return Record(line, None, "lone surrogate", str(err))
    return Record(line, text)


def _jsonl(path: Path, extract: Extractor) -> Iterator[Record]:
    line = 0
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                if line == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                if not raw.strip():
                    continue
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield Record(line, None, "not UTF-8", str(err))
                    continue
                try:
                    row = json.loads(decoded)
                except json.JSONDecodeError as err:
                    yield Record(line, None, "invalid JSON", str(err))
                    continue
                yield _record(line, row, extract)
    except (OSError, EOFError, zlib.error) as err:  # a corrupt or truncated gzip, a read error
        yield Record(line + 1, None, "unreadable file", f"{type(err).__name__}: {err}")


def _parquet(path: Path, extract: Extractor, columns: tuple[str, ...]) -> Iterator[Record]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as err:
        yield Record(0, None, "not a Parquet file", str(err))
        return
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        yield Record(0, None, f"no {missing[0]!r} column",
                     f"columns: {', '.join(table.schema_arrow.names)}")
        return
    row = 0
    for batch in table.iter_batches(columns=list(columns)):
        for values in zip(*(batch.column(c).to_pylist() for c in columns)):
            row += 1
            yield _record(row, dict(zip(columns, values)), extract)


def read_records(path: Path, extract: Extractor) -> Iterator[Record]:
    """Every record of one file, in order; malformed ones carry their reason."""
    if path.suffix == ".parquet":
        yield from _parquet(path, extract, getattr(extract, "columns", ("text",)))
    else:
        yield from _jsonl(path, extract)
