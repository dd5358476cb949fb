"""Training data: JSONL of chats ({"messages": [...]}: loss on the assistant's tokens only) or of
prompt/completion pairs ({"prompt", "completion"}: loss on the completion). Every problem is an
error naming the file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.errors import EdgeloraError, SourceNotFoundError
from edgelora.tokenizer import Tokenizer


class DataError(EdgeloraError):
    """Training data that cannot be used."""


@dataclass
class Example:
    tokens: np.ndarray  # (T,) int64
    mask: np.ndarray  # (T,) bool: the tokens that are targets
    line: int


def _spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(offsets), bool)
    for i, (a, b) in enumerate(offsets):
        mask[i] = b > a and any(a >= s and b <= e for s, e in spans)
    return mask


def encode_chat(tokenizer: Tokenizer, messages: list[dict], where: str) -> tuple[list[int], np.ndarray]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role (system, user or assistant) and string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn from; add the assistant's reply")
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
                after = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
                if not text.startswith(after) or not after.startswith(before):
                    raise DataError(f"{where}: the chat template does not render turns incrementally")
                spans.append((len(before), len(after)))
    else:
        parts, spans, pos = [], [], 0
        for m in messages:
            piece = m["content"] + "\n"
            if m["role"] == "assistant":
                spans.append((pos, pos + len(piece)))
            parts.append(piece)
            pos += len(piece)
        text = "".join(parts)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    return list(enc.ids), _spans_to_mask(enc.offsets, spans)


def load(path: str | Path, tokenizer: Tokenizer, max_len: int) -> list[Example]:
    path = Path(path)
    if not path.exists():
        raise SourceNotFoundError(f"no such training data file: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a file; give a JSONL file of chats or prompt/completion pairs")
    examples = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8") from None
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each line must be a JSON object with \"messages\" or \"prompt\"/\"completion\"")
        if "messages" in obj:
            ids, mask = encode_chat(tokenizer, obj["messages"], where)
        elif "prompt" in obj and "completion" in obj:
            p = tokenizer.backend.encode(str(obj["prompt"]), add_special_tokens=False).ids
            c = tokenizer.backend.encode(str(obj["completion"]), add_special_tokens=False).ids
            if not c:
                raise DataError(f"{where}: empty completion")
            ids, mask = p + c, np.array([False] * len(p) + [True] * len(c))
        else:
            raise DataError(f"{where}: expected \"messages\" or \"prompt\" and \"completion\"")
        if len(ids) > max_len:
            raise DataError(f"{where}: {len(ids)} tokens, longer than the sequence length {max_len}; "
                            "shorten the sample or raise --seq-len")
        if not mask[1:].any():
            raise DataError(f"{where}: no target tokens after tokenization")
        examples.append(Example(np.asarray(ids, np.int64), mask, n))
    if not examples:
        raise DataError(f"{path}: no training examples (the file is empty)")
    return examples
