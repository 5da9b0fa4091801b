"""Needle-in-a-haystack and passkey trials, seeded and built token by token (docs/tasks.md, docs/probes/retrieval.md).

Owns `NeedleTrial` (prompt ids, the needle's token span, the answer's token span inside the needle, the answer ids
as the model should continue the prompt), `make_needle_trial` / `make_needle_trials` (the "special magic number"
needle of the retrieval-head probe, after Wu et al. 2024 and RULER) and `make_passkey_trials` (Mohtashami & Jaggi
2023's passkey), the sentence-boundary snapping both share, and `check_answers` (teacher-forced exact match and
answer log-probability, the needle accuracy of the retrieval heads' causal check).

How a trial is built, and why:
- The haystack is seeded generated text (`posprobe.tasks.text`, no download), tokenized as one text with a leading
  space so every sentence starts with the tokenizer's own word-initial token.
- Sentence boundaries are found with THIS tokenizer's period tokens (every haystack token whose text ends in "."),
  not hard-coded ids; the needle is inserted at the boundary nearest to `depth * len(haystack)`. The header before
  the haystack ends with a period too, so depth 0 is a boundary like any other.
- The needle (" The special magic number for Zanzibar is" + " 4721839" + ".") is tokenized piece by piece, so the
  answer's tokens inside the needle are exactly the tokens the model must produce after the question's
  "...for Zanzibar is": `answer_ids` equal `input_ids[answer_span]` by construction (token[j*] == w can hold).
  The needle span is then located in the finished prompt by searching its token ids (it must occur exactly once).
- BOS is prepended only when the model's tokenizer uses one (`access.encode(..., add_bos=True)`): Gemma has one,
  SmolLM2 does not; every span is an index into the ids actually run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from posprobe.errors import InputError
from posprobe.tasks.text import generated_text

# Keys of the magic-number needle: proper names and odd objects that never occur in the generated filler text
KEYS: tuple[str, ...] = (
    "Zanzibar", "Reykjavik", "the purple elephant", "the silver falcon", "Kathmandu", "the jade tortoise",
    "Valparaiso", "the crimson kite", "Ulaanbaatar", "the velvet otter", "Timbuktu", "the amber walrus",
    "Montevideo", "the golden mongoose", "Samarkand", "the indigo heron", "Marrakesh", "the scarlet lynx",
    "Tashkent", "the emerald beetle", "Antananarivo", "the cobalt badger", "Ouagadougou", "the ivory peacock",
)

NEEDLE_HEADER = ("There is a special magic number hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about it.")
PASSKEY_HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.")

TaskName = Literal["needle", "passkey"]

# The filler of Mohtashami & Jaggi 2023's passkey test (also the passkey of the PI, YaRN and LongRoPE papers): five
# sentences repeated. `filler="repeat"` uses it; the default "generated" is seeded varied text (harder: the model
# cannot tell the needle from the filler by repetition alone).
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLERS = ("generated", "repeat")


@dataclass(frozen=True)
class NeedleTrial:
    """One needle-in-a-haystack prompt.

    input_ids: the prompt the model reads, ending right before the answer (BOS first when the model uses one).
    answer_ids: the answer tokens as the model should continue the prompt; equal to input_ids[answer_span]. needle_span
    / answer_span: token ranges [start, stop) of the inserted needle statement and of the answer's tokens inside it;
    haystack_span: the filler with the needle inside it. depth: requested relative depth; actual_depth: where the needle
    landed after snapping to a sentence boundary (needle start / haystack length, 0 = first thing after the header, 1 =
    right before the question). context_length: the requested length (the prompt is at most this long, see n_tokens).
    """

    input_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    answer: str
    needle_span: tuple[int, int]
    answer_span: tuple[int, int]
    haystack_span: tuple[int, int]
    depth: float
    actual_depth: float
    context_length: int
    needle: str
    question: str
    prompt: str
    task: str
    seed: int
    index: int = 0
    natural: bool = True  # input_ids equal the tokenization of the whole prompt text

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def query_index(self) -> int:
        """The sequence index of the query that predicts the first answer token (the last prompt token)."""
        return len(self.input_ids) - 1

    @property
    def answer_positions(self) -> tuple[int, ...]:
        """Sequence indices of the queries that predict each answer token in a teacher-forced pass."""
        return tuple(range(self.query_index, self.query_index + len(self.answer_ids)))

    def ids(self) -> Tensor:
        """input_ids as a [1, n] LongTensor."""
        return torch.tensor([self.input_ids], dtype=torch.long)

    def teacher_forced_ids(self) -> Tensor:
        """[1, n + len(answer) - 1]: the prompt with the reference answer appended (its last token never needed)."""
        return torch.tensor([self.input_ids + self.answer_ids[:-1]], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


def period_token_ids(access: Any, ids: Sequence[int]) -> frozenset[int]:
    """The tokenizer's own sentence-final tokens among `ids`: every distinct id whose text ends in a period."""
    found = set()
    for token in set(int(i) for i in ids):
        if access.decode([token]).rstrip().endswith("."):
            found.add(token)
    return frozenset(found)


