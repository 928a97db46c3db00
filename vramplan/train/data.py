"""Training data: JSONL examples -> token ids with loss labels -> padding-free packed rows.

Three line shapes are accepted: ``{"messages": [...]}`` (rendered with the tokenizer's chat
template), ``{"prompt", "completion"}`` and ``{"text"}``. By default only the assistant /
completion tokens carry a loss; everything else is labelled ``IGNORE``. The whole file is
validated before any model loads, so a bad line costs seconds, not a model load.

Labels are stored already shifted (``labels[t]`` is the token that should follow position
``t``), per example, so packing never lets one example predict the first token of the next.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vramplan.errors import VramplanError

IGNORE = -100
OVERLONG = ("truncate", "drop")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # shifted: labels[t] is the target for position t


@dataclass
class Dataset:
    rows: list[list[Example]]  # each row: examples packed into at most seq_len tokens
    seq_len: int
    pad_token_id: int
    n_examples: int
    n_truncated: int = 0
    n_dropped: int = 0
    n_target_tokens: int = 0
    stats: dict = field(default_factory=dict)


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse and validate every line; a bad one raises with the file and line number. Blank lines (a trailing one,
    a file joined from parts) are passed over, as the Hugging Face ``datasets`` JSON reader passes over them."""
    path = Path(path)
    if not path.is_file():
        raise VramplanError(f"data file {path} does not exist; pass a JSONL file with --data")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise VramplanError(f"{where}: not valid JSON ({err.msg}); fix or remove the line") from None
            _check_shape(record, where)
            records.append(record)
    if not records:
        raise VramplanError(f"data file {path} has no examples")
    return records


def _check_shape(record, where: str) -> None:
    shapes = 'use {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}'
    if not isinstance(record, dict):
        raise VramplanError(f"{where}: expected a JSON object; {shapes}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
            for m in messages
        ):
            raise VramplanError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    elif "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str) or not record["completion"]:
            raise VramplanError(f"{where}: 'prompt' and 'completion' must be strings, the completion non-empty")
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise VramplanError(f"{where}: 'text' must be a non-empty string")
    else:
        raise VramplanError(f"{where}: unknown example shape with keys {sorted(record)}; {shapes}")


def tokenize(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it is trained on (assistant / completion / all text)."""
    if "messages" in record:
        return _tokenize_messages(record["messages"], tokenizer)
    if "prompt" in record:
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids, [True] * len(ids)


def _tokenize_messages(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    # Render growing prefixes: the tokens a turn adds to the rendering are its tokens. Before an
    # assistant turn, the prefix is rendered with the generation prompt (the role header), which
    # inference supplies, so only the reply itself and its end marker are trained on. This works
    # with any chat template, unlike {% generation %} markers few templates have.
    ids: list[int] = []
    train: list[bool] = []

    def extend(rendered: str, trained: bool) -> None:
        nonlocal ids, train
        prefix_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        common = 0
        while common < min(len(ids), len(prefix_ids)) and ids[common] == prefix_ids[common]:
            common += 1
        # a template that rewrites earlier text once more turns arrive: keep its latest rendering
        ids, train = ids[:common], train[:common]
        train = train + [trained] * (len(prefix_ids) - common)
        ids = prefix_ids

    for end in range(1, len(messages) + 1):
        is_reply = messages[end - 1]["role"] == "assistant"
        if is_reply:
            extend(tokenizer.apply_chat_template(messages[:end - 1], tokenize=False, add_generation_prompt=True), False)
        extend(tokenizer.apply_chat_template(messages[:end], tokenize=False), is_reply)
    return ids, train


def to_example(ids: list[int], train: list[bool]) -> Example:
    labels = [tok if keep else IGNORE for tok, keep in zip(ids[1:], train[1:])] + [IGNORE]
    return Example(input_ids=list(ids), labels=labels)


def build_dataset(path: str | Path, tokenizer, seq_len: int, overlong: str = "truncate",
                  records: list[dict] | None = None) -> Dataset:
    """Read (unless ``records`` were read already), tokenize, handle overlong examples, pack into rows."""
    if overlong not in OVERLONG:
        raise VramplanError(f"--overlong is {overlong!r}; choose truncate or drop")
    if records is None:
        records = read_jsonl(path)
    examples, truncated, dropped = [], 0, 0
    for record in records:
        ids, train = tokenize(record, tokenizer)
        if len(ids) > seq_len:
            if overlong == "drop":
                dropped += 1
                continue
            ids, train = ids[:seq_len], train[:seq_len]
            truncated += 1
        example = to_example(ids, train)
        if any(label != IGNORE for label in example.labels):
            examples.append(example)
        else:
            dropped += 1  # nothing to learn from (e.g. the completion was truncated away)
    if not examples:
        raise VramplanError(f"{path}: no example has a target token left at --seq {seq_len}; raise --seq or use --overlong truncate")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Dataset(
        rows=pack(examples, seq_len), seq_len=seq_len, pad_token_id=pad, n_examples=len(examples),
        n_truncated=truncated, n_dropped=dropped, n_target_tokens=sum(count_targets(e) for e in examples),
    )


def count_targets(example: Example) -> int:
    return sum(label != IGNORE for label in example.labels)


def pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Greedy in-order packing: each row holds whole examples and at most ``seq_len`` tokens."""
    rows: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for example in examples:
        if current and used + len(example.input_ids) > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(example)
        used += len(example.input_ids)
    if current:
        rows.append(current)
    return rows


def row_length(row: list[Example]) -> int:
    """Tokens in a packed row (its examples back to back, no padding)."""
    return sum(len(e.input_ids) for e in row)


def bucketed_width(width: int, seq_len: int, buckets: int) -> int:
    """``width`` rounded up to the next of ``buckets`` evenly spaced widths up to ``seq_len``.

    A captured CUDA graph replays one shape: packed rows of every slightly different length would
    each be a new shape, captured or run eagerly; rounded up they fall on at most ``buckets``
    shapes per micro-batch size, for at most ``seq_len / buckets`` padding tokens a row (no target
    among them, so the loss and its gradients are unchanged)."""
    step = -(-seq_len // buckets)
    return max(width, min(seq_len, -(-width // step) * step))


def collate(rows: list[list[Example]], pad_token_id: int, no_targets: bool = False,
            width: int | None = None) -> dict[str, torch.Tensor]:
    """Rows -> ``input_ids``, ``labels``, ``position_ids`` [batch, longest row] (or ``width``
    when given and longer: the padding tail is one more ignored, position-reset stretch).

    ``no_targets``: every label ignored (a rank with no row left at an epoch's end runs a
    stand-in row that adds nothing to the loss, so it still joins the step's collectives).

    ``position_ids`` restart at 0 for every example (and for the padding tail). With no
    attention mask, transformers reads those restarts as packed-sequence boundaries and
    builds a block-diagonal causal mask, so no example attends to another.
    """
    width = max(width or 0, max(map(row_length, rows)))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[b, start:start + n] = torch.tensor(example.input_ids)
            labels[b, start:start + n] = torch.tensor(example.labels)
            position_ids[b, start:start + n] = torch.arange(n)
            start += n
        position_ids[b, start:] = torch.arange(width - start)
    if no_targets:
        labels.fill_(IGNORE)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a fixed function of seed and epoch, so a resumed run sees the same order."""
    order = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
