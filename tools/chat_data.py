"""Chat records -> token ids and a loss mask that keeps the assistant's tokens only.

A record is ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt", "response"}`` (with an
optional ``"system"``). It is rendered with the model's own chat template (the tokenizer
directory's ``tokenizer_config.json``, through transformers' ``apply_chat_template``), so
fine-tuning sees exactly the text inference will build.

Where each answer starts and ends is found by rendering prefixes of the conversation: answer
``i`` spans from the render of ``messages[:i]`` with the generation prompt to the render of
``messages[:i+1]`` (its content and the template's end-of-turn, so the model learns to stop).
Each span is tokenized on its own, so the prompt's tokens are those ``apply_chat_template(...,
add_generation_prompt=True)`` gives at inference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from tools.curation.records import Malformed

ROLES = ("system", "user", "assistant")


def _message(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Malformed("message is not an object")
    if "role" not in value:
        raise Malformed("message without a role")
    if value["role"] not in ROLES:
        raise Malformed("unknown role")
    if not isinstance(value.get("content"), str):
        raise Malformed("message content is not a string")
    return {"role": value["role"], "content": value["content"]}


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in row:
        if not isinstance(row["messages"], list) or not row["messages"]:
            raise Malformed("'messages' is not a non-empty list")
        return [_message(m) for m in row["messages"]]
    if "prompt" in row and "response" in row:
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return [_message(m) for m in system + [{"role": "user", "content": row["prompt"]},
                                                {"role": "assistant", "content": row["response"]}]]
    raise Malformed("no 'messages' or 'prompt'/'response' field")


@dataclass(frozen=True)
class ChatField:
    """A row -> its conversation as canonical JSON (``records.read_records`` carries text);
    :class:`Malformed` names what is wrong with a bad one."""

    @property
    def columns(self) -> tuple[str, ...]:
        return ("messages",)

    def __call__(self, row: Any) -> str:
        if not isinstance(row, dict):
            raise Malformed(f"not a JSON object ({type(row).__name__})")
        messages = _messages(row)
        roles = {m["role"] for m in messages}
        if "user" not in roles:
            raise Malformed("no user turn")
        if "assistant" not in roles:
            raise Malformed("no assistant turn")
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
            raise Malformed("empty answer")
        return json.dumps(messages, ensure_ascii=False)


def load_chat_tokenizer(path: Path) -> Any:
    """The transformers tokenizer of a local directory (or the one holding tokenizer.json);
    ValueError when it has no chat template to render with."""
    from transformers import AutoTokenizer

    folder = path if path.is_dir() else path.parent
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not tokenizer.chat_template:
        raise ValueError(f"--tokenizer {folder} has no chat template (tokenizer_config.json "
                         "'chat_template'); --format chat renders with the model's own")
    return tokenizer


def segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) pieces, in order."""
    def render(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=prompt)

    out, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(i, True), render(i + 1, False)
        if not (start.startswith(done) and end.startswith(start)):
            raise Malformed("chat template renders a turn differently once it is followed")
        out += [(start[len(done):], False), (end[len(start):], True)]
        done = end
    full = render(len(messages), False)
    if not full.startswith(done):
        raise Malformed("chat template renders a turn differently once it is followed")
    if full[len(done):]:
        out.append((full[len(done):], False))
    return [(text, answer) for text, answer in out if text]


def encode(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Token ids (int32) and loss mask (uint8, 1 on the answers' tokens) of one conversation."""
    ids: list[int] = []
    mask: list[int] = []
    for text, answer in segments(tokenizer, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(answer)] * len(piece)
    return numpy.asarray(ids, numpy.int32), numpy.asarray(mask, numpy.uint8)