def sentence_boundaries(access: Any, ids: Sequence[int]) -> list[int]:
    """Indices b in [0, len(ids)] where a sentence starts: 0 and every index right after a period token."""
    periods = period_token_ids(access, ids)
    return [0] + [i + 1 for i, token in enumerate(ids) if int(token) in periods]


def find_subsequence(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    """Every start index at which `needle` occurs in `haystack` (token ids)."""
    n, m = len(haystack), len(needle)
    if m == 0:
        return []
    first = needle[0]
    return [i for i in range(n - m + 1) if haystack[i] == first and list(haystack[i:i + m]) == list(needle)]


def _filler_text(filler: str, n_sentences: int, seed: int) -> str:
    if filler == "repeat":  # the paper's five sentences, repeated (the same for every seed)
        return " ".join([REPEAT_FILLER] * max(1, n_sentences // 4))
    return generated_text(n_sentences, seed)


def _haystack(access: Any, n_tokens: int, seed: int, filler: str = "generated") -> list[int]:
    """Filler of at most `n_tokens` tokens, cut at a sentence boundary (" " first, see module doc)."""
    n_sentences = max(4, n_tokens // 8)
    while True:
        ids = list(access.encode(" " + _filler_text(filler, n_sentences, seed), add_bos=False))
        if len(ids) > n_tokens:
            break
        n_sentences *= 2
    cut = [b for b in sentence_boundaries(access, ids) if b <= n_tokens]
    return ids[:cut[-1]]


@dataclass(frozen=True)
class _Spec:
    """What differs between the needle and the passkey task: the texts around the value."""

    header: str
    needle_parts: tuple[str, ...]  # pieces tokenized one by one; the piece equal to `value_piece` is the answer
    value_index: int  # which piece of needle_parts holds the answer value
    question: str  # ends with the answer prefix, e.g. "...for Zanzibar is"
    value: str  # the answer value with its leading space, e.g. " 4721839"


def _needle_spec(rng: random.Random, n_digits: int) -> _Spec:
    key = rng.choice(KEYS)
    value = " " + str(rng.randrange(10 ** (n_digits - 1), 10 ** n_digits))
    statement = f" The special magic number for {key} is"
    return _Spec(
        header=NEEDLE_HEADER,
        needle_parts=(statement, value, "."),
        value_index=1,
        question=f"\n\nQuestion: What is the special magic number for {key}?\nAnswer: The special magic number "
                 f"for {key} is",
        value=value,
    )


def _passkey_spec(rng: random.Random, n_digits: int) -> _Spec:
    value = " " + str(rng.randrange(10 ** (n_digits - 1), 10 ** n_digits))
    return _Spec(
        header=PASSKEY_HEADER,
        needle_parts=(" The pass key is", value, ". Remember it.", value, " is the pass key."),
        value_index=1,
        question="\n\nWhat is the pass key? The pass key is",
        value=value,
    )


def _pieces(access: Any, spec: _Spec) -> tuple[list[int], list[int], list[int], int, list[int]]:
    """Token ids of header (BOS first when used), needle, answer, the answer's offset in the needle, question."""
    head_ids = list(access.encode(spec.header, add_bos=True))
    pieces = [list(access.encode(part, add_bos=False)) for part in spec.needle_parts]
    needle_ids = [t for piece in pieces for t in piece]
    value_offset = sum(len(p) for p in pieces[:spec.value_index])
    question_ids = list(access.encode(spec.question, add_bos=False))
    return head_ids, needle_ids, pieces[spec.value_index], value_offset, question_ids


def minimum_context_length(access: Any, task: TaskName = "needle", n_digits: int = 7) -> int:
    """The shortest sensible context: header + needle + question (longest key) + 128 tokens of haystack."""
    spec = (_needle_spec if task == "needle" else _passkey_spec)(random.Random(0), n_digits)
    head_ids, needle_ids, _, _, question_ids = _pieces(access, spec)
    longest_key = max(len(access.encode(key, add_bos=False)) for key in KEYS) if task == "needle" else 0
    return len(head_ids) + len(needle_ids) + len(question_ids) + 2 * longest_key + 128


def _check_depth(depth: float | int) -> float:
    if not isinstance(depth, (int, float)) or math.isnan(depth) or not 0.0 <= depth <= 1.0:
        raise InputError(f"Needle depth must be a number in [0, 1] (0 = start of the haystack, 1 = end); got "
                         f"{depth!r}.")
    return float(depth)


def make_needle_trial(
    access: Any,
    context_length: int,
    depth: float | int,
    seed: int,
    *,
    task: TaskName = "needle",
    n_digits: int = 7,
    index: int = 0,
    filler: str = "generated",
) -> NeedleTrial:
    """One seeded trial of `task` ("needle": special magic number; "passkey") of at most `context_length` tokens.

    The same seed gives the same haystack, key and value at every depth, so a seed swept over depths is one
    needle moved through one text. `n_digits`: digits of the value (7 for the needle: one token per digit with
    Gemma / SmolLM2 tokenizers, so every answer has 8 copy steps including the leading space). `filler`:
    "generated" (seeded varied sentences) or "repeat" (the passkey paper's five sentences repeated; `REPEAT_FILLER`).
    """
    depth = _check_depth(depth)
    if filler not in FILLERS:
        from posprobe.errors import UnknownNameError

        raise UnknownNameError("haystack filler", filler, FILLERS)
    if task not in ("needle", "passkey"):
        from posprobe.errors import UnknownNameError

        raise UnknownNameError("needle task", task, ["needle", "passkey"])
    if not isinstance(n_digits, int) or n_digits < 1:
        raise InputError(f"n_digits must be a positive integer; got {n_digits!r}.")
    rng = random.Random(f"posprobe.{task}/{seed}")
    spec = _needle_spec(rng, n_digits) if task == "needle" else _passkey_spec(rng, n_digits)

    head_ids, needle_ids, answer_ids, value_offset, question_ids = _pieces(access, spec)
    overhead = len(head_ids) + len(needle_ids) + len(question_ids)
    hay = _haystack(access, context_length - overhead, seed, filler) if context_length > overhead else []
    if not hay:
        first = sentence_boundaries(access, _haystack(access, 256, seed, filler))[1:2] or [64]
        raise InputError(f"context_length {context_length} leaves no room for a haystack sentence: the header, "
                         f"needle and question alone take {overhead} tokens with this tokenizer. Use "
                         f"context_length >= {overhead + first[0]}.")
    bounds = sentence_boundaries(access, hay)
    target = depth * len(hay)
    cut = min(bounds, key=lambda b: (abs(b - target), b))

    ids = head_ids + hay[:cut] + needle_ids + hay[cut:] + question_ids
    starts = find_subsequence(ids, needle_ids)
    if len(starts) != 1:
        raise InputError(f"The needle's token ids occur {len(starts)} times in the prompt (expected once); the "
                         f"haystack reproduced the needle by chance. Use another seed.")
    start = starts[0]
    needle_span = (start, start + len(needle_ids))
    answer_span = (start + value_offset, start + value_offset + len(answer_ids))
    hay_start = len(head_ids)
    text = spec.header + access.decode(hay[:cut]) + "".join(spec.needle_parts) + access.decode(hay[cut:]) \
        + spec.question
    natural = ids == list(access.encode(text, add_bos=True))
    trial = NeedleTrial(
        input_ids=tuple(int(i) for i in ids),
        answer_ids=tuple(int(i) for i in answer_ids),
        answer=spec.value.strip(),
        needle_span=needle_span,
        answer_span=answer_span,
        haystack_span=(hay_start, hay_start + len(hay) + len(needle_ids)),
        depth=depth,
        actual_depth=cut / len(hay),
        context_length=int(context_length),
        needle="".join(spec.needle_parts).strip(),
        question=spec.question.strip(),
        prompt=text,
        task=task,
        seed=seed,
        index=index,
        natural=natural,
    )
    if tuple(trial.input_ids[answer_span[0]:answer_span[1]]) != trial.answer_ids:  # construction invariant
        raise RuntimeError("posprobe bug: the answer span does not hold the answer ids; please report it.")
    return trial


def _grid(access: Any, lengths: Sequence[int], depths: Sequence[float | int], seed: int, n_per_cell: int,
          task: TaskName, n_digits: int, filler: str = "generated") -> list[NeedleTrial]:
    if not lengths or not depths:
        raise InputError("Needle trials need at least one context length and one depth.")
    if not isinstance(n_per_cell, int) or n_per_cell < 1:
        raise InputError(f"n_per_cell must be a positive integer; got {n_per_cell!r}.")
    trials: list[NeedleTrial] = []
    for length in lengths:
        for rep in range(n_per_cell):
            trial_seed = seed * 1_000_003 + int(length) * 101 + rep
            for depth in depths:
                trials.append(make_needle_trial(access, int(length), float(depth), trial_seed, task=task,
                                                n_digits=n_digits, index=len(trials), filler=filler))
    return trials


def make_needle_trials(
    access: Any,
    lengths: Sequence[int],
    depths: Sequence[float | int],
    seed: int = 0,
    *,
    n_per_cell: int = 1,
    n_digits: int = 7,
) -> list[NeedleTrial]:
    """Magic-number needle trials over the grid lengths x depths (`n_per_cell` seeds per cell).

    Within one (length, repetition) the haystack and needle are the same at every depth, so depth is the only
    thing that changes along a depth sweep. Trials are numbered (`index`) in the returned order.
    """
    return _grid(access, lengths, depths, seed, n_per_cell, "needle", n_digits)


def make_passkey_trials(
    access: Any,
    lengths: Sequence[int],
    depths: Sequence[float | int],
    seed: int = 0,
    *,
    n_per_cell: int = 1,
    n_digits: int = 5,
    filler: str = "generated",
) -> list[NeedleTrial]:
    """Passkey trials (Mohtashami & Jaggi 2023: "The pass key is 71432. Remember it. 71432 is the pass key.").

    The answer span is the first of the two occurrences of the key in the needle. `filler="repeat"`: the paper's
    own repeated filler (see `make_needle_trial`).
    """
    return _grid(access, lengths, depths, seed, n_per_cell, "passkey", n_digits, filler)


def grid_for_trials(lengths: Sequence[int], n_trials: int) -> list[tuple[int, float]]:
    """(length, depth) cells for `n_trials` trials: lengths interleaved, depths evenly spaced in [0, 1].

    Uses ceil(n_trials / len(lengths)) depths per length and takes the first `n_trials` cells in depth-major
    order, so every length is covered and depths stay spread when the count does not divide evenly.
    """
    if n_trials < 1 or not lengths:
        raise InputError(f"Need at least one trial and one context length; got {n_trials} trials, lengths "
                         f"{list(lengths)}.")
    n_depths = math.ceil(n_trials / len(lengths))
    depths = [0.5] if n_depths == 1 else [k / (n_depths - 1) for k in range(n_depths)]
    cells = [(length, depth) for depth in depths for length in lengths]
    return cells[:n_trials]


# ---------------------------------------------------------------------------------------------------------------
# Answer checking


def check_answers(access: Any, trials: Sequence[NeedleTrial], *, progress: Any = None) -> pd.DataFrame:
    """Teacher-forced exact match of every trial: one pass, logits only at the answer positions.

    `correct` is True when the argmax at every answer position is the reference token (the greedy continuation
    starts with the answer); also `token_accuracy` (share of answer tokens that are the argmax) and
    `answer_logprob` (sum of the answer tokens' log-probabilities). Edits active on `access` apply.
    """
    rows = []
    iterator = progress(trials, "needle answers") if progress is not None else trials
    for trial in iterator:
        positions = list(trial.answer_positions)
        logits = access.run(trial.teacher_forced_ids(), logits=positions).logits[0].double()
        target = torch.tensor(trial.answer_ids)
        hits = logits.argmax(-1) == target
        logprob = torch.log_softmax(logits, -1)[torch.arange(len(target)), target].sum()
        rows.append({"trial": trial.index, "task": trial.task, "context_length": trial.context_length,
                     "n_tokens": trial.n_tokens, "depth": trial.depth, "actual_depth": trial.actual_depth,
                     "correct": bool(hits.all()), "token_accuracy": float(hits.double().mean()),
                     "answer_logprob": float(logprob)})
    return pd.DataFrame(rows)


__all__ = [
    "KEYS",
    "NeedleTrial",
    "check_answers",
    "find_subsequence",
    "grid_for_trials",
    "make_needle_trial",
    "make_needle_trials",
    "make_passkey_trials",
    "minimum_context_length",
    "period_token_ids",
    "sentence_boundaries",
]
