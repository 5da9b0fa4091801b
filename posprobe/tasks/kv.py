"""Key-value retrieval tasks: word -> number lines, and the UUID JSON format of Liu et al. 2023.

Owns `KVWords` ("Below is a list of words, each with a secret number." then "word: 4821" lines, then
"The secret number for X is") and `KVUuid` (Liu et al.'s "Extract the value corresponding to the specified key in
the JSON object below." with UUID keys and values). docs/tasks.md (key-value retrieval, gold position swept)
for the behavioural U-curve. Each key-value pair is one item whose token span the prompt records.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from posprobe.tasks.base import Prompt, Segment, Task, build_prompt, check_item_args, first_integer, first_uuid

# Common concrete nouns: distinct, lower-case, none a prefix of a phrase the prompt uses.
WORDS: tuple[str, ...] = (
    "apple", "anchor", "arrow", "badge", "bakery", "balloon", "banana", "barrel", "basket", "beacon", "bell",
    "blanket", "bottle", "bracelet", "bridge", "broom", "bucket", "butter", "button", "cabin", "cactus", "camera",
    "candle", "canyon", "carpet", "castle", "cherry", "chimney", "circus", "cliff", "clock", "cloud", "coconut",
    "compass", "copper", "cotton", "crayon", "cricket", "crown", "curtain", "cushion", "dagger", "desert", "diamond",
    "dolphin", "dragon", "drum", "eagle", "engine", "envelope", "falcon", "feather", "fence", "ferry", "fiddle",
    "forest", "fountain", "garden", "garlic", "giraffe", "glacier", "glove", "goblet", "guitar", "hammer", "harbor",
    "helmet", "honey", "horizon", "iceberg", "island", "jacket", "jigsaw", "kettle", "kitten", "ladder", "lantern",
    "lemon", "library", "lighthouse", "lizard", "magnet", "mango", "marble", "meadow", "mirror", "monkey", "mountain",
    "mushroom", "needle", "notebook", "oasis", "ocean", "orchard", "otter", "oyster", "paddle", "palace", "panther",
    "parrot", "peach", "pebble", "pencil", "pepper", "piano", "pillow", "pirate", "planet", "pocket", "pumpkin",
    "puzzle", "quilt", "rabbit", "radio", "raven", "ribbon", "river", "rocket", "saddle", "sailboat", "salmon",
    "sandal", "scarf", "scissors", "shovel", "silver", "skate", "sparrow", "spider", "spoon", "squirrel", "statue",
    "sugar", "sunflower", "swan", "sword", "teapot", "temple", "thunder", "tiger", "tomato", "tractor", "trumpet",
    "tulip", "tunnel", "turtle", "umbrella", "valley", "velvet", "violin", "volcano", "wagon", "walnut", "whistle",
    "willow", "window", "wizard", "wolf", "zebra",
)


@dataclass(frozen=True)
class KVWords(Task):
    """word -> number key-value retrieval: one "word: number" line per item, then the question for one word."""

    name: ClassVar[str] = "kv_words"
    description: ClassVar[str] = "word -> secret number lines, then 'The secret number for X is' (exact number match)"
    default_items: ClassVar[int] = 20

    header: str = "Below is a list of words, each with a secret number.\n\n"
    question: str = "\n\nThe secret number for {key} is"
    digits: int = 4  # 4-digit numbers: long enough to be unguessable (1 in 9000), short enough for small models
    max_new_tokens: int = 6  # a space plus one token per digit with digit-splitting tokenizers (Gemma)

    def make(self, access: Any, n_items: int, gold_index: int, seed: int) -> Prompt:
        gold_index = check_item_args(self.name, n_items, gold_index, max_items=len(WORDS))
        rng = random.Random(f"kv_words/{seed}/{n_items}")
        keys = rng.sample(WORDS, n_items)
        low = 10 ** (self.digits - 1)
        values = [str(v) for v in rng.sample(range(low, 10 * low), n_items)]
        order = _gold_order(n_items, gold_index)
        segments = [Segment(self.header)]
        for slot, item in enumerate(order):
            if slot:
                segments.append(Segment("\n"))
            segments.append(Segment(f"{keys[item]}: {values[item]}", item=True))
        segments.append(Segment(self.question.format(key=keys[0])))
        return build_prompt(access, segments, answer=values[0], answer_prefix=" ", gold_index=gold_index,
                            task=self.name, seed=seed)

    def score(self, prompt: Prompt, completion: str) -> bool:
        return first_integer(completion) == prompt.answer


@dataclass(frozen=True)
class KVUuid(Task):
    """Liu et al. 2023 key-value retrieval: a JSON object of UUID pairs, then the key whose value is asked."""

    name: ClassVar[str] = "kv_uuid"
    description: ClassVar[str] = "Liu et al. UUID JSON key-value retrieval (exact UUID match)"
    default_items: ClassVar[int] = 20

    header: str = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
    question: str = '}\n\nKey: "{key}"\nCorresponding value:'
    max_new_tokens: int = 40  # a UUID is 36 characters; digit-splitting tokenizers need up to ~30 tokens

    def make(self, access: Any, n_items: int, gold_index: int, seed: int) -> Prompt:
        gold_index = check_item_args(self.name, n_items, gold_index)
        rng = random.Random(f"kv_uuid/{seed}/{n_items}")
        pairs = [(str(uuid.UUID(int=rng.getrandbits(128), version=4)), str(uuid.UUID(int=rng.getrandbits(128),
                                                                                    version=4)))
                 for _ in range(n_items)]
        order = _gold_order(n_items, gold_index)
        segments = [Segment(self.header)]
        for slot, item in enumerate(order):
            if slot:
                segments.append(Segment(",\n"))
            key, value = pairs[item]
            # Liu et al. separate pairs with ",\n " ; the leading space is part of the item so the item's tokens do
            # not depend on its neighbour (a lone ' "' would merge with the quote into one token)
            segments.append(Segment(f'{" " if slot else ""}"{key}": "{value}"', item=True))
        segments.append(Segment(self.question.replace("{key}", pairs[0][0])))
        return build_prompt(access, segments, answer=pairs[0][1], answer_prefix=' "', gold_index=gold_index,
                            task=self.name, seed=seed)

    def score(self, prompt: Prompt, completion: str) -> bool:
        return first_uuid(completion) == prompt.answer


def _gold_order(n_items: int, gold_index: int) -> list[int]:
    """Item order with item 0 (the gold one) at slot `gold_index` and distractors 1..n-1 in a fixed order."""
    order = list(range(1, n_items))
    order.insert(gold_index, 0)
    return order
