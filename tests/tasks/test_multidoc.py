"""Multi-document QA: one gold document among distractors, moved through the slots, exact spans, scoring."""

from __future__ import annotations

import pytest

from posprobe.errors import UnknownNameError
from posprobe.tasks import get_task
from posprobe.tasks.multidoc import RELATIONS, MultiDoc
from posprobe.testing import PlantedAccess, planted_info


@pytest.fixture(scope="module")
def byte_access():
    return PlantedAccess(planted_info())


@pytest.mark.parametrize("relation", sorted(RELATIONS))
def test_answer_only_in_gold_document(byte_access, relation):
    task = MultiDoc(relation=relation)
    prompt = task.make(byte_access, 8, 5, seed=2)
    docs = [byte_access.decode(prompt.input_ids[a:b]) for a, b in prompt.spans]
    assert all(doc.startswith(f"Document [{k + 1}](Title: ") for k, doc in enumerate(docs))
    assert [prompt.answer in doc for doc in docs] == [k == 5 for k in range(8)]
    entity = docs[5].split("(Title: ")[1].split(")")[0]
    assert entity in prompt.text.split("Question:")[1]
    assert sum(f"(Title: {entity})" in doc for doc in docs) == 1
    assert prompt.answer not in prompt.text.split("Question:")[1]


def test_gold_document_moves_through_slots_with_same_length(byte_access):
    task = get_task("multidoc")
    prompts = [task.make(byte_access, 6, k, seed=9) for k in range(6)]
    assert len({p.n_tokens for p in prompts}) == 1
    bodies = [[byte_access.decode(p.input_ids[a:b]).split(") ", 1)[1] for a, b in p.spans] for p in prompts]
    gold = bodies[0][0]
    for k, docs in enumerate(bodies):
        assert docs[k] == gold
        assert [d for d in docs if d != gold] == bodies[0][1:]
    assert all(p.natural for p in prompts)


def test_determinism_and_unknown_relation(byte_access):
    assert MultiDoc().make(byte_access, 5, 2, seed=4) == MultiDoc().make(byte_access, 5, 2, seed=4)
    assert MultiDoc().make(byte_access, 5, 2, seed=4).text != MultiDoc().make(byte_access, 5, 2, seed=5).text
    with pytest.raises(UnknownNameError, match="capital"):
        MultiDoc(relation="mayor").make(byte_access, 5, 2, seed=4)


def test_prompt_ends_with_answer_lead_and_scoring(byte_access):
    task = MultiDoc(relation="capital")
    prompt = task.make(byte_access, 4, 0, seed=1)
    assert prompt.text.endswith("is")
    assert "Answer: The capital of" in prompt.text
    assert MultiDoc(lead=False).make(byte_access, 4, 0, seed=1).text.endswith("Answer:")
    assert task.score(prompt, f" {prompt.answer}.\nQuestion")
    assert task.score(prompt, f"\n{prompt.answer.lower()}")
    assert not task.score(prompt, f" unknown.\n{prompt.answer}")
    assert not task.score(prompt, f" {prompt.answer[:-2]}")


@pytest.mark.real_model
def test_multidoc_tokenizes_naturally_on_gemma(gemma):
    prompts = [MultiDoc().make(gemma, 10, k, seed=3) for k in (0, 5, 9)]
    assert all(p.natural for p in prompts)
    assert len({p.n_tokens for p in prompts}) == 1
    assert prompts[0].n_tokens < 512  # every Gemma 3 layer (window 512) sees every document
