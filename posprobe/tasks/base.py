"""The common Task API: structured prompts with token-level item spans, and the task registry's building blocks.

Owns `Prompt` (token ids + the token span of every item / document + the gold answer), `Task` (seeded prompt
generator + exact-match scorer), `Segment` and `build_prompt` (a prompt assembled from text segments, tokenized
segment by segment so item spans are exact token ranges), and the answer-extraction helpers the scorers share.
Implements the task side of docs/tasks.md (synthetic, generated, seeded tasks; gold position swept) that the
behavioural and document-level U-curves (docs/probes/position_bias.md) are measured on.

Spans are exact by construction: every segment is tokenized on its own and the prompt is the concatenation, so
`input_ids[start:stop]` are precisely the tokens of item k. Tasks put segment boundaries where the tokenizer would
split anyway (before a newline), so the concatenation equals the tokenization of the whole text for the tokenizers
posprobe ships with (checked in tests/tasks); `Prompt.natural` records whether it does for the model at hand.
A task's prompts for one seed differ only in where the gold item sits: the same items, the distractors in the same
order, so prompts for different gold positions of one trial have the same length (and can run as one batch).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from posprobe.errors import InputError


@dataclass(frozen=True)
class Prompt:
    """One generated task prompt.

    input_ids: token ids the model reads (BOS first when the model uses one); answer: the gold answer string;
    answer_ids: tokens of the answer as the model should continue the prompt (`answer_prefix + answer`);
    spans: token range [start, stop) of every item / document in list order (slot k = spans[k]);
    gold_index: the slot of the item that holds the answer; text: the prompt text (without BOS);
    natural: whether input_ids equal the tokenization of the whole text (segment boundaries did not split a token).
    """

    input_ids: tuple[int, ...]
    answer: str
    answer_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    gold_index: int
    text: str
    task: str = ""
    seed: int = 0
    natural: bool = True

    @property
    def n_items(self) -> int:
        return len(self.spans)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def gold_span(self) -> tuple[int, int]:
        return self.spans[self.gold_index]

    @property
    def query_index(self) -> int:
        """The sequence index of the answer-predicting query (the last prompt token)."""
        return len(self.input_ids) - 1

    def ids(self) -> Tensor:
        """input_ids as a [1, n] LongTensor."""
        return torch.tensor([self.input_ids], dtype=torch.long)


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text; `item=True` marks an item / document whose token span is recorded."""

    text: str
    item: bool = False


def build_prompt(
    access: Any,
    segments: Sequence[Segment],
    *,
    answer: str,
    answer_prefix: str,
    gold_index: int,
    task: str,
    seed: int,
) -> Prompt:
    """Tokenize `segments` one by one (BOS first when the model has one) and record the token span of each item."""
    ids: list[int] = list(access.encode("", add_bos=True))
    spans: list[tuple[int, int]] = []
    for segment in segments:
        piece = list(access.encode(segment.text, add_bos=False)) if segment.text else []
        if segment.item:
            if not piece:
                raise InputError(f"Task {task!r} produced an empty item segment; items must contain text.")
            spans.append((len(ids), len(ids) + len(piece)))
        ids.extend(piece)
    text = "".join(s.text for s in segments)
    natural = ids == list(access.encode(text, add_bos=True))
    answer_ids = tuple(int(i) for i in access.encode(answer_prefix + answer, add_bos=False))
    return Prompt(input_ids=tuple(int(i) for i in ids), answer=answer, answer_ids=answer_ids, spans=tuple(spans),
                  gold_index=gold_index, text=text, task=task, seed=seed, natural=natural)


def check_item_args(task: str, n_items: int, gold_index: int, min_items: int = 1, max_items: int | None = None) -> int:
    """Validate (n_items, gold_index); negative gold indices count from the end. Returns the normalised index."""
    if not isinstance(n_items, int) or n_items < min_items:
        raise InputError(f"Task {task!r} needs n_items >= {min_items}; got {n_items!r}.")
    if max_items is not None and n_items > max_items:
        raise InputError(f"Task {task!r} can build at most {max_items} distinct items; got n_items={n_items}. "
                         f"Use fewer items.")
    index = gold_index + n_items if gold_index < 0 else gold_index
    if not 0 <= index < n_items:
        raise InputError(f"gold_index {gold_index} is outside the {n_items} items of task {task!r}; use "
                         f"0..{n_items - 1} (or negative indices counted from the end).")
    return index


class Task(abc.ABC):
    """A seeded synthetic task. Subclasses are frozen dataclasses whose fields are the task's configuration.

    `make(access, n_items, gold_index, seed)` builds one prompt: the same seed gives the same items (and the same
    distractor order) whatever `gold_index` is, so a seed is one trial of the gold item moved through the slots.
    `score(prompt, completion)` is the task's exact-match check of a greedy completion.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    default_items: ClassVar[int] = 20
    max_new_tokens: int

    @abc.abstractmethod
    def make(self, access: Any, n_items: int, gold_index: int, seed: int) -> Prompt: ...

    @abc.abstractmethod
    def score(self, prompt: Prompt, completion: str) -> bool: ...

    def stop_strings(self) -> tuple[str, ...]:
        """Texts whose single token ends generation early (all rows of a batch must have produced one)."""
        return ("\n",)


# --- batches of prompts of different lengths ---------------------------------------------------------------------


@dataclass(frozen=True)
class PaddedBatch:
    """Sequences left-padded to one length: what `access.run(ids, attention_mask=, position_ids=)` takes.

    Row r holds its sequence at columns [offsets[r], n): sequence index i of row r is column offsets[r] + i, and its
    position id is i (explicit position_ids, so padding shifts no position). Padding columns have mask 0 and
    position 0; their token is `pad_id`. Queries a probe reads must be real columns (`column`)."""

    input_ids: Tensor  # [b, n]
    attention_mask: Tensor  # [b, n] 1 = token, 0 = padding
    position_ids: Tensor  # [b, n]
    offsets: tuple[int, ...]  # padding columns before row r's first token

    @property
    def padded(self) -> bool:
        return any(self.offsets)

    def column(self, row: int, index: int | Tensor) -> int | Tensor:
        """The column of sequence index `index` of row `row`."""
        return index + self.offsets[row]

    def run_kwargs(self) -> dict[str, Tensor | None]:
        """Keywords for `access.run`: no mask / positions when nothing is padded (the unpadded fast path)."""
        if not self.padded:
            return {}
        return {"attention_mask": self.attention_mask, "position_ids": self.position_ids}


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> PaddedBatch:
    """Left-pad token sequences to the longest one (the last column of every row is a real token)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InputError("pad_left needs at least one sequence and no empty sequence.")
    n = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), n), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    pos = torch.zeros((len(sequences), n), dtype=torch.long)
    offsets = []
    for r, seq in enumerate(sequences):
        off = n - len(seq)
        ids[r, off:] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[r, off:] = 1
        pos[r, off:] = torch.arange(len(seq))
        offsets.append(off)
    return PaddedBatch(ids, mask, pos, tuple(offsets))


def pad_token_id(tokenizer: Any) -> int:
    """The id padding columns hold (masked, so any valid id works): pad, else eos, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


# --- answer extraction shared by scorers -------------------------------------------------------------------------

_INTEGER = re.compile(r"\d+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def first_integer(completion: str) -> str | None:
    """The first run of digits in the completion (None when there is none)."""
    match = _INTEGER.search(completion)
    return match.group(0) if match else None


def first_uuid(completion: str) -> str | None:
    match = _UUID.search(completion)
    return match.group(0).lower() if match else None


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD / Liu et al. normalisation)."""
    text = text.lower()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())
