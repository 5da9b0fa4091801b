"""Seeded natural-looking filler text that needs no download.

Owns the text source of the shared scan passes and of task haystacks (docs/tasks.md: filler
text from generated sentences). Sentences are drawn from small hand-written grammars so that any seed gives fluent,
position-neutral English with varied tokens; `generated_text` is deterministic in (seed, n_sentences).
"""

from __future__ import annotations

import random

SOURCE_NAME = "posprobe.tasks.text:generated_sentences/v1"

_SUBJECTS = [
    "The old farmer", "A young teacher", "The river pilot", "My neighbour", "The city council", "A travelling poet",
    "The baker", "Our captain", "The museum guide", "A quiet student", "The village doctor", "The night watchman",
    "A curious child", "The engineer", "The shepherd", "An elderly sailor", "The librarian", "A local painter",
]
_VERBS = [
    "carried", "repaired", "described", "painted", "discovered", "forgot", "measured", "borrowed", "admired",
    "cleaned", "remembered", "counted", "sold", "found", "studied", "wrapped", "moved", "noticed",
]
_OBJECTS = [
    "a wooden chair", "the blue lantern", "an empty basket", "the broken clock", "a letter from the coast",
    "the heavy door", "a map of the valley", "the copper kettle", "a small garden", "the long fence",
    "a basket of apples", "the stone bridge", "an old photograph", "the winter coat", "a bundle of reeds",
]
_PLACES = [
    "near the harbour", "behind the mill", "before the storm", "after the market closed", "at the edge of town",
    "in the early morning", "under the oak trees", "beside the canal", "during the long summer", "on the hill road",
    "inside the railway station", "across the square", "by the frozen lake", "along the northern path",
]
_CLAUSES = [
    "and nobody said a word", "while the bells were ringing", "because the weather had turned", "as usual",
    "without any help", "for the second time that week", "although it was getting late", "with great care",
]


def sentence(rng: random.Random) -> str:
    parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)]
    if rng.random() < 0.4:
        parts.append(rng.choice(_CLAUSES))
    return " ".join(parts) + "."


def sentences(n: int, seed: int) -> list[str]:
    """`n` seeded sentences, each ending with a period."""
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def generated_text(n_sentences: int, seed: int) -> str:
    return " ".join(sentences(n_sentences, seed))


def text_ids(access: object, n_tokens: int, seed: int) -> list[int]:
    """Exactly `n_tokens` token ids of generated text (BOS first when the model uses one)."""
    ids: list[int] = []
    n_sentences = max(8, n_tokens // 8)
    while len(ids) < n_tokens:
        ids = access.encode(generated_text(n_sentences, seed))  # type: ignore[attr-defined]
        n_sentences *= 2
    return ids[:n_tokens]
