"""Key-value retrieval tasks: exact item spans, gold moved with the items fixed, seeded determinism, scoring."""

from __future__ import annotations

import pytest

from posprobe.errors import InputError, UnknownNameError
from posprobe.tasks import get_task, list_tasks
from posprobe.tasks.kv import KVUuid, KVWords
from posprobe.testing import PlantedAccess, planted_info


@pytest.fixture(scope="module")
def byte_access():
    return PlantedAccess(planted_info())


def test_registry_names_and_unknown_name_lists_valid_ones():
    assert {"kv_words", "kv_uuid", "multidoc", "passkey"} <= set(list_tasks())
    with pytest.raises(UnknownNameError) as err:
        get_task("kv_word")
    assert "kv_words" in str(err.value) and "multidoc" in str(err.value)
    with pytest.raises(UnknownNameError, match="digits"):
        get_task("kv_words", n_digits=3)
    assert get_task("kv_words", digits=5).digits == 5


@pytest.mark.parametrize("task", [KVWords(), KVUuid()])
def test_spans_hold_exactly_the_items_and_gold_holds_the_answer(byte_access, task):
    prompt = task.make(byte_access, 7, 3, seed=11)
    assert prompt.n_items == 7 and prompt.gold_index == 3 and prompt.natural
    items = [byte_access.decode(prompt.input_ids[a:b]).strip() for a, b in prompt.spans]
    lines = [line.strip().rstrip(",").lstrip("{").rstrip("}") for line in prompt.text.splitlines()]
    for item in items:
        assert item in lines  # a whole line of the prompt, nothing more, nothing less
    assert prompt.answer in items[3]
    assert sum(prompt.answer in item for item in items) == 1
    assert byte_access.decode(prompt.answer_ids).strip().strip('"') == prompt.answer
    starts = [a for a, _ in prompt.spans]
    assert starts == sorted(starts) and prompt.spans[-1][1] <= prompt.n_tokens


def test_gold_moves_while_items_and_distractor_order_stay(byte_access):
    task = KVWords()
    prompts = [task.make(byte_access, 6, g, seed=5) for g in range(6)]
    assert len({p.n_tokens for p in prompts}) == 1
    assert len({p.answer for p in prompts}) == 1
    as_items = [[byte_access.decode(p.input_ids[a:b]) for a, b in p.spans] for p in prompts]
    gold = as_items[0][0]
    for g, items in enumerate(as_items):
        assert items[g] == gold
        assert [x for x in items if x != gold] == [x for x in as_items[0] if x != gold]
    assert prompts[2].text.endswith(f"The secret number for {gold.split(':')[0]} is")


def test_same_seed_same_prompt_other_seed_other_items(byte_access):
    task = KVWords()
    assert task.make(byte_access, 10, 4, seed=3) == task.make(byte_access, 10, 4, seed=3)
    assert task.make(byte_access, 10, 4, seed=3).text != task.make(byte_access, 10, 4, seed=4).text


def test_keys_and_values_are_distinct(byte_access):
    prompt = KVWords().make(byte_access, 40, 0, seed=0)
    pairs = [byte_access.decode(prompt.input_ids[a:b]).split(": ") for a, b in prompt.spans]
    assert len({k for k, _ in pairs}) == 40 and len({v for _, v in pairs}) == 40
    assert all(len(v) == 4 and v.isdigit() for _, v in pairs)


def test_invalid_items_and_gold_index_raise(byte_access):
    with pytest.raises(InputError, match="gold_index"):
        KVWords().make(byte_access, 5, 5, seed=0)
    with pytest.raises(InputError, match="n_items"):
        KVWords().make(byte_access, 0, 0, seed=0)
    with pytest.raises(InputError, match="at most"):
        KVWords().make(byte_access, 10_000, 0, seed=0)
    assert KVWords().make(byte_access, 5, -1, seed=0).gold_index == 4


def test_scoring_is_exact_number_match(byte_access):
    task = KVWords()
    prompt = task.make(byte_access, 3, 1, seed=0)
    assert task.score(prompt, f" {prompt.answer}.\n")
    assert not task.score(prompt, f" {prompt.answer}5")
    assert not task.score(prompt, " I do not know")
    uuid_task = KVUuid()
    uprompt = uuid_task.make(byte_access, 3, 1, seed=0)
    assert uuid_task.score(uprompt, f' "{uprompt.answer}"}}')
    assert not uuid_task.score(uprompt, f' "{uprompt.answer[:-1]}0"')


@pytest.mark.real_model
def test_kv_words_tokenizes_naturally_on_gemma(gemma):
    for g in (0, 9, 19):
        prompt = KVWords().make(gemma, 20, g, seed=1)
        assert prompt.natural
        assert gemma.decode(prompt.input_ids[slice(*prompt.gold_span)]).endswith(prompt.answer)
        assert gemma.decode(prompt.answer_ids) == " " + prompt.answer
