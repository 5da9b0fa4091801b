"""The passkey task in the common Task API: a wrapper over `posprobe.tasks.needle` (one implementation).

Owns `Passkey`, which maps the Task API onto `make_needle_trial(..., task="passkey")` (Mohtashami & Jaggi 2023;
docs/tasks.md: "a passkey hidden in filler text at a chosen depth"): `n_items` depth slots over
the haystack, gold slot k -> depth k / (n_items - 1). The prompt's `spans` split the haystack (needle included)
into `n_items` contiguous chunks of near-equal token length; `gold_index` is the chunk that holds the needle's
start after needle.py snapped it to a sentence boundary, so it can differ from the requested slot by one when the
snap crosses a chunk edge (the evaluation reports the slot the needle actually occupies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from posprobe.errors import InputError
from posprobe.tasks.base import Prompt, Task, check_item_args, first_integer


@dataclass(frozen=True)
class Passkey(Task):
    """Passkey retrieval ("The pass key is 71432. Remember it. ...") in generated filler, needle moved by slot."""

    name: ClassVar[str] = "passkey"
    description: ClassVar[str] = ("passkey in generated (or the paper's repeated) filler (posprobe.tasks.needle), "
                                  "needle depth swept by slot")
    default_items: ClassVar[int] = 5

    context_length: int = 1024  # tokens: long enough for a real haystack, inside Gemma 3's 512-token window x2
    n_digits: int = 5  # the passkey of Mohtashami & Jaggi is a 5-digit number
    max_new_tokens: int = 8  # a space plus one token per digit with digit-splitting tokenizers, plus slack
    # "generated": seeded varied sentences; "repeat": the paper's own filler, five sentences repeated (the form the
    # PI / YaRN / LongRoPE papers report passkey accuracy on; far easier for a small model)
    filler: str = "generated"

    def __post_init__(self) -> None:
        from posprobe.tasks.needle import FILLERS

        if self.filler not in FILLERS:
            from posprobe.errors import UnknownNameError

            raise UnknownNameError("passkey filler", self.filler, FILLERS)

    def make(self, access: Any, n_items: int, gold_index: int, seed: int) -> Prompt:
        from posprobe.tasks.needle import make_needle_trial

        gold_index = check_item_args(self.name, n_items, gold_index)
        depth = gold_index / (n_items - 1) if n_items > 1 else 0.5
        trial = make_needle_trial(access, self.context_length, depth, seed, task="passkey", n_digits=self.n_digits,
                                  filler=self.filler)
        start, stop = trial.haystack_span
        if stop - start < n_items:
            raise InputError(f"The passkey haystack has {stop - start} tokens, fewer than n_items={n_items} slots; "
                             f"use a larger context_length or fewer items.")
        edges = [start + round(k * (stop - start) / n_items) for k in range(n_items + 1)]
        spans = tuple((edges[k], edges[k + 1]) for k in range(n_items))
        needle_start = trial.needle_span[0]
        actual = next(k for k, (a, b) in enumerate(spans) if a <= needle_start < b)
        return Prompt(input_ids=trial.input_ids, answer=trial.answer, answer_ids=trial.answer_ids, spans=spans,
                      gold_index=actual, text=trial.prompt, task=self.name, seed=seed, natural=trial.natural)

    def score(self, prompt: Prompt, completion: str) -> bool:
        return first_integer(completion) == prompt.answer
