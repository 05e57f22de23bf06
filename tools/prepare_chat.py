"""``tools.prepare_data --format chat``: chat JSONL -> two megatron indexed datasets.

``<prefix>.bin/.idx`` holds each conversation's tokens as one document (megatron's reader);
``<prefix>_loss_mask.bin/.idx`` holds, document for document, 1 on the answer tokens and 0
elsewhere (uint8). Like the pre-training path, each input file becomes a shard under
``<prefix>.shards/`` that a rerun reuses while its file, the tokenizer's contents and the
options are unchanged, and every dropped record is counted by reason and named by file and
line in ``<prefix>.stats.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from launch.schema import SFT_MASK_SUFFIX
from tools.chat_data import ChatField, encode, load_chat_tokenizer
from tools.curation.records import Malformed, Record, input_files, read_records
from tools.curation.shards import (MALFORMED_EXAMPLES, builder_class, shard_prefix, source_id,
                                   tokenizer_digest)


def _token_dtype(vocab_size: int) -> type:
    from tools.prepare_data import token_dtype
    return token_dtype(vocab_size)


def _convert(record: Record, tokenizer: Any, max_tokens: int) -> tuple[Any, str]:
    """(ids, mask) of a good record, or None and the reason it is dropped."""
    if record.text is None:
        return None, record.problem
    try:
        ids, mask = encode(tokenizer, json.loads(record.text))
    except Malformed as err:
        return None, str(err)
    if len(ids) > max_tokens:
        return None, "longer than --max-tokens"
    if not mask.any():
        return None, "empty answer"
    return (ids, mask), ""


def write_shard(path: Path, shard: Path, tokenizer: Any, dtype: type,
                max_tokens: int) -> dict[str, Any]:
    """One file's conversations into ``shard`` (tokens and mask); its summary."""
    import numpy

    tmp = Path(f"{shard}.tmp")
    tokens = builder_class()(f"{tmp}.bin", dtype=dtype)
    masks = builder_class()(f"{tmp}{SFT_MASK_SUFFIX}.bin", dtype=numpy.uint8)
    stats: dict[str, Any] = {"file": str(path), "conversations": 0, "kept": 0, "tokens": 0,
                             "answer_tokens": 0, "dropped": Counter(), "dropped_examples": []}
    for record in read_records(path, ChatField()):
        stats["conversations"] += 1
        encoded, problem = _convert(record, tokenizer, max_tokens)
        if encoded is None:
            stats["dropped"][problem] += 1
            if len(stats["dropped_examples"]) < MALFORMED_EXAMPLES:
                detail = f" ({record.detail})" if record.detail else ""
                stats["dropped_examples"].append(f"{path}:{record.line}: {problem}{detail}")
            continue
        ids, mask = encoded
        tokens.add_document(ids, [len(ids)])
        masks.add_document(mask, [len(mask)])
        stats["kept"] += 1
        stats["tokens"] += len(ids)
        stats["answer_tokens"] += int(mask.sum())
    tokens.finalize(f"{tmp}.idx")
    masks.finalize(f"{tmp}{SFT_MASK_SUFFIX}.idx")
    for ext in (".bin", ".idx", f"{SFT_MASK_SUFFIX}.bin", f"{SFT_MASK_SUFFIX}.idx"):
        os.replace(f"{tmp}{ext}", f"{shard}{ext}")
    return stats


def _shard(path: Path, shards_dir: Path, tokenizer: Any, digest: str, dtype: type,
           max_tokens: int) -> dict[str, Any]:
    shard = shard_prefix(shards_dir, path)
    source = source_id(path, {"format": "chat", "max_tokens": max_tokens}, digest)
    summary = Path(f"{shard}.json")
    if summary.is_file():
        stats = json.loads(summary.read_text())
        if stats.get("source") == source:
            return {**stats, "skipped": True, "shard": str(shard)}
    stats = write_shard(path, shard, tokenizer, dtype, max_tokens)
    stats["source"] = source
    summary.write_text(json.dumps(stats, indent=1))  # written last: the shard is finished
    return {**stats, "shard": str(shard)}


def _merge(shards: list[str], prefix: Path, dtype: type) -> None:
    import numpy

    for suffix, kind in (("", dtype), (SFT_MASK_SUFFIX, numpy.uint8)):
        builder = builder_class()(f"{prefix}{suffix}.bin", dtype=kind)
        for shard in shards:
            builder.add_index(f"{shard}{suffix}")
        builder.finalize(f"{prefix}{suffix}.idx")


def _packed_sequences(prefix: Path, max_tokens: int) -> int:
    """How many training sequences of ``max_tokens`` (train.seq_length + 1) the conversations
    pack into, in file order (training shuffles first: about as many); what sizes
    ``train.steps`` for a number of epochs."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.sft_data import pack

    dataset = IndexedDataset(str(prefix))  # held: its lengths are a view of its mmap
    lengths = dataset.sequence_lengths.tolist()
    del dataset
    return len(pack(lengths, max_tokens, True))


def prepare_chat(inputs: list[Path], tokenizer_path: Path, prefix: Path, max_tokens: int,
                 keep_shards: bool = False) -> dict[str, Any]:
    """The whole chat pipeline; its statistics (also in ``<prefix>.stats.json``)."""
    if max_tokens < 2:
        raise ValueError(f"--max-tokens {max_tokens}: expected 2 or more (train.seq_length + 1 "
                         "fits one conversation in a training sequence)")
    files = input_files(inputs)
    tokenizer = load_chat_tokenizer(tokenizer_path)
    dtype = _token_dtype(len(tokenizer))
    shards_dir = Path(f"{prefix}.shards")
    shards_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    digest = tokenizer_digest(tokenizer_path)
    rows = [_shard(path, shards_dir, tokenizer, digest, dtype, max_tokens) for path in files]
    _merge([r["shard"] for r in rows], prefix, dtype)
    if not keep_shards:
        shutil.rmtree(shards_dir)
    dropped: Counter = Counter()
    for row in rows:
        dropped.update(row["dropped"])
    total = {k: sum(r[k] for r in rows)
             for k in ("conversations", "kept", "tokens", "answer_tokens")}
    total["packed_sequences"] = _packed_sequences(prefix, max_tokens)
    report = {"format": "chat", "files": rows, "total": total, "dropped": dict(dropped),
              "output_prefix": str(prefix), "loss_mask": f"{prefix}{SFT_MASK_SUFFIX}",
              "max_tokens": max_tokens, "seconds": time.monotonic() - started}
    Path(f"{prefix}.stats.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report


def format_chat_report(report: dict[str, Any]) -> str:
    """Per file: conversations read, kept and dropped; then every drop reason and example."""
    lines = [f"{r['file']}: {r['kept']}/{r['conversations']} conversations, {r['tokens']} "
             f"tokens ({r['answer_tokens']} in answers){' (reused)' if r.get('skipped') else ''}"
             for r in report["files"]]
    lines += [f"dropped, {reason}: {n}" for reason, n in sorted(report["dropped"].items())]
    lines += [example for r in report["files"] for example in r["dropped_examples"]]
    lines.append(f"wrote {report['output_prefix']}.bin/.idx and {report['loss_mask']}.bin/.idx; "
                 f"about {report['total']['packed_sequences']} packed sequences of "
                 f"{report['max_tokens']} tokens (train.steps = epochs x that / "
                 "train.global_batch_size)")
    return "\n".join(lines)
