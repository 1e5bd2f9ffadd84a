"""Supervised fine-tuning data: rows of text to padded or packed token batches.

A row is one of three formats (JSONL lines, a JSON array, or Python dicts):

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
    {"prompt": "...", "completion": "..."}
    {"text": "..."}

Chat rows are rendered with the tokenizer's chat template. The loss covers only what the
model should learn to write: the assistant turns, the completion, or all of a text row
(``train_on_inputs=True`` learns every token). Each assistant span is found the way
TRL and torchtune do it, by rendering prefixes of the conversation: the text the
template adds between ``render(messages[:i], add_generation_prompt=True)`` and
``render(messages[:i + 1])`` is assistant turn i. Every piece is tokenized on its own,
so span boundaries are exact and the prompt tokens are those seen at generation time.

Conventions of every batch (dict of (B, T) int64 tensors):

- ``labels`` align with ``input_ids`` (the Hugging Face convention: the loss shifts them,
  predicting ``labels[:, 1:]`` from ``logits[:, :-1]``); ``IGNORE_INDEX`` (-100) means no loss.
  Each example's first label is ignored: nothing inside the example predicts it, and in
  a packed row this keeps the previous example from learning to predict it.
- EOS ends every example and is learned. Padding is marked by position (``attention_mask``
  0, label -100), never by comparing ids, so a pad id equal to the EOS id masks nothing real.
- Rows are right-padded to the longest row of the batch. Padding has position id 0 and,
  in packed batches, segment id ``PAD_SEGMENT`` (-1).
- Rows longer than ``max_seq_length`` are truncated from the right and kept (counted in
  ``SFTDataset.stats`` and warned about); a row left with no learned token is dropped
  (also counted).
- Packing concatenates whole examples, in dataset order, into rows of at most
  ``max_seq_length`` tokens; ``position_ids`` restart at 0 for each example and
  ``segment_ids`` number the examples of a row 0, 1, 2, ... so the model attends within
  each example only: a packed batch gives the same per-token losses as an unpacked one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100  # label of tokens that carry no loss (PyTorch cross_entropy's default)
PAD_SEGMENT = -1  # segment id of padding in packed batches
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Row:
    """One validated input row and where it came from, for error messages."""

    data: dict  # the row as read: messages, prompt/completion, or text
    where: str  # "file.jsonl line 7" or "rows[6]"
    kind: str  # "messages", "prompt_completion" or "text"


@dataclass(frozen=True)
class Example:
    """One tokenized row."""

    input_ids: list[int]  # EOS included (unless truncated away)
    labels: list[int]  # same length; IGNORE_INDEX where there is no loss


@dataclass
class DatasetStats:
    """What building a dataset did to its rows."""

    rows: int = 0  # rows read
    truncated: int = 0  # rows longer than max_seq_length, cut from the right and kept
    dropped: int = 0  # rows left without any learned token after truncation
    tokens: int = 0  # tokens in the kept examples
    label_tokens: int = 0  # of those, tokens with a loss


@dataclass
class SFTDataset:
    """Tokenized examples grouped into batch rows ("units")."""

    units: list[list[Example]]  # one batch row each: one example, or several when packed
    packed: bool  # whether batches carry segment_ids
    pad_token_id: int  # id written into padding (may equal the EOS id)
    max_seq_length: int  # no unit is longer
    stats: DatasetStats = field(default_factory=DatasetStats)

    def __len__(self) -> int:
        return len(self.units)


def load_rows(source) -> list[Row]:
    """Read and validate rows from a ``.jsonl``/``.json`` file or a list of dicts.

    Raises:
        ValueError: naming the file and line (or list index) of the first bad row.
        OSError: when the file cannot be read.
    """
    if isinstance(source, (list, tuple)):
        return [_validate(row, f"rows[{i}]") for i, row in enumerate(source)]
    path = Path(os.fspath(source))
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    rows.append(_validate(_parse_json(line, f"{path} line {number}"), f"{path} line {number}"))
        return rows
    if path.suffix == ".json":
        data = _parse_json(path.read_text(encoding="utf-8"), str(path))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must be a JSON array of rows, got {type(data).__name__}")
        return [_validate(row, f"{path} item {i}") for i, row in enumerate(data)]
    raise ValueError(f"{path}: unsupported dataset file; use .jsonl (one JSON row per line) or .json (an array)")


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None


def _validate(row, where: str) -> Row:
    """Check one row's format; return it with its kind."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    kinds = [k for k, keys in (("messages", ("messages",)), ("prompt_completion", ("prompt", "completion")),
                               ("text", ("text",))) if any(key in row for key in keys)]
    if len(kinds) != 1:
        found = "none" if not kinds else " and ".join(kinds)
        raise ValueError(f"{where}: a row needs exactly one of 'messages', 'prompt' + 'completion', "
                         f"or 'text' (found {found}; keys: {sorted(row)})")
    kind = kinds[0]
    if kind == "messages":
        _validate_messages(row["messages"], where)
    else:
        for key in ("prompt", "completion") if kind == "prompt_completion" else ("text",):
            value = row.get(key)
            if not isinstance(value, str) or (key != "prompt" and not value):
                raise ValueError(f"{where}: '{key}' must be a non-empty string, got {value!r:.60}")
    return Row(row, where, kind)


