"""Multi-document question answering over synthetic facts (Liu et al. 2023 format, no download).

Owns `MultiDoc`: `n_items` short documents about invented entities, each stating one fact of the same relation
(e.g. "The capital of Velmora is Tarsine.") padded with generated filler sentences (and optionally an introducing
sentence); exactly one document (the gold
one) is about the entity the question asks for, so the answer is only in it. The gold document is moved through the
slots with the distractors' order fixed (docs/tasks.md; the document-level curve of docs/probes/position_bias.md, after
Hsieh et al. 2024, reads attention to each document's token span). Entity and answer names are generated from syllables,
so no fact can be known in advance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from posprobe.errors import UnknownNameError
from posprobe.tasks.base import Prompt, Segment, Task, build_prompt, check_item_args, normalize_answer
from posprobe.tasks.text import sentence

# relation: (intro sentence, fact sentence, question); {e} entity, {a} answer
RELATIONS: dict[str, tuple[str, str, str]] = {
    "capital": ("{e} is a small country beyond the mountains.", "The capital of {e} is {a}.",
                "What is the capital of {e}?"),
    "founder": ("{e} is an old trading company.", "The company {e} was founded by {a}.", "Who founded {e}?"),
    "river": ("{e} is a quiet valley town.", "The river that flows through {e} is called the {a}.",
              "Which river flows through {e}?"),
    "inventor": ("The {e} is a strange machine.", "The {e} was invented by {a}.", "Who invented the {e}?"),
}
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "rk")


def invented_name(rng: random.Random, syllables: int) -> str:
    """A pronounceable capitalised nonsense word (e.g. 'Velmora')."""
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables - 1))
    return (word + rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)).capitalize()


def _distinct_names(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = invented_name(rng, syllables)
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


@dataclass(frozen=True)
class MultiDoc(Task):
    """Liu et al.-style multi-document QA with one gold document of synthetic facts among distractors."""

    name: ClassVar[str] = "multidoc"
    description: ClassVar[str] = "multi-document QA over invented facts, one gold document among distractors"
    default_items: ClassVar[int] = 10

    header: str = ("Write a high-quality answer for the given question using only the provided search results "
                   "(some of which might be irrelevant).\n\n")
    filler_sentences: int = 1  # generated filler sentences per document: ~37 tokens per Gemma document, so 10
    # documents stay inside a 512-token sliding window (Gemma 3) and every layer can see every document
    intro: bool = False  # add a sentence introducing the entity ("X is a small country ..."): ~10 tokens more
    # end the prompt with the fact's opening ("Answer: The capital of X is") so small base models answer by
    # completing it; False ends with "Answer:" as Liu et al.
    lead: bool = True
    relation: str | None = None  # one of RELATIONS; None draws one per seed
    max_new_tokens: int = 12  # room for a short sentence that contains the name

    def make(self, access: Any, n_items: int, gold_index: int, seed: int) -> Prompt:
        gold_index = check_item_args(self.name, n_items, gold_index)
        rng = random.Random(f"multidoc/{seed}/{n_items}")
        relation = self.relation or rng.choice(sorted(RELATIONS))
        if relation not in RELATIONS:
            raise UnknownNameError("relation", relation, RELATIONS)
        intro, fact, question = RELATIONS[relation]
        taken: set[str] = set()
        entities = _distinct_names(rng, n_items, 3, taken)
        answers = _distinct_names(rng, n_items, 3, taken)
        if relation in ("founder", "inventor"):  # people get a first name too
            answers = [f"{first} {last}" for first, last in zip(_distinct_names(rng, n_items, 2, taken), answers)]
        docs = []
        for entity, answer in zip(entities, answers):
            body = [fact.format(e=entity, a=answer)] + ([intro.format(e=entity)] if self.intro else [])
            body += [sentence(rng) for _ in range(self.filler_sentences)]
            rng.shuffle(body)  # the fact is not always in the same place of its document
            docs.append((entity, " ".join(body)))
        order = list(range(1, n_items))
        order.insert(gold_index, 0)
        segments = [Segment(self.header)]
        for slot, item in enumerate(order):
            if slot:
                segments.append(Segment("\n"))
            title, text = docs[item]
            segments.append(Segment(f"Document [{slot + 1}](Title: {title}) {text}", item=True))
        answer_lead = " " + fact.split("{a}")[0].format(e=entities[0]).rstrip() if self.lead else ""
        segments.append(Segment(f"\n\nQuestion: {question.format(e=entities[0])}\nAnswer:{answer_lead}"))
        return build_prompt(access, segments, answer=answers[0], answer_prefix=" ", gold_index=gold_index,
                            task=self.name, seed=seed)

    def score(self, prompt: Prompt, completion: str) -> bool:
        """Liu et al.'s best-subspan match, on the first line of the completion only."""
        first_line = completion.strip().split("\n")[0]
        return f" {normalize_answer(prompt.answer)} " in f" {normalize_answer(first_line)} "