def _validate_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has role {message['role']!r}; expected one of {ROLES}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise ValueError(f"{where}: message {i} ({message['role']}) has empty or non-string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: 'messages' has no assistant turn, so nothing would be learned")


def split_rows(rows: list[Row], eval_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split off ``round(eval_fraction * len(rows))`` rows (at least 1 when the fraction
    is positive), chosen by ``seed``; both parts keep the original order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    count = max(1, round(eval_fraction * len(rows))) if eval_fraction > 0 else 0
    if count >= len(rows) and count:
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training rows out of {len(rows)}")
    held = set(np.random.default_rng(seed).permutation(len(rows))[:count].tolist())
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def tokenize_row(row: Row, tokenizer, train_on_inputs: bool = False) -> Example:
    """Token ids and labels of one row, EOS appended and learned (see the module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set one so examples can end")
    if row.kind == "messages":
        pieces = _chat_pieces(row, tokenizer, eos)
    elif row.kind == "prompt_completion":
        pieces = [(tokenizer.encode(row.data["prompt"], add_special_tokens=True), False),
                  (tokenizer.encode(row.data["completion"]), True)]
    else:
        pieces = [(tokenizer.encode(row.data["text"], add_special_tokens=True), True)]
    ids = [t for piece, _ in pieces for t in piece]
    learned = [learn for piece, learn in pieces for _ in piece]
    if row.kind != "messages" and (not ids or ids[-1] != eos):
        ids.append(eos)
        learned.append(True)
    labels = [t if (learn or train_on_inputs) else IGNORE_INDEX for t, learn in zip(ids, learned)]
    labels[0] = IGNORE_INDEX  # nothing in this example predicts its first token
    return Example(ids, labels)


def _chat_pieces(row: Row, tokenizer, eos: int) -> list[tuple[list[int], bool]]:
    """(token ids, learned) pieces of a conversation, split at each assistant turn.

    An assistant turn is learned up to and including the first EOS in it; what the
    template writes after that EOS (ChatML's newline) is context. A template whose turn
    holds no EOS gets one appended after the last assistant turn.
    """
    messages = row.data["messages"]

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=generation_prompt,
                                             tokenize=False)

    pieces, done = [], ""  # done: the rendered text already turned into pieces
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"{row.where}: the chat template does not render message {i} as an extension of "
                             f"the messages before it, so the assistant turn cannot be located")
        answer = tokenizer.encode(full[len(prompt):])
        cut = answer.index(eos) + 1 if eos in answer else len(answer)
        pieces += [(tokenizer.encode(prompt[len(done):]), False), (answer[:cut], True), (answer[cut:], False)]
        done = full
    if not any(eos in piece for piece, learned in pieces if learned):
        pieces.append(([eos], True))
    tail = render(len(messages), False)[len(done):]  # turns after the last assistant turn
    pieces.append((tokenizer.encode(tail) if tail else [], False))
    return pieces


def build_dataset(source, tokenizer, max_seq_length: int = 1024, packing: bool = False,
                  train_on_inputs: bool = False) -> SFTDataset:
    """Tokenize rows (a path, a list of dicts, or ``load_rows`` output) into an ``SFTDataset``.

    Args:
        source: ``.jsonl``/``.json`` path, list of dicts, or list of ``Row``.
        tokenizer: has ``encode``, ``apply_chat_template``, ``eos_token_id``, ``pad_token_id``.
        max_seq_length: tokens per batch row; longer examples are truncated from the right.
        packing: concatenate examples into rows of up to ``max_seq_length`` tokens.
        train_on_inputs: learn the prompt / user tokens too.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    rows = source if isinstance(source, list) and source and isinstance(source[0], Row) else load_rows(source)
    stats = DatasetStats(rows=len(rows))
    examples = []
    for row in rows:
        example = tokenize_row(row, tokenizer, train_on_inputs)
        if len(example.input_ids) > max_seq_length:
            stats.truncated += 1
            example = Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])
        if all(label == IGNORE_INDEX for label in example.labels):
            stats.dropped += 1
            continue
        stats.tokens += len(example.input_ids)
        stats.label_tokens += sum(label != IGNORE_INDEX for label in example.labels)
        examples.append(example)
    if stats.truncated or stats.dropped:
        warnings.warn(f"{stats.truncated} of {stats.rows} rows were longer than max_seq_length={max_seq_length} "
                      f"and were truncated from the right; {stats.dropped} were dropped because no learned "
                      f"token was left. Raise max_seq_length to keep them whole.", stacklevel=2)
    if not examples:
        raise ValueError("the dataset has no usable rows")
    units = pack(examples, max_seq_length) if packing else [[e] for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SFTDataset(units, packing, pad, max_seq_length, stats)


def pack(examples: list[Example], max_seq_length: int) -> list[list[Example]]:
    """Greedily fill rows of at most ``max_seq_length`` tokens with whole examples, in order."""
    units, current, length = [], [], 0
    for example in examples:
        if current and length + len(example.input_ids) > max_seq_length:
            units.append(current)
            current, length = [], 0
        current.append(example)
        length += len(example.input_ids)
    if current:
        units.append(current)
    return units


def collate(units: list[list[Example]], pad_token_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad units into a batch: ``input_ids``, ``labels``, ``attention_mask``,
    ``position_ids`` and, when ``packed``, ``segment_ids``; all (B, T) int64."""
    T = max(sum(len(e.input_ids) for e in unit) for unit in units)
    B = len(units)
    batch = {
        "input_ids": torch.full((B, T), pad_token_id, dtype=torch.long),
        "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        "position_ids": torch.zeros(B, T, dtype=torch.long),
        "segment_ids": torch.full((B, T), PAD_SEGMENT, dtype=torch.long),
    }
    for b, unit in enumerate(units):
        start = 0
        for segment, example in enumerate(unit):
            n = len(example.input_ids)
            span = slice(start, start + n)
            batch["input_ids"][b, span] = torch.tensor(example.input_ids)
            batch["labels"][b, span] = torch.tensor(example.labels)
            batch["attention_mask"][b, span] = 1
            batch["position_ids"][b, span] = torch.arange(n)
            batch["segment_ids"][b, span] = segment
            start += n
    if not packed:
        del batch["segment_ids"]
    return batch


class BatchIterator:
    """An endless, resumable iterator of batches, reshuffled every epoch by ``seed``.

    Epoch e visits the units in the order ``default_rng((seed, e)).permutation(n)``; a
    step takes the next ``batch_size * world_size`` of them and rank r keeps its
    ``batch_size`` slice. ``state_dict()`` is ``{"epoch", "index", ...}`` (index = steps
    taken in the epoch); loading it continues with exactly the next batch. No DataLoader,
    no worker processes, no hidden random state.

    The last, incomplete global batch of an epoch is kept when ``world_size == 1`` and
    ``drop_last`` is False; otherwise it is dropped, so every rank takes the same steps.
    """

    def __init__(self, dataset: SFTDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, world_size: int = 1, rank: int = 0):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"BatchIterator: need batch_size >= 1 and 0 <= rank < world_size, "
                             f"got batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.world_size, self.rank = world_size, rank
        self.global_batch = batch_size * world_size
        n = len(dataset.units)
        full_batches_only = drop_last or world_size > 1
        self.steps_per_epoch = n // self.global_batch if full_batches_only else math.ceil(n / self.global_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(f"BatchIterator: {n} batch rows make no full global batch of {self.global_batch}; "
                             f"lower per_device_train_batch_size or add data")
        self.epoch, self.index = 0, 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation) cache

    def __len__(self) -> int:
        """Steps per epoch."""
        return self.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.global_batch + self.rank * self.batch_size
        chosen = self._epoch_order()[start:min(start + self.batch_size, (self.index + 1) * self.global_batch)]
        self.index += 1
        units = [self.dataset.units[i] for i in chosen]
        return collate(units, self.dataset.pad_token_id, self.dataset.packed)

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.dataset.units)
            order = np.random.default_rng((self.seed, self.epoch)).permutation(n) if self.shuffle else range(n)
            self._order = (self.epoch, [int(i) for i in order])
        return self._order[1]

    def state_dict(self) -> dict:
        """Position in the data (plain ints): resume with ``load_state_dict``."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_units": len(self.dataset.units)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()``; the dataset and seed must be the same."""
        if state["num_units"] != len(self.dataset.units) or state["seed"] != self.seed:
            raise ValueError(f"data position was saved for {state['num_units']} batch rows with seed {state['seed']}, "
                             f"but this dataset has {len(self.dataset.units)} with seed {self.seed}; "
                             f"resume with the same data, max_seq_length, packing and seed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
